//! The command line.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{
    domain::job::{JobState, UnixMillis},
    ops::telemetry::LogFormat,
};

/// How the auditors' commands write their rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
    Jsonl,
    Csv,
}

/// Parses an RFC 3339 time given on the command line.
pub fn parse_time(value: &str) -> Result<UnixMillis, String> {
    humantime::parse_rfc3339_weak(value)
        .map(UnixMillis::from)
        .map_err(|e| format!("{value:?} is not an RFC 3339 time ({e}); e.g. 2026-11-01T00:00:00Z"))
}

/// The version and the git revision it was built from.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("BUILD_GIT_REVISION"),
    ")"
);

#[derive(Debug, Parser)]
#[command(
    name = "token-broker",
    version = VERSION,
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
    /// API keys for tenants.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Load generator: exchanges through a running daemon, or directly against the upstream.
    Bench(BenchArgs),
    /// Inspect jobs (reads the database read-only; never shows tokens).
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// Inspect and verify the audit trail (reads the database read-only).
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Serve the auditors' web console: jobs, searches, timelines, exports, the chain's state
    /// (reads the database read-only; never shows tokens).
    Console(ConsoleArgs),
}

/// `token-broker console`.
#[derive(Debug, Clone, Args)]
pub struct ConsoleArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Address to serve on. Off loopback, auditors must sign in with the API key of a tenant
    /// with the `audit` role (from --config), or the console refuses to start.
    #[arg(long, default_value = "127.0.0.1:9465")]
    pub listen: SocketAddr,
    /// The fingerprint key for code searches (default: beside the database, or
    /// audit.fingerprint_key_file).
    #[arg(long)]
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// The daemon's gRPC address; several, separated by commas (replicas sharing one queue),
    /// share the load.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub target: String,
    /// The fake upstream (codes come from its /test/authorize; --direct sends to its /v1/token).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub fake: String,
    /// Call the upstream directly, without the daemon: the baseline.
    #[arg(long)]
    pub direct: bool,
    /// Exchanges to make.
    #[arg(long, short = 'n', default_value_t = 10_000)]
    pub requests: usize,
    /// Exchanges in flight at once.
    #[arg(long, short = 'c', default_value_t = 64)]
    pub concurrency: usize,
    /// A fixed rate (exchanges per second) instead of as fast as possible.
    #[arg(long)]
    pub rate: Option<f64>,
    /// gRPC connections to spread the load over.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// The client id to exchange for.
    #[arg(long, default_value = "bench-app")]
    pub client_id: String,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Which database to read.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// The SQLite file; defaults to storage.path of the configuration.
    #[arg(long, env = "TOKEN_BROKER_DATABASE", conflicts_with = "database_url")]
    pub database: Option<PathBuf>,
    /// A PostgreSQL database (postgres://…) shared by replicas; read in read-only
    /// transactions.
    #[arg(long, env = "TOKEN_BROKER_DATABASE_URL")]
    pub database_url: Option<String>,
    /// The configuration whose storage.url, or else storage.path, to read.
    #[arg(long, env = "TOKEN_BROKER_CONFIG")]
    pub config: Option<PathBuf>,
}

/// Where and how to write rows.
#[derive(Debug, Clone, Args)]
pub struct OutputArgs {
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
    /// Write to this file instead of standard output.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
}

/// A job state on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StateArg {
    Queued,
    Running,
    RetryWait,
    Succeeded,
    Failed,
    Cancelled,
}

impl From<StateArg> for JobState {
    fn from(state: StateArg) -> Self {
        match state {
            StateArg::Queued => JobState::Queued,
            StateArg::Running => JobState::Running,
            StateArg::RetryWait => JobState::RetryWait,
            StateArg::Succeeded => JobState::Succeeded,
            StateArg::Failed => JobState::Failed,
            StateArg::Cancelled => JobState::Cancelled,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// List jobs in creation order.
    List {
        #[command(flatten)]
        database: DatabaseArgs,
        #[command(flatten)]
        output: OutputArgs,
        #[arg(long)]
        client_id: Option<String>,
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long, value_enum)]
        state: Option<StateArg>,
        /// Only jobs created at or after this RFC 3339 time.
        #[arg(long, value_parser = parse_time)]
        since: Option<UnixMillis>,
        /// Only jobs created before this RFC 3339 time.
        #[arg(long, value_parser = parse_time)]
        until: Option<UnixMillis>,
        /// Only the job(s) for this code fingerprint (see `audit fingerprint`).
        #[arg(long)]
        code_fingerprint: Option<String>,
        /// At most this many jobs.
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Show one job.
    Get {
        #[command(flatten)]
        database: DatabaseArgs,
        #[command(flatten)]
        output: OutputArgs,
        job_id: String,
    },
}

/// Filters for audit events.
#[derive(Debug, Clone, Args)]
pub struct EventFilterArgs {
    #[arg(long)]
    pub job_id: Option<String>,
    #[arg(long)]
    pub client_id: Option<String>,
    /// Only events at or after this RFC 3339 time.
    #[arg(long, value_parser = parse_time)]
    pub since: Option<UnixMillis>,
    /// Only events before this RFC 3339 time.
    #[arg(long, value_parser = parse_time)]
    pub until: Option<UnixMillis>,
    /// Only events with a greater seq.
    #[arg(long)]
    pub after_seq: Option<i64>,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// List audit events in seq order (100 unless --limit says otherwise).
    List {
        #[command(flatten)]
        database: DatabaseArgs,
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        filter: EventFilterArgs,
        #[arg(long, default_value_t = 100)]
        limit: u64,
    },
    /// Export every matching audit event, streaming (constant memory).
    Export {
        #[command(flatten)]
        database: DatabaseArgs,
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        filter: EventFilterArgs,
        /// At most this many events.
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Recompute the hash chain and check the signed checkpoints; exits 1 and names the first
    /// seq that does not match if the trail was edited, rewritten or cut.
    Verify {
        #[command(flatten)]
        database: DatabaseArgs,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// A public key file (FILE.pub of `audit keygen`): every stored checkpoint must be
        /// signed by it. Repeat for keys used over time.
        #[arg(long = "public-key", value_name = "FILE")]
        public_keys: Vec<PathBuf>,
        /// A checkpoint kept outside the database, as JSON (an `audit checkpoints --format
        /// jsonl` line, or the daemon's JSON log line); the database must still hold it and
        /// match it. Repeatable; needs --public-key.
        #[arg(long = "checkpoint", value_name = "JSON", requires = "public_keys")]
        checkpoints: Vec<String>,
        /// A file of such lines: the daemon's JSON log (other lines are skipped), or an
        /// `audit checkpoints --format jsonl` export. Repeatable; needs --public-key.
        #[arg(long = "checkpoints", value_name = "FILE", requires = "public_keys")]
        checkpoint_files: Vec<PathBuf>,
    },
    /// List the signed checkpoints, in signing order, for an external witness to keep.
    Checkpoints {
        #[command(flatten)]
        database: DatabaseArgs,
        #[command(flatten)]
        output: OutputArgs,
        /// Only checkpoints signed at or after this RFC 3339 time.
        #[arg(long, value_parser = parse_time)]
        since: Option<UnixMillis>,
    },
    /// Write a new Ed25519 checkpoint signing key to FILE (never over an existing file) and
    /// its public key to FILE.pub, and print the public key. Name FILE in
    /// audit.signing_key_file; give FILE.pub to the auditors.
    Keygen {
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Print the fingerprint of a code read from standard input, to look it up with
    /// `jobs list --code-fingerprint`.
    Fingerprint {
        #[command(flatten)]
        database: DatabaseArgs,
        /// The fingerprint key (default: beside the database, or audit.fingerprint_key_file).
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Print a fresh API key (give it to the tenant) and its SHA-256 (put it in the
    /// configuration as api_key_sha256).
    New,
    /// Add a fresh encryption key to the key file and re-encrypt every stored secret with it.
    /// Run it with the daemon stopped; older keys stay in the file until no secret uses them.
    Rotate {
        /// The configuration naming the database and the key file.
        #[arg(long, env = "TOKEN_BROKER_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Create the encryption key file and the audit fingerprint key file the configuration
    /// names (and the checkpoint signing key, when audit.signing_key_file is set), if they do
    /// not exist yet. With storage.url (several replicas), run it once and
    /// give every replica a copy of both files: the daemon does not create them there.
    Init {
        /// The configuration naming the key files.
        #[arg(long, env = "TOKEN_BROKER_CONFIG")]
        config: Option<PathBuf>,
    },
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
