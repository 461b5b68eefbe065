//! Who may use the console.
//!
//! Browsers send the API key as the password of HTTP Basic credentials (any user name): the
//! browser asks for it once and sends it with every request, with no cookie, no session and no
//! script, so there is nothing to steal from the page and no cross-site request can borrow a
//! session. The key is checked like a gRPC caller's ([`TenantRegistry::authenticate_key`]:
//! SHA-256, compared in constant time with every tenant's digest), and the tenant must have
//! the `audit` role.
//!
//! The rule: when the configuration names a tenant with the `audit` role, every request must
//! carry such a key, on any address. Without one, the console serves loopback only, like
//! `jobs` and `audit` serve whoever can read the file; bound elsewhere it refuses to start.
//!
//! Loopback is not a boundary against the browser itself: a web page the operator visits can
//! rebind its own name to 127.0.0.1 and read the console as if it were that page's site. So
//! without sign-in, a request must name the console by a loopback address and the port it is
//! bound to (`Host: 127.0.0.1:PORT`, `localhost:PORT`, `[::1]:PORT`, or the bound address);
//! any other name is refused (421). And in every mode, a POST sent from another origin (its
//! `Origin` header names another host than its `Host`, or `Sec-Fetch-Site: cross-site`) is
//! refused (403): browsers send Basic credentials with cross-site requests too. The pages'
//! referrer policy is `same-origin`, so the browser names the console as the origin of its own
//! form (under `no-referrer` it sends `Origin: null`, accepted only with
//! `Sec-Fetch-Site: same-origin`).

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use base64::{Engine, engine::general_purpose::STANDARD};
use hyper::{
    HeaderMap, Method,
    header::{AUTHORIZATION, AsHeaderName, HOST, ORIGIN},
};
use zeroize::Zeroizing;

use crate::{
    config::{Role, TenantConfig},
    security::tenants::TenantRegistry,
};

/// How requests are admitted.
#[derive(Debug, Clone)]
pub enum Access {
    /// Anyone who reaches the (loopback) listener by one of these names (`host:port`, in
    /// lower case): what a DNS-rebinding page cannot send.
    Open { hosts: Vec<String> },
    /// A tenant's API key with the `audit` role, in HTTP Basic credentials.
    AuditKey(Arc<TenantRegistry>),
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No credentials, or a key no tenant has: 401, and the browser asks.
    Unauthenticated,
    /// A known tenant without the `audit` role: 403.
    NotAnAuditor(String),
    /// Without sign-in, a `Host` that is not the console's loopback address: 421. Holds the
    /// names that are accepted (never the one that was sent).
    WrongHost(Vec<String>),
    /// A POST from another origin: 403.
    CrossSite,
}

/// Why the console will not start on an address.
#[derive(Debug, thiserror::Error)]
#[error(
    "the console would listen on {0}, which is not a loopback address, and no tenant with the \
     audit role is configured: auditors could not be made to sign in. Add a [[tenants]] entry \
     with roles = [\"audit\"] to the configuration given with --config, or listen on 127.0.0.1"
)]
pub struct OpenOffLoopback(pub IpAddr);

impl Access {
    /// The access rule for a console listening on `address` with `tenants` configured.
    pub fn for_address(
        address: SocketAddr,
        tenants: &[TenantConfig],
    ) -> Result<Access, OpenOffLoopback> {
        if tenants
            .iter()
            .any(|tenant| tenant.roles.contains(&Role::Audit))
        {
            Ok(Access::AuditKey(TenantRegistry::new(tenants)))
        } else if address.ip().is_loopback() {
            let port = address.port();
            let mut hosts: Vec<String> = ["127.0.0.1", "localhost", "[::1]"]
                .iter()
                .map(|name| format!("{name}:{port}"))
                .collect();
            let bound = address.to_string().to_ascii_lowercase();
            if !hosts.contains(&bound) {
                hosts.push(bound);
            }
            Ok(Access::Open { hosts })
        } else {
            Err(OpenOffLoopback(address.ip()))
        }
    }

    /// Admits or refuses a request by its method, its target's authority (when the request
    /// line carries one) and its headers.
    pub fn check(
        &self,
        method: &Method,
        authority: Option<&str>,
        headers: &HeaderMap,
    ) -> Result<(), Refusal> {
        let host = header_text(headers, HOST);
        if let Access::Open { hosts } = self {
            let named = |name: Option<&str>| name.is_some_and(|name| is_one_of(name, hosts));
            // The request line's authority, when it has one, overrides `Host` (RFC 9112 §3.2.2).
            if !named(host) || authority.is_some_and(|authority| !named(Some(authority))) {
                return Err(Refusal::WrongHost(hosts.clone()));
            }
        }
        if *method != Method::GET && *method != Method::HEAD && is_cross_site(headers, host) {
            return Err(Refusal::CrossSite);
        }
        let Access::AuditKey(registry) = self else {
            return Ok(());
        };
        let key = headers
            .get(AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(basic_password)
            .ok_or(Refusal::Unauthenticated)?;
        let caller = registry
            .authenticate_key(&key)
            .map_err(|_| Refusal::Unauthenticated)?;
        caller
            .require(Role::Audit)
            .map_err(|denied| Refusal::NotAnAuditor(denied.to_string()))
    }
}

fn header_text(headers: &HeaderMap, name: impl AsHeaderName) -> Option<&str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

/// Whether `host` (`name:port`, any case) is one of `hosts`; a `Host` without a port means
/// port 80.
fn is_one_of(host: &str, hosts: &[String]) -> bool {
    let host = host.trim().to_ascii_lowercase();
    let with_port = if host.ends_with(']') || !host.contains(':') {
        format!("{host}:80")
    } else {
        host
    };
    hosts.contains(&with_port)
}

/// Whether a request that changes what a browser shows came from another site: the browser
/// says `Sec-Fetch-Site: cross-site`, or its `Origin` names another host than its `Host` (any
/// scheme: behind a TLS proxy the browser's origin is `https`). `Origin: null` (sandboxed
/// pages, or a page whose referrer policy is `no-referrer`) counts as another origin unless
/// the browser says `Sec-Fetch-Site: same-origin`, which no page can forge. No `Origin` at all
/// is a client that is not a browser, or a browser too old to send one.
fn is_cross_site(headers: &HeaderMap, host: Option<&str>) -> bool {
    let site = header_text(headers, "sec-fetch-site").map(str::trim);
    if site.is_some_and(|site| site.eq_ignore_ascii_case("cross-site")) {
        return true;
    }
    let Some(origin) = headers.get(ORIGIN) else {
        return false;
    };
    let Some(origin) = origin.to_str().ok().map(str::trim) else {
        return true;
    };
    if origin == "null" {
        return !site.is_some_and(|site| site.eq_ignore_ascii_case("same-origin"));
    }
    let authority = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    match (authority, host) {
        (Some(authority), Some(host)) => !authority.eq_ignore_ascii_case(host.trim()),
        _ => true,
    }
}

/// The password of `Basic base64(user:password)` credentials (the scheme in any case); wiped
/// from memory when dropped.
fn basic_password(authorization: &str) -> Option<Zeroizing<String>> {
    let (scheme, encoded) = authorization.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = Zeroizing::new(STANDARD.decode(encoded.trim()).ok()?);
    let text = std::str::from_utf8(&decoded).ok()?;
    let (_, password) = text.split_once(':')?;
    (!password.is_empty()).then(|| Zeroizing::new(password.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::tenants::{key_digest, new_key};

    fn tenant(name: &str, key: &str, role: Role) -> TenantConfig {
        TenantConfig {
            name: name.into(),
            api_key_sha256: hex::encode(key_digest(key)),
            client_ids: vec!["app".into()],
            roles: vec![role],
            max_pending: None,
        }
    }

    fn basic(password: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(HOST, "anything.example".parse().unwrap());
        let value = format!("Basic {}", STANDARD.encode(format!("auditor:{password}")));
        headers.insert(AUTHORIZATION, value.parse().unwrap());
        headers
    }

    #[test]
    fn off_loopback_an_audit_tenant_is_required() {
        let anywhere: SocketAddr = "0.0.0.0:9465".parse().unwrap();
        let loopback: SocketAddr = "127.0.0.1:9465".parse().unwrap();
        let (key, _) = new_key();
        assert!(Access::for_address(anywhere, &[]).is_err());
        assert!(Access::for_address(anywhere, &[tenant("shop", &key, Role::Submit)]).is_err());
        assert!(matches!(
            Access::for_address(loopback, &[]),
            Ok(Access::Open { .. })
        ));
        assert!(matches!(
            Access::for_address(anywhere, &[tenant("audit", &key, Role::Audit)]),
            Ok(Access::AuditKey(_))
        ));
    }

    #[test]
    fn only_an_audit_key_in_basic_credentials_is_admitted() {
        let (auditor, _) = new_key();
        let (shop, _) = new_key();
        let access = Access::for_address(
            "127.0.0.1:9465".parse().unwrap(),
            &[
                tenant("auditors", &auditor, Role::Audit),
                tenant("shop", &shop, Role::Submit),
            ],
        )
        .unwrap();
        let get = |headers: &HeaderMap| access.check(&Method::GET, None, headers);
        assert_eq!(get(&basic(&auditor)), Ok(()));
        assert!(matches!(get(&basic(&shop)), Err(Refusal::NotAnAuditor(_))));
        assert_eq!(get(&basic("wrong")), Err(Refusal::Unauthenticated));
        assert_eq!(get(&HeaderMap::new()), Err(Refusal::Unauthenticated));
        let mut bearer = HeaderMap::new();
        bearer.insert(AUTHORIZATION, format!("Bearer {auditor}").parse().unwrap());
        assert_eq!(get(&bearer), Err(Refusal::Unauthenticated));
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.insert(*name, value.parse().unwrap());
        }
        headers
    }

    #[test]
    fn without_sign_in_only_loopback_names_of_the_bound_port_are_answered() {
        let access = Access::for_address("127.0.0.1:9465".parse().unwrap(), &[]).unwrap();
        let get = |host: &str| access.check(&Method::GET, None, &headers(&[("host", host)]));
        for host in [
            "127.0.0.1:9465",
            "localhost:9465",
            "LocalHost:9465",
            "[::1]:9465",
        ] {
            assert_eq!(get(host), Ok(()), "{host}");
        }
        for host in [
            "evil.example:9465",
            "127.0.0.1:80",
            "localhost",
            "localhost.evil.example:9465",
            "127.0.0.2:9465",
        ] {
            assert!(matches!(get(host), Err(Refusal::WrongHost(_))), "{host}");
        }
        assert!(matches!(
            access.check(&Method::GET, None, &HeaderMap::new()),
            Err(Refusal::WrongHost(_))
        ));
        // An absolute request target names the host too.
        assert!(matches!(
            access.check(
                &Method::GET,
                Some("evil.example:9465"),
                &headers(&[("host", "127.0.0.1:9465")])
            ),
            Err(Refusal::WrongHost(_))
        ));
        // The bound address itself, when it is another loopback address.
        let other = Access::for_address("127.0.0.2:80".parse().unwrap(), &[]).unwrap();
        for host in ["127.0.0.2:80", "127.0.0.2", "localhost"] {
            assert_eq!(
                other.check(&Method::GET, None, &headers(&[("host", host)])),
                Ok(()),
                "{host}"
            );
        }
    }

    #[test]
    fn a_post_from_another_origin_is_refused_in_every_mode() {
        let (auditor, _) = new_key();
        let open = Access::for_address("127.0.0.1:9465".parse().unwrap(), &[]).unwrap();
        let signed = Access::for_address(
            "0.0.0.0:9465".parse().unwrap(),
            &[tenant("auditors", &auditor, Role::Audit)],
        )
        .unwrap();
        for access in [&open, &signed] {
            let post = |extra: &[(&'static str, &str)]| {
                let mut headers = basic(&auditor);
                headers.insert(HOST, "127.0.0.1:9465".parse().unwrap());
                headers.extend(self::headers(extra));
                access.check(&Method::POST, None, &headers)
            };
            assert_eq!(post(&[]), Ok(()));
            assert_eq!(post(&[("origin", "http://127.0.0.1:9465")]), Ok(()));
            assert_eq!(post(&[("origin", "https://127.0.0.1:9465")]), Ok(()));
            assert_eq!(post(&[("sec-fetch-site", "same-origin")]), Ok(()));
            assert_eq!(
                post(&[("origin", "null"), ("sec-fetch-site", "same-origin")]),
                Ok(())
            );
            assert_eq!(
                post(&[("origin", "null"), ("sec-fetch-site", "same-site")]),
                Err(Refusal::CrossSite)
            );
            for bad in [
                ("origin", "http://evil.example"),
                ("origin", "http://127.0.0.1:8080"),
                ("origin", "null"),
                ("sec-fetch-site", "cross-site"),
            ] {
                assert_eq!(post(&[bad]), Err(Refusal::CrossSite), "{bad:?}");
            }
        }
        // A GET is a read; a cross-site page cannot read its answer without rebinding.
        let mut headers = headers(&[
            ("host", "127.0.0.1:9465"),
            ("origin", "http://evil.example"),
        ]);
        headers.extend(basic(&auditor));
        headers.insert(HOST, "127.0.0.1:9465".parse().unwrap());
        assert_eq!(open.check(&Method::GET, None, &headers), Ok(()));
    }
}
