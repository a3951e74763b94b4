//! Where licensing keeps its state: partitioned by product, with a small desk beside.
//!
//! Every quota decision is about one product (the orders service asks per product, fenced per
//! product) and is judged against that product's licences and gates, so a **product's partition**
//! (`{lic:SKU}`) holds its licences, the (buyer, product) licence index, the quota reservations of its
//! orders, its fencing record, its export authorisations and import policy, its event stream and its
//! audit chain: each decision reads and commits inside one hash slot, and decisions for different
//! products run on different Redis Cluster masters and append to different audit chains.
//!
//! The **desk** (`{lic}`) holds what an authority works on at human pace and what spans products:
//! applications and the approval queue, waves, id counters, domestic-purchase ledgers (per buyer,
//! across products), the listing indexes, and the registry of products with a partition. Publishing a
//! wave decides the whole wave in the desk, then puts each product's licences in force in that
//! product's partition, idempotently (see `waves.rs`).

use chipgate_state::{AuditChain, Partition, Space};

/// The licensing space.
pub const SPACE: Space = chipgate_contract::LICENSING;

/// Which partition a change commits in: its events and audit entry go with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part<'a> {
    /// The desk (`{lic}`).
    Desk,
    /// A product's partition (`{lic:SKU}`).
    Product(&'a str),
}

impl Part<'_> {
    /// The event stream of this partition.
    pub fn events(self) -> String {
        match self {
            Part::Desk => chipgate_contract::streams::licensing(),
            Part::Product(sku) => chipgate_contract::streams::licensing_product(sku),
        }
    }

    /// The audit chain of this partition.
    pub fn audit(self) -> AuditChain {
        match self {
            Part::Desk => AuditChain::of(SPACE),
            Part::Product(sku) => AuditChain::in_partition(&part(sku)),
        }
    }
}

/// Product `sku`'s partition.
pub fn part(sku: &str) -> Partition {
    chipgate_contract::partitions::licensing(sku)
}

/// The audit chains of the desk and of the given products, each with its name (its stream key, the
/// name checkpoints and verification report it under), sorted by name.
pub fn audit_chains(products: &[String]) -> Vec<(String, AuditChain)> {
    let mut out: Vec<(String, AuditChain)> = std::iter::once(Part::Desk.audit())
        .chain(products.iter().map(|sku| Part::Product(sku).audit()))
        .map(|c| (c.stream.clone(), c))
        .collect();
    out.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    out
}

/// The products with a partition (see [`chipgate_contract::licensing_products`]).
pub fn products() -> String {
    chipgate_contract::licensing_products::key()
}

// ---- The desk ----

/// Id counters: "app", "wave", "lic", "purchase".
pub fn counter(name: &str) -> String {
    SPACE.key(["seq", name])
}

/// An application.
pub fn application(id: &str) -> String {
    SPACE.key(["app", id])
}

/// All applications by submission sequence.
pub fn applications() -> String {
    SPACE.key(["apps"])
}

/// One buyer's applications by submission sequence.
pub fn applications_of(buyer: &str) -> String {
    SPACE.key(["apps", "buyer", buyer])
}

/// The open (queued) application of a buyer for a product: guards "one open application each".
pub fn open_application(buyer: &str, sku: &str) -> String {
    SPACE.key(["open", buyer, sku])
}

/// The approval queue: application ids scored by queue order.
pub fn queue() -> String {
    SPACE.key(["queue"])
}

/// Version record bumped by every change that removes or reorders queue members.
pub fn queue_version() -> String {
    SPACE.key(["queue", "ver"])
}

/// A wave.
pub fn wave(id: &str) -> String {
    SPACE.key(["wave", id])
}

/// All waves by creation sequence.
pub fn waves() -> String {
    SPACE.key(["waves"])
}

/// Published waves whose licences are not all in force yet (recovery finishes them).
pub fn waves_pending() -> String {
    SPACE.key(["waves", "pending"])
}

/// All licences by creation sequence (ids; the records are in their products' partitions).
pub fn licenses() -> String {
    SPACE.key(["licenses"])
}

/// One buyer's licences by creation sequence.
pub fn licenses_of(buyer: &str) -> String {
    SPACE.key(["licenses", "buyer", buyer])
}

/// A buyer's domestic-purchase total.
pub fn ledger(buyer: &str) -> String {
    SPACE.key(["ledger", buyer])
}

/// One domestic purchase.
pub fn purchase(buyer: &str, evidence_ref: &str) -> String {
    SPACE.key(["purchase", buyer, evidence_ref])
}

/// A buyer's purchases by sequence.
pub fn purchases_of(buyer: &str) -> String {
    SPACE.key(["purchases", buyer])
}

/// Products with export authorisations (a listing index, written before the product's commit).
pub fn export_index() -> String {
    SPACE.key(["exports"])
}

/// Products with an import policy (a listing index, written before the product's commit).
pub fn policy_index() -> String {
    SPACE.key(["policies"])
}

// ---- A product's partition ----

/// The id of the licence numbered `seq` for product `sku`: `lic-<SKU>-<seq>`, so every call naming a
/// licence finds its partition ([`license_sku`]).
pub fn license_id(sku: &str, seq: u64) -> String {
    format!("lic-{sku}-{seq}")
}

/// The product of licence `id` (None: not a licence id this service hands out).
pub fn license_sku(id: &str) -> Option<&str> {
    let rest = id.strip_prefix("lic-")?;
    let (sku, seq) = rest.rsplit_once('-')?;
    (!sku.is_empty() && !seq.is_empty() && seq.bytes().all(|b| b.is_ascii_digit())).then_some(sku)
}

/// A licence (in its product's partition; `None` for an id that names no product).
pub fn license(id: &str) -> Option<String> {
    license_sku(id).map(|sku| part(sku).key(["license", id]))
}

/// The ids of a buyer's licences for a product (a record, so eligibility reads it with one MGET).
pub fn license_index(buyer: &str, sku: &str) -> String {
    part(sku).key(["lic-index", buyer])
}

/// An order's quota reservation, in its product's partition.
pub fn reservation(sku: &str, order_id: &str) -> String {
    part(sku).key(["resv", order_id])
}

/// Fencing tokens seen for batch quota calls on a product.
pub fn fence(sku: &str) -> String {
    part(sku).key(["fence"])
}

/// A product's export authorisations.
pub fn exports(sku: &str) -> String {
    part(sku).key(["export"])
}

/// A product's import policy.
pub fn policy(sku: &str) -> String {
    part(sku).key(["policy"])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_licence_id_names_its_product() {
        let id = license_id("H200-SXM-141GB", 17);
        assert_eq!(id, "lic-H200-SXM-141GB-17");
        assert_eq!(license_sku(&id), Some("H200-SXM-141GB"));
        assert_eq!(license(&id), Some(part("H200-SXM-141GB").key(["license", &id])));
        for bad in ["lic-404", "lic--3", "lic-H200-", "lic-H200-x", "ord-H200-3", ""] {
            assert_eq!(license_sku(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_products_keys_share_its_slot_and_the_desk_is_elsewhere() {
        let sku = "H200";
        let slot = part(sku).slot();
        let product_keys = [
            license(&license_id(sku, 1)).unwrap_or_default(),
            license_index("acme", sku),
            reservation(sku, "ord-H200-1"),
            fence(sku),
            exports(sku),
            policy(sku),
            Part::Product(sku).events(),
            Part::Product(sku).audit().stream,
            Part::Product(sku).audit().head,
        ];
        for k in &product_keys {
            assert_eq!(chipgate_state::key_slot(k), slot, "{k}");
        }
        let desk = chipgate_state::key_slot(&queue());
        for k in [application("app-1"), wave("wave-1"), ledger("acme"), products(), Part::Desk.events()] {
            assert_eq!(chipgate_state::key_slot(&k), desk, "{k}");
        }
        assert_ne!(slot, desk);
    }

    #[test]
    fn chains_are_named_by_stream_and_sorted() {
        let chains = audit_chains(&["B".to_string(), "A".to_string()]);
        let names: Vec<&str> = chains.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, vec!["{lic:A}:audit", "{lic:B}:audit", "{lic}:audit"]);
    }
}
