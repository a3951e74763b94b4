//! Who gets how many units of stock that becomes available: a product's **allocation policy**.
//!
//! When demand is many times supply, the vendor chooses per product how freed units are shared among
//! the buyers whose orders wait in the backlog (they hold licence quota and are short of stock):
//! * [`Strategy::Fifo`] (the default): the oldest order first, whoever placed it;
//! * [`Strategy::ProRata`]: the units are split among the waiting buyers in proportion to each buyer's
//!   outstanding backordered units — exactly, then rounded by largest remainder (ties to the buyer with
//!   the earliest order). A buyer never gets more than it waits for, and what one can't use goes round
//!   again to the others ("water-filling"). Inside a buyer, its oldest order first;
//! * on top of either, a cap `max_share_percent`: no buyer may hold more than that share of the
//!   product's units allocated so far (held + committed + shipped, this allocation included), so no
//!   buyer corners a product. A capped buyer's surplus goes to the others; units nobody may take stay
//!   available for later.
//!
//! [`plan`] decides one allocation from the free units, what each buyer holds already and the backlog;
//! it is pure, and every figure of the explanation an order records ([`ShareNote`]) comes from it. The
//! orders service asks inventory for exactly the planned units of each order (a per-order cap on the
//! hold), and its previews run the same function without asking anyone for anything.

use std::collections::{BTreeMap, HashMap};

/// How freed units are shared among waiting buyers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Strategy {
    /// Not set (stored policies always name one; read as FIFO).
    Unspecified = 0,
    /// First come, first served.
    Fifo = 1,
    /// In proportion to each buyer's outstanding backordered units.
    ProRata = 2,
}

impl Strategy {
    /// Upper-case API name without prefix, e.g. `PRO_RATA`.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Unspecified | Strategy::Fifo => "FIFO",
            Strategy::ProRata => "PRO_RATA",
        }
    }
}

/// What a product's allocation decisions follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// How units are shared.
    pub strategy: Strategy,
    /// No buyer above this percentage of the product's allocated units (1–99); 0 or 100: no cap.
    pub max_share_percent: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Policy::FIFO
    }
}

impl Policy {
    /// First come, first served, no cap: the default.
    pub const FIFO: Policy = Policy { strategy: Strategy::Fifo, max_share_percent: 0 };

    /// The cap, when one binds (1–99 %).
    pub fn cap(self) -> Option<u32> {
        (1..100).contains(&self.max_share_percent).then_some(self.max_share_percent)
    }

    /// Whether allocations must be planned (shares or caps); otherwise inventory serving the backlog
    /// strictly in order is the whole policy, and orders may take stock the moment they take quota.
    pub fn planned(self) -> bool {
        self.strategy == Strategy::ProRata || self.cap().is_some()
    }

    /// In words, e.g. `PRO_RATA, capped at 40 %`.
    pub fn describe(self) -> String {
        match self.cap() {
            Some(p) => format!("{}, capped at {p} % per buyer", self.strategy.name()),
            None => self.strategy.name().to_string(),
        }
    }
}

/// One change of a product's policy, kept with it (who, when, why).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PolicyChange {
    /// [`Strategy`] after the change.
    #[prost(enumeration = "Strategy", tag = "1")]
    pub strategy: i32,
    /// The cap after the change (0: none).
    #[prost(uint32, tag = "2")]
    pub max_share_percent: u32,
    /// When (ms since epoch).
    #[prost(uint64, tag = "3")]
    pub at_ms: u64,
    /// Who (the caller's principal).
    #[prost(string, tag = "4")]
    pub by: String,
    /// Why, in the caller's words.
    #[prost(string, tag = "5")]
    pub reason: String,
    /// The request that made it.
    #[prost(string, tag = "6")]
    pub request_id: String,
    /// 1 for the first change, then one more per change.
    #[prost(uint64, tag = "7")]
    pub revision: u64,
}

/// How many changes a policy keeps in its record (older ones are in the logs).
pub const KEPT_CHANGES: usize = 50;

/// A product's stored allocation policy and its latest changes.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PolicyRecord {
    /// Product.
    #[prost(string, tag = "1")]
    pub sku: String,
    /// The changes, oldest first; the last one is in force.
    #[prost(message, repeated, tag = "2")]
    pub changes: Vec<PolicyChange>,
}

impl PolicyRecord {
    /// The policy in force (FIFO without cap when never set).
    pub fn policy(&self) -> Policy {
        self.changes
            .last()
            .map(|c| Policy {
                strategy: match c.strategy() {
                    Strategy::ProRata => Strategy::ProRata,
                    _ => Strategy::Fifo,
                },
                max_share_percent: c.max_share_percent,
            })
            .unwrap_or_default()
    }

    /// The latest change, if any.
    pub fn current(&self) -> Option<&PolicyChange> {
        self.changes.last()
    }

    /// Records a change (keeping the latest [`KEPT_CHANGES`]).
    pub fn change(&mut self, policy: Policy, at_ms: u64, by: &str, reason: &str, request_id: &str) {
        let revision = self.current().map(|c| c.revision).unwrap_or(0) + 1;
        self.changes.push(PolicyChange {
            strategy: policy.strategy as i32,
            max_share_percent: policy.max_share_percent,
            at_ms,
            by: by.to_string(),
            reason: reason.to_string(),
            request_id: request_id.to_string(),
            revision,
        });
        let over = self.changes.len().saturating_sub(KEPT_CHANGES);
        self.changes.drain(..over);
    }
}

/// Why an order got the units it got, kept with the history step that recorded them.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct ShareNote {
    /// [`Strategy`] of the allocation.
    #[prost(enumeration = "Strategy", tag = "1")]
    pub strategy: i32,
    /// Units the order's buyer got in this allocation (its share).
    #[prost(uint64, tag = "2")]
    pub buyer_units: u64,
    /// Units handed out in this allocation, to every buyer.
    #[prost(uint64, tag = "3")]
    pub of_units: u64,
    /// Buyers waiting in the backlog when it was made.
    #[prost(uint32, tag = "4")]
    pub buyers: u32,
    /// The cap, when it kept the buyer from getting more (0 otherwise).
    #[prost(uint32, tag = "5")]
    pub capped_percent: u32,
}

impl ShareNote {
    /// In words, e.g. `pro-rata share 120 of 400 units: 3 buyers waiting; capped at 40 % of H200 allocated`.
    pub fn describe(&self, sku: &str) -> String {
        let buyers =
            if self.buyers == 1 { "1 buyer waiting".to_string() } else { format!("{} buyers waiting", self.buyers) };
        let mut s = match self.strategy() {
            Strategy::ProRata => format!("pro-rata share {} of {} units: {buyers}", self.buyer_units, self.of_units),
            _ => format!("first come, first served: {} of {} units: {buyers}", self.buyer_units, self.of_units),
        };
        if self.capped_percent > 0 {
            s.push_str(&format!("; capped at {} % of {sku} allocated", self.capped_percent));
        }
        s
    }
}

/// An order waiting in the backlog, as the planner sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waiting {
    /// Order.
    pub order_id: String,
    /// Its buyer.
    pub buyer_id: String,
    /// Placement sequence (its place in every queue).
    pub seq: u64,
    /// Units it still waits for.
    pub outstanding: u64,
}

/// Units planned for one order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// Order.
    pub order_id: String,
    /// Its buyer.
    pub buyer_id: String,
    /// Placement sequence.
    pub seq: u64,
    /// Units it gets now (at least 1).
    pub units: u64,
    /// Why.
    pub note: ShareNote,
}

/// What one buyer gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuyerShare {
    /// Buyer.
    pub buyer_id: String,
    /// Its backordered orders.
    pub orders: u64,
    /// Units those orders still wait for.
    pub waiting_units: u64,
    /// Placement sequence of its oldest backordered order.
    pub earliest_seq: u64,
    /// Units it held (held, committed, shipped) before this allocation.
    pub allocated_before: u64,
    /// Units it gets now.
    pub units: u64,
    /// The most it could get now (what it waits for, or less under the cap).
    pub limit: u64,
    /// The cap kept it from getting what it waits for.
    pub capped: bool,
}

/// One allocation of free units to the backlog.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharePlan {
    /// The policy it follows.
    pub policy: Policy,
    /// Units free to hand out.
    pub free: u64,
    /// Units of the product allocated (held, committed, shipped) before it, over every buyer.
    pub allocated_before: u64,
    /// Units it hands out.
    pub allocated: u64,
    /// Per order, in placement order (only orders that get something).
    pub grants: Vec<Grant>,
    /// Per waiting buyer, oldest first.
    pub buyers: Vec<BuyerShare>,
    /// Where each order's grant is in `grants` (backlogs run to 100,000s of orders).
    index: HashMap<String, usize>,
}

impl SharePlan {
    /// The grant of `order_id`, if it gets units.
    pub fn grant(&self, order_id: &str) -> Option<&Grant> {
        self.index.get(order_id).map(|&i| &self.grants[i])
    }

    /// Units planned for `order_id` (0 if none).
    pub fn units_for(&self, order_id: &str) -> u64 {
        self.grant(order_id).map(|g| g.units).unwrap_or(0)
    }

    /// Free units nobody gets now (the cap keeps them, or nobody waits for them).
    pub fn left(&self) -> u64 {
        self.free - self.allocated
    }
}

/// `floor(percent × total / 100)`.
fn percent_of(percent: u32, total: u64) -> u64 {
    u64::try_from(u128::from(percent) * u128::from(total) / 100).unwrap_or(u64::MAX)
}

/// Decides who gets how many of `free` units under `policy`, given the units each buyer holds already
/// (`allocated`: held, committed and shipped, by buyer; buyers without waiting orders count towards the
/// total) and the backlog (orders waiting for stock; any order, oldest first within a buyer).
///
/// * Without a cap, `min(free, waiting)` units are handed out.
/// * With a cap of `p` %, a buyer `b` holding `a_b` may end with at most `⌊p·S/100⌋` units, where `S` is
///   the product's allocated total *after* this allocation. The largest amount `X ≤ free` that can be
///   handed out without any buyer passing its cap is found by descending from `min(free, waiting)`:
///   while the buyers' room at total `T + X` adds up to less than `X`, no amount between that room and
///   `X` can work either (the room only shrinks as `X` does), so `X` drops to it.
/// * `X` is then shared by the strategy, each buyer limited to what it waits for and its room.
pub fn plan(policy: Policy, free: u64, allocated: &BTreeMap<String, u64>, backlog: &[Waiting]) -> SharePlan {
    let mut orders: Vec<&Waiting> = backlog.iter().filter(|w| w.outstanding > 0).collect();
    orders.sort_by_key(|w| w.seq);
    // Buyers, oldest first.
    let mut index: BTreeMap<&str, usize> = BTreeMap::new();
    let mut buyers: Vec<BuyerShare> = Vec::new();
    for w in &orders {
        let i = *index.entry(w.buyer_id.as_str()).or_insert_with(|| {
            buyers.push(BuyerShare {
                buyer_id: w.buyer_id.clone(),
                orders: 0,
                waiting_units: 0,
                earliest_seq: w.seq,
                allocated_before: allocated.get(&w.buyer_id).copied().unwrap_or(0),
                units: 0,
                limit: 0,
                capped: false,
            });
            buyers.len() - 1
        });
        buyers[i].orders += 1;
        buyers[i].waiting_units = buyers[i].waiting_units.saturating_add(w.outstanding);
    }
    let total_before: u64 = allocated.values().fold(0u64, |s, a| s.saturating_add(*a));
    let waiting: u64 = buyers.iter().fold(0u64, |s, b| s.saturating_add(b.waiting_units));

    // How much can be handed out, and each buyer's limit.
    let mut x = free.min(waiting);
    let limit = |b: &BuyerShare, x: u64| match policy.cap() {
        None => b.waiting_units,
        Some(p) => {
            b.waiting_units.min(percent_of(p, total_before.saturating_add(x)).saturating_sub(b.allocated_before))
        }
    };
    if policy.cap().is_some() {
        loop {
            let room: u64 = buyers.iter().fold(0u64, |s, b| s.saturating_add(limit(b, x)));
            if room >= x {
                break;
            }
            x = room;
        }
    }
    for b in &mut buyers {
        b.limit = limit(b, x);
    }

    // Share X among the buyers.
    match policy.strategy {
        Strategy::ProRata => pro_rata(&mut buyers, x),
        Strategy::Fifo | Strategy::Unspecified => {
            let mut left = x;
            for w in &orders {
                if left == 0 {
                    break;
                }
                let b = &mut buyers[index[w.buyer_id.as_str()]];
                let take = w.outstanding.min(b.limit - b.units).min(left);
                b.units += take;
                left -= take;
            }
        }
    }
    let capped_percent = policy.cap().unwrap_or(0);
    for b in &mut buyers {
        b.capped = policy.cap().is_some() && b.units < b.waiting_units && b.units == b.limit;
    }

    // Inside each buyer, oldest order first.
    let mut left: Vec<u64> = buyers.iter().map(|b| b.units).collect();
    let mut grants = Vec::new();
    for w in &orders {
        let i = index[w.buyer_id.as_str()];
        let take = w.outstanding.min(left[i]);
        if take == 0 {
            continue;
        }
        left[i] -= take;
        let b = &buyers[i];
        grants.push(Grant {
            order_id: w.order_id.clone(),
            buyer_id: w.buyer_id.clone(),
            seq: w.seq,
            units: take,
            note: ShareNote {
                strategy: policy.strategy as i32,
                buyer_units: b.units,
                of_units: x,
                buyers: u32::try_from(buyers.len()).unwrap_or(u32::MAX),
                capped_percent: if b.capped { capped_percent } else { 0 },
            },
        });
    }
    let index = grants.iter().enumerate().map(|(i, g)| (g.order_id.clone(), i)).collect();
    SharePlan { policy, free, allocated_before: total_before, allocated: x, grants, buyers, index }
}

/// Shares `x` units among `buyers` in proportion to what each waits for, none above its limit (what
/// one can't take goes to the others), the fractions rounded by largest remainder with ties to the
/// buyer with the earliest order. `x` is at most the sum of the limits.
fn pro_rata(buyers: &mut [BuyerShare], x: u64) {
    let mut active: Vec<usize> = (0..buyers.len()).filter(|&i| buyers[i].limit > 0).collect();
    let mut left = u128::from(x);
    // Buyers whose limit is below their exact share at the current rate are saturated (they are in
    // the final sharing too: the rate only rises as others drop out); the rest share what is left.
    loop {
        let weight: u128 = active.iter().map(|&i| u128::from(buyers[i].waiting_units)).sum();
        if weight == 0 {
            return;
        }
        let (full, rest): (Vec<usize>, Vec<usize>) = active
            .iter()
            .partition(|&&i| u128::from(buyers[i].limit) * weight <= left * u128::from(buyers[i].waiting_units));
        if full.is_empty() {
            break;
        }
        for i in full {
            buyers[i].units = buyers[i].limit;
            left -= u128::from(buyers[i].limit);
        }
        active = rest;
    }
    let weight: u128 = active.iter().map(|&i| u128::from(buyers[i].waiting_units)).sum();
    let mut remainders: Vec<(u128, u64, usize)> = Vec::with_capacity(active.len());
    let mut given: u128 = 0;
    for &i in &active {
        let exact = left * u128::from(buyers[i].waiting_units);
        let floor = exact / weight;
        buyers[i].units = u64::try_from(floor).unwrap_or(u64::MAX);
        given += floor;
        remainders.push((exact % weight, buyers[i].earliest_seq, i));
    }
    // Largest remainder first, then the earliest order.
    remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let extra = usize::try_from(left - given).unwrap_or(usize::MAX);
    for &(_, _, i) in remainders.iter().take(extra) {
        buyers[i].units += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::{HoldAsk, HoldPlanner, HoldRecord, HoldStatus, StockRecord};

    fn w(id: &str, buyer: &str, seq: u64, outstanding: u64) -> Waiting {
        Waiting { order_id: id.into(), buyer_id: buyer.into(), seq, outstanding }
    }

    fn units(plan: &SharePlan) -> Vec<(&str, u64)> {
        plan.grants.iter().map(|g| (g.order_id.as_str(), g.units)).collect()
    }

    const PRO_RATA: Policy = Policy { strategy: Strategy::ProRata, max_share_percent: 0 };

    #[test]
    fn fifo_serves_the_oldest_order_first_whoever_placed_it() {
        let backlog = [w("a1", "a", 1, 300), w("b1", "b", 2, 100), w("a2", "a", 3, 50)];
        let p = plan(Policy::FIFO, 350, &BTreeMap::new(), &backlog);
        assert_eq!(units(&p), [("a1", 300), ("b1", 50)]);
        assert_eq!((p.allocated, p.left()), (350, 0));
        assert_eq!(p.grants[1].note.describe("H200"), "first come, first served: 50 of 350 units: 2 buyers waiting");
    }

    #[test]
    fn pro_rata_splits_by_outstanding_units_with_largest_remainders() {
        // a waits for 300, b for 100, c for 100: 400 units split 240 / 80 / 80.
        let backlog = [w("a1", "a", 1, 200), w("b1", "b", 2, 100), w("a2", "a", 3, 100), w("c1", "c", 4, 100)];
        let p = plan(PRO_RATA, 400, &BTreeMap::new(), &backlog);
        assert_eq!(units(&p), [("a1", 200), ("b1", 80), ("a2", 40), ("c1", 80)], "inside a, oldest first");
        assert_eq!(p.grants[1].note.describe("H200"), "pro-rata share 80 of 400 units: 3 buyers waiting");
        // 10 units over 3 equal buyers: 3.33 each, the spare unit to the earliest order's buyer.
        let backlog = [w("c1", "c", 1, 50), w("a1", "a", 2, 50), w("b1", "b", 3, 50)];
        let p = plan(PRO_RATA, 10, &BTreeMap::new(), &backlog);
        assert_eq!(units(&p), [("c1", 4), ("a1", 3), ("b1", 3)]);
        // Largest remainder beats the earlier order: 7 units over 5 and 2 → 5 and 2 exactly; over 6 and 3: 4.67/2.33.
        let backlog = [w("x1", "x", 1, 3), w("y1", "y", 2, 6)];
        let p = plan(PRO_RATA, 7, &BTreeMap::new(), &backlog);
        assert_eq!(units(&p), [("x1", 2), ("y1", 5)]);
    }

    #[test]
    fn pro_rata_never_gives_more_than_waited_for_and_the_rest_goes_round_again() {
        // Exact shares of 100 over (10, 500, 490): 1, 50, 49 — all under their needs.
        // Of 900: 9, 450, 441 → fine. Of 990 with a waiting for 10: a takes all 10, the other 980 split.
        let backlog = [w("a1", "a", 1, 10), w("b1", "b", 2, 500), w("c1", "c", 3, 490)];
        let p = plan(PRO_RATA, 990, &BTreeMap::new(), &backlog);
        assert_eq!(units(&p), [("a1", 10), ("b1", 495), ("c1", 485)]);
        // More free than waited for: everyone gets everything, the rest stays.
        let p = plan(PRO_RATA, 5000, &BTreeMap::new(), &backlog);
        assert_eq!((p.allocated, p.left()), (1000, 4000));
    }

    #[test]
    fn a_cap_keeps_any_buyer_under_its_share_of_everything_allocated() {
        // a already holds 300 of 400 allocated; cap 40 %. 200 units arrive for a and b (each wants 500).
        let allocated: BTreeMap<String, u64> = [("a".to_string(), 300), ("b".to_string(), 100)].into();
        let backlog = [w("a1", "a", 1, 500), w("b1", "b", 2, 500)];
        let p = plan(Policy { strategy: Strategy::Fifo, max_share_percent: 40 }, 200, &allocated, &backlog);
        // After: total 600, cap 240: a (300) gets nothing, b (100) may reach 240 → 140; total 540 → cap 216:
        // b can only reach 216 → 116 ... the largest X that works is found: check the invariant instead.
        let total = 400 + p.allocated;
        for b in &p.buyers {
            assert!(b.allocated_before + b.units <= total * 40 / 100 || b.units == 0, "{b:?}");
        }
        assert_eq!(p.buyers[0].units, 0);
        assert!(p.buyers[0].capped && p.buyers[1].capped);
        assert_eq!(p.allocated, p.buyers[1].units);
        assert!(p.grants[0].note.describe("H200").ends_with("; capped at 40 % of H200 allocated"));
        // One buyer alone can never take anything under a cap (it would hold 100 %).
        let p = plan(
            Policy { strategy: Strategy::ProRata, max_share_percent: 40 },
            100,
            &BTreeMap::new(),
            &[w("a1", "a", 1, 50)],
        );
        assert_eq!(p.allocated, 0);
        assert!(p.buyers[0].capped);
        // Three equal buyers under 40 % share an empty product: a third each fits.
        let backlog = [w("a1", "a", 1, 500), w("b1", "b", 2, 500), w("c1", "c", 3, 500)];
        let p = plan(Policy { strategy: Strategy::ProRata, max_share_percent: 40 }, 300, &BTreeMap::new(), &backlog);
        assert_eq!(units(&p), [("a1", 100), ("b1", 100), ("c1", 100)]);
        // FIFO under the same cap: the first two fill up to 40 % each, the third takes the rest.
        let p = plan(Policy { strategy: Strategy::Fifo, max_share_percent: 40 }, 300, &BTreeMap::new(), &backlog);
        assert_eq!(units(&p), [("a1", 120), ("b1", 120), ("c1", 60)]);
    }

    #[test]
    fn stored_policies_keep_their_latest_changes() {
        let mut r = PolicyRecord { sku: "H200".into(), changes: vec![] };
        assert_eq!(r.policy(), Policy::FIFO);
        assert!(!r.policy().planned());
        for i in 0..(KEPT_CHANGES + 5) {
            r.change(Policy { strategy: Strategy::ProRata, max_share_percent: 40 }, i as u64, "vendor", "fair", "r");
        }
        assert_eq!(r.changes.len(), KEPT_CHANGES);
        assert_eq!(r.current().map(|c| c.revision), Some(KEPT_CHANGES as u64 + 5));
        assert_eq!(r.policy().describe(), "PRO_RATA, capped at 40 % per buyer");
        assert!(r.policy().planned());
        assert!(Policy { strategy: Strategy::Fifo, max_share_percent: 100 }.cap().is_none());
    }

    /// A tiny seeded generator (the domain crate has no dependencies to spare).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
    }

    fn random_case(rng: &mut Rng) -> (Policy, u64, BTreeMap<String, u64>, Vec<Waiting>) {
        let buyers = 1 + rng.below(6);
        // Buyers of very different sizes, so small ones fill up and the rest goes round again.
        let scales: Vec<u64> = (0..buyers).map(|_| [5, 50, 300, 1000][rng.below(4) as usize]).collect();
        let mut backlog = Vec::new();
        for i in 0..rng.below(25) {
            let b = rng.below(buyers);
            backlog.push(w(&format!("o{i}"), &format!("b{b}"), 1 + rng.below(1000), rng.below(scales[b as usize])));
        }
        // Distinct placement sequences, as orders have.
        backlog.sort_by_key(|o| o.seq);
        for (i, o) in backlog.iter_mut().enumerate() {
            o.seq = i as u64 * 3 + 1;
        }
        let mut allocated: BTreeMap<String, u64> = BTreeMap::new();
        for b in 0..buyers + 1 {
            if rng.below(2) == 0 {
                allocated.insert(format!("b{b}"), rng.below(500));
            }
        }
        let strategy = if rng.below(2) == 0 { Strategy::Fifo } else { Strategy::ProRata };
        let max_share_percent = match rng.below(4) {
            0 => 0,
            1 => 100,
            _ => 1 + rng.below(99) as u32,
        };
        (Policy { strategy, max_share_percent }, rng.below(2000), allocated, backlog)
    }

    /// Over random backlogs, holdings, strategies and caps: units are conserved (no order gets more
    /// than it waits for, nothing beyond the free units), caps are never exceeded and the amount handed
    /// out is the most any allocation under the cap could, pro-rata shares are within one unit of the
    /// exact water-filling shares, and no order gets units while an earlier order of its buyer is short.
    #[test]
    fn plans_conserve_respect_caps_share_exactly_and_never_overtake_inside_a_buyer() {
        // How often the interesting cases came up (so the seeds are known to reach them).
        let (mut capped, mut filled_up) = (0, 0);
        for seed in 1..=3000u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            let (policy, free, allocated, backlog) = random_case(&mut rng);
            let p = plan(policy, free, &allocated, &backlog);
            if p.allocated > 0 && p.buyers.iter().any(|b| b.capped) {
                capped += 1;
            }
            // A capped buyer's surplus went round to others that could take it.
            if policy.strategy == Strategy::ProRata
                && p.buyers.iter().any(|b| b.capped)
                && p.buyers.iter().any(|b| b.units > 0 && b.units < b.limit)
            {
                filled_up += 1;
            }
            let total_before: u64 = allocated.values().sum();
            let waiting: u64 = backlog.iter().map(|o| o.outstanding).sum();
            // Conservation.
            let granted: u64 = p.grants.iter().map(|g| g.units).sum();
            assert_eq!(granted, p.allocated, "seed {seed}");
            assert!(p.allocated <= free.min(waiting), "seed {seed}");
            for g in &p.grants {
                let o = backlog.iter().find(|o| o.order_id == g.order_id).expect("known order");
                assert!(g.units >= 1 && g.units <= o.outstanding, "seed {seed}: {g:?}");
            }
            for b in &p.buyers {
                let got: u64 = p.grants.iter().filter(|g| g.buyer_id == b.buyer_id).map(|g| g.units).sum();
                assert_eq!(got, b.units, "seed {seed}");
                assert!(b.units <= b.waiting_units, "seed {seed}");
            }
            // Caps: never exceeded, and nothing more could have been handed out.
            match policy.cap() {
                None => assert_eq!(p.allocated, free.min(waiting), "seed {seed}: without a cap all that can go, goes"),
                Some(cap) => {
                    let total = total_before + p.allocated;
                    for b in p.buyers.iter().filter(|b| b.units > 0) {
                        assert!(
                            b.allocated_before + b.units <= percent_of(cap, total),
                            "seed {seed}: {} ends at {} of {total} (cap {cap} %)",
                            b.buyer_id,
                            b.allocated_before + b.units
                        );
                    }
                    // Maximal: no larger amount fits every buyer's room.
                    for bigger in p.allocated + 1..=free.min(waiting) {
                        let room: u64 = p
                            .buyers
                            .iter()
                            .map(|b| {
                                b.waiting_units
                                    .min(percent_of(cap, total_before + bigger).saturating_sub(b.allocated_before))
                            })
                            .sum();
                        assert!(room < bigger, "seed {seed}: {bigger} units would have fit (room {room})");
                    }
                }
            }
            // Pro-rata: within one unit of the exact water-filling shares under the same limits.
            if policy.strategy == Strategy::ProRata && p.allocated > 0 {
                let exact = water_fill(&p.buyers, p.allocated);
                for (b, e) in p.buyers.iter().zip(&exact) {
                    assert!(
                        (b.units as f64 - e).abs() < 1.0 + 1e-6,
                        "seed {seed}: {} gets {} for {e}",
                        b.buyer_id,
                        b.units
                    );
                    assert!(b.units <= b.limit, "seed {seed}");
                }
            }
            // FIFO: an order gets units only once every earlier order (of any buyer not held back by
            // its limit) got all it waits for.
            if policy.strategy == Strategy::Fifo {
                let mut sorted = backlog.clone();
                sorted.sort_by_key(|o| o.seq);
                let mut short_unlimited = false;
                for o in &sorted {
                    let got = p.units_for(&o.order_id);
                    let b = p.buyers.iter().find(|b| b.buyer_id == o.buyer_id);
                    if got > 0 {
                        assert!(!short_unlimited, "seed {seed}: {} overtook an earlier order", o.order_id);
                    }
                    if got < o.outstanding && b.is_some_and(|b| b.units < b.limit) {
                        short_unlimited = true;
                    }
                }
            }
            // No overtaking inside a buyer.
            let mut short: std::collections::BTreeSet<&str> = Default::default();
            let mut sorted = backlog.clone();
            sorted.sort_by_key(|o| o.seq);
            for o in &sorted {
                let got = p.units_for(&o.order_id);
                if got > 0 {
                    assert!(
                        !short.contains(o.buyer_id.as_str()),
                        "seed {seed}: {} overtook its buyer's earlier order",
                        o.order_id
                    );
                }
                if got < o.outstanding {
                    short.insert(o.buyer_id.as_str());
                }
            }
        }
        assert!(capped > 100 && filled_up > 20, "cases reached: capped {capped}, filled up {filled_up}");
    }

    /// The exact pro-rata shares of `x` under each buyer's limit, by bisection on the rate.
    fn water_fill(buyers: &[BuyerShare], x: u64) -> Vec<f64> {
        let shares = |rate: f64| -> Vec<f64> {
            buyers.iter().map(|b| (b.limit as f64).min(rate * b.waiting_units as f64)).collect()
        };
        let (mut lo, mut hi) = (0.0f64, 1.0f64);
        while shares(hi).iter().sum::<f64>() < x as f64 {
            hi *= 2.0;
        }
        for _ in 0..200 {
            let mid = (lo + hi) / 2.0;
            if shares(mid).iter().sum::<f64>() < x as f64 { lo = mid } else { hi = mid }
        }
        shares(hi)
    }

    /// FIFO without a cap is exactly what inventory does when it serves the backlog in order (today's
    /// behaviour): the plan and inventory's own hold planner agree order by order.
    #[test]
    fn fifo_without_a_cap_is_inventory_serving_the_backlog_in_order() {
        for seed in 1..=500u64 {
            let mut rng = Rng(seed | 1);
            let (_, free, allocated, backlog) = random_case(&mut rng);
            let p = plan(Policy::FIFO, free, &allocated, &backlog);
            let mut stock = StockRecord::empty("H200");
            stock.receive(free);
            let mut planner = HoldPlanner::new(stock, 1);
            let mut sorted = backlog.clone();
            sorted.sort_by_key(|o| o.seq);
            for o in sorted.iter().filter(|o| o.outstanding > 0) {
                // Each order already holds 7 units of the 7 + outstanding it asked for.
                let existing = HoldRecord {
                    order_id: o.order_id.clone(),
                    generation: 1,
                    requested: o.outstanding + 7,
                    held: 7,
                    status: HoldStatus::Held as i32,
                    ..Default::default()
                };
                let ask = HoldAsk {
                    order_id: crate::ids::OrderId::from_trusted(o.order_id.clone()),
                    generation: 1,
                    units: o.outstanding + 7,
                    allow_partial: true,
                    hold_seconds: 60,
                    known_held: Some(7),
                    max_units: None,
                };
                let (_, hold) = planner.plan(&ask, Some(&existing)).expect("same units");
                let got = hold.map(|h| h.held - 7).unwrap_or(0);
                assert_eq!(got, p.units_for(&o.order_id), "seed {seed}: {}", o.order_id);
            }
        }
    }
}
