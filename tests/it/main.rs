//! Integration tests: the real gRPC server on port 0, a real SQLite file in a temporary
//! directory, and the fake Truecaller upstream over HTTP. One binary, one module per area.

mod audit;
mod backends;
mod bounds;
mod checkpoints;
mod console;
mod console_browser;
mod crash;
mod durability;
mod exchange;
mod fake;
mod faults;
mod helpers;
mod hostile;
mod operations;
mod postgres;
mod replicas;
mod resilience;
mod security;
mod supervision;
mod tenants;
mod tls;
mod upgrade;
mod validation;
mod watching;
