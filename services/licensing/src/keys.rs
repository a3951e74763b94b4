//! Where licensing keeps its state. Every key carries the `{lic}` hash tag, so all of licensing lives
//! in one Redis Cluster slot: a wave publishes atomically across buyers and the audit log is one chain,
//! both of which need every key in one place.

use chipgate_state::{AuditChain, Space};

/// The licensing space.
pub const SPACE: Space = chipgate_contract::LICENSING;

/// The event stream the orders service consumes.
pub fn events() -> String {
    chipgate_contract::streams::licensing()
}

/// The audit chain every licensing decision is appended to.
pub fn audit() -> AuditChain {
    AuditChain::of(SPACE)
}

/// Every audit chain, each with its name (the name checkpoints and verification report it under):
/// the one place that knows the set. Today there is one chain; when licensing's state is partitioned
/// (by buyer) into several chains, they are listed here, and checkpoints, verification and the audit
/// metrics follow.
pub fn audit_chains() -> Vec<(String, AuditChain)> {
    let chain = audit();
    vec![(chain.stream.clone(), chain)]
}

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

/// A licence.
pub fn license(id: &str) -> String {
    SPACE.key(["license", id])
}

/// All licences by creation sequence.
pub fn licenses() -> String {
    SPACE.key(["licenses"])
}

/// One buyer's licences by creation sequence.
pub fn licenses_of(buyer: &str) -> String {
    SPACE.key(["licenses", "buyer", buyer])
}

/// The ids of a buyer's licences for a product (a record, so eligibility reads it with one MGET).
pub fn license_index(buyer: &str, sku: &str) -> String {
    SPACE.key(["lic-index", buyer, sku])
}

/// An order's quota reservation.
pub fn reservation(order_id: &str) -> String {
    SPACE.key(["resv", order_id])
}

/// Fencing tokens seen for batch quota calls on a product.
pub fn fence(sku: &str) -> String {
    SPACE.key(["fence", sku])
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

/// A product's export authorisations.
pub fn exports(sku: &str) -> String {
    SPACE.key(["export", sku])
}

/// Products with export authorisations.
pub fn export_index() -> String {
    SPACE.key(["exports"])
}

/// A product's import policy.
pub fn policy(sku: &str) -> String {
    SPACE.key(["policy", sku])
}

/// Products with an import policy.
pub fn policy_index() -> String {
    SPACE.key(["policies"])
}
