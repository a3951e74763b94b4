//! Assembles and runs one gRPC server: the service's routes plus health and reflection (v1 and
//! v1alpha, so plain `grpcurl list`/`describe` work), behind the [`EdgeLayer`], with HTTP/2 keepalive,
//! a maximum connection age, bounded streams per connection and a bound on the streams a peer may
//! make the server reset (h2's guard against reset floods, which tonic turns off unless told,
//! RUSTSEC-2024-0003), and graceful shutdown: on the signal, health turns NOT_SERVING first, the
//! server stops accepting, in-flight calls drain, open streams end cleanly (status OK: their clients
//! watch again, elsewhere), and whatever is still open after the grace period is cut so the process
//! always exits in bounded time.
//!
//! With [`TlsConfig`] the gRPC port speaks TLS and requires a client certificate signed by the
//! cluster CA (mTLS, rustls via tonic); Kubernetes' gRPC probes can't present one, so a plaintext
//! port serving only `grpc.health.v1` ([`ServerConfig::health_listen`]) can be opened next to it.

use std::future::Future;
use std::time::Duration;

use chipgate_state::Store;
use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use crate::edge::{EdgeLayer, EdgeStats};
use crate::health::{self, HealthHandle};
use crate::metrics::Metrics;

/// Server settings shared by every service.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Deadline for calls that bring none (or a longer one).
    pub request_timeout: Duration,
    /// Calls in flight across all connections before new ones are shed.
    pub max_concurrency: usize,
    /// How long in-flight calls may drain after the shutdown signal.
    pub shutdown_grace: Duration,
    /// Pause between turning NOT_SERVING and closing the listener, so load balancers notice first.
    pub drain_delay: Duration,
    /// HTTP/2 keepalive ping interval.
    pub keepalive_interval: Duration,
    /// HTTP/2 keepalive ack timeout.
    pub keepalive_timeout: Duration,
    /// Connections older than this are gracefully closed (so clients rebalance across replicas).
    pub max_connection_age: Duration,
    /// Largest request or response message.
    pub max_message_bytes: usize,
    /// Health probe interval.
    pub health_interval: Duration,
    /// Verifies callers' bearer tokens; None turns authentication off (every caller is trusted: only
    /// for tests and explicitly insecure setups).
    pub auth: Option<std::sync::Arc<crate::auth::Verifier>>,
    /// Calls per second per caller (0: no per-caller limit).
    pub rate_limit_per_second: f64,
    /// Burst of calls per caller above the rate.
    pub rate_limit_burst: u32,
    /// Serve TLS and require client certificates (None: plaintext).
    pub tls: Option<TlsConfig>,
    /// A plaintext port serving only health (for probes when the main port requires mTLS).
    pub health_listen: Option<std::net::SocketAddr>,
    /// Streaming calls: global and per-caller quotas held for each stream's life, and the idle bound.
    pub streams: crate::edge::StreamLimits,
    /// HTTP/2 streams one connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_streams_per_connection: u32,
    /// Streams a connection's peer may make the server reset (protocol errors, refused streams) over
    /// the connection's life before it is closed with ENHANCE_YOUR_CALM.
    pub max_local_error_resets: usize,
    /// Failed authentications a peer address may make per second, after a burst (0: no budget).
    pub auth_failure_rate: f64,
    /// The burst of failed authentications per peer address.
    pub auth_failure_burst: u32,
}

/// h2's own default for streams a peer may make the server reset (hyper and h2 use it unless told
/// otherwise; tonic tells them "no limit").
pub const DEFAULT_MAX_LOCAL_ERROR_RESETS: usize = 1024;
/// Streams a peer may reset before the server accepted them (h2's default, stated explicitly).
const MAX_PENDING_ACCEPT_RESETS: usize = 20;

/// PEM material for mTLS: this server's certificate chain and key, and the CA that client
/// certificates (and, for clients, peer servers) must chain to.
#[derive(Clone)]
pub struct TlsConfig {
    /// Certificate chain (PEM).
    pub cert_pem: Vec<u8>,
    /// Private key (PEM).
    pub key_pem: Vec<u8>,
    /// CA certificate(s) (PEM).
    pub ca_pem: Vec<u8>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsConfig(<certificate, key, CA>)")
    }
}

impl TlsConfig {
    /// Reads the three PEM files.
    ///
    /// # Errors
    /// When one can't be read.
    pub fn from_files(cert: &std::path::Path, key: &std::path::Path, ca: &std::path::Path) -> Result<Self, String> {
        let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| format!("can't read {}: {e}", p.display()));
        Ok(TlsConfig { cert_pem: read(cert)?, key_pem: read(key)?, ca_pem: read(ca)? })
    }

    /// The server side: present our certificate, require one signed by the CA.
    pub fn server(&self) -> tonic::transport::ServerTlsConfig {
        tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem))
            .client_ca_root(tonic::transport::Certificate::from_pem(&self.ca_pem))
    }

    /// The client side: trust only the CA, present our certificate.
    pub fn client(&self) -> tonic::transport::ClientTlsConfig {
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca_pem))
            .identity(tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem))
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            request_timeout: Duration::from_secs(10),
            max_concurrency: 1024,
            shutdown_grace: Duration::from_secs(20),
            drain_delay: Duration::ZERO,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            max_connection_age: Duration::from_secs(30 * 60),
            max_message_bytes: 8 * 1024 * 1024,
            health_interval: Duration::from_secs(1),
            auth: None,
            rate_limit_per_second: 0.0,
            rate_limit_burst: 100,
            tls: None,
            health_listen: None,
            streams: crate::edge::StreamLimits::default(),
            max_streams_per_connection: 1024,
            max_local_error_resets: DEFAULT_MAX_LOCAL_ERROR_RESETS,
            auth_failure_rate: 1.0,
            auth_failure_burst: 20,
        }
    }
}

/// What one service contributes to a server.
pub struct ServiceSpec {
    /// Fully-qualified gRPC service names (for health and reflection).
    pub names: Vec<&'static str>,
    /// Its routes.
    pub routes: Routes,
    /// Its metrics (the edge records every call in them).
    pub metrics: Metrics,
    /// Named health checks of its own work (e.g. orders' propagation), reported beside the
    /// service's health (see [`health::HealthCheck`]).
    pub checks: Vec<health::HealthCheck>,
}

/// The method paths (`/pkg.Service/Method`) of `services` in the descriptor set, each with whether it
/// streams, plus health and reflection: the only paths that get their own metric series.
fn method_paths(services: &[&str]) -> Vec<(String, bool)> {
    use prost::Message;
    let mut out =
        vec![("/grpc.health.v1.Health/Check".to_string(), false), ("/grpc.health.v1.Health/List".to_string(), false)];
    out.extend(crate::edge::streams::always_streaming().into_iter().map(|p| (p, true)));
    let Ok(set) = prost_types::FileDescriptorSet::decode(chipgate_proto::FILE_DESCRIPTOR_SET) else {
        return out;
    };
    for file in &set.file {
        for svc in &file.service {
            let full = format!("{}.{}", file.package(), svc.name());
            if services.contains(&full.as_str()) {
                out.extend(
                    svc.method
                        .iter()
                        .map(|m| (format!("/{full}/{}", m.name()), m.server_streaming() || m.client_streaming())),
                );
            }
        }
    }
    out
}

/// The HTTP/2 bounds every port of the server has: streams per connection, and how many streams a
/// peer may make the server reset before the connection is closed. tonic forwards `None` for the
/// latter unless told, which turns off h2's guard against reset floods (RUSTSEC-2024-0003).
fn http2_limits<L>(builder: Server<L>, config: &ServerConfig) -> Server<L> {
    builder
        .max_concurrent_streams(Some(config.max_streams_per_connection.max(1)))
        .http2_max_local_error_reset_streams(Some(config.max_local_error_resets.max(1)))
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_ACCEPT_RESETS))
}

/// Why serving failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Reflection could not be built from the descriptor sets.
    #[error("reflection: {0}")]
    Reflection(String),
    /// The transport failed.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The plaintext health port can't be bound.
    #[error("health port: {0}")]
    HealthPort(std::io::Error),
}

/// A running server's handles (for tests and the dev cluster).
#[derive(Clone)]
pub struct Running {
    /// Health control.
    pub health: HealthHandle,
    /// Edge counters.
    pub edge: std::sync::Arc<EdgeStats>,
    /// Where the plaintext health port listens, when there is one.
    pub health_addr: Option<std::net::SocketAddr>,
}

/// Serves `spec` on `listener` until `shutdown` resolves, then drains (see the module docs).
/// `on_ready` receives the handles once the server is set up.
///
/// # Errors
/// When reflection can't be built or the transport fails.
pub async fn serve(
    listener: TcpListener,
    spec: ServiceSpec,
    store: Store,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_ready: impl FnOnce(Running),
) -> Result<(), ServeError> {
    let local = listener.local_addr().ok();
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let names: Vec<String> = spec.names.iter().map(|s| s.to_string()).collect();
    let health =
        health::spawn_monitor(reporter, names.clone(), spec.checks.clone(), store, config.health_interval).await;

    let reflection = || {
        let mut b = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(chipgate_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.health.v1.Health");
        for name in &spec.names {
            b = b.with_service_name(*name);
        }
        b
    };
    let v1 = reflection()
        .with_service_name("grpc.reflection.v1.ServerReflection")
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    let v1alpha = reflection()
        .with_service_name("grpc.reflection.v1alpha.ServerReflection")
        .build_v1alpha()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;

    let paths = method_paths(&spec.names);
    let streaming = paths.iter().filter(|(_, s)| *s).map(|(p, _)| p.clone()).collect::<Vec<_>>();
    let edge = EdgeLayer::new(config.max_concurrency, Some(config.request_timeout))
        .with_metrics(spec.metrics.rpc().clone())
        .with_auth(config.auth.clone(), config.max_message_bytes)
        .with_auth_failure_budget(config.auth_failure_rate, config.auth_failure_burst)
        .with_rate_limit(config.rate_limit_per_second, config.rate_limit_burst)
        .with_streams(config.streams.clone(), streaming);
    // The health port's Watch streams count against the same quotas.
    let edge_streams = edge.streams();

    // The plaintext health-only port, serving until the main server has stopped.
    let (health_stop, health_stopped) = tokio::sync::oneshot::channel::<()>();
    let health_addr = match config.health_listen {
        None => None,
        Some(addr) => {
            let l = TcpListener::bind(addr).await.map_err(ServeError::HealthPort)?;
            let bound = l.local_addr().map_err(ServeError::HealthPort)?;
            let svc = health_service.clone();
            let streams = edge_streams.clone();
            let builder = http2_limits(Server::builder(), &config);
            tokio::spawn(async move {
                let r = builder
                    .layer(streams)
                    .add_service(svc)
                    .serve_with_incoming_shutdown(TcpIncoming::from(l), async move {
                        let _ = health_stopped.await;
                    })
                    .await;
                if let Err(e) = r {
                    tracing::error!(error = %e, "health port failed");
                }
            });
            tracing::info!(addr = %bound, "plaintext health port");
            Some(bound)
        }
    };
    let routes = spec.routes.add_service(health_service).add_service(v1).add_service(v1alpha);
    spec.metrics.rpc().know(paths.into_iter().map(|(p, _)| p));
    if config.auth.is_none() {
        tracing::warn!(?local, "authentication is OFF: every caller may call every RPC");
    }
    on_ready(Running { health: health.clone(), edge: edge.stats(), health_addr });

    let (fired_tx, fired_rx) = tokio::sync::oneshot::channel::<()>();
    let drain_health = health.clone();
    let drain_delay = config.drain_delay;
    let drain_streams = edge_streams.clone();
    let signal = async move {
        shutdown.await;
        drain_health.set_draining().await;
        tracing::info!(?local, delay = ?drain_delay, "shutdown: health NOT_SERVING; draining in-flight calls");
        if !drain_delay.is_zero() {
            tokio::time::sleep(drain_delay).await;
        }
        // Watchers have seen NOT_SERVING; their streams end now (they watch again elsewhere) rather
        // than hold the server for the whole grace period.
        drain_streams.end_all();
        let _ = fired_tx.send(());
    };

    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut builder = http2_limits(Server::builder(), &config)
        .http2_keepalive_interval(Some(config.keepalive_interval))
        .http2_keepalive_timeout(Some(config.keepalive_timeout))
        .max_connection_age(config.max_connection_age);
    if let Some(tls) = &config.tls {
        builder = builder.tls_config(tls.server())?;
        tracing::info!(?local, "mTLS: client certificates signed by the configured CA are required");
    }
    let server = builder.layer(edge).add_routes(routes).serve_with_incoming_shutdown(incoming, signal);
    tokio::pin!(server);
    let grace = config.shutdown_grace;
    tokio::select! {
        r = &mut server => {
            r?;
            tracing::info!(?local, "server stopped");
        }
        () = async move {
            if fired_rx.await.is_ok() {
                tokio::time::sleep(grace).await;
            } else {
                std::future::pending::<()>().await;
            }
        } => {
            tracing::warn!(?local, ?grace, "drain deadline passed; closing the connections still open");
        }
    }
    let _ = health_stop.send(());
    Ok(())
}
