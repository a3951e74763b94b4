//! "What if": what publishing a draft wave, or receiving a supply receipt, would do — computed by the
//! very functions the reconciler runs, over the world as it stands, changing nothing.
//!
//! A wave's publication marks its buyers' waiting orders of each product it licenses, and the next
//! round evaluates them oldest first (quota from licensing, stock at once while nobody waits in the
//! backlog and the product's policy allows it), then hands free stock to the backlog as the policy
//! says. The preview plays that round: licensing answers `PreviewWaveQuota` (BatchReserveQuota's own
//! decision with the draft's licences added, its transaction dropped), inventory's hold planner is run
//! here over the stock inventory reports, and [`Evaluation`], [`shares::plan`], [`allocation::drain`]
//! and [`allocation::drain_shared`] decide — the same calls, in the same order, as
//! [`crate::reconcile`] and [`crate::allocation_policy`]. A receipt's preview is the drain alone.
//! With nothing else changing in between, the preview is what then happens (the suite checks it).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chipgate_domain::allocation::{self, Evaluation, HoldAnswer, Move, QuotaAnswer, StockAsk};
use chipgate_domain::ids::{BuyerId, OrderId, Sku};
use chipgate_domain::inventory::{HoldAsk, HoldOutcome, HoldPlanner, HoldRecord, HoldStatus, StockRecord};
use chipgate_domain::orders::{Cause, CauseKind, OrderRecord, OrderStatus};
use chipgate_domain::shares::{self, Policy, SharePlan};
use chipgate_proto::licensing::v1 as lpb;
use chipgate_proto::orders::v1 as pb;
use chipgate_runtime::errors::Violations;
use chipgate_runtime::service::Records;
use chipgate_runtime::time::now_ms;
use chipgate_runtime::{RequestContext, validate};
use chipgate_state::Backend;

use crate::allocation_policy::allocation_to;
use crate::clients::rpc;
use crate::convert::{failure_to, state_to};
use crate::reconcile::{move_error, peer_error};
use crate::{Error, MAX_UNITS, Orders, keys};

/// Orders listed by default, and at most.
const DEFAULT_LISTED: usize = 1000;
const MAX_LISTED: usize = 10_000;
/// Waiting orders one product's wave preview evaluates at most (one PreviewWaveQuota call).
const MAX_EVALUATED: usize = 10_000;

fn listed(v: &mut Violations, max_orders: i32) -> usize {
    match max_orders {
        0 => DEFAULT_LISTED,
        n if n < 0 || n as usize > MAX_LISTED => {
            v.add("max_orders", format!("must be between 0 (default {DEFAULT_LISTED}) and {MAX_LISTED}"));
            0
        }
        n => n as usize,
    }
}

/// Inventory's answers to `asks` as its hold planner gives them over `available` free units, each
/// order holding what it records: what BatchReserve would answer, without asking it.
fn simulate_holds(sku: &str, available: &mut u64, asks: Vec<StockAsk>, now: u64) -> HashMap<String, HoldAnswer> {
    let stock = StockRecord { sku: sku.to_string(), available: *available, received: *available, ..Default::default() };
    let mut planner = HoldPlanner::new(stock, now);
    let mut answers = HashMap::new();
    for a in asks {
        let existing = (a.known_held > 0).then(|| HoldRecord {
            order_id: a.order_id.clone(),
            generation: a.generation,
            sku: sku.to_string(),
            requested: a.units,
            held: a.known_held,
            status: HoldStatus::Held as i32,
            ..Default::default()
        });
        let ask = HoldAsk {
            order_id: OrderId::from_trusted(a.order_id.as_str()),
            generation: a.generation,
            units: a.units,
            allow_partial: true,
            hold_seconds: 0,
            known_held: Some(a.known_held),
            max_units: a.max_units,
        };
        // Same units as recorded: the planner can't refuse them.
        let Ok((outcome, hold)) = planner.plan(&ask, existing.as_ref()) else { continue };
        let held = hold.as_ref().or(existing.as_ref()).map(|h| h.held).unwrap_or(0);
        let answer = match outcome {
            HoldOutcome::Held => HoldAnswer::Held { held, expire_ms: 0 },
            HoldOutcome::Partial => HoldAnswer::Partial { held },
            HoldOutcome::NotServed => HoldAnswer::NotServed,
            HoldOutcome::Stale => HoldAnswer::Stale,
        };
        answers.insert(a.order_id, answer);
    }
    *available = planner.stock.available;
    answers
}

/// A drain of `backlog` (oldest first) with `free` units under `policy`, as the reconciler runs it:
/// inventory serving the backlog in order (FIFO without a cap), or the shared drain. Returns the moves
/// and the plan of how the units are shared.
fn simulate_drain(
    policy: Policy,
    free: u64,
    allocated: &BTreeMap<String, u64>,
    backlog: &[OrderRecord],
    cause_of: impl Fn(&OrderRecord) -> Cause,
    now: u64,
) -> Result<(Vec<Move>, SharePlan), Error> {
    let sku = backlog.first().map(|o| o.sku.clone()).unwrap_or_default();
    let plan = shares::plan(policy, free, allocated, &allocation::waiting(backlog));
    let mut available = free;
    let drained = if policy.planned() {
        let holds = simulate_holds(&sku, &mut available, allocation::shared_asks(backlog, &plan), now);
        allocation::drain_shared(backlog, &holds, &plan, cause_of, now)
    } else {
        let holds = simulate_holds(&sku, &mut available, allocation::drain_asks(backlog), now);
        allocation::drain(backlog, &holds, cause_of, now)
    };
    Ok((drained.map_err(move_error)?.moves, plan))
}

/// One order before and after, as the API shows it.
fn outcome(before: &OrderRecord, after: &OrderRecord) -> pb::OrderOutcome {
    let steps: Vec<String> =
        after.history.iter().skip(before.history.len()).map(|t| t.describe(after)).filter(|d| !d.is_empty()).collect();
    pb::OrderOutcome {
        order_id: after.id.clone(),
        buyer_id: after.buyer_id.clone(),
        product_sku: after.sku.clone(),
        units: after.units,
        state: state_to(before.status()) as i32,
        held_units: before.held,
        next_state: state_to(after.status()) as i32,
        next_held_units: after.held,
        license_id: after.license_id.clone(),
        reasons: after.reasons.iter().map(failure_to).collect(),
        detail: steps.join("; "),
    }
}

/// Per buyer and product, what the listed outcomes add up to.
fn buyer_outcomes(pairs: &[(OrderRecord, OrderRecord)]) -> Vec<pb::BuyerOutcome> {
    let mut by: BTreeMap<(String, String), pb::BuyerOutcome> = BTreeMap::new();
    let mut seen: BTreeMap<(String, String), BTreeSet<(i32, String)>> = BTreeMap::new();
    for (before, after) in pairs {
        let key = (after.buyer_id.clone(), after.sku.clone());
        let b = by.entry(key.clone()).or_insert_with(|| pb::BuyerOutcome {
            buyer_id: after.buyer_id.clone(),
            product_sku: after.sku.clone(),
            ..Default::default()
        });
        b.units_newly_held += after.held.saturating_sub(before.held);
        match after.status() {
            OrderStatus::Reserved => {
                b.orders_eligible += 1;
                b.units_eligible += after.units;
                b.orders_reserved += 1;
                b.units_reserved += after.units;
            }
            OrderStatus::Backordered => {
                b.orders_eligible += 1;
                b.units_eligible += after.units;
                b.orders_backordered += 1;
                b.units_backordered += after.units;
            }
            OrderStatus::Pending | OrderStatus::AwaitingLicense => {
                b.orders_waiting += 1;
                b.units_waiting += after.units;
            }
            OrderStatus::Rejected => b.orders_rejected += 1,
            _ => {}
        }
        let reasons = seen.entry(key).or_default();
        for f in &after.reasons {
            if reasons.insert((f.condition, f.license_id.clone())) {
                b.reasons.push(failure_to(f));
            }
        }
    }
    by.into_values().collect()
}

impl Orders {
    pub(crate) async fn preview_supply(
        &self,
        ctx: &RequestContext,
        req: pb::PreviewSupplyRequest,
    ) -> Result<pb::PreviewSupplyResponse, Error> {
        let mut v = Violations::new();
        let sku = validate::parse::<Sku>(&mut v, "product_sku", req.product_sku.clone());
        validate::units(&mut v, "units", req.units, MAX_UNITS);
        let max = listed(&mut v, req.max_orders);
        let sku = validate::finish(v, sku)?;
        if !self.inner.products.in_catalogue(self.store(), &sku).await? {
            return Err(Error::Status(chipgate_runtime::errors::invalid_argument(
                "product_sku",
                chipgate_contract::catalogue::unknown_product(&sku),
            )));
        }
        let (policy, available, allocated, (_, backlog)) = tokio::try_join!(
            self.allocation_policy(&sku),
            self.free_stock(ctx, &sku),
            self.allocated_by_buyer(&sku),
            self.backlog_orders(&sku, None),
        )?;
        let cause = Cause::new(CauseKind::SupplyReceived, "");
        let (moves, plan) = simulate_drain(
            policy,
            available.saturating_add(req.units),
            &allocated,
            &backlog,
            |_| cause.clone(),
            now_ms(),
        )?;
        let mut orders: Vec<pb::OrderOutcome> = Vec::new();
        let mut served = BTreeSet::new();
        for m in &moves {
            let before = &backlog[m.index];
            if m.order.held > before.held {
                served.insert(m.index);
                orders.push(outcome(before, &m.order));
            }
        }
        let left: Vec<&OrderRecord> = (0..backlog.len()).filter(|i| !served.contains(i)).map(|i| &backlog[i]).collect();
        let truncated = orders.len() > max;
        orders.truncate(max);
        Ok(pb::PreviewSupplyResponse {
            product_sku: sku.to_string(),
            units: req.units,
            available_units: available,
            allocation: Some(allocation_to(&sku, &plan)),
            orders,
            orders_truncated: truncated,
            orders_left_waiting: left.len() as u64,
            units_left_waiting: left.iter().map(|o| o.units - o.held).sum(),
        })
    }

    pub(crate) async fn preview_wave(
        &self,
        ctx: &RequestContext,
        req: pb::PreviewWaveRequest,
    ) -> Result<pb::PreviewWaveResponse, Error> {
        let mut v = Violations::new();
        validate::id(&mut v, "wave_id", &req.wave_id);
        let max = listed(&mut v, req.max_orders);
        v.check_violations()?;
        let msg = lpb::PreviewWaveQuotaRequest {
            wave_id: req.wave_id.clone(),
            product_sku: String::new(),
            items: Vec::new(),
        };
        let licenses = rpc!(ctx, self.inner.peers.licensing, preview_wave_quota, msg).map_err(peer_error)?.licenses;
        // Which buyers' waiting orders of which product the publication will mark (as the consumer does).
        let mut marked: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for l in &licenses {
            marked.entry(l.product_sku.clone()).or_default().insert(l.buyer_id.clone());
        }
        let mut pairs: Vec<(OrderRecord, OrderRecord)> = Vec::new();
        let mut allocations = Vec::new();
        for (sku, buyers) in &marked {
            // Licensing's draft: ids it parsed on entry.
            let (product_pairs, plan) =
                self.preview_product(ctx, &req.wave_id, &Sku::from_trusted(sku.as_str()), buyers).await?;
            pairs.extend(product_pairs);
            allocations.extend(plan.map(|p| allocation_to(sku, &p)));
        }
        pairs.sort_by_key(|(_, after)| after.seq);
        let buyers = buyer_outcomes(&pairs);
        let mut orders: Vec<pb::OrderOutcome> = pairs.iter().map(|(b, a)| outcome(b, a)).collect();
        let truncated = orders.len() > max;
        orders.truncate(max);
        Ok(pb::PreviewWaveResponse {
            wave_id: req.wave_id,
            licenses,
            buyers,
            orders,
            orders_truncated: truncated,
            allocations,
        })
    }

    /// One product's part of a wave preview: its marked buyers' waiting orders evaluated, then the
    /// backlog drained if any of them joined it. Returns every evaluated order and every backlog order
    /// that would take stock (before, after), and how the drain would share the stock.
    async fn preview_product(
        &self,
        ctx: &RequestContext,
        wave_id: &str,
        sku: &Sku,
        buyers: &BTreeSet<String>,
    ) -> Result<(Vec<(OrderRecord, OrderRecord)>, Option<SharePlan>), Error> {
        let queues = futures_util::future::try_join_all(buyers.iter().map(|b| {
            let key = keys::awaiting(sku, &BuyerId::from_trusted(b.as_str()));
            async move { self.store().zrange(&key, 0, -1, false).await }
        }))
        .await?;
        let mut queue: Vec<(u64, String)> = queues.into_iter().flatten().map(|(id, s)| (s as u64, id)).collect();
        queue.sort();
        if queue.len() > MAX_EVALUATED {
            return Err(Error::precondition(
                "PREVIEW_TOO_LARGE",
                wave_id,
                format!(
                    "{} orders of {sku} wait for the wave's buyers; a preview evaluates at most {MAX_EVALUATED}",
                    queue.len()
                ),
            ));
        }
        // The queues list ids this service handed out.
        let order_keys: Vec<String> =
            queue.iter().map(|(_, id)| keys::order(&OrderId::from_trusted(id.as_str()))).collect();
        let (loaded, policy, available, allocated, (_, backlog)) = tokio::try_join!(
            self.load_orders(&order_keys),
            self.allocation_policy(sku),
            self.free_stock(ctx, sku),
            self.allocated_by_buyer(sku),
            self.backlog_orders(sku, None),
        )?;
        let waiting: Vec<OrderRecord> =
            loaded.into_iter().flatten().map(|(_, o)| o).filter(|o| o.status().is_waiting()).collect();
        let now = now_ms();

        // The evaluation, as `evaluate_awaiting` runs it.
        let evaluation = Evaluation::new(backlog.is_empty() && !policy.planned());
        let asks = evaluation.quota_asks(&waiting);
        let quota: HashMap<String, QuotaAnswer> = if asks.is_empty() {
            HashMap::new()
        } else {
            let msg = lpb::PreviewWaveQuotaRequest {
                wave_id: wave_id.to_string(),
                product_sku: sku.to_string(),
                items: asks.into_iter().map(crate::convert::quota_item).collect(),
            };
            let resp = rpc!(ctx, self.inner.peers.licensing, preview_wave_quota, msg).map_err(peer_error)?;
            resp.results.into_iter().map(|r| (r.order_id.clone(), crate::convert::quota_answer(r))).collect()
        };
        let mut free = available;
        let holds = simulate_holds(sku, &mut free, evaluation.stock_asks(&waiting, &quota), now);
        let wave_cause = Cause::new(CauseKind::WavePublished, wave_id);
        let cause_of = |o: &OrderRecord| {
            if o.status() == OrderStatus::Pending { Cause::new(CauseKind::Placed, &o.id) } else { wave_cause.clone() }
        };
        let plan = evaluation.decide(&waiting, &quota, &holds, cause_of, now).map_err(move_error)?;
        let mut after: Vec<OrderRecord> = waiting.clone();
        for m in &plan.moves {
            after[m.index] = m.order.clone();
        }

        // The drain that follows when orders joined the backlog: the backlog as it stands and the
        // newcomers, oldest first, sharing what the evaluation left.
        let mut shared = None;
        if !plan.backlogged.is_empty() {
            let mut drained_backlog: Vec<OrderRecord> = backlog.clone();
            drained_backlog.extend(after.iter().filter(|o| o.status() == OrderStatus::Backordered).cloned());
            drained_backlog.sort_by_key(|o| o.seq);
            let mut held = allocated.clone();
            for (b, a) in waiting.iter().zip(&after) {
                *held.entry(a.buyer_id.clone()).or_default() += a.held.saturating_sub(b.held);
            }
            let entered: HashMap<String, Cause> = plan.backlogged.iter().cloned().collect();
            let drain_cause = Cause::new(CauseKind::Reconciled, "");
            let (moves, share_plan) = simulate_drain(
                policy,
                free,
                &held,
                &drained_backlog,
                |o| entered.get(&o.id).cloned().unwrap_or_else(|| drain_cause.clone()),
                now,
            )?;
            let position: HashMap<String, usize> = after.iter().enumerate().map(|(i, o)| (o.id.clone(), i)).collect();
            let mut pairs: Vec<(OrderRecord, OrderRecord)> = Vec::new();
            for m in moves {
                match position.get(&m.order.id) {
                    Some(&i) => after[i] = m.order,
                    None => {
                        let before = drained_backlog[m.index].clone();
                        pairs.push((before, m.order));
                    }
                }
            }
            pairs.extend(waiting.into_iter().zip(after));
            shared = Some(share_plan);
            return Ok((pairs, shared));
        }
        Ok((waiting.into_iter().zip(after).collect(), shared))
    }
}
