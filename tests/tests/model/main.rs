//! A model-based, randomized checker of the whole API (issue 14).
//!
//! It boots the cluster as an operator runs it — Redis with AOF, licensing, inventory and two orders
//! replicas as real processes, authentication on — with short holds (2 s) so holds expire during the
//! run. Then every party plays at once, each a real client with its own token: six buyers (two workers
//! each: applications, orders, confirmations, cancellations), the import authority (waves, grants,
//! terms, suspensions, reinstatements, revocations, rejections, queue moves, domestic purchases),
//! customs (embargoes and lifts), the export authority (grants and revocations per destination) and the
//! vendor (supply, shipments). Calls are retried with the same request id when their outcome is
//! unknown, some acknowledged calls are sent again (the first answer must come back), some are sent
//! twice at once (one answer for both), and bad input is mixed in (each must be refused with the right
//! code and change nothing). An orders replica is killed with SIGKILL midway (and Redis restarted from
//! its AOF with `CHIPGATE_MODEL_FAULTS=all`).
//!
//! A reference model ([`model`]) written from the API's contract follows every acknowledged call and
//! says what each answer may be. Invariants that must hold at every instant are sampled during the run;
//! the rest is checked once the cluster has settled ([`checks`]): first with the world as the parties
//! left it, then again after the world is opened (embargoes lifted, exports granted, licences reinstated
//! and finalised) so that propagation must move every waiting order the model says is eligible, and
//! finally a fixpoint check: a forced full reconcile (one replica restarted with
//! `CHIPGATE_FULL_RECONCILE_EVERY=300ms`, the other stopped) must change nothing.
//!
//! Environment:
//! * `CHIPGATE_MODEL_SEED` — replay a run (the seed is printed at the start and in the report);
//! * `CHIPGATE_MODEL_DURATION` — how long the parties play (default 30s; e.g. `10m` for a soak, which
//!   injects a fault every 15–30 s);
//! * `CHIPGATE_MODEL_FAULTS` — `none`, `replica` (default: kill -9 of an orders replica) or `all`
//!   (also Redis killed and restarted from its AOF);
//!
//! The report (operations by kind and outcome, figures, violations) is printed to stderr and written
//! to `target/tmp/model-<seed>.txt`. Needs the binaries: `cargo build --workspace --bins` first.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod authority;
mod buyers;
mod calls;
mod checks;
mod model;
mod others;
mod repro;
mod world;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chipgate_orders::keys as okeys;
use chipgate_proto::orders::v1::OrderState;
use chipgate_runtime::auth::Role;
use chipgate_state::Backend;
use chipgate_testkit::invariants;
use chipgate_testkit::procs::{ProcessCluster, ProcessOptions};

use crate::world::{BUYERS, Ctx, DESTINATIONS, PRODUCTS, Party, Urls};

/// Which faults a run injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Faults {
    None,
    Replica,
    All,
}

struct Config {
    seed: u64,
    duration: Duration,
    faults: Faults,
}

fn config() -> Config {
    let seed = match std::env::var("CHIPGATE_MODEL_SEED") {
        Ok(s) => {
            let s = s.trim();
            let parsed = match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("CHIPGATE_MODEL_SEED={s:?} is not a number"))
        }
        Err(_) => fastrand::u64(..),
    };
    let duration = std::env::var("CHIPGATE_MODEL_DURATION")
        .ok()
        .map(|d| chipgate_runtime::time::parse_duration(&d).unwrap_or_else(|e| panic!("CHIPGATE_MODEL_DURATION: {e}")))
        .unwrap_or(Duration::from_secs(30));
    let faults = match std::env::var("CHIPGATE_MODEL_FAULTS").as_deref() {
        Ok("none") => Faults::None,
        Ok("all") => Faults::All,
        Ok("replica") | Err(_) => Faults::Replica,
        Ok(other) => panic!("CHIPGATE_MODEL_FAULTS={other:?}: use none, replica or all"),
    };
    Config { seed, duration, faults }
}

/// Hold time of a fully held order (so that holds expire during the run).
const HOLD_SECONDS: &str = "2";
/// How long the cluster may take to settle at the end of a phase.
const SETTLE_WITHIN: Duration = Duration::from_secs(45);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn model_checker() {
    let cfg = config();
    let began = Instant::now();
    eprintln!(
        "model checker: seed {:#x} (replay: CHIPGATE_MODEL_SEED={:#x}), {:?} of load, faults {:?}",
        cfg.seed, cfg.seed, cfg.duration, cfg.faults
    );
    let mut cluster = ProcessCluster::start(ProcessOptions {
        orders_replicas: 2,
        orders_env: vec![
            ("CHIPGATE_HOLD_SECONDS".into(), HOLD_SECONDS.into()),
            ("CHIPGATE_LEASE_TTL".into(), "1s".into()),
            ("CHIPGATE_CLAIM_IDLE".into(), "1s".into()),
            // A wave's snapshot in steps of a queue or two, so its steps interleave with the rounds,
            // cancels and placements the parties make meanwhile (in production a step is 5,000).
            ("CHIPGATE_WAVE_SNAPSHOT_STEP".into(), "2".into()),
        ],
        ..ProcessOptions::default()
    })
    .await;
    let urls = Urls {
        licensing: cluster.licensing.url(),
        inventory: cluster.inventory.url(),
        orders: cluster.orders.iter().map(|o| o.url()).collect(),
    };
    let ctx = Ctx {
        model: Arc::default(),
        stats: Arc::default(),
        faults: Arc::default(),
        stop: Arc::new(AtomicBool::new(false)),
        seed: cfg.seed,
        urls,
        signer: cluster.signer.clone().expect("authentication is on"),
    };
    let booted = began.elapsed();

    // The world starts with export authorisations to CN and some stock.
    setup(&ctx).await;

    let mut tasks = vec![
        tokio::spawn(authority::run(ctx.clone())),
        tokio::spawn(others::customs(ctx.clone())),
        tokio::spawn(others::exports(ctx.clone())),
        tokio::spawn(others::vendor(ctx.clone())),
    ];
    for b in BUYERS {
        for w in 0..2 {
            tasks.push(tokio::spawn(buyers::run(ctx.clone(), b, w)));
        }
    }
    let sampler = tokio::spawn(checks::sample(ctx.clone()));
    let injected = inject_faults(&mut cluster, &cfg).await;
    ctx.stop.store(true, Ordering::SeqCst);
    for t in tasks {
        if tokio::time::timeout(Duration::from_secs(90), t).await.is_err() {
            ctx.violation("a party did not finish its last call within 90 s");
        }
    }
    let samples = sampler.await.unwrap_or(0);
    cluster.heal().await;
    let load = began.elapsed() - booted;

    // Phase 1: the world as the parties left it.
    let t = Instant::now();
    let settled1 = close(&ctx, &cluster, "as left").await;
    let (v1, _) = checks::settled(&ctx, &mut cluster.clients(0), &cluster.store, &cluster.redis.url()).await;
    let phase1 = t.elapsed();

    // Phase 2: the world opened.
    let t = Instant::now();
    reopen(&ctx).await;
    let settled2 = close(&ctx, &cluster, "opened").await;
    let (v2, snap) = checks::settled(&ctx, &mut cluster.clients(0), &cluster.store, &cluster.redis.url()).await;
    let phase2 = t.elapsed();

    // Phase 3: a forced full reconcile changes nothing.
    let t = Instant::now();
    let v3 = fixpoint(&ctx, &mut cluster, &snap).await;
    let phase3 = t.elapsed();

    let mut violations: Vec<String> = ctx.model.lock().unwrap().violations.clone();
    violations.extend(ctx.faults.lock().unwrap().iter().map(|f| format!("call: {f}")));
    violations.extend(v1.iter().map(|x| format!("settled (as left): {x}")));
    violations.extend(v2.iter().map(|x| format!("settled (opened): {x}")));
    violations.extend(v3);
    if !settled1 || !settled2 {
        violations.push(format!(
            "the cluster did not settle within {SETTLE_WITHIN:?} (as left: {settled1}, opened: {settled2})"
        ));
    }

    let report = report(
        &ctx,
        &cfg,
        &snap,
        samples,
        &injected,
        &violations,
        [booted, load, phase1, phase2, phase3, began.elapsed()],
    );
    eprintln!("{report}");
    let _ = std::fs::write(format!("{}/model-{:#x}.txt", env!("CARGO_TARGET_TMPDIR"), cfg.seed), &report);
    assert!(
        violations.is_empty(),
        "{} violations (seed {:#x}, replay with CHIPGATE_MODEL_SEED={:#x}); first: {}",
        violations.len(),
        cfg.seed,
        cfg.seed,
        violations.first().map(String::as_str).unwrap_or("")
    );
}

/// Export authorisations for every product to CN, and 200 units of each.
async fn setup(ctx: &Ctx) {
    let exporter = Party::role(&ctx.urls, &ctx.signer, Role::ExportAuthority);
    let vendor = Party::role(&ctx.urls, &ctx.signer, Role::Vendor);
    let mut rng = fastrand::Rng::with_seed(ctx.seed ^ 0x5e7);
    for sku in PRODUCTS {
        others::grant_export(ctx, &exporter, &mut rng, sku, DESTINATIONS[0]).await;
        others::receive(ctx, &vendor, &mut rng, sku, 200).await;
    }
}

/// Kills an orders replica (and Redis, with `all`) at moments drawn from the seed while the parties
/// play; returns what was injected.
async fn inject_faults(cluster: &mut ProcessCluster, cfg: &Config) -> BTreeMap<&'static str, u64> {
    let mut injected = BTreeMap::new();
    let start = Instant::now();
    let end = start + cfg.duration;
    let mut rng = fastrand::Rng::with_seed(cfg.seed ^ 0xfa17);
    let soak = cfg.duration > Duration::from_secs(90);
    let mut next = if soak {
        start + Duration::from_secs(rng.u64(15..30))
    } else {
        start + cfg.duration * 2 / 5 + Duration::from_millis(rng.u64(0..2000))
    };
    let mut redis_done = false;
    loop {
        let now = Instant::now();
        if now >= end {
            return injected;
        }
        if cfg.faults == Faults::None || now < next {
            tokio::time::sleep((next.min(end)).saturating_duration_since(now).max(Duration::from_millis(50))).await;
            continue;
        }
        let redis = cfg.faults == Faults::All && (soak && rng.u8(..100) < 35 || !soak && !redis_done);
        if redis && !soak && injected.is_empty() {
            // A short run kills the replica first and Redis later.
        } else if redis {
            eprintln!("fault: kill -9 redis-server, restart from its AOF");
            cluster.redis.kill();
            tokio::time::sleep(Duration::from_millis(rng.u64(200..1500))).await;
            cluster.redis.restart();
            cluster.heal().await;
            *injected.entry("redis kill -9 + restart").or_default() += 1;
            redis_done = true;
            next = Instant::now() + if soak { Duration::from_secs(rng.u64(15..30)) } else { cfg.duration };
            continue;
        }
        let i = rng.usize(..cluster.orders.len());
        eprintln!("fault: kill -9 orders replica {i}");
        cluster.orders[i].kill();
        tokio::time::sleep(Duration::from_millis(rng.u64(500..2000))).await;
        cluster.orders[i].start().await;
        *injected.entry("orders replica kill -9 + restart").or_default() += 1;
        next = Instant::now()
            + if soak {
                Duration::from_secs(rng.u64(15..30))
            } else if cfg.faults == Faults::All && !redis_done {
                cfg.duration / 4
            } else {
                cfg.duration
            };
    }
}

/// Ends a phase: confirms every held order (so that no hold is left to expire) until the cluster has
/// settled with none left. False if that did not happen within [`SETTLE_WITHIN`].
async fn close(ctx: &Ctx, cluster: &ProcessCluster, phase: &str) -> bool {
    let deadline = Instant::now() + SETTLE_WITHIN;
    let auditor = Party::role(&ctx.urls, &ctx.signer, Role::Auditor);
    let mut orders_client = cluster.orders_client(0);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // Settled: no marks, no owed releases, orders unchanged, no unfinished work, every event
        // delivered and acknowledged. Delivery is read from the streams' ids, not from the group's
        // `lag`, which Redis miscounts after it restarts from its AOF (see `checks::delivery`).
        let quiet = invariants::wait_quiet(&cluster.store, &mut orders_client, left.min(Duration::from_secs(15))).await;
        let mut unfinished = false;
        for p in cluster.store.smembers(&okeys::products()).await.unwrap_or_default() {
            unfinished |= !cluster
                .store
                .hgetall(&okeys::working(&chipgate_domain::ids::Sku::from_trusted(p)))
                .await
                .unwrap_or_default()
                .is_empty();
        }
        let delivered = checks::delivery(&cluster.redis.url()).await.iter().all(|d| d.delivered);
        let settled = quiet && !unfinished && delivered;
        let snap = checks::snapshot(&auditor).await;
        let held = snap.orders.iter().filter(|o| o.state() == OrderState::Reserved).count();
        if settled && held == 0 {
            return true;
        }
        if Instant::now() >= deadline {
            let mut busy = Vec::new();
            for p in cluster.store.smembers(&okeys::products()).await.unwrap_or_default() {
                let sku = chipgate_domain::ids::Sku::from_trusted(p.as_str());
                for (kind, key) in [("dirty", okeys::dirty(&sku)), ("working", okeys::working(&sku))] {
                    let n = cluster.store.hgetall(&key).await.map(|m| m.len()).unwrap_or(0);
                    if n > 0 {
                        busy.push(format!("{p}: {n} {kind} marks"));
                    }
                }
            }
            eprintln!("phase {phase}: not settled; {held} orders held; {busy:?}; {}", streams(cluster).await);
            return false;
        }
        for b in BUYERS {
            buyers::confirm_all(ctx, b, &snap.orders).await;
        }
    }
}

/// The event streams and the orders consumer group as Redis reports them (for a phase that did not
/// settle).
async fn streams(cluster: &ProcessCluster) -> String {
    let Ok(client) = redis::Client::open(cluster.redis.url()) else { return String::new() };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else { return String::new() };
    let mut out = Vec::new();
    for stream in &chipgate_testkit::invariants::event_streams(&cluster.store).await {
        let info: redis::Value =
            redis::cmd("XINFO").arg("STREAM").arg(stream).query_async(&mut conn).await.unwrap_or(redis::Value::Nil);
        let groups: redis::Value =
            redis::cmd("XINFO").arg("GROUPS").arg(stream).query_async(&mut conn).await.unwrap_or(redis::Value::Nil);
        out.push(format!("{stream}: {info:?} groups {groups:?}"));
    }
    out.join("; ")
}

/// Opens the world: customs lifts every embargo, the export authority grants every product to every
/// destination, the import authority reinstates suspended licences and finalises pending ones.
async fn reopen(ctx: &Ctx) {
    let customs = Party::role(&ctx.urls, &ctx.signer, Role::Customs);
    let exporter = Party::role(&ctx.urls, &ctx.signer, Role::ExportAuthority);
    let mut rng = fastrand::Rng::with_seed(ctx.seed ^ 0x0be4);
    for sku in PRODUCTS {
        if ctx.model.lock().unwrap().embargoed_now(sku) {
            others::set_policy(ctx, &customs, &mut rng, sku, false).await;
        }
        for dest in DESTINATIONS {
            if ctx.model.lock().unwrap().export_now(sku, dest) != Some(true) {
                others::grant_export(ctx, &exporter, &mut rng, sku, dest).await;
            }
        }
    }
    authority::reopen(ctx).await;
}

/// Forces a full reconcile of every product on a settled cluster and checks that it changed nothing:
/// replica 0 stops, replica 1 restarts with a full reconcile every 300 ms and its metrics on, runs
/// until each product had two reconcile rounds (a quiet cluster has rounds only for the full
/// reconcile's marks), then both replicas run as before and the cluster settles again.
async fn fixpoint(ctx: &Ctx, cluster: &mut ProcessCluster, before: &checks::Snapshot) -> Vec<String> {
    let mut v = Vec::new();
    let products = cluster.store.smembers(&okeys::products()).await.expect("products");
    let port = chipgate_testkit::free_port();
    cluster.orders[0].kill();
    cluster.orders[1].set_env("CHIPGATE_FULL_RECONCILE_EVERY", "300ms");
    cluster.orders[1].set_env("CHIPGATE_METRICS_LISTEN", &format!("127.0.0.1:{port}"));
    cluster.orders[1].restart().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let url = format!("http://127.0.0.1:{port}/metrics");
    let mut rounds = BTreeMap::new();
    loop {
        if let Ok(s) = chipgate_testkit::prom::scrape(&url).await {
            rounds = products
                .iter()
                .map(|p| (p.clone(), s.value("chipgate_reconcile_rounds_total", &[("product", p)])))
                .collect();
            if rounds.values().all(|n| *n >= 2.0) {
                break;
            }
        }
        if Instant::now() > deadline {
            v.push(format!(
                "fixpoint: the forced full reconcile did not run over every product within 30 s (rounds: {rounds:?})"
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster.orders[1].remove_env("CHIPGATE_FULL_RECONCILE_EVERY");
    cluster.orders[1].remove_env("CHIPGATE_METRICS_LISTEN");
    cluster.orders[1].restart().await;
    cluster.orders[0].start().await;
    if !close(ctx, cluster, "fixpoint").await {
        v.push("fixpoint: the cluster did not settle again after the full reconcile".into());
    }
    let after = checks::snapshot(&Party::role(&ctx.urls, &ctx.signer, Role::Auditor)).await;
    let (a, b) = (checks::fixpoint_view(before), checks::fixpoint_view(&after));
    let mut changed = 0;
    for (k, was) in &a {
        let now = b.get(k).map(String::as_str).unwrap_or("(gone)");
        if was != now {
            changed += 1;
            if changed <= 30 {
                v.push(format!("fixpoint: a forced full reconcile changed {k}: {was} → {now}"));
            }
        }
    }
    for k in b.keys().filter(|k| !a.contains_key(*k)) {
        v.push(format!("fixpoint: {k} appeared during the full reconcile"));
    }
    if changed > 30 {
        v.push(format!("fixpoint: ... {changed} changes in all"));
    }
    v
}

fn report(
    ctx: &Ctx,
    cfg: &Config,
    snap: &checks::Snapshot,
    samples: u64,
    injected: &BTreeMap<&'static str, u64>,
    violations: &[String],
    times: [Duration; 6],
) -> String {
    let mut r = String::new();
    let st = ctx.stats.lock().unwrap();
    let m = ctx.model.lock().unwrap();
    let _ = writeln!(r, "== model checker: seed {:#x} (replay: CHIPGATE_MODEL_SEED={:#x})", cfg.seed, cfg.seed);
    let _ = writeln!(
        r,
        "boot {:.1} s, load {:.1} s, settle as left + check {:.1} s, open + settle + check {:.1} s, fixpoint {:.1} s; total {:.1} s",
        times[0].as_secs_f64(),
        times[1].as_secs_f64(),
        times[2].as_secs_f64(),
        times[3].as_secs_f64(),
        times[4].as_secs_f64(),
        times[5].as_secs_f64()
    );
    let _ = writeln!(r, "faults injected: {injected:?}");
    let _ = writeln!(r, "operations by kind and outcome:");
    let mut kinds: BTreeMap<&str, Vec<(&str, u64)>> = BTreeMap::new();
    for ((k, o), n) in &st.outcomes {
        kinds.entry(k.as_str()).or_default().push((o.as_str(), *n));
    }
    let mut total = 0;
    for (k, outs) in &kinds {
        let line: Vec<String> = outs.iter().map(|(o, n)| format!("{o} {n}")).collect();
        total += outs.iter().map(|(_, n)| n).sum::<u64>();
        let _ = writeln!(r, "  {k:<28} {}", line.join(", "));
    }
    let _ = writeln!(
        r,
        "{total} operations; {} acknowledged ones sent again with their request id, {} sent twice at once; {} attempts resent after an unknown outcome {:?}",
        st.replays,
        st.twins,
        st.resent.values().sum::<u64>(),
        st.unknown_why
    );
    let mut by_state: BTreeMap<String, u64> = BTreeMap::new();
    for o in &snap.orders {
        *by_state.entry(format!("{:?}", o.state())).or_default() += 1;
    }
    let _ = writeln!(
        r,
        "orders at the end: {} {by_state:?}; licences {}; applications {}; waves {}; receipts {}; stock samples {samples}",
        snap.orders.len(),
        m.licences.len(),
        m.apps.len(),
        m.waves.len(),
        m.receipts.len()
    );
    for s in &snap.stock {
        let _ = writeln!(
            r,
            "  stock {}: received {} = available {} + held {} + committed {} + shipped {}",
            s.product_sku, s.received, s.available, s.held, s.committed, s.shipped
        );
    }
    let _ = writeln!(r, "settled checks judged (all phases): {:?}", checks::coverage());
    for n in checks::notes() {
        let _ = writeln!(r, "note: {n}");
    }
    let _ = writeln!(r, "violations: {}", violations.len());
    // Grouped by their wording with the ids and figures taken out, one example each.
    let mut groups: BTreeMap<String, (usize, &str)> = BTreeMap::new();
    for x in violations {
        let key: String = x.chars().map(|c| if c.is_ascii_digit() { '#' } else { c }).collect();
        let key = key.split('#').filter(|s| !s.is_empty()).collect::<Vec<_>>().join("#");
        let e = groups.entry(key.chars().take(90).collect()).or_insert((0, x.as_str()));
        e.0 += 1;
    }
    let mut groups: Vec<(usize, &str)> = groups.into_values().collect();
    groups.sort_by_key(|g| std::cmp::Reverse(g.0));
    for (n, example) in groups.iter().take(40) {
        let _ = writeln!(r, "  {n} x {example}");
    }
    // The full histories of the first orders the violations name, to start the investigation from.
    let mut named: Vec<&str> = Vec::new();
    for x in violations {
        for w in x.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-')) {
            if w.starts_with("ord-") && !named.contains(&w) && named.len() < 6 {
                named.push(w);
            }
        }
    }
    for id in named {
        if let Some(o) = snap.orders.iter().find(|o| o.order_id == id) {
            let _ = writeln!(
                r,
                "  history of {id} ({}, {} x {}, sequence {}, now {:?} generation {} licence {:?}): {}",
                o.buyer_id,
                o.units,
                o.product_sku,
                o.sequence,
                o.state(),
                o.generation,
                o.license_id,
                checks::last_steps(o, 40)
            );
        }
    }
    r
}
