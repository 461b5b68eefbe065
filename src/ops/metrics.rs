//! Prometheus metrics (prometheus-client, which owns the exposition format). One `Metrics` per
//! daemon, shared by the API, the worker and the store; gauges that describe state rather than
//! events (queue depth, oldest job, effective rates, breaker state) are set when scraped.

use std::{sync::Arc, time::Duration};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::domain::job::{FailureReason, JobState};

/// The labels of `jobs_finished`: a terminal state and, for failures, the reason (a fixed set,
/// never free text).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FinishedLabels {
    state: &'static str,
    reason: &'static str,
}

/// The labels of `upstream_requests`: the status family and the status.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    class: &'static str,
    status: StatusLabel,
}

/// An HTTP status, or `none` when there was no answer.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub struct StatusLabel(Option<u16>);

impl EncodeLabelValue for StatusLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        match self.0 {
            Some(status) => EncodeLabelValue::encode(&status, encoder),
            None => EncodeLabelValue::encode(&"none", encoder),
        }
    }
}

/// The label of per-client series: configured client ids only (see `limits::rate_report`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClientLabels {
    pub client_id: String,
}

/// The labels of `connection_events`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    listener: &'static str,
    event: &'static str,
}

/// The labels of `replica_info`: this process's lease owner (as the database's `lease_owner`
/// column names it) and where its queue lives.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplicaLabels {
    pub replica: String,
    pub storage: &'static str,
}

fn latency_buckets() -> Histogram {
    // 1 ms to about 33 s.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.001, 2.0, 16,
    ))
}

fn commit_buckets() -> Histogram {
    // 50 µs to about 1.6 s.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.000_05, 2.0, 16,
    ))
}

/// Every series the daemon exports, under the `token_broker_` prefix.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub jobs_submitted: Counter,
    pub started_at_submission: Counter,
    pub jobs_finished: Family<FinishedLabels, Counter>,
    pub upstream_requests: Family<UpstreamLabels, Counter>,
    pub upstream_latency: Histogram,
    pub limiter_wait: Histogram,
    pub retries: Counter,
    pub outcome_unknown: Counter,
    pub sqlite_commit: Histogram,
    pub sqlite_batch: Histogram,
    pub queue_depth: Gauge,
    pub oldest_job_age: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub effective_rate: Family<ClientLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Client ids without their own `[[limits.client]]` whose rate 429s lowered.
    pub other_clients_lowered: Gauge,
    /// The lowest effective rate among them (0 when none is lowered).
    pub other_clients_lowest_rate: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub breaker_open: Gauge,
    /// Connections refused or closed by the listeners' bounds, by listener and event.
    pub connections: Family<ConnectionLabels, Counter>,
    /// Always 1, labelled with this replica's identity.
    pub replica_info: Family<ReplicaLabels, Gauge>,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("token_broker");
        let metrics = Metrics {
            jobs_submitted: Counter::default(),
            started_at_submission: Counter::default(),
            jobs_finished: Family::default(),
            upstream_requests: Family::default(),
            upstream_latency: latency_buckets(),
            limiter_wait: latency_buckets(),
            retries: Counter::default(),
            outcome_unknown: Counter::default(),
            sqlite_commit: commit_buckets(),
            sqlite_batch: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(1.0, 2.0, 10),
            ),
            queue_depth: Gauge::default(),
            oldest_job_age: Gauge::default(),
            effective_rate: Family::default(),
            other_clients_lowered: Gauge::default(),
            other_clients_lowest_rate: Gauge::default(),
            connections: Family::default(),
            breaker_open: Gauge::default(),
            replica_info: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "jobs_submitted",
            "Jobs accepted and committed",
            metrics.jobs_submitted.clone(),
        );
        registry.register(
            "jobs_started_at_submission",
            "Jobs whose first attempt started in their submission's commit (nothing waiting, \
             permits free), without going through the queue",
            metrics.started_at_submission.clone(),
        );
        registry.register(
            "jobs_finished",
            "Jobs that reached a terminal state, by state and failure reason",
            metrics.jobs_finished.clone(),
        );
        registry.register(
            "upstream_requests",
            "Upstream token requests, by status class (2xx, 4xx, 5xx, lost, not_sent) and status",
            metrics.upstream_requests.clone(),
        );
        registry.register(
            "upstream_latency_seconds",
            "Time from sending a token request to its answer (or failure)",
            metrics.upstream_latency.clone(),
        );
        registry.register(
            "limiter_wait_seconds",
            "Time from a job falling due to its attempt starting (worker and rate-limit waits)",
            metrics.limiter_wait.clone(),
        );
        registry.register(
            "retries",
            "Retries scheduled after a retryable failure",
            metrics.retries.clone(),
        );
        registry.register(
            "outcome_unknown",
            "Attempts whose answer was never seen (the code may have been spent)",
            metrics.outcome_unknown.clone(),
        );
        registry.register(
            "sqlite_commit_seconds",
            "Time to commit one write transaction",
            metrics.sqlite_commit.clone(),
        );
        registry.register(
            "sqlite_batch_changes",
            "Changes committed per write transaction (group commit)",
            metrics.sqlite_batch.clone(),
        );
        registry.register(
            "queue_depth",
            "Jobs not yet terminal (queued, running or waiting for a retry)",
            metrics.queue_depth.clone(),
        );
        registry.register(
            "oldest_job_age_seconds",
            "Age of the oldest job waiting to be attempted",
            metrics.oldest_job_age.clone(),
        );
        registry.register(
            "client_effective_rate",
            "Requests per second currently allowed for each client id configured in \
             [[limits.client]] (after 429 adaptation)",
            metrics.effective_rate.clone(),
        );
        registry.register(
            "other_clients_rate_lowered",
            "Client ids without their own [[limits.client]] entry whose rate 429s lowered",
            metrics.other_clients_lowered.clone(),
        );
        registry.register(
            "other_clients_lowest_effective_rate",
            "The lowest effective rate among those client ids (0 when none is lowered)",
            metrics.other_clients_lowest_rate.clone(),
        );
        registry.register(
            "breaker_open",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open",
            metrics.breaker_open.clone(),
        );
        registry.register(
            "connection_events",
            "Connections refused over a listener's cap (refused_over_cap), closed for sending \
             nothing in time (closed_handshake_timeout, closed_idle), and failed accepts \
             (accept_error), by listener (grpc, ops)",
            metrics.connections.clone(),
        );
        registry.register(
            "replica_info",
            "Always 1: this replica's lease owner id (the jobs table's lease_owner) and its \
             storage (sqlite, postgres), to tell replicas sharing one queue apart",
            metrics.replica_info.clone(),
        );
        Arc::new(Metrics {
            registry,
            ..metrics
        })
    }

    /// The exposition text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }

    pub fn job_finished(&self, state: JobState, reason: Option<FailureReason>) {
        self.jobs_finished
            .get_or_create(&FinishedLabels {
                state: state.as_str(),
                reason: reason.map_or("", FailureReason::as_str),
            })
            .inc();
    }

    pub fn connection_event(&self, listener: &'static str, event: &'static str) {
        self.connections
            .get_or_create(&ConnectionLabels { listener, event })
            .inc();
    }

    pub fn upstream_request(&self, class: &'static str, status: Option<u16>, took: Duration) {
        self.upstream_requests
            .get_or_create(&UpstreamLabels {
                class,
                status: StatusLabel(status),
            })
            .inc();
        self.upstream_latency.observe(took.as_secs_f64());
    }
}
