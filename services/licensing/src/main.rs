//! `chipgate-licensing`: serves the licensing API (with health and reflection) until SIGTERM/SIGINT.

// mimalloc: the hot paths (batch scripts' arguments, protobuf records, gRPC frames) allocate and free
// many short-lived buffers, and under glibc malloc that was a fifth of the process's cycles; with
// mimalloc the wave benchmark ran about 1.5x faster on the same machine.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use chipgate_licensing::{DEFAULT_PORT, Licensing, spec};
use chipgate_runtime::auth::Signer;
use chipgate_runtime::config::CommonArgs;
use chipgate_runtime::time::parse_duration;
use chipgate_runtime::{Shutdown, serve, telemetry};
use clap::Parser;

/// The chipgate licensing service: applications, approval waves, licences, quota, export and import
/// gates, and the audit log.
#[derive(Parser, Debug)]
#[command(name = "chipgate-licensing", version, about, long_about = None)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,

    /// PEM Ed25519 private key (PKCS#8) that signs audit checkpoints. Keep it out of Redis and away
    /// from whoever can write Redis: it is what makes a rewritten audit log detectable. Required
    /// unless --insecure-no-auth (then checkpoints are unsigned: dev only).
    #[arg(long, env = "CHIPGATE_AUDIT_SIGNING_KEY_FILE")]
    audit_signing_key: Option<std::path::PathBuf>,

    /// How often an audit checkpoint is taken and written to the logs and metrics (0s: never), e.g. 60s.
    #[arg(long, env = "CHIPGATE_AUDIT_CHECKPOINT_EVERY", value_parser = parse_duration, default_value = "60s")]
    audit_checkpoint_every: std::time::Duration,

    /// Where the audit log is archived: a directory, `file:///var/lib/chipgate/archive` or an absolute
    /// path (a PersistentVolumeClaim in Kubernetes), or S3-compatible object storage,
    /// `s3://bucket/prefix` (endpoint, region and credentials from the standard AWS_* environment:
    /// AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, web identity;
    /// AWS_ALLOW_HTTP=true for a local plain-HTTP endpoint). Entries older than --audit-retention are sealed
    /// into signed segments there, read back, verified, and only then removed from Redis; one replica
    /// at a time does it (a lease per chain). Unset: nothing is archived and Redis keeps every entry.
    #[arg(long, env = "CHIPGATE_ARCHIVE_URL")]
    archive: Option<String>,

    /// How long audit entries stay in Redis before they are archived, e.g. 7d.
    #[arg(long, env = "CHIPGATE_AUDIT_RETENTION", value_parser = chipgate_archive::parse_window, default_value = "7d")]
    audit_retention: std::time::Duration,

    /// How often an archiving run starts, e.g. 1h.
    #[arg(long, env = "CHIPGATE_ARCHIVE_EVERY", value_parser = chipgate_archive::parse_window, default_value = "1h")]
    archive_every: std::time::Duration,

    /// Most audit entries per archived segment.
    #[arg(long, env = "CHIPGATE_ARCHIVE_SEGMENT_ENTRIES", default_value_t = 50_000)]
    archive_segment_entries: usize,

    /// How long archiving may keep failing before the health name chipgate.licensing.v1.Archive
    /// reports NOT_SERVING (alert on it), e.g. 6h.
    #[arg(long, env = "CHIPGATE_ARCHIVE_UNHEALTHY_AFTER", value_parser = chipgate_archive::parse_window, default_value = "6h")]
    archive_unhealthy_after: std::time::Duration,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let _telemetry = match args.common.init_telemetry("chipgate-licensing") {
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
    // Like a missing token key, a missing audit key is refused unless the operator asked for the
    // insecure dev mode: without it nothing outside Redis can tell a rewritten audit log.
    let audit_key = match (&args.audit_signing_key, args.common.insecure_no_auth) {
        (Some(path), _) => match Signer::from_file(path) {
            Ok(k) => Some(k),
            Err(e) => {
                tracing::error!(error = %e, "bad configuration: --audit-signing-key");
                return std::process::ExitCode::FAILURE;
            }
        },
        (None, true) => {
            tracing::warn!("no --audit-signing-key: audit checkpoints are UNSIGNED (dev only)");
            None
        }
        (None, false) => {
            tracing::error!(
                "bad configuration: no --audit-signing-key (CHIPGATE_AUDIT_SIGNING_KEY_FILE) given; licensing \
                 signs audit checkpoints with it (pass --insecure-no-auth for an unsigned dev setup)"
            );
            return std::process::ExitCode::FAILURE;
        }
    };
    let archive = match args.archive.as_deref().map(chipgate_archive::Target::parse).transpose() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "bad configuration: --archive");
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
    tracing::info!(%addr, backend = store.kind(), "chipgate-licensing serving");
    let service = Licensing::with_audit_key(store.clone(), audit_key);
    if let Some(id) = service.audit_key_id() {
        tracing::info!(key_id = %id, "audit checkpoints are signed");
    }
    if !args.audit_checkpoint_every.is_zero() {
        service.spawn_audit_checkpoints(args.audit_checkpoint_every, shutdown.clone());
    }
    service.spawn_wave_recovery(shutdown.clone());
    if let Some(target) = archive {
        tracing::info!(archive = %target.url(), retention = ?args.audit_retention, "the audit log is archived");
        service.use_archive(target);
        let options = chipgate_licensing::archive::ArchiveOptions {
            retention: args.audit_retention,
            every: args.archive_every.max(std::time::Duration::from_secs(1)),
            max_segment_entries: args.archive_segment_entries.clamp(1, 1_000_000),
            unhealthy_after: args.archive_unhealthy_after,
        };
        service.spawn_audit_archiver(options, shutdown.clone());
    }
    if let Err(e) = args.common.spawn_metrics(service.metrics(), shutdown.clone()).await {
        tracing::error!(error = %e, "can't serve metrics");
        return std::process::ExitCode::FAILURE;
    }
    let s = shutdown.clone();
    match serve(listener, spec(service, &config), store, config, async move { s.wait().await }, |_| {}).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "server failed");
            std::process::ExitCode::FAILURE
        }
    }
}
