//! The upstream client: one `POST /v1/token` per attempt, exactly as Truecaller's documentation
//! describes (`shared/reference/truecaller-token-endpoint.md`), reduced to an
//! [`AttemptOutcome`] that the pure retry logic can classify.
//!
//! Upstream bodies never leave this module: a token is parsed into a [`TokenGrant`], an error
//! body is only matched against the documented refusal texts to pick a fixed hint.

use std::time::{Duration, SystemTime};

use reqwest::header::RETRY_AFTER;
use serde::Deserialize;

use crate::{
    config::UpstreamConfig,
    domain::{
        job::TokenGrant,
        secret::{ExposeSecret, SecretString},
    },
};

/// What one attempt produced, as far as the client could see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// Upstream answered with a status line.
    Answered(Answer),
    /// The request certainly never reached upstream (connect refused, DNS, TLS handshake).
    NotSent,
    /// The request may have reached upstream, but no answer was seen (timeout, reset).
    AnswerLost,
}

/// An answer from upstream, with everything the retry logic may branch on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    /// `Retry-After`, as a delay from when the answer arrived.
    pub retry_after: Option<Duration>,
    /// The token, when a 2xx body held a usable one.
    pub token: Option<TokenGrant>,
    /// For 400 and 403: which documented refusal the body names, when it clearly names one.
    pub hint: Option<&'static str>,
}

/// What a status from the token endpoint means: the one classification of HTTP statuses that
/// the retry decision, the circuit breaker and the metrics share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusClass {
    /// 2xx: a token, if the body holds a usable one.
    Success,
    /// 400: the request is malformed; the same request fails again.
    BadRequest,
    /// 403: the client id, code or verifier is refused.
    Forbidden,
    /// 429: too many requests; retry after slowing down.
    RateLimited,
    /// 500, 502, 503, 504: upstream is failing; retry with backoff.
    ServerError,
    /// Anything else (1xx, 3xx, other 4xx and 5xx): not in the contract.
    Undocumented,
}

impl StatusClass {
    pub fn of(status: u16) -> StatusClass {
        match status {
            200..=299 => StatusClass::Success,
            400 => StatusClass::BadRequest,
            403 => StatusClass::Forbidden,
            429 => StatusClass::RateLimited,
            500 | 502 | 503 | 504 => StatusClass::ServerError,
            _ => StatusClass::Undocumented,
        }
    }
}

impl AttemptOutcome {
    /// The status family for the metrics: `2xx`, `4xx`, `5xx`, `other`, or `not_sent` and
    /// `lost` when there was no answer.
    pub fn family(&self) -> &'static str {
        match self {
            AttemptOutcome::Answered(answer) => match answer.status {
                200..=299 => "2xx",
                400..=499 => "4xx",
                500..=599 => "5xx",
                _ => "other",
            },
            AttemptOutcome::NotSent => "not_sent",
            AttemptOutcome::AnswerLost => "lost",
        }
    }
}

/// Sends token requests to upstream. One per daemon: its connection pool is shared by every
/// attempt.
#[derive(Debug, Clone)]
pub struct UpstreamClient {
    /// Keeps connections alive between attempts.
    http: reqwest::Client,
    token_url: reqwest::Url,
    /// Answers larger than this are not read.
    max_response_bytes: usize,
    /// `Retry-After` is clamped to this.
    max_retry_after: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamSetupError {
    #[error("invalid upstream URL: {0}")]
    Url(#[from] url::ParseError),
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

impl UpstreamClient {
    pub fn new(config: &UpstreamConfig) -> Result<Self, UpstreamSetupError> {
        install_crypto_provider();
        let http = reqwest::Client::builder()
            .tls_backend_rustls()
            .timeout(Duration::from_millis(config.timeout_ms))
            .connect_timeout(Duration::from_millis(
                config.connect_timeout_ms.min(config.timeout_ms),
            ))
            // A redirect would resend the code somewhere the configuration did not name.
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .user_agent(concat!("token-broker/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
            token_url: config.token_url.parse()?,
            max_response_bytes: config.max_response_bytes,
            max_retry_after: Duration::from_secs(config.max_retry_after_secs),
        })
    }

    /// Presents one code to upstream. Never fails: every error becomes an outcome.
    pub async fn exchange(
        &self,
        client_id: &str,
        code: &SecretString,
        code_verifier: &SecretString,
    ) -> AttemptOutcome {
        let form = [
            ("grant_type", "authorization_code"),
            ("client_id", client_id),
            ("code", code.expose_secret()),
            ("code_verifier", code_verifier.expose_secret()),
        ];
        let response = match self
            .http
            .post(self.token_url.clone())
            .form(&form)
            .send()
            .await
        {
            Ok(response) => response,
            Err(error) if error.is_connect() => {
                tracing::warn!(error = %error.without_url(), "upstream connection failed; nothing was sent");
                return AttemptOutcome::NotSent;
            }
            Err(error) => {
                tracing::warn!(error = %error.without_url(), "upstream answer lost");
                return AttemptOutcome::AnswerLost;
            }
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| parse_retry_after(value, SystemTime::now(), self.max_retry_after));
        let body = match read_limited(response, self.max_response_bytes).await {
            Ok(body) => body,
            Err(BodyError::TooLarge) => {
                tracing::warn!(status, "upstream answer exceeded the size limit; not read");
                None
            }
            Err(BodyError::Transport(error)) if (200..300).contains(&status) => {
                // A success whose body broke off: the code may be spent and the token unseen.
                tracing::warn!(status, error = %error.without_url(), "upstream answer body lost");
                return AttemptOutcome::AnswerLost;
            }
            Err(BodyError::Transport(error)) => {
                tracing::debug!(status, error = %error.without_url(), "upstream error body lost");
                None
            }
        };
        let (token, hint) = match (&body, status) {
            (Some(body), 200..=299) => (parse_token(body), None),
            (Some(body), 400 | 403) => (None, refusal_hint(body)),
            _ => (None, None),
        };
        AttemptOutcome::Answered(Answer {
            status,
            retry_after,
            token,
            hint,
        })
    }
}

/// Makes ring the process's rustls crypto provider. reqwest is built without a bundled
/// provider (which would pull in aws-lc), so one must be installed before any `reqwest::Client`
/// is built. Idempotent.
pub fn install_crypto_provider() {
    // An error only means a provider is already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

enum BodyError {
    TooLarge,
    Transport(reqwest::Error),
}

async fn read_limited(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Option<Vec<u8>>, BodyError> {
    if response
        .content_length()
        .is_some_and(|length| length > limit as u64)
    {
        return Err(BodyError::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(BodyError::Transport)? {
        if body.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

/// The longest access token accepted. Truecaller's are far shorter; a longer one is not a
/// token but a broken or hostile answer.
pub const MAX_ACCESS_TOKEN_BYTES: usize = 8192;
/// A token's lifetime is recorded as at most this (one year), however long upstream says it
/// lasts, so that its absolute expiry is always representable.
pub const MAX_TOKEN_LIFETIME_SECS: i64 = 365 * 86_400;

/// The documented success body: `{"access_token", "expires_in", "token_type"}`. `None` when it
/// is not JSON of that shape, the token is empty or longer than [`MAX_ACCESS_TOKEN_BYTES`], or
/// `expires_in` is not a positive integer. A `token_type` that is empty or longer than 64 bytes
/// reads as `Bearer`; `expires_in` beyond [`MAX_TOKEN_LIFETIME_SECS`] reads as that.
fn parse_token(body: &[u8]) -> Option<TokenGrant> {
    #[derive(Deserialize)]
    struct TokenBody {
        access_token: String,
        expires_in: i64,
        #[serde(default)]
        token_type: Option<String>,
    }
    let parsed: TokenBody = serde_json::from_slice(body).ok()?;
    let token = parsed.access_token;
    if token.is_empty() || token.len() > MAX_ACCESS_TOKEN_BYTES || parsed.expires_in <= 0 {
        return None;
    }
    Some(TokenGrant {
        access_token: SecretString::from(token),
        token_type: parsed
            .token_type
            .filter(|t| !t.is_empty() && t.len() <= 64)
            .unwrap_or_else(|| "Bearer".to_string()),
        expires_in: parsed.expires_in.min(MAX_TOKEN_LIFETIME_SECS),
    })
}

/// The documented refusals, most specific first. The body is only searched for these texts;
/// what is returned is always one of these constants, never the body.
const REFUSALS: &[(&str, &str)] = &[
    ("code verifier", "invalid or expired code verifier"),
    ("expired auth code", "invalid or expired auth code"),
    ("auth code", "invalid auth code"),
    ("not allowed", "grant type not allowed for this client"),
    ("client id", "client id invalid"),
    ("grant type", "grant type not supported"),
    ("empty", "a parameter is empty"),
];

fn refusal_hint(body: &[u8]) -> Option<&'static str> {
    let text = String::from_utf8_lossy(body).to_ascii_lowercase();
    REFUSALS
        .iter()
        .find(|(needle, _)| text.contains(needle))
        .map(|(_, hint)| *hint)
}

/// Parses `Retry-After`: delay-seconds or an HTTP date (RFC 9110 section 10.2.3), as a delay from
/// `now`, never longer than `max`. A date in the past means "now"; delay-seconds too large for
/// any integer, or a date centuries away, mean `max`; anything else (negative numbers, text)
/// is no `Retry-After` at all.
pub fn parse_retry_after(value: &str, now: SystemTime, max: Duration) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        let seconds = value.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(seconds).min(max));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO).min(max))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_secs(120);

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            parse_retry_after("120", now, MAX),
            Some(Duration::from_secs(120))
        );
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&date, now, MAX),
            Some(Duration::from_secs(30))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&past, now, MAX), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now, MAX), None);
        assert_eq!(parse_retry_after("-1", now, MAX), None);
        assert_eq!(parse_retry_after("", now, MAX), None);
    }

    #[test]
    fn absurd_retry_after_is_clamped() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            parse_retry_after("10000000000000000000", now, MAX),
            Some(MAX)
        );
        // More digits than any integer holds still means "a long time".
        assert_eq!(
            parse_retry_after("99999999999999999999999999", now, MAX),
            Some(MAX)
        );
        assert_eq!(
            parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT", now, MAX),
            Some(MAX)
        );
        assert_eq!(parse_retry_after("121", now, MAX), Some(MAX));
    }

    #[test]
    fn token_length_and_lifetime_are_bounded() {
        let long = "x".repeat(MAX_ACCESS_TOKEN_BYTES + 1);
        let body = format!(r#"{{"access_token":"{long}","expires_in":60}}"#);
        assert!(parse_token(body.as_bytes()).is_none());
        let grant =
            parse_token(br#"{"access_token":"t","expires_in":9223372036854775807}"#).unwrap();
        assert_eq!(grant.expires_in, MAX_TOKEN_LIFETIME_SECS);
        assert!(parse_token(br#"{"access_token":"t","expires_in":-1}"#).is_none());
        assert!(parse_token(br#"{"access_token":123,"expires_in":60}"#).is_none());
        assert!(parse_token(br#"{"access_token":"t","expires_in":"60"}"#).is_none());
        assert!(parse_token(br#"{"access_token":"t","expires_in":1e300}"#).is_none());
    }

    #[test]
    fn only_a_usable_token_is_accepted() {
        let grant = parse_token(br#"{"access_token":"t","expires_in":3600,"token_type":"Bearer"}"#)
            .unwrap();
        assert_eq!(grant.access_token.expose_secret(), "t");
        assert_eq!(grant.expires_in, 3600);
        assert!(parse_token(br#"{"access_token":"","expires_in":3600}"#).is_none());
        assert!(parse_token(br#"{"expires_in":3600}"#).is_none());
        assert!(parse_token(b"<html>").is_none());
    }

    #[test]
    fn hints_are_constants_never_the_body() {
        let body = b"{\"error\":\"Invalid or expired code verifier for code SECRET123\"}";
        let hint = refusal_hint(body).unwrap();
        assert_eq!(hint, "invalid or expired code verifier");
        assert!(!hint.contains("SECRET123"));
        assert_eq!(refusal_hint(b"something else"), None);
    }

    proptest::proptest! {
        /// Whatever upstream sends (any bytes, any header), reading it never panics, and a
        /// hint is always one of the fixed texts, never a piece of the body.
        #[test]
        fn hostile_answers_are_classified_never_trusted(
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..4096),
            header in ".{0,64}",
            status in 100u16..600,
        ) {
            let _ = parse_token(&body);
            if let Some(hint) = refusal_hint(&body) {
                proptest::prop_assert!(REFUSALS.iter().any(|(_, fixed)| *fixed == hint));
            }
            let retry_after = parse_retry_after(&header, SystemTime::now(), MAX);
            if let Some(after) = retry_after {
                proptest::prop_assert!(after <= MAX);
            }
            let answer = AttemptOutcome::Answered(Answer {
                status,
                retry_after,
                token: parse_token(&body),
                hint: refusal_hint(&body),
            });
            let verdict = crate::exchange::retry::classify(&answer);
            if let crate::exchange::retry::Verdict::Fail { detail, .. } = verdict {
                proptest::prop_assert!(detail.len() < 200);
            }
        }
    }
}
