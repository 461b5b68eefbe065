//! What survives a stop: queued jobs, and attempts whose worker died.

use std::sync::Arc;

use token_broker::{
    api::proto::{FailureReason, JobState},
    domain::job::UnixMillis,
    domain::request::{ExchangeRequest, RawExchange},
    store::{AttemptRecord, NewJob, Store},
};

use crate::helpers::{TestApp, audit_kinds, new_request, start_fake, test_config};

#[tokio::test]
async fn a_restart_completes_the_jobs_left_queued() {
    // One request per second: most jobs are still queued when the daemon stops.
    let mut app = TestApp::spawn_one_per_second().await;
    let ids = app.submit_many(4, "client-a").await;
    let (mut config, fake, dir) = app.stop().await;
    let before = fake.stats().token_requests;
    assert!(
        before < 4,
        "some jobs were still queued at the stop ({before} sent)"
    );

    config.limits.global_rps = 0;
    let mut app = TestApp::start(config, fake, dir).await;
    for id in &ids {
        let job = app.wait_terminal(id).await;
        assert_eq!(job.state(), JobState::Succeeded, "{job:?}");
        assert_eq!(job.attempts, 1);
    }
    let stats = app.fake.stats();
    assert_eq!(stats.token_requests, 4, "each job was sent exactly once");
    assert_eq!(stats.redeemed, 4);
}

fn request_for(fake: &token_broker::tools::fake_upstream::FakeUpstream) -> ExchangeRequest {
    request_keyed(fake, "")
}

/// A request for a code `fake` issued, with idempotency key `key` (one derived from the client
/// id and the code's length when empty, the same for every request).
fn request_keyed(
    fake: &token_broker::tools::fake_upstream::FakeUpstream,
    key: &str,
) -> ExchangeRequest {
    let raw = new_request(fake, "client-a");
    ExchangeRequest::parse(
        RawExchange {
            client_id: &raw.client_id,
            code: &raw.code,
            code_verifier: &raw.code_verifier,
            state: &raw.state,
            idempotency_key: key,
        },
        |client_id, code| format!("{client_id}/{}", code.len()),
    )
    .expect("valid request")
}

#[tokio::test]
async fn an_attempt_whose_lease_expired_is_picked_up_again() {
    let fake = start_fake().await;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let config = test_config(&dir, &fake);

    // A previous daemon claimed the job and died mid-attempt: its lease has run out.
    let store = crate::helpers::open_store(&config).await;
    let now = UnixMillis::now();
    let submitted = store
        .submit(&new_job(&request_for(&fake)), now, None)
        .await
        .unwrap();
    let token_broker::store::SubmitOutcome::Created(job) = submitted else {
        panic!("job created");
    };
    let ghost: Arc<str> = "worker-that-died".into();
    let claims = store
        .claim(&due(&store).await, &ghost, UnixMillis(now.0 - 1), now)
        .await
        .unwrap();
    assert_eq!(claims.len(), 1);
    store.close().await;

    let mut app = TestApp::start(config, fake, dir).await;
    let done = app.wait_terminal(&job.id.to_string()).await;
    assert_eq!(done.state(), JobState::Succeeded, "{done:?}");
    assert_eq!(done.attempts, 2, "the lost attempt counts");
    assert!(
        done.outcome_unknown,
        "the lost attempt is reported honestly"
    );
    assert_eq!(
        audit_kinds(&app.db_path(), &done.job_id).await,
        [
            "job.submitted",
            "attempt.started",
            "attempt.unknown",
            "job.retry_scheduled",
            "attempt.started",
            "attempt.finished",
            "job.succeeded"
        ]
    );
}

/// Due jobs, as the dispatcher would choose them.
async fn due(store: &Store) -> Vec<token_broker::store::Candidate> {
    store
        .due_for_clients(&["client-a".to_string()], UnixMillis::now(), 100)
        .await
        .unwrap()
}

fn new_job(request: &ExchangeRequest) -> NewJob<'_> {
    NewJob {
        job_id: token_broker::domain::job::JobId::new(),
        tenant: "default",
        request,
        code_fingerprint: "not-a-real-fingerprint",
        ttl: std::time::Duration::from_secs(60),
        max_pending: 100,
        max_pending_tenant: None,
        max_pending_clients: 1_000,
        start: None,
    }
}

#[tokio::test]
async fn a_stale_worker_cannot_overwrite_a_newer_outcome() {
    let fake = start_fake().await;
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(&dir, &fake);
    let store = crate::helpers::open_store(&config).await;
    let now = UnixMillis::now();
    store
        .submit(&new_job(&request_for(&fake)), now, None)
        .await
        .unwrap();

    // Worker A claims with a lease that is already over; the sweep rescues the job.
    let a: Arc<str> = "worker-a".into();
    let claim_a = store
        .claim(&due(&store).await, &a, UnixMillis(now.0 - 1), now)
        .await
        .unwrap()
        .remove(0);
    let not_yet = store
        .rescue_leases(UnixMillis(now.0 - 10), 5, now)
        .await
        .unwrap();
    assert!(
        not_yet.is_empty(),
        "a lease is only rescued once it has ended"
    );
    let rescued = store.rescue_leases(now, 5, now).await.unwrap();
    assert_eq!(rescued.len(), 1);
    assert!(rescued[0].outcome_unknown);

    // Worker B claims the second attempt and records a failure.
    let b: Arc<str> = "worker-b".into();
    let claim_b = store
        .claim(&due(&store).await, &b, UnixMillis(now.0 + 60_000), now)
        .await
        .unwrap()
        .remove(0);
    assert_eq!(claim_b.lease.attempt, 2);
    let failed = AttemptRecord::Failed {
        reason: token_broker::domain::job::FailureReason::Forbidden,
        http_status: Some(403),
        detail: "upstream answered 403".into(),
        answer_lost: false,
        outcome_unknown: true,
    };
    let recorded = store
        .record_attempt(&claim_b.lease, &failed, now, None)
        .await
        .unwrap()
        .expect("the current lease holder's write lands");

    // Worker A wakes up late with a success: it must change nothing.
    let late = AttemptRecord::Succeeded {
        grant: token_broker::domain::job::TokenGrant {
            access_token: token_broker::domain::secret::SecretString::from("stale"),
            token_type: "Bearer".into(),
            expires_in: 3600,
        },
        http_status: 200,
        outcome_unknown: false,
    };
    assert!(
        store
            .record_attempt(&claim_a.lease, &late, now, None)
            .await
            .unwrap()
            .is_none()
    );
    let job = store.get(recorded.id).await.unwrap().unwrap();
    assert_eq!(job.state, token_broker::domain::job::JobState::Failed);
    assert_eq!(job.version, recorded.version);
    assert!(job.token.is_none());
    let _ = FailureReason::Forbidden;
    store.close().await;
}

#[tokio::test]
async fn committed_pages_reach_the_database_file_without_a_commit_paying_for_it() {
    // The writer checkpoints by itself only past 10,000 pages of log; a few hundred exchanges
    // write far fewer. Their pages reach the database file anyway: the WAL checkpoints run
    // beside the writer.
    let app = TestApp::spawn().await;
    let file_size = || std::fs::metadata(app.db_path()).map_or(0, |m| m.len());
    let before = file_size();
    crate::helpers::exchange_in_turns(&app, 4, 50).await;
    let deadline = std::time::Instant::now() + crate::helpers::PATIENCE;
    while file_size() < before + 256 * 1024 {
        assert!(
            std::time::Instant::now() < deadline,
            "the database file stayed at {} bytes (from {before})",
            file_size()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The writer's check, not the API's hint: a submission that asks to start while a job waits
/// is queued behind it, and its start is never run (the reservation it carried goes back).
#[tokio::test]
async fn a_start_asked_for_while_a_job_waits_queues_behind_it() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use token_broker::{
        domain::job::JobState as StoredState,
        store::{OnStarted, StartLease, SubmitOutcome},
    };

    let fake = start_fake().await;
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(&dir, &fake);
    let store = crate::helpers::open_store(&config).await;
    let now = UnixMillis::now();
    let lease = StartLease {
        owner: "worker-a".into(),
        duration: std::time::Duration::from_secs(20),
    };
    let starts = Arc::new(AtomicUsize::new(0));
    let on_started = || {
        let starts = Arc::clone(&starts);
        Some(OnStarted::new(move |_| {
            starts.fetch_add(1, Ordering::SeqCst);
        }))
    };
    let state = |outcome: &SubmitOutcome| match outcome {
        SubmitOutcome::Created(job) | SubmitOutcome::Started(job) => job.state,
        other => panic!("not inserted: {other:?}"),
    };

    // No worker runs here: the first job waits.
    let (first, second) = (
        request_keyed(&fake, "first"),
        request_keyed(&fake, "second"),
    );
    let waiting = store.submit(&new_job(&first), now, None).await.unwrap();
    assert_eq!(state(&waiting), StoredState::Queued);
    // A submission that asks to start, as the API does on its hint.
    let ask = |request| {
        let store = &store;
        let lease = &lease;
        let on_started = on_started();
        async move {
            let asked = NewJob {
                start: Some(lease),
                ..new_job(request)
            };
            store.submit(&asked, now, on_started).await.unwrap()
        }
    };
    let behind = ask(&second).await;
    assert!(
        matches!(behind, SubmitOutcome::Created(_)),
        "a job waits: {behind:?}"
    );
    assert_eq!(state(&behind), StoredState::Queued);
    assert_eq!(starts.load(Ordering::SeqCst), 0, "no attempt started");

    // Once both are claimed, nothing waits: the same ask starts at once.
    let owner: Arc<str> = "worker-a".into();
    let claimed = store
        .claim(&due(&store).await, &owner, UnixMillis(now.0 + 60_000), now)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 2);
    let third = request_keyed(&fake, "third");
    let started = ask(&third).await;
    assert!(
        matches!(started, SubmitOutcome::Started(_)),
        "nothing waits: {started:?}"
    );
    assert_eq!(state(&started), StoredState::Running);
    assert_eq!(starts.load(Ordering::SeqCst), 1);
}
