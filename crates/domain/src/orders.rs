//! Order rules: states, the moves between them, the history every move leaves, and the releases a move
//! owes the other services.
//!
//! ```text
//!              ┌──────────────────────────────(unwind: licence suspended/revoked, embargo)──┐
//!              v                                                                             │
//! PENDING → AWAITING_LICENSE → BACKORDERED → RESERVED → CONFIRMED → SHIPPED                  │
//!    │            │    ^             │  ^        │                                           │
//!    │            │    └─────────────┴──┴────────┴───────────────────────────────────────────┘
//!    └→ REJECTED ←┘                             └→ EXPIRED (hold not confirmed in time)
//! any state before SHIPPED → CANCELLED
//! ```
//!
//! Every move that gives up licence quota or held stock records a [`PendingRelease`] in the same
//! atomic step; a worker carries the releases out (they are idempotent per order and generation) and
//! clears them, so a crash between the move and the release never leaks quota or stock. Going back to
//! waiting bumps the order's *generation*, so quota or holds of an earlier attempt can never be
//! confused with the current one.

use prost::Message;

use crate::ids::{LicenceId, OrderId, Sku};
use crate::licensing::Failure;

/// Where an order stands (mirrors the API's `OrderState`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum OrderStatus {
    /// Never stored.
    Unspecified = 0,
    /// Placed, in the awaiting queue, not evaluated yet.
    Pending = 1,
    /// Waiting for a usable licence.
    AwaitingLicense = 2,
    /// Holds quota, waiting for stock in the backlog.
    Backordered = 3,
    /// Every unit held.
    Reserved = 4,
    /// Confirmed.
    Confirmed = 5,
    /// Shipped.
    Shipped = 6,
    /// Cancelled.
    Cancelled = 7,
    /// Hold expired unconfirmed.
    Expired = 8,
    /// Can never be served.
    Rejected = 9,
}

impl OrderStatus {
    /// Upper-case API name without prefix, e.g. `BACKORDERED`.
    pub fn name(self) -> &'static str {
        match self {
            OrderStatus::Unspecified => "UNSPECIFIED",
            OrderStatus::Pending => "PENDING",
            OrderStatus::AwaitingLicense => "AWAITING_LICENSE",
            OrderStatus::Backordered => "BACKORDERED",
            OrderStatus::Reserved => "RESERVED",
            OrderStatus::Confirmed => "CONFIRMED",
            OrderStatus::Shipped => "SHIPPED",
            OrderStatus::Cancelled => "CANCELLED",
            OrderStatus::Expired => "EXPIRED",
            OrderStatus::Rejected => "REJECTED",
        }
    }

    /// Every status, for indexes and figures.
    pub const ALL: [OrderStatus; 9] = [
        OrderStatus::Pending,
        OrderStatus::AwaitingLicense,
        OrderStatus::Backordered,
        OrderStatus::Reserved,
        OrderStatus::Confirmed,
        OrderStatus::Shipped,
        OrderStatus::Cancelled,
        OrderStatus::Expired,
        OrderStatus::Rejected,
    ];

    /// In the awaiting queue (evaluated or not).
    pub fn is_waiting(self) -> bool {
        matches!(self, OrderStatus::Pending | OrderStatus::AwaitingLicense)
    }

    /// Holds licence quota that is not confirmed (the orders a suspension or embargo sends back).
    pub fn holds_unconfirmed_quota(self) -> bool {
        matches!(self, OrderStatus::Backordered | OrderStatus::Reserved)
    }

    /// No further move is possible.
    pub fn is_final(self) -> bool {
        matches!(self, OrderStatus::Shipped | OrderStatus::Cancelled | OrderStatus::Expired | OrderStatus::Rejected)
    }

    /// Whether `self → to` is a move the order life cycle allows.
    pub fn can_move_to(self, to: OrderStatus) -> bool {
        use OrderStatus::*;
        match (self, to) {
            (Pending, AwaitingLicense | Backordered | Rejected | Cancelled) => true,
            // Re-evaluation of a waiting order that stays waiting (with new reasons) is a move too.
            (AwaitingLicense, AwaitingLicense | Backordered | Rejected | Cancelled) => true,
            (Backordered, Backordered | Reserved | AwaitingLicense | Cancelled) => true,
            (Reserved, Confirmed | Expired | AwaitingLicense | Cancelled) => true,
            (Confirmed, Shipped | Cancelled) => true,
            _ => false,
        }
    }
}

/// What made an order move (mirrors the API's `CauseKind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum CauseKind {
    /// Unknown.
    Unspecified = 0,
    /// Placed.
    Placed = 1,
    /// A wave was published.
    WavePublished = 2,
    /// Terms finalised.
    TermsFinalized = 3,
    /// Licence reinstated.
    LicenseReinstated = 4,
    /// Licence suspended.
    LicenseSuspended = 5,
    /// Licence revoked.
    LicenseRevoked = 6,
    /// Domestic purchase recorded.
    DomesticPurchase = 7,
    /// Export authorised.
    ExportAuthorized = 8,
    /// Export authorisation revoked.
    ExportRevoked = 9,
    /// Embargo set.
    EmbargoSet = 10,
    /// Embargo lifted.
    EmbargoLifted = 11,
    /// Supply received.
    SupplyReceived = 12,
    /// Stock released by others.
    StockReleased = 13,
    /// The order's own hold expired.
    HoldExpired = 14,
    /// The buyer cancelled.
    Cancelled = 15,
    /// The buyer confirmed.
    Confirmed = 16,
    /// The vendor shipped.
    Shipped = 17,
    /// Quota went back to a licence.
    QuotaReturned = 18,
    /// A reconciliation pass.
    Reconciled = 19,
    /// The product's allocation policy changed.
    AllocationPolicy = 20,
}

impl CauseKind {
    /// Short stable code used in dirty marks and logs, e.g. `wave`.
    pub fn code(self) -> &'static str {
        match self {
            CauseKind::Unspecified => "unspecified",
            CauseKind::Placed => "placed",
            CauseKind::WavePublished => "wave",
            CauseKind::TermsFinalized => "terms",
            CauseKind::LicenseReinstated => "reinstated",
            CauseKind::LicenseSuspended => "suspended",
            CauseKind::LicenseRevoked => "revoked",
            CauseKind::DomesticPurchase => "domestic",
            CauseKind::ExportAuthorized => "export-granted",
            CauseKind::ExportRevoked => "export-revoked",
            CauseKind::EmbargoSet => "embargo",
            CauseKind::EmbargoLifted => "embargo-lifted",
            CauseKind::SupplyReceived => "supply",
            CauseKind::StockReleased => "stock-released",
            CauseKind::HoldExpired => "hold-expired",
            CauseKind::Cancelled => "cancelled",
            CauseKind::Confirmed => "confirmed",
            CauseKind::Shipped => "shipped",
            CauseKind::QuotaReturned => "quota-returned",
            CauseKind::Reconciled => "reconciled",
            CauseKind::AllocationPolicy => "policy",
        }
    }

    /// The kind for a [`code`](Self::code).
    pub fn from_code(code: &str) -> Self {
        const KINDS: [CauseKind; 20] = [
            CauseKind::Placed,
            CauseKind::WavePublished,
            CauseKind::TermsFinalized,
            CauseKind::LicenseReinstated,
            CauseKind::LicenseSuspended,
            CauseKind::LicenseRevoked,
            CauseKind::DomesticPurchase,
            CauseKind::ExportAuthorized,
            CauseKind::ExportRevoked,
            CauseKind::EmbargoSet,
            CauseKind::EmbargoLifted,
            CauseKind::SupplyReceived,
            CauseKind::StockReleased,
            CauseKind::HoldExpired,
            CauseKind::Cancelled,
            CauseKind::Confirmed,
            CauseKind::Shipped,
            CauseKind::QuotaReturned,
            CauseKind::Reconciled,
            CauseKind::AllocationPolicy,
        ];
        KINDS.into_iter().find(|k| k.code() == code).unwrap_or(CauseKind::Unspecified)
    }
}

/// Why something happened: a kind and the id it refers to (wave, licence, receipt, order).
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct Cause {
    /// [`CauseKind`].
    #[prost(enumeration = "CauseKind", tag = "1")]
    pub kind: i32,
    /// The id it refers to.
    #[prost(string, tag = "2")]
    pub reference: String,
}

impl Cause {
    /// A cause.
    pub fn new(kind: CauseKind, reference: impl Into<String>) -> Self {
        Cause { kind: kind as i32, reference: reference.into() }
    }

    /// `kind:reference`, the form dirty marks carry.
    pub fn encode(&self) -> String {
        format!("{}:{}", self.kind().code(), self.reference)
    }

    /// Parses [`encode`](Self::encode)'s form.
    pub fn decode(s: &str) -> Self {
        let (kind, reference) = s.split_once(':').unwrap_or((s, ""));
        Cause::new(CauseKind::from_code(kind), reference)
    }
}

/// One step of an order's history.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TransitionRecord {
    /// From.
    #[prost(enumeration = "OrderStatus", tag = "1")]
    pub from: i32,
    /// To.
    #[prost(enumeration = "OrderStatus", tag = "2")]
    pub to: i32,
    /// When (ms since epoch).
    #[prost(uint64, tag = "3")]
    pub at_ms: u64,
    /// Why.
    #[prost(message, optional, tag = "4")]
    pub cause: Option<Cause>,
    /// In words.
    #[prost(string, tag = "5")]
    pub detail: String,
    /// Failed conditions, when waiting or rejected.
    #[prost(message, repeated, tag = "6")]
    pub failures: Vec<Failure>,
    /// The licence whose quota the step took or gave back.
    #[prost(string, tag = "7")]
    pub license_id: String,
    /// That licence's wave.
    #[prost(string, tag = "8")]
    pub wave_id: String,
    /// Units held after the step (or, when quota and holds are given back, before it).
    #[prost(uint64, tag = "9")]
    pub held: u64,
    /// Why the step's units went to this order, when an allocation policy shared them out.
    #[prost(message, optional, tag = "10")]
    pub share: Option<crate::shares::ShareNote>,
}

impl TransitionRecord {
    /// The step in words. Only free text (a cancellation reason) is stored; everything else is
    /// rendered from the step's figures, which keeps order records small.
    pub fn describe(&self, order: &OrderRecord) -> String {
        if !self.detail.is_empty() {
            return self.detail.clone();
        }
        let why = || self.failures.iter().map(|f| f.description.as_str()).collect::<Vec<_>>().join("; ");
        use OrderStatus::*;
        match (self.from(), self.to()) {
            (_, Pending) => format!("{} placed an order for {} x {}", order.buyer_id, order.units, order.sku),
            (Backordered | Reserved, AwaitingLicense) => {
                format!("quota of licence {} and {} held units given back: {}", self.license_id, self.held, why())
            }
            (_, AwaitingLicense) => format!("waiting: {}", why()),
            (_, Rejected) => format!("can never be served: {}", why()),
            (Backordered, Backordered) => format!(
                "{} of {} units held{}; waiting in the backlog for the rest",
                self.held,
                order.units,
                self.share_text(order)
            ),
            (_, Backordered) => format!(
                "licence {} (wave {}) granted {} units of quota; waiting for stock",
                self.license_id, self.wave_id, order.units
            ),
            (_, Reserved) => {
                format!("all {} units held{} until the hold expires", order.units, self.share_text(order))
            }
            (_, Confirmed) => "confirmed by the buyer; quota and stock committed".to_string(),
            (_, Shipped) => "shipped by the vendor".to_string(),
            (_, Expired) => "not confirmed before the hold expired; the units went back to stock".to_string(),
            (_, Cancelled) => "cancelled".to_string(),
            (_, Unspecified) => String::new(),
        }
    }
}

impl TransitionRecord {
    /// ` (why: share, cap)` when an allocation policy decided the step's units, else nothing.
    fn share_text(&self, order: &OrderRecord) -> String {
        self.share.as_ref().map(|n| format!(" ({})", n.describe(&order.sku))).unwrap_or_default()
    }
}

/// Quota and stock an order still has to give back for one of its generations.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct PendingRelease {
    /// The generation whose quota and hold go back.
    #[prost(uint64, tag = "1")]
    pub generation: u64,
    /// Give back licence quota.
    #[prost(bool, tag = "2")]
    pub quota: bool,
    /// Give back held (or committed) stock.
    #[prost(bool, tag = "3")]
    pub hold: bool,
    /// Why (for the other services' records).
    #[prost(string, tag = "4")]
    pub reason: String,
}

/// A stored order.
#[derive(Clone, PartialEq, prost::Message)]
pub struct OrderRecord {
    /// "ord-N".
    #[prost(string, tag = "1")]
    pub id: String,
    /// The request that placed it.
    #[prost(string, tag = "2")]
    pub request_id: String,
    /// Buyer.
    #[prost(string, tag = "3")]
    pub buyer_id: String,
    /// Product.
    #[prost(string, tag = "4")]
    pub sku: String,
    /// Units.
    #[prost(uint64, tag = "5")]
    pub units: u64,
    /// Justification.
    #[prost(string, tag = "6")]
    pub justification: String,
    /// [`OrderStatus`].
    #[prost(enumeration = "OrderStatus", tag = "7")]
    pub status: i32,
    /// Why it waits or was rejected.
    #[prost(message, repeated, tag = "8")]
    pub reasons: Vec<Failure>,
    /// Licence of its quota.
    #[prost(string, tag = "9")]
    pub license_id: String,
    /// That licence's wave.
    #[prost(string, tag = "10")]
    pub wave_id: String,
    /// Allocation generation (starts at 1).
    #[prost(uint64, tag = "11")]
    pub generation: u64,
    /// Units held so far.
    #[prost(uint64, tag = "12")]
    pub held: u64,
    /// Hold expiry (RESERVED).
    #[prost(uint64, tag = "13")]
    pub hold_expire_ms: u64,
    /// Placement sequence.
    #[prost(uint64, tag = "14")]
    pub seq: u64,
    /// Placed at.
    #[prost(uint64, tag = "15")]
    pub create_ms: u64,
    /// Last change.
    #[prost(uint64, tag = "16")]
    pub update_ms: u64,
    /// Every move.
    #[prost(message, repeated, tag = "17")]
    pub history: Vec<TransitionRecord>,
    /// Releases still owed to licensing and inventory.
    #[prost(message, repeated, tag = "18")]
    pub pending: Vec<PendingRelease>,
}

/// How an order is kept in Redis: the record's own encoding without its history — and without its
/// reasons and last-change time when its last step already says them — followed by the history in
/// [`StoredHistory`]'s fields (19–21), whose steps leave out what the record or the step before
/// already holds: the order's own id as a cause, the order's licence and wave, a step's `from` (the
/// previous step's `to`), and absolute times (a step stores the milliseconds since the one before).
/// Nor does the record repeat what its product and sequence say: an id `ord-<sku>-<seq>` and a licence
/// `lic-<sku>-<n>` (its number kept) are left out, and so is the failure every order placed before its
/// buyer's licence waits on ([`Failure::no_licence`] of the order's buyer; its position kept).
/// A plain prost decode of these bytes reads the record without its history (fields 19–21 are
/// unknown to [`OrderRecord`]); [`OrderRecord::from_stored`] reads both forms, so records written
/// before this form existed read as they were.
///
/// Why: after a wave, the history of an order (placed, waiting, backordered, reserved) repeated the
/// order id twice, the licence and wave ids once and four absolute timestamps — about a quarter of
/// the record's bytes, stored and sent to Redis with every move.
#[derive(Clone, PartialEq, prost::Message)]
struct StoredHistory {
    /// Every step, oldest first.
    #[prost(message, repeated, tag = "19")]
    steps: Vec<StoredStep>,
    /// The record's reasons are its last step's failures (left out of the record).
    #[prost(bool, tag = "20")]
    reasons_in_last_step: bool,
    /// The record's last change is its last step's time (left out of the record).
    #[prost(bool, tag = "21")]
    updated_at_last_step: bool,
    /// The record's id is `ord-<sku>-<seq>` ([`OrderId::new`] of its own product and sequence; left
    /// out of the record).
    #[prost(bool, tag = "22")]
    id_from_sequence: bool,
    /// The record's licence is `lic-<sku>-<n>` of its own product: its id is left out of the record
    /// and `n` kept here (0: the id, if any, is in the record).
    #[prost(uint64, tag = "23")]
    licence_number: u64,
}

/// A [`TransitionRecord`] as stored in [`StoredHistory`].
#[derive(Clone, PartialEq, prost::Message)]
struct StoredStep {
    /// From, when it is not the previous step's `to` (before the first step: UNSPECIFIED).
    #[prost(enumeration = "OrderStatus", optional, tag = "1")]
    from: Option<i32>,
    /// To.
    #[prost(enumeration = "OrderStatus", tag = "2")]
    to: i32,
    /// Milliseconds since the previous step (the first: since the order was placed); signed, as the
    /// clocks of two replicas may disagree.
    #[prost(sint64, tag = "3")]
    after_ms: i64,
    /// Why, its reference left out when it is the order's own id (`cause_is_order`).
    #[prost(message, optional, tag = "4")]
    cause: Option<Cause>,
    /// The cause's reference is the order's id.
    #[prost(bool, tag = "5")]
    cause_is_order: bool,
    /// In words.
    #[prost(string, tag = "6")]
    detail: String,
    /// Failed conditions.
    #[prost(message, repeated, tag = "7")]
    failures: Vec<Failure>,
    /// The step's licence, unless it is the order's (`licence_is_order`).
    #[prost(string, tag = "8")]
    license_id: String,
    /// The step's wave, unless it is the order's (`licence_is_order`).
    #[prost(string, tag = "9")]
    wave_id: String,
    /// The step's licence and wave are the order's current ones.
    #[prost(bool, tag = "10")]
    licence_is_order: bool,
    /// Units held.
    #[prost(uint64, tag = "11")]
    held: u64,
    /// Share note.
    #[prost(message, optional, tag = "12")]
    share: Option<crate::shares::ShareNote>,
    /// Where, among the step's failures, [`Failure::no_licence`] of the order's buyer goes (left out
    /// of `failures`), in ascending order.
    #[prost(uint32, repeated, tag = "13")]
    no_licence_at: Vec<u32>,
}

impl OrderRecord {
    /// The bytes Redis keeps for this order (see [`StoredHistory`]); [`from_stored`](Self::from_stored)
    /// reads them back to an equal record.
    pub fn to_stored(&self) -> Vec<u8> {
        let reasons_in_last_step =
            !self.reasons.is_empty() && self.history.last().is_some_and(|s| s.failures == self.reasons);
        let updated_at_last_step =
            self.update_ms != 0 && self.history.last().is_some_and(|s| s.at_ms == self.update_ms);
        let id_from_sequence = OrderId::number_in(&self.id, &self.sku) == Some(self.seq);
        let licence_number = LicenceId::number_in(&self.license_id, &self.sku).filter(|&n| n > 0).unwrap_or(0);
        let no_licence = |f: &Failure| f.is_no_licence_of(&self.buyer_id);
        let head = OrderRecord {
            id: if id_from_sequence { String::new() } else { self.id.clone() },
            request_id: self.request_id.clone(),
            buyer_id: self.buyer_id.clone(),
            sku: self.sku.clone(),
            units: self.units,
            justification: self.justification.clone(),
            status: self.status,
            reasons: if reasons_in_last_step { Vec::new() } else { self.reasons.clone() },
            license_id: if licence_number > 0 { String::new() } else { self.license_id.clone() },
            wave_id: self.wave_id.clone(),
            generation: self.generation,
            held: self.held,
            hold_expire_ms: self.hold_expire_ms,
            seq: self.seq,
            create_ms: self.create_ms,
            update_ms: if updated_at_last_step { 0 } else { self.update_ms },
            history: Vec::new(),
            pending: self.pending.clone(),
        };
        let mut previous = (OrderStatus::Unspecified as i32, self.create_ms);
        let steps = self
            .history
            .iter()
            .map(|s| {
                let cause_is_order = !self.id.is_empty() && s.cause.as_ref().is_some_and(|c| c.reference == self.id);
                let licence_is_order =
                    !self.license_id.is_empty() && s.license_id == self.license_id && s.wave_id == self.wave_id;
                let step = StoredStep {
                    from: (s.from != previous.0).then_some(s.from),
                    to: s.to,
                    after_ms: s.at_ms.wrapping_sub(previous.1) as i64,
                    cause: s.cause.as_ref().map(|c| Cause {
                        kind: c.kind,
                        reference: if cause_is_order { String::new() } else { c.reference.clone() },
                    }),
                    cause_is_order,
                    detail: s.detail.clone(),
                    failures: s.failures.iter().filter(|f| !no_licence(f)).cloned().collect(),
                    license_id: if licence_is_order { String::new() } else { s.license_id.clone() },
                    wave_id: if licence_is_order { String::new() } else { s.wave_id.clone() },
                    licence_is_order,
                    held: s.held,
                    share: s.share.clone(),
                    no_licence_at: (0u32..).zip(&s.failures).filter(|(_, f)| no_licence(f)).map(|(i, _)| i).collect(),
                };
                previous = (s.to, s.at_ms);
                step
            })
            .collect();
        let history =
            StoredHistory { steps, reasons_in_last_step, updated_at_last_step, id_from_sequence, licence_number };
        crate::encode_stored(&head, &history)
    }

    /// Reads what [`to_stored`](Self::to_stored) wrote, or a record's plain encoding (the form before
    /// it).
    ///
    /// # Errors
    /// When the bytes are not an order.
    pub fn from_stored(bytes: &[u8]) -> Result<Self, prost::DecodeError> {
        let mut order = OrderRecord::decode(bytes)?;
        let stored = StoredHistory::decode(bytes)?;
        // The id and licence first: the steps below refer to them.
        if stored.id_from_sequence {
            order.id = OrderId::new(&Sku::from_trusted(order.sku.as_str()), order.seq).into_string();
        }
        if stored.licence_number > 0 {
            order.license_id =
                LicenceId::new(&Sku::from_trusted(order.sku.as_str()), stored.licence_number).into_string();
        }
        // Built once, and only if some step had it.
        let mut no_licence: Option<Failure> = None;
        let mut previous =
            order.history.last().map_or((OrderStatus::Unspecified as i32, order.create_ms), |s| (s.to, s.at_ms));
        order.history.reserve(stored.steps.len());
        for s in stored.steps {
            let at_ms = previous.1.wrapping_add(s.after_ms as u64);
            let (license_id, wave_id) = if s.licence_is_order {
                (order.license_id.clone(), order.wave_id.clone())
            } else {
                (s.license_id, s.wave_id)
            };
            let mut failures = s.failures;
            for at in s.no_licence_at {
                // Ascending positions in the whole list: each lands where it was (clamped, so bytes
                // that aren't ours can't panic).
                let f = no_licence.get_or_insert_with(|| Failure::no_licence(&order.buyer_id)).clone();
                failures.insert((at as usize).min(failures.len()), f);
            }
            order.history.push(TransitionRecord {
                from: s.from.unwrap_or(previous.0),
                to: s.to,
                at_ms,
                cause: s.cause.map(|c| Cause {
                    kind: c.kind,
                    reference: if s.cause_is_order { order.id.clone() } else { c.reference },
                }),
                detail: s.detail,
                failures,
                license_id,
                wave_id,
                held: s.held,
                share: s.share,
            });
            previous = (s.to, at_ms);
        }
        if let Some(last) = order.history.last() {
            if stored.reasons_in_last_step {
                order.reasons.clone_from(&last.failures);
            }
            if stored.updated_at_last_step {
                order.update_ms = last.at_ms;
            }
        }
        Ok(order)
    }
}

/// What writing an order needs to know of the record it replaces: the state index and queues it
/// leaves, the wave figures and units held it no longer counts, the releases it already owed, and
/// which steps of its history are new. A record moved in place ([`Evaluation::decide_owned`]) keeps
/// this instead of a copy of itself.
///
/// [`Evaluation::decide_owned`]: crate::allocation::Evaluation::decide_owned
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Before {
    /// Its state.
    pub status: OrderStatus,
    /// Units it held.
    pub held: u64,
    /// Steps in its history.
    pub steps: usize,
    /// It owed releases.
    pub owed: bool,
    /// The wave of its licence ("" when none).
    pub wave_id: String,
}

impl OrderRecord {
    /// What a write replacing this record needs of it (see [`Before`]).
    pub fn before(&self) -> Before {
        Before {
            status: self.status(),
            held: self.held,
            steps: self.history.len(),
            owed: !self.pending.is_empty(),
            wave_id: self.wave_id.clone(),
        }
    }
}

/// A move the life cycle does not allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoveError {
    /// From.
    pub from: OrderStatus,
    /// To.
    pub to: OrderStatus,
}

impl std::fmt::Display for MoveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "an order can't go from {} to {}", self.from.name(), self.to.name())
    }
}

impl std::error::Error for MoveError {}

/// Same conditions with the same figures (what decides whether a re-evaluation is worth recording).
pub fn same_reasons(a: &[Failure], b: &[Failure]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.condition == y.condition
                && x.license_id == y.license_id
                && x.required == y.required
                && x.actual == y.actual
        })
}

impl OrderRecord {
    /// Moves the order to `to`, recording the step. Returns whether anything was recorded (a waiting
    /// order re-evaluated with unchanged reasons records nothing).
    ///
    /// # Errors
    /// When the life cycle does not allow the move.
    pub fn move_to(
        &mut self,
        to: OrderStatus,
        cause: Cause,
        detail: impl Into<String>,
        failures: Vec<Failure>,
        now_ms: u64,
    ) -> Result<bool, MoveError> {
        let from = self.status();
        if !from.can_move_to(to) {
            return Err(MoveError { from, to });
        }
        if from == to && from == OrderStatus::AwaitingLicense && same_reasons(&self.reasons, &failures) {
            return Ok(false);
        }
        self.history.push(TransitionRecord {
            from: from as i32,
            to: to as i32,
            at_ms: now_ms,
            cause: Some(cause),
            detail: detail.into(),
            failures: failures.clone(),
            license_id: String::new(),
            wave_id: String::new(),
            held: 0,
            share: None,
        });
        self.status = to as i32;
        self.reasons =
            if matches!(to, OrderStatus::AwaitingLicense | OrderStatus::Rejected) { failures } else { Vec::new() };
        self.update_ms = now_ms;
        Ok(true)
    }

    /// Took quota from `license_id` (of `wave_id`): AWAITING → BACKORDERED.
    ///
    /// # Errors
    /// When the order is not waiting.
    pub fn take_quota(
        &mut self,
        license_id: &str,
        wave_id: &str,
        cause: Cause,
        now_ms: u64,
    ) -> Result<bool, MoveError> {
        self.move_to(OrderStatus::Backordered, cause, "", Vec::new(), now_ms)?;
        self.license_id = license_id.to_string();
        self.wave_id = wave_id.to_string();
        if let Some(step) = self.history.last_mut() {
            step.license_id = license_id.to_string();
            step.wave_id = wave_id.to_string();
        }
        Ok(true)
    }

    /// Stock arrived: `held` units held in all, complete when equal to the order's units.
    ///
    /// # Errors
    /// When the order is not backordered.
    pub fn hold_stock(&mut self, held: u64, expire_ms: u64, cause: Cause, now_ms: u64) -> Result<bool, MoveError> {
        if held <= self.held {
            return Ok(false);
        }
        let to = if held >= self.units { OrderStatus::Reserved } else { OrderStatus::Backordered };
        self.move_to(to, cause, "", Vec::new(), now_ms)?;
        self.held = held;
        if let Some(step) = self.history.last_mut() {
            step.held = held;
        }
        if to == OrderStatus::Reserved {
            self.hold_expire_ms = expire_ms;
        }
        Ok(true)
    }

    /// Sends an order that holds quota back to waiting (its licence stopped being usable): its quota and
    /// hold of the current generation are owed back, and it continues at the next generation.
    ///
    /// # Errors
    /// When the order does not hold unconfirmed quota.
    pub fn unwind(&mut self, cause: Cause, failures: Vec<Failure>, now_ms: u64) -> Result<(), MoveError> {
        if !self.status().holds_unconfirmed_quota() {
            return Err(MoveError { from: self.status(), to: OrderStatus::AwaitingLicense });
        }
        self.move_to(OrderStatus::AwaitingLicense, cause, "", failures, now_ms)?;
        if let Some(step) = self.history.last_mut() {
            step.license_id.clone_from(&self.license_id);
            step.wave_id.clone_from(&self.wave_id);
            step.held = self.held;
        }
        self.owe(true, true, "licence no longer usable");
        self.generation += 1;
        self.license_id.clear();
        self.wave_id.clear();
        self.held = 0;
        self.hold_expire_ms = 0;
        Ok(())
    }

    /// Records a release owed for the current generation.
    pub fn owe(&mut self, quota: bool, hold: bool, reason: &str) {
        if quota || hold {
            self.pending.push(PendingRelease { generation: self.generation, quota, hold, reason: reason.to_string() });
        }
    }

    /// Whether this order, in its current state, holds quota for its generation.
    pub fn has_quota(&self) -> bool {
        matches!(
            self.status(),
            OrderStatus::Backordered | OrderStatus::Reserved | OrderStatus::Confirmed | OrderStatus::Shipped
        )
    }

    /// Cancels the order (before shipping). Quota and stock of the current generation are owed back —
    /// always, even for an order that was only waiting: a reconciliation pass may be taking quota and
    /// stock for it at this very moment, and the releases (idempotent, and fencing off any later
    /// reserve of this generation) make sure nothing it takes is kept.
    ///
    /// # Errors
    /// When the order already shipped or ended.
    pub fn cancel(&mut self, reason: &str, now_ms: u64) -> Result<(), MoveError> {
        self.move_to(
            OrderStatus::Cancelled,
            Cause::new(CauseKind::Cancelled, self.id.clone()),
            format!("cancelled: {reason}"),
            Vec::new(),
            now_ms,
        )?;
        self.owe(true, true, "order cancelled");
        self.held = 0;
        Ok(())
    }

    /// The hold of the current generation expired unconfirmed: RESERVED → EXPIRED, quota owed back.
    ///
    /// # Errors
    /// When the order is not reserved.
    pub fn expire(&mut self, now_ms: u64) -> Result<(), MoveError> {
        self.move_to(
            OrderStatus::Expired,
            Cause::new(CauseKind::HoldExpired, self.id.clone()),
            "",
            Vec::new(),
            now_ms,
        )?;
        self.owe(true, false, "hold expired");
        self.held = 0;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::licensing::Condition;

    fn order() -> OrderRecord {
        OrderRecord {
            id: "ord-1".into(),
            units: 100,
            generation: 1,
            status: OrderStatus::Pending as i32,
            ..Default::default()
        }
    }

    fn why(c: Condition) -> Vec<Failure> {
        vec![Failure::new(c, "lic-1", "no")]
    }

    #[test]
    fn happy_path_records_every_step() {
        let mut o = order();
        let placed = Cause::new(CauseKind::Placed, "ord-1");
        assert!(
            o.move_to(OrderStatus::AwaitingLicense, placed.clone(), "waiting", why(Condition::TermsFinal), 1).unwrap()
        );
        assert_eq!(o.reasons.len(), 1);
        o.take_quota("lic-1", "wave-1", Cause::new(CauseKind::TermsFinalized, "lic-1"), 2).unwrap();
        assert!(o.reasons.is_empty());
        o.hold_stock(40, 0, Cause::new(CauseKind::SupplyReceived, "r1"), 3).unwrap();
        assert_eq!((o.status(), o.held), (OrderStatus::Backordered, 40));
        assert!(!o.hold_stock(40, 0, Cause::new(CauseKind::SupplyReceived, "r1"), 4).unwrap(), "no new units, no step");
        o.hold_stock(100, 99, Cause::new(CauseKind::SupplyReceived, "r2"), 5).unwrap();
        assert_eq!((o.status(), o.hold_expire_ms), (OrderStatus::Reserved, 99));
        o.move_to(OrderStatus::Confirmed, Cause::new(CauseKind::Confirmed, "ord-1"), "confirmed", vec![], 6).unwrap();
        o.move_to(OrderStatus::Shipped, Cause::new(CauseKind::Shipped, "ord-1"), "shipped", vec![], 7).unwrap();
        let path: Vec<(OrderStatus, OrderStatus)> = o.history.iter().map(|t| (t.from(), t.to())).collect();
        assert_eq!(
            path,
            vec![
                (OrderStatus::Pending, OrderStatus::AwaitingLicense),
                (OrderStatus::AwaitingLicense, OrderStatus::Backordered),
                (OrderStatus::Backordered, OrderStatus::Backordered),
                (OrderStatus::Backordered, OrderStatus::Reserved),
                (OrderStatus::Reserved, OrderStatus::Confirmed),
                (OrderStatus::Confirmed, OrderStatus::Shipped),
            ]
        );
        assert_eq!(o.history[1].cause.as_ref().unwrap().kind(), CauseKind::TermsFinalized);
        assert!(o.cancel("too late", 8).is_err(), "shipped orders can't be cancelled");
    }

    #[test]
    fn unchanged_reasons_leave_no_trace_but_new_ones_do() {
        let mut o = order();
        let c = Cause::new(CauseKind::Placed, "x");
        o.move_to(OrderStatus::AwaitingLicense, c.clone(), "w", why(Condition::TermsFinal), 1).unwrap();
        assert!(!o.move_to(OrderStatus::AwaitingLicense, c.clone(), "w", why(Condition::TermsFinal), 2).unwrap());
        assert!(o.move_to(OrderStatus::AwaitingLicense, c, "w", why(Condition::DomesticRatio), 3).unwrap());
        assert_eq!(o.history.len(), 2);
        assert_eq!(o.reasons[0].condition(), Condition::DomesticRatio);
    }

    #[test]
    fn unwinding_owes_quota_and_hold_and_bumps_the_generation() {
        let mut o = order();
        o.take_quota("lic-1", "wave-1", Cause::new(CauseKind::WavePublished, "wave-1"), 1).unwrap();
        o.hold_stock(30, 0, Cause::new(CauseKind::SupplyReceived, "r"), 2).unwrap();
        o.unwind(Cause::new(CauseKind::LicenseSuspended, "lic-1"), why(Condition::LicenseInForce), 3).unwrap();
        assert_eq!((o.status(), o.generation, o.held, o.license_id.as_str()), (OrderStatus::AwaitingLicense, 2, 0, ""));
        assert_eq!(
            o.pending,
            vec![PendingRelease { generation: 1, quota: true, hold: true, reason: "licence no longer usable".into() }]
        );
        assert!(
            o.unwind(Cause::new(CauseKind::LicenseSuspended, "lic-1"), vec![], 4).is_err(),
            "a waiting order has nothing to unwind"
        );
    }

    #[test]
    fn cancel_and_expiry_owe_exactly_what_was_held() {
        let mut waiting = order();
        waiting.cancel("changed plans", 1).unwrap();
        assert_eq!(
            waiting.pending,
            vec![PendingRelease { generation: 1, quota: true, hold: true, reason: "order cancelled".into() }],
            "even a waiting order owes its generation back: a pass may be taking quota for it right now"
        );
        assert!(waiting.cancel("again", 2).is_err());

        let mut reserved = order();
        reserved.take_quota("lic-1", "w", Cause::new(CauseKind::Placed, ""), 1).unwrap();
        reserved.hold_stock(100, 50, Cause::new(CauseKind::Placed, ""), 1).unwrap();
        let mut expired = reserved.clone();
        expired.expire(60).unwrap();
        assert_eq!(expired.status(), OrderStatus::Expired);
        assert_eq!(
            expired.pending,
            vec![PendingRelease { generation: 1, quota: true, hold: false, reason: "hold expired".into() }]
        );
        reserved.cancel("no", 2).unwrap();
        assert_eq!(
            reserved.pending[0],
            PendingRelease { generation: 1, quota: true, hold: true, reason: "order cancelled".into() }
        );
    }

    #[test]
    fn the_life_cycle_forbids_shortcuts() {
        use OrderStatus::*;
        assert!(!Pending.can_move_to(Reserved));
        assert!(!AwaitingLicense.can_move_to(Reserved));
        assert!(!Backordered.can_move_to(Confirmed));
        assert!(!Reserved.can_move_to(Shipped));
        assert!(!Expired.can_move_to(AwaitingLicense));
        assert!(Reserved.can_move_to(AwaitingLicense));
        for s in OrderStatus::ALL {
            assert_eq!(s.is_final(), OrderStatus::ALL.iter().all(|t| !s.can_move_to(*t)), "{s:?}");
        }
    }

    /// An order that went every way that leaves something to leave out, or not: placed, waiting,
    /// quota of one licence, partly and fully held, unwound, quota of another licence, cancelled.
    fn travelled() -> OrderRecord {
        let mut o = order();
        o.id = "ord-H200-7".into();
        o.sku = "H200".into();
        o.create_ms = 1_764_000_000_000;
        o.history.push(TransitionRecord {
            to: OrderStatus::Pending as i32,
            at_ms: o.create_ms,
            cause: Some(Cause::new(CauseKind::Placed, "ord-H200-7")),
            ..Default::default()
        });
        let t = o.create_ms;
        o.move_to(OrderStatus::AwaitingLicense, Cause::new(CauseKind::Placed, ""), "", why(Condition::License), t + 3)
            .unwrap();
        o.take_quota("lic-1", "wave-1", Cause::new(CauseKind::WavePublished, "wave-1"), t + 90_000).unwrap();
        o.hold_stock(40, 0, Cause::new(CauseKind::SupplyReceived, "r1"), t + 90_001).unwrap();
        o.hold_stock(100, t + 99_000, Cause::new(CauseKind::SupplyReceived, "r2"), t + 95_000).unwrap();
        o.unwind(Cause::new(CauseKind::LicenseSuspended, "lic-1"), why(Condition::LicenseInForce), t + 96_000).unwrap();
        // Another replica's clock is behind.
        o.take_quota("lic-2", "wave-2", Cause::new(CauseKind::TermsFinalized, "lic-2"), t + 95_500).unwrap();
        o
    }

    #[test]
    fn the_stored_form_reads_back_as_the_record() {
        let mut o = travelled();
        let plain = o.encode_to_vec().len();
        let stored = o.to_stored();
        assert_eq!(OrderRecord::from_stored(&stored).unwrap(), o);
        assert!(stored.len() < plain, "{} < {plain}", stored.len());
        // The steps' licence and wave that are the order's are left out, the earlier licence's kept.
        assert_eq!(OrderRecord::from_stored(&stored).unwrap().history[2].license_id, "lic-1");

        // Waiting: the reasons are the last step's failures.
        o.unwind(Cause::new(CauseKind::LicenseRevoked, "lic-2"), why(Condition::LicenseInForce), o.update_ms + 1)
            .unwrap();
        assert_eq!(OrderRecord::from_stored(&o.to_stored()).unwrap(), o);
        // ... and when they are not, or the last change is not the last step's, both are kept.
        o.reasons = why(Condition::DomesticRatio);
        o.update_ms += 5;
        assert_eq!(OrderRecord::from_stored(&o.to_stored()).unwrap(), o);
        o.cancel("no longer needed", o.update_ms + 1).unwrap();
        assert_eq!(OrderRecord::from_stored(&o.to_stored()).unwrap(), o);

        // Steps that don't follow each other (a step applied twice), with no cause, or with the order's
        // id as the reference of a cause that isn't its own.
        let mut odd = travelled();
        let last = odd.history.last().unwrap().clone();
        odd.history.push(last);
        odd.history.push(TransitionRecord { from: 3, to: 4, at_ms: 0, cause: None, ..Default::default() });
        odd.history.push(TransitionRecord {
            cause: Some(Cause::new(CauseKind::StockReleased, "ord-H200-7")),
            license_id: "lic-2".into(),
            ..Default::default()
        });
        assert_eq!(OrderRecord::from_stored(&odd.to_stored()).unwrap(), odd);
        assert_eq!(OrderRecord::from_stored(&OrderRecord::default().to_stored()).unwrap(), OrderRecord::default());
    }

    /// An order as the 100k wave leaves it: placed before its buyer's licence, then given quota of a
    /// licence of its own product, and stock.
    fn after_a_wave() -> OrderRecord {
        let sku = Sku::from_trusted("H200-SXM-141GB");
        let id = OrderId::new(&sku, 49_999).into_string();
        let placed = Cause::new(CauseKind::Placed, &id);
        let t = 1_764_000_000_000;
        let mut o = OrderRecord {
            id: id.clone(),
            request_id: "req-7".into(),
            buyer_id: "buyer-0099".into(),
            sku: sku.to_string(),
            units: 10,
            status: OrderStatus::Pending as i32,
            generation: 1,
            seq: 49_999,
            create_ms: t,
            update_ms: t,
            history: vec![TransitionRecord {
                to: OrderStatus::Pending as i32,
                at_ms: t,
                cause: Some(placed.clone()),
                ..Default::default()
            }],
            ..Default::default()
        };
        o.move_to(OrderStatus::AwaitingLicense, placed, "", vec![Failure::no_licence("buyer-0099")], t).unwrap();
        let lic = LicenceId::new(&sku, 199).into_string();
        o.take_quota(&lic, "wave-1", Cause::new(CauseKind::WavePublished, "wave-1"), t + 90_000).unwrap();
        o.hold_stock(10, t + 900_000, Cause::new(CauseKind::WavePublished, "wave-1"), t + 90_010).unwrap();
        o
    }

    #[test]
    fn the_stored_form_leaves_out_what_the_product_and_sequence_say() {
        let o = after_a_wave();
        let stored = o.to_stored();
        assert_eq!(OrderRecord::from_stored(&stored).unwrap(), o);
        assert_eq!(o.history[1].failures, vec![Failure::no_licence("buyer-0099")]);
        for repeated in ["ord-H200-SXM-141GB-49999", "lic-H200-SXM-141GB-199", "holds no usable licence"] {
            assert!(!stored.windows(repeated.len()).any(|w| w == repeated.as_bytes()), "{repeated} is stored");
        }
        // The reasons of a waiting order are its last step's: left out with it.
        let mut waiting = after_a_wave();
        waiting.history.truncate(2);
        waiting.reasons = waiting.history[1].failures.clone();
        (waiting.status, waiting.license_id, waiting.wave_id, waiting.held) =
            (OrderStatus::AwaitingLicense as i32, String::new(), String::new(), 0);
        assert_eq!(OrderRecord::from_stored(&waiting.to_stored()).unwrap(), waiting);

        // Among other failures, in its place (first, middle, last, twice); another buyer's is kept.
        let embargo = Failure::new(crate::licensing::Condition::ImportPolicy, "", "embargoed");
        let mine = Failure::no_licence("buyer-0099");
        let theirs = Failure::no_licence("buyer-0001");
        for failures in [
            vec![embargo.clone(), mine.clone()],
            vec![mine.clone(), embargo.clone(), mine.clone()],
            vec![embargo.clone(), mine.clone(), theirs.clone(), embargo.clone()],
            vec![theirs.clone()],
            // Like it but not it: kept whole.
            vec![mine.clone().permanent(), mine.clone().figures(1, 0)],
        ] {
            let mut x = after_a_wave();
            x.history[1].failures = failures;
            assert_eq!(OrderRecord::from_stored(&x.to_stored()).unwrap(), x);
        }
        // An id or licence not in the services' form, or of another product, is kept whole.
        for (id, seq, lic) in [
            ("ord-H200-SXM-141GB-049999", 49_999, "lic-H20-96GB-1"),
            ("ord-H200-SXM-141GB-49999", 7, "lic-H200-SXM-141GB-0"),
            ("custom", 49_999, "licence-1"),
        ] {
            let mut x = after_a_wave();
            (x.id, x.seq, x.license_id) = (id.into(), seq, lic.into());
            assert_eq!(OrderRecord::from_stored(&x.to_stored()).unwrap(), x, "{id} {seq} {lic}");
        }
    }

    #[test]
    fn records_stored_before_the_stored_form_still_read() {
        let o = travelled();
        assert_eq!(OrderRecord::from_stored(&o.encode_to_vec()).unwrap(), o);
        // A plain decode of the stored form is the record without its history.
        let head = OrderRecord::decode(o.to_stored().as_slice()).unwrap();
        assert_eq!((head.id.as_str(), head.license_id.as_str(), head.history.len()), ("ord-H200-7", "lic-2", 0));
        assert!(OrderRecord::from_stored(b"\xff\xff").is_err());
    }

    #[test]
    fn causes_round_trip_through_marks() {
        let c = Cause::new(CauseKind::WavePublished, "wave-3");
        assert_eq!(c.encode(), "wave:wave-3");
        assert_eq!(Cause::decode("wave:wave-3"), c);
        assert_eq!(Cause::decode("supply:rcpt:1").reference, "rcpt:1");
        assert_eq!(Cause::decode("nonsense").kind(), CauseKind::Unspecified);
    }
}
