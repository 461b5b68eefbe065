//! The `AuditLog` service: listings, chain verification, code fingerprints.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use tonic::{Request, Response, Status};

use super::{ApiError, convert, proto};
use std::sync::Arc;

use crate::{
    audit::AuditRecord,
    audit::checkpoint::{Checkpoint, PublicKey, SigningKey, Trust},
    audit::fingerprint::Fingerprinter,
    config::Role,
    domain::job::{JobState, UnixMillis},
    domain::request::{FieldViolation, InvalidRequest, MAX_CODE_LEN},
    security::tenants::TenantRegistry,
    store::{EventQuery, JobQuery, Store},
};

/// Page size when the caller gives none, and the most a page may hold.
const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1_000;

#[derive(Debug, Clone)]
pub struct AuditLogApi {
    store: Store,
    fingerprinter: Fingerprinter,
    /// Only tenants with the audit role may call.
    tenants: Arc<TenantRegistry>,
    /// Signs checkpoints on request, when the daemon has a signing key.
    signing_key: Option<Arc<SigningKey>>,
}

impl AuditLogApi {
    pub fn new(
        store: Store,
        fingerprinter: Fingerprinter,
        tenants: Arc<TenantRegistry>,
        signing_key: Option<Arc<SigningKey>>,
    ) -> Self {
        Self {
            store,
            fingerprinter,
            tenants,
            signing_key,
        }
    }

    /// Refuses callers without the audit role.
    fn authorize(&self, metadata: &tonic::metadata::MetadataMap) -> Result<(), ApiError> {
        self.tenants
            .authenticate(super::authorization(metadata))?
            .require(Role::Audit)?;
        Ok(())
    }
}

fn invalid(field: &'static str, description: &str) -> ApiError {
    ApiError::Invalid(InvalidRequest(vec![FieldViolation {
        field,
        description: description.to_string(),
    }]))
}

/// Page tokens name the listing and the last key, so a token from one listing is refused by
/// the other.
fn encode_token(kind: &str, key: i64) -> String {
    URL_SAFE_NO_PAD.encode(format!("v1:{kind}:{key}"))
}

fn decode_token(kind: &str, token: &str) -> Result<Option<i64>, ApiError> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || invalid("page_token", "is not a page token from this listing");
    let text =
        String::from_utf8(URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?).map_err(|_| bad())?;
    let key = text
        .strip_prefix("v1:")
        .and_then(|rest| rest.strip_prefix(kind))
        .and_then(|rest| rest.strip_prefix(':'))
        .and_then(|key| key.parse().ok())
        .ok_or_else(bad)?;
    Ok(Some(key))
}

fn page_size(requested: u32) -> u32 {
    match requested {
        0 => DEFAULT_PAGE,
        n => n.min(MAX_PAGE),
    }
}

/// A time filter from the caller; one outside the representable range (about ±292 million
/// years, or nanoseconds outside a second) is refused rather than wrapped.
fn time(
    field: &'static str,
    value: Option<prost_types::Timestamp>,
) -> Result<Option<UnixMillis>, ApiError> {
    value
        .map(|t| {
            UnixMillis::from_unix_parts(t.seconds, t.nanos)
                .ok_or_else(|| invalid(field, "is outside the representable time range"))
        })
        .transpose()
}

fn non_empty(value: String) -> Option<String> {
    (!value.is_empty()).then_some(value)
}

fn state(value: i32) -> Result<Option<JobState>, ApiError> {
    let state = proto::JobState::try_from(value)
        .map_err(|_| invalid("state", "is not a JobState value"))?;
    Ok(match state {
        proto::JobState::Unspecified => None,
        proto::JobState::Queued => Some(JobState::Queued),
        proto::JobState::Running => Some(JobState::Running),
        proto::JobState::RetryWait => Some(JobState::RetryWait),
        proto::JobState::Succeeded => Some(JobState::Succeeded),
        proto::JobState::Failed => Some(JobState::Failed),
        proto::JobState::Cancelled => Some(JobState::Cancelled),
    })
}

pub fn signed_checkpoint(checkpoint: &Checkpoint) -> proto::SignedCheckpoint {
    proto::SignedCheckpoint {
        seq: u64::try_from(checkpoint.seq).unwrap_or_default(),
        hash: checkpoint.hash.clone(),
        at: Some(convert::timestamp(UnixMillis(checkpoint.at))),
        prev_signature: checkpoint.prev_signature.clone().unwrap_or_default(),
        key_id: checkpoint.key_id.clone(),
        signature: checkpoint.signature.clone(),
    }
}

/// The keys and outside checkpoints of a verification request.
fn trust(request: proto::VerifyAuditLogRequest) -> Result<Trust, ApiError> {
    let keys = request
        .public_keys
        .iter()
        .map(|text| {
            PublicKey::parse(text)
                .ok_or_else(|| invalid("public_keys", "must each be ed25519:<64 hex digits>"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if keys.is_empty() && !request.checkpoints.is_empty() {
        return Err(invalid(
            "public_keys",
            "must be given with checkpoints: an unsigned checkpoint proves nothing",
        ));
    }
    let checkpoints = request
        .checkpoints
        .into_iter()
        .map(|given| {
            let at = time("checkpoints.at", given.at)?
                .ok_or_else(|| invalid("checkpoints.at", "is required"))?;
            Ok(Checkpoint {
                seq: i64::try_from(given.seq)
                    .map_err(|_| invalid("checkpoints.seq", "is out of range"))?,
                hash: given.hash,
                at: at.0,
                prev_signature: non_empty(given.prev_signature),
                key_id: given.key_id,
                signature: given.signature,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(Trust { keys, checkpoints })
}

pub fn event(record: &AuditRecord) -> proto::AuditEvent {
    proto::AuditEvent {
        seq: u64::try_from(record.seq).unwrap_or_default(),
        at: Some(convert::timestamp(record.at())),
        job_id: record.job_id.clone(),
        tenant: record.tenant.clone(),
        client_id: record.client_id.clone(),
        kind: record.kind.to_string(),
        attempt: record.attempt.unwrap_or_default(),
        http_status: record.http_status.map_or(0, u32::from),
        detail: record.detail.clone().unwrap_or_default(),
        code_fingerprint: record.code_fingerprint.clone().unwrap_or_default(),
        prev_hash: record.prev_hash.clone(),
        hash: record.hash.clone(),
    }
}

#[tonic::async_trait]
impl proto::audit_log_server::AuditLog for AuditLogApi {
    async fn list_jobs(
        &self,
        request: Request<proto::ListJobsRequest>,
    ) -> Result<Response<proto::ListJobsResponse>, Status> {
        self.authorize(request.metadata())?;
        let request = request.into_inner();
        let query = JobQuery {
            state: state(request.state)?,
            client_id: non_empty(request.client_id),
            tenant: non_empty(request.tenant),
            code_fingerprint: non_empty(request.code_fingerprint),
            created_after: time("created_after", request.created_after)?,
            created_before: time("created_before", request.created_before)?,
            after: decode_token("jobs", &request.page_token)?,
            limit: page_size(request.page_size),
            ..JobQuery::default()
        };
        let page = self.store.list_jobs(&query).await.map_err(ApiError::from)?;
        Ok(Response::new(proto::ListJobsResponse {
            jobs: page
                .items
                .iter()
                .map(|(_, job)| convert::job_without_token(job))
                .collect(),
            next_page_token: page
                .next
                .map(|key| encode_token("jobs", key))
                .unwrap_or_default(),
        }))
    }

    async fn list_audit_events(
        &self,
        request: Request<proto::ListAuditEventsRequest>,
    ) -> Result<Response<proto::ListAuditEventsResponse>, Status> {
        self.authorize(request.metadata())?;
        let request = request.into_inner();
        let after_seq = match decode_token("events", &request.page_token)? {
            Some(seq) => Some(seq),
            None if request.after_seq > 0 => Some(
                i64::try_from(request.after_seq)
                    .map_err(|_| invalid("after_seq", "is out of range"))?,
            ),
            None => None,
        };
        let query = EventQuery {
            job_id: non_empty(request.job_id),
            client_id: non_empty(request.client_id),
            after: time("after", request.after)?,
            before: time("before", request.before)?,
            after_seq,
            limit: page_size(request.page_size),
        };
        let page = self
            .store
            .list_events(&query)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(proto::ListAuditEventsResponse {
            events: page.items.iter().map(event).collect(),
            next_page_token: page
                .next
                .map(|key| encode_token("events", key))
                .unwrap_or_default(),
        }))
    }

    async fn verify_audit_log(
        &self,
        request: Request<proto::VerifyAuditLogRequest>,
    ) -> Result<Response<proto::VerifyAuditLogResponse>, Status> {
        self.authorize(request.metadata())?;
        let trust = trust(request.into_inner())?;
        let report = self
            .store
            .verify_audit_log_with(&trust)
            .await
            .map_err(ApiError::from)?;
        if !report.ok {
            tracing::error!(detail = %report.detail, "audit log verification failed");
        }
        Ok(Response::new(proto::VerifyAuditLogResponse {
            ok: report.ok,
            events_checked: report.events_checked,
            first_bad_seq: report
                .first_bad_seq
                .and_then(|seq| u64::try_from(seq).ok())
                .unwrap_or_default(),
            detail: report.detail,
            checkpoints_checked: report.checkpoints_checked,
            last_checkpoint: report.last_checkpoint.as_ref().map(signed_checkpoint),
        }))
    }

    async fn create_checkpoint(
        &self,
        request: Request<proto::CreateCheckpointRequest>,
    ) -> Result<Response<proto::CreateCheckpointResponse>, Status> {
        self.authorize(request.metadata())?;
        let key = self.signing_key.as_ref().ok_or(ApiError::NoSigningKey)?;
        let signed = self
            .store
            .sign_checkpoint(key)
            .await
            .map_err(ApiError::from)?
            .ok_or(ApiError::EmptyChain)?;
        Ok(Response::new(proto::CreateCheckpointResponse {
            checkpoint: Some(signed_checkpoint(&signed.checkpoint)),
            created: signed.created,
        }))
    }

    async fn fingerprint_code(
        &self,
        request: Request<proto::FingerprintCodeRequest>,
    ) -> Result<Response<proto::FingerprintCodeResponse>, Status> {
        self.authorize(request.metadata())?;
        let code = &request.get_ref().code;
        if code.is_empty()
            || code.len() > MAX_CODE_LEN
            || !code.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(invalid("code", "must be 1 to 2048 visible ASCII characters").into());
        }
        Ok(Response::new(proto::FingerprintCodeResponse {
            code_fingerprint: self.fingerprinter.fingerprint(code),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_are_bound_to_their_listing() {
        let token = encode_token("jobs", 42);
        assert_eq!(decode_token("jobs", &token).unwrap(), Some(42));
        assert!(decode_token("events", &token).is_err());
        assert!(decode_token("jobs", "garbage!").is_err());
        assert_eq!(decode_token("jobs", "").unwrap(), None);
    }

    #[test]
    fn time_filters_out_of_range_are_refused() {
        let at = |seconds, nanos| Some(prost_types::Timestamp { seconds, nanos });
        assert_eq!(
            time("after", at(1_700_000_000, 5_000_000)).unwrap(),
            Some(UnixMillis(1_700_000_000_005))
        );
        assert!(time("after", at(i64::MAX, 0)).is_err());
        assert!(time("after", at(i64::MIN, 0)).is_err());
        assert!(time("after", at(0, -1)).is_err());
        assert!(time("after", at(0, 1_000_000_000)).is_err());
        assert_eq!(time("after", None).unwrap(), None);
    }

    proptest::proptest! {
        /// Any string as a page token: refused or a key, never a panic; and every key survives
        /// the round trip.
        #[test]
        fn page_tokens_never_panic(token in ".{0,80}", key in proptest::num::i64::ANY) {
            let _ = decode_token("jobs", &token);
            let _ = decode_token("events", &token);
            proptest::prop_assert_eq!(
                decode_token("events", &encode_token("events", key)).unwrap(),
                Some(key)
            );
        }

        /// Any timestamp: a time or INVALID_ARGUMENT, never a wrap or a panic.
        #[test]
        fn time_filters_never_panic(
            seconds in proptest::num::i64::ANY,
            nanos in proptest::num::i32::ANY,
        ) {
            if let Ok(Some(at)) = time("after", Some(prost_types::Timestamp { seconds, nanos })) {
                proptest::prop_assert_eq!(at.0.div_euclid(1000), seconds);
            }
        }
    }

    #[test]
    fn page_sizes_default_and_cap() {
        assert_eq!(page_size(0), DEFAULT_PAGE);
        assert_eq!(page_size(10), 10);
        assert_eq!(page_size(1_000_000), MAX_PAGE);
    }
}
