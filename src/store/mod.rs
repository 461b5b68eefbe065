//! The store: the only module that runs SQL.
//!
//! Two databases behind one interface ([`backend`]): a SQLite file in WAL mode (embedded, one
//! daemon per file), or PostgreSQL shared by several replicas. Every change goes to the writer
//! task ([`writer`]), which owns this process's writing connection and commits changes in
//! groups: one transaction and one fsync for every change waiting, each change with its audit
//! events. On PostgreSQL each writing transaction first locks the audit chain's row, so the
//! writers of all replicas take turns and the chain grows in commit order. Reads use a separate
//! pool. No transaction is ever held across an upstream call: claiming commits before the
//! request is sent, and the outcome is written in a later transaction guarded by the claim's
//! lease owner and attempt number.
//!
//! Every committed change is published on the [`JobFeed`] after its commit, never before; on
//! PostgreSQL also to the other replicas ([`listener`]).

use std::{str::FromStr, sync::Arc, time::Duration};

use sqlx::{
    ConnectOptions,
    postgres::{PgConnectOptions, PgPoolOptions},
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};

use crate::{
    config::{StorageConfig, Synchronous},
    domain::job::{FailureReason, Job, JobId, JobState, Token, TokenGrant, UnixMillis},
    domain::request::ExchangeRequest,
    domain::secret::SecretString,
    ops::metrics::Metrics,
    security::crypto::KeyRing,
    store::feed::JobFeed,
};

mod audit;
mod backend;
mod budget;
mod checkpoints;
mod deliveries;
mod direct;
pub mod feed;
mod history;
mod listener;
mod wal;
mod writer;

use backend::{Columns, Db, Pool, on_backend};
pub use budget::{BudgetGrant, BudgetRequest, Reservation};
pub use checkpoints::Signed;
pub use history::{EventQuery, JobQuery, OutcomeCount, Page, Pruned};

pub use deliveries::Deliveries;
pub use writer::WriterTask;
use writer::{Command, Responder, WriterHandle};

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
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Keys(String),
}

/// The fixed text the key canaries are made of ([`Store::agree_on_keys`]).
pub const KEY_CANARY: &str = "token-broker key canary";

/// At most this many batches of tokens erased per sweep ([`Store::erase_tokens`]): with a
/// batch of 500 of each kind, 10,000 deliveries a second, beyond which the backlog waits for
/// the next sweeps.
const ERASE_ROUNDS: usize = 20;

/// Creates the database's directory (mode 0700, when it does not exist) and the database file
/// itself (mode 0600), before SQLite opens it: SQLite gives its WAL and shared-memory files
/// the database file's mode, so none of them is readable by other users. An existing file
/// readable by others is tightened to 0600, with its WAL and shared-memory files.
fn prepare_private_file(path: &std::path::Path) -> Result<(), StoreError> {
    let failed = |at: &std::path::Path| {
        let at = at.display().to_string();
        move |source| StoreError::Directory { path: at, source }
    };
    crate::security::private_files::create_parent_dir(path)
        .map_err(failed(path.parent().unwrap_or(path)))?;
    crate::security::private_files::write_options()
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(failed(path))?;
    #[cfg(unix)]
    for file in [
        path.to_path_buf(),
        crate::config::beside(path, "-wal"),
        crate::config::beside(path, "-shm"),
    ] {
        use std::os::unix::fs::PermissionsExt;
        let Ok(metadata) = std::fs::metadata(&file) else {
            continue;
        };
        if metadata.permissions().mode() & 0o077 != 0 {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))
                .map_err(failed(&file))?;
            tracing::warn!(file = %file.display(), "was readable by other users; now mode 0600");
        }
    }
    Ok(())
}

impl StoreError {
    /// Whether the failure is the database's condition rather than a bug: unreachable, busy or
    /// locked, full, or an I/O error. A caller may retry such a failure later; any other
    /// (a constraint violated, a row that does not decode, a key that does not open, a failed
    /// migration) will fail again the same way.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Unavailable(_) | StoreError::Directory { .. } => true,
            StoreError::Database(error) => database_error_is_transient(error),
            StoreError::Migrate(_) | StoreError::Corrupt(_) | StoreError::Keys(_) => false,
        }
    }
}

/// SQLite result codes (the primary code, the low byte of an extended one) that mean a bug
/// rather than the database's condition: CORRUPT, CONSTRAINT, MISMATCH, MISUSE, RANGE,
/// NOTADB. Every other database error (BUSY, LOCKED, FULL, IOERR, CANTOPEN, and the generic
/// errors SQLite returns after it rolled a transaction back on its own when the disk filled)
/// is the database's condition.
const BUG_SQLITE_CODES: &[i64] = &[11, 19, 20, 21, 25, 26];

/// PostgreSQL error classes (the first two characters of the SQLSTATE) that are the database's
/// condition: connection exceptions, transaction rollbacks (serialization, deadlock),
/// insufficient resources, operator intervention (shutdown, a cancelled or timed-out
/// statement), system errors. Every other class (data, integrity, syntax) is a bug.
const TRANSIENT_POSTGRES_CLASSES: &[&str] = &["08", "40", "53", "55", "57", "58"];

fn database_error_is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(database) => {
            if let Some(postgres) = database.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
                let class = postgres.code().get(..2).unwrap_or_default();
                return TRANSIENT_POSTGRES_CLASSES.contains(&class);
            }
            !database
                .code()
                .and_then(|code| code.parse::<i64>().ok())
                .is_some_and(|code| BUG_SQLITE_CODES.contains(&(code & 0xff)))
        }
        // Decoding, a missing row or column, configuration, protocol: a bug.
        _ => false,
    }
}

/// The durable job queue.
#[derive(Debug, Clone)]
pub struct Store {
    /// The writer task; `None` for a read-only store.
    writer: Option<WriterHandle>,
    /// Connections for lookups (read-only on SQLite; on PostgreSQL also the rate budget's).
    pool: Pool,
    /// Opens sealed tokens; `None` for auditors' read-only stores, which never show tokens.
    keys: Option<Arc<KeyRing>>,
}

/// What a submission did.
#[derive(Debug)]
pub enum SubmitOutcome {
    /// A new job was committed, waiting for the dispatcher.
    Created(Job),
    /// A new job was committed already running its first attempt, under the lease the
    /// submission brought ([`NewJob::start`]); the writer handed its claim to the
    /// submission's [`OnStarted`] right after the commit.
    Started(Job),
    /// The idempotency key was used before with the same contents: the existing job.
    Existing(Job),
    /// The idempotency key was used before with different contents.
    KeyConflict,
    /// A bound on pending jobs refused the submission.
    QueueFull(QueueFull),
}

/// Which bound on pending jobs refused a submission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueFull {
    /// The tenant's own bound (`tenants[].max_pending`): `pending` of `limit`.
    Tenant { pending: u64, limit: u64 },
    /// The daemon's bound (`queue.max_pending`). How full the queue is says something about
    /// other tenants, so it is not reported.
    Daemon,
    /// The bound on distinct client ids with pending jobs (`queue.max_pending_clients`): a job
    /// for a client id that has none pending would exceed it.
    Clients,
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
    /// When it expires: across clients, the job closest to its TTL goes first.
    pub expires_at: UnixMillis,
}

/// What a submission stores.
#[derive(Debug, Clone, Copy)]
pub struct NewJob<'a> {
    /// The id to give the job (the caller may subscribe to its changes before the commit).
    pub job_id: JobId,
    pub tenant: &'a str,
    pub request: &'a ExchangeRequest,
    /// HMAC of the code, for auditors.
    pub code_fingerprint: &'a str,
    /// The job's time to live.
    pub ttl: Duration,
    /// The queue's bound.
    pub max_pending: u64,
    /// The tenant's own bound, if it has one.
    pub max_pending_tenant: Option<u64>,
    /// The bound on distinct client ids with pending jobs.
    pub max_pending_clients: u64,
    /// Start the first attempt in the submission's transaction, under this lease (the worker
    /// reserved a slot and a rate permit for it). Ignored when the job is not inserted, or
    /// when a job waits as it is inserted: it is queued instead.
    pub start: Option<&'a StartLease>,
}

/// What runs in the writer right after the commit that made a change durable, before its
/// caller hears of it or it is published: for what must be released exactly then.
#[derive(Clone)]
pub struct OnCommit(Arc<dyn Fn() + Send + Sync>);

impl OnCommit {
    pub fn new(run: impl Fn() + Send + Sync + 'static) -> Self {
        Self(Arc::new(run))
    }

    fn run(&self) {
        (self.0)()
    }
}

impl std::fmt::Debug for OnCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnCommit")
    }
}

/// What runs in the writer right after the commit of a submission that started its job (with
/// the job's claim), before the submitter hears of it: so the attempt starts even if the
/// submitter has gone (a cancelled call, a closed connection). Dropped unused otherwise.
pub struct OnStarted(Box<dyn FnOnce(Claim) + Send + Sync>);

impl OnStarted {
    pub fn new(run: impl FnOnce(Claim) + Send + Sync + 'static) -> Self {
        Self(Box::new(run))
    }

    fn run(self, claim: Claim) {
        (self.0)(claim)
    }
}

impl std::fmt::Debug for OnStarted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnStarted")
    }
}

/// The lease a job starts its first attempt under when its submission starts it: `owner`'s,
/// for `duration` from when the writer inserts it (not from when it was asked for: a writer
/// that stalled, or waited for its turn, would otherwise commit a lease already running out
/// while the attempt has not begun).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartLease {
    pub owner: Arc<str>,
    pub duration: Duration,
}

/// [`NewJob`], owned, as it travels to the writer.
#[derive(Debug, Clone)]
pub(crate) struct NewJobOwned {
    job_id: JobId,
    tenant: String,
    request: ExchangeRequest,
    code_fingerprint: String,
    ttl: Duration,
    max_pending: u64,
    max_pending_tenant: Option<u64>,
    max_pending_clients: u64,
    start: Option<StartLease>,
}

/// The right to record the outcome of one attempt: only its holder's writes land.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    row_id: i64,
    /// The job's id, which the outcome's sealed token is bound to.
    job_id: JobId,
    pub owner: Arc<str>,
    pub attempt: u32,
}

/// A claimed job with what the attempt needs to present upstream.
#[derive(Debug)]
pub struct Claim {
    pub job: Job,
    pub lease: Lease,
    pub code: SecretString,
    pub code_verifier: SecretString,
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
    /// Opens (creating if needed) the database, applies the migrations, and returns the store
    /// with its writer task, which the caller must spawn before writing.
    pub async fn open(
        config: &StorageConfig,
        keys: Arc<KeyRing>,
        feed: Arc<JobFeed>,
        metrics: Arc<Metrics>,
    ) -> Result<(Store, WriterTask), StoreError> {
        let mut wal_checkpoints = None;
        let (pool, conn, shared) = match &config.url {
            None => {
                let (pool, conn, checkpoints) = open_sqlite(config).await?;
                wal_checkpoints = Some(checkpoints);
                (pool, conn, None)
            }
            Some(url) => {
                let (pool, conn, options) = open_postgres(config, url).await?;
                let instance = uuid::Uuid::now_v7().to_string().into();
                // Waiting for the turn and a few statements, each bounded by the timeout.
                let batch_timeout = Duration::from_millis(config.statement_timeout_ms) * 3;
                let shared = writer::Shared {
                    options,
                    instance,
                    batch_timeout,
                };
                (pool, conn, Some(shared))
            }
        };
        let (writer, task) = WriterHandle::start(
            conn,
            shared.clone(),
            Arc::clone(&keys),
            Arc::clone(&feed),
            metrics,
        )
        .await?;
        let store = Store {
            writer: Some(writer),
            pool,
            keys: Some(keys),
        };
        store.check_keys().await?;
        let task = match shared {
            Some(shared) => task.alongside(listener::run(
                shared.options,
                shared.instance,
                store.clone(),
                feed,
            )),
            None => match wal_checkpoints {
                Some(conn) => task.alongside(wal::run(conn)),
                None => task,
            },
        };
        Ok((store, task))
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
            writer: None,
            pool: Db::Sqlite(reader),
            keys: None,
        })
    }

    /// [`Store::open_read_only`] for a PostgreSQL database: every transaction is read-only.
    pub async fn open_read_only_url(url: &str) -> Result<Store, StoreError> {
        let options = PgConnectOptions::from_str(url)?
            .application_name("token-broker (read-only)")
            .options([("default_transaction_read_only", "on")]);
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        Ok(Store {
            writer: None,
            pool: Db::Postgres(pool),
            keys: None,
        })
    }

    /// Whether this daemon is the only one using the database (SQLite, whose file the daemon
    /// locks), so that every lease found at start-up is dead. On a shared database a lease is
    /// only rescued once it expires: its owner may be another replica, alive.
    pub fn is_exclusive(&self) -> bool {
        matches!(self.pool, Db::Sqlite(_))
    }

    /// Whether no job seems to wait to be claimed (none queued, none waiting for a retry) as
    /// of the last commit, so that a new submission may ask to start at once: exact on SQLite,
    /// where this daemon makes every change; on PostgreSQL as last read in the writers' turn.
    /// The writer checks again when it inserts the job, and queues it if one waits.
    pub fn nothing_waiting(&self) -> bool {
        self.writer
            .as_ref()
            .is_some_and(WriterHandle::nothing_waiting)
    }

    /// Whether the rate budget is shared through the database (with other replicas) rather
    /// than kept in this process alone.
    pub fn shares_rate_budget(&self) -> bool {
        matches!(self.pool, Db::Postgres(_))
    }

    /// Whether the database answers, for readiness: on PostgreSQL, one trivial statement and
    /// the writer's last transaction; a SQLite file is always there once open (its failures
    /// are the writer's, which the supervisor watches).
    pub async fn ping(&self) -> Result<(), StoreError> {
        let Db::Postgres(pool) = &self.pool else {
            return Ok(());
        };
        sqlx::query(include_str!("sql/postgres/ping.sql"))
            .execute(pool)
            .await?;
        match &self.writer {
            Some(writer) if !writer.healthy() => Err(StoreError::Unavailable(
                "the writer's connection to the database failed".into(),
            )),
            _ => Ok(()),
        }
    }

    /// Closes the read connections. The writer closes its connection (checkpointing the WAL)
    /// once every handle to it is dropped.
    pub async fn close(&self) {
        match &self.pool {
            Db::Sqlite(pool) => pool.close().await,
            Db::Postgres(pool) => pool.close().await,
        }
    }

    /// Refuses to start when the key ring cannot open the secrets already stored: a wrong key
    /// fails here, with a clear message, before anything is read or written with it.
    async fn check_keys(&self) -> Result<(), StoreError> {
        let Some(keys) = &self.keys else {
            return Ok(());
        };
        let samples: Vec<(String, [Option<String>; 3])> =
            on_backend!(&self.pool, "sealed_samples", |query, pool| {
                let rows = query.fetch_all(pool).await?;
                rows.iter()
                    .map(|row| {
                        Ok((
                            row.text("job_id")?,
                            [
                                row.opt_text("code")?,
                                row.opt_text("code_verifier")?,
                                row.opt_text("access_token")?,
                            ],
                        ))
                    })
                    .collect::<sqlx::Result<_>>()?
            });
        for (job_id, sealed) in &samples {
            for (column, sealed) in ["code", "code_verifier", "access_token"].iter().zip(sealed) {
                if let Some(sealed) = sealed {
                    keys.open(sealed, job_id, column).map_err(|error| {
                        StoreError::Keys(format!(
                            "the encryption keys do not open the stored secrets ({error}); \
                             start with the key file the database was written with"
                        ))
                    })?;
                }
            }
        }
        Ok(())
    }

    /// On a shared database, checks that this replica's keys are the ones every other replica
    /// uses: a value sealed by the first replica must open, and the fingerprint of a fixed
    /// text (`fingerprint`, made by the caller with its fingerprint key) must match. The first
    /// replica on a database writes both. Refuses with [`StoreError::Keys`] otherwise. A
    /// SQLite file has one daemon, whose key files sit beside it: nothing to agree on.
    pub async fn agree_on_keys(&self, fingerprint: &str) -> Result<(), StoreError> {
        let (Db::Postgres(pool), Some(keys)) = (&self.pool, &self.keys) else {
            return Ok(());
        };
        const SEALED: &str = "encryption";
        const FINGERPRINT: &str = "fingerprint";
        let canary = |name: &'static str, value: String| async move {
            sqlx::query(include_str!("sql/postgres/canary_insert.sql"))
                .bind(name)
                .bind(value)
                .execute(pool)
                .await?;
            let stored: String = sqlx::query_scalar(include_str!("sql/postgres/canary_get.sql"))
                .bind(name)
                .fetch_one(pool)
                .await?;
            Ok::<_, StoreError>(stored)
        };
        let sealed = canary(SEALED, keys.seal(KEY_CANARY, SEALED, SEALED)).await?;
        keys.open(&sealed, SEALED, SEALED).map_err(|error| {
            StoreError::Keys(format!(
                "this replica's encryption key file is not the one the other replicas use \
                 ({error}); give every replica the same security.key_file"
            ))
        })?;
        // Follow key rotations: sealed again with the current key.
        sqlx::query(include_str!("sql/postgres/canary_set.sql"))
            .bind(SEALED)
            .bind(keys.seal(KEY_CANARY, SEALED, SEALED))
            .execute(pool)
            .await?;
        if canary(FINGERPRINT, fingerprint.to_string()).await? != fingerprint {
            return Err(StoreError::Keys(
                "this replica's audit fingerprint key file is not the one the other replicas \
                 use; give every replica the same audit.fingerprint_key_file"
                    .to_string(),
            ));
        }
        Ok(())
    }

    /// Re-encrypts every stored secret with the key ring's current key (after `keys rotate`),
    /// in batches. Returns how many jobs were rewritten.
    pub async fn reencrypt_all(&self) -> Result<u64, StoreError> {
        let mut after = 0;
        let mut total = 0;
        loop {
            let (rows, last) = self
                .write(|reply| Command::Reencrypt { after, reply })
                .await?;
            total += rows;
            match last {
                Some(last) => after = last,
                None => return Ok(total),
            }
        }
    }

    /// Notes that these jobs' tokens reached their callers; retention then erases them.
    pub async fn mark_delivered(
        &self,
        job_ids: Vec<String>,
        now: UnixMillis,
    ) -> Result<u64, StoreError> {
        if job_ids.is_empty() {
            return Ok(0);
        }
        if let (Db::Postgres(pool), Some(_)) = (&self.pool, &self.writer) {
            // No audit event and no other writer's row: outside the writers' turns, so the
            // hot path does not wait for it.
            let ids = serde_json::to_string(&job_ids)
                .map_err(|error| StoreError::Corrupt(error.to_string()))?;
            // Planned at each execution (`Db::may_keep_plans`).
            let done = sqlx::query(include_str!("sql/postgres/mark_delivered.sql"))
                .persistent(false)
                .bind(ids)
                .bind(now.0)
                .execute(pool)
                .await?;
            return Ok(done.rows_affected());
        }
        self.write(|reply| Command::MarkDelivered {
            job_ids,
            now,
            reply,
        })
        .await
    }

    /// Erases tokens that expired, or were delivered longer than `retention` ago. Returns how
    /// many. Batch after batch while batches come back full (up to [`ERASE_ROUNDS`]), so that a
    /// sweep keeps up with deliveries arriving faster than one batch per sweep.
    pub async fn erase_tokens(
        &self,
        now: UnixMillis,
        retention: Duration,
    ) -> Result<u64, StoreError> {
        let delivered_before = now.saturating_sub(retention);
        let full = writer::SWEEP_BATCH as u64;
        let mut total = 0;
        for _ in 0..ERASE_ROUNDS {
            let (erased, forgotten) = self.erase_tokens_batch(now, delivered_before).await?;
            total += erased;
            if erased < full && forgotten < full {
                break;
            }
        }
        Ok(total)
    }

    /// One batch of [`Store::erase_tokens`]: how many tokens it erased, and how many
    /// deliveries it forgot.
    async fn erase_tokens_batch(
        &self,
        now: UnixMillis,
        delivered_before: UnixMillis,
    ) -> Result<(u64, u64), StoreError> {
        if let (Db::Postgres(pool), Some(_)) = (&self.pool, &self.writer) {
            // As mark_delivered: terminal jobs only, no audit event, outside the writers' turns.
            let mut tx = pool.begin().await?;
            let erased = sqlx::query(include_str!("sql/postgres/erase_tokens.sql"))
                .bind(now.0)
                .bind(delivered_before.0)
                .bind(writer::SWEEP_BATCH)
                .fetch_all(&mut *tx)
                .await?;
            let forgotten = sqlx::query(include_str!("sql/postgres/forget_deliveries.sql"))
                .bind(delivered_before.0)
                .bind(writer::SWEEP_BATCH)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            return Ok((erased.len() as u64, forgotten.rows_affected()));
        }
        self.write(|reply| Command::EraseTokens {
            now,
            delivered_before,
            reply,
        })
        .await
    }

    /// Applies one change through the writer, waiting for its commit.
    async fn write<T>(
        &self,
        command: impl FnOnce(Responder<T>) -> Command,
    ) -> Result<T, StoreError> {
        match &self.writer {
            Some(writer) => writer.apply(command).await,
            None => Err(StoreError::Unavailable(
                "the store was opened read-only".into(),
            )),
        }
    }

    /// Commits a new job, unless its idempotency key is taken or the queue is full.
    ///
    /// With `job.start`, `on_started` receives the claim if the job is committed running.
    pub async fn submit(
        &self,
        job: &NewJob<'_>,
        now: UnixMillis,
        on_started: Option<OnStarted>,
    ) -> Result<SubmitOutcome, StoreError> {
        let owned = NewJobOwned {
            job_id: job.job_id,
            tenant: job.tenant.to_string(),
            request: job.request.clone(),
            code_fingerprint: job.code_fingerprint.to_string(),
            ttl: job.ttl,
            max_pending: job.max_pending,
            max_pending_tenant: job.max_pending_tenant,
            max_pending_clients: job.max_pending_clients,
            start: job.start.cloned(),
        };
        self.write(|reply| Command::Submit {
            job: Box::new(owned),
            now,
            reply,
            on_started,
            claim: None,
        })
        .await
    }

    /// Cancels a queued or waiting job on behalf of `actor` (a tenant name, recorded in the
    /// audit trail).
    pub async fn cancel(
        &self,
        id: JobId,
        actor: &str,
        now: UnixMillis,
    ) -> Result<CancelOutcome, StoreError> {
        self.write(|reply| Command::Cancel {
            id,
            actor: actor.to_string(),
            now,
            reply,
        })
        .await
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
        self.write(|reply| Command::Claim {
            candidates: candidates.to_vec(),
            owner: Arc::clone(owner),
            lease_until,
            now,
            reply,
        })
        .await
    }

    /// Records an attempt's outcome, if `lease` still holds the job. Returns the job as
    /// committed, or `None` when the lease was lost (the job was rescued and claimed again):
    /// then nothing is written.
    ///
    /// `on_commit` runs in the writer right after the commit, before anyone hears of the
    /// outcome (the worker frees the attempt's slot there).
    pub async fn record_attempt(
        &self,
        lease: &Lease,
        record: &AttemptRecord,
        now: UnixMillis,
        on_commit: Option<OnCommit>,
    ) -> Result<Option<Job>, StoreError> {
        self.write(|reply| Command::Record {
            lease: lease.clone(),
            record: record.clone(),
            now,
            on_commit,
            reply,
        })
        .await
    }

    /// Fails queued and waiting jobs whose time to live has passed. Returns them.
    pub async fn expire_overdue(&self, now: UnixMillis) -> Result<Vec<Job>, StoreError> {
        self.write(|reply| Command::Expire { now, reply }).await
    }

    /// Returns to the queue (or fails, when no attempt is left) every running job whose lease
    /// ended before `lease_cutoff`: its worker died mid-attempt, so the outcome is unknown.
    pub async fn rescue_leases(
        &self,
        lease_cutoff: UnixMillis,
        max_attempts: u32,
        now: UnixMillis,
    ) -> Result<Vec<Job>, StoreError> {
        self.write(|reply| Command::Rescue {
            lease_cutoff,
            max_attempts,
            now,
            reply,
        })
        .await
    }

    /// Removes audit events older than `cutoff`, leaving a checkpoint that carries the hash of
    /// the last removed event so the rest of the chain still verifies. Returns `None` when
    /// nothing was old enough.
    pub async fn prune_audit_events(
        &self,
        cutoff: UnixMillis,
        now: UnixMillis,
    ) -> Result<Option<Pruned>, StoreError> {
        let mut pruned: Option<Pruned> = None;
        while let Some((rows, checkpoint_seq)) = self
            .write(|reply| Command::PruneStep { cutoff, now, reply })
            .await?
        {
            let events = pruned.as_ref().map_or(0, |p| p.events) + rows;
            pruned = Some(Pruned {
                events,
                checkpoint_seq,
            });
        }
        Ok(pruned)
    }

    /// Jobs not yet terminal.
    pub async fn pending_count(&self) -> Result<u64, StoreError> {
        let pending = on_backend!(&self.pool, "count_pending", |query, pool| {
            query.fetch_one(pool).await?.int("pending")?
        });
        Ok(u64::try_from(pending).unwrap_or(0))
    }

    /// When the oldest job waiting to be attempted was created.
    pub async fn oldest_pending(&self) -> Result<Option<UnixMillis>, StoreError> {
        let oldest = on_backend!(&self.pool, "oldest_pending", |query, pool| {
            query.fetch_one(pool).await?.opt_int("oldest")?
        });
        Ok(oldest.map(UnixMillis))
    }

    /// The job as it stands.
    pub async fn get(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        let row = on_backend!(&self.pool, "get_job", |query, pool| {
            let row = query.bind(id.to_string()).fetch_optional(pool).await?;
            row.as_ref().map(JobRow::decode).transpose()?
        });
        row.map(|row| row.into_job(self.keys.as_deref()))
            .transpose()
    }

    /// The job `id` if it belongs to `tenant`; `None` for a missing job and for another
    /// tenant's alike, at the same cost (the ownership is part of the lookup).
    pub async fn get_owned(&self, id: JobId, tenant: &str) -> Result<Option<Job>, StoreError> {
        let row = on_backend!(&self.pool, "get_owned_job", |query, pool| {
            let row = query
                .bind(id.to_string())
                .bind(tenant)
                .fetch_optional(pool)
                .await?;
            row.as_ref().map(JobRow::decode).transpose()?
        });
        row.map(|row| row.into_job(self.keys.as_deref()))
            .transpose()
    }

    /// The due jobs of `clients`, closest to their TTL first, at most `per_client` each and in
    /// all, in one statement.
    pub async fn due_for_clients(
        &self,
        clients: &[String],
        now: UnixMillis,
        per_client: usize,
    ) -> Result<Vec<Candidate>, StoreError> {
        if clients.is_empty() {
            return Ok(Vec::new());
        }
        let ids = serde_json::to_string(clients).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let per_client = i64::try_from(per_client).unwrap_or(i64::MAX);
        Ok(on_backend!(&self.pool, "due_for_clients", |query, pool| {
            let rows = query
                .bind(ids)
                .bind(now.0)
                .bind(per_client)
                .fetch_all(pool)
                .await?;
            rows.iter()
                .map(|row| {
                    Ok(Candidate {
                        row_id: row.int("id")?,
                        client_id: row.text("client_id")?,
                        due_at: UnixMillis(row.int("next_attempt_at")?),
                        expires_at: UnixMillis(row.int("expires_at")?),
                    })
                })
                .collect::<sqlx::Result<Vec<_>>>()?
        }))
    }

    /// For each of `clients`, when its next waiting job (not past its TTL) falls due; `None`
    /// for a client with none. One statement.
    pub async fn next_waiting_for_clients(
        &self,
        clients: &[String],
        now: UnixMillis,
    ) -> Result<Vec<(String, Option<UnixMillis>)>, StoreError> {
        if clients.is_empty() {
            return Ok(Vec::new());
        }
        let ids = serde_json::to_string(clients).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        Ok(on_backend!(
            &self.pool,
            "next_waiting_for_clients",
            |query, pool| {
                let rows = query.bind(ids).bind(now.0).fetch_all(pool).await?;
                rows.iter()
                    .map(|row| {
                        Ok((
                            row.text("client_id")?,
                            row.opt_int("next_at")?.map(UnixMillis),
                        ))
                    })
                    .collect::<sqlx::Result<Vec<_>>>()?
            }
        ))
    }

    /// Every client with a job waiting.
    pub async fn waiting_clients(&self) -> Result<Vec<String>, StoreError> {
        Ok(on_backend!(&self.pool, "waiting_clients", |query, pool| {
            let rows = query.fetch_all(pool).await?;
            rows.iter()
                .map(|row| row.text("client_id"))
                .collect::<sqlx::Result<Vec<_>>>()?
        }))
    }
}

/// Opens (creating if needed) the SQLite database and applies its migrations: the read pool,
/// the writer's connection and the WAL checkpoints' connection ([`wal`]).
async fn open_sqlite(
    config: &StorageConfig,
) -> Result<(Pool, backend::Conn, sqlx::SqliteConnection), StoreError> {
    let path = &config.path;
    prepare_private_file(path)?;
    // The setting as sqlx's connections take it, and as the writer's pragma.
    let (synchronous, synchronous_pragma) = match config.synchronous {
        Synchronous::Normal => (SqliteSynchronous::Normal, "NORMAL"),
        Synchronous::Full => (SqliteSynchronous::Full, "FULL"),
        Synchronous::Extra => (SqliteSynchronous::Extra, "EXTRA"),
    };
    let busy_timeout = Duration::from_millis(config.busy_timeout_ms);
    let base = SqliteConnectOptions::new()
        .filename(path)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(synchronous)
        .busy_timeout(busy_timeout)
        .foreign_keys(true);
    // Migrations run through a one-connection pool (the migrator's connection form is not
    // Send in an async fn), closed before the writer opens its own connection.
    let migrations = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(base.clone().create_if_missing(true))
        .await?;
    sqlx::migrate!("./migrations/sqlite")
        .run(&migrations)
        .await?;
    migrations.close().await;
    // The writer's page cache: 8 MiB holds the path to every index's newest pages (the readers
    // keep SQLite's default 2 MiB each). Larger costs more than it saves: SQLite walks the
    // whole cache's hash table at the end of every transaction (32 MiB measured 5 µs more per
    // exchange). Statement journals (a multi-row insert's undo, kept in case one row breaks a
    // constraint) stay in memory instead of a temporary file: a third of the bytes the writer
    // wrote per exchange. Checkpoints are another connection's ([`wal`]); the writer makes its
    // own only if that falls behind.
    let mut pragmas = vec![
        ("cache_size", "-8192".to_string()),
        ("temp_store", "memory".to_string()),
        ("wal_autocheckpoint", wal::WRITER_FALLBACK_PAGES.to_string()),
    ];
    if config.max_size_mb > 0 {
        // 4 KiB pages (SQLite's default page size).
        pragmas.push(("max_page_count", (config.max_size_mb * 256).to_string()));
    }
    let settings = direct::Settings {
        synchronous: synchronous_pragma,
        busy_timeout,
        pragmas,
    };
    // Opening may wait up to the busy timeout for a lock: off the runtime's threads.
    let writer_path = path.clone();
    let conn =
        tokio::task::spawn_blocking(move || direct::DirectConn::open(&writer_path, &settings))
            .await
            .map_err(|error| StoreError::Unavailable(format!("opening the writer: {error}")))??;
    let checkpoints = base.clone().connect().await?;
    let reader = SqlitePoolOptions::new()
        .max_connections(4)
        .acquire_timeout(busy_timeout + Duration::from_secs(5))
        .connect_with(base.read_only(true))
        .await?;
    Ok((Db::Sqlite(reader), Db::Sqlite(conn), checkpoints))
}

/// Connects to PostgreSQL and applies its migrations (sqlx takes an advisory lock for them, so
/// replicas starting together apply each once): the pool, the writer's connection, and the
/// options the writer reconnects with and the change listener connects with.
async fn open_postgres(
    config: &StorageConfig,
    url: &str,
) -> Result<(Pool, backend::Conn, PgConnectOptions), StoreError> {
    let base = PgConnectOptions::from_str(url)?.application_name("token-broker");
    // Migrations wait for sqlx's advisory lock while another replica applies them: no
    // statement timeout on their connection.
    let migrations = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(base.clone())
        .await?;
    sqlx::migrate!("./migrations/postgres")
        .run(&migrations)
        .await?;
    migrations.close().await;
    let timeout = config.statement_timeout_ms.to_string();
    let options = base.options([
        ("statement_timeout", timeout.as_str()),
        // A replica frozen mid-transaction (a paused VM, a partition) would hold the writers'
        // turn: the server ends such a session, and notices a vanished client within seconds.
        ("idle_in_transaction_session_timeout", timeout.as_str()),
        ("tcp_keepalives_idle", "10"),
        ("tcp_keepalives_interval", "5"),
        ("tcp_keepalives_count", "3"),
    ]);
    let pool = PgPoolOptions::new()
        .max_connections(config.pool_size)
        .acquire_timeout(
            Duration::from_millis(config.statement_timeout_ms) + Duration::from_secs(5),
        )
        .connect_with(options.clone())
        .await?;
    let conn = options.connect().await?;
    Ok((Db::Postgres(pool), Db::Postgres(conn), options))
}

/// A job row as stored, read the same way from either database; [`JobRow::into_job`] opens
/// its token and checks its enums.
#[derive(Debug)]
pub(super) struct JobRow {
    id: i64,
    job_id: String,
    tenant: String,
    client_id: String,
    state: String,
    attempts: i64,
    created_at: i64,
    updated_at: i64,
    next_attempt_at: Option<i64>,
    expires_at: i64,
    access_token: Option<String>,
    token_type: Option<String>,
    token_expires_in: Option<i64>,
    token_expires_at: Option<i64>,
    failure_reason: Option<String>,
    last_http_status: Option<i64>,
    failure_detail: Option<String>,
    state_param: String,
    idempotency_key: String,
    request_digest: String,
    outcome_unknown: bool,
    version: i64,
    code_fingerprint: Option<String>,
    /// Sealed; read only for claims ([`JobRow::decode_claimed`]), `None` otherwise.
    code: Option<String>,
    code_verifier: Option<String>,
}

impl JobRow {
    /// A claimed job's row, with the sealed code and verifier its attempt presents.
    fn decode_claimed(row: &impl Columns) -> sqlx::Result<JobRow> {
        Ok(JobRow {
            code: row.opt_text("code")?,
            code_verifier: row.opt_text("code_verifier")?,
            ..JobRow::decode(row)?
        })
    }

    /// A job row, without its sealed code and verifier (nothing but a claim needs them).
    fn decode(row: &impl Columns) -> sqlx::Result<JobRow> {
        Ok(JobRow {
            id: row.int("id")?,
            job_id: row.text("job_id")?,
            tenant: row.text("tenant")?,
            client_id: row.text("client_id")?,
            state: row.text("state")?,
            attempts: row.int("attempts")?,
            created_at: row.int("created_at")?,
            updated_at: row.int("updated_at")?,
            next_attempt_at: row.opt_int("next_attempt_at")?,
            expires_at: row.int("expires_at")?,
            access_token: row.opt_text("access_token")?,
            token_type: row.opt_text("token_type")?,
            token_expires_in: row.opt_int("token_expires_in")?,
            token_expires_at: row.opt_int("token_expires_at")?,
            failure_reason: row.opt_text("failure_reason")?,
            last_http_status: row.opt_int("last_http_status")?,
            failure_detail: row.opt_text("failure_detail")?,
            state_param: row.text("state_param")?,
            idempotency_key: row.text("idempotency_key")?,
            request_digest: row.text("request_digest")?,
            outcome_unknown: row.flag("outcome_unknown")?,
            version: row.int("version")?,
            code_fingerprint: row.opt_text("code_fingerprint")?,
            code: None,
            code_verifier: None,
        })
    }

    /// The job. Unknown enum values are reported, not guessed. Tokens are opened with `keys`;
    /// without keys (auditors' tools) a job carries no token.
    fn into_job(self, keys: Option<&KeyRing>) -> Result<Job, StoreError> {
        let corrupt =
            |error: crate::domain::job::UnknownValue| StoreError::Corrupt(error.to_string());
        let job_id = self.job_id;
        let token = match (self.access_token, keys) {
            (Some(sealed), Some(keys)) => Some(Token {
                access_token: keys
                    .open(&sealed, &job_id, "access_token")
                    .map_err(|error| StoreError::Corrupt(format!("job {job_id}: {error}")))?,
                token_type: self.token_type.unwrap_or_default(),
                expires_in: self.token_expires_in.unwrap_or_default(),
                expires_at: UnixMillis(self.token_expires_at.unwrap_or_default()),
            }),
            _ => None,
        };
        Ok(Job {
            id: JobId::from_str(&job_id)
                .map_err(|_| StoreError::Corrupt(format!("job id {job_id:?} is not a UUID")))?,
            tenant: self.tenant,
            client_id: self.client_id,
            state: JobState::from_str(&self.state).map_err(corrupt)?,
            attempts: u32::try_from(self.attempts).map_err(|_| {
                StoreError::Corrupt(format!("job {job_id}: {} attempts", self.attempts))
            })?,
            created_at: UnixMillis(self.created_at),
            updated_at: UnixMillis(self.updated_at),
            next_attempt_at: self.next_attempt_at.map(UnixMillis),
            expires_at: UnixMillis(self.expires_at),
            token,
            failure_reason: self
                .failure_reason
                .as_deref()
                .map(FailureReason::from_str)
                .transpose()
                .map_err(corrupt)?,
            last_http_status: self
                .last_http_status
                .and_then(|status| u16::try_from(status).ok()),
            failure_detail: self.failure_detail,
            state_param: self.state_param,
            idempotency_key: self.idempotency_key,
            outcome_unknown: self.outcome_unknown,
            version: self.version,
            code_fingerprint: self.code_fingerprint,
        })
    }
}

#[cfg(test)]
mod tests {
    use sqlx::Connection;

    use super::*;

    #[tokio::test]
    async fn bugs_are_internal_and_the_databases_condition_is_unavailable() {
        let mut conn = sqlx::SqliteConnection::connect("sqlite::memory:")
            .await
            .unwrap();
        sqlx::query("CREATE TABLE t (k TEXT PRIMARY KEY)")
            .execute(&mut conn)
            .await
            .unwrap();
        sqlx::query("INSERT INTO t VALUES ('a')")
            .execute(&mut conn)
            .await
            .unwrap();
        let duplicate = sqlx::query("INSERT INTO t VALUES ('a')")
            .execute(&mut conn)
            .await
            .unwrap_err();
        assert!(
            !StoreError::Database(duplicate).is_transient(),
            "a constraint is a bug"
        );
        let missing_row = sqlx::query("SELECT k FROM t WHERE k = 'zz'")
            .fetch_one(&mut conn)
            .await
            .unwrap_err();
        assert!(!StoreError::Database(missing_row).is_transient());
        assert!(!StoreError::Corrupt("row".into()).is_transient());
        assert!(StoreError::Database(sqlx::Error::PoolTimedOut).is_transient());
        assert!(StoreError::Unavailable("writer".into()).is_transient());
    }
}
