//! The command line.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::telemetry::LogFormat;

#[derive(Debug, Parser)]
#[command(
    name = "token-broker",
    version,
    about = "Durable Truecaller token exchanges over gRPC"
)]
pub struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "pretty",
        env = "TOKEN_BROKER_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Serve {
        /// TOML configuration file; without one, the embedded defaults apply (then any
        /// TOKEN_BROKER_* environment variables).
        #[arg(long, env = "TOKEN_BROKER_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Configuration tools.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Run a fake Truecaller token endpoint for development and tests.
    FakeUpstream(FakeUpstreamArgs),
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Check a configuration file (with the environment applied) without starting.
    Check { file: PathBuf },
    /// Print the effective configuration as TOML.
    Show {
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct FakeUpstreamArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Probability of answering 429 (with Retry-After).
    #[arg(long, default_value_t = 0.0)]
    pub rate_429: f64,
    /// Probability of answering 500.
    #[arg(long, default_value_t = 0.0)]
    pub rate_500: f64,
    /// Probability of answering 503 (with Retry-After).
    #[arg(long, default_value_t = 0.0)]
    pub rate_503: f64,
    /// Probability of closing the connection without an answer.
    #[arg(long, default_value_t = 0.0)]
    pub drop_rate: f64,
    /// Delay before every token answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Retry-After seconds on injected 429 and 503 answers.
    #[arg(long, default_value_t = 1)]
    pub retry_after_secs: u64,
    /// Answer 429 beyond this many token requests per second (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub rate_limit_rps: u32,
    /// How long issued codes stay valid, in seconds.
    #[arg(long, default_value_t = 600)]
    pub code_ttl_secs: u64,
}
