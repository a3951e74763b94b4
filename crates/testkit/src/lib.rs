//! The test harness: boots chipgate services in process, each on its own loopback port 0 listener,
//! against a private real `redis-server` (or Redis Cluster, or the in-memory backend), and hands back typed gRPC
//! clients. The cross-service suite, the CLI tests and the benchmarks use it; everything talks real
//! gRPC over real sockets.

pub mod invariants;
pub mod parties;
pub mod procs;
pub mod prom;
pub mod raw;

use std::net::SocketAddr;
use std::time::Duration;

use chipgate_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use chipgate_proto::licensing::v1::licensing_service_client::LicensingServiceClient;
use chipgate_proto::orders::v1::order_service_client::OrderServiceClient;
use chipgate_runtime::server::{Running, ServerConfig};
use chipgate_runtime::{Shutdown, serve};
use chipgate_state::testing::{RedisCluster, RedisDeployment, RedisServer};
use chipgate_state::{Backend, Store};
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

pub use parties::Parties;

/// A licensing client acting as whichever party each call needs ([`Parties`]).
pub type LicensingClient = LicensingServiceClient<Parties>;
/// An inventory client acting as whichever party each call needs ([`Parties`]).
pub type InventoryClient = InventoryServiceClient<Parties>;
/// An orders client acting as whichever party each call needs ([`Parties`]).
pub type OrdersClient = OrderServiceClient<Parties>;

/// Which state backend a cluster runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// A private real redis-server (what the tests that matter use).
    Redis,
    /// A private real Redis Cluster: 3 masters and 3 replicas, every write waiting for a replica
    /// (`min_replicas` 1), as operators run it.
    RedisCluster,
    /// The in-memory backend.
    Memory,
}

impl BackendKind {
    /// The Redis the harness starts unless a test asks for another backend: a Redis Cluster when
    /// `CHIPGATE_TEST_REDIS=cluster` (how CI runs the cross-service suite on a cluster), else a
    /// single redis-server.
    pub fn default_redis() -> Self {
        match std::env::var("CHIPGATE_TEST_REDIS").as_deref() {
            Ok("cluster") => BackendKind::RedisCluster,
            _ => BackendKind::Redis,
        }
    }
}

/// The catalogue every harness cluster starts with (the repository's `data/catalogue.json`).
pub const DEFAULT_CATALOGUE: &str = include_str!("../../../data/catalogue.json");

/// How to start a cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// State backend.
    pub backend: BackendKind,
    /// Server settings for every service.
    pub server: ServerConfig,
    /// Inventory background behaviour (sweep interval).
    pub inventory: chipgate_inventory::Options,
    /// Orders background behaviour.
    pub orders: chipgate_orders::Options,
    /// Run the orders service in this process (false: the caller runs it, e.g. as a real process
    /// with [`OrdersProcess`]).
    pub orders_in_process: bool,
    /// Authentication, as an operator runs the services (on by default): the cluster generates a
    /// signing key ([`Cluster::signer`]), every service verifies bearer tokens and applies the policy
    /// table, orders calls its peers with a `service` token. The clients the harness hands out act
    /// as whichever party each call needs ([`Parties`]); [`Cluster::token`] and
    /// [`Cluster::authed`] make clients of one party. Only tests about running without
    /// authentication turn it off. With it, licensing also signs audit checkpoints with a key of its
    /// own ([`Cluster::audit_key`]), as an operator runs it; without it, checkpoints are unsigned.
    pub auth: bool,
    /// How often licensing takes a periodic audit checkpoint (logs and metrics); None: never (the
    /// RPCs still take them on demand).
    pub audit_checkpoint_every: Option<Duration>,
    /// An archive (a directory or an S3 bucket) for licensing's audit log and orders' closed orders (None: no archive).
    /// Nothing archives by itself: tests run [`chipgate_licensing::Licensing::archive_audit`] and
    /// [`chipgate_orders::Orders::archive_orders`] when they choose (with chosen cutoffs).
    pub archive: Option<chipgate_archive::Target>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            backend: BackendKind::default_redis(),
            server: ServerConfig { health_interval: Duration::from_millis(100), ..ServerConfig::default() },
            inventory: chipgate_inventory::Options { sweep_interval: Duration::from_millis(50) },
            orders: chipgate_orders::Options { tick: Duration::from_millis(50), ..chipgate_orders::Options::default() },
            orders_in_process: true,
            auth: true,
            audit_checkpoint_every: None,
            archive: None,
        }
    }
}

/// One running service.
pub struct ServiceHandle {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Where its Prometheus metrics are served (`GET /metrics`).
    pub metrics_addr: SocketAddr,
    /// Its health and edge handles.
    pub running: Running,
    shutdown: Shutdown,
    task: Option<JoinHandle<()>>,
}

impl ServiceHandle {
    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:<port>/metrics`.
    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.metrics_addr)
    }

    /// Triggers its shutdown and waits for the server to stop.
    pub async fn stop(&mut self) {
        self.shutdown.trigger();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for ServiceHandle {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

/// A running set of services sharing one state backend.
pub struct Cluster {
    /// The private redis-server or Redis Cluster, when the backend is Redis.
    pub redis: Option<RedisDeployment>,
    /// The state backend every service uses.
    pub store: Store,
    /// The licensing service.
    pub licensing: ServiceHandle,
    /// The inventory service.
    pub inventory: ServiceHandle,
    /// The orders service (None when the caller runs it).
    pub orders: Option<ServiceHandle>,
    /// The in-process orders service itself (for tools that drive it directly, e.g. bulk loading).
    pub orders_service: Option<chipgate_orders::Orders>,
    /// The in-process licensing service itself (tests drive its archiver directly).
    pub licensing_service: chipgate_licensing::Licensing,
    /// The key tokens are signed with, when authentication is on.
    pub signer: Option<chipgate_runtime::auth::Signer>,
    /// Where the public key (and the signing key) are written, when authentication is on (for
    /// binaries started against this cluster); the audit key is there too, as
    /// [`AUDIT_SIGNING_KEY_FILE`].
    pub auth_dir: Option<tempfile::TempDir>,
    /// The key licensing signs audit checkpoints with (a different key from the token key), when
    /// authentication is on.
    pub audit_key: Option<chipgate_runtime::auth::Signer>,
}

/// The file (in an auth directory) holding licensing's audit signing key.
pub const AUDIT_SIGNING_KEY_FILE: &str = "audit-signing.pem";

/// Starts a server for `spec` on a fresh loopback port; it stops when `shutdown` triggers.
///
/// # Panics
/// When the port can't be bound or the server doesn't come up.
pub async fn start_service(
    store: Store,
    config: ServerConfig,
    shutdown: Shutdown,
    spec: impl FnOnce(&ServerConfig) -> chipgate_runtime::ServiceSpec,
) -> ServiceHandle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback port 0");
    let addr = listener.local_addr().expect("local addr");
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let spec = spec(&config);
    let metrics_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback port 0");
    let metrics_addr = metrics_listener.local_addr().expect("local addr");
    let (m, s) = (spec.metrics.clone(), shutdown.clone());
    tokio::spawn(async move {
        let _ = chipgate_runtime::metrics::serve(metrics_listener, m, async move { s.wait().await }).await;
    });
    let s = shutdown.clone();
    let task = tokio::spawn(async move {
        let result = serve(listener, spec, store, config, async move { s.wait().await }, move |r| {
            let _ = ready_tx.send(r);
        })
        .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "test server failed");
        }
    });
    let running = ready_rx.await.expect("server came up");
    ServiceHandle { addr, metrics_addr, running, shutdown, task: Some(task) }
}

/// A lazily-connecting channel to a service.
///
/// # Panics
/// When the URL is malformed.
pub fn channel(url: &str) -> Channel {
    Endpoint::from_shared(url.to_string())
        .expect("valid url")
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .connect_lazy()
}

impl Cluster {
    /// A cluster on a private real redis-server.
    pub async fn start() -> Self {
        Self::start_with(ClusterOptions::default()).await
    }

    /// A cluster with options.
    ///
    /// # Panics
    /// When the backend or a service can't be started.
    pub async fn start_with(options: ClusterOptions) -> Self {
        chipgate_runtime::telemetry::init_for_tests();
        let (redis, store) = match options.backend {
            BackendKind::Redis => {
                let server = RedisServer::start();
                let store = server.store().await;
                (Some(RedisDeployment::Single(server)), store)
            }
            BackendKind::RedisCluster => {
                let cluster = tokio::task::spawn_blocking(RedisCluster::start).await.expect("start a redis cluster");
                // A generous WAIT timeout: tests check what is acknowledged, and a whole suite of
                // clusters shares two cores (a starved replica must not fail an unrelated test).
                let options = chipgate_state::RedisOptions {
                    min_replicas: 1,
                    wait_timeout: Duration::from_secs(2),
                    ..cluster.redis_options()
                };
                let store = Store::Redis(cluster.backend_with(options).await);
                (Some(RedisDeployment::Cluster(cluster)), store)
            }
            BackendKind::Memory => (None, Store::memory()),
        };
        store.ping().await.expect("backend answers");
        let mut options = options;
        let (signer, auth_dir) = if options.auth {
            let signer = chipgate_runtime::auth::Signer::generate().expect("a signing key");
            options.server.auth = Some(std::sync::Arc::new(signer.verifier()));
            let dir = tempfile::tempdir().expect("a temporary directory");
            std::fs::write(dir.path().join("public.pem"), signer.public_pem()).expect("write the public key");
            std::fs::write(dir.path().join("signing.pem"), signer.private_pem()).expect("write the signing key");
            write_service_token(&signer, dir.path());
            (Some(signer), Some(dir))
        } else {
            (None, None)
        };
        let audit_key = match &auth_dir {
            Some(dir) => {
                let key = chipgate_runtime::auth::Signer::generate().expect("an audit key");
                std::fs::write(dir.path().join(AUDIT_SIGNING_KEY_FILE), key.private_pem())
                    .expect("write the audit key");
                Some(key)
            }
            None => None,
        };
        let service_tokens = match &signer {
            Some(s) => chipgate_runtime::auth::TokenSource::minted(
                s.clone(),
                chipgate_runtime::auth::Role::Service,
                "service:orders",
                None,
            ),
            None => chipgate_runtime::auth::TokenSource::None,
        };
        let lic = chipgate_licensing::Licensing::with_audit_key(store.clone(), audit_key.clone());
        let archive = options.archive.clone();
        if let Some(target) = &archive {
            lic.use_archive(target.clone());
            options.orders.archive = Some(chipgate_orders::archive::ArchiveOptions {
                every: Duration::ZERO,
                ..chipgate_orders::archive::ArchiveOptions::new(target.clone())
            });
        }
        let licensing_service = lic.clone();
        let lic_shutdown = Shutdown::new();
        if let Some(every) = options.audit_checkpoint_every {
            lic.spawn_audit_checkpoints(every, lic_shutdown.clone());
        }
        lic.spawn_wave_recovery(lic_shutdown.clone());
        let licensing =
            start_service(store.clone(), options.server.clone(), lic_shutdown, |c| chipgate_licensing::spec(lic, c))
                .await;
        let inv_shutdown = Shutdown::new();
        let inv = chipgate_inventory::Inventory::start(store.clone(), inv_shutdown.clone(), options.inventory.clone());
        let catalogue = chipgate_inventory::parse_catalogue(DEFAULT_CATALOGUE).expect("default catalogue parses");
        inv.load_catalogue(catalogue).await.expect("default catalogue loads");
        let inventory =
            start_service(store.clone(), options.server.clone(), inv_shutdown, |c| chipgate_inventory::spec(inv, c))
                .await;
        let (orders, orders_service) = if options.orders_in_process {
            let peers = chipgate_orders::Peers::connect(
                &licensing.url(),
                &inventory.url(),
                options.server.max_message_bytes,
                service_tokens,
                None,
            )
            .expect("peer urls");
            let ord_shutdown = Shutdown::new();
            let ord =
                chipgate_orders::Orders::start(store.clone(), peers, ord_shutdown.clone(), options.orders.clone());
            let handle = ord.clone();
            let served =
                start_service(store.clone(), options.server.clone(), ord_shutdown, |c| chipgate_orders::spec(ord, c))
                    .await;
            (Some(served), Some(handle))
        } else {
            (None, None)
        };
        Cluster {
            redis,
            store,
            licensing,
            inventory,
            orders,
            orders_service,
            licensing_service,
            signer,
            auth_dir,
            audit_key,
        }
    }

    /// A token for a non-buyer `role`, valid for an hour.
    ///
    /// # Panics
    /// When authentication is off.
    pub fn token(&self, role: chipgate_runtime::auth::Role) -> String {
        self.signer.as_ref().expect("authentication is on").mint_role(role, Duration::from_secs(3600))
    }

    /// A buyer token for `buyer_id`, valid for an hour.
    ///
    /// # Panics
    /// When authentication is off.
    pub fn buyer_token(&self, buyer_id: &str) -> String {
        self.signer.as_ref().expect("authentication is on").mint_buyer(buyer_id, Duration::from_secs(3600))
    }

    /// A channel to `url` whose calls carry `token`.
    pub fn authed(url: &str, token: &str) -> chipgate_runtime::auth::AuthChannel {
        chipgate_runtime::auth::with_token(channel(url), chipgate_runtime::auth::TokenSource::Static(token.to_string()))
    }

    /// A channel to `url` whose calls carry the token of the party each needs ([`Parties`]; no
    /// token when authentication is off).
    pub fn parties(&self, url: &str) -> Parties {
        Parties::new(channel(url), self.signer.clone())
    }

    /// A client of the in-process orders service.
    ///
    /// # Panics
    /// When orders does not run in process.
    pub fn orders_client(&self) -> OrdersClient {
        let orders = self.orders.as_ref().expect("orders runs in process");
        OrderServiceClient::new(self.parties(&orders.url()))
    }

    /// An inventory client.
    pub fn inventory_client(&self) -> InventoryClient {
        InventoryServiceClient::new(self.parties(&self.inventory.url()))
    }

    /// Clients of the three services (orders in process).
    pub fn clients(&self) -> invariants::Clients {
        invariants::Clients {
            licensing: self.licensing_client(),
            inventory: self.inventory_client(),
            orders: self.orders_client(),
        }
    }

    /// A licensing client.
    pub fn licensing_client(&self) -> LicensingClient {
        LicensingServiceClient::new(self.parties(&self.licensing.url()))
    }

    /// Stops the services (orders first, since it calls the others) and only then Redis, so nothing
    /// logs a lost connection on the way down.
    pub async fn stop(mut self) {
        if let Some(orders) = self.orders.as_mut() {
            orders.stop().await;
        }
        self.orders_service = None;
        self.inventory.stop().await;
        self.licensing.stop().await;
    }
}

/// Where the workspace's binaries are: `$CHIPGATE_BIN_DIR`, else the target directory this test binary
/// runs from (`target/debug/deps/..`).
///
/// # Panics
/// When `name` has not been built (`cargo build --workspace --bins` builds it).
pub fn binary(name: &str) -> std::path::PathBuf {
    let dir = match std::env::var_os("CHIPGATE_BIN_DIR") {
        Some(d) => std::path::PathBuf::from(d),
        None => {
            let exe = std::env::current_exe().expect("test executable path");
            let deps = exe.parent().expect("deps dir");
            if deps.ends_with("deps") { deps.parent().expect("profile dir").to_path_buf() } else { deps.to_path_buf() }
        }
    };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace --bins` first (or set CHIPGATE_BIN_DIR)",
        path.display()
    );
    path
}

/// The file (in an auth directory) holding orders' `service` token, as an operator mounts it from a
/// Secret.
pub const SERVICE_TOKEN_FILE: &str = "service.jwt";

/// Writes a `service` token for orders (valid for a day) into `dir` as [`SERVICE_TOKEN_FILE`].
///
/// # Panics
/// When the file can't be written.
pub fn write_service_token(signer: &chipgate_runtime::auth::Signer, dir: &std::path::Path) {
    let token =
        signer.mint("service:orders", chipgate_runtime::auth::Role::Service, None, Duration::from_secs(24 * 3600));
    std::fs::write(dir.join(SERVICE_TOKEN_FILE), token).expect("write the service token");
}

pub use chipgate_state::testing::free_port;

/// The real `chipgate-orders` binary running against a cluster's Redis and peers, killed on drop.
pub struct OrdersProcess {
    child: std::process::Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// The cluster's signing key (its clients' tokens), when authentication is on.
    signer: Option<chipgate_runtime::auth::Signer>,
}

impl OrdersProcess {
    /// Starts `chipgate-orders` with extra environment `env` and waits until it answers health.
    ///
    /// # Panics
    /// When the binary is missing or does not come up within 20 s.
    pub async fn start(cluster: &Cluster, env: &[(&str, &str)]) -> Self {
        let redis = cluster.redis.as_ref().expect("a redis-backed cluster");
        let port = free_port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut cmd = std::process::Command::new(binary("chipgate-orders"));
        cmd.envs(redis.env());
        cmd.env("CHIPGATE_LISTEN", addr.to_string())
            .env("CHIPGATE_LICENSING_URL", cluster.licensing.url())
            .env("CHIPGATE_INVENTORY_URL", cluster.inventory.url())
            .env("CHIPGATE_LOG_FORMAT", "json")
            .env_remove("CHIPGATE_AUTH_PUBLIC_KEY")
            .env_remove("CHIPGATE_SERVICE_SIGNING_KEY")
            .env_remove("CHIPGATE_SERVICE_TOKEN_FILE")
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(std::process::Stdio::null());
        match &cluster.auth_dir {
            Some(dir) => {
                cmd.env("CHIPGATE_AUTH_PUBLIC_KEY", dir.path().join("public.pem"))
                    .env("CHIPGATE_SERVICE_TOKEN_FILE", dir.path().join(SERVICE_TOKEN_FILE))
                    .env_remove("CHIPGATE_INSECURE_NO_AUTH");
            }
            None => {
                cmd.env("CHIPGATE_INSECURE_NO_AUTH", "true");
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start chipgate-orders");
        let p = OrdersProcess { child, addr, signer: cluster.signer.clone() };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel(&p.url()));
        loop {
            let ok =
                health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.is_ok_and(|r| {
                    r.into_inner().status() == tonic_health::pb::health_check_response::ServingStatus::Serving
                });
            if ok {
                return p;
            }
            assert!(std::time::Instant::now() < deadline, "chipgate-orders did not become healthy on {addr}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client acting as whichever party each call needs ([`Parties`]).
    pub fn client(&self) -> OrdersClient {
        OrderServiceClient::new(Parties::new(channel(&self.url()), self.signer.clone()))
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OrdersProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
