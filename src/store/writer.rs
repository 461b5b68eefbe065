//! The writer: one task that owns the only writing connection and applies every change.
//!
//! Group commit: the task takes the next write request, drains whatever else is already
//! waiting (up to [`MAX_BATCH`]), applies them all in one `BEGIN IMMEDIATE` transaction, commits
//! once, and only then answers each caller and publishes the effects (audit log lines, metrics,
//! the change feed). One fsync serves every change in the batch; nobody hears "done" before
//! the commit that made it durable.
//!
//! If any change of a batch fails, the whole transaction is rolled back and each change is
//! retried in a transaction of its own, so one bad change cannot fail its neighbours.
//!
//! The writer also keeps facts that would otherwise cost a query per change: the head of the
//! audit chain, and the number of jobs not yet terminal, overall, per tenant and per client id
//! (for the queue bounds), and how many jobs wait (a submission starts its first attempt at
//! once only if none does). On SQLite, the only writer, it reads them once at start; a
//! transaction that does not commit restores them as they were before it. On PostgreSQL the
//! writers of several replicas take turns: each transaction first locks the chain's row
//! (`lock_chain.sql`, sent with its `BEGIN`), then reads the chain head, and the counts and
//! whether any job waits when it admits submissions, as the other replicas left them. Its
//! committed changes are also announced to the other replicas with `NOTIFY` (delivered at
//! commit), which [`super::listener`] hears.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use sqlx::{ConnectOptions, Connection, postgres::PgConnectOptions};
use tokio::sync::{mpsc, oneshot};

use super::{
    AttemptRecord, CancelOutcome, Candidate, Claim, JobRow, Lease, NewJobOwned, OnCommit,
    OnStarted, QueueFull, StoreError, SubmitOutcome,
    audit::{self, AuditEvent, ChainHead},
    backend::{Columns, Conn, Db, SqliteStatements, on_backend},
    checkpoints::{self, Signed},
};
use crate::{
    audit::{AuditKind, AuditRecord, RecordKind, checkpoint::SigningKey},
    domain::job::{Job, JobId, JobState, UnixMillis},
    domain::secret::ExposeSecret,
    ops::metrics::Metrics,
    security::crypto::KeyRing,
    store::feed::JobFeed,
};

/// Changes applied in one transaction at most.
pub(super) const MAX_BATCH: usize = 512;
/// Rows changed by one sweep statement at most, so one sweep never holds the writer for long.
pub(super) const SWEEP_BATCH: i64 = 500;
/// Audit events removed per retention step.
const PRUNE_BATCH: i64 = 10_000;

/// One change to apply, with where its result goes once the transaction commits: each
/// command carries its own typed [`Responder`], so no reply is ever matched against the wrong
/// change.
#[derive(Debug)]
pub(super) enum Command {
    Submit {
        job: Box<NewJobOwned>,
        now: UnixMillis,
        reply: Responder<SubmitOutcome>,
        /// Receives `claim` right after the commit.
        on_started: Option<OnStarted>,
        /// The claim of the job, when the transaction inserted it running.
        claim: Option<Box<Claim>>,
    },
    Cancel {
        id: JobId,
        actor: String,
        now: UnixMillis,
        reply: Responder<CancelOutcome>,
    },
    Claim {
        candidates: Vec<Candidate>,
        owner: Arc<str>,
        lease_until: UnixMillis,
        now: UnixMillis,
        reply: Responder<Vec<Claim>>,
    },
    Record {
        lease: Lease,
        record: AttemptRecord,
        now: UnixMillis,
        on_commit: Option<OnCommit>,
        /// The job after the outcome, or `None` when the lease was lost.
        reply: Responder<Option<Job>>,
    },
    /// Fails overdue jobs; answers them.
    Expire {
        now: UnixMillis,
        reply: Responder<Vec<Job>>,
    },
    /// Recovers attempts whose lease ran out; answers the jobs.
    Rescue {
        lease_cutoff: UnixMillis,
        max_attempts: u32,
        now: UnixMillis,
        reply: Responder<Vec<Job>>,
    },
    /// Prunes one step of old audit events; answers the rows deleted and the checkpoint's seq,
    /// or `None` when nothing was left to prune.
    PruneStep {
        cutoff: UnixMillis,
        now: UnixMillis,
        reply: Responder<Option<(u64, i64)>>,
    },
    /// Re-seals the secrets of the next jobs after row `after` with the current key; answers
    /// the jobs re-sealed and the last row done (`None` when there were no more).
    Reencrypt {
        after: i64,
        reply: Responder<(u64, Option<i64>)>,
    },
    /// Signs the chain head unless the last checkpoint covers it; answers the latest
    /// checkpoint (`None` while the chain is empty).
    Sign {
        key: Arc<SigningKey>,
        now: UnixMillis,
        reply: Responder<Option<Signed>>,
    },
    /// Notes that these jobs' tokens reached their callers; answers the rows changed.
    MarkDelivered {
        job_ids: Vec<String>,
        now: UnixMillis,
        reply: Responder<u64>,
    },
    /// Erases tokens that expired, or were delivered before `delivered_before` (a batch of
    /// each), and forgets the deliveries erased; answers how many tokens were erased and how
    /// many deliveries forgotten.
    EraseTokens {
        now: UnixMillis,
        delivered_before: UnixMillis,
        reply: Responder<(u64, u64)>,
    },
}

/// Where one command's result goes: set while the transaction runs (again if it is retried),
/// sent only after the commit.
#[derive(Debug)]
pub(super) struct Responder<T> {
    sender: Option<oneshot::Sender<Result<T, StoreError>>>,
    outcome: Option<T>,
}

impl<T> Responder<T> {
    /// A responder and the receiver its caller waits on.
    pub(super) fn new() -> (Responder<T>, oneshot::Receiver<Result<T, StoreError>>) {
        let (sender, receiver) = oneshot::channel();
        let responder = Responder {
            sender: Some(sender),
            outcome: None,
        };
        (responder, receiver)
    }

    /// Keeps `result`'s value for after the commit; passes its effects on.
    fn keep(&mut self, result: Result<(T, Effects), StoreError>) -> Result<Effects, StoreError> {
        let (outcome, effects) = result?;
        self.outcome = Some(outcome);
        Ok(effects)
    }

    /// The change committed: the caller gets its result (if it is still waiting).
    fn send(&mut self) {
        if let (Some(sender), Some(outcome)) = (self.sender.take(), self.outcome.take()) {
            let _ = sender.send(Ok(outcome));
        }
    }

    /// The change failed.
    fn fail(&mut self, error: StoreError) {
        if let Some(sender) = self.sender.take() {
            let _ = sender.send(Err(error));
        }
    }
}

/// Where a submission's result goes, and its claim when it starts at once.
type SubmissionResult<'a> = (&'a mut Responder<SubmitOutcome>, &'a mut Option<Box<Claim>>);

/// An outcome to record: the lease it is guarded by, what happened, when.
type RecordParts<'a> = (&'a Lease, &'a AttemptRecord, UnixMillis);

impl Command {
    /// A submission's parts, for the runs of submissions inserted together: the job, and
    /// where its result and its claim go.
    fn submission(&mut self) -> Option<((&NewJobOwned, UnixMillis), SubmissionResult<'_>)> {
        match self {
            Command::Submit {
                job,
                now,
                reply,
                claim,
                ..
            } => Some(((&*job, *now), (reply, claim))),
            _ => None,
        }
    }

    /// A recorded outcome's parts, for the runs of outcomes written together.
    fn record(&mut self) -> Option<(RecordParts<'_>, &mut Responder<Option<Job>>)> {
        match self {
            Command::Record {
                lease,
                record,
                now,
                reply,
                ..
            } => Some(((&*lease, &*record, *now), reply)),
            _ => None,
        }
    }

    /// Where the change goes in its batch: submissions first, then outcomes, then the rest.
    fn run_order(&self) -> u8 {
        match self {
            Command::Submit { .. } => 0,
            Command::Record { .. } => 1,
            _ => 2,
        }
    }

    /// Right after the commit, before anyone hears of it.
    fn committed(&mut self) {
        match self {
            Command::Record {
                on_commit: Some(on_commit),
                ..
            } => on_commit.run(),
            Command::Submit {
                on_started, claim, ..
            } => {
                if let (Some(on_started), Some(claim)) = (on_started.take(), claim.take()) {
                    on_started.run(*claim);
                }
            }
            _ => {}
        }
    }

    /// After the commit: the result goes to its caller.
    fn respond(&mut self) {
        match self {
            Command::Submit { reply, .. } => reply.send(),
            Command::Cancel { reply, .. } => reply.send(),
            Command::Claim { reply, .. } => reply.send(),
            Command::Record { reply, .. } => reply.send(),
            Command::Expire { reply, .. } | Command::Rescue { reply, .. } => reply.send(),
            Command::PruneStep { reply, .. } => reply.send(),
            Command::Reencrypt { reply, .. } => reply.send(),
            Command::Sign { reply, .. } => reply.send(),
            Command::MarkDelivered { reply, .. } => reply.send(),
            Command::EraseTokens { reply, .. } => reply.send(),
        }
    }

    /// The change failed: its caller gets `error`.
    fn fail(&mut self, error: StoreError) {
        match self {
            Command::Submit { reply, .. } => reply.fail(error),
            Command::Cancel { reply, .. } => reply.fail(error),
            Command::Claim { reply, .. } => reply.fail(error),
            Command::Record { reply, .. } => reply.fail(error),
            Command::Expire { reply, .. } | Command::Rescue { reply, .. } => reply.fail(error),
            Command::PruneStep { reply, .. } => reply.fail(error),
            Command::Reencrypt { reply, .. } => reply.fail(error),
            Command::Sign { reply, .. } => reply.fail(error),
            Command::MarkDelivered { reply, .. } => reply.fail(error),
            Command::EraseTokens { reply, .. } => reply.fail(error),
        }
    }
}

/// What becomes visible once the transaction commits.
#[derive(Debug, Default)]
struct Effects {
    events: Vec<AuditRecord>,
    publish: Vec<Job>,
}

/// What the writer carries from change to change: the cached facts (valid at the start of the
/// next transaction, restored after a rollback) and the keys that seal secrets.
#[derive(Debug)]
struct Tracked {
    head: ChainHead,
    /// Jobs not yet terminal.
    pending: i64,
    /// The same, per tenant.
    pending_by_tenant: HashMap<String, i64>,
    /// The same, per client id (only those with pending jobs). Too large to copy per batch:
    /// a rollback undoes the changes recorded in `client_journal` instead.
    pending_by_client: HashMap<String, i64>,
    /// Changes to `pending_by_client` since the last commit.
    client_journal: Vec<(String, i64)>,
    /// Client ids with pending jobs that `pending_by_client` does not hold (on PostgreSQL,
    /// which reads only the counts of the client ids a batch submits for).
    other_clients: u64,
    /// Jobs waiting (queued, or for a retry); a submission starts at once only while it is
    /// 0. Exact on SQLite, where this writer makes every change. On PostgreSQL, read in the
    /// turn as 1 or 0 (whether any replica's job waits) at the start of each batch that
    /// submits and after a batch's claims, then moved by the batch's own changes (never below
    /// 0): exact for the batch's submissions, which run first.
    waiting: i64,
    /// On PostgreSQL, whether a job waited (1 or 0) as last read in a turn, before the batch's
    /// own submissions: the API's hint between batches. Not moved by this writer's own
    /// changes, which are not the fleet's (another replica may claim the jobs this one
    /// queued); a replica whose hint went stale while another drained the queue queues one
    /// submission more, whose batch reads the truth again.
    waiting_in_turn: Option<i64>,
    keys: Arc<KeyRing>,
}

/// The small facts of [`Tracked`] as they stood before a batch, and how far its client journal
/// reached.
#[derive(Debug)]
struct Snapshot {
    head: ChainHead,
    pending: i64,
    waiting: i64,
    waiting_in_turn: Option<i64>,
    pending_by_tenant: HashMap<String, i64>,
    journal_len: usize,
}

impl Tracked {
    async fn read(conn: &mut Conn, keys: Arc<KeyRing>) -> Result<Tracked, sqlx::Error> {
        let mut tracked = Tracked {
            head: ChainHead::read(conn).await?,
            pending: 0,
            pending_by_tenant: HashMap::new(),
            pending_by_client: HashMap::new(),
            client_journal: Vec::new(),
            other_clients: 0,
            waiting: 0,
            waiting_in_turn: None,
            keys,
        };
        // PostgreSQL reads the counts each batch needs, in the batch.
        if let Db::Sqlite(sqlite) = conn {
            tracked.waiting = sqlite
                .statement(include_str!("sql/sqlite/count_waiting.sql"))
                .fetch_one(sqlite)
                .await?
                .int("waiting")?;
            tracked.read_counts(conn).await?;
        } else {
            // Until the first read in a turn, submissions may ask to start: the turn decides.
            tracked.waiting_in_turn = Some(0);
        }
        Ok(tracked)
    }

    /// (Re)reads the counts of jobs not yet terminal.
    async fn read_counts(&mut self, conn: &mut Conn) -> Result<(), sqlx::Error> {
        self.pending_by_tenant = on_backend!(&mut *conn, "pending_by_tenant", |query, conn| {
            let rows = query.fetch_all(&mut *conn).await?;
            rows.iter()
                .map(|row| Ok((row.text("tenant")?, row.int("pending")?)))
                .collect::<sqlx::Result<HashMap<_, _>>>()?
        });
        self.pending_by_client = on_backend!(&mut *conn, "pending_by_client", |query, conn| {
            let rows = query.fetch_all(&mut *conn).await?;
            rows.iter()
                .map(|row| Ok((row.text("client_id")?, row.int("pending")?)))
                .collect::<sqlx::Result<HashMap<_, _>>>()?
        });
        self.pending = self.pending_by_tenant.values().sum();
        self.client_journal.clear();
        Ok(())
    }

    /// Reads, on PostgreSQL and at the start of a batch that submits, in one round trip: the
    /// counts that admitting submissions for `tenants` and `clients` needs, as the counting
    /// triggers keep them (a few rows, however long the queue); whether any replica's job
    /// waits; and the chain's head.
    async fn read_turn_for_submissions(
        &mut self,
        conn: &mut sqlx::PgConnection,
        tenants: &[&str],
        clients: &[&str],
    ) -> Result<(), StoreError> {
        let json = |keys: &[&str]| {
            serde_json::to_string(keys).map_err(|e| StoreError::Corrupt(e.to_string()))
        };
        // Planned at each execution (`Db::may_keep_plans`): the waiting check's plan depends
        // on the table's size.
        let rows = sqlx::query(include_str!("sql/postgres/turn_for_submissions.sql"))
            .persistent(false)
            .bind(json(tenants)?)
            .bind(json(clients)?)
            .fetch_all(&mut *conn)
            .await?;
        self.pending = 0;
        self.pending_by_tenant.clear();
        self.pending_by_client.clear();
        self.client_journal.clear();
        self.waiting = 0;
        let mut head = None;
        let mut clients_with_pending = 0;
        for row in &rows {
            let (scope, pending) = (row.text("scope")?, row.int("pending")?);
            match scope.as_str() {
                "total" => self.pending = pending,
                "clients" => clients_with_pending = u64::try_from(pending).unwrap_or(0),
                "waiting" => self.waiting = 1,
                "head" => head = Some((pending, row.int("at")?, row.opt_text("key")?)),
                "tenant" => {
                    self.pending_by_tenant.insert(row.text("key")?, pending);
                }
                _ if pending > 0 => {
                    self.pending_by_client.insert(row.text("key")?, pending);
                }
                _ => {}
            }
        }
        self.other_clients =
            clients_with_pending.saturating_sub(self.pending_by_client.len() as u64);
        self.waiting_in_turn = Some(self.waiting);
        self.head = ChainHead::from_last(head);
        Ok(())
    }

    /// Reads, on PostgreSQL and in the writers' turn, whether any replica's job waits (after a
    /// batch's claims; a batch that submits reads it with its counts).
    async fn read_waiting(&mut self, conn: &mut sqlx::PgConnection) -> Result<(), StoreError> {
        // Planned at each execution (`Db::may_keep_plans`).
        let any: bool = sqlx::query_scalar(include_str!("sql/postgres/any_waiting.sql"))
            .persistent(false)
            .fetch_one(&mut *conn)
            .await?;
        self.waiting = i64::from(any);
        self.waiting_in_turn = Some(self.waiting);
        Ok(())
    }

    /// Whether no job seems to wait, for the API's hint ([`WriterHandle::nothing_waiting`]).
    fn nothing_waits(&self) -> bool {
        self.waiting_in_turn.unwrap_or(self.waiting) == 0
    }

    /// A job now waits (`+1`: submitted, retry scheduled, rescued) or no longer does (`-1`:
    /// claimed, cancelled, expired).
    fn count_waiting(&mut self, delta: i64) {
        // Exact on SQLite. On PostgreSQL the count read is only whether any job waits, which
        // the batch's claims may take below 0: 0 there means nothing seems to wait.
        debug_assert!(
            self.waiting_in_turn.is_some() || self.waiting + delta >= 0,
            "SQLite's count of waiting jobs went below 0"
        );
        self.waiting = (self.waiting + delta).max(0);
    }

    /// A job became pending (`+1`) or terminal (`-1`).
    fn count(&mut self, job: &Job, delta: i64) {
        self.pending += delta;
        *self
            .pending_by_tenant
            .entry(job.tenant.clone())
            .or_default() += delta;
        self.count_client(&job.client_id, delta);
        self.client_journal.push((job.client_id.clone(), delta));
    }

    fn count_client(&mut self, client_id: &str, delta: i64) {
        let count = self
            .pending_by_client
            .entry(client_id.to_string())
            .or_default();
        *count += delta;
        if *count <= 0 {
            self.pending_by_client.remove(client_id);
        }
    }

    /// Whether `client_id` has jobs pending.
    fn has_pending(&self, client_id: &str) -> bool {
        self.pending_by_client.contains_key(client_id)
    }

    /// Distinct client ids with jobs pending.
    fn pending_clients(&self) -> u64 {
        let held = u64::try_from(self.pending_by_client.len()).unwrap_or(u64::MAX);
        held.saturating_add(self.other_clients)
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            head: self.head.clone(),
            pending: self.pending,
            waiting: self.waiting,
            waiting_in_turn: self.waiting_in_turn,
            pending_by_tenant: self.pending_by_tenant.clone(),
            journal_len: self.client_journal.len(),
        }
    }

    /// Undoes everything since `snapshot` (after a rollback).
    fn restore(&mut self, snapshot: Snapshot) {
        self.head = snapshot.head;
        self.pending = snapshot.pending;
        self.waiting = snapshot.waiting;
        self.waiting_in_turn = snapshot.waiting_in_turn;
        self.pending_by_tenant = snapshot.pending_by_tenant;
        while self.client_journal.len() > snapshot.journal_len {
            if let Some((client_id, delta)) = self.client_journal.pop() {
                self.count_client(&client_id, -delta);
            }
        }
    }

    /// The batch committed: its changes stay.
    fn committed(&mut self) {
        self.client_journal.clear();
    }

    fn pending_of(&self, tenant: &str) -> u64 {
        u64::try_from(self.pending_by_tenant.get(tenant).copied().unwrap_or(0)).unwrap_or(0)
    }
}

/// Sends changes to the writer task.
#[derive(Debug, Clone)]
pub(super) struct WriterHandle {
    requests: mpsc::Sender<Command>,
    /// Whether the writer's last transaction committed (or it has not written yet).
    healthy: Arc<AtomicBool>,
    /// Whether no job waited after the writer's last commit, as far as it knows.
    nothing_waiting: Arc<AtomicBool>,
}

impl WriterHandle {
    /// Prepares the writer task on `conn`; the caller spawns the returned future.
    pub(super) async fn start(
        mut conn: Conn,
        shared: Option<Shared>,
        keys: Arc<KeyRing>,
        feed: Arc<JobFeed>,
        metrics: Arc<Metrics>,
    ) -> Result<(WriterHandle, WriterTask), StoreError> {
        let tracked = Tracked::read(&mut conn, keys).await?;
        let (requests, receiver) = mpsc::channel(4 * MAX_BATCH);
        let healthy = Arc::new(AtomicBool::new(true));
        let nothing_waiting = Arc::new(AtomicBool::new(tracked.nothing_waits()));
        let writer = Writer {
            conn,
            broken: false,
            shared,
            tracked,
            feed,
            metrics,
            healthy: Arc::clone(&healthy),
            nothing_waiting: Arc::clone(&nothing_waiting),
        };
        let task = if writer.shared.is_none() {
            WriterTask(Box::pin(on_own_thread(writer.run(receiver))))
        } else {
            WriterTask(Box::pin(writer.run(receiver)))
        };
        Ok((
            WriterHandle {
                requests,
                healthy,
                nothing_waiting,
            },
            task,
        ))
    }

    /// Whether no job waited (queued, or for a retry) after the last commit, as far as this
    /// writer knows: exact on SQLite; on a database shared with other replicas, as last read
    /// in a turn (true before the first). A hint either way: the writer starts a job at
    /// submission only if nothing waits when it inserts it.
    pub(super) fn nothing_waiting(&self) -> bool {
        self.nothing_waiting.load(Ordering::Acquire)
    }

    /// Whether the writer's last transaction committed: false while the database does not
    /// take its changes (readiness reports it).
    pub(super) fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Sends the command `make` builds around its responder, and waits for its commit.
    pub(super) async fn apply<T>(
        &self,
        make: impl FnOnce(Responder<T>) -> Command,
    ) -> Result<T, StoreError> {
        let (reply, answer) = Responder::new();
        self.requests
            .send(make(reply))
            .await
            .map_err(|_| StoreError::Unavailable("the writer has stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable("the writer stopped mid-change".into()))?
    }
}

/// The writer task: applies every change until the last [`Store`](super::Store) handle is
/// dropped. [`Store::open`](super::Store::open) returns it unspawned, so that the daemon runs it
/// under supervision (its end before shutdown is a failure).
#[must_use = "the store writes nothing until its writer task is spawned"]
pub struct WriterTask(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>);

impl std::fmt::Debug for WriterTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WriterTask")
    }
}

impl WriterTask {
    /// This task and `other` as one: it ends when either does (the writer when the last store
    /// handle is dropped; `other`, such as the change listener, only if it fails).
    pub(super) fn alongside(
        self,
        other: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> WriterTask {
        WriterTask(Box::pin(async move {
            tokio::select! {
                () = self => {}
                () = other => {}
            }
        }))
    }
}

impl std::future::Future for WriterTask {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        self.0.as_mut().poll(cx)
    }
}

/// Runs the SQLite writer to its end on a thread of its own, and ends with it. Its statements
/// run in place on that thread ([`super::direct`]): a commit's `fsync` blocks the writer alone,
/// never a runtime thread. The future runs in the daemon's runtime's context, so what it starts
/// after a commit (an attempt, [`OnStarted`]) is spawned there, and waking it costs one thread
/// wake-up per batch; it cannot wait on tokio's timers or sockets (a current-thread runtime
/// drives those only in its own `block_on`), which the SQLite writer never does.
///
/// As a task would: a panic of the writer is resumed here, and dropping this future stops the
/// writer at its next wait for changes (its connection, closed, rolls back anything open).
async fn on_own_thread(writer: impl std::future::Future<Output = ()> + Send + 'static) {
    let runtime = tokio::runtime::Handle::current();
    let (done, finished) = oneshot::channel();
    // Dropped with this future: the writer stops.
    let (_stop, stopped) = oneshot::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("sqlite-writer".to_string())
        .spawn(move || {
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                runtime.block_on(async move {
                    tokio::select! {
                        () = writer => {}
                        _ = stopped => {}
                    }
                });
            }));
            let _ = done.send(ran);
        });
    if let Err(error) = spawned {
        tracing::error!(%error, "cannot start the writer's thread");
        return;
    }
    if let Ok(Err(panic)) = finished.await {
        std::panic::resume_unwind(panic);
    }
}

/// What the writer needs on a database shared with other replicas (PostgreSQL).
#[derive(Clone)]
pub(super) struct Shared {
    /// To reconnect when the writer's connection is lost (a restart, a fail-over).
    pub(super) options: PgConnectOptions,
    /// This process, as its `NOTIFY` payloads name it, so its listener skips its own changes.
    pub(super) instance: Arc<str>,
    /// A transaction, waiting for the turn included, taking longer than this is abandoned and
    /// its connection replaced (a half-open connection would otherwise hang the writer).
    pub(super) batch_timeout: std::time::Duration,
}

impl std::fmt::Debug for Shared {
    // The connect options hold the database password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("instance", &self.instance)
            .field("batch_timeout", &self.batch_timeout)
            .finish_non_exhaustive()
    }
}

/// How long a reconnection may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The writer task's state.
struct Writer {
    conn: Conn,
    /// The connection's state is unknown (a transaction abandoned mid-statement): replace it.
    broken: bool,
    shared: Option<Shared>,
    healthy: Arc<AtomicBool>,
    nothing_waiting: Arc<AtomicBool>,
    tracked: Tracked,
    feed: Arc<JobFeed>,
    metrics: Arc<Metrics>,
}

impl Writer {
    async fn run(mut self, mut receiver: mpsc::Receiver<Command>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while receiver.recv_many(&mut batch, MAX_BATCH).await > 0 {
            let mut commands = std::mem::take(&mut batch);
            // Submissions together, then outcomes: each run is one statement, so a batch costs
            // a few statements however its changes arrived. Changes of different kinds never
            // touch the same job in one batch (an outcome needs its job committed running
            // first), and other changes keep their order.
            commands.sort_by_key(Command::run_order);
            match self.apply_batch(&mut commands).await {
                Ok(effects) => {
                    for command in &mut commands {
                        command.committed();
                    }
                    for command in &mut commands {
                        command.respond();
                    }
                    for effects in &effects {
                        publish(effects, &self.feed, &self.metrics);
                    }
                }
                Err(error) if self.shared.is_some() && error.is_transient() => {
                    // The shared database is unreachable or failing over: every change of the
                    // batch would fail the same way, one connection attempt each.
                    tracing::warn!(%error, changes = commands.len(), "batch failed; the database is unavailable");
                    for command in &mut commands {
                        command.fail(StoreError::Unavailable(error.to_string()));
                    }
                }
                Err(error) => {
                    // Something failed: retry each change alone, so only the bad one fails.
                    tracing::warn!(%error, changes = commands.len(), "batch rolled back; retrying its changes one by one");
                    for command in &mut commands {
                        let single = std::slice::from_mut(command);
                        match self.apply_batch(single).await {
                            Ok(effects) => {
                                command.committed();
                                command.respond();
                                for effects in &effects {
                                    publish(effects, &self.feed, &self.metrics);
                                }
                            }
                            Err(error) => command.fail(error),
                        }
                    }
                }
            }
        }
        let closed = match self.conn {
            Db::Sqlite(conn) => conn.close(),
            Db::Postgres(conn) => conn.close().await,
        };
        if let Err(error) = closed {
            tracing::warn!(%error, "closing the writing connection failed");
        }
    }

    /// Applies `commands` in one transaction. `Ok` when it committed, with each change's
    /// effects (its result is kept in its responder); `Err` when it did not, after which the
    /// tracked facts are as they were before.
    async fn apply_batch(&mut self, commands: &mut [Command]) -> Result<Vec<Effects>, StoreError> {
        let before = self.tracked.snapshot();
        let result = match self.shared.as_ref().map(|shared| shared.batch_timeout) {
            Some(limit) => match tokio::time::timeout(limit, self.try_batch(commands)).await {
                Ok(result) => result,
                Err(_) => {
                    self.broken = true;
                    Err(StoreError::Unavailable(format!(
                        "a transaction took longer than {} ms",
                        limit.as_millis()
                    )))
                }
            },
            None => self.try_batch(commands).await,
        };
        self.healthy.store(
            result
                .as_ref()
                .map_or_else(|error| !error.is_transient(), |_| true),
            Ordering::Relaxed,
        );
        match result {
            Ok(results) => {
                self.tracked.committed();
                self.nothing_waiting
                    .store(self.tracked.nothing_waits(), Ordering::Release);
                Ok(results)
            }
            Err(error) => {
                // The rollback undid exactly what the batch did. On SQLite nothing else writes:
                // the facts as they stood before the batch are the facts now. On PostgreSQL the
                // next transaction reads them again.
                self.rollback().await;
                self.tracked.restore(before);
                Err(error)
            }
        }
    }

    async fn try_batch(&mut self, commands: &mut [Command]) -> Result<Vec<Effects>, StoreError> {
        let count = commands.len();
        let conn = &mut self.conn;
        let tracked = &mut self.tracked;
        // SQLite: take the write lock now rather than at the first write. PostgreSQL: wait
        // for this replica's turn in the same round trip (`take_turn`).
        conn.run(match conn {
            Db::Sqlite(_) => "BEGIN IMMEDIATE",
            Db::Postgres(_) => concat!("BEGIN;\n", include_str!("sql/postgres/lock_chain.sql")),
        })
        .await?;
        if let Db::Postgres(_) = conn {
            take_turn(conn, tracked, commands).await?;
        }
        let mut results: Vec<Effects> = Vec::with_capacity(count);
        let mut written = 0;
        let mut next = 0;
        while next < count {
            // A run of submissions is inserted with one statement.
            let (jobs, replies): (Vec<_>, Vec<_>) = commands[next..]
                .iter_mut()
                .map_while(Command::submission)
                .unzip();
            if !jobs.is_empty() {
                next += jobs.len();
                let outcomes = submit_many(conn, tracked, &jobs).await?;
                for ((reply, slot), (outcome, claim, effects)) in replies.into_iter().zip(outcomes)
                {
                    *slot = claim.map(Box::new);
                    results.push(reply.keep(Ok((outcome, effects)))?);
                }
                continue;
            }
            // So is a run of recorded outcomes, one statement per kind.
            let (records, replies): (Vec<_>, Vec<_>) = commands[next..]
                .iter_mut()
                .map_while(Command::record)
                .unzip();
            if !records.is_empty() {
                next += records.len();
                let outcomes = record_many(conn, tracked, &records).await?;
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    results.push(reply.keep(Ok(outcome))?);
                }
                continue;
            }
            let command = &mut commands[next];
            if matches!(command, Command::PruneStep { .. }) {
                // Retention reads the events table: write what is chained so far first.
                written = flush_events(conn, &results, written).await?;
            }
            results.push(apply(conn, tracked, command).await?);
            next += 1;
        }
        match &self.shared {
            Some(shared) => {
                flush_events_announcing(conn, tracked, shared, &results, written).await?;
            }
            None => {
                flush_events(conn, &results, written).await?;
            }
        }
        let started = Instant::now();
        conn.run("COMMIT").await?;
        self.metrics
            .sqlite_commit
            .observe(started.elapsed().as_secs_f64());
        self.metrics.sqlite_batch.observe(count as f64);
        Ok(results)
    }

    /// Ends a failed transaction. A connection that cannot even roll back is replaced: on
    /// SQLite one still inside its transaction ([`super::direct::DirectConn::roll_back`]), on
    /// PostgreSQL one whose server restarted or failed over. If that fails too, the next batch
    /// fails the same way and tries again.
    async fn rollback(&mut self) {
        let Some(shared) = &self.shared else {
            if let Db::Sqlite(conn) = &mut self.conn
                && let Err(error) = conn.roll_back()
            {
                // The next batch fails the same way and tries again.
                tracing::error!(%error, "cannot open the writing connection again");
            }
            return;
        };
        // A connection that cannot roll back, or one to a server that turned read-only (a
        // demoted primary after a fail-over), is replaced.
        let usable = !self.broken
            && matches!(
                tokio::time::timeout(CONNECT_TIMEOUT, self.conn.run("ROLLBACK")).await,
                Ok(Ok(()))
            )
            && match &mut self.conn {
                Db::Postgres(conn) => matches!(
                    tokio::time::timeout(
                        CONNECT_TIMEOUT,
                        sqlx::query_scalar::<_, bool>(include_str!("sql/postgres/in_recovery.sql"))
                            .fetch_one(&mut *conn),
                    )
                    .await,
                    Ok(Ok(false))
                ),
                Db::Sqlite(_) => true,
            };
        if usable {
            return;
        }
        tracing::warn!("the writing connection is lost; reconnecting");
        match tokio::time::timeout(CONNECT_TIMEOUT, shared.options.connect()).await {
            Ok(Ok(conn)) => {
                self.conn = Db::Postgres(conn);
                self.broken = false;
                tracing::info!("the writing connection is back");
            }
            Ok(Err(error)) => tracing::error!(%error, "cannot reconnect the writing connection"),
            Err(_) => tracing::error!("cannot reconnect the writing connection: timed out"),
        }
    }
}

/// On a shared database, once the transaction has begun with this replica's turn (the lock on
/// audit_chain's row, `lock_chain.sql`, sent with its `BEGIN`, held to the commit): reads what
/// the other replicas left, the chain's head and, for a batch that submits, the counts its
/// submissions are admitted against and whether any job waits.
async fn take_turn(
    conn: &mut Conn,
    tracked: &mut Tracked,
    commands: &[Command],
) -> Result<(), StoreError> {
    let Db::Postgres(pg) = conn else {
        return Ok(());
    };
    let (mut tenants, mut clients) = (Vec::new(), Vec::new());
    for command in commands {
        if let Command::Submit { job, .. } = command {
            tenants.push(job.tenant.as_str());
            clients.push(job.request.client_id.as_str());
        }
    }
    if tenants.is_empty() {
        tracked.head = ChainHead::read(conn).await?;
    } else {
        tracked
            .read_turn_for_submissions(pg, &tenants, &clients)
            .await?;
    }
    Ok(())
}

/// Before a shared database's commit: the audit events of `results[from..]`, and in the same
/// statement the chain's high-water mark (so a cut tail shows) and a `NOTIFY` per changed job
/// for the other replicas, delivered at commit.
async fn flush_events_announcing(
    conn: &mut Conn,
    tracked: &Tracked,
    shared: &Shared,
    results: &[Effects],
    from: usize,
) -> Result<(), StoreError> {
    let records: Vec<&AuditRecord> = results[from..]
        .iter()
        .flat_map(|effects| effects.events.iter())
        .collect();
    let payloads: Vec<String> = results
        .iter()
        .flat_map(|effects| &effects.publish)
        .map(|job| super::listener::payload(&shared.instance, job))
        .collect();
    let announcement = audit::Announcement {
        last_seq: tracked.head.seq(),
        payloads: serde_json::to_string(&payloads)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?,
    };
    audit::insert_records_announcing(conn, &records, &announcement).await?;
    Ok(())
}

/// After a commit: the audit events go to the log and the metrics, the jobs to the feed.
fn publish(effects: &Effects, feed: &JobFeed, metrics: &Metrics) {
    for record in &effects.events {
        audit::emit(record, metrics);
    }
    for job in &effects.publish {
        feed.publish(job);
    }
}

/// What one change returns inside the transaction: its result and its effects.
type Applied<T> = Result<(T, Effects), StoreError>;

/// Writes the audit events of `results[from..]`; returns how many results are now written.
async fn flush_events(
    conn: &mut Conn,
    results: &[Effects],
    from: usize,
) -> Result<usize, StoreError> {
    let records: Vec<&AuditRecord> = results[from..]
        .iter()
        .flat_map(|effects| effects.events.iter())
        .collect();
    audit::insert_records(conn, &records).await?;
    Ok(results.len())
}

/// Applies one change inside the open transaction.
async fn apply(
    conn: &mut Conn,
    tracked: &mut Tracked,
    command: &mut Command,
) -> Result<Effects, StoreError> {
    match command {
        Command::Submit {
            job,
            now,
            reply,
            claim,
            ..
        } => {
            let mut outcomes = submit_many(conn, tracked, &[(&*job, *now)]).await?;
            let (outcome, started, effects) = outcomes.pop().ok_or_else(|| {
                StoreError::Corrupt("a submission produced no outcome".to_string())
            })?;
            *claim = started.map(Box::new);
            reply.keep(Ok((outcome, effects)))
        }
        Command::Cancel {
            id,
            actor,
            now,
            reply,
        } => reply.keep(cancel(conn, tracked, *id, actor, *now).await),
        Command::Claim {
            candidates,
            owner,
            lease_until,
            now,
            reply,
        } => reply.keep(claim(conn, tracked, candidates, owner, *lease_until, *now).await),
        Command::Record {
            lease,
            record,
            now,
            reply,
            ..
        } => {
            let mut outcomes = record_many(conn, tracked, &[(&*lease, &*record, *now)]).await?;
            let outcome = outcomes.pop().ok_or_else(|| {
                StoreError::Corrupt("a recorded outcome produced no result".to_string())
            })?;
            reply.keep(Ok(outcome))
        }
        Command::Expire { now, reply } => {
            let now = *now;
            let rows = on_backend!(&mut *conn, "expire_overdue", |query, conn| {
                let rows = query
                    .bind(now.0)
                    .bind(SWEEP_BATCH)
                    .fetch_all(&mut *conn)
                    .await?;
                decode_all(&rows)?
            });
            reply.keep(sweep(tracked, rows, AuditKind::JobExpired, now))
        }
        Command::Rescue {
            lease_cutoff,
            max_attempts,
            now,
            reply,
        } => {
            let (now, max_attempts) = (*now, i64::from(*max_attempts));
            let rows = on_backend!(&mut *conn, "rescue_leases", |query, conn| {
                let rows = query
                    .bind(now.0)
                    .bind(lease_cutoff.0)
                    .bind(max_attempts)
                    .bind(SWEEP_BATCH)
                    .fetch_all(&mut *conn)
                    .await?;
                decode_all(&rows)?
            });
            reply.keep(sweep(tracked, rows, AuditKind::AttemptUnknown, now))
        }
        Command::PruneStep { cutoff, now, reply } => {
            reply.keep(prune_step(conn, tracked, *cutoff, *now).await)
        }
        Command::Reencrypt { after, reply } => reply.keep(reencrypt(conn, tracked, *after).await),
        Command::Sign { key, now, reply } => {
            let signed = checkpoints::sign(conn, &tracked.head, key, *now).await?;
            reply.keep(Ok((signed, Effects::default())))
        }
        Command::MarkDelivered {
            job_ids,
            now,
            reply,
        } => {
            let ids = serde_json::to_string(job_ids)
                .map_err(|error| StoreError::Corrupt(error.to_string()))?;
            let rows = on_backend!(&mut *conn, "mark_delivered", |query, conn| {
                query
                    .bind(ids)
                    .bind(now.0)
                    .execute(&mut *conn)
                    .await?
                    .rows_affected()
            });
            reply.keep(Ok((rows, Effects::default())))
        }
        Command::EraseTokens {
            now,
            delivered_before,
            reply,
        } => {
            let rows = on_backend!(&mut *conn, "erase_tokens", |query, conn| {
                query
                    .bind(now.0)
                    .bind(delivered_before.0)
                    .bind(SWEEP_BATCH)
                    .fetch_all(&mut *conn)
                    .await?
                    .len()
            });
            let forgotten = on_backend!(&mut *conn, "forget_deliveries", |query, conn| {
                query
                    .bind(delivered_before.0)
                    .bind(SWEEP_BATCH)
                    .execute(&mut *conn)
                    .await?
                    .rows_affected()
            });
            reply.keep(Ok(((rows as u64, forgotten), Effects::default())))
        }
    }
}

/// Reads job rows.
fn decode_all(rows: &[impl Columns]) -> sqlx::Result<Vec<JobRow>> {
    rows.iter().map(JobRow::decode).collect()
}

/// Chains `events` after the head. They are written with the rest of the batch's events,
/// before its commit ([`audit::insert_records`]).
fn append(tracked: &mut Tracked, events: Vec<AuditEvent<'_>>) -> Vec<AuditRecord> {
    events
        .into_iter()
        .map(|event| event.chain(&mut tracked.head))
        .collect()
}

/// Rows per multi-row job INSERT ([`INSERT_COLUMNS`] parameters each).
const SUBMIT_CHUNK: usize = 100;
/// Values per inserted job (`insert_jobs_head.sql`).
const INSERT_COLUMNS: usize = 17;
/// The detail of the `attempt.started` event of a job its submission started.
const STARTED_AT_SUBMISSION: &str =
    "started at submission (nothing waiting, a worker slot free, no rate limit)";

/// Commits a run of submissions: the new ones with one INSERT per [`SUBMIT_CHUNK`] (a known
/// idempotency key inserts nothing), then, only for those not inserted, a lookup that tells a
/// resubmission from a reused key. Submissions beyond the queue bound are not inserted.
async fn submit_many(
    conn: &mut Conn,
    tracked: &mut Tracked,
    submissions: &[(&NewJobOwned, UnixMillis)],
) -> Result<Vec<(SubmitOutcome, Option<Claim>, Effects)>, StoreError> {
    let mut pending = tracked.pending;
    let mut by_tenant: HashMap<&str, u64> = HashMap::new();
    // Client ids this batch adds to those with pending jobs.
    let mut new_clients: std::collections::HashSet<&str> = std::collections::HashSet::new();
    // For each submission, the bound that refuses it, if any: the tenant's own first, so a
    // tenant is told about its own bound rather than the whole queue.
    let refusals: Vec<Option<QueueFull>> = submissions
        .iter()
        .map(|(new, _)| {
            let tenant_pending = by_tenant
                .entry(new.tenant.as_str())
                .or_insert_with(|| tracked.pending_of(&new.tenant));
            let refusal = match new.max_pending_tenant {
                Some(limit) if *tenant_pending >= limit => Some(QueueFull::Tenant {
                    pending: *tenant_pending,
                    limit,
                }),
                _ if u64::try_from(pending).unwrap_or(0) >= new.max_pending => {
                    Some(QueueFull::Daemon)
                }
                _ if !tracked.has_pending(&new.request.client_id)
                    && !new_clients.contains(new.request.client_id.as_str())
                    && tracked.pending_clients() + new_clients.len() as u64
                        >= new.max_pending_clients =>
                {
                    Some(QueueFull::Clients)
                }
                _ => None,
            };
            if refusal.is_none() {
                pending += 1;
                *tenant_pending += 1;
                if !tracked.has_pending(&new.request.client_id) {
                    new_clients.insert(new.request.client_id.as_str());
                }
            }
            refusal
        })
        .collect();
    let admitted: Vec<bool> = refusals.iter().map(Option::is_none).collect();
    // Which admitted submissions start their first attempt now: those that asked (a worker
    // slot is reserved for them) while no job waits, counting the ones this batch queues
    // ahead of them. The API asked on a hint; this is the exact check, so a job never
    // overtakes a waiting one.
    let mut waiting = tracked.waiting;
    let starts: Vec<bool> = submissions
        .iter()
        .zip(&admitted)
        .map(|((new, _), &admitted)| {
            let start = admitted && new.start.is_some() && waiting == 0;
            if admitted && !start {
                waiting += 1;
            }
            start
        })
        .collect();
    // The row id of each job inserted, by job id.
    let mut inserted: HashMap<String, i64> = HashMap::new();
    let to_insert: Vec<(&(&NewJobOwned, UnixMillis), bool)> = submissions
        .iter()
        .zip(&admitted)
        .zip(&starts)
        .filter_map(|((submission, admitted), &start)| admitted.then_some((submission, start)))
        .collect();
    for chunk in to_insert.chunks(SUBMIT_CHUNK) {
        let (head, tail) = match conn {
            Db::Sqlite(_) => (
                include_str!("sql/sqlite/insert_jobs_head.sql"),
                include_str!("sql/sqlite/insert_jobs_tail.sql"),
            ),
            Db::Postgres(_) => (
                include_str!("sql/postgres/insert_jobs_head.sql"),
                include_str!("sql/postgres/insert_jobs_tail.sql"),
            ),
        };
        let mut sql = String::from(head.trim_end());
        conn.push_tuples(&mut sql, 0, chunk.len(), INSERT_COLUMNS);
        sql.push(' ');
        sql.push_str(tail.trim());
        let rows = on_backend!(&mut *conn, generated sql, |query, conn| {
            let mut query = query;
            for ((new, now), started) in chunk {
                let request = &new.request;
                let job_id = new.job_id.to_string();
                let start = new.start.as_ref().filter(|_| *started);
                query = query
                    .bind(job_id.clone())
                    .bind(&new.tenant)
                    .bind(&request.client_id)
                    .bind(&request.idempotency_key)
                    .bind(&request.request_digest)
                    .bind(
                        tracked
                            .keys
                            .seal(request.code.expose_secret(), &job_id, "code"),
                    )
                    .bind(tracked.keys.seal(
                        request.code_verifier.expose_secret(),
                        &job_id,
                        "code_verifier",
                    ))
                    .bind(&request.state)
                    .bind(if start.is_some() { "running" } else { "queued" })
                    .bind(now.0)
                    .bind(now.0)
                    .bind(start.is_none().then_some(now.0))
                    .bind(now.saturating_add(new.ttl).0)
                    .bind(&new.code_fingerprint)
                    .bind(i64::from(start.is_some()))
                    .bind(start.map(|start| start.owner.as_ref()))
                    .bind(start.map(|start| UnixMillis::now().saturating_add(start.duration).0));
            }
            let rows = query.fetch_all(&mut *conn).await?;
            rows.iter()
                .map(|row| Ok((row.text("job_id")?, row.int("id")?)))
                .collect::<sqlx::Result<Vec<_>>>()?
        });
        inserted.extend(rows);
    }
    let mut results = Vec::with_capacity(submissions.len());
    for (((new, now), refusal), started) in submissions.iter().zip(refusals).zip(starts) {
        let request = &new.request;
        if let Some(row_id) = inserted.remove(&new.job_id.to_string()) {
            let job = inserted_job(new, started, *now);
            let mut events = vec![AuditEvent::new(&job, AuditKind::JobSubmitted, *now)];
            if job.state == JobState::Running {
                events.push(
                    AuditEvent::new(&job, AuditKind::AttemptStarted, *now)
                        .attempt(job.attempts)
                        .detail(STARTED_AT_SUBMISSION.to_string()),
                );
            }
            let events = append(tracked, events);
            tracked.count(&job, 1);
            if job.state.is_waiting() {
                tracked.count_waiting(1);
            }
            let (outcome, claim) = match &new.start {
                Some(start) if job.state == JobState::Running => (
                    SubmitOutcome::Started(job.clone()),
                    Some(Claim {
                        lease: Lease {
                            row_id,
                            job_id: job.id,
                            owner: Arc::clone(&start.owner),
                            attempt: job.attempts,
                        },
                        job: job.clone(),
                        code: request.code.clone(),
                        code_verifier: request.code_verifier.clone(),
                    }),
                ),
                _ => (SubmitOutcome::Created(job.clone()), None),
            };
            results.push((
                outcome,
                claim,
                Effects {
                    events,
                    publish: vec![job],
                },
            ));
            continue;
        }
        let existing = on_backend!(&mut *conn, "find_by_key", |query, conn| {
            let row = query
                .bind(&new.tenant)
                .bind(&request.idempotency_key)
                .fetch_optional(&mut *conn)
                .await?;
            row.as_ref().map(JobRow::decode).transpose()?
        });
        let outcome = match existing {
            Some(row) if row.request_digest == request.request_digest => {
                SubmitOutcome::Existing(row.into_job(Some(&tracked.keys))?)
            }
            Some(_) => SubmitOutcome::KeyConflict,
            None if refusal.is_some() => {
                SubmitOutcome::QueueFull(refusal.unwrap_or(QueueFull::Daemon))
            }
            None => {
                return Err(StoreError::Corrupt(format!(
                    "job {} was neither inserted nor found by its key",
                    new.job_id
                )));
            }
        };
        results.push((outcome, None, Effects::default()));
    }
    Ok(results)
}

/// A job as its submission inserted it (`insert_jobs_head.sql`, with the columns' defaults),
/// built from the values bound rather than read back: queued, or running its first attempt.
fn inserted_job(new: &NewJobOwned, started: bool, now: UnixMillis) -> Job {
    let request = &new.request;
    Job {
        id: new.job_id,
        tenant: new.tenant.clone(),
        client_id: request.client_id.clone(),
        state: if started {
            JobState::Running
        } else {
            JobState::Queued
        },
        attempts: u32::from(started),
        created_at: now,
        updated_at: now,
        next_attempt_at: (!started).then_some(now),
        expires_at: now.saturating_add(new.ttl),
        token: None,
        failure_reason: None,
        last_http_status: None,
        failure_detail: None,
        state_param: request.state.clone(),
        idempotency_key: request.idempotency_key.clone(),
        outcome_unknown: false,
        version: 1,
        code_fingerprint: Some(new.code_fingerprint.clone()),
    }
}

async fn cancel(
    conn: &mut Conn,
    tracked: &mut Tracked,
    id: JobId,
    actor: &str,
    now: UnixMillis,
) -> Applied<CancelOutcome> {
    let row = on_backend!(&mut *conn, "cancel_job", |query, conn| {
        let row = query
            .bind(id.to_string())
            .bind(now.0)
            .fetch_optional(&mut *conn)
            .await?;
        row.as_ref().map(JobRow::decode).transpose()?
    });
    let Some(row) = row else {
        let current = on_backend!(&mut *conn, "get_job", |query, conn| {
            let row = query
                .bind(id.to_string())
                .fetch_optional(&mut *conn)
                .await?;
            row.as_ref().map(JobRow::decode).transpose()?
        });
        let outcome = match current {
            Some(row) => CancelOutcome::NotCancellable(row.into_job(Some(&tracked.keys))?),
            None => CancelOutcome::NotFound,
        };
        return Ok((outcome, Effects::default()));
    };
    let job = row.into_job(Some(&tracked.keys))?;
    let events = append(
        tracked,
        vec![
            AuditEvent::new(&job, AuditKind::JobCancelled, now)
                .detail(format!("cancelled by tenant {actor:?}")),
        ],
    );
    tracked.count(&job, -1);
    tracked.count_waiting(-1);
    Ok((
        CancelOutcome::Cancelled(job.clone()),
        Effects {
            events,
            publish: vec![job],
        },
    ))
}

async fn claim(
    conn: &mut Conn,
    tracked: &mut Tracked,
    candidates: &[Candidate],
    owner: &Arc<str>,
    lease_until: UnixMillis,
    now: UnixMillis,
) -> Applied<Vec<Claim>> {
    let row_ids: Vec<i64> = candidates.iter().map(|c| c.row_id).collect();
    let ids = serde_json::to_string(&row_ids).expect("integers serialize");
    let keep_plans = conn.may_keep_plans();
    let rows = on_backend!(&mut *conn, "claim", |query, conn| {
        let rows = query
            .persistent(keep_plans)
            .bind(ids)
            .bind(owner.as_ref())
            .bind(lease_until.0)
            .bind(now.0)
            .fetch_all(&mut *conn)
            .await?;
        rows.iter()
            .map(JobRow::decode_claimed)
            .collect::<sqlx::Result<Vec<_>>>()?
    });
    let mut claims = Vec::with_capacity(rows.len());
    for mut row in rows {
        let row_id = row.id;
        let code = row.code.take();
        let code_verifier = row.code_verifier.take();
        let job = row.into_job(Some(&tracked.keys))?;
        let (Some(code), Some(code_verifier)) = (code, code_verifier) else {
            return Err(StoreError::Corrupt(format!(
                "job {} is claimable but its code or verifier is gone",
                job.id
            )));
        };
        let id = job.id.to_string();
        let unreadable = |error: crate::security::crypto::DecryptError| {
            StoreError::Corrupt(format!("job {id}: {error}"))
        };
        let code = tracked.keys.open(&code, &id, "code").map_err(unreadable)?;
        let code_verifier = tracked
            .keys
            .open(&code_verifier, &id, "code_verifier")
            .map_err(unreadable)?;
        claims.push(Claim {
            lease: Lease {
                row_id,
                job_id: job.id,
                owner: Arc::clone(owner),
                attempt: job.attempts,
            },
            job,
            code,
            code_verifier,
        });
    }
    let due: HashMap<i64, UnixMillis> = candidates.iter().map(|c| (c.row_id, c.due_at)).collect();
    let events = claims
        .iter()
        .map(|claim| {
            let waited = due.get(&claim.lease.row_id).map_or(0, |due| now.0 - due.0);
            AuditEvent::new(&claim.job, AuditKind::AttemptStarted, now)
                .attempt(claim.lease.attempt)
                .detail(format!(
                    "waited {waited} ms after falling due (worker and rate-limit permits)"
                ))
        })
        .collect();
    let events = append(tracked, events);
    tracked.count_waiting(-(claims.len() as i64));
    if let (Db::Postgres(pg), false) = (&mut *conn, claims.is_empty()) {
        // Whether these were the last: the hint that lets submissions start again.
        tracked.read_waiting(pg).await?;
    }
    let publish = claims.iter().map(|claim| claim.job.clone()).collect();
    Ok((claims, Effects { events, publish }))
}

/// Records a run of attempts' outcomes: one statement per kind (succeeded, retry, failed), each
/// row guarded by its lease; an outcome whose lease was lost (the job was rescued and claimed
/// again) writes nothing and answers `None`. Events are chained in the run's order.
async fn record_many(
    conn: &mut Conn,
    tracked: &mut Tracked,
    records: &[RecordParts<'_>],
) -> Result<Vec<(Option<Job>, Effects)>, StoreError> {
    let mut succeeded = Vec::new();
    let mut retries = Vec::new();
    let mut failed = Vec::new();
    let mut written: HashMap<i64, JobRow> = HashMap::with_capacity(records.len());
    for (lease, record, now) in records {
        let guard = (lease.row_id, lease.owner.as_ref(), i64::from(lease.attempt));
        match record {
            AttemptRecord::Succeeded {
                grant,
                http_status,
                outcome_unknown,
            } => {
                let lifetime =
                    std::time::Duration::from_secs(u64::try_from(grant.expires_in).unwrap_or(0));
                let access_token = tracked.keys.seal(
                    grant.access_token.expose_secret(),
                    &lease.job_id.to_string(),
                    "access_token",
                );
                if let Db::Sqlite(direct) = conn {
                    // On SQLite, where a statement costs no round trip, one per success:
                    // 3% fewer instructions per exchange than the batch as a JSON array
                    // (BENCHMARKS.md).
                    let row = direct
                        .statement(include_str!("sql/sqlite/finish_succeeded.sql"))
                        .bind(guard.0)
                        .bind(guard.1)
                        .bind(guard.2)
                        .bind(access_token)
                        .bind(&grant.token_type)
                        .bind(grant.expires_in)
                        .bind(now.saturating_add(lifetime).0)
                        .bind(i64::from(*http_status))
                        .bind(i64::from(*outcome_unknown))
                        .bind(now.0)
                        .fetch_optional(direct)
                        .await?;
                    if let Some(row) = row {
                        let row = JobRow::decode(&row)?;
                        written.insert(row.id, row);
                    }
                    continue;
                }
                succeeded.push(serde_json::json!({
                    "id": guard.0, "owner": guard.1, "attempt": guard.2,
                    "access_token": access_token,
                    "token_type": grant.token_type,
                    "expires_in": grant.expires_in,
                    "expires_at": now.saturating_add(lifetime).0,
                    "http_status": http_status,
                    "outcome_unknown": outcome_unknown,
                    "now": now.0,
                }));
            }
            AttemptRecord::RetryAt {
                at,
                http_status,
                detail,
                outcome_unknown,
                ..
            } => retries.push(serde_json::json!({
                "id": guard.0, "owner": guard.1, "attempt": guard.2,
                "at": at.0,
                "http_status": http_status,
                "detail": detail,
                "outcome_unknown": outcome_unknown,
                "now": now.0,
            })),
            AttemptRecord::Failed {
                reason,
                http_status,
                detail,
                outcome_unknown,
                ..
            } => failed.push(serde_json::json!({
                "id": guard.0, "owner": guard.1, "attempt": guard.2,
                "reason": reason.as_str(),
                "http_status": http_status,
                "detail": detail,
                "outcome_unknown": outcome_unknown,
                "now": now.0,
            })),
        }
    }
    let keep_plans = conn.may_keep_plans();
    macro_rules! finish {
        ($rows:expr, $name:literal) => {
            if !$rows.is_empty() {
                let json = serde_json::Value::Array($rows).to_string();
                let rows = on_backend!(&mut *conn, $name, |query, conn| {
                    let query = query.bind(json).persistent(keep_plans);
                    decode_all(&query.fetch_all(&mut *conn).await?)?
                });
                written.extend(rows.into_iter().map(|row| (row.id, row)));
            }
        };
    }
    if let (false, Db::Postgres(pg)) = (succeeded.is_empty(), &mut *conn) {
        // Only PostgreSQL gathers successes (SQLite recorded each above).
        let json = serde_json::Value::Array(succeeded).to_string();
        let rows = sqlx::query(include_str!("sql/postgres/finish_succeeded_many.sql"))
            .bind(json)
            .persistent(keep_plans)
            .fetch_all(&mut *pg)
            .await?;
        written.extend(decode_all(&rows)?.into_iter().map(|row| (row.id, row)));
    }
    finish!(retries, "finish_retry_many");
    finish!(failed, "finish_failed_many");
    let mut results = Vec::with_capacity(records.len());
    for (lease, record, now) in records {
        let Some(row) = written.remove(&lease.row_id) else {
            // The lease was lost: a newer attempt owns the job. Nothing is written.
            results.push((None, Effects::default()));
            continue;
        };
        let job = row.into_job(Some(&tracked.keys))?;
        let events = append(
            tracked,
            audit::attempt_events(&job, lease.attempt, record, *now),
        );
        if job.state.is_terminal() {
            tracked.count(&job, -1);
        }
        if job.state.is_waiting() {
            tracked.count_waiting(1);
        }
        results.push((
            Some(job.clone()),
            Effects {
                events,
                publish: vec![job],
            },
        ));
    }
    Ok(results)
}

fn sweep(
    tracked: &mut Tracked,
    rows: Vec<JobRow>,
    kind: AuditKind,
    now: UnixMillis,
) -> Applied<Vec<Job>> {
    let jobs = rows
        .into_iter()
        .map(|row| row.into_job(Some(&tracked.keys)))
        .collect::<Result<Vec<_>, _>>()?;
    let events = jobs
        .iter()
        .flat_map(|job| audit::sweep_events(job, kind, now))
        .collect();
    let events = append(tracked, events);
    for job in &jobs {
        if job.state.is_terminal() {
            tracked.count(job, -1);
        }
        // Expiry ends a waiting job; a rescue makes a running one wait again, or ends it.
        match kind {
            AuditKind::JobExpired => tracked.count_waiting(-1),
            _ if job.state.is_waiting() => tracked.count_waiting(1),
            _ => {}
        }
    }
    Ok((
        jobs.clone(),
        Effects {
            events,
            publish: jobs,
        },
    ))
}

/// Jobs re-sealed per transaction.
const RESEAL_BATCH: i64 = 1_000;

async fn reencrypt(
    conn: &mut Conn,
    tracked: &mut Tracked,
    after: i64,
) -> Applied<(u64, Option<i64>)> {
    type Sealed = (i64, String, [Option<String>; 3]);
    let rows: Vec<Sealed> = on_backend!(&mut *conn, "sealed_batch", |query, conn| {
        let rows = query
            .bind(after)
            .bind(RESEAL_BATCH)
            .fetch_all(&mut *conn)
            .await?;
        rows.iter()
            .map(|row| {
                Ok((
                    row.int("id")?,
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
    let keys = Arc::clone(&tracked.keys);
    let mut last = None;
    let count = rows.len() as u64;
    for (id, job_id, [code, code_verifier, access_token]) in rows {
        let reseal = |sealed: Option<String>, column: &str| -> Result<Option<String>, StoreError> {
            match sealed {
                Some(sealed) => {
                    let plain = keys
                        .open(&sealed, &job_id, column)
                        .map_err(|error| StoreError::Keys(format!("job {job_id}: {error}")))?;
                    Ok(Some(keys.seal(plain.expose_secret(), &job_id, column)))
                }
                None => Ok(None),
            }
        };
        let resealed = [
            reseal(code, "code")?,
            reseal(code_verifier, "code_verifier")?,
            reseal(access_token, "access_token")?,
        ];
        on_backend!(&mut *conn, "reseal", |query, conn| {
            let [code, code_verifier, access_token] = &resealed;
            query
                .bind(id)
                .bind(code)
                .bind(code_verifier)
                .bind(access_token)
                .execute(&mut *conn)
                .await?;
        });
        last = Some(id);
    }
    Ok(((count, last), Effects::default()))
}

/// Removes up to [`PRUNE_BATCH`] events older than `cutoff`, leaving a checkpoint that carries
/// the hash of the last removed event.
async fn prune_step(
    conn: &mut Conn,
    tracked: &mut Tracked,
    cutoff: UnixMillis,
    now: UnixMillis,
) -> Applied<Option<(u64, i64)>> {
    let nothing = || Ok((None, Effects::default()));
    // The events older than the cutoff: from the first event of the table to the last one.
    let bounds = on_backend!(&mut *conn, "event_seq_bounds", |query, conn| {
        let row = query
            .bind(i64::MIN)
            .bind(cutoff.0)
            .fetch_one(&mut *conn)
            .await?;
        (row.opt_int("hi")?, row.opt_int("lo")?)
    });
    let (Some(last_old), Some(first)) = bounds else {
        return nothing();
    };
    // A checkpoint already standing at the oldest old event is nothing to prune.
    if first == last_old
        && audit::event_at(conn, first)
            .await?
            .is_some_and(|e| e.kind == RecordKind::Known(AuditKind::Checkpoint))
    {
        return nothing();
    }
    let upto = last_old.min(first + PRUNE_BATCH - 1);
    let Some(last_removed) = audit::event_at(conn, upto).await? else {
        return Err(StoreError::Corrupt(format!(
            "audit event {upto} is missing; run audit verify"
        )));
    };
    let deleted = on_backend!(&mut *conn, "delete_events", |query, conn| {
        query.bind(upto).execute(&mut *conn).await?.rows_affected()
    });
    let detail = format!(
        "retention removed events up to seq {upto} (older than {} ms since the epoch)",
        cutoff.0
    );
    let checkpoint = AuditRecord {
        seq: upto,
        at: now.0.max(last_removed.at),
        job_id: String::new(),
        tenant: String::new(),
        client_id: String::new(),
        kind: AuditKind::Checkpoint.into(),
        attempt: None,
        http_status: None,
        detail: Some(detail),
        code_fingerprint: None,
        prev_hash: last_removed.hash.clone(),
        hash: last_removed.hash.clone(),
    };
    on_backend!(&mut *conn, "insert_checkpoint", |query, conn| {
        query
            .bind(checkpoint.seq)
            .bind(checkpoint.at)
            .bind(checkpoint.detail.as_deref())
            .bind(&checkpoint.hash)
            .execute(&mut *conn)
            .await?;
    });
    // The chain head moves only if the checkpoint replaced the last event.
    if tracked.head.seq() == upto {
        tracked.head = ChainHead::read(conn).await?;
    }
    // The checkpoint is written above, not with the batch's events; it is only logged.
    audit::emit_checkpoint(&checkpoint);
    Ok((Some((deleted, upto)), Effects::default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_on_the_writers_thread_reaches_whoever_runs_the_task() {
        let task = tokio::spawn(on_own_thread(async { panic!("the writer broke") }));
        let error = task
            .await
            .expect_err("the panic must not pass for a clean end");
        assert!(error.is_panic());
    }

    #[tokio::test]
    async fn dropping_the_task_stops_the_writer_on_its_thread() {
        /// Tells, when dropped, on which thread.
        struct Connection(Option<oneshot::Sender<String>>);
        impl Drop for Connection {
            fn drop(&mut self) {
                let thread = std::thread::current().name().unwrap_or("").to_string();
                let _ = self.0.take().map(|closed| closed.send(thread));
            }
        }
        let (started, running) = oneshot::channel();
        let (closed, dropped) = oneshot::channel();
        let task = tokio::spawn(on_own_thread(async move {
            let _connection = Connection(Some(closed));
            let _ = started.send(());
            std::future::pending::<()>().await;
        }));
        running.await.expect("the writer starts");
        task.abort();
        assert!(task.await.expect_err("aborted").is_cancelled());
        // Bounded only so that a regression fails instead of hanging the suite.
        let dropped = tokio::time::timeout(std::time::Duration::from_secs(60), dropped).await;
        assert_eq!(
            dropped.expect("the writer's state is dropped").unwrap(),
            "sqlite-writer"
        );
    }
}
