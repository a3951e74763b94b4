//! Writing an order: the one place that turns "this order is now in this state" into every write it
//! implies, so queues, indexes, wave figures and the transition stream can never drift from the order
//! records. Every code path that changes an order goes through [`write`].

use std::collections::BTreeMap;

use chipgate_domain::orders::{OrderRecord, OrderStatus};
use chipgate_proto::orders::v1 as pb;
use chipgate_state::Txn;
use prost::Message;

use crate::convert::{state_to, transition_event};
use crate::keys;

/// Entries kept in the watch stream (approximately; each holds one commit's transitions). The durable
/// history is in each order; the stream only feeds live watchers.
const MAX_EVENTS: u64 = 500;

/// The transitions of one commit, stored as one stream entry (field `b`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct EventBatch {
    /// Each transition, in commit order.
    #[prost(message, repeated, tag = "1")]
    pub items: Vec<pb::WatchOrdersResponse>,
    /// W3C traceparent of the work that made them (a call, or a reconciliation round continuing the
    /// trace of what caused it).
    #[prost(string, tag = "2")]
    pub traceparent: String,
}

/// Collects what the orders written into one transaction add up to: their transitions (one stream
/// entry) and the change of each wave's figures (one increment per figure, however many orders).
#[derive(Default)]
pub(crate) struct Events {
    /// The product of the orders written (a transaction stays in one product's partition).
    sku: String,
    transitions: Vec<pb::WatchOrdersResponse>,
    figures: BTreeMap<(String, &'static str), i64>,
    traceparent: String,
}

impl Events {
    /// Collects the transitions of work done under `ctx` (its trace goes with them).
    pub(crate) fn traced(ctx: &chipgate_runtime::RequestContext) -> Self {
        Events { traceparent: ctx.traceparent(), ..Events::default() }
    }

    /// Appends the collected transitions and figure changes to `t` (nothing if there are none).
    pub(crate) fn flush(self, t: &mut Txn) {
        for ((wave, field), delta) in self.figures {
            if delta != 0 {
                t.hincr(keys::wave(&self.sku, &wave), field, delta);
            }
        }
        if !self.transitions.is_empty() {
            let batch = EventBatch { items: self.transitions, traceparent: self.traceparent };
            t.xadd(
                keys::events(&self.sku),
                vec![(chipgate_contract::TRANSITIONS_FIELD.to_string(), batch.encode_to_vec())],
                Some(MAX_EVENTS),
            );
        }
    }

    fn figure(&mut self, wave: &str, field: &'static str, delta: i64) {
        *self.figures.entry((wave.to_string(), field)).or_default() += delta;
    }
}

/// Adds to `t` the write of `new` (read at `version`; `old` is what was read, None for a new order)
/// and everything it implies; its new transitions go to `events`.
///
/// Every order written into one transaction is of one product (its partition); the product's
/// registration in `{ord}` ([`keys::products`], [`keys::buyer_products`]) is the placement's own
/// earlier step.
pub(crate) fn write(t: &mut Txn, events: &mut Events, version: u64, old: Option<&OrderRecord>, new: &OrderRecord) {
    debug_assert!(events.sku.is_empty() || events.sku == new.sku, "one product per transaction");
    events.sku.clone_from(&new.sku);
    t.replace(keys::order(&new.id), version, new.encode_to_vec());
    let score = new.seq as f64;
    let was = old.map(OrderRecord::status);
    let now = new.status();
    if old.is_none() {
        t.zadd(keys::orders_of(&new.sku, &new.buyer_id), &new.id, score);
    }
    if was != Some(now) {
        if let Some(w) = was {
            t.zrem(keys::orders_in(&new.sku, w), &new.id);
        }
        t.zadd(keys::orders_in(&new.sku, now), &new.id, score);
    }
    let member = |t: &mut Txn, key: String, before: bool, after: bool| {
        if after && !before {
            t.zadd(key, &new.id, score);
        } else if before && !after {
            t.zrem(key, &new.id);
        }
    };
    let waiting = |s: Option<OrderStatus>| s.is_some_and(OrderStatus::is_waiting);
    if now.is_waiting() && !waiting(was) {
        t.sadd(keys::awaiting_buyers(&new.sku), &new.buyer_id);
    }
    member(t, keys::awaiting(&new.sku, &new.buyer_id), waiting(was), now.is_waiting());
    member(t, keys::backlog(&new.sku), was == Some(OrderStatus::Backordered), now == OrderStatus::Backordered);
    member(
        t,
        keys::holding(&new.sku),
        was.is_some_and(OrderStatus::holds_unconfirmed_quota),
        now.holds_unconfirmed_quota(),
    );
    let owed_before = old.is_some_and(|o| !o.pending.is_empty());
    if !new.pending.is_empty() && !owed_before {
        t.sadd(keys::cleanup(&new.sku), &new.id);
    } else if new.pending.is_empty() && owed_before {
        t.srem(keys::cleanup(&new.sku), &new.id);
    }
    wave_figures(events, old, new);
    crate::allocation_policy::tally(t, old, new);
    let seen = old.map(|o| o.history.len()).unwrap_or(0);
    for step in new.history.iter().skip(seen) {
        events.transitions.push(pb::WatchOrdersResponse {
            order_id: new.id.clone(),
            buyer_id: new.buyer_id.clone(),
            product_sku: new.sku.clone(),
            transition: Some(transition_event(step, new)),
            held_units: new.held,
        });
    }
}

/// Keeps each wave's figures (orders by state, units held) in step with its orders.
fn wave_figures(events: &mut Events, old: Option<&OrderRecord>, new: &OrderRecord) {
    let before = old.filter(|o| !o.wave_id.is_empty()).map(|o| (o.wave_id.as_str(), o.status(), o.held));
    let after = (!new.wave_id.is_empty()).then(|| (new.wave_id.as_str(), new.status(), new.held));
    if before == after {
        return;
    }
    if let Some((w, s, held)) = before {
        events.figure(w, state_to(s).as_str_name(), -1);
        events.figure(w, crate::waves::UNITS_HELD, -(held as i64));
    }
    if let Some((w, s, held)) = after {
        events.figure(w, state_to(s).as_str_name(), 1);
        events.figure(w, crate::waves::UNITS_HELD, held as i64);
    }
}
