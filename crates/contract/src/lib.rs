//! The contract between chipgate's services beyond their gRPC APIs, in one place, used by producers
//! and consumers alike.
//!
//! The services share one state store. Each owns its keys and writes only those, but two things are
//! read across services and so are part of the contract, like an API:
//! * the **event streams**: licensing appends every change to its stream, inventory to the stream of
//!   the product it changed (a prost-encoded `LicensingEvent` / `InventoryEvent` in the entry field
//!   [`EVENT_FIELD`]), and the orders service reads them through its consumer group
//!   [`ORDERS_GROUP`]; orders appends each commit's order transitions to its own stream (field
//!   [`TRANSITIONS_FIELD`]) for watchers;
//! * the **partitions**: which hash slot a unit's state (and so its stream) lives in ([`partitions`]);
//! * the **catalogue**: inventory owns the products; licensing and orders check that a SKU a caller
//!   names is one before accepting an application or an order, and orders finds the products'
//!   streams through it ([`catalogue`]).
//!
//! Nothing else of another service's state may be read or written; a change here is a change of
//! the contract and needs the same care as a change of a `.proto`.

pub use chipgate_domain::ids::Sku;
use chipgate_state::Space;

/// Licensing's key space (`{lic}`).
pub const LICENSING: Space = Space::new("lic");
/// Inventory's key space (`{inv}`).
pub const INVENTORY: Space = Space::new("inv");
/// The orders service's key space (`{ord}`).
pub const ORDERS: Space = Space::new("ord");

/// The entry field holding one encoded event in the licensing and inventory streams.
pub const EVENT_FIELD: &str = "e";
/// The entry field holding one commit's order transitions (an encoded batch) in the orders stream.
pub const TRANSITIONS_FIELD: &str = "b";
/// The orders service's consumer group on the licensing and inventory streams.
pub const ORDERS_GROUP: &str = "orders";

/// `ErrorInfo.reason` of licensing's and inventory's ABORTED answer to a fencing token lower than
/// one already seen for the product: another orders replica took the product's lease over.
pub const FENCED_REASON: &str = "FENCED";

/// The partitions whose keys others read.
pub mod partitions {
    use chipgate_state::Partition;

    use super::{INVENTORY, LICENSING, Sku};

    /// Inventory's partition of product `sku` (`{inv:SKU}`).
    pub fn inventory(sku: &Sku) -> Partition {
        INVENTORY.partition(sku.as_str())
    }

    /// Licensing's partition of product `sku` (`{lic:SKU}`): the product's licences, quota
    /// reservations and gates.
    pub fn licensing(sku: &Sku) -> Partition {
        LICENSING.partition(sku.as_str())
    }
}

/// The event streams.
pub mod streams {
    use super::{LICENSING, ORDERS, Sku};

    /// Licensing's desk events (`LicensingEvent` in field [`super::EVENT_FIELD`]): applications,
    /// waves being drafted and published, domestic purchases.
    pub fn licensing() -> String {
        LICENSING.key(["events"])
    }

    /// Licensing's events of product `sku` (`LicensingEvent` in field [`super::EVENT_FIELD`]), in the
    /// product's partition: its licences (a wave's part for the product included), quota and gates.
    /// The products are [`super::catalogue::products`].
    pub fn licensing_product(sku: &Sku) -> String {
        super::partitions::licensing(sku).key(["events"])
    }

    /// Inventory's events of product `sku` (`InventoryEvent` in field [`super::EVENT_FIELD`]), in the
    /// product's partition. The products are [`super::catalogue::products`].
    pub fn inventory(sku: &Sku) -> String {
        super::partitions::inventory(sku).key(["events"])
    }

    /// The orders service's transitions of product `sku` (a batch in field
    /// [`super::TRANSITIONS_FIELD`]), in the product's partition.
    pub fn orders(sku: &Sku) -> String {
        ORDERS.partition(sku.as_str()).key(["events"])
    }
}

/// The products licensing keeps state for (each in its partition [`partitions::licensing`], with
/// its event stream [`streams::licensing_product`]), owned by licensing. A product is added before
/// the first change in its partition commits, so a reader that follows these finds every one.
pub mod licensing_products {
    use chipgate_state::{Backend, StateError};

    use super::{LICENSING, Sku};

    /// The products' SKUs (a sorted set, score 0).
    pub fn key() -> String {
        LICENSING.key(["products"])
    }

    /// Every product licensing keeps state for.
    ///
    /// # Errors
    /// When the store can't be read.
    pub async fn all(store: &impl Backend) -> Result<Vec<Sku>, StateError> {
        // Licensing adds a product once its SKU was parsed on entry.
        Ok(store.zrange(&key(), 0, -1, false).await?.into_iter().map(|(sku, _)| Sku::from_trusted(sku)).collect())
    }
}

/// The product catalogue, owned by inventory.
pub mod catalogue {
    use chipgate_state::{Backend, StateError};

    use super::{INVENTORY, Sku};

    /// The record of product `sku` (a prost-encoded product; its presence is what others rely on), in
    /// the product's partition.
    pub fn product(sku: &Sku) -> String {
        super::partitions::inventory(sku).key(["product"])
    }

    /// Every product's SKU (a sorted set, score 0): a product is added once its partition is ready.
    pub fn products() -> String {
        INVENTORY.key(["products"])
    }

    /// Every product in the catalogue.
    ///
    /// # Errors
    /// When the store can't be read.
    pub async fn all(store: &impl Backend) -> Result<Vec<Sku>, StateError> {
        // Inventory adds a product once its SKU was parsed on entry.
        Ok(store.zrange(&products(), 0, -1, false).await?.into_iter().map(|(sku, _)| Sku::from_trusted(sku)).collect())
    }

    /// Whether `sku` is in the catalogue. Products are never removed, so a caller may remember a
    /// `true` for good (`chipgate_runtime::known::Known::in_catalogue` does).
    ///
    /// # Errors
    /// When the store can't be read.
    pub async fn has_product(store: &impl Backend, sku: &Sku) -> Result<bool, StateError> {
        Ok(store.get(&[product(sku)]).await?.into_iter().next().flatten().is_some())
    }

    /// What a caller naming a product outside the catalogue is told (the `product_sku` field's
    /// violation).
    pub fn unknown_product(sku: &str) -> String {
        format!("unknown product {sku:?}: it is not in the vendor's catalogue (ListProducts lists the products)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_keys_keep_their_layout() {
        let h200 = Sku::from_trusted("H200");
        // These names are shared by processes that may run different versions during a rollout.
        assert_eq!(streams::licensing(), "{lic}:events");
        assert_eq!(streams::licensing_product(&h200), "{lic:H200}:events");
        assert_eq!(licensing_products::key(), "{lic}:products");
        assert_eq!(streams::inventory(&h200), "{inv:H200}:events");
        assert_eq!(catalogue::products(), "{inv}:products");
        assert_eq!(streams::orders(&h200), "{ord:H200}:events");
        assert_eq!(catalogue::product(&h200), "{inv:H200}:product");
    }
}
