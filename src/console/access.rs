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

use std::{net::IpAddr, sync::Arc};

use base64::{Engine, engine::general_purpose::STANDARD};
use hyper::{HeaderMap, header::AUTHORIZATION};
use zeroize::Zeroizing;

use crate::{
    config::{Role, TenantConfig},
    security::tenants::TenantRegistry,
};

/// How requests are admitted.
#[derive(Debug, Clone)]
pub enum Access {
    /// Anyone who reaches the (loopback) listener.
    Open,
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
    /// The access rule for a console listening on `ip` with `tenants` configured.
    pub fn for_address(ip: IpAddr, tenants: &[TenantConfig]) -> Result<Access, OpenOffLoopback> {
        if tenants
            .iter()
            .any(|tenant| tenant.roles.contains(&Role::Audit))
        {
            Ok(Access::AuditKey(TenantRegistry::new(tenants)))
        } else if ip.is_loopback() {
            Ok(Access::Open)
        } else {
            Err(OpenOffLoopback(ip))
        }
    }

    /// Admits or refuses a request by its headers.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), Refusal> {
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
        let value = format!("Basic {}", STANDARD.encode(format!("auditor:{password}")));
        headers.insert(AUTHORIZATION, value.parse().unwrap());
        headers
    }

    #[test]
    fn off_loopback_an_audit_tenant_is_required() {
        let anywhere: IpAddr = "0.0.0.0".parse().unwrap();
        let loopback: IpAddr = "127.0.0.1".parse().unwrap();
        let (key, _) = new_key();
        assert!(Access::for_address(anywhere, &[]).is_err());
        assert!(Access::for_address(anywhere, &[tenant("shop", &key, Role::Submit)]).is_err());
        assert!(matches!(
            Access::for_address(loopback, &[]),
            Ok(Access::Open)
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
            "127.0.0.1".parse().unwrap(),
            &[
                tenant("auditors", &auditor, Role::Audit),
                tenant("shop", &shop, Role::Submit),
            ],
        )
        .unwrap();
        assert_eq!(access.check(&basic(&auditor)), Ok(()));
        assert!(matches!(
            access.check(&basic(&shop)),
            Err(Refusal::NotAnAuditor(_))
        ));
        assert_eq!(access.check(&basic("wrong")), Err(Refusal::Unauthenticated));
        assert_eq!(
            access.check(&HeaderMap::new()),
            Err(Refusal::Unauthenticated)
        );
        let mut bearer = HeaderMap::new();
        bearer.insert(AUTHORIZATION, format!("Bearer {auditor}").parse().unwrap());
        assert_eq!(access.check(&bearer), Err(Refusal::Unauthenticated));
    }
}
