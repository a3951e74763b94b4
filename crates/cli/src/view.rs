//! How the APIs' messages look in JSON and in tables.
//!
//! JSON is rendered from the descriptor set the services serve for reflection (prost-reflect), in
//! the proto3 JSON mapping that grpcurl prints: fields in `.proto` order, every field present (also
//! the zero ones), enums by name (`ORDER_STATE_RESERVED`), 64-bit integers as strings, timestamps in
//! RFC 3339, unset messages as null. The one difference is deliberate: keys are the `.proto` field
//! names (snake_case, grpcurl's `-format-json` would print lowerCamelCase), so `jq` filters read like
//! the API. A command's JSON document is the RPC's response message (list commands concatenate pages
//! and keep `next_page_token`).

use std::sync::LazyLock;

use chipgate_proto::inventory::v1 as ipb;
use chipgate_proto::licensing::v1 as lpb;
use chipgate_proto::orders::v1 as opb;
use prost_reflect::{DescriptorPool, DynamicMessage, Kind, MessageDescriptor, SerializeOptions};
use serde_json::{Value, json};

use crate::out::thousands;

/// The chipgate APIs' descriptors (the reflection descriptor set).
static POOL: LazyLock<Result<DescriptorPool, String>> = LazyLock::new(|| {
    DescriptorPool::decode(chipgate_proto::FILE_DESCRIPTOR_SET).map_err(|e| format!("descriptor set: {e}"))
});

const OPTIONS: SerializeOptions = SerializeOptions::new().use_proto_field_name(true).skip_default_fields(false);

/// The full proto name of a generated message type: `chipgate_proto::orders::v1::Order` is
/// `chipgate.orders.v1.Order` (the generated modules mirror the proto packages).
fn full_name<M>() -> String {
    let rust = std::any::type_name::<M>();
    let path = rust.strip_prefix("chipgate_proto::").unwrap_or(rust);
    format!("chipgate.{}", path.replace("::", "."))
}

/// A message of the chipgate APIs in the proto3 JSON mapping (see the module doc).
pub fn msg<M: prost::Message>(m: &M) -> Value {
    let name = full_name::<M>();
    let rendered = POOL.as_ref().map_err(Clone::clone).and_then(|pool| {
        let desc = pool.get_message_by_name(&name).ok_or_else(|| format!("{name} is not in the descriptor set"))?;
        let dynamic =
            DynamicMessage::decode(desc.clone(), m.encode_to_vec().as_slice()).map_err(|e| format!("{name}: {e}"))?;
        let v = dynamic.serialize_with_options(serde_json::value::Serializer, &OPTIONS);
        Ok(with_nulls(&desc, v.map_err(|e| format!("{name}: {e}"))?))
    });
    rendered.unwrap_or_else(|e| json!({ "render_error": e }))
}

/// A message of the chipgate APIs read from its proto3 JSON form (what [`msg`] prints; lowerCamelCase
/// keys are accepted too, as in any proto3 JSON).
pub fn from_json<M: prost::Message + Default>(v: &Value) -> Result<M, String> {
    let name = full_name::<M>();
    let pool = POOL.as_ref().map_err(Clone::clone)?;
    let desc = pool.get_message_by_name(&name).ok_or_else(|| format!("{name} is not in the descriptor set"))?;
    let dynamic = DynamicMessage::deserialize(desc, v).map_err(|e| format!("not a {name}: {e}"))?;
    dynamic.transcode_to::<M>().map_err(|e| format!("not a {name}: {e}"))
}

/// `v` (a rendered `desc`) with an explicit null for every unset message field, in field order, as
/// grpcurl's `-emit-defaults` prints them (prost-reflect leaves them out).
fn with_nulls(desc: &MessageDescriptor, v: Value) -> Value {
    let Value::Object(mut fields) = v else { return v };
    let mut out = serde_json::Map::new();
    for f in desc.fields() {
        let value = fields.remove(f.name());
        let Kind::Message(inner) = f.kind() else {
            if let Some(value) = value {
                out.insert(f.name().to_string(), value);
            }
            continue;
        };
        let value = match value {
            None if !f.is_list() && !f.is_map() => Value::Null,
            None => continue,
            Some(Value::Array(items)) if f.is_list() => {
                Value::Array(items.into_iter().map(|i| with_nulls(&inner, i)).collect())
            }
            Some(value) if f.is_map() => value,
            Some(value) => with_nulls(&inner, value),
        };
        out.insert(f.name().to_string(), value);
    }
    out.extend(fields);
    Value::Object(out)
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
        parts.push(format!("cap {}/order", thousands(c.per_order_cap)));
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
            thousands(a.quantity),
            app_state(a),
            a.site.clone(),
            note,
        ]);
    }
    t
}

/// A wave's state in words.
pub fn wave_state(w: &lpb::Wave) -> String {
    short(w.state().as_str_name(), "WAVE_STATE_")
}

/// How many grants a wave holds (a server before `grant_count` only listed them).
pub fn grant_count(w: &lpb::Wave) -> u64 {
    w.grant_count.max(w.grants.len() as u64)
}

/// A wave's id, name, state and figures, as both views of a wave print them first.
fn wave_figures(w: &lpb::Wave) -> Vec<(&'static str, String)> {
    vec![
        ("wave", w.wave_id.clone()),
        ("name", dash(&w.display_name)),
        ("state", wave_state(w)),
        ("grants", grant_count(w).to_string()),
        ("granted units", thousands(w.total_granted_units)),
    ]
}

/// One grant added to (`verb` "granted") or removed from ("removed") a draft wave, and the wave's
/// figures after it: AddWaveGrant and RemoveWaveGrant answer without the wave's other grants.
pub fn print_grant_change(verb: &str, w: &lpb::Wave, g: &lpb::WaveGrant) {
    crate::out::say(&format!(
        "{verb} {} ({} x {} for {}), conditions: {}",
        g.application_id,
        thousands(g.granted_units),
        g.product_sku,
        g.buyer_id,
        conditions_text(g.conditions.as_ref())
    ));
    crate::out::fields(&wave_figures(w));
    crate::out::say(&format!("every grant: chipgate wave show {}", w.wave_id));
}

/// A wave for people: its figures and its grants.
pub fn print_wave(w: &lpb::Wave) {
    let mut fields = wave_figures(w);
    fields.push(("created", ts_short(w.create_time.as_ref())));
    fields.push(("published", ts_short(w.publish_time.as_ref())));
    crate::out::fields(&fields);
    crate::out::say("");
    let mut t = crate::out::Table::new(&["APPLICATION", "BUYER", "PRODUCT", ">GRANTED", "CONDITIONS", "LICENCE"]);
    for g in &w.grants {
        t.row(vec![
            g.application_id.clone(),
            g.buyer_id.clone(),
            g.product_sku.clone(),
            thousands(g.granted_units),
            conditions_text(g.conditions.as_ref()),
            dash(&g.license_id),
        ]);
    }
    t.print_or("(no grants yet: add some with `chipgate wave grant`)");
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
            thousands(l.granted_units),
            thousands(l.used_units),
            thousands(l.confirmed_units),
            thousands(l.remaining_units),
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
        ("granted", thousands(l.granted_units)),
        ("used", thousands(l.used_units)),
        ("confirmed", thousands(l.confirmed_units)),
        ("remaining", thousands(l.remaining_units)),
        ("conditions", conditions_text(l.conditions.as_ref())),
        ("wave", l.wave_id.clone()),
        ("application", l.application_id.clone()),
        ("created", ts_short(l.create_time.as_ref())),
        ("updated", ts_short(l.update_time.as_ref())),
    ]);
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

// ---------------------------------------------------------------------------------------------------
// Inventory
// ---------------------------------------------------------------------------------------------------

/// Stock as a table.
pub fn stock_table(all: &[ipb::Stock]) -> crate::out::Table {
    let mut t =
        crate::out::Table::new(&["PRODUCT", ">ON HAND", ">AVAILABLE", ">HELD", ">COMMITTED", ">SHIPPED", ">RECEIVED"]);
    for s in all {
        t.row(vec![
            s.product_sku.clone(),
            thousands(s.on_hand),
            thousands(s.available),
            thousands(s.held),
            thousands(s.committed),
            thousands(s.shipped),
            thousands(s.received),
        ]);
    }
    t
}

// ---------------------------------------------------------------------------------------------------
// Orders
// ---------------------------------------------------------------------------------------------------

/// An order state in words: ORDER_STATE_AWAITING_LICENSE → "AWAITING_LICENSE".
pub fn order_state_name(s: opb::OrderState) -> String {
    if s == opb::OrderState::Unspecified { "-".to_string() } else { short(s.as_str_name(), "ORDER_STATE_") }
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
            thousands(o.units),
            order_state_name(o.state()),
            thousands(o.held_units),
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
        ("units", thousands(o.units)),
        ("state", order_state_name(o.state())),
        ("held", thousands(o.held_units)),
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
    if !o.archived_in.is_empty() {
        pairs.push(("archived in", o.archived_in.clone()));
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

/// A wave's progress for people.
pub fn print_wave_progress(p: &opb::WaveProgress) {
    crate::out::fields(&[
        ("wave", p.wave_id.clone()),
        ("observed", if p.observed { ts_short(p.observe_time.as_ref()) } else { "not yet".into() }),
        ("settled", if p.settle_time.is_some() { ts_short(p.settle_time.as_ref()) } else { "not yet".into() }),
        ("orders concerned", thousands(p.orders_concerned)),
        ("orders evaluated", thousands(p.orders_evaluated)),
        ("backordered", thousands(p.orders_backordered)),
        ("reserved", thousands(p.orders_reserved)),
        ("confirmed", thousands(p.orders_confirmed)),
        ("shipped", thousands(p.orders_shipped)),
        ("still awaiting", thousands(p.orders_awaiting)),
        ("units held", thousands(p.units_held)),
    ]);
}

// ---------------------------------------------------------------------------------------------------
// Allocation policies and previews
// ---------------------------------------------------------------------------------------------------

/// A policy in words: "PRO_RATA, at most 40 % per buyer".
pub fn policy_text(p: Option<&opb::AllocationPolicy>) -> String {
    let Some(p) = p else { return "FIFO".to_string() };
    let strategy = match p.strategy() {
        opb::AllocationStrategy::Unspecified => "FIFO".to_string(),
        s => short(s.as_str_name(), "ALLOCATION_STRATEGY_"),
    };
    if (1..100).contains(&p.max_share_percent) {
        format!("{strategy}, at most {} % per buyer", p.max_share_percent)
    } else {
        strategy
    }
}

/// How free stock would be shared, for people: the figures and one row per waiting buyer.
pub fn print_allocation(a: &opb::StockAllocation) {
    crate::out::say(&format!(
        "{}: {} free, {} handed out, {} left ({})",
        a.product_sku,
        thousands(a.free_units),
        thousands(a.allocated_units),
        thousands(a.left_units),
        policy_text(a.policy.as_ref())
    ));
    let mut t = crate::out::Table::new(&["BUYER", ">ORDERS", ">WAITS FOR", ">HOLDS", ">GETS", "CAP"]);
    for b in &a.buyers {
        t.row(vec![
            b.buyer_id.clone(),
            thousands(b.orders_waiting),
            thousands(b.units_waiting),
            thousands(b.allocated_units),
            thousands(b.units),
            if b.capped { "capped".to_string() } else { "-".to_string() },
        ]);
    }
    t.print_or("  nobody waits in the backlog");
}

/// Orders before and after a previewed change.
pub fn outcomes_table(os: &[opb::OrderOutcome]) -> crate::out::Table {
    let mut t = crate::out::Table::new(&["ORDER", "BUYER", ">UNITS", "NOW", ">HELD", "WOULD BE", ">HELD", "WHY"]);
    for o in os {
        let why = if o.reasons.is_empty() {
            o.detail.clone()
        } else {
            let mut names: Vec<String> = o.reasons.iter().map(|f| condition_name(f.condition())).collect();
            names.dedup();
            names.join(", ")
        };
        t.row(vec![
            o.order_id.clone(),
            o.buyer_id.clone(),
            thousands(o.units),
            order_state_name(o.state()),
            thousands(o.held_units),
            order_state_name(o.next_state()),
            thousands(o.next_held_units),
            why,
        ]);
    }
    t
}

/// What a wave would do per buyer, as a table.
pub fn buyer_outcomes_table(bs: &[opb::BuyerOutcome]) -> crate::out::Table {
    let mut t = crate::out::Table::new(&[
        "BUYER",
        "PRODUCT",
        ">ELIGIBLE",
        ">UNITS",
        ">RESERVED",
        ">BACKORDERED",
        ">NEWLY HELD",
        ">WAITING",
        ">REJECTED",
        "WHY WAITING",
    ]);
    for b in bs {
        let mut why: Vec<String> = b.reasons.iter().map(|f| condition_name(f.condition())).collect();
        why.dedup();
        t.row(vec![
            b.buyer_id.clone(),
            b.product_sku.clone(),
            thousands(b.orders_eligible),
            thousands(b.units_eligible),
            thousands(b.orders_reserved),
            thousands(b.orders_backordered),
            thousands(b.units_newly_held),
            thousands(b.orders_waiting),
            thousands(b.orders_rejected),
            if why.is_empty() { "-".to_string() } else { why.join(", ") },
        ]);
    }
    t
}
