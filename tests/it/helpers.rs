//! `TestApp`: starts the daemon through the same `run` that `main` uses.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Once, mpsc},
    time::Duration,
};

use token_broker::{
    Listeners,
    api::proto::{
        GetJobRequest, Job, JobState, SubmitExchangeRequest, token_broker_client::TokenBrokerClient,
    },
    config::{Config, Synchronous},
    tools::fake_upstream::{FakeOptions, FakeUpstream, new_verifier, s256_challenge},
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;

/// Bounds every wait in the tests, so a bug fails a test instead of hanging it.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// The machine (two cores) as the tests share it: tests that load it (several daemons,
/// thousands of jobs) hold it alone, and tests that check rates measured against the clock
/// hold it shared, so that neither runs beside a load that would skew the other. Every other
/// test runs alongside anything.
static MACHINE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// For a test that loads the machine: no rate-measuring test runs meanwhile.
pub async fn machine_alone() -> tokio::sync::RwLockWriteGuard<'static, ()> {
    MACHINE.write().await
}

/// For a test that measures rates against the clock: no loading test runs meanwhile.
pub async fn machine_shared() -> tokio::sync::RwLockReadGuard<'static, ()> {
    MACHINE.read().await
}

pub struct TestApp {
    pub client: TokenBrokerClient<Channel>,
    pub grpc_addr: std::net::SocketAddr,
    pub ops_addr: std::net::SocketAddr,
    pub fake: FakeUpstream,
    pub dir: Arc<tempfile::TempDir>,
    pub config: Config,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<anyhow::Result<()>>>,
}

fn init_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .init();
        }
    });
}

/// A configuration for tests: fast retries, no rate limits, a database in `dir`.
pub fn test_config(dir: &tempfile::TempDir, fake: &FakeUpstream) -> Config {
    let mut config = Config::default();
    config.storage.path = dir.path().join("broker.db");
    config.storage.synchronous = Synchronous::Full;
    config.upstream.token_url = fake.token_url();
    config.upstream.timeout_ms = 2_000;
    config.limits.global_rps = 0;
    config.limits.default_client_rps = 0;
    config.retry.initial_delay_ms = 10;
    config.retry.max_delay_ms = 50;
    config.retry.max_attempts = 5;
    config.retry.job_ttl_secs = 60;
    config.server.shutdown_grace_ms = 5_000;
    config
}

impl TestApp {
    /// A daemon with the test configuration and a fresh fake upstream.
    pub async fn spawn() -> TestApp {
        Self::spawn_with(|_| {}).await
    }

    /// A daemon that sends one request per second, so most submissions stay queued.
    pub async fn spawn_one_per_second() -> TestApp {
        Self::spawn_with(|config| {
            config.limits.global_rps = 1;
            config.limits.global_burst = 1;
        })
        .await
    }

    /// A daemon whose test configuration `adjust` changes first.
    pub async fn spawn_with(adjust: impl FnOnce(&mut Config)) -> TestApp {
        let fake = start_fake().await;
        let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        let mut config = test_config(&dir, &fake);
        adjust(&mut config);
        Self::start(config, fake, dir).await
    }

    /// Starts a daemon on `config`, sharing `fake` and `dir` (so a restart sees the same
    /// database and the same upstream).
    pub async fn start(config: Config, fake: FakeUpstream, dir: Arc<tempfile::TempDir>) -> TestApp {
        init_logs();
        config.validate().expect("test configuration is valid");
        let grpc = TcpListener::bind("127.0.0.1:0").await.expect("bind grpc");
        let ops = TcpListener::bind("127.0.0.1:0").await.expect("bind ops");
        let grpc_addr = grpc.local_addr().unwrap();
        let ops_addr = ops.local_addr().unwrap();
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let server = tokio::spawn(token_broker::run(
            config.clone(),
            Listeners {
                grpc,
                ops: Some(ops),
            },
            async move {
                let _ = shutdown_rx.await;
            },
        ));
        wait_ready(ops_addr).await;
        // Lazy: a TLS listener refuses this plaintext channel, which some tests check.
        let client = TokenBrokerClient::new(
            tonic::transport::Endpoint::from_shared(format!("http://{grpc_addr}"))
                .expect("endpoint")
                .connect_lazy(),
        );
        TestApp {
            client,
            grpc_addr,
            ops_addr,
            fake,
            dir,
            config,
            shutdown: Some(shutdown_tx),
            server: Some(server),
        }
    }

    /// Shuts the daemon down gracefully and waits for it.
    pub async fn stop(mut self) -> (Config, FakeUpstream, Arc<tempfile::TempDir>) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        let server = self.server.take().expect("server running");
        tokio::time::timeout(PATIENCE, server)
            .await
            .expect("the daemon stops within the patience bound")
            .expect("the server task does not panic")
            .expect("the daemon exits cleanly");
        (
            self.config.clone(),
            self.fake.clone(),
            Arc::clone(&self.dir),
        )
    }

    pub fn db_path(&self) -> PathBuf {
        self.config.storage.path.clone()
    }

    /// A valid submission for `client_id` with a fresh code issued by the fake upstream.
    pub fn new_request(&self, client_id: &str) -> SubmitExchangeRequest {
        new_request(&self.fake, client_id)
    }

    pub async fn submit(&mut self, request: SubmitExchangeRequest) -> Job {
        self.client
            .submit_exchange(request)
            .await
            .expect("submission accepted")
            .into_inner()
    }

    /// Exchanges and waits, expecting an OK answer.
    pub async fn exchange(&mut self, request: SubmitExchangeRequest) -> Job {
        self.client
            .exchange(request)
            .await
            .expect("exchange answered")
            .into_inner()
    }

    pub async fn cancel(&mut self, job_id: &str) -> Result<Job, tonic::Status> {
        self.client
            .cancel_job(GetJobRequest {
                job_id: job_id.to_string(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn get(&mut self, job_id: &str) -> Job {
        self.client
            .get_job(GetJobRequest {
                job_id: job_id.to_string(),
            })
            .await
            .expect("job exists")
            .into_inner()
    }

    /// Follows the job with WatchJob until a snapshot satisfies `done`; panics if the stream
    /// ends first.
    async fn watch_until(&mut self, job_id: &str, done: impl Fn(&Job) -> bool) -> Job {
        let mut stream = self
            .client
            .watch_job(GetJobRequest {
                job_id: job_id.to_string(),
            })
            .await
            .expect("watch accepted")
            .into_inner();
        let wait = async {
            let mut last = None;
            while let Some(job) = stream.message().await.expect("watch stream healthy") {
                if done(&job) {
                    return job;
                }
                last = Some(job);
            }
            panic!("the stream ended without the awaited snapshot; last: {last:?}");
        };
        tokio::time::timeout(PATIENCE, wait)
            .await
            .expect("the awaited snapshot arrives within the patience bound")
    }

    /// Follows the job with WatchJob until it reaches `state`.
    pub async fn wait_for_state(&mut self, job_id: &str, state: JobState) -> Job {
        self.watch_until(job_id, |job| job.state() == state).await
    }

    /// Follows the job with WatchJob until it is terminal.
    pub async fn wait_terminal(&mut self, job_id: &str) -> Job {
        self.watch_until(job_id, is_terminal).await
    }

    /// Submits `count` jobs for `client_id` and returns their ids.
    pub async fn submit_many(&mut self, count: usize, client_id: &str) -> Vec<String> {
        let mut ids = Vec::new();
        for _ in 0..count {
            ids.push(self.submit(self.new_request(client_id)).await.job_id);
        }
        ids
    }

    /// Rows in a table of the daemon's database, read from the file itself.
    pub async fn count_rows(&self, table: &str) -> i64 {
        count_rows(&self.db_path(), table).await
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

/// Waits until the daemon's `/readyz` answers 200 (it has taken the database, migrated and
/// started its worker).
async fn wait_ready(ops: SocketAddr) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ready = async {
        loop {
            if let Ok(mut stream) = tokio::net::TcpStream::connect(ops).await {
                let _ = stream
                    .write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .await;
                let mut answer = String::new();
                let _ = stream.read_to_string(&mut answer).await;
                if answer.starts_with("HTTP/1.1 200") {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(PATIENCE, ready)
        .await
        .expect("the daemon becomes ready");
}

/// What `run` says when it refuses to start on `config`.
pub async fn start_up_error(config: Config) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind grpc");
    let error = token_broker::run(
        config,
        Listeners {
            grpc: listener,
            ops: None,
        },
        std::future::pending(),
    )
    .await
    .expect_err("the daemon refuses to start");
    format!("{error:#}")
}

/// A fake upstream that answers every token request after `latency_ms`.
pub async fn start_slow_fake(latency_ms: u64) -> FakeUpstream {
    start_fake_with(FakeOptions {
        faults: token_broker::tools::fake_upstream::Faults {
            latency_ms,
            ..Default::default()
        },
        ..FakeOptions::default()
    })
    .await
}

pub async fn start_fake() -> FakeUpstream {
    start_fake_with(FakeOptions::default()).await
}

pub async fn start_fake_with(options: FakeOptions) -> FakeUpstream {
    // The tests' own HTTP clients need it as much as the daemon's.
    token_broker::exchange::upstream::install_crypto_provider();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind fake");
    FakeUpstream::start(listener, options).expect("fake upstream starts")
}

pub fn new_request(fake: &FakeUpstream, client_id: &str) -> SubmitExchangeRequest {
    let verifier = new_verifier();
    let code = fake.issue_code(client_id, &s256_challenge(&verifier));
    SubmitExchangeRequest {
        client_id: client_id.to_string(),
        code,
        code_verifier: verifier,
        state: format!("state-{}", rand::random::<u32>()),
        idempotency_key: String::new(),
    }
}

pub fn is_terminal(job: &Job) -> bool {
    matches!(
        job.state(),
        JobState::Succeeded | JobState::Failed | JobState::Cancelled
    )
}

/// The daemon's store opened directly (as the daemon would, with its key file), for tests that
/// set up or inspect state the API cannot reach.
pub async fn open_store(config: &Config) -> token_broker::store::Store {
    let (keys, _) =
        token_broker::security::crypto::KeyRing::load_or_create(&config.key_file_path())
            .expect("key ring");
    let (store, writer) = token_broker::store::Store::open(
        &config.storage,
        Arc::new(keys),
        token_broker::store::feed::JobFeed::new(),
        token_broker::ops::metrics::Metrics::new(),
    )
    .await
    .expect("store opens");
    tokio::spawn(writer);
    store
}

/// A separate read-only connection to a daemon's database file, for inspecting what it stored.
pub async fn read_only(path: &std::path::Path) -> sqlx::SqliteConnection {
    use sqlx::{Connection, sqlite::SqliteConnectOptions};
    sqlx::SqliteConnection::connect_with(
        &SqliteConnectOptions::new().filename(path).read_only(true),
    )
    .await
    .expect("open the database read-only")
}

/// Rows in `table`, read from the file.
pub async fn count_rows(path: &std::path::Path, table: &str) -> i64 {
    use sqlx::Connection;
    let mut conn = read_only(path).await;
    let sql = match table {
        "jobs" => "SELECT COUNT(*) FROM jobs",
        "audit_events" => "SELECT COUNT(*) FROM audit_events",
        other => panic!("unknown table {other}"),
    };
    let count: i64 = sqlx::query_scalar(sql)
        .fetch_one(&mut conn)
        .await
        .expect("count rows");
    conn.close().await.ok();
    count
}

/// The audit event kinds of one job, in order.
pub async fn audit_kinds(path: &std::path::Path, job_id: &str) -> Vec<String> {
    job_events(path, job_id)
        .await
        .into_iter()
        .map(|(_, _, kind, _)| kind)
        .collect()
}

/// One job's audit events as stored, in order: (seq, at, kind, detail).
pub async fn job_events(
    path: &std::path::Path,
    job_id: &str,
) -> Vec<(i64, i64, String, Option<String>)> {
    use sqlx::Connection;
    let mut conn = read_only(path).await;
    let events = sqlx::query_as(
        "SELECT seq, at, kind, detail FROM audit_events WHERE job_id = ?1 ORDER BY seq",
    )
    .bind(job_id)
    .fetch_all(&mut conn)
    .await
    .expect("read audit events");
    conn.close().await.ok();
    events
}

/// A daemon process and the addresses it reported.
pub struct Daemon {
    pub child: Child,
    pub addr: SocketAddr,
    /// The ops listener (`/healthz`, `/readyz`, `/metrics`).
    pub ops_addr: SocketAddr,
}

impl Daemon {
    /// Starts `token-broker serve` on `db`, logging JSON; copies the log to `CRASH_TEST_LOG`
    /// or `log` when given.
    pub fn start(db: &Path, token_url: &str) -> Daemon {
        Self::start_logging(
            db,
            token_url,
            std::env::var_os("CRASH_TEST_LOG").map(PathBuf::from),
        )
    }

    pub fn start_logging(db: &Path, token_url: &str, log: Option<PathBuf>) -> Daemon {
        Self::start_with_env(db, token_url, log, &[])
    }

    /// [`Daemon::start_logging`] with extra environment variables (settings or test hooks).
    pub fn start_with_env(
        db: &Path,
        token_url: &str,
        log: Option<PathBuf>,
        env: &[(&str, &str)],
    ) -> Daemon {
        Self::start_wrapped(&[], db, token_url, log, env)
    }

    /// [`Daemon::start_with_env`], run through `wrapper` (a program and its arguments, such as
    /// `prlimit --nofile=1024:1024`) when it is not empty.
    pub fn start_wrapped(
        wrapper: &[&str],
        db: &Path,
        token_url: &str,
        log: Option<PathBuf>,
        env: &[(&str, &str)],
    ) -> Daemon {
        let binary = env!("CARGO_BIN_EXE_token-broker");
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(binary);
                command
            }
            None => Command::new(binary),
        };
        let mut child = command
            .args(["--log-format", "json", "serve"])
            .env("RUST_LOG", "info")
            .env("TOKEN_BROKER_SERVER__LISTEN", "127.0.0.1:0")
            .env("TOKEN_BROKER_SERVER__METRICS_LISTEN", "127.0.0.1:0")
            .env("TOKEN_BROKER_STORAGE__PATH", db)
            .env("TOKEN_BROKER_UPSTREAM__TOKEN_URL", token_url)
            .env("TOKEN_BROKER_LIMITS__GLOBAL_RPS", "0")
            .env("TOKEN_BROKER_LIMITS__DEFAULT_CLIENT_RPS", "0")
            .env("TOKEN_BROKER_RETRY__INITIAL_DELAY_MS", "10")
            .env("TOKEN_BROKER_RETRY__MAX_DELAY_MS", "50")
            // The caller's settings win over these defaults.
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the daemon");
        // Read the log until the daemon says where it listens; keep draining it afterwards so
        // the daemon never blocks on a full pipe.
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = mpsc::channel();
        let log_path = log;
        std::thread::spawn(move || {
            use std::io::Write;
            let mut log = log_path.map(|path| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .expect("open the log")
            });
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(log) = &mut log {
                    let _ = writeln!(log, "{line}");
                }
                let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if event["message"] == "token-broker serving"
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send((
                        event["listen"].as_str().unwrap_or_default().to_string(),
                        event["ops_listen"].as_str().unwrap_or_default().to_string(),
                    ));
                }
            }
        });
        let (addr, ops_addr) = rx
            .recv_timeout(PATIENCE)
            .expect("the daemon reports its addresses");
        Daemon {
            child,
            addr: addr.parse().expect("a socket address"),
            ops_addr: ops_addr.parse().expect("an ops socket address"),
        }
    }

    pub async fn client(&self) -> TokenBrokerClient<tonic::transport::Channel> {
        TokenBrokerClient::connect(format!("http://{}", self.addr))
            .await
            .expect("connect")
    }

    pub fn kill(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Exchanges with a deadline (`grpc-timeout`) of `within`, expecting an OK answer: the job when
/// it is terminal, or as it stands when the deadline came first.
pub async fn exchange_within(
    client: &mut TokenBrokerClient<Channel>,
    request: SubmitExchangeRequest,
    within: Duration,
) -> Job {
    let mut request = tonic::Request::new(request);
    request.set_timeout(within);
    client
        .exchange(request)
        .await
        .expect("exchange answered before its deadline")
        .into_inner()
}

/// A process's peak resident memory (`VmHWM` in `/proc/<pid>/status`), in bytes.
pub fn peak_resident_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read the status");
    let kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().strip_suffix("kB"))
        .and_then(|value| value.trim().parse::<u64>().ok())
        .expect("a VmHWM line in kB");
    kib * 1024
}

/// The text of `/metrics` on an ops listener.
/// `callers` concurrent callers (client ids `client-0`, `client-1`, …) each make `each`
/// exchanges one after another; every one must succeed.
pub async fn exchange_in_turns(app: &TestApp, callers: usize, each: usize) {
    let mut tasks = tokio::task::JoinSet::new();
    for caller in 0..callers {
        let mut client = app.client.clone();
        let requests: Vec<_> = (0..each)
            .map(|_| app.new_request(&format!("client-{caller}")))
            .collect();
        tasks.spawn(async move {
            for request in requests {
                let job = client
                    .exchange(request)
                    .await
                    .expect("answered")
                    .into_inner();
                assert_eq!(job.state(), token_broker::api::proto::JobState::Succeeded);
            }
        });
    }
    tasks.join_all().await;
}

/// The value of one series in a scrape, 0 when absent.
pub fn series(scrape: &str, name: &str) -> f64 {
    scrape
        .lines()
        .find(|line| line.starts_with(name) && line[name.len()..].starts_with(' '))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0.0)
}

pub async fn scrape_metrics(ops: SocketAddr) -> String {
    reqwest::get(format!("http://{ops}/metrics"))
        .await
        .expect("scrape /metrics")
        .text()
        .await
        .expect("read /metrics")
}

/// An audit event row read straight from a SQLite file, as the store reads it (for tests that
/// tamper with the trail the way someone with write access to the file would).
pub fn stored_event(row: &sqlx::sqlite::SqliteRow) -> token_broker::audit::AuditRecord {
    use sqlx::Row;
    token_broker::audit::AuditRecord {
        seq: row.get("seq"),
        at: row.get("at"),
        job_id: row.get("job_id"),
        tenant: row.get("tenant"),
        client_id: row.get("client_id"),
        kind: row.get::<String, _>("kind").into(),
        attempt: row.get::<Option<i64>, _>("attempt").map(|a| a as u32),
        http_status: row.get::<Option<i64>, _>("http_status").map(|s| s as u16),
        detail: row.get("detail"),
        code_fingerprint: row.get("code_fingerprint"),
        prev_hash: row.get("prev_hash"),
        hash: row.get("hash"),
    }
}
