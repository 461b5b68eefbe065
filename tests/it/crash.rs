//! The real binary, killed with SIGKILL mid-work: every acknowledged job survives and reaches
//! exactly one terminal state, and no code is redeemed twice.

use std::{path::Path, process::Command, time::Duration};

use token_broker::{
    api::proto::{FailureReason, GetJobRequest, JobState},
    tools::fake_upstream::{FakeOptions, Faults},
};

use crate::helpers::{
    Daemon, PATIENCE, is_terminal, new_request, read_only, start_fake_with, start_slow_fake,
};

#[tokio::test]
async fn sigkill_loses_no_acknowledged_job_and_redeems_no_code_twice() {
    // Slow answers, so attempts are in flight when the process dies.
    let fake = start_slow_fake(300).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("broker.db");

    let daemon = Daemon::start(&db, &fake.token_url());
    let mut client = daemon.client().await;
    let mut acknowledged = Vec::new();
    for _ in 0..20 {
        let job = client
            .submit_exchange(new_request(&fake, "client-a"))
            .await
            .expect("acknowledged")
            .into_inner();
        acknowledged.push(job.job_id);
    }
    daemon.kill();

    let daemon = Daemon::start(&db, &fake.token_url());
    let mut client = daemon.client().await;
    let mut succeeded = 0;
    let mut unknown = 0;
    for id in &acknowledged {
        let job = tokio::time::timeout(PATIENCE, async {
            loop {
                let job = client
                    .get_job(GetJobRequest { job_id: id.clone() })
                    .await
                    .expect("an acknowledged job survives SIGKILL")
                    .into_inner();
                if is_terminal(&job) {
                    return job;
                }
                let mut watch = client
                    .watch_job(GetJobRequest { job_id: id.clone() })
                    .await
                    .unwrap()
                    .into_inner();
                while watch.message().await.unwrap().is_some() {}
            }
        })
        .await
        .expect("every job reaches a terminal state");
        match (job.state(), job.failure_reason()) {
            (JobState::Succeeded, _) => {
                assert!(!job.outcome_unknown || job.attempts > 1, "{job:?}");
                succeeded += 1;
            }
            // Killed mid-attempt after upstream redeemed the code: reported honestly.
            (JobState::Failed, FailureReason::OutcomeUnknown) => {
                assert!(job.outcome_unknown);
                unknown += 1;
            }
            other => panic!("unexpected outcome {other:?}: {job:?}"),
        }
    }
    eprintln!("after SIGKILL: {succeeded} succeeded, {unknown} outcome unknown");
    assert_eq!(succeeded + unknown, 20);
    let stats = fake.stats();
    assert_eq!(
        stats.redeemed, 20,
        "every code redeemed exactly once (succeeded {succeeded}, unknown {unknown})"
    );
    daemon.kill();
}

#[tokio::test]
async fn sigterm_lets_running_attempts_finish_and_leaves_the_rest_queued() {
    let fake = start_slow_fake(500).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("broker.db");

    let mut daemon = Daemon::start(&db, &fake.token_url());
    let mut client = daemon.client().await;
    let running = client
        .submit_exchange(new_request(&fake, "client-a"))
        .await
        .unwrap()
        .into_inner();
    // Wait until its attempt is in flight.
    let mut watch = client
        .watch_job(GetJobRequest {
            job_id: running.job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(job) = watch.message().await.unwrap() {
        if job.state() == JobState::Running {
            break;
        }
    }
    let status = Command::new("kill")
        .args(["-TERM", &daemon.child.id().to_string()])
        .status()
        .expect("send SIGTERM");
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || {
        let status = daemon.child.wait().expect("the daemon exits");
        (daemon, status)
    })
    .await
    .unwrap();
    let (daemon, exit_status) = exit;
    assert!(
        exit_status.success(),
        "a drained daemon exits 0: {exit_status:?}"
    );
    drop(daemon);

    // The attempt finished during the drain: no outcome is unknown after the restart.
    let daemon = Daemon::start(&db, &fake.token_url());
    let mut client = daemon.client().await;
    let job = client
        .get_job(GetJobRequest {
            job_id: running.job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.state(), JobState::Succeeded, "{job:?}");
    assert_eq!(job.attempts, 1);
    assert!(!job.outcome_unknown);
    assert_eq!(fake.stats().redeemed, 1);
}

/// Every job in the database with its state and failure reason, read from the file.
/// Every job: its id, state, and whether an attempt's answer was ever lost.
async fn all_jobs(db: &Path) -> Vec<(String, String, bool)> {
    use sqlx::Connection;
    let mut conn = read_only(db).await;
    let rows: Vec<(String, String, bool)> =
        sqlx::query_as("SELECT job_id, state, outcome_unknown FROM jobs")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    conn.close().await.ok();
    rows
}

/// Jobs whose success was recorded more than once in the audit trail.
async fn doubly_succeeded(db: &Path) -> Vec<String> {
    use sqlx::Connection;
    let mut conn = read_only(db).await;
    let rows: Vec<String> = sqlx::query_scalar(
        "SELECT job_id FROM audit_events WHERE kind = 'job.succeeded' \
         GROUP BY job_id HAVING COUNT(*) > 1",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    conn.close().await.ok();
    rows
}

#[tokio::test]
async fn repeated_sigkills_under_load_lose_nothing_and_complete_nothing_twice() {
    // A slow upstream that fails now and then, and sometimes loses its answer.
    let fake = start_fake_with(FakeOptions {
        faults: Faults {
            latency_ms: 50,
            rate_503: 0.05,
            drop_rate: 0.02,
            ..Faults::default()
        },
        ..FakeOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("broker.db");

    let mut acknowledged = Vec::new();
    let mut rounds = 0;
    while acknowledged.len() < 1_000 {
        rounds += 1;
        assert!(rounds <= 20, "load too slow: {} jobs", acknowledged.len());
        let daemon = Daemon::start(&db, &fake.token_url());
        let client = daemon.client().await;
        let requests_before = fake.stats().token_requests;
        let (acks, mut acked) = tokio::sync::watch::channel(0usize);
        let mut submitters = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let mut client = client.clone();
            let fake = fake.clone();
            let acks = acks.clone();
            submitters.spawn(async move {
                let mut ids = Vec::new();
                loop {
                    match client.submit_exchange(new_request(&fake, "client-a")).await {
                        Ok(job) => {
                            ids.push(job.into_inner().job_id);
                            acks.send_modify(|count| *count += 1);
                        }
                        // The daemon was killed mid-call: this one was never acknowledged.
                        Err(_) => return ids,
                    }
                }
            });
        }
        // Kill it under load: once this round has acknowledged submissions and attempts are
        // under way (events, not a fixed sleep).
        let loaded = async {
            let _ = acked.wait_for(|count| *count >= 150).await;
            fake.wait_for_requests(requests_before + 20).await;
        };
        tokio::time::timeout(crate::helpers::PATIENCE, loaded)
            .await
            .expect("the round gets under load");
        daemon.kill();
        for ids in submitters.join_all().await {
            acknowledged.extend(ids);
        }
    }

    let daemon = Daemon::start(&db, &fake.token_url());
    let mut client = daemon.client().await;
    tokio::time::timeout(Duration::from_secs(120), async {
        for id in &acknowledged {
            let mut watch = client
                .watch_job(GetJobRequest { job_id: id.clone() })
                .await
                .expect("every acknowledged job survives")
                .into_inner();
            let mut last = None;
            while let Some(job) = watch.message().await.unwrap() {
                last = Some(job);
            }
            assert!(is_terminal(&last.expect("a snapshot")));
        }
    })
    .await
    .expect("every acknowledged job reaches a terminal state");
    daemon.kill();

    let jobs = all_jobs(&db).await;
    let known: std::collections::HashSet<_> = jobs.iter().map(|(id, _, _)| id.clone()).collect();
    assert!(acknowledged.iter().all(|id| known.contains(id)));
    let succeeded = jobs
        .iter()
        .filter(|(_, state, _)| state == "succeeded")
        .count() as u64;
    // Jobs that did not succeed but whose code may have been spent: an attempt's answer was
    // lost. Their failure reason is outcome_unknown after a later 403, or retries_exhausted or
    // expired when no attempt was left to find out; the flag is set on all of them.
    let unknown = jobs
        .iter()
        .filter(|(_, state, lost)| state != "succeeded" && *lost)
        .count() as u64;
    let redeemed = fake.stats().redeemed;
    eprintln!(
        "{rounds} kills, {} acknowledged, {} stored: {succeeded} succeeded, {unknown} unknown, {redeemed} codes redeemed",
        acknowledged.len(),
        jobs.len()
    );
    assert!(
        doubly_succeeded(&db).await.is_empty(),
        "no success recorded twice"
    );
    assert!(
        redeemed >= succeeded && redeemed <= succeeded + unknown,
        "redeemed {redeemed}, succeeded {succeeded}, unknown {unknown}"
    );
}

#[tokio::test]
async fn group_commit_acknowledges_no_submission_before_its_commit() {
    // Many concurrent submitters fill the writer's batches; the process dies at once after
    // some acknowledgements. Every acknowledged job must be in the file.
    let fake = start_slow_fake(1_000).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("broker.db");
    let daemon = Daemon::start(&db, &fake.token_url());
    let client = daemon.client().await;
    let (acked_tx, mut acked_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut submitters = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let mut client = client.clone();
        let fake = fake.clone();
        let acked = acked_tx.clone();
        submitters.spawn(async move {
            while let Ok(job) = client.submit_exchange(new_request(&fake, "app")).await {
                let _ = acked.send(job.into_inner().job_id);
            }
        });
    }
    drop(acked_tx);
    let mut acknowledged = Vec::new();
    while acknowledged.len() < 500 {
        acknowledged.push(acked_rx.recv().await.expect("acknowledgements"));
    }
    // Dies right after the 500th acknowledgement, with submissions in flight.
    daemon.kill();
    submitters.join_all().await;
    while let Ok(id) = acked_rx.try_recv() {
        acknowledged.push(id);
    }

    let stored: std::collections::HashSet<String> = all_jobs(&db)
        .await
        .into_iter()
        .map(|(id, _, _)| id)
        .collect();
    let missing: Vec<_> = acknowledged
        .iter()
        .filter(|id| !stored.contains(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged jobs missing",
        missing.len(),
        acknowledged.len()
    );
}
