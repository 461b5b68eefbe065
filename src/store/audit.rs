//! Audit events: appended in the same transaction as the change they describe, so there is no
//! change without its event and no event without its change, each chained to the one before
//! (see [`crate::audit`]). Events carry ids, statuses, the code's fingerprint and our own short
//! details; never a code, a verifier, a token or an upstream body.

use super::{
    AttemptRecord,
    backend::{Columns, Conn, Db, on_backend},
};
use crate::{
    audit::{AuditKind, AuditRecord, GENESIS_HASH, RecordKind},
    domain::job::{FailureReason, Job, JobState, UnixMillis},
    ops::metrics::Metrics,
};

/// The last event of the chain, read at the start of each writing transaction (which holds the
/// write lock, so no other writer can append meanwhile).
#[derive(Debug, Clone)]
pub(super) struct ChainHead {
    seq: i64,
    /// The last event's time: later events never carry an earlier one, so time ranges map
    /// exactly onto seq ranges.
    at: i64,
    hash: String,
}

impl ChainHead {
    pub(super) fn seq(&self) -> i64 {
        self.seq
    }

    pub(super) fn hash(&self) -> &str {
        &self.hash
    }

    /// The head after the last event as read (seq, time, hash); `None` while the chain is
    /// empty.
    pub(super) fn from_last(last: Option<(i64, i64, Option<String>)>) -> ChainHead {
        match last {
            Some((seq, at, hash)) => ChainHead {
                seq,
                at,
                hash: hash.unwrap_or_else(|| GENESIS_HASH.to_string()),
            },
            None => ChainHead {
                seq: 0,
                at: i64::MIN,
                hash: GENESIS_HASH.to_string(),
            },
        }
    }

    pub(super) async fn read(conn: &mut Conn) -> sqlx::Result<ChainHead> {
        let head = on_backend!(conn, "chain_head", |query, conn| {
            let row = query.fetch_optional(&mut *conn).await?;
            match row {
                Some(row) => Some((row.int("seq")?, row.int("at")?, row.opt_text("hash")?)),
                None => None,
            }
        });
        Ok(ChainHead::from_last(head))
    }
}

/// One audit record about to be written. After its transaction commits, the store calls
/// [`AuditEvent::emit`], so the log never shows an event that was rolled back.
#[derive(Debug)]
pub(super) struct AuditEvent<'a> {
    job: &'a Job,
    kind: AuditKind,
    at: UnixMillis,
    attempt: Option<u32>,
    http_status: Option<u16>,
    detail: Option<String>,
}

impl<'a> AuditEvent<'a> {
    pub(super) fn new(job: &'a Job, kind: AuditKind, at: UnixMillis) -> Self {
        Self {
            job,
            kind,
            at,
            attempt: None,
            http_status: None,
            detail: None,
        }
    }

    pub(super) fn attempt(mut self, attempt: u32) -> Self {
        self.attempt = Some(attempt);
        self
    }

    fn status(mut self, http_status: Option<u16>) -> Self {
        self.http_status = http_status;
        self
    }

    pub(super) fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// Chains the event after `head` and returns the record to store.
    pub(super) fn chain(self, head: &mut ChainHead) -> AuditRecord {
        let mut record = AuditRecord {
            seq: head.seq + 1,
            at: self.at.0.max(head.at),
            job_id: self.job.id.to_string(),
            tenant: self.job.tenant.clone(),
            client_id: self.job.client_id.clone(),
            kind: self.kind.into(),
            attempt: self.attempt,
            http_status: self.http_status,
            detail: self.detail,
            code_fingerprint: self.job.code_fingerprint.clone(),
            prev_hash: head.hash.clone(),
            hash: String::new(),
        };
        record.hash = record.expected_hash();
        head.seq = record.seq;
        head.at = record.at;
        head.hash = record.hash.clone();
        record
    }
}

/// Rows per INSERT statement (12 parameters each, well under SQLite's limit).
const INSERT_CHUNK: usize = 200;

/// Binds the columns of `$records` in the order of `insert_audit_rows.sql` (a macro: the query
/// types of the two databases' statements differ).
macro_rules! bind_records {
    ($query:expr, $records:expr) => {{
        let mut query = $query;
        for record in $records {
            query = query
                .bind(record.seq)
                .bind(record.at)
                .bind(&record.job_id)
                .bind(&record.tenant)
                .bind(&record.client_id)
                .bind(record.kind.as_str())
                .bind(record.attempt.map(i64::from))
                .bind(record.http_status.map(i64::from))
                .bind(record.detail.as_deref())
                .bind(record.code_fingerprint.as_deref())
                .bind(&record.prev_hash)
                .bind(&record.hash);
        }
        query
    }};
}

/// Writes chained records, many rows per statement: with group commit, a batch's events cost a
/// few statements instead of one each.
pub(super) async fn insert_records(conn: &mut Conn, records: &[&AuditRecord]) -> sqlx::Result<()> {
    for chunk in records.chunks(INSERT_CHUNK) {
        let head = match conn {
            Db::Sqlite(_) => include_str!("sql/sqlite/insert_audit_rows.sql"),
            Db::Postgres(_) => include_str!("sql/postgres/insert_audit_rows.sql"),
        };
        let mut sql = String::from(head.trim_end());
        conn.push_tuples(&mut sql, 0, chunk.len(), 12);
        on_backend!(&mut *conn, generated sql, |query, conn| {
            bind_records!(query, chunk).execute(&mut *conn).await?;
        });
    }
    Ok(())
}

/// The chain's high-water mark and the notifications that a transaction on a shared database
/// (PostgreSQL) writes before its commit (`announce.sql`).
pub(super) struct Announcement {
    /// The last sequence number the transaction chained.
    pub(super) last_seq: i64,
    /// The notifications' payloads, a JSON array.
    pub(super) payloads: String,
}

/// [`insert_records`] on a shared database, whose last statement also makes the
/// `announcement`: one round trip fewer per transaction.
pub(super) async fn insert_records_announcing(
    conn: &mut Conn,
    records: &[&AuditRecord],
    announcement: &Announcement,
) -> sqlx::Result<()> {
    let (earlier, last) = records.split_at(last_chunk_start(records.len()));
    insert_records(conn, earlier).await?;
    let Db::Postgres(conn) = conn else {
        return Err(sqlx::Error::Protocol(
            "only a shared (PostgreSQL) database announces its changes".into(),
        ));
    };
    // The announcement binds $1 and $2; the rows, if any, are a data-modifying WITH, which
    // runs to completion whether or not the query reads it.
    let mut sql = String::from("WITH ");
    if !last.is_empty() {
        sql.push_str("inserted AS (");
        sql.push_str(include_str!("sql/postgres/insert_audit_rows.sql").trim_end());
        Db::<(), ()>::Postgres(()).push_tuples(&mut sql, 2, last.len(), 12);
        sql.push_str("),\n");
    }
    sql.push_str(include_str!("sql/postgres/announce.sql"));
    let query = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(announcement.last_seq)
        .bind(&announcement.payloads);
    bind_records!(query, last).execute(&mut *conn).await?;
    Ok(())
}

/// Where the last of [`insert_records`]' chunks of `len` rows starts: every chunk before it is
/// full, and it holds the rest (none when `len` is 0).
fn last_chunk_start(len: usize) -> usize {
    len.saturating_sub(1) / INSERT_CHUNK * INSERT_CHUNK
}

/// Logs a retention checkpoint (written by the pruning step itself).
pub(super) fn emit_checkpoint(record: &AuditRecord) {
    tracing::info!(
        target: "audit",
        seq = record.seq,
        kind = %record.kind,
        detail = record.detail.as_deref(),
        hash = %record.hash,
        "audit events pruned"
    );
}

/// Emits a committed record as a `tracing` event with target `audit`, hashes included, so a
/// log pipeline holds a copy of the chain outside the database; and counts it, so logs and
/// metrics never disagree.
pub(super) fn emit(record: &AuditRecord, metrics: &Metrics) {
    if let RecordKind::Known(kind) = &record.kind {
        match kind {
            AuditKind::JobSubmitted => {
                metrics.jobs_submitted.inc();
            }
            AuditKind::JobRetryScheduled => {
                metrics.retries.inc();
            }
            AuditKind::AttemptUnknown => {
                metrics.outcome_unknown.inc();
            }
            AuditKind::JobSucceeded => metrics.job_finished(JobState::Succeeded, None),
            AuditKind::JobCancelled => metrics.job_finished(JobState::Cancelled, None),
            AuditKind::JobExpired => {
                metrics.job_finished(JobState::Failed, Some(FailureReason::Expired))
            }
            // A job.failed event's detail is the failure reason; only a known one is a label.
            AuditKind::JobFailed => metrics.job_finished(
                JobState::Failed,
                record.detail.as_deref().and_then(|d| d.parse().ok()),
            ),
            _ => {}
        }
    }
    tracing::info!(
        target: "audit",
        seq = record.seq,
        kind = %record.kind,
        job_id = %record.job_id,
        tenant = %record.tenant,
        client_id = %record.client_id,
        attempt = record.attempt,
        http_status = record.http_status,
        detail = record.detail.as_deref(),
        code_fingerprint = record.code_fingerprint.as_deref(),
        prev_hash = %record.prev_hash,
        hash = %record.hash,
        "audit event"
    );
}

/// The stored event at `seq`, inside the writer's transaction.
pub(super) async fn event_at(conn: &mut Conn, seq: i64) -> sqlx::Result<Option<AuditRecord>> {
    Ok(on_backend!(conn, "get_event", |query, conn| {
        let row = query.bind(seq).fetch_optional(&mut *conn).await?;
        row.as_ref().map(record_from_row).transpose()?
    }))
}

/// Reads a stored event row.
pub(super) fn record_from_row(row: &impl Columns) -> sqlx::Result<AuditRecord> {
    // An attempt or status that does not fit its type is kept as absent: the chain check
    // then fails at this event, which is what an edited row should do.
    Ok(AuditRecord {
        seq: row.int("seq")?,
        at: row.int("at")?,
        job_id: row.text("job_id")?,
        tenant: row.text("tenant")?,
        client_id: row.text("client_id")?,
        kind: RecordKind::from(row.text("kind")?),
        attempt: row.opt_int("attempt")?.and_then(|a| u32::try_from(a).ok()),
        http_status: row
            .opt_int("http_status")?
            .and_then(|s| u16::try_from(s).ok()),
        detail: row.opt_text("detail")?,
        code_fingerprint: row.opt_text("code_fingerprint")?,
        prev_hash: row.opt_text("prev_hash")?.unwrap_or_default(),
        hash: row.opt_text("hash")?.unwrap_or_default(),
    })
}

/// The events of an attempt's recorded outcome: what upstream did, then what the job does next.
pub(super) fn attempt_events<'a>(
    job: &'a Job,
    attempt: u32,
    record: &AttemptRecord,
    at: UnixMillis,
) -> Vec<AuditEvent<'a>> {
    let event = |kind| AuditEvent::new(job, kind, at).attempt(attempt);
    match record {
        AttemptRecord::Succeeded { http_status, .. } => vec![
            event(AuditKind::AttemptFinished).status(Some(*http_status)),
            event(AuditKind::JobSucceeded).status(Some(*http_status)),
        ],
        AttemptRecord::RetryAt {
            at: next,
            http_status,
            detail,
            answer_lost,
            ..
        } => vec![
            answer_event(job, attempt, *http_status, *answer_lost, at).detail(detail.clone()),
            event(AuditKind::JobRetryScheduled)
                .status(*http_status)
                .detail(format!("next attempt in {} ms", next.0 - at.0)),
        ],
        AttemptRecord::Failed {
            reason,
            http_status,
            detail,
            answer_lost,
            ..
        } => vec![
            answer_event(job, attempt, *http_status, *answer_lost, at).detail(detail.clone()),
            event(if *reason == FailureReason::Expired {
                AuditKind::JobExpired
            } else {
                AuditKind::JobFailed
            })
            .status(*http_status)
            .detail(reason.as_str()),
        ],
    }
}

/// `attempt.unknown` when the attempt's answer was lost, `attempt.finished` otherwise (an
/// answer, or a request that certainly never left).
fn answer_event(
    job: &Job,
    attempt: u32,
    http_status: Option<u16>,
    answer_lost: bool,
    at: UnixMillis,
) -> AuditEvent<'_> {
    let kind = if answer_lost {
        AuditKind::AttemptUnknown
    } else {
        AuditKind::AttemptFinished
    };
    AuditEvent::new(job, kind, at)
        .attempt(attempt)
        .status(http_status)
}

/// The events of a sweep: an expiry, or a rescued lease (and, when no attempt was left, the
/// failure it caused).
pub(super) fn sweep_events(job: &Job, kind: AuditKind, at: UnixMillis) -> Vec<AuditEvent<'_>> {
    match kind {
        AuditKind::AttemptUnknown => {
            let mut events = vec![
                AuditEvent::new(job, kind, at)
                    .attempt(job.attempts)
                    .detail("lease expired before the attempt's outcome was recorded"),
            ];
            if job.state == JobState::Failed {
                events.push(
                    AuditEvent::new(job, AuditKind::JobFailed, at)
                        .attempt(job.attempts)
                        .detail("retries_exhausted"),
                );
            } else {
                events.push(
                    AuditEvent::new(job, AuditKind::JobRetryScheduled, at)
                        .attempt(job.attempts)
                        .detail("next attempt now"),
                );
            }
            events
        }
        other => vec![AuditEvent::new(job, other, at).detail("the job outlived its time to live")],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_announcing_statement_takes_the_last_chunk_whole() {
        for (len, start) in [
            (0, 0),
            (1, 0),
            (INSERT_CHUNK - 1, 0),
            (INSERT_CHUNK, 0),
            (INSERT_CHUNK + 1, INSERT_CHUNK),
            (2 * INSERT_CHUNK, INSERT_CHUNK),
            (2 * INSERT_CHUNK + 1, 2 * INSERT_CHUNK),
        ] {
            assert_eq!(last_chunk_start(len), start, "{len} rows");
            // The rows before it are whole chunks, as `insert_records` writes them, and the
            // last holds at most a chunk and at least one row whenever there are rows.
            assert_eq!(start % INSERT_CHUNK, 0);
            assert!(len - start <= INSERT_CHUNK);
            assert!(len == 0 || len > start, "{len} rows");
        }
    }
}
