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
//!   next token requests, before any random fault. Each entry is one of the strings below or an
//!   object, a raw answer ([`RawAnswer`]), for example
//!   `{"status": 302, "headers": [["location", "http://elsewhere/v1/token"]]}`.
//! - `POST /test/faults` (JSON [`Faults`]) replaces the random fault rates.
//! - `GET /test/stats` returns the counts in [`Stats`].
//!
//! Scripted and random faults: a status (429 and 503 carry `Retry-After`), `drop` (the
//! connection closes after the request is read, before it is processed), `drop-after` (the
//! code is redeemed, then the connection closes: the answer is lost but the code is spent) and
//! `slow:MS` (processed, then answered after MS milliseconds). A rate limit
//! ([`Faults::rate_limit_rps`]) answers 429 beyond a given rate, as upstream would.
//!
//! Hostile answers, scripted only, to test the daemon's defences. Each of the first three
//! redeems the code first, so the code is spent whatever the client makes of the answer:
//!
//! - `huge:BYTES`: a 200 whose body is BYTES of whitespace followed by the token's JSON, with an
//!   exact `Content-Length`; `huge-chunked:BYTES` sends the same body chunked, without a length.
//!   A client that read it all would find a valid token. The body is generated as it is sent,
//!   64 KiB at a time, never held in memory.
//! - `drip:MS`: a 200 with the token's JSON and its exact `Content-Length`, the body sent one
//!   byte every MS milliseconds.
//! - `truncated`: a 200 whose `Content-Length` announces the token's whole JSON, of which half is
//!   sent before the connection closes.
//! - A raw answer: any status from 200 to 999, any headers (repeated names allowed) and any
//!   body, sent as given; `"redeem": true` redeems the code first (its token is discarded). A
//!   `Content-Length` or `Transfer-Encoding` among the headers is sent as given, even when it
//!   contradicts the body. Its fields: `status`, and optionally `headers` (an array of
//!   `[name, value]` pairs), `body` (a string) and `redeem`.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited, StreamBody, combinators::UnsyncBoxBody};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Frame, Incoming},
    header::{
        CONTENT_LENGTH, CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER, TRANSFER_ENCODING,
    },
    service::service_fn,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::{net::TcpListener, sync::mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::{
    ops::metrics::Metrics,
    server::connections::{self, ConnectionLimits},
};

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

/// One queued fault for the next token request, as its string form names it.
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
    /// Redeem the code, then answer 200 with `padding` bytes of whitespace before the token's
    /// JSON, streamed; with an exact `Content-Length` unless `chunked`.
    Huge { padding: u64, chunked: bool },
    /// Redeem the code, then send the token's JSON one byte every `interval_ms`.
    Drip { interval_ms: u64 },
    /// Redeem the code, announce the token's JSON in full (`Content-Length`), send half of it
    /// and close the connection.
    Truncated,
}

impl std::str::FromStr for Scripted {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let number = |digits: &str, form: &str| {
            digits
                .parse::<u64>()
                .map_err(|_| format!("{s:?}: expected {form}"))
        };
        if let Some(millis) = s.strip_prefix("slow:") {
            return number(millis, "slow:MILLISECONDS").map(Scripted::Slow);
        }
        if let Some(bytes) = s.strip_prefix("huge:") {
            return number(bytes, "huge:BYTES").map(|padding| Scripted::Huge {
                padding,
                chunked: false,
            });
        }
        if let Some(bytes) = s.strip_prefix("huge-chunked:") {
            return number(bytes, "huge-chunked:BYTES").map(|padding| Scripted::Huge {
                padding,
                chunked: true,
            });
        }
        if let Some(millis) = s.strip_prefix("drip:") {
            return number(millis, "drip:MILLISECONDS")
                .map(|interval_ms| Scripted::Drip { interval_ms });
        }
        match s {
            "drop" => Ok(Scripted::Drop),
            "drop-after" => Ok(Scripted::DropAfter),
            "truncated" => Ok(Scripted::Truncated),
            status => status.parse().map(Scripted::Status).map_err(|_| {
                format!(
                    "{status:?} is not a status, \"drop\", \"drop-after\", \"slow:MS\", \
                     \"huge:BYTES\", \"huge-chunked:BYTES\", \"drip:MS\" or \"truncated\""
                )
            }),
        }
    }
}

/// An answer sent exactly as given: any status, headers and body. For answers that no
/// [`Scripted`] form describes, such as a redirect, an odd `Retry-After` or a malformed token.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAnswer {
    /// From 200 to 999 (hyper cannot send a 1xx as a final answer).
    pub status: u16,
    /// Sent in this order; a name may repeat.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    #[serde(default)]
    pub body: String,
    /// Whether the request is processed (the code redeemed, its token discarded) first.
    #[serde(default)]
    pub redeem: bool,
}

impl RawAnswer {
    /// An answer with this status, no headers and an empty body.
    pub fn new(status: u16) -> RawAnswer {
        RawAnswer {
            status,
            ..RawAnswer::default()
        }
    }

    /// An answer whose body is sent as `application/json`, whatever it holds.
    pub fn json(status: u16, body: impl Into<String>) -> RawAnswer {
        RawAnswer::new(status)
            .header("content-type", "application/json")
            .body(body)
    }

    /// Adds a header, after those already there.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> RawAnswer {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn body(mut self, body: impl Into<String>) -> RawAnswer {
        self.body = body.into();
        self
    }

    /// Redeems the code before answering.
    pub fn redeeming(mut self) -> RawAnswer {
        self.redeem = true;
        self
    }

    /// Whether hyper can send this answer: a status from 200 to 999 and valid header names and
    /// values.
    pub fn validate(&self) -> Result<(), String> {
        self.head().map(drop)
    }

    /// The status and headers, checked.
    fn head(&self) -> Result<(StatusCode, hyper::HeaderMap), String> {
        if !(200..=999).contains(&self.status) {
            return Err(format!("status {} is not from 200 to 999", self.status));
        }
        let status = StatusCode::from_u16(self.status).map_err(|e| e.to_string())?;
        let mut headers = hyper::HeaderMap::new();
        for (name, value) in &self.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| format!("header name {name:?}: {e}"))?;
            let value =
                HeaderValue::from_str(value).map_err(|e| format!("header {name} value: {e}"))?;
            headers.append(name, value);
        }
        Ok((status, headers))
    }

    fn to_response(&self) -> Result<HttpResponse, String> {
        let (status, headers) = self.head()?;
        let body = Bytes::from(self.body.clone());
        // hyper trusts (and in debug builds asserts) a body of known length against a
        // `Content-Length` header; a body of unknown length lets the scripted framing through,
        // however wrong.
        let body =
            if headers.contains_key(CONTENT_LENGTH) || headers.contains_key(TRANSFER_ENCODING) {
                unsized_body(body)
            } else {
                full(body)
            };
        let mut response = Response::new(body);
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        Ok(response)
    }
}

/// One queued answer for the next token request: a [`Scripted`] fault or a [`RawAnswer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScriptedAnswer {
    Fault(Scripted),
    Raw(RawAnswer),
}

impl From<Scripted> for ScriptedAnswer {
    fn from(fault: Scripted) -> Self {
        ScriptedAnswer::Fault(fault)
    }
}

impl From<RawAnswer> for ScriptedAnswer {
    fn from(raw: RawAnswer) -> Self {
        ScriptedAnswer::Raw(raw)
    }
}

impl std::str::FromStr for ScriptedAnswer {
    type Err = String;

    /// The string forms of [`Scripted`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(ScriptedAnswer::Fault)
    }
}

impl ScriptedAnswer {
    /// One entry of a `/test/script` array: a string form of [`Scripted`] or a [`RawAnswer`]
    /// object.
    pub fn from_json(entry: serde_json::Value) -> Result<ScriptedAnswer, String> {
        match entry {
            serde_json::Value::String(form) => form.parse(),
            object @ serde_json::Value::Object(_) => {
                let raw: RawAnswer =
                    serde_json::from_value(object).map_err(|e| format!("raw answer: {e}"))?;
                raw.validate()?;
                Ok(ScriptedAnswer::Raw(raw))
            }
            other => Err(format!(
                "{other}: an entry is a string or a raw answer object"
            )),
        }
    }
}

/// What the fake has seen.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stats {
    /// Token requests received, whatever happened to them.
    pub token_requests: u64,
    /// Token answers by status (a streamed answer counts when its headers are sent, whether or
    /// not its body arrives).
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
    /// The token its redemption issued, so tests can check the broker returned that one.
    token: Option<String>,
}

#[derive(Debug)]
struct State {
    codes: Mutex<HashMap<String, IssuedCode>>,
    faults: Mutex<Faults>,
    /// Enforces [`Faults::rate_limit_rps`]; rebuilt when the faults change.
    rate_limit: Mutex<Option<governor::DefaultDirectRateLimiter>>,
    script: Mutex<VecDeque<ScriptedAnswer>>,
    stats: Mutex<Stats>,
    /// When each token request arrived.
    arrivals: Mutex<Vec<Instant>>,
    /// Token requests received so far, for tests that wait for traffic instead of sleeping.
    received: tokio::sync::watch::Sender<u64>,
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

/// A documented refusal of a token request: its status and message.
#[derive(Debug, Clone, Copy)]
struct Refusal(StatusCode, &'static str);

impl Refusal {
    fn answer(self) -> HttpResponse {
        error(self.0, self.1)
    }
}

/// An error in an answer's body: hyper closes the connection mid-answer.
type BodyError = Box<dyn std::error::Error + Send + Sync>;
type HttpBody = UnsyncBoxBody<Bytes, BodyError>;
type HttpResponse = Response<HttpBody>;

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
            received: tokio::sync::watch::Sender::new(0),
            code_ttl: options.code_ttl,
            token_lifetime_secs: options.token_lifetime_secs,
        });
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, Arc::clone(&state), stop.clone()));
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

    /// The token the redemption of `code` issued, if it was redeemed.
    pub fn issued_token(&self, code: &str) -> Option<String> {
        self.state
            .codes
            .lock()
            .get(code)
            .and_then(|issued| issued.token.clone())
    }

    /// Queues answers ([`Scripted`] faults or [`RawAnswer`]s) for the next token requests. A raw
    /// answer that [`RawAnswer::validate`] refuses is answered as a 500.
    pub fn script<A: Into<ScriptedAnswer>>(&self, answers: impl IntoIterator<Item = A>) {
        self.state
            .script
            .lock()
            .extend(answers.into_iter().map(Into::into));
    }

    pub fn set_faults(&self, faults: Faults) {
        self.state.set_faults(faults);
    }

    pub fn stats(&self) -> Stats {
        self.state.stats.lock().clone()
    }

    /// When each token request arrived, in order.
    pub fn arrivals(&self) -> Vec<Instant> {
        self.state.arrivals.lock().clone()
    }

    /// Waits until the fake has received at least `count` token requests.
    pub async fn wait_for_requests(&self, count: u64) {
        let mut received = self.state.received.subscribe();
        // The sender lives in the state this handle holds, so the wait cannot fail.
        let _ = received.wait_for(|received| *received >= count).await;
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
        *self.rate_limit.lock() = rate_limiter(&faults);
        *self.faults.lock() = faults;
    }

    /// Whether the rate limit refuses this request.
    fn over_rate_limit(&self) -> bool {
        self.rate_limit
            .lock()
            .as_ref()
            .is_some_and(|limiter| limiter.check().is_err())
    }

    fn issue_code(&self, client_id: &str, challenge: &str) -> String {
        let code = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 24]>());
        self.codes.lock().insert(
            code.clone(),
            IssuedCode {
                client_id: client_id.to_string(),
                challenge: challenge.to_string(),
                issued_at: Instant::now(),
                used: false,
                token: None,
            },
        );
        code
    }

    /// The next answer to give, scripted first, then a random fault (`None`: a normal answer),
    /// with the latency and `Retry-After` seconds to apply.
    fn next_answer(&self) -> (Option<ScriptedAnswer>, Duration, u64) {
        let faults = self.faults.lock().clone();
        let latency = Duration::from_millis(faults.latency_ms);
        let retry_after = faults.retry_after_secs.max(1);
        if let Some(scripted) = self.script.lock().pop_front() {
            return (Some(scripted), latency, retry_after);
        }
        if self.over_rate_limit() {
            return (Some(Scripted::Status(429).into()), latency, retry_after);
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
                return (Some(fault.into()), latency, retry_after);
            }
        }
        (None, latency, retry_after)
    }

    fn count(&self, status: Option<StatusCode>) {
        let mut stats = self.stats.lock();
        match status {
            Some(status) => *stats.by_status.entry(status.as_u16()).or_default() += 1,
            None => stats.dropped += 1,
        }
    }

    /// Checks a token request as Truecaller documents it, redeeming the code on success. Returns
    /// the token's JSON body, or the documented refusal (answered with [`Refusal::answer`]).
    fn redeem(&self, form: &HashMap<String, String>) -> Result<Bytes, Refusal> {
        let field = |name: &str| form.get(name).map(String::as_str).unwrap_or_default();
        if field("grant_type") != "authorization_code" && !field("grant_type").is_empty() {
            return Err(Refusal(StatusCode::BAD_REQUEST, "grant type not supported"));
        }
        if ["grant_type", "client_id", "code", "code_verifier"]
            .iter()
            .any(|name| field(name).is_empty())
        {
            return Err(Refusal(StatusCode::BAD_REQUEST, "some parameter is empty"));
        }
        let mut codes = self.codes.lock();
        let Some(issued) = codes.get_mut(field("code")) else {
            return Err(Refusal(StatusCode::FORBIDDEN, "invalid auth code"));
        };
        if issued.client_id != field("client_id") {
            return Err(Refusal(StatusCode::FORBIDDEN, "client id invalid"));
        }
        if issued.used || issued.issued_at.elapsed() > self.code_ttl {
            return Err(Refusal(
                StatusCode::FORBIDDEN,
                "invalid or expired auth code",
            ));
        }
        if s256_challenge(field("code_verifier")) != issued.challenge {
            return Err(Refusal(
                StatusCode::FORBIDDEN,
                "invalid or expired code verifier",
            ));
        }
        issued.used = true;
        let token = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
        issued.token = Some(token.clone());
        drop(codes);
        self.stats.lock().redeemed += 1;
        Ok(Bytes::from(
            serde_json::json!({
                "access_token": token,
                "expires_in": self.token_lifetime_secs,
                "token_type": "Bearer",
            })
            .to_string(),
        ))
    }

    /// The documented answer to a token request: the token, or a refusal.
    fn answer(&self, form: &HashMap<String, String>) -> HttpResponse {
        match self.redeem(form) {
            Ok(token) => with_json_type(Response::new(full(token))),
            Err(refusal) => refusal.answer(),
        }
    }

    /// Redeems the code and answers with `shape` applied to the token's JSON; a refusal is
    /// answered as usual.
    fn answer_with(
        &self,
        form: &HashMap<String, String>,
        shape: impl FnOnce(Bytes) -> HttpResponse,
    ) -> HttpResponse {
        match self.redeem(form) {
            Ok(token) => shape(token),
            Err(refusal) => refusal.answer(),
        }
    }
}

/// Serves the fake on `listener` through the daemon's own accept loop, with limits generous
/// enough for any test or benchmark (the fake is not where bounds are tested).
async fn serve(listener: TcpListener, state: Arc<State>, stop: CancellationToken) {
    let limits = ConnectionLimits {
        listener: "fake",
        max_connections: 100_000,
        handshake_timeout: Duration::from_secs(60),
        idle_timeout: Duration::from_secs(3600),
    };
    let (accepted, accept_loop) =
        connections::accept(listener, limits, Metrics::new(), stop.clone());
    tokio::spawn(accept_loop);
    let service = service_fn(move |request| handle(Arc::clone(&state), request));
    connections::serve_http1(accepted, service, Duration::from_secs(60), stop).await;
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
        (&Method::GET, "/test/stats") => Ok(json(StatusCode::OK, &*state.stats.lock())),
        _ => Ok(error(StatusCode::NOT_FOUND, "not found")),
    }
}

async fn token(state: &State, body: &[u8]) -> Result<HttpResponse, DropConnection> {
    let received = {
        let mut stats = state.stats.lock();
        stats.token_requests += 1;
        stats.token_requests
    };
    state.arrivals.lock().push(Instant::now());
    state.received.send_replace(received);
    let (scripted, mut latency, retry_after) = state.next_answer();
    let form: HashMap<String, String> = serde_urlencoded::from_bytes(body).unwrap_or_default();
    let fault = match scripted {
        None => None,
        Some(ScriptedAnswer::Fault(fault)) => Some(fault),
        Some(ScriptedAnswer::Raw(raw)) => {
            if raw.redeem {
                let _ = state.redeem(&form);
            }
            let response = raw.to_response().unwrap_or_else(|e| {
                error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("invalid scripted answer: {e}"),
                )
            });
            return Ok(answer_after(state, latency, response).await);
        }
    };
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
                response
                    .headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from(retry_after));
            }
            response
        }
        Some(Scripted::Slow(millis)) => {
            latency = Duration::from_millis(millis);
            state.answer(&form)
        }
        Some(Scripted::Huge { padding, chunked }) => {
            state.answer_with(&form, |token| huge(padding, chunked, token))
        }
        Some(Scripted::Drip { interval_ms }) => state.answer_with(&form, |token| {
            drip(Duration::from_millis(interval_ms), token)
        }),
        Some(Scripted::Truncated) => state.answer_with(&form, truncated),
        None => state.answer(&form),
    };
    Ok(answer_after(state, latency, response).await)
}

/// Waits `latency`, counts the answer and returns it. Latency models a slow answer: the request
/// has been processed (the code redeemed) before the wait, as on a real server, so a client
/// that gives up meanwhile has spent the code.
async fn answer_after(state: &State, latency: Duration, response: HttpResponse) -> HttpResponse {
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    state.count(Some(response.status()));
    response
}

/// Whitespace, the padding of [`Scripted::Huge`] bodies, sent one slice at a time.
static PADDING: [u8; 64 * 1024] = [b' '; 64 * 1024];

/// A 200 with `padding` bytes of whitespace before `token`, generated as it is sent.
fn huge(padding: u64, chunked: bool, token: Bytes) -> HttpResponse {
    let length = padding.saturating_add(token.len() as u64);
    let body = streamed(move |frames| async move {
        let mut left = padding;
        while left > 0 {
            let size = usize::try_from(left).map_or(PADDING.len(), |left| left.min(PADDING.len()));
            let chunk = Bytes::from_static(&PADDING[..size]);
            if frames.send(Ok(Frame::data(chunk))).await.is_err() {
                return;
            }
            left -= size as u64;
        }
        let _ = frames.send(Ok(Frame::data(token))).await;
    });
    let mut response = with_json_type(Response::new(body));
    if !chunked {
        response
            .headers_mut()
            .insert(CONTENT_LENGTH, HeaderValue::from(length));
    }
    response
}

/// A 200 with `token` and its exact length, one byte every `interval`.
fn drip(interval: Duration, token: Bytes) -> HttpResponse {
    let length = token.len();
    let body = streamed(move |frames| async move {
        for at in 0..token.len() {
            if at > 0 {
                tokio::select! {
                    _ = frames.closed() => return,
                    _ = tokio::time::sleep(interval) => {}
                }
            }
            if frames
                .send(Ok(Frame::data(token.slice(at..=at))))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let mut response = with_json_type(Response::new(body));
    response
        .headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from(length));
    response
}

/// A 200 announcing all of `token` but sending only its first half before breaking off.
fn truncated(token: Bytes) -> HttpResponse {
    let length = token.len();
    let half = token.slice(..length / 2);
    let body = UnsizedBody {
        data: Some(half),
        flushed: false,
        break_off: true,
    }
    .boxed_unsync();
    let mut response = with_json_type(Response::new(body));
    response
        .headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from(length));
    response
}

/// A body of unknown length whose frames `produce` sends as the connection takes them: the
/// channel holds one frame, and a closed channel (the connection is gone) tells `produce` to
/// stop. An `Err` frame breaks the connection off.
fn streamed<F, P>(produce: P) -> HttpBody
where
    P: FnOnce(mpsc::Sender<Result<Frame<Bytes>, BodyError>>) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let (frames, receiver) = mpsc::channel(1);
    tokio::spawn(produce(frames));
    StreamBody::new(ReceiverStream::new(receiver)).boxed_unsync()
}

/// `bytes`, announced with their exact length.
fn full(bytes: Bytes) -> HttpBody {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// `bytes`, with no length announced by the body itself (the headers decide the framing).
fn unsized_body(bytes: Bytes) -> HttpBody {
    UnsizedBody {
        data: Some(bytes),
        flushed: false,
        break_off: false,
    }
    .boxed_unsync()
}

/// A body of unknown length: `data`, then one `Pending` (while the body has nothing to give,
/// hyper flushes what it holds, so the headers and `data` leave), then the end, or with
/// `break_off` an error that closes the connection. Ending short of a `Content-Length` also
/// closes it, after the flush.
struct UnsizedBody {
    data: Option<Bytes>,
    flushed: bool,
    break_off: bool,
}

impl hyper::body::Body for UnsizedBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if !self.flushed {
            self.flushed = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        if std::mem::take(&mut self.break_off) {
            return Poll::Ready(Some(Err("the answer breaks off on purpose".into())));
        }
        Poll::Ready(None)
    }
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
    let entries: Vec<serde_json::Value> = match serde_json::from_slice(body) {
        Ok(entries) => entries,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let parsed: Result<Vec<ScriptedAnswer>, String> =
        entries.into_iter().map(ScriptedAnswer::from_json).collect();
    match parsed {
        Ok(answers) => {
            state.script.lock().extend(answers);
            json(StatusCode::OK, &serde_json::json!({}))
        }
        Err(e) => error(StatusCode::BAD_REQUEST, &e),
    }
}

fn with_json_type(mut response: HttpResponse) -> HttpResponse {
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn json(status: StatusCode, value: &impl Serialize) -> HttpResponse {
    let Ok(body) = serde_json::to_vec(value) else {
        let mut response = Response::new(full(Bytes::from_static(b"unserializable answer")));
        *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        return response;
    };
    let mut response = with_json_type(Response::new(full(Bytes::from(body))));
    *response.status_mut() = status;
    response
}

fn error(status: StatusCode, message: &str) -> HttpResponse {
    json(status, &serde_json::json!({ "error": message }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_string_form_parses() {
        for (form, expected) in [
            ("503", Scripted::Status(503)),
            ("drop", Scripted::Drop),
            ("drop-after", Scripted::DropAfter),
            ("slow:250", Scripted::Slow(250)),
            (
                "huge:1048576",
                Scripted::Huge {
                    padding: 1 << 20,
                    chunked: false,
                },
            ),
            (
                "huge-chunked:10",
                Scripted::Huge {
                    padding: 10,
                    chunked: true,
                },
            ),
            ("drip:1000", Scripted::Drip { interval_ms: 1000 }),
            ("truncated", Scripted::Truncated),
        ] {
            assert_eq!(form.parse::<Scripted>(), Ok(expected), "{form}");
        }
        for bad in ["teapot", "slow:", "huge:-1", "drip:soon", ""] {
            assert!(bad.parse::<Scripted>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn script_entries_are_strings_or_raw_answers() {
        let entry = |text: &str| ScriptedAnswer::from_json(serde_json::from_str(text).unwrap());
        assert_eq!(
            entry(r#""drop""#),
            Ok(ScriptedAnswer::Fault(Scripted::Drop))
        );
        assert_eq!(
            entry(r#"{"status": 302, "headers": [["location", "http://elsewhere/"]]}"#),
            Ok(ScriptedAnswer::Raw(
                RawAnswer::new(302).header("location", "http://elsewhere/")
            ))
        );
        assert_eq!(
            entry(r#"{"status": 200, "body": "<html>", "redeem": true}"#),
            Ok(ScriptedAnswer::Raw(
                RawAnswer::new(200).body("<html>").redeeming()
            ))
        );
        for bad in [
            r#"{"status": 100}"#,
            r#"{"status": 1000}"#,
            r#"{"status": 200, "headers": [["bad name", "x"]]}"#,
            r#"{"status": 200, "headers": [["x", "line\nbreak"]]}"#,
            r#"{"status": 200, "colour": "red"}"#,
            "503",
            "null",
        ] {
            assert!(entry(bad).is_err(), "{bad}");
        }
    }
}
