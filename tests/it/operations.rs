//! What operators rely on: health, readiness, reflection, graceful shutdown.

use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::helpers::{TestApp, series};

#[tokio::test]
async fn health_reports_serving_and_ops_endpoints_answer() {
    let app = TestApp::spawn().await;
    let mut health = HealthClient::new(channel(app.grpc_addr).await);
    for service in ["", "tokenbroker.v1.TokenBroker"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "service {service:?}");
    }

    for (path, expected) in [("/healthz", 200), ("/readyz", 200), ("/nope", 404)] {
        assert_eq!(http_status(app.ops_addr, path).await, expected, "{path}");
    }
}

#[tokio::test]
async fn reflection_lists_the_services_in_both_versions() {
    use tokio_stream::StreamExt;
    use tonic_reflection::pb::{v1, v1alpha};

    let app = TestApp::spawn().await;

    let mut client =
        v1::server_reflection_client::ServerReflectionClient::new(channel(app.grpc_addr).await);
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.next().await.unwrap().unwrap();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        answer.message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"tokenbroker.v1.TokenBroker".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );

    let mut client = v1alpha::server_reflection_client::ServerReflectionClient::new(
        channel(app.grpc_addr).await,
    );
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.next().await.unwrap().unwrap();
    assert!(matches!(
        answer.message_response,
        Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(_))
    ));
}

#[tokio::test]
async fn a_second_daemon_on_the_same_database_is_refused() {
    let app = TestApp::spawn().await;
    let message = crate::helpers::start_up_error(app.config.clone()).await;
    assert!(message.contains("another token-broker"), "{message}");
}

#[tokio::test]
async fn metrics_move_as_jobs_flow() {
    use token_broker::tools::fake_upstream::Scripted;

    let mut app = TestApp::spawn_with(|config| {
        // Per-client rate series exist for configured clients only.
        config.limits.client = vec![token_broker::config::ClientLimit {
            client_id: "metered-app".into(),
            rps: 50,
            burst: 0,
        }];
    })
    .await;
    let before = http_get(app.ops_addr, "/metrics").await;
    assert!(
        before.contains("# TYPE token_broker_jobs_submitted counter"),
        "{before}"
    );
    assert_eq!(series(&before, "token_broker_jobs_submitted_total"), 0.0);
    assert_eq!(series(&before, "token_broker_breaker_open"), 0.0);

    app.fake.script([Scripted::Status(503)]);
    app.exchange(app.new_request("metered-app")).await;
    let mut bad = app.new_request("metered-app");
    bad.code_verifier = "v".repeat(50);
    app.exchange(bad).await;
    // A job that waits while the scrape happens.
    app.fake
        .set_faults(token_broker::tools::fake_upstream::Faults {
            latency_ms: 2_000,
            ..Default::default()
        });
    let waiting = app.submit(app.new_request("metered-app")).await;
    app.wait_for_state(&waiting.job_id, token_broker::api::proto::JobState::Running)
        .await;

    let after = http_get(app.ops_addr, "/metrics").await;
    for (name, expected) in [
        ("token_broker_jobs_submitted_total", 3.0),
        (
            r#"token_broker_jobs_finished_total{state="succeeded",reason=""}"#,
            1.0,
        ),
        (
            r#"token_broker_jobs_finished_total{state="failed",reason="forbidden"}"#,
            1.0,
        ),
        (
            r#"token_broker_upstream_requests_total{class="5xx",status="503"}"#,
            1.0,
        ),
        (
            r#"token_broker_upstream_requests_total{class="2xx",status="200"}"#,
            1.0,
        ),
        (
            r#"token_broker_upstream_requests_total{class="4xx",status="403"}"#,
            1.0,
        ),
        ("token_broker_retries_total", 1.0),
        // metered-app has a rate limit: the dispatcher paces all its attempts.
        ("token_broker_jobs_started_at_submission_total", 0.0),
        ("token_broker_upstream_latency_seconds_count", 3.0),
        ("token_broker_limiter_wait_seconds_count", 4.0),
        ("token_broker_queue_depth", 1.0),
        (
            r#"token_broker_client_effective_rate{client_id="metered-app"}"#,
            50.0,
        ),
        ("token_broker_breaker_open", 0.0),
    ] {
        assert_eq!(series(&after, name), expected, "{name} in\n{after}");
    }
    assert!(series(&after, "token_broker_sqlite_commit_seconds_count") >= 10.0);
    assert!(after.trim_end().ends_with("# EOF"));
}

/// A minimal HTTP/1.1 GET over a raw socket, returning the body.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body)
        .unwrap_or_default();
    body.to_string()
}

/// A minimal HTTP/1.1 GET over a raw socket, returning the status code.
async fn http_status(addr: std::net::SocketAddr, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("a status line")
}

async fn channel(addr: std::net::SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[test]
fn a_bad_configuration_is_reported_whole_before_anything_binds() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = \"not an address\"\n[retry]\nmax_attempts = 0\n[upstream]\ntoken_url = \"ftp://x\"\n",
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_token-broker"))
        .args(["serve", "--config"])
        .arg(&path)
        .env_remove("RUST_LOG")
        .output()
        .expect("run the binary");
    assert_eq!(output.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for key in ["server.listen", "retry.max_attempts", "upstream.token_url"] {
        assert!(stderr.contains(key), "{key} reported: {stderr}");
    }
    assert!(
        !dir.path().join("token-broker.db").exists(),
        "nothing was created"
    );

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_token-broker"))
        .args(["config", "check"])
        .arg(&path)
        .output()
        .expect("run the binary");
    assert_eq!(output.status.code(), Some(78));

    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[limits]\nglobal_rps = 5\n").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_token-broker"))
        .args(["config", "check"])
        .arg(&good)
        .output()
        .expect("run the binary");
    assert!(output.status.success(), "{output:?}");
}

#[test]
fn the_shipped_compose_configurations_pass_config_check() {
    for file in ["deploy/token-broker.toml", "deploy/replica.toml"] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_token-broker"))
            .args(["config", "check"])
            .arg(&path)
            .output()
            .expect("run the binary");
        assert!(output.status.success(), "{file}: {output:?}");
    }
}

#[tokio::test]
async fn a_reload_changes_the_rate_limits_without_dropping_connections() {
    use crate::helpers::{start_fake, test_config};

    let fake = start_fake().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(&dir, &fake);
    let limit = |rps| {
        vec![token_broker::config::ClientLimit {
            client_id: "app".into(),
            rps,
            burst: 0,
        }]
    };
    config.limits.client = limit(2);
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ops = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (grpc_addr, ops_addr) = (grpc.local_addr().unwrap(), ops.local_addr().unwrap());
    let (reload, reloads) = tokio::sync::watch::channel(config.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(token_broker::run_with_reload(
        config.clone(),
        token_broker::Listeners {
            grpc,
            ops: Some(ops),
        },
        async move {
            let _ = stopped.await;
        },
        reloads,
    ));
    let mut client = token_broker::api::proto::token_broker_client::TokenBrokerClient::connect(
        format!("http://{grpc_addr}"),
    )
    .await
    .unwrap();
    let rate = r#"token_broker_client_effective_rate{client_id="app"}"#;
    client
        .exchange(crate::helpers::new_request(&fake, "app"))
        .await
        .unwrap();
    assert_eq!(series(&http_get(ops_addr, "/metrics").await, rate), 2.0);

    config.limits.client = limit(40);
    reload.send(config).unwrap();
    // The same connection keeps working, under the new limit.
    let job = client
        .exchange(crate::helpers::new_request(&fake, "app"))
        .await
        .unwrap()
        .into_inner();
    assert!(job.token.is_some());
    assert_eq!(series(&http_get(ops_addr, "/metrics").await, rate), 40.0);

    // Tenants reload too: from now on a key is required.
    let (key, digest) = token_broker::security::tenants::new_key();
    let mut with_tenants = reload.borrow().clone();
    with_tenants.tenants = vec![token_broker::config::TenantConfig {
        name: "shop".into(),
        api_key_sha256: digest,
        client_ids: vec!["app".into()],
        roles: vec![token_broker::config::Role::Submit],
        max_pending: None,
    }];
    reload.send(with_tenants).unwrap();
    tokio::task::yield_now().await;
    let status = loop {
        match client
            .submit_exchange(crate::helpers::new_request(&fake, "app"))
            .await
        {
            // The reload task may not have run yet.
            Ok(_) => tokio::task::yield_now().await,
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    let mut request = tonic::Request::new(crate::helpers::new_request(&fake, "app"));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    assert!(
        client
            .exchange(request)
            .await
            .unwrap()
            .into_inner()
            .token
            .is_some()
    );

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}
