//! Where orders keeps its state: partitioned by **product**. An order's move, its queue memberships,
//! its buyer's and state's indexes, the wave figures it changes and its transition event commit in one
//! atomic step, and all of them belong to the order's product, so they share the product's hash slot
//! (`{ord:SKU}`) — and different products land on different Redis Cluster masters. An order's id names
//! its product (`ord-<SKU>-<sequence>`), so any call that names an order finds its partition.
//!
//! Only what spans products lives in the space's own slot (`{ord}`), each written in its own small
//! idempotent step, never in a transaction with a product's keys: the products that have orders, the
//! products each buyer ordered, and the waves observed.

use chipgate_domain::ids::{BuyerId, OrderId, Sku, WaveId};
use chipgate_domain::orders::{OrderRecord, OrderStatus};
use chipgate_state::{Partition, Space};

/// The orders space.
pub const SPACE: Space = chipgate_contract::ORDERS;

/// The typed ids of an order read back from the store: each was parsed when the order was placed,
/// so they are wrapped without a second check.
pub(crate) trait OrderIds {
    /// The order's product.
    fn typed_sku(&self) -> Sku;
    /// The order's buyer.
    fn typed_buyer(&self) -> BuyerId;
    /// The order's id.
    fn typed_id(&self) -> OrderId;
}

impl OrderIds for OrderRecord {
    fn typed_sku(&self) -> Sku {
        Sku::from_trusted(self.sku.as_str())
    }

    fn typed_buyer(&self) -> BuyerId {
        BuyerId::from_trusted(self.buyer_id.as_str())
    }

    fn typed_id(&self) -> OrderId {
        OrderId::from_trusted(self.id.as_str())
    }
}

/// The partition of product `sku`.
pub fn part(sku: &Sku) -> Partition {
    SPACE.partition(sku.as_str())
}

/// The id of a product's order number `seq`.
pub fn order_id(sku: &Sku, seq: u64) -> OrderId {
    OrderId::new(sku, seq)
}

/// The product an order id names (None when it is not an order id).
pub fn sku_of(order_id: &OrderId) -> Option<Sku> {
    order_id.product()
}

/// A product's placement sequence counter (order ids and the order in which orders are served).
pub fn seq(sku: &Sku) -> String {
    part(sku).key(["seq"])
}

/// An order: `o:<n>` in its product's partition for the id `ord-<SKU>-<n>` the service hands out
/// (the partition already names the product, so the key doesn't repeat the id: ~24 bytes less, and a
/// smaller allocation, per order in Redis). `<n>` is the id's own digits, so two ids never share a
/// key. An id of another shape names no order the service wrote; it keeps a key of its own
/// (`order:<id>`, where nothing is found).
///
/// Every reader and writer of order records goes through here (placement, rounds, queries,
/// the archive and its trim, the test harness).
pub fn order(id: &OrderId) -> String {
    match id.parts() {
        Some((sku, n)) => part(&sku).key(["o", n]),
        None => part(&Sku::default()).key(["order", id.as_str()]),
    }
}

/// How an order is a member of its product's buyer and state indexes ([`orders_of`],
/// [`orders_in`], and so [`backlog`] and [`holding`]): the digits `<n>` of its id `ord-<SKU>-<n>`
/// — the index is the product's, so the id's product is said by the key. An entry of 100,000 in a
/// sorted set cost ~16 bytes less this way (two per order after a wave). Read back with
/// [`indexed_order`]; the awaiting queues, wave snapshots and the cleanup set keep whole ids.
pub fn index_member(id: &OrderId) -> String {
    id.parts().map_or_else(|| id.as_str().to_string(), |(_, n)| n.to_string())
}

/// The order a member of one of `sku`'s buyer or state indexes names ([`index_member`]'s inverse;
/// a member that isn't all digits is a whole id, as written before members were shortened).
pub fn indexed_order(sku: &Sku, member: &str) -> OrderId {
    if !member.is_empty() && member.bytes().all(|b| b.is_ascii_digit()) {
        OrderId::from_trusted(format!("ord-{sku}-{member}"))
    } else {
        OrderId::from_trusted(member)
    }
}

/// A buyer's orders of one product, by placement sequence.
pub fn orders_of(sku: &Sku, buyer: &BuyerId) -> String {
    part(sku).key(["buyer", buyer.as_str()])
}

/// A product's orders in one state, by placement sequence.
pub fn orders_in(sku: &Sku, status: OrderStatus) -> String {
    part(sku).key(["state", status.name()])
}

/// The awaiting queue of one buyer for one product (PENDING and AWAITING_LICENSE), by sequence.
pub fn awaiting(sku: &Sku, buyer: &BuyerId) -> String {
    part(sku).key(["awaiting", buyer.as_str()])
}

/// Where a buyer's waiting orders of a product stood after the last round that judged them all
/// ([`chipgate_domain::allocation::Standing`]): a round marked only by the buyer's placements judges its
/// new orders behind it instead of every waiting order again.
pub fn standing(sku: &Sku, buyer: &BuyerId) -> String {
    part(sku).key(["standing", buyer.as_str()])
}

/// Buyers with (possibly) waiting orders for a product.
pub fn awaiting_buyers(sku: &Sku) -> String {
    part(sku).key(["awaiting-buyers"])
}

/// A product's backlog (BACKORDERED), by sequence: the state index of BACKORDERED itself. (A
/// separate backlog set, and a set of the orders holding unconfirmed quota — the BACKORDERED and
/// RESERVED state indexes together — cost two more sorted-set entries, ~210 bytes of Redis and two
/// writes, per order; they are gone.)
pub fn backlog(sku: &Sku) -> String {
    orders_in(sku, OrderStatus::Backordered)
}

/// The state indexes that together hold the orders of a product that hold unconfirmed quota
/// ([`OrderStatus::holds_unconfirmed_quota`]), by sequence.
pub fn holding(sku: &Sku) -> [String; 2] {
    [orders_in(sku, OrderStatus::Backordered), orders_in(sku, OrderStatus::Reserved)]
}

/// What a product's next reconciliation pass must look at (a hash of marks).
pub fn dirty(sku: &Sku) -> String {
    part(sku).key(["dirty"])
}

/// The marks a pass has taken and not yet finished: only the lease holder writes it, and whoever
/// holds the lease next finishes what a holder that died left here.
pub fn working(sku: &Sku) -> String {
    part(sku).key(["working"])
}

/// The allocation lease of a product (one reconciliation pass at a time, cluster-wide).
pub fn lease(sku: &Sku) -> String {
    part(sku).key(["lease"])
}

/// The counter that issues a product's fencing tokens.
pub fn lease_counter(sku: &Sku) -> String {
    part(sku).key(["lease-seq"])
}

/// A product's orders that still owe releases to licensing or inventory.
pub fn cleanup(sku: &Sku) -> String {
    part(sku).key(["cleanup"])
}

/// A product's transition stream (WatchOrders follows every product's).
pub fn events(sku: &Sku) -> String {
    chipgate_contract::streams::orders(sku)
}

/// A wave's figures for one product: orders holding its quota by state, and the units they hold.
pub fn wave(sku: &Sku, wave_id: &WaveId) -> String {
    part(sku).key(["wave", wave_id.as_str()])
}

/// The waiting orders of a product that a wave concerns and that have not been evaluated since
/// (see [`crate::waves`]).
pub fn wave_pending(wave_id: &WaveId, sku: &Sku) -> String {
    part(sku).key(["wave-pending", wave_id.as_str()])
}

/// A wave's tally for one product: orders concerned, when one last left the pending snapshot.
pub fn wave_tally(wave_id: &WaveId, sku: &Sku) -> String {
    part(sku).key(["wave-tally", wave_id.as_str()])
}

/// Present once a wave's snapshot of a product was taken (so it is taken once).
pub fn wave_snapshot_taken(wave_id: &WaveId, sku: &Sku) -> String {
    part(sku).key(["wave-snap", wave_id.as_str()])
}

/// The queues a wave's snapshot of a product has copied so far, while it is being taken (fields:
/// queue keys; deleted once it is taken).
pub fn wave_snapshot_steps(wave_id: &WaveId, sku: &Sku) -> String {
    part(sku).key(["wave-snap-steps", wave_id.as_str()])
}

/// Waves whose snapshot of a product may still hold orders.
pub fn unsettled_waves(sku: &Sku) -> String {
    part(sku).key(["unsettled-waves"])
}

/// A record whose version moves each time a wave's snapshot of a product starts (an empty body):
/// a commit that takes orders out of waiting is guarded on the version it read with the unsettled
/// waves, so it can't miss a snapshot started in between (see [`crate::waves::Unsettled`]).
pub fn waves_epoch(sku: &Sku) -> String {
    part(sku).key(["waves-epoch"])
}

/// How many of a product's archive segments are committed (their orders removed from Redis).
pub fn archive_cursor(sku: &Sku) -> String {
    part(sku).key(["archive"])
}

/// The lease that lets one replica at a time archive a product's closed orders.
pub fn archive_lease(sku: &Sku) -> String {
    part(sku).key(["archive-lease"])
}

/// The counter issuing fencing tokens for [`archive_lease`].
pub fn archive_lease_counter(sku: &Sku) -> String {
    part(sku).key(["archive-lease-seq"])
}

/// Every product orders were ever placed for (`{ord}`).
pub fn products() -> String {
    SPACE.key(["products"])
}

/// The products a buyer ever ordered (`{ord}`): where a change that concerns the buyer (a domestic
/// purchase) must look.
pub fn buyer_products(buyer: &BuyerId) -> String {
    SPACE.key(["buyer-products", buyer.as_str()])
}

/// When the orders service first saw a wave, and the queues it concerns (`{ord}`).
pub fn wave_meta(wave_id: &WaveId) -> String {
    SPACE.key(["wave-meta", wave_id.as_str()])
}

/// Waves observed, scored by when they were published (`{ord}`; the metrics show the latest few).
pub fn waves() -> String {
    SPACE.key(["waves"])
}

/// A product's allocation policy and its latest changes (in the product's partition: a change
/// commits with the product's drain mark).
pub fn allocation_policy(sku: &Sku) -> String {
    part(sku).key(["alloc-policy"])
}

/// Units of a product each buyer holds (held, committed, shipped): a hash buyer → units, kept by
/// `book::write` with every order change (in the product's partition, as the orders are); what
/// allocation caps and the metrics read.
pub fn allocated(sku: &Sku) -> String {
    part(sku).key(["allocated"])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_order_id_names_its_partition() {
        let sku = Sku::from_trusted("H200-SXM-141GB");
        let id = order_id(&sku, 129);
        assert_eq!(id, "ord-H200-SXM-141GB-129");
        assert_eq!(sku_of(&id).as_deref(), Some("H200-SXM-141GB"));
        assert_eq!(order(&id), "{ord:H200-SXM-141GB}:o:129");
        assert_eq!(chipgate_state::key_slot(&order(&id)), part(&sku).slot());
        // Each id its own key: the digits as the id has them, and ids of another shape apart.
        let keys: std::collections::HashSet<String> = [
            "ord-H200-SXM-141GB-129",
            "ord-H200-SXM-141GB-0129",
            "ord-H200-SXM-141GB-12",
            "ord-129",
            "o:129",
            "ord--1",
        ]
        .into_iter()
        .map(|id| order(&OrderId::from_trusted(id)))
        .collect();
        assert_eq!(keys.len(), 6, "{keys:?}");
        // Index members: the digits, read back to the same id; a whole id reads as itself.
        for id in ["ord-H200-SXM-141GB-129", "ord-H200-SXM-141GB-0129", "ord-H200-SXM-141GB-7"] {
            let id = OrderId::from_trusted(id);
            assert_eq!(indexed_order(&sku, &index_member(&id)), id);
        }
        assert_eq!(index_member(&id), "129");
        assert_eq!(indexed_order(&sku, "ord-H200-SXM-141GB-129"), id);
        let odd = OrderId::from_trusted("ord-129");
        assert_eq!(index_member(&odd), "ord-129");
        assert_eq!(indexed_order(&sku, &index_member(&odd)), odd);
        assert_eq!(chipgate_state::key_slot(&order(&id)), chipgate_state::key_slot(&backlog(&sku)));
        for not_ours in ["ord-129", "ord--1", "H200-1", "ord-H200-", "ord-H200-12a", ""] {
            assert_eq!(sku_of(&OrderId::from_trusted(not_ours)), None, "{not_ours}");
        }
        let (h200, h20) = (Sku::from_trusted("H200"), Sku::from_trusted("H20"));
        assert_ne!(part(&h200).slot(), part(&h20).slot());
        assert_eq!(backlog(&h200), orders_in(&h200, OrderStatus::Backordered));
        let holders: Vec<OrderStatus> = OrderStatus::ALL.into_iter().filter(|s| s.holds_unconfirmed_quota()).collect();
        assert_eq!(holding(&h200).to_vec(), holders.iter().map(|&s| orders_in(&h200, s)).collect::<Vec<_>>());
    }
}
