//! TLS and mutual TLS on the gRPC listener, with certificates made for the test.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use token_broker::{
    api::proto::{GetJobRequest, token_broker_client::TokenBrokerClient},
    config::TlsConfig,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::helpers::TestApp;

/// A CA, a server certificate for localhost and a client certificate, as PEM files in `dir`.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: String,
    client_key: String,
}

fn make_pki(dir: &Path) -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&server_key, &ca)
        .unwrap();
    let client_key = KeyPair::generate().unwrap();
    let client = CertificateParams::new(vec!["backend.example".to_string()])
        .unwrap()
        .signed_by(&client_key, &ca)
        .unwrap();

    let write = |name: &str, pem: String| {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    Pki {
        ca: write("ca.pem", ca.pem()),
        server_cert: write("server.pem", server.pem()),
        server_key: write("server.key", server_key.serialize_pem()),
        client_cert: client.pem(),
        client_key: client_key.serialize_pem(),
    }
}

async fn connect(
    app: &TestApp,
    pki: &Pki,
    with_client_cert: bool,
) -> Result<TokenBrokerClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(&pki.ca).unwrap()))
        .domain_name("localhost");
    if with_client_cert {
        tls = tls.identity(Identity::from_pem(&pki.client_cert, &pki.client_key));
    }
    let channel = Endpoint::from_shared(format!("https://localhost:{}", app.grpc_addr.port()))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(TokenBrokerClient::new(channel))
}

/// Whether a call over `client` reaches the service (any gRPC answer, NOT_FOUND included).
async fn reaches(client: &mut TokenBrokerClient<Channel>) -> bool {
    let status = client
        .get_job(GetJobRequest {
            job_id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .unwrap_err();
    status.code() == tonic::Code::NotFound
}

#[tokio::test]
async fn tls_serves_tls_clients_and_refuses_plaintext() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = make_pki(pki_dir.path());
    let app = TestApp::spawn_with(|config| {
        config.server.tls = Some(TlsConfig {
            cert_file: pki.server_cert.clone(),
            key_file: pki.server_key.clone(),
            client_ca_file: None,
        });
    })
    .await;

    let mut client = connect(&app, &pki, false).await.expect("TLS handshake");
    assert!(reaches(&mut client).await);

    // TestApp's own client speaks plaintext: refused.
    let mut plaintext = app.client.clone();
    let refused = plaintext
        .get_job(GetJobRequest {
            job_id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .unwrap_err();
    assert_ne!(refused.code(), tonic::Code::NotFound, "{refused:?}");
}

#[tokio::test]
async fn mutual_tls_requires_a_client_certificate_from_the_ca() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = make_pki(pki_dir.path());
    let app = TestApp::spawn_with(|config| {
        config.server.tls = Some(TlsConfig {
            cert_file: pki.server_cert.clone(),
            key_file: pki.server_key.clone(),
            client_ca_file: Some(pki.ca.clone()),
        });
    })
    .await;

    let mut with_cert = connect(&app, &pki, true).await.expect("mTLS handshake");
    assert!(reaches(&mut with_cert).await);

    match connect(&app, &pki, false).await {
        Err(_) => {}
        Ok(mut without_cert) => assert!(
            !reaches(&mut without_cert).await,
            "a client without a certificate must not reach the service"
        ),
    }
}
