//! Where inventory keeps its state: every key carries the `{inv}` hash tag (one Redis Cluster slot),
//! because a stock change and its event must commit in one atomic step and the event stream is one.

use chipgate_state::Space;

/// The inventory space.
pub const SPACE: Space = chipgate_contract::INVENTORY;

/// The event stream the orders service and WatchStock read.
pub fn events() -> String {
    chipgate_contract::streams::inventory()
}

/// A product.
pub fn product(sku: &str) -> String {
    chipgate_contract::catalogue::product(sku)
}

/// Every SKU (all scored 0, so rank order is SKU order).
pub fn products() -> String {
    SPACE.key(["products"])
}

/// A product's stock.
pub fn stock(sku: &str) -> String {
    SPACE.key(["stock", sku])
}

/// A supply receipt.
pub fn receipt(receipt_id: &str) -> String {
    SPACE.key(["receipt", receipt_id])
}

/// An order's hold.
pub fn hold(order_id: &str) -> String {
    SPACE.key(["hold", order_id])
}

/// A product's holds by creation time.
pub fn holds_of(sku: &str) -> String {
    SPACE.key(["holds", sku])
}

/// Complete, unconfirmed holds by expiry time (the sweeper's work list).
pub fn expiry() -> String {
    SPACE.key(["expiry"])
}

/// Fencing tokens seen for batch holds on a product.
pub fn fence(sku: &str) -> String {
    SPACE.key(["fence", sku])
}
