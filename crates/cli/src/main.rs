//! `chipgate`: the command line for chipgate clusters.
//!
//! `chipgate dev` runs the whole cluster in one process; `chipgate demo` plays the seed story; the
//! other commands talk to a running cluster as an operator or a buyer would.

// mimalloc: the hot paths (batch scripts' arguments, protobuf records, gRPC frames) allocate and free
// many short-lived buffers, and under glibc malloc that was a fifth of the process's cycles; with
// mimalloc the wave benchmark ran about 1.5x faster on the same machine.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod client;
mod cmd;
mod demo;
mod dev;
mod devauth;
mod import;
mod out;
mod token;
mod view;

use clap::{Parser, Subcommand};

use crate::client::{Ctx, Global, Outcome};
use crate::cmd::{
    allocation, applications, archive, audit, customs, domestic, export, inventory, licenses, orders, waves,
};

const LONG_ABOUT: &str = "\
chipgate decides which buyer's order may take which export-controlled AI chip, while approval waves,
licence conditions, customs embargoes and scarce stock all change at once.

The cluster has three services: licensing (applications, the approval queue, waves, licences, export
authorisations, customs policy, the domestic-purchase ledger, the audit log), inventory (catalogue,
stock, supply) and orders (orders, backlogs, propagation). `chipgate dev` runs all three on this
machine; every other command talks to a running cluster.

A day in the life: buyers `apply` for import licences and wait in the `queue`; the import authority
drafts a `wave`, grants quota with conditions and publishes it; licences with pending terms are
`license finalize`d; buyers record `domestic` purchases to meet ratio conditions; the vendor needs an
`export` authorisation and customs must not embargo the product (`customs`); buyers place orders
(`order place`, `order import`), which wait for a licence, then for `stock` in the `backlog`, and move
on their own as the world changes; `supply receive` feeds the backlog, shared among buyers as the
vendor's `allocation` policy says; `wave preview` and `supply preview` show what a draft wave or a
receipt would do before anyone commits it; `audit verify` proves nobody rewrote history.";

const AFTER_HELP: &str = "\
Examples:
  chipgate dev                                   # run a cluster here (another terminal)
  chipgate demo                                  # play the seed story against it
  chipgate demo --self-contained                 # ... or on a private cluster of its own
  chipgate --as import_authority queue           # on a dev cluster: act as a role
  chipgate --as buyer:bytedance order list --buyer bytedance --state backordered
  chipgate --token-file auditor.jwt -o json stock H200-SXM-141GB | jq -r .stock.available

Calls carry a bearer token: --token / --token-file, or on a dev cluster --as ROLE or --as buyer:ID
(minted from its signing key). A refusal for want of the right token names the roles the RPC admits.

Output: tables for people; -o json prints one JSON document (the RPC's response message in the proto3
JSON mapping grpcurl prints, with the .proto field names: every field, enums by name, 64-bit integers
as strings, timestamps RFC 3339), or JSON lines for watch and follow. Errors go to stderr with the
server's details (as JSON with -o json).

Exit codes: 0 ok; 1 local failure; 2 usage (also a URL without http://); 3 invalid argument;
4 not found; 5 conflict (already exists, aborted); 6 failed precondition (a rule said no); 7 resource
exhausted; 8 permission denied or no valid token; 9 unavailable or deadline exceeded (retry with the
same --request-id); 10 server fault; 11 a check failed (audit chain broken, wave not settled in time,
import rows not placed).";

/// The command line of chipgate: run a dev cluster, operate a cluster, play the seed story.
#[derive(Parser, Debug)]
#[command(name = "chipgate", version, long_about = LONG_ABOUT, after_help = AFTER_HELP)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the whole cluster in this process and print how to reach it.
    ///
    /// Licensing, inventory and orders start on fixed, printed ports (overridable), on the embedded
    /// state backend (or Redis with --redis-url), with the default catalogue loaded. Ctrl-C stops it.
    #[command(
        after_help = "Examples:\n  chipgate dev\n  chipgate dev --licensing-port 6051 --inventory-port 6052 --orders-port 6053\n  chipgate dev --redis-url redis://127.0.0.1:6379/0"
    )]
    Dev(dev::DevArgs),
    /// Play the seed story against a cluster, step by step, with every figure read from the services.
    ///
    /// Customs embargoes the H200; Washington authorises its export; a dozen buyers order 2,000,000+
    /// chips while nothing is licensed; they apply; wave 1 grants ByteDance, Alibaba and Tencent
    /// 400,000+ units with terms pending and a domestic-chip ratio, and nothing moves; the embargo
    /// lifts; the terms are finalised; domestic purchases are recorded; stock is far below demand and
    /// arrives in a few receipts; the other buyers are still queued. Each step says how many orders
    /// moved where and why; a summary table closes (one JSON document with -o json). It needs a fresh
    /// cluster (no H200 orders or licences yet).
    #[command(
        after_help = "Examples:\n  chipgate demo                       # against `chipgate dev` on the default ports\n  chipgate demo --self-contained      # starts its own cluster on free ports\n  chipgate -o json demo --self-contained | jq .buyers"
    )]
    Demo(demo::DemoArgs),
    /// Mint a bearer token for a role from a signing key (prints it).
    #[command(
        after_help = "Examples:\n  chipgate token --signing-key signing.pem --role auditor --ttl 8h\n  chipgate token --signing-key signing.pem --role buyer --buyer bytedance\n  chipgate token --signing-key signing.pem --role service --ttl 720h > token   # orders' Secret"
    )]
    Token(token::TokenArgs),
    /// A buyer applies for an import licence; the application joins the approval queue at the back.
    Apply(applications::ApplyArgs),
    /// Show, list, withdraw or reject licence applications.
    #[command(subcommand)]
    Application(applications::ApplicationCmd),
    /// Show the approval queue front to back (or move an application in it).
    #[command(after_help = "Examples:\n  chipgate queue\n  chipgate queue move app-7 --to 1")]
    Queue(applications::QueueArgs),
    /// Draft, fill, publish and follow approval waves.
    #[command(subcommand)]
    Wave(waves::WaveCmd),
    /// Show, list, finalise, suspend, reinstate or revoke import licences.
    #[command(subcommand)]
    License(licenses::LicenseCmd),
    /// Would an order be eligible now? Evaluates every licence condition without taking anything.
    Check(licenses::CheckArgs),
    /// Record and show buyers' domestic-chip purchases (for domestic-ratio conditions).
    #[command(subcommand)]
    Domestic(domestic::DomesticCmd),
    /// Grant, revoke and list the vendor's export authorisations.
    #[command(subcommand)]
    Export(export::ExportCmd),
    /// Set and show customs' import policy per product (open or embargoed).
    #[command(subcommand)]
    Customs(customs::CustomsCmd),
    /// List the product catalogue.
    Products(inventory::ProductsArgs),
    /// Show stock per product (on hand, available, held, committed, shipped, received), or watch it.
    Stock(inventory::StockArgs),
    /// Book supply receipts into stock.
    #[command(subcommand)]
    Supply(inventory::SupplyCmd),
    /// Place, show, list, cancel, confirm, ship, watch and import orders.
    #[command(subcommand)]
    Order(orders::OrderCmd),
    /// Show a product's backlog: orders holding licence quota that wait for stock, oldest first.
    Backlog(orders::BacklogArgs),
    /// Set and show how a product's stock is shared among waiting buyers (FIFO, pro rata, a cap).
    #[command(subcommand)]
    Allocation(allocation::AllocationCmd),
    /// List and verify the tamper-evident audit log.
    #[command(subcommand)]
    Audit(audit::AuditCmd),
    /// Work on an archive directly: prune records past the legal retention.
    #[command(subcommand)]
    Archive(archive::ArchiveCmd),
}

/// Logs of client commands go to stderr (stdout is the command's output), warnings only by default.
fn init_client_logs() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    // Colour only for a person at a terminal: escape codes in a log file or a CI log are noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi)
        .try_init();
}

async fn run(global: Global, command: Command) -> Outcome {
    let ctx = Ctx::new(global)?;
    let ctx = &ctx;
    match command {
        Command::Dev(_) => Ok(()),
        Command::Token(a) => token::run(&ctx.g, &a),
        Command::Demo(a) => demo::run(ctx, a).await,
        Command::Apply(a) => applications::apply(ctx, a).await,
        Command::Application(c) => applications::application(ctx, c).await,
        Command::Queue(a) => applications::queue(ctx, a).await,
        Command::Wave(c) => waves::wave(ctx, c).await,
        Command::License(c) => licenses::license(ctx, c).await,
        Command::Check(a) => licenses::check(ctx, a).await,
        Command::Domestic(c) => domestic::domestic(ctx, c).await,
        Command::Export(c) => export::export(ctx, c).await,
        Command::Customs(c) => customs::customs(ctx, c).await,
        Command::Products(a) => inventory::products(ctx, a).await,
        Command::Stock(a) => inventory::stock(ctx, a).await,
        Command::Supply(c) => inventory::supply(ctx, c).await,
        Command::Order(c) => orders::order(ctx, c).await,
        Command::Backlog(a) => orders::backlog(ctx, a).await,
        Command::Allocation(c) => allocation::allocation(ctx, c).await,
        Command::Audit(c) => audit::audit(ctx, c).await,
        Command::Archive(c) => archive::archive(ctx, c).await,
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Command::Dev(args) = cli.command {
        // Traces go to an OTLP collector when OTEL_EXPORTER_OTLP_ENDPOINT says where.
        let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok();
        let _telemetry = match chipgate_runtime::telemetry::init(
            chipgate_runtime::telemetry::LogFormat::Pretty,
            endpoint.as_deref(),
            "chipgate-dev",
        ) {
            Ok(g) => g,
            Err(e) => {
                out::note(&format!("chipgate: {e}"));
                return std::process::ExitCode::FAILURE;
            }
        };
        return match dev::run(args).await {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                out::note(&format!("chipgate: {e}"));
                std::process::ExitCode::FAILURE
            }
        };
    }
    init_client_logs();
    let output = cli.global.output;
    match run(cli.global, cli.command).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(f) => {
            f.report(output);
            std::process::ExitCode::from(f.exit_code())
        }
    }
}
