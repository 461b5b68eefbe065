//! Code fingerprints: HMAC-SHA256 of an authorization code under a key only the daemon (and
//! the auditors it trusts) holds. An auditor holding a code can ask "was this redeemed, when,
//! for whom?" without the database or the logs ever holding the code.
//!
//! The key lives in a file (`audit.fingerprint_key_file`, by default beside the database),
//! created with mode 0600 on first start. It must never change: fingerprints computed under
//! another key match nothing.

use std::path::{Path, PathBuf};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::domain::secret::{ExposeSecret, SecretBox};

/// Key length in bytes.
const KEY_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum FingerprintKeyError {
    #[error("cannot read the fingerprint key {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create the fingerprint key {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the fingerprint key {path} is not {KEY_LEN} bytes of hex")]
    Malformed { path: PathBuf },
}

/// Computes code fingerprints.
#[derive(Debug, Clone)]
pub struct Fingerprinter {
    /// Shared by every clone; zeroized when the last one drops.
    key: std::sync::Arc<SecretBox<[u8; KEY_LEN]>>,
}

impl Fingerprinter {
    pub fn from_key(key: [u8; KEY_LEN]) -> Self {
        Self {
            key: std::sync::Arc::new(SecretBox::new(Box::new(key))),
        }
    }

    /// Reads the key file, or creates it (mode 0600) with a fresh random key when it does not
    /// exist. Returns whether it was created.
    pub fn load_or_create(path: &Path) -> Result<(Self, bool), FingerprintKeyError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ok((Self::parse(path, &text)?, false)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let key: [u8; KEY_LEN] = rand::random();
                crate::security::private_files::write_key_file(
                    path,
                    &format!("{}\n", hex::encode(key)),
                    crate::security::private_files::KeyFile::CreateNew,
                )
                .map_err(|source| FingerprintKeyError::Create {
                    path: path.to_path_buf(),
                    source,
                })?;
                Ok((Self::from_key(key), true))
            }
            Err(source) => Err(FingerprintKeyError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Reads an existing key file.
    pub fn load(path: &Path) -> Result<Self, FingerprintKeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| FingerprintKeyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    fn parse(path: &Path, text: &str) -> Result<Self, FingerprintKeyError> {
        let malformed = || FingerprintKeyError::Malformed {
            path: path.to_path_buf(),
        };
        let bytes = hex::decode(text.trim()).map_err(|_| malformed())?;
        let key: [u8; KEY_LEN] = bytes.try_into().map_err(|_| malformed())?;
        Ok(Self::from_key(key))
    }

    /// The fingerprint of `code`: hex HMAC-SHA256.
    pub fn fingerprint(&self, code: &str) -> String {
        self.mac(b"token-broker/code-fingerprint/v1\0", &[code])
    }

    /// The idempotency key of a submission that brought none: hex HMAC-SHA256 of the client id
    /// and the code, under this key (a different domain from fingerprints), so that a copy of
    /// the database confirms no guessed code without the key file.
    pub fn idempotency_key(&self, client_id: &str, code: &str) -> String {
        self.mac(b"token-broker/idempotency/v2\0", &[client_id, code])
    }

    /// Hex HMAC-SHA256 over `domain` and length-prefixed `fields`.
    fn mac(&self, domain: &[u8], fields: &[&str]) -> String {
        // HMAC takes a key of any length, so this cannot fail.
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(self.key.expose_secret())
            .expect("HMAC accepts any key length");
        mac.update(domain);
        if let [only] = fields {
            // Fingerprints predate the length prefix; they must not change.
            mac.update(only.as_bytes());
        } else {
            for field in fields {
                mac.update(&(field.len() as u64).to_be_bytes());
                mac.update(field.as_bytes());
            }
        }
        hex::encode(mac.finalize().into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_keyed_stable_and_never_the_code() {
        let a = Fingerprinter::from_key([1; KEY_LEN]);
        let b = Fingerprinter::from_key([2; KEY_LEN]);
        let fp = a.fingerprint("the-code");
        assert_eq!(fp.len(), 64);
        assert_eq!(fp, a.fingerprint("the-code"));
        assert_ne!(fp, a.fingerprint("another-code"));
        assert_ne!(fp, b.fingerprint("the-code"));
        assert!(!fp.contains("the-code"));
    }

    #[test]
    fn the_key_file_is_created_once_with_owner_only_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/audit.key");
        let (first, created) = Fingerprinter::load_or_create(&path).unwrap();
        assert!(created);
        let (second, created) = Fingerprinter::load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(first.fingerprint("c"), second.fingerprint("c"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(&path, "zz").unwrap();
        assert!(matches!(
            Fingerprinter::load(&path),
            Err(FingerprintKeyError::Malformed { .. })
        ));
    }
}
