//! Signed checkpoints through the real binary: `audit keygen`, a daemon that signs the chain
//! head on request and at shutdown and logs each checkpoint, and `audit verify --public-key
//! --checkpoints <its log>` catching what the hash chain alone cannot: a chain rewritten with
//! every later hash recomputed, and a tail cut together with its sequence counter.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use sqlx::{Connection, sqlite::SqliteConnectOptions};
use token_broker::{
    api::proto::{
        CreateCheckpointRequest, SignedCheckpoint, VerifyAuditLogRequest,
        audit_log_client::AuditLogClient,
    },
    audit::AuditRecord,
};

use crate::helpers::{Daemon, new_request, start_fake, stored_event};

const BIN: &str = env!("CARGO_BIN_EXE_token-broker");

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run token-broker")
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

/// `audit verify --json` on `db` with extra arguments: the exit code and the report.
fn verify(db: &Path, extra: &[&str]) -> (Option<i32>, serde_json::Value) {
    let mut args = vec!["audit", "verify", "--json", "--database", path(db)];
    args.extend_from_slice(extra);
    let output = run(&args);
    let report = serde_json::from_slice(&output.stdout).unwrap_or_else(|_| {
        panic!(
            "a JSON report: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output.status.code(), report)
}

fn copy_db(from: &Path, to: &Path) {
    std::fs::copy(from, to).unwrap();
    for suffix in ["-wal", "-shm"] {
        let mut source = from.as_os_str().to_owned();
        source.push(suffix);
        if Path::new(&source).exists() {
            let mut target = to.as_os_str().to_owned();
            target.push(suffix);
            std::fs::copy(&source, &target).unwrap();
        }
    }
}

async fn open(db: &Path) -> sqlx::SqliteConnection {
    sqlx::SqliteConnection::connect_with(&SqliteConnectOptions::new().filename(db))
        .await
        .unwrap()
}

async fn execute(db: &Path, sql: &str) {
    let mut conn = open(db).await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
}

/// What someone with write access to the file does: edits event `seq` and recomputes the hash
/// of every event from there on, so the chain verifies again.
async fn rewrite_with_rehash(db: &Path, seq: i64) {
    let mut conn = open(db).await;
    let rows = sqlx::query("SELECT * FROM audit_events ORDER BY seq")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    let mut records: Vec<AuditRecord> = rows.iter().map(stored_event).collect();
    let start = records.iter().position(|r| r.seq == seq).unwrap();
    records[start].detail = Some("nothing to see here".into());
    for index in start..records.len() {
        if index > 0 {
            records[index].prev_hash = records[index - 1].hash.clone();
        }
        records[index].hash = records[index].expected_hash();
        sqlx::query(
            "UPDATE audit_events SET detail = ?1, prev_hash = ?2, hash = ?3 WHERE seq = ?4",
        )
        .bind(&records[index].detail)
        .bind(&records[index].prev_hash)
        .bind(&records[index].hash)
        .bind(records[index].seq)
        .execute(&mut conn)
        .await
        .unwrap();
    }
    conn.close().await.unwrap();
}

/// The checkpoints logged so far, once `count` are there.
fn logged_checkpoints(log: &Path, count: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|line| line["event"] == "audit.checkpoint")
            .collect();
        if lines.len() >= count || Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn audit_client(daemon: &Daemon) -> AuditLogClient<tonic::transport::Channel> {
    AuditLogClient::connect(format!("http://{}", daemon.addr))
        .await
        .unwrap()
}

async fn create_checkpoint(
    audit: &mut AuditLogClient<tonic::transport::Channel>,
) -> (SignedCheckpoint, bool) {
    let response = audit
        .create_checkpoint(CreateCheckpointRequest::default())
        .await
        .unwrap()
        .into_inner();
    (response.checkpoint.unwrap(), response.created)
}

/// A database whose chain was checkpointed at seq 12, 24 and (at shutdown) 28, the daemon's
/// JSON log holding those checkpoints, and the key pair.
struct Signed {
    dir: tempfile::TempDir,
    db: PathBuf,
    log: PathBuf,
    key: PathBuf,
    public: PathBuf,
}

impl Signed {
    fn copy(&self, name: &str) -> PathBuf {
        let copy = self.dir.path().join(format!("{name}.db"));
        copy_db(&self.db, &copy);
        copy
    }

    fn trust(&self) -> Vec<&str> {
        vec![
            "--public-key",
            path(&self.public),
            "--checkpoints",
            path(&self.log),
        ]
    }
}

async fn signed_database() -> Signed {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("signing.key");
    let output = run(&["audit", "keygen", "--out", path(&key)]);
    assert!(output.status.success(), "{output:?}");
    let printed = String::from_utf8(output.stdout).unwrap();
    assert!(printed.starts_with("ed25519:"), "{printed}");
    let public = dir.path().join("signing.key.pub");
    assert_eq!(std::fs::read_to_string(&public).unwrap(), printed);
    // A second keygen never replaces a key.
    let again = run(&["audit", "keygen", "--out", path(&key)]);
    assert_eq!(again.status.code(), Some(1), "{again:?}");

    let fake = start_fake().await;
    let db = dir.path().join("broker.db");
    let log = dir.path().join("daemon.log");
    let daemon = Daemon::start_with_env(
        &db,
        &fake.token_url(),
        Some(log.clone()),
        &[
            ("TOKEN_BROKER_AUDIT__SIGNING_KEY_FILE", path(&key)),
            // Only on request and at shutdown during this test.
            ("TOKEN_BROKER_AUDIT__CHECKPOINT_INTERVAL_SECS", "86400"),
        ],
    );
    let mut client = daemon.client().await;
    let mut audit = audit_client(&daemon).await;
    let empty = audit
        .create_checkpoint(CreateCheckpointRequest::default())
        .await
        .unwrap_err();
    assert_eq!(empty.code(), tonic::Code::NotFound, "{empty:?}");

    let mut exchange = async |count| {
        for _ in 0..count {
            let job = client
                .exchange(new_request(&fake, "app"))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(job.state(), token_broker::api::proto::JobState::Succeeded);
            assert!(job.token.is_some());
        }
    };
    exchange(3).await;
    let (first, created) = create_checkpoint(&mut audit).await;
    assert!(created);
    assert_eq!(first.seq, 12);
    assert!(first.prev_signature.is_empty());
    exchange(3).await;
    let (second, created) = create_checkpoint(&mut audit).await;
    assert!(created);
    assert_eq!(second.seq, 24);
    assert_eq!(second.prev_signature, first.signature);
    // Nothing moved: the same checkpoint, not a new one.
    let (same, created) = create_checkpoint(&mut audit).await;
    assert!(!created);
    assert_eq!(same, second);

    // The live daemon verifies against the key and the checkpoints it handed out.
    let public_key = std::fs::read_to_string(&public).unwrap().trim().to_string();
    let report = audit
        .verify_audit_log(VerifyAuditLogRequest {
            public_keys: vec![public_key.clone()],
            checkpoints: vec![first.clone(), second.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.checkpoints_checked, 4);
    assert_eq!(report.last_checkpoint, Some(second.clone()));
    let mut forged = second.clone();
    forged.hash = "0".repeat(64);
    let report = audit
        .verify_audit_log(VerifyAuditLogRequest {
            public_keys: vec![public_key],
            checkpoints: vec![forged],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!report.ok);
    assert!(report.detail.contains("no valid signature"), "{report:?}");
    let refused = audit
        .verify_audit_log(VerifyAuditLogRequest {
            public_keys: vec!["ed25519:nothex".into()],
            checkpoints: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    let refused = audit
        .verify_audit_log(VerifyAuditLogRequest {
            public_keys: vec![],
            checkpoints: vec![first],
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);

    // One more exchange, then a graceful stop: the drain signs the head (seq 28).
    exchange(1).await;
    drop((client, audit));
    let status = Command::new("kill")
        .args(["-TERM", &daemon.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // Waited for off the runtime, which must go on closing this side's connections.
    let (daemon, exit) = tokio::task::spawn_blocking(move || {
        let mut daemon = daemon;
        let exit = daemon.child.wait().unwrap();
        (daemon, exit)
    })
    .await
    .unwrap();
    assert!(exit.success());
    let logged = logged_checkpoints(&log, 3);
    let seqs: Vec<i64> = logged.iter().map(|c| c["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, [12, 24, 28], "{logged:?}");
    drop(daemon);
    Signed {
        dir,
        db,
        log,
        key,
        public,
    }
}

#[tokio::test]
async fn signed_checkpoints_catch_a_rewritten_chain_and_a_cut_tail() {
    let signed = signed_database().await;

    // Untouched: intact against the key and every logged checkpoint.
    let (code, report) = verify(&signed.db, &signed.trust());
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(report["checkpoints_checked"], 6, "{report}");
    assert_eq!(report["last_checkpoint"]["seq"], 28, "{report}");

    // An edit at seq 5 with every later hash recomputed, the stored checkpoints (which no
    // longer match) deleted: the chain alone says intact...
    let rewritten = signed.copy("rewritten");
    rewrite_with_rehash(&rewritten, 5).await;
    execute(&rewritten, "DELETE FROM audit_checkpoints").await;
    let (code, report) = verify(&rewritten, &[]);
    assert_eq!(code, Some(0), "the chain alone cannot tell: {report}");
    // ...the logged checkpoints cannot be matched: the first signed seq that differs is named.
    let (code, report) = verify(&rewritten, &signed.trust());
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(report["first_bad_seq"], 12, "{report}");
    let detail = report["detail"].as_str().unwrap();
    assert!(
        detail.contains("event 12 does not carry the hash signed"),
        "{detail}"
    );
    assert!(
        detail.contains("events 1 to 12 cannot be trusted"),
        "{detail}"
    );
    assert!(
        detail.contains("no longer holds the checkpoint"),
        "{detail}"
    );
    // Rewritten after the first checkpoint: what that checkpoint signed still matches, which
    // narrows what cannot be trusted.
    let later = signed.copy("rewritten-later");
    rewrite_with_rehash(&later, 15).await;
    execute(&later, "DELETE FROM audit_checkpoints WHERE seq > 12").await;
    let (code, report) = verify(&later, &signed.trust());
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(report["first_bad_seq"], 24, "{report}");
    let detail = report["detail"].as_str().unwrap();
    assert!(
        detail.contains("events 13 to 24 cannot be trusted"),
        "{detail}"
    );
    // Left in place, the stored checkpoints give it away even without the key.
    let rewritten_kept = signed.copy("rewritten-kept");
    rewrite_with_rehash(&rewritten_kept, 5).await;
    let (code, report) = verify(&rewritten_kept, &[]);
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(report["first_bad_seq"], 12, "{report}");
    // And the daemon, restarted on it with its key, refuses to sign the rewritten head.
    let fake = start_fake().await;
    let daemon = Daemon::start_with_env(
        &rewritten_kept,
        &fake.token_url(),
        None,
        &[
            ("TOKEN_BROKER_AUDIT__SIGNING_KEY_FILE", path(&signed.key)),
            // The original's key files: the copy's secrets are sealed with them.
            (
                "TOKEN_BROKER_SECURITY__KEY_FILE",
                &format!("{}.key", path(&signed.db)),
            ),
            (
                "TOKEN_BROKER_AUDIT__FINGERPRINT_KEY_FILE",
                &format!("{}.audit-key", path(&signed.db)),
            ),
        ],
    );
    let mut audit = audit_client(&daemon).await;
    let refused = audit
        .create_checkpoint(CreateCheckpointRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Internal, "{refused:?}");
    daemon.kill();
    let output = run(&[
        "audit",
        "checkpoints",
        "--format",
        "jsonl",
        "--database",
        path(&rewritten_kept),
    ]);
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).lines().count(),
        3,
        "no checkpoint was added"
    );

    // The tail cut after seq 20, with the sequence counter and the stored checkpoints that
    // covered it: the chain alone says intact; the log names the first missing seq.
    let cut = signed.copy("cut");
    execute(
        &cut,
        "DELETE FROM audit_events WHERE seq > 20;
         UPDATE sqlite_sequence SET seq = 20 WHERE name = 'audit_events';
         DELETE FROM audit_checkpoints WHERE seq > 20;",
    )
    .await;
    let (code, report) = verify(&cut, &[]);
    assert_eq!(code, Some(0), "the chain alone cannot tell: {report}");
    let (code, report) = verify(&cut, &signed.trust());
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(report["first_bad_seq"], 21, "{report}");
    let detail = report["detail"].as_str().unwrap();
    assert!(detail.contains("events 21 to 28 were removed"), "{detail}");

    // A checkpoint row forged without the key is caught by its signature.
    let forged = signed.copy("forged");
    execute(
        &forged,
        "UPDATE audit_checkpoints SET hash = (SELECT hash FROM audit_events WHERE seq = 13), \
         seq = 13 WHERE seq = 12",
    )
    .await;
    let (code, report) = verify(&forged, &["--public-key", path(&signed.public)]);
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(report["first_bad_seq"], 13, "{report}");
    assert!(
        report["detail"]
            .as_str()
            .unwrap()
            .contains("no valid signature"),
        "{report}"
    );
}

#[tokio::test]
async fn a_wrong_or_missing_key_is_refused_clearly() {
    let signed = signed_database().await;
    let dir = signed.dir.path();

    // Checked against another key, every checkpoint is named as someone else's.
    let other = dir.join("other.key");
    assert!(
        run(&["audit", "keygen", "--out", path(&other)])
            .status
            .success()
    );
    let other_public = dir.join("other.key.pub");
    let (code, report) = verify(
        &signed.db,
        &[
            "--public-key",
            path(&other_public),
            "--checkpoints",
            path(&signed.log),
        ],
    );
    assert_eq!(code, Some(1), "{report}");
    assert!(
        report["detail"]
            .as_str()
            .unwrap()
            .contains("not by any public key given"),
        "{report}"
    );
    // Both keys (a rotation): intact.
    let (code, report) = verify(
        &signed.db,
        &[
            "--public-key",
            path(&other_public),
            "--public-key",
            path(&signed.public),
            "--checkpoints",
            path(&signed.log),
        ],
    );
    assert_eq!(code, Some(0), "{report}");

    // A missing public key file, checkpoints without a key, a file without checkpoints.
    let missing = run(&[
        "audit",
        "verify",
        "--database",
        path(&signed.db),
        "--public-key",
        path(&dir.join("nowhere.pub")),
    ]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("cannot read the key file"),
        "{missing:?}"
    );
    let keyless = run(&[
        "audit",
        "verify",
        "--database",
        path(&signed.db),
        "--checkpoints",
        path(&signed.log),
    ]);
    assert_eq!(keyless.status.code(), Some(2), "{keyless:?}");
    let empty = dir.join("empty.log");
    std::fs::write(&empty, "not a checkpoint\n").unwrap();
    let nothing = run(&[
        "audit",
        "verify",
        "--database",
        path(&signed.db),
        "--public-key",
        path(&signed.public),
        "--checkpoints",
        path(&empty),
    ]);
    assert_eq!(nothing.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&nothing.stderr).contains("holds no signed checkpoint"),
        "{nothing:?}"
    );

    // `audit checkpoints` lists them for a witness; its lines verify like the log's.
    let listed = dir.join("witness.jsonl");
    let output = run(&[
        "audit",
        "checkpoints",
        "--database",
        path(&signed.db),
        "--format",
        "jsonl",
        "--output",
        path(&listed),
    ]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(std::fs::read_to_string(&listed).unwrap().lines().count(), 3);
    let (code, report) = verify(
        &signed.db,
        &[
            "--public-key",
            path(&signed.public),
            "--checkpoints",
            path(&listed),
        ],
    );
    assert_eq!(code, Some(0), "{report}");

    // Absurd values in a given checkpoint are reported, not fatal.
    let absurd = r#"{"seq":9223372036854775807,"hash":"x","at":300000000000000,"key_id":"k","signature":"s"}"#;
    let (code, report) = verify(
        &signed.db,
        &["--public-key", path(&signed.public), "--checkpoint", absurd],
    );
    assert_eq!(code, Some(1), "{report}");
    assert!(
        report["detail"]
            .as_str()
            .unwrap()
            .contains("ms since the Unix epoch"),
        "{report}"
    );

    // A daemon told to sign with a key file that does not exist refuses to start, saying how
    // to make one.
    let fake = start_fake().await;
    let output = Command::new(BIN)
        .args(["serve"])
        .env("TOKEN_BROKER_SERVER__LISTEN", "127.0.0.1:0")
        .env("TOKEN_BROKER_SERVER__METRICS_LISTEN", "")
        .env("TOKEN_BROKER_STORAGE__PATH", dir.join("fresh.db"))
        .env("TOKEN_BROKER_UPSTREAM__TOKEN_URL", fake.token_url())
        .env(
            "TOKEN_BROKER_AUDIT__SIGNING_KEY_FILE",
            dir.join("absent.key"),
        )
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("audit keygen --out"), "{stderr}");
}

#[tokio::test]
async fn the_daemon_signs_on_its_interval_and_verifies_while_it_writes() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("signing.key");
    let signing = token_broker::audit::checkpoint::SigningKey::generate(&key).unwrap();
    let public_key = signing.public_key().to_string();
    let fake = start_fake().await;
    let db = dir.path().join("broker.db");
    let daemon = Daemon::start_with_env(
        &db,
        &fake.token_url(),
        None,
        &[
            ("TOKEN_BROKER_AUDIT__SIGNING_KEY_FILE", path(&key)),
            ("TOKEN_BROKER_AUDIT__CHECKPOINT_INTERVAL_SECS", "1"),
        ],
    );
    let mut audit = audit_client(&daemon).await;
    // Exchanges go on while the checkpoints are signed every second and the trail is verified
    // against them: a checkpoint signed during a verification is never taken for a cut tail.
    let writer = {
        let mut client = daemon.client().await;
        let fake = fake.clone();
        tokio::spawn(async move {
            loop {
                let job = client
                    .exchange(new_request(&fake, "app"))
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(job.state(), token_broker::api::proto::JobState::Succeeded);
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut verified_with = 0;
    while verified_with < 3 {
        let report = audit
            .verify_audit_log(VerifyAuditLogRequest {
                public_keys: vec![public_key.clone()],
                checkpoints: vec![],
            })
            .await
            .unwrap()
            .into_inner();
        assert!(report.ok, "{report:?}");
        verified_with = report.checkpoints_checked;
        assert!(
            Instant::now() < deadline,
            "no checkpoints signed on the interval"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    writer.abort();
    assert!(!writer.await.unwrap_err().is_panic());
}

#[test]
fn keys_init_makes_the_signing_key_once() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("signing.key");
    let init = || {
        Command::new(BIN)
            .args(["keys", "init"])
            .env("TOKEN_BROKER_STORAGE__PATH", dir.path().join("broker.db"))
            .env("TOKEN_BROKER_AUDIT__SIGNING_KEY_FILE", &key)
            .output()
            .unwrap()
    };
    let first = init();
    assert!(first.status.success(), "{first:?}");
    let printed = String::from_utf8_lossy(&first.stdout).into_owned();
    assert!(
        printed.contains(&format!("created  {}", key.display())),
        "{printed}"
    );
    let public = std::fs::read_to_string(dir.path().join("signing.key.pub")).unwrap();
    assert!(printed.contains(public.trim()), "{printed}");
    let made = std::fs::read(&key).unwrap();
    let second = init();
    assert!(second.status.success(), "{second:?}");
    assert!(
        String::from_utf8_lossy(&second.stdout).contains(&format!("kept     {}", key.display())),
        "{second:?}"
    );
    assert_eq!(
        std::fs::read(&key).unwrap(),
        made,
        "the key is never replaced"
    );
}
