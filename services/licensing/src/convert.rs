//! Conversions between the licensing API (protobuf) and the domain records, at the edge.

use chipgate_domain::allocation::QuotaAsk;
use chipgate_domain::ids::Sku;
use chipgate_domain::licensing::{
    ApplicationRecord, ApplicationStatus, Conditions, EffectiveState, ExportAuthRecord, Failure, GrantRecord,
    LicenseRecord, PolicyRecord, PurchaseRecord, ReservationRecord, ReservationStatus, Stance, WaveRecord, WaveStatus,
};
use chipgate_proto::licensing::v1 as pb;
use chipgate_runtime::errors::Violations;
use chipgate_runtime::time::{ms_of, ts_opt};
use chipgate_runtime::validate;

/// API conditions → domain (unset timestamps become 0).
pub fn conditions_from(c: &pb::LicenseConditions) -> Conditions {
    Conditions {
        valid_from_ms: c.valid_from.as_ref().map(ms_of).unwrap_or(0),
        valid_until_ms: c.valid_until.as_ref().map(ms_of).unwrap_or(0),
        per_order_cap: c.per_order_cap,
        domestic_ratio_bps: c.domestic_ratio_bps,
        justification_required: c.justification_required,
        terms_pending: c.terms_pending,
    }
}

/// Domain conditions → API.
pub fn conditions_to(c: &Conditions) -> pb::LicenseConditions {
    pb::LicenseConditions {
        valid_from: ts_opt(c.valid_from_ms),
        valid_until: ts_opt(c.valid_until_ms),
        per_order_cap: c.per_order_cap,
        domestic_ratio_bps: c.domestic_ratio_bps,
        justification_required: c.justification_required,
        terms_pending: c.terms_pending,
    }
}

fn application_state(s: ApplicationStatus) -> pb::ApplicationState {
    match s {
        ApplicationStatus::Unspecified => pb::ApplicationState::Unspecified,
        ApplicationStatus::Queued => pb::ApplicationState::Queued,
        ApplicationStatus::Granted => pb::ApplicationState::Granted,
        ApplicationStatus::Withdrawn => pb::ApplicationState::Withdrawn,
        ApplicationStatus::Rejected => pb::ApplicationState::Rejected,
    }
}

/// API application state → domain (UNSPECIFIED means "any").
pub fn application_status_from(s: pb::ApplicationState) -> Option<ApplicationStatus> {
    match s {
        pb::ApplicationState::Unspecified => None,
        pb::ApplicationState::Queued => Some(ApplicationStatus::Queued),
        pb::ApplicationState::Granted => Some(ApplicationStatus::Granted),
        pb::ApplicationState::Withdrawn => Some(ApplicationStatus::Withdrawn),
        pb::ApplicationState::Rejected => Some(ApplicationStatus::Rejected),
    }
}

/// An application with its queue position (0 when not queued).
pub fn application_to(a: &ApplicationRecord, queue_position: u64) -> pb::Application {
    pb::Application {
        application_id: a.id.clone(),
        buyer_id: a.buyer_id.clone(),
        product_sku: a.product_sku.clone(),
        quantity: a.quantity,
        end_use: a.end_use.clone(),
        site: a.site.clone(),
        destination: a.destination.clone(),
        state: application_state(a.status()) as i32,
        queue_position,
        submit_time: ts_opt(a.submit_ms),
        update_time: ts_opt(a.update_ms),
        reason: a.reason.clone(),
        wave_id: a.wave_id.clone(),
        license_id: a.license_id.clone(),
    }
}

/// Effective licence state → API.
pub fn license_state(s: EffectiveState) -> pb::LicenseState {
    match s {
        EffectiveState::PendingTerms => pb::LicenseState::PendingTerms,
        EffectiveState::Active => pb::LicenseState::Active,
        EffectiveState::Suspended => pb::LicenseState::Suspended,
        EffectiveState::Revoked => pb::LicenseState::Revoked,
        EffectiveState::Expired => pb::LicenseState::Expired,
        EffectiveState::Exhausted => pb::LicenseState::Exhausted,
    }
}

/// A licence as the API shows it at `now_ms`.
pub fn license_to(l: &LicenseRecord, now_ms: u64) -> pb::License {
    pb::License {
        license_id: l.id.clone(),
        buyer_id: l.buyer_id.clone(),
        product_sku: l.product_sku.clone(),
        destination: l.destination.clone(),
        application_id: l.application_id.clone(),
        wave_id: l.wave_id.clone(),
        state: license_state(l.effective_state(now_ms)) as i32,
        conditions: Some(conditions_to(&l.conditions())),
        granted_units: l.granted,
        used_units: l.used,
        confirmed_units: l.confirmed,
        remaining_units: l.remaining(),
        create_time: ts_opt(l.create_ms),
        update_time: ts_opt(l.update_ms),
        state_reason: l.state_reason.clone(),
    }
}

/// A wave.
pub fn wave_to(w: &WaveRecord) -> pb::Wave {
    pb::Wave {
        wave_id: w.id.clone(),
        display_name: w.display_name.clone(),
        state: match w.status() {
            WaveStatus::Unspecified => pb::WaveState::Unspecified,
            WaveStatus::Draft => pb::WaveState::Draft,
            WaveStatus::Published => pb::WaveState::Published,
        } as i32,
        grants: w.grants.iter().map(grant_to).collect(),
        grant_count: w.grant_count(),
        create_time: ts_opt(w.create_ms),
        publish_time: ts_opt(w.publish_ms),
        pending_products: w.pending_products.clone(),
        total_granted_units: w.total_granted(),
    }
}

/// One grant of a wave.
pub fn grant_to(g: &GrantRecord) -> pb::WaveGrant {
    pb::WaveGrant {
        application_id: g.application_id.clone(),
        buyer_id: g.buyer_id.clone(),
        product_sku: g.product_sku.clone(),
        granted_units: g.granted,
        conditions: g.conditions.as_ref().map(conditions_to),
        license_id: g.license_id.clone(),
    }
}

/// A quota reservation.
pub fn reservation_to(r: &ReservationRecord) -> pb::QuotaReservation {
    pb::QuotaReservation {
        order_id: r.order_id.clone(),
        generation: r.generation,
        license_id: r.license_id.clone(),
        wave_id: r.wave_id.clone(),
        buyer_id: r.buyer_id.clone(),
        product_sku: r.product_sku.clone(),
        units: r.units,
        state: match r.status() {
            ReservationStatus::Unspecified => pb::ReservationState::Unspecified,
            ReservationStatus::Held => pb::ReservationState::Held,
            ReservationStatus::Confirmed => pb::ReservationState::Confirmed,
            ReservationStatus::Released => pb::ReservationState::Released,
        } as i32,
        create_time: ts_opt(r.create_ms),
        update_time: ts_opt(r.update_ms),
        release_reason: r.release_reason.clone(),
    }
}

/// A failed condition.
pub fn failure_to(f: &Failure) -> pb::ConditionFailure {
    pb::ConditionFailure {
        condition: f.condition,
        license_id: f.license_id.clone(),
        description: f.description.clone(),
        permanent: f.permanent,
        required: f.required,
        actual: f.actual,
    }
}

/// A domestic purchase.
pub fn purchase_to(p: &PurchaseRecord) -> pb::DomesticPurchase {
    pb::DomesticPurchase {
        buyer_id: p.buyer_id.clone(),
        units: p.units,
        supplier: p.supplier.clone(),
        evidence_ref: p.evidence_ref.clone(),
        record_time: ts_opt(p.record_ms),
    }
}

/// An export authorisation of a product.
pub fn export_to(sku: &str, a: &ExportAuthRecord) -> pb::ExportAuthorization {
    pb::ExportAuthorization {
        vendor: a.vendor.clone(),
        product_sku: sku.to_string(),
        destination: a.destination.clone(),
        active: a.active,
        reference: a.reference.clone(),
        update_time: ts_opt(a.update_ms),
    }
}

/// Domain stance → API.
pub fn stance_to(s: Stance) -> pb::ImportStance {
    match s {
        Stance::Unspecified | Stance::Open => pb::ImportStance::Open,
        Stance::Embargoed => pb::ImportStance::Embargoed,
    }
}

/// An import policy (OPEN when never set).
pub fn policy_to(sku: &str, p: Option<&PolicyRecord>) -> pb::ImportPolicy {
    match p {
        Some(p) => pb::ImportPolicy {
            product_sku: sku.to_string(),
            stance: stance_to(p.stance()) as i32,
            reason: p.reason.clone(),
            update_time: ts_opt(p.update_ms),
        },
        None => pb::ImportPolicy {
            product_sku: sku.to_string(),
            stance: pb::ImportStance::Open as i32,
            reason: String::new(),
            update_time: None,
        },
    }
}

/// The order/generation pairs a batch names, validated: 1 to [`crate::MAX_BATCH`] items, each order
/// once, every generation at least 1.
/// An order's quota reservation, as a release names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuotaRef {
    /// The order.
    pub order_id: String,
    /// Its allocation generation.
    pub generation: u64,
    /// Its product (the reservation's partition).
    pub product_sku: String,
}

/// The items of a release (`with_sku`: each must name its product) or of a recheck (the call names
/// the product).
fn quota_refs(v: &mut Violations, items: Vec<pb::ReleaseItem>, with_sku: bool) -> Vec<QuotaRef> {
    let checked = validate::batch(v, items.len(), crate::MAX_BATCH);
    let mut seen = std::collections::HashSet::new();
    for (i, it) in items.iter().enumerate().take(checked) {
        let prefix = format!("items[{i}].");
        validate::order_ref(v, &prefix, &it.order_id, it.generation);
        if with_sku {
            validate::id(v, &format!("{prefix}product_sku"), &it.product_sku);
        }
        validate::once(v, &mut seen, it.order_id.as_str(), &prefix, &it.order_id);
    }
    items
        .into_iter()
        .map(|it| QuotaRef { order_id: it.order_id, generation: it.generation, product_sku: it.product_sku })
        .collect()
}

/// A `BatchReserveQuota` call, validated at the edge: every bad field is named at once.
pub struct QuotaBatch {
    /// The product every ask is for.
    pub product_sku: Sku,
    /// The asks, in the order they are served.
    pub asks: Vec<QuotaAsk>,
    /// The caller's fencing token (0: not fenced).
    pub fence_token: u64,
}

impl TryFrom<pb::BatchReserveQuotaRequest> for QuotaBatch {
    type Error = Violations;

    fn try_from(req: pb::BatchReserveQuotaRequest) -> Result<Self, Violations> {
        let mut v = Violations::new();
        let sku = validate::parse::<Sku>(&mut v, "product_sku", req.product_sku);
        let checked = validate::batch(&mut v, req.items.len(), crate::MAX_BATCH);
        let mut seen = std::collections::HashSet::new();
        for (i, it) in req.items.iter().enumerate().take(checked) {
            let prefix = format!("items[{i}].");
            let field = |name: &str| format!("{prefix}{name}");
            validate::order_ref(&mut v, &prefix, &it.order_id, it.generation);
            validate::id(&mut v, &field("buyer_id"), &it.buyer_id);
            validate::units(&mut v, &field("units"), it.units, crate::MAX_UNITS);
            validate::text(&mut v, &field("justification"), &it.justification, validate::MAX_TEXT_LEN, false);
            validate::optional_id(&mut v, &field("queued_behind"), &it.queued_behind);
            validate::once(&mut v, &mut seen, it.order_id.as_str(), &prefix, &it.order_id);
        }
        let product_sku = validate::finish(v, sku)?;
        let asks = req
            .items
            .into_iter()
            .map(|it| QuotaAsk {
                order_id: it.order_id,
                generation: it.generation,
                buyer_id: it.buyer_id,
                units: it.units,
                justification: it.justification,
                queued_behind: (!it.queued_behind.is_empty()).then_some(it.queued_behind),
                judge_only: it.judge_only,
            })
            .collect();
        Ok(QuotaBatch { product_sku, asks, fence_token: req.fence_token })
    }
}

/// A `BatchReleaseQuota` call, validated.
pub struct ReleaseBatch {
    /// The reservations to give back.
    pub refs: Vec<QuotaRef>,
    /// Why (kept with each reservation).
    pub reason: String,
    /// Leave confirmed reservations alone.
    pub unless_confirmed: bool,
}

impl TryFrom<pb::BatchReleaseQuotaRequest> for ReleaseBatch {
    type Error = Violations;

    fn try_from(req: pb::BatchReleaseQuotaRequest) -> Result<Self, Violations> {
        let mut v = Violations::new();
        let refs = quota_refs(&mut v, req.items, true);
        validate::text(&mut v, "reason", &req.reason, validate::MAX_TEXT_LEN, false);
        v.check_violations()?;
        Ok(ReleaseBatch { refs, reason: req.reason, unless_confirmed: req.unless_confirmed })
    }
}

/// A `RecheckQuota` call, validated.
pub struct Recheck {
    /// The product every order holds quota of.
    pub product_sku: Sku,
    /// Order and generation of each.
    pub refs: Vec<(String, u64)>,
}

impl TryFrom<pb::RecheckQuotaRequest> for Recheck {
    type Error = Violations;

    fn try_from(req: pb::RecheckQuotaRequest) -> Result<Self, Violations> {
        let mut v = Violations::new();
        let sku = validate::parse::<Sku>(&mut v, "product_sku", req.product_sku);
        let refs = quota_refs(&mut v, req.items, false).into_iter().map(|r| (r.order_id, r.generation)).collect();
        let product_sku = validate::finish(v, sku)?;
        Ok(Recheck { product_sku, refs })
    }
}
