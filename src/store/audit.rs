//! Audit events: appended in the same transaction as the change they describe, so there is no
//! change without its event and no event without its change. Events carry ids, statuses and our
//! own short details; never a code, a verifier, a token or an upstream body.

use sqlx::{Sqlite, Transaction};

use super::AttemptRecord;
use crate::job::{Job, JobState, UnixMillis};

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditKind {
    JobSubmitted,
    JobCancelled,
    AttemptStarted,
    /// Upstream answered the attempt.
    AttemptFinished,
    /// The attempt's answer was never seen.
    AttemptUnknown,
    JobRetryScheduled,
    JobSucceeded,
    JobFailed,
    JobExpired,
}

impl AuditKind {
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
        }
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

    fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub(super) async fn insert(&self, tx: &mut Transaction<'static, Sqlite>) -> sqlx::Result<()> {
        sqlx::query(include_str!("sql/insert_audit.sql"))
            .bind(self.at.0)
            .bind(self.job.id.to_string())
            .bind(&self.job.tenant)
            .bind(&self.job.client_id)
            .bind(self.kind.as_str())
            .bind(self.attempt)
            .bind(self.http_status)
            .bind(self.detail.as_deref())
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// Emits the committed event as a `tracing` event with target `audit`.
    pub(super) fn emit(&self) {
        tracing::info!(
            target: "audit",
            kind = self.kind.as_str(),
            job_id = %self.job.id,
            tenant = %self.job.tenant,
            client_id = %self.job.client_id,
            attempt = self.attempt,
            http_status = self.http_status,
            detail = self.detail.as_deref(),
            "audit event"
        );
    }
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
            event(AuditKind::JobFailed)
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
