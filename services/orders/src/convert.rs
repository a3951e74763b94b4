//! Conversions between the orders API and the domain records, at the edge.

use chipgate_domain::allocation::{HoldAnswer, QuotaAnswer, QuotaAsk, StockAsk};
use chipgate_domain::ids::{BuyerId, Sku};
use chipgate_domain::licensing::Failure;
use chipgate_domain::orders::{Cause, CauseKind, OrderRecord, OrderStatus, TransitionRecord};
use chipgate_proto::inventory::v1 as ipb;
use chipgate_proto::licensing::v1 as lpb;
use chipgate_proto::orders::v1 as pb;
use chipgate_runtime::time::{ms_of, ts_opt};

/// Domain status → API.
pub fn state_to(s: OrderStatus) -> pb::OrderState {
    match s {
        OrderStatus::Unspecified => pb::OrderState::Unspecified,
        OrderStatus::Pending => pb::OrderState::Pending,
        OrderStatus::AwaitingLicense => pb::OrderState::AwaitingLicense,
        OrderStatus::Backordered => pb::OrderState::Backordered,
        OrderStatus::Reserved => pb::OrderState::Reserved,
        OrderStatus::Confirmed => pb::OrderState::Confirmed,
        OrderStatus::Shipped => pb::OrderState::Shipped,
        OrderStatus::Cancelled => pb::OrderState::Cancelled,
        OrderStatus::Expired => pb::OrderState::Expired,
        OrderStatus::Rejected => pb::OrderState::Rejected,
    }
}

/// API state → domain (None for UNSPECIFIED).
pub fn state_from(s: pb::OrderState) -> Option<OrderStatus> {
    OrderStatus::ALL.into_iter().find(|d| state_to(*d) == s)
}

fn cause_to(c: &Cause) -> pb::Cause {
    let kind = match c.kind() {
        CauseKind::Unspecified => pb::CauseKind::Unspecified,
        CauseKind::Placed => pb::CauseKind::Placed,
        CauseKind::WavePublished => pb::CauseKind::WavePublished,
        CauseKind::TermsFinalized => pb::CauseKind::TermsFinalized,
        CauseKind::LicenseReinstated => pb::CauseKind::LicenseReinstated,
        CauseKind::LicenseSuspended => pb::CauseKind::LicenseSuspended,
        CauseKind::LicenseRevoked => pb::CauseKind::LicenseRevoked,
        CauseKind::DomesticPurchase => pb::CauseKind::DomesticPurchase,
        CauseKind::ExportAuthorized => pb::CauseKind::ExportAuthorized,
        CauseKind::ExportRevoked => pb::CauseKind::ExportRevoked,
        CauseKind::EmbargoSet => pb::CauseKind::EmbargoSet,
        CauseKind::EmbargoLifted => pb::CauseKind::EmbargoLifted,
        CauseKind::SupplyReceived => pb::CauseKind::SupplyReceived,
        CauseKind::StockReleased => pb::CauseKind::StockReleased,
        CauseKind::HoldExpired => pb::CauseKind::HoldExpired,
        CauseKind::Cancelled => pb::CauseKind::Cancelled,
        CauseKind::Confirmed => pb::CauseKind::Confirmed,
        CauseKind::Shipped => pb::CauseKind::Shipped,
        CauseKind::QuotaReturned => pb::CauseKind::QuotaReturned,
        CauseKind::Reconciled => pb::CauseKind::Reconciled,
        CauseKind::AllocationPolicy => pb::CauseKind::AllocationPolicy,
    };
    pb::Cause { kind: kind as i32, reference: c.reference.clone() }
}

/// A failed condition as the licensing API shows it (the orders API reuses that message).
pub fn failure_to(f: &Failure) -> lpb::ConditionFailure {
    lpb::ConditionFailure {
        condition: f.condition,
        license_id: f.license_id.clone(),
        description: f.description.clone(),
        permanent: f.permanent,
        required: f.required,
        actual: f.actual,
    }
}

/// A failed condition from a licensing answer.
pub fn failure_from(f: &lpb::ConditionFailure) -> Failure {
    Failure {
        condition: f.condition,
        license_id: f.license_id.clone(),
        description: f.description.clone(),
        permanent: f.permanent,
        required: f.required,
        actual: f.actual,
    }
}

/// A quota ask as licensing takes it.
pub fn quota_item(a: QuotaAsk) -> lpb::QuotaItem {
    lpb::QuotaItem {
        order_id: a.order_id,
        generation: a.generation,
        buyer_id: a.buyer_id,
        units: a.units,
        justification: a.justification,
        queued_behind: a.queued_behind.unwrap_or_default(),
        judge_only: a.judge_only,
    }
}

/// Licensing's answer for one order.
pub fn quota_answer(r: lpb::QuotaItemResult) -> QuotaAnswer {
    match r.reservation {
        _ if r.stale => QuotaAnswer::Stale,
        None if r.servable => QuotaAnswer::Servable,
        Some(q) => QuotaAnswer::Reserved { license_id: q.license_id, wave_id: q.wave_id },
        None => {
            QuotaAnswer::Refused { failures: r.failures.iter().map(failure_from).collect(), rejectable: r.rejectable }
        }
    }
}

/// A stock ask as inventory takes it (partial holds welcome; complete ones last `hold_seconds`).
pub fn reserve_item(a: StockAsk, hold_seconds: u32) -> ipb::ReserveItem {
    ipb::ReserveItem {
        order_id: a.order_id,
        generation: a.generation,
        units: a.units,
        allow_partial: true,
        hold_seconds,
        known_held: Some(a.known_held),
        max_units: a.max_units,
    }
}

/// Inventory's answer for one order.
pub fn hold_answer(r: &ipb::ReserveItemResult) -> HoldAnswer {
    let held = r.reservation.as_ref().map(|h| h.held_units).unwrap_or(0);
    match r.outcome() {
        ipb::ReserveOutcome::Held => HoldAnswer::Held {
            held,
            expire_ms: r.reservation.as_ref().and_then(|h| h.expire_time.as_ref()).map(ms_of).unwrap_or(0),
        },
        ipb::ReserveOutcome::Partial => HoldAnswer::Partial { held },
        ipb::ReserveOutcome::Stale => HoldAnswer::Stale,
        ipb::ReserveOutcome::NotServed | ipb::ReserveOutcome::Unspecified => HoldAnswer::NotServed,
    }
}

/// One history step.
pub fn transition_to(t: &TransitionRecord, order: &OrderRecord) -> pb::Transition {
    pb::Transition {
        from_state: state_to(t.from()) as i32,
        to_state: state_to(t.to()) as i32,
        time: ts_opt(t.at_ms),
        cause: t.cause.as_ref().map(cause_to),
        // Rendered from the step's figures (free text as stored): why it waits, which licence, how
        // many units, and — under an allocation policy — why the order got them.
        detail: t.describe(order),
        failures: t.failures.iter().map(failure_to).collect(),
    }
}

/// One history step as the transition stream carries it to watchers: stored free text, and the
/// explanation of an allocation under a policy; the rest is left to a read of the order (a wave's
/// transitions fill the capped stream by the hundred thousand, and rendered words would double it).
pub fn transition_event(t: &TransitionRecord, order: &OrderRecord) -> pb::Transition {
    pb::Transition {
        from_state: state_to(t.from()) as i32,
        to_state: state_to(t.to()) as i32,
        time: ts_opt(t.at_ms),
        cause: t.cause.as_ref().map(cause_to),
        detail: if t.share.is_some() { t.describe(order) } else { t.detail.clone() },
        failures: t.failures.iter().map(failure_to).collect(),
    }
}

/// An order as the API shows it; `backlog_position` is 0 unless it is BACKORDERED.
pub fn order_to(o: &OrderRecord, backlog_position: u64, with_history: bool) -> pb::Order {
    pb::Order {
        order_id: o.id.clone(),
        request_id: o.request_id.clone(),
        buyer_id: o.buyer_id.clone(),
        product_sku: o.sku.clone(),
        units: o.units,
        justification: o.justification.clone(),
        state: state_to(o.status()) as i32,
        reasons: o.reasons.iter().map(failure_to).collect(),
        license_id: o.license_id.clone(),
        wave_id: o.wave_id.clone(),
        generation: o.generation,
        held_units: o.held,
        hold_expire_time: ts_opt(o.hold_expire_ms),
        sequence: o.seq,
        create_time: ts_opt(o.create_ms),
        update_time: ts_opt(o.update_ms),
        history: if with_history { o.history.iter().map(|t| transition_to(t, o)).collect() } else { Vec::new() },
        backlog_position,
        archived_in: String::new(),
    }
}

/// A `PlaceOrder` call, validated at the edge (every bad field named at once).
pub struct NewOrder {
    /// The caller's idempotency key.
    pub request_id: String,
    /// Buyer.
    pub buyer_id: BuyerId,
    /// Product.
    pub sku: Sku,
    /// Units.
    pub units: u64,
    /// Why the chips are necessary ("" if none given).
    pub justification: String,
}

impl TryFrom<pb::PlaceOrderRequest> for NewOrder {
    type Error = chipgate_runtime::errors::Violations;

    fn try_from(req: pb::PlaceOrderRequest) -> Result<Self, Self::Error> {
        use chipgate_runtime::validate;
        let mut v = chipgate_runtime::errors::Violations::new();
        validate::request_id(&mut v, &req.request_id);
        let buyer_id = validate::parse::<BuyerId>(&mut v, "buyer_id", req.buyer_id);
        let sku = validate::parse::<Sku>(&mut v, "product_sku", req.product_sku);
        validate::units(&mut v, "units", req.units, crate::MAX_UNITS);
        validate::text(&mut v, "justification", &req.justification, validate::MAX_TEXT_LEN, false);
        let (buyer_id, sku) = validate::finish(v, (buyer_id, sku))?;
        Ok(NewOrder { request_id: req.request_id, buyer_id, sku, units: req.units, justification: req.justification })
    }
}
