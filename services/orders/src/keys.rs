//! Where orders keeps its state: every key carries the `{ord}` hash tag (one Redis Cluster slot),
//! because an order's move, its queue memberships, the wave figures and its transition event commit in
//! one atomic step.

use chipgate_domain::orders::OrderStatus;
use chipgate_state::Space;

/// The orders space.
pub const SPACE: Space = chipgate_contract::ORDERS;

/// Order id and placement sequence counter.
pub fn seq() -> String {
    SPACE.key(["seq"])
}

/// An order.
pub fn order(id: &str) -> String {
    SPACE.key(["order", id])
}

/// A buyer's orders by placement sequence.
pub fn orders_of(buyer: &str) -> String {
    SPACE.key(["orders", "buyer", buyer])
}

/// Orders in one state by placement sequence.
pub fn orders_in(status: OrderStatus) -> String {
    SPACE.key(["orders", "state", status.name()])
}

/// The awaiting queue of one buyer for one product (PENDING and AWAITING_LICENSE), by sequence.
pub fn awaiting(sku: &str, buyer: &str) -> String {
    SPACE.key(["awaiting", sku, buyer])
}

/// Buyers with (possibly) waiting orders for a product.
pub fn awaiting_buyers(sku: &str) -> String {
    SPACE.key(["awaiting-buyers", sku])
}

/// Products a buyer has (possibly) waiting orders for.
pub fn awaiting_skus(buyer: &str) -> String {
    SPACE.key(["awaiting-skus", buyer])
}

/// A product's backlog (BACKORDERED), by sequence.
pub fn backlog(sku: &str) -> String {
    SPACE.key(["backlog", sku])
}

/// Orders of a product holding unconfirmed quota (BACKORDERED and RESERVED), by sequence.
pub fn holding(sku: &str) -> String {
    SPACE.key(["holding", sku])
}

/// Every product orders were ever placed for.
pub fn products() -> String {
    SPACE.key(["products"])
}

/// What a product's next reconciliation pass must look at (a hash of marks).
pub fn dirty(sku: &str) -> String {
    SPACE.key(["dirty", sku])
}

/// The marks a pass has taken and not yet finished: only the lease holder writes it, and whoever
/// holds the lease next finishes what a holder that died left here.
pub fn working(sku: &str) -> String {
    SPACE.key(["working", sku])
}

/// The allocation lease of a product (one reconciliation pass at a time, cluster-wide).
pub fn lease(sku: &str) -> String {
    SPACE.key(["lease", sku])
}

/// The counter that issues a product's fencing tokens.
pub fn lease_counter(sku: &str) -> String {
    SPACE.key(["lease-seq", sku])
}

/// Orders that still owe releases to licensing or inventory.
pub fn cleanup() -> String {
    SPACE.key(["cleanup"])
}

/// The transition stream WatchOrders follows.
pub fn events() -> String {
    chipgate_contract::streams::orders()
}

/// A wave's figures: orders holding its quota by state, and the units they hold.
pub fn wave(wave_id: &str) -> String {
    SPACE.key(["wave", wave_id])
}

/// When the orders service first saw a wave, and the queues it concerns.
pub fn wave_meta(wave_id: &str) -> String {
    SPACE.key(["wave-meta", wave_id])
}

/// The waiting orders of a product that a wave concerns and that have not been evaluated since
/// (see [`crate::waves`]).
pub fn wave_pending(wave_id: &str, sku: &str) -> String {
    SPACE.key(["wave-pending", wave_id, sku])
}

/// A wave's tally for one product: orders concerned, when one last left the pending snapshot.
pub fn wave_tally(wave_id: &str, sku: &str) -> String {
    SPACE.key(["wave-tally", wave_id, sku])
}

/// Present once a wave's snapshot of a product was taken (so it is taken once).
pub fn wave_snapshot_taken(wave_id: &str, sku: &str) -> String {
    SPACE.key(["wave-snap", wave_id, sku])
}

/// Waves whose snapshot of a product may still hold orders.
pub fn unsettled_waves(sku: &str) -> String {
    SPACE.key(["unsettled-waves", sku])
}

/// Waves observed, scored by when they were published (the metrics show the latest few).
pub fn waves() -> String {
    SPACE.key(["waves"])
}

/// A product's allocation policy and its latest changes.
pub fn allocation_policy(sku: &str) -> String {
    SPACE.key(["alloc-policy", sku])
}

/// Units of a product each buyer holds (held, committed, shipped): a hash buyer → units, kept by
/// `book::write` with every order change; what allocation caps and the metrics read.
pub fn allocated(sku: &str) -> String {
    SPACE.key(["allocated", sku])
}
