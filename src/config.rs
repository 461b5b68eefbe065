//! Configuration: embedded defaults, then an optional TOML file, then `TOKEN_BROKER_*`
//! environment variables (`__` separates sections: `TOKEN_BROKER_SERVER__LISTEN`).
//!
//! [`Config::load`] checks the whole configuration before anything binds and reports every
//! problem at once; components then build from a valid `Config` without failing.

use std::{
    collections::HashSet,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use serde::{Deserialize, Serialize};
use url::Url;

/// Truecaller's documented token endpoint.
pub const DEFAULT_TOKEN_URL: &str = "https://oauth-account-noneu.truecaller.com/v1/token";

/// The environment variable prefix.
pub const ENV_PREFIX: &str = "TOKEN_BROKER_";

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub storage: StorageConfig,
    pub upstream: UpstreamConfig,
    pub limits: LimitsConfig,
    pub retry: RetryConfig,
    pub queue: QueueConfig,
    pub worker: WorkerConfig,
    pub breaker: BreakerSettings,
    pub audit: AuditConfig,
    pub security: SecurityConfig,
    /// Callers and what they may do. Empty: authentication is off (loopback only).
    pub tenants: Vec<TenantConfig>,
}

/// One calling service.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub name: String,
    /// Hex SHA-256 of the tenant's API key (`token-broker keys new` prints both); the key itself
    /// never sits in the configuration.
    pub api_key_sha256: String,
    /// The Truecaller client ids this tenant may exchange codes for.
    #[serde(default)]
    pub client_ids: Vec<String>,
    /// `submit` (the TokenBroker service, own jobs only) and/or `audit` (the AuditLog service,
    /// across tenants, never tokens).
    pub roles: Vec<Role>,
    /// This tenant's own bound on jobs not yet terminal (within queue.max_pending).
    #[serde(default)]
    pub max_pending: Option<u64>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Submit,
    Audit,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// The gRPC listener.
    pub listen: String,
    /// The HTTP listener for `/healthz` and `/readyz`; empty disables it.
    pub metrics_listen: String,
    /// How long running attempts may take to finish after SIGINT or SIGTERM.
    pub shutdown_grace_ms: u64,
    /// Largest request message accepted, in bytes.
    pub max_message_bytes: usize,
    /// HTTP/2 streams (calls) one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// Open WatchJob streams per tenant.
    pub max_watches_per_tenant: usize,
    /// TLS for the gRPC listener; absent means plaintext.
    pub tls: Option<TlsConfig>,
    /// Open gRPC connections at most; more are closed at once. Lowered at start to fit the
    /// process's file limit.
    pub max_connections: usize,
    /// A new connection (either listener) must send its first bytes within this.
    pub handshake_timeout_ms: u64,
    /// A gRPC connection that reads nothing (not even a keepalive ping's answer) for this long
    /// is closed.
    pub idle_timeout_secs: u64,
    /// Threads of the async runtime that serves gRPC, the worker and the store; 0 means one per
    /// CPU the process may use, less one on SQLite ([`Config::runtime_threads`]). Fewer threads
    /// than cores cost less CPU per exchange (fewer wake-ups across threads; see
    /// BENCHMARKS.md) and cap the daemon at that many cores.
    pub worker_threads: usize,
}

/// TLS (and, with a client CA, mutual TLS) for the gRPC listener.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert_file: PathBuf,
    /// PEM private key.
    pub key_file: PathBuf,
    /// PEM CA certificates; when set, callers must present a certificate it signed (mTLS).
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:50051".to_string(),
            metrics_listen: "127.0.0.1:9464".to_string(),
            shutdown_grace_ms: 15_000,
            max_message_bytes: 16 * 1024,
            max_concurrent_streams: 1024,
            max_watches_per_tenant: 10_000,
            tls: None,
            max_connections: 10_000,
            handshake_timeout_ms: 10_000,
            idle_timeout_secs: 300,
            worker_threads: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// A PostgreSQL URL (`postgres://` or `postgresql://`): the queue lives there, shared by
    /// every replica given the same URL. Without it, the SQLite file at `path`.
    pub url: Option<String>,
    /// The SQLite database file; relative paths are relative to the working directory.
    pub path: PathBuf,
    /// `full` (an acknowledged job survives power loss), `normal` (survives a process crash) or
    /// `extra`.
    pub synchronous: Synchronous,
    /// How long a statement waits for a lock held by another connection.
    pub busy_timeout_ms: u64,
    /// Cap on the database file's size in MiB (SQLite's max_page_count); 0 means no cap. When
    /// it is reached, writes fail cleanly (UNAVAILABLE) until space is freed or the cap raised.
    pub max_size_mb: u64,
    /// PostgreSQL: connections for reads and the rate budget (the writer has its own, and the
    /// change listener another).
    pub pool_size: u32,
    /// PostgreSQL: a statement running longer is cancelled (and the change fails UNAVAILABLE).
    pub statement_timeout_ms: u64,
}

impl StorageConfig {
    /// Whether the queue lives in PostgreSQL.
    pub fn is_postgres(&self) -> bool {
        self.url.is_some()
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            url: None,
            path: PathBuf::from("token-broker.db"),
            synchronous: Synchronous::Full,
            busy_timeout_ms: 5_000,
            max_size_mb: 0,
            pool_size: 8,
            statement_timeout_ms: 5_000,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    Normal,
    Full,
    Extra,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Truecaller's token endpoint.
    pub token_url: String,
    /// Bound on one attempt, from connecting to the last byte of the answer.
    pub timeout_ms: u64,
    /// Bound on establishing the connection (a failure here means nothing was sent).
    pub connect_timeout_ms: u64,
    /// Answers larger than this are not read; the attempt counts as a protocol failure.
    pub max_response_bytes: usize,
    /// The longest pause upstream's `Retry-After` can impose, in seconds: a longer value (or a
    /// far-future date) is clamped to this, both for the job's next attempt and for the
    /// client's pause.
    pub max_retry_after_secs: u64,
    /// Allow an `http://` token URL to a host other than loopback. Codes and verifiers then
    /// cross the network in clear: only for a fake upstream on a private network.
    pub allow_insecure_http: bool,
}

impl UpstreamConfig {
    /// The token URL without any user name or password, for logs.
    pub fn token_url_for_logs(&self) -> String {
        redact_url(&self.token_url)
    }
}

/// `url` without any user name or password (in its authority or as a `password` query
/// parameter, as PostgreSQL URLs allow), for logs and error messages.
pub fn redact_url(url: &str) -> String {
    match Url::parse(url) {
        Ok(mut url) => {
            let _ = url.set_username("");
            let _ = url.set_password(None);
            if url.query_pairs().any(|(name, _)| name == "password") {
                let kept: Vec<(String, String)> = url
                    .query_pairs()
                    .filter(|(name, _)| name != "password")
                    .map(|(name, value)| (name.into_owned(), value.into_owned()))
                    .collect();
                url.query_pairs_mut().clear().extend_pairs(kept);
            }
            url.to_string()
        }
        Err(_) => "(invalid URL)".to_string(),
    }
}

/// Whether `url` names this machine (`localhost`, 127.0.0.0/8 or `::1`).
fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(domain)) => domain.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            token_url: DEFAULT_TOKEN_URL.to_string(),
            timeout_ms: 10_000,
            connect_timeout_ms: 3_000,
            max_response_bytes: 64 * 1024,
            max_retry_after_secs: 120,
            allow_insecure_http: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Requests per second to upstream across all clients; 0 turns the global limit off.
    pub global_rps: u32,
    /// Requests the global limit lets through at once after a quiet period.
    pub global_burst: u32,
    /// Requests per second for each client id without its own entry; 0 means unlimited.
    pub default_client_rps: u32,
    /// Burst for each client id without its own entry; 0 means equal to the rate.
    pub default_client_burst: u32,
    /// Per-client overrides.
    pub client: Vec<ClientLimit>,
    /// Adapt a client's rate to upstream's 429s (AIMD).
    pub adaptive: bool,
    /// On a 429, the client's effective rate is multiplied by this.
    pub decrease_factor: f64,
    /// Seconds without a 429 before a lowered rate starts to recover.
    pub recovery_quiet_secs: u64,
    /// Fraction of the configured rate regained per second of recovery.
    pub recovery_step: f64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            global_rps: 100,
            global_burst: 20,
            default_client_rps: 20,
            default_client_burst: 0,
            client: Vec::new(),
            adaptive: true,
            decrease_factor: 0.5,
            recovery_quiet_secs: 5,
            recovery_step: 0.05,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClientLimit {
    pub client_id: String,
    pub rps: u32,
    /// 0 or absent means equal to the rate.
    #[serde(default)]
    pub burst: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Upstream attempts per job, the first included.
    pub max_attempts: u32,
    /// Delay before the first retry (doubled per retry, with jitter of up to the same again).
    pub initial_delay_ms: u64,
    /// Cap on a backoff delay. A longer `Retry-After` is still honoured (after clamping to
    /// `upstream.max_retry_after_secs`), within the job's TTL.
    pub max_delay_ms: u64,
    /// A job that has not succeeded this long after submission fails `EXPIRED`.
    pub job_ttl_secs: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_delay_ms: 250,
            max_delay_ms: 30_000,
            job_ttl_secs: 300,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Jobs not yet terminal beyond which submissions answer `RESOURCE_EXHAUSTED`.
    pub max_pending: u64,
    /// Distinct client ids with jobs not yet terminal, at most: a submission for one more
    /// answers `RESOURCE_EXHAUSTED`. Bounds what each distinct client id costs (limiter state,
    /// the dispatcher's schedule) when no tenants restrict the client ids.
    pub max_pending_clients: u64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            max_pending: 100_000,
            max_pending_clients: 10_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Upstream attempts in flight at once.
    pub concurrency: u32,
    /// Safety-net poll interval; submissions and retries wake the worker directly.
    pub poll_interval_ms: u64,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            concurrency: 64,
            poll_interval_ms: 1_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerSettings {
    /// Consecutive upstream 5xx answers or transport failures that open the circuit breaker;
    /// 0 disables it.
    pub failure_threshold: u32,
    /// How long the breaker stays open before one probe is sent.
    pub cool_down_ms: u64,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            failure_threshold: 10,
            cool_down_ms: 5_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// The HMAC key for code fingerprints; empty means `<storage.path>.audit-key`. Created on
    /// first start; must never change.
    pub fingerprint_key_file: PathBuf,
    /// Prune audit events older than this many days, leaving a checkpoint; 0 keeps everything.
    pub retention_days: u64,
    /// The Ed25519 key that signs checkpoints of the chain (`token-broker audit keygen --out
    /// FILE` makes one); empty signs nothing. Never created by the daemon: auditors need its
    /// public key, handed to them apart from the database.
    pub signing_key_file: PathBuf,
    /// How often the chain head is signed (when it moved); also at shutdown and on request.
    pub checkpoint_interval_secs: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            fingerprint_key_file: PathBuf::new(),
            retention_days: 0,
            signing_key_file: PathBuf::new(),
            checkpoint_interval_secs: 60,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityConfig {
    /// The AES-256-GCM key ring sealing codes, verifiers and tokens at rest; empty means
    /// `<storage.path>.key` (created on first start, mode 0600). TOKEN_BROKER_ENCRYPTION_KEYS
    /// overrides the file.
    pub key_file: PathBuf,
    /// How long a token stays stored after it was first delivered to its caller (so a caller
    /// whose answer was lost can fetch it again); an expired token is erased at once.
    pub token_retention_secs: u64,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        Self {
            key_file: PathBuf::new(),
            token_retention_secs: 300,
        }
    }
}

/// Requests per second any limit may be set to.
const RATE: std::ops::RangeInclusive<u32> = 1..=1_000_000;
/// Burst sizes (0 means "equal to the rate").
const BURST: std::ops::RangeInclusive<u32> = 0..=1_000_000;

/// Records an error when `value` lies outside `range`.
fn check_range<T>(
    errors: &mut Vec<String>,
    name: &str,
    value: T,
    range: std::ops::RangeInclusive<T>,
) where
    T: PartialOrd + fmt::Display,
{
    if !range.contains(&value) {
        errors.push(format!(
            "{name}: {value} is out of range (allowed: {} to {})",
            range.start(),
            range.end()
        ));
    }
}

impl AuditConfig {
    /// Retention beyond this many days (about 27 centuries) is "keep forever": the cutoff
    /// would lie before the epoch anyway.
    const MAX_RETENTION_DAYS: u64 = 1_000_000;

    /// How often checkpoints are signed.
    pub fn checkpoint_interval(&self) -> Duration {
        Duration::from_secs(self.checkpoint_interval_secs.max(1))
    }

    /// How long audit events are kept; `None` keeps them forever (0, or a value too large to
    /// mean anything else).
    pub fn retention(&self) -> Option<Duration> {
        match self.retention_days {
            0 => None,
            days if days > Self::MAX_RETENTION_DAYS => None,
            days => Some(Duration::from_secs(days * 86_400)),
        }
    }
}

/// `path + suffix`: the files kept beside the database (lock, keys).
pub fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut beside = path.as_os_str().to_owned();
    beside.push(suffix);
    PathBuf::from(beside)
}

/// `configured`, or the file beside the database when it is empty.
fn or_beside(configured: &Path, database: &Path, suffix: &str) -> PathBuf {
    if configured.as_os_str().is_empty() {
        beside(database, suffix)
    } else {
        configured.to_path_buf()
    }
}

/// Every problem found in a configuration.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} problems):", self.0.len())?;
        for error in &self.0 {
            writeln!(f, "  - {error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl Config {
    /// Loads the embedded defaults, then `file` (which must exist when given), then the
    /// environment, and checks the result.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigErrors> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigErrors(vec![format!(
                    "configuration file {} does not exist or is not a file",
                    path.display()
                )]));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(
            Env::prefixed(ENV_PREFIX)
                .split("__")
                // Read by the command line (or, for the test hooks, the supervisor and the
                // test suite), not configuration.
                .ignore(&[
                    "config",
                    "log_format",
                    "database",
                    "database_url",
                    "encryption_keys",
                    "test_fail_task",
                    "test_postgres_url",
                ]),
        );
        let config: Config = figment
            .extract()
            .map_err(|errors| ConfigErrors(errors.into_iter().map(|e| e.to_string()).collect()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value and reports all problems together.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        if self.server.listen.parse::<SocketAddr>().is_err() {
            errors.push(format!(
                "server.listen: {:?} is not an IP address and port",
                self.server.listen
            ));
        }
        if !self.server.metrics_listen.is_empty()
            && self.server.metrics_listen.parse::<SocketAddr>().is_err()
        {
            errors.push(format!(
                "server.metrics_listen: {:?} is not an IP address and port (empty disables it)",
                self.server.metrics_listen
            ));
        }
        self.validate_ranges(&mut errors);
        if let Some(tls) = &self.server.tls {
            let files = [
                ("cert_file", Some(&tls.cert_file)),
                ("key_file", Some(&tls.key_file)),
            ];
            let ca = [("client_ca_file", tls.client_ca_file.as_ref())];
            for (name, path) in files.into_iter().chain(ca) {
                if let Some(path) = path
                    && !path.is_file()
                {
                    errors.push(format!(
                        "server.tls.{name}: {} does not exist or is not a file",
                        path.display()
                    ));
                }
            }
        }
        match &self.storage.url {
            Some(url) => self.validate_postgres(url, &mut errors),
            None => self.validate_storage_path(&mut errors),
        }
        match Url::parse(&self.upstream.token_url) {
            Ok(url)
                if url.scheme() == "http"
                    && url.has_host()
                    && !is_loopback(&url)
                    && !self.upstream.allow_insecure_http =>
            {
                errors.push(format!(
                    "upstream.token_url: {} is plain http to another host: codes and verifiers \
                     would cross the network in clear (use https, or set \
                     upstream.allow_insecure_http = true for a fake upstream on a private \
                     network)",
                    self.upstream.token_url_for_logs()
                ));
            }
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => {}
            _ => errors.push(format!(
                "upstream.token_url: {} is not an http(s) URL",
                self.upstream.token_url_for_logs()
            )),
        }
        if self.limits.global_rps > 0 && self.limits.global_burst == 0 {
            errors.push(
                "limits.global_burst: must be at least 1 when limits.global_rps is set".to_string(),
            );
        }
        let mut seen = HashSet::new();
        for (i, client) in self.limits.client.iter().enumerate() {
            check_range(
                &mut errors,
                &format!("limits.client[{i}].rps"),
                client.rps,
                RATE,
            );
            check_range(
                &mut errors,
                &format!("limits.client[{i}].burst"),
                client.burst,
                BURST,
            );
            if client.client_id.is_empty() {
                errors.push(format!("limits.client[{i}].client_id: must not be empty"));
            } else if !seen.insert(client.client_id.as_str()) {
                errors.push(format!(
                    "limits.client[{i}].client_id: {:?} appears more than once",
                    client.client_id
                ));
            }
        }
        if !(self.limits.decrease_factor > 0.0 && self.limits.decrease_factor < 1.0) {
            errors.push("limits.decrease_factor: must be between 0 and 1 (exclusive)".to_string());
        }
        if !(self.limits.recovery_step > 0.0 && self.limits.recovery_step <= 1.0) {
            errors.push("limits.recovery_step: must be greater than 0 and at most 1".to_string());
        }
        if self.retry.max_delay_ms < self.retry.initial_delay_ms {
            errors.push(format!(
                "retry.max_delay_ms: must be at least retry.initial_delay_ms ({})",
                self.retry.initial_delay_ms
            ));
        }
        if self.breaker.failure_threshold > 0 && self.breaker.cool_down_ms == 0 {
            errors.push("breaker.cool_down_ms: must be greater than 0".to_string());
        }
        self.validate_tenants(&mut errors);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Every numeric setting against its documented range (README, "Configuration"), so that
    /// whatever `config check` accepts, `serve` can run: no duration overflows, no value a
    /// library refuses at start-up.
    fn validate_ranges(&self, errors: &mut Vec<String>) {
        const HOUR_MS: u64 = 3_600_000;
        const DAY_MS: u64 = 86_400_000;
        let (s, st, u, l, r) = (
            &self.server,
            &self.storage,
            &self.upstream,
            &self.limits,
            &self.retry,
        );
        let e = &mut *errors;
        check_range(
            e,
            "server.shutdown_grace_ms",
            s.shutdown_grace_ms,
            0..=HOUR_MS,
        );
        check_range(
            e,
            "server.max_message_bytes",
            s.max_message_bytes,
            4096..=16 << 20,
        );
        check_range(
            e,
            "server.max_concurrent_streams",
            s.max_concurrent_streams,
            1..=65_536,
        );
        check_range(
            e,
            "server.max_watches_per_tenant",
            s.max_watches_per_tenant,
            1..=1_000_000,
        );
        check_range(
            e,
            "server.max_connections",
            s.max_connections,
            1..=1_000_000,
        );
        check_range(
            e,
            "server.handshake_timeout_ms",
            s.handshake_timeout_ms,
            100..=600_000,
        );
        // Longer than the HTTP/2 keepalive (a ping every 30 s, answered within 10 s), so a
        // quiet but live call is never cut off.
        check_range(
            e,
            "server.idle_timeout_secs",
            s.idle_timeout_secs,
            60..=86_400,
        );
        check_range(e, "server.worker_threads", s.worker_threads, 0..=1024);
        // SQLite takes the busy timeout as a C int of milliseconds.
        check_range(
            e,
            "storage.busy_timeout_ms",
            st.busy_timeout_ms,
            0..=600_000,
        );
        // SQLite's largest database: 4,294,967,294 pages of 64 KiB.
        check_range(e, "storage.max_size_mb", st.max_size_mb, 0..=(1 << 28));
        check_range(e, "storage.pool_size", st.pool_size, 1..=1_000);
        check_range(
            e,
            "storage.statement_timeout_ms",
            st.statement_timeout_ms,
            100..=3_600_000,
        );
        check_range(e, "upstream.timeout_ms", u.timeout_ms, 1..=600_000);
        check_range(
            e,
            "upstream.connect_timeout_ms",
            u.connect_timeout_ms,
            1..=600_000,
        );
        check_range(
            e,
            "upstream.max_response_bytes",
            u.max_response_bytes,
            1024..=16 << 20,
        );
        check_range(
            e,
            "upstream.max_retry_after_secs",
            u.max_retry_after_secs,
            1..=86_400,
        );
        check_range(e, "limits.global_rps", l.global_rps, 0..=*RATE.end());
        check_range(e, "limits.global_burst", l.global_burst, BURST);
        check_range(
            e,
            "limits.default_client_rps",
            l.default_client_rps,
            0..=*RATE.end(),
        );
        check_range(
            e,
            "limits.default_client_burst",
            l.default_client_burst,
            BURST,
        );
        check_range(
            e,
            "limits.recovery_quiet_secs",
            l.recovery_quiet_secs,
            0..=86_400,
        );
        check_range(e, "retry.max_attempts", r.max_attempts, 1..=100);
        check_range(e, "retry.initial_delay_ms", r.initial_delay_ms, 1..=DAY_MS);
        check_range(e, "retry.max_delay_ms", r.max_delay_ms, 1..=DAY_MS);
        check_range(e, "retry.job_ttl_secs", r.job_ttl_secs, 1..=7 * 86_400);
        check_range(
            e,
            "queue.max_pending",
            self.queue.max_pending,
            1..=100_000_000,
        );
        let clients = self.queue.max_pending_clients;
        check_range(e, "queue.max_pending_clients", clients, 1..=10_000_000);
        check_range(e, "worker.concurrency", self.worker.concurrency, 1..=10_000);
        check_range(
            e,
            "worker.poll_interval_ms",
            self.worker.poll_interval_ms,
            1..=HOUR_MS,
        );
        let b = &self.breaker;
        check_range(
            e,
            "breaker.failure_threshold",
            b.failure_threshold,
            0..=1_000_000,
        );
        check_range(e, "breaker.cool_down_ms", b.cool_down_ms, 0..=HOUR_MS);
        let retention = self.security.token_retention_secs;
        check_range(
            e,
            "security.token_retention_secs",
            retention,
            0..=30 * 86_400,
        );
        // audit.retention_days takes any value: one too large to represent keeps everything
        // (see [`AuditConfig::retention`]).
        check_range(
            e,
            "audit.checkpoint_interval_secs",
            self.audit.checkpoint_interval_secs,
            1..=86_400,
        );
    }

    /// `storage.url` must be a PostgreSQL URL, and the keys every replica shares must be named
    /// (a replica that made its own would seal secrets no other replica can open).
    fn validate_postgres(&self, url: &str, errors: &mut Vec<String>) {
        match Url::parse(url) {
            Ok(parsed) if matches!(parsed.scheme(), "postgres" | "postgresql") => {}
            _ => errors.push(format!(
                "storage.url: {} is not a postgres:// or postgresql:// URL",
                redact_url(url)
            )),
        }
        for (name, path) in [
            ("security.key_file", &self.security.key_file),
            (
                "audit.fingerprint_key_file",
                &self.audit.fingerprint_key_file,
            ),
        ] {
            if path.as_os_str().is_empty() {
                errors.push(format!(
                    "{name}: must be set with storage.url: every replica must use the same key                      file (create both with `token-broker keys init`)"
                ));
            }
        }
    }

    /// `storage.path` must name a file: not empty, not ending in `/` or `..`, not an existing
    /// directory, and inside a directory (which the daemon creates when missing). Checked
    /// before any file beside it (lock, keys) is created.
    fn validate_storage_path(&self, errors: &mut Vec<String>) {
        let path = &self.storage.path;
        let problem = if path.as_os_str().is_empty() {
            Some("must not be empty")
        } else if path.is_dir() {
            Some("is a directory; name the database file inside it")
        } else if path.file_name().is_none() || path.as_os_str().to_string_lossy().ends_with('/') {
            Some("must name a file")
        } else {
            match path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
                Some(dir) if dir.exists() && !dir.is_dir() => {
                    Some("lies under something that is not a directory")
                }
                _ => None,
            }
        };
        if let Some(problem) = problem {
            errors.push(format!("storage.path: {} {problem}", path.display()));
        }
    }

    fn validate_tenants(&self, errors: &mut Vec<String>) {
        if self.tenants.is_empty() {
            if let Ok(addr) = self.server.listen.parse::<SocketAddr>()
                && !addr.ip().is_loopback()
            {
                errors.push(format!(
                    "server.listen: {addr} is not a loopback address, and no [[tenants]] are \
                     configured: without tenants authentication is off, so the daemon only \
                     listens on loopback (add tenants, or listen on 127.0.0.1)"
                ));
            }
            return;
        }
        let mut names = HashSet::new();
        let mut hashes = HashSet::new();
        for (i, tenant) in self.tenants.iter().enumerate() {
            let at = format!("tenants[{i}]");
            if tenant.name.is_empty() || !tenant.name.bytes().all(|b| b.is_ascii_graphic()) {
                errors.push(format!("{at}.name: must be non-empty visible ASCII"));
            } else if !names.insert(tenant.name.as_str()) {
                errors.push(format!(
                    "{at}.name: {:?} appears more than once",
                    tenant.name
                ));
            }
            let hash = &tenant.api_key_sha256;
            if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                errors.push(format!(
                    "{at}.api_key_sha256: must be 64 hex digits (the SHA-256 of the key; \
                     `token-broker keys new` prints one)"
                ));
            } else if !hashes.insert(hash.to_ascii_lowercase()) {
                errors.push(format!("{at}.api_key_sha256: shared with another tenant"));
            }
            if tenant.roles.is_empty() {
                errors.push(format!(
                    "{at}.roles: give at least one of \"submit\", \"audit\""
                ));
            }
            if tenant.roles.contains(&Role::Submit) && tenant.client_ids.is_empty() {
                errors.push(format!(
                    "{at}.client_ids: a submit tenant needs the client ids it may exchange for"
                ));
            }
        }
    }

    /// The gRPC listen address. Valid after [`Config::validate`].
    pub fn listen_addr(&self) -> SocketAddr {
        self.server
            .listen
            .parse()
            .expect("validated listen address")
    }

    /// The metrics listen address, if enabled. Valid after [`Config::validate`].
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        (!self.server.metrics_listen.is_empty()).then(|| {
            self.server
                .metrics_listen
                .parse()
                .expect("validated metrics address")
        })
    }

    /// The encryption key ring file.
    pub fn key_file_path(&self) -> PathBuf {
        or_beside(&self.security.key_file, &self.storage.path, ".key")
    }

    /// The fingerprint key file.
    pub fn fingerprint_key_path(&self) -> PathBuf {
        or_beside(
            &self.audit.fingerprint_key_file,
            &self.storage.path,
            ".audit-key",
        )
    }

    /// Threads of the daemon's async runtime on a machine with `cpus` CPUs for it:
    /// `server.worker_threads` when set; otherwise one per CPU, less one on SQLite, whose
    /// writer runs on a thread of its own that keeps about half a core busy under
    /// load, so that the runtime does not contend with it (fewer cross-thread wake-ups: 8%
    /// less CPU per exchange with one thread than with two on a two-core machine, see
    /// BENCHMARKS.md). At least one.
    pub fn runtime_threads(&self, cpus: usize) -> usize {
        match self.server.worker_threads {
            0 if self.storage.is_postgres() => cpus.max(1),
            0 => cpus.saturating_sub(1).max(1),
            threads => threads,
        }
    }

    /// How long a claimed attempt may run before another worker may presume it dead: the
    /// upstream timeout bounds an attempt, and the margin covers the database writes around it.
    pub fn lease_duration(&self) -> Duration {
        Duration::from_millis(self.upstream.timeout_ms) + Duration::from_secs(10)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_defaults_are_valid() {
        Config::default().validate().unwrap();
        assert_eq!(Config::default().upstream.token_url, DEFAULT_TOKEN_URL);
        assert_eq!(
            Config::default().storage.synchronous,
            Synchronous::Full,
            "an acknowledged job must survive power loss by default"
        );
    }

    #[test]
    fn a_shared_database_needs_its_key_files_named_and_a_postgres_url() {
        let mut config = Config::default();
        config.storage.url = Some("postgres://broker:s3cret@db.internal/broker".into());
        let errors = config.validate().unwrap_err().to_string();
        assert!(
            errors.contains("security.key_file: must be set"),
            "{errors}"
        );
        assert!(
            errors.contains("audit.fingerprint_key_file: must be set"),
            "{errors}"
        );
        config.security.key_file = PathBuf::from("/etc/token-broker/broker.key");
        config.audit.fingerprint_key_file = PathBuf::from("/etc/token-broker/fingerprint.key");
        config.validate().unwrap();
        config.storage.url = Some("mysql://broker:s3cret@db.internal/broker".into());
        let errors = config.validate().unwrap_err().to_string();
        assert!(errors.contains("storage.url"), "{errors}");
        assert!(
            !errors.contains("s3cret"),
            "no password in errors: {errors}"
        );
        let redacted = redact_url("postgres://db.internal/broker?sslmode=require&password=s3cret");
        assert!(!redacted.contains("s3cret"), "{redacted}");
        assert!(redacted.contains("sslmode=require"), "{redacted}");
        config.storage.url = Some("postgresql://db.internal/broker".into());
        config.storage.pool_size = 0;
        let errors = config.validate().unwrap_err().to_string();
        assert!(errors.contains("storage.pool_size"), "{errors}");
    }

    #[test]
    fn a_retention_too_large_to_represent_keeps_everything() {
        let keep = |days| {
            AuditConfig {
                retention_days: days,
                ..AuditConfig::default()
            }
            .retention()
        };
        assert_eq!(keep(0), None);
        assert_eq!(keep(1), Some(Duration::from_secs(86_400)));
        assert_eq!(keep(u64::MAX), None);
        assert_eq!(keep(i64::MAX as u64), None);
    }

    #[test]
    fn plain_http_leaves_the_machine_only_when_allowed_and_urls_are_logged_without_credentials() {
        let mut config = Config::default();
        for url in [
            "http://127.0.0.1:8080/v1/token",
            "http://localhost/v1/token",
            "http://[::1]/t",
        ] {
            config.upstream.token_url = url.into();
            config.validate().unwrap();
        }
        config.upstream.token_url = "http://user:hunter2@fake-upstream:8080/v1/token".into();
        let errors = config.validate().unwrap_err().0;
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert!(errors[0].contains("in clear"));
        assert!(!errors[0].contains("hunter2"), "{}", errors[0]);
        config.upstream.allow_insecure_http = true;
        config.validate().unwrap();
        assert_eq!(
            config.upstream.token_url_for_logs(),
            "http://fake-upstream:8080/v1/token"
        );
    }

    #[test]
    fn the_runtime_leaves_sqlites_writer_a_cpu_unless_told_otherwise() {
        let mut config = Config::default();
        assert_eq!(config.runtime_threads(1), 1);
        assert_eq!(config.runtime_threads(2), 1);
        assert_eq!(config.runtime_threads(8), 7);
        config.storage.url = Some("postgres://db/broker".into());
        assert_eq!(
            config.runtime_threads(2),
            2,
            "PostgreSQL's writer is on the runtime"
        );
        assert_eq!(config.runtime_threads(0), 1);
        config.server.worker_threads = 3;
        assert_eq!(config.runtime_threads(8), 3, "a setting is taken as it is");
    }

    #[test]
    fn out_of_range_numbers_are_reported_with_their_range() {
        let mut config = Config::default();
        config.storage.busy_timeout_ms = 2_147_483_648;
        config.upstream.timeout_ms = u64::MAX;
        config.server.worker_threads = 5_000;
        config.audit.checkpoint_interval_secs = 0;
        let errors = config.validate().unwrap_err().0;
        assert_eq!(errors.len(), 4, "{errors:#?}");
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("server.worker_threads: 5000 is out of range")),
            "{errors:#?}"
        );
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("audit.checkpoint_interval_secs: 0 is out of range")),
            "{errors:#?}"
        );
        assert!(
            errors.contains(
                &"storage.busy_timeout_ms: 2147483648 is out of range (allowed: 0 to 600000)"
                    .to_string()
            ),
            "{errors:#?}"
        );
    }

    proptest::proptest! {
        /// Whatever numbers a configuration holds, it either fails validation or every
        /// component builds from it without a panic or an overflow.
        #[test]
        fn a_valid_configuration_builds_every_component(
            millis in proptest::array::uniform8(proptest::num::u64::ANY),
            small in proptest::array::uniform6(proptest::num::u32::ANY),
            factors in (proptest::num::f64::ANY, proptest::num::f64::ANY),
            retention_days in proptest::num::u64::ANY,
            narrow in proptest::bool::ANY,
        ) {
            // Half the cases draw numbers near the ranges, so that many validate.
            let pick = |value: u64, near: u64| if narrow { value % (near * 2) } else { value };
            let mut config = Config::default();
            config.upstream.timeout_ms = pick(millis[0], 600_000);
            config.upstream.connect_timeout_ms = pick(millis[1], 600_000);
            config.upstream.max_retry_after_secs = pick(millis[2], 86_400);
            config.retry.initial_delay_ms = pick(millis[3], 86_400_000).max(1);
            config.retry.max_delay_ms = pick(millis[4], 86_400_000);
            config.retry.job_ttl_secs = pick(millis[5], 604_800);
            config.breaker.cool_down_ms = pick(millis[6], 3_600_000);
            config.storage.busy_timeout_ms = pick(millis[7], 600_000);
            config.limits.global_rps = small[0] % if narrow { 2_000_000 } else { u32::MAX };
            config.limits.global_burst = small[1];
            config.limits.default_client_rps = small[2] % if narrow { 2_000_000 } else { u32::MAX };
            config.limits.default_client_burst = small[3];
            config.retry.max_attempts = small[4] % if narrow { 200 } else { u32::MAX };
            config.worker.concurrency = small[5];
            config.limits.decrease_factor = factors.0;
            config.limits.recovery_step = factors.1;
            config.audit.retention_days = retention_days;
            if config.validate().is_err() {
                return Ok(());
            }
            let _ = config.lease_duration();
            let _ = config.audit.retention();
            let policy = crate::exchange::retry::RetryPolicy::from(&config.retry);
            let _ = crate::exchange::retry::backoff_delay(&policy, config.retry.max_attempts, 7);
            let limits = crate::exchange::limits::RateLimits::new(&config.limits);
            let now = std::time::Instant::now();
            let _ = limits.try_acquire("client", now);
            limits.on_rate_limited(
                "client",
                Some(Duration::from_secs(config.upstream.max_retry_after_secs)),
                now,
            );
            let _ = limits.try_acquire("client", now);
        }

        /// Any text as a configuration file: a configuration or errors, never a panic.
        #[test]
        fn any_file_loads_or_is_refused(text in "(\\[[a-z]{1,8}\\]\n)?([a-z_]{1,20} = (-?[0-9]{1,25}|\"[^\"]{0,20}\"|true)\n){0,6}") {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("broker.toml");
            std::fs::write(&path, text).unwrap();
            let _ = Config::load(Some(&path));
        }
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let mut config = Config::default();
        config.server.listen = "nowhere".into();
        config.upstream.token_url = "ftp://example".into();
        config.retry.max_attempts = 0;
        config.limits.client = vec![
            ClientLimit {
                client_id: "a".into(),
                rps: 0,
                burst: 0,
            },
            ClientLimit {
                client_id: "a".into(),
                rps: 1,
                burst: 0,
            },
        ];
        let errors = config.validate().unwrap_err().0;
        assert_eq!(errors.len(), 5, "{errors:#?}");
        assert!(errors[0].starts_with("server.listen"));
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API returns its own error type.
    fn a_file_then_the_environment_override_the_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.toml");
        std::fs::write(
            &path,
            r#"
            [server]
            listen = "127.0.0.1:7000"
            [retry]
            max_attempts = 9
            [[limits.client]]
            client_id = "app-one"
            rps = 3
            "#,
        )
        .unwrap();
        figment::Jail::expect_with(|jail| {
            jail.set_env("TOKEN_BROKER_RETRY__MAX_ATTEMPTS", "2");
            // Variables the command line and the test suite read are not configuration.
            jail.set_env("TOKEN_BROKER_DATABASE_URL", "postgres://127.0.0.1/audit");
            jail.set_env(
                "TOKEN_BROKER_TEST_POSTGRES_URL",
                "postgres://127.0.0.1/postgres",
            );
            let config = Config::load(Some(&path)).unwrap();
            assert_eq!(config.server.listen, "127.0.0.1:7000");
            assert_eq!(config.retry.max_attempts, 2);
            assert_eq!(config.limits.client[0].rps, 3);
            assert_eq!(config.queue, QueueConfig::default());
            Ok(())
        });
    }

    #[test]
    fn without_tenants_only_loopback_is_allowed() {
        let mut config = Config::default();
        config.server.listen = "0.0.0.0:50051".into();
        let errors = config.validate().unwrap_err().0;
        assert!(errors[0].contains("loopback"), "{errors:?}");
        config.tenants = vec![TenantConfig {
            name: "shop".into(),
            api_key_sha256: "a".repeat(64),
            client_ids: vec!["app".into()],
            roles: vec![Role::Submit],
            max_pending: None,
        }];
        config.validate().unwrap();
    }

    #[test]
    fn tenants_are_checked_whole() {
        let mut config = Config::default();
        let tenant = TenantConfig {
            name: "shop".into(),
            api_key_sha256: "a".repeat(64),
            client_ids: vec![],
            roles: vec![Role::Submit],
            max_pending: None,
        };
        config.tenants = vec![
            tenant.clone(),
            TenantConfig {
                api_key_sha256: "not-hex".into(),
                roles: vec![],
                max_pending: None,
                ..tenant
            },
        ];
        let errors = config.validate().unwrap_err().0;
        assert_eq!(errors.len(), 4, "{errors:#?}");
    }

    #[test]
    fn unknown_keys_and_bad_types_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.toml");
        std::fs::write(
            &path,
            "[server]\nlisten_typo = 1\n[retry]\nmax_attempts = \"x\"\n",
        )
        .unwrap();
        let errors = Config::load(Some(&path)).unwrap_err().0;
        assert!(!errors.is_empty());
        assert!(Config::load(Some(&dir.path().join("missing.toml"))).is_err());
    }
}
