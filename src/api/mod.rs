//! The gRPC API: the only module that sees protobuf types. Requests become domain values at
//! the edge ([`crate::domain::request`]); domain errors become `tonic::Status` in one place
//! ([`error`]).

use std::{
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::{
    audit::fingerprint::Fingerprinter,
    config::Role,
    domain::job::{Job, JobId, UnixMillis},
    domain::request::{ExchangeRequest, RawExchange, parse_job_id},
    domain::secret::ExposeSecret,
    exchange::worker::Worker,
    security::tenants::{Caller, TenantRegistry},
    store::Deliveries,
    store::feed::{FeedEvent, JobFeed, JobSubscription},
    store::{CancelOutcome, NewJob, OnStarted, Store, SubmitOutcome},
};

mod audit_log;
pub mod codec;
mod convert;
mod deadline;
mod error;
pub mod grpc;

pub use audit_log::AuditLogApi;
pub use error::ApiError;

/// Generated protobuf and gRPC types for `tokenbroker.v1`.
pub mod proto {
    #![allow(clippy::all)]
    tonic::include_proto!("tokenbroker.v1");

    /// The descriptor set served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("tokenbroker_descriptor");
}

use proto::token_broker_server::TokenBroker;

/// The `TokenBroker` service.
#[derive(Debug, Clone)]
pub struct TokenBrokerApi {
    store: Store,
    /// Starts a submission's first attempt at once when nothing waits.
    worker: Arc<Worker>,
    feed: Arc<JobFeed>,
    /// Cancelled at shutdown: long waits return the job as it stands.
    stop: CancellationToken,
    /// Each job's time to live.
    job_ttl: Duration,
    /// The queue's bound.
    max_pending: u64,
    /// Distinct client ids with pending jobs, at most.
    max_pending_clients: u64,
    /// Fingerprints codes for the audit trail.
    fingerprinter: Fingerprinter,
    /// Who may call, and for which client ids.
    tenants: Arc<TenantRegistry>,
    /// Open WatchJob streams per tenant, bounded by `max_watches_per_tenant`.
    watches: Arc<parking_lot::Mutex<std::collections::HashMap<String, usize>>>,
    max_watches_per_tenant: usize,
    /// Notes tokens handed to callers, for retention.
    deliveries: Arc<Deliveries>,
}

/// What the API needs besides the store.
#[derive(Debug, Clone)]
pub struct ApiContext {
    pub worker: Arc<Worker>,
    pub feed: Arc<JobFeed>,
    pub stop: CancellationToken,
    pub job_ttl: Duration,
    pub max_pending: u64,
    pub max_pending_clients: u64,
    pub fingerprinter: Fingerprinter,
    pub tenants: Arc<TenantRegistry>,
    pub max_watches_per_tenant: usize,
    pub deliveries: Arc<Deliveries>,
}

impl TokenBrokerApi {
    pub fn new(store: Store, context: ApiContext) -> Self {
        Self {
            store,
            worker: context.worker,
            feed: context.feed,
            stop: context.stop,
            job_ttl: context.job_ttl,
            max_pending: context.max_pending,
            max_pending_clients: context.max_pending_clients,
            fingerprinter: context.fingerprinter,
            tenants: context.tenants,
            watches: Arc::default(),
            max_watches_per_tenant: context.max_watches_per_tenant,
            deliveries: context.deliveries,
        }
    }

    /// Validates and commits a submission. With `watch`, also returns a subscription to the
    /// job's changes taken before its commit, so that a caller waiting on it misses nothing and
    /// needs no re-read.
    async fn submit(
        &self,
        caller: &Caller,
        request: &proto::SubmitExchangeRequest,
        watch: bool,
    ) -> Result<(Job, Option<JobSubscription>), ApiError> {
        caller.require(Role::Submit)?;
        let request = ExchangeRequest::parse(
            RawExchange {
                client_id: &request.client_id,
                code: &request.code,
                code_verifier: &request.code_verifier,
                state: &request.state,
                idempotency_key: &request.idempotency_key,
            },
            |client_id, code| self.fingerprinter.idempotency_key(client_id, code),
        )?;
        caller.may_exchange_for(&request.client_id)?;
        let code_fingerprint = self.fingerprinter.fingerprint(request.code.expose_secret());
        let job_id = JobId::new();
        let subscription = watch.then(|| self.feed.subscribe(job_id));
        let start = self.worker.reserve_start(&request.client_id);
        let lease = start.as_ref().map(|start| start.lease().clone());
        // The writer starts the attempt right after the commit, whether or not this call is
        // still there to hear of it.
        let on_started = start.map(|reservation| {
            let worker = Arc::clone(&self.worker);
            OnStarted::new(move |claim| worker.start(claim, reservation))
        });
        let outcome = self
            .store
            .submit(
                &NewJob {
                    job_id,
                    tenant: caller.tenant(),
                    request: &request,
                    code_fingerprint: &code_fingerprint,
                    ttl: self.job_ttl,
                    max_pending: self.max_pending,
                    max_pending_tenant: caller.max_pending(),
                    max_pending_clients: self.max_pending_clients,
                    start: lease.as_ref(),
                },
                UnixMillis::now(),
                on_started,
            )
            .await?;
        match outcome {
            SubmitOutcome::Started(job) => {
                tracing::info!(job_id = %job.id, client_id = %job.client_id, "job submitted and started");
                Ok((job, subscription))
            }
            SubmitOutcome::Created(job) => {
                tracing::info!(job_id = %job.id, client_id = %job.client_id, "job submitted");
                Ok((job, subscription))
            }
            SubmitOutcome::Existing(job) => {
                tracing::info!(job_id = %job.id, client_id = %job.client_id, "idempotent resubmission");
                // The subscription was for the id this submission would have had.
                Ok((job, None))
            }
            SubmitOutcome::KeyConflict => Err(ApiError::KeyConflict),
            SubmitOutcome::QueueFull(bound) => Err(ApiError::QueueFull(bound)),
        }
    }

    async fn load(&self, id: JobId) -> Result<Job, ApiError> {
        self.store.get(id).await?.ok_or(ApiError::NotFound)
    }

    /// The job, if `caller` may see it: another tenant's job is NOT_FOUND, exactly as a job that
    /// does not exist, so its existence is not revealed.
    async fn load_for(&self, caller: &Caller, id: JobId) -> Result<Job, ApiError> {
        // Ownership is part of the lookup: another tenant's job is never read or decrypted,
        // so it also takes as long to answer as a missing one.
        self.store
            .get_owned(id, caller.tenant())
            .await?
            .ok_or(ApiError::NotFound)
    }

    /// The job as sent to its owner, noting a delivered token for retention.
    fn deliver(&self, job: &Job) -> proto::Job {
        if job.token.is_some() {
            self.deliveries.record(&job.id.to_string());
        }
        convert::job(job)
    }

    /// Authenticates the caller of a TokenBroker RPC.
    fn caller(&self, metadata: &tonic::metadata::MetadataMap) -> Result<Caller, ApiError> {
        let caller = self.tenants.authenticate(authorization(metadata))?;
        caller.require(Role::Submit)?;
        Ok(caller)
    }

    /// Waits until the job is terminal, `deadline` passes, or the daemon stops; returns the job
    /// as it then stands. `changes` is a subscription taken before `job` was committed, if any.
    async fn wait_terminal(
        &self,
        job: Job,
        changes: Option<JobSubscription>,
        deadline: Option<Instant>,
    ) -> Result<Job, ApiError> {
        if job.state.is_terminal() {
            return Ok(job);
        }
        let id = job.id;
        let (mut changes, mut current) = match changes {
            Some(changes) => (changes, job),
            None => {
                // Subscribe first, then re-read, so no change falls in between.
                let changes = self.feed.subscribe(job.id);
                (changes, self.load(job.id).await?)
            }
        };
        let deadline = deadline.map(tokio::time::Instant::from_std);
        loop {
            if current.state.is_terminal() {
                return Ok(current);
            }
            tokio::select! {
                event = changes.next() => match event {
                    FeedEvent::Changed(job) if job.version > current.version => current = *job,
                    FeedEvent::Changed(_) => {}
                    FeedEvent::Lagged => current = self.load(id).await?,
                },
                _ = sleep_until(deadline) => return Ok(current),
                _ = self.stop.cancelled() => return Ok(current),
            }
        }
    }
}

/// One open WatchJob stream of a tenant; released on drop.
struct WatchSlot {
    watches: Arc<parking_lot::Mutex<std::collections::HashMap<String, usize>>>,
    tenant: String,
}

impl WatchSlot {
    fn take(
        watches: &Arc<parking_lot::Mutex<std::collections::HashMap<String, usize>>>,
        tenant: &str,
        limit: usize,
    ) -> Result<WatchSlot, ApiError> {
        let mut open = watches.lock();
        let count = open.entry(tenant.to_string()).or_default();
        if *count >= limit {
            return Err(ApiError::TooManyWatches);
        }
        *count += 1;
        Ok(WatchSlot {
            watches: Arc::clone(watches),
            tenant: tenant.to_string(),
        })
    }
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut open = self.watches.lock();
        if let Some(count) = open.get_mut(&self.tenant) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.tenant);
            }
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

type JobStream = Pin<Box<dyn Stream<Item = Result<proto::Job, Status>> + Send>>;

#[tonic::async_trait]
impl TokenBroker for TokenBrokerApi {
    async fn submit_exchange(
        &self,
        request: Request<proto::SubmitExchangeRequest>,
    ) -> Result<Response<proto::Job>, Status> {
        let caller = self.caller(request.metadata())?;
        let (job, _) = self.submit(&caller, request.get_ref(), false).await?;
        Ok(Response::new(self.deliver(&job)))
    }

    async fn exchange(
        &self,
        request: Request<proto::SubmitExchangeRequest>,
    ) -> Result<Response<proto::Job>, Status> {
        let caller = self.caller(request.metadata())?;
        let deadline = deadline::answer_by(request.metadata(), Instant::now());
        let (job, changes) = self.submit(&caller, request.get_ref(), true).await?;
        let job = self.wait_terminal(job, changes, deadline).await?;
        Ok(Response::new(self.deliver(&job)))
    }

    async fn get_job(
        &self,
        request: Request<proto::GetJobRequest>,
    ) -> Result<Response<proto::Job>, Status> {
        let caller = self.caller(request.metadata())?;
        let id = parse_job_id(&request.get_ref().job_id).map_err(ApiError::from)?;
        let job = self.load_for(&caller, id).await?;
        Ok(Response::new(self.deliver(&job)))
    }

    type WatchJobStream = JobStream;

    async fn watch_job(
        &self,
        request: Request<proto::GetJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let caller = self.caller(request.metadata())?;
        let id = parse_job_id(&request.get_ref().job_id).map_err(ApiError::from)?;
        let mut changes = self.feed.subscribe(id);
        let mut current = self.load_for(&caller, id).await?;
        let slot = WatchSlot::take(&self.watches, caller.tenant(), self.max_watches_per_tenant)?;
        let (tx, rx) = mpsc::channel(8);
        let api = self.clone();
        tokio::spawn(async move {
            // Held until the stream ends, however it ends.
            let _slot = slot;
            if tx.send(Ok(api.deliver(&current))).await.is_err() {
                return;
            }
            while !current.state.is_terminal() {
                let next = tokio::select! {
                    event = changes.next() => match event {
                        FeedEvent::Changed(job) => *job,
                        FeedEvent::Lagged => match api.load(id).await {
                            Ok(job) => job,
                            Err(error) => {
                                let _ = tx.send(Err(error.into())).await;
                                return;
                            }
                        },
                    },
                    // The caller went away.
                    _ = tx.closed() => return,
                    _ = api.stop.cancelled() => {
                        let _ = tx.send(Err(Status::unavailable("the daemon is shutting down; watch again"))).await;
                        return;
                    }
                };
                if next.version <= current.version {
                    continue;
                }
                current = next;
                if tx.send(Ok(api.deliver(&current))).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn cancel_job(
        &self,
        request: Request<proto::GetJobRequest>,
    ) -> Result<Response<proto::Job>, Status> {
        let caller = self.caller(request.metadata())?;
        let id = parse_job_id(&request.get_ref().job_id).map_err(ApiError::from)?;
        // Ownership first: another tenant's job is NOT_FOUND and is left untouched.
        self.load_for(&caller, id).await?;
        match self
            .store
            .cancel(id, caller.tenant(), UnixMillis::now())
            .await
            .map_err(ApiError::from)?
        {
            CancelOutcome::Cancelled(job) => {
                tracing::info!(job_id = %job.id, client_id = %job.client_id, "job cancelled");
                Ok(Response::new(convert::job(&job)))
            }
            CancelOutcome::NotCancellable(job)
                if job.state == crate::domain::job::JobState::Cancelled =>
            {
                Ok(Response::new(convert::job(&job)))
            }
            CancelOutcome::NotCancellable(job) => Err(ApiError::NotCancellable(job.state).into()),
            CancelOutcome::NotFound => Err(ApiError::NotFound.into()),
        }
    }
}

/// The `authorization` header's value, when present and visible ASCII.
pub(crate) fn authorization(metadata: &tonic::metadata::MetadataMap) -> Option<&str> {
    metadata
        .get("authorization")
        .and_then(|value| value.to_str().ok())
}
