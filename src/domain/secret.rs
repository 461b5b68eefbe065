//! Values that must never reach a log line, an error message or an audit record, and must not
//! linger in memory: authorization codes, PKCE verifiers, access tokens and keys.
//!
//! They are held in `secrecy`'s types: [`SecretString`] and [`SecretBox`] print a placeholder
//! for `Debug`, have no `Display`, zeroize their memory on drop, and give the value only through
//! [`ExposeSecret::expose_secret`], which makes every use visible in review. Secrets are never
//! compared with `==` on their bytes: [`constant_time_eq`] takes the same time wherever two
//! values first differ.

pub use secrecy::{ExposeSecret, SecretBox, SecretString};
use subtle::ConstantTimeEq;

/// Whether two secrets are equal, in time that depends only on their lengths.
pub fn constant_time_eq(a: &SecretString, b: &SecretString) -> bool {
    a.expose_secret()
        .as_bytes()
        .ct_eq(b.expose_secret().as_bytes())
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let secret = SecretString::from("hunter2");
        assert!(!format!("{secret:?}").contains("hunter2"));
        assert_eq!(secret.expose_secret(), "hunter2");
    }

    #[test]
    fn equality_is_by_value() {
        let a = SecretString::from("code-1");
        assert!(constant_time_eq(&a, &SecretString::from("code-1")));
        assert!(!constant_time_eq(&a, &SecretString::from("code-2")));
        assert!(!constant_time_eq(&a, &SecretString::from("code-10")));
    }
}
