//! The store: the only module that runs SQL.
//!
//! One SQLite file in WAL mode. Writes go through a single connection (SQLite has one writer at
//! a time; a pool of writers only trades throughput for `SQLITE_BUSY`), each change in one
//! `BEGIN IMMEDIATE` transaction that also appends its audit events. Reads use a separate
//! read-only pool. No transaction is ever held across an upstream call: claiming commits before
//! the request is sent, and the outcome is written in a new transaction guarded by the claim's
//! lease owner and attempt number.
//!
//! Every committed change is published on the [`JobFeed`] after its commit.

use std::{str::FromStr, sync::Arc, time::Duration};

use sqlx::{
    Row, Sqlite, SqlitePool,
    sqlite::{
        SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
    },
};

use crate::{
    config::{StorageConfig, Synchronous},
    feed::JobFeed,
    job::{FailureReason, Job, JobId, JobState, Token, UnixMillis},
    metrics::Metrics,
    request::ExchangeRequest,
    secret::Secret,
    upstream::TokenGrant,
};

mod audit;
mod history;

pub use history::{EventQuery, JobQuery, Page, Pruned};

use audit::{AuditEvent, ChainHead};

use crate::audit::AuditKind;

/// Rows changed by one sweep statement at most, so one sweep never holds the writer for long.
const SWEEP_BATCH: i64 = 500;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("cannot prepare the database directory {path}: {source}")]
    Directory {
        path: String,
        source: std::io::Error,
    },
    #[error("stored job is unreadable: {0}")]
    Corrupt(String),
}

/// The durable job queue.
#[derive(Debug, Clone)]
pub struct Store {
    /// The single writing connection.
    writer: SqlitePool,
    /// Read-only connections for lookups.
    reader: SqlitePool,
    /// Told about every committed change.
    feed: Arc<JobFeed>,
    /// Commit latency, and the counters behind every audit event.
    metrics: Arc<Metrics>,
}

/// What a submission did.
#[derive(Debug)]
pub enum SubmitOutcome {
    /// A new job was committed.
    Created(Job),
    /// The idempotency key was used before with the same contents: the existing job.
    Existing(Job),
    /// The idempotency key was used before with different contents.
    KeyConflict,
    /// The queue holds `pending` jobs, at or above its bound.
    QueueFull { pending: u64 },
}

/// What a cancellation did.
#[derive(Debug)]
pub enum CancelOutcome {
    Cancelled(Job),
    NotFound,
    /// The job is running or already terminal; as it stands.
    NotCancellable(Job),
}

/// A job chosen for claiming.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub row_id: i64,
    pub client_id: String,
    /// When it fell due, so its attempt.started event can say how long it waited.
    pub due_at: UnixMillis,
}

/// What a submission stores.
#[derive(Debug, Clone, Copy)]
pub struct NewJob<'a> {
    pub tenant: &'a str,
    pub request: &'a ExchangeRequest,
    /// HMAC of the code, for auditors.
    pub code_fingerprint: &'a str,
    /// The job's time to live.
    pub ttl: Duration,
    /// The queue's bound.
    pub max_pending: u64,
}

/// The right to record the outcome of one attempt: only its holder's writes land.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    row_id: i64,
    pub owner: Arc<str>,
    pub attempt: u32,
}

/// A claimed job with what the attempt needs to present upstream.
#[derive(Debug)]
pub struct Claim {
    pub job: Job,
    pub lease: Lease,
    pub code: Secret<String>,
    pub code_verifier: Secret<String>,
}

/// The outcome of an attempt, as the worker decided it.
#[derive(Debug, Clone)]
pub enum AttemptRecord {
    Succeeded {
        grant: TokenGrant,
        http_status: u16,
        outcome_unknown: bool,
    },
    RetryAt {
        at: UnixMillis,
        http_status: Option<u16>,
        detail: String,
        /// This attempt's answer was never seen.
        answer_lost: bool,
        /// Some attempt of the job may have reached upstream unseen.
        outcome_unknown: bool,
    },
    Failed {
        reason: FailureReason,
        http_status: Option<u16>,
        detail: String,
        answer_lost: bool,
        outcome_unknown: bool,
    },
}

impl Store {
    /// Opens (creating if needed) the database, applies the migrations, and returns the store.
    pub async fn open(
        config: &StorageConfig,
        feed: Arc<JobFeed>,
        metrics: Arc<Metrics>,
    ) -> Result<Store, StoreError> {
        let path = &config.path;
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Directory {
                path: dir.display().to_string(),
                source,
            })?;
        }
        let synchronous = match config.synchronous {
            Synchronous::Normal => SqliteSynchronous::Normal,
            Synchronous::Full => SqliteSynchronous::Full,
            Synchronous::Extra => SqliteSynchronous::Extra,
        };
        let busy_timeout = Duration::from_millis(config.busy_timeout_ms);
        let base = SqliteConnectOptions::new()
            .filename(path)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(synchronous)
            .busy_timeout(busy_timeout)
            .foreign_keys(true);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .acquire_timeout(busy_timeout + Duration::from_secs(5))
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(base.clone().create_if_missing(true))
            .await?;
        sqlx::migrate!("./migrations").run(&writer).await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(busy_timeout + Duration::from_secs(5))
            .connect_with(base.read_only(true))
            .await?;
        Ok(Store {
            writer,
            reader,
            feed,
            metrics,
        })
    }

    /// Opens an existing database read-only, for auditors' tools: no migrations, no writes
    /// (every write method fails), safe beside a running daemon.
    pub async fn open_read_only(path: &std::path::Path) -> Result<Store, StoreError> {
        if !path.is_file() {
            return Err(StoreError::Database(sqlx::Error::Configuration(
                format!("{} does not exist", path.display()).into(),
            )));
        }
        let reader = SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(
                SqliteConnectOptions::new()
                    .filename(path)
                    .read_only(true)
                    .busy_timeout(Duration::from_secs(5)),
            )
            .await?;
        Ok(Store {
            writer: reader.clone(),
            reader,
            feed: JobFeed::new(),
            metrics: Metrics::new(),
        })
    }

    /// Closes every connection, checkpointing the WAL.
    pub async fn close(&self) {
        self.reader.close().await;
        self.writer.close().await;
    }

    /// Commits a new job, unless its idempotency key is taken or the queue is full.
    pub async fn submit(
        &self,
        job: &NewJob<'_>,
        now: UnixMillis,
    ) -> Result<SubmitOutcome, StoreError> {
        let NewJob {
            tenant,
            request,
            code_fingerprint,
            ttl,
            max_pending,
        } = *job;
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let existing = sqlx::query(include_str!("sql/find_by_key.sql"))
            .bind(tenant)
            .bind(&request.idempotency_key)
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(row) = existing {
            let digest: String = row.try_get("request_digest")?;
            return Ok(if digest == request.request_digest {
                SubmitOutcome::Existing(job_from_row(&row)?)
            } else {
                SubmitOutcome::KeyConflict
            });
        }
        let pending: i64 = sqlx::query_scalar(include_str!("sql/count_pending.sql"))
            .fetch_one(&mut *tx)
            .await?;
        let pending = u64::try_from(pending).unwrap_or(0);
        if pending >= max_pending {
            return Ok(SubmitOutcome::QueueFull { pending });
        }
        let row = sqlx::query(include_str!("sql/insert_job.sql"))
            .bind(JobId::new().to_string())
            .bind(tenant)
            .bind(&request.client_id)
            .bind(&request.idempotency_key)
            .bind(&request.request_digest)
            .bind(request.code.expose())
            .bind(request.code_verifier.expose())
            .bind(&request.state)
            .bind(now.0)
            .bind(now.saturating_add(ttl).0)
            .bind(code_fingerprint)
            .fetch_one(&mut *tx)
            .await?;
        let job = job_from_row(&row)?;
        let mut events = [AuditEvent::new(&job, AuditKind::JobSubmitted, now)];
        append(&mut tx, &mut events).await?;
        self.commit(tx).await?;
        events.iter().for_each(|event| event.emit(&self.metrics));
        self.feed.publish(&job);
        Ok(SubmitOutcome::Created(job))
    }

    /// Commits a write transaction, timing it.
    async fn commit(&self, tx: sqlx::Transaction<'static, Sqlite>) -> Result<(), sqlx::Error> {
        let started = std::time::Instant::now();
        let result = tx.commit().await;
        self.metrics
            .sqlite_commit
            .observe(started.elapsed().as_secs_f64());
        result
    }

    /// Jobs not yet terminal.
    pub async fn pending_count(&self) -> Result<u64, StoreError> {
        let pending: i64 = sqlx::query_scalar(include_str!("sql/count_pending.sql"))
            .fetch_one(&self.reader)
            .await?;
        Ok(u64::try_from(pending).unwrap_or(0))
    }

    /// When the oldest job waiting to be attempted was created.
    pub async fn oldest_pending(&self) -> Result<Option<UnixMillis>, StoreError> {
        let oldest: Option<i64> = sqlx::query_scalar(include_str!("sql/oldest_pending.sql"))
            .fetch_one(&self.reader)
            .await?;
        Ok(oldest.map(UnixMillis))
    }

    /// The job as it stands.
    pub async fn get(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        let row = sqlx::query(include_str!("sql/get_job.sql"))
            .bind(id.to_string())
            .fetch_optional(&self.reader)
            .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    /// Cancels a queued or waiting job.
    pub async fn cancel(&self, id: JobId, now: UnixMillis) -> Result<CancelOutcome, StoreError> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let row = sqlx::query(include_str!("sql/cancel_job.sql"))
            .bind(id.to_string())
            .bind(now.0)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            let current = sqlx::query(include_str!("sql/get_job.sql"))
                .bind(id.to_string())
                .fetch_optional(&mut *tx)
                .await?;
            tx.rollback().await?;
            return match current {
                Some(row) => Ok(CancelOutcome::NotCancellable(job_from_row(&row)?)),
                None => Ok(CancelOutcome::NotFound),
            };
        };
        let job = job_from_row(&row)?;
        let mut events =
            [AuditEvent::new(&job, AuditKind::JobCancelled, now).detail("cancelled by request")];
        append(&mut tx, &mut events).await?;
        self.commit(tx).await?;
        events.iter().for_each(|event| event.emit(&self.metrics));
        self.feed.publish(&job);
        Ok(CancelOutcome::Cancelled(job))
    }

    /// Up to `limit` due jobs in due order, leaving out the clients in `skip_clients`.
    pub async fn due_candidates(
        &self,
        now: UnixMillis,
        skip_clients: &[&str],
        limit: usize,
    ) -> Result<Vec<Candidate>, StoreError> {
        let skip = serde_json::to_string(skip_clients).expect("strings serialize");
        let rows = sqlx::query(include_str!("sql/due_candidates.sql"))
            .bind(now.0)
            .bind(skip)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.reader)
            .await?;
        rows.iter()
            .map(|row| {
                Ok(Candidate {
                    row_id: row.try_get("id")?,
                    client_id: row.try_get("client_id")?,
                    due_at: UnixMillis(row.try_get("next_attempt_at")?),
                })
            })
            .collect()
    }

    /// When the earliest queued or waiting job is due, if any.
    pub async fn next_due(&self) -> Result<Option<UnixMillis>, StoreError> {
        let next: Option<i64> = sqlx::query_scalar(include_str!("sql/next_due.sql"))
            .fetch_one(&self.reader)
            .await?;
        Ok(next.map(UnixMillis))
    }

    /// Claims the given jobs for `owner` until `lease_until`, in one statement. Jobs that are no
    /// longer claimable (cancelled, claimed, expired meanwhile) are skipped.
    pub async fn claim(
        &self,
        candidates: &[Candidate],
        owner: &Arc<str>,
        lease_until: UnixMillis,
        now: UnixMillis,
    ) -> Result<Vec<Claim>, StoreError> {
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        let row_ids: Vec<i64> = candidates.iter().map(|c| c.row_id).collect();
        let ids = serde_json::to_string(&row_ids).expect("integers serialize");
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let rows = sqlx::query(include_str!("sql/claim.sql"))
            .bind(ids)
            .bind(owner.as_ref())
            .bind(lease_until.0)
            .bind(now.0)
            .fetch_all(&mut *tx)
            .await?;
        let mut claims = Vec::with_capacity(rows.len());
        for row in &rows {
            let job = job_from_row(row)?;
            let code: Option<String> = row.try_get("code")?;
            let code_verifier: Option<String> = row.try_get("code_verifier")?;
            let (Some(code), Some(code_verifier)) = (code, code_verifier) else {
                return Err(StoreError::Corrupt(format!(
                    "job {} is claimable but its code or verifier is gone",
                    job.id
                )));
            };
            claims.push(Claim {
                lease: Lease {
                    row_id: row.try_get("id")?,
                    owner: Arc::clone(owner),
                    attempt: job.attempts,
                },
                job,
                code: Secret::new(code),
                code_verifier: Secret::new(code_verifier),
            });
        }
        let mut events: Vec<_> = claims
            .iter()
            .map(|claim| {
                let waited = candidates
                    .iter()
                    .find(|c| c.row_id == claim.lease.row_id)
                    .map_or(0, |c| now.0 - c.due_at.0);
                AuditEvent::new(&claim.job, AuditKind::AttemptStarted, now)
                    .attempt(claim.lease.attempt)
                    .detail(format!(
                        "waited {waited} ms after falling due (worker and rate-limit permits)"
                    ))
            })
            .collect();
        append(&mut tx, &mut events).await?;
        self.commit(tx).await?;
        events.iter().for_each(|event| event.emit(&self.metrics));
        for claim in &claims {
            self.feed.publish(&claim.job);
        }
        Ok(claims)
    }

    /// Records an attempt's outcome, if `lease` still holds the job. Returns the job as
    /// committed, or `None` when the lease was lost (the job was rescued and claimed again):
    /// then nothing is written.
    pub async fn record_attempt(
        &self,
        lease: &Lease,
        record: &AttemptRecord,
        now: UnixMillis,
    ) -> Result<Option<Job>, StoreError> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let guarded = |sql| {
            sqlx::query(sql)
                .bind(lease.row_id)
                .bind(lease.owner.as_ref())
                .bind(lease.attempt)
        };
        let row = match record {
            AttemptRecord::Succeeded {
                grant,
                http_status,
                outcome_unknown,
            } => {
                guarded(include_str!("sql/finish_succeeded.sql"))
                    .bind(grant.access_token.expose())
                    .bind(&grant.token_type)
                    .bind(grant.expires_in)
                    .bind(
                        now.saturating_add(Duration::from_secs(
                            u64::try_from(grant.expires_in).unwrap_or(0),
                        ))
                        .0,
                    )
                    .bind(http_status)
                    .bind(outcome_unknown)
                    .bind(now.0)
                    .fetch_optional(&mut *tx)
                    .await?
            }
            AttemptRecord::RetryAt {
                at,
                http_status,
                detail,
                outcome_unknown,
                ..
            } => {
                guarded(include_str!("sql/finish_retry.sql"))
                    .bind(at.0)
                    .bind(http_status)
                    .bind(detail)
                    .bind(outcome_unknown)
                    .bind(now.0)
                    .fetch_optional(&mut *tx)
                    .await?
            }
            AttemptRecord::Failed {
                reason,
                http_status,
                detail,
                outcome_unknown,
                ..
            } => {
                guarded(include_str!("sql/finish_failed.sql"))
                    .bind(reason.as_str())
                    .bind(http_status)
                    .bind(detail)
                    .bind(outcome_unknown)
                    .bind(now.0)
                    .fetch_optional(&mut *tx)
                    .await?
            }
        };
        let Some(row) = row else {
            tx.rollback().await?;
            return Ok(None);
        };
        let job = job_from_row(&row)?;
        let mut events = audit::attempt_events(&job, lease.attempt, record, now);
        append(&mut tx, &mut events).await?;
        self.commit(tx).await?;
        events.iter().for_each(|event| event.emit(&self.metrics));
        self.feed.publish(&job);
        Ok(Some(job))
    }

    /// Fails queued and waiting jobs whose time to live has passed. Returns them.
    pub async fn expire_overdue(&self, now: UnixMillis) -> Result<Vec<Job>, StoreError> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let rows = sqlx::query(include_str!("sql/expire_overdue.sql"))
            .bind(now.0)
            .bind(SWEEP_BATCH)
            .fetch_all(&mut *tx)
            .await?;
        self.commit_sweep(tx, &rows, AuditKind::JobExpired, now)
            .await
    }

    /// Returns to the queue (or fails, when no attempt is left) every running job whose lease
    /// ended before `lease_cutoff`: its worker died mid-attempt, so the outcome is unknown.
    pub async fn rescue_leases(
        &self,
        lease_cutoff: UnixMillis,
        max_attempts: u32,
        now: UnixMillis,
    ) -> Result<Vec<Job>, StoreError> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let rows = sqlx::query(include_str!("sql/rescue_leases.sql"))
            .bind(now.0)
            .bind(lease_cutoff.0)
            .bind(max_attempts)
            .bind(SWEEP_BATCH)
            .fetch_all(&mut *tx)
            .await?;
        self.commit_sweep(tx, &rows, AuditKind::AttemptUnknown, now)
            .await
    }

    async fn commit_sweep(
        &self,
        mut tx: sqlx::Transaction<'static, Sqlite>,
        rows: &[SqliteRow],
        kind: AuditKind,
        now: UnixMillis,
    ) -> Result<Vec<Job>, StoreError> {
        let jobs = rows
            .iter()
            .map(job_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let mut events: Vec<_> = jobs
            .iter()
            .flat_map(|job| audit::sweep_events(job, kind, now))
            .collect();
        append(&mut tx, &mut events).await?;
        self.commit(tx).await?;
        events.iter().for_each(|event| event.emit(&self.metrics));
        for job in &jobs {
            self.feed.publish(job);
        }
        Ok(jobs)
    }
}

/// Reads a job row. Unknown enum values are reported, not guessed.
fn job_from_row(row: &SqliteRow) -> Result<Job, StoreError> {
    let corrupt = |error: crate::job::UnknownValue| StoreError::Corrupt(error.to_string());
    let job_id: String = row.try_get("job_id")?;
    let state: String = row.try_get("state")?;
    let failure_reason: Option<String> = row.try_get("failure_reason")?;
    let access_token: Option<String> = row.try_get("access_token")?;
    let token = match access_token {
        Some(access_token) => Some(Token {
            access_token: Secret::new(access_token),
            token_type: row
                .try_get::<Option<String>, _>("token_type")?
                .unwrap_or_default(),
            expires_in: row
                .try_get::<Option<i64>, _>("token_expires_in")?
                .unwrap_or_default(),
            expires_at: UnixMillis(
                row.try_get::<Option<i64>, _>("token_expires_at")?
                    .unwrap_or_default(),
            ),
        }),
        None => None,
    };
    Ok(Job {
        id: JobId::from_str(&job_id)
            .map_err(|_| StoreError::Corrupt(format!("job id {job_id:?} is not a UUID")))?,
        tenant: row.try_get("tenant")?,
        client_id: row.try_get("client_id")?,
        state: JobState::from_str(&state).map_err(corrupt)?,
        attempts: row.try_get("attempts")?,
        created_at: UnixMillis(row.try_get("created_at")?),
        updated_at: UnixMillis(row.try_get("updated_at")?),
        next_attempt_at: row
            .try_get::<Option<i64>, _>("next_attempt_at")?
            .map(UnixMillis),
        expires_at: UnixMillis(row.try_get("expires_at")?),
        token,
        failure_reason: failure_reason
            .as_deref()
            .map(FailureReason::from_str)
            .transpose()
            .map_err(corrupt)?,
        last_http_status: row
            .try_get::<Option<i64>, _>("last_http_status")?
            .and_then(|status| u16::try_from(status).ok()),
        failure_detail: row.try_get("failure_detail")?,
        state_param: row.try_get("state_param")?,
        idempotency_key: row.try_get("idempotency_key")?,
        outcome_unknown: row.try_get("outcome_unknown")?,
        version: row.try_get("version")?,
        code_fingerprint: row.try_get("code_fingerprint")?,
    })
}

/// Appends `events` to the audit chain inside `tx`.
async fn append(
    tx: &mut sqlx::Transaction<'static, Sqlite>,
    events: &mut [AuditEvent<'_>],
) -> sqlx::Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let mut head = ChainHead::read(tx).await?;
    for event in events {
        event.insert(tx, &mut head).await?;
    }
    Ok(())
}
