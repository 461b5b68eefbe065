//! What operators rely on: health, readiness, reflection, graceful shutdown.

use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::helpers::TestApp;

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
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let error = token_broker::run(
        app.config.clone(),
        token_broker::Listeners {
            grpc: listener,
            ops: None,
        },
        std::future::pending(),
    )
    .await
    .unwrap_err();
    assert!(
        error.to_string().contains("another token-broker"),
        "{error:#}"
    );
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
