//! The console in a real browser: headless Chromium driven through chromedriver with the W3C
//! WebDriver protocol (plain JSON over HTTP, sent with reqwest: no WebDriver crate, no
//! OpenSSL). It loads the home page, fills and submits the search form, follows a job's link
//! to its timeline and downloads an export, with no JavaScript on any page.
//!
//! Without `chromium` and `chromedriver` on the PATH the test is skipped, loudly; under CI
//! (`CI=true`) that is a failure (`.ci/run` installs both). With `CONSOLE_SCREENSHOT=PATH` it
//! also saves a screenshot of the home page there (that is how `docs/console.png` is made; not
//! a `TOKEN_BROKER_` variable, because those are configuration, and the daemon the test starts
//! would refuse an unknown key).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use base64::Engine;
use serde_json::{Value, json};

use crate::{
    console::{Console, Fixture},
    helpers::PATIENCE,
};

/// The key W3C WebDriver names element references by.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A program on the PATH.
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
}

/// chromium and chromedriver, or `None` after a loud skip (a panic under CI).
fn browser_programs() -> Option<(PathBuf, PathBuf)> {
    match (on_path("chromium"), on_path("chromedriver")) {
        (Some(chromium), Some(driver)) => Some((chromium, driver)),
        _ => {
            let ci = std::env::var("CI").is_ok_and(|value| matches!(value.as_str(), "true" | "1"));
            let how = "install them: apt-get install chromium chromium-driver (.ci/run does)";
            if ci {
                panic!(
                    "\nconsole_browser: chromium or chromedriver missing, and CI=true forbids skipping; {how}\n"
                );
            }
            eprintln!(
                "\n==== SKIP console_browser: chromium or chromedriver is not on the PATH; {how} ====\n"
            );
            None
        }
    }
}

/// Whether this process runs as root (Chromium's sandbox refuses root).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().next())
            == Some("0")
    })
}

/// chromedriver on a free loopback port, and one browser session in it.
struct Browser {
    driver: Child,
    http: reqwest::Client,
    /// `http://127.0.0.1:PORT/session/ID`.
    session: String,
}

impl Browser {
    async fn start(
        chromium: &Path,
        chromedriver: &Path,
        profile: &Path,
        downloads: &Path,
    ) -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Ok(answer) = http.get(format!("{base}/status")).send().await
                && let Ok(status) = answer.json::<Value>().await
                && status["value"]["ready"] == true
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "chromedriver never ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut args = vec![
            "--headless=new".to_string(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--window-size=1280,1100".into(),
            format!("--user-data-dir={}", profile.display()),
        ];
        if is_root() {
            args.push("--no-sandbox".into());
        }
        let capabilities = json!({
            "capabilities": {
                "alwaysMatch": {
                    "goog:chromeOptions": {
                        "binary": chromium,
                        "args": args,
                        "prefs": {
                            "download.default_directory": downloads,
                            "download.prompt_for_download": false,
                        },
                    },
                },
            },
        });
        let created: Value = http
            .post(format!("{base}/session"))
            .json(&capabilities)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {created}"))
            .to_string();
        Browser {
            driver,
            http,
            session: format!("{base}/session/{id}"),
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut request = self.http.request(method, format!("{}{path}", self.session));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let answer: Value = request.send().await.unwrap().json().await.unwrap();
        if answer["value"]["error"].is_string() {
            panic!("WebDriver {path}: {answer}");
        }
        answer["value"].clone()
    }

    async fn go(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await;
    }

    async fn url(&self) -> String {
        self.call(reqwest::Method::GET, "/url", None)
            .await
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Waits until the browser's address contains `part` (a click's navigation may still be
    /// under way when the click returns), and returns it.
    async fn arrive(&self, part: &str) -> String {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let url = self.url().await;
            if url.contains(part) {
                return url;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never reached {part}: at {url}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn find(&self, css: &str) -> String {
        let found = self
            .call(
                reqwest::Method::POST,
                "/element",
                Some(json!({ "using": "css selector", "value": css })),
            )
            .await;
        found[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("{css}: {found}"))
            .to_string()
    }

    async fn text(&self, css: &str) -> String {
        let element = self.find(css).await;
        self.call(
            reqwest::Method::GET,
            &format!("/element/{element}/text"),
            None,
        )
        .await
        .as_str()
        .unwrap()
        .to_string()
    }

    async fn type_into(&self, css: &str, text: &str) {
        let element = self.find(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{element}/value"),
            Some(json!({ "text": text })),
        )
        .await;
    }

    async fn click(&self, css: &str) {
        let element = self.find(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{element}/click"),
            Some(json!({})),
        )
        .await;
    }

    async fn source(&self) -> String {
        self.call(reqwest::Method::GET, "/source", None)
            .await
            .as_str()
            .unwrap()
            .to_string()
    }

    /// A PNG of the window.
    async fn screenshot(&self) -> Vec<u8> {
        let encoded = self.call(reqwest::Method::GET, "/screenshot", None).await;
        base64::engine::general_purpose::STANDARD
            .decode(encoded.as_str().unwrap())
            .unwrap()
    }

    async fn quit(mut self) {
        let _ = self.http.delete(&self.session).send().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
    }
}

/// Polls `check` until it holds.
async fn eventually<F: std::future::Future<Output = bool>>(
    what: &str,
    mut check: impl FnMut() -> F,
) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn an_auditor_searches_opens_a_timeline_and_downloads_an_export_in_a_browser() {
    let Some((chromium, chromedriver)) = browser_programs() else {
        return;
    };
    let fixture = Fixture::new().await;
    let console = Console::start(&fixture.db, None, "127.0.0.1:0").await;
    console.wait_verified(&reqwest::Client::new()).await;
    let scratch = tempfile::tempdir().unwrap();
    let downloads = scratch.path().join("downloads");
    std::fs::create_dir(&downloads).unwrap();
    let browser = Browser::start(
        &chromium,
        &chromedriver,
        &scratch.path().join("profile"),
        &downloads,
    )
    .await;

    // The home page: every job, the chain's state, the chart.
    browser.go(&console.url("/")).await;
    let jobs = browser.text("#jobs").await;
    for id in fixture.all_jobs() {
        assert!(jobs.contains(&id), "{id} not in {jobs}");
    }
    assert!(
        browser
            .text("#chain-state")
            .await
            .starts_with("intact up to seq")
    );
    assert!(
        browser.text("#checkpoint").await.starts_with(&format!(
            "last signed checkpoint: seq {}, signed 20",
            fixture.checkpoint_seq
        )),
        "the status bar names the signed checkpoint"
    );
    assert!(browser.source().await.contains("<svg"));
    let screenshot = browser.screenshot().await;
    assert!(screenshot.starts_with(b"\x89PNG"));
    if let Some(path) = std::env::var_os("CONSOLE_SCREENSHOT") {
        std::fs::write(&path, &screenshot).unwrap();
        eprintln!(
            "console screenshot saved to {}",
            PathBuf::from(path).display()
        );
    }

    // A search by pasted code: the form is submitted, the browser lands on the results, whose
    // address carries the fingerprint and never the code.
    let (job_id, code) = &fixture.shop_jobs[2];
    browser.type_into("input[name=code]", code).await;
    browser.click("#search-button").await;
    let results = browser.arrive("/jobs?fingerprint=").await;
    assert!(results.contains("/jobs?fingerprint="), "{results}");
    assert!(!results.contains(code.as_str()));
    let listed = browser.text("#jobs").await;
    assert!(listed.contains(job_id.as_str()), "{listed}");
    assert_eq!(listed.matches("shop-app").count(), 1, "{listed}");
    assert!(!browser.source().await.contains(code.as_str()));

    // A search by state, through the menu.
    browser.go(&console.url("/")).await;
    let failed = browser
        .find("select[name=state] option[value=failed]")
        .await;
    browser
        .call(
            reqwest::Method::POST,
            &format!("/element/{failed}/click"),
            Some(json!({})),
        )
        .await;
    browser.click("#search-button").await;
    assert!(
        browser
            .arrive("/jobs?")
            .await
            .ends_with("/jobs?state=failed")
    );
    let listed = browser.text("#jobs").await;
    assert!(listed.contains(&fixture.failed) && !listed.contains(&fixture.cancelled));

    // Its job's timeline, by following the link.
    browser.click("a.job-link").await;
    browser.arrive(&format!("/jobs/{}", fixture.failed)).await;
    let timeline = browser.text("#timeline").await;
    for kind in [
        "job.submitted",
        "attempt.started",
        "attempt.finished",
        "job.failed",
    ] {
        assert!(timeline.contains(kind), "{kind} not in {timeline}");
    }

    // The search's export, downloaded.
    browser.go(&console.url("/jobs?state=failed")).await;
    browser.click("#export-csv").await;
    let mut exported = String::new();
    eventually("the CSV export is downloaded", || {
        let found = std::fs::read_dir(&downloads)
            .unwrap()
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .find(|path| path.extension().is_some_and(|ext| ext == "csv"));
        if let Some(path) = found {
            exported = std::fs::read_to_string(path).unwrap_or_default();
        }
        let done = exported.lines().count() == 2;
        async move { done }
    })
    .await;
    assert!(exported.starts_with("job_id,"), "{exported}");
    assert!(exported.contains(&fixture.failed) && exported.contains("forbidden"));

    browser.quit().await;
    console.stop().await;
}
