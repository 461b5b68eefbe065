//! token-broker: a daemon that exchanges Truecaller OAuth authorization codes for access tokens
//! on behalf of backend services, durably and within upstream's limits.
//!
//! A tour, folder by folder, in the order a request travels (ARCHITECTURE.md has the full map
//! and invariants). Dependencies point one way: `api` → `exchange` / `store` / `audit` /
//! `security` → `domain`.
//!
//! - [`server`]: the single entry point, [`server::run`], used by `main` and the tests alike;
//!   the supervisor of the long-lived tasks and the connection bounds of both listeners.
//! - [`api`]: the gRPC services; the only place (with the tools) that sees protobuf types, and
//!   the one place where errors become status codes.
//! - [`security`]: who is calling (tenants, API keys), secrets sealed at rest, private files.
//! - [`domain`]: the job, the checked exchange request, secrets in memory.
//! - [`store`]: the SQLite queue and its audit trail, the only code that runs SQL; the feed of
//!   committed changes.
//! - [`audit`]: audit records, their hash chain and its verifier; code fingerprints.
//! - [`exchange`]: the breaker, the schedule of clients, the rate limits, the worker that claims
//!   and runs attempts, the upstream client and the pure retry decision.
//! - [`ops`]: `/metrics`, `/healthz` and `/readyz`, the Prometheus series, logging.
//! - [`config`], [`cli`]: layered configuration checked as a whole; the command line.
//! - [`tools`]: the fake upstream, the load generator and the auditors' command line.
//! - [`console`]: the auditors' web console (read-only HTML over the same store).

#![forbid(unsafe_code)]

pub mod api;
pub mod audit;
pub mod cli;
pub mod config;
pub mod console;
pub mod domain;
pub mod exchange;
pub mod ops;
pub mod security;
pub mod server;
pub mod store;
pub mod tools;

pub use server::{Listeners, run, run_with_reload};
