//! The store's behaviour on both databases: each test here runs once on a SQLite file and once
//! on a fresh PostgreSQL database (skipped loudly without one, a failure under CI), through the
//! real gRPC server, so that what callers and auditors see does not depend on the backend.
//! Plus what only a server database can do: go away and come back.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use token_broker::{
    api::proto::{
        CreateCheckpointRequest, FailureReason, GetJobRequest, JobState, ListAuditEventsRequest,
        SubmitExchangeRequest, VerifyAuditLogRequest, audit_log_client::AuditLogClient,
    },
    config::Config,
    tools::fake_upstream::{Faults, Scripted},
};
use tokio::{net::TcpListener, task::JoinSet};
use tonic::Code;

use crate::{
    helpers::{PATIENCE, TestApp, start_up_error},
    postgres::fresh_database,
};

/// Which database a test runs on.
#[derive(Debug, Clone, Copy)]
enum Backend {
    Sqlite,
    Postgres,
}

/// Starts a daemon on `backend`, with the test configuration `adjust` changes. `None` when the
/// backend is PostgreSQL and there is none (the skip is printed).
async fn spawn(backend: Backend, adjust: impl FnOnce(&mut Config)) -> Option<TestApp> {
    let url = match backend {
        Backend::Sqlite => None,
        Backend::Postgres => Some(fresh_database().await?),
    };
    Some(
        TestApp::spawn_with(|config| {
            if let Some(url) = url {
                use_postgres(config, url);
            }
            adjust(config);
        })
        .await,
    )
}

/// Points `config` at `url`, with key files beside its (unused) SQLite path, made the way
/// `keys init` makes them.
fn use_postgres(config: &mut Config, url: String) {
    let dir = config
        .storage
        .path
        .parent()
        .expect("the test database's directory")
        .to_path_buf();
    config.storage.url = Some(url);
    config.security.key_file = dir.join("broker.key");
    config.audit.fingerprint_key_file = dir.join("fingerprint.key");
    token_broker::security::crypto::KeyRing::load_or_create(&config.key_file_path())
        .expect("key file");
    token_broker::audit::fingerprint::Fingerprinter::load_or_create(&config.fingerprint_key_path())
        .expect("fingerprint key file");
}

/// Runs `test` on SQLite and on PostgreSQL, as two tests.
macro_rules! on_both {
    ($name:ident, $test:expr) => {
        mod $name {
            use super::*;

            #[tokio::test]
            async fn sqlite() {
                ($test)(Backend::Sqlite).await
            }

            #[tokio::test]
            async fn postgres() {
                ($test)(Backend::Postgres).await
            }
        }
    };
}

/// The store of `app`'s database, opened read-only as the auditors' tools open it.
async fn read_only_store(app: &TestApp) -> token_broker::store::Store {
    use token_broker::store::Store;
    match &app.config.storage.url {
        Some(url) => Store::open_read_only_url(url).await,
        None => Store::open_read_only(&app.db_path()).await,
    }
    .expect("read-only store")
}

/// Upstream answers after ten seconds: a job that started stays pending (running).
fn answer_slowly(app: &TestApp) {
    app.fake.set_faults(Faults {
        latency_ms: 10_000,
        ..Faults::default()
    });
}

/// The trail of a job that succeeded at its first attempt.
const SUCCEEDED_AT_ONCE: [&str; 4] = [
    "job.submitted",
    "attempt.started",
    "attempt.finished",
    "job.succeeded",
];

async fn audit_kinds(app: &TestApp, job_id: &str) -> Vec<String> {
    let mut client = AuditLogClient::connect(format!("http://{}", app.grpc_addr))
        .await
        .expect("connect");
    client
        .list_audit_events(ListAuditEventsRequest {
            job_id: job_id.to_string(),
            page_size: 100,
            ..Default::default()
        })
        .await
        .expect("list events")
        .into_inner()
        .events
        .into_iter()
        .map(|event| event.kind)
        .collect()
}

async fn verified(app: &TestApp) -> bool {
    let mut client = AuditLogClient::connect(format!("http://{}", app.grpc_addr))
        .await
        .expect("connect");
    let report = client
        .verify_audit_log(VerifyAuditLogRequest::default())
        .await
        .expect("verify")
        .into_inner();
    assert!(report.ok, "{report:?}");
    report.ok
}

/// A count read with SQL from the daemon's database (`sql` takes no parameter, so the same
/// text serves both), as an operator would.
async fn count_in_db(config: &Config, sql: &'static str) -> i64 {
    use sqlx::Connection;
    match &config.storage.url {
        Some(url) => {
            let mut db = sqlx::PgConnection::connect(url).await.expect("connect");
            sqlx::query_scalar(sql).fetch_one(&mut db).await.expect(sql)
        }
        None => {
            let mut db = crate::helpers::read_only(&config.storage.path).await;
            sqlx::query_scalar(sql).fetch_one(&mut db).await.expect(sql)
        }
    }
}

const DELIVERIES: &str = "SELECT COUNT(*) FROM token_deliveries";

/// What the database holds of `job_id`'s token: the job's state, whether its token is held,
/// and how many deliveries are noted (of any job), read with SQL as an operator would.
async fn token_rows(app: &TestApp, job_id: &str) -> (String, bool, i64) {
    use sqlx::Connection;
    const JOB_PG: &str = "SELECT state, access_token IS NOT NULL FROM jobs WHERE job_id = $1";
    const JOB_SQLITE: &str = "SELECT state, access_token IS NOT NULL FROM jobs WHERE job_id = ?1";
    let (state, held): (String, bool) = match &app.config.storage.url {
        Some(url) => {
            let mut db = sqlx::PgConnection::connect(url).await.expect("connect");
            sqlx::query_as(JOB_PG)
                .bind(job_id)
                .fetch_one(&mut db)
                .await
                .expect("the job")
        }
        None => {
            let mut db = crate::helpers::read_only(&app.db_path()).await;
            sqlx::query_as(JOB_SQLITE)
                .bind(job_id)
                .fetch_one(&mut db)
                .await
                .expect("the job")
        }
    };
    (state, held, count_in_db(&app.config, DELIVERIES).await)
}

/// Polls the database until `done` holds for `job_id`'s rows; returns them.
async fn wait_token_rows(
    app: &TestApp,
    job_id: &str,
    done: impl Fn(&(String, bool, i64)) -> bool,
) -> (String, bool, i64) {
    tokio::time::timeout(PATIENCE, async {
        loop {
            let rows = token_rows(app, job_id).await;
            if done(&rows) {
                return rows;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the rows reach the expected state")
}

/// With no retention, a delivered token is erased by the next sweep and its delivery
/// forgotten; a token never delivered stays (until it expires).
async fn token_retention(backend: Backend) {
    let Some(mut app) = spawn(backend, |config| config.security.token_retention_secs = 0).await
    else {
        return;
    };
    let kept = app.submit(app.new_request("app")).await.job_id;
    // Its outcome, read without delivering its token (GetJob would deliver it).
    wait_token_rows(&app, &kept, |(state, _, _)| state == "succeeded").await;
    let delivered = app.exchange(app.new_request("app")).await;
    assert!(delivered.token.is_some(), "delivered once");
    let (state, held, noted) = wait_token_rows(&app, &delivered.job_id, |(_, held, _)| !held).await;
    assert_eq!(state, "succeeded", "the outcome stays");
    assert!(!held);
    // The sweep that erased it (after the first job's success) forgot the delivery with it.
    assert_eq!(noted, 0, "the erased token's delivery is forgotten");
    let (_, held, _) = token_rows(&app, &kept).await;
    assert!(held, "a token never delivered is kept");
    // Delivered now: erased in turn.
    assert!(app.get(&kept).await.token.is_some());
    wait_token_rows(&app, &kept, |(_, held, noted)| !held && *noted == 0).await;
}

on_both!(token_retention_is_the_same, token_retention);

/// A job deleted by hand takes its noted delivery with it: on SQLite the next job may take its
/// id (the newest job's id is free again once it is deleted), and must not be taken for
/// delivered.
async fn deleted_jobs_deliveries(backend: Backend) {
    use sqlx::Connection;
    // A retention the daemon's own sweeps do not reach while the test runs.
    let Some(mut app) = spawn(backend, |config| {
        config.security.token_retention_secs = 30 * 86_400
    })
    .await
    else {
        return;
    };
    let deleted = app.exchange(app.new_request("app")).await;
    assert!(deleted.token.is_some(), "delivered");
    wait_token_rows(&app, &deleted.job_id, |(_, _, noted)| *noted == 1).await;
    match &app.config.storage.url {
        Some(url) => {
            let mut db = sqlx::PgConnection::connect(url).await.expect("connect");
            sqlx::query("DELETE FROM jobs WHERE job_id = $1")
                .bind(&deleted.job_id)
                .execute(&mut db)
                .await
                .expect("delete the job");
        }
        None => {
            let url = format!("sqlite://{}", app.db_path().display());
            let mut db = sqlx::SqliteConnection::connect(&url)
                .await
                .expect("connect");
            sqlx::query("DELETE FROM jobs WHERE job_id = ?1")
                .bind(&deleted.job_id)
                .execute(&mut db)
                .await
                .expect("delete the job");
        }
    }
    // A job whose token is never delivered, in the deleted one's place.
    let kept = app.submit(app.new_request("app")).await.job_id;
    wait_token_rows(&app, &kept, |(state, _, _)| state == "succeeded").await;
    let (config, _fake, _dir) = app.stop().await;
    let store = crate::helpers::open_store(&config).await;
    let erased = store
        .erase_tokens(token_broker::domain::job::UnixMillis::now(), Duration::ZERO)
        .await
        .expect("erase");
    assert_eq!(erased, 0, "no delivered token is held");
    const HELD: &str = "SELECT COUNT(*) FROM jobs WHERE access_token IS NOT NULL";
    assert_eq!(
        count_in_db(&config, HELD).await,
        1,
        "the undelivered token stays"
    );
    assert_eq!(count_in_db(&config, DELIVERIES).await, 0);
}

on_both!(
    a_deleted_jobs_delivery_goes_with_it,
    deleted_jobs_deliveries
);

/// One sweep erases a backlog of delivered tokens larger than a batch, however many batches it
/// takes (up to its bound), and forgets their deliveries.
async fn erasure_keeps_up(backend: Backend) {
    // A retention the daemon's own sweeps do not reach while the test runs.
    let Some(app) = spawn(backend, |config| {
        config.security.token_retention_secs = 30 * 86_400
    })
    .await
    else {
        return;
    };
    crate::helpers::exchange_in_turns(&app, 12, 100).await;
    tokio::time::timeout(PATIENCE, async {
        while count_in_db(&app.config, DELIVERIES).await < 1_200 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the 1,200 deliveries are noted");
    let (config, _fake, _dir) = app.stop().await;
    const HELD: &str = "SELECT COUNT(*) FROM jobs WHERE access_token IS NOT NULL";
    assert_eq!(count_in_db(&config, HELD).await, 1_200);
    let store = crate::helpers::open_store(&config).await;
    let erased = store
        .erase_tokens(token_broker::domain::job::UnixMillis::now(), Duration::ZERO)
        .await
        .expect("erase");
    assert_eq!(erased, 1_200, "more than two batches of 500, in one sweep");
    assert_eq!(count_in_db(&config, HELD).await, 0);
    assert_eq!(count_in_db(&config, DELIVERIES).await, 0, "all forgotten");
}

on_both!(one_sweep_erases_more_than_a_batch, erasure_keeps_up);

/// Checkpoints signed on request chain to each other and verify against the public key, on
/// either database (on PostgreSQL inside the writer's turn on the chain).
async fn signed_checkpoints(backend: Backend) {
    let mut public = None;
    let Some(mut app) = spawn(backend, |config| {
        let dir = config
            .storage
            .path
            .parent()
            .expect("a directory")
            .to_path_buf();
        let key = dir.join("signing.key");
        let signing = token_broker::audit::checkpoint::SigningKey::generate(&key).expect("keygen");
        public = Some(signing.public_key().to_string());
        config.audit.signing_key_file = key;
        config.audit.checkpoint_interval_secs = 86_400;
    })
    .await
    else {
        return;
    };
    let mut audit = AuditLogClient::connect(format!("http://{}", app.grpc_addr))
        .await
        .expect("connect");
    let mut checkpoints = Vec::new();
    for count in [2, 1] {
        for _ in 0..count {
            let job = app.exchange(app.new_request("app")).await;
            assert_eq!(job.state(), JobState::Succeeded);
        }
        let signed = audit
            .create_checkpoint(CreateCheckpointRequest::default())
            .await
            .expect("a checkpoint")
            .into_inner();
        assert!(signed.created);
        checkpoints.push(signed.checkpoint.expect("the checkpoint"));
    }
    assert_eq!(checkpoints[0].seq, 8);
    assert_eq!(checkpoints[1].seq, 12);
    assert_eq!(checkpoints[1].prev_signature, checkpoints[0].signature);
    let report = audit
        .verify_audit_log(VerifyAuditLogRequest {
            public_keys: vec![public.expect("a public key")],
            checkpoints: checkpoints.clone(),
        })
        .await
        .expect("verify")
        .into_inner();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.checkpoints_checked, 4);
    assert_eq!(report.last_checkpoint.as_ref(), checkpoints.last());
}

on_both!(signed_checkpoints_chain_and_verify, signed_checkpoints);

async fn exchange_idempotency_and_the_trail(backend: Backend) {
    let Some(mut app) = spawn(backend, |_| {}).await else {
        return;
    };
    let request = SubmitExchangeRequest {
        idempotency_key: "sign-in-1".into(),
        ..app.new_request("app")
    };
    let job = app.exchange(request.clone()).await;
    assert_eq!(job.state(), JobState::Succeeded);
    assert!(
        job.token
            .as_ref()
            .is_some_and(|t| !t.access_token.is_empty())
    );
    // The same submission again is the same job, the code not presented again.
    let again = app.exchange(request.clone()).await;
    assert_eq!(again.job_id, job.job_id);
    assert_eq!(app.fake.stats().token_requests, 1);
    // The key with other contents is refused.
    let reused = app
        .client
        .submit_exchange(SubmitExchangeRequest {
            state: "another".into(),
            ..request
        })
        .await
        .expect_err("a reused key");
    assert_eq!(reused.code(), Code::AlreadyExists);
    assert_eq!(audit_kinds(&app, &job.job_id).await, SUCCEEDED_AT_ONCE);
    assert!(verified(&app).await);
}
on_both!(
    exchange_idempotency_and_the_trail_are_the_same,
    exchange_idempotency_and_the_trail
);

/// With nothing waiting, an unlimited client's submission is committed running, its first
/// attempt started; while a rate-limited client's job waits, it queues behind it; once
/// nothing waits, submissions start at once again. One worker slot: a start that kept its
/// slot would leave none for the last submission.
async fn starting_at_submission(backend: Backend) {
    let Some(mut app) = spawn(backend, |config| {
        config.worker.concurrency = 1;
        config.limits.client = vec![token_broker::config::ClientLimit {
            client_id: "slow-app".into(),
            rps: 1,
            burst: 1,
        }];
    })
    .await
    else {
        return;
    };
    let alone = app.submit(app.new_request("other-app")).await;
    assert_eq!(alone.state(), JobState::Running, "nothing waits: it starts");
    assert_eq!(alone.attempts, 1);
    // The second waits a second for slow-app's next permit.
    let paced = [
        app.submit(app.new_request("slow-app")).await,
        app.submit(app.new_request("slow-app")).await,
    ];
    let behind = app.submit(app.new_request("other-app")).await;
    assert_eq!(behind.state(), JobState::Queued, "a job waits: it queues");
    for job in [&alone, &paced[0], &paced[1], &behind] {
        assert_eq!(
            app.wait_terminal(&job.job_id).await.state(),
            JobState::Succeeded
        );
        assert_eq!(audit_kinds(&app, &job.job_id).await, SUCCEEDED_AT_ONCE);
    }
    let later = app.submit(app.new_request("other-app")).await;
    assert_eq!(later.state(), JobState::Running, "nothing waits again");
    app.wait_terminal(&later.job_id).await;
    let scrape = crate::helpers::scrape_metrics(app.ops_addr).await;
    assert_eq!(
        crate::helpers::series(&scrape, "token_broker_jobs_started_at_submission_total"),
        2.0,
        "{scrape}"
    );
    assert!(verified(&app).await);
}
on_both!(starting_at_submission_is_the_same, starting_at_submission);

async fn retries_and_failures(backend: Backend) {
    let Some(mut app) = spawn(backend, |_| {}).await else {
        return;
    };
    app.fake
        .script([Scripted::Status(503), Scripted::Status(500)]);
    let retried = app.exchange(app.new_request("app")).await;
    assert_eq!(retried.state(), JobState::Succeeded);
    assert_eq!(retried.attempts, 3);
    // A code upstream refuses fails fast.
    let mut refused = app.new_request("app");
    refused.code_verifier = token_broker::tools::fake_upstream::new_verifier();
    let failed = app.exchange(refused).await;
    assert_eq!(failed.state(), JobState::Failed);
    assert_eq!(failed.failure_reason(), FailureReason::Forbidden);
    assert_eq!(failed.attempts, 1);
    assert!(verified(&app).await);
}
on_both!(retries_and_failures_are_the_same, retries_and_failures);

/// The console's queries: newest-first pages, the failure-reason filter, outcome counts and
/// the incremental verification, through a read-only store as the console opens it.
async fn console_queries(backend: Backend) {
    use token_broker::{
        audit::ChainVerifier,
        domain::job::{FailureReason, JobState},
        store::JobQuery,
    };
    let Some(mut app) = spawn(backend, |_| {}).await else {
        return;
    };
    let mut ids = Vec::new();
    for client in ["app", "app", "other", "app"] {
        ids.push(app.exchange(app.new_request(client)).await.job_id);
    }
    let mut refused = app.new_request("app");
    refused.code_verifier = token_broker::tools::fake_upstream::new_verifier();
    let failed = app.exchange(refused).await.job_id;
    let store = read_only_store(&app).await;
    let page = |query: JobQuery| {
        let store = store.clone();
        async move {
            let page = store.list_jobs(&query).await.expect("list");
            let ids: Vec<String> = page
                .items
                .iter()
                .map(|(_, job)| job.id.to_string())
                .collect();
            (ids, page.next)
        }
    };
    // Newest first, two at a time, for one client: the pages continue below their last row.
    let query = JobQuery {
        client_id: Some("app".into()),
        newest_first: true,
        limit: 2,
        ..JobQuery::default()
    };
    let (first, next) = page(query.clone()).await;
    assert_eq!(first, [failed.clone(), ids[3].clone()]);
    let (second, next) = page(JobQuery {
        after: next,
        ..query.clone()
    })
    .await;
    assert_eq!(second, [ids[1].clone(), ids[0].clone()]);
    let (third, _) = page(JobQuery {
        after: next,
        ..query
    })
    .await;
    assert!(third.is_empty(), "{third:?}");
    // Every job, newest first, and only the refused one by its reason.
    let (all, _) = page(JobQuery {
        newest_first: true,
        limit: 100,
        ..JobQuery::default()
    })
    .await;
    assert_eq!(all.first(), Some(&failed));
    assert_eq!(all.len(), 5);
    let (forbidden, _) = page(JobQuery {
        failure_reason: Some(FailureReason::Forbidden),
        limit: 100,
        ..JobQuery::default()
    })
    .await;
    assert_eq!(forbidden, [failed]);
    // Outcomes per hour.
    let counts = store
        .outcome_counts(&JobQuery::default(), 3_600_000)
        .await
        .expect("outcome counts");
    let total = |state| -> u64 {
        counts
            .iter()
            .filter(|count| count.state == state)
            .map(|count| count.jobs)
            .sum()
    };
    assert_eq!(
        (total(JobState::Succeeded), total(JobState::Failed)),
        (4, 1)
    );
    assert!(counts.iter().all(|count| count.bucket.0 % 3_600_000 == 0));
    // Verification continues where it stopped.
    let mut verifier = ChainVerifier::new();
    let report = store
        .continue_verification(&mut verifier)
        .await
        .expect("verify");
    assert!(report.ok, "{report:?}");
    let checked = report.events_checked;
    app.exchange(app.new_request("app")).await;
    let report = store
        .continue_verification(&mut verifier)
        .await
        .expect("verify");
    assert!(report.ok, "{report:?}");
    assert_eq!(report.events_checked, checked + 4);
}
on_both!(console_queries_are_the_same, console_queries);

/// A time range lists exactly the events at or after its start and before its end, whatever
/// the ends (the store bisects the chain on seq: event times never decrease along it), for
/// the whole trail, a client's and a job's.
async fn event_time_ranges(backend: Backend) {
    use token_broker::{domain::job::UnixMillis, store::EventQuery};
    let Some(mut app) = spawn(backend, |_| {}).await else {
        return;
    };
    let mut jobs = Vec::new();
    for client in ["app", "other", "app", "app", "other", "app"] {
        jobs.push(app.exchange(app.new_request(client)).await.job_id);
        // Some events a millisecond or more apart, so that ranges split the trail.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let store = read_only_store(&app).await;
    let list = |query: EventQuery| {
        let store = store.clone();
        async move {
            let page = store.list_events(&query).await.expect("list events");
            assert!(page.next.is_none(), "one page holds them all");
            page.items
                .into_iter()
                .map(|event| event.seq)
                .collect::<Vec<_>>()
        }
    };
    let all = store
        .list_events(&EventQuery {
            limit: 1000,
            ..Default::default()
        })
        .await
        .expect("every event")
        .items;
    assert_eq!(all.len(), 6 * 4, "four events per exchange");
    let mut times: Vec<i64> = all.iter().map(|event| event.at).collect();
    times.dedup();
    assert!(times.len() >= 6, "events at several times: {times:?}");
    // Every distinct time, one before the first and one after the last, as either end.
    let mut ends = vec![times[0] - 1];
    ends.extend(&times);
    ends.push(times[times.len() - 1] + 1);
    let (client, job) = ("other".to_string(), jobs[2].clone());
    for &from in &ends {
        for &to in &ends {
            for (client_id, job_id) in [(None, None), (Some(&client), None), (None, Some(&job))] {
                let expected: Vec<i64> = all
                    .iter()
                    .filter(|event| event.at >= from && event.at < to)
                    .filter(|event| client_id.is_none_or(|id| &event.client_id == id))
                    .filter(|event| job_id.is_none_or(|id| &event.job_id == id))
                    .map(|event| event.seq)
                    .collect();
                let listed = list(EventQuery {
                    after: Some(UnixMillis(from)),
                    before: Some(UnixMillis(to)),
                    client_id: client_id.cloned(),
                    job_id: job_id.cloned(),
                    limit: 1000,
                    ..Default::default()
                })
                .await;
                assert_eq!(listed, expected, "[{from}, {to}) {client_id:?} {job_id:?}");
            }
        }
    }
    // One end only.
    let middle = times[times.len() / 2];
    let later: Vec<i64> = all
        .iter()
        .filter(|e| e.at >= middle)
        .map(|e| e.seq)
        .collect();
    let earlier: Vec<i64> = all
        .iter()
        .filter(|e| e.at < middle)
        .map(|e| e.seq)
        .collect();
    let after = |at| EventQuery {
        after: Some(UnixMillis(at)),
        limit: 1000,
        ..Default::default()
    };
    assert_eq!(list(after(middle)).await, later);
    let before = EventQuery {
        before: Some(UnixMillis(middle)),
        limit: 1000,
        ..Default::default()
    };
    assert_eq!(list(before).await, earlier);
    store.close().await;
}

on_both!(event_time_ranges_are_exact, event_time_ranges);

async fn cancellation_and_bounds(backend: Backend) {
    // One request a second: submissions stay queued.
    let Some(mut app) = spawn(backend, |config| {
        config.limits.global_rps = 1;
        config.limits.global_burst = 1;
        config.queue.max_pending = 3;
    })
    .await
    else {
        return;
    };
    answer_slowly(&app);
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(app.submit(app.new_request("app")).await.job_id);
    }
    let full = app
        .client
        .submit_exchange(app.new_request("app"))
        .await
        .expect_err("the queue is full");
    assert_eq!(full.code(), Code::ResourceExhausted);
    // The newest is still queued (one permit a second, the first to the oldest).
    let cancelled = app.cancel(&ids[2]).await.expect("cancel a queued job");
    assert_eq!(cancelled.state(), JobState::Cancelled);
    // Its place in the queue is free again.
    app.submit(app.new_request("app")).await;
    let missing = app
        .client
        .get_job(GetJobRequest {
            job_id: token_broker::domain::job::JobId::new().to_string(),
        })
        .await
        .expect_err("no such job");
    assert_eq!(missing.code(), Code::NotFound);
    assert!(verified(&app).await);
}
on_both!(
    cancellation_and_bounds_are_the_same,
    cancellation_and_bounds
);

async fn client_bound(backend: Backend) {
    let Some(mut app) = spawn(backend, |config| {
        config.queue.max_pending_clients = 2;
    })
    .await
    else {
        return;
    };
    answer_slowly(&app);
    app.submit(app.new_request("a")).await;
    app.submit(app.new_request("b")).await;
    let third = app
        .client
        .submit_exchange(app.new_request("c"))
        .await
        .expect_err("a third client id");
    assert_eq!(third.code(), Code::ResourceExhausted);
    // A client id with jobs pending goes on.
    app.submit(app.new_request("a")).await;
}
on_both!(the_client_bound_is_the_same, client_bound);

async fn restarts(backend: Backend) {
    let Some(mut app) = spawn(backend, |config| {
        config.limits.global_rps = 1;
        config.limits.global_burst = 1;
    })
    .await
    else {
        return;
    };
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(app.submit(app.new_request("app")).await.job_id);
    }
    let (mut config, fake, dir) = app.stop().await;
    config.limits.global_rps = 0;
    let mut app = TestApp::start(config.clone(), fake, Arc::clone(&dir)).await;
    for id in &ids {
        assert_eq!(app.wait_terminal(id).await.state(), JobState::Succeeded);
    }
    assert!(verified(&app).await);
    let (mut config, _, _) = app.stop().await;
    // Another key file opens none of the stored secrets: the daemon refuses to start.
    config.security.key_file = dir.path().join("another.key");
    token_broker::security::crypto::KeyRing::load_or_create(&config.key_file_path())
        .expect("another key file");
    let error = start_up_error(config).await;
    assert!(error.contains("do not open the stored secrets"), "{error}");
}
on_both!(restarts_keep_every_job_and_refuse_a_wrong_key, restarts);

/// A TCP proxy in front of the database, which the test can cut and restore: the database
/// going away (a restart, a fail-over) as the daemon sees it.
struct Cable {
    addr: SocketAddr,
    connected: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Cable {
    async fn to(target: SocketAddr) -> Cable {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (connected, _) = tokio::sync::watch::channel(true);
        let connected = Arc::new(connected);
        let state = Arc::clone(&connected);
        tokio::spawn(async move {
            let mut links = JoinSet::new();
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if !*state.borrow() {
                    continue; // dropped: refused
                }
                let mut cut = state.subscribe();
                links.spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Cable { addr, connected }
    }

    fn cut(&self) {
        self.connected.send_replace(false);
    }

    fn restore(&self) {
        self.connected.send_replace(true);
    }
}

async fn readyz(app: &TestApp) -> u16 {
    reqwest::get(format!("http://{}/readyz", app.ops_addr))
        .await
        .expect("ask /readyz")
        .status()
        .as_u16()
}

async fn wait_readyz(app: &TestApp, status: u16) {
    tokio::time::timeout(PATIENCE, async {
        while readyz(app).await != status {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("/readyz answers {status}"));
}

#[tokio::test]
async fn readiness_follows_the_database_and_work_resumes_when_it_returns() {
    let Some(url) = fresh_database().await else {
        return;
    };
    let mut parsed = url::Url::parse(&url).expect("a URL");
    let target: SocketAddr = format!(
        "{}:{}",
        parsed.host_str().expect("a host"),
        parsed.port().unwrap_or(5432)
    )
    .parse()
    .expect("an address");
    let cable = Cable::to(target).await;
    parsed.set_port(Some(cable.addr.port())).expect("a port");
    let mut app = TestApp::spawn_with(|config| {
        use_postgres(config, parsed.to_string());
        config.storage.statement_timeout_ms = 1_000;
    })
    .await;
    assert_eq!(
        app.exchange(app.new_request("app")).await.state(),
        JobState::Succeeded
    );
    assert_eq!(readyz(&app).await, 200);

    cable.cut();
    wait_readyz(&app, 503).await;
    // A submission meanwhile is refused as unavailable, not lost: the caller may retry.
    let refused = app
        .client
        .submit_exchange(app.new_request("app"))
        .await
        .expect_err("no database");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");

    cable.restore();
    wait_readyz(&app, 200).await;
    // The writer reconnects by itself.
    let job = tokio::time::timeout(PATIENCE, async {
        loop {
            match app.client.exchange(app.new_request("app")).await {
                Ok(job) => return job.into_inner(),
                Err(status) if status.code() == Code::Unavailable => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(status) => panic!("{status:?}"),
            }
        }
    })
    .await
    .expect("exchanges work again");
    assert_eq!(job.state(), JobState::Succeeded);
    assert!(verified(&app).await);
}

#[tokio::test]
async fn a_429_seen_by_one_replica_slows_the_client_for_every_replica() {
    use token_broker::{
        domain::budget::{Adaptation, Rate, Throttled},
        store::BudgetRequest,
    };
    let Some(url) = fresh_database().await else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = Config::default();
    config.storage.path = dir.path().join("unused.db");
    use_postgres(&mut config, url);
    // Two stores on one database: two replicas as the store sees them.
    let (a, b) = (
        crate::helpers::open_store(&config).await,
        crate::helpers::open_store(&config).await,
    );
    // Slow enough that no permit comes back between the two reservations below.
    let rate = Rate {
        per_second: 2.0,
        burst: 5,
    };
    let adaptation = Adaptation {
        enabled: true,
        decrease_factor: 0.5,
        floor_fraction: 0.05,
        quiet_period_ms: 60_000,
        recovery_step: 0.1,
        default_pause_ms: 1_000,
    };
    let want = |n| {
        [BudgetRequest {
            client_id: "app".into(),
            rate: Some(rate),
            want: n,
        }]
    };
    // The burst is shared: what one replica takes, the other does not get.
    let first = a.reserve_budget(&want(4), None, &adaptation).await.unwrap();
    let second = b.reserve_budget(&want(4), None, &adaptation).await.unwrap();
    assert_eq!(first.grants[0].granted + second.grants[0].granted, 5);
    assert!(second.grants[0].client_retry_at.is_some());
    // Replica a sees a 429 asking for 2 s: replica b is paused too, and the rate is halved.
    let throttled = a
        .throttle_budget("app", rate, &adaptation, Some(2_000))
        .await
        .unwrap();
    assert_eq!(throttled, Some(Throttled::Lowered { from: 2.0, to: 1.0 }));
    let paused = b.reserve_budget(&want(1), None, &adaptation).await.unwrap();
    assert_eq!(paused.grants[0].granted, 0);
    let until = paused.grants[0].client_retry_at.expect("paused");
    let now = token_broker::domain::job::UnixMillis::now();
    assert!(
        until.0 - now.0 > 1_000 && until.0 - now.0 <= 2_100,
        "paused until {} ms from now",
        until.0 - now.0
    );
    // An unlimited client never touches the budget.
    let free = b
        .reserve_budget(
            &[BudgetRequest {
                client_id: "free".into(),
                rate: None,
                want: 7,
            }],
            None,
            &adaptation,
        )
        .await
        .unwrap();
    assert_eq!(free.grants[0].granted, 7);
}

#[tokio::test]
async fn a_replica_with_other_keys_refuses_to_start_even_on_an_empty_queue() {
    let Some(app) = spawn(Backend::Postgres, |_| {}).await else {
        return;
    };
    // The first replica wrote the key canaries; no job was ever stored.
    let (config, _, dir) = app.stop().await;
    let mut other_fingerprint = config.clone();
    other_fingerprint.audit.fingerprint_key_file = dir.path().join("other-fingerprint.key");
    token_broker::audit::fingerprint::Fingerprinter::load_or_create(
        &other_fingerprint.fingerprint_key_path(),
    )
    .expect("another fingerprint key");
    let error = start_up_error(other_fingerprint).await;
    assert!(
        error.contains("audit fingerprint key file is not the one"),
        "{error}"
    );
    let mut other_key = config.clone();
    other_key.security.key_file = dir.path().join("other.key");
    token_broker::security::crypto::KeyRing::load_or_create(&other_key.key_file_path())
        .expect("another key file");
    let error = start_up_error(other_key).await;
    assert!(
        error.contains("encryption key file is not the one"),
        "{error}"
    );
    // The right keys still start.
    let fake = crate::helpers::start_fake().await;
    let mut config = config;
    config.upstream.token_url = fake.token_url();
    let mut app = TestApp::start(config, fake, dir).await;
    assert_eq!(
        app.exchange(app.new_request("app")).await.state(),
        JobState::Succeeded
    );
}

/// The queue counts the triggers keep agree with a count of the jobs themselves.
async fn counts_agree(db: &mut sqlx::PgConnection) {
    let kept: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT scope, key, pending FROM queue_counts WHERE pending <> 0 ORDER BY scope, key",
    )
    .fetch_all(&mut *db)
    .await
    .expect("read the counts");
    let counted: Vec<(String, String, i64)> = sqlx::query_as(
        "WITH p AS (SELECT * FROM jobs WHERE state IN ('queued', 'retry_wait', 'running'))
         SELECT * FROM (
             SELECT 'client' AS scope, client_id AS key, COUNT(*) AS pending FROM p GROUP BY client_id
             UNION ALL SELECT 'clients', '', COUNT(DISTINCT client_id) FROM p
             UNION ALL SELECT 'tenant', tenant, COUNT(*) FROM p GROUP BY tenant
             UNION ALL SELECT 'total', '', COUNT(*) FROM p
         ) AS c WHERE pending <> 0 ORDER BY scope, key",
    )
    .fetch_all(&mut *db)
    .await
    .expect("count the jobs");
    assert_eq!(kept, counted);
}

/// Runs `sql` by hand with `job_ids` bound in order (what `what` says it does), then checks
/// that the counts still agree with the jobs.
async fn edit(db: &mut sqlx::PgConnection, sql: &'static str, job_ids: &[&str], what: &str) {
    let mut query = sqlx::query(sql);
    for job_id in job_ids {
        query = query.bind(job_id.to_string());
    }
    query.execute(&mut *db).await.expect(what);
    counts_agree(db).await;
}

#[tokio::test]
async fn the_queue_counts_follow_edits_and_deletions_by_hand() {
    use sqlx::Connection;
    let Some(mut app) = spawn(Backend::Postgres, |_| {}).await else {
        return;
    };
    answer_slowly(&app);
    let first = app.submit(app.new_request("a")).await.job_id;
    let second = app.submit(app.new_request("a")).await.job_id;
    let url = app.config.storage.url.clone().expect("a PostgreSQL test");
    let mut db = sqlx::PgConnection::connect(&url).await.expect("connect");
    counts_agree(&mut db).await;
    edit(
        &mut db,
        "UPDATE jobs SET client_id = 'b' WHERE job_id = $1",
        &[&first],
        "move a job to another client id",
    )
    .await;
    edit(
        &mut db,
        "DELETE FROM jobs WHERE job_id = $1",
        &[&second],
        "delete a job",
    )
    .await;
    // Statements that change several jobs at once: each count changes once per statement.
    let third = app.submit(app.new_request("a")).await.job_id;
    let fourth = app.submit(app.new_request("a")).await.job_id;
    counts_agree(&mut db).await;
    edit(
        &mut db,
        "UPDATE jobs SET client_id = 'c' WHERE job_id IN ($1, $2)",
        &[&first, &third],
        "move two jobs to a third client id",
    )
    .await;
    edit(
        &mut db,
        "UPDATE jobs SET tenant = 't2', state = 'cancelled' WHERE job_id IN ($1, $2)",
        &[&third, &fourth],
        "end two jobs",
    )
    .await;
    edit(
        &mut db,
        "DELETE FROM jobs WHERE job_id IN ($1, $2)",
        &[&first, &fourth],
        "delete two jobs",
    )
    .await;
    let left: Vec<(String, i64)> =
        sqlx::query_as("SELECT key, pending FROM queue_counts WHERE scope = 'client'")
            .fetch_all(&mut db)
            .await
            .expect("read the client rows");
    assert_eq!(left, [], "a client id with no pending job keeps no row");
}

/// A PostgreSQL database whose queue counts the previous release's row trigger kept (schema up
/// to migration 8) goes on with the same counts under the statement triggers of migration 9,
/// and its noted deliveries move to their own table (migration 10).
#[tokio::test]
async fn a_database_from_before_migration_9_carries_its_counts_and_deliveries_over() {
    use sqlx::Connection;
    let Some(url) = fresh_database().await else {
        return;
    };
    let mut db = sqlx::PgConnection::connect(&url).await.expect("connect");
    sqlx::migrate!("./migrations/postgres")
        .run_to(20261128000008, &mut db)
        .await
        .expect("the previous release's schema");
    // Jobs the previous release left: two waiting for a retry a day from now, one finished.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let later = now + 86_400_000;
    sqlx::query(
        "INSERT INTO jobs (job_id, tenant, client_id, idempotency_key, request_digest,
                           state_param, state, created_at, updated_at, next_attempt_at, expires_at)
         VALUES ('old-1', 'legacy', 'a', 'k1', 'd', 's', 'retry_wait', $1, $1, $2, $2),
                ('old-2', 'legacy', 'b', 'k2', 'd', 's', 'retry_wait', $1, $1, $2, $2),
                ('old-3', 'legacy', 'a', 'k3', 'd', 's', 'succeeded', $1, $1, NULL, $2)",
    )
    .bind(now)
    .bind(later)
    .execute(&mut db)
    .await
    .expect("the previous release's jobs");
    counts_agree(&mut db).await;
    // And one whose token was delivered and is still held, its delivery noted on its row.
    sqlx::query(
        "INSERT INTO jobs (job_id, tenant, client_id, idempotency_key, request_digest,
                           state_param, state, created_at, updated_at, expires_at,
                           access_token, token_expires_at, token_delivered_at)
         VALUES ('old-4', 'legacy', 'a', 'k4', 'd', 's', 'succeeded', $1, $1, $2,
                 'sealed', $2, $1)",
    )
    .bind(now)
    .bind(later)
    .execute(&mut db)
    .await
    .expect("a delivered token");
    // Migration 10 moves the noted delivery to its own table.
    sqlx::migrate!("./migrations/postgres")
        .run_to(20261128000010, &mut db)
        .await
        .expect("migrations 9 and 10");
    let moved: Vec<(String, i64)> = sqlx::query_as(
        "SELECT jobs.job_id, delivered_at FROM token_deliveries JOIN jobs USING (id)",
    )
    .fetch_all(&mut db)
    .await
    .expect("the deliveries");
    assert_eq!(moved, [("old-4".to_string(), now)]);
    // Its stand-in token is not sealed with the daemon's key, which the daemon checks at
    // start: erased, as retention would.
    sqlx::query("UPDATE jobs SET access_token = NULL WHERE job_id = 'old-4'")
        .execute(&mut db)
        .await
        .expect("erase the stand-in token");
    counts_agree(&mut db).await;

    let mut app = TestApp::spawn_with(|config| use_postgres(config, url.clone())).await;
    let version: i64 = sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations")
        .fetch_one(&mut db)
        .await
        .expect("the applied migrations");
    assert!(
        version >= 20261128000011,
        "the daemon applied the later migrations"
    );
    counts_agree(&mut db).await;
    answer_slowly(&app);
    app.submit(app.new_request("a")).await;
    counts_agree(&mut db).await;
    sqlx::query("UPDATE jobs SET state = 'cancelled' WHERE job_id IN ('old-1', 'old-2')")
        .execute(&mut db)
        .await
        .expect("end the old jobs");
    counts_agree(&mut db).await;
    let pending: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT scope, key, pending FROM queue_counts WHERE scope <> 'tenant' ORDER BY scope, key",
    )
    .fetch_all(&mut db)
    .await
    .expect("read the counts");
    let pending: Vec<(&str, &str, i64)> = pending
        .iter()
        .map(|(scope, key, n)| (scope.as_str(), key.as_str(), *n))
        .collect();
    assert_eq!(
        pending,
        [("client", "a", 1), ("clients", "", 1), ("total", "", 1)],
        "only the new job is pending"
    );
}
