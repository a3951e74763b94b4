//! `chipgate-bench`: measures order placement and wave propagation on real Redis, side by side with
//! the ceilings of this machine (a bare tonic echo, a pipelined Redis no-op script) and a naive
//! one-order-at-a-time baseline, so results can be read as ratios that hold on a noisy machine.
//!
//! Every part starts its own cluster (services in this process, a private redis-server) so figures
//! don't leak between parts. `--json` also writes `results.json`, and the placement latency histogram is
//! written as `place-latency.svg`, both under `--out`.

// mimalloc: the hot paths (batch scripts' arguments, protobuf records, gRPC frames) allocate and free
// many short-lived buffers, and under glibc malloc that was a fifth of the process's cycles; with
// mimalloc the wave benchmark ran about 1.5x faster on the same machine.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod audit;
mod ceilings;
mod cpu;
mod load;
mod naive;
mod place;
mod report;
mod wave;

use std::path::PathBuf;
use std::time::Duration;

use chipgate_runtime::time::parse_duration;
use clap::{Parser, ValueEnum};

/// Benchmarks for chipgate: placement, wave propagation, ceilings and a naive baseline.
#[derive(Parser, Debug, Clone)]
#[command(name = "chipgate-bench", version, about)]
pub struct Args {
    /// Awaiting orders the wave makes eligible.
    #[arg(long, default_value_t = 100_000)]
    pub orders: usize,
    /// Buyers the wave's orders are spread over.
    #[arg(long, default_value_t = 100)]
    pub buyers: usize,
    /// Products the wave's orders are spread over.
    #[arg(long, default_value_t = 2)]
    pub products: usize,
    /// Calls in flight during the placement benchmark and the ceilings.
    #[arg(long, default_value_t = 64)]
    pub in_flight: usize,
    /// HTTP/2 connections the calls are spread over.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// How long each timed load runs (placement, echo, Redis).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// Orders propagated one at a time for the naive baseline.
    #[arg(long, default_value_t = 5_000)]
    pub naive_orders: usize,
    /// Also write results.json.
    #[arg(long)]
    pub json: bool,
    /// Where results.json and place-latency.svg go.
    #[arg(long, default_value = "bench-out")]
    pub out: PathBuf,
    /// Tiny counts and durations (CI runs this so the program can't rot).
    #[arg(long)]
    pub smoke: bool,
    /// Parts to run (`audit` only when asked for).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "ceilings,place,wave,naive")]
    pub only: Vec<Part>,
    /// Entries in the audit log the `audit` part checkpoints and verifies.
    #[arg(long, default_value_t = 100_000)]
    pub audit_entries: u64,
    /// Redis deployments `place` and `wave` run on: a single redis-server, and/or a local Redis
    /// Cluster of 3 masters with a replica each (every write waits for its replica, as operators run
    /// it); per-node CPU is reported for both.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "single")]
    pub redis: Vec<RedisKind>,
    /// After each wave on a single Redis, sum `MEMORY USAGE` of every key by key family (scans every
    /// key: seconds at 100k orders) and print where the bytes per order go.
    #[arg(long)]
    pub memory_breakdown: bool,
    /// Skip the wave with placements of another product alongside (it runs the 100k wave once more).
    #[arg(long)]
    pub no_alongside: bool,
    /// Orders per quota call, stock call and commit script in the wave parts (the orders service's
    /// `--batch-size`): smaller batches block Redis for less time per script.
    #[arg(long, default_value_t = chipgate_orders::Options::default().chunk)]
    pub batch_size: usize,
    /// Orders per batch while placements of other products wait (the orders service's
    /// `--shared-batch-size`; 0: always `--batch-size`): what the wave's rounds cut while the
    /// placements alongside wait.
    #[arg(long, default_value_t = chipgate_orders::Options::default().shared_chunk)]
    pub shared_batch_size: usize,
    /// How the wave parts' waiting orders are put in place before the wave.
    #[arg(long, value_enum, default_value = "bulk")]
    pub seed: Seed,
    /// With the bulk seed, one more FIFO wave over this many orders placed one `PlaceOrder` at a
    /// time, as buyers place them (`--seed place`), for the Redis bytes per order production keeps:
    /// the bulk seed writes no idempotency records. 0 skips it.
    #[arg(long, default_value_t = 20_000)]
    pub placed_orders: usize,
    /// Run the wave parts and the naive baseline with authentication off (to see what it costs;
    /// by default they run with it on, as operators do; *place* measures both every run).
    #[arg(long)]
    pub no_auth: bool,
}

/// How the wave parts' waiting orders come to wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Seed {
    /// The orders service's bulk load, in scripts of 2,000 orders (fast; leaves no idempotency
    /// records).
    Bulk,
    /// One `PlaceOrder` call per order, `--in-flight` at a time over `--connections`, as buyers
    /// place them: Redis also keeps each placement's idempotency record (24 hours, with a TTL)
    /// during the wave, as it does in production.
    Place,
}

/// A Redis deployment to measure on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RedisKind {
    /// One redis-server.
    Single,
    /// A local Redis Cluster: 3 masters, 3 replicas.
    Cluster,
}

/// A part of the benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Part {
    /// The echo, Redis and place ceilings.
    Ceilings,
    /// Order placement, authentication off and on.
    Place,
    /// Wave propagation, first come first served and pro rata, and placements alongside a wave.
    Wave,
    /// The naive baseline.
    Naive,
    /// Audit checkpoints and verification over `--audit-entries` entries.
    Audit,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let mut args = Args::parse();
    if args.smoke {
        args.orders = args.orders.min(2_000);
        args.buyers = args.buyers.min(10);
        args.naive_orders = args.naive_orders.min(200);
        args.duration = args.duration.min(Duration::from_secs(1));
        args.in_flight = args.in_flight.min(16);
        args.audit_entries = args.audit_entries.min(2_000);
        args.placed_orders = args.placed_orders.min(300);
    }
    let mut results = report::Results { args: format!("{args:?}"), ..Default::default() };
    use chipgate_proto::orders::v1::AllocationStrategy;
    use chipgate_testkit::BackendKind;
    let single = args.redis.contains(&RedisKind::Single);
    let cluster = args.redis.contains(&RedisKind::Cluster);
    if args.only.contains(&Part::Ceilings) {
        results.echo = Some(ceilings::echo(&args).await);
        results.redis = Some(ceilings::redis(&args).await);
        results.place_ceiling = Some(ceilings::place(&args).await);
    }
    if args.only.contains(&Part::Place) {
        if single {
            results.place = Some(place::run(&args, BackendKind::Redis, false).await);
            results.place_auth = Some(place::run(&args, BackendKind::Redis, true).await);
        }
        if cluster {
            results.place_cluster = Some(place::run(&args, BackendKind::RedisCluster, false).await);
        }
    }
    if args.only.contains(&Part::Wave) {
        if single {
            results.wave = Some(wave::run(&args, AllocationStrategy::Fifo, BackendKind::Redis, false).await);
            results.wave_pro_rata =
                Some(wave::run(&args, AllocationStrategy::ProRata, BackendKind::Redis, false).await);
            if !args.no_alongside {
                results.wave_alongside =
                    Some(wave::run(&args, AllocationStrategy::Fifo, BackendKind::Redis, true).await);
            }
            if args.seed == Seed::Bulk && args.placed_orders > 0 {
                let placed = Args { orders: args.placed_orders, seed: Seed::Place, ..args.clone() };
                results.wave_placed =
                    Some(wave::run(&placed, AllocationStrategy::Fifo, BackendKind::Redis, false).await);
            }
        }
        if cluster {
            results.wave_cluster =
                Some(wave::run(&args, AllocationStrategy::Fifo, BackendKind::RedisCluster, false).await);
        }
    }
    if args.only.contains(&Part::Naive) {
        results.naive = Some(naive::run(&args).await);
    }
    if args.only.contains(&Part::Audit) {
        results.audit = Some(audit::run(&args).await);
    }
    report::print(&results);
    if let Err(e) = report::write(&args, &results) {
        report::say(&format!("can't write results under {}: {e}", args.out.display()));
        return std::process::ExitCode::FAILURE;
    }
    let faults = report::faults(&results);
    for f in &faults {
        report::say(&format!("  WRONG: {f}"));
    }
    if faults.is_empty() { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::FAILURE }
}
