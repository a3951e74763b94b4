//! Dirty marks: what a product's next reconciliation pass must look at.
//!
//! Each product has a hash of marks. A mark is a field `kind|buyer|cause` (or `d|cause` for the backlog):
//! `a` re-evaluates a buyer's waiting orders (`*` = every buyer; a placement's own mark names its
//! order, so that a round marked by nothing else judges the buyer's orders from the first new one on,
//! see [`Marks::placed_only`]), `h` re-checks the orders that hold
//! quota (their licence may have stopped being usable), `d` hands free stock to the backlog. Marks are
//! written by whoever changes the world (placement, the event consumers) *after* the change is
//! committed, and a pass deletes the marks it read *before* it reads the world: so any change is seen
//! by the pass that consumes its mark, or leaves a mark for the next one. Marks are idempotent; setting
//! one twice costs nothing.
//!
//! A mark's value is the W3C traceparent of the work that set it (the call or the event consumed), so
//! the pass that takes it continues that trace: a wave's publish call, the consumer that read its
//! event and the rounds that moved its orders are one trace.

use std::collections::BTreeMap;

use chipgate_domain::ids::{OrderId, Sku};
use chipgate_domain::orders::{Cause, CauseKind};
use chipgate_state::Txn;

use crate::keys;

/// Who a mark is about.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Who<'a> {
    /// Every buyer.
    All,
    /// One buyer.
    Buyer(&'a str),
}

impl Who<'_> {
    fn field(&self) -> &str {
        match self {
            Who::All => "*",
            Who::Buyer(b) => b,
        }
    }
}

/// Re-evaluate waiting orders.
pub(crate) fn awaiting(t: &mut Txn, sku: &Sku, who: Who<'_>, cause: &Cause, traceparent: &str) {
    t.hset(keys::dirty(sku), format!("a|{}|{}", who.field(), cause.encode()), traceparent.as_bytes().to_vec());
}

/// Re-check orders holding quota.
pub(crate) fn holders(t: &mut Txn, sku: &Sku, who: Who<'_>, cause: &Cause, traceparent: &str) {
    t.hset(keys::dirty(sku), format!("h|{}|{}", who.field(), cause.encode()), traceparent.as_bytes().to_vec());
}

/// Hand free stock to the backlog.
pub(crate) fn drain(t: &mut Txn, sku: &Sku, cause: &Cause, traceparent: &str) {
    t.hset(keys::dirty(sku), format!("d|{}", cause.encode()), traceparent.as_bytes().to_vec());
}

/// The marks one pass read, grouped.
#[derive(Debug, Default)]
pub(crate) struct Marks {
    /// Raw fields (deleted when the pass takes them).
    pub fields: Vec<String>,
    /// Re-evaluate every buyer, for these causes.
    pub all_awaiting: Vec<Cause>,
    /// Re-evaluate these buyers.
    pub awaiting: BTreeMap<String, Vec<Cause>>,
    /// Re-check every holder.
    pub all_holders: Vec<Cause>,
    /// Re-check these buyers' holders.
    pub holders: BTreeMap<String, Vec<Cause>>,
    /// Drain, for these causes.
    pub drain: Vec<Cause>,
}

impl Marks {
    /// Groups the fields of a dirty hash (unknown fields are dropped, but still deleted).
    pub fn parse(fields: Vec<String>) -> Marks {
        let mut m = Marks::default();
        for f in &fields {
            let mut parts = f.splitn(3, '|');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("a"), Some("*"), Some(c)) => m.all_awaiting.push(Cause::decode(c)),
                (Some("a"), Some(b), Some(c)) => m.awaiting.entry(b.to_string()).or_default().push(Cause::decode(c)),
                (Some("h"), Some("*"), Some(c)) => m.all_holders.push(Cause::decode(c)),
                (Some("h"), Some(b), Some(c)) => m.holders.entry(b.to_string()).or_default().push(Cause::decode(c)),
                (Some("d"), Some(c), rest) => {
                    let c = match rest {
                        Some(r) => format!("{c}|{r}"),
                        None => c.to_string(),
                    };
                    m.drain.push(Cause::decode(&c));
                }
                _ => tracing::warn!(field = %f, "unknown dirty mark"),
            }
        }
        m.fields = fields;
        m
    }

    /// Whether waiting orders must be looked at.
    pub fn any_awaiting(&self) -> bool {
        !self.all_awaiting.is_empty() || !self.awaiting.is_empty()
    }

    /// Whether holders must be looked at.
    pub fn any_holders(&self) -> bool {
        !self.all_holders.is_empty() || !self.holders.is_empty()
    }

    /// The causes that concern a buyer's waiting orders.
    pub fn awaiting_causes(&self, buyer: &str) -> Vec<Cause> {
        let mut c: Vec<Cause> = self.awaiting.get(buyer).cloned().unwrap_or_default();
        c.extend(self.all_awaiting.iter().cloned());
        c
    }

    /// The placement number of `buyer`'s first order of `sku` placed since the marks were last taken,
    /// when the buyer's placements are all that marked it: no other change concerns its waiting
    /// orders or its holders, so its earlier orders need not be judged again. None otherwise, and for
    /// a placement mark that names no order (as older versions wrote it).
    pub fn placed_only(&self, sku: &Sku, buyer: &str) -> Option<u64> {
        if !self.all_awaiting.is_empty() || !self.all_holders.is_empty() || self.holders.contains_key(buyer) {
            return None;
        }
        let mut first: Option<u64> = None;
        for c in self.awaiting.get(buyer)? {
            if c.kind() != CauseKind::Placed {
                return None;
            }
            let seq = OrderId::number_in(&c.reference, sku.as_str())?;
            first = Some(first.map_or(seq, |f| f.min(seq)));
        }
        first
    }

    /// The orders of `buyer` whose placements marked it (the ids their marks name): when
    /// [`Marks::placed_only`] holds, the orders a round judges first, so it may read them beside
    /// what it starts from instead of after it.
    pub fn placed_orders<'a>(&'a self, buyer: &str) -> impl Iterator<Item = &'a str> + 'a {
        self.awaiting
            .get(buyer)
            .into_iter()
            .flatten()
            .filter(|c| c.kind() == CauseKind::Placed && !c.reference.is_empty())
            .map(|c| c.reference.as_str())
    }

    /// The causes that concern a buyer's holders.
    pub fn holder_causes(&self, buyer: &str) -> Vec<Cause> {
        let mut c: Vec<Cause> = self.holders.get(buyer).cloned().unwrap_or_default();
        c.extend(self.all_holders.iter().cloned());
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_group_by_kind_and_buyer() {
        let fields = vec![
            "a|bytedance|wave:wave-1".to_string(),
            "a|bytedance|placed:".to_string(),
            "a|*|embargo-lifted:H200".to_string(),
            "h|alibaba|suspended:lic-2".to_string(),
            "d|supply:rcpt-7".to_string(),
            "zz|what".to_string(),
        ];
        let m = Marks::parse(fields);
        assert_eq!(m.fields.len(), 6, "unknown marks are still consumed");
        let b: Vec<CauseKind> = m.awaiting_causes("bytedance").iter().map(Cause::kind).collect();
        assert_eq!(b, [CauseKind::WavePublished, CauseKind::Placed, CauseKind::EmbargoLifted]);
        assert_eq!(m.awaiting_causes("tencent").len(), 1, "only the all-buyers mark");
        assert_eq!(m.holder_causes("alibaba")[0].reference, "lic-2");
        assert_eq!(m.drain[0], Cause::new(CauseKind::SupplyReceived, "rcpt-7"));
        assert!(m.any_awaiting() && m.any_holders());
    }

    #[test]
    fn a_buyer_marked_only_by_its_placements_is_judged_from_its_first_new_order() {
        let sku = Sku::from_trusted("H200");
        let placed =
            |n: u64| format!("a|b1|{}", Cause::new(CauseKind::Placed, OrderId::new(&sku, n).as_str()).encode());
        let m = Marks::parse(vec![placed(12), placed(9), placed(30), "a|b2|placed:".to_string()]);
        assert_eq!(m.placed_only(&sku, "b1"), Some(9));
        assert_eq!(m.placed_only(&sku, "b2"), None, "a placement mark naming no order");
        assert_eq!(m.placed_only(&sku, "b3"), None, "not marked");
        let mut named: Vec<&str> = m.placed_orders("b1").collect();
        named.sort();
        assert_eq!(named, ["ord-H200-12", "ord-H200-30", "ord-H200-9"]);
        assert_eq!(m.placed_orders("b2").count(), 0, "a placement mark naming no order");
        assert_eq!(m.placed_only(&Sku::from_trusted("B200"), "b1"), None, "another product's orders");
        // Any other change that concerns the buyer (or everybody) means a full look.
        for other in ["a|b1|quota-returned:lic-1", "h|b1|suspended:lic-1", "a|*|embargo-lifted:H200", "h|*|reconciled:"]
        {
            let m = Marks::parse(vec![placed(12), other.to_string()]);
            assert_eq!(m.placed_only(&sku, "b1"), None, "{other}");
        }
        let m = Marks::parse(vec![placed(12), "h|b2|suspended:lic-2".to_string(), "d|supply:r".to_string()]);
        assert_eq!(m.placed_only(&sku, "b1"), Some(12), "another buyer's holders and the backlog are not b1's");
    }
}
