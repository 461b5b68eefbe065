//! The console's pages: a view model per page, rendered by askama templates
//! (`templates/console/`), which escape every value. View models hold only what a page
//! shows: they are built from jobs and events without their tokens, codes or verifiers, so a
//! template cannot show one by mistake.

use askama::Template;

use super::{
    chain::{ChainState, ChainStatus},
    chart::Chart,
    search::{Search, format_time},
};
use crate::{
    audit::AuditRecord,
    domain::job::{Job, JobState},
    tools::inspect::rfc3339,
};

/// The last signed checkpoint, as the status bar shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointView {
    /// The seq the checkpoint covers.
    pub seq: i64,
    /// When it was signed (RFC 3339).
    pub signed_at: String,
    /// Which public key verifies it.
    pub key_id: String,
}

/// The status bar on every page.
#[derive(Debug, Clone)]
pub struct StatusView {
    /// "intact up to seq N", "broken at seq N: …", …
    pub chain: String,
    /// `ok`, `bad` or `unknown`: the bar's colour.
    pub class: &'static str,
    /// When the chain was last checked, or that the first check still runs.
    pub checked: String,
    pub last_checkpoint: Option<CheckpointView>,
}

impl StatusView {
    pub fn new(status: &ChainStatus, last_checkpoint: Option<CheckpointView>) -> StatusView {
        let (chain, class) = match &status.state {
            ChainState::Checking => ("checking the chain…".to_string(), "unknown"),
            ChainState::Intact { up_to: None, .. } => ("intact (no events yet)".to_string(), "ok"),
            ChainState::Intact {
                up_to: Some(seq),
                detail,
            } if detail.contains("checkpoint") => {
                (format!("intact up to seq {seq} ({detail})"), "ok")
            }
            ChainState::Intact {
                up_to: Some(seq), ..
            } => (format!("intact up to seq {seq}"), "ok"),
            ChainState::Broken { seq, detail } => (format!("broken at seq {seq}: {detail}"), "bad"),
            ChainState::Unavailable => (
                "not checked: the database did not answer".to_string(),
                "unknown",
            ),
        };
        let checked = match status.checked_at {
            Some(at) => format!(
                "checked {} ({} events verified)",
                rfc3339(at),
                status.events_checked
            ),
            None => "first check running".to_string(),
        };
        StatusView {
            chain,
            class,
            checked,
            last_checkpoint,
        }
    }
}

/// A job's line in a listing.
#[derive(Debug, Clone)]
pub struct JobLine {
    pub id: String,
    pub tenant: String,
    pub client_id: String,
    pub state: &'static str,
    pub attempts: u32,
    pub created_at: String,
    pub reason: String,
    pub http: String,
}

impl From<&Job> for JobLine {
    fn from(job: &Job) -> Self {
        Self {
            id: job.id.to_string(),
            tenant: job.tenant.clone(),
            client_id: job.client_id.clone(),
            state: job.state.as_str(),
            attempts: job.attempts,
            created_at: rfc3339(job.created_at),
            reason: job
                .failure_reason
                .map_or(String::new(), |r| r.as_str().to_string()),
            http: job
                .last_http_status
                .map_or(String::new(), |s| s.to_string()),
        }
    }
}

/// The search form's current values (what the listing was filtered by). Never the code.
#[derive(Debug, Clone, Default)]
pub struct FormView {
    pub client_id: String,
    pub tenant: String,
    pub state: String,
    pub failure_reason: String,
    pub created_after: String,
    pub created_before: String,
    pub fingerprint: String,
}

impl From<&Search> for FormView {
    fn from(search: &Search) -> Self {
        Self {
            client_id: search.client_id.clone().unwrap_or_default(),
            tenant: search.tenant.clone().unwrap_or_default(),
            state: search
                .state
                .map(JobState::as_str)
                .unwrap_or_default()
                .into(),
            failure_reason: search
                .failure_reason
                .map(|r| r.as_str())
                .unwrap_or_default()
                .into(),
            created_after: search.created_after.map(format_time).unwrap_or_default(),
            created_before: search.created_before.map(format_time).unwrap_or_default(),
            fingerprint: search.fingerprint.clone().unwrap_or_default(),
        }
    }
}

/// The choices of the form's `state` and `failure_reason` menus.
pub const STATES: [&str; 6] = [
    "queued",
    "running",
    "retry_wait",
    "succeeded",
    "failed",
    "cancelled",
];
pub const REASONS: [&str; 6] = [
    "invalid_request",
    "forbidden",
    "retries_exhausted",
    "expired",
    "outcome_unknown",
    "upstream_protocol",
];

/// The home page (no filters) and search results.
#[derive(Template)]
#[template(path = "console/jobs.html")]
pub struct JobsPage {
    pub status: StatusView,
    /// "Recent jobs" or "Search results".
    pub heading: &'static str,
    pub form: FormView,
    /// Whether the code field can be used (a fingerprint key was found).
    pub code_search: bool,
    pub chart: Chart,
    pub jobs: Vec<JobLine>,
    /// The first page of this listing, when this is a later one.
    pub newest_link: Option<String>,
    /// The next (older) page.
    pub older_link: Option<String>,
    pub csv_link: String,
    pub jsonl_link: String,
    pub states: &'static [&'static str],
    pub reasons: &'static [&'static str],
}

/// One field of a job.
#[derive(Debug, Clone)]
pub struct Field {
    pub name: &'static str,
    pub value: String,
}

/// One event of a job's timeline.
#[derive(Debug, Clone)]
pub struct EventLine {
    pub seq: i64,
    pub time: String,
    pub kind: String,
    pub attempt: String,
    pub http: String,
    pub detail: String,
}

impl From<&AuditRecord> for EventLine {
    fn from(record: &AuditRecord) -> Self {
        Self {
            seq: record.seq,
            time: rfc3339(record.at()),
            kind: record.kind.to_string(),
            attempt: record.attempt.map_or(String::new(), |a| a.to_string()),
            http: record.http_status.map_or(String::new(), |s| s.to_string()),
            detail: record.detail.clone().unwrap_or_default(),
        }
    }
}

/// A job and its timeline.
#[derive(Template)]
#[template(path = "console/job.html")]
pub struct JobPage {
    pub status: StatusView,
    pub id: String,
    pub state: &'static str,
    pub fields: Vec<Field>,
    pub events: Vec<EventLine>,
    /// Set when the timeline was cut at the page's limit.
    pub more_events: bool,
}

impl JobPage {
    /// Every field of `job` an auditor may see: never its token, code or verifier.
    pub fn fields(job: &Job) -> Vec<Field> {
        let optional = |value: Option<String>| value.unwrap_or_else(|| "–".to_string());
        vec![
            Field {
                name: "state",
                value: job.state.as_str().to_string(),
            },
            Field {
                name: "tenant",
                value: job.tenant.clone(),
            },
            Field {
                name: "client id",
                value: job.client_id.clone(),
            },
            Field {
                name: "attempts",
                value: job.attempts.to_string(),
            },
            Field {
                name: "created",
                value: rfc3339(job.created_at),
            },
            Field {
                name: "updated",
                value: rfc3339(job.updated_at),
            },
            Field {
                name: "expires",
                value: rfc3339(job.expires_at),
            },
            Field {
                name: "next attempt",
                value: optional(job.next_attempt_at.map(rfc3339)),
            },
            Field {
                name: "failure reason",
                value: optional(job.failure_reason.map(|r| r.as_str().to_string())),
            },
            Field {
                name: "last HTTP status",
                value: optional(job.last_http_status.map(|s| s.to_string())),
            },
            Field {
                name: "detail",
                value: optional(job.failure_detail.clone()),
            },
            Field {
                name: "outcome unknown",
                value: if job.outcome_unknown { "yes" } else { "no" }.to_string(),
            },
            Field {
                name: "code fingerprint",
                value: optional(job.code_fingerprint.clone()),
            },
            Field {
                name: "idempotency key",
                value: job.idempotency_key.clone(),
            },
            Field {
                name: "OAuth state",
                value: job.state_param.clone(),
            },
        ]
    }
}

/// An error page: 400 (naming the field), 401, 403, 404, 503.
#[derive(Template)]
#[template(path = "console/error.html")]
pub struct ErrorPage {
    pub status: StatusView,
    pub code: u16,
    pub title: &'static str,
    pub message: String,
}
