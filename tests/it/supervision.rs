//! Supervision with the real binary: when a long-lived task panics or ends, readiness fails at
//! once (`/readyz` 503, gRPC health `NOT_SERVING`) and the process exits non-zero, so that its
//! supervisor restarts it. The failures are injected through the debug-only hook
//! `TOKEN_BROKER_TEST_FAIL_TASK`.

use std::{net::SocketAddr, time::Duration};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::helpers::{Daemon, PATIENCE, start_fake};

/// How long after it starts the named task fails: long enough to see the daemon ready first.
const FAIL_AFTER_MS: u64 = 2_000;

/// The status code `/readyz` answers, or `None` when nothing answers.
async fn readyz(ops: SocketAddr) -> Option<u16> {
    let mut stream = tokio::net::TcpStream::connect(ops).await.ok()?;
    stream
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.ok()?;
    answer.get(9..12)?.parse().ok()
}

/// The gRPC health of the whole server, or `None` when the call fails.
async fn health(addr: SocketAddr) -> Option<ServingStatus> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .ok()?
        .timeout(Duration::from_millis(500))
        .connect()
        .await
        .ok()?;
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .ok()?;
    Some(answer.into_inner().status())
}

/// Starts the binary with `task` failing in `mode`, and checks what operators would see.
async fn failing_task_makes_the_daemon_unready_and_exit(task: &str, mode: &str) {
    let fake = start_fake().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("daemon.log");
    let fault = format!("{task}:{mode}:{FAIL_AFTER_MS}");
    let mut daemon = Daemon::start_with_env(
        &dir.path().join("broker.db"),
        &fake.token_url(),
        Some(log.clone()),
        &[
            ("TOKEN_BROKER_TEST_FAIL_TASK", fault.as_str()),
            // Retention runs as a task only when it is on.
            ("TOKEN_BROKER_AUDIT__RETENTION_DAYS", "30"),
        ],
    );
    assert_eq!(
        readyz(daemon.ops_addr).await,
        Some(200),
        "{task}: ready first"
    );
    assert_eq!(
        health(daemon.addr).await,
        Some(ServingStatus::Serving),
        "{task}: serving first"
    );

    // Readiness must turn false while the process still runs. When the ops listener itself is
    // the failed task, only gRPC health can say so.
    let ops_alive = task != "ops";
    let (mut saw_unready, mut saw_not_serving) = (!ops_alive, false);
    let watch = async {
        while !(saw_unready && saw_not_serving) {
            if !saw_unready && readyz(daemon.ops_addr).await == Some(503) {
                saw_unready = true;
            }
            if !saw_not_serving && health(daemon.addr).await == Some(ServingStatus::NotServing) {
                saw_not_serving = true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(PATIENCE, watch)
        .await
        .unwrap_or_else(|_| {
            panic!("{task}: /readyz 503 {saw_unready}, health NOT_SERVING {saw_not_serving}")
        });

    let exited = async {
        loop {
            if let Some(status) = daemon.child.try_wait().expect("poll the daemon") {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let status = tokio::time::timeout(PATIENCE, exited)
        .await
        .unwrap_or_else(|_| panic!("{task}: the daemon did not exit"));
    assert!(!status.success(), "{task}: exit status {status}");

    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.lines()
            .any(|line| line.contains("a long-lived task failed")
                && line.contains(&format!("\"task\":\"{task}\""))),
        "{task}: the cause is logged:\n{log}"
    );
}

#[tokio::test]
async fn a_panicking_dispatcher_fails_readiness_and_exits() {
    failing_task_makes_the_daemon_unready_and_exit("dispatcher", "panic").await;
}

#[tokio::test]
async fn a_writer_that_ends_fails_readiness_and_exits() {
    failing_task_makes_the_daemon_unready_and_exit("writer", "exit").await;
}

#[tokio::test]
async fn panicking_sweeps_fail_readiness_and_exit() {
    failing_task_makes_the_daemon_unready_and_exit("sweeps", "panic").await;
}

#[tokio::test]
async fn an_ops_listener_that_ends_fails_readiness_and_exits() {
    failing_task_makes_the_daemon_unready_and_exit("ops", "exit").await;
}

#[tokio::test]
async fn a_panicking_reload_task_fails_readiness_and_exits() {
    failing_task_makes_the_daemon_unready_and_exit("reload", "panic").await;
}

#[tokio::test]
async fn a_retention_task_that_ends_fails_readiness_and_exits() {
    failing_task_makes_the_daemon_unready_and_exit("retention", "exit").await;
}
