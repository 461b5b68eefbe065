//! The gRPC server: TokenBroker, AuditLog, health and reflection (v1 and v1alpha) on one
//! router, with TLS when configured, served on the connections the server's accept loop
//! admits. The only place that knows tonic's server types.

use std::{future::Future, io, time::Duration};

use anyhow::Context;
use tokio::sync::mpsc;
use tonic_health::ServingStatus;

use super::{AuditLogApi, TokenBrokerApi, proto};
use crate::{
    config::{ServerConfig, TlsConfig},
    server::connections::Guarded,
};

/// The services the router serves.
pub struct GrpcServices {
    pub broker: TokenBrokerApi,
    pub audit: AuditLogApi,
    pub health: Health,
}

/// The gRPC health status (`grpc.health.v1`) of the whole server and of both services.
#[derive(Debug, Clone, Default)]
pub struct Health(tonic_health::server::HealthReporter);

impl Health {
    /// Reports the server ("") and both services as serving, or not.
    pub async fn set(&self, serving: bool) {
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for service in [
            "",
            <proto::token_broker_server::TokenBrokerServer<TokenBrokerApi> as tonic::server::NamedService>::NAME,
            <proto::audit_log_server::AuditLogServer<AuditLogApi> as tonic::server::NamedService>::NAME,
        ] {
            self.0.set_service_status(service, status).await;
        }
    }
}

/// Serves `services` on the connections arriving on `accepted` until `shutdown` completes and
/// the open calls have ended.
pub async fn serve(
    config: &ServerConfig,
    services: GrpcServices,
    accepted: mpsc::Receiver<io::Result<Guarded>>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("cannot build reflection v1")?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("cannot build reflection v1alpha")?;
    let max_message = config.max_message_bytes;
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &config.tls {
        builder = builder
            .tls_config(tls_config(tls)?)
            .context("cannot configure TLS for the gRPC listener")?;
    }
    builder
        .max_concurrent_streams(Some(config.max_concurrent_streams))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(services.health.0),
        ))
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            proto::token_broker_server::TokenBrokerServer::new(services.broker)
                .max_decoding_message_size(max_message),
        )
        .add_service(
            proto::audit_log_server::AuditLogServer::new(services.audit)
                .max_decoding_message_size(max_message),
        )
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::ReceiverStream::new(accepted),
            shutdown,
        )
        .await
        .context("gRPC server failed")
}

impl tonic::transport::server::Connected for Guarded {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.tcp().connect_info()
    }
}

/// The listener's TLS settings, from the PEM files the configuration names.
fn tls_config(tls: &TlsConfig) -> anyhow::Result<tonic::transport::ServerTlsConfig> {
    let read = |path: &std::path::Path, what: &str| {
        std::fs::read(path)
            .with_context(|| format!("cannot read the TLS {what} {}", path.display()))
    };
    let identity = tonic::transport::Identity::from_pem(
        read(&tls.cert_file, "certificate")?,
        read(&tls.key_file, "key")?,
    );
    let mut config = tonic::transport::ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &tls.client_ca_file {
        config = config
            .client_ca_root(tonic::transport::Certificate::from_pem(read(
                ca,
                "client CA",
            )?))
            .client_auth_optional(false);
    }
    Ok(config)
}
