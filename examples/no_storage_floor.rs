//! The floor under issue 14's CPU target (BENCHMARKS.md): the daemon's own gRPC server (tonic,
//! the same `Exchange` RPC and messages) and its own upstream client (`UpstreamClient`), with
//! nothing between them: no storage, no audit trail, no queue, no limits. What it costs per
//! exchange is what a broker costs before it keeps any promise; the daemon's figure minus this
//! one is what durability, the audit trail and the queue cost.
//!
//! ```sh
//! cargo build --release --example no_storage_floor
//! target/release/examples/no_storage_floor 127.0.0.1:50099 http://127.0.0.1:8080/v1/token
//! target/release/token-broker bench --fake http://127.0.0.1:8080 --target http://127.0.0.1:50099
//! ```
//!
//! Like the daemon on two CPUs: one runtime thread and mimalloc.

use std::{net::SocketAddr, time::SystemTime};

use secrecy::{ExposeSecret, SecretString};
use token_broker::{
    api::proto::{
        self, GetJobRequest, JobState, SubmitExchangeRequest,
        token_broker_server::{TokenBroker, TokenBrokerServer},
    },
    config::Config,
    exchange::upstream::{Answer, AttemptOutcome, UpstreamClient},
};
use tonic::{Request, Response, Status};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Floor {
    upstream: UpstreamClient,
}

#[tonic::async_trait]
impl TokenBroker for Floor {
    async fn submit_exchange(
        &self,
        _: Request<SubmitExchangeRequest>,
    ) -> Result<Response<proto::Job>, Status> {
        Err(Status::unimplemented("the floor only answers Exchange"))
    }

    async fn exchange(
        &self,
        request: Request<SubmitExchangeRequest>,
    ) -> Result<Response<proto::Job>, Status> {
        let request = request.into_inner();
        let outcome = self
            .upstream
            .exchange(
                &request.client_id,
                &SecretString::from(request.code),
                &SecretString::from(request.code_verifier),
            )
            .await;
        let AttemptOutcome::Answered(Answer {
            status,
            token: Some(token),
            ..
        }) = outcome
        else {
            return Err(Status::unavailable("upstream gave no token"));
        };
        Ok(Response::new(proto::Job {
            job_id: uuid::Uuid::now_v7().to_string(),
            client_id: request.client_id,
            state: JobState::Succeeded.into(),
            attempts: 1,
            created_at: Some(SystemTime::now().into()),
            last_http_status: u32::from(status),
            state_param: request.state,
            idempotency_key: request.idempotency_key,
            token: Some(proto::Token {
                access_token: token.access_token.expose_secret().to_string(),
                token_type: token.token_type,
                expires_in: token.expires_in,
                expires_at: None,
            }),
            ..proto::Job::default()
        }))
    }

    async fn get_job(&self, _: Request<GetJobRequest>) -> Result<Response<proto::Job>, Status> {
        Err(Status::unimplemented("the floor keeps no jobs"))
    }

    type WatchJobStream = tokio_stream::Empty<Result<proto::Job, Status>>;

    async fn watch_job(
        &self,
        _: Request<GetJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        Err(Status::unimplemented("the floor keeps no jobs"))
    }

    async fn cancel_job(&self, _: Request<GetJobRequest>) -> Result<Response<proto::Job>, Status> {
        Err(Status::unimplemented("the floor keeps no jobs"))
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let listen: SocketAddr = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:50099".into())
        .parse()?;
    let mut config = Config::default();
    if let Some(token_url) = args.next() {
        config.upstream.token_url = token_url;
    }
    let upstream = UpstreamClient::new(&config.upstream)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        eprintln!(
            "no-storage floor on {listen}, upstream {}",
            config.upstream.token_url
        );
        tonic::transport::Server::builder()
            .add_service(TokenBrokerServer::new(Floor { upstream }))
            .serve(listen)
            .await
    })?;
    Ok(())
}
