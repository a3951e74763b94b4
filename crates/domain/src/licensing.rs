//! Licensing rules: applications, licences and their conditions, and eligibility.
//!
//! A licence moves PENDING_TERMS → ACTIVE ⇄ SUSPENDED, and any live licence can be REVOKED. On top of
//! the stored status two *effective* states are computed: EXPIRED once the validity window has passed,
//! EXHAUSTED while every granted unit is in use. Eligibility checks every condition of every licence a
//! buyer holds for a product, plus the product-wide gates (export authorisation, customs), and says
//! for each failure whether the order could ever pass it.

use std::collections::{HashMap, HashSet};

use crate::mul_div_ceil;

/// Where an application stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum ApplicationStatus {
    /// Never stored.
    Unspecified = 0,
    /// In the approval queue.
    Queued = 1,
    /// Granted by a published wave.
    Granted = 2,
    /// Withdrawn by the buyer.
    Withdrawn = 3,
    /// Rejected by the authority.
    Rejected = 4,
}

/// A stored application.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ApplicationRecord {
    /// "app-N".
    #[prost(string, tag = "1")]
    pub id: String,
    /// Buyer.
    #[prost(string, tag = "2")]
    pub buyer_id: String,
    /// Product SKU.
    #[prost(string, tag = "3")]
    pub product_sku: String,
    /// Units applied for.
    #[prost(uint64, tag = "4")]
    pub quantity: u64,
    /// End use.
    #[prost(string, tag = "5")]
    pub end_use: String,
    /// Site.
    #[prost(string, tag = "6")]
    pub site: String,
    /// Importing country.
    #[prost(string, tag = "7")]
    pub destination: String,
    /// [`ApplicationStatus`].
    #[prost(enumeration = "ApplicationStatus", tag = "8")]
    pub status: i32,
    /// Submitted at (ms since epoch).
    #[prost(uint64, tag = "9")]
    pub submit_ms: u64,
    /// Last change (ms since epoch).
    #[prost(uint64, tag = "10")]
    pub update_ms: u64,
    /// Why rejected or withdrawn.
    #[prost(string, tag = "11")]
    pub reason: String,
    /// Granting wave.
    #[prost(string, tag = "12")]
    pub wave_id: String,
    /// Resulting licence.
    #[prost(string, tag = "13")]
    pub license_id: String,
    /// Submission sequence (the default queue order).
    #[prost(uint64, tag = "14")]
    pub seq: u64,
}

/// The conditions a licence carries. Times are ms since the epoch; 0 means "not set".
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Conditions {
    /// Not usable before.
    #[prost(uint64, tag = "1")]
    pub valid_from_ms: u64,
    /// Expires at.
    #[prost(uint64, tag = "2")]
    pub valid_until_ms: u64,
    /// Largest single order (0: none).
    #[prost(uint64, tag = "3")]
    pub per_order_cap: u64,
    /// Domestic units required per 10,000 licensed units in use (0: none).
    #[prost(uint32, tag = "4")]
    pub domestic_ratio_bps: u32,
    /// Orders must carry a justification.
    #[prost(bool, tag = "5")]
    pub justification_required: bool,
    /// Terms still being worked out.
    #[prost(bool, tag = "6")]
    pub terms_pending: bool,
}

/// Most basis points a ratio can be: 10 domestic chips per licensed chip.
pub const MAX_RATIO_BPS: u32 = 100_000;

impl Conditions {
    /// What is wrong with these conditions, as `(field, problem)` pairs.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self.valid_until_ms != 0 && self.valid_until_ms <= self.valid_from_ms {
            out.push(("valid_until", "must be after valid_from".to_string()));
        }
        if self.domestic_ratio_bps > MAX_RATIO_BPS {
            out.push(("domestic_ratio_bps", format!("must be at most {MAX_RATIO_BPS}")));
        }
        out
    }
}

/// The stored status of a licence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum LicenseStatus {
    /// Never stored.
    Unspecified = 0,
    /// Granted, terms still pending.
    PendingTerms = 1,
    /// Usable.
    Active = 2,
    /// Temporarily unusable.
    Suspended = 3,
    /// Withdrawn for good.
    Revoked = 4,
}

/// The state a licence is in right now (the stored status plus time and quota).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EffectiveState {
    /// Terms pending.
    PendingTerms,
    /// Usable.
    Active,
    /// Suspended.
    Suspended,
    /// Revoked.
    Revoked,
    /// Past its validity window.
    Expired,
    /// Active with no quota left.
    Exhausted,
}

impl EffectiveState {
    /// Upper-case name as in the API.
    pub fn name(self) -> &'static str {
        match self {
            EffectiveState::PendingTerms => "PENDING_TERMS",
            EffectiveState::Active => "ACTIVE",
            EffectiveState::Suspended => "SUSPENDED",
            EffectiveState::Revoked => "REVOKED",
            EffectiveState::Expired => "EXPIRED",
            EffectiveState::Exhausted => "EXHAUSTED",
        }
    }
}

/// A stored licence.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LicenseRecord {
    /// "lic-N".
    #[prost(string, tag = "1")]
    pub id: String,
    /// Buyer.
    #[prost(string, tag = "2")]
    pub buyer_id: String,
    /// Product.
    #[prost(string, tag = "3")]
    pub product_sku: String,
    /// Importing country.
    #[prost(string, tag = "4")]
    pub destination: String,
    /// Application it came from.
    #[prost(string, tag = "5")]
    pub application_id: String,
    /// Wave that granted it.
    #[prost(string, tag = "6")]
    pub wave_id: String,
    /// [`LicenseStatus`].
    #[prost(enumeration = "LicenseStatus", tag = "7")]
    pub status: i32,
    /// Conditions.
    #[prost(message, optional, tag = "8")]
    pub conditions: Option<Conditions>,
    /// Quota granted.
    #[prost(uint64, tag = "9")]
    pub granted: u64,
    /// Units held by orders (reserved or confirmed).
    #[prost(uint64, tag = "10")]
    pub used: u64,
    /// Units held by confirmed orders (part of `used`).
    #[prost(uint64, tag = "11")]
    pub confirmed: u64,
    /// Created at.
    #[prost(uint64, tag = "12")]
    pub create_ms: u64,
    /// Last change.
    #[prost(uint64, tag = "13")]
    pub update_ms: u64,
    /// Why last suspended, reinstated or revoked.
    #[prost(string, tag = "14")]
    pub state_reason: String,
    /// Creation sequence: older licences are used first.
    #[prost(uint64, tag = "15")]
    pub seq: u64,
}

/// A state change that is not allowed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransitionError {
    /// What was attempted.
    pub action: &'static str,
    /// The state the licence was in.
    pub from: EffectiveState,
}

impl std::fmt::Display for TransitionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "can't {} a licence that is {}", self.action, self.from.name())
    }
}

impl std::error::Error for TransitionError {}

impl LicenseRecord {
    /// The conditions (defaults when none were stored).
    pub fn conditions(&self) -> Conditions {
        self.conditions.clone().unwrap_or_default()
    }

    /// Units not in use.
    pub fn remaining(&self) -> u64 {
        self.granted.saturating_sub(self.used)
    }

    /// The state right now.
    pub fn effective_state(&self, now_ms: u64) -> EffectiveState {
        let c = self.conditions();
        match self.status() {
            LicenseStatus::Revoked => EffectiveState::Revoked,
            _ if c.valid_until_ms != 0 && now_ms >= c.valid_until_ms => EffectiveState::Expired,
            LicenseStatus::PendingTerms | LicenseStatus::Unspecified => EffectiveState::PendingTerms,
            LicenseStatus::Suspended => EffectiveState::Suspended,
            LicenseStatus::Active if self.remaining() == 0 => EffectiveState::Exhausted,
            LicenseStatus::Active => EffectiveState::Active,
        }
    }

    /// True unless revoked or expired: the licence may still serve orders some day.
    pub fn is_live(&self, now_ms: u64) -> bool {
        !matches!(self.effective_state(now_ms), EffectiveState::Revoked | EffectiveState::Expired)
    }

    fn move_to(&mut self, status: LicenseStatus, reason: &str, now_ms: u64) {
        self.status = status as i32;
        self.state_reason = reason.to_string();
        self.update_ms = now_ms;
    }

    /// Finalises the terms (optionally replacing the conditions): PENDING_TERMS → ACTIVE.
    ///
    /// # Errors
    /// When the licence is not PENDING_TERMS.
    pub fn finalize_terms(&mut self, conditions: Option<Conditions>, now_ms: u64) -> Result<(), TransitionError> {
        let from = self.effective_state(now_ms);
        if from != EffectiveState::PendingTerms {
            return Err(TransitionError { action: "finalise the terms of", from });
        }
        let mut c = conditions.unwrap_or_else(|| self.conditions());
        c.terms_pending = false;
        self.conditions = Some(c);
        self.move_to(LicenseStatus::Active, "terms finalised", now_ms);
        Ok(())
    }

    /// ACTIVE (or EXHAUSTED) → SUSPENDED.
    ///
    /// # Errors
    /// When the licence is not active.
    pub fn suspend(&mut self, reason: &str, now_ms: u64) -> Result<(), TransitionError> {
        let from = self.effective_state(now_ms);
        if !matches!(from, EffectiveState::Active | EffectiveState::Exhausted) {
            return Err(TransitionError { action: "suspend", from });
        }
        self.move_to(LicenseStatus::Suspended, reason, now_ms);
        Ok(())
    }

    /// SUSPENDED → ACTIVE.
    ///
    /// # Errors
    /// When the licence is not suspended.
    pub fn reinstate(&mut self, reason: &str, now_ms: u64) -> Result<(), TransitionError> {
        let from = self.effective_state(now_ms);
        if from != EffectiveState::Suspended {
            return Err(TransitionError { action: "reinstate", from });
        }
        self.move_to(LicenseStatus::Active, reason, now_ms);
        Ok(())
    }

    /// Any live state → REVOKED.
    ///
    /// # Errors
    /// When already revoked or expired.
    pub fn revoke(&mut self, reason: &str, now_ms: u64) -> Result<(), TransitionError> {
        let from = self.effective_state(now_ms);
        if matches!(from, EffectiveState::Revoked | EffectiveState::Expired) {
            return Err(TransitionError { action: "revoke", from });
        }
        self.move_to(LicenseStatus::Revoked, reason, now_ms);
        Ok(())
    }
}

/// A condition an order must meet (mirrors the API's `Condition`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Condition {
    /// Never used.
    Unspecified = 0,
    /// Holds a licence.
    License = 1,
    /// Terms final.
    TermsFinal = 2,
    /// Not suspended or revoked.
    LicenseInForce = 3,
    /// Inside the validity window.
    ValidityWindow = 4,
    /// Enough quota left.
    Quota = 5,
    /// Within the per-order cap.
    PerOrderCap = 6,
    /// Domestic ratio covered.
    DomesticRatio = 7,
    /// Justification given.
    Justification = 8,
    /// Export authorised.
    ExportAuthorization = 9,
    /// Not embargoed.
    ImportPolicy = 10,
    /// Not overtaking an earlier order.
    QueueOrder = 11,
}

impl Condition {
    /// The API name, e.g. `CONDITION_QUOTA`.
    pub fn api_name(self) -> &'static str {
        match self {
            Condition::Unspecified => "CONDITION_UNSPECIFIED",
            Condition::License => "CONDITION_LICENSE",
            Condition::TermsFinal => "CONDITION_TERMS_FINAL",
            Condition::LicenseInForce => "CONDITION_LICENSE_IN_FORCE",
            Condition::ValidityWindow => "CONDITION_VALIDITY_WINDOW",
            Condition::Quota => "CONDITION_QUOTA",
            Condition::PerOrderCap => "CONDITION_PER_ORDER_CAP",
            Condition::DomesticRatio => "CONDITION_DOMESTIC_RATIO",
            Condition::Justification => "CONDITION_JUSTIFICATION",
            Condition::ExportAuthorization => "CONDITION_EXPORT_AUTHORIZATION",
            Condition::ImportPolicy => "CONDITION_IMPORT_POLICY",
            Condition::QueueOrder => "CONDITION_QUEUE_ORDER",
        }
    }

    /// Conditions about how much capacity is left (quota, ratio): an order refused for one of these
    /// blocks the same buyer's later orders, so they can't overtake it.
    pub fn is_capacity(self) -> bool {
        matches!(self, Condition::Quota | Condition::DomesticRatio)
    }
}

/// One failed condition, and why (storable in an order's history).
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Failure {
    /// [`Condition`].
    #[prost(enumeration = "Condition", tag = "1")]
    pub condition: i32,
    /// The licence concerned, if any.
    #[prost(string, tag = "2")]
    pub license_id: String,
    /// In words, with figures.
    #[prost(string, tag = "3")]
    pub description: String,
    /// Can never pass under this licence.
    #[prost(bool, tag = "4")]
    pub permanent: bool,
    /// The figure needed.
    #[prost(uint64, tag = "5")]
    pub required: u64,
    /// The figure there is.
    #[prost(uint64, tag = "6")]
    pub actual: u64,
}

/// [`Failure::no_licence`]'s description is these around the buyer id.
const NO_LICENCE_PREFIX: &str = "buyer ";
const NO_LICENCE_SUFFIX: &str = " holds no usable licence for this product";

impl Failure {
    /// A failure of `condition`.
    pub fn new(condition: Condition, license_id: &str, description: impl Into<String>) -> Self {
        Failure {
            condition: condition as i32,
            license_id: license_id.to_string(),
            description: description.into(),
            permanent: false,
            required: 0,
            actual: 0,
        }
    }

    /// The failure of a buyer that holds no usable licence of the product — what every order placed
    /// before its buyer's licence waits on (one constructor, so an order's stored form can leave it
    /// out and rebuild it from the buyer: `orders::OrderRecord::to_stored`).
    pub fn no_licence(buyer_id: &str) -> Self {
        Failure::new(Condition::License, "", format!("{NO_LICENCE_PREFIX}{buyer_id}{NO_LICENCE_SUFFIX}"))
    }

    /// Whether this is [`Failure::no_licence`] of `buyer_id`, without building that (every stored
    /// order's steps are checked on each write).
    pub fn is_no_licence_of(&self, buyer_id: &str) -> bool {
        self.condition == Condition::License as i32
            && self.license_id.is_empty()
            && !self.permanent
            && self.required == 0
            && self.actual == 0
            && self
                .description
                .strip_prefix(NO_LICENCE_PREFIX)
                .and_then(|d| d.strip_suffix(NO_LICENCE_SUFFIX))
                .is_some_and(|b| b == buyer_id)
    }

    /// Marks it as one the order can never pass under this licence.
    pub fn permanent(mut self) -> Self {
        self.permanent = true;
        self
    }

    /// Attaches the figures.
    pub fn figures(mut self, required: u64, actual: u64) -> Self {
        self.required = required;
        self.actual = actual;
        self
    }
}

/// Whether an order refused with `failures` waits for capacity that may come — some licence fails it
/// only for what can change, and for quota or domestic ratio among it (quota given back, a domestic
/// purchase) — or queues behind an earlier order that does. Then the buyer's later orders may not
/// overtake it. A licence that can never serve the order (a permanent failure, e.g. above its
/// per-order cap) is no reason to wait, whatever its quota.
pub fn waits_for_capacity(failures: &[Failure]) -> bool {
    if failures.iter().any(|f| f.condition() == Condition::QueueOrder) {
        return true;
    }
    let mut by_licence: HashMap<&str, (bool, bool)> = HashMap::new();
    for f in failures.iter().filter(|f| !f.license_id.is_empty()) {
        let (capacity, permanent) = by_licence.entry(f.license_id.as_str()).or_default();
        *capacity |= f.condition().is_capacity();
        *permanent |= f.permanent;
    }
    by_licence.values().any(|(capacity, permanent)| *capacity && !*permanent)
}

/// Whether time alone may lift one of `failures`, with no event to tell anyone: a licence that is not
/// valid yet. An order waiting for such a reason may be servable at any moment, so a buyer's later
/// orders are only judged after it is judged again ([`crate::allocation::Standing`]).
pub fn lifted_by_time(failures: &[Failure]) -> bool {
    failures.iter().any(|f| f.condition() == Condition::ValidityWindow && !f.permanent)
}

/// What is being asked for: `units` of the product by `buyer_id`.
#[derive(Clone, Copy, Debug)]
pub struct Ask<'a> {
    /// Buyer.
    pub buyer_id: &'a str,
    /// Units.
    pub units: u64,
    /// The order's justification ("" if none).
    pub justification: &'a str,
}

/// Product-wide gates: customs and the export side.
#[derive(Clone, Debug, Default)]
pub struct ProductGate {
    /// Customs embargoes the product.
    pub embargoed: bool,
    /// Customs' reason, if embargoed.
    pub embargo_reason: String,
    /// Destinations the vendor holds an active export authorisation for.
    pub export_destinations: HashSet<String>,
}

/// The outcome of evaluating an ask.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Eligible under the licence at this index of the candidate list.
    Eligible(usize),
    /// Refused for these reasons.
    Refused {
        /// Every failed condition.
        failures: Vec<Failure>,
        /// The order can never be served by the licences the buyer holds (e.g. above every per-order
        /// cap) and no licence is still pending terms.
        rejectable: bool,
    },
}

fn fmt_units(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Customs' embargo of the product, as a failure (None while imports are open).
fn embargo_failure(gate: &ProductGate) -> Option<Failure> {
    gate.embargoed.then(|| {
        let why = if gate.embargo_reason.is_empty() { String::new() } else { format!(": {}", gate.embargo_reason) };
        Failure::new(Condition::ImportPolicy, "", format!("customs embargoes this product{why}"))
    })
}

/// The vendor's missing export authorisation for the licence's product and destination, as a failure.
fn export_failure(lic: &LicenseRecord, gate: &ProductGate) -> Option<Failure> {
    (!gate.export_destinations.contains(&lic.destination)).then(|| {
        Failure::new(
            Condition::ExportAuthorization,
            &lic.id,
            format!("the vendor holds no export authorisation for {} to {}", lic.product_sku, lic.destination),
        )
    })
}

/// Why quota already taken under `lic` may no longer be used — the order holding it must go back to
/// waiting — or nothing while it still may: the licence revoked, expired or suspended, customs
/// embargoing the product, or the vendor's export authorisation withdrawn. Quota taken is not
/// questioned for what only governs taking it (remaining quota, the per-order cap, the domestic ratio,
/// a justification), and the wording is the same as when an order is evaluated.
pub fn holding_failures(lic: &LicenseRecord, gate: &ProductGate, now_ms: u64) -> Vec<Failure> {
    let id = lic.id.as_str();
    let mut out = Vec::new();
    match lic.effective_state(now_ms) {
        EffectiveState::Revoked => out.push(
            Failure::new(Condition::LicenseInForce, id, format!("licence {id} was revoked: {}", lic.state_reason))
                .permanent(),
        ),
        EffectiveState::Expired => {
            out.push(Failure::new(Condition::ValidityWindow, id, format!("licence {id} expired")).permanent());
        }
        EffectiveState::Suspended => out.push(Failure::new(
            Condition::LicenseInForce,
            id,
            format!("licence {id} is suspended: {}", lic.state_reason),
        )),
        // Quota is only ever taken from an active licence; terms can't go back to pending.
        EffectiveState::PendingTerms | EffectiveState::Active | EffectiveState::Exhausted => {}
    }
    out.extend(embargo_failure(gate));
    out.extend(export_failure(lic, gate));
    out
}

/// Checks one licence's own conditions for an ask. `domestic_units` is the buyer's recorded total.
pub fn licence_failures(
    lic: &LicenseRecord,
    ask: &Ask<'_>,
    domestic_units: u64,
    gate: &ProductGate,
    now_ms: u64,
) -> Vec<Failure> {
    let id = lic.id.as_str();
    let c = lic.conditions();
    let mut out = Vec::new();
    match lic.effective_state(now_ms) {
        EffectiveState::Revoked => {
            out.push(
                Failure::new(Condition::LicenseInForce, id, format!("licence {id} was revoked: {}", lic.state_reason))
                    .permanent(),
            );
            return out;
        }
        EffectiveState::Expired => {
            out.push(Failure::new(Condition::ValidityWindow, id, format!("licence {id} expired")).permanent());
            return out;
        }
        EffectiveState::PendingTerms => {
            // Provisional conditions may still change, so only this is reported.
            out.push(Failure::new(
                Condition::TermsFinal,
                id,
                format!("licence {id} is approved but its terms are still being worked out"),
            ));
            return out;
        }
        EffectiveState::Suspended => {
            out.push(Failure::new(
                Condition::LicenseInForce,
                id,
                format!("licence {id} is suspended: {}", lic.state_reason),
            ));
        }
        EffectiveState::Active | EffectiveState::Exhausted => {}
    }
    if c.valid_from_ms != 0 && now_ms < c.valid_from_ms {
        out.push(Failure::new(Condition::ValidityWindow, id, format!("licence {id} is not valid yet")));
    }
    out.extend(export_failure(lic, gate));
    if c.per_order_cap != 0 && ask.units > c.per_order_cap {
        out.push(
            Failure::new(
                Condition::PerOrderCap,
                id,
                format!(
                    "order of {} units is above licence {id}'s per-order cap of {}",
                    fmt_units(ask.units),
                    fmt_units(c.per_order_cap)
                ),
            )
            .permanent()
            .figures(c.per_order_cap, ask.units),
        );
    }
    if ask.units > lic.granted {
        out.push(
            Failure::new(
                Condition::Quota,
                id,
                format!(
                    "order of {} units is more than licence {id} grants in all ({})",
                    fmt_units(ask.units),
                    fmt_units(lic.granted)
                ),
            )
            .permanent()
            .figures(ask.units, lic.granted),
        );
    } else if ask.units > lic.remaining() {
        out.push(
            Failure::new(
                Condition::Quota,
                id,
                format!(
                    "licence {id} has {} units left; the order needs {}",
                    fmt_units(lic.remaining()),
                    fmt_units(ask.units)
                ),
            )
            .figures(ask.units, lic.remaining()),
        );
    }
    if c.domestic_ratio_bps > 0 {
        let need = mul_div_ceil(lic.used.saturating_add(ask.units), u64::from(c.domestic_ratio_bps), 10_000);
        if domestic_units < need {
            out.push(
                Failure::new(
                    Condition::DomesticRatio,
                    id,
                    format!(
                        "licence {id} requires {} domestic units for {} licensed units in use; the buyer has recorded {}",
                        fmt_units(need),
                        fmt_units(lic.used.saturating_add(ask.units)),
                        fmt_units(domestic_units)
                    ),
                )
                .figures(need, domestic_units),
            );
        }
    }
    if c.justification_required && ask.justification.trim().is_empty() {
        out.push(
            Failure::new(
                Condition::Justification,
                id,
                format!("licence {id} requires every order to state why the chips are necessary"),
            )
            .permanent(),
        );
    }
    out
}

/// Evaluates an ask against the buyer's licences for the product (`candidates`, oldest first) and the
/// product's gates. The first licence that passes every condition serves the order.
pub fn evaluate(
    candidates: &[&LicenseRecord],
    ask: &Ask<'_>,
    domestic_units: u64,
    gate: &ProductGate,
    now_ms: u64,
) -> Verdict {
    let mut failures: Vec<Failure> = embargo_failure(gate).into_iter().collect();
    if candidates.iter().all(|l| !l.is_live(now_ms)) {
        failures.push(Failure::no_licence(ask.buyer_id));
        if gate.export_destinations.is_empty() {
            failures.push(Failure::new(
                Condition::ExportAuthorization,
                "",
                "the vendor holds no export authorisation for this product",
            ));
        }
    }
    let mut live = 0;
    let mut all_permanent = true;
    let mut any_pending = false;
    for (i, lic) in candidates.iter().enumerate() {
        let f = licence_failures(lic, ask, domestic_units, gate, now_ms);
        if f.is_empty() && !gate.embargoed {
            return Verdict::Eligible(i);
        }
        if lic.is_live(now_ms) {
            live += 1;
            any_pending |= lic.effective_state(now_ms) == EffectiveState::PendingTerms;
            all_permanent &= f.iter().any(|x| x.permanent);
        }
        failures.extend(f);
    }
    Verdict::Refused { failures, rejectable: live > 0 && all_permanent && !any_pending }
}

/// Serves a batch of asks for one product strictly in order, against running copies of the licences
/// and ledgers, so that later asks see the quota earlier ones took. Once a buyer's ask is refused for
/// quota or domestic ratio, that buyer's later asks in the batch are refused with `QueueOrder`: a
/// smaller later order never overtakes a larger earlier one.
pub struct QuotaPlanner<'a> {
    licences: HashMap<String, Vec<LicenseRecord>>,
    domestic: &'a HashMap<String, u64>,
    gate: &'a ProductGate,
    now_ms: u64,
    blocked: HashMap<String, String>,
    touched: HashSet<String>,
}

/// A planner decision for one ask.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Planned {
    /// Quota taken from this licence.
    Reserved {
        /// The licence.
        license_id: String,
        /// Its wave.
        wave_id: String,
    },
    /// Refused.
    Refused {
        /// Why.
        failures: Vec<Failure>,
        /// Can never be served by the buyer's licences.
        rejectable: bool,
    },
    /// Would be served, but was only judged ([`QuotaPlanner::judge`]): nothing taken.
    Servable,
}

impl<'a> QuotaPlanner<'a> {
    /// A planner over `licences` (every licence of the batch's buyers for the product).
    pub fn new(
        licences: Vec<LicenseRecord>,
        domestic: &'a HashMap<String, u64>,
        gate: &'a ProductGate,
        now_ms: u64,
    ) -> Self {
        let mut by_buyer: HashMap<String, Vec<LicenseRecord>> = HashMap::new();
        for l in licences {
            by_buyer.entry(l.buyer_id.clone()).or_default().push(l);
        }
        for v in by_buyer.values_mut() {
            v.sort_by_key(|l| l.seq);
        }
        QuotaPlanner { licences: by_buyer, domestic, gate, now_ms, blocked: HashMap::new(), touched: HashSet::new() }
    }

    /// Records that `earlier`, an order of `buyer` decided before this batch, still waits for quota:
    /// the buyer's asks in this batch queue behind it (the first such order named wins).
    pub fn queue_behind(&mut self, buyer: &str, earlier: &str) {
        self.blocked.entry(buyer.to_string()).or_insert_with(|| earlier.to_string());
    }

    /// Decides one ask and, if eligible, takes its quota from the running copy.
    ///
    /// An ask of a buyer whose earlier order waits for quota takes nothing and waits behind it — unless
    /// it can never be served by the buyer's licences, in which case it is refused as rejectable like
    /// any other: waiting can't help it.
    pub fn plan(&mut self, order_id: &str, ask: &Ask<'_>) -> Planned {
        self.decide(order_id, ask, true)
    }

    /// Decides one ask as [`plan`](Self::plan) does but takes nothing: an ask that would be served
    /// is answered [`Planned::Servable`] (and, taking nothing, holds up none of the buyer's later asks).
    pub fn judge(&mut self, order_id: &str, ask: &Ask<'_>) -> Planned {
        self.decide(order_id, ask, false)
    }

    /// [`plan`](Self::plan) when `take`, [`judge`](Self::judge) otherwise.
    fn decide(&mut self, order_id: &str, ask: &Ask<'_>, take: bool) -> Planned {
        let domestic = self.domestic.get(ask.buyer_id).copied().unwrap_or(0);
        let list = self.licences.entry(ask.buyer_id.to_string()).or_default();
        let refs: Vec<&LicenseRecord> = list.iter().collect();
        let verdict = evaluate(&refs, ask, domestic, self.gate, self.now_ms);
        if let Some(earlier) = self.blocked.get(ask.buyer_id) {
            return match verdict {
                Verdict::Refused { failures, rejectable: true } => Planned::Refused { failures, rejectable: true },
                _ => Planned::Refused {
                    failures: vec![Failure::new(
                        Condition::QueueOrder,
                        "",
                        format!(
                            "an earlier order ({earlier}) of this buyer is still waiting for quota; this one may not overtake it"
                        ),
                    )],
                    rejectable: false,
                },
            };
        }
        match verdict {
            Verdict::Eligible(_) if !take => Planned::Servable,
            Verdict::Eligible(i) => {
                let lic = &mut list[i];
                lic.used += ask.units;
                lic.update_ms = self.now_ms;
                self.touched.insert(lic.id.clone());
                Planned::Reserved { license_id: lic.id.clone(), wave_id: lic.wave_id.clone() }
            }
            Verdict::Refused { failures, rejectable } => {
                if waits_for_capacity(&failures) && !rejectable {
                    self.blocked.insert(ask.buyer_id.to_string(), order_id.to_string());
                }
                Planned::Refused { failures, rejectable }
            }
        }
    }

    /// The licences whose quota changed, to write back.
    pub fn into_touched(self) -> Vec<LicenseRecord> {
        let touched = self.touched;
        self.licences.into_values().flatten().filter(|l| touched.contains(&l.id)).collect()
    }
}

/// Where a wave stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum WaveStatus {
    /// Never stored.
    Unspecified = 0,
    /// Being drafted.
    Draft = 1,
    /// Published; immutable.
    Published = 2,
}

/// One grant of a wave.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GrantRecord {
    /// Application granted.
    #[prost(string, tag = "1")]
    pub application_id: String,
    /// Its buyer.
    #[prost(string, tag = "2")]
    pub buyer_id: String,
    /// Its product.
    #[prost(string, tag = "3")]
    pub product_sku: String,
    /// Units granted.
    #[prost(uint64, tag = "4")]
    pub granted: u64,
    /// Conditions of the licence to be.
    #[prost(message, optional, tag = "5")]
    pub conditions: Option<Conditions>,
    /// The licence, once published.
    #[prost(string, tag = "6")]
    pub license_id: String,
    /// The licence's creation sequence, once published.
    #[prost(uint64, tag = "7")]
    pub license_seq: u64,
    /// Of a draft's grant kept as a record of its own: its place in the order grants were added
    /// (a replaced grant keeps its place). 0 in a wave record's own list.
    #[prost(uint64, tag = "8")]
    pub place: u64,
}

/// A stored wave.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WaveRecord {
    /// "wave-N".
    #[prost(string, tag = "1")]
    pub id: String,
    /// Name.
    #[prost(string, tag = "2")]
    pub display_name: String,
    /// [`WaveStatus`].
    #[prost(enumeration = "WaveStatus", tag = "3")]
    pub status: i32,
    /// Of a published wave: its grants, in the order they were added. A draft keeps each grant as a
    /// record of its own, counted below, so that adding one writes that grant and this small record
    /// instead of every grant so far; a draft written before that holds its grants here until its
    /// next change moves them out ([`WaveRecord::move_grants_apart`]).
    #[prost(message, repeated, tag = "4")]
    pub grants: Vec<GrantRecord>,
    /// Created at.
    #[prost(uint64, tag = "5")]
    pub create_ms: u64,
    /// Published at.
    #[prost(uint64, tag = "6")]
    pub publish_ms: u64,
    /// Creation sequence.
    #[prost(uint64, tag = "7")]
    pub seq: u64,
    /// Of a published wave: the products whose licences are not in force yet (see
    /// [`WaveRecord::products`]). Publication decides the whole wave in the desk's partition, then puts
    /// each product's licences in force in that product's partition; what a crash left is here.
    #[prost(string, repeated, tag = "8")]
    pub pending_products: Vec<String>,
    /// Of a draft: how many grants it keeps apart (not in `grants`).
    #[prost(uint64, tag = "9")]
    pub grants_apart: u64,
    /// Of a draft: the units those grants grant.
    #[prost(uint64, tag = "10")]
    pub units_apart: u64,
    /// Of a draft: grants ever added apart (the last place given; places are never reused).
    #[prost(uint64, tag = "11")]
    pub places_given: u64,
}

impl WaveRecord {
    /// The products the wave grants, sorted, each once.
    pub fn products(&self) -> Vec<String> {
        let mut skus: Vec<String> = self.grants.iter().map(|g| g.product_sku.clone()).collect();
        skus.sort();
        skus.dedup();
        skus
    }

    /// Counts grant `grant` added to this draft, or replacing `existing` (the application's grant
    /// kept apart now, if any), and returns it with its place (a new one, or the replaced grant's).
    /// The caller writes the grant as a record of its own; [`move_grants_apart`] must have emptied
    /// `grants` first.
    ///
    /// # Errors
    /// When the wave is published.
    ///
    /// [`move_grants_apart`]: Self::move_grants_apart
    pub fn put_grant(
        &mut self,
        existing: Option<&GrantRecord>,
        mut grant: GrantRecord,
    ) -> Result<GrantRecord, WaveError> {
        if self.status() != WaveStatus::Draft {
            return Err(WaveError::Published);
        }
        match existing {
            Some(old) => {
                grant.place = old.place;
                self.units_apart = self.units_apart.saturating_sub(old.granted);
            }
            None => {
                self.places_given += 1;
                grant.place = self.places_given;
                self.grants_apart += 1;
            }
        }
        self.units_apart = self.units_apart.saturating_add(grant.granted);
        Ok(grant)
    }

    /// Counts the application's grant kept apart, `existing`, out of this draft (the caller deletes
    /// its record).
    ///
    /// # Errors
    /// When the wave is published or has no such grant.
    pub fn take_grant(&mut self, existing: Option<&GrantRecord>) -> Result<(), WaveError> {
        if self.status() != WaveStatus::Draft {
            return Err(WaveError::Published);
        }
        let old = existing.ok_or(WaveError::NoSuchGrant)?;
        self.grants_apart = self.grants_apart.saturating_sub(1);
        self.units_apart = self.units_apart.saturating_sub(old.granted);
        Ok(())
    }

    /// Of a draft written when drafts held their grants in `grants`: moves them out, counted and
    /// given places in their order, for the caller to write as records of their own. Empty for any
    /// other wave.
    pub fn move_grants_apart(&mut self) -> Vec<GrantRecord> {
        if self.status() != WaveStatus::Draft {
            return Vec::new();
        }
        let mut moved = std::mem::take(&mut self.grants);
        for g in &mut moved {
            self.places_given += 1;
            g.place = self.places_given;
            self.grants_apart += 1;
            self.units_apart = self.units_apart.saturating_add(g.granted);
        }
        moved
    }

    /// Holds `apart`, this draft's grants kept apart (in any order), in `grants` after the ones it
    /// already holds there, in the order they were added, and clears their count: what a wave is
    /// once published, or what a draft shows.
    pub fn hold_grants(&mut self, mut apart: Vec<GrantRecord>) {
        apart.sort_by_key(|g| g.place);
        self.grants.extend(apart.into_iter().map(|g| GrantRecord { place: 0, ..g }));
        self.grants_apart = 0;
        self.units_apart = 0;
    }

    /// How many grants the wave holds.
    pub fn grant_count(&self) -> u64 {
        self.grants.len() as u64 + self.grants_apart
    }

    /// Total units granted.
    pub fn total_granted(&self) -> u64 {
        self.grants.iter().map(|g| g.granted).sum::<u64>() + self.units_apart
    }
}

/// Why a wave can't change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaveError {
    /// It is published.
    Published,
    /// It has no grant for that application.
    NoSuchGrant,
}

/// Where a quota reservation stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum ReservationStatus {
    /// Never stored.
    Unspecified = 0,
    /// Units taken.
    Held = 1,
    /// Order confirmed.
    Confirmed = 2,
    /// Units returned (or never taken: a tombstone that fences off a late reserve).
    Released = 3,
}

/// The quota an order holds, for its current generation.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ReservationRecord {
    /// Order.
    #[prost(string, tag = "1")]
    pub order_id: String,
    /// Allocation generation.
    #[prost(uint64, tag = "2")]
    pub generation: u64,
    /// Licence it took from ("" for a tombstone).
    #[prost(string, tag = "3")]
    pub license_id: String,
    /// That licence's wave.
    #[prost(string, tag = "4")]
    pub wave_id: String,
    /// Buyer.
    #[prost(string, tag = "5")]
    pub buyer_id: String,
    /// Product.
    #[prost(string, tag = "6")]
    pub product_sku: String,
    /// Units.
    #[prost(uint64, tag = "7")]
    pub units: u64,
    /// [`ReservationStatus`].
    #[prost(enumeration = "ReservationStatus", tag = "8")]
    pub status: i32,
    /// Created.
    #[prost(uint64, tag = "9")]
    pub create_ms: u64,
    /// Last change.
    #[prost(uint64, tag = "10")]
    pub update_ms: u64,
    /// Why released.
    #[prost(string, tag = "11")]
    pub release_reason: String,
}

/// What an existing reservation means for a new reserve of `generation`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReserveCheck {
    /// Nothing stands in the way: evaluate the conditions.
    Evaluate,
    /// Evaluate, but first give back the units an older generation still holds.
    Supersede {
        /// The licence to give them back to.
        license_id: String,
        /// How many.
        units: u64,
        /// Whether they were confirmed.
        confirmed: bool,
    },
    /// This generation already holds quota: answer with it.
    AlreadyHeld,
    /// This generation holds quota it may not keep: the ask may not take quota now (it queues behind
    /// an earlier order of its buyer, or is only to be judged), so the quota came from a decision
    /// that never landed (a round that died between taking it and its commit, or a batch redone
    /// behind an order that blocks it now). Give the units back, forget the reservation (so this
    /// generation is judged afresh, now and when next asked), and evaluate the ask as asked.
    /// Answering "held" would let the order go ahead of the one it queues behind.
    Withdraw {
        /// The licence to give them back to.
        license_id: String,
        /// How many.
        units: u64,
    },
    /// This generation was released, or a newer one exists: refuse.
    Stale,
}

/// What a reservation's stored form adds to [`ReservationRecord`]'s own fields (12–13), read from the
/// same bytes (a plain decode of either skips the other's fields).
#[derive(Clone, PartialEq, prost::Message)]
struct StoredReservation {
    /// The licence is `lic-<product>-<n>` ([`crate::ids::LicenceId::new`]): its id is left out and
    /// `n` kept here (0: the id is stored).
    #[prost(uint64, tag = "12")]
    licence_number: u64,
    /// The compact form: the order and the product are the key's (left out), and `update_ms` is
    /// stored as the milliseconds since `create_ms`.
    #[prost(bool, tag = "13")]
    compact: bool,
}

impl ReservationRecord {
    /// The bytes Redis keeps for this reservation, under the key that names its product and order
    /// (licensing's `keys::reservation(product_sku, order_id)`), so neither is repeated in the value;
    /// nor is the product in the licence id, nor the creation time in the last-change time.
    /// [`from_stored`](Self::from_stored), given the key's product and order, reads them back to an
    /// equal record.
    ///
    /// Why: after a wave every order holds one reservation; the order id, product and licence id
    /// were about 60 of its ~110 bytes, and without them the value fits Redis' embedded string
    /// (≤ 44 bytes: one allocation instead of two).
    pub fn to_stored(&self) -> Vec<u8> {
        let licence_number =
            crate::ids::LicenceId::number_in(&self.license_id, &self.product_sku).filter(|&n| n > 0).unwrap_or(0);
        let head = ReservationRecord {
            order_id: String::new(),
            product_sku: String::new(),
            license_id: if licence_number > 0 { String::new() } else { self.license_id.clone() },
            update_ms: self.update_ms.wrapping_sub(self.create_ms),
            ..self.clone()
        };
        let extra = StoredReservation { licence_number, compact: true };
        crate::encode_stored(&head, &extra)
    }

    /// Reads what [`to_stored`](Self::to_stored) wrote under the key of `product_sku`'s order
    /// `order_id`, or a record's plain encoding (the form before it, which holds both itself).
    ///
    /// # Errors
    /// When the bytes are not a reservation.
    pub fn from_stored(bytes: &[u8], product_sku: &str, order_id: &str) -> Result<Self, prost::DecodeError> {
        use prost::Message;
        let mut r = ReservationRecord::decode(bytes)?;
        let extra = StoredReservation::decode(bytes)?;
        if extra.compact {
            r.order_id = order_id.to_string();
            r.product_sku = product_sku.to_string();
            r.update_ms = r.create_ms.wrapping_add(r.update_ms);
            if extra.licence_number > 0 {
                r.license_id =
                    crate::ids::LicenceId::new(&crate::ids::Sku::from_trusted(product_sku), extra.licence_number)
                        .into_string();
            }
        }
        Ok(r)
    }

    /// Units this record holds from its licence (0 when released).
    pub fn held_units(&self) -> u64 {
        match self.status() {
            ReservationStatus::Held | ReservationStatus::Confirmed => self.units,
            _ => 0,
        }
    }

    /// Decides what a reserve of `generation` must do given this (existing) record; `may_take` says
    /// whether the ask may take quota at all (false when it queues behind an earlier order of its
    /// buyer or is only to be judged).
    pub fn check_reserve(&self, generation: u64, may_take: bool) -> ReserveCheck {
        use std::cmp::Ordering::*;
        match generation.cmp(&self.generation) {
            Less => ReserveCheck::Stale,
            Equal => match self.status() {
                // Confirmed quota comes from a decision that landed (the order was committed holding
                // it, then confirmed): it is answered held whatever the ask.
                ReservationStatus::Held if !may_take => {
                    ReserveCheck::Withdraw { license_id: self.license_id.clone(), units: self.units }
                }
                ReservationStatus::Held | ReservationStatus::Confirmed => ReserveCheck::AlreadyHeld,
                _ => ReserveCheck::Stale,
            },
            Greater if self.held_units() > 0 => ReserveCheck::Supersede {
                license_id: self.license_id.clone(),
                units: self.units,
                confirmed: self.status() == ReservationStatus::Confirmed,
            },
            Greater => ReserveCheck::Evaluate,
        }
    }
}

/// A buyer's domestic-purchase total.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct LedgerRecord {
    /// Buyer.
    #[prost(string, tag = "1")]
    pub buyer_id: String,
    /// Cumulative domestic units.
    #[prost(uint64, tag = "2")]
    pub total_units: u64,
    /// Purchases recorded.
    #[prost(uint64, tag = "3")]
    pub purchases: u64,
}

/// One recorded domestic purchase.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct PurchaseRecord {
    /// Buyer.
    #[prost(string, tag = "1")]
    pub buyer_id: String,
    /// Units.
    #[prost(uint64, tag = "2")]
    pub units: u64,
    /// Supplier.
    #[prost(string, tag = "3")]
    pub supplier: String,
    /// Evidence reference (unique per buyer).
    #[prost(string, tag = "4")]
    pub evidence_ref: String,
    /// Recorded at.
    #[prost(uint64, tag = "5")]
    pub record_ms: u64,
}

/// One export authorisation of a product.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct ExportAuthRecord {
    /// Vendor.
    #[prost(string, tag = "1")]
    pub vendor: String,
    /// Destination.
    #[prost(string, tag = "2")]
    pub destination: String,
    /// In force.
    #[prost(bool, tag = "3")]
    pub active: bool,
    /// Export licence reference.
    #[prost(string, tag = "4")]
    pub reference: String,
    /// Last change.
    #[prost(uint64, tag = "5")]
    pub update_ms: u64,
}

/// Every export authorisation of one product (one record, so eligibility reads it at once).
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct ProductExportRecord {
    /// Product.
    #[prost(string, tag = "1")]
    pub product_sku: String,
    /// One per destination.
    #[prost(message, repeated, tag = "2")]
    pub authorizations: Vec<ExportAuthRecord>,
}

impl ProductExportRecord {
    /// Destinations with an active authorisation.
    pub fn active_destinations(&self) -> HashSet<String> {
        self.authorizations.iter().filter(|a| a.active).map(|a| a.destination.clone()).collect()
    }
}

/// Customs' stance on a product.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Stance {
    /// Never set (means open).
    Unspecified = 0,
    /// May enter.
    Open = 1,
    /// May not enter.
    Embargoed = 2,
}

/// A product's import policy.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct PolicyRecord {
    /// Product.
    #[prost(string, tag = "1")]
    pub product_sku: String,
    /// [`Stance`].
    #[prost(enumeration = "Stance", tag = "2")]
    pub stance: i32,
    /// Why.
    #[prost(string, tag = "3")]
    pub reason: String,
    /// Last change.
    #[prost(uint64, tag = "4")]
    pub update_ms: u64,
}

impl ProductGate {
    /// The gate of a product from its stored policy and export authorisations.
    pub fn from_records(policy: Option<&PolicyRecord>, exports: Option<&ProductExportRecord>) -> Self {
        ProductGate {
            embargoed: policy.is_some_and(|p| p.stance() == Stance::Embargoed),
            embargo_reason: policy.map(|p| p.reason.clone()).unwrap_or_default(),
            export_destinations: exports.map(ProductExportRecord::active_destinations).unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn lic(id: &str, buyer: &str, granted: u64, status: LicenseStatus, c: Conditions) -> LicenseRecord {
        LicenseRecord {
            id: id.into(),
            buyer_id: buyer.into(),
            product_sku: "H200".into(),
            destination: "CN".into(),
            wave_id: "wave-1".into(),
            status: status as i32,
            conditions: Some(c),
            granted,
            seq: id.trim_start_matches("lic-").parse().unwrap_or(0),
            ..Default::default()
        }
    }

    fn open_gate() -> ProductGate {
        ProductGate { embargoed: false, embargo_reason: String::new(), export_destinations: ["CN".to_string()].into() }
    }

    fn ask(units: u64) -> Ask<'static> {
        Ask { buyer_id: "bytedance", units, justification: "training cluster" }
    }

    fn conditions(f: &[Failure]) -> Vec<Condition> {
        f.iter().map(Failure::condition).collect()
    }

    #[test]
    fn state_machine_allows_only_the_documented_moves() {
        let mut l = lic(
            "lic-1",
            "b",
            10,
            LicenseStatus::PendingTerms,
            Conditions { terms_pending: true, ..Default::default() },
        );
        assert_eq!(l.effective_state(NOW), EffectiveState::PendingTerms);
        assert!(l.suspend("x", NOW).is_err(), "pending terms can't be suspended");
        assert!(l.reinstate("x", NOW).is_err());
        l.finalize_terms(None, NOW).expect("finalise");
        assert_eq!(l.effective_state(NOW), EffectiveState::Active);
        assert!(!l.conditions().terms_pending);
        assert!(l.finalize_terms(None, NOW).is_err(), "terms are final once");
        l.suspend("audit", NOW).expect("suspend");
        assert_eq!(l.effective_state(NOW), EffectiveState::Suspended);
        assert!(l.suspend("again", NOW).is_err());
        l.reinstate("cleared", NOW).expect("reinstate");
        l.used = 10;
        assert_eq!(l.effective_state(NOW), EffectiveState::Exhausted);
        l.suspend("exhausted licences can be suspended too", NOW).expect("suspend");
        l.revoke("fraud", NOW).expect("revoke");
        assert_eq!(l.effective_state(NOW), EffectiveState::Revoked);
        let err = l.revoke("again", NOW).expect_err("revoked is final");
        assert_eq!(err.to_string(), "can't revoke a licence that is REVOKED");
        assert!(l.reinstate("x", NOW).is_err());
    }

    #[test]
    fn validity_window_gives_expired_and_not_yet_valid() {
        let c = Conditions { valid_from_ms: NOW + 1000, valid_until_ms: NOW + 2000, ..Default::default() };
        let l = lic("lic-1", "bytedance", 100, LicenseStatus::Active, c);
        let g = open_gate();
        match evaluate(&[&l], &ask(1), 0, &g, NOW) {
            Verdict::Refused { failures, rejectable } => {
                assert_eq!(conditions(&failures), vec![Condition::ValidityWindow]);
                assert!(!failures[0].permanent);
                assert!(!rejectable);
            }
            v => panic!("{v:?}"),
        }
        assert_eq!(evaluate(&[&l], &ask(1), 0, &g, NOW + 1500), Verdict::Eligible(0));
        assert_eq!(l.effective_state(NOW + 2000), EffectiveState::Expired);
        match evaluate(&[&l], &ask(1), 0, &g, NOW + 2000) {
            Verdict::Refused { failures, rejectable } => {
                assert_eq!(conditions(&failures), vec![Condition::License, Condition::ValidityWindow]);
                assert!(!rejectable, "an expired licence does not make the order unservable for ever");
            }
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn every_failed_condition_is_listed_with_figures() {
        let c = Conditions {
            per_order_cap: 50,
            domestic_ratio_bps: 2500,
            justification_required: true,
            ..Default::default()
        };
        let mut l = lic("lic-3", "bytedance", 100, LicenseStatus::Active, c);
        l.used = 80;
        let gate =
            ProductGate { embargoed: true, embargo_reason: "notice 17".into(), export_destinations: HashSet::new() };
        let a = Ask { buyer_id: "bytedance", units: 60, justification: " " };
        match evaluate(&[&l], &a, 10, &gate, NOW) {
            Verdict::Refused { failures, rejectable } => {
                assert_eq!(
                    conditions(&failures),
                    vec![
                        Condition::ImportPolicy,
                        Condition::ExportAuthorization,
                        Condition::PerOrderCap,
                        Condition::Quota,
                        Condition::DomesticRatio,
                        Condition::Justification
                    ]
                );
                let ratio = &failures[4];
                assert_eq!((ratio.required, ratio.actual), (35, 10), "ceil(25% of 80+60) = 35");
                let quota = &failures[3];
                assert_eq!((quota.required, quota.actual, quota.permanent), (60, 20, false));
                assert!(failures[0].description.contains("notice 17"));
                assert!(rejectable, "above the cap and without justification: never servable under lic-3");
            }
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn domestic_ratio_is_met_exactly_at_the_boundary() {
        let c = Conditions { domestic_ratio_bps: 2500, ..Default::default() };
        let l = lic("lic-1", "bytedance", 1000, LicenseStatus::Active, c);
        let g = open_gate();
        assert!(matches!(evaluate(&[&l], &ask(400), 99, &g, NOW), Verdict::Refused { .. }));
        assert_eq!(evaluate(&[&l], &ask(400), 100, &g, NOW), Verdict::Eligible(0));
    }

    #[test]
    fn pending_terms_reports_only_that_and_blocks_rejection() {
        let c = Conditions { per_order_cap: 1, terms_pending: true, ..Default::default() };
        let l = lic("lic-1", "bytedance", 100, LicenseStatus::PendingTerms, c);
        match evaluate(&[&l], &ask(50), 0, &open_gate(), NOW) {
            Verdict::Refused { failures, rejectable } => {
                assert_eq!(conditions(&failures), vec![Condition::TermsFinal]);
                assert!(!rejectable);
            }
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn no_licence_is_recognised_exactly() {
        let mine = Failure::no_licence("buyer-0099");
        assert!(mine.is_no_licence_of("buyer-0099"));
        for other in ["buyer-009", "buyer-00999", "", "buyer-0001"] {
            assert!(!mine.is_no_licence_of(other), "{other}");
        }
        let near_misses = [
            mine.clone().permanent(),
            mine.clone().figures(1, 0),
            Failure { license_id: "lic-1".into(), ..mine.clone() },
            Failure { condition: Condition::Quota as i32, ..mine.clone() },
            Failure { description: format!("{} ", mine.description), ..mine.clone() },
        ];
        for f in near_misses {
            assert!(!f.is_no_licence_of("buyer-0099"), "{f:?}");
        }
    }

    #[test]
    fn no_licence_at_all_is_waiting_not_rejected() {
        match evaluate(&[], &ask(5), 0, &ProductGate::default(), NOW) {
            Verdict::Refused { failures, rejectable } => {
                assert_eq!(conditions(&failures), vec![Condition::License, Condition::ExportAuthorization]);
                assert!(!rejectable);
            }
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn the_oldest_licence_that_passes_serves() {
        let full = {
            let mut l = lic("lic-1", "bytedance", 10, LicenseStatus::Active, Conditions::default());
            l.used = 10;
            l
        };
        let second = lic("lic-2", "bytedance", 10, LicenseStatus::Active, Conditions::default());
        assert_eq!(evaluate(&[&full, &second], &ask(5), 0, &open_gate(), NOW), Verdict::Eligible(1));
    }

    #[test]
    fn planner_takes_quota_in_order_and_never_lets_a_later_order_overtake() {
        let l = lic("lic-1", "bytedance", 100, LicenseStatus::Active, Conditions::default());
        let other = lic("lic-2", "alibaba", 100, LicenseStatus::Active, Conditions::default());
        let domestic = HashMap::new();
        let gate = open_gate();
        let mut p = QuotaPlanner::new(vec![l, other], &domestic, &gate, NOW);
        let b = |units| Ask { buyer_id: "bytedance", units, justification: "" };
        let a = |units| Ask { buyer_id: "alibaba", units, justification: "" };
        assert!(matches!(p.plan("o1", &b(60)), Planned::Reserved { .. }));
        // 40 left: o2 (50) waits, and o3 (10) may not overtake it.
        match p.plan("o2", &b(50)) {
            Planned::Refused { failures, .. } => assert_eq!(conditions(&failures), vec![Condition::Quota]),
            v => panic!("{v:?}"),
        }
        match p.plan("o3", &b(10)) {
            Planned::Refused { failures, .. } => {
                assert_eq!(conditions(&failures), vec![Condition::QueueOrder]);
                assert!(failures[0].description.contains("o2"));
            }
            v => panic!("{v:?}"),
        }
        // Another buyer is not blocked.
        assert!(matches!(p.plan("o4", &a(100)), Planned::Reserved { .. }));
        let mut touched = p.into_touched();
        touched.sort_by(|x, y| x.id.cmp(&y.id));
        assert_eq!(
            touched.iter().map(|l| (l.id.as_str(), l.used)).collect::<Vec<_>>(),
            vec![("lic-1", 60), ("lic-2", 100)]
        );
    }

    #[test]
    fn an_order_that_can_never_be_served_is_rejected_even_while_queued_behind_another() {
        let c = Conditions { per_order_cap: 50, ..Default::default() };
        let l = lic("lic-1", "bytedance", 100, LicenseStatus::Active, c);
        let domestic = HashMap::new();
        let gate = open_gate();
        let mut p = QuotaPlanner::new(vec![l], &domestic, &gate, NOW);
        assert!(matches!(p.plan("o1", &ask(50)), Planned::Reserved { .. }));
        // 50 left: o2 (50) fits, o3 (40) waits for quota...
        assert!(matches!(p.plan("o2", &ask(50)), Planned::Reserved { .. }));
        assert!(matches!(p.plan("o3", &ask(40)), Planned::Refused { rejectable: false, .. }));
        // ... and o4, above the per-order cap, is rejected rather than queued behind o3.
        match p.plan("o4", &ask(60)) {
            Planned::Refused { failures, rejectable } => {
                assert!(rejectable);
                assert!(conditions(&failures).contains(&Condition::PerOrderCap), "{failures:?}");
            }
            v => panic!("{v:?}"),
        }
        // An ask that could be served still queues.
        match p.plan("o5", &ask(1)) {
            Planned::Refused { failures, rejectable } => {
                assert!(!rejectable);
                assert_eq!(conditions(&failures), vec![Condition::QueueOrder]);
            }
            v => panic!("{v:?}"),
        }

        // The same when the earlier order waits from an earlier batch (the caller says so).
        let l = lic(
            "lic-1",
            "bytedance",
            100,
            LicenseStatus::Active,
            Conditions { per_order_cap: 50, ..Default::default() },
        );
        let mut p = QuotaPlanner::new(vec![l], &domestic, &gate, NOW);
        p.queue_behind("bytedance", "o3");
        assert!(matches!(p.plan("o4", &ask(60)), Planned::Refused { rejectable: true, .. }));
        match p.plan("o5", &ask(1)) {
            Planned::Refused { failures, .. } => assert!(failures[0].description.contains("o3")),
            v => panic!("{v:?}"),
        }
        assert!(p.into_touched().is_empty(), "nothing was taken behind a waiting order");
    }

    #[test]
    fn quota_held_is_questioned_only_by_the_licence_state_and_the_product_gates() {
        let mut l = lic(
            "lic-1",
            "bytedance",
            100,
            LicenseStatus::Active,
            Conditions { per_order_cap: 1, ..Default::default() },
        );
        l.used = 100;
        let gate = open_gate();
        assert!(holding_failures(&l, &gate, NOW).is_empty(), "exhausted, capped: the quota taken stays usable");
        let mut suspended = l.clone();
        suspended.suspend("audit", NOW).expect("suspend");
        let f = holding_failures(&suspended, &gate, NOW);
        assert_eq!(conditions(&f), vec![Condition::LicenseInForce]);
        assert_eq!(f[0].description, "licence lic-1 is suspended: audit");
        let mut revoked = l.clone();
        revoked.revoke("fraud", NOW).expect("revoke");
        assert_eq!(conditions(&holding_failures(&revoked, &gate, NOW)), vec![Condition::LicenseInForce]);
        let expiring =
            lic("lic-2", "b", 10, LicenseStatus::Active, Conditions { valid_until_ms: NOW, ..Default::default() });
        assert_eq!(conditions(&holding_failures(&expiring, &gate, NOW)), vec![Condition::ValidityWindow]);
        let closed =
            ProductGate { embargoed: true, embargo_reason: "notice 7".into(), export_destinations: HashSet::new() };
        let f = holding_failures(&l, &closed, NOW);
        assert_eq!(conditions(&f), vec![Condition::ImportPolicy, Condition::ExportAuthorization]);
        // The same words as when an order is evaluated.
        let Verdict::Refused { failures, .. } = evaluate(&[&l], &ask(0), 0, &closed, NOW) else { panic!() };
        assert_eq!(failures[0].description, f[0].description);
        assert!(failures.iter().any(|x| x.description == f[1].description), "{failures:?}");
    }

    #[test]
    fn planner_does_not_block_behind_a_rejected_order() {
        let c = Conditions { per_order_cap: 10, ..Default::default() };
        let l = lic("lic-1", "bytedance", 100, LicenseStatus::Active, c);
        let domestic = HashMap::new();
        let gate = open_gate();
        let mut p = QuotaPlanner::new(vec![l], &domestic, &gate, NOW);
        assert!(matches!(p.plan("big", &ask(50)), Planned::Refused { rejectable: true, .. }));
        assert!(matches!(p.plan("small", &ask(5)), Planned::Reserved { .. }));
    }

    #[test]
    fn conditions_are_validated() {
        let c = Conditions {
            valid_from_ms: 10,
            valid_until_ms: 5,
            domestic_ratio_bps: MAX_RATIO_BPS + 1,
            ..Default::default()
        };
        let fields: Vec<&str> = c.problems().iter().map(|p| p.0).collect();
        assert_eq!(fields, ["valid_until", "domestic_ratio_bps"]);
        assert!(Conditions::default().problems().is_empty());
    }
    /// Order "o"'s 10 units of lic-1, held by its generation 2.
    fn held_at_generation_2() -> ReservationRecord {
        ReservationRecord {
            order_id: "o".into(),
            generation: 2,
            license_id: "lic-1".into(),
            units: 10,
            status: ReservationStatus::Held as i32,
            ..Default::default()
        }
    }

    #[test]
    fn reservation_generations_fence_off_stale_calls() {
        let r = held_at_generation_2();
        assert_eq!(r.check_reserve(2, true), ReserveCheck::AlreadyHeld);
        assert_eq!(r.check_reserve(1, true), ReserveCheck::Stale);
        assert_eq!(
            r.check_reserve(3, true),
            ReserveCheck::Supersede { license_id: "lic-1".into(), units: 10, confirmed: false }
        );
        let released = ReservationRecord { status: ReservationStatus::Released as i32, ..r.clone() };
        assert_eq!(released.check_reserve(2, true), ReserveCheck::Stale, "a released generation is never reopened");
        assert_eq!(released.check_reserve(2, false), ReserveCheck::Stale);
        assert_eq!(released.check_reserve(3, true), ReserveCheck::Evaluate);
        assert_eq!(released.held_units(), 0);
    }

    #[test]
    fn quota_held_by_an_ask_that_may_not_take_any_is_withdrawn() {
        let r = held_at_generation_2();
        // Held by this generation, asked again behind an earlier order (or only to be judged): the
        // decision that took it never landed, so it goes back.
        assert_eq!(r.check_reserve(2, false), ReserveCheck::Withdraw { license_id: "lic-1".into(), units: 10 });
        // Older and newer generations are unaffected by whether the ask may take quota.
        assert_eq!(r.check_reserve(1, false), ReserveCheck::Stale);
        assert_eq!(
            r.check_reserve(3, false),
            ReserveCheck::Supersede { license_id: "lic-1".into(), units: 10, confirmed: false }
        );
        // Confirmed quota came from a decision that landed: answered held whatever the ask.
        let confirmed = ReservationRecord { status: ReservationStatus::Confirmed as i32, ..r };
        assert_eq!(confirmed.check_reserve(2, false), ReserveCheck::AlreadyHeld);
    }

    /// A reservation as a wave leaves it: held, of a licence of the order's own product.
    fn held_reservation() -> ReservationRecord {
        ReservationRecord {
            order_id: "ord-H200-SXM-141GB-49999".into(),
            generation: 1,
            license_id: "lic-H200-SXM-141GB-199".into(),
            wave_id: "wave-1".into(),
            buyer_id: "buyer-0099".into(),
            product_sku: "H200-SXM-141GB".into(),
            units: 10,
            status: ReservationStatus::Held as i32,
            create_ms: NOW,
            update_ms: NOW,
            release_reason: String::new(),
        }
    }

    #[test]
    fn the_stored_reservation_reads_back_without_what_its_key_says() {
        use prost::Message;
        let (sku, order) = ("H200-SXM-141GB", "ord-H200-SXM-141GB-49999");
        let r = held_reservation();
        let stored = r.to_stored();
        assert_eq!(ReservationRecord::from_stored(&stored, sku, order).unwrap(), r);
        // Neither the order, nor the product, nor the licence id is in the bytes, and (with its
        // "N:" version prefix) it stays within Redis' 44-byte embedded strings.
        for repeated in [order, sku] {
            assert!(!stored.windows(repeated.len()).any(|w| w == repeated.as_bytes()), "{repeated} in {stored:?}");
        }
        assert!(stored.len() + 2 <= 44, "{} bytes", stored.len());
        assert!(stored.len() * 2 < r.encode_to_vec().len(), "{} vs {}", stored.len(), r.encode_to_vec().len());

        // Released later (a later time, a reason), confirmed, or a tombstone of no licence: equal too.
        let mut released = r.clone();
        released.set_status(ReservationStatus::Released);
        released.update_ms = NOW + 90_000;
        released.release_reason = "order cancelled".into();
        let confirmed =
            ReservationRecord { status: ReservationStatus::Confirmed as i32, update_ms: NOW - 5, ..r.clone() };
        let tombstone = ReservationRecord {
            license_id: String::new(),
            wave_id: String::new(),
            status: ReservationStatus::Released as i32,
            ..r.clone()
        };
        // A licence of another product, or not in licensing's form, is kept whole.
        let foreign = ReservationRecord { license_id: "lic-H20-3".into(), ..r.clone() };
        let odd = ReservationRecord { license_id: "lic-H200-SXM-141GB-07".into(), ..r.clone() };
        for x in [released, confirmed, tombstone, foreign, odd] {
            assert_eq!(ReservationRecord::from_stored(&x.to_stored(), sku, order).unwrap(), x);
        }
    }

    #[test]
    fn reservations_stored_before_the_compact_form_still_read() {
        use prost::Message;
        // The plain encoding holds its own order and product: the key's are not used.
        let r = held_reservation();
        assert_eq!(
            ReservationRecord::from_stored(&r.encode_to_vec(), "H200-SXM-141GB", "ord-H200-SXM-141GB-49999").unwrap(),
            r
        );
        assert_eq!(ReservationRecord::from_stored(&r.encode_to_vec(), "other", "ord-other-1").unwrap(), r);
        assert!(ReservationRecord::from_stored(b"\xff\xff", "H200", "ord-H200-1").is_err());
    }

    #[test]
    fn a_drafts_grants_are_counted_apart_and_published_waves_are_immutable() {
        let mut w = WaveRecord { status: WaveStatus::Draft as i32, ..Default::default() };
        let g = |app: &str, units| GrantRecord { application_id: app.into(), granted: units, ..Default::default() };
        let a1 = w.put_grant(None, g("app-1", 10)).expect("draft");
        let a2 = w.put_grant(None, g("app-2", 5)).expect("draft");
        assert_eq!((a1.place, a2.place), (1, 2));
        // Replacing keeps the grant's place and counts the difference only.
        let a1b = w.put_grant(Some(&a1), g("app-1", 7)).expect("replace");
        assert_eq!(a1b.place, 1);
        assert_eq!((w.grant_count(), w.total_granted()), (2, 12));
        assert_eq!(w.take_grant(None), Err(WaveError::NoSuchGrant));
        w.take_grant(Some(&a2)).expect("remove");
        assert_eq!((w.grant_count(), w.total_granted()), (1, 7));
        // A place is never given twice.
        let a3 = w.put_grant(None, g("app-3", 2)).expect("draft");
        assert_eq!(a3.place, 3);
        // Held in the order they were added, whatever the order they are read in.
        let mut shown = w.clone();
        shown.hold_grants(vec![a3.clone(), a1b.clone()]);
        let apps: Vec<&str> = shown.grants.iter().map(|g| g.application_id.as_str()).collect();
        assert_eq!(apps, ["app-1", "app-3"]);
        assert_eq!((shown.grant_count(), shown.total_granted()), (2, 9));
        w.status = WaveStatus::Published as i32;
        assert_eq!(w.put_grant(None, g("app-4", 1)), Err(WaveError::Published));
        assert_eq!(w.take_grant(Some(&a1b)), Err(WaveError::Published));
    }

    #[test]
    fn a_draft_holding_its_grants_moves_them_apart_in_their_order() {
        let g = |app: &str, units| GrantRecord { application_id: app.into(), granted: units, ..Default::default() };
        let mut w = WaveRecord {
            status: WaveStatus::Draft as i32,
            grants: vec![g("app-2", 5), g("app-1", 10)],
            ..Default::default()
        };
        assert_eq!((w.grant_count(), w.total_granted()), (2, 15));
        let moved = w.move_grants_apart();
        assert_eq!(
            moved.iter().map(|g| (g.application_id.as_str(), g.place)).collect::<Vec<_>>(),
            [("app-2", 1), ("app-1", 2)]
        );
        assert!(w.grants.is_empty());
        assert_eq!((w.grant_count(), w.total_granted()), (2, 15), "counted apart now");
        assert_eq!(w.put_grant(None, g("app-3", 1)).expect("draft").place, 3);
        // A published wave's grants stay where they are.
        let mut published =
            WaveRecord { status: WaveStatus::Published as i32, grants: vec![g("app-1", 1)], ..Default::default() };
        assert!(published.move_grants_apart().is_empty());
        assert_eq!(published.grants.len(), 1);
    }

    #[test]
    fn gate_reads_policy_and_exports() {
        let policy =
            PolicyRecord { stance: Stance::Embargoed as i32, reason: "customs notice".into(), ..Default::default() };
        let exports = ProductExportRecord {
            product_sku: "H200".into(),
            authorizations: vec![
                ExportAuthRecord { destination: "CN".into(), active: true, ..Default::default() },
                ExportAuthRecord { destination: "AE".into(), active: false, ..Default::default() },
            ],
        };
        let g = ProductGate::from_records(Some(&policy), Some(&exports));
        assert!(g.embargoed);
        assert_eq!(g.export_destinations, ["CN".to_string()].into());
        let open = ProductGate::from_records(None, None);
        assert!(!open.embargoed && open.export_destinations.is_empty());
    }
}
