//! Secrets at rest and in logs: encrypted in the file, absent from the logs, readable after a
//! key rotation, and a wrong key refused at start-up.

use std::{path::Path, process::Command};

use token_broker::{
    api::proto::{GetJobRequest, JobState},
    tools::fake_upstream::{FakeOptions, Faults, Scripted},
};

use crate::helpers::{Daemon, TestApp, new_request, start_fake_with};

/// Every byte the daemon keeps on disk for `db`: the database, its WAL and shared memory.
fn database_bytes(db: &Path) -> Vec<u8> {
    let mut bytes = Vec::new();
    for suffix in ["", "-wal", "-shm"] {
        let mut path = db.as_os_str().to_owned();
        path.push(suffix);
        if let Ok(content) = std::fs::read(&path) {
            bytes.extend(content);
        }
    }
    bytes
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

#[tokio::test]
async fn codes_verifiers_and_tokens_appear_neither_in_the_file_nor_in_the_logs() {
    let fake = start_fake_with(FakeOptions {
        faults: Faults {
            retry_after_secs: 1,
            ..Faults::default()
        },
        ..FakeOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("broker.db");
    let log = dir.path().join("daemon.log");
    let daemon = Daemon::start_logging(&db, &fake.token_url(), Some(log.clone()));
    let mut client = daemon.client().await;

    // A job that waits a second for its retry: its code and verifier are stored meanwhile.
    fake.script([Scripted::Status(503)]);
    let request = new_request(&fake, "app");
    let (code, verifier) = (request.code.clone(), request.code_verifier.clone());
    let job = client.submit_exchange(request).await.unwrap().into_inner();
    let pending = database_bytes(&db);
    assert!(!pending.is_empty());
    assert!(
        !contains(&pending, &code),
        "the code is in the database file"
    );
    assert!(
        !contains(&pending, &verifier),
        "the verifier is in the database file"
    );

    // Finished: the token is stored (sealed) for the caller.
    let mut watch = client
        .watch_job(GetJobRequest {
            job_id: job.job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(update) = watch.message().await.unwrap() {
        last = Some(update);
    }
    let done = last.unwrap();
    assert_eq!(done.state(), JobState::Succeeded);
    let token = done.token.unwrap().access_token;
    daemon.kill();

    let finished = database_bytes(&db);
    let logs = std::fs::read(&log).unwrap();
    for (name, secret) in [("code", &code), ("verifier", &verifier), ("token", &token)] {
        assert!(
            !contains(&finished, secret),
            "the {name} is in the database file"
        );
        assert!(!contains(&logs, secret), "the {name} is in the logs");
    }
    assert!(contains(&logs, &job.job_id), "the log does name the job");
}

fn key_file(db: &Path) -> std::path::PathBuf {
    let mut path = db.as_os_str().to_owned();
    path.push(".key");
    path.into()
}

#[tokio::test]
async fn after_a_key_rotation_every_pending_job_is_still_read_and_completed() {
    // One request per second: most jobs are still queued when the daemon stops.
    let mut app = TestApp::spawn_one_per_second().await;
    let ids = app.submit_many(4, "app").await;
    let (mut config, fake, dir) = app.stop().await;
    let db = config.storage.path.clone();

    let output = Command::new(env!("CARGO_BIN_EXE_token-broker"))
        .args(["keys", "rotate"])
        .env("TOKEN_BROKER_STORAGE__PATH", &db)
        .env("TOKEN_BROKER_SERVER__METRICS_LISTEN", "")
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(said.contains("new key k2"), "{said}");
    let ring = std::fs::read_to_string(key_file(&db)).unwrap();
    assert_eq!(ring.lines().count(), 2);
    assert!(contains(&database_bytes(&db), "v1:k2:"));

    config.limits.global_rps = 0;
    let mut app = TestApp::start(config, fake, dir).await;
    for id in &ids {
        let job = app.wait_terminal(id).await;
        assert_eq!(job.state(), JobState::Succeeded, "{job:?}");
    }
}

#[tokio::test]
async fn a_wrong_key_fails_start_up_clearly_and_changes_nothing() {
    let mut app = TestApp::spawn_one_per_second().await;
    app.submit_many(3, "app").await;
    let (config, _, _dir) = app.stop().await;
    let db = config.storage.path.clone();
    let before = snapshot(&db).await;
    std::fs::write(key_file(&db), format!("k1 {}\n", "5a".repeat(32))).unwrap();

    let message = crate::helpers::start_up_error(config).await;
    assert!(
        message.contains("encryption keys do not open the stored secrets"),
        "{message}"
    );
    assert_eq!(
        snapshot(&db).await,
        before,
        "the stored jobs and events are unchanged"
    );
}

/// Every job's state and sealed secrets, and every audit event's hash.
async fn snapshot(db: &Path) -> Vec<String> {
    use sqlx::{Connection, Row};
    let mut conn = crate::helpers::read_only(db).await;
    let mut rows = Vec::new();
    for row in sqlx::query(
        "SELECT job_id, state, attempts, version, code, code_verifier, access_token FROM jobs \
         ORDER BY id",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap()
    {
        rows.push(format!(
            "{} {} {} {} {:?} {:?} {:?}",
            row.get::<String, _>(0),
            row.get::<String, _>(1),
            row.get::<i64, _>(2),
            row.get::<i64, _>(3),
            row.get::<Option<String>, _>(4),
            row.get::<Option<String>, _>(5),
            row.get::<Option<String>, _>(6),
        ));
    }
    for row in sqlx::query("SELECT seq, hash FROM audit_events ORDER BY seq")
        .fetch_all(&mut conn)
        .await
        .unwrap()
    {
        rows.push(format!(
            "{} {}",
            row.get::<i64, _>(0),
            row.get::<String, _>(1)
        ));
    }
    conn.close().await.ok();
    assert!(!rows.is_empty());
    rows
}

/// Polls GetJob until the job's token is gone (the sweep runs every second).
async fn wait_token_erased(app: &mut TestApp, job_id: &str) -> token_broker::api::proto::Job {
    tokio::time::timeout(crate::helpers::PATIENCE, async {
        loop {
            let job = app.get(job_id).await;
            if job.token.is_none() {
                return job;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the token is erased")
}

#[tokio::test]
async fn a_delivered_token_is_erased_after_the_retention() {
    let mut app = TestApp::spawn_with(|config| config.security.token_retention_secs = 0).await;
    let job = app.exchange(app.new_request("app")).await;
    assert!(job.token.is_some(), "delivered once");
    let erased = wait_token_erased(&mut app, &job.job_id).await;
    assert_eq!(erased.state(), JobState::Succeeded, "the outcome stays");
}

#[tokio::test]
async fn an_expired_token_is_erased_even_if_never_delivered() {
    let fake = start_fake_with(FakeOptions {
        token_lifetime_secs: 1,
        ..FakeOptions::default()
    })
    .await;
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let config = crate::helpers::test_config(&dir, &fake);
    let mut app = TestApp::start(config, fake, dir).await;
    let job = app.submit(app.new_request("app")).await;
    // Wait for the outcome without receiving the token (ListJobs-like: the audit view).
    let done = tokio::time::timeout(crate::helpers::PATIENCE, async {
        loop {
            let mut conn = crate::helpers::read_only(&app.db_path()).await;
            let state: String = sqlx::query_scalar("SELECT state FROM jobs WHERE job_id = ?1")
                .bind(&job.job_id)
                .fetch_one(&mut conn)
                .await
                .unwrap();
            if state == "succeeded" {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(done.is_ok());
    let erased = wait_token_erased(&mut app, &job.job_id).await;
    assert_eq!(erased.state(), JobState::Succeeded);
}
