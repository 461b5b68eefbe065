//! The exchange itself: success, fail-fast statuses, retries, exhaustion, expiry, idempotency.

use token_broker::{
    api::proto::{FailureReason, JobState},
    tools::fake_upstream::{Faults, Scripted},
};
use tonic::Code;

use crate::helpers::{TestApp, audit_kinds, job_events, scrape_metrics, series};

#[tokio::test]
async fn with_nothing_waiting_a_submission_is_committed_running_its_first_attempt() {
    let mut app = TestApp::spawn().await;
    // Slow answers, so the job is still running when its submitter reads it.
    app.fake.set_faults(Faults {
        latency_ms: 300,
        ..Default::default()
    });

    let job = app.submit(app.new_request("client-a")).await;

    assert_eq!(job.state(), JobState::Running, "the submission started it");
    assert_eq!(job.attempts, 1);
    assert_eq!(app.get(&job.job_id).await, job, "answered as stored");
    let done = app.wait_terminal(&job.job_id).await;
    assert_eq!(done.state(), JobState::Succeeded);
    assert_eq!(done.attempts, 1);
    assert_eq!(app.fake.stats().token_requests, 1);
    let events = job_events(&app.db_path(), &job.job_id).await;
    let kinds: Vec<&str> = events.iter().map(|(_, _, kind, _)| kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "job.submitted",
            "attempt.started",
            "attempt.finished",
            "job.succeeded"
        ]
    );
    // Submitted and started by one change: consecutive events, one time.
    let ((submitted_seq, submitted_at, ..), (started_seq, started_at, _, detail)) =
        (&events[0], &events[1]);
    assert_eq!(*started_seq, submitted_seq + 1);
    assert_eq!(started_at, submitted_at);
    assert!(
        detail
            .as_deref()
            .is_some_and(|detail| detail.starts_with("started at submission")),
        "{detail:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_within_the_worker_concurrency_never_wait_in_the_queue() {
    // An attempt's slot is free once its outcome commits, before its caller is answered: a
    // caller that submits again at once always finds one.
    let app = TestApp::spawn_with(|config| config.worker.concurrency = 2).await;
    crate::helpers::exchange_in_turns(&app, 2, 25).await;

    let scrape = scrape_metrics(app.ops_addr).await;
    assert_eq!(series(&scrape, "token_broker_jobs_submitted_total"), 50.0);
    assert_eq!(
        series(&scrape, "token_broker_jobs_started_at_submission_total"),
        50.0,
        "{scrape}"
    );
}

#[tokio::test]
async fn while_a_job_waits_new_submissions_queue_behind_it() {
    // slow-app may send once per second; other clients have no limit.
    let mut app = TestApp::spawn_with(|config| {
        config.limits.client = vec![token_broker::config::ClientLimit {
            client_id: "slow-app".into(),
            rps: 1,
            burst: 1,
        }];
    })
    .await;

    let first = app.submit(app.new_request("slow-app")).await;
    let second = app.submit(app.new_request("slow-app")).await;
    let other = app.submit(app.new_request("other-app")).await;

    // A rate-limited client's jobs are paced by the dispatcher, never started at submission.
    assert_eq!(
        first.state(),
        JobState::Queued,
        "a rate limit applies: it queues"
    );
    assert_eq!(second.state(), JobState::Queued);
    assert_eq!(app.get(&second.job_id).await, second, "answered as stored");
    assert_eq!(
        other.state(),
        JobState::Queued,
        "no limit for other-app, but a job waits: it queues behind it"
    );
    for job in [&first, &second, &other] {
        assert_eq!(
            app.wait_terminal(&job.job_id).await.state(),
            JobState::Succeeded
        );
    }
    for job in [&first, &second, &other] {
        let events = job_events(&app.db_path(), &job.job_id).await;
        let (_, _, _, detail) = events
            .iter()
            .find(|(_, _, kind, _)| kind == "attempt.started")
            .expect("an attempt started");
        assert!(
            detail
                .as_deref()
                .is_some_and(|detail| detail.starts_with("waited")),
            "the dispatcher started it: {detail:?}"
        );
    }
    // Once nothing waits, an unlimited client's submission starts at once again.
    let later = app.submit(app.new_request("other-app")).await;
    assert_eq!(later.state(), JobState::Running, "{later:?}");
}

#[tokio::test]
async fn a_successful_exchange_returns_the_token() {
    let mut app = TestApp::spawn().await;
    let request = app.new_request("client-a");
    let state = request.state.clone();

    let job = app.exchange(request).await;

    assert_eq!(job.state(), JobState::Succeeded);
    assert_eq!(job.attempts, 1);
    assert_eq!(job.last_http_status, 200);
    assert_eq!(job.state_param, state);
    assert_eq!(job.client_id, "client-a");
    let token = job
        .token
        .clone()
        .expect("a succeeded job carries its token");
    assert!(!token.access_token.is_empty());
    assert_eq!(token.token_type, "Bearer");
    assert_eq!(token.expires_in, 3600);
    let expires_at = token.expires_at.expect("absolute expiry").seconds;
    let created = job.created_at.expect("created_at").seconds;
    assert!((created + 3599..=created + 3700).contains(&expires_at));

    assert_eq!(app.get(&job.job_id).await, job, "GetJob shows the same job");

    let stats = app.fake.stats();
    assert_eq!(stats.token_requests, 1);
    assert_eq!(stats.redeemed, 1);
    assert_eq!(
        audit_kinds(&app.db_path(), &job.job_id).await,
        [
            "job.submitted",
            "attempt.started",
            "attempt.finished",
            "job.succeeded"
        ]
    );
}

#[tokio::test]
async fn a_403_fails_at_once_after_one_request() {
    let mut app = TestApp::spawn().await;
    let mut request = app.new_request("client-a");
    // A well-formed verifier that does not match the code's challenge.
    request.code_verifier = "x".repeat(64);

    let job = app.exchange(request).await;

    assert_eq!(job.state(), JobState::Failed);
    assert_eq!(job.failure_reason(), FailureReason::Forbidden);
    assert_eq!(job.attempts, 1);
    assert_eq!(job.last_http_status, 403);
    assert_eq!(
        job.failure_detail,
        "upstream answered 403 (invalid or expired code verifier)"
    );
    assert!(job.token.is_none());
    assert_eq!(app.fake.stats().token_requests, 1);
}

#[tokio::test]
async fn a_400_fails_at_once_after_one_request() {
    let mut app = TestApp::spawn().await;
    app.fake.script([Scripted::Status(400)]);

    let job = app.exchange(app.new_request("client-a")).await;

    assert_eq!(job.state(), JobState::Failed);
    assert_eq!(job.failure_reason(), FailureReason::InvalidRequest);
    assert_eq!(job.attempts, 1);
    assert_eq!(job.last_http_status, 400);
    assert_eq!(app.fake.stats().token_requests, 1);
}

#[tokio::test]
async fn a_500_and_a_503_are_retried_and_then_succeed() {
    let mut app = TestApp::spawn().await;
    app.fake
        .script([Scripted::Status(500), Scripted::Status(503)]);

    let job = app.exchange(app.new_request("client-a")).await;

    assert_eq!(job.state(), JobState::Succeeded, "{job:?}");
    assert_eq!(job.attempts, 3);
    assert!(job.token.is_some());
    let stats = app.fake.stats();
    assert_eq!(stats.token_requests, 3);
    assert_eq!(stats.by_status.get(&500), Some(&1));
    assert_eq!(stats.by_status.get(&503), Some(&1));
    assert_eq!(stats.by_status.get(&200), Some(&1));
    assert_eq!(
        audit_kinds(&app.db_path(), &job.job_id).await,
        [
            "job.submitted",
            "attempt.started",
            "attempt.finished",
            "job.retry_scheduled",
            "attempt.started",
            "attempt.finished",
            "job.retry_scheduled",
            "attempt.started",
            "attempt.finished",
            "job.succeeded"
        ]
    );
}

#[tokio::test]
async fn a_dropped_connection_is_retried_as_an_unknown_outcome() {
    let mut app = TestApp::spawn().await;
    app.fake.script([Scripted::Drop]);

    let job = app.exchange(app.new_request("client-a")).await;

    assert_eq!(job.state(), JobState::Succeeded, "{job:?}");
    assert_eq!(job.attempts, 2);
    assert!(job.outcome_unknown);
    assert!(
        audit_kinds(&app.db_path(), &job.job_id)
            .await
            .contains(&"attempt.unknown".to_string())
    );
}

#[tokio::test]
async fn a_403_after_a_lost_answer_is_reported_as_outcome_unknown() {
    let mut app = TestApp::spawn().await;
    // The first attempt redeems the code but its answer is lost; the retry is refused.
    app.fake.script([Scripted::DropAfter]);

    let job = app.exchange(app.new_request("client-a")).await;

    assert_eq!(job.state(), JobState::Failed, "{job:?}");
    assert_eq!(job.failure_reason(), FailureReason::OutcomeUnknown);
    assert_eq!(job.attempts, 2);
    assert_eq!(job.last_http_status, 403);
    assert_eq!(app.fake.stats().redeemed, 1);
}

#[tokio::test]
async fn retries_exhausted_fail_with_that_reason() {
    let mut app = TestApp::spawn_with(|config| config.retry.max_attempts = 3).await;
    app.fake.script([Scripted::Status(503); 3]);

    let job = app.exchange(app.new_request("client-a")).await;

    assert_eq!(job.state(), JobState::Failed);
    assert_eq!(job.failure_reason(), FailureReason::RetriesExhausted);
    assert_eq!(job.attempts, 3);
    assert_eq!(job.last_http_status, 503);
    assert_eq!(app.fake.stats().token_requests, 3);
}

#[tokio::test]
async fn a_job_that_cannot_finish_within_its_ttl_expires() {
    // Upstream asks for a 5 s pause; the job has 1 s to live.
    let mut app = TestApp::spawn_with(|config| config.retry.job_ttl_secs = 1).await;
    app.fake
        .set_faults(token_broker::tools::fake_upstream::Faults {
            retry_after_secs: 5,
            ..Default::default()
        });
    app.fake.script([Scripted::Status(429)]);

    let job = app.exchange(app.new_request("client-a")).await;

    assert_eq!(job.state(), JobState::Failed);
    assert_eq!(job.failure_reason(), FailureReason::Expired);
    assert_eq!(job.attempts, 1, "no request is spent on a job past its TTL");
    assert_eq!(app.fake.stats().token_requests, 1);
}

#[tokio::test]
async fn a_queued_job_past_its_ttl_expires_without_an_upstream_request() {
    // One permit per second for this client: the second job waits, and its TTL runs out first.
    let mut app = TestApp::spawn_with(|config| {
        config.retry.job_ttl_secs = 1;
        config.limits.default_client_rps = 1;
        config.limits.default_client_burst = 1;
    })
    .await;
    app.fake
        .set_faults(token_broker::tools::fake_upstream::Faults {
            latency_ms: 0,
            ..Default::default()
        });
    let first = app.submit(app.new_request("client-a")).await;
    let second = app.submit(app.new_request("client-a")).await;
    let third = app.submit(app.new_request("client-a")).await;

    let first = app.wait_terminal(&first.job_id).await;
    let second = app.wait_terminal(&second.job_id).await;
    let third = app.wait_terminal(&third.job_id).await;

    assert_eq!(first.state(), JobState::Succeeded);
    // With one permit per second and one second to live, at most one of the others can start
    // before its TTL ends; the other expires untried.
    let expired: Vec<_> = [&second, &third]
        .into_iter()
        .filter(|job| job.failure_reason() == FailureReason::Expired)
        .collect();
    assert!(!expired.is_empty(), "{second:?} {third:?}");
    for job in &expired {
        assert_eq!(job.attempts, 0, "an expired queued job was never attempted");
    }
    assert_eq!(
        app.fake.stats().token_requests,
        3 - expired.len() as u64,
        "expired jobs cost no upstream request"
    );
}

#[tokio::test]
async fn resubmitting_returns_the_same_job_without_a_second_request() {
    let mut app = TestApp::spawn().await;
    let request = app.new_request("client-a");

    let first = app.submit(request.clone()).await;
    let again = app.submit(request.clone()).await;
    assert_eq!(first.job_id, again.job_id);
    let done = app.wait_terminal(&first.job_id).await;
    assert_eq!(done.state(), JobState::Succeeded);

    let after = app.exchange(request.clone()).await;
    assert_eq!(after.job_id, first.job_id);
    assert_eq!(after.state(), JobState::Succeeded);
    assert_eq!(after.token, done.token);
    assert_eq!(app.fake.stats().token_requests, 1);
    assert_eq!(app.count_rows("jobs").await, 1);

    // The same (default) key with different contents is refused.
    let mut conflicting = request.clone();
    conflicting.state = "another-state".into();
    let status = app.client.submit_exchange(conflicting).await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);

    // An explicit key works the same way.
    let mut keyed = app.new_request("client-a");
    keyed.idempotency_key = "order-42".into();
    let one = app.submit(keyed.clone()).await;
    let two = app.submit(keyed.clone()).await;
    assert_eq!(one.job_id, two.job_id);
    assert_eq!(one.idempotency_key, "order-42");
    let mut other_code = app.new_request("client-a");
    other_code.idempotency_key = "order-42".into();
    let status = app.client.submit_exchange(other_code).await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
}
