//! Parsing at the edge: a submitted exchange becomes an [`ExchangeRequest`] once, here, and
//! nothing downstream validates again.

use std::fmt;

use sha2::{Digest, Sha256};

use crate::{domain::job::JobId, domain::secret::SecretString};

/// Field limits. They bound what a caller can make the daemon store.
pub const MAX_CLIENT_ID_LEN: usize = 256;
pub const MAX_CODE_LEN: usize = 2048;
pub const MIN_VERIFIER_LEN: usize = 43;
pub const MAX_VERIFIER_LEN: usize = 128;
pub const MAX_STATE_LEN: usize = 1024;
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 128;

/// A checked exchange request.
#[derive(Debug, Clone)]
pub struct ExchangeRequest {
    pub client_id: String,
    pub code: SecretString,
    pub code_verifier: SecretString,
    /// The app's OAuth `state`; not secret, not sent upstream.
    pub state: String,
    /// Given by the caller, or the default digest of client id and code.
    pub idempotency_key: String,
    /// SHA-256 over every field, so a resubmission with the same key can be told apart from a
    /// different request that reuses the key.
    pub request_digest: String,
}

/// One reason a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: &'static str,
    pub description: String,
}

/// Every reason a request was refused, reported together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidRequest(pub Vec<FieldViolation>);

impl fmt::Display for InvalidRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, violation) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {}", violation.field, violation.description)?;
        }
        Ok(())
    }
}

impl std::error::Error for InvalidRequest {}

/// The raw fields of a submission, as the API received them.
#[derive(Debug, Clone, Copy)]
pub struct RawExchange<'a> {
    pub client_id: &'a str,
    pub code: &'a str,
    pub code_verifier: &'a str,
    pub state: &'a str,
    pub idempotency_key: &'a str,
}

impl ExchangeRequest {
    /// Checks `raw`. When it carries no idempotency key, `default_key(client_id, code)` makes
    /// one: a keyed digest ([`crate::audit::fingerprint::Fingerprinter::idempotency_key`]), so that
    /// resubmitting the same code for the same client is recognised and the code is never
    /// presented upstream twice by accident, while a copy of the database confirms no guessed
    /// code without the key.
    pub fn parse(
        raw: RawExchange<'_>,
        default_key: impl FnOnce(&str, &str) -> String,
    ) -> Result<Self, InvalidRequest> {
        let mut violations = Vec::new();
        let mut check = |field, result: Result<(), String>| {
            if let Err(description) = result {
                violations.push(FieldViolation { field, description });
            }
        };
        check(
            "client_id",
            visible_ascii(raw.client_id, 1, MAX_CLIENT_ID_LEN),
        );
        check("code", visible_ascii(raw.code, 1, MAX_CODE_LEN));
        check("code_verifier", pkce_verifier(raw.code_verifier));
        check("state", visible_ascii(raw.state, 0, MAX_STATE_LEN));
        check(
            "idempotency_key",
            visible_ascii(raw.idempotency_key, 0, MAX_IDEMPOTENCY_KEY_LEN),
        );
        if !violations.is_empty() {
            return Err(InvalidRequest(violations));
        }

        let idempotency_key = if raw.idempotency_key.is_empty() {
            default_key(raw.client_id, raw.code)
        } else {
            raw.idempotency_key.to_string()
        };
        let request_digest = digest_fields(
            b"token-broker/request/v1",
            &[raw.client_id, raw.code, raw.code_verifier, raw.state],
        );
        Ok(Self {
            client_id: raw.client_id.to_string(),
            code: SecretString::from(raw.code.to_string()),
            code_verifier: SecretString::from(raw.code_verifier.to_string()),
            state: raw.state.to_string(),
            idempotency_key,
            request_digest,
        })
    }
}

/// Parses a job id given by a caller.
pub fn parse_job_id(raw: &str) -> Result<JobId, InvalidRequest> {
    raw.parse().map_err(|_| {
        InvalidRequest(vec![FieldViolation {
            field: "job_id",
            description: "must be a job id as returned by SubmitExchange (a UUID)".to_string(),
        }])
    })
}

/// Hex SHA-256 over length-prefixed fields, so that no two field lists share an encoding.
fn digest_fields(domain: &[u8], fields: &[&str]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(domain);
    for field in fields {
        hasher.update((field.len() as u64).to_be_bytes());
        hasher.update(field.as_bytes());
    }
    hex::encode(hasher.finalize())
}

fn visible_ascii(value: &str, min: usize, max: usize) -> Result<(), String> {
    if value.len() < min {
        return Err("is required".to_string());
    }
    if value.len() > max {
        return Err(format!("must be at most {max} characters"));
    }
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("must contain only visible ASCII characters".to_string());
    }
    Ok(())
}

/// RFC 7636 section 4.1: 43 to 128 characters of `[A-Za-z0-9._~-]`.
fn pkce_verifier(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("is required".to_string());
    }
    let unreserved = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~');
    if !(MIN_VERIFIER_LEN..=MAX_VERIFIER_LEN).contains(&value.len())
        || !value.bytes().all(unreserved)
    {
        return Err(format!(
            "must be {MIN_VERIFIER_LEN} to {MAX_VERIFIER_LEN} characters of [A-Za-z0-9._~-] (RFC 7636)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::secret::ExposeSecret;

    const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk0123456789abcdefghijkl";

    /// Stands in for the fingerprinter's keyed digest.
    fn test_key(client_id: &str, code: &str) -> String {
        digest_fields(b"test", &[client_id, code])
    }

    fn raw<'a>() -> RawExchange<'a> {
        RawExchange {
            client_id: "client-a",
            code: "code-1",
            code_verifier: VERIFIER,
            state: "xyz",
            idempotency_key: "",
        }
    }

    #[test]
    fn a_valid_request_parses_with_a_default_key() {
        let request = ExchangeRequest::parse(raw(), test_key).unwrap();
        assert_eq!(request.client_id, "client-a");
        assert_eq!(request.code.expose_secret(), "code-1");
        assert_eq!(request.idempotency_key.len(), 64);
        assert_eq!(request.idempotency_key, test_key("client-a", "code-1"));
        assert_ne!(request.idempotency_key, test_key("client-b", "code-1"));
    }

    #[test]
    fn every_violation_is_reported_together() {
        let error = ExchangeRequest::parse(
            RawExchange {
                client_id: "",
                code: "has space",
                code_verifier: "short",
                state: "ok",
                idempotency_key: &"k".repeat(MAX_IDEMPOTENCY_KEY_LEN + 1),
            },
            test_key,
        )
        .unwrap_err();
        let fields: Vec<_> = error.0.iter().map(|v| v.field).collect();
        assert_eq!(
            fields,
            ["client_id", "code", "code_verifier", "idempotency_key"]
        );
    }

    #[test]
    fn verifier_bounds_follow_rfc_7636() {
        let at = |len: usize| {
            ExchangeRequest::parse(
                RawExchange {
                    code_verifier: &"a".repeat(len),
                    ..raw()
                },
                test_key,
            )
        };
        assert!(at(42).is_err());
        assert!(at(43).is_ok());
        assert!(at(128).is_ok());
        assert!(at(129).is_err());
        let with_plus = format!("{}+", &VERIFIER[..50]);
        assert!(
            ExchangeRequest::parse(
                RawExchange {
                    code_verifier: &with_plus,
                    ..raw()
                },
                test_key
            )
            .is_err()
        );
    }

    #[test]
    fn the_digest_tells_different_requests_apart() {
        let a = ExchangeRequest::parse(raw(), test_key).unwrap();
        let b = ExchangeRequest::parse(
            RawExchange {
                state: "other",
                ..raw()
            },
            test_key,
        )
        .unwrap();
        assert_eq!(a.idempotency_key, b.idempotency_key);
        assert_ne!(a.request_digest, b.request_digest);
    }

    #[test]
    fn job_ids_must_be_uuids() {
        assert!(parse_job_id("not-a-uuid").is_err());
        let id = JobId::new();
        assert_eq!(parse_job_id(&id.to_string()).unwrap(), id);
    }

    proptest::proptest! {
        /// The parser is total: any input (any Unicode, any length) yields a checked request
        /// or field violations, never a panic; and what it accepts satisfies the limits.
        #[test]
        fn parsing_never_panics_and_accepts_only_valid_requests(
            client_id in ".{0,300}",
            code in "(.|[A-Za-z0-9]){0,2100}",
            code_verifier in "[A-Za-z0-9._~+/-]{0,140}|.{0,140}",
            state in ".{0,1100}",
            idempotency_key in ".{0,140}",
        ) {
            let raw = RawExchange {
                client_id: &client_id,
                code: &code,
                code_verifier: &code_verifier,
                state: &state,
                idempotency_key: &idempotency_key,
            };
            match ExchangeRequest::parse(raw, test_key) {
                Ok(request) => {
                    proptest::prop_assert!((1..=MAX_CLIENT_ID_LEN).contains(&request.client_id.len()));
                    proptest::prop_assert!((1..=MAX_CODE_LEN).contains(&request.code.expose_secret().len()));
                    proptest::prop_assert!(
                        (MIN_VERIFIER_LEN..=MAX_VERIFIER_LEN).contains(&request.code_verifier.expose_secret().len())
                    );
                    proptest::prop_assert!(request.code_verifier.expose_secret().bytes().all(
                        |b| b.is_ascii_alphanumeric() || b"-._~".contains(&b)
                    ));
                    proptest::prop_assert!(request.idempotency_key.len() <= MAX_IDEMPOTENCY_KEY_LEN.max(64));
                }
                Err(InvalidRequest(violations)) => proptest::prop_assert!(!violations.is_empty()),
            }
        }

        /// Any string as a job id: a job id that prints back as given (in lowercase hyphenated
        /// form) or a field violation, never a panic.
        #[test]
        fn job_ids_parse_or_are_refused(raw in ".{0,60}|[0-9a-fA-F-]{32,40}") {
            match parse_job_id(&raw) {
                Ok(id) => proptest::prop_assert_eq!(parse_job_id(&id.to_string()).unwrap(), id),
                Err(InvalidRequest(violations)) => {
                    proptest::prop_assert_eq!(violations.len(), 1);
                    proptest::prop_assert_eq!(violations[0].field, "job_id");
                }
            }
        }
    }
}
