//! Bounded under abuse and careless configuration: what `config check` accepts, `serve` runs;
//! data at rest is private to the daemon's user; tenants learn nothing of each other.

use std::{os::unix::fs::PermissionsExt, process::Command, sync::Arc};

use token_broker::api::proto::JobState;

use crate::helpers::{TestApp, start_fake, test_config};

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test]
async fn database_files_keys_and_the_created_directory_are_private() {
    let fake = start_fake().await;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let mut config = test_config(&dir, &fake);
    config.storage.path = dir.path().join("data").join("broker.db");
    let db = config.storage.path.clone();
    let mut app = TestApp::start(config, fake, Arc::clone(&dir)).await;
    let job = app.exchange(app.new_request("client-a")).await;
    assert_eq!(job.state(), JobState::Succeeded);
    assert_eq!(
        mode(&dir.path().join("data")),
        0o700,
        "the created directory"
    );
    for suffix in ["", "-wal", "-shm", ".lock", ".key", ".audit-key"] {
        let path = token_broker::config::beside(&db, suffix);
        assert_eq!(mode(&path), 0o600, "{}", path.display());
    }
}

#[tokio::test]
async fn a_database_readable_by_others_is_tightened_at_start() {
    let fake = start_fake().await;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let config = test_config(&dir, &fake);
    let app = TestApp::start(config.clone(), fake, Arc::clone(&dir)).await;
    let (config, fake, dir) = app.stop().await;
    let db = config.storage.path.clone();
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    let app = TestApp::start(config, fake, dir).await;
    assert_eq!(mode(&db), 0o600);
    app.stop().await;
}

/// `token-broker config check` on a file holding `toml`: its exit code and output.
fn config_check(dir: &std::path::Path, toml: &str) -> (i32, String) {
    let file = dir.join("broker.toml");
    std::fs::write(&file, toml).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_token-broker"))
        .args(["config", "check"])
        .arg(&file)
        .env_remove("TOKEN_BROKER_STORAGE__PATH")
        .output()
        .expect("run config check");
    let text = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.code().unwrap_or(-1), text)
}

#[test]
fn a_directory_as_the_database_is_refused_before_any_file_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("somewhere");
    std::fs::create_dir(&target).unwrap();
    let (code, text) = config_check(
        dir.path(),
        &format!("[storage]\npath = {:?}\n", target.display().to_string()),
    );
    assert_eq!(code, 78, "{text}");
    assert!(text.contains("is a directory"), "{text}");
    let beside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(beside.len(), 2, "nothing created beside it: {beside:?}");
}

#[test]
fn values_that_serve_cannot_run_are_refused_by_config_check() {
    let dir = tempfile::tempdir().unwrap();
    for (toml, expected) in [
        (
            "[storage]\nbusy_timeout_ms = 2147483648\n",
            "storage.busy_timeout_ms",
        ),
        (
            "[upstream]\ntimeout_ms = 9223372036854775807\n",
            "upstream.timeout_ms",
        ),
        (
            "[upstream]\ntimeout_ms = 18446744073709551615\n",
            "timeout_ms",
        ),
        (
            "[retry]\njob_ttl_secs = 9223372036854775807\n",
            "retry.job_ttl_secs",
        ),
        (
            "[upstream]\ntoken_url = \"http://u:secret@example.com/v1/token\"\n",
            "in clear",
        ),
    ] {
        let (code, text) = config_check(dir.path(), toml);
        assert_eq!(code, 78, "{toml}: {text}");
        assert!(text.contains(expected), "{toml}: {text}");
        assert!(
            !text.contains("secret@"),
            "credentials are never printed: {text}"
        );
    }
    let (code, text) = config_check(
        dir.path(),
        "[audit]\nretention_days = 9223372036854775807\n",
    );
    assert_eq!(code, 0, "{text}");
}

/// Every numeric setting at the top and at the bottom of its documented range starts the daemon,
/// which then serves an exchange.
#[tokio::test]
async fn every_setting_at_the_ends_of_its_range_starts_serve() {
    for extreme in [Extreme::Low, Extreme::High] {
        let fake = start_fake().await;
        let dir = Arc::new(tempfile::tempdir().unwrap());
        let mut config = test_config(&dir, &fake);
        extreme.apply(&mut config);
        let mut app = TestApp::start(config, fake, dir).await;
        let job = app.exchange(app.new_request("client-a")).await;
        assert_eq!(job.state(), JobState::Succeeded, "{extreme:?}: {job:?}");
        app.stop().await;
    }
}

#[derive(Debug, Clone, Copy)]
enum Extreme {
    Low,
    High,
}

impl Extreme {
    fn apply(self, config: &mut token_broker::config::Config) {
        let high = matches!(self, Extreme::High);
        let pick = |low: u64, high_value: u64| if high { high_value } else { low };
        config.server.shutdown_grace_ms = pick(0, 3_600_000);
        config.server.max_message_bytes = pick(4096, 16 << 20) as usize;
        config.server.max_concurrent_streams = pick(1, 65_536) as u32;
        config.server.max_watches_per_tenant = pick(1, 1_000_000) as usize;
        config.server.max_connections = pick(1, 1_000_000) as usize;
        config.server.handshake_timeout_ms = pick(100, 600_000);
        config.server.idle_timeout_secs = pick(60, 86_400);
        config.queue.max_pending_clients = pick(1, 10_000_000);
        config.storage.busy_timeout_ms = pick(0, 600_000);
        config.storage.max_size_mb = pick(0, 1 << 28);
        config.upstream.timeout_ms = pick(1_000, 600_000);
        config.upstream.connect_timeout_ms = pick(1_000, 600_000);
        config.upstream.max_response_bytes = pick(1024, 16 << 20) as usize;
        config.upstream.max_retry_after_secs = pick(1, 86_400);
        config.limits.global_rps = pick(0, 1_000_000) as u32;
        config.limits.global_burst = pick(0, 1_000_000) as u32;
        config.limits.default_client_rps = pick(0, 1_000_000) as u32;
        config.limits.default_client_burst = pick(0, 1_000_000) as u32;
        config.limits.recovery_quiet_secs = pick(0, 86_400);
        config.retry.max_attempts = pick(1, 100) as u32;
        config.retry.initial_delay_ms = pick(1, 86_400_000);
        config.retry.max_delay_ms = pick(1, 86_400_000);
        config.retry.job_ttl_secs = pick(1, 7 * 86_400);
        config.queue.max_pending = pick(1, 100_000_000);
        config.worker.concurrency = pick(1, 10_000) as u32;
        config.worker.poll_interval_ms = pick(1, 3_600_000);
        config.breaker.failure_threshold = pick(0, 1_000_000) as u32;
        config.breaker.cool_down_ms = pick(0, 3_600_000);
        config.security.token_retention_secs = pick(0, 30 * 86_400);
        config.audit.retention_days = pick(0, u64::MAX);
        if !high {
            // The low end with the global limit on: one request per second.
            config.limits.global_rps = 1;
            config.limits.global_burst = 1;
        }
    }
}

#[tokio::test]
async fn a_keep_forever_retention_keeps_every_event() {
    let fake = start_fake().await;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let config = test_config(&dir, &fake);
    let mut app = TestApp::start(config, fake, dir).await;
    app.exchange(app.new_request("client-a")).await;
    let before = app.count_rows("audit_events").await;
    assert!(before >= 4, "{before}");
    let (mut config, fake, dir) = app.stop().await;
    config.audit.retention_days = 9_223_372_036_854_775_807;
    let mut app = TestApp::start(config, fake, dir).await;
    // A change after the start goes through the same writer as any pruning would.
    app.exchange(app.new_request("client-a")).await;
    let after = app.count_rows("audit_events").await;
    assert_eq!(
        after,
        before * 2,
        "every event is kept: {before} then {after}"
    );
}

#[tokio::test]
async fn default_idempotency_keys_depend_on_the_daemons_key() {
    let fake = start_fake().await;
    let request = crate::helpers::new_request(&fake, "client-a");
    let mut keys = Vec::new();
    for _ in 0..2 {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        let config = test_config(&dir, &fake);
        let mut app = TestApp::start(config, fake.clone(), dir).await;
        let job = app.submit(request.clone()).await;
        keys.push(job.idempotency_key);
        app.stop().await;
    }
    assert_eq!(keys[0].len(), 64);
    assert_ne!(keys[0], keys[1], "two keys, two default idempotency keys");
    // Nor is it the plain digest anyone could recompute from a guessed code.
    use sha2::{Digest, Sha256};
    let mut plain = Sha256::new();
    plain.update(b"token-broker/idempotency/v1");
    for field in [request.client_id.as_str(), request.code.as_str()] {
        plain.update((field.len() as u64).to_be_bytes());
        plain.update(field.as_bytes());
    }
    assert_ne!(keys[0], hex::encode(plain.finalize()));
}

/// `/healthz` through a fresh connection: whether it answered 200.
async fn healthz(ops: std::net::SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(ops).await else {
        return false;
    };
    if stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer).await;
    answer.starts_with("HTTP/1.1 200")
}

/// 1,100 idle connections to the gRPC port of a daemon limited to 1,024 open files, and 200
/// slowloris connections (a header line, then nothing) to its ops port: both listeners stay
/// usable, and a fresh `Exchange` and `/healthz` succeed once the idle sockets time out.
#[tokio::test]
async fn idle_and_slowloris_connections_cannot_exhaust_the_daemon() {
    use tokio::io::AsyncWriteExt;
    let fake = start_fake().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("broker.db");
    let token_url = fake.token_url();
    // prlimit sets the soft and hard limits the daemon starts with (a systemd default).
    let daemon = crate::helpers::Daemon::start_wrapped(
        &["prlimit", "--nofile=1024:1024"],
        &db,
        &token_url,
        None,
        &[("TOKEN_BROKER_SERVER__HANDSHAKE_TIMEOUT_MS", "1500")],
    );
    let (grpc, ops) = (daemon.addr, daemon.ops_addr);

    let mut idle = Vec::new();
    for _ in 0..1_100 {
        if let Ok(stream) = tokio::net::TcpStream::connect(grpc).await {
            idle.push(stream);
        }
    }
    let mut slow = Vec::new();
    for _ in 0..200 {
        if let Ok(mut stream) = tokio::net::TcpStream::connect(ops).await {
            let _ = stream.write_all(b"GET /metrics HTTP/1.1\r\n").await;
            slow.push(stream);
        }
    }
    // Within seconds (the handshake and header timeouts), both listeners serve again, while
    // the idle and slow sockets are still open on this side.
    let recovered = async {
        loop {
            if healthz(ops).await {
                let mut client =
                    token_broker::api::proto::token_broker_client::TokenBrokerClient::new(
                        tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
                            .unwrap()
                            .connect_lazy(),
                    );
                let request = crate::helpers::new_request(&fake, "client-a");
                if let Ok(job) = client.exchange(request).await {
                    return job.into_inner();
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    };
    let job = tokio::time::timeout(crate::helpers::PATIENCE, recovered)
        .await
        .expect("an exchange and /healthz succeed despite the idle connections");
    assert_eq!(job.state(), JobState::Succeeded);
    assert_eq!(idle.len(), 1_100);
    let metrics = crate::helpers::scrape_metrics(ops).await;
    assert!(
        metrics.contains("listener=\"grpc\"") && metrics.contains("closed_handshake_timeout"),
        "the closed connections are counted:\n{metrics}"
    );
    drop((idle, slow, daemon));
}

/// 20,000 jobs for as many distinct client ids drain at close to the configured global rate
/// (each dispatch pass looks at a batch of clients, not at every one of them), a job submitted
/// after them waits no longer than its place in line, and `/metrics` does not grow a series
/// per client id.
#[tokio::test]
async fn many_distinct_client_ids_drain_at_the_global_rate() {
    let _machine = crate::helpers::machine_alone().await;
    const CLIENTS: usize = 20_000;
    const GLOBAL_RPS: u32 = 1_000;
    // First the queue fills while one request a second goes out...
    let app = TestApp::spawn_with(|config| {
        config.limits.global_rps = 1;
        config.limits.global_burst = 1;
        config.limits.default_client_rps = 20;
        config.queue.max_pending_clients = CLIENTS as u64 + 1;
        config.retry.job_ttl_secs = 3600;
        // The submissions are what this test makes; their durability is tested elsewhere.
        config.storage.synchronous = token_broker::config::Synchronous::Normal;
    })
    .await;
    let mut tasks = tokio::task::JoinSet::new();
    for caller in 0..8 {
        let mut client = app.client.clone();
        let requests: Vec<_> = (0..CLIENTS / 8)
            .map(|n| app.new_request(&format!("client-{caller}-{n}")))
            .collect();
        tasks.spawn(async move {
            for request in requests {
                client.submit_exchange(request).await.expect("accepted");
            }
        });
    }
    tasks.join_all().await;
    // ...then the daemon restarts at the global rate, finds every waiting client, and drains
    // them, with one more job behind them all.
    let (mut config, fake, dir) = app.stop().await;
    let sent_before = fake.stats().redeemed;
    config.limits.global_rps = GLOBAL_RPS;
    config.limits.global_burst = GLOBAL_RPS;
    let started = std::time::Instant::now();
    let mut app = TestApp::start(config, fake, dir).await;
    let last = app.exchange(app.new_request("normal-app")).await;
    let elapsed = started.elapsed();
    assert_eq!(last.state(), JobState::Succeeded, "{last:?}");
    // Its place in line is behind the queued jobs at 1,000/s: about 20 s. Before the
    // dispatcher looked at a batch of clients per pass, this rate fell to a few jobs a second.
    let queued = CLIENTS as u64 - sent_before;
    let ideal = std::time::Duration::from_secs(queued.div_ceil(u64::from(GLOBAL_RPS)));
    eprintln!(
        "{queued} queued jobs for as many clients, then one more, drained in {elapsed:?} (ideal {ideal:?})"
    );
    assert!(
        elapsed < ideal * 2,
        "{queued} distinct clients and one more took {elapsed:?}; at the global rate: {ideal:?}"
    );
    // Clients take turns, so the last job need not be the last one out (a client the
    // dispatcher learns of by its submission can go before queued clients it has not reached
    // yet); every job is out within twice the time the global rate allows.
    while app.fake.stats().redeemed < CLIENTS as u64 + 1 {
        assert!(
            started.elapsed() < ideal * 2,
            "{} of {} redeemed after {:?}",
            app.fake.stats().redeemed,
            CLIENTS + 1,
            started.elapsed()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(app.fake.stats().redeemed, CLIENTS as u64 + 1);
    let metrics = crate::helpers::scrape_metrics(app.ops_addr).await;
    assert!(
        metrics.len() < 32 * 1024,
        "/metrics holds {} bytes after {CLIENTS} client ids",
        metrics.len()
    );
    assert!(!metrics.contains("client-0-0"));
}

/// Without tenants any caller may send any client id: `queue.max_pending_clients` bounds how
/// many distinct ones have jobs pending at once, while known clients go on.
#[tokio::test]
async fn distinct_pending_client_ids_are_bounded() {
    let mut app = TestApp::spawn_with(|config| {
        config.queue.max_pending_clients = 2;
    })
    .await;
    // Slow answers keep the jobs pending while the test submits.
    app.fake
        .set_faults(token_broker::tools::fake_upstream::Faults {
            latency_ms: 1_000,
            ..Default::default()
        });
    app.submit(app.new_request("client-a")).await;
    let b = app.submit(app.new_request("client-b")).await;
    let status = app
        .client
        .submit_exchange(app.new_request("client-c"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert_eq!(
        status.message(),
        "too many distinct client ids have jobs pending; retry later"
    );
    // A client id that already has a job pending is not a new one.
    app.submit(app.new_request("client-a")).await;
    assert_eq!(app.count_rows("jobs").await, 3);
    // Once a client's jobs are done, another client id fits.
    app.wait_terminal(&b.job_id).await;
    app.submit(app.new_request("client-c")).await;
}
