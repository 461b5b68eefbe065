//! The operations HTTP listener (`server.metrics_listen`): `/metrics` in the Prometheus text
//! format; `/healthz` answers while the process runs; `/readyz` answers 200 only once migrations
//! ran and the worker is up, and 503 again while draining, or while the database does not
//! answer (a PostgreSQL server restarting or failing over: readiness comes back by itself).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use tokio_util::sync::CancellationToken;

use crate::{
    domain::job::UnixMillis,
    exchange::breaker::BreakerState,
    exchange::worker::Worker,
    ops::metrics::Metrics,
    server::connections::{Guarded, serve_http1},
    store::Store,
};

/// Whether the daemon should receive traffic.
#[derive(Debug, Default, Clone)]
pub struct Readiness(Arc<AtomicBool>);

/// How long `/readyz` waits for the database to answer.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }

    pub fn get(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// What the endpoints report on.
#[derive(Debug, Clone)]
pub struct OpsState {
    pub readiness: Readiness,
    pub metrics: Arc<Metrics>,
    pub store: Store,
    pub worker: Arc<Worker>,
}

impl OpsState {
    /// Sets the gauges that describe current state, then renders every series.
    async fn render_metrics(&self) -> String {
        let now = UnixMillis::now();
        match self.store.pending_count().await {
            Ok(pending) => {
                self.metrics
                    .queue_depth
                    .set(i64::try_from(pending).unwrap_or(i64::MAX));
            }
            Err(error) => tracing::warn!(%error, "cannot read the queue depth"),
        }
        match self.store.oldest_pending().await {
            Ok(oldest) => {
                let age = oldest.map_or(0.0, |created| created.until(now).as_secs_f64());
                self.metrics.oldest_job_age.set(age);
            }
            Err(error) => tracing::warn!(%error, "cannot read the oldest job"),
        }
        let rates = self.worker.rate_report();
        for (client_id, rate) in rates.configured {
            if rate.is_finite() {
                self.metrics
                    .effective_rate
                    .get_or_create(&crate::ops::metrics::ClientLabels { client_id })
                    .set(rate);
            }
        }
        self.metrics
            .other_clients_lowered
            .set(i64::try_from(rates.others_lowered).unwrap_or(i64::MAX));
        self.metrics
            .other_clients_lowest_rate
            .set(rates.others_lowest.unwrap_or(0.0));
        self.metrics
            .breaker_open
            .set(match self.worker.breaker_state() {
                BreakerState::Closed => 0,
                BreakerState::HalfOpen => 1,
                BreakerState::Open => 2,
            });
        self.metrics.encode()
    }
}

/// How long the ops listener waits for a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves the endpoints on the connections `accept` admits ([`crate::server::connections::accept`])
/// until `stop` is cancelled.
pub async fn serve(
    accepted: tokio::sync::mpsc::Receiver<std::io::Result<Guarded>>,
    state: OpsState,
    stop: CancellationToken,
) {
    let service = service_fn(move |request| {
        let state = state.clone();
        async move { Ok::<_, std::convert::Infallible>(answer(&request, &state).await) }
    });
    serve_http1(accepted, service, HEADER_READ_TIMEOUT, stop).await;
}

async fn answer(request: &Request<Incoming>, state: &OpsState) -> Response<Full<Bytes>> {
    let (status, body) = match request.uri().path() {
        "/metrics" => {
            let mut response = Response::new(Full::new(Bytes::from(state.render_metrics().await)));
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            return response;
        }
        "/healthz" => (StatusCode::OK, "ok\n"),
        "/readyz" if !state.readiness.get() => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        "/readyz" => match tokio::time::timeout(PING_TIMEOUT, state.store.ping()).await {
            Ok(Ok(())) => (StatusCode::OK, "ready\n"),
            Ok(Err(error)) => {
                tracing::warn!(%error, "not ready: the database does not answer");
                (StatusCode::SERVICE_UNAVAILABLE, "database unreachable\n")
            }
            Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "database unreachable\n"),
        },
        _ => (StatusCode::NOT_FOUND, "not found\n"),
    };
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
}
