//! Failover: kill -9 of Redis Cluster masters in the middle of a workload.
//!
//! The three services run as real processes, as an operator runs them: authentication on, two orders
//! replicas, a private Redis Cluster of 3 masters with a replica each, every write waiting for its
//! replica (`--redis-min-replicas` 1, the cluster default). Concurrent clients place orders (each with
//! its request id), confirm, ship and cancel them, receive supply and publish waves, while the master
//! serving the busy product's orders partition is killed with SIGKILL — then, once the cluster has
//! recovered, each other original master in turn, so that every partition (licensing's, the
//! catalogue, each product's stock and orders) goes through a failover under load. Each time the
//! replica is promoted (`cluster-node-timeout` 1 s) and the killed node comes back as the new master's
//! replica, as Kubernetes restarts a pod. No service is restarted.
//!
//! A call whose outcome was unknown (UNAVAILABLE, a deadline) is retried with the same request id
//! until it has exactly one outcome. Then:
//! * every acknowledged call's effect is there (placements, receipts, confirmations, shipments,
//!   cancellations, the waves and the licences they granted), nothing is applied twice, and the
//!   invariant checker finds nothing ([`invariants::check_ledger`](chipgate_testkit::invariants::check_ledger));
//! * calls that reached a dead master's slots answered UNAVAILABLE, never INTERNAL (no service logged
//!   an internal error, to the test's clients or to each other);
//! * every service's health said NOT_SERVING while slots had no master, and SERVING again
//!   afterwards, by itself;
//! * a write to a partition of the dead master (a placement, or a supply receipt), sent from the
//!   moment of the kill with one request id, answers UNAVAILABLE until the partition has a master and
//!   a replica again, and then goes through.
//!
//! The figures (failover times, calls answered UNAVAILABLE, retries, operations) are printed and kept
//! in `target/tmp/faults-failover.txt`. Needs the binaries: `cargo build --workspace --bins` first.

use crate::common::{H200, NVL, rid};
use crate::faults::{self, Conn, Op, Outcome, Shared};

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chipgate_proto::inventory::v1 as ipb;
use chipgate_proto::licensing::v1 as lpb;
use chipgate_proto::orders::v1 as opb;
use chipgate_testkit::BackendKind;
use chipgate_testkit::procs::{self, ProcessCluster, ProcessOptions};
use tonic_health::pb::health_check_response::ServingStatus;

/// How long a replica may take to be promoted (measured: ~2–2.7 s with `cluster-node-timeout` 1 s).
const PROMOTION_WITHIN: Duration = Duration::from_secs(20);
/// How long after the old master is back every service may take to report SERVING.
const HEALTHY_WITHIN: Duration = Duration::from_secs(15);

/// A service's health as seen every 50 ms from the kill on: each change, with its time since the kill.
async fn watch_health(url: String, since: Instant, stop: Arc<AtomicBool>) -> Vec<(Duration, Option<ServingStatus>)> {
    let mut seen: Vec<(Duration, Option<ServingStatus>)> = Vec::new();
    loop {
        // Checked before the sample, so the last sample is taken after the stop.
        let last = stop.load(Ordering::SeqCst);
        let status = procs::health(&url).await;
        if seen.last().map(|(_, s)| *s) != Some(status) {
            seen.push((since.elapsed(), status));
        }
        if last {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What a probe saw: each attempt's answer, and how long after the kill it was acknowledged.
struct Probe {
    answers: BTreeMap<String, u64>,
    acknowledged_after: Duration,
}

/// Sends `op` every 100 ms, always with the same request id, until it is acknowledged, and books it
/// like any other operation (its first unknown outcome, its retries).
async fn probe(j: Shared, c: Conn, op: Op, killed_at: Instant) -> Probe {
    j.lock().unwrap().figures.attempted += 1;
    let mut answers = BTreeMap::new();
    let mut tries = 0usize;
    loop {
        tries += 1;
        let outcome = op.send(&c, tries).await;
        match &outcome {
            Outcome::Done(_) => *answers.entry("OK".to_string()).or_default() += 1,
            Outcome::Refused(s) => panic!("the probe {op:?} was refused: {s:?}"),
            Outcome::Unknown(code) => {
                *answers.entry(code.clone()).or_default() += 1;
                {
                    let mut j = j.lock().unwrap();
                    if tries == 1 {
                        j.figures.unknown += 1;
                        *j.figures.unknown_codes.entry(code.clone()).or_default() += 1;
                    } else {
                        j.figures.retries += 1;
                        *j.figures.retry_codes.entry(code.clone()).or_default() += 1;
                    }
                }
                assert!(
                    killed_at.elapsed() < faults::RESOLVE_WITHIN,
                    "{op:?} still failed {:?} after the kill: {answers:?}",
                    faults::RESOLVE_WITHIN
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        }
        let acknowledged_after = killed_at.elapsed();
        // Booked as acknowledged, after an unknown outcome if the first try was.
        j.lock().unwrap().settle(&op, &outcome, tries > 1);
        return Probe { answers, acknowledged_after };
    }
}

/// The partitions the workload writes, by name, with their hash slots.
fn partitions() -> Vec<(&'static str, u16)> {
    use chipgate_state::key_slot;
    vec![
        ("orders/H200", chipgate_orders::keys::part(&chipgate_domain::ids::Sku::from_trusted(H200)).slot()),
        ("inventory/H200", chipgate_inventory::keys::part(&chipgate_domain::ids::Sku::from_trusted(H200)).slot()),
        ("orders/NVL", chipgate_orders::keys::part(&chipgate_domain::ids::Sku::from_trusted(NVL)).slot()),
        ("inventory/NVL", chipgate_inventory::keys::part(&chipgate_domain::ids::Sku::from_trusted(NVL)).slot()),
        (
            "licensing/H200",
            chipgate_contract::partitions::licensing(&chipgate_domain::ids::Sku::from_trusted(H200)).slot(),
        ),
        (
            "licensing/NVL",
            chipgate_contract::partitions::licensing(&chipgate_domain::ids::Sku::from_trusted(NVL)).slot(),
        ),
        ("licensing desk", key_slot(&chipgate_contract::streams::licensing())),
        ("orders' product list", key_slot(&chipgate_orders::keys::products())),
        ("catalogue", key_slot(&chipgate_inventory::keys::products())),
    ]
}

/// What one failover came to.
struct Round {
    victim: u16,
    serves: Vec<&'static str>,
    promoted: u16,
    promotion: Duration,
    rejoined: Duration,
    /// What the probe did: a write to a partition of the dead master.
    probe_what: String,
    probe: Probe,
    /// Per service: when it first said anything but SERVING, and when it said SERVING again.
    health: Vec<(String, Duration, Duration)>,
    /// Operations whose first answer was unknown while this round lasted.
    unknown: u64,
    acknowledged: u64,
}

/// Kills master `victim`, keeps the workload going through its failover, brings it back as a replica
/// and waits until a write to one of its partitions (the probe) is acknowledged and every service is
/// SERVING.
async fn fail_over(cluster: &mut ProcessCluster, j: &Shared, c: &Conn, victim: u16) -> Round {
    let serves: Vec<&'static str> = {
        let redis = cluster.redis.cluster().expect("a redis cluster");
        partitions().into_iter().filter(|(_, slot)| redis.master_of_slot(*slot) == victim).map(|(n, _)| n).collect()
    };
    // The probe writes where the master died, in a call that goes to Redis itself (orders retries a
    // peer's UNAVAILABLE within the caller's deadline, so a placement may only be slow while
    // licensing's partition fails over): a placement if a product's orders live there, else a
    // supply receipt of a product whose stock does.
    let has = |name: &str| serves.contains(&name);
    let (probe_what, op) = if has("orders/H200") || has("orders/NVL") {
        let sku = if has("orders/H200") { H200 } else { NVL };
        let op = Op::Place(opb::PlaceOrderRequest {
            request_id: rid("probe-place"),
            buyer_id: faults::BUYERS[0].into(),
            product_sku: sku.into(),
            units: 10,
            justification: "needed for training".into(),
        });
        (format!("PlaceOrder {sku}"), op)
    } else {
        let sku = if has("inventory/NVL") { NVL } else { H200 };
        let op = Op::Receive(ipb::ReceiveSupplyRequest {
            request_id: rid("probe-rcv"),
            receipt_id: rid("probe-rcpt"),
            product_sku: sku.into(),
            units: 100,
            source: "air".into(),
        });
        (format!("ReceiveSupply {sku}"), op)
    };
    let (unknown_before, acknowledged_before) = {
        let f = &j.lock().unwrap().figures;
        (f.unknown, f.acknowledged)
    };
    let killed = cluster.redis.cluster().unwrap().kill_master(victim).expect("kill the master");
    faults::fault(j, "kill -9 of a redis master");
    let stop_watching = Arc::new(AtomicBool::new(false));
    let watchers: Vec<_> = [&cluster.licensing, &cluster.inventory, &cluster.orders[0], &cluster.orders[1]]
        .into_iter()
        .map(|p| {
            let name = format!("{}:{}", p.name(), p.url().rsplit(':').next().unwrap_or_default());
            (name, tokio::spawn(watch_health(p.url(), killed.at, stop_watching.clone())))
        })
        .collect();
    let prober = tokio::spawn(probe(j.clone(), c.clone(), op, killed.at));

    let promotion =
        tokio::task::block_in_place(|| cluster.redis.cluster().unwrap().wait_for_failover(&killed, PROMOTION_WITHIN))
            .unwrap_or_else(|e| panic!("the replica of {victim} did not take over: {e}"));
    // Kubernetes restarts the pod: the node comes back with its data and joins the new master as its
    // replica. Until then, with min-replicas 1, writes to the promoted master's slots can't be
    // acknowledged (UNAVAILABLE, outcome unknown).
    tokio::task::block_in_place(|| cluster.redis.cluster().unwrap().restart(victim));
    let rejoined = killed.at.elapsed();
    let masters = cluster.redis.cluster().unwrap().masters();
    assert!(!masters.contains(&victim), "{victim} came back as a replica, not a master: {masters:?}");

    let probe = prober.await.unwrap();
    let healthy_by = Instant::now() + HEALTHY_WITHIN;
    for p in [&cluster.licensing, &cluster.inventory, &cluster.orders[0], &cluster.orders[1]] {
        while procs::health(&p.url()).await != Some(ServingStatus::Serving) {
            assert!(
                Instant::now() < healthy_by,
                "{} did not report SERVING within {HEALTHY_WITHIN:?} of master {victim}'s return",
                p.name()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    stop_watching.store(true, Ordering::SeqCst);
    let mut health = Vec::new();
    for (name, w) in watchers {
        let seen = w.await.unwrap();
        eprintln!("failover: master {victim}: health of {name}: {seen:?}");
        let down = seen.iter().find(|(_, s)| *s != Some(ServingStatus::Serving)).map(|(t, _)| *t);
        // Every service reaches every master (each checks them all), so each must say it can't.
        let down = down.unwrap_or_else(|| panic!("{name} stayed SERVING while master {victim} was down: {seen:?}"));
        let up = seen.iter().rev().find(|(_, s)| *s == Some(ServingStatus::Serving)).map(|(t, _)| *t);
        let up = up.unwrap_or_else(|| panic!("{name} never said SERVING again: {seen:?}"));
        assert!(up > down, "{name}: {seen:?}");
        health.push((name, down, up));
    }
    let f = &j.lock().unwrap().figures;
    Round {
        victim,
        serves,
        promoted: promotion.new_master,
        promotion: promotion.took,
        rejoined,
        probe_what,
        probe,
        health,
        unknown: f.unknown - unknown_before,
        acknowledged: f.acknowledged - acknowledged_before,
    }
}

/// Lines of the services' logs that say a service answered INTERNAL or logged an error of its own.
fn errors_logged(cluster: &ProcessCluster) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(cluster.log_dir()) else { return Vec::new() };
    let mut out = Vec::new();
    for e in entries.filter_map(Result::ok).filter(|e| e.path().extension().is_some_and(|x| x == "log")) {
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        out.extend(
            text.lines()
                .filter(|l| l.contains("\"level\":\"ERROR\"") && l.contains("\"target\":\"chipgate"))
                .map(|l| format!("{}: {l}", e.file_name().to_string_lossy())),
        );
    }
    out
}

/// kill -9 of each master in turn under load, starting with the one serving the busy product's
/// orders: each replica is promoted, the services carry on without a restart, calls in between
/// answer UNAVAILABLE (never INTERNAL), and with min-replicas 1 nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn masters_killed_mid_workload_fail_over_and_lose_nothing() {
    let seed = faults::seed();
    eprintln!("failover: seed {seed}");
    let began = Instant::now();
    let mut cluster = ProcessCluster::start(ProcessOptions {
        backend: BackendKind::RedisCluster,
        orders_replicas: 2,
        orders_env: faults::orders_env(),
        ..ProcessOptions::default()
    })
    .await;
    let c = Conn::of(&cluster);
    let j: Shared = Arc::default();
    // Five buyers apply for both products; three are licensed now, the other two by the waves
    // published during the first failover and after the last.
    let mut waiting = faults::setup(&j, &c, 5, 3).await;
    assert_eq!(waiting.len(), 4);
    for sku in [H200, NVL] {
        let op = Op::Receive(ipb::ReceiveSupplyRequest {
            request_id: rid("rcv"),
            receipt_id: rid("rcpt"),
            product_sku: sku.into(),
            units: 1_000,
            source: "sea".into(),
        });
        faults::run_op(&j, &c, 0, op).await.expect("initial supply");
    }
    // The busy product's orders master first, then the other two original masters.
    let (first, others) = {
        let redis = cluster.redis.cluster().expect("a redis cluster");
        let first =
            redis.master_of_slot(chipgate_orders::keys::part(&chipgate_domain::ids::Sku::from_trusted(H200)).slot());
        let others: Vec<u16> = redis.masters().into_iter().filter(|m| *m != first).collect();
        (first, others)
    };

    let stop = Arc::new(AtomicBool::new(false));
    let actors = faults::spawn_actors(&j, &c, seed, &stop, Vec::new());
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut rounds = Vec::new();
    // A wave published while the first master is down (retried with its request ids until it goes
    // through).
    let during: Vec<String> = waiting.drain(..2).collect();
    let wave_during = {
        let (j, c, apps) = (j.clone(), c.clone(), during.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            faults::publish_wave(&j, &c, &apps).await
        })
    };
    rounds.push(fail_over(&mut cluster, &j, &c, first).await);
    let wave_during = wave_during.await.unwrap();
    for victim in others {
        tokio::time::sleep(Duration::from_secs(1)).await;
        rounds.push(fail_over(&mut cluster, &j, &c, victim).await);
    }
    let wave_after = faults::publish_wave(&j, &c, &waiting).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    for a in actors {
        a.await.unwrap();
    }

    // No service restarted: each is its first process, still running.
    for p in cluster.services_mut() {
        assert_eq!(p.starts(), 1, "{} was restarted", p.name());
        assert!(p.running(), "{} died", p.name());
    }
    // The acknowledged waves are published and granted every application they named.
    let mut problems = Vec::new();
    let mut lic = c.lic.clone();
    let licences = lic
        .list_licenses(lpb::ListLicensesRequest { page_size: 1000, ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .licenses;
    for (wave, apps) in [(&wave_during, &during), (&wave_after, &waiting)] {
        let w = lic.get_wave(lpb::GetWaveRequest { wave_id: wave.clone() }).await.unwrap().into_inner().wave.unwrap();
        if w.state() != lpb::WaveState::Published {
            problems.push(format!("wave {wave} was acknowledged published, but is {:?}", w.state()));
        }
        for app in apps {
            if !licences.iter().any(|l| &l.application_id == app) {
                problems.push(format!("wave {wave} granted application {app}, which has no licence"));
            }
        }
    }

    let mut extra = String::new();
    for r in &rounds {
        let _ = writeln!(
            extra,
            "failover of master {} (serving {:?}): replica {} promoted {:.2?} after the kill; old master back in sync as its replica at {:.2?}",
            r.victim, r.serves, r.promoted, r.promotion, r.rejoined
        );
        let _ = writeln!(
            extra,
            "  probe {} {:?}, acknowledged {:.2?} after the kill; operations meanwhile: {} acknowledged, {} unknown at first",
            r.probe_what, r.probe.answers, r.probe.acknowledged_after, r.acknowledged, r.unknown
        );
        for (name, down, up) in &r.health {
            let _ = writeln!(extra, "  health {name:<28} NOT_SERVING at {down:.2?}, SERVING again at {up:.2?}");
        }
    }
    let violations = faults::finish("failover", seed, &mut cluster, &j, &c, began, &extra).await;
    problems.extend(errors_logged(&cluster));
    for p in &problems {
        eprintln!("  PROBLEM: {p}");
    }
    for r in &rounds {
        // Each failover was felt, and felt as UNAVAILABLE (or a deadline that passed while a service
        // waited for Redis: both say "outcome unknown, retry with the same request id"): the probe's
        // write to the dead master's partition waited it out with the same request id.
        assert!(
            r.probe.answers.contains_key("Unavailable"),
            "the probe {} never noticed master {}'s death: {:?}",
            r.probe_what,
            r.victim,
            r.probe.answers
        );
        assert!(
            r.probe
                .answers
                .keys()
                .all(|k| ["OK", "Unavailable", "DeadlineExceeded", "client deadline"].contains(&k.as_str())),
            "while master {} failed over, calls must answer UNAVAILABLE: {:?}",
            r.victim,
            r.probe.answers
        );
    }
    let f = &j.lock().unwrap().figures;
    assert!(f.unknown_codes.contains_key("Unavailable"), "{:?}", f.unknown_codes);
    assert_eq!(violations, 0, "invariant violations (seed {seed}); logs in {}", cluster.log_dir().display());
    assert!(problems.is_empty(), "{} problems (seed {seed}); logs in {}", problems.len(), cluster.log_dir().display());
}

/// Consumer groups are created without waiting for a replica, so a failover soon after one was
/// created can lose it. The orders consumers then create it again and carry on: here the orders
/// group on the busy product's inventory stream is destroyed by hand, as such a failover leaves it,
/// and the supply that arrives next still reaches the order waiting for stock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_group_lost_in_a_failover_is_created_again() {
    use chipgate_state::Backend;
    let mut w = crate::common::World::start().await;
    w.licensed("bytedance", H200, 1_000).await;
    let order = w.place("bytedance", H200, 100).await;
    assert_eq!(order.state(), opb::OrderState::Backordered, "{order:?}");
    let stream = chipgate_contract::streams::inventory(&chipgate_domain::ids::Sku::from_trusted(H200));
    let store = w.cluster.store.clone();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !store.group_info(&stream, chipgate_contract::ORDERS_GROUP).await.unwrap().exists {
        assert!(Instant::now() < deadline, "the orders consumers never joined {stream}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut conn = w.cluster.redis.as_ref().unwrap().connection().await.unwrap();
    let destroyed: i64 = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(&stream)
        .arg(chipgate_contract::ORDERS_GROUP)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(destroyed, 1);

    w.receive(H200, 100).await;
    let now =
        w.until(std::slice::from_ref(&order.order_id), Duration::from_secs(15), |os| os[0].held_units == 100).await;
    assert_eq!(now[0].state(), opb::OrderState::Reserved);
    let info = store.group_info(&stream, chipgate_contract::ORDERS_GROUP).await.unwrap();
    assert!(info.exists, "{info:?}");
    w.cluster.stop().await;
}
