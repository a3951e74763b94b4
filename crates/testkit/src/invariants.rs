//! The invariant checker: reads everything back through the public APIs and reports every way the
//! cluster's state is inconsistent. The concurrency tests and the fault suite run it after their
//! workloads; a healthy cluster reports nothing.
//!
//! What it checks:
//! * licence quota in use equals the units of the orders holding it (and confirmed quota, of the
//!   confirmed and shipped ones), and never exceeds the grant;
//! * every product's stock adds up, and held / committed / shipped stock equals what the orders hold;
//! * every order holding quota has a matching quota reservation (same generation and units);
//! * every acknowledged request placed exactly one order;
//! * no order took stock while an earlier order of the same product waited unserved in the backlog —
//!   under FIFO; once a product's allocation policy shares stock (pro rata, or a per-buyer cap),
//!   buyers may pass each other, but no order may pass an earlier one of its own buyer;
//! * the units each buyer holds of each product, as the allocation policies count them, are what its
//!   orders hold;
//! * the audit log verifies.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use chipgate_contract::Sku;
use chipgate_orders::keys as okeys;
use chipgate_proto::inventory::v1 as ipb;
use chipgate_proto::licensing::v1 as lpb;
use chipgate_proto::orders::v1 as opb;
use chipgate_proto::orders::v1::OrderState;
use chipgate_state::{Backend, Store};

/// Clients of the three services.
#[derive(Clone)]
pub struct Clients {
    /// Licensing.
    pub licensing: crate::LicensingClient,
    /// Inventory.
    pub inventory: crate::InventoryClient,
    /// Orders.
    pub orders: crate::OrdersClient,
}

/// What the checker found.
#[derive(Debug, Default)]
pub struct Report {
    /// Orders read.
    pub orders: usize,
    /// Licences read.
    pub licences: usize,
    /// Every violation, in words.
    pub violations: Vec<String>,
}

fn ms(t: Option<&prost_types::Timestamp>) -> u64 {
    t.map(|t| (t.seconds.max(0) as u64) * 1000 + (t.nanos.max(0) as u64) / 1_000_000).unwrap_or(0)
}

/// Every order, oldest first.
///
/// # Panics
/// When the orders service does not answer.
pub async fn all_orders(c: &mut crate::OrdersClient) -> Vec<opb::Order> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let r = c
            // 200 a page: a page of 1,000 orders with long histories outgrows a client's 4 MB message
            // limit (seen in the model checker's soak: 4.6 MB).
            .list_orders(opb::ListOrdersRequest { page_size: 200, page_token: token, ..Default::default() })
            .await
            .expect("ListOrders")
            .into_inner();
        out.extend(r.orders);
        if r.next_page_token.is_empty() {
            return out;
        }
        token = r.next_page_token;
    }
}

async fn all_licences(c: &mut crate::LicensingClient) -> Vec<lpb::License> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let r = c
            .list_licenses(lpb::ListLicensesRequest { page_size: 1000, page_token: token, ..Default::default() })
            .await
            .expect("ListLicenses")
            .into_inner();
        out.extend(r.licenses);
        if r.next_page_token.is_empty() {
            return out;
        }
        token = r.next_page_token;
    }
}

/// Waits until the orders service has nothing left to do: no dirty marks, no owed releases, and the
/// orders unchanged between two reads. Returns false if that didn't happen within `within`.
///
/// # Panics
/// When the store or the orders service does not answer.
pub async fn wait_quiet(store: &Store, orders: &mut crate::OrdersClient, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut last: Option<Vec<(String, i32, u64, usize)>> = None;
    while Instant::now() < deadline {
        let products: Vec<Sku> =
            store.smembers(&okeys::products()).await.expect("products").into_iter().map(Sku::from_trusted).collect();
        let mut busy = false;
        for p in &products {
            busy |= !store.smembers(&okeys::cleanup(p)).await.expect("cleanup").is_empty();
            busy |= !store.hgetall(&okeys::dirty(p)).await.expect("dirty").is_empty();
        }
        let now: Vec<(String, i32, u64, usize)> = all_orders(orders)
            .await
            .into_iter()
            .map(|o| (o.order_id, o.state, o.held_units, o.history.len()))
            .collect();
        if !busy && last.as_ref() == Some(&now) {
            return true;
        }
        last = Some(now);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    false
}

/// Checks every invariant. `acknowledged` are the request ids of PlaceOrder calls that answered OK
/// (each must have placed exactly one order); pass an empty slice to skip that check.
///
/// # Panics
/// When a service does not answer.
pub async fn check(c: &mut Clients, acknowledged: &[String]) -> Report {
    let mut report = Report::default();
    let v = &mut report.violations;
    let orders = all_orders(&mut c.orders).await;
    let licences = all_licences(&mut c.licensing).await;
    report.orders = orders.len();
    report.licences = licences.len();
    let holds_quota = |s: OrderState| {
        matches!(s, OrderState::Backordered | OrderState::Reserved | OrderState::Confirmed | OrderState::Shipped)
    };

    // Quota.
    let mut used: HashMap<&str, u64> = HashMap::new();
    let mut confirmed: HashMap<&str, u64> = HashMap::new();
    for o in &orders {
        if holds_quota(o.state()) {
            *used.entry(o.license_id.as_str()).or_default() += o.units;
            if matches!(o.state(), OrderState::Confirmed | OrderState::Shipped) {
                *confirmed.entry(o.license_id.as_str()).or_default() += o.units;
            }
        }
    }
    for l in &licences {
        let u = used.get(l.license_id.as_str()).copied().unwrap_or(0);
        let cf = confirmed.get(l.license_id.as_str()).copied().unwrap_or(0);
        if l.used_units != u {
            v.push(format!("licence {}: {} units in use, but its orders hold {u}", l.license_id, l.used_units));
        }
        if l.confirmed_units != cf {
            v.push(format!(
                "licence {}: {} units confirmed, but its confirmed orders hold {cf}",
                l.license_id, l.confirmed_units
            ));
        }
        if l.used_units > l.granted_units {
            v.push(format!(
                "licence {}: over-licensed, {} used of {} granted",
                l.license_id, l.used_units, l.granted_units
            ));
        }
    }
    for id in used.keys() {
        if !licences.iter().any(|l| l.license_id == *id) {
            v.push(format!("orders hold quota of unknown licence {id:?}"));
        }
    }

    // Quota reservations match the orders holding quota.
    for o in orders.iter().filter(|o| holds_quota(o.state())) {
        let ask = lpb::GetQuotaReservationRequest { order_id: o.order_id.clone(), product_sku: o.product_sku.clone() };
        match c.licensing.get_quota_reservation(ask).await {
            Ok(r) => {
                let r = r.into_inner().reservation.unwrap_or_default();
                let held = matches!(r.state(), lpb::ReservationState::Held | lpb::ReservationState::Confirmed);
                if r.generation != o.generation || r.units != o.units || !held || r.license_id != o.license_id {
                    v.push(format!(
                        "order {} ({:?}, generation {}, {} units, {}) has quota reservation generation {} {:?} {} units of {}",
                        o.order_id,
                        o.state(),
                        o.generation,
                        o.units,
                        o.license_id,
                        r.generation,
                        r.state(),
                        r.units,
                        r.license_id
                    ));
                }
            }
            Err(e) => v.push(format!("order {} holds quota but has no reservation: {}", o.order_id, e.message())),
        }
    }

    // Stock.
    let stock = c.inventory.list_stock(ipb::ListStockRequest {}).await.expect("ListStock").into_inner().stock;
    let mut want: HashMap<&str, (u64, u64, u64)> = HashMap::new();
    for o in &orders {
        let e = want.entry(o.product_sku.as_str()).or_default();
        match o.state() {
            OrderState::Backordered | OrderState::Reserved => e.0 += o.held_units,
            OrderState::Confirmed => e.1 += o.held_units,
            OrderState::Shipped => e.2 += o.held_units,
            _ => {}
        }
    }
    for s in &stock {
        if s.received != s.available + s.held + s.committed + s.shipped
            || s.on_hand != s.available + s.held + s.committed
        {
            v.push(format!("stock of {} does not add up: {s:?}", s.product_sku));
        }
        let (h, cm, sh) = want.get(s.product_sku.as_str()).copied().unwrap_or_default();
        if (s.held, s.committed, s.shipped) != (h, cm, sh) {
            v.push(format!(
                "stock of {}: held/committed/shipped {}/{}/{}, but orders hold {h}/{cm}/{sh}",
                s.product_sku, s.held, s.committed, s.shipped
            ));
        }
    }

    // Exactly once.
    let mut by_request: HashMap<&str, usize> = HashMap::new();
    for o in &orders {
        *by_request.entry(o.request_id.as_str()).or_default() += 1;
    }
    for r in acknowledged {
        match by_request.get(r.as_str()) {
            Some(1) => {}
            Some(n) => v.push(format!("request {r} placed {n} orders")),
            None => v.push(format!("acknowledged request {r} placed no order")),
        }
    }

    // Backlog order: nobody got stock while an earlier order of the product waited unserved (under
    // FIFO), or an earlier order of the same buyer (once the product's policy shares stock).
    let mut by_product: BTreeMap<&str, Vec<&opb::Order>> = BTreeMap::new();
    for o in &orders {
        by_product.entry(o.product_sku.as_str()).or_default().push(o);
    }
    for (sku, mut os) in by_product {
        let policy = c
            .orders
            .get_allocation_policy(opb::GetAllocationPolicyRequest { product_sku: sku.to_string() })
            .await
            .expect("GetAllocationPolicy")
            .into_inner();
        // Since when stock may have been shared (a drain that read the policy just before a change to
        // FIFO may still share after it, so sharing counts from the first such policy on).
        let shared_since = policy
            .changes
            .iter()
            .filter(|ch| {
                let p = ch.policy.clone().unwrap_or_default();
                p.strategy() == opb::AllocationStrategy::ProRata || (1..100).contains(&p.max_share_percent)
            })
            .map(|ch| ms(ch.change_time.as_ref()))
            .min()
            .unwrap_or(u64::MAX);
        // The units each buyer holds, as the policy's tally counts them.
        let mut held: BTreeMap<&str, u64> = BTreeMap::new();
        for o in os.iter().filter(|o| holds_quota(o.state()) && o.held_units > 0) {
            *held.entry(o.buyer_id.as_str()).or_default() += o.held_units;
        }
        let tally: BTreeMap<&str, u64> =
            policy.allocations.iter().map(|a| (a.buyer_id.as_str(), a.allocated_units)).collect();
        if tally != held {
            v.push(format!("{sku}: the allocation tally says buyers hold {tally:?}, their orders hold {held:?}"));
        }
        let buyer_of: HashMap<&str, &str> = os.iter().map(|o| (o.order_id.as_str(), o.buyer_id.as_str())).collect();
        os.sort_by_key(|o| o.sequence);
        // Intervals during which each order waited in the backlog, unserved: [entry, exit).
        let mut waiting: Vec<(u64, u64, u64, &str)> = Vec::new();
        let mut got_stock: Vec<(u64, u64, &str)> = Vec::new();
        for o in &os {
            let mut entry: Option<u64> = None;
            for t in &o.history {
                let at = ms(t.time.as_ref());
                let (from, to) = (t.from_state(), t.to_state());
                if to == OrderState::Backordered && from != OrderState::Backordered {
                    entry = Some(at);
                }
                if from == OrderState::Backordered && (to == OrderState::Reserved || to == OrderState::Backordered) {
                    got_stock.push((o.sequence, at, o.order_id.as_str()));
                }
                if from == OrderState::Backordered
                    && to != OrderState::Backordered
                    && let Some(e) = entry.take()
                {
                    waiting.push((o.sequence, e, at, o.order_id.as_str()));
                }
            }
            if let Some(e) = entry {
                waiting.push((o.sequence, e, u64::MAX, o.order_id.as_str()));
            }
        }
        for (seq_b, at, b) in &got_stock {
            for (seq_a, entry, exit, a) in &waiting {
                let passed = if *at >= shared_since { buyer_of.get(a) == buyer_of.get(b) } else { true };
                if seq_a < seq_b && *entry <= *at && *at < *exit && a != b && passed {
                    v.push(format!(
                        "{sku}: order {b} took stock at {at} while earlier order {a} waited in the backlog"
                    ));
                }
            }
        }
    }

    // Audit.
    let audit =
        c.licensing.verify_audit_log(lpb::VerifyAuditLogRequest::default()).await.expect("VerifyAuditLog").into_inner();
    if !audit.valid {
        v.push(format!("audit log does not verify at entry {}: {}", audit.first_bad_sequence, audit.problem));
    }
    report
}

/// What a workload knows it did, once every call whose outcome was unknown (timed out, UNAVAILABLE)
/// was retried with the same request id until it answered: nothing in here is uncertain any more.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    /// Request ids of acknowledged PlaceOrder calls. Every other PlaceOrder was refused for good, so
    /// the orders that exist are exactly these.
    pub placed: Vec<String>,
    /// (product, units) of each acknowledged supply receipt.
    pub received: Vec<(String, u64)>,
    /// Orders whose cancellation was acknowledged.
    pub cancelled: Vec<String>,
    /// Orders whose confirmation was acknowledged.
    pub confirmed: Vec<String>,
    /// Orders whose shipment was acknowledged.
    pub shipped: Vec<String>,
}

/// The event streams the orders service consumes: licensing's desk stream, each product's licensing
/// stream, and each product's inventory stream.
pub async fn event_streams(store: &Store) -> Vec<String> {
    let mut out = vec![chipgate_contract::streams::licensing()];
    let licensed = chipgate_contract::licensing_products::all(store).await.expect("licensing's products");
    out.extend(licensed.iter().map(chipgate_contract::streams::licensing_product));
    let products = chipgate_contract::catalogue::all(store).await.expect("catalogue");
    out.extend(products.iter().map(chipgate_contract::streams::inventory));
    out
}

/// The consumer group the orders service reads the licensing and inventory streams with.
const ORDERS_GROUP: &str = "orders";

fn allowed(from: OrderState, to: OrderState) -> bool {
    use OrderState::*;
    matches!(
        (from, to),
        (Pending, AwaitingLicense | Backordered | Rejected | Cancelled)
            | (AwaitingLicense, AwaitingLicense | Backordered | Rejected | Cancelled)
            | (Backordered, Backordered | Reserved | AwaitingLicense | Cancelled)
            | (Reserved, Confirmed | Expired | AwaitingLicense | Cancelled)
            | (Confirmed, Shipped | Cancelled)
    )
}

/// Each order's history is one unbroken walk through the life cycle that ends where the order stands,
/// with every one-off step (confirm, ship, cancel, expire) at most once: an event or call applied twice
/// would show as a broken or repeated step.
pub fn check_histories(orders: &[opb::Order]) -> Vec<String> {
    let mut v = Vec::new();
    for o in orders {
        let mut at = OrderState::Pending;
        for (i, t) in o.history.iter().enumerate() {
            let (from, to) = (t.from_state(), t.to_state());
            if i == 0 && from == OrderState::Unspecified && to == OrderState::Pending {
                continue;
            }
            if from != at {
                v.push(format!("order {}: step {i} leaves {from:?}, but the order stood at {at:?}", o.order_id));
            }
            if !allowed(from, to) {
                v.push(format!("order {}: step {i} {from:?} → {to:?} is not a life-cycle move", o.order_id));
            }
            at = to;
        }
        if at != o.state() {
            v.push(format!("order {}: history ends at {at:?}, but the order is {:?}", o.order_id, o.state()));
        }
        for once in [OrderState::Confirmed, OrderState::Shipped, OrderState::Cancelled, OrderState::Expired] {
            let n = o.history.iter().filter(|t| t.to_state() == once).count();
            if n > 1 {
                v.push(format!("order {}: moved to {once:?} {n} times", o.order_id));
            }
        }
    }
    v
}

/// Everything [`check`] checks, and what a faulted run must also satisfy:
/// * the orders that exist are exactly the acknowledged placements (none lost, none duplicated, none
///   from a call the client never saw succeed);
/// * each product received exactly the acknowledged receipts (each supply event applied once);
/// * every acknowledged cancel, confirm and ship took effect, and each order's history is an unbroken
///   walk through the life cycle ([`check_histories`]);
/// * every event of the licensing and inventory streams was delivered to the orders consumer group
///   and acknowledged (none lost, none stuck pending with a dead consumer);
/// * no work is left behind: no dirty or half-done marks, no owed releases;
/// * each application became at most one licence.
///
/// Call it once the cluster is quiet ([`wait_settled`]).
///
/// # Panics
/// When a service or the store does not answer.
pub async fn check_ledger(c: &mut Clients, store: &Store, ledger: &Ledger) -> Report {
    let mut report = check(c, &ledger.placed).await;
    let orders = all_orders(&mut c.orders).await;
    let v = &mut report.violations;

    let placed: std::collections::HashSet<&str> = ledger.placed.iter().map(String::as_str).collect();
    for o in &orders {
        if !placed.contains(o.request_id.as_str()) {
            v.push(format!(
                "order {} was placed by request {}, which was never acknowledged",
                o.order_id, o.request_id
            ));
        }
    }

    let mut received: HashMap<&str, u64> = HashMap::new();
    for (sku, units) in &ledger.received {
        *received.entry(sku.as_str()).or_default() += units;
    }
    let stock = c.inventory.list_stock(ipb::ListStockRequest {}).await.expect("ListStock").into_inner().stock;
    for s in &stock {
        let want = received.get(s.product_sku.as_str()).copied().unwrap_or(0);
        if s.received != want {
            v.push(format!(
                "stock of {}: {} units received, but the acknowledged receipts add up to {want}",
                s.product_sku, s.received
            ));
        }
    }
    for sku in received.keys() {
        if !stock.iter().any(|s| s.product_sku == *sku) {
            v.push(format!("acknowledged receipts of {sku}, which has no stock"));
        }
    }

    let by_id: HashMap<&str, &opb::Order> = orders.iter().map(|o| (o.order_id.as_str(), o)).collect();
    let mut expect = |ids: &[String], what: &str, ok: &[OrderState]| {
        for id in ids {
            match by_id.get(id.as_str()) {
                Some(o) if ok.contains(&o.state()) => {}
                Some(o) => v.push(format!("order {id}: {what} was acknowledged, but it is {:?}", o.state())),
                None => v.push(format!("order {id}: {what} was acknowledged, but the order does not exist")),
            }
        }
    };
    expect(&ledger.cancelled, "cancellation", &[OrderState::Cancelled]);
    expect(&ledger.confirmed, "confirmation", &[OrderState::Confirmed, OrderState::Shipped, OrderState::Cancelled]);
    expect(&ledger.shipped, "shipment", &[OrderState::Shipped]);
    v.extend(check_histories(&orders));

    for stream in &event_streams(store).await {
        match store.group_info(stream, ORDERS_GROUP).await {
            Ok(g) => {
                if !g.exists {
                    v.push(format!("{stream}: the orders consumer group does not exist (nothing consumes it)"));
                }
                if g.pending != 0 {
                    v.push(format!("{stream}: {} events still pending with a consumer", g.pending));
                }
                if g.lag.is_some_and(|l| l != 0) {
                    v.push(format!("{stream}: {:?} events never delivered to the orders group", g.lag));
                }
            }
            Err(e) => v.push(format!("{stream}: can't read the orders consumer group: {e}")),
        }
    }

    let products: Vec<Sku> =
        store.smembers(&okeys::products()).await.expect("products").into_iter().map(Sku::from_trusted).collect();
    let mut owed = Vec::new();
    for p in &products {
        owed.extend(store.smembers(&okeys::cleanup(p)).await.expect("cleanup"));
        for (kind, key) in [("dirty", okeys::dirty(p)), ("unfinished", okeys::working(p))] {
            let marks = store.hgetall(&key).await.expect("marks");
            if !marks.is_empty() {
                v.push(format!("{p}: {} {kind} marks left behind", marks.len()));
            }
        }
    }
    if !owed.is_empty() {
        v.push(format!("{} orders still owe releases: {owed:?}", owed.len()));
    }

    let licences = all_licences(&mut c.licensing).await;
    let mut per_app: HashMap<&str, usize> = HashMap::new();
    for l in &licences {
        *per_app.entry(l.application_id.as_str()).or_default() += 1;
    }
    for (app, n) in per_app {
        if n > 1 {
            v.push(format!("application {app} became {n} licences"));
        }
    }
    report
}

/// Waits until the cluster has nothing left to do: [`wait_quiet`], and besides no unfinished marks and
/// no events pending or undelivered in the orders consumer group. False if that did not happen
/// within `within`.
///
/// # Panics
/// When the store or the orders service does not answer.
pub async fn wait_settled(store: &Store, orders: &mut crate::OrdersClient, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || !wait_quiet(store, orders, left).await {
            return false;
        }
        let mut busy = false;
        for p in store.smembers(&okeys::products()).await.expect("products") {
            busy |= !store.hgetall(&okeys::working(&Sku::from_trusted(p))).await.expect("working").is_empty();
        }
        for stream in &event_streams(store).await {
            // A product's stream the orders consumers haven't found yet has no group: busy.
            busy |= match store.group_info(stream, ORDERS_GROUP).await {
                Ok(g) => !g.exists || g.pending != 0 || g.lag.is_some_and(|l| l != 0),
                Err(_) => true,
            };
        }
        if !busy {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
