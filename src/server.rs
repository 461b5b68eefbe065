//! The daemon's single entry point, [`run`]: `main` and the integration tests both call it with
//! listeners they bound and a shutdown future.

use std::{fs::File, future::Future, sync::Arc, time::Duration};

use anyhow::Context;
use tokio::{net::TcpListener, sync::watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    api::{ApiContext, AuditLogApi, TokenBrokerApi, proto},
    config::Config,
    crypto::KeyRing,
    feed::JobFeed,
    fingerprint::Fingerprinter,
    metrics::Metrics,
    ops_http::{self, OpsState, Readiness},
    store::Store,
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

/// [`run`], also applying every configuration sent on `reloads` (SIGHUP in `main`): the rate
/// limits change in place, without dropping connections; other changed settings are reported
/// as needing a restart.
pub async fn run_with_reload(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    mut reloads: watch::Receiver<Config>,
) -> anyhow::Result<()> {
    let _lock = lock_database(&config.storage.path)?;
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
    let store = Store::open(
        &config.storage,
        Arc::new(keys),
        Arc::clone(&feed),
        Arc::clone(&metrics),
    )
    .await
    .with_context(|| format!("cannot open storage.path {}", config.storage.path.display()))?;
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

    let stop = CancellationToken::new();
    let attempts = TaskTracker::new();
    let worker_task = tokio::spawn(Arc::clone(&worker).run(stop.clone(), attempts.clone()));

    let reload_task = {
        let worker = Arc::clone(&worker);
        let tenants = Arc::clone(&tenants);
        let stop = stop.clone();
        let mut current = config.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    changed = reloads.changed() => if changed.is_err() { return },
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
        })
    };

    let readiness = Readiness::default();
    let ops_task = listeners.ops.map(|listener| {
        let state = OpsState {
            readiness: readiness.clone(),
            metrics: Arc::clone(&metrics),
            store: store.clone(),
            worker: Arc::clone(&worker),
        };
        tokio::spawn(ops_http::serve(listener, state, stop.clone()))
    });

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<proto::token_broker_server::TokenBrokerServer<TokenBrokerApi>>()
        .await;
    health_reporter
        .set_serving::<proto::audit_log_server::AuditLogServer<AuditLogApi>>()
        .await;
    let retention_task = (config.audit.retention_days > 0).then(|| {
        tokio::spawn(retention(
            store.clone(),
            Duration::from_secs(config.audit.retention_days * 86_400),
            stop.clone(),
        ))
    });
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
    let api = TokenBrokerApi::new(
        store.clone(),
        ApiContext {
            feed,
            work,
            stop: stop.clone(),
            job_ttl: Duration::from_secs(config.retry.job_ttl_secs),
            max_pending: config.queue.max_pending,
            fingerprinter: fingerprinter.clone(),
            tenants: Arc::clone(&tenants),
            max_watches_per_tenant: config.server.max_watches_per_tenant,
            deliveries,
        },
    );

    let grpc_addr = listeners.grpc.local_addr()?;
    readiness.set(true);
    tracing::info!(
        listen = %grpc_addr,
        database = %config.storage.path.display(),
        upstream = %config.upstream.token_url,
        "token-broker serving"
    );

    let drain = {
        let stop = stop.clone();
        let readiness = readiness.clone();
        let health_reporter = health_reporter.clone();
        async move {
            shutdown.await;
            tracing::info!("shutdown requested; draining");
            readiness.set(false);
            health_reporter
                .set_not_serving::<proto::token_broker_server::TokenBrokerServer<TokenBrokerApi>>()
                .await;
            stop.cancel();
        }
    };
    let max_message = config.server.max_message_bytes;
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &config.server.tls {
        builder = builder
            .tls_config(tls_config(tls)?)
            .context("cannot configure TLS for the gRPC listener")?;
    }
    let served = builder
        .max_concurrent_streams(Some(config.server.max_concurrent_streams))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            proto::token_broker_server::TokenBrokerServer::new(api)
                .max_decoding_message_size(max_message),
        )
        .add_service(
            proto::audit_log_server::AuditLogServer::new(AuditLogApi::new(
                store.clone(),
                fingerprinter.clone(),
                Arc::clone(&tenants),
            ))
            .max_decoding_message_size(max_message),
        )
        .serve_with_incoming_shutdown(incoming(listeners.grpc), drain)
        .await;
    // Whatever ended serving, stop everything else too.
    stop.cancel();
    readiness.set(false);
    if let Err(error) = worker_task.await {
        tracing::error!(%error, "the worker task failed");
    }
    attempts.close();
    let grace = Duration::from_millis(config.server.shutdown_grace_ms);
    if tokio::time::timeout(grace, attempts.wait()).await.is_ok() {
        tracing::info!("all running attempts finished");
    } else {
        tracing::warn!(
            abandoned = attempts.len(),
            "grace period over; abandoned attempts will be recovered as outcome unknown at the next start"
        );
    }
    for task in [ops_task, retention_task, Some(reload_task)]
        .into_iter()
        .flatten()
    {
        let _ = task.await;
    }
    store.close().await;
    served.context("gRPC server failed")?;
    tracing::info!("token-broker stopped");
    Ok(())
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
        let cutoff = crate::job::UnixMillis(now.0 - keep.as_millis() as i64);
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

/// Accepted connections with TCP_NODELAY, so that a streamed message and the trailers that
/// follow it are not held back by Nagle's algorithm (a delayed-ACK stall of about 40 ms per
/// WatchJob or Exchange answer otherwise), and with keepalive, so dead peers are noticed.
fn incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)))
}

/// Takes an exclusive lock beside the database, so two daemons never share one: every lease
/// found at start-up is then known to be dead.
pub fn lock_database(path: &std::path::Path) -> anyhow::Result<File> {
    let lock_path = crate::config::beside(path, ".lock");
    if let Some(dir) = lock_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the directory {}", dir.display()))?;
    }
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
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
