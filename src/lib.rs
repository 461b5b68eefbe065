//! token-broker: a daemon that exchanges Truecaller OAuth authorization codes for access tokens
//! on behalf of backend services, durably and within upstream's limits.
//!
//! A tour, in the order a request travels (ARCHITECTURE.md has the full map and invariants):
//!
//! - [`server`]: the single entry point, [`server::run`], used by `main` and the tests alike.
//! - [`api`]: the gRPC service; the only module that sees protobuf types, and the one place
//!   where errors become status codes.
//! - [`tenants`]: who is calling (API keys) and what they may do.
//! - [`request`]: turns a submission into a checked [`request::ExchangeRequest`].
//! - [`store`]: the SQLite queue and its audit trail; the only module that runs SQL.
//! - [`feed`]: publishes committed job changes to waiting callers.
//! - [`audit`]: audit records, their hash chain and its verifier; [`fingerprint`]: code HMACs.
//! - [`worker`]: claims due jobs within the rate limits and runs attempts; [`schedule`]: which
//!   clients it looks at next.
//! - [`limits`]: global and per-client rate limiters, adapting to 429s.
//! - [`breaker`]: the circuit breaker that pauses attempts while upstream fails.
//! - [`upstream`]: the HTTP call to Truecaller's token endpoint.
//! - [`retry`]: the pure retry decision: classification and delays.
//! - [`job`], [`secret`]: domain types; [`crypto`]: secrets encrypted at rest;
//!   [`private_files`]: the daemon's files and directories, private to its user.
//! - [`config`]: layered configuration, checked as a whole.
//! - [`fake_upstream`]: a fake Truecaller for development and tests.
//! - [`connections`]: connection caps and timeouts for both listeners.
//! - [`ops_http`]: `/metrics`, `/healthz` and `/readyz`; [`metrics`]: the Prometheus series.
//! - [`inspect`]: the auditors' command line (`jobs`, `audit`), reading the database read-only.
//! - [`bench`]: the load generator (`token-broker bench`).
//! - [`supervisor`]: watches the long-lived tasks; a failed one makes the daemon unready and
//!   exit non-zero.
//! - [`cli`], [`telemetry`]: the command line and logging set-up.

#![forbid(unsafe_code)]

pub mod api;
pub mod audit;
pub mod bench;
pub mod breaker;
pub mod cli;
pub mod config;
pub mod connections;
pub mod crypto;
pub mod fake_upstream;
pub mod feed;
pub mod fingerprint;
pub mod inspect;
pub mod job;
pub mod limits;
pub mod metrics;
pub mod ops_http;
pub mod private_files;
pub mod request;
pub mod retry;
pub mod schedule;
pub mod secret;
pub mod server;
pub mod store;
pub mod supervisor;
pub mod telemetry;
pub mod tenants;
pub mod upstream;
pub mod worker;

pub use server::{Listeners, run, run_with_reload};
