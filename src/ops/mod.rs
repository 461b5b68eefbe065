//! What operators see: the HTTP endpoints ([`http`]: `/metrics`, `/healthz`, `/readyz`), the
//! Prometheus series ([`metrics`]) and the logging set-up ([`telemetry`]).

pub mod http;
pub mod metrics;
pub mod telemetry;
