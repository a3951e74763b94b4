//! Conversions between the inventory API and the domain records, at the edge.

use chipgate_domain::ids::{OrderId, Sku};
use chipgate_domain::inventory::{HoldAsk, HoldRecord};
use chipgate_domain::inventory::{HoldStatus, ProductClass, ProductRecord, StockRecord};
use chipgate_proto::inventory::v1 as pb;
use chipgate_runtime::errors::Violations;
use chipgate_runtime::time::ts_opt;
use chipgate_runtime::validate;

use crate::{DEFAULT_HOLD_SECONDS, MAX_BATCH, MAX_HOLD_SECONDS, MAX_UNITS};

/// A `BatchReserve` call, validated at the edge: every bad field is named at once.
pub struct HoldBatch {
    /// The product every ask is for.
    pub product_sku: Sku,
    /// The asks, served in this order.
    pub asks: Vec<HoldAsk>,
    /// The caller's fencing token (0: not fenced).
    pub fence_token: u64,
}

impl TryFrom<pb::BatchReserveRequest> for HoldBatch {
    type Error = Violations;

    fn try_from(req: pb::BatchReserveRequest) -> Result<Self, Violations> {
        let mut v = Violations::new();
        let sku = validate::parse::<Sku>(&mut v, "product_sku", req.product_sku);
        let checked = validate::batch(&mut v, req.items.len(), MAX_BATCH);
        let mut seen = std::collections::HashSet::new();
        let mut order_ids = Vec::with_capacity(checked);
        for (i, it) in req.items.iter().enumerate().take(checked) {
            let prefix = format!("items[{i}].");
            let field = |name: &str| format!("{prefix}{name}");
            order_ids.push(validate::parse_order_ref(&mut v, &prefix, &it.order_id, it.generation));
            validate::units(&mut v, &field("units"), it.units, MAX_UNITS);
            if it.hold_seconds > MAX_HOLD_SECONDS {
                v.add(field("hold_seconds"), format!("must be at most {MAX_HOLD_SECONDS}"));
            }
            if let Some(known) = it.known_held
                && known > it.units
            {
                v.add(field("known_held"), format!("{known} is more than the {} units asked for", it.units));
            }
            if let Some(max) = it.max_units {
                if max > it.units {
                    v.add(field("max_units"), format!("must be at most the {} units asked for", it.units));
                } else if let Some(known) = it.known_held
                    && max < known
                {
                    v.add(field("max_units"), format!("{max} is below the {known} units known to be held"));
                }
            }
            validate::once(&mut v, &mut seen, it.order_id.as_str(), &prefix, &it.order_id);
        }
        let (product_sku, order_ids) =
            validate::finish(v, (sku, order_ids.into_iter().collect::<Option<Vec<OrderId>>>()))?;
        let asks = req
            .items
            .into_iter()
            .zip(order_ids)
            .map(|(it, order_id)| HoldAsk {
                order_id,
                generation: it.generation,
                units: it.units,
                allow_partial: it.allow_partial,
                hold_seconds: if it.hold_seconds == 0 { DEFAULT_HOLD_SECONDS } else { it.hold_seconds },
                known_held: it.known_held,
                max_units: it.max_units,
            })
            .collect();
        Ok(HoldBatch { product_sku, asks, fence_token: req.fence_token })
    }
}

/// A `BatchReleaseReservations` call, validated.
pub struct ReleaseBatch {
    /// Product, order and generation of each hold to give back.
    pub refs: Vec<(Sku, OrderId, u64)>,
    /// Why (kept with each hold).
    pub reason: String,
    /// Leave confirmed holds alone.
    pub unless_confirmed: bool,
}

impl TryFrom<pb::BatchReleaseReservationsRequest> for ReleaseBatch {
    type Error = Violations;

    fn try_from(req: pb::BatchReleaseReservationsRequest) -> Result<Self, Violations> {
        let mut v = Violations::new();
        let checked = validate::batch(&mut v, req.items.len(), MAX_BATCH);
        let mut seen = std::collections::HashSet::new();
        let mut ids = Vec::with_capacity(checked);
        for (i, it) in req.items.iter().enumerate().take(checked) {
            let prefix = format!("items[{i}].");
            let order_id = validate::parse_order_ref(&mut v, &prefix, &it.order_id, it.generation);
            let sku = validate::parse::<Sku>(&mut v, &format!("{prefix}product_sku"), it.product_sku.clone());
            validate::once(&mut v, &mut seen, (it.product_sku.as_str(), it.order_id.as_str()), &prefix, &it.order_id);
            ids.push(sku.zip(order_id));
        }
        validate::text(&mut v, "reason", &req.reason, validate::MAX_TEXT_LEN, false);
        let ids = validate::finish(v, ids.into_iter().collect::<Option<Vec<(Sku, OrderId)>>>())?;
        let refs = req.items.iter().zip(ids).map(|(i, (sku, order_id))| (sku, order_id, i.generation)).collect();
        Ok(ReleaseBatch { refs, reason: req.reason, unless_confirmed: req.unless_confirmed })
    }
}

/// A product as the API shows it.
pub fn product_to(p: &ProductRecord) -> pb::Product {
    pb::Product {
        sku: p.sku.clone(),
        name: p.name.clone(),
        product_class: match p.class() {
            ProductClass::Unspecified => pb::ProductClass::Unspecified,
            ProductClass::ExportControlledAccelerator => pb::ProductClass::ExportControlledAccelerator,
            ProductClass::DomesticAccelerator => pb::ProductClass::DomesticAccelerator,
        } as i32,
        relative_performance: p.relative_performance,
        vendor: p.vendor.clone(),
        update_time: ts_opt(p.update_ms),
    }
}

/// API product class → domain (None for UNSPECIFIED).
pub fn class_from(c: pb::ProductClass) -> Option<ProductClass> {
    match c {
        pb::ProductClass::Unspecified => None,
        pb::ProductClass::ExportControlledAccelerator => Some(ProductClass::ExportControlledAccelerator),
        pb::ProductClass::DomesticAccelerator => Some(ProductClass::DomesticAccelerator),
    }
}

/// Stock as the API shows it; `version` is the stock record's version.
pub fn stock_to(s: &StockRecord, version: u64) -> pb::Stock {
    pb::Stock {
        product_sku: s.sku.clone(),
        on_hand: s.on_hand(),
        available: s.available,
        held: s.held,
        committed: s.committed,
        shipped: s.shipped,
        received: s.received,
        version,
        update_time: ts_opt(s.update_ms),
    }
}

/// Domain hold status → API.
pub fn hold_state(s: HoldStatus) -> pb::ReservationState {
    match s {
        HoldStatus::Unspecified => pb::ReservationState::Unspecified,
        HoldStatus::Held => pb::ReservationState::Held,
        HoldStatus::Confirmed => pb::ReservationState::Confirmed,
        HoldStatus::Shipped => pb::ReservationState::Shipped,
        HoldStatus::Released => pb::ReservationState::Released,
        HoldStatus::Expired => pb::ReservationState::Expired,
    }
}

/// API reservation state → domain (None for UNSPECIFIED).
pub fn hold_status_from(s: pb::ReservationState) -> Option<HoldStatus> {
    match s {
        pb::ReservationState::Unspecified => None,
        pb::ReservationState::Held => Some(HoldStatus::Held),
        pb::ReservationState::Confirmed => Some(HoldStatus::Confirmed),
        pb::ReservationState::Shipped => Some(HoldStatus::Shipped),
        pb::ReservationState::Released => Some(HoldStatus::Released),
        pb::ReservationState::Expired => Some(HoldStatus::Expired),
    }
}

/// A hold as the API shows it.
pub fn hold_to(h: &HoldRecord) -> pb::Reservation {
    pb::Reservation {
        order_id: h.order_id.clone(),
        generation: h.generation,
        product_sku: h.sku.clone(),
        requested_units: h.requested,
        held_units: h.held,
        state: hold_state(h.status()) as i32,
        hold_seconds: h.hold_seconds,
        expire_time: ts_opt(h.expire_ms),
        create_time: ts_opt(h.create_ms),
        update_time: ts_opt(h.update_ms),
        release_reason: h.release_reason.clone(),
    }
}
