//! Requests that cannot be right are refused at the edge: nothing stored, nothing sent.

use token_broker::api::proto::{GetJobRequest, SubmitExchangeRequest};
use tonic::Code;
use tonic_types::StatusExt;

use crate::helpers::TestApp;

#[tokio::test]
async fn invalid_requests_reach_neither_the_database_nor_upstream() {
    let mut app = TestApp::spawn().await;
    let valid = app.new_request("client-a");
    let cases: Vec<(&str, SubmitExchangeRequest)> = vec![
        (
            "client_id",
            SubmitExchangeRequest {
                client_id: String::new(),
                ..valid.clone()
            },
        ),
        (
            "code",
            SubmitExchangeRequest {
                code: String::new(),
                ..valid.clone()
            },
        ),
        (
            "code",
            SubmitExchangeRequest {
                code: "c".repeat(2049),
                ..valid.clone()
            },
        ),
        (
            "code_verifier",
            SubmitExchangeRequest {
                code_verifier: "too-short".into(),
                ..valid.clone()
            },
        ),
        (
            "code_verifier",
            SubmitExchangeRequest {
                code_verifier: "v".repeat(129),
                ..valid.clone()
            },
        ),
        (
            "code_verifier",
            SubmitExchangeRequest {
                code_verifier: format!("{}/", "v".repeat(50)),
                ..valid.clone()
            },
        ),
        (
            "state",
            SubmitExchangeRequest {
                state: "s".repeat(1025),
                ..valid.clone()
            },
        ),
        (
            "idempotency_key",
            SubmitExchangeRequest {
                idempotency_key: "key with spaces".into(),
                ..valid.clone()
            },
        ),
        (
            "client_id",
            SubmitExchangeRequest {
                client_id: "client\u{0}id".into(),
                ..valid.clone()
            },
        ),
    ];

    for (field, request) in cases {
        for exchange in [false, true] {
            let status = if exchange {
                app.client.exchange(request.clone()).await.unwrap_err()
            } else {
                app.client
                    .submit_exchange(request.clone())
                    .await
                    .unwrap_err()
            };
            assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
            assert!(
                status.message().contains(field),
                "{field}: {}",
                status.message()
            );
            assert!(
                !status.message().contains(&valid.code),
                "the code never appears in an error"
            );
            let details = status.get_error_details();
            let bad_request = details.bad_request().expect("BadRequest details");
            assert_eq!(bad_request.field_violations[0].field, field);
        }
    }

    assert_eq!(app.count_rows("jobs").await, 0);
    assert_eq!(app.count_rows("audit_events").await, 0);
    assert_eq!(app.fake.stats().token_requests, 0);

    // The valid request still works afterwards.
    let job = app.client.exchange(valid).await.unwrap().into_inner();
    assert!(job.token.is_some());
}

#[tokio::test]
async fn job_ids_are_checked_and_unknown_ones_are_not_found() {
    let mut app = TestApp::spawn().await;
    let malformed = GetJobRequest {
        job_id: "not-a-job".into(),
    };
    let status = app.client.get_job(malformed.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = app.client.watch_job(malformed.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = app.client.cancel_job(malformed).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    let unknown = GetJobRequest {
        job_id: uuid::Uuid::now_v7().to_string(),
    };
    for status in [
        app.client.get_job(unknown.clone()).await.unwrap_err(),
        app.client.watch_job(unknown.clone()).await.unwrap_err(),
        app.client.cancel_job(unknown).await.unwrap_err(),
    ] {
        assert_eq!(status.code(), Code::NotFound);
    }
}

#[tokio::test]
async fn a_full_queue_refuses_with_a_retry_hint_and_keeps_what_it_accepted() {
    let mut app = TestApp::spawn_with(|config| {
        config.queue.max_pending = 2;
        // Nothing completes while the test fills the queue.
        config.upstream.timeout_ms = 5_000;
    })
    .await;
    app.fake
        .set_faults(token_broker::tools::fake_upstream::Faults {
            latency_ms: 1_000,
            ..Default::default()
        });
    let first = app.submit(app.new_request("client-a")).await;
    let second = app.submit(app.new_request("client-a")).await;

    let status = app
        .client
        .submit_exchange(app.new_request("client-a"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(status.message(), "the queue is full; retry later");
    let details = status.get_error_details();
    assert!(details.retry_info().is_some(), "a retry hint is attached");
    assert_eq!(app.count_rows("jobs").await, 2);

    for id in [&first.job_id, &second.job_id] {
        let job = app.wait_terminal(id).await;
        assert!(job.token.is_some(), "accepted jobs are unaffected");
    }
    // Room again once they are done.
    app.submit(app.new_request("client-a")).await;
}

#[tokio::test]
async fn oversized_messages_are_refused_before_anything_happens() {
    let mut app = TestApp::spawn().await;
    let mut huge = app.new_request("client-a");
    huge.state = "s".repeat(64 * 1024);
    let status = app.client.submit_exchange(huge).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{status:?}"
    );
    assert_eq!(app.count_rows("jobs").await, 0);
    assert_eq!(app.fake.stats().token_requests, 0);
}

#[tokio::test]
async fn watch_streams_are_bounded_per_tenant_and_released_when_closed() {
    let mut app = TestApp::spawn_with(|config| {
        config.server.max_watches_per_tenant = 2;
        config.retry.initial_delay_ms = 60_000;
        config.retry.max_delay_ms = 60_000;
        config.retry.job_ttl_secs = 600;
    })
    .await;
    app.fake
        .script([token_broker::tools::fake_upstream::Scripted::Status(503)]);
    let job = app.submit(app.new_request("client-a")).await;
    let watch = || GetJobRequest {
        job_id: job.job_id.clone(),
    };
    let first = app.client.watch_job(watch()).await.unwrap().into_inner();
    let _second = app.client.watch_job(watch()).await.unwrap().into_inner();
    let status = app.client.watch_job(watch()).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.get_error_details().retry_info().is_some());

    // Closing a stream frees its slot (the server notices the cancelled stream).
    drop(first);
    let reopened = tokio::time::timeout(crate::helpers::PATIENCE, async {
        loop {
            match app.client.watch_job(watch()).await {
                Ok(stream) => return stream,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        }
    })
    .await;
    assert!(reopened.is_ok(), "a closed stream's slot is released");
}

/// Sends bytes as they are, to put malformed protobuf on the wire.
#[derive(Debug, Clone, Default)]
struct RawCodec;

#[derive(Debug, Clone, Default)]
struct RawEncoder;

#[derive(Debug, Clone, Default)]
struct RawDecoder;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        buf.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf;
        Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
    }
}

#[tokio::test]
async fn malformed_protobuf_is_invalid_argument_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", app.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    for (case, bytes) in [
        // Field 1 (client_id, a string) holding invalid UTF-8.
        ("invalid UTF-8", vec![0x0a, 0x02, 0xff, 0xfe]),
        // Field 1 sent as a varint instead of a length-delimited string.
        ("wrong wire type", vec![0x08, 0x01]),
        // A length that runs past the end of the message.
        ("truncated", vec![0x12, 0x40, b'x']),
    ] {
        grpc.ready().await.unwrap();
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(
            "/tokenbroker.v1.TokenBroker/SubmitExchange",
        );
        let status = grpc
            .unary(tonic::Request::new(bytes), path, RawCodec)
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{case}: {status:?}");
        assert!(
            status.message().starts_with("malformed message"),
            "{case}: {status:?}"
        );
    }
    assert_eq!(app.count_rows("jobs").await, 0);
    assert_eq!(app.fake.stats().token_requests, 0);
}
