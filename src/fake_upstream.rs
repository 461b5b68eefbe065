//! A fake Truecaller token endpoint for development and tests, speaking real HTTP.
//!
//! It behaves as the documentation describes (`shared/reference/`): `POST /v1/token` with the
//! form fields `grant_type`, `client_id`, `code` and `code_verifier`; codes are bound to a PKCE
//! S256 challenge, single-use and short-lived; the documented 400 and 403 cases answer as such.
//! Side endpoints drive it:
//!
//! - `POST /test/authorize` (form: `client_id`, `code_challenge`, `code_challenge_method=S256`)
//!   issues a code, as the app's SDK would receive it: `{"code": "..."}`; with `count=N`,
//!   N codes at once: `{"codes": [...]}` (for load generators).
//! - `POST /test/script` (JSON array such as `["503", "500", "drop"]`) queues the answers to the
//!   next token requests, before any random fault.
//! - `POST /test/faults` (JSON [`Faults`]) replaces the random fault rates.
//! - `GET /test/stats` returns the counts in [`Stats`].
//!
//! Scripted and random faults: a status (429 and 503 carry `Retry-After`), `drop` (the
//! connection closes after the request is read, before it is processed), `drop-after` (the
//! code is redeemed, then the connection closes: the answer is lost but the code is spent) and
//! `slow:MS` (processed, then answered after MS milliseconds). A rate limit
//! ([`Faults::rate_limit_rps`]) answers 429 beyond a given rate, as upstream would.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Random fault rates, each a probability from 0 to 1, and added latency.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    pub rate_429: f64,
    pub rate_500: f64,
    pub rate_503: f64,
    /// Close the connection after reading the request, before processing it.
    pub drop_rate: f64,
    /// Delay before every token answer, after the request was processed.
    pub latency_ms: u64,
    /// `Retry-After` seconds on injected 429 and 503 answers.
    pub retry_after_secs: u64,
    /// Answer 429 (with `Retry-After`) to token requests beyond this rate; 0 turns it off.
    /// Enforced as a token bucket (GCRA) over all clients.
    pub rate_limit_rps: u32,
    /// The bucket's size; 0 means equal to the rate.
    pub rate_limit_burst: u32,
}

/// One queued answer for the next token request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scripted {
    /// Answer this status (with `Retry-After` for 429 and 503) without touching the code.
    Status(u16),
    /// Close the connection before processing the request.
    Drop,
    /// Process the request (redeeming the code), then close the connection unanswered.
    DropAfter,
    /// Process the request, then wait this many milliseconds before answering.
    Slow(u64),
}

impl std::str::FromStr for Scripted {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "drop" => Ok(Scripted::Drop),
            "drop-after" => Ok(Scripted::DropAfter),
            slow if slow.starts_with("slow:") => slow[5..]
                .parse()
                .map(Scripted::Slow)
                .map_err(|_| format!("{slow:?}: expected slow:MILLISECONDS")),
            status => status
                .parse()
                .map(Scripted::Status)
                .map_err(|_| format!("{status:?} is not a status, \"drop\" or \"drop-after\"")),
        }
    }
}

/// What the fake has seen.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stats {
    /// Token requests received, whatever happened to them.
    pub token_requests: u64,
    /// Token answers by status.
    pub by_status: BTreeMap<u16, u64>,
    /// Connections closed without an answer.
    pub dropped: u64,
    /// Codes redeemed successfully (including those whose answer was then dropped).
    pub redeemed: u64,
}

/// Settings of a fake upstream.
#[derive(Debug, Clone)]
pub struct FakeOptions {
    /// How long an issued code stays valid.
    pub code_ttl: Duration,
    /// `expires_in` of issued tokens.
    pub token_lifetime_secs: i64,
    pub faults: Faults,
}

impl Default for FakeOptions {
    fn default() -> Self {
        Self {
            code_ttl: Duration::from_secs(600),
            token_lifetime_secs: 3600,
            faults: Faults::default(),
        }
    }
}

#[derive(Debug)]
struct IssuedCode {
    client_id: String,
    challenge: String,
    issued_at: Instant,
    used: bool,
}

#[derive(Debug)]
struct State {
    codes: Mutex<HashMap<String, IssuedCode>>,
    faults: Mutex<Faults>,
    /// Enforces [`Faults::rate_limit_rps`]; rebuilt when the faults change.
    rate_limit: Mutex<Option<governor::DefaultDirectRateLimiter>>,
    script: Mutex<VecDeque<Scripted>>,
    stats: Mutex<Stats>,
    /// When each token request arrived.
    arrivals: Mutex<Vec<Instant>>,
    code_ttl: Duration,
    token_lifetime_secs: i64,
}

/// A running fake upstream. Dropping the handle does not stop it; [`FakeUpstream::stop`] does.
#[derive(Debug, Clone)]
pub struct FakeUpstream {
    addr: SocketAddr,
    state: Arc<State>,
    stop: CancellationToken,
}

/// Returned by the handler to close the connection without an answer.
#[derive(Debug)]
struct DropConnection;

impl std::fmt::Display for DropConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped on purpose")
    }
}

impl std::error::Error for DropConnection {}

type HttpResponse = Response<Full<Bytes>>;

impl FakeUpstream {
    /// Serves on `listener` until stopped.
    pub fn start(listener: TcpListener, options: FakeOptions) -> std::io::Result<FakeUpstream> {
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            codes: Mutex::new(HashMap::new()),
            rate_limit: Mutex::new(rate_limiter(&options.faults)),
            faults: Mutex::new(options.faults),
            script: Mutex::new(VecDeque::new()),
            stats: Mutex::new(Stats::default()),
            arrivals: Mutex::new(Vec::new()),
            code_ttl: options.code_ttl,
            token_lifetime_secs: options.token_lifetime_secs,
        });
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(listener, Arc::clone(&state), stop.clone()));
        Ok(FakeUpstream { addr, state, stop })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The token endpoint's URL.
    pub fn token_url(&self) -> String {
        format!("http://{}/v1/token", self.addr)
    }

    /// Issues a code bound to `code_challenge` (S256), as `/test/authorize` does.
    pub fn issue_code(&self, client_id: &str, code_challenge: &str) -> String {
        self.state.issue_code(client_id, code_challenge)
    }

    /// Queues answers for the next token requests.
    pub fn script(&self, answers: impl IntoIterator<Item = Scripted>) {
        self.state.script.lock().expect("fake lock").extend(answers);
    }

    pub fn set_faults(&self, faults: Faults) {
        self.state.set_faults(faults);
    }

    pub fn stats(&self) -> Stats {
        self.state.stats.lock().expect("fake lock").clone()
    }

    /// When each token request arrived, in order.
    pub fn arrivals(&self) -> Vec<Instant> {
        self.state.arrivals.lock().expect("fake lock").clone()
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }
}

/// The S256 challenge of a verifier: base64url(SHA-256(verifier)), without padding.
pub fn s256_challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// A fresh random PKCE verifier of 86 characters, as the Android SDK makes them.
pub fn new_verifier() -> String {
    URL_SAFE_NO_PAD.encode(rand::random::<[u8; 64]>())
}

fn rate_limiter(faults: &Faults) -> Option<governor::DefaultDirectRateLimiter> {
    let rps = std::num::NonZeroU32::new(faults.rate_limit_rps)?;
    let burst = std::num::NonZeroU32::new(faults.rate_limit_burst).unwrap_or(rps);
    Some(governor::RateLimiter::direct(
        governor::Quota::per_second(rps).allow_burst(burst),
    ))
}

impl State {
    fn set_faults(&self, faults: Faults) {
        *self.rate_limit.lock().expect("fake lock") = rate_limiter(&faults);
        *self.faults.lock().expect("fake lock") = faults;
    }

    /// Whether the rate limit refuses this request.
    fn over_rate_limit(&self) -> bool {
        self.rate_limit
            .lock()
            .expect("fake lock")
            .as_ref()
            .is_some_and(|limiter| limiter.check().is_err())
    }

    fn issue_code(&self, client_id: &str, challenge: &str) -> String {
        let code = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 24]>());
        self.codes.lock().expect("fake lock").insert(
            code.clone(),
            IssuedCode {
                client_id: client_id.to_string(),
                challenge: challenge.to_string(),
                issued_at: Instant::now(),
                used: false,
            },
        );
        code
    }

    /// The next fault to apply, scripted first, then random.
    fn next_fault(&self) -> (Option<Scripted>, Duration, u64) {
        let faults = self.faults.lock().expect("fake lock").clone();
        let latency = Duration::from_millis(faults.latency_ms);
        if let Some(scripted) = self.script.lock().expect("fake lock").pop_front() {
            return (Some(scripted), latency, faults.retry_after_secs.max(1));
        }
        if self.over_rate_limit() {
            return (
                Some(Scripted::Status(429)),
                latency,
                faults.retry_after_secs.max(1),
            );
        }
        let roll: f64 = rand::random();
        let mut threshold = 0.0;
        for (rate, fault) in [
            (faults.drop_rate, Scripted::Drop),
            (faults.rate_429, Scripted::Status(429)),
            (faults.rate_500, Scripted::Status(500)),
            (faults.rate_503, Scripted::Status(503)),
        ] {
            threshold += rate;
            if roll < threshold {
                return (Some(fault), latency, faults.retry_after_secs.max(1));
            }
        }
        (None, latency, faults.retry_after_secs.max(1))
    }

    fn count(&self, status: Option<StatusCode>) {
        let mut stats = self.stats.lock().expect("fake lock");
        match status {
            Some(status) => *stats.by_status.entry(status.as_u16()).or_default() += 1,
            None => stats.dropped += 1,
        }
    }

    /// Checks a token request as Truecaller documents it, redeeming the code on success.
    fn redeem(&self, form: &HashMap<String, String>) -> HttpResponse {
        let field = |name: &str| form.get(name).map(String::as_str).unwrap_or_default();
        if field("grant_type") != "authorization_code" && !field("grant_type").is_empty() {
            return error(StatusCode::BAD_REQUEST, "grant type not supported");
        }
        if ["grant_type", "client_id", "code", "code_verifier"]
            .iter()
            .any(|name| field(name).is_empty())
        {
            return error(StatusCode::BAD_REQUEST, "some parameter is empty");
        }
        let mut codes = self.codes.lock().expect("fake lock");
        let Some(issued) = codes.get_mut(field("code")) else {
            return error(StatusCode::FORBIDDEN, "invalid auth code");
        };
        if issued.client_id != field("client_id") {
            return error(StatusCode::FORBIDDEN, "client id invalid");
        }
        if issued.used || issued.issued_at.elapsed() > self.code_ttl {
            return error(StatusCode::FORBIDDEN, "invalid or expired auth code");
        }
        if s256_challenge(field("code_verifier")) != issued.challenge {
            return error(StatusCode::FORBIDDEN, "invalid or expired code verifier");
        }
        issued.used = true;
        drop(codes);
        self.stats.lock().expect("fake lock").redeemed += 1;
        let token = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
        json(
            StatusCode::OK,
            &serde_json::json!({
                "access_token": token,
                "expires_in": self.token_lifetime_secs,
                "token_type": "Bearer",
            }),
        )
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "fake upstream: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let state = Arc::clone(&state);
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| handle(Arc::clone(&state), request));
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = connection => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

async fn handle(
    state: Arc<State>,
    request: Request<Incoming>,
) -> Result<HttpResponse, DropConnection> {
    let (parts, body) = request.into_parts();
    let body = match Limited::new(body, 64 * 1024).collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => return Ok(error(StatusCode::PAYLOAD_TOO_LARGE, "request too large")),
    };
    match (&parts.method, parts.uri.path()) {
        (&Method::POST, "/v1/token") => token(&state, &body).await,
        (&Method::POST, "/test/authorize") => Ok(authorize(&state, &body)),
        (&Method::POST, "/test/script") => Ok(script(&state, &body)),
        (&Method::POST, "/test/faults") => Ok(match serde_json::from_slice(&body) {
            Ok(faults) => {
                state.set_faults(faults);
                json(StatusCode::OK, &serde_json::json!({}))
            }
            Err(e) => error(StatusCode::BAD_REQUEST, &e.to_string()),
        }),
        (&Method::GET, "/test/stats") => Ok(json(
            StatusCode::OK,
            &*state.stats.lock().expect("fake lock"),
        )),
        _ => Ok(error(StatusCode::NOT_FOUND, "not found")),
    }
}

async fn token(state: &State, body: &[u8]) -> Result<HttpResponse, DropConnection> {
    state.stats.lock().expect("fake lock").token_requests += 1;
    state
        .arrivals
        .lock()
        .expect("fake lock")
        .push(Instant::now());
    let (fault, mut latency, retry_after) = state.next_fault();
    let form: HashMap<String, String> = serde_urlencoded::from_bytes(body).unwrap_or_default();
    let response = match fault {
        Some(Scripted::Drop) => {
            state.count(None);
            return Err(DropConnection);
        }
        Some(Scripted::DropAfter) => {
            let _ = state.redeem(&form);
            state.count(None);
            return Err(DropConnection);
        }
        Some(Scripted::Status(status)) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut response = error(status, "injected fault");
            if matches!(status.as_u16(), 429 | 503) {
                response.headers_mut().insert(
                    "retry-after",
                    retry_after.to_string().parse().expect("digits"),
                );
            }
            response
        }
        Some(Scripted::Slow(millis)) => {
            latency = Duration::from_millis(millis);
            state.redeem(&form)
        }
        None => state.redeem(&form),
    };
    // Latency models a slow answer: the request has been processed (the code redeemed) before
    // the wait, as on a real server, so a client that gives up meanwhile has spent the code.
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    state.count(Some(response.status()));
    Ok(response)
}

fn authorize(state: &State, body: &[u8]) -> HttpResponse {
    let form: HashMap<String, String> = serde_urlencoded::from_bytes(body).unwrap_or_default();
    let field = |name: &str| form.get(name).map(String::as_str).unwrap_or_default();
    if field("client_id").is_empty() || field("code_challenge").is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "client_id and code_challenge are required",
        );
    }
    if !matches!(field("code_challenge_method"), "" | "S256") {
        return error(StatusCode::BAD_REQUEST, "only S256 is supported");
    }
    // `count` issues many codes at once (for load generators): {"codes": [...]}.
    match field("count").parse::<usize>() {
        Ok(count) if (1..=100_000).contains(&count) => {
            let codes: Vec<String> = (0..count)
                .map(|_| state.issue_code(field("client_id"), field("code_challenge")))
                .collect();
            json(StatusCode::OK, &serde_json::json!({ "codes": codes }))
        }
        Ok(_) => error(StatusCode::BAD_REQUEST, "count must be 1 to 100000"),
        Err(_) => {
            let code = state.issue_code(field("client_id"), field("code_challenge"));
            json(StatusCode::OK, &serde_json::json!({ "code": code }))
        }
    }
}

fn script(state: &State, body: &[u8]) -> HttpResponse {
    let entries: Vec<String> = match serde_json::from_slice(body) {
        Ok(entries) => entries,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let parsed: Result<Vec<Scripted>, String> = entries.iter().map(|e| e.parse()).collect();
    match parsed {
        Ok(answers) => {
            state.script.lock().expect("fake lock").extend(answers);
            json(StatusCode::OK, &serde_json::json!({}))
        }
        Err(e) => error(StatusCode::BAD_REQUEST, &e),
    }
}

fn json(status: StatusCode, value: &impl Serialize) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from(
        serde_json::to_vec(value).expect("serializable"),
    )));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        "application/json".parse().expect("static"),
    );
    response
}

fn error(status: StatusCode, message: &str) -> HttpResponse {
    json(status, &serde_json::json!({ "error": message }))
}
