//! Flags and environment shared by every service binary. Each binary flattens [`CommonArgs`] into its
//! own clap parser and adds what is specific to it.

use std::net::SocketAddr;
use std::time::Duration;

use chipgate_state::{RedisOptions, Store};

use crate::metrics::Metrics;
use crate::server::ServerConfig;
use crate::shutdown::Shutdown;
use crate::telemetry::{LogFormat, TelemetryGuard};
use crate::time::parse_duration;

/// Flags every service takes.
#[derive(clap::Args, Clone, Debug)]
pub struct CommonArgs {
    /// Address to serve gRPC on (health and reflection included).
    #[arg(long, env = "CHIPGATE_LISTEN")]
    pub listen: Option<SocketAddr>,

    /// Redis holding the shared state, e.g. redis://redis:6379/0 (rediss:// for TLS; a user and
    /// password may be given as redis://user:password@host, better from --redis-password-file).
    /// With --redis-cluster, a comma-separated list of seed nodes.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379/0")]
    pub redis_url: String,

    /// The Redis is a Redis Cluster: --redis-url lists seed nodes (any reachable one finds the rest),
    /// commands are routed by hash slot and follow MOVED/ASK through failovers.
    #[arg(long, env = "CHIPGATE_REDIS_CLUSTER")]
    pub redis_cluster: bool,

    /// Redis ACL user (overrides one in the URL).
    #[arg(long, env = "CHIPGATE_REDIS_USERNAME")]
    pub redis_username: Option<String>,

    /// File holding the Redis password (e.g. a mounted Secret; one trailing newline is ignored).
    /// Overrides one in the URL. Never logged.
    #[arg(long, env = "CHIPGATE_REDIS_PASSWORD_FILE")]
    pub redis_password_file: Option<std::path::PathBuf>,

    /// PEM CA certificate(s) the Redis servers' TLS certificates must chain to (rediss:// URLs;
    /// without it the system's roots are trusted).
    #[arg(long, env = "CHIPGATE_REDIS_CA")]
    pub redis_ca: Option<std::path::PathBuf>,

    /// Replicas that must acknowledge every write that answers a call (Redis WAIT) before it
    /// answers; if they don't within --redis-wait-timeout the call answers UNAVAILABLE (outcome
    /// unknown; retrying with the same request id is safe). Default: 1 with --redis-cluster, 0
    /// for a single Redis.
    #[arg(long, env = "CHIPGATE_REDIS_MIN_REPLICAS")]
    pub redis_min_replicas: Option<u32>,

    /// How long a write waits for --redis-min-replicas acknowledgements.
    #[arg(long, env = "CHIPGATE_REDIS_WAIT_TIMEOUT", value_parser = parse_duration, default_value = "500ms")]
    pub redis_wait_timeout: Duration,

    /// Log format: pretty for people, json for log pipelines. The level comes from RUST_LOG.
    #[arg(long, env = "CHIPGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    pub log_format: LogFormat,

    /// Deadline for calls that bring none or a longer one (e.g. 10s, 500ms).
    #[arg(long, env = "CHIPGATE_REQUEST_TIMEOUT", value_parser = parse_duration, default_value = "10s")]
    pub request_timeout: Duration,

    /// Calls in flight (across all connections) before new ones are shed with RESOURCE_EXHAUSTED.
    #[arg(long, env = "CHIPGATE_MAX_CONCURRENCY", default_value_t = 1024)]
    pub max_concurrency: usize,

    /// How long in-flight calls may drain after SIGTERM before the process exits anyway.
    #[arg(long, env = "CHIPGATE_SHUTDOWN_GRACE", value_parser = parse_duration, default_value = "20s")]
    pub shutdown_grace: Duration,

    /// Pause after turning NOT_SERVING before the listener closes (lets load balancers catch up).
    #[arg(long, env = "CHIPGATE_DRAIN_DELAY", value_parser = parse_duration, default_value = "0s")]
    pub drain_delay: Duration,

    /// Largest gRPC message accepted or sent, in bytes.
    #[arg(long, env = "CHIPGATE_MAX_MESSAGE_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub max_message_bytes: usize,

    /// Address of the admin HTTP port serving Prometheus metrics at /metrics (off when unset).
    #[arg(long, env = "CHIPGATE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// OTLP/gRPC endpoint to export traces to, e.g. http://otel-collector:4317 (off when unset).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// Calls per second each caller (token subject, or IP address without authentication) may make;
    /// beyond it calls get RESOURCE_EXHAUSTED with RetryInfo. 0 turns the limit off. The services'
    /// own calls to each other are not limited.
    #[arg(long, env = "CHIPGATE_RATE_LIMIT", default_value_t = 0.0)]
    pub rate_limit: f64,

    /// Calls a caller may make in a burst above --rate-limit.
    #[arg(long, env = "CHIPGATE_RATE_LIMIT_BURST", default_value_t = 100)]
    pub rate_limit_burst: u32,

    /// HTTP/2 connections older than this are closed gracefully (clients reconnect and rebalance).
    #[arg(long, env = "CHIPGATE_MAX_CONNECTION_AGE", value_parser = parse_duration, default_value = "30m")]
    pub max_connection_age: Duration,

    /// HTTP/2 keepalive ping interval (dead peers are noticed within this plus 10 s).
    #[arg(long, env = "CHIPGATE_KEEPALIVE", value_parser = parse_duration, default_value = "30s")]
    pub keepalive: Duration,

    /// PEM file of the Ed25519 public key(s) that sign callers' bearer tokens (several blocks during a
    /// key rotation; a `roles: service` line before a block limits that key to those roles).
    /// Required unless --insecure-no-auth.
    #[arg(long, env = "CHIPGATE_AUTH_PUBLIC_KEY")]
    pub auth_public_key: Option<std::path::PathBuf>,

    /// Longest lifetime (exp - iat) of a token per role, as role=duration pairs; `*` names every
    /// role not named otherwise (e.g. `*=24h,service=720h`). Unnamed roles keep the defaults: 720h
    /// for service, 168h for every other role.
    #[arg(long, env = "CHIPGATE_TOKEN_MAX_LIFETIME", default_value = "", value_parser = parse_lifetimes)]
    pub token_max_lifetime: crate::auth::Lifetimes,

    /// Failed authentications per second a peer address may make (after --auth-failure-burst); beyond
    /// them its calls with a token not seen before are refused RESOURCE_EXHAUSTED with RetryInfo
    /// before any signature check. 0 turns the budget off.
    #[arg(long, env = "CHIPGATE_AUTH_FAILURE_RATE", default_value_t = 1.0)]
    pub auth_failure_rate: f64,

    /// Failed authentications a peer address may make in a burst.
    #[arg(long, env = "CHIPGATE_AUTH_FAILURE_BURST", default_value_t = 20)]
    pub auth_failure_burst: u32,

    /// Streaming calls (watches, health Watch, reflection) open at once across all connections.
    #[arg(long, env = "CHIPGATE_MAX_STREAMS", default_value_t = 1000)]
    pub max_streams: usize,

    /// Streaming calls one caller (token subject, or peer address) may hold open at once.
    #[arg(long, env = "CHIPGATE_MAX_STREAMS_PER_CALLER", default_value_t = 32)]
    pub max_streams_per_caller: usize,

    /// A stream on which nothing was sent for this long is ended with OK (the client watches again);
    /// 0 never ends idle streams.
    #[arg(long, env = "CHIPGATE_STREAM_IDLE_TIMEOUT", value_parser = parse_duration, default_value = "10m")]
    pub stream_idle_timeout: Duration,

    /// HTTP/2 streams (calls) one connection may have open at once.
    #[arg(long, env = "CHIPGATE_MAX_STREAMS_PER_CONNECTION", default_value_t = 1024)]
    pub max_streams_per_connection: u32,

    /// Serve without authentication: every caller may call every RPC. Only for local experiments.
    #[arg(long, env = "CHIPGATE_INSECURE_NO_AUTH", conflicts_with = "auth_public_key")]
    pub insecure_no_auth: bool,

    /// PEM certificate (chain) of this service: with --tls-key and --tls-ca, the gRPC port serves
    /// TLS and requires client certificates signed by the CA (mTLS); orders also presents it to its
    /// peers.
    #[arg(long, env = "CHIPGATE_TLS_CERT", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<std::path::PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "CHIPGATE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,

    /// PEM CA certificate(s) that client certificates (and peer servers) must chain to.
    #[arg(long, env = "CHIPGATE_TLS_CA", requires = "tls_cert")]
    pub tls_ca: Option<std::path::PathBuf>,

    /// Address of a plaintext port that serves only gRPC health (for Kubernetes probes when the
    /// main port requires mTLS), e.g. 0.0.0.0:8086.
    #[arg(long, env = "CHIPGATE_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,

    /// Redis command timeout; calls fail fast with UNAVAILABLE after it while Redis is down.
    #[arg(long, env = "CHIPGATE_REDIS_TIMEOUT", value_parser = parse_duration, default_value = "2s")]
    pub redis_timeout: Duration,
}

/// A secret file's content without the trailing newline editors and `kubectl create secret
/// --from-file` leave.
fn read_secret(path: &std::path::Path) -> std::io::Result<String> {
    let text = std::fs::read_to_string(path)?;
    let trimmed = text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(&text);
    if trimmed.is_empty() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "the file is empty"));
    }
    Ok(trimmed.to_string())
}

fn parse_lifetimes(s: &str) -> Result<crate::auth::Lifetimes, String> {
    crate::auth::Lifetimes::parse(s)
}

impl CommonArgs {
    /// The listen address, or the service's default port on all interfaces.
    pub fn listen_or(&self, default_port: u16) -> SocketAddr {
        self.listen.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], default_port)))
    }

    /// Installs logging (and trace export when an OTLP endpoint is set) for `service`.
    ///
    /// # Errors
    /// When the trace exporter can't be built.
    pub fn init_telemetry(&self, service: &str) -> Result<TelemetryGuard, crate::telemetry::TelemetryError> {
        crate::telemetry::init(self.log_format, self.otlp_endpoint.as_deref(), service)
    }

    /// Binds the metrics port when one is configured and serves `metrics` on it until `shutdown`.
    ///
    /// # Errors
    /// When the port can't be bound.
    pub async fn spawn_metrics(&self, metrics: &Metrics, shutdown: Shutdown) -> std::io::Result<Option<SocketAddr>> {
        let Some(addr) = self.metrics_listen else {
            return Ok(None);
        };
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let m = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(listener, m, async move { shutdown.wait().await }).await {
                tracing::error!(error = %e, "metrics server failed");
            }
        });
        tracing::info!(addr = %local, "serving Prometheus metrics at /metrics");
        Ok(Some(local))
    }

    /// Server settings from the flags (reads the key files they name).
    ///
    /// # Errors
    /// When neither a public key nor --insecure-no-auth is given, or a key file is unusable.
    pub fn server_config(&self) -> Result<ServerConfig, String> {
        let auth = match (&self.auth_public_key, self.insecure_no_auth) {
            (Some(path), _) => Some(std::sync::Arc::new(
                crate::auth::Verifier::from_file(path)
                    .map_err(|e| format!("--auth-public-key: {e}"))?
                    .with_lifetimes(self.token_max_lifetime.clone()),
            )),
            (None, true) => None,
            (None, false) => {
                return Err("no --auth-public-key (CHIPGATE_AUTH_PUBLIC_KEY) given; pass --insecure-no-auth to serve \
                            without authentication"
                    .to_string());
            }
        };
        let tls = self.tls_config()?;
        Ok(ServerConfig {
            tls,
            health_listen: self.health_listen,
            rate_limit_per_second: self.rate_limit.max(0.0),
            rate_limit_burst: self.rate_limit_burst.max(1),
            max_connection_age: self.max_connection_age,
            keepalive_interval: self.keepalive,
            request_timeout: self.request_timeout,
            max_concurrency: self.max_concurrency.max(1),
            shutdown_grace: self.shutdown_grace,
            drain_delay: self.drain_delay,
            max_message_bytes: self.max_message_bytes,
            auth,
            auth_failure_rate: self.auth_failure_rate.max(0.0),
            auth_failure_burst: self.auth_failure_burst.max(1),
            streams: crate::edge::StreamLimits {
                max_open: self.max_streams.max(1),
                per_caller: self.max_streams_per_caller.max(1),
                idle: (!self.stream_idle_timeout.is_zero()).then_some(self.stream_idle_timeout),
            },
            max_streams_per_connection: self.max_streams_per_connection.max(1),
            ..ServerConfig::default()
        })
    }

    /// The mTLS material, when --tls-cert/--tls-key/--tls-ca are given.
    ///
    /// # Errors
    /// When a file can't be read.
    pub fn tls_config(&self) -> Result<Option<crate::server::TlsConfig>, String> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(c), Some(k), Some(ca)) => crate::server::TlsConfig::from_files(c, k, ca).map(Some),
            (None, None, None) => Ok(None),
            _ => Err("--tls-cert, --tls-key and --tls-ca go together".to_string()),
        }
    }

    /// The Redis connection settings the flags give (reads the password file).
    ///
    /// # Errors
    /// When the password file can't be read.
    pub fn redis_options(&self) -> Result<RedisOptions, chipgate_state::StateError> {
        let password = match &self.redis_password_file {
            Some(path) => Some(read_secret(path).map_err(|e| {
                chipgate_state::StateError::Backend(format!("--redis-password-file {}: {e}", path.display()))
            })?),
            None => None,
        };
        Ok(RedisOptions {
            response_timeout: self.redis_timeout,
            cluster: self.redis_cluster,
            username: self.redis_username.clone(),
            password,
            tls_ca: self.redis_ca.clone(),
            min_replicas: self.redis_min_replicas.unwrap_or(if self.redis_cluster { 1 } else { 0 }),
            wait_timeout: self.redis_wait_timeout,
            ..RedisOptions::default()
        })
    }

    /// Connects to Redis, retrying (with a log line per attempt) until it answers.
    ///
    /// # Errors
    /// When the URL is malformed, the password file unreadable, or Redis refuses the credentials.
    pub async fn connect_store(&self) -> Result<Store, chipgate_state::StateError> {
        Store::connect_redis(&self.redis_url, self.redis_options()?).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        common: CommonArgs,
    }

    fn parse(args: &[&str]) -> CommonArgs {
        Flags::try_parse_from(std::iter::once("svc").chain(args.iter().copied())).expect("flags parse").common
    }

    #[test]
    fn redis_flags_configure_cluster_acl_tls_and_durability() {
        let dir = tempfile::tempdir().expect("temp dir");
        let secret = dir.path().join("password");
        std::fs::write(&secret, "hunter2-very-secret\n").expect("write secret");
        let ca = dir.path().join("ca.pem");
        let common = parse(&[
            "--redis-cluster",
            "--redis-url",
            "redis://10.0.0.1:6379,redis://10.0.0.2:6379",
            "--redis-username",
            "orders",
            "--redis-password-file",
            secret.to_str().expect("utf-8 path"),
            "--redis-ca",
            ca.to_str().expect("utf-8 path"),
            "--redis-wait-timeout",
            "250ms",
        ]);
        let o = common.redis_options().expect("options");
        assert!(o.cluster);
        assert_eq!(o.username.as_deref(), Some("orders"));
        assert_eq!(o.password.as_deref(), Some("hunter2-very-secret"), "the trailing newline is not the password");
        assert_eq!(o.tls_ca.as_deref(), Some(ca.as_path()));
        assert_eq!(o.min_replicas, 1, "a cluster waits for one replica by default");
        assert_eq!(o.wait_timeout, Duration::from_millis(250));
        assert!(!format!("{o:?}").contains("hunter2"), "options never print the password");
        assert!(!format!("{common:?}").contains("hunter2"), "flags hold the file, not the password");

        let single = parse(&[]).redis_options().expect("options");
        assert!(!single.cluster);
        assert_eq!((single.min_replicas, single.password), (0, None), "a single Redis waits for nobody");
        assert_eq!(parse(&["--redis-min-replicas", "2"]).redis_options().expect("options").min_replicas, 2);
        assert_eq!(
            parse(&["--redis-cluster", "--redis-min-replicas", "0"]).redis_options().expect("options").min_replicas,
            0
        );

        let missing = parse(&["--redis-password-file", "/nonexistent/chipgate-password"]);
        let err = missing.redis_options().expect_err("an unreadable password file is an error");
        assert!(err.to_string().contains("--redis-password-file"), "{err}");
        std::fs::write(&secret, "\n").expect("write secret");
        let empty = parse(&["--redis-password-file", secret.to_str().expect("utf-8 path")]);
        assert!(empty.redis_options().is_err(), "an empty password file is an error, not an empty password");
    }
}
