//! Tenants and roles, through every RPC: who may call what, and what another tenant's job looks
//! like (it does not exist).

use token_broker::{
    api::proto::{
        FingerprintCodeRequest, GetJobRequest, JobState, ListAuditEventsRequest, ListJobsRequest,
        SubmitExchangeRequest, VerifyAuditLogRequest, audit_log_client::AuditLogClient,
        token_broker_client::TokenBrokerClient,
    },
    config::{Role, TenantConfig},
    security::tenants::new_key,
};
use tonic::{Code, Request, transport::Channel};

use crate::helpers::TestApp;

struct Keys {
    shop: String,
    bank: String,
    auditor: String,
}

async fn spawn() -> (TestApp, Keys) {
    spawn_bounded(None).await
}

fn tenant(name: &str, api_key_sha256: String, client_id: Option<&str>, role: Role) -> TenantConfig {
    TenantConfig {
        name: name.into(),
        api_key_sha256,
        client_ids: client_id.map(String::from).into_iter().collect(),
        roles: vec![role],
        max_pending: None,
    }
}

/// The three tenants; `shop` with its own queue bound when given.
async fn spawn_bounded(shop_max_pending: Option<u64>) -> (TestApp, Keys) {
    let (shop, shop_hash) = new_key();
    let (bank, bank_hash) = new_key();
    let (auditor, auditor_hash) = new_key();
    let app = TestApp::spawn_with(|config| {
        config.tenants = vec![
            TenantConfig {
                max_pending: shop_max_pending,
                ..tenant("shop", shop_hash, Some("shop-app"), Role::Submit)
            },
            tenant("bank", bank_hash, Some("bank-app"), Role::Submit),
            tenant("auditors", auditor_hash, None, Role::Audit),
        ];
    })
    .await;
    (
        app,
        Keys {
            shop,
            bank,
            auditor,
        },
    )
}

fn as_key<T>(message: T, key: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(key) = key {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
    }
    request
}

/// Calls every TokenBroker RPC as `key` on `job_id` and returns their status codes.
async fn broker_codes(
    client: &mut TokenBrokerClient<Channel>,
    key: Option<&str>,
    submission: &SubmitExchangeRequest,
    job_id: &str,
) -> Vec<Code> {
    let job = || GetJobRequest {
        job_id: job_id.to_string(),
    };
    let code = |result: Result<Code, tonic::Status>| match result {
        Ok(code) => code,
        Err(status) => status.code(),
    };
    vec![
        code(
            client
                .submit_exchange(as_key(submission.clone(), key))
                .await
                .map(|_| Code::Ok),
        ),
        code(
            client
                .exchange(as_key(submission.clone(), key))
                .await
                .map(|_| Code::Ok),
        ),
        code(client.get_job(as_key(job(), key)).await.map(|_| Code::Ok)),
        code(client.watch_job(as_key(job(), key)).await.map(|_| Code::Ok)),
        code(
            client
                .cancel_job(as_key(job(), key))
                .await
                .map(|_| Code::Ok),
        ),
    ]
}

async fn audit_codes(client: &mut AuditLogClient<Channel>, key: Option<&str>) -> Vec<Code> {
    let code = |result: Result<Code, tonic::Status>| match result {
        Ok(code) => code,
        Err(status) => status.code(),
    };
    vec![
        code(
            client
                .list_jobs(as_key(ListJobsRequest::default(), key))
                .await
                .map(|_| Code::Ok),
        ),
        code(
            client
                .list_audit_events(as_key(ListAuditEventsRequest::default(), key))
                .await
                .map(|_| Code::Ok),
        ),
        code(
            client
                .verify_audit_log(as_key(VerifyAuditLogRequest::default(), key))
                .await
                .map(|_| Code::Ok),
        ),
        code(
            client
                .fingerprint_code(as_key(
                    FingerprintCodeRequest {
                        code: "some-code".into(),
                    },
                    key,
                ))
                .await
                .map(|_| Code::Ok),
        ),
    ]
}

#[tokio::test]
async fn callers_without_a_valid_key_are_refused_everywhere_and_nothing_is_stored() {
    let (mut app, _) = spawn().await;
    let mut audit = AuditLogClient::connect(format!("http://{}", app.grpc_addr))
        .await
        .unwrap();
    let submission = app.new_request("shop-app");
    let job_id = uuid::Uuid::now_v7().to_string();
    for key in [None, Some("not-a-key"), Some("Bearer")] {
        assert_eq!(
            broker_codes(&mut app.client, key, &submission, &job_id).await,
            [Code::Unauthenticated; 5],
            "key {key:?}"
        );
        assert_eq!(
            audit_codes(&mut audit, key).await,
            [Code::Unauthenticated; 4],
            "key {key:?}"
        );
    }
    assert_eq!(app.count_rows("jobs").await, 0);
    assert_eq!(app.count_rows("audit_events").await, 0);
    assert_eq!(app.fake.stats().token_requests, 0);
}

#[tokio::test]
async fn a_tenant_submits_only_for_its_client_ids_and_sees_only_its_jobs() {
    let (mut app, keys) = spawn().await;
    let mut audit = AuditLogClient::connect(format!("http://{}", app.grpc_addr))
        .await
        .unwrap();

    // Another tenant's client id: refused, nothing stored.
    let status = app
        .client
        .submit_exchange(as_key(app.new_request("bank-app"), Some(&keys.shop)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(app.count_rows("jobs").await, 0);

    // Its own: stored under its name.
    let job = app
        .client
        .exchange(as_key(app.new_request("shop-app"), Some(&keys.shop)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.tenant, "shop");
    assert_eq!(job.state(), JobState::Succeeded);

    // The other tenant cannot see, watch or cancel it: to it, the job does not exist.
    let foreign = app.new_request("bank-app");
    assert_eq!(
        broker_codes(&mut app.client, Some(&keys.bank), &foreign, &job.job_id).await[2..],
        [Code::NotFound; 3]
    );
    // The owner can.
    let seen = app
        .client
        .get_job(as_key(
            GetJobRequest {
                job_id: job.job_id.clone(),
            },
            Some(&keys.shop),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(seen.job_id, job.job_id);
    assert!(seen.token.is_some());

    // Submit tenants have no business in the audit log.
    assert_eq!(
        audit_codes(&mut audit, Some(&keys.shop)).await,
        [Code::PermissionDenied; 4]
    );
}

#[tokio::test]
async fn an_audit_tenant_reads_across_tenants_never_tokens_and_cannot_submit() {
    let (mut app, keys) = spawn().await;
    for (key, client_id) in [(&keys.shop, "shop-app"), (&keys.bank, "bank-app")] {
        app.client
            .exchange(as_key(app.new_request(client_id), Some(key)))
            .await
            .unwrap();
    }
    let mut audit = AuditLogClient::connect(format!("http://{}", app.grpc_addr))
        .await
        .unwrap();
    assert_eq!(
        audit_codes(&mut audit, Some(&keys.auditor)).await,
        [Code::Ok; 4]
    );
    let jobs = audit
        .list_jobs(as_key(ListJobsRequest::default(), Some(&keys.auditor)))
        .await
        .unwrap()
        .into_inner()
        .jobs;
    let mut tenants: Vec<_> = jobs.iter().map(|job| job.tenant.as_str()).collect();
    tenants.sort();
    assert_eq!(tenants, ["bank", "shop"]);
    assert!(jobs.iter().all(|job| job.token.is_none()));

    let submission = app.new_request("shop-app");
    let codes = broker_codes(
        &mut app.client,
        Some(&keys.auditor),
        &submission,
        &jobs[0].job_id,
    )
    .await;
    assert_eq!(codes, [Code::PermissionDenied; 5]);
}

#[tokio::test]
async fn a_cancellation_records_which_tenant_cancelled() {
    let (mut app, keys) = spawn().await;
    app.fake
        .set_faults(token_broker::tools::fake_upstream::Faults {
            retry_after_secs: 20,
            ..Default::default()
        });
    app.fake
        .script([token_broker::tools::fake_upstream::Scripted::Status(503)]);
    let job = app
        .client
        .submit_exchange(as_key(app.new_request("shop-app"), Some(&keys.shop)))
        .await
        .unwrap()
        .into_inner();
    let mut watch = app
        .client
        .watch_job(as_key(
            GetJobRequest {
                job_id: job.job_id.clone(),
            },
            Some(&keys.shop),
        ))
        .await
        .unwrap()
        .into_inner();
    while let Some(update) = watch.message().await.unwrap() {
        if update.state() == JobState::RetryWait {
            break;
        }
    }
    app.client
        .cancel_job(as_key(
            GetJobRequest {
                job_id: job.job_id.clone(),
            },
            Some(&keys.shop),
        ))
        .await
        .unwrap();
    let mut audit = AuditLogClient::connect(format!("http://{}", app.grpc_addr))
        .await
        .unwrap();
    let events = audit
        .list_audit_events(as_key(
            ListAuditEventsRequest {
                job_id: job.job_id.clone(),
                ..Default::default()
            },
            Some(&keys.auditor),
        ))
        .await
        .unwrap()
        .into_inner()
        .events;
    let cancelled = events.last().unwrap();
    assert_eq!(cancelled.kind, "job.cancelled");
    assert_eq!(cancelled.detail, "cancelled by tenant \"shop\"");
}

#[tokio::test]
async fn a_tenant_at_its_own_queue_bound_is_refused_while_others_go_on() {
    let (mut app, keys) = spawn_bounded(Some(2)).await;
    // Slow answers keep the shop's jobs pending while the test submits.
    app.fake
        .set_faults(token_broker::tools::fake_upstream::Faults {
            latency_ms: 1_000,
            ..Default::default()
        });
    for _ in 0..2 {
        app.client
            .submit_exchange(as_key(app.new_request("shop-app"), Some(&keys.shop)))
            .await
            .unwrap();
    }
    let status = app
        .client
        .submit_exchange(as_key(app.new_request("shop-app"), Some(&keys.shop)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    // The shop learns its own bound, nothing about the rest of the queue.
    assert_eq!(
        status.message(),
        "this tenant's queue is full (2 of 2 jobs pending)"
    );
    // Another tenant is not affected by the shop's bound.
    app.client
        .submit_exchange(as_key(app.new_request("bank-app"), Some(&keys.bank)))
        .await
        .unwrap();
    assert_eq!(app.count_rows("jobs").await, 3);
}

#[tokio::test]
async fn the_bearer_scheme_is_accepted_in_any_case() {
    let (mut app, keys) = spawn().await;
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let mut request = Request::new(app.new_request("shop-app"));
        request.metadata_mut().insert(
            "authorization",
            format!("{scheme} {}", keys.shop).parse().unwrap(),
        );
        let job = app
            .client
            .submit_exchange(request)
            .await
            .unwrap()
            .into_inner();
        assert!(!job.job_id.is_empty(), "{scheme}");
    }
    let mut request = Request::new(app.new_request("shop-app"));
    request.metadata_mut().insert(
        "authorization",
        format!("Basic {}", keys.shop).parse().unwrap(),
    );
    let status = app.client.submit_exchange(request).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}
