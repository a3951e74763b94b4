//! Allocation policies: how a product's stock is shared among the buyers waiting in its backlog.
//!
//! The vendor sets a product's policy (`SetAllocationPolicy`): FIFO (the default, and what the
//! backlog drain in [`crate::reconcile`] does without any plan — inventory serves the backlog strictly
//! in order), PRO_RATA, and optionally a per-buyer cap. The decision is the domain's
//! ([`chipgate_domain::shares::plan`]); this module stores the policy with its latest changes (who, when,
//! why, under the request id that made it), keeps the units each buyer holds of each product (a hash
//! [`keys::allocated`] written with every order change by [`tally`], what caps and the metrics read),
//! and drives a *shared drain*: read the whole backlog, the free stock and the holdings, plan, ask
//! inventory for exactly each order's share (a per-order `max_units`, in backlog order), and commit
//! the moves, each explained in the order's history by the plan's figures.
//!
//! Every key here belongs to one product (the policy, the holdings), so every transaction stays in
//! one product's partition.

use std::collections::{BTreeMap, HashMap};

use chipgate_domain::allocation;
use chipgate_domain::ids::Sku;
use chipgate_domain::orders::{Cause, CauseKind, OrderRecord, OrderStatus};
use chipgate_domain::shares::{self, Policy, PolicyChange, PolicyRecord, SharePlan, Strategy};
use chipgate_proto::inventory::v1 as ipb;
use chipgate_proto::orders::v1 as pb;
use chipgate_runtime::errors::Violations;
use chipgate_runtime::service::Records;
use chipgate_runtime::time::{now_ms, ts_opt};
use chipgate_runtime::txn::IdemKey;
use chipgate_runtime::{RequestContext, validate};
use chipgate_state::{Backend, CommitError, Txn};
use prost::Message;

use crate::clients::rpc;
use crate::reconcile::{BATCH_ATTEMPTS, Lease, commit_error, move_error, peer_error};
use crate::{Error, Orders, book, convert, keys};

/// Backlog entries read at a time ([`Orders::backlog_orders`]): about 2 ms of Redis each.
const BACKLOG_PAGE: usize = 5_000;

/// API strategy → domain (None for UNSPECIFIED).
fn strategy_from(s: pb::AllocationStrategy) -> Option<Strategy> {
    match s {
        pb::AllocationStrategy::Unspecified => None,
        pb::AllocationStrategy::Fifo => Some(Strategy::Fifo),
        pb::AllocationStrategy::ProRata => Some(Strategy::ProRata),
    }
}

/// Domain strategy → API.
pub(crate) fn strategy_to(s: Strategy) -> pb::AllocationStrategy {
    match s {
        Strategy::Unspecified | Strategy::Fifo => pb::AllocationStrategy::Fifo,
        Strategy::ProRata => pb::AllocationStrategy::ProRata,
    }
}

/// A policy as the API shows it.
pub(crate) fn policy_to(sku: &str, p: Policy) -> pb::AllocationPolicy {
    pb::AllocationPolicy {
        product_sku: sku.to_string(),
        strategy: strategy_to(p.strategy) as i32,
        max_share_percent: p.max_share_percent,
    }
}

fn change_to(sku: &str, c: &PolicyChange) -> pb::AllocationPolicyChange {
    pb::AllocationPolicyChange {
        policy: Some(policy_to(sku, Policy { strategy: c.strategy(), max_share_percent: c.max_share_percent })),
        revision: c.revision,
        change_time: ts_opt(c.at_ms),
        changed_by: c.by.clone(),
        reason: c.reason.clone(),
        request_id: c.request_id.clone(),
    }
}

/// How a plan shares stock, as the API shows it.
pub(crate) fn allocation_to(sku: &str, plan: &SharePlan) -> pb::StockAllocation {
    pb::StockAllocation {
        product_sku: sku.to_string(),
        policy: Some(policy_to(sku, plan.policy)),
        free_units: plan.free,
        allocated_units: plan.allocated,
        left_units: plan.left(),
        buyers: plan
            .buyers
            .iter()
            .map(|b| pb::BuyerShare {
                buyer_id: b.buyer_id.clone(),
                orders_waiting: b.orders,
                units_waiting: b.waiting_units,
                allocated_units: b.allocated_before,
                units: b.units,
                capped: b.capped,
            })
            .collect(),
    }
}

/// A `SetAllocationPolicy` call, validated at the edge (every bad field at once).
struct NewPolicy {
    sku: Sku,
    policy: Policy,
    reason: String,
}

impl TryFrom<&pb::SetAllocationPolicyRequest> for NewPolicy {
    type Error = Violations;

    fn try_from(req: &pb::SetAllocationPolicyRequest) -> Result<Self, Violations> {
        let mut v = Violations::new();
        validate::request_id(&mut v, &req.request_id);
        let sku = validate::parse::<Sku>(&mut v, "product_sku", req.product_sku.clone());
        let strategy = strategy_from(req.strategy());
        if strategy.is_none() {
            v.add("strategy", "must be ALLOCATION_STRATEGY_FIFO or ALLOCATION_STRATEGY_PRO_RATA");
        }
        if req.max_share_percent > 100 {
            v.add("max_share_percent", format!("{} is not a percentage (0: no cap, up to 100)", req.max_share_percent));
        }
        validate::text(&mut v, "reason", &req.reason, validate::MAX_TEXT_LEN, false);
        let sku = validate::finish(v, sku)?;
        Ok(NewPolicy {
            sku,
            policy: Policy { strategy: strategy.unwrap_or(Strategy::Fifo), max_share_percent: req.max_share_percent },
            reason: req.reason.clone(),
        })
    }
}

impl Orders {
    /// The allocation policy in force for `sku` (FIFO without a cap when never set).
    pub(crate) async fn allocation_policy(&self, sku: &Sku) -> Result<Policy, Error> {
        Ok(self.load::<PolicyRecord>(keys::allocation_policy(sku)).await?.map(|(_, r)| r.policy()).unwrap_or_default())
    }

    /// Units of `sku` each buyer holds (held, committed, shipped).
    pub(crate) async fn allocated_by_buyer(&self, sku: &Sku) -> Result<BTreeMap<String, u64>, Error> {
        let raw = self.store().hgetall(&keys::allocated(sku)).await?;
        let mut out = BTreeMap::new();
        for (buyer, v) in raw {
            let n: i64 = std::str::from_utf8(&v)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| Error::Internal(format!("allocated units of {buyer} for {sku} are not a number")))?;
            if n > 0 {
                out.insert(buyer, n as u64);
            }
        }
        Ok(out)
    }

    /// Every order of `sku`'s backlog, oldest first, with the version it was read at.
    ///
    /// The backlog is read [`BACKLOG_PAGE`] entries at a time, each page after the last placement
    /// number read: one read of the whole of it kept Redis from everyone else for 90 ms at a
    /// million-order wave (666,000 backordered). Only a pass under the product's lease adds to the
    /// backlog (this one), and an order leaving it between two pages (a cancel) is simply not read.
    ///
    /// A drain reads it under the product's `lease`, kept between reads: at a million waiting orders
    /// the read takes longer than the lease lives, and a lease lost there cut the drain short after
    /// the evaluation had filled the backlog.
    pub(crate) async fn backlog_orders(
        &self,
        sku: &Sku,
        mut lease: Option<&mut Lease>,
    ) -> Result<(Vec<u64>, Vec<OrderRecord>), Error> {
        let key = keys::backlog(sku);
        let mut ids = Vec::new();
        let mut after = std::ops::Bound::Unbounded;
        loop {
            if let Some(lease) = lease.as_deref_mut() {
                self.keep(lease).await?;
            }
            let page = self.store().zrange_by_score(&key, after, std::ops::Bound::Unbounded, BACKLOG_PAGE).await?;
            let full = page.len() >= BACKLOG_PAGE;
            // Placement numbers are distinct within a product: the next page starts after this one.
            if let Some((_, last)) = page.last() {
                after = std::ops::Bound::Excluded(*last);
            }
            ids.extend(page);
            if !full {
                break;
            }
        }
        let mut versions = Vec::with_capacity(ids.len());
        let mut orders = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(self.options().chunk.max(1)) {
            if let Some(lease) = lease.as_deref_mut() {
                self.keep(lease).await?;
            }
            let order_keys: Vec<String> =
                chunk.iter().map(|(m, _)| keys::order(&keys::indexed_order(sku, m))).collect();
            for (v, o) in self.load_orders(&order_keys).await?.into_iter().flatten() {
                if o.status() == OrderStatus::Backordered {
                    versions.push(v);
                    orders.push(o);
                }
            }
        }
        Ok((versions, orders))
    }

    /// Units of `sku` free to hold, as inventory counts them.
    pub(crate) async fn free_stock(&self, ctx: &RequestContext, sku: &str) -> Result<u64, Error> {
        Ok(self.stock_of(ctx, sku).await?.available)
    }

    /// The stock of `sku`, as inventory counts it.
    async fn stock_of(&self, ctx: &RequestContext, sku: &str) -> Result<ipb::Stock, Error> {
        let msg = ipb::GetStockRequest { product_sku: sku.to_string() };
        let resp = rpc!(ctx, self.inner.peers.inventory, get_stock, msg).map_err(peer_error)?;
        Ok(resp.stock.unwrap_or_default())
    }

    /// Gives back what inventory holds for `orders` beyond what each records (holds taken by an attempt
    /// whose commit was lost, or by a pass cut short): each is asked for no more than it knows it holds.
    async fn reclaim(&self, ctx: &RequestContext, lease: &Lease, orders: &[&OrderRecord]) -> Result<(), Error> {
        for chunk in orders.chunks(self.options().chunk.max(1)) {
            let asks = chunk
                .iter()
                .map(|o| allocation::StockAsk {
                    order_id: o.id.clone(),
                    generation: o.generation,
                    units: o.units,
                    known_held: o.held,
                    max_units: Some(o.held),
                })
                .collect();
            self.reserve_shares(ctx, lease, asks).await?;
        }
        Ok(())
    }

    pub(crate) async fn set_allocation_policy(
        &self,
        ctx: &RequestContext,
        req: pb::SetAllocationPolicyRequest,
    ) -> Result<pb::SetAllocationPolicyResponse, Error> {
        let new = NewPolicy::try_from(&req)?;
        if !self.inner.products.in_catalogue(self.store(), &new.sku).await? {
            return Err(Error::Status(chipgate_runtime::errors::invalid_argument(
                "product_sku",
                chipgate_contract::catalogue::unknown_product(&new.sku),
            )));
        }
        // The answer is kept with the policy in the product's partition (one slot for the change, its
        // drain mark and the answer).
        let idem = IdemKey::new(&self.inner.idem, "SetAllocationPolicy", &req.request_id, &req)
            .in_partition(keys::part(&new.sku));
        let (answer, _) = self
            .run_txn(Some(&idem), || async {
                let loaded = self.load::<PolicyRecord>(keys::allocation_policy(&new.sku)).await?;
                let ver = loaded.as_ref().map(|(v, _)| *v).unwrap_or(0);
                let mut record = loaded
                    .map(|(_, r)| r)
                    .unwrap_or_else(|| PolicyRecord { sku: new.sku.to_string(), changes: Vec::new() });
                let mut t = Txn::new();
                if record.current().is_none() || record.policy() != new.policy {
                    record.change(new.policy, now_ms(), &ctx.actor, &new.reason, &req.request_id);
                    t.replace(keys::allocation_policy(&new.sku), ver, record.encode_to_vec());
                    // Stock the old policy held back (a cap) may go now: the next pass drains.
                    crate::marks::drain(
                        &mut t,
                        &new.sku,
                        &Cause::new(CauseKind::AllocationPolicy, &new.sku),
                        &ctx.traceparent(),
                    );
                }
                let change = record.current().map(|c| change_to(&new.sku, c));
                let policy = Some(policy_to(&new.sku, record.policy()));
                Ok((t, pb::SetAllocationPolicyResponse { policy, change }))
            })
            .await?;
        tracing::info!(
            sku = %new.sku,
            policy = %new.policy.describe(),
            by = %ctx.actor,
            reason = %new.reason,
            revision = answer.change.as_ref().map(|c| c.revision).unwrap_or(0),
            "allocation policy set"
        );
        self.inner.scheduler.request(&new.sku);
        Ok(answer)
    }

    pub(crate) async fn get_allocation_policy(
        &self,
        req: pb::GetAllocationPolicyRequest,
    ) -> Result<pb::GetAllocationPolicyResponse, Error> {
        let mut v = Violations::new();
        let sku = validate::parse::<Sku>(&mut v, "product_sku", req.product_sku);
        let sku = validate::finish(v, sku)?;
        let record = self.load::<PolicyRecord>(keys::allocation_policy(&sku)).await?.map(|(_, r)| r);
        let policy = record.as_ref().map(PolicyRecord::policy).unwrap_or_default();
        let held = self.allocated_by_buyer(&sku).await?;
        let total: u64 = held.values().sum();
        let mut allocations: Vec<pb::BuyerAllocation> = held
            .into_iter()
            .map(|(buyer_id, units)| pb::BuyerAllocation {
                buyer_id,
                allocated_units: units,
                share_bps: u32::try_from(u128::from(units) * 10_000 / u128::from(total.max(1))).unwrap_or(10_000),
            })
            .collect();
        allocations.sort_by(|a, b| b.allocated_units.cmp(&a.allocated_units).then(a.buyer_id.cmp(&b.buyer_id)));
        Ok(pb::GetAllocationPolicyResponse {
            policy: Some(policy_to(&sku, policy)),
            changes: record.iter().flat_map(|r| r.changes.iter()).map(|c| change_to(&sku, c)).collect(),
            allocations,
            allocated_units: total,
        })
    }

    /// Free stock to the backlog as the product's policy shares it: the whole backlog, the free units
    /// and what each buyer holds are read, [`shares::plan`] decides, each order that gets units asks
    /// inventory for exactly its share (in backlog order, batches of `chunk`), and
    /// [`allocation::drain_shared`]'s moves are committed under the lease. A batch that loses to a
    /// concurrent change (an order cancelled meanwhile) is planned again from fresh reads; inventory
    /// gives back what the lost attempt held (its asks say what each order knows it holds). Units that
    /// came free during the drain beyond what the plan left (holds an earlier attempt left behind) are
    /// shared by another plan.
    pub(crate) async fn drain_shared(
        &self,
        ctx: &RequestContext,
        lease: &mut Lease,
        policy: Policy,
        cause: &Cause,
        entered: &HashMap<String, Cause>,
    ) -> Result<(), Error> {
        let sku = lease.sku.clone();
        let mut lost = false;
        for _attempt in 0..BATCH_ATTEMPTS {
            self.keep(lease).await?;
            let began = std::time::Instant::now();
            let (versions, orders) = self.backlog_orders(&sku, Some(lease)).await?;
            let loaded = began.elapsed();
            if orders.is_empty() {
                return Ok(());
            }
            let (mut stock, allocated) = tokio::try_join!(self.stock_of(ctx, &sku), self.allocated_by_buyer(&sku))?;
            // Inventory holds more than the orders record (an attempt whose commit was lost, a pass
            // cut short, or releases the cleanup worker has yet to carry out): what the backlog's
            // orders never recorded goes back before the stock is shared, or it would sit held.
            let recorded: u64 = allocated.values().sum();
            let reclaimed = lost || stock.held + stock.committed + stock.shipped > recorded;
            if reclaimed {
                self.reclaim(ctx, lease, &orders.iter().collect::<Vec<_>>()).await?;
                stock = self.stock_of(ctx, &sku).await?;
            }
            let free = stock.available;
            let plan = shares::plan(policy, free, &allocated, &allocation::waiting(&orders));
            let planned = began.elapsed();
            if plan.grants.is_empty() {
                return Ok(());
            }
            tracing::debug!(
                %sku,
                policy = %policy.describe(),
                free,
                allocated = plan.allocated,
                buyers = plan.buyers.len(),
                orders = plan.grants.len(),
                backlog = orders.len(),
                reclaimed,
                load_ms = loaded.as_millis() as u64,
                plan_ms = (planned - loaded).as_millis() as u64,
                "sharing free stock"
            );
            // Only the orders that get units are asked for, in backlog order.
            let served: Vec<usize> = (0..orders.len()).filter(|&i| plan.units_for(&orders[i].id) > 0).collect();
            lost = false;
            let mut available_after = None;
            // `batches` asks for a size only when it cuts a batch: each is counted as it is cut.
            let size = || {
                let n = self.batch_size(&sku);
                self.count_batch(&sku, n);
                n
            };
            for batch in crate::reconcile::batches(&served, size) {
                self.keep(lease).await?;
                let loaded: Vec<OrderRecord> = batch.iter().map(|&i| orders[i].clone()).collect();
                let (holds, after) = self.reserve_shares(ctx, lease, allocation::shared_asks(&loaded, &plan)).await?;
                available_after = after.or(available_after);
                let cause_of = |o: &OrderRecord| entered.get(&o.id).cloned().unwrap_or_else(|| cause.clone());
                let drained =
                    allocation::drain_shared(&loaded, &holds, &plan, cause_of, now_ms()).map_err(move_error)?;
                let mut t = Txn::new();
                let mut events = book::Events::traced(ctx);
                t.expect_lease(keys::lease(&sku), lease.token);
                for m in &drained.moves {
                    let i = batch[m.index];
                    book::write(&mut t, &mut events, versions[i], Some(&m.before), &m.order);
                }
                for buyer in &drained.re_evaluate {
                    tracing::warn!(%buyer, %sku, "a backordered order's stock hold was lost; re-evaluating it");
                    crate::marks::awaiting(
                        &mut t,
                        &sku,
                        crate::marks::Who::Buyer(buyer),
                        &Cause::new(CauseKind::Reconciled, ""),
                        &ctx.traceparent(),
                    );
                }
                events.flush(&mut t);
                match self.store().commit(&t).await {
                    Ok(_) => self.inner.answers.committed(drained.moves.iter().map(|m| &m.order)),
                    Err(CommitError::Conflict { .. }) => {
                        lost = true;
                        break;
                    }
                    Err(e) => return Err(commit_error(e)),
                }
            }
            tracing::debug!(%sku, lost, carry_out_ms = (began.elapsed() - planned).as_millis() as u64, "shared");
            if !lost && available_after.is_none_or(|a| a <= plan.left()) {
                return Ok(());
            }
        }
        // Stock that keeps coming free is shared by the next round (its arrival marked the product);
        // batches that keep losing are contention.
        if lost { Err(Error::Contention { attempts: BATCH_ATTEMPTS }) } else { Ok(()) }
    }

    /// Inventory's answers to the asks of a shared drain, and the units free after them.
    async fn reserve_shares(
        &self,
        ctx: &RequestContext,
        lease: &Lease,
        asks: Vec<allocation::StockAsk>,
    ) -> Result<(HashMap<String, allocation::HoldAnswer>, Option<u64>), Error> {
        if asks.is_empty() {
            return Ok((HashMap::new(), None));
        }
        let hold_seconds = self.options().hold_seconds;
        let msg = ipb::BatchReserveRequest {
            request_id: String::new(),
            product_sku: lease.sku.to_string(),
            items: asks.into_iter().map(|a| convert::reserve_item(a, hold_seconds)).collect(),
            fence_token: lease.token,
        };
        let resp = rpc!(ctx, self.inner.peers.inventory, batch_reserve, msg).map_err(peer_error)?;
        let answers = resp.results.iter().map(|r| (r.order_id.clone(), convert::hold_answer(r))).collect();
        Ok((answers, resp.stock.map(|s| s.available)))
    }
}

#[cfg(test)]
mod tests {
    use chipgate_domain::ids::Sku;
    use chipgate_domain::orders::{OrderRecord, OrderStatus};
    use chipgate_state::{Backend, Store, Txn};

    use crate::keys::OrderIds;
    use crate::{book, keys};

    /// A backlog longer than a page is read whole, oldest first, without an order that left it
    /// (or is no longer backordered) and without reading an order twice.
    #[tokio::test]
    async fn the_backlog_is_read_page_by_page_oldest_first() {
        let store = Store::memory();
        let (svc, shutdown) = crate::test_service(store.clone(), crate::Options::default());
        let sku = Sku::from_trusted("H200");
        let n = 2 * super::BACKLOG_PAGE as u64 + 7;
        let mut t = Txn::new();
        let mut events = book::Events::default();
        for seq in 1..=n {
            let order = OrderRecord {
                id: keys::order_id(&sku, seq).into_string(),
                buyer_id: format!("buyer-{}", seq % 7),
                sku: sku.to_string(),
                units: 1,
                // One order in a thousand left the backlog's state without leaving the index yet.
                status: if seq % 1000 == 0 { OrderStatus::Reserved } else { OrderStatus::Backordered } as i32,
                generation: 1,
                seq,
                ..Default::default()
            };
            book::write(&mut t, &mut events, 0, None, &order);
            if seq % 1000 == 0 {
                // Listed in the backlog, but not backordered: a reader must leave it out.
                t.zadd(keys::backlog(&sku), keys::index_member(&order.typed_id()), seq as f64);
            }
        }
        store.commit(&t).await.unwrap();
        assert_eq!(store.zcard(&keys::backlog(&sku)).await.unwrap(), n);
        let (versions, orders) = svc.backlog_orders(&sku, None).await.unwrap();
        let seqs: Vec<u64> = orders.iter().map(|o| o.seq).collect();
        let want: Vec<u64> = (1..=n).filter(|s| s % 1000 != 0).collect();
        assert_eq!(seqs, want, "every backordered order once, oldest first");
        assert_eq!(versions.len(), orders.len());
        shutdown.trigger();
    }
}
