//! `chipgate-orders`: serves the orders API (with health and reflection) and propagates licensing
//! and inventory changes into orders, until SIGTERM/SIGINT.

// mimalloc: the hot paths (batch scripts' arguments, protobuf records, gRPC frames) allocate and free
// many short-lived buffers, and under glibc malloc that was a fifth of the process's cycles; with
// mimalloc the wave benchmark ran about 1.5x faster on the same machine.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use chipgate_orders::{DEFAULT_PORT, Options, Orders, Peers, spec};
use chipgate_runtime::auth::{Role, Signer, TokenSource};
use chipgate_runtime::config::CommonArgs;
use chipgate_runtime::time::parse_duration;
use chipgate_runtime::{Shutdown, serve, telemetry};
use clap::Parser;

/// The chipgate orders service: placement, eligibility, the awaiting queue and the backlog, and the
/// propagation of every licensing and inventory change into orders.
#[derive(Parser, Debug)]
#[command(name = "chipgate-orders", version, about, long_about = None)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,

    /// The licensing service.
    #[arg(long, env = "CHIPGATE_LICENSING_URL", default_value = "http://127.0.0.1:50051")]
    licensing_url: String,

    /// The inventory service.
    #[arg(long, env = "CHIPGATE_INVENTORY_URL", default_value = "http://127.0.0.1:50052")]
    inventory_url: String,

    /// File holding the `service` bearer token orders sends to licensing and inventory (re-read every
    /// minute, so a rotated secret applies).
    #[arg(long, env = "CHIPGATE_SERVICE_TOKEN_FILE", conflicts_with = "service_signing_key")]
    service_token_file: Option<std::path::PathBuf>,

    /// PEM Ed25519 private key to mint orders' own short-lived `service` tokens with (instead of a
    /// token file).
    #[arg(long, env = "CHIPGATE_SERVICE_SIGNING_KEY")]
    service_signing_key: Option<std::path::PathBuf>,

    /// How long a fully held order keeps its stock before it must be confirmed, in seconds.
    #[arg(long, env = "CHIPGATE_HOLD_SECONDS", default_value_t = 900)]
    hold_seconds: u32,

    /// Orders per quota or stock call and per commit script when propagating a change (larger: fewer
    /// calls; smaller: shorter scripts, so other calls wait less behind a wave).
    #[arg(long, env = "CHIPGATE_BATCH_SIZE", default_value_t = chipgate_orders::Options::default().chunk)]
    batch_size: usize,

    /// Orders per batch while placements of other products wait on this replica for a round (a
    /// wave's rounds then run shorter scripts, so those placements wait less behind them); 0 or at
    /// least --batch-size: always --batch-size.
    #[arg(long, env = "CHIPGATE_SHARED_BATCH_SIZE", default_value_t = chipgate_orders::Options::default().shared_chunk)]
    shared_batch_size: usize,

    /// Waiting orders a step of a wave's snapshot copies at most (small buyers' queues whole, a
    /// longer queue a page per step): each step is one script, so other calls wait at most that
    /// long behind a large wave's snapshot.
    #[arg(long, env = "CHIPGATE_WAVE_SNAPSHOT_STEP", default_value_t = chipgate_orders::Options::default().snapshot_step)]
    wave_snapshot_step: u64,

    /// Lifetime of a product lease; a replica that stops (crash, pause) holds its products this long
    /// before another replica may take them over (e.g. 10s).
    #[arg(long, env = "CHIPGATE_LEASE_TTL", value_parser = parse_duration, default_value = "10s")]
    lease_ttl: std::time::Duration,

    /// How long an event may stay pending with a replica before another replica claims it (the first
    /// is presumed dead or stalled), e.g. 30s.
    #[arg(long, env = "CHIPGATE_CLAIM_IDLE", value_parser = parse_duration, default_value = "30s")]
    claim_idle: std::time::Duration,

    /// How long a product's propagation passes may keep failing before the health service
    /// `chipgate.orders.v1.Propagation` reports NOT_SERVING (alert on it), e.g. 60s.
    #[arg(long, env = "CHIPGATE_PROPAGATION_UNHEALTHY_AFTER", value_parser = parse_duration, default_value = "60s")]
    propagation_unhealthy_after: std::time::Duration,

    /// Every product's orders are fully re-evaluated this often, as a safety net (0s: never), e.g. 10m.
    #[arg(long, env = "CHIPGATE_FULL_RECONCILE_EVERY", value_parser = parse_duration, default_value = "10m")]
    full_reconcile_every: std::time::Duration,

    /// Where closed orders are archived: a directory, `file:///var/lib/chipgate/archive` or an absolute
    /// path (a PersistentVolumeClaim in Kubernetes), or S3-compatible object storage,
    /// `s3://bucket/prefix` (endpoint, region and credentials from the standard AWS_* environment:
    /// AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, web identity;
    /// AWS_ALLOW_HTTP=true for a local plain-HTTP endpoint). Orders closed longer than --order-retention are
    /// written there with their whole history, read back, checked, and only then removed from Redis;
    /// GetOrder answers them from there. One replica at a time archives a product (a lease). Unset:
    /// closed orders stay in Redis.
    #[arg(long, env = "CHIPGATE_ARCHIVE_URL")]
    archive: Option<String>,

    /// How long closed (shipped, cancelled, expired, rejected) orders stay in Redis, e.g. 30d.
    #[arg(long, env = "CHIPGATE_ORDER_RETENTION", value_parser = chipgate_archive::parse_window, default_value = "30d")]
    order_retention: std::time::Duration,

    /// How often an archiving run starts, e.g. 1h.
    #[arg(long, env = "CHIPGATE_ARCHIVE_EVERY", value_parser = chipgate_archive::parse_window, default_value = "1h")]
    archive_every: std::time::Duration,

    /// Most orders per archived segment.
    #[arg(long, env = "CHIPGATE_ARCHIVE_SEGMENT_ORDERS", default_value_t = 5000)]
    archive_segment_orders: usize,

    /// How long archiving may keep failing before the health name chipgate.orders.v1.Archive reports
    /// NOT_SERVING (alert on it), e.g. 6h.
    #[arg(long, env = "CHIPGATE_ARCHIVE_UNHEALTHY_AFTER", value_parser = chipgate_archive::parse_window, default_value = "6h")]
    archive_unhealthy_after: std::time::Duration,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let _telemetry = match args.common.init_telemetry("chipgate-orders") {
        Ok(g) => g,
        Err(e) => {
            let _logs = telemetry::init_with_provider(args.common.log_format, None);
            tracing::error!(error = %e, "can't set up trace export");
            return std::process::ExitCode::FAILURE;
        }
    };
    // Stop signals from here on stop the process cleanly (even while it still waits for Redis).
    let shutdown = Shutdown::on_signals();
    let addr = args.common.listen_or(DEFAULT_PORT);
    let config = match args.common.server_config() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "bad configuration");
            return std::process::ExitCode::FAILURE;
        }
    };
    let tokens = match (&args.service_token_file, &args.service_signing_key) {
        (Some(path), _) => TokenSource::file(path).map_err(|e| format!("--service-token-file: {e}")),
        (None, Some(path)) => Signer::from_file(path)
            .map(|s| TokenSource::minted(s, Role::Service, "service:orders", None))
            .map_err(|e| format!("--service-signing-key: {e}")),
        (None, None) if args.common.insecure_no_auth => Ok(TokenSource::None),
        (None, None) => Err("orders needs a service token for licensing and inventory: --service-token-file or \
                 --service-signing-key (or --insecure-no-auth)"
            .to_string()),
    };
    let tokens = match tokens {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "bad configuration");
            return std::process::ExitCode::FAILURE;
        }
    };
    let peers = match Peers::connect(
        &args.licensing_url,
        &args.inventory_url,
        args.common.max_message_bytes,
        tokens,
        config.tls.as_ref(),
    ) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "bad peer address");
            return std::process::ExitCode::FAILURE;
        }
    };
    // A stop signal while Redis can't be reached yet ends the process at once (it would otherwise
    // wait out the connection attempts, and a pod its whole termination grace period).
    let connected = tokio::select! {
        () = shutdown.wait() => {
            tracing::info!("stopped before the configured redis could be reached");
            return std::process::ExitCode::SUCCESS;
        }
        r = args.common.connect_store() => r,
    };
    let store = match connected {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "can't use the configured redis");
            return std::process::ExitCode::FAILURE;
        }
    };
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%addr, error = %e, "can't listen");
            return std::process::ExitCode::FAILURE;
        }
    };
    let archive = match args.archive.as_deref().map(chipgate_archive::Target::parse).transpose() {
        Ok(a) => a.map(|target| chipgate_orders::archive::ArchiveOptions {
            target,
            retention: args.order_retention,
            every: args.archive_every.max(std::time::Duration::from_secs(1)),
            max_segment_orders: args.archive_segment_orders.clamp(1, 100_000),
            unhealthy_after: args.archive_unhealthy_after,
        }),
        Err(e) => {
            tracing::error!(error = %e, "bad configuration: --archive");
            return std::process::ExitCode::FAILURE;
        }
    };
    let options = Options {
        archive,
        hold_seconds: args.hold_seconds.clamp(1, 86_400),
        chunk: args.batch_size.clamp(1, 10_000),
        shared_chunk: args.shared_batch_size.min(10_000),
        snapshot_step: args.wave_snapshot_step.clamp(1, 1_000_000),
        lease_ttl: args.lease_ttl.clamp(std::time::Duration::from_millis(300), std::time::Duration::from_secs(3600)),
        claim_idle: args.claim_idle.clamp(std::time::Duration::from_millis(200), std::time::Duration::from_secs(3600)),
        unhealthy_after: args.propagation_unhealthy_after.max(std::time::Duration::from_secs(1)),
        full_reconcile_every: args.full_reconcile_every,
        // A page stays within what the server may send and what clients take by default.
        page_bytes: (config.max_message_bytes.min(4 << 20) / 4 * 3).max(64 << 10),
        ..Options::default()
    };
    let service = Orders::start(store.clone(), peers, shutdown.clone(), options);
    if let Err(e) = args.common.spawn_metrics(service.metrics(), shutdown.clone()).await {
        tracing::error!(error = %e, "can't serve metrics");
        return std::process::ExitCode::FAILURE;
    }
    tracing::info!(%addr, backend = store.kind(), licensing = %args.licensing_url, inventory = %args.inventory_url, "chipgate-orders serving");
    let s = shutdown.clone();
    match serve(listener, spec(service, &config), store, config, async move { s.wait().await }, |_| {}).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "server failed");
            std::process::ExitCode::FAILURE
        }
    }
}
