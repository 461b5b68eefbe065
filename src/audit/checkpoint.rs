//! Signed checkpoints: the chain head (seq and hash), signed with an Ed25519 key the database
//! never holds, each checkpoint chained to the one before by its signature.
//!
//! The hash chain alone proves nothing to someone who does not trust the database: whoever can
//! write it can edit an event and recompute every later hash, or cut the tail. A checkpoint
//! signed earlier, and kept elsewhere (the log pipeline, an external witness), pins the chain as
//! it stood: a rewritten chain no longer has that hash at that seq, a cut chain no longer
//! reaches that seq, and nobody without the signing key can make a new checkpoint to match.
//!
//! Keys: the signing key file holds the 32-byte Ed25519 seed in hex (mode 0600, like the other
//! key files); the public key is `ed25519:<hex>`; a key's id is the first 16 hex digits of the
//! SHA-256 of the public key, carried by each checkpoint so a verifier knows which key to use.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
};

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::{
    audit::{AuditRecord, VerifyReport},
    security::private_files::{KeyFile, write_key_file},
};

/// The domain tag every signed message starts with.
const SIGNED_TAG: &[u8] = b"token-broker/audit-checkpoint/v1\0";
/// How a public key is written.
const PUBLIC_PREFIX: &str = "ed25519:";
/// Bytes of an Ed25519 seed and of a public key.
const KEY_LEN: usize = 32;

/// One signed head of the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The seq of the last event the checkpoint covers.
    pub seq: i64,
    /// That event's hash.
    pub hash: String,
    /// When it was signed, in milliseconds since the Unix epoch.
    pub at: i64,
    /// The previous checkpoint's signature; `None` for the first one.
    pub prev_signature: Option<String>,
    /// Which key signed it (see [`PublicKey::id`]).
    pub key_id: String,
    /// Ed25519 over [`Checkpoint::signed_bytes`], hex.
    pub signature: String,
}

impl Checkpoint {
    /// What the signature covers: every field but the signature, length-prefixed in a fixed
    /// order behind a domain tag.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(SIGNED_TAG);
        let mut field = |value: Option<&[u8]>| super::push_field(&mut out, value);
        field(Some(&self.seq.to_be_bytes()));
        field(Some(self.hash.as_bytes()));
        field(Some(&self.at.to_be_bytes()));
        field(self.prev_signature.as_deref().map(str::as_bytes));
        field(Some(self.key_id.as_bytes()));
        out
    }

    /// Whether `key` signed exactly this checkpoint.
    pub fn verify(&self, key: &PublicKey) -> Result<(), CheckpointError> {
        if self.key_id != key.id() {
            return Err(CheckpointError::OtherKey {
                seq: self.seq,
                key_id: self.key_id.clone(),
            });
        }
        let signature = hex::decode(&self.signature)
            .map_err(|_| CheckpointError::BadSignature { seq: self.seq })?;
        UnparsedPublicKey::new(&ED25519, &key.bytes)
            .verify(&self.signed_bytes(), &signature)
            .map_err(|_| CheckpointError::BadSignature { seq: self.seq })
    }

    /// Reads a checkpoint from one line: the JSON this module writes (as `audit checkpoints
    /// --format jsonl` prints it), or one of the daemon's JSON log lines carrying one (`"event":
    /// "audit.checkpoint"`, the fields at the top level or under `fields`). `Ok(None)` for any
    /// other line, so a whole log file can be given.
    pub fn from_line(line: &str) -> Result<Option<Checkpoint>, serde_json::Error> {
        let line = line.trim();
        if !line.starts_with('{') {
            return Ok(None);
        }
        let value: serde_json::Value = serde_json::from_str(line)?;
        let object = value.get("fields").unwrap_or(&value);
        let is_checkpoint = match object.get("event") {
            Some(event) => event.as_str() == Some(LOG_EVENT),
            None => object.get("signature").is_some(),
        };
        if !is_checkpoint {
            return Ok(None);
        }
        serde_json::from_value(object.clone()).map(Some)
    }

    /// Writes the checkpoint to the log pipeline: target `audit`, `event = "audit.checkpoint"`,
    /// every signed field, so `audit verify --checkpoints` can read the JSON log lines back.
    pub fn emit(&self) {
        tracing::info!(
            target: "audit",
            event = LOG_EVENT,
            seq = self.seq,
            hash = %self.hash,
            at = self.at,
            prev_signature = self.prev_signature.as_deref(),
            key_id = %self.key_id,
            signature = %self.signature,
            "audit checkpoint signed"
        );
    }
}

/// The `event` field of a checkpoint's log line.
pub const LOG_EVENT: &str = "audit.checkpoint";

/// Why a checkpoint does not verify, or a key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("the checkpoint at seq {seq} was signed by key {key_id}, not by any public key given")]
    OtherKey { seq: i64, key_id: String },
    #[error("the checkpoint at seq {seq} has no valid signature: it was forged or altered")]
    BadSignature { seq: i64 },
    #[error("cannot read the key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the key file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not an Ed25519 {what} (expected {expected})")]
    Malformed {
        path: PathBuf,
        what: &'static str,
        expected: &'static str,
    },
}

/// The public half: verifies checkpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    bytes: [u8; KEY_LEN],
}

impl PublicKey {
    /// Parses `ed25519:<64 hex digits>` (the prefix may be left out).
    pub fn parse(text: &str) -> Option<PublicKey> {
        let text = text.trim();
        let hex_part = text.strip_prefix(PUBLIC_PREFIX).unwrap_or(text);
        let bytes = hex::decode(hex_part).ok()?;
        Some(PublicKey {
            bytes: bytes.try_into().ok()?,
        })
    }

    /// Reads a public key file (as `audit keygen` writes it: FILE.pub).
    pub fn load(path: &Path) -> Result<PublicKey, CheckpointError> {
        let text = std::fs::read_to_string(path).map_err(|source| CheckpointError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        PublicKey::parse(&text).ok_or_else(|| CheckpointError::Malformed {
            path: path.to_path_buf(),
            what: "public key",
            expected: "ed25519:<64 hex digits>",
        })
    }

    /// The first 16 hex digits of the SHA-256 of the key.
    pub fn id(&self) -> String {
        hex::encode(&Sha256::digest(self.bytes)[..8])
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{PUBLIC_PREFIX}{}", hex::encode(self.bytes))
    }
}

/// The private half: signs checkpoints. Lives in the daemon's memory and its key file only.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    public: PublicKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("public", &self.public.to_string())
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    fn from_seed(seed: &[u8; KEY_LEN]) -> SigningKey {
        // ring accepts any 32 bytes as a seed; the public key is derived from it.
        let pair = Ed25519KeyPair::from_seed_unchecked(seed)
            .expect("an Ed25519 seed of 32 bytes is always accepted");
        let bytes: [u8; KEY_LEN] = pair
            .public_key()
            .as_ref()
            .try_into()
            .expect("an Ed25519 public key is 32 bytes");
        SigningKey {
            pair,
            public: PublicKey { bytes },
        }
    }

    /// Writes a new key to `path` (never over an existing file) and its public key to
    /// `path.pub`; returns the key.
    pub fn generate(path: &Path) -> Result<SigningKey, CheckpointError> {
        let seed = Zeroizing::new(rand::random::<[u8; KEY_LEN]>());
        let write = |path: &Path, text: &str, mode| {
            write_key_file(path, text, mode).map_err(|source| CheckpointError::Write {
                path: path.to_path_buf(),
                source,
            })
        };
        let mut text = Zeroizing::new(hex::encode(*seed));
        text.push('\n');
        write(path, &text, KeyFile::CreateNew)?;
        let key = SigningKey::from_seed(&seed);
        write(
            &public_key_path(path),
            &format!("{}\n", key.public),
            KeyFile::Replace,
        )?;
        Ok(key)
    }

    /// Reads the key file (warning when others may read it too).
    pub fn load(path: &Path) -> Result<SigningKey, CheckpointError> {
        let read = |source| CheckpointError::Read {
            path: path.to_path_buf(),
            source,
        };
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(read)?);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path).map_err(read)?.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    mode = format!("{:o}", mode & 0o777),
                    "the checkpoint signing key is readable by others: chmod 600 it"
                );
            }
        }
        let mut seed = Zeroizing::new([0u8; KEY_LEN]);
        hex::decode_to_slice(text.trim(), seed.as_mut_slice()).map_err(|_| {
            CheckpointError::Malformed {
                path: path.to_path_buf(),
                what: "signing key",
                expected: "64 hex digits, as `token-broker audit keygen` writes",
            }
        })?;
        Ok(SigningKey::from_seed(&seed))
    }

    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    /// Signs the head `(seq, hash)` at time `at`, after the checkpoint `previous`.
    pub fn sign(&self, seq: i64, hash: &str, at: i64, previous: Option<&Checkpoint>) -> Checkpoint {
        let mut checkpoint = Checkpoint {
            seq,
            hash: hash.to_string(),
            at,
            prev_signature: previous.map(|p| p.signature.clone()),
            key_id: self.public.id(),
            signature: String::new(),
        };
        checkpoint.signature = hex::encode(self.pair.sign(&checkpoint.signed_bytes()).as_ref());
        checkpoint
    }
}

/// What the table holds of the chain, for comparing checkpoints with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainSpan {
    /// The first stored seq (a retention checkpoint's, when older events were pruned).
    pub first: i64,
    /// The last stored seq (0 when there are no events).
    pub last: i64,
}

/// How a checkpoint compares with the chain as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Comparison {
    /// The event at the checkpoint's seq carries the signed hash.
    Matches,
    /// Retention removed the event it covers: nothing left to compare.
    Pruned,
    /// The chain no longer holds what was signed. `seq` is the first seq that does not match
    /// (the first missing one for a cut tail; the checkpoint's own for a rewritten chain).
    Differs { seq: i64, detail: String },
}

/// Compares `checkpoint` with the stored chain: `event` is the stored event at its seq.
pub fn compare(
    checkpoint: &Checkpoint,
    event: Option<&AuditRecord>,
    span: ChainSpan,
) -> Comparison {
    let when = signed_at(checkpoint);
    if checkpoint.seq > span.last {
        return Comparison::Differs {
            seq: span.last.saturating_add(1),
            detail: format!(
                "the log ends at seq {}, but the checkpoint signed at {when} covers events up to \
                 seq {}: events {} to {} were removed",
                span.last,
                checkpoint.seq,
                span.last.saturating_add(1),
                checkpoint.seq
            ),
        };
    }
    if checkpoint.seq < span.first {
        return Comparison::Pruned;
    }
    match event {
        None => Comparison::Differs {
            seq: checkpoint.seq,
            detail: format!(
                "event {}, covered by the checkpoint signed at {when}, is missing",
                checkpoint.seq
            ),
        },
        Some(event) if event.hash != checkpoint.hash => Comparison::Differs {
            seq: checkpoint.seq,
            detail: format!(
                "event {} does not carry the hash signed at {when} ({} signed, {} stored): the \
                 chain was rewritten at or before seq {}",
                checkpoint.seq,
                short(&checkpoint.hash),
                short(&event.hash),
                checkpoint.seq
            ),
        },
        Some(_) => Comparison::Matches,
    }
}

/// What a verification trusts beyond the database: the public keys checkpoints must be signed
/// with, and checkpoints kept elsewhere (the log pipeline, a witness) the database must still
/// hold and match.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    pub keys: Vec<PublicKey>,
    pub checkpoints: Vec<Checkpoint>,
}

/// Checks checkpoints against the chain one at a time (the stored ones in signing order, then
/// the given ones) and folds what it found into the chain's report.
#[derive(Debug)]
pub struct CheckpointCheck<'a> {
    span: ChainSpan,
    keys: &'a [PublicKey],
    /// The last stored checkpoint seen.
    previous: Option<Checkpoint>,
    /// Signatures of the stored checkpoints.
    stored: HashSet<String>,
    checked: u64,
    pruned: u64,
    /// Seqs whose signed hash the chain still carries.
    matched: Vec<i64>,
    /// Seqs whose signed hash the chain no longer carries, to be bounded by `matched`.
    rewritten: Vec<(i64, String)>,
    /// Everything else found: `(the first seq that does not match, what)`.
    findings: Vec<(i64, String)>,
}

/// Findings named in a report's detail; the rest are counted.
const FINDINGS_NAMED: usize = 5;

impl<'a> CheckpointCheck<'a> {
    pub fn new(span: ChainSpan, keys: &'a [PublicKey]) -> Self {
        Self {
            span,
            keys,
            previous: None,
            stored: HashSet::new(),
            checked: 0,
            pruned: 0,
            matched: Vec::new(),
            rewritten: Vec::new(),
            findings: Vec::new(),
        }
    }

    /// The next stored checkpoint, in signing order; `event` is the stored event at its seq.
    pub fn stored(&mut self, checkpoint: &Checkpoint, event: Option<&AuditRecord>) {
        self.checked += 1;
        if !self.keys.is_empty() {
            self.signature(checkpoint);
        }
        let expected = self.previous.as_ref().map(|p| p.signature.as_str());
        if checkpoint.prev_signature.as_deref() != expected {
            self.findings.push((
                checkpoint.seq,
                format!(
                    "the checkpoint signed at {} (seq {}) does not follow the stored checkpoint \
                     before it: checkpoints were removed, reordered or forged",
                    signed_at(checkpoint),
                    checkpoint.seq
                ),
            ));
        }
        self.compare(checkpoint, event);
        self.stored.insert(checkpoint.signature.clone());
        self.previous = Some(checkpoint.clone());
    }

    /// A checkpoint kept outside the database; `event` is the stored event at its seq.
    pub fn given(&mut self, checkpoint: &Checkpoint, event: Option<&AuditRecord>) {
        self.checked += 1;
        if self.keys.is_empty() {
            self.findings.push((
                checkpoint.seq,
                format!(
                    "the checkpoint at seq {} cannot be trusted without a public key",
                    checkpoint.seq
                ),
            ));
        } else {
            self.signature(checkpoint);
        }
        self.compare(checkpoint, event);
        if !self.stored.contains(&checkpoint.signature) {
            self.findings.push((
                checkpoint.seq,
                format!(
                    "the database no longer holds the checkpoint signed at {} (seq {})",
                    signed_at(checkpoint),
                    checkpoint.seq
                ),
            ));
        }
    }

    fn signature(&mut self, checkpoint: &Checkpoint) {
        let result = match self.keys.iter().find(|key| key.id() == checkpoint.key_id) {
            Some(key) => checkpoint.verify(key),
            None => Err(CheckpointError::OtherKey {
                seq: checkpoint.seq,
                key_id: checkpoint.key_id.clone(),
            }),
        };
        if let Err(error) = result {
            self.findings.push((checkpoint.seq, error.to_string()));
        }
    }

    fn compare(&mut self, checkpoint: &Checkpoint, event: Option<&AuditRecord>) {
        match compare(checkpoint, event, self.span) {
            Comparison::Matches => self.matched.push(checkpoint.seq),
            Comparison::Pruned => self.pruned += 1,
            Comparison::Differs { seq, detail } if seq == checkpoint.seq => {
                self.rewritten.push((seq, detail))
            }
            Comparison::Differs { seq, detail } => self.findings.push((seq, detail)),
        }
    }

    /// The chain's report with the checkpoints' findings: not ok if either found anything;
    /// the lowest seq found is the one named.
    pub fn report(mut self, chain: VerifyReport) -> VerifyReport {
        let mut findings = self.findings;
        self.matched.sort_unstable();
        for (seq, detail) in self.rewritten {
            // The last seq below this one whose signed hash still matches.
            let below = self.matched.partition_point(|&matched| matched < seq);
            let from = below.checked_sub(1).map_or(self.span.first, |index| {
                self.matched[index].saturating_add(1)
            });
            findings.push((
                seq,
                format!("{detail}; events {from} to {seq} cannot be trusted"),
            ));
        }
        if let (false, Some(seq)) = (chain.ok, chain.first_bad_seq) {
            findings.push((seq, chain.detail.clone()));
        }
        findings.sort();
        findings.dedup_by(|a, b| a.1 == b.1);
        let last_checkpoint = self.previous;
        let Some(&(first_bad_seq, _)) = findings.first() else {
            let mut detail = chain.detail.clone();
            if self.checked == 0 {
                if !self.keys.is_empty() {
                    detail.push_str("; no signed checkpoint stored yet");
                }
            } else {
                detail.push_str(&format!(
                    "; {} checkpoints match the chain{}",
                    self.checked,
                    if self.keys.is_empty() {
                        " (signatures not checked: no public key given)"
                    } else {
                        ", signatures verified"
                    }
                ));
                if self.pruned > 0 {
                    detail.push_str(&format!(" ({} cover pruned events)", self.pruned));
                }
                if let Some(last) = &last_checkpoint {
                    detail.push_str(&format!(
                        "; the last, signed at {}, covers seq {}",
                        signed_at(last),
                        last.seq
                    ));
                }
            }
            return VerifyReport {
                detail,
                checkpoints_checked: self.checked,
                last_checkpoint,
                ..chain
            };
        };
        let mut detail = findings
            .iter()
            .take(FINDINGS_NAMED)
            .map(|(_, what)| what.as_str())
            .collect::<Vec<_>>()
            .join("; ");
        if findings.len() > FINDINGS_NAMED {
            detail.push_str(&format!(
                "; and {} more findings",
                findings.len() - FINDINGS_NAMED
            ));
        }
        VerifyReport {
            ok: false,
            events_checked: chain.events_checked,
            first_bad_seq: Some(first_bad_seq),
            detail,
            checkpoints_checked: self.checked,
            last_checkpoint,
        }
    }
}

/// A checkpoint's signing time for people: RFC 3339, or the raw number outside years 1970 to
/// 9999 (a hostile or damaged `at` is shown, never a reason to fail).
pub fn signed_at(checkpoint: &Checkpoint) -> String {
    rfc3339_or_raw(checkpoint.at)
}

/// Milliseconds since the epoch as RFC 3339 when they fall in years 1970 to 9999 (what RFC 3339
/// can write); the number itself otherwise.
pub fn rfc3339_or_raw(ms: i64) -> String {
    /// 9999-12-31T23:59:59.999Z.
    const LAST_MS: i64 = 253_402_300_799_999;
    match u64::try_from(ms) {
        Ok(ms) if ms <= LAST_MS as u64 => {
            let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
            humantime::format_rfc3339_millis(time).to_string()
        }
        _ => format!("{ms} ms since the Unix epoch"),
    }
}

fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

/// Where `audit keygen --out FILE` writes the public key: `FILE.pub`.
pub fn public_key_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(".pub");
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::from_seed(&[7; KEY_LEN])
    }

    #[test]
    fn a_signed_checkpoint_verifies_and_any_change_breaks_it() {
        let key = key();
        let first = key.sign(10, &"a".repeat(64), 1_000, None);
        let second = key.sign(20, &"b".repeat(64), 2_000, Some(&first));
        assert_eq!(
            second.prev_signature.as_deref(),
            Some(first.signature.as_str())
        );
        first.verify(key.public_key()).unwrap();
        second.verify(key.public_key()).unwrap();

        let edits: [fn(&mut Checkpoint); 5] = [
            |c| c.seq += 1,
            |c| c.hash = "c".repeat(64),
            |c| c.at += 1,
            |c| c.prev_signature = None,
            |c| c.signature = "00".repeat(64),
        ];
        for edit in edits {
            let mut altered = second.clone();
            edit(&mut altered);
            assert!(matches!(
                altered.verify(key.public_key()),
                Err(CheckpointError::BadSignature { seq: _ })
            ));
        }
    }

    #[test]
    fn another_key_is_named_not_trusted() {
        let checkpoint = key().sign(1, &"a".repeat(64), 1, None);
        let other = SigningKey::from_seed(&[8; KEY_LEN]);
        assert!(matches!(
            checkpoint.verify(other.public_key()),
            Err(CheckpointError::OtherKey { .. })
        ));
        // A forged checkpoint claiming the right key id still fails on its signature.
        let mut forged = other.sign(1, &"a".repeat(64), 1, None);
        forged.key_id = key().public_key().id();
        assert!(matches!(
            forged.verify(key().public_key()),
            Err(CheckpointError::BadSignature { .. })
        ));
    }

    #[test]
    fn public_keys_round_trip_through_text() {
        let public = key().public_key().clone();
        let text = public.to_string();
        assert!(text.starts_with("ed25519:"));
        assert_eq!(PublicKey::parse(&text), Some(public.clone()));
        assert_eq!(PublicKey::parse(&text["ed25519:".len()..]), Some(public));
        assert_eq!(PublicKey::parse("ed25519:abcd"), None);
        assert_eq!(PublicKey::parse("not a key"), None);
    }

    #[test]
    fn lines_are_read_from_bare_json_and_from_json_log_lines() {
        let checkpoint = key().sign(5, &"d".repeat(64), 42, None);
        let bare = serde_json::to_string(&checkpoint).unwrap();
        assert_eq!(
            Checkpoint::from_line(&bare).unwrap(),
            Some(checkpoint.clone())
        );

        let mut fields = serde_json::to_value(&checkpoint).unwrap();
        fields["event"] = LOG_EVENT.into();
        fields["message"] = "audit checkpoint signed".into();
        let nested = serde_json::json!({
            "timestamp": "2026-11-28T00:00:00Z",
            "level": "INFO",
            "fields": fields.clone(),
            "target": "audit",
        });
        assert_eq!(
            Checkpoint::from_line(&nested.to_string()).unwrap(),
            Some(checkpoint.clone())
        );
        // The daemon's --log-format json flattens the fields into the line.
        let mut flat = fields;
        flat["timestamp"] = "2026-11-28T00:00:00Z".into();
        flat["target"] = "audit".into();
        assert_eq!(
            Checkpoint::from_line(&flat.to_string()).unwrap(),
            Some(checkpoint)
        );

        let other_event = serde_json::json!({"message": "audit event", "seq": 3, "hash": "e"});
        assert_eq!(
            Checkpoint::from_line(&other_event.to_string()).unwrap(),
            None
        );
        assert_eq!(
            Checkpoint::from_line("2026-11-28 INFO pretty line").unwrap(),
            None
        );
        assert!(Checkpoint::from_line("{\"signature\": 3").is_err());
    }

    #[test]
    fn a_checkpoint_compares_with_the_stored_chain() {
        let checkpoint = key().sign(10, &"a".repeat(64), 1, None);
        let event = |hash: &str| AuditRecord {
            seq: 10,
            at: 1,
            job_id: "job".into(),
            tenant: "t".into(),
            client_id: "app".into(),
            kind: crate::audit::AuditKind::JobSubmitted.into(),
            attempt: None,
            http_status: None,
            detail: None,
            code_fingerprint: None,
            prev_hash: "0".repeat(64),
            hash: hash.into(),
        };
        let span = |first, last| ChainSpan { first, last };
        assert_eq!(
            compare(&checkpoint, Some(&event(&"a".repeat(64))), span(1, 12)),
            Comparison::Matches
        );
        // Rewritten: another hash at the signed seq.
        assert!(matches!(
            compare(&checkpoint, Some(&event(&"b".repeat(64))), span(1, 12)),
            Comparison::Differs { seq: 10, .. }
        ));
        // Cut: the log ends before the signed seq; the first missing seq is named.
        assert!(matches!(
            compare(&checkpoint, None, span(1, 7)),
            Comparison::Differs { seq: 8, .. }
        ));
        assert!(matches!(
            compare(&checkpoint, None, span(1, 0)),
            Comparison::Differs { seq: 1, .. }
        ));
        // A hole where the event should be.
        assert!(matches!(
            compare(&checkpoint, None, span(1, 12)),
            Comparison::Differs { seq: 10, .. }
        ));
        // Retention removed it.
        assert_eq!(compare(&checkpoint, None, span(11, 12)), Comparison::Pruned);
    }

    #[test]
    fn absurd_times_and_seqs_are_shown_not_fatal() {
        assert_eq!(rfc3339_or_raw(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339_or_raw(253_402_300_799_999),
            "9999-12-31T23:59:59.999Z"
        );
        for ms in [253_402_300_800_000, i64::MAX, -1, i64::MIN] {
            assert!(
                rfc3339_or_raw(ms).ends_with("ms since the Unix epoch"),
                "{ms}"
            );
        }
        let span = ChainSpan { first: 1, last: 10 };
        let keys = [key().public_key().clone()];
        for (seq, at) in [
            (i64::MAX, i64::MAX),
            (i64::MIN, i64::MIN),
            (-1, 300_000_000_000_000),
        ] {
            let mut checkpoint = key().sign(1, "h", 1, None);
            checkpoint.seq = seq;
            checkpoint.at = at;
            let _ = compare(&checkpoint, None, span);
            let mut check = CheckpointCheck::new(span, &keys);
            check.given(&checkpoint, None);
            assert!(
                !check
                    .report(VerifyReport {
                        ok: true,
                        events_checked: 10,
                        first_bad_seq: None,
                        detail: "chain intact".into(),
                        checkpoints_checked: 0,
                        last_checkpoint: None,
                    })
                    .ok
            );
        }
    }

    #[test]
    fn keygen_writes_a_private_file_and_its_public_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signing.key");
        let generated = SigningKey::generate(&path).unwrap();
        let loaded = SigningKey::load(&path).unwrap();
        assert_eq!(loaded.public_key(), generated.public_key());
        assert_eq!(
            &PublicKey::load(&public_key_path(&path)).unwrap(),
            generated.public_key()
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // A second keygen never overwrites a key.
        assert!(matches!(
            SigningKey::generate(&path),
            Err(CheckpointError::Write { .. })
        ));
        std::fs::write(&path, "not hex\n").unwrap();
        assert!(matches!(
            SigningKey::load(&path),
            Err(CheckpointError::Malformed { .. })
        ));
    }
}
