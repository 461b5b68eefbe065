//! A backend's view of token-broker: submit one exchange and wait for its token.
//!
//! Plays the app too (a PKCE pair and a code from the fake upstream's side endpoint), so it
//! runs against the README's quick start:
//!
//! ```sh
//! cargo run --example submit_and_wait -- http://127.0.0.1:50051 http://127.0.0.1:8080
//! ```

use std::time::Duration;

use token_broker::{
    api::proto::{
        GetJobRequest, JobState, SubmitExchangeRequest, token_broker_client::TokenBrokerClient,
    },
    tools::fake_upstream::{new_verifier, s256_challenge},
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let broker = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:50051".into());
    let fake = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:8080".into());
    let client_id = "rust-example";

    // The app's part: a PKCE pair, and a code bound to its challenge.
    let verifier = new_verifier();
    token_broker::exchange::upstream::install_crypto_provider();
    let answer: serde_json::Value = reqwest::Client::new()
        .post(format!("{fake}/test/authorize"))
        .form(&[
            ("client_id", client_id),
            ("code_challenge", &s256_challenge(&verifier)),
            ("code_challenge_method", "S256"),
        ])
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let code = answer["code"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("the fake upstream returned no code"))?;

    // The backend's part: hand the exchange to the broker and wait, within a deadline.
    let mut client = TokenBrokerClient::connect(broker).await?;
    let mut request = tonic::Request::new(SubmitExchangeRequest {
        client_id: client_id.into(),
        code: code.into(),
        code_verifier: verifier,
        state: "rust-example".into(),
        idempotency_key: String::new(),
    });
    request.set_timeout(Duration::from_secs(30));
    let mut job = client.exchange(request).await?.into_inner();
    // The deadline came first: follow the job until it is terminal.
    if matches!(
        job.state(),
        JobState::Queued | JobState::Running | JobState::RetryWait
    ) {
        let mut updates = client
            .watch_job(GetJobRequest {
                job_id: job.job_id.clone(),
            })
            .await?
            .into_inner();
        while let Some(update) = updates.message().await? {
            job = update;
        }
    }
    println!(
        "job {}: {:?} after {} attempt(s)",
        job.job_id,
        job.state(),
        job.attempts
    );
    match job.token {
        Some(token) => {
            println!(
                "token received ({}, expires in {} s)",
                token.token_type, token.expires_in
            );
            Ok(())
        }
        None => anyhow::bail!("{:?}: {}", job.failure_reason(), job.failure_detail),
    }
}
