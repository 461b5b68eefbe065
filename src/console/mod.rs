//! `token-broker console`: the auditors' web console, read-only, served as HTML.
//!
//! Pages: the most recent jobs (`/`), a search (`POST /search` turns the form into a URL,
//! fingerprinting a pasted code first; `/jobs?…` lists the results newest first, in keyset
//! pages), a job with its timeline of audit events (`/jobs/{id}`), exports of a search
//! (`/export.csv`, `/export.jsonl`), and a status bar with the chain's state on every page.
//!
//! - [`access`]: who may use it (HTTP Basic with an audit tenant's API key; loopback only
//!   without one).
//! - [`search`]: the filters, parsed once into a checked [`search::Search`].
//! - [`chain`]: the background verification the status bar reads.
//! - [`chart`]: outcomes over time as an inline SVG.
//! - [`pages`]: view models and their templates (`templates/console/`).
//! - [`export`]: CSV and JSON Lines, streamed page by page.
//!
//! It opens the database like `jobs` and `audit` do (read-only; a read-only store holds no
//! keys, so it cannot even decrypt a token), serves through the same bounded accept loop and
//! hyper loop as the ops endpoints, and sends no script: the pages work without JavaScript,
//! and the Content-Security-Policy allows none. A pasted code is fingerprinted and dropped; it
//! is never stored, logged, put in a page or in a URL.

pub mod access;
pub mod chain;
pub mod chart;
pub mod export;
pub mod pages;
pub mod search;

use std::{convert::Infallible, future::Future, io, sync::Arc, time::Duration};

use anyhow::Context;
use askama::Template;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited, StreamBody, combinators::BoxBody};
use hyper::{
    Method, Request, Response, StatusCode,
    body::Incoming,
    header::{self, HeaderValue},
    service::service_fn,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use self::{
    access::{Access, Refusal},
    chain::{ChainWatch, FULL_RECHECK, RECHECK},
    chart::{Chart, Span},
    pages::{CheckpointView, ErrorPage, EventLine, JobLine, JobPage, JobsPage, StatusView},
    search::{BadFilter, Listing, Search},
};
use crate::{
    audit::fingerprint::Fingerprinter,
    cli::ConsoleArgs,
    config::Config,
    domain::{
        request::parse_job_id,
        secret::{ExposeSecret, SecretString},
    },
    ops::metrics::Metrics,
    server::connections::{self, ConnectionLimits},
    store::{EventQuery, Store, StoreError},
    tools::inspect::{self, Format},
};

/// Jobs per listing page.
const PAGE_SIZE: u32 = 50;
/// Events shown on a job's page (a job has a few dozen at most).
const TIMELINE_LIMIT: u32 = 500;
/// The largest search form accepted.
const MAX_FORM_BYTES: usize = 16 * 1024;
/// How long a request's headers may take.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Browser connections at once.
const MAX_CONNECTIONS: usize = 64;

/// The stylesheet, served as `/static/console.css` (the CSP allows styles from the console
/// itself only).
const STYLESHEET: &str = include_str!("console.css");

/// Every response's body.
type Body = BoxBody<Bytes, io::Error>;

/// Binds `args.listen` and serves until `shutdown`: `main`'s entry point.
pub async fn run(args: ConsoleArgs, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    serve(args, listener, shutdown).await
}

/// Serves the console on `listener` until `shutdown` (`args.listen` is not used): the entry
/// point of `run` and of the tests. Refuses to start off loopback unless auditors must sign
/// in; checks that before it opens the database.
pub async fn serve(
    args: ConsoleArgs,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let address = listener.local_addr()?;
    let config =
        Config::load(args.database.config.as_deref()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let access = Access::for_address(address, &config.tenants)?;
    let store = inspect::open(&args.database).await?;
    let key_path = inspect::fingerprint_key_path(&args.database, args.key_file.clone())?;
    let fingerprinter = match Fingerprinter::load(&key_path) {
        Ok(fingerprinter) => Some(fingerprinter),
        Err(error) => {
            tracing::warn!(%error, "console: code search is off (no fingerprint key)");
            None
        }
    };
    let stop = CancellationToken::new();
    let chain = ChainWatch::new();
    let checking = tokio::spawn(chain.clone().run(
        store.clone(),
        RECHECK,
        FULL_RECHECK,
        stop.clone(),
    ));
    let console = Arc::new(Console {
        store: store.clone(),
        access,
        fingerprinter,
        chain,
    });
    let (accepted, accepting) = connections::accept(
        listener,
        ConnectionLimits {
            listener: "console",
            max_connections: MAX_CONNECTIONS,
            handshake_timeout: HEADER_READ_TIMEOUT,
            idle_timeout: Duration::from_secs(120),
        },
        Metrics::new(),
        stop.clone(),
    );
    let accepting = tokio::spawn(accepting);
    let service = service_fn(move |request| {
        let console = Arc::clone(&console);
        async move { Ok::<_, Infallible>(console.answer(request).await) }
    });
    tracing::info!(listen = %address, "console serving");
    tokio::select! {
        _ = shutdown => {}
        _ = connections::serve_http1(accepted, service, HEADER_READ_TIMEOUT, stop.clone()) => {}
    }
    stop.cancel();
    let _ = tokio::join!(checking, accepting);
    store.close().await;
    Ok(())
}

/// The last signed checkpoint for the status bar (not verified here: that takes the public
/// key, `audit verify --public-key`). A database that cannot be read shows none; the pages
/// themselves then report the failure.
async fn last_signed_checkpoint(store: &Store) -> Option<CheckpointView> {
    match store.last_checkpoint().await {
        Ok(checkpoint) => checkpoint.map(|checkpoint| CheckpointView {
            seq: checkpoint.seq,
            signed_at: crate::audit::checkpoint::signed_at(&checkpoint),
            key_id: checkpoint.key_id,
        }),
        Err(error) => {
            tracing::warn!(%error, "cannot read the last signed checkpoint");
            None
        }
    }
}

/// What the request handlers share.
struct Console {
    store: Store,
    access: Access,
    /// `None` when no fingerprint key was found: code search is off.
    fingerprinter: Option<Fingerprinter>,
    chain: ChainWatch,
}

/// Why a page cannot be shown; each becomes an error page with its status.
#[derive(Debug)]
enum PageError {
    BadFilter(BadFilter),
    Refused(Refusal),
    NotFound(String),
    MethodNotAllowed,
    FormTooLarge,
    /// The database did not answer; the cause is logged, not shown.
    Unavailable(StoreError),
}

impl From<BadFilter> for PageError {
    fn from(error: BadFilter) -> Self {
        PageError::BadFilter(error)
    }
}

impl From<StoreError> for PageError {
    fn from(error: StoreError) -> Self {
        PageError::Unavailable(error)
    }
}

impl Console {
    async fn answer(&self, request: Request<Incoming>) -> Response<Body> {
        let response = match self.route(request).await {
            Ok(response) => response,
            Err(error) => self.error_page(error).await,
        };
        harden(response)
    }

    async fn route(&self, request: Request<Incoming>) -> Result<Response<Body>, PageError> {
        self.access
            .check(
                request.method(),
                request.uri().authority().map(|a| a.as_str()),
                request.headers(),
            )
            .map_err(PageError::Refused)?;
        let path = request.uri().path().to_string();
        let query = request.uri().query().unwrap_or_default().to_string();
        let method = request.method().clone();
        match (&method, path.as_str()) {
            (&Method::GET, "/" | "/jobs") => self.jobs_page(&query).await,
            (&Method::POST, "/search") => self.search(request).await,
            (&Method::GET, "/export.csv") => self.export(&query, Format::Csv).await,
            (&Method::GET, "/export.jsonl") => self.export(&query, Format::Jsonl).await,
            (&Method::GET, "/static/console.css") => Ok(body(
                StatusCode::OK,
                "text/css; charset=utf-8",
                STYLESHEET.to_string(),
            )),
            (&Method::GET, _) if path.starts_with("/jobs/") => {
                self.job_page(&path["/jobs/".len()..]).await
            }
            (_, "/" | "/jobs" | "/search" | "/export.csv" | "/export.jsonl") => {
                Err(PageError::MethodNotAllowed)
            }
            _ => Err(PageError::NotFound("There is no such page.".into())),
        }
    }

    async fn status(&self) -> StatusView {
        StatusView::new(&self.chain.get(), last_signed_checkpoint(&self.store).await)
    }

    /// The home page (no filters) or a search's results, newest first.
    async fn jobs_page(&self, query: &str) -> Result<Response<Body>, PageError> {
        let listing = parse_query(query)?;
        let search = &listing.search;
        let page = self
            .store
            .list_jobs(&search.job_query(listing.after, PAGE_SIZE, true))
            .await?;
        let span = Span::of(search.created_after, search.created_before);
        let mut drawn = search.job_query(None, 1, false);
        drawn.created_after = Some(span.from);
        drawn.created_before = Some(span.to);
        let counts = self.store.outcome_counts(&drawn, span.bucket_ms).await?;
        let view = JobsPage {
            status: self.status().await,
            heading: if search.is_empty() {
                "Recent jobs"
            } else {
                "Search results"
            },
            form: search.into(),
            code_search: self.fingerprinter.is_some(),
            chart: Chart::draw(span, &counts),
            jobs: page
                .items
                .iter()
                .map(|(_, job)| JobLine::from(job))
                .collect(),
            newest_link: listing.after.map(|_| search.link("/jobs", None)),
            older_link: page
                .next
                .map(|next| search.link("/jobs", Some(("after", next.to_string())))),
            csv_link: search.link("/export.csv", None),
            jsonl_link: search.link("/export.jsonl", None),
            states: &pages::STATES,
            reasons: &pages::REASONS,
        };
        Ok(html(StatusCode::OK, view.render()))
    }

    /// The search form: fingerprints a pasted code, then redirects to the results, whose URL
    /// carries only the filters (and the fingerprint, never the code).
    async fn search(&self, request: Request<Incoming>) -> Result<Response<Body>, PageError> {
        let form = Limited::new(request.into_body(), MAX_FORM_BYTES)
            .collect()
            .await
            .map_err(|_| PageError::FormTooLarge)?
            .to_bytes();
        let mut pairs: Vec<(String, String)> =
            serde_urlencoded::from_bytes(&form).map_err(|_| BadFilter {
                field: "form",
                problem: "not a form submission".into(),
            })?;
        // The code leaves the pairs before anything else reads them.
        let mut code = None;
        pairs.retain_mut(|(name, value)| {
            if name != "code" {
                return true;
            }
            if !value.trim().is_empty() {
                code = Some(SecretString::from(std::mem::take(value)));
            }
            false
        });
        let mut listing = Listing::parse(pairs.iter().map(|(n, v)| (n.as_str(), v.as_str())))?;
        if let Some(code) = code {
            let fingerprinter = self.fingerprinter.as_ref().ok_or(BadFilter {
                field: "code",
                problem: "code search is off: the console found no fingerprint key when it \
                          started (give --key-file, or search by fingerprint)"
                    .into(),
            })?;
            listing.search.fingerprint =
                Some(fingerprinter.fingerprint(code.expose_secret().trim()));
        }
        let location = if listing.search.is_empty() {
            "/".to_string()
        } else {
            listing.search.link("/jobs", None)
        };
        let mut response = body(
            StatusCode::SEE_OTHER,
            "text/plain; charset=utf-8",
            String::new(),
        );
        response.headers_mut().insert(
            header::LOCATION,
            HeaderValue::from_str(&location).expect("an encoded query string is a header value"),
        );
        Ok(response)
    }

    /// A job's fields (never its token, code or verifier) and its timeline.
    async fn job_page(&self, id: &str) -> Result<Response<Body>, PageError> {
        let job_id = parse_job_id(id).map_err(|_| BadFilter {
            field: "job id",
            problem: "not a job id (a UUID)".into(),
        })?;
        let job = self
            .store
            .get(job_id)
            .await?
            .ok_or_else(|| PageError::NotFound(format!("There is no job {job_id}.")))?;
        let events = self
            .store
            .list_events(&EventQuery {
                job_id: Some(job_id.to_string()),
                limit: TIMELINE_LIMIT,
                ..EventQuery::default()
            })
            .await?;
        let view = JobPage {
            status: self.status().await,
            id: job.id.to_string(),
            state: job.state.as_str(),
            fields: JobPage::fields(&job),
            events: events.items.iter().map(EventLine::from).collect(),
            more_events: events.next.is_some(),
        };
        Ok(html(StatusCode::OK, view.render()))
    }

    /// A search's every job as a download.
    async fn export(&self, query: &str, format: Format) -> Result<Response<Body>, PageError> {
        let search: Search = parse_query(query)?.search;
        let first = export::first_page(&self.store, &search).await?;
        let (chunks, received) = tokio::sync::mpsc::channel(4);
        tokio::spawn(export::send_rows(
            self.store.clone(),
            search,
            format,
            first,
            chunks,
        ));
        let (content_type, extension) = match format {
            Format::Csv => ("text/csv; charset=utf-8", "csv"),
            _ => ("application/jsonl; charset=utf-8", "jsonl"),
        };
        let stamp =
            search::format_time(crate::domain::job::UnixMillis::now()).replace([':', '-'], "");
        let mut response = Response::new(
            StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(received)).boxed(),
        );
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        headers.insert(
            header::CONTENT_DISPOSITION,
            HeaderValue::from_str(&format!(
                "attachment; filename=\"token-broker-jobs-{stamp}.{extension}\""
            ))
            .expect("a plain file name is a header value"),
        );
        Ok(response)
    }

    async fn error_page(&self, error: PageError) -> Response<Body> {
        let (status, title, message) = match &error {
            PageError::BadFilter(bad) => (StatusCode::BAD_REQUEST, "Bad request", bad.to_string()),
            PageError::Refused(Refusal::Unauthenticated) => (
                StatusCode::UNAUTHORIZED,
                "Sign in",
                "Sign in with an API key of a tenant with the audit role as the password (any \
                 user name)."
                    .to_string(),
            ),
            PageError::Refused(Refusal::NotAnAuditor(why)) => {
                (StatusCode::FORBIDDEN, "Forbidden", format!("{why}."))
            }
            PageError::Refused(Refusal::WrongHost(hosts)) => (
                StatusCode::MISDIRECTED_REQUEST,
                "Wrong address",
                format!(
                    "Without sign-in, this console answers only when it is reached as http://{}/ \
                     (the loopback address and port it listens on). A page that reaches it \
                     under another name may be a DNS-rebinding attack from a web site, so it is \
                     refused. Open the console at one of those addresses; through an SSH \
                     tunnel, forward the same port number.",
                    hosts.join("/, http://")
                ),
            ),
            PageError::Refused(Refusal::CrossSite) => (
                StatusCode::FORBIDDEN,
                "Cross-site request refused",
                "This form was sent from another site than the console, so it is refused. \
                 Search from the console's own page."
                    .to_string(),
            ),
            PageError::NotFound(what) => (StatusCode::NOT_FOUND, "Not found", what.clone()),
            PageError::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "Method not allowed",
                "This page does not take that method.".to_string(),
            ),
            PageError::FormTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "Form too large",
                format!("A search form is at most {MAX_FORM_BYTES} bytes."),
            ),
            PageError::Unavailable(cause) => {
                tracing::warn!(error = %cause, "console: the database does not answer");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Database unavailable",
                    "The database does not answer. Try again in a moment; if it persists, \
                     check that the database is there and reachable."
                        .to_string(),
                )
            }
        };
        // A refused caller learns nothing about the chain.
        let status_view = match &error {
            PageError::Refused(_) => StatusView::new(
                &chain::ChainStatus {
                    state: chain::ChainState::Checking,
                    checked_at: None,
                    events_checked: 0,
                },
                None,
            ),
            _ => self.status().await,
        };
        let view = ErrorPage {
            status: status_view,
            code: status.as_u16(),
            title,
            message,
        };
        let mut response = html(status, view.render());
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"token-broker console\", charset=\"UTF-8\""),
            );
        }
        response
    }
}

fn parse_query(query: &str) -> Result<Listing, BadFilter> {
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(query).map_err(|_| BadFilter {
            field: "query",
            problem: "not a well-formed query string".into(),
        })?;
    Listing::parse(pairs.iter().map(|(n, v)| (n.as_str(), v.as_str())))
}

fn body(status: StatusCode, content_type: &'static str, text: String) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(text))
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn html(status: StatusCode, rendered: askama::Result<String>) -> Response<Body> {
    match rendered {
        Ok(page) => body(status, "text/html; charset=utf-8", page),
        Err(error) => {
            tracing::error!(%error, "console: cannot render a page");
            body(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain; charset=utf-8",
                "cannot render the page\n".to_string(),
            )
        }
    }
}

/// The headers every answer carries: no script at all, styles and images from the console
/// only, forms posted only to it, never framed, never cached, never sniffed, no referrer to
/// other sites (the console's own requests carry one, so its form names its origin: see
/// [`access`]).
fn harden(mut response: Response<Body>) -> Response<Body> {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; \
             frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
