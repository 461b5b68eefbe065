//! The job: what the queue stores, the worker advances and the API reports.
//!
//! These are domain types; only `api` converts them to and from protobuf.

use std::{fmt, str::FromStr, time::SystemTime};

use uuid::Uuid;

use crate::domain::secret::SecretString;

/// Milliseconds since the Unix epoch, the one time representation in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UnixMillis(pub i64);

impl UnixMillis {
    pub fn now() -> Self {
        Self::from(SystemTime::now())
    }

    pub fn saturating_add(self, duration: std::time::Duration) -> Self {
        let millis = i64::try_from(duration.as_millis()).unwrap_or(i64::MAX);
        Self(self.0.saturating_add(millis))
    }

    pub fn saturating_sub(self, duration: std::time::Duration) -> Self {
        let millis = i64::try_from(duration.as_millis()).unwrap_or(i64::MAX);
        Self(self.0.saturating_sub(millis))
    }

    /// The time from `self` until `later`, zero when `later` is not later.
    pub fn until(self, later: UnixMillis) -> std::time::Duration {
        std::time::Duration::from_millis(u64::try_from(later.0.saturating_sub(self.0)).unwrap_or(0))
    }

    /// A caller's timestamp (seconds and nanoseconds since the epoch, as in
    /// `google.protobuf.Timestamp`), or `None` when it lies outside what milliseconds in an
    /// `i64` represent or the nanoseconds are not within a second.
    pub fn from_unix_parts(seconds: i64, nanos: i32) -> Option<Self> {
        if !(0..1_000_000_000).contains(&nanos) {
            return None;
        }
        seconds
            .checked_mul(1000)?
            .checked_add(i64::from(nanos) / 1_000_000)
            .map(Self)
    }
}

/// `now + by` for monotonic instants, never panicking: an instant too far to represent is
/// replaced by one a day from now (every pause and cool-down here is bounded by a day anyway).
pub fn instant_after(now: std::time::Instant, by: std::time::Duration) -> std::time::Instant {
    const DAY: std::time::Duration = std::time::Duration::from_secs(86_400);
    now.checked_add(by)
        .or_else(|| now.checked_add(DAY))
        .unwrap_or(now)
}

impl From<SystemTime> for UnixMillis {
    fn from(time: SystemTime) -> Self {
        match time.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(since) => Self(i64::try_from(since.as_millis()).unwrap_or(i64::MAX)),
            Err(before) => Self(-i64::try_from(before.duration().as_millis()).unwrap_or(i64::MAX)),
        }
    }
}

/// A job's identifier: a UUIDv7, so ids sort by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct JobId(Uuid);

impl JobId {
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl FromStr for JobId {
    type Err = uuid::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(Self)
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// Where a job is in its life cycle. Stored as the text of [`JobState::as_str`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobState {
    Queued,
    Running,
    RetryWait,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::RetryWait => "retry_wait",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Queued, or waiting for a retry: the dispatcher's to claim.
    pub fn is_waiting(self) -> bool {
        matches!(self, JobState::Queued | JobState::RetryWait)
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

impl FromStr for JobState {
    type Err = UnknownValue;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "queued" => JobState::Queued,
            "running" => JobState::Running,
            "retry_wait" => JobState::RetryWait,
            "succeeded" => JobState::Succeeded,
            "failed" => JobState::Failed,
            "cancelled" => JobState::Cancelled,
            other => return Err(UnknownValue(other.to_string())),
        })
    }
}

/// Why a job failed. Stored as the text of [`FailureReason::as_str`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureReason {
    /// Upstream answered 400.
    InvalidRequest,
    /// Upstream answered 403.
    Forbidden,
    /// Every allowed attempt failed in a retryable way.
    RetriesExhausted,
    /// The job outlived its time to live.
    Expired,
    /// A later attempt was refused after an earlier one may have consumed the code.
    OutcomeUnknown,
    /// A 2xx without a usable token, or an undocumented status.
    UpstreamProtocol,
}

impl FailureReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::InvalidRequest => "invalid_request",
            FailureReason::Forbidden => "forbidden",
            FailureReason::RetriesExhausted => "retries_exhausted",
            FailureReason::Expired => "expired",
            FailureReason::OutcomeUnknown => "outcome_unknown",
            FailureReason::UpstreamProtocol => "upstream_protocol",
        }
    }
}

impl FromStr for FailureReason {
    type Err = UnknownValue;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "invalid_request" => FailureReason::InvalidRequest,
            "forbidden" => FailureReason::Forbidden,
            "retries_exhausted" => FailureReason::RetriesExhausted,
            "expired" => FailureReason::Expired,
            "outcome_unknown" => FailureReason::OutcomeUnknown,
            "upstream_protocol" => FailureReason::UpstreamProtocol,
            other => return Err(UnknownValue(other.to_string())),
        })
    }
}

/// A stored enum value this build does not know (a newer schema, or a hand-edited row).
#[derive(Debug, thiserror::Error)]
#[error("unknown stored value {0:?}")]
pub struct UnknownValue(pub String);

/// A token as upstream issued it, its lifetime relative to when the answer arrived (the
/// worker hands it to the store, which records its absolute expiry as a [`Token`]). Equality
/// compares the token in constant time.
#[derive(Debug, Clone)]
pub struct TokenGrant {
    pub access_token: SecretString,
    pub token_type: String,
    /// Lifetime in seconds, relative to when the answer arrived.
    pub expires_in: i64,
}

impl PartialEq for TokenGrant {
    fn eq(&self, other: &Self) -> bool {
        crate::domain::secret::constant_time_eq(&self.access_token, &other.access_token)
            && self.token_type == other.token_type
            && self.expires_in == other.expires_in
    }
}

impl Eq for TokenGrant {}

/// An access token as stored, with its absolute expiry. Equality compares the token in
/// constant time.
#[derive(Debug, Clone)]
pub struct Token {
    pub access_token: SecretString,
    pub token_type: String,
    /// Lifetime in seconds, as upstream sent it.
    pub expires_in: i64,
    /// When the answer arrived plus `expires_in`: `expires_in` alone is meaningless later.
    pub expires_at: UnixMillis,
}

impl PartialEq for Token {
    fn eq(&self, other: &Self) -> bool {
        crate::domain::secret::constant_time_eq(&self.access_token, &other.access_token)
            && self.token_type == other.token_type
            && self.expires_in == other.expires_in
            && self.expires_at == other.expires_at
    }
}

impl Eq for Token {}

/// A job as stored, without its request secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub id: JobId,
    pub tenant: String,
    pub client_id: String,
    pub state: JobState,
    /// Upstream attempts started so far.
    pub attempts: u32,
    pub created_at: UnixMillis,
    pub updated_at: UnixMillis,
    /// When the next attempt is due (queued and retry_wait only).
    pub next_attempt_at: Option<UnixMillis>,
    /// When the job fails `Expired` if it has not succeeded.
    pub expires_at: UnixMillis,
    pub token: Option<Token>,
    pub failure_reason: Option<FailureReason>,
    pub last_http_status: Option<u16>,
    /// Our own short explanation of the last failure or retry; never an upstream body.
    pub failure_detail: Option<String>,
    /// The app's OAuth `state`, kept for correlation.
    pub state_param: String,
    pub idempotency_key: String,
    /// Set once an attempt may have reached upstream without its answer being seen.
    pub outcome_unknown: bool,
    /// Incremented by every committed change, so watchers can drop stale or repeated snapshots.
    pub version: i64,
    /// HMAC-SHA256 of the code under the daemon's fingerprint key (see [`crate::audit::fingerprint`]).
    pub code_fingerprint: Option<String>,
}
