//! The fake upstream itself, over HTTP: the tests and the quick start rely on it behaving as
//! Truecaller's documentation describes.

use std::time::Duration;

use token_broker::tools::fake_upstream::{FakeOptions, new_verifier, s256_challenge};

use crate::helpers::start_fake_with;

async fn post_form(url: &str, form: &[(&str, &str)]) -> (u16, serde_json::Value) {
    let response = reqwest::Client::new()
        .post(url)
        .form(form)
        .send()
        .await
        .expect("fake answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

#[tokio::test]
async fn codes_are_bound_to_their_challenge_single_use_and_short_lived() {
    let fake = start_fake_with(FakeOptions::default()).await;
    let base = format!("http://{}", fake.addr());
    let verifier = new_verifier();
    assert_eq!(verifier.len(), 86);
    let challenge = s256_challenge(&verifier);

    let (status, body) = post_form(
        &format!("{base}/test/authorize"),
        &[
            ("client_id", "app"),
            ("code_challenge", &challenge),
            ("code_challenge_method", "S256"),
        ],
    )
    .await;
    assert_eq!(status, 200);
    let code = body["code"].as_str().expect("a code").to_string();
    let token_url = fake.token_url();
    let form = |grant: &'static str, client: &'static str, verifier: String| {
        vec![
            ("grant_type", grant.to_string()),
            ("client_id", client.to_string()),
            ("code", code.clone()),
            ("code_verifier", verifier),
        ]
    };
    let send = |form: Vec<(&'static str, String)>| {
        let url = token_url.clone();
        async move {
            let pairs: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
            post_form(&url, &pairs).await
        }
    };

    let (status, body) = send(form("password", "app", verifier.clone())).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("grant type not supported"))
    );
    let (status, body) = send(form("authorization_code", "app", String::new())).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("some parameter is empty"))
    );
    let (status, _) = send(form("authorization_code", "other-app", verifier.clone())).await;
    assert_eq!(status, 403);
    let (status, body) = send(form("authorization_code", "app", "w".repeat(64))).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("invalid or expired code verifier"))
    );

    let (status, body) = send(form("authorization_code", "app", verifier.clone())).await;
    assert_eq!(status, 200);
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3600);
    assert!(body["access_token"].as_str().is_some_and(|t| !t.is_empty()));

    let (status, body) = send(form("authorization_code", "app", verifier.clone())).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("invalid or expired auth code")),
        "a code is single-use"
    );

    // A code past its lifetime (a fake whose codes live no time at all, rather than a sleep).
    let expiring = start_fake_with(FakeOptions {
        code_ttl: Duration::ZERO,
        ..FakeOptions::default()
    })
    .await;
    let code = expiring.issue_code("app", &challenge);
    let (status, _) = post_form(
        &expiring.token_url(),
        &[
            ("grant_type", "authorization_code"),
            ("client_id", "app"),
            ("code", &code),
            ("code_verifier", &verifier),
        ],
    )
    .await;
    assert_eq!(status, 403, "an expired code is refused");
}

#[tokio::test]
async fn faults_are_injected_as_scripted_and_counted() {
    let fake = start_fake_with(FakeOptions::default()).await;
    let base = format!("http://{}", fake.addr());
    let http = reqwest::Client::new();
    let scripted = http
        .post(format!("{base}/test/script"))
        .body(r#"["429", "503", "drop"]"#)
        .send()
        .await
        .unwrap();
    assert_eq!(scripted.status().as_u16(), 200);

    let token = |http: reqwest::Client| {
        let url = fake.token_url();
        async move {
            http.post(url)
                .form(&[("grant_type", "authorization_code")])
                .send()
                .await
        }
    };
    let first = token(http.clone()).await.unwrap();
    assert_eq!(first.status().as_u16(), 429);
    assert_eq!(first.headers()["retry-after"], "1");
    let second = token(http.clone()).await.unwrap();
    assert_eq!(second.status().as_u16(), 503);
    let third = token(http.clone()).await;
    assert!(third.is_err(), "the connection was dropped: {third:?}");
    let fourth = token(http.clone()).await.unwrap();
    assert_eq!(
        fourth.status().as_u16(),
        400,
        "scripts run out, then the real checks"
    );

    let stats: serde_json::Value = http
        .get(format!("{base}/test/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["token_requests"], 4);
    assert_eq!(stats["dropped"], 1);
    assert_eq!(stats["by_status"]["429"], 1);
    assert_eq!(stats["by_status"]["503"], 1);

    let bad = http
        .post(format!("{base}/test/script"))
        .body(r#"["teapot"]"#)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status().as_u16(), 400);
}
