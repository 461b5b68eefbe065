//! Tenants: who is calling, and what they may do.
//!
//! Callers send `authorization: Bearer <key>`. The key is hashed (SHA-256) and compared, in
//! constant time, with every configured tenant's `api_key_sha256`; the key itself never sits in
//! the configuration. With no tenants configured, authentication is off and every caller acts
//! as the `default` tenant with every role (the configuration then only allows loopback).
//!
//! The registry is replaced whole on SIGHUP.

use std::{collections::HashSet, sync::Arc};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use parking_lot::RwLock;

use crate::config::{Role, TenantConfig};

/// The tenant of every job while tenants are not configured.
pub const DEFAULT_TENANT: &str = "default";

/// A configured tenant.
#[derive(Debug)]
pub struct Tenant {
    pub name: String,
    key_digest: [u8; 32],
    client_ids: HashSet<String>,
    roles: HashSet<Role>,
    /// The tenant's own queue bound.
    max_pending: Option<u64>,
}

/// The authenticated caller of one RPC.
#[derive(Debug, Clone)]
pub enum Caller {
    /// Authentication is off: the `default` tenant, every role, every client id.
    Anonymous,
    Tenant(Arc<Tenant>),
}

/// Why a call is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    #[error("missing or unknown API key (send `authorization: Bearer <key>`)")]
    Unauthenticated,
    #[error("{0}")]
    Denied(String),
}

impl Caller {
    /// The tenant name jobs are stored and looked up under.
    pub fn tenant(&self) -> &str {
        match self {
            Caller::Anonymous => DEFAULT_TENANT,
            Caller::Tenant(tenant) => &tenant.name,
        }
    }

    /// Refuses a caller without `role`.
    pub fn require(&self, role: Role) -> Result<(), AccessError> {
        match self {
            Caller::Anonymous => Ok(()),
            Caller::Tenant(tenant) if tenant.roles.contains(&role) => Ok(()),
            Caller::Tenant(tenant) => Err(AccessError::Denied(format!(
                "tenant {:?} does not have the {} role",
                tenant.name,
                match role {
                    Role::Submit => "submit",
                    Role::Audit => "audit",
                }
            ))),
        }
    }

    /// Refuses a submission for a client id the tenant may not exchange for.
    pub fn may_exchange_for(&self, client_id: &str) -> Result<(), AccessError> {
        match self {
            Caller::Anonymous => Ok(()),
            Caller::Tenant(tenant) if tenant.client_ids.contains(client_id) => Ok(()),
            Caller::Tenant(tenant) => Err(AccessError::Denied(format!(
                "tenant {:?} may not exchange codes for this client id",
                tenant.name
            ))),
        }
    }

    /// The caller's own queue bound, if any.
    pub fn max_pending(&self) -> Option<u64> {
        match self {
            Caller::Anonymous => None,
            Caller::Tenant(tenant) => tenant.max_pending,
        }
    }
}

/// The configured tenants.
#[derive(Debug, Default)]
pub struct TenantRegistry {
    tenants: RwLock<Arc<Vec<Arc<Tenant>>>>,
}

/// SHA-256 of an API key.
pub fn key_digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// A fresh random API key and the hex SHA-256 to put in the configuration.
pub fn new_key() -> (String, String) {
    let key = format!("tbk_{}", URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>()));
    let digest = hex::encode(key_digest(&key));
    (key, digest)
}

fn build(configs: &[TenantConfig]) -> Vec<Arc<Tenant>> {
    configs
        .iter()
        .map(|config| {
            let mut key_digest = [0u8; 32];
            // Validated as 64 hex digits by Config::validate.
            hex::decode_to_slice(config.api_key_sha256.to_ascii_lowercase(), &mut key_digest)
                .expect("validated api_key_sha256");
            Arc::new(Tenant {
                name: config.name.clone(),
                key_digest,
                client_ids: config.client_ids.iter().cloned().collect(),
                roles: config.roles.iter().copied().collect(),
                max_pending: config.max_pending,
            })
        })
        .collect()
}

impl TenantRegistry {
    pub fn new(configs: &[TenantConfig]) -> Arc<Self> {
        Arc::new(Self {
            tenants: RwLock::new(Arc::new(build(configs))),
        })
    }

    /// Replaces the tenants (SIGHUP).
    pub fn replace(&self, configs: &[TenantConfig]) {
        *self.tenants.write() = Arc::new(build(configs));
        tracing::info!(tenants = configs.len(), "tenants reloaded");
    }

    /// Who is calling, from the value of the `authorization` header (`Bearer <key>`; the
    /// scheme in any case, as RFC 7235 says), if the caller sent one.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Caller, AccessError> {
        let tenants = Arc::clone(&self.tenants.read());
        if tenants.is_empty() {
            return Ok(Caller::Anonymous);
        }
        let key = authorization
            .and_then(bearer_token)
            .ok_or(AccessError::Unauthenticated)?;
        self.authenticate_key(key)
    }

    /// Who holds `key` (an API key however it arrived: the console reads it from HTTP Basic
    /// credentials). With no tenants configured, everyone is the anonymous caller.
    pub fn authenticate_key(&self, key: &str) -> Result<Caller, AccessError> {
        let tenants = Arc::clone(&self.tenants.read());
        if tenants.is_empty() {
            return Ok(Caller::Anonymous);
        }
        let digest = key_digest(key);
        // Every tenant is compared, each in constant time, so timing says nothing about which
        // digest came close.
        let mut found = None;
        for tenant in tenants.iter() {
            if bool::from(tenant.key_digest.ct_eq(&digest)) {
                found = Some(Arc::clone(tenant));
            }
        }
        found
            .map(Caller::Tenant)
            .ok_or(AccessError::Unauthenticated)
    }
}

/// The token of a `Bearer` credential: the scheme matched without regard to case, then at
/// least one space; `None` for another scheme or an empty token.
fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.trim_start().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(key: &str) -> Arc<TenantRegistry> {
        TenantRegistry::new(&[TenantConfig {
            name: "shop".into(),
            api_key_sha256: hex::encode(key_digest(key)),
            client_ids: vec!["app".into()],
            roles: vec![Role::Submit],
            max_pending: None,
        }])
    }

    fn bearer(key: &str) -> Option<String> {
        Some(format!("Bearer {key}"))
    }

    #[test]
    fn the_bearer_scheme_is_matched_in_any_case() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer abc"), Some("abc"));
        assert_eq!(bearer_token("BEARER   abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Bearerabc"), None);
    }

    #[test]
    fn a_known_key_identifies_its_tenant_and_others_are_refused() {
        let (key, _) = new_key();
        let registry = registry(&key);
        let caller = registry.authenticate(bearer(&key).as_deref()).unwrap();
        assert_eq!(caller.tenant(), "shop");
        assert!(caller.require(Role::Submit).is_ok());
        assert!(caller.require(Role::Audit).is_err());
        assert!(caller.may_exchange_for("app").is_ok());
        assert!(caller.may_exchange_for("other").is_err());
        assert_eq!(
            registry
                .authenticate(bearer("wrong").as_deref())
                .unwrap_err(),
            AccessError::Unauthenticated
        );
        assert_eq!(
            registry.authenticate(None).unwrap_err(),
            AccessError::Unauthenticated
        );
    }

    #[test]
    fn without_tenants_everyone_is_the_default_tenant() {
        let registry = TenantRegistry::new(&[]);
        let caller = registry.authenticate(None).unwrap();
        assert_eq!(caller.tenant(), DEFAULT_TENANT);
        assert!(caller.require(Role::Audit).is_ok());
    }

    #[test]
    fn new_keys_are_random_and_their_digest_matches() {
        let (a, digest) = new_key();
        let (b, _) = new_key();
        assert_ne!(a, b);
        assert_eq!(digest, hex::encode(key_digest(&a)));
        assert!(a.len() > 40);
    }
}
