//! Fault tests: a real redis-server with AOF (`appendfsync always`) and the three services as separate
//! processes on loopback, driven by concurrent clients (placing, cancelling, confirming and shipping
//! orders, receiving supply, publishing waves) while faults are injected:
//!
//! * kill -9 of each service at random moments (seeded; the seed is printed, `CHIPGATE_FAULT_SEED`
//!   replays it) and restart, and kill -9 of Redis and restart on the same port and data directory;
//! * a SIGSTOPped orders replica whose pending events the other replica takes over;
//! * Redis outages (paused, then down): calls fail fast with UNAVAILABLE within their deadline, health
//!   reports NOT_SERVING, and everything recovers by itself when Redis returns.
//!
//! Every call carries a deadline. A call that times out or answers UNAVAILABLE (or anything else that
//! is not a business answer) has an *unknown* outcome: after the faults it is retried with the same
//! request id until it resolves to exactly one outcome. Then the checker
//! ([`invariants::check_ledger`]) reads everything back and every invariant must hold.
//!
//! Why `appendfsync always`: the checker demands that every acknowledged write survives a Redis
//! crash. Killing the process alone would rarely lose `everysec` writes (they are in the page cache),
//! but not never (a postponed fsync can hold them back for up to 2 s), and a test that can fail for a
//! reason outside chipgate is not worth having. Production runs `everysec` (deploy/README.md) and
//! accepts losing about a second on a host crash.
//!
//! Needs the binaries: `cargo build --workspace --bins` first.

use crate::common;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chipgate_proto::inventory::v1 as ipb;
use chipgate_proto::licensing::v1 as lpb;
use chipgate_proto::orders::v1 as opb;
use chipgate_testkit::invariants::{self, Clients, Ledger};
use chipgate_testkit::procs::{self, ProcessCluster, ProcessOptions};
use common::{H200, NVL, rid};
use tonic_health::pb::health_check_response::ServingStatus;

/// Every call's deadline (sent as grpc-timeout, and enforced by the client too).
pub(crate) const DEADLINE: Duration = Duration::from_secs(4);
/// How long unknown outcomes may take to resolve once the faults stop.
pub(crate) const RESOLVE_WITHIN: Duration = Duration::from_secs(60);

// ------------------------------------------------------------------------------------------------
// Calls and their outcomes
// ------------------------------------------------------------------------------------------------

/// What one call came to.
pub(crate) enum Outcome<T> {
    /// Acknowledged.
    Done(T),
    /// A business answer: it will never succeed as sent.
    Refused(tonic::Status),
    /// Timed out, UNAVAILABLE, connection lost...: it may or may not have taken effect.
    Unknown(String),
}

pub(crate) fn with_deadline<T>(m: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.set_timeout(DEADLINE);
    r
}

pub(crate) async fn attempt<T>(call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>) -> Outcome<T> {
    use tonic::Code;
    match tokio::time::timeout(DEADLINE + Duration::from_millis(250), call).await {
        Ok(Ok(r)) => Outcome::Done(r.into_inner()),
        Ok(Err(s))
            if matches!(
                s.code(),
                Code::InvalidArgument
                    | Code::FailedPrecondition
                    | Code::NotFound
                    | Code::AlreadyExists
                    | Code::OutOfRange
                    | Code::PermissionDenied
            ) =>
        {
            Outcome::Refused(s)
        }
        // tonic's channel enforces the deadline the request carries and reports it as CANCELLED.
        Ok(Err(s)) if s.code() == Code::Cancelled && s.message() == "Timeout expired" => {
            Outcome::Unknown("client deadline".into())
        }
        Ok(Err(s)) => Outcome::Unknown(format!("{:?}", s.code())),
        Err(_) => Outcome::Unknown("client deadline".into()),
    }
}

/// A mutating call the ledger tracks; sent again unchanged (same request id) when its outcome is
/// unknown.
#[derive(Clone, Debug)]
pub(crate) enum Op {
    Place(opb::PlaceOrderRequest),
    Receive(ipb::ReceiveSupplyRequest),
    Cancel(opb::CancelOrderRequest),
    Confirm(opb::ConfirmOrderRequest),
    Ship(opb::ShipOrderRequest),
}

/// Clients of every service (one per orders replica).
#[derive(Clone)]
pub(crate) struct Conn {
    pub(crate) lic: chipgate_testkit::LicensingClient,
    pub(crate) inv: chipgate_testkit::InventoryClient,
    pub(crate) ord: Vec<chipgate_testkit::OrdersClient>,
}

impl Conn {
    pub(crate) fn of(c: &ProcessCluster) -> Self {
        Conn {
            lic: c.licensing_client(),
            inv: c.inventory_client(),
            ord: (0..c.orders.len()).map(|i| c.orders_client(i)).collect(),
        }
    }

    pub(crate) fn ord(&self, replica: usize) -> chipgate_testkit::OrdersClient {
        self.ord[replica % self.ord.len()].clone()
    }
}

impl Op {
    /// Sends it once; on success, the order it concerns.
    pub(crate) async fn send(&self, c: &Conn, replica: usize) -> Outcome<String> {
        let order_id = |o: Option<opb::Order>| o.map(|o| o.order_id).unwrap_or_default();
        let mut ord = c.ord(replica);
        match self.clone() {
            Op::Place(r) => match attempt(ord.place_order(with_deadline(r))).await {
                Outcome::Done(x) => Outcome::Done(order_id(x.order)),
                Outcome::Refused(s) => Outcome::Refused(s),
                Outcome::Unknown(u) => Outcome::Unknown(u),
            },
            Op::Cancel(r) => match attempt(ord.cancel_order(with_deadline(r))).await {
                Outcome::Done(x) => Outcome::Done(order_id(x.order)),
                Outcome::Refused(s) => Outcome::Refused(s),
                Outcome::Unknown(u) => Outcome::Unknown(u),
            },
            Op::Confirm(r) => match attempt(ord.confirm_order(with_deadline(r))).await {
                Outcome::Done(x) => Outcome::Done(order_id(x.order)),
                Outcome::Refused(s) => Outcome::Refused(s),
                Outcome::Unknown(u) => Outcome::Unknown(u),
            },
            Op::Ship(r) => match attempt(ord.ship_order(with_deadline(r))).await {
                Outcome::Done(x) => Outcome::Done(order_id(x.order)),
                Outcome::Refused(s) => Outcome::Refused(s),
                Outcome::Unknown(u) => Outcome::Unknown(u),
            },
            Op::Receive(r) => match attempt(c.inv.clone().receive_supply(with_deadline(r))).await {
                Outcome::Done(_) => Outcome::Done(String::new()),
                Outcome::Refused(s) => Outcome::Refused(s),
                Outcome::Unknown(u) => Outcome::Unknown(u),
            },
        }
    }
}

/// The run's figures.
#[derive(Debug, Default)]
pub(crate) struct Figures {
    pub(crate) attempted: u64,
    pub(crate) acknowledged: u64,
    pub(crate) refused: u64,
    /// Operations whose first attempt had an unknown outcome.
    pub(crate) unknown: u64,
    /// Of those, how many ended acknowledged / refused once retried.
    pub(crate) unknown_then_acknowledged: u64,
    pub(crate) unknown_then_refused: u64,
    /// Extra attempts spent resolving unknown outcomes.
    pub(crate) retries: u64,
    /// Why first attempts were unknown.
    pub(crate) unknown_codes: BTreeMap<String, u64>,
    /// Faults injected, by kind.
    pub(crate) faults: BTreeMap<String, u64>,
    /// Why retries were still unknown.
    pub(crate) retry_codes: BTreeMap<String, u64>,
    /// Reads (the actors' GetOrder and ListStock) that failed, by code: a fault may make them
    /// UNAVAILABLE, never INTERNAL.
    pub(crate) read_failures: BTreeMap<String, u64>,
    /// Stock samples taken during the run, and what was wrong with them.
    pub(crate) stock_samples: u64,
    pub(crate) stock_problems: Vec<String>,
}

/// What the clients know: the ledger of acknowledged operations, the ones still unknown, the figures.
#[derive(Default)]
pub(crate) struct Journal {
    pub(crate) ledger: Ledger,
    pub(crate) unknown: Vec<Op>,
    /// Orders placed (acknowledged), for the actors that act on orders.
    pub(crate) order_ids: Vec<String>,
    pub(crate) figures: Figures,
}

pub(crate) type Shared = Arc<Mutex<Journal>>;

impl Journal {
    /// Books a read that did not answer.
    pub(crate) fn read_failed<T>(&mut self, outcome: &Outcome<T>) {
        let code = match outcome {
            Outcome::Done(_) => return,
            Outcome::Refused(s) => format!("{:?}", s.code()),
            Outcome::Unknown(why) => why.clone(),
        };
        *self.figures.read_failures.entry(code).or_default() += 1;
    }

    pub(crate) fn settle(&mut self, op: &Op, outcome: &Outcome<String>, was_unknown: bool) {
        match outcome {
            Outcome::Done(order) => {
                self.figures.acknowledged += 1;
                if was_unknown {
                    self.figures.unknown_then_acknowledged += 1;
                }
                match op {
                    Op::Place(r) => {
                        self.ledger.placed.push(r.request_id.clone());
                        self.order_ids.push(order.clone());
                    }
                    Op::Receive(r) => self.ledger.received.push((r.product_sku.clone(), r.units)),
                    Op::Cancel(r) => self.ledger.cancelled.push(r.order_id.clone()),
                    Op::Confirm(r) => self.ledger.confirmed.push(r.order_id.clone()),
                    Op::Ship(r) => self.ledger.shipped.push(r.order_id.clone()),
                }
            }
            Outcome::Refused(_) => {
                self.figures.refused += 1;
                if was_unknown {
                    self.figures.unknown_then_refused += 1;
                }
            }
            Outcome::Unknown(why) => {
                self.figures.unknown += 1;
                *self.figures.unknown_codes.entry(why.clone()).or_default() += 1;
                self.unknown.push(op.clone());
            }
        }
    }
}

/// Sends `op` once and books the outcome (unknown ones wait for [`resolve`]).
pub(crate) async fn run_op(j: &Shared, c: &Conn, replica: usize, op: Op) -> Option<String> {
    j.lock().unwrap().figures.attempted += 1;
    let outcome = op.send(c, replica).await;
    let done = match &outcome {
        Outcome::Done(o) => Some(o.clone()),
        _ => None,
    };
    j.lock().unwrap().settle(&op, &outcome, false);
    done
}

/// Retries every unknown operation with its own request id until it has an outcome.
pub(crate) async fn resolve(j: &Shared, c: &Conn) {
    let ops = std::mem::take(&mut j.lock().unwrap().unknown);
    let deadline = Instant::now() + RESOLVE_WITHIN;
    for (i, op) in ops.into_iter().enumerate() {
        let mut tries = 0usize;
        loop {
            tries += 1;
            j.lock().unwrap().figures.retries += 1;
            // Any replica will do: idempotency lives in Redis.
            let outcome = op.send(c, i + tries).await;
            if let Outcome::Unknown(why) = &outcome {
                *j.lock().unwrap().figures.retry_codes.entry(why.clone()).or_default() += 1;
                assert!(
                    Instant::now() < deadline,
                    "{op:?} still has no outcome after {RESOLVE_WITHIN:?} ({tries} tries; the last: {why})"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            j.lock().unwrap().settle(&op, &outcome, true);
            break;
        }
    }
}

/// Calls `f` until it gives an answer that is not unknown (the same request each time), booking one
/// operation; None when refused.
pub(crate) async fn until_definite<T, F, Fut>(j: &Shared, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Outcome<T>>,
{
    j.lock().unwrap().figures.attempted += 1;
    let deadline = Instant::now() + RESOLVE_WITHIN;
    let mut first = true;
    loop {
        match f().await {
            Outcome::Done(t) => {
                let mut j = j.lock().unwrap();
                j.figures.acknowledged += 1;
                if !first {
                    j.figures.unknown_then_acknowledged += 1;
                }
                return Some(t);
            }
            Outcome::Refused(s) => {
                let mut j = j.lock().unwrap();
                j.figures.refused += 1;
                if !first {
                    j.figures.unknown_then_refused += 1;
                }
                eprintln!("refused: {s:?}");
                return None;
            }
            Outcome::Unknown(why) => {
                {
                    let mut j = j.lock().unwrap();
                    if first {
                        j.figures.unknown += 1;
                        *j.figures.unknown_codes.entry(why).or_default() += 1;
                    } else {
                        j.figures.retries += 1;
                        *j.figures.retry_codes.entry(why).or_default() += 1;
                    }
                }
                first = false;
                assert!(Instant::now() < deadline, "a call still has no outcome after {RESOLVE_WITHIN:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// The world and the actors
// ------------------------------------------------------------------------------------------------

pub(crate) const BUYERS: [&str; 6] = ["bytedance", "alibaba", "tencent", "baidu", "moonshot", "zhipu"];

/// Export authorisations for both products; an application per (buyer, product) for the first
/// `apply` buyers, of which the first `licensed` get their licence now. Returns the applications not
/// yet granted (for waves during the run).
pub(crate) async fn setup(j: &Shared, c: &Conn, apply: usize, licensed: usize) -> Vec<String> {
    let lic = c.lic.clone();
    for sku in [H200, NVL] {
        let r = lpb::GrantExportAuthorizationRequest {
            request_id: rid("exp"),
            vendor: "nvidia".into(),
            product_sku: sku.into(),
            destination: "CN".into(),
            reference: "BIS".into(),
        };
        until_definite(j, || {
            let (mut l, r) = (lic.clone(), r.clone());
            async move { attempt(l.grant_export_authorization(with_deadline(r))).await }
        })
        .await
        .unwrap();
    }
    let mut apps = Vec::new();
    for b in &BUYERS[..apply] {
        for sku in [H200, NVL] {
            let r = lpb::SubmitApplicationRequest {
                request_id: rid("app"),
                buyer_id: b.to_string(),
                product_sku: sku.into(),
                quantity: 3_000,
                end_use: "AI training".into(),
                site: "DC".into(),
                destination: "CN".into(),
            };
            let a = until_definite(j, || {
                let (mut l, r) = (lic.clone(), r.clone());
                async move { attempt(l.submit_application(with_deadline(r))).await }
            })
            .await
            .unwrap();
            apps.push(a.application.unwrap().application_id);
        }
    }
    let rest = apps.split_off(licensed * 2);
    if !apps.is_empty() {
        publish_wave(j, c, &apps).await;
    }
    rest
}

/// Creates, fills and publishes a wave granting each application its full quantity; returns the wave.
pub(crate) async fn publish_wave(j: &Shared, c: &Conn, apps: &[String]) -> String {
    let lic = c.lic.clone();
    let create = lpb::CreateWaveRequest { request_id: rid("wave"), display_name: "wave".into() };
    let wave = until_definite(j, || {
        let (mut l, r) = (lic.clone(), create.clone());
        async move { attempt(l.create_wave(with_deadline(r))).await }
    })
    .await
    .unwrap()
    .wave
    .unwrap()
    .wave_id;
    for app in apps {
        let grant = lpb::AddWaveGrantRequest {
            request_id: rid("grant"),
            wave_id: wave.clone(),
            application_id: app.clone(),
            granted_units: 3_000,
            conditions: None,
        };
        until_definite(j, || {
            let (mut l, r) = (lic.clone(), grant.clone());
            async move { attempt(l.add_wave_grant(with_deadline(r))).await }
        })
        .await
        .unwrap();
    }
    let publish = lpb::PublishWaveRequest { request_id: rid("pub"), wave_id: wave.clone() };
    until_definite(j, || {
        let (mut l, r) = (lic.clone(), publish.clone());
        async move { attempt(l.publish_wave(with_deadline(r))).await }
    })
    .await
    .unwrap();
    wave
}

/// The concurrent clients, until `stop`: placers, a buyer acting on its orders, a vendor, an import
/// authority publishing the remaining applications wave by wave, and a monitor sampling stock.
pub(crate) fn spawn_actors(
    j: &Shared,
    c: &Conn,
    seed: u64,
    stop: &Arc<AtomicBool>,
    mut waiting_apps: Vec<String>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for p in 0..3u64 {
        let (j, c, stop) = (j.clone(), c.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(seed ^ ((p + 1) * 0x9e37_79b9));
            for k in 0..200u64 {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let op = Op::Place(opb::PlaceOrderRequest {
                    request_id: rid(&format!("place-{p}-{k}")),
                    buyer_id: BUYERS[rng.usize(..BUYERS.len())].into(),
                    product_sku: if rng.bool() { H200 } else { NVL }.into(),
                    units: rng.u64(1..=9) * 10,
                    justification: "needed for training".into(),
                });
                run_op(&j, &c, (p + k) as usize, op).await;
                tokio::time::sleep(Duration::from_millis(rng.u64(10..60))).await;
            }
        }));
    }
    {
        // A buyer acting on its orders: confirm or cancel what is held, ship what is confirmed, now and
        // then give up on a waiting order.
        let (j, c, stop) = (j.clone(), c.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(seed ^ 0xb0b);
            while !stop.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(rng.u64(20..80))).await;
                let id = {
                    let j = j.lock().unwrap();
                    if j.order_ids.is_empty() {
                        continue;
                    }
                    j.order_ids[rng.usize(..j.order_ids.len())].clone()
                };
                let replica = rng.usize(..8);
                let mut ord = c.ord(replica);
                let got = attempt(ord.get_order(with_deadline(opb::GetOrderRequest { order_id: id.clone() }))).await;
                let o = match got {
                    Outcome::Done(o) => o,
                    failed => {
                        j.lock().unwrap().read_failed(&failed);
                        continue;
                    }
                };
                let state = o.order.map(|o| o.state()).unwrap_or_default();
                let roll = rng.u8(..100);
                let op = match state {
                    opb::OrderState::Reserved if roll < 70 => {
                        Op::Confirm(opb::ConfirmOrderRequest { request_id: rid("confirm"), order_id: id })
                    }
                    opb::OrderState::Reserved if roll < 90 => Op::Cancel(opb::CancelOrderRequest {
                        request_id: rid("cancel"),
                        order_id: id,
                        reason: "changed plans".into(),
                    }),
                    opb::OrderState::Confirmed if roll < 60 => {
                        Op::Ship(opb::ShipOrderRequest { request_id: rid("ship"), order_id: id })
                    }
                    opb::OrderState::Confirmed if roll < 70 => Op::Cancel(opb::CancelOrderRequest {
                        request_id: rid("cancel"),
                        order_id: id,
                        reason: "changed plans".into(),
                    }),
                    opb::OrderState::Backordered | opb::OrderState::AwaitingLicense if roll < 10 => {
                        Op::Cancel(opb::CancelOrderRequest {
                            request_id: rid("cancel"),
                            order_id: id,
                            reason: "no longer needed".into(),
                        })
                    }
                    _ => continue,
                };
                run_op(&j, &c, replica, op).await;
            }
        }));
    }
    {
        let (j, c, stop) = (j.clone(), c.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(seed ^ 0x5eed);
            let mut k = 0;
            while !stop.load(Ordering::SeqCst) {
                k += 1;
                let op = Op::Receive(ipb::ReceiveSupplyRequest {
                    request_id: rid("rcv"),
                    receipt_id: rid(&format!("rcpt-{k}")),
                    product_sku: if rng.bool() { H200 } else { NVL }.into(),
                    units: rng.u64(10..=30) * 10,
                    source: "air freight".into(),
                });
                run_op(&j, &c, 0, op).await;
                tokio::time::sleep(Duration::from_millis(rng.u64(200..500))).await;
            }
        }));
    }
    {
        let (j, c, stop) = (j.clone(), c.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) && !waiting_apps.is_empty() {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                let take = waiting_apps.len().min(2);
                let apps: Vec<String> = waiting_apps.drain(..take).collect();
                publish_wave(&j, &c, &apps).await;
            }
        }));
    }
    {
        // Stock must add up, and no figure may ever have gone below zero (a u64 that wrapped shows as
        // more than was ever received), at every moment sampled, not only at the end.
        let (j, c, stop) = (j.clone(), c.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut inv = c.inv.clone();
            while !stop.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(150)).await;
                let r = match attempt(inv.list_stock(with_deadline(ipb::ListStockRequest {}))).await {
                    Outcome::Done(r) => r,
                    failed => {
                        j.lock().unwrap().read_failed(&failed);
                        continue;
                    }
                };
                let mut j = j.lock().unwrap();
                j.figures.stock_samples += 1;
                for s in r.stock {
                    if let Some(p) = stock_problem(&s) {
                        j.figures.stock_problems.push(p);
                    }
                }
            }
        }));
    }
    tasks
}

/// What is wrong with a stock reading, if anything.
fn stock_problem(s: &ipb::Stock) -> Option<String> {
    let parts = [s.available, s.held, s.committed, s.shipped];
    let sum = parts.iter().try_fold(0u64, |a, b| a.checked_add(*b));
    if parts.iter().any(|p| *p > s.received) {
        return Some(format!("stock of {} went below zero: {s:?}", s.product_sku));
    }
    if sum != Some(s.received)
        || Some(s.on_hand) != s.available.checked_add(s.held).and_then(|x| x.checked_add(s.committed))
    {
        return Some(format!("stock of {} does not add up: {s:?}", s.product_sku));
    }
    None
}

pub(crate) fn seed() -> u64 {
    std::env::var("CHIPGATE_FAULT_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| fastrand::u64(..))
}

/// Heals the cluster, resolves every unknown outcome, waits until it is settled, runs the checker and
/// prints the figures (with `extra` lines of the test's own, e.g. its failover timings, at the end);
/// returns the number of violations.
pub(crate) async fn finish(
    name: &str,
    seed: u64,
    cluster: &mut ProcessCluster,
    j: &Shared,
    c: &Conn,
    began: Instant,
    extra: &str,
) -> usize {
    cluster.heal().await;
    resolve(j, c).await;
    let mut clients: Clients = cluster.clients(0);
    let settled = invariants::wait_settled(&cluster.store, &mut clients.orders, Duration::from_secs(60)).await;
    let ledger = j.lock().unwrap().ledger.clone();
    let report = invariants::check_ledger(&mut clients, &cluster.store, &ledger).await;
    let mut violations = report.violations;
    if !settled {
        violations.push("the cluster did not settle within 60 s".into());
    }
    let j = j.lock().unwrap();
    violations.extend(j.figures.stock_problems.iter().cloned());
    let f = &j.figures;
    let faults: u64 = f.faults.values().sum();
    let figures = format!(
        "=== faults/{name}: seed {seed} (CHIPGATE_FAULT_SEED={seed} replays it), {:.1} s ===\n\
         operations attempted   {}\n\
         acknowledged           {}\n\
         refused                {}\n\
         unknown at first       {}  (then acknowledged {}, refused {}; {} retries; why: {:?}; retries unknown: {:?})\n\
         reads that failed      {:?}\n\
         faults injected        {faults}  {:?}\n\
         orders {}, licences {}, placements acknowledged {}, receipts {}, cancels {}, confirms {}, ships {}\n\
         stock samples          {}\n\
         invariant violations   {}\n{extra}",
        began.elapsed().as_secs_f64(),
        f.attempted,
        f.acknowledged,
        f.refused,
        f.unknown,
        f.unknown_then_acknowledged,
        f.unknown_then_refused,
        f.retries,
        f.unknown_codes,
        f.retry_codes,
        f.read_failures,
        f.faults,
        report.orders,
        report.licences,
        ledger.placed.len(),
        ledger.received.len(),
        ledger.cancelled.len(),
        ledger.confirmed.len(),
        ledger.shipped.len(),
        f.stock_samples,
        violations.len(),
    );
    eprintln!("\n{figures}");
    // Also kept where CI prints them from (test output is captured unless --nocapture).
    let _ = std::fs::write(format!("{}/faults-{name}.txt", env!("CARGO_TARGET_TMPDIR")), &figures);
    for v in violations.iter().take(30) {
        eprintln!("  VIOLATION: {v}");
    }
    assert_eq!(f.unknown, f.unknown_then_acknowledged + f.unknown_then_refused, "every unknown outcome resolved");
    assert_eq!(f.attempted, f.acknowledged + f.refused, "every operation has exactly one outcome");
    // A fault is never the caller's problem to diagnose: transient failures must say UNAVAILABLE (retry),
    // not INTERNAL.
    assert!(
        !f.unknown_codes.contains_key("Internal"),
        "a service answered INTERNAL to a transient fault: {:?}",
        f.unknown_codes
    );
    assert!(!f.retry_codes.contains_key("Internal"), "a service answered a retry INTERNAL: {:?}", f.retry_codes);
    assert!(
        !f.read_failures.contains_key("Internal"),
        "a service answered a read INTERNAL during a fault: {:?}",
        f.read_failures
    );
    violations.len()
}

pub(crate) fn fault(j: &Shared, kind: &str) {
    *j.lock().unwrap().figures.faults.entry(kind.to_string()).or_default() += 1;
}

// ------------------------------------------------------------------------------------------------
// The tests
// ------------------------------------------------------------------------------------------------

pub(crate) fn orders_env() -> Vec<(String, String)> {
    vec![
        ("CHIPGATE_CLAIM_IDLE".into(), "1s".into()),
        ("CHIPGATE_LEASE_TTL".into(), "2s".into()),
        ("CHIPGATE_BATCH_SIZE".into(), "50".into()),
        // The takeover of a stalled replica's events is logged at info.
        ("RUST_LOG".into(), "warn,chipgate_orders::consumer=info".into()),
    ]
}

/// kill -9 of every service and of Redis at random moments under load, each started again where it
/// was (Redis on the same port and AOF data directory): nothing acknowledged is lost, nothing happens
/// twice, nothing is oversold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_services_and_redis_loses_nothing() {
    let seed = seed();
    eprintln!("faults/kill-9: seed {seed}");
    let began = Instant::now();
    let mut cluster =
        ProcessCluster::start(ProcessOptions { orders_replicas: 2, orders_env: orders_env(), ..Default::default() })
            .await;
    let c = Conn::of(&cluster);
    let j: Shared = Arc::default();
    let waiting = setup(&j, &c, 5, 3).await;
    let stop = Arc::new(AtomicBool::new(false));
    let actors = spawn_actors(&j, &c, seed, &stop, waiting);

    // Each target twice, in a seeded order, at seeded moments.
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut plan = vec!["licensing", "inventory", "orders-0", "orders-1", "redis"];
    plan.extend(plan.clone());
    rng.shuffle(&mut plan);
    for target in plan {
        tokio::time::sleep(Duration::from_millis(rng.u64(300..1300))).await;
        let down = Duration::from_millis(rng.u64(0..800));
        eprintln!("faults/kill-9: kill -9 {target}, down {down:?}");
        match target {
            "redis" => {
                cluster.redis.kill();
                tokio::time::sleep(down).await;
                tokio::task::block_in_place(|| cluster.redis.restart());
            }
            name => {
                let p = match name {
                    "licensing" => &mut cluster.licensing,
                    "inventory" => &mut cluster.inventory,
                    "orders-0" => &mut cluster.orders[0],
                    _ => &mut cluster.orders[1],
                };
                p.kill();
                tokio::time::sleep(down).await;
                p.spawn();
            }
        }
        fault(&j, &format!("kill -9 {target}"));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    for a in actors {
        a.await.unwrap();
    }
    let violations = finish("kill-9", seed, &mut cluster, &j, &c, began, "").await;
    assert_eq!(violations, 0, "invariant violations (seed {seed}); logs in {}", cluster.log_dir().display());
}

/// The consumers of the pending entries of the orders group on `stream`, with how many each holds.
async fn pending_by_consumer(redis: &chipgate_state::testing::RedisDeployment, stream: &str) -> Vec<(String, u64)> {
    let mut conn = redis.connection().await.unwrap();
    // Summary form: [count, smallest id, greatest id, [[consumer, count], ...]].
    type Summary = (u64, Option<String>, Option<String>, Option<Vec<(String, u64)>>);
    let summary: Summary = redis::cmd("XPENDING").arg(stream).arg("orders").query_async(&mut conn).await.unwrap();
    summary.3.unwrap_or_default()
}

/// One orders replica is paused (SIGSTOP) while it holds events it has read but not applied; the other
/// replica takes them over (and the paused one's product leases once they expire) and propagation
/// finishes while the first is still paused. When it wakes up, its stale work is fenced off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_orders_replica_is_taken_over() {
    let seed = seed();
    eprintln!("faults/pause: seed {seed}");
    let began = Instant::now();
    let mut cluster =
        ProcessCluster::start(ProcessOptions { orders_replicas: 2, orders_env: orders_env(), ..Default::default() })
            .await;
    let c = Conn::of(&cluster);
    let j: Shared = Arc::default();
    // Six buyers apply; none is licensed yet. Their orders wait for a licence.
    let apps = setup(&j, &c, 6, 0).await;
    for (k, b) in BUYERS.iter().enumerate() {
        for n in 0..15u64 {
            let op = Op::Place(opb::PlaceOrderRequest {
                request_id: rid(&format!("early-{b}-{n}")),
                buyer_id: b.to_string(),
                product_sku: if n % 3 == 0 { NVL } else { H200 }.into(),
                units: 10 + (n % 5) * 10,
                justification: "needed".into(),
            });
            run_op(&j, &c, k, op).await;
        }
    }
    let op = Op::Receive(ipb::ReceiveSupplyRequest {
        request_id: rid("rcv"),
        receipt_id: rid("rcpt"),
        product_sku: H200.into(),
        units: 2_000,
        source: "sea".into(),
    });
    run_op(&j, &c, 0, op).await;
    let stop = Arc::new(AtomicBool::new(false));
    let actors = spawn_actors(&j, &c, seed, &stop, Vec::new());
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Pause replica 0 and publish waves one buyer at a time: Redis hands each new event to the replica
    // that has waited longest in XREADGROUP, so the paused one takes one of the first two and holds
    // it, unacknowledged, while it sleeps.
    let pid = cluster.orders[0].pid().unwrap();
    let prefix = format!("orders-{pid}-");
    let mut held: Option<(u64, Vec<String>)> = None;
    let mut granted = Vec::new();
    let mut paused_at = Instant::now();
    for (round, pair) in apps.chunks(2).enumerate() {
        cluster.orders[0].pause();
        paused_at = Instant::now();
        fault(&j, "SIGSTOP orders-0");
        tokio::time::sleep(Duration::from_millis(100)).await;
        publish_wave(&j, &c, pair).await;
        granted.push(BUYERS[round]);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mine: u64 = pending_by_consumer(&cluster.redis, "{lic}:events")
            .await
            .into_iter()
            .filter(|(name, _)| name.starts_with(&prefix))
            .map(|(_, n)| n)
            .sum();
        eprintln!("faults/pause: round {round}: the paused replica holds {mine} licensing events");
        if mine > 0 {
            held = Some((mine, granted.iter().map(|b| b.to_string()).collect()));
            break;
        }
        cluster.orders[0].resume();
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    let (mine, buyers) = held.expect("the paused replica never held an event: the takeover was not exercised");

    // While it stays paused: the other replica claims what it held and the wave reaches every order of
    // the buyers granted so far.
    let mut ord = c.ord(1);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let still_held: u64 = pending_by_consumer(&cluster.redis, "{lic}:events")
            .await
            .into_iter()
            .filter(|(name, _)| name.starts_with(&prefix))
            .map(|(_, n)| n)
            .sum();
        let orders = invariants::all_orders(&mut ord).await;
        let waiting = orders
            .iter()
            .filter(|o| buyers.contains(&o.buyer_id) && o.request_id.contains("early-"))
            .filter(|o| o.state() == opb::OrderState::AwaitingLicense)
            .count();
        if still_held == 0 && waiting == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "while replica 0 was paused, {still_held} events stayed with it and {waiting} orders of {buyers:?} still wait for a licence"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(cluster.orders[0].is_paused(), "the takeover happened while replica 0 was paused");
    let took_over = cluster.log_lines_containing("took over events a stalled replica left pending");
    eprintln!(
        "faults/pause: replica 1 took over {mine} events while replica 0 was paused ({took_over} takeover log lines)"
    );
    assert!(took_over > 0, "no replica logged a takeover");

    // Keep it paused past the callers' deadline (calls to it become unknown outcomes) and past its
    // product leases, then wake it up in the middle of the load: whatever it was doing is stale now.
    tokio::time::sleep((DEADLINE + Duration::from_secs(2)).saturating_sub(paused_at.elapsed())).await;
    eprintln!("faults/pause: replica 0 resumes after {:?}", paused_at.elapsed());
    cluster.orders[0].resume();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::SeqCst);
    for a in actors {
        a.await.unwrap();
    }
    let violations = finish("pause", seed, &mut cluster, &j, &c, began, "").await;
    assert_eq!(violations, 0, "invariant violations (seed {seed}); logs in {}", cluster.log_dir().display());
}

/// While Redis is out (first paused: connections hang; then down: connections refused), every service
/// fails calls fast with UNAVAILABLE, within their deadline, and reports NOT_SERVING; when Redis is
/// back, everything recovers by itself and the calls that failed resolve on retry to exactly one
/// outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_fails_fast_and_recovers() {
    let seed = seed();
    eprintln!("faults/outage: seed {seed}");
    let began = Instant::now();
    let mut cluster =
        ProcessCluster::start(ProcessOptions { orders_replicas: 1, orders_env: orders_env(), ..Default::default() })
            .await;
    let c = Conn::of(&cluster);
    let j: Shared = Arc::default();
    let waiting = setup(&j, &c, 5, 3).await;
    let stop = Arc::new(AtomicBool::new(false));
    let actors = spawn_actors(&j, &c, seed, &stop, waiting);
    tokio::time::sleep(Duration::from_secs(2)).await;

    for (kind, probe_sku) in [("paused", NVL), ("down", H200)] {
        let out_at = Instant::now();
        match kind {
            "paused" => cluster.redis.pids().into_iter().for_each(|pid| procs::signal(pid, "STOP")),
            _ => cluster.redis.kill(),
        }
        fault(&j, &format!("redis {kind}"));
        // Health tells the truth on every service, within two probe intervals.
        let watchers: Vec<_> = [&cluster.licensing, &cluster.inventory, &cluster.orders[0]]
            .into_iter()
            .map(|p| {
                let (url, name) = (p.url(), p.name());
                tokio::spawn(async move {
                    loop {
                        if procs::health(&url).await == Some(ServingStatus::NotServing) {
                            return (name, out_at.elapsed());
                        }
                        assert!(
                            out_at.elapsed() < Duration::from_secs(10),
                            "{name} still SERVING while Redis is {kind}"
                        );
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                })
            })
            .collect();

        // Calls to each service fail fast: UNAVAILABLE, well within their deadline.
        let probes = [
            Op::Place(opb::PlaceOrderRequest {
                request_id: rid("probe-place"),
                buyer_id: BUYERS[0].into(),
                product_sku: H200.into(),
                units: 10,
                justification: "needed".into(),
            }),
            Op::Receive(ipb::ReceiveSupplyRequest {
                request_id: rid("probe-rcv"),
                receipt_id: rid("probe-rcpt"),
                product_sku: NVL.into(),
                units: 100,
                source: "air".into(),
            }),
        ];
        for op in probes {
            let t = Instant::now();
            j.lock().unwrap().figures.attempted += 1;
            let outcome = op.send(&c, 0).await;
            let took = t.elapsed();
            match &outcome {
                Outcome::Unknown(code) => {
                    assert_eq!(code, "Unavailable", "{op:?} during a Redis outage ({kind})");
                }
                _ => panic!("{op:?} succeeded or was refused while Redis was {kind}"),
            }
            assert!(took < DEADLINE, "{op:?} took {took:?}: it hung instead of failing fast");
            let what = match &op {
                Op::Place(_) => "orders PlaceOrder",
                _ => "inventory ReceiveSupply",
            };
            eprintln!("faults/outage: Redis {kind}: {what} failed with UNAVAILABLE in {took:?}");
            j.lock().unwrap().settle(&op, &outcome, false);
        }
        let t = Instant::now();
        let submit = lpb::SubmitApplicationRequest {
            request_id: rid("probe-app"),
            buyer_id: "zhipu".into(),
            product_sku: probe_sku.into(),
            quantity: 10,
            end_use: "AI training".into(),
            site: "DC".into(),
            destination: "CN".into(),
        };
        let got = attempt(c.lic.clone().submit_application(with_deadline(submit.clone()))).await;
        let seen = match &got {
            Outcome::Done(_) => "acknowledged".to_string(),
            Outcome::Refused(s) => format!("refused: {s:?}"),
            Outcome::Unknown(code) => code.clone(),
        };
        assert!(matches!(&got, Outcome::Unknown(code) if code == "Unavailable"), "licensing during the outage: {seen}");
        assert!(t.elapsed() < DEADLINE, "licensing hung for {:?}", t.elapsed());
        eprintln!(
            "faults/outage: Redis {kind}: licensing SubmitApplication failed with UNAVAILABLE in {:?}",
            t.elapsed()
        );

        for w in watchers {
            let (name, took) = w.await.unwrap();
            eprintln!("faults/outage: {name} NOT_SERVING {took:?} after Redis went {kind}");
            // One probe interval (1 s) plus the probe's own timeout (1 s), and some slack for a busy machine.
            assert!(took < Duration::from_secs(4), "{name} took {took:?} to report NOT_SERVING");
        }
        tokio::time::sleep(Duration::from_millis(3000).saturating_sub(out_at.elapsed())).await;

        // Redis returns; everything recovers by itself.
        let back_at = Instant::now();
        match kind {
            "paused" => cluster.redis.pids().into_iter().for_each(|pid| procs::signal(pid, "CONT")),
            _ => tokio::task::block_in_place(|| cluster.redis.restart()),
        }
        for p in [&cluster.licensing, &cluster.inventory, &cluster.orders[0]] {
            p.wait_serving(Duration::from_secs(15)).await;
        }
        eprintln!("faults/outage: every service SERVING {:?} after Redis came back", back_at.elapsed());
        // The application submitted during the outage resolves to exactly one application.
        let app = until_definite(&j, || {
            let (mut l, r) = (c.lic.clone(), submit.clone());
            async move { attempt(l.submit_application(with_deadline(r))).await }
        })
        .await
        .unwrap()
        .application
        .unwrap();
        let again = until_definite(&j, || {
            let (mut l, r) = (c.lic.clone(), submit.clone());
            async move { attempt(l.submit_application(with_deadline(r))).await }
        })
        .await
        .unwrap()
        .application
        .unwrap();
        assert_eq!(app.application_id, again.application_id, "a retried submission is the same application");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for a in actors {
        a.await.unwrap();
    }
    let violations = finish("outage", seed, &mut cluster, &j, &c, began, "").await;
    assert_eq!(violations, 0, "invariant violations (seed {seed}); logs in {}", cluster.log_dir().display());
}

/// The checker is only worth something if it fails on a broken state. Starting from a clean, settled
/// cluster it reports nothing; then each kind of damage a fault could do is made by hand — a receipt
/// acknowledged but not booked, an order nobody acknowledged, an event stuck with a dead consumer, a
/// step applied twice in an order's history, a forged audit entry, stock that went below zero — and
/// each must be reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fault_checker_catches_lost_doubled_and_stuck_effects() {
    use chipgate_state::{Backend, Txn};
    use chipgate_testkit::{Cluster, ClusterOptions, OrdersProcess};

    let cluster = Cluster::start_with(ClusterOptions { orders_in_process: false, ..ClusterOptions::default() }).await;
    // Claims only after 5 minutes: an entry left pending stays pending for the whole test.
    let env = [("CHIPGATE_CLAIM_IDLE", "300s")];
    let mut first = OrdersProcess::start(&cluster, &env).await;
    let j: Shared = Arc::default();
    let mut c = Conn { lic: cluster.licensing_client(), inv: cluster.inventory_client(), ord: vec![first.client()] };
    let rest = setup(&j, &c, 1, 1).await;
    assert!(rest.is_empty());
    run_op(
        &j,
        &c,
        0,
        Op::Receive(ipb::ReceiveSupplyRequest {
            request_id: rid("rcv"),
            receipt_id: rid("rcpt"),
            product_sku: H200.into(),
            units: 100,
            source: "air".into(),
        }),
    )
    .await
    .unwrap();
    for units in [60, 70] {
        let op = Op::Place(opb::PlaceOrderRequest {
            request_id: rid("place"),
            buyer_id: BUYERS[0].into(),
            product_sku: H200.into(),
            units,
            justification: "needed".into(),
        });
        run_op(&j, &c, 0, op).await.unwrap();
    }
    let mut clients = Clients { licensing: c.lic.clone(), inventory: c.inv.clone(), orders: first.client() };
    assert!(invariants::wait_settled(&cluster.store, &mut clients.orders, Duration::from_secs(30)).await);
    let ledger = j.lock().unwrap().ledger.clone();
    let clean = invariants::check_ledger(&mut clients, &cluster.store, &ledger).await;
    assert!(clean.violations.is_empty(), "{:#?}", clean.violations);

    // An event delivered to a consumer that died before acknowledging it, and nobody claims it.
    first.kill();
    let mut conn = cluster.redis.as_ref().unwrap().connection().await.unwrap();
    let stream = chipgate_contract::streams::inventory(&chipgate_domain::ids::Sku::from_trusted(H200));
    let _: String = redis::cmd("XADD").arg(&stream).arg("*").arg("e").arg("").query_async(&mut conn).await.unwrap();
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("orders")
        .arg("ghost")
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();
    let second = OrdersProcess::start(&cluster, &env).await;
    c.ord = vec![second.client()];
    clients.orders = second.client();

    // A step of an order applied twice.
    let first_order = j.lock().unwrap().order_ids[0].clone();
    let key = chipgate_orders::keys::order(&chipgate_domain::ids::OrderId::from_trusted(first_order.as_str()));
    let store = &cluster.store;
    let rec = store.get(std::slice::from_ref(&key)).await.unwrap().remove(0).unwrap();
    let mut o = chipgate_domain::orders::OrderRecord::from_stored(rec.data.as_slice()).unwrap();
    let last = o.history.last().unwrap().clone();
    o.history.push(last);
    let mut t = Txn::new();
    t.replace(key, rec.version, o.to_stored());
    store.commit(&t).await.unwrap();

    // A forged audit entry at the end of the chain.
    let _: String = redis::cmd("XADD")
        .arg("{lic}:audit")
        .arg("*")
        .arg("seq")
        .arg("999")
        .arg("prev")
        .arg("00")
        .arg("hash")
        .arg("00")
        .arg("entry")
        .arg("forged")
        .query_async(&mut conn)
        .await
        .unwrap();

    // The ledger: a receipt the client saw acknowledged that was never booked, and a placement the
    // client never saw acknowledged.
    let mut ledger = ledger;
    ledger.received.push((H200.to_string(), 50));
    let forgotten = ledger.placed.pop().unwrap();

    let report = invariants::check_ledger(&mut clients, store, &ledger).await;
    let v = report.violations.join("\n");
    eprintln!("the checker reports:\n{v}");
    assert!(
        v.contains(&format!("stock of {H200}: 100 units received, but the acknowledged receipts add up to 150")),
        "{v}"
    );
    assert!(v.contains("which was never acknowledged") && v.contains(&forgotten), "{v}");
    assert!(v.contains(&format!("{stream}: 1 events still pending with a consumer")), "{v}");
    assert!(v.contains(&format!("order {first_order}: step")), "{v}");
    assert!(v.contains("audit log does not verify"), "{v}");

    // Stock sampled during a run: a figure that went below zero wraps around and is caught.
    let s = ipb::Stock {
        product_sku: H200.into(),
        on_hand: 100,
        available: u64::MAX - 9,
        held: 110,
        received: 100,
        ..Default::default()
    };
    assert!(stock_problem(&s).unwrap().contains("went below zero"));
    let ok = ipb::Stock {
        product_sku: H200.into(),
        on_hand: 100,
        available: 40,
        held: 60,
        received: 100,
        ..Default::default()
    };
    assert!(stock_problem(&ok).is_none());
}
