//! The audit trail's domain: event records, their canonical encoding and hash chain, and the
//! verifier that recomputes it.
//!
//! Each event's hash is SHA-256 over a version tag, the previous event's hash and the event's
//! canonical encoding (every field, length-prefixed, in a fixed order). Editing, deleting or
//! reordering a row therefore breaks the chain at that row's `seq` or the next one. Whoever can
//! write the file can also recompute the chain; the hashes are therefore also emitted to the log
//! pipeline with every event, where an auditor can compare them with the database's.

pub mod checkpoint;
pub mod fingerprint;

use sha2::{Digest, Sha256};

use crate::domain::job::UnixMillis;

/// The `prev_hash` of the first event.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditKind {
    JobSubmitted,
    JobCancelled,
    AttemptStarted,
    /// Upstream answered the attempt, or the request certainly never left.
    AttemptFinished,
    /// The attempt's answer was never seen.
    AttemptUnknown,
    JobRetryScheduled,
    JobSucceeded,
    JobFailed,
    JobExpired,
    /// Retention removed the events before this one; its hash is that of the last removed event.
    Checkpoint,
}

impl AuditKind {
    /// Every kind, for looking one up by name.
    const ALL: [AuditKind; 10] = [
        AuditKind::JobSubmitted,
        AuditKind::JobCancelled,
        AuditKind::AttemptStarted,
        AuditKind::AttemptFinished,
        AuditKind::AttemptUnknown,
        AuditKind::JobRetryScheduled,
        AuditKind::JobSucceeded,
        AuditKind::JobFailed,
        AuditKind::JobExpired,
        AuditKind::Checkpoint,
    ];

    /// The kind a stored name stands for.
    pub fn parse(name: &str) -> Option<AuditKind> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == name)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AuditKind::JobSubmitted => "job.submitted",
            AuditKind::JobCancelled => "job.cancelled",
            AuditKind::AttemptStarted => "attempt.started",
            AuditKind::AttemptFinished => "attempt.finished",
            AuditKind::AttemptUnknown => "attempt.unknown",
            AuditKind::JobRetryScheduled => "job.retry_scheduled",
            AuditKind::JobSucceeded => "job.succeeded",
            AuditKind::JobFailed => "job.failed",
            AuditKind::JobExpired => "job.expired",
            AuditKind::Checkpoint => "audit.checkpoint",
        }
    }
}

/// An audit record's kind as stored: one this build knows, or the stored text of one it does
/// not know (a newer build's, or a hand-edited row), kept verbatim so the chain still verifies
/// and the edit is reported where it breaks the chain, not where the text fails to parse.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(into = "String", from = "String")]
pub enum RecordKind {
    Known(AuditKind),
    Unknown(String),
}

impl RecordKind {
    pub fn as_str(&self) -> &str {
        match self {
            RecordKind::Known(kind) => kind.as_str(),
            RecordKind::Unknown(text) => text,
        }
    }
}

impl From<AuditKind> for RecordKind {
    fn from(kind: AuditKind) -> Self {
        RecordKind::Known(kind)
    }
}

impl From<String> for RecordKind {
    fn from(text: String) -> Self {
        match AuditKind::parse(&text) {
            Some(kind) => RecordKind::Known(kind),
            None => RecordKind::Unknown(text),
        }
    }
}

impl From<RecordKind> for String {
    fn from(kind: RecordKind) -> Self {
        match kind {
            RecordKind::Known(kind) => kind.as_str().to_string(),
            RecordKind::Unknown(text) => text,
        }
    }
}

impl std::fmt::Display for RecordKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One stored audit event.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AuditRecord {
    pub seq: i64,
    /// Milliseconds since the Unix epoch.
    pub at: i64,
    pub job_id: String,
    pub tenant: String,
    pub client_id: String,
    pub kind: RecordKind,
    pub attempt: Option<u32>,
    pub http_status: Option<u16>,
    pub detail: Option<String>,
    /// HMAC-SHA256 of the authorization code under the daemon's fingerprint key.
    pub code_fingerprint: Option<String>,
    pub prev_hash: String,
    pub hash: String,
}

impl AuditRecord {
    /// The hash this record must carry, given its `prev_hash`.
    pub fn expected_hash(&self) -> String {
        chain_hash(&self.prev_hash, &self.canonical())
    }

    /// The canonical encoding: every field but the hashes, length-prefixed, in a fixed order.
    /// Absent optional fields encode differently from empty ones.
    pub fn canonical(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        let mut field = |value: Option<&[u8]>| push_field(&mut out, value);
        field(Some(&self.seq.to_be_bytes()));
        field(Some(&self.at.to_be_bytes()));
        field(Some(self.job_id.as_bytes()));
        field(Some(self.tenant.as_bytes()));
        field(Some(self.client_id.as_bytes()));
        field(Some(self.kind.as_str().as_bytes()));
        field(self.attempt.map(u32::to_be_bytes).as_ref().map(|b| &b[..]));
        field(
            self.http_status
                .map(u16::to_be_bytes)
                .as_ref()
                .map(|b| &b[..]),
        );
        field(self.detail.as_deref().map(str::as_bytes));
        field(self.code_fingerprint.as_deref().map(str::as_bytes));
        out
    }

    pub fn at(&self) -> UnixMillis {
        UnixMillis(self.at)
    }
}

/// Appends one field of a canonical encoding: `0` when absent; `1`, its length (u64, big-endian)
/// and its bytes when present, so absent and empty differ and no field runs into the next.
pub(crate) fn push_field(out: &mut Vec<u8>, value: Option<&[u8]>) {
    match value {
        None => out.push(0),
        Some(bytes) => {
            out.push(1);
            out.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
            out.extend_from_slice(bytes);
        }
    }
}

/// `hex(SHA-256("token-broker/audit/v1" || prev_hash || canonical))`.
pub fn chain_hash(prev_hash: &str, canonical: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"token-broker/audit/v1");
    hasher.update(prev_hash.as_bytes());
    hasher.update(canonical);
    hex::encode(hasher.finalize())
}

/// The result of verifying the chain.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    pub ok: bool,
    pub events_checked: u64,
    /// The first `seq` where the chain breaks, when it does.
    pub first_bad_seq: Option<i64>,
    pub detail: String,
    /// Signed checkpoints compared with the chain (stored and given).
    pub checkpoints_checked: u64,
    /// The latest stored checkpoint.
    pub last_checkpoint: Option<checkpoint::Checkpoint>,
}

/// Recomputes the chain over events fed in `seq` order.
#[derive(Debug, Default, Clone)]
pub struct ChainVerifier {
    /// The previous event's `(seq, hash)`.
    previous: Option<(i64, String)>,
    checked: u64,
    /// Where the verified chain starts when retention left a checkpoint.
    checkpoint: Option<i64>,
    broken: Option<(i64, String)>,
}

impl ChainVerifier {
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks the next event. Returns `false` once the chain is broken (later events are not
    /// checked: the first break is what the report names).
    pub fn check(&mut self, record: &AuditRecord) -> bool {
        if self.broken.is_some() {
            return false;
        }
        let problem = self.problem(record);
        match problem {
            Some(detail) => {
                self.broken = Some((record.seq, detail));
                false
            }
            None => {
                self.checked += 1;
                self.previous = Some((record.seq, record.hash.clone()));
                true
            }
        }
    }

    fn problem(&mut self, record: &AuditRecord) -> Option<String> {
        let is_checkpoint = record.kind == RecordKind::Known(AuditKind::Checkpoint);
        match &self.previous {
            None if is_checkpoint => {
                // Retention removed what came before; the checkpoint carries the hash of the
                // last removed event, and the chain is verified from here on.
                if record.hash != record.prev_hash {
                    return Some(
                        "a checkpoint must carry the hash of the last removed event".into(),
                    );
                }
                self.checkpoint = Some(record.seq);
                return None;
            }
            None => {
                if record.prev_hash != GENESIS_HASH {
                    return Some(format!(
                        "the first event ({}) does not start the chain: events before it were removed",
                        record.seq
                    ));
                }
            }
            Some((seq, hash)) => {
                if is_checkpoint {
                    return Some("a checkpoint appears in the middle of the chain".into());
                }
                if Some(record.seq) != seq.checked_add(1) {
                    return Some(format!(
                        "seq jumps from {seq} to {}: events were removed",
                        record.seq
                    ));
                }
                if &record.prev_hash != hash {
                    return Some(format!(
                        "prev_hash does not match the hash of event {seq}: events were removed or reordered"
                    ));
                }
            }
        }
        if record.hash != record.expected_hash() {
            return Some(
                "the hash does not match the event's contents: the event was edited".into(),
            );
        }
        None
    }

    /// The last verified event's seq.
    pub fn last_seq(&self) -> Option<i64> {
        self.previous.as_ref().map(|(seq, _)| *seq)
    }

    /// Marks the chain broken at `seq` for a reason found outside the rows themselves (the
    /// table's sequence counter shows removed tail events).
    pub fn fail_at(&mut self, seq: i64, detail: String) {
        if self.broken.is_none() {
            self.broken = Some((seq, detail));
        }
    }

    pub fn report(self) -> VerifyReport {
        match self.broken {
            Some((seq, detail)) => VerifyReport {
                ok: false,
                events_checked: self.checked,
                first_bad_seq: Some(seq),
                detail: format!("chain broken at seq {seq}: {detail}"),
                checkpoints_checked: 0,
                last_checkpoint: None,
            },
            None => VerifyReport {
                ok: true,
                events_checked: self.checked,
                first_bad_seq: None,
                detail: match (self.checkpoint, self.previous) {
                    (_, None) => "no events".to_string(),
                    (Some(from), Some((to, _))) => {
                        format!("chain intact from checkpoint {from} to seq {to}")
                    }
                    (None, Some((to, _))) => format!("chain intact from seq 1 to seq {to}"),
                },
                checkpoints_checked: 0,
                last_checkpoint: None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: i64) -> Vec<AuditRecord> {
        let mut prev = GENESIS_HASH.to_string();
        (1..=n)
            .map(|seq| {
                let mut record = AuditRecord {
                    seq,
                    at: 1_000 + seq,
                    job_id: format!("job-{}", seq % 3),
                    tenant: "default".into(),
                    client_id: "app".into(),
                    kind: AuditKind::JobSubmitted.into(),
                    attempt: (seq % 2 == 0).then_some(1),
                    http_status: None,
                    detail: None,
                    code_fingerprint: Some("f".repeat(64)),
                    prev_hash: prev.clone(),
                    hash: String::new(),
                };
                record.hash = record.expected_hash();
                prev = record.hash.clone();
                record
            })
            .collect()
    }

    fn verify(records: &[AuditRecord]) -> VerifyReport {
        let mut verifier = ChainVerifier::new();
        for record in records {
            verifier.check(record);
        }
        verifier.report()
    }

    #[test]
    fn an_intact_chain_verifies() {
        let report = verify(&chain(10));
        assert!(report.ok, "{report:?}");
        assert_eq!(report.events_checked, 10);
    }

    #[test]
    fn an_edit_is_caught_at_its_seq() {
        let mut records = chain(10);
        records[4].detail = Some("edited".into());
        assert_eq!(verify(&records).first_bad_seq, Some(5));
    }

    #[test]
    fn a_deletion_is_caught_at_the_next_seq() {
        let mut records = chain(10);
        records.remove(6);
        assert_eq!(verify(&records).first_bad_seq, Some(8));
        let mut records = chain(10);
        records.remove(0);
        assert_eq!(verify(&records).first_bad_seq, Some(2));
    }

    #[test]
    fn swapped_contents_are_caught() {
        let mut records = chain(10);
        let (a, b) = (records[2].clone(), records[3].clone());
        records[2].job_id = b.job_id;
        records[3].job_id = a.job_id;
        records[2].attempt = b.attempt;
        records[3].attempt = a.attempt;
        assert_eq!(verify(&records).first_bad_seq, Some(3));
    }

    #[test]
    fn absent_and_empty_fields_encode_differently() {
        let mut a = chain(1).remove(0);
        let mut b = a.clone();
        a.detail = None;
        b.detail = Some(String::new());
        assert_ne!(a.canonical(), b.canonical());
    }

    #[test]
    fn a_checkpoint_starts_a_verifiable_chain_only_at_the_start() {
        let records = chain(10);
        let mut checkpoint = records[4].clone();
        checkpoint.kind = AuditKind::Checkpoint.into();
        checkpoint.prev_hash = records[4].hash.clone();
        checkpoint.detail = Some("pruned seq 1 to 5".into());
        let mut pruned = vec![checkpoint.clone()];
        pruned.extend_from_slice(&records[5..]);
        let report = verify(&pruned);
        assert!(report.ok, "{report:?}");
        assert_eq!(report.detail, "chain intact from checkpoint 5 to seq 10");

        let mut middle = records.clone();
        middle[5] = checkpoint;
        middle[5].seq = 6;
        assert!(!verify(&middle).ok);
    }
}
