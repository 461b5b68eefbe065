//! Watching, waiting with a deadline, and cancelling.

use std::time::Duration;

use token_broker::{
    api::proto::{GetJobRequest, JobState},
    tools::fake_upstream::{Faults, Scripted},
};
use tonic::Code;

use crate::helpers::{PATIENCE, TestApp};

#[tokio::test]
async fn watch_streams_every_state_change_until_terminal() {
    let mut app = TestApp::spawn().await;
    app.fake.script([Scripted::Status(503)]);
    // Slow answers, so the watcher is attached before the first attempt ends.
    app.fake.set_faults(Faults {
        latency_ms: 200,
        ..Default::default()
    });
    let job = app.submit(app.new_request("client-a")).await;

    let mut stream = app
        .client
        .watch_job(GetJobRequest {
            job_id: job.job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut states = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        while let Some(job) = stream.message().await.unwrap() {
            states.push(job.state());
        }
    })
    .await
    .expect("the stream ends");

    assert_eq!(states.last(), Some(&JobState::Succeeded));
    let mut seen = states.clone();
    seen.dedup();
    assert_eq!(seen, states, "each snapshot is a change");
    // Whatever the stream started from, it saw the retry wait and both attempts' outcomes.
    assert!(states.ends_with(&[
        JobState::Running,
        JobState::RetryWait,
        JobState::Running,
        JobState::Succeeded
    ]));
}

#[tokio::test]
async fn exchange_returns_the_job_as_it_stands_before_the_deadline() {
    let mut app = TestApp::spawn().await;
    app.fake.set_faults(Faults {
        latency_ms: 1_500,
        ..Default::default()
    });
    let mut request = tonic::Request::new(app.new_request("client-a"));
    request.set_timeout(Duration::from_millis(500));

    let job = app
        .client
        .exchange(request)
        .await
        .expect("answered OK before the deadline")
        .into_inner();
    assert!(
        matches!(job.state(), JobState::Queued | JobState::Running),
        "{job:?}"
    );
    let done = app.wait_terminal(&job.job_id).await;
    assert_eq!(done.state(), JobState::Succeeded);
}

#[tokio::test]
async fn cancel_stops_a_waiting_job_but_not_a_running_attempt() {
    let mut app = TestApp::spawn_with(|config| {
        config.retry.initial_delay_ms = 60_000;
        config.retry.max_delay_ms = 60_000;
        config.retry.job_ttl_secs = 600;
    })
    .await;
    app.fake.script([Scripted::Status(503)]);
    let waiting = app.submit(app.new_request("client-a")).await;
    // Its first attempt fails and it waits a minute for the next.
    app.wait_for_state(&waiting.job_id, JobState::RetryWait)
        .await;

    let cancelled = app.cancel(&waiting.job_id).await.unwrap();
    assert_eq!(cancelled.state(), JobState::Cancelled);
    let again = app.cancel(&waiting.job_id).await.unwrap();
    assert_eq!(again, cancelled, "cancelling again is harmless");

    // A running attempt is not interrupted.
    app.fake.set_faults(Faults {
        latency_ms: 1_000,
        ..Default::default()
    });
    let running = app.submit(app.new_request("client-a")).await;
    app.wait_for_state(&running.job_id, JobState::Running).await;
    let status = app.cancel(&running.job_id).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    let done = app.wait_terminal(&running.job_id).await;
    assert_eq!(done.state(), JobState::Succeeded);
    assert_eq!(app.fake.stats().token_requests, 2);
}
