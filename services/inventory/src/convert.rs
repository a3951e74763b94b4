//! Conversions between the inventory API and the domain records, at the edge.

use chipgate_domain::inventory::HoldRecord;
use chipgate_domain::inventory::{HoldStatus, ProductClass, ProductRecord, StockRecord};
use chipgate_proto::inventory::v1 as pb;
use chipgate_runtime::time::ts_opt;

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
