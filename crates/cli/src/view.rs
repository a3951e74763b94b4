//! How the APIs' messages look in JSON and in tables.
//!
//! The JSON shape is the proto messages' own: field names exactly as in the `.proto` files
//! (snake_case), enums as their proto value names (`ORDER_STATE_RESERVED`), 64-bit integers as JSON
//! numbers, timestamps as RFC 3339 strings (null when unset), unset messages as null. A command's JSON
//! document is the RPC's response message (list commands concatenate pages and keep
//! `next_page_token`), so `grpcurl` and `chipgate -o json` tell the same story.

use chipgate_proto::inventory::v1 as ipb;
use chipgate_proto::licensing::v1 as lpb;
use chipgate_proto::orders::v1 as opb;
use serde_json::{Value, json};

use crate::out::n;

/// A timestamp as RFC 3339, or null.
pub fn ts(t: Option<&prost_types::Timestamp>) -> Value {
    t.map_or(Value::Null, |t| Value::String(t.to_string()))
}

/// A timestamp for a table: to the second, "-" when unset.
pub fn ts_short(t: Option<&prost_types::Timestamp>) -> String {
    match t {
        Some(t) => {
            let whole = prost_types::Timestamp { seconds: t.seconds, nanos: 0 };
            whole.to_string()
        }
        None => "-".to_string(),
    }
}

/// An enum value's name without its type prefix: "ORDER_STATE_RESERVED" → "RESERVED".
pub fn short(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix).unwrap_or(name).to_string()
}

/// "-" for an empty string.
pub fn dash(s: &str) -> String {
    if s.is_empty() { "-".to_string() } else { s.to_string() }
}

// ---------------------------------------------------------------------------------------------------
// Licensing
// ---------------------------------------------------------------------------------------------------

/// LicenseConditions.
pub fn conditions(c: Option<&lpb::LicenseConditions>) -> Value {
    match c {
        None => Value::Null,
        Some(c) => json!({
            "valid_from": ts(c.valid_from.as_ref()),
            "valid_until": ts(c.valid_until.as_ref()),
            "per_order_cap": c.per_order_cap,
            "domestic_ratio_bps": c.domestic_ratio_bps,
            "justification_required": c.justification_required,
            "terms_pending": c.terms_pending,
        }),
    }
}

/// Conditions in words, for tables.
pub fn conditions_text(c: Option<&lpb::LicenseConditions>) -> String {
    let Some(c) = c else { return "none".to_string() };
    let mut parts = Vec::new();
    if c.terms_pending {
        parts.push("terms pending".to_string());
    }
    if c.domestic_ratio_bps > 0 {
        parts.push(format!("domestic ratio {}.{:02}%", c.domestic_ratio_bps / 100, c.domestic_ratio_bps % 100));
    }
    if c.per_order_cap > 0 {
        parts.push(format!("cap {}/order", n(c.per_order_cap)));
    }
    if c.justification_required {
        parts.push("justification required".to_string());
    }
    if let Some(t) = &c.valid_from {
        parts.push(format!("from {}", ts_short(Some(t))));
    }
    if let Some(t) = &c.valid_until {
        parts.push(format!("until {}", ts_short(Some(t))));
    }
    if parts.is_empty() { "none".to_string() } else { parts.join("; ") }
}

/// Application.
pub fn application(a: &lpb::Application) -> Value {
    json!({
        "application_id": a.application_id,
        "buyer_id": a.buyer_id,
        "product_sku": a.product_sku,
        "quantity": a.quantity,
        "end_use": a.end_use,
        "site": a.site,
        "destination": a.destination,
        "state": a.state().as_str_name(),
        "queue_position": a.queue_position,
        "submit_time": ts(a.submit_time.as_ref()),
        "update_time": ts(a.update_time.as_ref()),
        "reason": a.reason,
        "wave_id": a.wave_id,
        "license_id": a.license_id,
    })
}

/// An application's state in words.
pub fn app_state(a: &lpb::Application) -> String {
    short(a.state().as_str_name(), "APPLICATION_STATE_")
}

/// Applications as a table.
pub fn applications_table(apps: &[lpb::Application]) -> crate::out::Table {
    let mut t =
        crate::out::Table::new(&[">POS", "APPLICATION", "BUYER", "PRODUCT", ">QUANTITY", "STATE", "SITE", "NOTE"]);
    for a in apps {
        let note = match a.state() {
            lpb::ApplicationState::Granted => format!("{} in {}", a.license_id, a.wave_id),
            lpb::ApplicationState::Rejected | lpb::ApplicationState::Withdrawn => a.reason.clone(),
            _ => String::new(),
        };
        t.row(vec![
            if a.queue_position > 0 { a.queue_position.to_string() } else { "-".into() },
            a.application_id.clone(),
            a.buyer_id.clone(),
            a.product_sku.clone(),
            n(a.quantity),
            app_state(a),
            a.site.clone(),
            note,
        ]);
    }
    t
}

/// WaveGrant.
pub fn wave_grant(g: &lpb::WaveGrant) -> Value {
    json!({
        "application_id": g.application_id,
        "buyer_id": g.buyer_id,
        "product_sku": g.product_sku,
        "granted_units": g.granted_units,
        "conditions": conditions(g.conditions.as_ref()),
        "license_id": g.license_id,
    })
}

/// Wave.
pub fn wave(w: &lpb::Wave) -> Value {
    json!({
        "wave_id": w.wave_id,
        "display_name": w.display_name,
        "state": w.state().as_str_name(),
        "grants": w.grants.iter().map(wave_grant).collect::<Vec<_>>(),
        "create_time": ts(w.create_time.as_ref()),
        "publish_time": ts(w.publish_time.as_ref()),
        "total_granted_units": w.total_granted_units,
    })
}

/// A wave's state in words.
pub fn wave_state(w: &lpb::Wave) -> String {
    short(w.state().as_str_name(), "WAVE_STATE_")
}

/// A wave for people: its figures and its grants.
pub fn print_wave(w: &lpb::Wave) {
    crate::out::fields(&[
        ("wave", w.wave_id.clone()),
        ("name", dash(&w.display_name)),
        ("state", wave_state(w)),
        ("grants", w.grants.len().to_string()),
        ("granted units", n(w.total_granted_units)),
        ("created", ts_short(w.create_time.as_ref())),
        ("published", ts_short(w.publish_time.as_ref())),
    ]);
    crate::out::say("");
    let mut t = crate::out::Table::new(&["APPLICATION", "BUYER", "PRODUCT", ">GRANTED", "CONDITIONS", "LICENCE"]);
    for g in &w.grants {
        t.row(vec![
            g.application_id.clone(),
            g.buyer_id.clone(),
            g.product_sku.clone(),
            n(g.granted_units),
            conditions_text(g.conditions.as_ref()),
            dash(&g.license_id),
        ]);
    }
    t.print_or("(no grants yet: add some with `chipgate wave grant`)");
}

/// License.
pub fn license(l: &lpb::License) -> Value {
    json!({
        "license_id": l.license_id,
        "buyer_id": l.buyer_id,
        "product_sku": l.product_sku,
        "destination": l.destination,
        "application_id": l.application_id,
        "wave_id": l.wave_id,
        "state": l.state().as_str_name(),
        "conditions": conditions(l.conditions.as_ref()),
        "granted_units": l.granted_units,
        "used_units": l.used_units,
        "confirmed_units": l.confirmed_units,
        "remaining_units": l.remaining_units,
        "create_time": ts(l.create_time.as_ref()),
        "update_time": ts(l.update_time.as_ref()),
        "state_reason": l.state_reason,
    })
}

/// A licence's state in words.
pub fn license_state(l: &lpb::License) -> String {
    short(l.state().as_str_name(), "LICENSE_STATE_")
}

/// Licences as a table.
pub fn licenses_table(ls: &[lpb::License]) -> crate::out::Table {
    let mut t = crate::out::Table::new(&[
        "LICENCE",
        "BUYER",
        "PRODUCT",
        "STATE",
        ">GRANTED",
        ">USED",
        ">CONFIRMED",
        ">REMAINING",
        "WAVE",
        "CONDITIONS",
    ]);
    for l in ls {
        t.row(vec![
            l.license_id.clone(),
            l.buyer_id.clone(),
            l.product_sku.clone(),
            license_state(l),
            n(l.granted_units),
            n(l.used_units),
            n(l.confirmed_units),
            n(l.remaining_units),
            l.wave_id.clone(),
            conditions_text(l.conditions.as_ref()),
        ]);
    }
    t
}

/// A licence for people.
pub fn print_license(l: &lpb::License) {
    crate::out::fields(&[
        ("licence", l.license_id.clone()),
        ("buyer", l.buyer_id.clone()),
        ("product", format!("{} to {}", l.product_sku, l.destination)),
        ("state", license_state(l)),
        ("why", dash(&l.state_reason)),
        ("granted", n(l.granted_units)),
        ("used", n(l.used_units)),
        ("confirmed", n(l.confirmed_units)),
        ("remaining", n(l.remaining_units)),
        ("conditions", conditions_text(l.conditions.as_ref())),
        ("wave", l.wave_id.clone()),
        ("application", l.application_id.clone()),
        ("created", ts_short(l.create_time.as_ref())),
        ("updated", ts_short(l.update_time.as_ref())),
    ]);
}

/// ConditionFailure.
pub fn condition_failure(f: &lpb::ConditionFailure) -> Value {
    json!({
        "condition": f.condition().as_str_name(),
        "license_id": f.license_id,
        "description": f.description,
        "permanent": f.permanent,
        "required": f.required,
        "actual": f.actual,
    })
}

/// A condition's name in words: CONDITION_DOMESTIC_RATIO → "DOMESTIC_RATIO".
pub fn condition_name(c: lpb::Condition) -> String {
    short(c.as_str_name(), "CONDITION_")
}

/// Failed conditions as a table.
pub fn failures_table(fs: &[lpb::ConditionFailure]) -> crate::out::Table {
    let mut t = crate::out::Table::new(&["CONDITION", "LICENCE", "PERMANENT", "WHY"]);
    for f in fs {
        t.row(vec![
            condition_name(f.condition()),
            dash(&f.license_id),
            if f.permanent { "yes".into() } else { "no".into() },
            f.description.clone(),
        ]);
    }
    t
}

/// DomesticPurchase.
pub fn domestic_purchase(p: &lpb::DomesticPurchase) -> Value {
    json!({
        "buyer_id": p.buyer_id,
        "units": p.units,
        "supplier": p.supplier,
        "evidence_ref": p.evidence_ref,
        "record_time": ts(p.record_time.as_ref()),
    })
}

/// ExportAuthorization.
pub fn export_authorization(a: &lpb::ExportAuthorization) -> Value {
    json!({
        "vendor": a.vendor,
        "product_sku": a.product_sku,
        "destination": a.destination,
        "active": a.active,
        "reference": a.reference,
        "update_time": ts(a.update_time.as_ref()),
    })
}

/// Export authorisations as a table.
pub fn exports_table(all: &[lpb::ExportAuthorization]) -> crate::out::Table {
    let mut t = crate::out::Table::new(&["PRODUCT", "DESTINATION", "VENDOR", "ACTIVE", "REFERENCE", "UPDATED"]);
    for a in all {
        t.row(vec![
            a.product_sku.clone(),
            a.destination.clone(),
            a.vendor.clone(),
            if a.active { "yes".into() } else { "no (revoked)".into() },
            dash(&a.reference),
            ts_short(a.update_time.as_ref()),
        ]);
    }
    t
}

/// ImportPolicy.
pub fn import_policy(p: &lpb::ImportPolicy) -> Value {
    json!({
        "product_sku": p.product_sku,
        "stance": p.stance().as_str_name(),
        "reason": p.reason,
        "update_time": ts(p.update_time.as_ref()),
    })
}

/// Import policies as a table.
pub fn policies_table(all: &[lpb::ImportPolicy]) -> crate::out::Table {
    let mut t = crate::out::Table::new(&["PRODUCT", "STANCE", "REASON", "UPDATED"]);
    for p in all {
        t.row(vec![
            p.product_sku.clone(),
            short(p.stance().as_str_name(), "IMPORT_STANCE_"),
            dash(&p.reason),
            ts_short(p.update_time.as_ref()),
        ]);
    }
    t
}

/// AuditEntry.
pub fn audit_entry(e: &lpb::AuditEntry) -> Value {
    json!({
        "sequence": e.sequence,
        "time": ts(e.time.as_ref()),
        "actor": e.actor,
        "action": e.action,
        "subject": e.subject,
        "detail": e.detail,
        "prev_hash": e.prev_hash,
        "hash": e.hash,
        "request_id": e.request_id,
    })
}

// ---------------------------------------------------------------------------------------------------
// Inventory
// ---------------------------------------------------------------------------------------------------

/// Product.
pub fn product(p: &ipb::Product) -> Value {
    json!({
        "sku": p.sku,
        "name": p.name,
        "product_class": p.product_class().as_str_name(),
        "relative_performance": p.relative_performance,
        "vendor": p.vendor,
        "update_time": ts(p.update_time.as_ref()),
    })
}

/// Stock.
pub fn stock(s: &ipb::Stock) -> Value {
    json!({
        "product_sku": s.product_sku,
        "on_hand": s.on_hand,
        "available": s.available,
        "held": s.held,
        "committed": s.committed,
        "shipped": s.shipped,
        "received": s.received,
        "version": s.version,
        "update_time": ts(s.update_time.as_ref()),
    })
}

/// Stock as a table.
pub fn stock_table(all: &[ipb::Stock]) -> crate::out::Table {
    let mut t =
        crate::out::Table::new(&["PRODUCT", ">ON HAND", ">AVAILABLE", ">HELD", ">COMMITTED", ">SHIPPED", ">RECEIVED"]);
    for s in all {
        t.row(vec![
            s.product_sku.clone(),
            n(s.on_hand),
            n(s.available),
            n(s.held),
            n(s.committed),
            n(s.shipped),
            n(s.received),
        ]);
    }
    t
}

/// Receipt.
pub fn receipt(r: &ipb::Receipt) -> Value {
    json!({
        "receipt_id": r.receipt_id,
        "product_sku": r.product_sku,
        "units": r.units,
        "source": r.source,
        "receive_time": ts(r.receive_time.as_ref()),
    })
}

/// WatchStockResponse.
pub fn stock_change(c: &ipb::WatchStockResponse) -> Value {
    json!({
        "stock": c.stock.as_ref().map_or(Value::Null, stock),
        "cause": c.cause,
        "reference": c.reference,
        "time": ts(c.time.as_ref()),
    })
}

// ---------------------------------------------------------------------------------------------------
// Orders
// ---------------------------------------------------------------------------------------------------

/// An order state in words: ORDER_STATE_AWAITING_LICENSE → "AWAITING_LICENSE".
pub fn order_state_name(s: opb::OrderState) -> String {
    if s == opb::OrderState::Unspecified { "-".to_string() } else { short(s.as_str_name(), "ORDER_STATE_") }
}

/// Cause.
pub fn cause(c: Option<&opb::Cause>) -> Value {
    match c {
        None => Value::Null,
        Some(c) => json!({"kind": c.kind().as_str_name(), "reference": c.reference}),
    }
}

/// A cause in words: "WAVE_PUBLISHED wave-1".
pub fn cause_text(c: Option<&opb::Cause>) -> String {
    match c {
        None => "-".to_string(),
        Some(c) => {
            let kind = short(c.kind().as_str_name(), "CAUSE_KIND_");
            if c.reference.is_empty() { kind } else { format!("{kind} {}", c.reference) }
        }
    }
}

/// Transition.
pub fn transition(t: &opb::Transition) -> Value {
    json!({
        "from_state": t.from_state().as_str_name(),
        "to_state": t.to_state().as_str_name(),
        "time": ts(t.time.as_ref()),
        "cause": cause(t.cause.as_ref()),
        "detail": t.detail,
        "failures": t.failures.iter().map(condition_failure).collect::<Vec<_>>(),
    })
}

/// Order.
pub fn order(o: &opb::Order) -> Value {
    json!({
        "order_id": o.order_id,
        "request_id": o.request_id,
        "buyer_id": o.buyer_id,
        "product_sku": o.product_sku,
        "units": o.units,
        "justification": o.justification,
        "state": o.state().as_str_name(),
        "reasons": o.reasons.iter().map(condition_failure).collect::<Vec<_>>(),
        "license_id": o.license_id,
        "wave_id": o.wave_id,
        "generation": o.generation,
        "held_units": o.held_units,
        "hold_expire_time": ts(o.hold_expire_time.as_ref()),
        "sequence": o.sequence,
        "create_time": ts(o.create_time.as_ref()),
        "update_time": ts(o.update_time.as_ref()),
        "history": o.history.iter().map(transition).collect::<Vec<_>>(),
        "backlog_position": o.backlog_position,
    })
}

/// Why an order stands where it does, in a few words.
pub fn order_why(o: &opb::Order) -> String {
    match o.state() {
        opb::OrderState::AwaitingLicense | opb::OrderState::Rejected => {
            let mut names: Vec<String> = o.reasons.iter().map(|f| condition_name(f.condition())).collect();
            names.dedup();
            if names.is_empty() { "-".to_string() } else { names.join(", ") }
        }
        opb::OrderState::Backordered if o.backlog_position > 0 => format!("backlog #{}", o.backlog_position),
        opb::OrderState::Backordered => "waiting for stock".to_string(),
        opb::OrderState::Reserved => format!("hold until {}", ts_short(o.hold_expire_time.as_ref())),
        _ => "-".to_string(),
    }
}

/// Orders as a table.
pub fn orders_table(os: &[opb::Order]) -> crate::out::Table {
    let mut t = crate::out::Table::new(&["ORDER", "BUYER", "PRODUCT", ">UNITS", "STATE", ">HELD", "LICENCE", "WHY"]);
    for o in os {
        t.row(vec![
            o.order_id.clone(),
            o.buyer_id.clone(),
            o.product_sku.clone(),
            n(o.units),
            order_state_name(o.state()),
            n(o.held_units),
            dash(&o.license_id),
            order_why(o),
        ]);
    }
    t
}

/// An order for people: its figures, why it waits, and its history.
pub fn print_order(o: &opb::Order) {
    let mut pairs = vec![
        ("order", o.order_id.clone()),
        ("buyer", o.buyer_id.clone()),
        ("product", o.product_sku.clone()),
        ("units", n(o.units)),
        ("state", order_state_name(o.state())),
        ("held", n(o.held_units)),
        ("licence", dash(&o.license_id)),
        ("wave", dash(&o.wave_id)),
        ("justification", dash(&o.justification)),
        ("placed", ts_short(o.create_time.as_ref())),
        ("sequence", o.sequence.to_string()),
        ("generation", o.generation.to_string()),
    ];
    if o.backlog_position > 0 {
        pairs.push(("backlog position", o.backlog_position.to_string()));
    }
    if o.hold_expire_time.is_some() {
        pairs.push(("hold expires", ts_short(o.hold_expire_time.as_ref())));
    }
    crate::out::fields(&pairs);
    if !o.reasons.is_empty() {
        crate::out::say("");
        crate::out::say("why it waits:");
        for l in failures_table(&o.reasons).render() {
            crate::out::say(&format!("  {l}"));
        }
    }
    if !o.history.is_empty() {
        crate::out::say("");
        crate::out::say("history:");
        let mut t = crate::out::Table::new(&["TIME", "FROM", "TO", "CAUSE", "DETAIL"]);
        for h in &o.history {
            t.row(vec![
                ts_short(h.time.as_ref()),
                order_state_name(h.from_state()),
                order_state_name(h.to_state()),
                cause_text(h.cause.as_ref()),
                h.detail.clone(),
            ]);
        }
        for l in t.render() {
            crate::out::say(&format!("  {l}"));
        }
    }
}

/// BacklogEntry.
pub fn backlog_entry(e: &opb::BacklogEntry) -> Value {
    json!({
        "position": e.position,
        "order_id": e.order_id,
        "buyer_id": e.buyer_id,
        "units": e.units,
        "held_units": e.held_units,
        "sequence": e.sequence,
        "create_time": ts(e.create_time.as_ref()),
    })
}

/// WaveProgress.
pub fn wave_progress(p: &opb::WaveProgress) -> Value {
    json!({
        "wave_id": p.wave_id,
        "observed": p.observed,
        "orders_concerned": p.orders_concerned,
        "orders_evaluated": p.orders_evaluated,
        "orders_backordered": p.orders_backordered,
        "orders_reserved": p.orders_reserved,
        "orders_confirmed": p.orders_confirmed,
        "orders_shipped": p.orders_shipped,
        "orders_awaiting": p.orders_awaiting,
        "units_held": p.units_held,
        "observe_time": ts(p.observe_time.as_ref()),
        "settle_time": ts(p.settle_time.as_ref()),
    })
}

/// A wave's progress for people.
pub fn print_wave_progress(p: &opb::WaveProgress) {
    crate::out::fields(&[
        ("wave", p.wave_id.clone()),
        ("observed", if p.observed { ts_short(p.observe_time.as_ref()) } else { "not yet".into() }),
        ("settled", if p.settle_time.is_some() { ts_short(p.settle_time.as_ref()) } else { "not yet".into() }),
        ("orders concerned", n(p.orders_concerned)),
        ("orders evaluated", n(p.orders_evaluated)),
        ("backordered", n(p.orders_backordered)),
        ("reserved", n(p.orders_reserved)),
        ("confirmed", n(p.orders_confirmed)),
        ("shipped", n(p.orders_shipped)),
        ("still awaiting", n(p.orders_awaiting)),
        ("units held", n(p.units_held)),
    ]);
}

/// WatchOrdersResponse.
pub fn order_change(c: &opb::WatchOrdersResponse) -> Value {
    json!({
        "order_id": c.order_id,
        "buyer_id": c.buyer_id,
        "product_sku": c.product_sku,
        "transition": c.transition.as_ref().map_or(Value::Null, transition),
        "held_units": c.held_units,
    })
}
