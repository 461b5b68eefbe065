//! Domain values to protobuf messages.

use super::proto;
use crate::{
    domain::job::{FailureReason, Job, JobState, UnixMillis},
    domain::secret::ExposeSecret,
};

pub fn timestamp(at: UnixMillis) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.0.div_euclid(1000),
        nanos: i32::try_from(at.0.rem_euclid(1000) * 1_000_000).expect("below one second"),
    }
}

pub fn state(state: JobState) -> proto::JobState {
    match state {
        JobState::Queued => proto::JobState::Queued,
        JobState::Running => proto::JobState::Running,
        JobState::RetryWait => proto::JobState::RetryWait,
        JobState::Succeeded => proto::JobState::Succeeded,
        JobState::Failed => proto::JobState::Failed,
        JobState::Cancelled => proto::JobState::Cancelled,
    }
}

pub fn failure_reason(reason: FailureReason) -> proto::FailureReason {
    match reason {
        FailureReason::InvalidRequest => proto::FailureReason::InvalidRequest,
        FailureReason::Forbidden => proto::FailureReason::Forbidden,
        FailureReason::RetriesExhausted => proto::FailureReason::RetriesExhausted,
        FailureReason::Expired => proto::FailureReason::Expired,
        FailureReason::OutcomeUnknown => proto::FailureReason::OutcomeUnknown,
        FailureReason::UpstreamProtocol => proto::FailureReason::UpstreamProtocol,
    }
}

/// The job as a caller sees it, token included when it succeeded.
pub fn job(job: &Job) -> proto::Job {
    proto::Job {
        job_id: job.id.to_string(),
        client_id: job.client_id.clone(),
        state: state(job.state).into(),
        attempts: job.attempts,
        created_at: Some(timestamp(job.created_at)),
        updated_at: Some(timestamp(job.updated_at)),
        next_attempt_at: job.next_attempt_at.map(timestamp),
        token: job.token.as_ref().map(|token| proto::Token {
            access_token: token.access_token.expose_secret().to_string(),
            token_type: token.token_type.clone(),
            expires_in: token.expires_in,
            expires_at: Some(timestamp(token.expires_at)),
        }),
        failure_reason: job
            .failure_reason
            .map_or(proto::FailureReason::Unspecified, failure_reason)
            .into(),
        last_http_status: job.last_http_status.map_or(0, u32::from),
        failure_detail: job.failure_detail.clone().unwrap_or_default(),
        state_param: job.state_param.clone(),
        idempotency_key: job.idempotency_key.clone(),
        tenant: job.tenant.clone(),
        expires_at: Some(timestamp(job.expires_at)),
        outcome_unknown: job.outcome_unknown,
        code_fingerprint: job.code_fingerprint.clone().unwrap_or_default(),
    }
}

/// The job for audit listings: never the token.
pub fn job_without_token(job: &Job) -> proto::Job {
    proto::Job {
        token: None,
        ..self::job(job)
    }
}
