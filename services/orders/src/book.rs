//! Writing an order: the one place that turns "this order is now in this state" into every write it
//! implies, so queues, indexes, wave figures and the transition stream can never drift from the order
//! records. Every code path that changes an order goes through [`write`].

use std::collections::BTreeMap;

use chipgate_domain::ids::{Sku, WaveId};
use chipgate_domain::orders::{Before, OrderRecord, OrderStatus};
use chipgate_proto::orders::v1 as pb;
use chipgate_runtime::records::{self, Loaded};
use chipgate_runtime::service::Records;
use chipgate_state::{Backend, Txn};
use prost::Message;

use crate::convert::{state_to, transition_event};
use crate::keys::{self, OrderIds};
use crate::{Error, Orders};

/// Entries kept in the watch stream (approximately). The durable history is in each order; the
/// stream only feeds live watchers.
const MAX_EVENTS: u64 = 500;
/// Transitions per stream entry at most: a commit's transitions go in entries of this many, so the
/// stream holds at most ≈ 500 × 20 = 10,000 transitions per product (≈ 2.5 MB) however large the
/// commits. One entry per commit let a wave's 2,000-order commits keep a million transitions per
/// product: 460 bytes of Redis per order after a 100k wave, a quarter of all it used.
const TRANSITIONS_PER_ENTRY: usize = 20;

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
/// entry), the change of each wave's figures and of each buyer's units held (one increment per
/// figure and per buyer, however many orders: a wave's batch of 2,000 orders of 100 buyers writes 100
/// increments, not 2,000).
#[derive(Default)]
pub(crate) struct Events {
    /// The product of the orders written (a transaction stays in one product's partition).
    sku: String,
    transitions: Vec<pb::WatchOrdersResponse>,
    figures: BTreeMap<(String, &'static str), i64>,
    /// Units held, committed or shipped, by buyer ([`keys::allocated`]).
    allocated: BTreeMap<String, i64>,
    traceparent: String,
}

impl Events {
    /// Collects the transitions of work done under `ctx` (its trace goes with them).
    pub(crate) fn traced(ctx: &chipgate_runtime::RequestContext) -> Self {
        Events { traceparent: ctx.traceparent(), ..Events::default() }
    }

    /// Appends the collected transitions and figure changes to `t` (nothing if there are none).
    pub(crate) fn flush(self, t: &mut Txn) {
        // Ids of orders this service wrote: parsed when the orders were placed.
        let sku = Sku::from_trusted(self.sku.as_str());
        for ((wave, field), delta) in self.figures {
            if delta != 0 {
                t.hincr(keys::wave(&sku, &WaveId::from_trusted(wave)), field, delta);
            }
        }
        for (buyer, delta) in self.allocated {
            if delta != 0 {
                t.hincr(keys::allocated(&sku), buyer, delta);
            }
        }
        let mut transitions = self.transitions.into_iter().peekable();
        while transitions.peek().is_some() {
            let items = transitions.by_ref().take(TRANSITIONS_PER_ENTRY).collect();
            let batch = EventBatch { items, traceparent: self.traceparent.clone() };
            t.xadd(
                keys::events(&sku),
                vec![(chipgate_contract::TRANSITIONS_FIELD.to_string(), batch.encode_to_vec())],
                Some(MAX_EVENTS),
            );
        }
    }

    fn figure(&mut self, wave: &str, field: &'static str, delta: i64) {
        *self.figures.entry((wave.to_string(), field)).or_default() += delta;
    }
}

/// Adds to `t` the write of `new` (read at `version`; `old` is what it replaces, as read
/// ([`OrderRecord::before`]), None for a new order)
/// and everything it implies; its new transitions go to `events`.
///
/// Every order written into one transaction is of one product (its partition); the product's
/// registration in `{ord}` ([`keys::products`], [`keys::buyer_products`]) is the placement's own
/// earlier step.
pub(crate) fn write(t: &mut Txn, events: &mut Events, version: u64, old: Option<&Before>, new: &OrderRecord) {
    debug_assert!(events.sku.is_empty() || events.sku == new.sku, "one product per transaction");
    events.sku.clone_from(&new.sku);
    let (sku, buyer) = (new.typed_sku(), new.typed_buyer());
    t.replace(keys::order(&new.typed_id()), version, new.to_stored());
    let score = new.seq as f64;
    let was = old.map(|o| o.status);
    let now = new.status();
    // The buyer's and state's indexes hold the id's number (keys::index_member); the awaiting queue
    // and the cleanup set below hold whole ids.
    let indexed = keys::index_member(&new.typed_id());
    if old.is_none() {
        t.zadd(keys::orders_of(&sku, &buyer), &indexed, score);
    }
    if was != Some(now) {
        if let Some(w) = was {
            t.zrem(keys::orders_in(&sku, w), &indexed);
        }
        t.zadd(keys::orders_in(&sku, now), &indexed, score);
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
        t.sadd(keys::awaiting_buyers(&sku), &new.buyer_id);
    }
    member(t, keys::awaiting(&sku, &buyer), waiting(was), now.is_waiting());
    // The backlog and the orders holding unconfirmed quota are state indexes (keys::backlog,
    // keys::holding): kept above.
    let owed_before = old.is_some_and(|o| o.owed);
    if !new.pending.is_empty() && !owed_before {
        t.sadd(keys::cleanup(&sku), &new.id);
    } else if new.pending.is_empty() && owed_before {
        t.srem(keys::cleanup(&sku), &new.id);
    }
    wave_figures(events, old, new);
    // Units each buyer holds of the product (held, committed or shipped count; an order that gives
    // them back — cancelled, expired, sent back to waiting — holds none), summed per buyer.
    let held = new.held as i64 - old.map(|o| o.held as i64).unwrap_or(0);
    if held != 0 {
        *events.allocated.entry(new.buyer_id.clone()).or_default() += held;
    }
    let seen = old.map(|o| o.steps).unwrap_or(0);
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
fn wave_figures(events: &mut Events, old: Option<&Before>, new: &OrderRecord) {
    let before = old.filter(|o| !o.wave_id.is_empty()).map(|o| (o.wave_id.as_str(), o.status, o.held));
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

impl Orders {
    /// Reads orders as [`write`] stores them ([`OrderRecord::to_stored`]: the history without what the
    /// record repeats), one answer per key.
    pub(crate) async fn load_orders(&self, keys: &[String]) -> Result<Vec<Loaded<OrderRecord>>, Error> {
        let raw = self.store().get(keys).await?;
        Ok(records::decode_each(raw, keys, |_, data| OrderRecord::from_stored(data))?)
    }

    /// Reads one order ([`Orders::load_orders`]).
    pub(crate) async fn load_order(&self, key: String) -> Result<Loaded<OrderRecord>, Error> {
        Ok(self.load_orders(std::slice::from_ref(&key)).await?.pop().flatten())
    }
}
