//! `chipgate dev`: the whole cluster in one process, on fixed ports, on the embedded state backend (or
//! Redis), ready to poke with grpcurl or the chipgate CLI.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use chipgate_runtime::server::{ServerConfig, ServiceSpec};
use chipgate_runtime::{Shutdown, serve};
use chipgate_state::{RedisOptions, Store};
use clap::Args;
use tokio::task::JoinHandle;

use crate::devauth::{self, DevAuth};

/// The catalogue the dev cluster loads unless told otherwise (the repository's `data/catalogue.json`).
const DEFAULT_CATALOGUE: &str = include_str!("../../../data/catalogue.json");

/// Options of `chipgate dev`.
#[derive(Args, Debug, Clone)]
pub struct DevArgs {
    /// Address the services bind to.
    #[arg(long, default_value = "127.0.0.1")]
    pub bind: std::net::IpAddr,
    /// Port of the licensing service.
    #[arg(long, default_value_t = chipgate_licensing::DEFAULT_PORT)]
    pub licensing_port: u16,
    /// Port of the inventory service.
    #[arg(long, default_value_t = chipgate_inventory::DEFAULT_PORT)]
    pub inventory_port: u16,
    /// Port of the orders service.
    #[arg(long, default_value_t = chipgate_orders::DEFAULT_PORT)]
    pub orders_port: u16,
    /// Use this Redis instead of the embedded in-memory state (e.g. redis://127.0.0.1:6379/0).
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,
    /// Catalogue file to load instead of the built-in one (a JSON array of products).
    #[arg(long)]
    pub catalogue: Option<PathBuf>,
    /// Where the dev cluster keeps its key pair (`signing.pem`, `public.pem`) and writes a token per
    /// role (`tokens/<role>.jwt`, `tokens/buyer-<id>.jwt`). Created with mode 0700; an existing one
    /// must be yours and not writable by others, and its key pair is reused. Default: a `chipgate-dev`
    /// directory under the system's temporary directory.
    #[arg(long)]
    pub auth_dir: Option<PathBuf>,
    /// Run without authentication (every caller may call every RPC); audit checkpoints are then
    /// unsigned.
    #[arg(long)]
    pub insecure_no_auth: bool,
    /// How often licensing writes a signed audit checkpoint to the logs and metrics (0s: never).
    #[arg(long, value_parser = chipgate_runtime::time::parse_duration, default_value = "60s")]
    pub audit_checkpoint_every: Duration,
}

struct Started {
    name: &'static str,
    addr: SocketAddr,
    /// Where its Prometheus metrics are served.
    metrics: SocketAddr,
    service: &'static str,
    task: JoinHandle<Result<(), chipgate_runtime::server::ServeError>>,
}

/// A service's two listeners, bound before anything else happens.
struct Bound {
    name: &'static str,
    grpc: tokio::net::TcpListener,
    /// Prometheus metrics: the service's port + 1000, or a free port when the service took a free one.
    metrics: tokio::net::TcpListener,
}

/// Binds a service's gRPC and metrics ports. An address in use most likely means a cluster already
/// runs there, so the message says so (and the caller has changed nothing yet).
async fn bind(name: &'static str, ip: std::net::IpAddr, port: u16) -> Result<Bound, String> {
    let in_use = |addr: SocketAddr, what: &str, e: std::io::Error| {
        let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
            " — is a cluster (another `chipgate dev`?) already running there? Use it, stop it, or pick other ports"
        } else {
            ""
        };
        format!("can't listen on {addr} for {name}{what}: {e}{hint} (--{name}-port)")
    };
    let addr = SocketAddr::new(ip, port);
    let grpc = tokio::net::TcpListener::bind(addr).await.map_err(|e| in_use(addr, "", e))?;
    let metrics_port = if port == 0 { 0 } else { port.saturating_add(1000) };
    let maddr = SocketAddr::new(ip, metrics_port);
    let metrics = tokio::net::TcpListener::bind(maddr).await.map_err(|e| in_use(maddr, " metrics", e))?;
    Ok(Bound { name, grpc, metrics })
}

/// Starts a service on its bound listeners.
fn start(
    bound: Bound,
    service: &'static str,
    store: &Store,
    config: &ServerConfig,
    shutdown: &Shutdown,
    spec: ServiceSpec,
) -> Result<Started, String> {
    let Bound { name, grpc, metrics: metrics_listener } = bound;
    let addr = grpc.local_addr().map_err(|e| format!("{name}: no local address: {e}"))?;
    let metrics = metrics_listener.local_addr().map_err(|e| format!("{name}: no local address: {e}"))?;
    let (m, s) = (spec.metrics.clone(), shutdown.clone());
    tokio::spawn(async move {
        if let Err(e) = chipgate_runtime::metrics::serve(metrics_listener, m, async move { s.wait().await }).await {
            tracing::error!(error = %e, "metrics server failed");
        }
    });
    let s = shutdown.clone();
    let task = tokio::spawn(serve(grpc, spec, store.clone(), config.clone(), async move { s.wait().await }, |_| {}));
    Ok(Started { name, addr, metrics, service, task })
}

/// A dev cluster running in this process.
pub struct DevCluster {
    /// The generated key and tokens (None without authentication).
    pub auth: Option<DevAuth>,
    started: Vec<Started>,
    backend: String,
    products: usize,
    /// The id of the DEV-ONLY audit key (None: checkpoints unsigned).
    audit_key_id: Option<String>,
}

impl DevCluster {
    fn addr_of(&self, name: &str) -> Option<SocketAddr> {
        self.started.iter().find(|s| s.name == name).map(|s| loopback(s.addr))
    }

    /// `http://…` of the licensing service.
    pub fn licensing_url(&self) -> String {
        self.addr_of("licensing").map(|a| format!("http://{a}")).unwrap_or_default()
    }

    /// `http://…` of the inventory service.
    pub fn inventory_url(&self) -> String {
        self.addr_of("inventory").map(|a| format!("http://{a}")).unwrap_or_default()
    }

    /// `http://…` of the orders service.
    pub fn orders_url(&self) -> String {
        self.addr_of("orders").map(|a| format!("http://{a}")).unwrap_or_default()
    }

    /// Waits for every service to stop (after the shutdown it was started with triggers).
    pub async fn stopped(self) -> Result<(), String> {
        for s in self.started {
            match tokio::time::timeout(Duration::from_secs(10), s.task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => return Err(format!("{} failed: {e}", s.name)),
                Ok(Err(e)) => return Err(format!("{} task failed: {e}", s.name)),
                Err(_) => return Err(format!("{} did not stop within 10 s", s.name)),
            }
        }
        Ok(())
    }
}

/// The address to reach a service bound to `addr` from this machine (0.0.0.0 → 127.0.0.1).
fn loopback(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() { SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port()) } else { addr }
}

/// Starts licensing, inventory and orders in this process as `args` say (port 0 picks free ports);
/// they stop when `shutdown` triggers.
///
/// Ports are bound first: when they are taken (a cluster already runs there), nothing else happens,
/// in particular the auth dir of the running cluster is left alone. Its key pair is reused when it is
/// there, so the tokens a running cluster handed out stay valid.
pub async fn start_cluster(args: &DevArgs, shutdown: &Shutdown) -> Result<DevCluster, String> {
    let lic = bind("licensing", args.bind, args.licensing_port).await?;
    let inv = bind("inventory", args.bind, args.inventory_port).await?;
    let ord = bind("orders", args.bind, args.orders_port).await?;
    let catalogue = match &args.catalogue {
        Some(path) => chipgate_inventory::load_catalogue_file(path)?,
        None => chipgate_inventory::parse_catalogue(DEFAULT_CATALOGUE)?,
    };
    let mut config = ServerConfig { shutdown_grace: Duration::from_secs(3), ..ServerConfig::default() };
    let mut audit_key = None;
    let (auth, service_tokens) = if args.insecure_no_auth {
        (None, chipgate_runtime::auth::TokenSource::None)
    } else {
        let dir = args.auth_dir.clone().unwrap_or_else(devauth::default_auth_dir);
        let (signer, auth) = devauth::open_or_create(&dir)?;
        // A DEV-ONLY audit key beside the token key: checkpoints are signed as in production, but
        // by a key on this machine, so they prove nothing beyond it.
        audit_key = Some(devauth::audit_key(&dir)?.0);
        config.auth = Some(std::sync::Arc::new(signer.verifier()));
        let tokens = chipgate_runtime::auth::TokenSource::minted(
            signer,
            chipgate_runtime::auth::Role::Service,
            "service:orders",
            None,
        );
        (Some(auth), tokens)
    };
    let store = match &args.redis_url {
        Some(url) => Store::connect_redis(
            url,
            RedisOptions { startup_retry_for: Some(Duration::from_secs(30)), ..RedisOptions::default() },
        )
        .await
        .map_err(|e| format!("can't use redis at {url}: {e}"))?,
        None => Store::memory(),
    };

    let licensing = chipgate_licensing::Licensing::with_audit_key(store.clone(), audit_key);
    if !args.audit_checkpoint_every.is_zero() {
        licensing.spawn_audit_checkpoints(args.audit_checkpoint_every, shutdown.clone());
    }
    licensing.spawn_wave_recovery(shutdown.clone());
    let audit_key_id = licensing.audit_key_id();
    let inventory =
        chipgate_inventory::Inventory::start(store.clone(), shutdown.clone(), chipgate_inventory::Options::default());
    let products = catalogue.len();
    inventory.load_catalogue(catalogue).await.map_err(|e| format!("catalogue refused: {e:?}"))?;
    let local = |b: &Bound| b.grpc.local_addr().map_err(|e| format!("no local address: {e}"));
    let (lic_addr, inv_addr) = (local(&lic)?, local(&inv)?);
    let peers = chipgate_orders::Peers::connect(
        &format!("http://{}", loopback(lic_addr)),
        &format!("http://{}", loopback(inv_addr)),
        config.max_message_bytes,
        service_tokens,
        None,
    )?;
    let orders =
        chipgate_orders::Orders::start(store.clone(), peers, shutdown.clone(), chipgate_orders::Options::default());

    let started = vec![
        start(
            lic,
            chipgate_licensing::SERVICE_NAME,
            &store,
            &config,
            shutdown,
            chipgate_licensing::spec(licensing, &config),
        )?,
        start(
            inv,
            chipgate_inventory::SERVICE_NAME,
            &store,
            &config,
            shutdown,
            chipgate_inventory::spec(inventory, &config),
        )?,
        start(ord, chipgate_orders::SERVICE_NAME, &store, &config, shutdown, chipgate_orders::spec(orders, &config))?,
    ];
    let backend = match &args.redis_url {
        Some(url) => format!("redis ({url})"),
        None => "embedded in-memory state (gone when this process exits)".to_string(),
    };
    Ok(DevCluster { auth, started, backend, products, audit_key_id })
}

/// Runs the dev cluster until Ctrl-C or SIGTERM.
pub async fn run(args: DevArgs) -> Result<(), String> {
    let shutdown = Shutdown::new();
    let cluster = start_cluster(&args, &shutdown).await?;
    // Ctrl-C and SIGTERM stop the cluster once it is up (before that, they end the process at once,
    // even while it waits for Redis).
    let signals = Shutdown::on_signals();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        signals.wait().await;
        trigger.trigger();
    });
    let (backend, products) = (cluster.backend.clone(), cluster.products);
    tracing::info!(%backend, products, "chipgate dev cluster is up");
    let addr_of =
        |name: &str| cluster.started.iter().find(|s| s.name == name).map(|s| s.addr.to_string()).unwrap_or_default();
    let (lic, inv, ord) = (addr_of("licensing"), addr_of("inventory"), addr_of("orders"));
    let mut lines = vec![
        String::new(),
        format!("  chipgate dev cluster — state: {backend}; catalogue: {products} products"),
        String::new(),
    ];
    for s in &cluster.started {
        lines.push(format!("  {:<10} {:<16} {:<36} metrics http://{}/metrics", s.name, s.addr, s.service, s.metrics));
    }
    let token = |name: &str| {
        cluster.auth.as_ref().and_then(|a| a.tokens.iter().find(|(n, _)| n == name)).map(|(_, t)| t.clone())
    };
    let header = |name: &str| token(name).map(|t| format!("-H 'authorization: Bearer {t}' ")).unwrap_or_default();
    match &cluster.auth {
        Some(auth) => {
            lines.push(String::new());
            let keys = if auth.reused {
                "the key pair already there (tokens handed out stay valid)"
            } else {
                "a new key pair"
            };
            lines.push(format!(
                "  authentication ON — {keys} and tokens (valid 7 days) in {}; tokens by role:",
                auth.dir.display()
            ));
            for (name, t) in &auth.tokens {
                lines.push(format!("    {name:<18} {t}"));
            }
            // `--as` finds the key by itself under the default auth dir; elsewhere it needs telling.
            let key = if auth.dir == devauth::default_auth_dir() {
                String::new()
            } else {
                format!("CHIPGATE_SIGNING_KEY={} ", auth.dir.join("signing.pem").display())
            };
            lines.push(format!(
                "  the CLI: {key}chipgate --as import_authority queue   (--as ROLE or buyer:ID mints from the key)"
            ));
            lines.push(format!(
                "           or export CHIPGATE_TOKEN_FILE={}/tokens/buyer-bytedance.jwt (or --token …)",
                auth.dir.display()
            ));
            if let Some(id) = &cluster.audit_key_id {
                lines.push(format!(
                    "  audit checkpoints signed by {id} — a DEV-ONLY key ({}/audit-signing.pem): \
                     chipgate --as auditor audit checkpoint > cp.json",
                    auth.dir.display()
                ));
            }
        }
        None => lines.push(
            "  authentication OFF (--insecure-no-auth): every caller may call every RPC; audit checkpoints UNSIGNED"
                .to_string(),
        ),
    }
    let (ia, vendor, buyer, anyone) =
        (header("import_authority"), header("vendor"), header("buyer-bytedance"), header("auditor"));
    lines.extend([
        String::new(),
        "  try:".to_string(),
        format!("    grpcurl -plaintext {lic} list"),
        format!("    grpcurl -plaintext {lic} grpc.health.v1.Health/Check"),
        format!("    grpcurl -plaintext {anyone}{inv} chipgate.inventory.v1.InventoryService/ListStock"),
        format!(
            "    grpcurl -plaintext {buyer}-d '{{\"request_id\":\"demo-1\",\"buyer_id\":\"bytedance\",\"product_sku\":\"H200-SXM-141GB\",\"quantity\":\"200000\",\"end_use\":\"LLM training\",\"site\":\"Ulanqab\"}}' {lic} chipgate.licensing.v1.LicensingService/SubmitApplication"
        ),
        format!("    grpcurl -plaintext {ia}{lic} chipgate.licensing.v1.LicensingService/ListQueue"),
        format!(
            "    grpcurl -plaintext {buyer}-d '{{\"request_id\":\"ord-1\",\"buyer_id\":\"bytedance\",\"product_sku\":\"H200-SXM-141GB\",\"units\":\"1000\",\"justification\":\"training\"}}' {ord} chipgate.orders.v1.OrderService/PlaceOrder"
        ),
        format!(
            "    grpcurl -plaintext {vendor}-d '{{\"request_id\":\"rcpt-1\",\"receipt_id\":\"rcpt-1\",\"product_sku\":\"H200-SXM-141GB\",\"units\":\"5000\"}}' {inv} chipgate.inventory.v1.InventoryService/ReceiveSupply"
        ),
        String::new(),
        "  Ctrl-C stops the cluster.".to_string(),
        String::new(),
    ]);
    for l in lines {
        crate::out::say(&l);
    }
    shutdown.wait().await;
    crate::out::say("  stopping…");
    cluster.stopped().await
}
