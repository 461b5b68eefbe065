//! `token-broker bench`: a load generator. It submits exchanges through a running daemon
//! (`Exchange` RPCs, each returning its token), or with `--direct` presents the same codes to
//! the upstream itself, so one run can compare the two; as fast as possible with a given
//! concurrency, or at a fixed rate. Latencies go into an HDR histogram.
//!
//! Codes come from the fake upstream's side endpoint, issued in bulk before timing starts.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

use crate::{
    api::proto::{JobState, SubmitExchangeRequest, token_broker_client::TokenBrokerClient},
    cli::BenchArgs,
    exchange::upstream::install_crypto_provider,
    tools::fake_upstream::{new_verifier, s256_challenge},
};

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub mode: &'static str,
    pub requests: usize,
    pub succeeded: usize,
    pub failed: usize,
    pub elapsed_secs: f64,
    pub per_second: f64,
    pub latency_ms: Percentiles,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

/// Codes issued up front, all bound to one verifier.
struct Codes {
    verifier: String,
    codes: Vec<String>,
}

async fn issue_codes(
    http: &reqwest::Client,
    fake: &str,
    client_id: &str,
    count: usize,
) -> anyhow::Result<Codes> {
    let verifier = new_verifier();
    let challenge = s256_challenge(&verifier);
    let mut codes = Vec::with_capacity(count);
    while codes.len() < count {
        let batch = (count - codes.len()).min(50_000).to_string();
        let answer: serde_json::Value = http
            .post(format!("{fake}/test/authorize"))
            .form(&[
                ("client_id", client_id),
                ("code_challenge", challenge.as_str()),
                ("code_challenge_method", "S256"),
                ("count", batch.as_str()),
            ])
            .send()
            .await
            .context("cannot reach the fake upstream's /test/authorize")?
            .error_for_status()?
            .json()
            .await?;
        let Some(batch) = answer["codes"].as_array() else {
            bail!("the fake upstream issued no codes: {answer}");
        };
        codes.extend(batch.iter().filter_map(|c| c.as_str().map(str::to_string)));
    }
    Ok(Codes { verifier, codes })
}

/// One exchange, by whichever path the run measures.
#[derive(Clone)]
enum Target {
    Daemon(Vec<TokenBrokerClient<Channel>>),
    Direct { http: reqwest::Client, url: String },
}

impl Target {
    async fn exchange(&self, n: usize, client_id: &str, code: &str, verifier: &str) -> bool {
        match self {
            Target::Daemon(clients) => {
                let mut client = clients[n % clients.len()].clone();
                let request = SubmitExchangeRequest {
                    client_id: client_id.to_string(),
                    code: code.to_string(),
                    code_verifier: verifier.to_string(),
                    state: String::new(),
                    idempotency_key: String::new(),
                };
                match client.exchange(request).await {
                    Ok(job) => {
                        let job = job.into_inner();
                        job.state() == JobState::Succeeded && job.token.is_some()
                    }
                    Err(_) => false,
                }
            }
            Target::Direct { http, url } => {
                let form = [
                    ("grant_type", "authorization_code"),
                    ("client_id", client_id),
                    ("code", code),
                    ("code_verifier", verifier),
                ];
                match http.post(url).form(&form).send().await {
                    Ok(response) if response.status().is_success() => {
                        response.bytes().await.is_ok()
                    }
                    _ => false,
                }
            }
        }
    }
}

/// Runs the load described by `args` and returns what it measured.
pub async fn run(args: &BenchArgs) -> anyhow::Result<BenchReport> {
    install_crypto_provider();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .tcp_nodelay(true)
        .build()?;
    let codes = Arc::new(issue_codes(&http, &args.fake, &args.client_id, args.requests).await?);
    let target = if args.direct {
        Target::Direct {
            http: http.clone(),
            url: format!("{}/v1/token", args.fake),
        }
    } else {
        // Several targets (replicas sharing one queue) share the load: each gets
        // `connections` connections, and requests go round them all.
        let mut clients = Vec::new();
        for _ in 0..args.connections.max(1) {
            for target in args.target.split(',').map(str::trim) {
                let channel = Endpoint::from_shared(target.to_string())?
                    .tcp_nodelay(true)
                    .connect()
                    .await
                    .with_context(|| format!("cannot connect to {target}"))?;
                clients.push(TokenBrokerClient::new(channel));
            }
        }
        Target::Daemon(clients)
    };

    let next = Arc::new(AtomicUsize::new(0));
    let histogram = Arc::new(parking_lot::Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
    ));
    let succeeded = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    // With a rate, request n is due at n / rate; without, as fast as the workers go.
    let interval = args.rate.map(|rate| Duration::from_secs_f64(1.0 / rate));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency.max(1) {
        let (target, codes, next, histogram, succeeded) = (
            target.clone(),
            Arc::clone(&codes),
            Arc::clone(&next),
            Arc::clone(&histogram),
            Arc::clone(&succeeded),
        );
        let client_id = args.client_id.clone();
        workers.spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let Some(code) = codes.codes.get(n) else {
                    return;
                };
                if let Some(interval) = interval {
                    tokio::time::sleep_until((started + interval * n as u32).into()).await;
                }
                let sent = Instant::now();
                let ok = target.exchange(n, &client_id, code, &codes.verifier).await;
                let micros = sent.elapsed().as_micros().max(1) as u64;
                histogram.lock().saturating_record(micros);
                if ok {
                    succeeded.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    workers.join_all().await;
    let elapsed = started.elapsed();
    let histogram = histogram.lock();
    let ms = |micros: u64| micros as f64 / 1000.0;
    let succeeded = succeeded.load(Ordering::Relaxed);
    Ok(BenchReport {
        mode: if args.direct { "direct" } else { "daemon" },
        requests: args.requests,
        succeeded,
        failed: args.requests - succeeded,
        elapsed_secs: elapsed.as_secs_f64(),
        per_second: succeeded as f64 / elapsed.as_secs_f64(),
        latency_ms: Percentiles {
            p50: ms(histogram.value_at_quantile(0.50)),
            p90: ms(histogram.value_at_quantile(0.90)),
            p99: ms(histogram.value_at_quantile(0.99)),
            max: ms(histogram.max()),
            mean: histogram.mean() / 1000.0,
        },
    })
}
