//! Database faults: a full database and a corrupt file fail cleanly, lose nothing acknowledged,
//! and service resumes when the fault clears.

use token_broker::api::proto::GetJobRequest;
use tonic::Code;

use crate::helpers::TestApp;

#[tokio::test]
async fn a_full_database_refuses_submissions_cleanly_and_loses_nothing_acknowledged() {
    // A 2 MiB cap, filled by submissions whose jobs stay queued (one attempt per second).
    let mut app = TestApp::spawn_with(|config| {
        config.storage.max_size_mb = 2;
        config.limits.global_rps = 1;
        config.limits.global_burst = 1;
    })
    .await;
    let mut acknowledged = Vec::new();
    let mut refusal = None;
    for _ in 0..5_000 {
        let mut request = app.new_request("app");
        // Large (valid) states fill pages quickly.
        request.state = "s".repeat(1_000);
        match app.client.submit_exchange(request).await {
            Ok(job) => acknowledged.push(job.into_inner().job_id),
            Err(status) => {
                refusal = Some(status);
                break;
            }
        }
    }
    let refusal = refusal.expect("the cap is reached");
    assert_eq!(refusal.code(), Code::Unavailable, "{refusal:?}");
    assert!(
        !refusal.message().contains("full"),
        "internal causes stay in the log: {refusal:?}"
    );
    assert!(acknowledged.len() > 100);

    // Reads keep working while writes cannot.
    let job = app
        .client
        .get_job(GetJobRequest {
            job_id: acknowledged[0].clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.job_id, acknowledged[0]);

    // The fault clears (the cap is raised): every acknowledged job is there, and new
    // submissions are accepted again.
    let (mut config, fake, dir) = app.stop().await;
    config.storage.max_size_mb = 0;
    config.limits.global_rps = 0;
    let mut app = TestApp::start(config, fake, dir).await;
    for id in &acknowledged {
        app.get(id).await;
    }
    app.submit(app.new_request("app")).await;
}

#[tokio::test]
async fn a_corrupt_database_file_fails_start_up_with_a_clear_error() {
    let fake = crate::helpers::start_fake().await;
    let dir = tempfile::tempdir().unwrap();
    let config = crate::helpers::test_config(&dir, &fake);
    std::fs::write(&config.storage.path, vec![0x42u8; 64 * 1024]).unwrap();
    let message = crate::helpers::start_up_error(config).await;
    assert!(message.contains("cannot open storage.path"), "{message}");
    assert!(message.contains("not a database"), "{message}");
}
