//! The reference model: what the world must look like, in plain Rust, written from the API's contract
//! (the proto comments, the README and issue 14), not from the services' code — nothing here calls
//! `chipgate-domain`.
//!
//! The parties that own a piece of the world are sequential clients (one import authority, one customs
//! office, one export authority, one vendor), so the model knows exactly what each of their calls must
//! answer. What several parties touch at once (an application a buyer withdraws while the authority
//! grants it) is tracked with an in-flight count and an epoch: a call that overlapped another one on
//! the same thing may see either order, and the model accepts both answers but learns from whichever
//! came. Orders move on their own (propagation, hold expiry), so for them the model keeps what it knows
//! for sure (placed, cancelled, confirmed, shipped, acknowledged) and judges the rest once the cluster
//! has settled, with its own eligibility rules ([`Model::verdict`]).
//!
//! Every change the parties make is kept on a [`Timeline`] with the wall-clock interval of its call, so
//! that an order's history can be checked against what the world certainly was at each of its steps.

use std::collections::{BTreeMap, HashMap};

/// Slack around a call's interval when deciding what the world certainly was at an instant (server and
/// client share the host's clock; this covers millisecond rounding and scheduling).
pub const MARGIN_MS: u64 = 100;

/// Milliseconds since the epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A value that changes by calls, with each change's call interval.
#[derive(Clone, Debug)]
pub struct Timeline<T> {
    initial: T,
    /// (first attempt sent, answer received, new value), in the order the answers came.
    changes: Vec<(u64, u64, T)>,
}

impl<T: Clone + PartialEq> Timeline<T> {
    pub fn new(initial: T) -> Self {
        Timeline { initial, changes: Vec::new() }
    }

    /// Records an acknowledged change made by a call sent at `from` and answered at `to`.
    pub fn set(&mut self, from: u64, to: u64, value: T) {
        self.changes.push((from, to, value));
    }

    /// The value now (after every acknowledged change).
    pub fn now(&self) -> T {
        self.changes.last().map(|c| c.2.clone()).unwrap_or_else(|| self.initial.clone())
    }

    /// The value throughout `[from, to]`, when it is certain and the same all along: no change's call
    /// was under way in that window (a decision made somewhere in it saw this value).
    pub fn over(&self, from: u64, to: u64) -> Option<T> {
        let v = self.at(from)?;
        for (f, a, value) in &self.changes {
            if *f <= to + MARGIN_MS && a + MARGIN_MS >= from && *value != v {
                return None;
            }
        }
        Some(v)
    }

    /// The value at instant `t`, when it is certain: no change's call was under way around `t`.
    pub fn at(&self, t: u64) -> Option<T> {
        let mut v = self.initial.clone();
        for (from, to, value) in &self.changes {
            if t + MARGIN_MS >= *from && t <= to + MARGIN_MS {
                if *value == v {
                    continue;
                }
                return None;
            }
            if *to < t {
                v = value.clone();
            }
        }
        Some(v)
    }
}

/// Where an application stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppState {
    Queued,
    Granted,
    Withdrawn,
    Rejected,
}

/// Calls under way on one thing (an application, an order) that may change it, so that a call can
/// tell whether another one overlapped it (then either order of the two is possible).
#[derive(Clone, Copy, Debug, Default)]
pub struct Contention {
    busy: u32,
    epoch: u64,
}

/// What [`Contention::begin`] or [`Contention::peek`] saw.
#[derive(Clone, Copy, Debug)]
pub struct Began {
    epoch: u64,
    contended: bool,
}

impl Contention {
    /// A call that may change the thing starts.
    pub fn begin(&mut self) -> Began {
        let contended = self.busy > 0;
        self.busy += 1;
        self.epoch += 1;
        Began { epoch: self.epoch, contended }
    }

    /// It ended; true when another such call overlapped it.
    pub fn end(&mut self, b: Began) -> bool {
        self.busy = self.busy.saturating_sub(1);
        b.contended || self.epoch != b.epoch
    }

    /// A call that only depends on the thing's state starts.
    pub fn peek(&self) -> Began {
        Began { epoch: self.epoch, contended: self.busy > 0 }
    }

    /// It ended; true when a change overlapped it.
    pub fn unpeek(&self, b: Began) -> bool {
        b.contended || self.epoch != b.epoch || self.busy > 0
    }

    pub fn busy(&self) -> bool {
        self.busy > 0
    }
}

/// An application as the model knows it.
#[derive(Clone, Debug)]
pub struct App {
    pub id: String,
    pub buyer: String,
    pub sku: String,
    pub quantity: u64,
    pub destination: String,
    pub state: AppState,
    pub licence: Option<String>,
    /// The authority moved it in the queue (its place is no longer its submission order).
    pub moved: bool,
    /// Calls that may change its state (withdraw, reject, a publish granting it).
    pub c: Contention,
}

/// A licence's conditions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cond {
    pub valid_from_ms: u64,
    pub valid_until_ms: u64,
    pub cap: u64,
    pub ratio_bps: u32,
    pub justification: bool,
    pub terms_pending: bool,
}

impl Cond {
    pub fn expired(&self, now: u64) -> bool {
        self.valid_until_ms != 0 && now >= self.valid_until_ms
    }
}

/// A licence's stored status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LicStatus {
    PendingTerms,
    Active,
    Suspended,
    Revoked,
}

/// A licence as the model knows it.
#[derive(Clone, Debug)]
pub struct Lic {
    pub id: String,
    pub buyer: String,
    pub sku: String,
    pub destination: String,
    pub app: String,
    pub wave: String,
    pub granted: u64,
    /// Creation order (older licences serve first).
    pub seq: u64,
    /// Status and conditions over time.
    pub line: Timeline<(LicStatus, Cond)>,
}

impl Lic {
    pub fn status(&self) -> LicStatus {
        self.line.now().0
    }

    pub fn cond(&self) -> Cond {
        self.line.now().1
    }
}

/// A draft or published wave.
#[derive(Clone, Debug)]
pub struct Wave {
    pub id: String,
    pub published: bool,
    /// (application, units, conditions), in the order first added.
    pub grants: Vec<(String, u64, Cond)>,
}

/// A domestic purchase the authority recorded.
#[derive(Clone, Debug)]
pub struct Purchase {
    pub evidence: String,
    pub units: u64,
    pub supplier: String,
    pub from: u64,
}

/// What the model knows for sure about an order.
#[derive(Clone, Debug, Default)]
pub struct Order {
    pub id: String,
    pub request_id: String,
    pub buyer: String,
    pub sku: String,
    pub units: u64,
    pub justification: String,
    /// When the buyer's cancel / confirm / the vendor's ship was acknowledged (ms).
    pub cancelled: Option<u64>,
    pub confirmed: Option<u64>,
    pub shipped: Option<u64>,
    /// Ship and cancel calls (the two that race).
    pub c: Contention,
}

/// Why a licence can't serve an order (the model's own condition names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fails {
    Embargo,
    Revoked,
    Expired,
    TermsPending,
    Suspended,
    NotYetValid,
    NoExport,
    Cap,
    QuotaNever,
    QuotaShort,
    Ratio,
    Justification,
}

impl Fails {
    /// Can never pass under this licence.
    pub fn permanent(self) -> bool {
        matches!(self, Fails::Revoked | Fails::Expired | Fails::Cap | Fails::QuotaNever | Fails::Justification)
    }

    /// About capacity that may come back (quota returned, more domestic purchases).
    pub fn capacity(self) -> bool {
        matches!(self, Fails::QuotaShort | Fails::Ratio)
    }
}

/// What the model says about a waiting order.
#[derive(Clone, Debug, Default)]
pub struct Verdict {
    /// The licence that would serve it now.
    pub eligible: Option<String>,
    /// Every licence's failures.
    pub failures: Vec<(String, Fails)>,
    /// It can never be served by the buyer's licences (and none is pending terms).
    pub rejectable: bool,
    /// It waits for capacity: the buyer's later orders must wait behind it.
    pub blocks: bool,
}

/// Ceiling of a × b / c.
pub fn mul_div_ceil(a: u64, b: u64, c: u64) -> u64 {
    let p = u128::from(a) * u128::from(b);
    let c = u128::from(c.max(1));
    p.div_ceil(c).min(u128::from(u64::MAX)) as u64
}

/// The whole model.
#[derive(Clone, Debug, Default)]
pub struct Model {
    pub apps: BTreeMap<String, App>,
    pub waves: BTreeMap<String, Wave>,
    pub licences: BTreeMap<String, Lic>,
    /// Per product: embargoed?
    pub embargo: BTreeMap<String, Timeline<bool>>,
    /// Per (product, destination): None never granted, Some(active).
    pub exports: BTreeMap<(String, String), Timeline<Option<bool>>>,
    /// Per buyer: purchases by evidence.
    pub domestic: BTreeMap<String, Vec<Purchase>>,
    /// Receipt id → (product, units), acknowledged.
    pub receipts: BTreeMap<String, (String, u64)>,
    /// Per product: units of receipts under way.
    pub receiving: BTreeMap<String, u64>,
    /// Orders by id.
    pub orders: BTreeMap<String, Order>,
    /// Request ids of acknowledged placements.
    pub placed: Vec<String>,
    /// Acknowledged licensing changes that must each leave exactly one audit entry: (actor, request id,
    /// what).
    pub audited: Vec<(String, String, &'static str)>,
    /// Request ids of refused licensing calls: they must leave no audit entry.
    pub refused: Vec<String>,
    /// Every violation found, in words.
    pub violations: Vec<String>,
}

impl Model {
    pub fn violation(&mut self, v: impl Into<String>) {
        let v = v.into();
        eprintln!("VIOLATION: {v}");
        self.violations.push(v);
    }

    pub fn embargoed_now(&self, sku: &str) -> bool {
        self.embargo.get(sku).map(Timeline::now).unwrap_or(false)
    }

    pub fn export_now(&self, sku: &str, dest: &str) -> Option<bool> {
        self.exports.get(&(sku.to_string(), dest.to_string())).and_then(Timeline::now)
    }

    pub fn domestic_total(&self, buyer: &str) -> u64 {
        self.domestic.get(buyer).map(|v| v.iter().map(|p| p.units).sum()).unwrap_or(0)
    }

    /// Domestic units the buyer had at most at instant `t` (every purchase whose call had started).
    pub fn domestic_upper(&self, buyer: &str, t: u64) -> u64 {
        self.domestic
            .get(buyer)
            .map(|v| v.iter().filter(|p| p.from <= t + MARGIN_MS).map(|p| p.units).sum())
            .unwrap_or(0)
    }

    /// The buyer's licences for the product, oldest first.
    pub fn licences_of(&self, buyer: &str, sku: &str) -> Vec<&Lic> {
        let mut v: Vec<&Lic> = self.licences.values().filter(|l| l.buyer == buyer && l.sku == sku).collect();
        v.sort_by_key(|l| l.seq);
        v
    }

    /// Whether the buyer has an application for the product that is (or may be) open.
    pub fn open_application(&self, buyer: &str, sku: &str) -> Option<&App> {
        self.apps.values().find(|a| a.buyer == buyer && a.sku == sku && (a.state == AppState::Queued || a.c.busy()))
    }

    /// Evaluates an order of `units` with `justification` by `buyer` for `sku` against the world as it
    /// is now, with `used[licence]` units of each licence in use.
    pub fn verdict(
        &self,
        buyer: &str,
        sku: &str,
        units: u64,
        justification: &str,
        used: &HashMap<String, u64>,
        now: u64,
    ) -> Verdict {
        let mut v = Verdict::default();
        let embargoed = self.embargoed_now(sku);
        if embargoed {
            v.failures.push((String::new(), Fails::Embargo));
        }
        let domestic = self.domestic_total(buyer);
        let (mut live, mut all_permanent, mut pending) = (0, true, false);
        for l in self.licences_of(buyer, sku) {
            let c = l.cond();
            let mut f = Vec::new();
            if l.status() == LicStatus::Revoked {
                v.failures.push((l.id.clone(), Fails::Revoked));
                continue;
            }
            if c.expired(now) {
                v.failures.push((l.id.clone(), Fails::Expired));
                continue;
            }
            live += 1;
            if l.status() == LicStatus::PendingTerms {
                // Provisional terms may still change: nothing else about this licence counts yet.
                pending = true;
                all_permanent = false;
                v.failures.push((l.id.clone(), Fails::TermsPending));
                continue;
            }
            if l.status() == LicStatus::Suspended {
                f.push(Fails::Suspended);
            }
            if c.valid_from_ms != 0 && now < c.valid_from_ms {
                f.push(Fails::NotYetValid);
            }
            if self.export_now(sku, &l.destination) != Some(true) {
                f.push(Fails::NoExport);
            }
            if c.cap != 0 && units > c.cap {
                f.push(Fails::Cap);
            }
            let in_use = used.get(&l.id).copied().unwrap_or(0);
            if units > l.granted {
                f.push(Fails::QuotaNever);
            } else if units > l.granted.saturating_sub(in_use) {
                f.push(Fails::QuotaShort);
            }
            if c.ratio_bps > 0 && domestic < mul_div_ceil(in_use + units, u64::from(c.ratio_bps), 10_000) {
                f.push(Fails::Ratio);
            }
            if c.justification && justification.trim().is_empty() {
                f.push(Fails::Justification);
            }
            if f.is_empty() && !embargoed {
                v.eligible = Some(l.id.clone());
                v.failures.clear();
                return v;
            }
            all_permanent &= f.iter().any(|x| x.permanent());
            // Waiting for capacity (so the buyer's later orders queue behind): a licence fails the order
            // for capacity that may come back, and for nothing it can never pass.
            v.blocks |= f.iter().any(|x| x.capacity()) && !f.iter().any(|x| x.permanent());
            v.failures.extend(f.into_iter().map(|x| (l.id.clone(), x)));
        }
        v.rejectable = live > 0 && all_permanent && !pending;
        if v.rejectable {
            v.blocks = false;
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn world() -> Model {
        let mut m = Model::default();
        let mut line = Timeline::new((LicStatus::Active, Cond { cap: 100, ratio_bps: 5000, ..Cond::default() }));
        line.set(10, 20, (LicStatus::Active, Cond { cap: 100, ratio_bps: 5000, ..Cond::default() }));
        m.licences.insert(
            "lic-1".into(),
            Lic {
                id: "lic-1".into(),
                buyer: "b".into(),
                sku: "S".into(),
                destination: "CN".into(),
                app: "app-1".into(),
                wave: "wave-1".into(),
                granted: 300,
                seq: 1,
                line,
            },
        );
        let mut e = Timeline::new(None);
        e.set(0, 1, Some(true));
        m.exports.insert(("S".into(), "CN".into()), e);
        m.domestic.insert(
            "b".into(),
            vec![Purchase { evidence: "e".into(), units: 100, supplier: "huawei".into(), from: 0 }],
        );
        m
    }

    #[test]
    fn an_order_within_every_condition_is_eligible() {
        let m = world();
        let v = m.verdict("b", "S", 100, "", &HashMap::new(), 1000);
        assert_eq!(v.eligible.as_deref(), Some("lic-1"));
    }

    #[test]
    fn above_the_cap_under_the_only_licence_is_rejectable() {
        let m = world();
        let v = m.verdict("b", "S", 101, "", &HashMap::new(), 1000);
        assert!(v.eligible.is_none() && v.rejectable && !v.blocks, "{v:?}");
    }

    #[test]
    fn short_quota_and_ratio_block_later_orders() {
        let m = world();
        let used = HashMap::from([("lic-1".to_string(), 250)]);
        let v = m.verdict("b", "S", 100, "", &used, 1000);
        assert!(v.eligible.is_none() && !v.rejectable && v.blocks, "{v:?}");
        assert!(v.failures.iter().any(|f| f.1 == Fails::QuotaShort));
        // 100 domestic units cover 200 licensed units at 50 %: 150 in use + 100 more needs 125.
        let used = HashMap::from([("lic-1".to_string(), 150)]);
        let v = m.verdict("b", "S", 100, "", &used, 1000);
        assert_eq!(v.failures, vec![("lic-1".to_string(), Fails::Ratio)]);
    }

    #[test]
    fn an_embargo_or_a_revoked_export_closes_every_licence() {
        let mut m = world();
        let mut e = Timeline::new(false);
        e.set(5, 6, true);
        m.embargo.insert("S".into(), e);
        let v = m.verdict("b", "S", 10, "", &HashMap::new(), 1000);
        assert!(v.eligible.is_none() && !v.rejectable && !v.blocks, "{v:?}");
        let mut m = world();
        m.exports.get_mut(&("S".to_string(), "CN".to_string())).unwrap().set(7, 8, Some(false));
        let v = m.verdict("b", "S", 10, "", &HashMap::new(), 1000);
        assert_eq!(v.failures, vec![("lic-1".to_string(), Fails::NoExport)]);
    }

    #[test]
    fn a_timeline_is_uncertain_only_around_a_change() {
        let mut t = Timeline::new(false);
        t.set(1_000, 1_050, true);
        assert_eq!(t.at(500), Some(false));
        assert_eq!(t.at(1_020), None);
        assert_eq!(t.at(1_140), None);
        assert_eq!(t.at(1_200), Some(true));
        assert!(t.now());
        assert_eq!(t.over(200, 800), Some(false));
        assert_eq!(t.over(800, 1_300), None, "the change falls inside the window");
        assert_eq!(t.over(1_200, 5_000), Some(true));
    }

    #[test]
    fn ratios_round_up() {
        assert_eq!(mul_div_ceil(1, 2500, 10_000), 1);
        assert_eq!(mul_div_ceil(400, 2500, 10_000), 100);
        assert_eq!(mul_div_ceil(401, 2500, 10_000), 101);
    }
}
