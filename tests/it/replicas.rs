//! Several brokers on one PostgreSQL: the real binary, three replicas sharing one queue, one
//! rate budget and one audit trail, in front of the fake upstream. Each test gets a fresh
//! database on the throwaway server (`postgres::fresh_database`), and is skipped loudly when
//! there is none (a failure under CI).

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use sqlx::Connection;
use token_broker::{
    api::proto::{
        GetJobRequest, JobState, SubmitExchangeRequest, VerifyAuditLogRequest,
        audit_log_client::AuditLogClient, token_broker_client::TokenBrokerClient,
    },
    tools::fake_upstream::{FakeOptions, FakeUpstream, Faults},
};
use tonic::transport::Channel;

use crate::{
    helpers::{Daemon, PATIENCE, exchange_within, is_terminal, new_request, start_fake_with},
    postgres::fresh_database,
};

/// Replicas of one broker: the same database, the same key files.
struct Fleet {
    url: String,
    replicas: Vec<Option<Daemon>>,
    dir: tempfile::TempDir,
}

impl Fleet {
    /// Starts `count` replicas on a fresh database in front of `fake`, with `env` settings on
    /// top of the tests' defaults. `None` when there is no PostgreSQL (the skip is printed).
    async fn start(count: usize, fake: &FakeUpstream, env: &[(&str, &str)]) -> Option<Fleet> {
        let url = fresh_database().await?;
        let dir = tempfile::tempdir().expect("temp dir");
        let key_file = dir.path().join("broker.key");
        let fingerprint_file = dir.path().join("fingerprint.key");
        // `keys init`: made once, used by every replica.
        let status = Command::new(env!("CARGO_BIN_EXE_token-broker"))
            .args(["keys", "init"])
            .env("TOKEN_BROKER_STORAGE__URL", &url)
            .env("TOKEN_BROKER_SECURITY__KEY_FILE", &key_file)
            .env(
                "TOKEN_BROKER_AUDIT__FINGERPRINT_KEY_FILE",
                &fingerprint_file,
            )
            .output()
            .expect("run keys init");
        assert!(status.status.success(), "keys init: {status:?}");
        let mut fleet = Fleet {
            url,
            replicas: Vec::new(),
            dir,
        };
        for _ in 0..count {
            let replica = fleet.start_replica(fake, env);
            fleet.replicas.push(Some(replica));
        }
        Some(fleet)
    }

    fn start_replica(&self, fake: &FakeUpstream, env: &[(&str, &str)]) -> Daemon {
        let key_file = self.dir.path().join("broker.key");
        let fingerprint_file = self.dir.path().join("fingerprint.key");
        let mut all: Vec<(&str, &str)> = vec![
            ("TOKEN_BROKER_STORAGE__URL", self.url.as_str()),
            (
                "TOKEN_BROKER_SECURITY__KEY_FILE",
                key_file.to_str().expect("utf-8 path"),
            ),
            (
                "TOKEN_BROKER_AUDIT__FINGERPRINT_KEY_FILE",
                fingerprint_file.to_str().expect("utf-8 path"),
            ),
        ];
        all.extend_from_slice(env);
        let log = std::env::var_os("REPLICA_TEST_LOG").map(PathBuf::from);
        // The SQLite path is ignored with storage.url; it only has to be valid.
        Daemon::start_with_env(
            &self.dir.path().join("unused.db"),
            &fake.token_url(),
            log,
            &all,
        )
    }

    async fn clients(&self) -> Vec<TokenBrokerClient<Channel>> {
        let mut clients = Vec::new();
        for replica in self.replicas.iter().flatten() {
            clients.push(replica.client().await);
        }
        clients
    }

    /// `token-broker audit verify --database-url`: its exit status and output.
    fn verify(&self) -> (bool, String) {
        let output = Command::new(env!("CARGO_BIN_EXE_token-broker"))
            .args(["audit", "verify", "--database-url", &self.url])
            .output()
            .expect("run audit verify");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned()
                + &String::from_utf8_lossy(&output.stderr),
        )
    }

    async fn connect(&self) -> sqlx::PgConnection {
        sqlx::PgConnection::connect(&self.url)
            .await
            .expect("connect to the test database")
    }
}

/// Waits, through `client`, until each of `ids` is terminal; returns them as they ended.
async fn wait_all_terminal(
    client: &mut TokenBrokerClient<Channel>,
    ids: &[String],
    within: Duration,
) -> Vec<token_broker::api::proto::Job> {
    tokio::time::timeout(within, async {
        let mut jobs = Vec::with_capacity(ids.len());
        for id in ids {
            let mut watch = client
                .watch_job(GetJobRequest { job_id: id.clone() })
                .await
                .expect("every acknowledged job is there")
                .into_inner();
            let mut last = None;
            while let Some(job) = watch.message().await.expect("the watch goes on") {
                last = Some(job);
            }
            let job = last.expect("a snapshot");
            assert!(is_terminal(&job), "{job:?}");
            jobs.push(job);
        }
        jobs
    })
    .await
    .expect("every acknowledged job reaches a terminal state")
}

/// The most requests the fake received in any window of `window`.
fn busiest_window(arrivals: &[Instant], window: Duration) -> usize {
    let mut most = 0;
    let mut start = 0;
    for end in 0..arrivals.len() {
        while arrivals[end].duration_since(arrivals[start]) >= window {
            start += 1;
        }
        most = most.max(end - start + 1);
    }
    most
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_keep_one_clients_rate_together_and_draw_no_429() {
    let _machine = crate::helpers::machine_alone().await;
    // Upstream answers 429 beyond 30 requests a second (a bucket of 30).
    let fake = start_fake_with(FakeOptions {
        faults: Faults {
            rate_limit_rps: 30,
            rate_limit_burst: 30,
            ..Faults::default()
        },
        ..FakeOptions::default()
    })
    .await;
    let limits = [
        ("TOKEN_BROKER_LIMITS__DEFAULT_CLIENT_RPS", "30"),
        ("TOKEN_BROKER_LIMITS__DEFAULT_CLIENT_BURST", "5"),
        ("TOKEN_BROKER_RETRY__JOB_TTL_SECS", "300"),
    ];
    let Some(fleet) = Fleet::start(3, &fake, &limits).await else {
        return;
    };
    let clients = fleet.clients().await;
    let started = Instant::now();
    // 600 jobs for one client, submitted round-robin: each replica alone could send 30/s.
    let mut submitters = tokio::task::JoinSet::new();
    for (n, mut client) in clients.iter().cloned().enumerate() {
        let fake = fake.clone();
        submitters.spawn(async move {
            let mut ids = Vec::new();
            for _ in 0..200 {
                let job = client
                    .submit_exchange(new_request(&fake, "app"))
                    .await
                    .unwrap_or_else(|status| panic!("replica {n} refused: {status:?}"))
                    .into_inner();
                ids.push(job.job_id);
            }
            ids
        });
    }
    let ids: Vec<String> = submitters.join_all().await.into_iter().flatten().collect();
    assert_eq!(ids.len(), 600);
    let mut reader = clients[1].clone();
    let jobs = wait_all_terminal(&mut reader, &ids, Duration::from_secs(90)).await;
    let took = started.elapsed();
    let failed: Vec<_> = jobs
        .iter()
        .filter(|job| job.state() != JobState::Succeeded)
        .collect();
    assert!(failed.is_empty(), "every job succeeds: {failed:?}");
    let stats = fake.stats();
    assert_eq!(stats.by_status.get(&429), None, "no 429: {stats:?}");
    assert_eq!(stats.redeemed, 600);
    // The fleet held 30/s together: the 600 took about 20 s (one replica's own budget would
    // have let three replicas finish in a third of that), and no second saw more than the
    // rate plus the burst.
    let busiest = busiest_window(&fake.arrivals(), Duration::from_secs(1));
    eprintln!("600 jobs over 3 replicas in {took:?}; busiest second: {busiest} requests");
    assert!(busiest <= 30 + 5, "busiest second: {busiest} requests");
    assert!(took >= Duration::from_secs(19), "took {took:?}");
    assert!(took <= Duration::from_secs(60), "took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_exchanges_spread_over_replicas_all_succeed() {
    let _machine = crate::helpers::machine_alone().await;
    let fake = start_fake_with(FakeOptions::default()).await;
    let Some(fleet) = Fleet::start(3, &fake, &[]).await else {
        return;
    };
    let clients = fleet.clients().await;
    let mut calls = tokio::task::JoinSet::new();
    for n in 0..90 {
        let mut client = clients[n % 3].clone();
        let request = new_request(&fake, &format!("app-{}", n % 7));
        calls.spawn(async move { exchange_within(&mut client, request, PATIENCE).await });
    }
    let jobs = calls.join_all().await;
    assert_eq!(jobs.len(), 90);
    for job in &jobs {
        assert_eq!(job.state(), JobState::Succeeded, "{job:?}");
        assert!(
            job.token
                .as_ref()
                .is_some_and(|t| !t.access_token.is_empty())
        );
    }
    assert_eq!(fake.stats().redeemed, 90);
    let (intact, report) = fleet.verify();
    assert!(intact, "{report}");
    // Each replica names itself in its metrics, as its claims name it in the database.
    let mut names = HashSet::new();
    for replica in fleet.replicas.iter().flatten() {
        let metrics = crate::helpers::scrape_metrics(replica.ops_addr).await;
        let line = metrics
            .lines()
            .find(|line| line.starts_with("token_broker_replica_info{"))
            .unwrap_or_else(|| panic!("replica_info in {metrics}"));
        assert!(line.contains("storage=\"postgres\""), "{line}");
        names.insert(line.to_string());
    }
    assert_eq!(names.len(), 3, "three distinct replicas: {names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_starting_at_once_on_an_empty_database_migrate_it_once() {
    let _machine = crate::helpers::machine_alone().await;
    let fake = start_fake_with(FakeOptions::default()).await;
    let Some(mut fleet) = Fleet::start(0, &fake, &[]).await else {
        return;
    };
    let fleet_ref = &fleet;
    let started: Vec<Daemon> = std::thread::scope(|scope| {
        let starts: Vec<_> = (0..3)
            .map(|_| scope.spawn(|| fleet_ref.start_replica(&fake, &[])))
            .collect();
        starts
            .into_iter()
            .map(|start| start.join().expect("a replica starts"))
            .collect()
    });
    fleet.replicas = started.into_iter().map(Some).collect();
    let mut db = fleet.connect().await;
    let applied: Vec<(i64, bool)> =
        sqlx::query_as("SELECT version, success FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&mut db)
            .await
            .expect("read the migrations");
    let shipped = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/postgres"))
        .expect("the migrations")
        .count();
    assert_eq!(applied.len(), shipped, "each applied once: {applied:?}");
    assert!(applied.iter().all(|(_, success)| *success), "{applied:?}");
    for mut client in fleet.clients().await {
        let job = exchange_within(&mut client, new_request(&fake, "app"), PATIENCE).await;
        assert_eq!(job.state(), JobState::Succeeded);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_submission_reaching_two_replicas_at_once_is_one_job_and_one_redemption() {
    let _machine = crate::helpers::machine_alone().await;
    let fake = start_fake_with(FakeOptions {
        faults: Faults {
            latency_ms: 100,
            ..Faults::default()
        },
        ..FakeOptions::default()
    })
    .await;
    let Some(fleet) = Fleet::start(2, &fake, &[]).await else {
        return;
    };
    let clients = fleet.clients().await;
    for round in 0..10 {
        let request = SubmitExchangeRequest {
            idempotency_key: format!("retry-of-the-same-sign-in-{round}"),
            ..new_request(&fake, "app")
        };
        let (mut a, mut b) = (clients[0].clone(), clients[1].clone());
        let (first, second) = tokio::join!(
            exchange_within(&mut a, request.clone(), PATIENCE),
            exchange_within(&mut b, request, PATIENCE),
        );
        assert_eq!(first.job_id, second.job_id, "one job");
        assert_eq!(first.state(), JobState::Succeeded);
        assert_eq!(second.state(), JobState::Succeeded);
    }
    let stats = fake.stats();
    assert_eq!(
        stats.token_requests, 10,
        "each code presented once: {stats:?}"
    );
    assert_eq!(stats.redeemed, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_run_loses_nothing_and_redeems_nothing_twice() {
    let _machine = crate::helpers::machine_alone().await;
    let fake = start_fake_with(FakeOptions {
        faults: Faults {
            latency_ms: 200,
            ..Faults::default()
        },
        ..FakeOptions::default()
    })
    .await;
    // A short attempt timeout keeps the dead replica's leases short (timeout + 10 s).
    let settings = [
        ("TOKEN_BROKER_UPSTREAM__TIMEOUT_MS", "1000"),
        ("TOKEN_BROKER_RETRY__JOB_TTL_SECS", "600"),
    ];
    let Some(mut fleet) = Fleet::start(3, &fake, &settings).await else {
        return;
    };
    let clients = fleet.clients().await;
    // 1,500 jobs over ten client ids, submitted round-robin (those sent to the killed replica
    // after its death are not acknowledged); the codes are kept to check the tokens afterwards.
    let mut submitters = tokio::task::JoinSet::new();
    for (n, mut client) in clients.iter().cloned().enumerate() {
        let fake = fake.clone();
        submitters.spawn(async move {
            let mut acknowledged = Vec::new();
            for i in 0..500 {
                let request = new_request(&fake, &format!("app-{}", (n + 3 * i) % 10));
                let code = request.code.clone();
                match client.submit_exchange(request).await {
                    Ok(job) => acknowledged.push((job.into_inner().job_id, code)),
                    // The replica was killed: this one was never acknowledged.
                    Err(_) => break,
                }
            }
            acknowledged
        });
    }
    // Kill replica 0 once attempts are under way everywhere (an event, not a sleep).
    tokio::time::timeout(PATIENCE, fake.wait_for_requests(300))
        .await
        .expect("the fleet gets under load");
    fleet.replicas[0].take().expect("replica 0").kill();
    let acknowledged: Vec<(String, String)> =
        submitters.join_all().await.into_iter().flatten().collect();
    assert!(
        acknowledged.len() >= 800,
        "{} acknowledged",
        acknowledged.len()
    );

    // Every acknowledged job ends, read through a surviving replica: the dead replica's
    // attempts are rescued once their leases expire.
    let mut reader = clients[1].clone();
    let ids: Vec<String> = acknowledged.iter().map(|(id, _)| id.clone()).collect();
    let jobs = wait_all_terminal(&mut reader, &ids, Duration::from_secs(120)).await;
    // A submission the dead replica committed but never answered is a job too, and its code
    // may have been redeemed: the counts below are over every stored job.
    let mut db = fleet.connect().await;
    let stored: Vec<String> = sqlx::query_scalar("SELECT job_id FROM jobs")
        .fetch_all(&mut db)
        .await
        .expect("query the jobs");
    let every_job = wait_all_terminal(&mut reader, &stored, Duration::from_secs(60)).await;
    let codes: HashMap<&str, &str> = acknowledged
        .iter()
        .map(|(id, code)| (id.as_str(), code.as_str()))
        .collect();
    let succeeded = every_job
        .iter()
        .filter(|job| job.state() == JobState::Succeeded)
        .count() as u64;
    // Not succeeded, but an attempt's answer was lost: the code may have been spent (the
    // reason is outcome_unknown after a later 403, retries_exhausted or expired otherwise).
    let unknown = every_job
        .iter()
        .filter(|job| job.state() != JobState::Succeeded && job.outcome_unknown)
        .count() as u64;
    for job in jobs.iter().filter(|job| job.state() == JobState::Succeeded) {
        let token = job.token.as_ref().expect("a succeeded job's token");
        assert_eq!(
            fake.issued_token(codes[job.job_id.as_str()]).as_deref(),
            Some(token.access_token.as_str()),
            "job {} returns the token issued for its own code",
            job.job_id
        );
    }
    let redeemed = fake.stats().redeemed;
    eprintln!(
        "{} acknowledged, {} stored: {succeeded} succeeded, {unknown} outcome unknown, \
         {redeemed} redeemed",
        acknowledged.len(),
        stored.len()
    );
    assert!(
        redeemed >= succeeded && redeemed <= succeeded + unknown,
        "redeemed {redeemed}, succeeded {succeeded}, unknown {unknown}"
    );

    let twice: Vec<String> = sqlx::query_scalar(
        "SELECT job_id FROM audit_events WHERE kind = 'job.succeeded' \
         GROUP BY job_id HAVING COUNT(*) > 1",
    )
    .fetch_all(&mut db)
    .await
    .expect("query the trail");
    assert!(twice.is_empty(), "succeeded twice: {twice:?}");
    let stored: HashSet<String> = stored.into_iter().collect();
    assert!(ids.iter().all(|id| stored.contains(id)));

    // The trail three replicas wrote at once verifies, through the CLI and through a replica.
    let (intact, report) = fleet.verify();
    assert!(intact, "{report}");
    let survivor = fleet.replicas[1].as_ref().expect("replica 1");
    let verified = AuditLogClient::connect(format!("http://{}", survivor.addr))
        .await
        .expect("connect")
        .verify_audit_log(VerifyAuditLogRequest::default())
        .await
        .expect("VerifyAuditLog")
        .into_inner();
    assert!(verified.ok, "{verified:?}");
    // And an edited event is still caught at its seq.
    let seq: i64 =
        sqlx::query_scalar("SELECT seq FROM audit_events ORDER BY seq LIMIT 1 OFFSET 500")
            .fetch_one(&mut db)
            .await
            .expect("an event to edit");
    sqlx::query("UPDATE audit_events SET detail = 'edited' WHERE seq = $1")
        .bind(seq)
        .execute(&mut db)
        .await
        .expect("edit the event");
    let (intact, report) = fleet.verify();
    assert!(!intact, "{report}");
    assert!(report.contains(&format!("seq {seq}")), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_bound_counts_every_replicas_jobs() {
    let _machine = crate::helpers::machine_alone().await;
    // Upstream answers slowly: every job stays pending while the test submits.
    let fake = start_fake_with(FakeOptions {
        faults: Faults {
            latency_ms: 10_000,
            ..Faults::default()
        },
        ..FakeOptions::default()
    })
    .await;
    let Some(fleet) = Fleet::start(2, &fake, &[("TOKEN_BROKER_QUEUE__MAX_PENDING", "4")]).await
    else {
        return;
    };
    let clients = fleet.clients().await;
    let mut accepted = 0;
    let mut refused = 0;
    for n in 0..8 {
        let mut client = clients[n % 2].clone();
        match client.submit_exchange(new_request(&fake, "app")).await {
            Ok(_) => accepted += 1,
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
                refused += 1;
            }
        }
    }
    assert_eq!((accepted, refused), (4, 4), "one bound for the whole queue");
}

/// Replicas sharing a signing key sign the one chain in turn: their checkpoints link to each
/// other's, and the whole fleet's trail verifies against the public key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_chain_their_signed_checkpoints_into_one() {
    let _machine = crate::helpers::machine_shared().await;
    let keys = tempfile::tempdir().expect("temp dir");
    let key = keys.path().join("signing.key");
    let public = keys.path().join("signing.key.pub");
    let keygen = Command::new(env!("CARGO_BIN_EXE_token-broker"))
        .args(["audit", "keygen", "--out"])
        .arg(&key)
        .output()
        .expect("run audit keygen");
    assert!(keygen.status.success(), "{keygen:?}");
    let fake = start_fake_with(FakeOptions::default()).await;
    let key_path = key.to_str().expect("utf-8 path");
    let Some(fleet) = Fleet::start(
        3,
        &fake,
        &[
            ("TOKEN_BROKER_AUDIT__SIGNING_KEY_FILE", key_path),
            ("TOKEN_BROKER_AUDIT__CHECKPOINT_INTERVAL_SECS", "1"),
        ],
    )
    .await
    else {
        return;
    };
    let clients = fleet.clients().await;
    // Work on every replica while each signs every second, until several checkpoints stand.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut n = 0;
    loop {
        let mut client = clients[n % 3].clone();
        let job = exchange_within(&mut client, new_request(&fake, "app"), PATIENCE).await;
        assert_eq!(job.state(), JobState::Succeeded);
        n += 1;
        let mut conn = fleet.connect().await;
        let (signed,): (i64,) = sqlx::query_as("SELECT count(*) FROM audit_checkpoints")
            .fetch_one(&mut conn)
            .await
            .expect("count checkpoints");
        if signed >= 6 && n >= 30 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {signed} checkpoints signed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let output = Command::new(env!("CARGO_BIN_EXE_token-broker"))
        .args([
            "audit",
            "verify",
            "--database-url",
            &fleet.url,
            "--public-key",
        ])
        .arg(&public)
        .output()
        .expect("run audit verify");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{report}{output:?}");
    assert!(report.contains("signatures verified"), "{report}");
}

/// A submission starts its first attempt at once only if no job of any replica waits: the
/// writer checks in its turn, whatever its replica last saw. Replica 1 has seen nothing when
/// replica 0 holds a waiting job, so it asks to start; the check queues the job instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_waiting_on_one_replica_holds_back_starts_on_another() {
    let _machine = crate::helpers::machine_shared().await;
    let fake = start_fake_with(FakeOptions::default()).await;
    // slow-app may send once per second, fleet-wide; other clients have no limit.
    let Some(fleet) = Fleet::start(
        2,
        &fake,
        &[(
            "TOKEN_BROKER_LIMITS__CLIENT",
            r#"[{client_id="slow-app",rps=1,burst=1}]"#,
        )],
    )
    .await
    else {
        return;
    };
    let clients = fleet.clients().await;
    let (first, mut second) = (clients[0].clone(), clients[1].clone());
    let submit = |client: &TokenBrokerClient<Channel>, client_id: &str| {
        let mut client = client.clone();
        let request = new_request(&fake, client_id);
        async move {
            client
                .submit_exchange(request)
                .await
                .expect("accepted")
                .into_inner()
        }
    };

    let alone = submit(&second, "other-app").await;
    assert_eq!(alone.state(), JobState::Running, "nothing waits: it starts");
    // The second of slow-app's jobs waits a second for its permit, on replica 0's side.
    let paced = [
        submit(&first, "slow-app").await,
        submit(&first, "slow-app").await,
    ];
    let behind = submit(&second, "other-app").await;
    assert_eq!(
        behind.state(),
        JobState::Queued,
        "a job of replica 0 waits: replica 1's submission queues behind it"
    );

    let ids: Vec<String> = [&alone, &paced[0], &paced[1], &behind]
        .iter()
        .map(|job| job.job_id.clone())
        .collect();
    for job in wait_all_terminal(&mut second, &ids, PATIENCE).await {
        assert_eq!(job.state(), JobState::Succeeded, "{job:?}");
    }
    let mut db = fleet.connect().await;
    for (job, started_at_once) in [(&alone, true), (&behind, false)] {
        let detail: Option<String> = sqlx::query_scalar(
            "SELECT detail FROM audit_events WHERE job_id = $1 AND kind = 'attempt.started'",
        )
        .bind(&job.job_id)
        .fetch_one(&mut db)
        .await
        .expect("an attempt started");
        assert_eq!(
            detail
                .as_deref()
                .is_some_and(|detail| detail.starts_with("started at submission")),
            started_at_once,
            "{detail:?}"
        );
    }
}
