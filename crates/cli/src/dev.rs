//! `chipgate dev`: the whole cluster in one process, on fixed ports, on the embedded state backend (or
//! Redis), ready to poke with grpcurl.

use std::net::SocketAddr;
use std::time::Duration;

use chipgate_runtime::server::ServerConfig;
use chipgate_runtime::{Shutdown, serve};
use chipgate_state::{RedisOptions, Store};
use clap::Args;

/// Options of `chipgate dev`.
#[derive(Args, Debug, Clone)]
pub struct DevArgs {
    /// Address the services bind to.
    #[arg(long, default_value = "127.0.0.1")]
    pub bind: std::net::IpAddr,
    /// Port of the licensing service.
    #[arg(long, default_value_t = chipgate_licensing::DEFAULT_PORT)]
    pub licensing_port: u16,
    /// Use this Redis instead of the embedded in-memory state (e.g. redis://127.0.0.1:6379/0).
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,
}

/// Runs the dev cluster until Ctrl-C or SIGTERM.
pub async fn run(args: DevArgs) -> Result<(), String> {
    let store = match &args.redis_url {
        Some(url) => Store::connect_redis(
            url,
            RedisOptions { startup_retry_for: Some(Duration::from_secs(30)), ..RedisOptions::default() },
        )
        .await
        .map_err(|e| format!("can't use redis at {url}: {e}"))?,
        None => Store::memory(),
    };
    let shutdown = Shutdown::on_signals();
    let config = ServerConfig { shutdown_grace: Duration::from_secs(3), ..ServerConfig::default() };
    let lic_addr = SocketAddr::new(args.bind, args.licensing_port);
    let lic_listener =
        tokio::net::TcpListener::bind(lic_addr).await.map_err(|e| format!("can't listen on {lic_addr}: {e}"))?;
    let licensing = chipgate_licensing::Licensing::new(store.clone());
    let s = shutdown.clone();
    let lic_task = tokio::spawn(serve(
        lic_listener,
        chipgate_licensing::spec(licensing, &config),
        store.clone(),
        config.clone(),
        async move { s.wait().await },
        |_| {},
    ));

    let backend = match &args.redis_url {
        Some(url) => format!("redis ({url})"),
        None => "embedded in-memory state (lost on exit)".to_string(),
    };
    tracing::info!("chipgate dev cluster is up on {backend}");
    let lines = [
        String::new(),
        format!("  chipgate dev cluster — state: {backend}"),
        String::new(),
        format!("  licensing   {lic_addr}   chipgate.licensing.v1.LicensingService"),
        String::new(),
        "  try:".to_string(),
        format!("    grpcurl -plaintext {lic_addr} list"),
        format!("    grpcurl -plaintext {lic_addr} grpc.health.v1.Health/Check"),
        format!(
            "    grpcurl -plaintext -d '{{\"request_id\":\"demo-1\",\"buyer_id\":\"bytedance\",\"product_sku\":\"H200-SXM-141GB\",\"quantity\":\"200000\",\"end_use\":\"LLM training\",\"site\":\"Ulanqab\"}}' {lic_addr} chipgate.licensing.v1.LicensingService/SubmitApplication"
        ),
        String::new(),
        "  Ctrl-C stops the cluster.".to_string(),
        String::new(),
    ];
    for l in lines {
        crate::out::say(&l);
    }
    shutdown.wait().await;
    crate::out::say("  stopping…");
    for task in [lic_task] {
        match tokio::time::timeout(Duration::from_secs(10), task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => return Err(format!("server failed: {e}")),
            Ok(Err(e)) => return Err(format!("server task failed: {e}")),
            Err(_) => return Err("a server did not stop within 10 s".into()),
        }
    }
    Ok(())
}
