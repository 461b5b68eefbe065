//! Secrets at rest: codes, verifiers and tokens are stored encrypted with AES-256-GCM.
//!
//! A ciphertext is stored as `v1:<key id>:<base64url(nonce ‖ ciphertext ‖ tag)>`, so keys can
//! be rotated: the key ring holds every key that may still be in use, encrypts with the newest,
//! and decrypts with whichever the ciphertext names. The associated data binds a ciphertext to
//! its job and column, so one cannot be moved to another row or field.
//!
//! The ring comes from `security.key_file` (one `id hexkey` per line, the last one current) or
//! `TOKEN_BROKER_ENCRYPTION_KEYS` (`id:hexkey,id:hexkey`, the last one current). Without
//! either, the first start creates the file beside the database, mode 0600.

use std::path::{Path, PathBuf};

use aes_gcm::{
    Aes256Gcm, KeyInit, Nonce,
    aead::{Aead, Payload},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};

use crate::{
    domain::secret::{ExposeSecret, SecretString},
    security::private_files::{KeyFile, write_key_file},
};

/// The environment variable that can hold the key ring instead of the key file.
pub const KEYS_ENV: &str = "TOKEN_BROKER_ENCRYPTION_KEYS";

const NONCE_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum KeyRingError {
    #[error("cannot read the encryption key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the encryption key file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the encryption keys ({origin}) are malformed: {detail}")]
    Malformed { origin: String, detail: String },
}

/// Why a stored secret could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecryptError {
    #[error("the stored secret is not in the expected format")]
    Format,
    #[error("the stored secret was encrypted with key {0:?}, which is not in the key ring")]
    UnknownKey(String),
    #[error(
        "the stored secret does not decrypt with key {0:?} (wrong key, or the data was altered)"
    )]
    Failed(String),
}

/// The encryption keys.
#[derive(Clone)]
pub struct KeyRing {
    /// Oldest first; the last one encrypts.
    keys: Vec<(String, Aes256Gcm)>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing")
            .field("key_ids", &self.key_ids())
            .finish()
    }
}

fn parse_entries(
    origin: &str,
    entries: impl Iterator<Item = (String, String)>,
) -> Result<KeyRing, KeyRingError> {
    let malformed = |detail: String| KeyRingError::Malformed {
        origin: origin.to_string(),
        detail,
    };
    let mut keys = Vec::new();
    for (id, hex_key) in entries {
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(malformed(format!(
                "key id {id:?} must be letters, digits or '-'"
            )));
        }
        let bytes = zeroize::Zeroizing::new(
            hex::decode(hex_key.trim()).map_err(|_| malformed(format!("key {id:?} is not hex")))?,
        );
        if bytes.len() != 32 {
            return Err(malformed(format!("key {id:?} is not 32 bytes")));
        }
        let cipher = Aes256Gcm::new_from_slice(&bytes)
            .map_err(|_| malformed(format!("key {id:?} is not a valid AES-256 key")))?;
        keys.push((id, cipher));
    }
    if keys.is_empty() {
        return Err(malformed("no keys".to_string()));
    }
    Ok(KeyRing { keys })
}

fn new_key_hex() -> SecretString {
    SecretString::from(hex::encode(rand::random::<[u8; 32]>()))
}

impl KeyRing {
    /// The ring from the environment, else from `path`, creating the file with a fresh key when
    /// neither exists. Returns whether a file was created.
    pub fn load_or_create(path: &Path) -> Result<(KeyRing, bool), KeyRingError> {
        if let Ok(value) = std::env::var(KEYS_ENV) {
            let entries = value
                .split(',')
                .filter(|e| !e.trim().is_empty())
                .map(|entry| {
                    let (id, key) = entry.trim().split_once(':').unwrap_or(("", entry));
                    (id.to_string(), key.to_string())
                });
            return Ok((parse_entries(KEYS_ENV, entries)?, false));
        }
        match std::fs::read_to_string(path) {
            Ok(text) => Ok((Self::parse_file(path, &text)?, false)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let key = new_key_hex();
                let contents = format!("k1 {}\n", key.expose_secret());
                write_key_file(path, &contents, KeyFile::CreateNew).map_err(|source| {
                    KeyRingError::Write {
                        path: path.to_path_buf(),
                        source,
                    }
                })?;
                Ok((Self::parse_file(path, &contents)?, true))
            }
            Err(source) => Err(KeyRingError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    fn parse_file(path: &Path, text: &str) -> Result<KeyRing, KeyRingError> {
        let entries = text
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .map(|line| {
                let (id, key) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
                (id.to_string(), key.to_string())
            });
        parse_entries(&path.display().to_string(), entries)
    }

    /// Appends a fresh key to the key file; it becomes the current key. Returns its id.
    pub fn add_key_to_file(path: &Path) -> Result<String, KeyRingError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyRingError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let ring = Self::parse_file(path, &text)?;
        let mut n = ring.keys.len() + 1;
        while ring.keys.iter().any(|(id, _)| *id == format!("k{n}")) {
            n += 1;
        }
        let id = format!("k{n}");
        let mut contents = text;
        if !contents.ends_with('\n') {
            contents.push('\n');
        }
        contents.push_str(&format!("{id} {}\n", new_key_hex().expose_secret()));
        write_key_file(path, &contents, KeyFile::Replace).map_err(|source| {
            KeyRingError::Write {
                path: path.to_path_buf(),
                source,
            }
        })?;
        Ok(id)
    }

    pub fn key_ids(&self) -> Vec<&str> {
        self.keys.iter().map(|(id, _)| id.as_str()).collect()
    }

    /// Encrypts `plaintext` for the given job and column with the current key.
    pub fn seal(&self, plaintext: &str, job_id: &str, column: &str) -> String {
        let (id, cipher) = self.keys.last().expect("a ring has keys");
        let nonce_bytes: [u8; NONCE_LEN] = rand::random();
        let nonce = Nonce::from(nonce_bytes);
        let aad = format!("token-broker/v1/{job_id}/{column}");
        let sealed = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext.as_bytes(),
                    aad: aad.as_bytes(),
                },
            )
            .expect("AES-GCM encryption of a short message cannot fail");
        let mut blob = Vec::with_capacity(NONCE_LEN + sealed.len());
        blob.extend_from_slice(&nonce_bytes);
        blob.extend_from_slice(&sealed);
        format!("v1:{id}:{}", URL_SAFE_NO_PAD.encode(blob))
    }

    /// Decrypts a stored value sealed for the given job and column.
    pub fn open(
        &self,
        stored: &str,
        job_id: &str,
        column: &str,
    ) -> Result<SecretString, DecryptError> {
        let mut parts = stored.splitn(3, ':');
        let (Some("v1"), Some(id), Some(data)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(DecryptError::Format);
        };
        let (_, cipher) = self
            .keys
            .iter()
            .find(|(key_id, _)| key_id == id)
            .ok_or_else(|| DecryptError::UnknownKey(id.to_string()))?;
        let blob = URL_SAFE_NO_PAD
            .decode(data)
            .map_err(|_| DecryptError::Format)?;
        if blob.len() < NONCE_LEN {
            return Err(DecryptError::Format);
        }
        let (nonce_bytes, sealed) = blob.split_at(NONCE_LEN);
        let nonce_bytes: [u8; NONCE_LEN] = nonce_bytes.try_into().expect("split at NONCE_LEN");
        let aad = format!("token-broker/v1/{job_id}/{column}");
        let plain = cipher
            .decrypt(
                &Nonce::from(nonce_bytes),
                Payload {
                    msg: sealed,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| DecryptError::Failed(id.to_string()))?;
        String::from_utf8(plain)
            .map(SecretString::from)
            .map_err(|_| DecryptError::Format)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(entries: &[(&str, &str)]) -> KeyRing {
        parse_entries(
            "test",
            entries
                .iter()
                .map(|(id, key)| (id.to_string(), key.to_string())),
        )
        .unwrap()
    }

    #[test]
    fn sealed_values_open_only_for_their_job_and_column() {
        let ring = ring(&[("k1", &"ab".repeat(32))]);
        let sealed = ring.seal("the-code", "job-1", "code");
        assert!(sealed.starts_with("v1:k1:"));
        assert!(!sealed.contains("the-code"));
        assert_ne!(
            sealed,
            ring.seal("the-code", "job-1", "code"),
            "fresh nonce each time"
        );
        assert_eq!(
            ring.open(&sealed, "job-1", "code").unwrap().expose_secret(),
            "the-code"
        );
        assert!(matches!(
            ring.open(&sealed, "job-2", "code"),
            Err(DecryptError::Failed(_))
        ));
        assert!(matches!(
            ring.open(&sealed, "job-1", "code_verifier"),
            Err(DecryptError::Failed(_))
        ));
        assert_eq!(
            ring.open("plain", "job-1", "code").err(),
            Some(DecryptError::Format)
        );
    }

    #[test]
    fn rotation_keeps_old_values_readable_and_seals_with_the_newest() {
        let old = ring(&[("k1", &"01".repeat(32))]);
        let sealed = old.seal("token", "j", "access_token");
        let rotated = ring(&[("k1", &"01".repeat(32)), ("k2", &"02".repeat(32))]);
        assert_eq!(
            rotated
                .open(&sealed, "j", "access_token")
                .unwrap()
                .expose_secret(),
            "token"
        );
        assert!(rotated.seal("x", "j", "code").starts_with("v1:k2:"));
        let other = ring(&[("k2", &"02".repeat(32))]);
        assert_eq!(
            other.open(&sealed, "j", "access_token").err(),
            Some(DecryptError::UnknownKey("k1".into()))
        );
        let wrong = ring(&[("k1", &"03".repeat(32))]);
        assert_eq!(
            wrong.open(&sealed, "j", "access_token").err(),
            Some(DecryptError::Failed("k1".into()))
        );
    }

    #[test]
    fn the_key_file_is_created_private_and_grows_on_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.db.key");
        let (ring, created) = KeyRing::load_or_create(&path).unwrap();
        assert!(created);
        assert_eq!(ring.key_ids(), ["k1"]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(KeyRing::add_key_to_file(&path).unwrap(), "k2");
        let (ring, created) = KeyRing::load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(ring.key_ids(), ["k1", "k2"]);
        assert!(format!("{ring:?}").contains("k2"));
        assert!(!format!("{ring:?}").contains(&std::fs::read_to_string(&path).unwrap()[3..20]));
    }
}
