//! The audit trail as auditors use it: event sequences, tamper evidence, pagination, exports,
//! fingerprints, retention, and the absence of secrets.

use std::{path::Path, process::Command};

use token_broker::{
    api::proto::{
        FingerprintCodeRequest, JobState, ListAuditEventsRequest, ListJobsRequest,
        VerifyAuditLogRequest, audit_log_client::AuditLogClient,
    },
    audit::AuditRecord,
    domain::job::UnixMillis,
    store::Store,
    tools::fake_upstream::{Faults, Scripted},
    tools::inspect::{Format, parse_export},
};
use tonic::transport::Channel;

use crate::helpers::{Daemon, TestApp, new_request, start_fake};

async fn audit_client(app: &TestApp) -> AuditLogClient<Channel> {
    AuditLogClient::connect(format!("http://{}", app.grpc_addr))
        .await
        .unwrap()
}

/// Every event through ListAuditEvents, optionally for one job, paging `page_size` at a time.
async fn all_events(
    client: &mut AuditLogClient<Channel>,
    job_id: &str,
    page_size: u32,
) -> Vec<token_broker::api::proto::AuditEvent> {
    let mut events = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_audit_events(ListAuditEventsRequest {
                job_id: job_id.to_string(),
                page_size,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        events.extend(page.events);
        if page.next_page_token.is_empty() {
            return events;
        }
        token = page.next_page_token;
    }
}

async fn kinds(client: &mut AuditLogClient<Channel>, job_id: &str) -> Vec<String> {
    all_events(client, job_id, 100)
        .await
        .into_iter()
        .map(|e| e.kind)
        .collect()
}

async fn verify(
    client: &mut AuditLogClient<Channel>,
) -> token_broker::api::proto::VerifyAuditLogResponse {
    client
        .verify_audit_log(VerifyAuditLogRequest::default())
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn every_path_leaves_exactly_its_event_sequence_and_the_chain_verifies() {
    let mut app = TestApp::spawn_with(|config| {
        config.retry.job_ttl_secs = 2;
        config.retry.initial_delay_ms = 10;
    })
    .await;
    let mut audit = audit_client(&app).await;

    let success = app.exchange(app.new_request("app")).await;
    app.fake.script([Scripted::Status(400)]);
    let bad_request = app.exchange(app.new_request("app")).await;
    let mut forbidden = app.new_request("app");
    forbidden.code_verifier = "v".repeat(60);
    let forbidden = app.exchange(forbidden).await;
    app.fake.script([Scripted::Status(500)]);
    let retried = app.exchange(app.new_request("app")).await;
    app.fake.script([Scripted::DropAfter]);
    let unknown = app.exchange(app.new_request("app")).await;
    app.fake.set_faults(Faults {
        retry_after_secs: 60,
        ..Faults::default()
    });
    app.fake.script([Scripted::Status(429)]);
    let expired = app.exchange(app.new_request("app")).await;

    let expectations: [(&str, &[&str]); 6] = [
        (
            &success.job_id,
            &[
                "job.submitted",
                "attempt.started",
                "attempt.finished",
                "job.succeeded",
            ],
        ),
        (
            &bad_request.job_id,
            &[
                "job.submitted",
                "attempt.started",
                "attempt.finished",
                "job.failed",
            ],
        ),
        (
            &forbidden.job_id,
            &[
                "job.submitted",
                "attempt.started",
                "attempt.finished",
                "job.failed",
            ],
        ),
        (
            &retried.job_id,
            &[
                "job.submitted",
                "attempt.started",
                "attempt.finished",
                "job.retry_scheduled",
                "attempt.started",
                "attempt.finished",
                "job.succeeded",
            ],
        ),
        (
            &unknown.job_id,
            &[
                "job.submitted",
                "attempt.started",
                "attempt.unknown",
                "job.retry_scheduled",
                "attempt.started",
                "attempt.finished",
                "job.failed",
            ],
        ),
        (
            &expired.job_id,
            &[
                "job.submitted",
                "attempt.started",
                "attempt.finished",
                "job.expired",
            ],
        ),
    ];
    for (job_id, expected) in expectations {
        assert_eq!(kinds(&mut audit, job_id).await, expected, "job {job_id}");
    }

    // The details say what upstream answered and why the job ended, with the fingerprint.
    let events = all_events(&mut audit, &forbidden.job_id, 100).await;
    assert_eq!(events[2].http_status, 403);
    assert_eq!(events[3].detail, "forbidden");
    assert!(
        events
            .iter()
            .all(|e| e.code_fingerprint == forbidden.code_fingerprint)
    );
    assert_eq!(forbidden.code_fingerprint.len(), 64);
    let events = all_events(&mut audit, &unknown.job_id, 100).await;
    assert_eq!(events[6].detail, "outcome_unknown");

    // Cancelled while waiting for a retry: the cancellation is recorded.
    app.fake.set_faults(Faults::default());
    let cancelled = {
        // Another client: "app" is paused for a minute by the 429 above.
        let mut app_config_free = app.new_request("other-app");
        app_config_free.idempotency_key = "cancel-me".into();
        app.fake.set_faults(Faults {
            retry_after_secs: 1,
            ..Faults::default()
        });
        app.fake.script([Scripted::Status(503)]);
        let job = app.submit(app_config_free).await;
        app.wait_for_state(&job.job_id, JobState::RetryWait).await;
        app.cancel(&job.job_id).await.unwrap()
    };
    assert_eq!(
        kinds(&mut audit, &cancelled.job_id).await,
        [
            "job.submitted",
            "attempt.started",
            "attempt.finished",
            "job.retry_scheduled",
            "job.cancelled"
        ]
    );

    // Queued past its TTL: expired by the sweep without an attempt.
    let (mut config, fake, dir) = app.stop().await;
    config.limits.default_client_rps = 1;
    config.limits.default_client_burst = 1;
    let mut app = TestApp::start(config, fake, dir).await;
    // One permit per second and two seconds to live: the sixth job's turn comes three seconds
    // after its TTL, a margin that holds even when the submissions themselves are slow.
    let mut jobs = Vec::new();
    for _ in 0..6 {
        jobs.push(app.submit(app.new_request("slow-app")).await);
    }
    for job in &jobs {
        app.wait_terminal(&job.job_id).await;
    }
    let mut audit = audit_client(&app).await;
    assert_eq!(
        kinds(&mut audit, &jobs[5].job_id).await,
        ["job.submitted", "job.expired"]
    );

    let report = verify(&mut audit).await;
    assert!(report.ok, "{report:?}");
    assert!(report.events_checked > 40);
    assert_eq!(report.first_bad_seq, 0);
}

/// Copies a stopped daemon's database so each test of tampering starts from the same file.
fn copy_db(from: &Path, to: &Path) {
    std::fs::copy(from, to).unwrap();
    for suffix in ["-wal", "-shm"] {
        let mut wal = from.as_os_str().to_owned();
        wal.push(suffix);
        if Path::new(&wal).exists() {
            let mut target = to.as_os_str().to_owned();
            target.push(suffix);
            std::fs::copy(&wal, &target).unwrap();
        }
    }
}

async fn tamper(db: &Path, sql: &str) {
    use sqlx::{Connection, sqlite::SqliteConnectOptions};
    let mut conn = sqlx::SqliteConnection::connect_with(&SqliteConnectOptions::new().filename(db))
        .await
        .unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
}

async fn verify_file(db: &Path) -> token_broker::audit::VerifyReport {
    let store = Store::open_read_only(db).await.unwrap();
    let report = store.verify_audit_log().await.unwrap();
    store.close().await;
    report
}

#[tokio::test]
async fn edited_deleted_swapped_or_truncated_rows_are_caught_at_the_right_seq() {
    let mut app = TestApp::spawn().await;
    for _ in 0..3 {
        app.exchange(app.new_request("app")).await;
    }
    let (config, _, dir) = app.stop().await;
    let original = config.storage.path.clone();
    assert!(verify_file(&original).await.ok);
    let total: i64 = 12;

    let cases: [(&str, &str, i64); 5] = [
        (
            "edit",
            "UPDATE audit_events SET detail = 'nothing happened' WHERE seq = 5",
            5,
        ),
        ("delete", "DELETE FROM audit_events WHERE seq = 7", 8),
        (
            "swap",
            "UPDATE audit_events SET job_id = CASE seq WHEN 3 THEN (SELECT job_id FROM audit_events WHERE seq = 6) \
             ELSE (SELECT job_id FROM audit_events WHERE seq = 3) END WHERE seq IN (3, 6)",
            3,
        ),
        ("truncate", "DELETE FROM audit_events WHERE seq = 12", total),
        (
            "rehash-less reorder",
            "UPDATE audit_events SET at = at + 1 WHERE seq = 10",
            10,
        ),
    ];
    for (name, sql, bad_seq) in cases {
        let copy = dir.path().join(format!("{}.db", name.replace(' ', "-")));
        copy_db(&original, &copy);
        tamper(&copy, sql).await;
        let report = verify_file(&copy).await;
        assert!(!report.ok, "{name}: {report:?}");
        assert_eq!(report.first_bad_seq, Some(bad_seq), "{name}: {report:?}");
    }

    // The command line says the same, with a failing exit status.
    let copy = dir.path().join("cli.db");
    copy_db(&original, &copy);
    tamper(
        &copy,
        "UPDATE audit_events SET http_status = 200 WHERE seq = 9",
    )
    .await;
    let output = Command::new(env!("CARGO_BIN_EXE_token-broker"))
        .args(["audit", "verify", "--json", "--database"])
        .arg(&copy)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["first_bad_seq"], 9, "{report}");
    let output = Command::new(env!("CARGO_BIN_EXE_token-broker"))
        .args(["audit", "verify", "--database"])
        .arg(&original)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
}

#[tokio::test]
async fn pagination_returns_every_event_exactly_once_while_writers_append() {
    let app = TestApp::spawn().await;
    let mut audit = audit_client(&app).await;
    let writers = {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..3 {
            let mut client = app.client.clone();
            let requests: Vec<_> = (0..15).map(|_| app.new_request("app")).collect();
            tasks.spawn(async move {
                for request in requests {
                    client.exchange(request).await.unwrap();
                }
            });
        }
        tasks
    };

    // Page through while the writers run; when caught up, wait for them once, then page on
    // from where the last page ended until the end.
    let mut seen: Vec<u64> = Vec::new();
    let mut token = String::new();
    let mut writers = Some(writers);
    loop {
        let page = audit
            .list_audit_events(ListAuditEventsRequest {
                page_size: 7,
                page_token: token.clone(),
                after_seq: seen.last().copied().unwrap_or(0),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.events.iter().map(|e| e.seq));
        if !page.next_page_token.is_empty() {
            token = page.next_page_token;
            continue;
        }
        token = String::new();
        match writers.take() {
            Some(tasks) => {
                tasks.join_all().await;
            }
            None => break,
        }
    }
    let total = all_events(&mut audit, "", 1000).await.len() as u64;
    assert_eq!(total, 45 * 4, "45 successful exchanges, 4 events each");
    let expected: Vec<u64> = (1..=total).collect();
    assert_eq!(seen, expected, "every event exactly once, in order");
}

#[tokio::test]
async fn exports_parse_back_fingerprints_find_jobs_and_no_secret_leaks() {
    let fake = start_fake().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("broker.db");
    let log = dir.path().join("daemon.log");
    let daemon = Daemon::start_logging(&db, &fake.token_url(), Some(log.clone()));
    let mut client = daemon.client().await;

    let mut secrets = Vec::new();
    let mut last_code = String::new();
    for round in 0..4 {
        if round == 1 {
            fake.script([Scripted::Status(503)]);
        }
        let request = new_request(&fake, "app");
        secrets.push(request.code.clone());
        secrets.push(request.code_verifier.clone());
        last_code = request.code.clone();
        let job = client.exchange(request).await.unwrap().into_inner();
        let token = job.token.expect("succeeded").access_token;
        secrets.push(token);
    }
    let mut audit = AuditLogClient::connect(format!("http://{}", daemon.addr))
        .await
        .unwrap();
    let api_events: Vec<AuditRecord> = all_events(&mut audit, "", 1000)
        .await
        .into_iter()
        .map(|e| AuditRecord {
            seq: e.seq as i64,
            at: e.at.unwrap().seconds * 1000 + i64::from(e.at.unwrap().nanos) / 1_000_000,
            job_id: e.job_id,
            tenant: e.tenant,
            client_id: e.client_id,
            kind: e.kind.into(),
            attempt: (e.attempt > 0).then_some(e.attempt),
            http_status: (e.http_status > 0).then_some(e.http_status as u16),
            detail: (!e.detail.is_empty()).then_some(e.detail),
            code_fingerprint: (!e.code_fingerprint.is_empty()).then_some(e.code_fingerprint),
            prev_hash: e.prev_hash,
            hash: e.hash,
        })
        .collect();
    // Four exchanges of four events each, and one retry of three more.
    assert_eq!(api_events.len(), 19);

    // The fingerprint of a code, by API and by command line, finds its job.
    let fingerprint = audit
        .fingerprint_code(FingerprintCodeRequest {
            code: last_code.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .code_fingerprint;
    let found = audit
        .list_jobs(ListJobsRequest {
            code_fingerprint: fingerprint.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(found.len(), 1);
    assert!(found[0].token.is_none(), "listings never carry tokens");
    let listed = audit
        .list_jobs(ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(listed.len(), 4);
    assert!(listed.iter().all(|job| job.token.is_none()));

    let mut cli = Command::new(env!("CARGO_BIN_EXE_token-broker"));
    cli.args(["audit", "fingerprint", "--database"]).arg(&db);
    cli.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut child = cli.spawn().unwrap();
    {
        use std::io::Write;
        writeln!(child.stdin.take().unwrap(), "{last_code}").unwrap();
    }
    let output = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), fingerprint);

    // Exports in every machine format parse back to exactly the stored events.
    let mut outputs = vec![log.clone()];
    for (format, name) in [
        (Format::Json, "json"),
        (Format::Jsonl, "jsonl"),
        (Format::Csv, "csv"),
    ] {
        let path = dir.path().join(format!("export.{name}"));
        let status = Command::new(env!("CARGO_BIN_EXE_token-broker"))
            .args(["audit", "export", "--format", name, "--output"])
            .arg(&path)
            .arg("--database")
            .arg(&db)
            .status()
            .unwrap();
        assert!(status.success());
        assert_eq!(parse_export(format, &path).unwrap(), api_events, "{name}");
        outputs.push(path);
    }
    for (args, name) in [
        (vec!["audit", "list", "--limit", "1000"], "audit-table.txt"),
        (vec!["jobs", "list"], "jobs-table.txt"),
        (vec!["jobs", "list", "--format", "jsonl"], "jobs.jsonl"),
    ] {
        let path = dir.path().join(name);
        let status = Command::new(env!("CARGO_BIN_EXE_token-broker"))
            .args(&args)
            .arg("--output")
            .arg(&path)
            .arg("--database")
            .arg(&db)
            .status()
            .unwrap();
        assert!(status.success(), "{args:?}");
        assert!(std::fs::read_to_string(&path).unwrap().lines().count() >= 4);
        outputs.push(path);
    }
    daemon.kill();

    // No code, verifier or token in the logs, the exports, or the audit table.
    let mut stored = String::new();
    for event in &api_events {
        stored.push_str(&serde_json::to_string(event).unwrap());
    }
    for path in &outputs {
        let text = std::fs::read_to_string(path).unwrap();
        assert!(!text.is_empty(), "{} is empty", path.display());
        for secret in &secrets {
            assert!(
                !text.contains(secret.as_str()),
                "a secret leaked into {}",
                path.display()
            );
        }
    }
    for secret in &secrets {
        assert!(
            !stored.contains(secret.as_str()),
            "a secret leaked into the audit trail"
        );
    }
    // The log carries the chain: every event's hash is there for a log pipeline to keep.
    let log_text = std::fs::read_to_string(&log).unwrap();
    for event in &api_events {
        assert!(
            log_text.contains(&event.hash),
            "seq {} not in the log",
            event.seq
        );
    }
}

async fn stored_events(store: &Store) -> Vec<AuditRecord> {
    store
        .list_events(&token_broker::store::EventQuery {
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .items
}

#[tokio::test]
async fn retention_leaves_a_checkpoint_and_the_chain_still_verifies() {
    let mut app = TestApp::spawn().await;
    for _ in 0..5 {
        app.exchange(app.new_request("app")).await;
    }
    let (config, fake, dir) = app.stop().await;

    // Prune everything before the third job's first event.
    let store = crate::helpers::open_store(&config).await;
    let events = stored_events(&store).await;
    let cutoff = UnixMillis(events[8].at);
    let pruned = store
        .prune_audit_events(cutoff, UnixMillis::now())
        .await
        .unwrap()
        .expect("old events pruned");
    let remaining = stored_events(&store).await;
    assert_eq!(remaining[0].kind.as_str(), "audit.checkpoint");
    assert_eq!(remaining[0].seq, pruned.checkpoint_seq);
    assert_eq!(
        remaining[0].hash,
        events[(pruned.checkpoint_seq - 1) as usize].hash
    );
    assert_eq!(
        &remaining[1..],
        &events[pruned.checkpoint_seq as usize..],
        "later events are untouched"
    );
    let report = store.verify_audit_log().await.unwrap();
    assert!(report.ok, "{report:?}");
    assert!(report.detail.contains("from checkpoint"), "{report:?}");
    // The checkpoint carries the time retention ran, later than the events kept after it: a
    // time range holding that time lists it, wherever the range starts among those events.
    let checkpoint_at = remaining[0].at;
    for event in &remaining[1..] {
        let from = event.at;
        let listed: Vec<i64> = store
            .list_events(&token_broker::store::EventQuery {
                after: Some(UnixMillis(from)),
                before: Some(UnixMillis(checkpoint_at + 1)),
                limit: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .items
            .iter()
            .map(|event| event.seq)
            .collect();
        let expected: Vec<i64> = remaining
            .iter()
            .filter(|event| event.at >= from && event.at <= checkpoint_at)
            .map(|event| event.seq)
            .collect();
        assert_eq!(listed, expected, "from {from}");
    }
    // Nothing more to prune with the same cutoff.
    assert!(
        store
            .prune_audit_events(cutoff, UnixMillis::now())
            .await
            .unwrap()
            .is_none()
    );
    store.close().await;

    // The chain goes on verifying as the daemon appends after the checkpoint.
    let mut app = TestApp::start(config, fake, dir).await;
    app.exchange(app.new_request("app")).await;
    let mut audit = audit_client(&app).await;
    let report = verify(&mut audit).await;
    assert!(report.ok, "{report:?}");
}
