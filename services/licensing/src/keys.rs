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

use chipgate_domain::ids::{ApplicationId, BuyerId, LicenceId, OrderId, Sku, WaveId};
use chipgate_state::{AuditChain, Partition, Space};

/// The licensing space.
pub const SPACE: Space = chipgate_contract::LICENSING;

/// Which partition a change commits in: its events and audit entry go with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part<'a> {
    /// The desk (`{lic}`).
    Desk,
    /// A product's partition (`{lic:SKU}`).
    Product(&'a Sku),
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
pub fn part(sku: &Sku) -> Partition {
    chipgate_contract::partitions::licensing(sku)
}

/// The audit chains of the desk and of the given products, each with its name (its stream key, the
/// name checkpoints and verification report it under), sorted by name.
pub fn audit_chains(products: &[Sku]) -> Vec<(String, AuditChain)> {
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
pub fn application(id: &ApplicationId) -> String {
    SPACE.key(["app", id.as_str()])
}

/// All applications by submission sequence.
pub fn applications() -> String {
    SPACE.key(["apps"])
}

/// One buyer's applications by submission sequence.
pub fn applications_of(buyer: &BuyerId) -> String {
    SPACE.key(["apps", "buyer", buyer.as_str()])
}

/// The open (queued) application of a buyer for a product: guards "one open application each".
pub fn open_application(buyer: &BuyerId, sku: &Sku) -> String {
    SPACE.key(["open", buyer.as_str(), sku.as_str()])
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
pub fn wave(id: &WaveId) -> String {
    SPACE.key(["wave", id.as_str()])
}

/// One grant of draft wave `wave` (kept apart from the wave's record, so that adding a grant writes
/// only that grant and the wave's counts).
pub fn wave_grant(wave: &WaveId, application: &ApplicationId) -> String {
    SPACE.key(["wave", wave.as_str(), "grant", application.as_str()])
}

/// Draft wave `wave`'s grants kept apart: application ids scored by their place.
pub fn wave_grants(wave: &WaveId) -> String {
    SPACE.key(["wave", wave.as_str(), "grants"])
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
pub fn licenses_of(buyer: &BuyerId) -> String {
    SPACE.key(["licenses", "buyer", buyer.as_str()])
}

/// A buyer's domestic-purchase total.
pub fn ledger(buyer: &BuyerId) -> String {
    SPACE.key(["ledger", buyer.as_str()])
}

/// One domestic purchase.
pub fn purchase(buyer: &BuyerId, evidence_ref: &str) -> String {
    SPACE.key(["purchase", buyer.as_str(), evidence_ref])
}

/// A buyer's purchases by sequence.
pub fn purchases_of(buyer: &BuyerId) -> String {
    SPACE.key(["purchases", buyer.as_str()])
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
pub fn license_id(sku: &Sku, seq: u64) -> LicenceId {
    LicenceId::new(sku, seq)
}

/// The product of licence `id` (None: not a licence id this service hands out).
pub fn license_sku(id: &str) -> Option<&str> {
    LicenceId::product_str(id)
}

/// A licence (in its product's partition; `None` for an id that names no product).
pub fn license(id: &LicenceId) -> Option<String> {
    id.product().map(|sku| part(&sku).key(["license", id.as_str()]))
}

/// The ids of a buyer's licences for a product (a record, so eligibility reads it with one MGET).
pub fn license_index(buyer: &BuyerId, sku: &Sku) -> String {
    part(sku).key(["lic-index", buyer.as_str()])
}

/// An order's quota reservation as a key of its own, in its product's partition: where every
/// reservation lived before they moved into [`reservation_field`]s, and where one still lives when
/// its order id is not one the orders service numbers for this product.
pub fn reservation(sku: &Sku, order_id: &OrderId) -> String {
    part(sku).key(["resv", order_id.as_str()])
}

/// How many orders' reservations share one hash ([`reservation_field`]): at most 128 fields, so
/// Redis keeps the hash packed (a listpack, `hash-max-listpack-entries` 128 by default).
pub const RESERVATIONS_PER_HASH: u64 = 128;

/// Where the quota reservation of product `sku`'s order `ord-<SKU>-<n>` lives: field `n mod 128` of
/// the hash `resh:<n div 128>` in the product's partition (None for an id of another form, whose
/// reservation is a key of its own: [`reservation`]).
///
/// Why: every order holds a reservation for good, and as a key of its own one costs ≈ 150 bytes of
/// Redis (key, value object, dictionary entry) around ≈ 40 of data; 128 consecutive orders in one
/// packed hash cost ≈ 60 each. Consecutive numbers share a hash, so a batch of a product's orders
/// (a wave's, in number order) reads a handful of hashes, one HMGET each.
pub fn reservation_field(sku: &Sku, order_id: &OrderId) -> Option<(String, String)> {
    let n = OrderId::number_in(order_id.as_str(), sku.as_str())?;
    let hash = part(sku).key(["resh", &(n / RESERVATIONS_PER_HASH).to_string()]);
    Some((hash, (n % RESERVATIONS_PER_HASH).to_string()))
}

/// Fencing tokens seen for batch quota calls on a product.
pub fn fence(sku: &Sku) -> String {
    part(sku).key(["fence"])
}

/// A product's quota turn: a record with no data whose version a licensing replica bumps when its
/// quota call lost a race to another replica's commit. Calls decided without reading guard it, so
/// a replica that keeps winning that way misses and reads again, and the loser gets its turn (see
/// `worlds.rs`).
pub fn quota_turn(sku: &Sku) -> String {
    part(sku).key(["quota-turn"])
}

/// A product's export authorisations.
pub fn exports(sku: &Sku) -> String {
    part(sku).key(["export"])
}

/// A product's import policy.
pub fn policy(sku: &Sku) -> String {
    part(sku).key(["policy"])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_licence_id_names_its_product() {
        let sku = Sku::from_trusted("H200-SXM-141GB");
        let id = license_id(&sku, 17);
        assert_eq!(id, "lic-H200-SXM-141GB-17");
        assert_eq!(license_sku(&id), Some("H200-SXM-141GB"));
        assert_eq!(license(&id), Some(part(&sku).key(["license", id.as_str()])));
        for bad in ["lic-404", "lic--3", "lic-H200-", "lic-H200-x", "ord-H200-3", ""] {
            assert_eq!(license_sku(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_products_keys_share_its_slot_and_the_desk_is_elsewhere() {
        let sku = &Sku::from_trusted("H200");
        let (acme, order) = (BuyerId::from_trusted("acme"), OrderId::from_trusted("ord-H200-1"));
        let slot = part(sku).slot();
        let product_keys = [
            license(&license_id(sku, 1)).unwrap_or_default(),
            license_index(&acme, sku),
            reservation(sku, &order),
            reservation_field(sku, &order).map(|(hash, _)| hash).unwrap_or_default(),
            fence(sku),
            quota_turn(sku),
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
        let (app, wave_1) = (ApplicationId::from_trusted("app-1"), WaveId::from_trusted("wave-1"));
        for k in [
            application(&app),
            wave(&wave_1),
            wave_grant(&wave_1, &app),
            wave_grants(&wave_1),
            ledger(&acme),
            products(),
            Part::Desk.events(),
        ] {
            assert_eq!(chipgate_state::key_slot(&k), desk, "{k}");
        }
        assert_ne!(slot, desk);
    }

    #[test]
    fn chains_are_named_by_stream_and_sorted() {
        let chains = audit_chains(&[Sku::from_trusted("B"), Sku::from_trusted("A")]);
        let names: Vec<&str> = chains.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, vec!["{lic:A}:audit", "{lic:B}:audit", "{lic}:audit"]);
    }
}
