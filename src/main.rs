//! `token-broker`: parses the command line and wires the pieces; the work happens in the
//! library.

use std::{path::PathBuf, process::ExitCode, time::Duration};

/// mimalloc instead of glibc's malloc: fewer instructions and no arena consolidation on the
/// allocation-heavy paths (rows, protobuf messages, HTTP bodies). See BENCHMARKS.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use token_broker::{
    Listeners,
    cli::{Cli, Command, ConfigCommand, FakeUpstreamArgs, KeysCommand},
    config::Config,
    ops::telemetry,
    tools::fake_upstream::{FakeOptions, FakeUpstream, Faults},
    tools::inspect,
};

/// Exit status for a configuration that does not check (sysexits' EX_CONFIG).
const EXIT_BAD_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    // The daemon's runtime is sized by its configuration; the tools take tokio's default.
    let (serve_config, worker_threads) = match &cli.command {
        Command::Serve { config: path } => match Config::load(path.as_deref()) {
            Ok(config) => {
                let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
                let threads = config.runtime_threads(cpus);
                (Some(config), threads)
            }
            Err(errors) => {
                eprint!("{errors}");
                return ExitCode::from(EXIT_BAD_CONFIG);
            }
        },
        _ => (None, 0),
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if worker_threads > 0 {
        builder.worker_threads(worker_threads);
    }
    let runtime = match builder.build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Serve { config: path } => {
            let config = serve_config.expect("loaded above for serve");
            report(runtime.block_on(serve(config, path)))
        }
        Command::Config(ConfigCommand::Check { file }) => match Config::load(Some(&file)) {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprint!("{}: {errors}", file.display());
                ExitCode::from(EXIT_BAD_CONFIG)
            }
        },
        Command::Config(ConfigCommand::Show { config }) => match Config::load(config.as_deref()) {
            Ok(mut config) => {
                // The database password stays out of terminals and support tickets.
                config.storage.url = config
                    .storage
                    .url
                    .as_deref()
                    .map(token_broker::config::redact_url);
                print!(
                    "{}",
                    toml_string(&config).unwrap_or_else(|e| format!("# cannot print: {e}\n"))
                );
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprint!("{errors}");
                ExitCode::from(EXIT_BAD_CONFIG)
            }
        },
        Command::FakeUpstream(args) => report(runtime.block_on(fake_upstream(args))),
        Command::Keys(KeysCommand::New) => {
            let (key, digest) = token_broker::security::tenants::new_key();
            println!("api_key        = {key}");
            println!("api_key_sha256 = \"{digest}\"");
            eprintln!(
                "Give the key to the tenant (it is not stored anywhere); put api_key_sha256 in its [[tenants]] entry."
            );
            ExitCode::SUCCESS
        }
        Command::Keys(KeysCommand::Rotate { config }) => {
            let config = match Config::load(config.as_deref()) {
                Ok(config) => config,
                Err(errors) => {
                    eprint!("{errors}");
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
            };
            report(runtime.block_on(rotate_keys(config)))
        }
        Command::Keys(KeysCommand::Init { config }) => {
            let config = match Config::load(config.as_deref()) {
                Ok(config) => config,
                Err(errors) => {
                    eprint!("{errors}");
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
            };
            report(init_keys(&config))
        }
        Command::Bench(args) => report(runtime.block_on(bench(args))),
        Command::Jobs(command) => report(runtime.block_on(inspect::jobs(command))),
        Command::Audit(command) => match runtime.block_on(inspect::audit(command)) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(error) => report(Err(error)),
        },
        Command::Console(args) => {
            report(runtime.block_on(token_broker::console::run(args, shutdown_signal())))
        }
    }
}

/// `keys init`: the key files the configuration names, created when missing (the checkpoint
/// signing key too, when audit.signing_key_file names one).
fn init_keys(config: &Config) -> anyhow::Result<()> {
    let key_file = config.key_file_path();
    let (_, created) = token_broker::security::crypto::KeyRing::load_or_create(&key_file)?;
    println!(
        "{} {}",
        if created { "created " } else { "kept    " },
        key_file.display()
    );
    let fingerprint_file = config.fingerprint_key_path();
    let (_, created) =
        token_broker::audit::fingerprint::Fingerprinter::load_or_create(&fingerprint_file)?;
    println!(
        "{} {}",
        if created { "created " } else { "kept    " },
        fingerprint_file.display()
    );
    let signing_file = &config.audit.signing_key_file;
    if !signing_file.as_os_str().is_empty() {
        if signing_file.exists() {
            println!("kept     {}", signing_file.display());
        } else {
            let key = token_broker::audit::checkpoint::SigningKey::generate(signing_file)?;
            println!("created  {}", signing_file.display());
            println!(
                "created  {} ({})",
                token_broker::audit::checkpoint::public_key_path(signing_file).display(),
                key.public_key()
            );
        }
        eprintln!(
            "Give the checkpoint signing key's .pub file to the auditors, apart from the database."
        );
    }
    eprintln!("Back these files up apart from the database; every replica needs the same ones.");
    Ok(())
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("token-broker: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config, path: Option<PathBuf>) -> anyhow::Result<()> {
    let listeners = Listeners::bind(&config).await?;
    let (reload_tx, reloads) = tokio::sync::watch::channel(config.clone());
    tokio::spawn(reload_on_sighup(path, reload_tx));
    token_broker::run_with_reload(config, listeners, shutdown_signal(), reloads).await
}

/// Reloads the configuration on SIGHUP; a configuration that does not check is reported and
/// ignored, and the daemon keeps the one it has.
async fn reload_on_sighup(path: Option<PathBuf>, reloads: tokio::sync::watch::Sender<Config>) {
    #[cfg(unix)]
    {
        let Ok(mut hangups) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            tracing::warn!("cannot install the SIGHUP handler; reloads are off");
            return;
        };
        while hangups.recv().await.is_some() {
            match Config::load(path.as_deref()) {
                Ok(config) => {
                    tracing::info!("SIGHUP: configuration reloaded");
                    let _ = reloads.send(config);
                }
                Err(errors) => {
                    tracing::error!(%errors, "SIGHUP: the configuration does not check; kept the current one");
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (path, reloads);
    }
}

async fn fake_upstream(args: FakeUpstreamArgs) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let fake = FakeUpstream::start(
        listener,
        FakeOptions {
            code_ttl: Duration::from_secs(args.code_ttl_secs),
            faults: Faults {
                rate_429: args.rate_429,
                rate_500: args.rate_500,
                rate_503: args.rate_503,
                drop_rate: args.drop_rate,
                latency_ms: args.latency_ms,
                retry_after_secs: args.retry_after_secs,
                rate_limit_rps: args.rate_limit_rps,
                rate_limit_burst: 0,
            },
            ..FakeOptions::default()
        },
    )?;
    tracing::info!(token_url = %fake.token_url(), "fake upstream serving");
    shutdown_signal().await;
    fake.stop();
    Ok(())
}

async fn bench(args: token_broker::cli::BenchArgs) -> anyhow::Result<()> {
    let report = token_broker::tools::bench::run(&args).await?;
    println!(
        "{}: {} of {} succeeded in {:.2} s: {:.0}/s; latency ms p50 {:.2} p90 {:.2} p99 {:.2} max {:.2}",
        report.mode,
        report.succeeded,
        report.requests,
        report.elapsed_secs,
        report.per_second,
        report.latency_ms.p50,
        report.latency_ms.p90,
        report.latency_ms.p99,
        report.latency_ms.max
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    anyhow::ensure!(report.failed == 0, "{} exchanges failed", report.failed);
    Ok(())
}

/// Adds a key to the key file and re-seals every stored secret with it.
async fn rotate_keys(config: Config) -> anyhow::Result<()> {
    use std::sync::Arc;
    use token_broker::{
        ops::metrics::Metrics, security::crypto::KeyRing, store::Store, store::feed::JobFeed,
    };
    anyhow::ensure!(
        std::env::var_os(token_broker::security::crypto::KEYS_ENV).is_none(),
        "{} is set: rotate the keys there (append a new id:key), then run this command without it",
        token_broker::security::crypto::KEYS_ENV
    );
    let _lock = token_broker::server::lock_database(&config.storage.path)?;
    let key_file = config.key_file_path();
    anyhow::ensure!(key_file.is_file(), "no key file at {}", key_file.display());
    let id = KeyRing::add_key_to_file(&key_file)?;
    let (keys, _) = KeyRing::load_or_create(&key_file)?;
    let (store, writer) = Store::open(
        &config.storage,
        Arc::new(keys),
        JobFeed::new(),
        Metrics::new(),
    )
    .await?;
    tokio::spawn(writer);
    let rows = store.reencrypt_all().await?;
    store.close().await;
    println!(
        "new key {id} added to {}; {rows} jobs re-encrypted",
        key_file.display()
    );
    Ok(())
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut terminate) => tokio::select! {
                _ = interrupt => {}
                _ = terminate.recv() => {}
            },
            Err(error) => {
                tracing::error!(%error, "cannot install the SIGTERM handler; only SIGINT drains");
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}

fn toml_string(config: &Config) -> Result<String, toml::ser::Error> {
    toml::to_string_pretty(config)
}
