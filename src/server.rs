//! The daemon's single entry point, [`run`]: `main` and the integration tests both call it with
//! listeners they bound and a shutdown future.

use std::{fs::File, future::Future, sync::Arc, time::Duration};

use anyhow::Context;
use tokio::{net::TcpListener, sync::watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    api::{ApiContext, AuditLogApi, TokenBrokerApi, proto},
    config::Config,
    connections::{self, ConnectionLimits},
    crypto::KeyRing,
    feed::JobFeed,
    fingerprint::Fingerprinter,
    metrics::Metrics,
    ops_http::{self, OpsState, Readiness},
    private_files,
    store::Store,
    supervisor::{Failures, FaultHooks, Supervisor, TaskFailure},
    tenants::TenantRegistry,
    upstream::UpstreamClient,
    worker::{Deliveries, WorkSignal, Worker},
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
/// Returns an error when a long-lived task failed (see [`crate::supervisor`]): the caller
/// exits non-zero so that the process is restarted.
pub async fn run_with_reload(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    reloads: watch::Receiver<Config>,
) -> anyhow::Result<()> {
    let mut daemon = Daemon::start(config, listeners.ops, reloads).await?;
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
    _lock: File,
    store: Store,
    worker: Arc<Worker>,
    tenants: Arc<TenantRegistry>,
    fingerprinter: Fingerprinter,
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
    health: tonic_health::server::HealthReporter,
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
        ops_listener: Option<TcpListener>,
        reloads: watch::Receiver<Config>,
    ) -> anyhow::Result<Daemon> {
        let lock = lock_database(&config.storage.path)?;
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
        .with_context(|| format!("cannot open storage.path {}", config.storage.path.display()))?;
        let stop = CancellationToken::new();
        let (supervisor, failures) = Supervisor::new(stop.clone(), FaultHooks::from_env());
        supervisor.spawn("writer", writer);

        let upstream = UpstreamClient::new(&config.upstream).context("cannot set up upstream")?;
        let work = WorkSignal::new();
        let deliveries = Deliveries::new();
        let tenants = TenantRegistry::new(&config.tenants);
        if config.tenants.is_empty() {
            tracing::warn!("no tenants configured: authentication is off (loopback only)");
        }
        let worker = Arc::new(Worker::new(
            &config,
            store.clone(),
            upstream,
            Arc::clone(&work),
            Arc::clone(&metrics),
            Arc::clone(&deliveries),
        ));
        worker
            .recover()
            .await
            .context("cannot recover unfinished attempts")?;

        let attempts = TaskTracker::new();
        let dispatcher_done = CancellationToken::new();
        {
            let worker = Arc::clone(&worker);
            let (stop, attempts) = (stop.clone(), attempts.clone());
            let done = dispatcher_done.clone().drop_guard();
            supervisor.spawn("dispatcher", async move {
                let _done = done;
                worker.run(stop, attempts).await;
            });
        }
        supervisor.spawn("sweeps", Arc::clone(&worker).run_sweeps(stop.clone()));
        if let Some(keep) = config.audit.retention() {
            supervisor.spawn("retention", retention(store.clone(), keep, stop.clone()));
        }
        supervisor.spawn(
            "reload",
            apply_reloads(
                config.clone(),
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

        let health = tonic_health::server::HealthReporter::new();
        let api = TokenBrokerApi::new(
            store.clone(),
            ApiContext {
                feed,
                work,
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
        let routes = match self.routes() {
            Ok(routes) => routes,
            Err(error) => return (Err(error), None),
        };
        self.set_serving(true).await;
        tracing::info!(
            listen = %grpc_addr,
            ops_listen = self.ops_addr.map(|addr| addr.to_string()),
            database = %self.config.storage.path.display(),
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
                        set_health(&health, false).await;
                        *failure.lock() = Some(failed);
                        tokio::time::sleep(FAILURE_NOTICE).await;
                    }
                }
                readiness.set(false);
                set_health(&health, false).await;
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
        let incoming = tokio_stream::wrappers::ReceiverStream::new(accepted);
        let served = routes
            .serve_with_incoming_shutdown(incoming, drain)
            .await
            .context("gRPC server failed");
        // Whatever ended serving, stop everything else too.
        self.stop.cancel();
        self.readiness.set(false);
        let failure = failure.lock().take();
        (served, failure)
    }

    /// The gRPC services: health, reflection (v1 and v1alpha), TokenBroker and AuditLog.
    fn routes(&self) -> anyhow::Result<tonic::transport::server::Router> {
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .context("cannot build reflection v1")?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .context("cannot build reflection v1alpha")?;
        let server = &self.config.server;
        let max_message = server.max_message_bytes;
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = &server.tls {
            builder = builder
                .tls_config(tls_config(tls)?)
                .context("cannot configure TLS for the gRPC listener")?;
        }
        Ok(builder
            .max_concurrent_streams(Some(server.max_concurrent_streams))
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(tonic_health::pb::health_server::HealthServer::new(
                tonic_health::server::HealthService::from_health_reporter(self.health.clone()),
            ))
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(
                proto::token_broker_server::TokenBrokerServer::new(self.api.clone())
                    .max_decoding_message_size(max_message),
            )
            .add_service(
                proto::audit_log_server::AuditLogServer::new(AuditLogApi::new(
                    self.store.clone(),
                    self.fingerprinter.clone(),
                    Arc::clone(&self.tenants),
                ))
                .max_decoding_message_size(max_message),
            ))
    }

    async fn set_serving(&self, serving: bool) {
        self.readiness.set(serving);
        set_health(&self.health, serving).await;
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
        self.ops_stop.cancel();
        if !self.supervisor.wait(TASK_STOP_BOUND).await {
            tracing::warn!("some tasks did not stop in time");
        }
        drop(self.worker);
        self.store.close().await;
    }
}

/// Sets the gRPC health status of the whole server ("") and of both services.
async fn set_health(health: &tonic_health::server::HealthReporter, serving: bool) {
    use tonic_health::ServingStatus;
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    for service in [
        "",
        <proto::token_broker_server::TokenBrokerServer<TokenBrokerApi> as tonic::server::NamedService>::NAME,
        <proto::audit_log_server::AuditLogServer<AuditLogApi> as tonic::server::NamedService>::NAME,
    ] {
        health.set_service_status(service, status).await;
    }
}

/// Applies each configuration sent on `reloads` until `stop`: the rate limits and tenants in
/// place; other changes are reported as needing a restart.
async fn apply_reloads(
    mut current: Config,
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

/// The listener's TLS settings, from the PEM files the configuration names.
fn tls_config(tls: &crate::config::TlsConfig) -> anyhow::Result<tonic::transport::ServerTlsConfig> {
    let read = |path: &std::path::Path, what: &str| {
        std::fs::read(path)
            .with_context(|| format!("cannot read the TLS {what} {}", path.display()))
    };
    let identity = tonic::transport::Identity::from_pem(
        read(&tls.cert_file, "certificate")?,
        read(&tls.key_file, "key")?,
    );
    let mut config = tonic::transport::ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &tls.client_ca_file {
        config = config
            .client_ca_root(tonic::transport::Certificate::from_pem(read(
                ca,
                "client CA",
            )?))
            .client_auth_optional(false);
    }
    Ok(config)
}

/// How often retention looks for audit events to prune.
const RETENTION_INTERVAL: Duration = Duration::from_secs(3600);

/// Prunes audit events older than `keep`, at start and then hourly, until `stop`.
async fn retention(store: Store, keep: Duration, stop: CancellationToken) {
    loop {
        let now = crate::job::UnixMillis::now();
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
