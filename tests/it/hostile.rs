//! A hostile upstream, over real HTTP, through the real gRPC server: absurd `Retry-After`
//! values, redirects, huge, dripping and broken-off bodies, and malformed tokens. Each case ends
//! with the outcome the daemon reports through the API, and then a bystander (another client id
//! on the same daemon) whose `Exchange` still succeeds.

use std::time::{Duration, SystemTime};

use token_broker::{
    api::proto::{FailureReason, Job, JobState, token_broker_client::TokenBrokerClient},
    tools::fake_upstream::{FakeUpstream, RawAnswer, Scripted, new_verifier, s256_challenge},
};
use tonic::transport::Channel;

use crate::helpers::{
    Daemon, PATIENCE, TestApp, exchange_within, new_request, peak_resident_bytes, start_fake,
};

/// What the daemon's setting `upstream.max_retry_after_secs` is set to here: every
/// `Retry-After`, and so every pause of a rate-limited client, is cut to this.
const MAX_RETRY_AFTER_SECS: u64 = 2;

/// How soon a bystander must be served while another client is paused.
const BYSTANDER_DEADLINE: Duration = Duration::from_secs(1);

/// The size of the huge bodies: far beyond `upstream.max_response_bytes`.
const HUGE: u64 = 64 * 1024 * 1024;

/// An `Exchange` for a client id no hostile answer was aimed at succeeds within `within`.
async fn bystander_succeeds(
    client: &mut TokenBrokerClient<Channel>,
    fake: &FakeUpstream,
    within: Duration,
) {
    let job = exchange_within(client, new_request(fake, "bystander"), within).await;
    assert_eq!(
        job.state(),
        JobState::Succeeded,
        "the bystander is served within {within:?}: {}",
        brief(&job)
    );
    assert!(job.token.is_some(), "{}", brief(&job));
}

/// Exchanges for `client_id` with the patience bound as deadline; the job comes back terminal.
async fn exchange(app: &mut TestApp, client_id: &str) -> Job {
    let request = app.new_request(client_id);
    let job = exchange_within(&mut app.client, request, PATIENCE).await;
    assert!(
        matches!(
            job.state(),
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        ),
        "the job is terminal before the deadline: {}",
        brief(&job)
    );
    job
}

/// Asserts that `job` failed for `reason`, after `attempts` attempts, and carries no token.
fn assert_failed(job: &Job, reason: FailureReason, attempts: u32, case: &str) {
    assert_eq!(
        (job.state(), job.failure_reason(), job.attempts),
        (JobState::Failed, reason, attempts),
        "{case}: {}",
        brief(job)
    );
    assert!(job.token.is_none(), "{case}: a failed job has no token");
}

/// The job for a failure message, its access token reduced to its length (one case's is 100 KB).
fn brief(job: &Job) -> String {
    let mut job = job.clone();
    if let Some(token) = &mut job.token {
        token.access_token = format!("<{} bytes>", token.access_token.len());
    }
    format!("{job:?}")
}

fn millis(timestamp: Option<&prost_types::Timestamp>) -> i64 {
    let timestamp = timestamp.expect("a timestamp");
    timestamp.seconds * 1_000 + i64::from(timestamp.nanos) / 1_000_000
}

fn clamped_app() -> impl FnOnce(&mut token_broker::config::Config) {
    |config| config.upstream.max_retry_after_secs = MAX_RETRY_AFTER_SECS
}

/// A 429 whose `Retry-After` is far beyond the clamp: the client is paused for the clamp, not
/// for the value; a bystander is served meanwhile; the rate-limited job is retried once the
/// pause is over and succeeds (the 429 did not redeem its code); its client is served again.
async fn a_far_retry_after_is_clamped(retry_after: &str) {
    let mut app = TestApp::spawn_with(clamped_app()).await;
    app.fake.script([
        RawAnswer::json(429, r#"{"error":"slow down"}"#).header("retry-after", retry_after)
    ]);
    let victim = app.submit(app.new_request("victim")).await;

    let waiting = app
        .wait_for_state(&victim.job_id, JobState::RetryWait)
        .await;
    assert_eq!(waiting.last_http_status, 429, "{}", brief(&waiting));
    let pause = millis(waiting.next_attempt_at.as_ref()) - millis(waiting.updated_at.as_ref());
    let clamp = i64::try_from(MAX_RETRY_AFTER_SECS * 1_000).unwrap();
    assert!(
        (clamp - 500..=clamp + 1_000).contains(&pause),
        "Retry-After {retry_after:?} is cut to {clamp} ms, not ignored: the retry is {pause} ms \
         away ({})",
        brief(&waiting)
    );

    // The paused client does not hold anyone else up.
    bystander_succeeds(&mut app.client, &app.fake, BYSTANDER_DEADLINE).await;

    let done = app.wait_terminal(&victim.job_id).await;
    assert_eq!(
        (done.state(), done.attempts, done.last_http_status),
        (JobState::Succeeded, 2, 200),
        "retried once the clamped pause was over: {}",
        brief(&done)
    );
    let again = exchange(&mut app, "victim").await;
    assert_eq!(again.state(), JobState::Succeeded, "{}", brief(&again));
    bystander_succeeds(&mut app.client, &app.fake, BYSTANDER_DEADLINE).await;
}

#[tokio::test]
async fn a_retry_after_of_twenty_digits_pauses_only_its_client_and_only_for_the_clamp() {
    a_far_retry_after_is_clamped("10000000000000000000").await;
}

#[tokio::test]
async fn a_retry_after_date_in_the_year_9999_is_clamped() {
    a_far_retry_after_is_clamped("Fri, 31 Dec 9999 23:59:59 GMT").await;
}

#[tokio::test]
async fn a_retry_after_with_more_digits_than_any_integer_is_clamped() {
    a_far_retry_after_is_clamped("99999999999999999999999999").await;
}

/// A past date means "now"; values that are neither delay-seconds nor an HTTP date are
/// ignored. Either way the job is retried after the backoff (and
/// the client's default pause) and succeeds.
#[tokio::test]
async fn past_and_garbage_retry_after_values_are_ignored() {
    let mut app = TestApp::spawn_with(clamped_app()).await;
    let past = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(3_600));
    let cases = [
        ("a past date", past.as_str()),
        ("a word", "soon"),
        ("a negative number", "-5"),
    ];
    for (index, (case, retry_after)) in cases.into_iter().enumerate() {
        app.fake.script([
            RawAnswer::json(429, r#"{"error":"slow down"}"#).header("retry-after", retry_after)
        ]);
        let job = exchange(&mut app, &format!("victim-{index}")).await;
        assert_eq!(
            (job.state(), job.attempts, job.last_http_status),
            (JobState::Succeeded, 2, 200),
            "{case} ({retry_after:?}): {}",
            brief(&job)
        );
        bystander_succeeds(&mut app.client, &app.fake, BYSTANDER_DEADLINE).await;
    }
}

/// A redirect is never followed (it would send the code somewhere the configuration did not
/// name): the job fails as a protocol error, and the redirect's target sees nothing.
#[tokio::test]
async fn redirects_are_never_followed() {
    let mut app = TestApp::spawn().await;
    let elsewhere = start_fake().await;
    for status in [301, 302, 303, 307, 308] {
        app.fake
            .script([RawAnswer::new(status).header("location", elsewhere.token_url())]);
        let job = exchange(&mut app, "victim").await;
        assert_failed(
            &job,
            FailureReason::UpstreamProtocol,
            1,
            &format!("a {status} redirect"),
        );
        assert_eq!(job.last_http_status, u32::from(status));
        bystander_succeeds(&mut app.client, &app.fake, PATIENCE).await;
    }
    assert_eq!(
        elsewhere.stats().token_requests,
        0,
        "no request reached the redirect's target"
    );
}

/// A 200 whose body is 64 MiB of whitespace before a valid token, with an exact length and
/// chunked: the daemon reads at most `upstream.max_response_bytes`, so it never sees the token,
/// and the job fails as a protocol error.
#[tokio::test]
async fn a_huge_body_is_not_read_past_the_limit() {
    let mut app = TestApp::spawn().await;
    for chunked in [false, true] {
        app.fake.script([Scripted::Huge {
            padding: HUGE,
            chunked,
        }]);
        let job = exchange(&mut app, "victim").await;
        let case = if chunked { "chunked" } else { "with a length" };
        assert_failed(&job, FailureReason::UpstreamProtocol, 1, case);
        assert_eq!(job.last_http_status, 200, "{case}");
        bystander_succeeds(&mut app.client, &app.fake, PATIENCE).await;
    }
}

/// The same huge answers to the real binary: its peak resident memory grows by far less than
/// one body.
#[tokio::test]
async fn huge_bodies_leave_the_daemons_memory_bounded() {
    let fake = start_fake().await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&dir.path().join("broker.db"), &fake.token_url());
    let mut client = daemon.client().await;
    // A first exchange warms up the connection pool, the database and the worker, so the
    // baseline is a serving daemon's.
    bystander_succeeds(&mut client, &fake, PATIENCE).await;
    let baseline = peak_resident_bytes(daemon.child.id());

    for chunked in [false, true, false, true] {
        fake.script([Scripted::Huge {
            padding: HUGE,
            chunked,
        }]);
        let job = exchange_within(&mut client, new_request(&fake, "victim"), PATIENCE).await;
        assert_failed(
            &job,
            FailureReason::UpstreamProtocol,
            1,
            &format!("a huge body, chunked: {chunked}"),
        );
    }
    bystander_succeeds(&mut client, &fake, PATIENCE).await;

    let peak = peak_resident_bytes(daemon.child.id());
    let growth = peak.saturating_sub(baseline);
    eprintln!("peak resident memory: {baseline} bytes before, {peak} after");
    assert!(
        growth < 16 * 1024 * 1024,
        "the daemon's peak memory grew by {growth} bytes over four answers of {HUGE} bytes"
    );
}

/// A 200 whose body drips one byte a second (its token would take about 90 s) is cut off by
/// `upstream.timeout_ms`. The code was redeemed, so the answer is lost, not refused: the job
/// retries, upstream answers 403 to the spent code, and the job fails OUTCOME_UNKNOWN, not
/// FORBIDDEN.
#[tokio::test]
async fn a_dripping_body_is_cut_off_by_the_upstream_timeout() {
    let mut app = TestApp::spawn_with(|config| config.upstream.timeout_ms = 1_500).await;
    app.fake.script([Scripted::Drip { interval_ms: 1_000 }]);
    let job = exchange(&mut app, "victim").await;
    assert_failed(&job, FailureReason::OutcomeUnknown, 2, "a dripping body");
    assert!(job.outcome_unknown, "{}", brief(&job));
    assert_eq!(job.last_http_status, 403, "{}", brief(&job));
    assert_eq!(
        app.fake.stats().redeemed,
        1,
        "only the dripping attempt redeemed"
    );
    bystander_succeeds(&mut app.client, &app.fake, PATIENCE).await;
}

/// Status line and headers arrive, announcing a longer body than is sent, and the connection
/// closes after the code was redeemed: the answer is lost, the retry meets 403, and the job
/// fails OUTCOME_UNKNOWN.
#[tokio::test]
async fn an_answer_broken_off_after_the_code_was_redeemed_is_an_unknown_outcome() {
    let mut app = TestApp::spawn().await;
    app.fake.script([Scripted::Truncated]);
    let job = exchange(&mut app, "victim").await;
    assert_failed(
        &job,
        FailureReason::OutcomeUnknown,
        2,
        "a broken-off answer",
    );
    assert!(job.outcome_unknown, "{}", brief(&job));
    assert_eq!(job.last_http_status, 403, "{}", brief(&job));
    assert_eq!(app.fake.stats().redeemed, 1);
    bystander_succeeds(&mut app.client, &app.fake, PATIENCE).await;
}

/// 200s without a usable token fail as protocol errors at once (another attempt would only
/// spend a request on a code upstream may have redeemed), and nothing of the body reaches the
/// job's failure detail.
#[tokio::test]
async fn a_200_without_a_usable_token_is_a_protocol_failure() {
    // Room for the 100 KB token, so it is refused for its length and not for the body's size.
    let mut app =
        TestApp::spawn_with(|config| config.upstream.max_response_bytes = 256 * 1024).await;
    let marker = "tok-7f3a9c-secret";
    let long_token = "a".repeat(100 * 1024);
    let cases = [
        (
            "HTML",
            RawAnswer::new(200)
                .header("content-type", "text/html")
                .body(format!("<html><body>{marker}</body></html>")),
        ),
        (
            "malformed JSON",
            RawAnswer::json(
                200,
                format!(r#"{{"access_token": "{marker}", "expires_in": 36"#),
            ),
        ),
        (
            "a numeric access_token",
            RawAnswer::json(
                200,
                r#"{"access_token": 123, "expires_in": 3600, "token_type": "Bearer"}"#,
            ),
        ),
        (
            "a string expires_in",
            RawAnswer::json(
                200,
                format!(
                    r#"{{"access_token": "{marker}", "expires_in": "3600", "token_type": "Bearer"}}"#
                ),
            ),
        ),
        (
            "an empty access_token",
            RawAnswer::json(
                200,
                r#"{"access_token": "", "expires_in": 3600, "token_type": "Bearer"}"#,
            ),
        ),
        (
            "a 100 KB access_token",
            RawAnswer::json(
                200,
                format!(
                    r#"{{"access_token": "{long_token}", "expires_in": 3600, "token_type": "Bearer"}}"#
                ),
            ),
        ),
        (
            "a zero expires_in",
            RawAnswer::json(
                200,
                format!(
                    r#"{{"access_token": "{marker}", "expires_in": 0, "token_type": "Bearer"}}"#
                ),
            ),
        ),
        (
            "a negative expires_in",
            RawAnswer::json(
                200,
                format!(
                    r#"{{"access_token": "{marker}", "expires_in": -3600, "token_type": "Bearer"}}"#
                ),
            ),
        ),
    ];
    for (case, answer) in cases {
        app.fake.script([answer.redeeming()]);
        let job = exchange(&mut app, "victim").await;
        assert_failed(&job, FailureReason::UpstreamProtocol, 1, case);
        assert_eq!(job.last_http_status, 200, "{case}");
        assert!(
            !job.failure_detail.contains(marker) && !job.failure_detail.contains("aaaa"),
            "{case}: the body stays out of the detail: {:?}",
            job.failure_detail
        );
        bystander_succeeds(&mut app.client, &app.fake, PATIENCE).await;
    }
}

/// `expires_in` of i64::MAX is accepted, with the token's expiry capped at one year.
#[tokio::test]
async fn a_huge_expires_in_is_capped_at_one_year() {
    let mut app = TestApp::spawn().await;
    app.fake.script([RawAnswer::json(
        200,
        r#"{"access_token": "forever", "expires_in": 9223372036854775807, "token_type": "Bearer"}"#,
    )
    .redeeming()]);
    let job = exchange(&mut app, "victim").await;
    assert_eq!(job.state(), JobState::Succeeded, "{}", brief(&job));
    let token = job.token.as_ref().expect("a token");
    assert_eq!(token.access_token, "forever");
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let now = i64::try_from(now).unwrap();
    let expires_at = millis(token.expires_at.as_ref());
    let day = 24 * 3_600 * 1_000;
    assert!(
        expires_at > now && expires_at <= now + 366 * day,
        "the expiry is capped at about a year: {} days from now",
        (expires_at - now) / day
    );
    bystander_succeeds(&mut app.client, &app.fake, PATIENCE).await;
}

/// A `token_type` that is empty or longer than 64 bytes is reported as `Bearer`; the token is
/// still served.
#[tokio::test]
async fn an_odd_token_type_is_reported_as_bearer() {
    let mut app = TestApp::spawn().await;
    for token_type in [String::new(), "x".repeat(65)] {
        app.fake.script([RawAnswer::json(
            200,
            format!(
                r#"{{"access_token": "odd", "expires_in": 3600, "token_type": "{token_type}"}}"#
            ),
        )
        .redeeming()]);
        let job = exchange(&mut app, "victim").await;
        assert_eq!(job.state(), JobState::Succeeded, "{}", brief(&job));
        let token = job.token.as_ref().expect("a token");
        assert_eq!(
            (token.access_token.as_str(), token.token_type.as_str()),
            ("odd", "Bearer"),
            "token_type {token_type:?}"
        );
        bystander_succeeds(&mut app.client, &app.fake, PATIENCE).await;
    }
}

/// The fake's hostile answers, seen by a plain HTTP client: scripted over `/test/script`, with
/// the framing each form promises.
#[tokio::test]
async fn the_fake_sends_hostile_answers_as_scripted() {
    let fake = start_fake().await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let script = |entries: &'static str| {
        let http = http.clone();
        let url = format!("http://{}/test/script", fake.addr());
        async move { http.post(url).body(entries).send().await.unwrap().status() }
    };
    let token_request = || {
        let verifier = new_verifier();
        let code = fake.issue_code("app", &s256_challenge(&verifier));
        http.post(fake.token_url())
            .form(&[
                ("grant_type", "authorization_code"),
                ("client_id", "app"),
                ("code", code.as_str()),
                ("code_verifier", verifier.as_str()),
            ])
            .send()
    };

    let status = script(
        r#"[{"status": 302, "headers": [["location", "http://127.0.0.1:9/v1/token"]]},
            {"status": 200, "headers": [["content-length", "100"]], "body": "short"},
            "huge:100000", "huge-chunked:100000", "drip:5", "truncated"]"#,
    )
    .await;
    assert_eq!(status, 200);

    let redirect = token_request().await.unwrap();
    assert_eq!(redirect.status(), 302);
    assert_eq!(
        redirect.headers()["location"],
        "http://127.0.0.1:9/v1/token"
    );

    let lying = token_request().await.unwrap();
    assert_eq!(
        lying.content_length(),
        Some(100),
        "the scripted length is sent"
    );
    assert!(lying.bytes().await.is_err(), "the body falls short of it");

    for chunked in [false, true] {
        let huge = token_request().await.unwrap();
        assert_eq!(huge.status(), 200);
        let length = huge.content_length();
        let body = huge.bytes().await.unwrap();
        assert!(body.len() > 100_000);
        assert_eq!(length.is_none(), chunked, "chunked: {chunked}");
        if let Some(length) = length {
            assert_eq!(length, body.len() as u64);
        }
        let token: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(
            token["access_token"].is_string(),
            "a valid token at the end"
        );
    }

    let drip = token_request().await.unwrap();
    let length = drip.content_length().expect("an exact length");
    let body = drip.bytes().await.unwrap();
    assert_eq!(body.len() as u64, length);
    assert!(
        serde_json::from_slice::<serde_json::Value>(&body).unwrap()["access_token"].is_string()
    );

    let truncated = token_request().await.unwrap();
    assert_eq!(
        truncated.status(),
        200,
        "the status line and headers arrive"
    );
    assert!(truncated.content_length().is_some());
    assert!(truncated.bytes().await.is_err(), "the body breaks off");

    let stats = fake.stats();
    assert_eq!(stats.token_requests, 6);
    assert_eq!(
        stats.redeemed, 4,
        "huge twice, drip and truncated redeem their codes"
    );

    for bad in [
        r#"[{"status": 99}]"#,
        r#"[{"status": 200, "headers": [["bad name", "x"]]}]"#,
        r#"["huge:lots"]"#,
        r#"[42]"#,
    ] {
        assert_eq!(script(bad).await, 400, "{bad}");
    }
}
