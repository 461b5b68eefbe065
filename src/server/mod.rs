//! The daemon's single entry point, [`run`]: `main` and the integration tests both call it with
//! listeners they bound and a shutdown future.

pub mod connections;
pub mod supervisor;

use connections::ConnectionLimits;
use supervisor::{Failures, FaultHooks, Supervisor, TaskFailure};

use std::{fs::File, future::Future, sync::Arc, time::Duration};

use anyhow::Context;
use tokio::{net::TcpListener, sync::watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    api::{
        ApiContext, AuditLogApi, TokenBrokerApi,
        grpc::{self, GrpcServices, Health},
    },
    audit::{checkpoint::SigningKey, fingerprint::Fingerprinter},
    config::{Config, redact_url},
    exchange::upstream::UpstreamClient,
    exchange::worker::Worker,
    ops::http::{self as ops_http, OpsState, Readiness},
    ops::metrics::{Metrics, ReplicaLabels},
    security::crypto::KeyRing,
    security::private_files,
    security::tenants::TenantRegistry,
    store::Deliveries,
    store::Store,
    store::feed::JobFeed,
};

/// The listeners the daemon serves on, bound by the caller (port 0 in tests).
#[derive(Debug)]
pub struct Listeners {
    pub grpc: TcpListener,
    /// For `/healthz` and `/readyz`; `None` when `server.metrics_listen` is empty.
    pub ops: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses in `config`.
    pub async fn bind(config: &Config) -> anyhow::Result<Listeners> {
        let grpc = TcpListener::bind(config.listen_addr())
            .await
            .with_context(|| format!("cannot listen on server.listen {}", config.listen_addr()))?;
        let ops = match config.metrics_addr() {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on server.metrics_listen {addr}"))?,
            ),
            None => None,
        };
        Ok(Listeners { grpc, ops })
    }
}

/// Runs the daemon until `shutdown` completes, then drains: stops claiming, answers waiting
/// calls with the job as it stands, and gives running attempts `server.shutdown_grace_ms` to
/// finish. Attempts still running then are abandoned; the next start recovers them.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let (_keep, reloads) = watch::channel(config.clone());
    run_with_reload(config, listeners, shutdown, reloads).await
}

/// How long a daemon whose task failed keeps answering as not ready before it drains, so that
/// load balancers and probes see `NOT_SERVING` before connections close.
const FAILURE_NOTICE: Duration = Duration::from_secs(1);
/// After a task failure, running attempts get at most this long to finish (less when
/// `server.shutdown_grace_ms` is shorter): the process must exit promptly to be restarted.
const FAILURE_GRACE: Duration = Duration::from_secs(5);
/// How long draining waits for the supervised tasks to notice the stop.
const TASK_STOP_BOUND: Duration = Duration::from_secs(5);

/// [`run`], also applying every configuration sent on `reloads` (SIGHUP in `main`): the rate
/// limits change in place, without dropping connections; other changed settings are reported
/// as needing a restart.
///
/// Returns an error when a long-lived task failed (see [`crate::server::supervisor`]): the caller
/// exits non-zero so that the process is restarted.
pub async fn run_with_reload(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    reloads: watch::Receiver<Config>,
) -> anyhow::Result<()> {
    let grpc_addr = listeners
        .grpc
        .local_addr()
        .context("cannot read the gRPC listener's address")?;
    let mut daemon = Daemon::start(config, grpc_addr, listeners.ops, reloads).await?;
    let (served, failure) = daemon.serve(listeners.grpc, shutdown).await;
    daemon.drain(failure.is_some()).await;
    if let Some(failure) = failure {
        anyhow::bail!("{failure}; exiting so the process is restarted");
    }
    served?;
    tracing::info!("token-broker stopped");
    Ok(())
}

/// A started daemon: storage open, the supervised tasks running, the gRPC services built.
struct Daemon {
    config: Config,
    /// Held for the daemon's lifetime: one daemon per database file.
    _lock: Option<File>,
    store: Store,
    worker: Arc<Worker>,
    tenants: Arc<TenantRegistry>,
    fingerprinter: Fingerprinter,
    /// Signs checkpoints of the audit chain, when audit.signing_key_file is set.
    signing_key: Option<Arc<SigningKey>>,
    api: TokenBrokerApi,
    /// Cancelled when draining begins: stops claiming, sweeps, reloads and waiting calls.
    stop: CancellationToken,
    /// Cancelled last, so `/readyz` answers 503 throughout the drain.
    ops_stop: CancellationToken,
    /// Cancelled (dropped) when the dispatcher has ended, however it ended.
    dispatcher_done: CancellationToken,
    attempts: TaskTracker,
    supervisor: Supervisor,
    failures: Failures,
    readiness: Readiness,
    /// The gRPC health status of the server and its services.
    health: Health,
    /// Where `/metrics`, `/healthz` and `/readyz` answer, for the start-up log line.
    ops_addr: Option<std::net::SocketAddr>,
    metrics: Arc<Metrics>,
    /// The gRPC listener's connection cap, fitted to the file limit.
    max_connections: usize,
}

impl Daemon {
    /// Takes the database lock, opens keys and storage, recovers dead leases, and starts every
    /// long-lived task under supervision.
    async fn start(
        config: Config,
        grpc_addr: std::net::SocketAddr,
        ops_listener: Option<TcpListener>,
        reloads: watch::Receiver<Config>,
    ) -> anyhow::Result<Daemon> {
        // A SQLite file is one daemon's; a PostgreSQL database is shared by replicas, each
        // with the same key files.
        let lock = match config.storage.is_postgres() {
            false => Some(lock_database(&config.storage.path)?),
            true => {
                require_shared_keys(&config)?;
                None
            }
        };
        let max_connections = connection_cap(&config);
        let key_path = config.fingerprint_key_path();
        let (fingerprinter, created) = Fingerprinter::load_or_create(&key_path)?;
        if created {
            tracing::warn!(
                path = %key_path.display(),
                "created a new audit fingerprint key; back it up with the database: fingerprints \
                 computed under another key match nothing"
            );
        }
        let signing_key = load_signing_key(&config)?;
        let key_file = config.key_file_path();
        let (keys, created) = KeyRing::load_or_create(&key_file)?;
        if created {
            tracing::warn!(
                path = %key_file.display(),
                "created a new encryption key for codes, verifiers and tokens at rest; back it up \
                 apart from the database: without it the stored secrets cannot be read"
            );
        }
        let feed = JobFeed::new();
        let metrics = Metrics::new();
        let (store, writer) = Store::open(
            &config.storage,
            Arc::new(keys),
            Arc::clone(&feed),
            Arc::clone(&metrics),
        )
        .await
        .with_context(|| match &config.storage.url {
            Some(url) => format!("cannot open storage.url {}", redact_url(url)),
            None => format!("cannot open storage.path {}", config.storage.path.display()),
        })?;
        store
            .agree_on_keys(&fingerprinter.fingerprint(crate::store::KEY_CANARY))
            .await
            .context("cannot start with these keys")?;
        let stop = CancellationToken::new();
        let (supervisor, failures) = Supervisor::new(stop.clone(), FaultHooks::from_env());
        supervisor.spawn("writer", writer);

        let upstream = UpstreamClient::new(&config.upstream).context("cannot set up upstream")?;
        let deliveries = Deliveries::new();
        let tenants = TenantRegistry::new(&config.tenants);
        if config.tenants.is_empty() {
            tracing::warn!("no tenants configured: authentication is off (loopback only)");
        }
        let attempts = TaskTracker::new();
        let worker = Arc::new(Worker::new(
            &config,
            store.clone(),
            upstream,
            Arc::clone(&feed),
            Arc::clone(&metrics),
            Arc::clone(&deliveries),
            stop.clone(),
            attempts.clone(),
        ));
        metrics
            .replica_info
            .get_or_create(&ReplicaLabels {
                replica: worker.owner().to_string(),
                storage: if config.storage.is_postgres() {
                    "postgres"
                } else {
                    "sqlite"
                },
            })
            .set(1);
        worker
            .recover()
            .await
            .context("cannot recover unfinished attempts")?;

        let dispatcher_done = CancellationToken::new();
        {
            let worker = Arc::clone(&worker);
            let done = dispatcher_done.clone().drop_guard();
            supervisor.spawn("dispatcher", async move {
                let _done = done;
                worker.run().await;
            });
        }
        supervisor.spawn("sweeps", Arc::clone(&worker).run_sweeps(stop.clone()));
        if let Some(keep) = config.audit.retention() {
            supervisor.spawn("retention", retention(store.clone(), keep, stop.clone()));
        }
        if let Some(key) = &signing_key {
            // The head found at start is signed before anything is served (a restart after a
            // crash covers what the last run left unsigned); then one every interval.
            if let Err(error) = store.sign_checkpoint(key).await {
                tracing::error!(%error, "cannot sign an audit checkpoint");
            }
            supervisor.spawn(
                "checkpoints",
                sign_checkpoints(
                    store.clone(),
                    Arc::clone(key),
                    config.audit.checkpoint_interval(),
                    stop.clone(),
                ),
            );
        }
        supervisor.spawn(
            "reload",
            apply_reloads(
                config.clone(),
                grpc_addr.ip().is_loopback(),
                reloads,
                Arc::clone(&worker),
                Arc::clone(&tenants),
                stop.clone(),
            ),
        );
        let readiness = Readiness::default();
        let ops_stop = CancellationToken::new();
        let ops_addr = ops_listener.as_ref().and_then(|l| l.local_addr().ok());
        if let Some(listener) = ops_listener {
            let state = OpsState {
                readiness: readiness.clone(),
                metrics: Arc::clone(&metrics),
                store: store.clone(),
                worker: Arc::clone(&worker),
            };
            let limits = ConnectionLimits {
                listener: "ops",
                max_connections: OPS_MAX_CONNECTIONS,
                handshake_timeout: Duration::from_millis(config.server.handshake_timeout_ms),
                idle_timeout: OPS_IDLE_TIMEOUT,
            };
            let (accepted, accept_loop) =
                connections::accept(listener, limits, Arc::clone(&metrics), ops_stop.clone());
            supervisor.spawn("ops-accept", accept_loop);
            supervisor.spawn("ops", ops_http::serve(accepted, state, ops_stop.clone()));
        }

        let health = Health::default();
        let api = TokenBrokerApi::new(
            store.clone(),
            ApiContext {
                worker: Arc::clone(&worker),
                feed,
                stop: stop.clone(),
                job_ttl: Duration::from_secs(config.retry.job_ttl_secs),
                max_pending: config.queue.max_pending,
                max_pending_clients: config.queue.max_pending_clients,
                fingerprinter: fingerprinter.clone(),
                tenants: Arc::clone(&tenants),
                max_watches_per_tenant: config.server.max_watches_per_tenant,
                deliveries,
            },
        );
        Ok(Daemon {
            config,
            _lock: lock,
            store,
            worker,
            tenants,
            fingerprinter,
            signing_key,
            api,
            stop,
            ops_stop,
            dispatcher_done,
            attempts,
            supervisor,
            failures,
            readiness,
            health,
            ops_addr,
            metrics,
            max_connections,
        })
    }

    /// Serves gRPC on `listener` until `shutdown` completes or a supervised task fails (which
    /// is returned); either way, readiness is off and `stop` cancelled when this returns.
    async fn serve(
        &mut self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> (anyhow::Result<()>, Option<TaskFailure>) {
        let grpc_addr = match listener.local_addr() {
            Ok(addr) => addr,
            Err(error) => return (Err(error.into()), None),
        };
        let services = GrpcServices {
            broker: self.api.clone(),
            audit: AuditLogApi::new(
                self.store.clone(),
                self.fingerprinter.clone(),
                Arc::clone(&self.tenants),
                self.signing_key.clone(),
            ),
            health: self.health.clone(),
        };
        self.set_serving(true).await;
        tracing::info!(
            listen = %grpc_addr,
            ops_listen = self.ops_addr.map(|addr| addr.to_string()),
            database = %match &self.config.storage.url {
                Some(url) => redact_url(url),
                None => self.config.storage.path.display().to_string(),
            },
            upstream = %self.config.upstream.token_url_for_logs(),
            "token-broker serving"
        );
        let failure = Arc::new(parking_lot::Mutex::new(None));
        let drain = {
            let failure = Arc::clone(&failure);
            let failures = &mut self.failures;
            let (readiness, health, stop) = (
                self.readiness.clone(),
                self.health.clone(),
                self.stop.clone(),
            );
            async move {
                tokio::select! {
                    () = shutdown => tracing::info!("shutdown requested; draining"),
                    failed = failures.first() => {
                        tracing::error!(task = failed.task, cause = %failed.cause,
                            "a long-lived task failed: not ready; draining, then exiting");
                        readiness.set(false);
                        health.set(false).await;
                        *failure.lock() = Some(failed);
                        tokio::time::sleep(FAILURE_NOTICE).await;
                    }
                }
                readiness.set(false);
                health.set(false).await;
                stop.cancel();
            }
        };
        let limits = ConnectionLimits {
            listener: "grpc",
            max_connections: self.max_connections,
            handshake_timeout: Duration::from_millis(self.config.server.handshake_timeout_ms),
            idle_timeout: Duration::from_secs(self.config.server.idle_timeout_secs),
        };
        let (accepted, accept_loop) = connections::accept(
            listener,
            limits,
            Arc::clone(&self.metrics),
            self.stop.clone(),
        );
        self.supervisor.spawn("grpc-accept", accept_loop);
        let served = grpc::serve(&self.config.server, services, accepted, drain).await;
        // Whatever ended serving, stop everything else too.
        self.stop.cancel();
        self.readiness.set(false);
        let failure = failure.lock().take();
        (served, failure)
    }

    async fn set_serving(&self, serving: bool) {
        self.readiness.set(serving);
        self.health.set(serving).await;
    }

    /// Stops claiming, gives running attempts their grace period (shorter after a failure),
    /// then stops the ops listener and waits for the supervised tasks.
    async fn drain(self, failed: bool) {
        self.stop.cancel();
        self.readiness.set(false);
        if tokio::time::timeout(TASK_STOP_BOUND, self.dispatcher_done.cancelled())
            .await
            .is_err()
        {
            tracing::error!("the dispatcher did not stop in time");
        }
        self.attempts.close();
        let mut grace = Duration::from_millis(self.config.server.shutdown_grace_ms);
        if failed {
            grace = grace.min(FAILURE_GRACE);
        }
        if tokio::time::timeout(grace, self.attempts.wait())
            .await
            .is_ok()
        {
            tracing::info!("all running attempts finished");
        } else {
            tracing::warn!(
                abandoned = self.attempts.len(),
                "grace period over; abandoned attempts will be recovered as outcome unknown at the next start"
            );
        }
        // The chain's last head, signed: a tail cut after this stop shows against it.
        if let Some(key) = &self.signing_key {
            match tokio::time::timeout(TASK_STOP_BOUND, self.store.sign_checkpoint(key)).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    tracing::error!(%error, "cannot sign the audit checkpoint at shutdown")
                }
                Err(_) => tracing::error!("the audit checkpoint at shutdown took too long"),
            }
        }
        self.ops_stop.cancel();
        // The writer ends when the last store handle goes: drop this daemon's handles first
        // (the tasks drop theirs as they end), so that it closes its connection in order.
        // Attempts abandoned after the grace period still hold one; then the wait runs out.
        let Daemon {
            store,
            worker,
            api,
            supervisor,
            ..
        } = self;
        drop((worker, api));
        store.close().await;
        drop(store);
        if !supervisor.wait(TASK_STOP_BOUND).await {
            tracing::warn!("some tasks did not stop in time");
        }
    }
}

/// Applies each configuration sent on `reloads` until `stop`: the rate limits and tenants in
/// place; other changes are reported as needing a restart.
async fn apply_reloads(
    mut current: Config,
    listening_on_loopback: bool,
    mut reloads: watch::Receiver<Config>,
    worker: Arc<Worker>,
    tenants: Arc<TenantRegistry>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = reloads.changed() => if changed.is_err() {
                // Nobody can send reloads any more (no SIGHUP handler): wait for shutdown.
                tracing::debug!("configuration reloads are off");
                stop.cancelled().await;
                return;
            },
        }
        let new = reloads.borrow_and_update().clone();
        if let Err(refusal) = reload_allowed(&new, listening_on_loopback) {
            tracing::error!("{refusal}; reload ignored");
            continue;
        }
        worker.reload_limits(&new.limits);
        tenants.replace(&new.tenants);
        let others_changed = Config {
            limits: current.limits.clone(),
            tenants: current.tenants.clone(),
            ..new.clone()
        } != current;
        if others_changed {
            tracing::warn!(
                "the reloaded configuration changes more than the rate limits and tenants; \
                 those other changes take effect at the next restart"
            );
        }
        current.limits = new.limits;
        current.tenants = new.tenants;
    }
}

/// Whether a reloaded configuration may be applied to a daemon whose gRPC listener is (or is
/// not) on loopback. The reloaded file was checked against its own `server.listen`, but the
/// socket stays bound where it was: without tenants, authentication is off, which only a
/// loopback listener may have.
fn reload_allowed(new: &Config, listening_on_loopback: bool) -> Result<(), &'static str> {
    if new.tenants.is_empty() && !listening_on_loopback {
        return Err(
            "the reloaded configuration has no tenants, but the gRPC listener is not \
                    on loopback: authentication cannot be turned off",
        );
    }
    Ok(())
}

/// How often retention looks for audit events to prune.
const RETENTION_INTERVAL: Duration = Duration::from_secs(3600);

/// Prunes audit events older than `keep`, at start and then hourly, until `stop`.
async fn retention(store: Store, keep: Duration, stop: CancellationToken) {
    loop {
        let now = crate::domain::job::UnixMillis::now();
        let cutoff = now.saturating_sub(keep);
        match store.prune_audit_events(cutoff, now).await {
            Ok(Some(pruned)) => tracing::info!(
                rows = pruned.events,
                checkpoint_seq = pruned.checkpoint_seq,
                "audit retention pruned old events"
            ),
            Ok(None) => {}
            Err(error) => tracing::error!(%error, "audit retention failed"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(RETENTION_INTERVAL) => {}
        }
    }
}

/// Reads audit.signing_key_file, when set. The daemon never creates it: its public key must
/// reach the auditors apart from the database, which `audit keygen` prints.
fn load_signing_key(config: &Config) -> anyhow::Result<Option<Arc<SigningKey>>> {
    let path = &config.audit.signing_key_file;
    if path.as_os_str().is_empty() {
        tracing::info!(
            "audit.signing_key_file is not set: the audit chain's checkpoints are not signed"
        );
        return Ok(None);
    }
    if !path.is_file() {
        anyhow::bail!(
            "audit.signing_key_file {} does not exist: create it with `token-broker audit keygen \
             --out {}` and give its .pub file to the auditors",
            path.display(),
            path.display()
        );
    }
    let key = SigningKey::load(path)?;
    tracing::info!(
        key_id = %key.public_key().id(),
        public_key = %key.public_key(),
        "audit checkpoints are signed"
    );
    Ok(Some(Arc::new(key)))
}

/// Signs the chain head every `every` (when it moved since the last checkpoint), from one
/// interval after the start (the start signs once itself, before serving) until `stop`; the
/// last one is signed by the drain.
async fn sign_checkpoints(
    store: Store,
    key: Arc<SigningKey>,
    every: Duration,
    stop: CancellationToken,
) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        if let Err(error) = store.sign_checkpoint(&key).await {
            tracing::error!(%error, "cannot sign an audit checkpoint");
        }
    }
}

/// Open connections the ops listener (`/metrics`, `/healthz`, `/readyz`) takes at most.
const OPS_MAX_CONNECTIONS: usize = 64;
/// An ops connection idle this long is closed (scrapers reconnect).
const OPS_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Raises the file limit and fits the gRPC connection cap under it, keeping room for the ops
/// listener and the daemon's own files. Accepted connections get TCP_NODELAY (see
/// [`connections`]), so that a streamed message and the trailers that follow it are not held
/// back by Nagle's algorithm (a delayed-ACK stall of about 40 ms per answer otherwise).
fn connection_cap(config: &Config) -> usize {
    let configured = config.server.max_connections;
    let limit = match connections::raise_file_limit() {
        Ok(limit) => limit,
        Err(error) => {
            tracing::warn!(%error, "cannot read or raise the open-file limit");
            return configured;
        }
    };
    let room = limit.saturating_sub(connections::RESERVED_FILES + OPS_MAX_CONNECTIONS as u64);
    let cap = configured
        .min(usize::try_from(room).unwrap_or(usize::MAX))
        .max(1);
    if cap < configured {
        tracing::warn!(
            open_file_limit = limit,
            configured,
            cap,
            "server.max_connections lowered to fit the open-file limit (raise LimitNOFILE)"
        );
    } else {
        tracing::info!(
            open_file_limit = limit,
            max_connections = cap,
            "connection cap"
        );
    }
    cap
}

/// On a shared database every replica must seal and fingerprint with the same keys: a key file
/// a replica created for itself would seal secrets no other replica can open. So the files must
/// exist (`token-broker keys init` makes them once; every replica gets a copy).
fn require_shared_keys(config: &Config) -> anyhow::Result<()> {
    let keys_from_env = std::env::var_os(crate::security::crypto::KEYS_ENV).is_some();
    let files = [
        ("security.key_file", config.key_file_path(), keys_from_env),
        (
            "audit.fingerprint_key_file",
            config.fingerprint_key_path(),
            false,
        ),
    ];
    for (setting, path, elsewhere) in files {
        if !elsewhere && !path.is_file() {
            anyhow::bail!(
                "{setting} {} does not exist: with storage.url every replica uses the same key \
                 files, so none is created here; create them once with `token-broker keys init \
                 --config FILE` and give every replica a copy",
                path.display()
            );
        }
    }
    Ok(())
}

/// Takes an exclusive lock beside the database, so two daemons never share one: every lease
/// found at start-up is then known to be dead.
pub fn lock_database(path: &std::path::Path) -> anyhow::Result<File> {
    let lock_path = crate::config::beside(path, ".lock");
    private_files::create_parent_dir(&lock_path)
        .with_context(|| format!("cannot create the directory of {}", lock_path.display()))?;
    let file = private_files::write_options()
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .with_context(|| format!("cannot open the lock file {}", lock_path.display()))?;
    file.try_lock().map_err(|_| {
        anyhow::anyhow!(
            "another token-broker is using {} (lock file {} is held)",
            path.display(),
            lock_path.display()
        )
    })?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_cannot_turn_authentication_off_beyond_loopback() {
        // Without tenants (the default), a file that names loopback checks on its own...
        let open = Config::default();
        open.validate().unwrap();
        // ...but the socket bound at start is what counts.
        assert!(reload_allowed(&open, false).is_err());
        assert!(reload_allowed(&open, true).is_ok());
        let mut with_tenants = open.clone();
        with_tenants.tenants = vec![crate::config::TenantConfig {
            name: "shop".into(),
            api_key_sha256: "0".repeat(64),
            client_ids: vec!["app".into()],
            roles: vec![crate::config::Role::Submit],
            max_pending: None,
        }];
        assert!(reload_allowed(&with_tenants, false).is_ok());
    }
}
