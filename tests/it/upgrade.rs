//! A database made by the previous release opens under this build with every job, key and audit
//! event intact. The fixture (`tests/fixtures/release-34d5195`) was made by that release's binary
//! with `tests/fixtures/make_release_fixture.sh`, which also recorded what its own `jobs list`
//! and `audit export` showed; this build must show the same, migrate the file, and go on.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
};

use token_broker::api::proto::JobState;

use crate::helpers::{TestApp, start_fake, start_up_error, test_config};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/release-34d5195"
);

/// Copies the fixture's database and its key files into `dir` (keys private, as the daemon
/// makes them); returns the database's path.
fn copy_fixture(dir: &Path) -> PathBuf {
    for name in ["broker.db", "broker.db.key", "broker.db.audit-key"] {
        let target = dir.join(name);
        std::fs::copy(Path::new(FIXTURE).join(name), &target).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
    }
    dir.join("broker.db")
}

fn lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect()
}

/// What this build's auditors' command shows, as JSON lines.
fn show(args: &[&str], db: &Path) -> Vec<serde_json::Value> {
    let output = Command::new(env!("CARGO_BIN_EXE_token-broker"))
        .args(args)
        .args(["--format", "jsonl", "--database"])
        .arg(db)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    lines(&String::from_utf8(output.stdout).unwrap())
}

fn recorded(name: &str) -> Vec<serde_json::Value> {
    lines(&std::fs::read_to_string(Path::new(FIXTURE).join(name)).unwrap())
}

#[tokio::test]
async fn a_database_made_by_the_previous_release_opens_with_everything_intact() {
    let expected_jobs = recorded("jobs.jsonl");
    let expected_events = recorded("events.jsonl");
    assert_eq!(expected_jobs.len(), 23);
    assert_eq!(expected_events.len(), 128);

    let dir = Arc::new(tempfile::tempdir().unwrap());
    let db = copy_fixture(dir.path());
    // Read by this build before any daemon touched it: what the old build showed.
    assert_eq!(show(&["jobs", "list"], &db), expected_jobs);
    assert_eq!(show(&["audit", "export"], &db), expected_events);

    // The daemon opens it with its keys (the stored sealed secrets open: a wrong key would be
    // refused, below), migrates it, and goes on with new work on top.
    let fake = start_fake().await;
    let mut config = test_config(&dir, &fake);
    config.storage.path = db.clone();
    let mut app = TestApp::start(config, fake, Arc::clone(&dir)).await;
    let job = app.exchange(app.new_request("app")).await;
    assert_eq!(job.state(), JobState::Succeeded);
    app.stop().await;

    // Every old job as it was, every old event
    // unchanged, the new ones chained after them, and the whole chain verifies.
    let jobs = show(&["jobs", "list"], &db);
    assert_eq!(jobs.len(), expected_jobs.len() + 1);
    for (now, then) in jobs.iter().zip(&expected_jobs) {
        // A job changes only when its delivered token is erased (the fixture's tokens were
        // delivered when it was made, so this depends on when the test runs): its updated_at.
        let (mut now, mut then) = (now.clone(), then.clone());
        let (updated_now, updated_then) = (now["updated_at"].take(), then["updated_at"].take());
        assert!(updated_now.as_str() >= updated_then.as_str(), "{now}");
        assert_eq!(now, then);
    }
    let events = show(&["audit", "export"], &db);
    assert_eq!(events[..expected_events.len()], expected_events[..]);
    assert_eq!(events.len(), expected_events.len() + 4);
    let output = Command::new(env!("CARGO_BIN_EXE_token-broker"))
        .args(["audit", "verify", "--json", "--database"])
        .arg(&db)
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(output.status.success(), "{report}");
    assert_eq!(report["events_checked"], 132, "{report}");

    // The deliveries it had noted on the job rows move to their own table (migration 10),
    // checked on a copy that only the migrations touch (no sweep erases anything).
    let moved = Arc::new(tempfile::tempdir().unwrap());
    let moved_db = copy_fixture(moved.path());
    let held_delivered = {
        let mut conn = crate::helpers::read_only(&moved_db).await;
        sqlx::query_as::<_, (i64, i64)>(
            "SELECT id, token_delivered_at FROM jobs
             WHERE access_token IS NOT NULL AND token_delivered_at IS NOT NULL ORDER BY id",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap()
    };
    assert_eq!(held_delivered.len(), 20, "the fixture's delivered tokens");
    {
        use sqlx::Connection;
        let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", moved_db.display()))
            .await
            .unwrap();
        sqlx::migrate!("./migrations/sqlite")
            .run(&mut conn)
            .await
            .unwrap();
        let noted: Vec<(i64, i64)> =
            sqlx::query_as("SELECT id, delivered_at FROM token_deliveries ORDER BY id")
                .fetch_all(&mut conn)
                .await
                .unwrap();
        assert_eq!(noted, held_delivered);
    }

    // The fixture holds sealed secrets that only its key opens: another key is refused.
    let other = Arc::new(tempfile::tempdir().unwrap());
    let other_db = copy_fixture(other.path());
    std::fs::remove_file(other.path().join("broker.db.key")).unwrap();
    token_broker::security::crypto::KeyRing::load_or_create(&other.path().join("broker.db.key"))
        .unwrap();
    let fake = start_fake().await;
    let mut config = test_config(&other, &fake);
    config.storage.path = other_db;
    let error = start_up_error(config).await;
    assert!(error.contains("do not open the stored secrets"), "{error}");
}
