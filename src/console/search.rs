//! A search: the filters of the console's job listing, parsed once from a query string (or the
//! search form) into checked values, and written back as a canonical query string for links
//! and exports. The `code` field is never part of a search: the form's handler turns it into a
//! fingerprint first, and a URL carrying one is refused without being echoed.

use std::fmt;

use crate::{
    cli::parse_time,
    domain::job::{FailureReason, JobState, UnixMillis},
    store::JobQuery,
};

/// A filter value the console cannot use: answered with 400, naming the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadFilter {
    /// The form field, as the form names it.
    pub field: &'static str,
    /// What is wrong, without repeating a secret (the code is never repeated at all).
    pub problem: String,
}

impl fmt::Display for BadFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

/// The checked filters of one search. Empty filters match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Search {
    pub client_id: Option<String>,
    pub tenant: Option<String>,
    pub state: Option<JobState>,
    pub failure_reason: Option<FailureReason>,
    /// Jobs created at or after this time.
    pub created_after: Option<UnixMillis>,
    /// Jobs created before this time.
    pub created_before: Option<UnixMillis>,
    /// A code fingerprint (64 hex digits), typed in or computed from a pasted code.
    pub fingerprint: Option<String>,
}

/// A search and where its listing continues.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    pub search: Search,
    /// Continue below this job row (the previous page's `next`).
    pub after: Option<i64>,
}

/// The longest free-text filter accepted (client ids and tenant names are short).
const MAX_TEXT: usize = 256;

impl Listing {
    /// Parses `pairs` (a query string or form, decoded). Unknown fields are ignored, except
    /// `code`, which must never travel in a URL.
    pub fn parse<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Listing, BadFilter> {
        let mut listing = Listing::default();
        for (name, value) in pairs {
            let value = value.trim();
            if name == "code" {
                if value.is_empty() {
                    continue;
                }
                return Err(BadFilter {
                    field: "code",
                    problem: "codes are searched with the search form (sent in the request \
                              body), never in a URL"
                        .into(),
                });
            }
            if value.is_empty() {
                continue;
            }
            let search = &mut listing.search;
            match name {
                "client_id" => search.client_id = Some(text("client_id", value)?),
                "tenant" => search.tenant = Some(text("tenant", value)?),
                "state" => {
                    search.state = Some(value.parse().map_err(|_| BadFilter {
                        field: "state",
                        problem: format!(
                            "{:?} is not a job state (queued, running, retry_wait, succeeded, \
                             failed, cancelled)",
                            shorten(value)
                        ),
                    })?);
                }
                "failure_reason" => {
                    search.failure_reason = Some(value.parse().map_err(|_| BadFilter {
                        field: "failure_reason",
                        problem: format!(
                            "{:?} is not a failure reason (invalid_request, forbidden, \
                             retries_exhausted, expired, outcome_unknown, upstream_protocol)",
                            shorten(value)
                        ),
                    })?);
                }
                "created_after" => search.created_after = Some(time("created_after", value)?),
                "created_before" => search.created_before = Some(time("created_before", value)?),
                "fingerprint" => search.fingerprint = Some(fingerprint(value)?),
                "after" => {
                    listing.after = Some(value.parse().map_err(|_| BadFilter {
                        field: "after",
                        problem: "not a page position".into(),
                    })?);
                }
                _ => {}
            }
        }
        if let (Some(after), Some(before)) =
            (listing.search.created_after, listing.search.created_before)
            && after >= before
        {
            return Err(BadFilter {
                field: "created_before",
                problem: "must be later than created_after".into(),
            });
        }
        Ok(listing)
    }
}

impl Search {
    /// Whether any filter is set.
    pub fn is_empty(&self) -> bool {
        *self == Search::default()
    }

    /// The store's query for one page of this search.
    pub fn job_query(&self, after: Option<i64>, limit: u32, newest_first: bool) -> JobQuery {
        JobQuery {
            client_id: self.client_id.clone(),
            tenant: self.tenant.clone(),
            state: self.state,
            code_fingerprint: self.fingerprint.clone(),
            failure_reason: self.failure_reason,
            created_after: self.created_after,
            created_before: self.created_before,
            newest_first,
            after,
            limit,
        }
    }

    /// The filters as a query string (without `?`), in a fixed order; empty for no filters.
    pub fn query_string(&self) -> String {
        let mut pairs: Vec<(&str, String)> = Vec::new();
        if let Some(value) = &self.client_id {
            pairs.push(("client_id", value.clone()));
        }
        if let Some(value) = &self.tenant {
            pairs.push(("tenant", value.clone()));
        }
        if let Some(value) = self.state {
            pairs.push(("state", value.as_str().to_string()));
        }
        if let Some(value) = self.failure_reason {
            pairs.push(("failure_reason", value.as_str().to_string()));
        }
        if let Some(value) = self.created_after {
            pairs.push(("created_after", format_time(value)));
        }
        if let Some(value) = self.created_before {
            pairs.push(("created_before", format_time(value)));
        }
        if let Some(value) = &self.fingerprint {
            pairs.push(("fingerprint", value.clone()));
        }
        serde_urlencoded::to_string(pairs).unwrap_or_default()
    }

    /// `path`, with this search's query string when it has filters, and `extra` appended.
    pub fn link(&self, path: &str, extra: Option<(&str, String)>) -> String {
        let mut query = self.query_string();
        if let Some((name, value)) = extra {
            if !query.is_empty() {
                query.push('&');
            }
            query.push_str(&serde_urlencoded::to_string([(name, value)]).unwrap_or_default());
        }
        if query.is_empty() {
            path.to_string()
        } else {
            format!("{path}?{query}")
        }
    }
}

/// A time as the form shows it and the URL carries it: RFC 3339, whole seconds, UTC.
pub fn format_time(at: UnixMillis) -> String {
    let time = std::time::SystemTime::UNIX_EPOCH
        + std::time::Duration::from_millis(u64::try_from(at.0).unwrap_or(0));
    humantime::format_rfc3339_seconds(time).to_string()
}

fn text(field: &'static str, value: &str) -> Result<String, BadFilter> {
    if value.len() > MAX_TEXT || value.chars().any(char::is_control) {
        return Err(BadFilter {
            field,
            problem: format!("at most {MAX_TEXT} printable characters"),
        });
    }
    Ok(value.to_string())
}

/// RFC 3339 (`2026-11-01T10:00:00Z`), or a date (`2026-11-01`, midnight UTC), or a time
/// without seconds or zone (`2026-11-01T10:00`, UTC): what people type.
fn time(field: &'static str, value: &str) -> Result<UnixMillis, BadFilter> {
    let expanded = match value.len() {
        10 => format!("{value}T00:00:00Z"),
        16 => format!("{value}:00Z"),
        _ => value.to_string(),
    };
    parse_time(&expanded).map_err(|_| BadFilter {
        field,
        problem: format!(
            "{:?} is not a time; give RFC 3339 (2026-11-01T10:00:00Z) or a date (2026-11-01), UTC",
            shorten(value)
        ),
    })
}

fn fingerprint(value: &str) -> Result<String, BadFilter> {
    let value = value.to_ascii_lowercase();
    if value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(value)
    } else {
        Err(BadFilter {
            field: "fingerprint",
            problem: "a code fingerprint is 64 hexadecimal digits (paste the code itself in the \
                      code field instead)"
                .into(),
        })
    }
}

/// A typed value quoted back in an error, cut short.
fn shorten(value: &str) -> String {
    value.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_round_trip_through_the_query_string() {
        let listing = Listing::parse([
            ("client_id", "app one"),
            ("state", "failed"),
            ("failure_reason", "forbidden"),
            ("created_after", "2026-11-01"),
            ("created_before", "2026-11-02T10:30"),
            ("fingerprint", &"AB".repeat(32)),
            ("unknown", "ignored"),
        ])
        .unwrap();
        let search = &listing.search;
        assert_eq!(search.state, Some(JobState::Failed));
        assert_eq!(
            search.fingerprint.as_deref(),
            Some("ab".repeat(32).as_str())
        );
        let query = search.query_string();
        assert!(
            query.contains("created_before=2026-11-02T10%3A30%3A00Z"),
            "{query}"
        );
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(&query).unwrap();
        let again = Listing::parse(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))).unwrap();
        assert_eq!(&again.search, search);
    }

    #[test]
    fn a_bad_value_names_its_field_and_a_code_is_never_repeated() {
        let field = |pairs: &[(&str, &str)]| Listing::parse(pairs.iter().copied()).unwrap_err();
        assert_eq!(field(&[("state", "done")]).field, "state");
        assert_eq!(field(&[("failure_reason", "x")]).field, "failure_reason");
        assert_eq!(
            field(&[("created_after", "yesterday")]).field,
            "created_after"
        );
        assert_eq!(field(&[("fingerprint", "abc")]).field, "fingerprint");
        assert_eq!(field(&[("after", "x")]).field, "after");
        assert_eq!(
            field(&[
                ("created_after", "2026-11-02"),
                ("created_before", "2026-11-01")
            ])
            .field,
            "created_before"
        );
        let error = field(&[("code", "secret-code-123")]);
        assert_eq!(error.field, "code");
        assert!(!error.to_string().contains("secret-code-123"));
    }
}
