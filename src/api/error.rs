//! The one place where errors become gRPC status codes. Internal causes are logged here and
//! never sent to callers.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use crate::{
    domain::job::JobState,
    domain::request::InvalidRequest,
    security::tenants::AccessError,
    store::{QueueFull, StoreError},
};

/// Everything an RPC can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("invalid request: {0}")]
    Invalid(#[from] InvalidRequest),
    #[error("no such job")]
    NotFound,
    #[error("the idempotency key was already used with different contents")]
    KeyConflict,
    #[error("{}", queue_full_message(.0))]
    QueueFull(QueueFull),
    #[error("the job is {}; only queued or waiting jobs can be cancelled", .0.as_str())]
    NotCancellable(JobState),
    #[error("too many open WatchJob streams for this tenant")]
    TooManyWatches,
    #[error("this daemon has no audit.signing_key_file: it signs no checkpoints")]
    NoSigningKey,
    #[error("the audit chain is empty: nothing to sign")]
    EmptyChain,
    #[error(transparent)]
    Access(#[from] AccessError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a caller refused by a queue bound is told: its own bound, never the whole queue's depth
/// (which would tell one tenant about the others).
fn queue_full_message(bound: &QueueFull) -> String {
    match bound {
        QueueFull::Tenant { pending, limit } => {
            format!("this tenant's queue is full ({pending} of {limit} jobs pending)")
        }
        QueueFull::Daemon => "the queue is full; retry later".to_string(),
        QueueFull::Clients => {
            "too many distinct client ids have jobs pending; retry later".to_string()
        }
    }
}

/// How long a caller refused for a full queue should wait before trying again.
const QUEUE_FULL_RETRY: Duration = Duration::from_secs(1);

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Status {
        match error {
            ApiError::Invalid(invalid) => Status::with_error_details(
                Code::InvalidArgument,
                invalid.to_string(),
                ErrorDetails::with_bad_request(
                    invalid
                        .0
                        .iter()
                        .map(|v| FieldViolation::new(v.field, v.description.clone()))
                        .collect::<Vec<_>>(),
                ),
            ),
            ApiError::NotFound => Status::not_found("no such job"),
            ApiError::KeyConflict => Status::already_exists(error.to_string()),
            ApiError::QueueFull(_) => Status::with_error_details(
                Code::ResourceExhausted,
                error.to_string(),
                ErrorDetails::with_retry_info(Some(QUEUE_FULL_RETRY)),
            ),
            ApiError::NotCancellable(_) | ApiError::NoSigningKey => {
                Status::failed_precondition(error.to_string())
            }
            ApiError::EmptyChain => Status::not_found(error.to_string()),
            ApiError::TooManyWatches => Status::with_error_details(
                Code::ResourceExhausted,
                error.to_string(),
                ErrorDetails::with_retry_info(Some(QUEUE_FULL_RETRY)),
            ),
            ApiError::Access(AccessError::Unauthenticated) => {
                Status::unauthenticated(error.to_string())
            }
            ApiError::Access(AccessError::Denied(reason)) => Status::permission_denied(reason),
            // The database's condition (unreachable, locked, full): worth retrying later.
            ApiError::Store(cause) if cause.is_transient() => {
                tracing::error!(error = %cause, "storage unavailable");
                Status::unavailable("storage is unavailable; retry later")
            }
            // A bug or damaged data: retrying cannot help, so say so.
            ApiError::Store(cause) => {
                tracing::error!(error = %cause, "internal storage error");
                Status::internal("internal error; the daemon logged the cause")
            }
        }
    }
}
