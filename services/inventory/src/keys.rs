//! Where inventory keeps its state: partitioned by **product**. A product's stock, its holds, their
//! expiry index, its supply receipts, its fence and its event stream share the product's hash slot
//! (`{inv:SKU}`), because a stock change, the holds it concerns and its event commit in one atomic
//! step — and different products land on different Redis Cluster masters. Only the catalogue (what
//! products exist) lives in the space's own slot (`{inv}`): it changes rarely and is read once per
//! product by the other services.

use chipgate_domain::ids::{OrderId, Sku};
use chipgate_state::{Partition, Space};

/// The inventory space.
pub const SPACE: Space = chipgate_contract::INVENTORY;

/// The partition of product `sku`.
pub fn part(sku: &Sku) -> Partition {
    chipgate_contract::partitions::inventory(sku)
}

/// A product's event stream (stock changes, holds placed and given back).
pub fn events(sku: &Sku) -> String {
    chipgate_contract::streams::inventory(sku)
}

/// A product of the catalogue.
pub fn product(sku: &Sku) -> String {
    chipgate_contract::catalogue::product(sku)
}

/// Every product, by SKU.
pub fn products() -> String {
    chipgate_contract::catalogue::products()
}

/// A product's stock.
pub fn stock(sku: &Sku) -> String {
    part(sku).key(["stock"])
}

/// A product's hold turn: a record with no data whose version a replica bumps when its batch of
/// holds lost a race to another replica's commit; batches planned without reading guard it (see
/// `seen.rs`).
pub fn hold_turn(sku: &Sku) -> String {
    part(sku).key(["hold-turn"])
}

/// A supply receipt of a product (receipt ids are unique per product).
pub fn receipt(sku: &Sku, receipt_id: &str) -> String {
    part(sku).key(["receipt", receipt_id])
}

/// An order's hold of a product.
pub fn hold(sku: &Sku, order_id: &OrderId) -> String {
    part(sku).key(["hold", order_id.as_str()])
}

/// A product's holds, by creation time.
pub fn holds_of(sku: &Sku) -> String {
    part(sku).key(["holds"])
}

/// A product's complete unconfirmed holds, by expiry time.
pub fn expiry(sku: &Sku) -> String {
    part(sku).key(["expiry"])
}

/// The highest fencing token presented for a product's holds.
pub fn fence(sku: &Sku) -> String {
    part(sku).key(["fence"])
}
