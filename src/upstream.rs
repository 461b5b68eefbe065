//! The upstream client: one `POST /v1/token` per attempt, exactly as Truecaller's documentation
//! describes (`shared/reference/truecaller-token-endpoint.md`), reduced to an
//! [`AttemptOutcome`] that the pure retry logic can classify.
//!
//! Upstream bodies never leave this module: a token is parsed into a [`TokenGrant`], an error
//! body is only matched against the documented refusal texts to pick a fixed hint.

use std::time::{Duration, SystemTime};

use reqwest::header::RETRY_AFTER;
use serde::Deserialize;

use crate::{config::UpstreamConfig, secret::Secret};

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

/// A token as upstream issued it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenGrant {
    pub access_token: Secret<String>,
    pub token_type: String,
    /// Lifetime in seconds, relative to when the answer arrived.
    pub expires_in: i64,
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
        })
    }

    /// Presents one code to upstream. Never fails: every error becomes an outcome.
    pub async fn exchange(
        &self,
        client_id: &str,
        code: &Secret<String>,
        code_verifier: &Secret<String>,
    ) -> AttemptOutcome {
        let form = [
            ("grant_type", "authorization_code"),
            ("client_id", client_id),
            ("code", code.expose().as_str()),
            ("code_verifier", code_verifier.expose().as_str()),
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
            .and_then(|value| parse_retry_after(value, SystemTime::now()));
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

/// The documented success body: `{"access_token", "expires_in", "token_type"}`.
fn parse_token(body: &[u8]) -> Option<TokenGrant> {
    #[derive(Deserialize)]
    struct TokenBody {
        access_token: String,
        expires_in: i64,
        #[serde(default)]
        token_type: Option<String>,
    }
    let parsed: TokenBody = serde_json::from_slice(body).ok()?;
    if parsed.access_token.is_empty() || parsed.expires_in <= 0 {
        return None;
    }
    Some(TokenGrant {
        access_token: Secret::new(parsed.access_token),
        token_type: parsed
            .token_type
            .filter(|t| !t.is_empty() && t.len() <= 64)
            .unwrap_or_else(|| "Bearer".to_string()),
        expires_in: parsed.expires_in,
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
/// `now`. A date in the past means "now".
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(30)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
    }

    #[test]
    fn only_a_usable_token_is_accepted() {
        let grant = parse_token(br#"{"access_token":"t","expires_in":3600,"token_type":"Bearer"}"#)
            .unwrap();
        assert_eq!(grant.access_token.expose(), "t");
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
            let _ = parse_retry_after(&header, SystemTime::now());
            let answer = AttemptOutcome::Answered(Answer {
                status,
                retry_after: parse_retry_after(&header, SystemTime::now()),
                token: parse_token(&body),
                hint: refusal_hint(&body),
            });
            let verdict = crate::retry::classify(&answer);
            if let crate::retry::Verdict::Fail { detail, .. } = verdict {
                proptest::prop_assert!(detail.len() < 200);
            }
        }
    }
}
