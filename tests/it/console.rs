//! The auditors' web console over real HTTP: a database written by the real daemon (with the
//! fake upstream: succeeded, failed and cancelled jobs), the console served on port 0 through
//! the same `console::serve` as `token-broker console`, and plain HTTP requests. Secrets never
//! appear in any answer.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use token_broker::{
    api::proto::{
        CreateCheckpointRequest, GetJobRequest, JobState, audit_log_client::AuditLogClient,
    },
    cli::{ConsoleArgs, DatabaseArgs},
    tools::fake_upstream::{FakeUpstream, Faults, Scripted},
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

use crate::helpers::{Daemon, PATIENCE, new_request, start_fake};

/// An OAuth state a spreadsheet would run as a formula.
pub const FORMULA: &str = "=HYPERLINK(\"http://evil.example/\",\"open\")";

/// A database the daemon wrote, and what the tests look for in it.
pub struct Fixture {
    /// Kept running: the console reads beside a live daemon, as it would in production.
    _daemon: Daemon,
    _fake: FakeUpstream,
    pub dir: tempfile::TempDir,
    pub db: PathBuf,
    /// Succeeded jobs for `shop-app`, oldest first, with the code of each. The first one's
    /// OAuth state is [`FORMULA`].
    pub shop_jobs: Vec<(String, String)>,
    /// A job for `other-app` upstream refused (403: a verifier that does not match).
    pub failed: String,
    /// A job for `third-app` cancelled while waiting for a retry.
    pub cancelled: String,
    /// Every code, verifier and token the daemon saw.
    pub secrets: Vec<String>,
    /// The seq of the checkpoint signed at the end.
    pub checkpoint_seq: u64,
}

impl Fixture {
    pub async fn new() -> Fixture {
        let fake = start_fake().await;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("broker.db");
        let key = dir.path().join("signing.key");
        token_broker::audit::checkpoint::SigningKey::generate(&key).unwrap();
        let daemon = Daemon::start_with_env(
            &db,
            &fake.token_url(),
            None,
            &[
                (
                    "TOKEN_BROKER_AUDIT__SIGNING_KEY_FILE",
                    key.to_str().unwrap(),
                ),
                ("TOKEN_BROKER_AUDIT__CHECKPOINT_INTERVAL_SECS", "86400"),
            ],
        );
        let mut client = daemon.client().await;
        let mut secrets = Vec::new();
        let mut shop_jobs = Vec::new();
        for n in 0..3 {
            let mut request = new_request(&fake, "shop-app");
            if n == 0 {
                request.state = FORMULA.to_string();
            }
            let code = request.code.clone();
            secrets.extend([request.code.clone(), request.code_verifier.clone()]);
            let job = client.exchange(request).await.unwrap().into_inner();
            secrets.push(job.token.expect("succeeded").access_token);
            shop_jobs.push((job.job_id, code));
        }
        let mut refused = new_request(&fake, "other-app");
        refused.code_verifier = "v".repeat(60);
        secrets.extend([refused.code.clone(), refused.code_verifier.clone()]);
        let failed = client.exchange(refused).await.unwrap().into_inner();
        assert_eq!(failed.state(), JobState::Failed);

        // Waiting a minute for a retry, then cancelled.
        fake.set_faults(Faults {
            retry_after_secs: 60,
            ..Faults::default()
        });
        fake.script([Scripted::Status(503)]);
        let waiting = new_request(&fake, "third-app");
        secrets.extend([waiting.code.clone(), waiting.code_verifier.clone()]);
        let job = client.submit_exchange(waiting).await.unwrap().into_inner();
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let now = client
                .get_job(GetJobRequest {
                    job_id: job.job_id.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            if now.state() == JobState::RetryWait {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "never waited");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        client
            .cancel_job(GetJobRequest {
                job_id: job.job_id.clone(),
            })
            .await
            .unwrap();
        // The chain's head, signed: the console's status bar names it.
        let checkpoint = AuditLogClient::connect(format!("http://{}", daemon.addr))
            .await
            .unwrap()
            .create_checkpoint(CreateCheckpointRequest::default())
            .await
            .unwrap()
            .into_inner()
            .checkpoint
            .unwrap();
        Fixture {
            _daemon: daemon,
            checkpoint_seq: checkpoint.seq,
            _fake: fake,
            dir,
            db,
            shop_jobs,
            failed: failed.job_id,
            cancelled: job.job_id,
            secrets,
        }
    }

    /// Every job id, oldest first.
    pub fn all_jobs(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.shop_jobs.iter().map(|(id, _)| id.clone()).collect();
        ids.extend([self.failed.clone(), self.cancelled.clone()]);
        ids
    }
}

/// `token-broker console --database DB [--config CONFIG]`, served on `addr`.
fn args(db: &Path, config: Option<&Path>, addr: SocketAddr) -> ConsoleArgs {
    ConsoleArgs {
        database: DatabaseArgs {
            database: Some(db.to_path_buf()),
            database_url: None,
            config: config.map(Path::to_path_buf),
        },
        listen: addr,
        key_file: None,
    }
}

/// A console serving `db` in this process, as `token-broker console` would.
pub struct Console {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Console {
    /// Serves on `listen` (port 0), with `config` for the tenants.
    pub async fn start(db: &Path, config: Option<&Path>, listen: &str) -> Console {
        token_broker::exchange::upstream::install_crypto_provider();
        let listener = TcpListener::bind(listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (shutdown, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(token_broker::console::serve(
            args(db, config, addr),
            listener,
            async move {
                let _ = stopped.await;
            },
        ));
        Console {
            addr,
            shutdown: Some(shutdown),
            task,
        }
    }

    /// Why the console refuses to serve on `listen`.
    pub async fn refusal(db: &Path, config: Option<&Path>, listen: &str) -> String {
        let listener = TcpListener::bind(listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = token_broker::console::serve(args(db, config, addr), listener, async {});
        let error = tokio::time::timeout(PATIENCE, served)
            .await
            .expect("the console answers at once")
            .expect_err("the console refuses");
        format!("{error:#}")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn stop(mut self) {
        let _ = self.shutdown.take().map(|s| s.send(()));
        tokio::time::timeout(PATIENCE, &mut self.task)
            .await
            .expect("the console stops")
            .unwrap()
            .unwrap();
    }

    /// Waits for the first verification of the chain, as the status bar shows it.
    pub async fn wait_verified(&self, client: &reqwest::Client) -> String {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let page = client
                .get(self.url("/"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            if page.contains("intact up to seq") {
                return page;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never verified: {page}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// An HTTP client that shows redirects instead of following them.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// What a GET answered.
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

async fn get(client: &reqwest::Client, url: &str) -> Answer {
    let response = client.get(url).send().await.unwrap();
    Answer {
        status: response.status().as_u16(),
        headers: response.headers().clone(),
        body: response.text().await.unwrap(),
    }
}

/// The job ids a listing shows, in its order.
fn listed(page: &str) -> Vec<String> {
    page.split("class=\"job-link\" href=\"/jobs/")
        .skip(1)
        .map(|rest| rest.split('"').next().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn pages_searches_timelines_and_exports_show_the_jobs_and_never_a_secret() {
    let fixture = Fixture::new().await;
    let console = Console::start(&fixture.db, None, "127.0.0.1:0").await;
    let client = client();
    let mut bodies = Vec::new();

    // Home: every job, newest first, the chain's state and the checkpoint line, the chart.
    let home = console.wait_verified(&client).await;
    let mut newest_first = fixture.all_jobs();
    newest_first.reverse();
    assert_eq!(listed(&home), newest_first);
    assert!(
        home.contains(&format!(
            "last signed checkpoint: seq {}",
            fixture.checkpoint_seq
        )),
        "{home}"
    );
    assert!(home.contains("<svg") && home.contains("class=\"o-succeeded\""));
    assert!(home.contains("succeeded: 3") && home.contains("failed: 1"));
    let answer = get(&client, &console.url("/")).await;
    for (name, value) in [
        ("x-content-type-options", "nosniff"),
        ("cache-control", "no-store"),
        ("x-frame-options", "DENY"),
    ] {
        assert_eq!(answer.headers[name], value);
    }
    let csp = answer.headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("frame-ancestors 'none'") && csp.contains("default-src 'none'"));
    assert!(!answer.body.contains("<script"));
    bodies.push(answer.body);

    // Each filter.
    let shop: Vec<String> = fixture
        .shop_jobs
        .iter()
        .rev()
        .map(|(id, _)| id.clone())
        .collect();
    let searches = [
        ("/jobs?client_id=shop-app", shop.clone()),
        ("/jobs?state=failed", vec![fixture.failed.clone()]),
        ("/jobs?state=cancelled", vec![fixture.cancelled.clone()]),
        (
            "/jobs?failure_reason=forbidden",
            vec![fixture.failed.clone()],
        ),
        ("/jobs?failure_reason=expired", vec![]),
        ("/jobs?client_id=shop-app&state=failed", vec![]),
        (
            "/jobs?created_after=2000-01-01&created_before=2100-01-01",
            newest_first.clone(),
        ),
        ("/jobs?created_before=2000-01-01", vec![]),
        ("/jobs?created_after=2100-01-01T00:00:00Z", vec![]),
    ];
    for (path, expected) in searches {
        let answer = get(&client, &console.url(path)).await;
        assert_eq!(answer.status, 200, "{path}: {}", answer.body);
        assert_eq!(listed(&answer.body), expected, "{path}");
        assert!(answer.body.contains("Search results"), "{path}");
        bodies.push(answer.body);
    }

    // Keyset pages: the "Older" link continues where the page ended.
    let page = get(
        &client,
        &console.url("/jobs?client_id=shop-app&after=99999999"),
    )
    .await;
    assert_eq!(listed(&page.body), shop);

    // A code: the form posts it, the redirect carries only its fingerprint, the result finds
    // the job, and the code appears nowhere.
    let (job_id, code) = &fixture.shop_jobs[1];
    let redirect = client
        .post(console.url("/search"))
        .form(&[("code", code.as_str()), ("client_id", ""), ("state", "")])
        .send()
        .await
        .unwrap();
    assert_eq!(redirect.status().as_u16(), 303);
    let location = redirect.headers()["location"].to_str().unwrap().to_string();
    assert!(location.starts_with("/jobs?fingerprint="), "{location}");
    assert!(!location.contains(code.as_str()));
    let found = get(&client, &console.url(&location)).await;
    assert_eq!(listed(&found.body), vec![job_id.clone()]);
    bodies.push(found.body);
    // The fingerprint is the one `audit fingerprint` prints.
    let output = Command::new(env!("CARGO_BIN_EXE_token-broker"))
        .args(["audit", "fingerprint", "--database"])
        .arg(&fixture.db)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(code.as_bytes())?;
            child.wait_with_output()
        })
        .unwrap();
    let printed = String::from_utf8(output.stdout).unwrap();
    assert!(
        location.ends_with(printed.trim()),
        "{location} vs {printed}"
    );
    // A code in a URL is refused without being repeated.
    let refused = get(&client, &console.url(&format!("/jobs?code={code}"))).await;
    assert_eq!(refused.status, 400);
    assert!(refused.body.contains("code:"), "{}", refused.body);
    assert!(!refused.body.contains(code.as_str()));
    // Through the real binary, logging JSON at debug level: the code reaches no log line.
    let logged = search_code_logged(&fixture.db, code).await;
    assert!(logged.contains("console serving"), "{logged}");
    for secret in &fixture.secrets {
        assert!(
            !logged.contains(secret.as_str()),
            "a secret was logged: {logged}"
        );
    }
    // Other filters ride along with a code.
    let redirect = client
        .post(console.url("/search"))
        .form(&[("code", code.as_str()), ("state", "failed")])
        .send()
        .await
        .unwrap();
    let location = redirect.headers()["location"].to_str().unwrap().to_string();
    assert!(location.contains("state=failed"), "{location}");
    assert!(listed(&get(&client, &console.url(&location)).await.body).is_empty());

    // A job's page: its fields and its timeline.
    let page = get(&client, &console.url(&format!("/jobs/{}", fixture.failed))).await;
    assert_eq!(page.status, 200);
    let kinds: Vec<&str> = page
        .body
        .split("<td class=\"kind\">")
        .skip(1)
        .map(|rest| rest.split('<').next().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "job.submitted",
            "attempt.started",
            "attempt.finished",
            "job.failed"
        ]
    );
    assert!(page.body.contains("forbidden") && page.body.contains("other-app"));
    bodies.push(page.body);
    let page = get(
        &client,
        &console.url(&format!("/jobs/{}", fixture.cancelled)),
    )
    .await;
    assert!(page.body.contains("job.cancelled") && page.body.contains("job.retry_scheduled"));
    bodies.push(page.body);
    let page = get(
        &client,
        &console.url(&format!("/jobs/{}", fixture.shop_jobs[0].0)),
    )
    .await;
    assert!(page.body.contains("job.succeeded"));
    bodies.push(page.body);

    // Exports: every matching row, as attachments.
    let csv = get(&client, &console.url("/export.csv?client_id=shop-app")).await;
    assert_eq!(csv.status, 200);
    assert_eq!(csv.headers["content-type"], "text/csv; charset=utf-8");
    let disposition = csv.headers["content-disposition"].to_str().unwrap();
    assert!(disposition.starts_with("attachment; filename=") && disposition.ends_with(".csv\""));
    let mut reader = csv::Reader::from_reader(csv.body.as_bytes());
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(reader.headers().unwrap().get(0), Some("job_id"));
    let exported: Vec<&str> = rows.iter().map(|row| row.get(0).unwrap()).collect();
    let oldest_first: Vec<&str> = fixture
        .shop_jobs
        .iter()
        .map(|(id, _)| id.as_str())
        .collect();
    assert_eq!(exported, oldest_first, "creation order");
    // A caller's value that a spreadsheet would run is written as text.
    let state_column = reader
        .headers()
        .unwrap()
        .iter()
        .position(|name| name == "state_param")
        .unwrap();
    assert_eq!(
        rows[0].get(state_column),
        Some(format!("'{FORMULA}").as_str())
    );
    assert!(rows[1].get(state_column).unwrap().starts_with("state-"));
    bodies.push(csv.body);
    let jsonl = get(&client, &console.url("/export.jsonl")).await;
    assert_eq!(
        jsonl.headers["content-type"],
        "application/jsonl; charset=utf-8"
    );
    assert!(
        jsonl.headers["content-disposition"]
            .to_str()
            .unwrap()
            .starts_with("attachment")
    );
    let lines: Vec<serde_json::Value> = jsonl
        .body
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 5);
    // JSON Lines keeps values as they are: no spreadsheet runs them.
    assert_eq!(lines[0]["state_param"], FORMULA);
    assert_eq!(lines[3]["job_id"], fixture.failed.as_str());
    assert_eq!(lines[3]["failure_reason"], "forbidden");
    bodies.push(jsonl.body);
    let empty = get(&client, &console.url("/export.jsonl?state=running")).await;
    assert_eq!((empty.status, empty.body.as_str()), (200, ""));

    // Bad input names its field; unknown things are 404.
    for (path, field) in [
        ("/jobs?state=done", "state:"),
        ("/jobs?failure_reason=bored", "failure_reason:"),
        ("/jobs?created_after=yesterday", "created_after:"),
        ("/jobs?created_before=tomorrow", "created_before:"),
        ("/jobs?fingerprint=abc", "fingerprint:"),
        ("/export.csv?state=done", "state:"),
        ("/jobs/not-a-job", "job id:"),
    ] {
        let answer = get(&client, &console.url(path)).await;
        assert_eq!(answer.status, 400, "{path}");
        assert!(answer.body.contains(field), "{path}: {}", answer.body);
        assert!(answer.headers.contains_key("content-security-policy"));
    }
    let unknown = get(
        &client,
        &console.url("/jobs/0190f0b1-7a2c-7cc3-8000-000000000000"),
    )
    .await;
    assert_eq!(unknown.status, 404);
    assert_eq!(get(&client, &console.url("/nothing")).await.status, 404);
    let wrong_method = client.post(console.url("/jobs")).send().await.unwrap();
    assert_eq!(wrong_method.status().as_u16(), 405);

    // No secret anywhere.
    for body in &bodies {
        for secret in &fixture.secrets {
            assert!(
                !body.contains(secret.as_str()),
                "a secret leaked into {body}"
            );
        }
    }
    console.stop().await;
}

/// A configuration file with an audit tenant and a submit-only tenant; returns their keys.
fn tenants_config(dir: &Path) -> (PathBuf, String, String) {
    let (audit_key, audit_digest) = token_broker::security::tenants::new_key();
    let (submit_key, submit_digest) = token_broker::security::tenants::new_key();
    let path = dir.join("console.toml");
    std::fs::write(
        &path,
        format!(
            "[[tenants]]\nname = \"auditors\"\napi_key_sha256 = \"{audit_digest}\"\nroles = [\"audit\"]\n\n\
             [[tenants]]\nname = \"shop\"\napi_key_sha256 = \"{submit_digest}\"\nclient_ids = [\"shop-app\"]\nroles = [\"submit\"]\n"
        ),
    )
    .unwrap();
    (path, audit_key, submit_key)
}

#[tokio::test]
async fn off_loopback_only_an_audit_key_opens_the_console() {
    let fixture = Fixture::new().await;

    // Without an audit tenant, a non-loopback address is refused, before anything is served.
    let refused = Console::refusal(&fixture.db, None, "0.0.0.0:0").await;
    assert!(refused.contains("not a loopback address"), "{refused}");
    let output = Command::new(env!("CARGO_BIN_EXE_token-broker"))
        .args(["console", "--listen", "0.0.0.0:0", "--database"])
        .arg(&fixture.db)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("audit role"),
        "{output:?}"
    );

    // With one, auditors sign in with their key; others are refused.
    let (config, audit_key, submit_key) = tenants_config(fixture.dir.path());
    let console = Console::start(&fixture.db, Some(&config), "0.0.0.0:0").await;
    let url = format!("http://127.0.0.1:{}/", console.addr.port());
    let client = client();
    let anonymous = client.get(&url).send().await.unwrap();
    assert_eq!(anonymous.status().as_u16(), 401);
    assert!(
        anonymous.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Basic realm=")
    );
    let page = anonymous.text().await.unwrap();
    assert!(listed(&page).is_empty() && !page.contains("intact"));
    let wrong = client
        .get(&url)
        .basic_auth("auditor", Some("tbk_wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 401);
    let submitter = client
        .get(&url)
        .basic_auth("shop", Some(&submit_key))
        .send()
        .await
        .unwrap();
    assert_eq!(submitter.status().as_u16(), 403);
    let export = client
        .get(format!("{url}export.csv"))
        .basic_auth("shop", Some(&submit_key))
        .send()
        .await
        .unwrap();
    assert_eq!(export.status().as_u16(), 403);
    let auditor = client
        .get(&url)
        .basic_auth("auditor", Some(&audit_key))
        .send()
        .await
        .unwrap();
    assert_eq!(auditor.status().as_u16(), 200);
    assert_eq!(listed(&auditor.text().await.unwrap()).len(), 5);
    console.stop().await;
}

/// Runs `token-broker --log-format json console` on `db` (RUST_LOG=debug), searches for `code`
/// through its form and follows the redirect, stops it, and returns everything it logged.
async fn search_code_logged(db: &Path, code: &str) -> String {
    use std::{
        io::{BufRead, BufReader},
        sync::{Arc, Mutex},
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_token-broker"))
        .args(["--log-format", "json", "console", "--listen", "127.0.0.1:0"])
        .arg("--database")
        .arg(db)
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let reader = {
        let log = Arc::clone(&log);
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut log = log.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        })
    };
    // The address it listens on, from its "console serving" line.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let addr = loop {
        let serving = log
            .lock()
            .unwrap()
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .find(|line| line["message"] == "console serving")
            .and_then(|line| line["listen"].as_str().map(str::to_string));
        if let Some(addr) = serving {
            break addr;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the console never served: {}",
            log.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let client = client();
    let redirect = client
        .post(format!("http://{addr}/search"))
        .form(&[("code", code)])
        .send()
        .await
        .unwrap();
    assert_eq!(redirect.status().as_u16(), 303);
    let location = redirect.headers()["location"].to_str().unwrap().to_string();
    let found = get(&client, &format!("http://{addr}{location}")).await;
    assert_eq!(listed(&found.body).len(), 1);
    // An unknown code too: a search that finds nothing must not log what it looked for.
    let unknown = format!("{code}-unknown");
    let redirect = client
        .post(format!("http://{addr}/search"))
        .form(&[("code", unknown.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(redirect.status().as_u16(), 303);
    // SIGTERM, so it drains and logs as it stops.
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = std::time::Instant::now() + PATIENCE;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.wait().unwrap();
    reader.join().unwrap();
    let log = log.lock().unwrap().clone();
    assert!(!log.contains(unknown.as_str()), "a code was logged: {log}");
    log
}

#[tokio::test]
async fn a_page_under_another_name_or_a_form_from_another_site_is_refused() {
    let fixture = Fixture::new().await;
    let console = Console::start(&fixture.db, None, "127.0.0.1:0").await;
    let port = console.addr.port();
    let client = client();
    console.wait_verified(&client).await;

    // DNS rebinding: the page's own name, pointed at 127.0.0.1, reaches the socket but is
    // not one of the console's names.
    for path in ["/", "/export.csv", &format!("/jobs/{}", fixture.failed)] {
        let rebound = client
            .get(console.url(path))
            .header("host", format!("evil.example:{port}"))
            .send()
            .await
            .unwrap();
        assert_eq!(rebound.status().as_u16(), 421, "{path}");
        let page = rebound.text().await.unwrap();
        assert!(page.contains("DNS-rebinding"), "{page}");
        assert!(
            listed(&page).is_empty() && !page.contains("intact"),
            "{page}"
        );
        assert!(!page.contains(fixture.failed.as_str()));
    }
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
    ] {
        let answer = client
            .get(console.url("/"))
            .header("host", &host)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status().as_u16(), 200, "{host}");
        assert_eq!(listed(&answer.text().await.unwrap()).len(), 5);
    }
    let other_port = client
        .get(console.url("/"))
        .header("host", format!("localhost:{}", port.wrapping_add(1)))
        .send()
        .await
        .unwrap();
    assert_eq!(other_port.status().as_u16(), 421);

    // A search posted from another site: refused, whatever its Host.
    let search = |headers: &[(&str, String)]| {
        let mut request = client
            .post(console.url("/search"))
            .form(&[("state", "failed")]);
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        request.send()
    };
    for headers in [
        vec![("origin", "http://evil.example".to_string())],
        vec![("origin", format!("http://evil.example:{port}"))],
        vec![("origin", "null".to_string())],
        vec![("sec-fetch-site", "cross-site".to_string())],
    ] {
        let refused = search(&headers).await.unwrap();
        assert_eq!(refused.status().as_u16(), 403, "{headers:?}");
        let page = refused.text().await.unwrap();
        assert!(page.contains("another site"), "{page}");
    }
    // From the console's own page it goes through.
    for headers in [
        vec![("origin", format!("http://127.0.0.1:{port}"))],
        vec![
            ("origin", format!("http://127.0.0.1:{port}")),
            ("sec-fetch-site", "same-origin".to_string()),
        ],
        vec![],
    ] {
        let accepted = search(&headers).await.unwrap();
        assert_eq!(accepted.status().as_u16(), 303, "{headers:?}");
        assert_eq!(accepted.headers()["location"], "/jobs?state=failed");
    }
    console.stop().await;

    // With sign-in, the Host may be any name (a proxy's), but a cross-site POST is refused
    // even with an auditor's key.
    let (config, audit_key, _) = tenants_config(fixture.dir.path());
    let console = Console::start(&fixture.db, Some(&config), "127.0.0.1:0").await;
    let named = client
        .get(console.url("/"))
        .header("host", "console.example")
        .basic_auth("auditor", Some(&audit_key))
        .send()
        .await
        .unwrap();
    assert_eq!(named.status().as_u16(), 200);
    let cross = client
        .post(console.url("/search"))
        .header("origin", "http://evil.example")
        .basic_auth("auditor", Some(&audit_key))
        .form(&[("state", "failed")])
        .send()
        .await
        .unwrap();
    assert_eq!(cross.status().as_u16(), 403);
    let own = client
        .post(console.url("/search"))
        .header("host", "console.example")
        .header("origin", "https://console.example")
        .basic_auth("auditor", Some(&audit_key))
        .form(&[("state", "failed")])
        .send()
        .await
        .unwrap();
    assert_eq!(own.status().as_u16(), 303);
    console.stop().await;
}

/// The status bar's chain state, once it contains `wanted` (within `patience`).
async fn wait_status(console: &Console, wanted: &str, patience: Duration) -> String {
    let client = client();
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let page = get(&client, &console.url("/")).await.body;
        let state = page
            .split("id=\"chain-state\">")
            .nth(1)
            .and_then(|rest| rest.split("</strong>").next())
            .unwrap_or_default()
            .to_string();
        if state.contains(wanted) {
            return state;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the status bar never said {wanted:?}: {state}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The database as someone with write access to the file sees it.
async fn open_db(db: &Path) -> sqlx::SqliteConnection {
    use sqlx::Connection;
    sqlx::SqliteConnection::connect_with(
        &sqlx::sqlite::SqliteConnectOptions::new()
            .filename(db)
            .busy_timeout(PATIENCE),
    )
    .await
    .unwrap()
}

/// The last audit event, as stored.
async fn last_event(conn: &mut sqlx::SqliteConnection) -> token_broker::audit::AuditRecord {
    let row = sqlx::query("SELECT * FROM audit_events ORDER BY seq DESC LIMIT 1")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    crate::helpers::stored_event(&row)
}

#[tokio::test]
async fn an_event_edited_or_cut_after_it_was_verified_shows_the_chain_broken() {
    use sqlx::Connection;
    let fixture = Fixture::new().await;
    let patience = PATIENCE + token_broker::console::chain::RECHECK;

    // Edited, with its hash recomputed: the chain verifies from scratch, but the console saw
    // the event change.
    let console = Console::start(&fixture.db, None, "127.0.0.1:0").await;
    console.wait_verified(&client()).await;
    let mut conn = open_db(&fixture.db).await;
    let mut edited = last_event(&mut conn).await;
    edited.detail = Some("nothing happened".into());
    edited.hash = edited.expected_hash();
    sqlx::query("UPDATE audit_events SET detail = ?1, hash = ?2 WHERE seq = ?3")
        .bind(&edited.detail)
        .bind(&edited.hash)
        .bind(edited.seq)
        .execute(&mut conn)
        .await
        .unwrap();
    let state = wait_status(&console, "broken", patience).await;
    assert!(
        state.contains(&format!("broken at seq {}", edited.seq)) && state.contains("rewritten"),
        "{state}"
    );
    // It stays broken once the whole chain was verified again.
    let state = wait_status(&console, "verified again from the start", patience).await;
    assert!(
        state.contains(&format!("broken at seq {}", edited.seq)),
        "{state}"
    );
    console.stop().await;

    // Cut, with the sequence counter wound back so the table looks whole: the console saw
    // the event go.
    let console = Console::start(&fixture.db, None, "127.0.0.1:0").await;
    console.wait_verified(&client()).await;
    let last = last_event(&mut conn).await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DELETE FROM audit_events WHERE seq = {seq}; \
         UPDATE sqlite_sequence SET seq = {seq} - 1 WHERE name = 'audit_events'",
        seq = last.seq
    )))
    .execute(&mut conn)
    .await
    .unwrap();
    let state = wait_status(&console, "broken", patience).await;
    assert!(
        state.contains(&format!("broken at seq {}", last.seq)) && state.contains("cut"),
        "{state}"
    );
    conn.close().await.unwrap();
    console.stop().await;
}
