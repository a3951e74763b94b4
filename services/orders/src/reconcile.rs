//! The reconciler: moves orders when the world changes, product by product, in placement order.
//!
//! A *pass* over a product runs under the product's lease (one pass cluster-wide at a time) and:
//! 1. takes the product's dirty marks ([`crate::marks`]);
//! 2. re-checks orders holding quota whose licence or product gate may have closed, and sends them back
//!    to waiting (their quota and holds are released by the cleanup worker);
//! 3. re-evaluates waiting orders, oldest first, in batches of quota calls: eligible orders take quota
//!    and join the backlog, orders that can never be served are rejected, the rest keep waiting with
//!    their reasons — and once a buyer's order waits for quota, that buyer's later orders wait behind it;
//! 4. hands free stock to the backlog, oldest first, in batches of hold calls, stopping at the first
//!    order that can't be fully served (it keeps what it got and waits for the rest).
//!
//! Quota and hold calls carry the lease's fencing token, and every commit is guarded by the lease and
//! the orders' versions: a replica that stalled past its lease can neither take stock out of order nor
//! overwrite newer decisions. Every call is idempotent per (order, generation), so a pass cut short
//! anywhere is simply redone by the next one.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chipgate_domain::licensing::{Condition, Failure};
use chipgate_domain::orders::{Cause, CauseKind, OrderRecord, OrderStatus};
use chipgate_proto::inventory::v1 as ipb;
use chipgate_proto::licensing::v1 as lpb;
use chipgate_runtime::time::{ms_of, now_ms};
use chipgate_runtime::{RequestContext, Shutdown, telemetry};
use chipgate_state::{Backend, CommitError, Txn};
use futures_util::future::try_join_all;
use tokio::sync::{Notify, watch};
use tonic::Code;
use tracing::Instrument;

use crate::clients::rpc;
use crate::convert::failure_from;
use crate::marks::Marks;
use crate::{Error, Orders, book, keys};

/// Attempts at one batch when concurrent changes to its orders keep winning.
const BATCH_ATTEMPTS: u32 = 8;
/// Other traces a round links to at most (each further cause of the same round is only counted).
const MAX_LINKS: usize = 16;

/// Passes started and completed on one product by this replica.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Progress {
    pub started: u64,
    pub completed: u64,
}

/// Which products want a pass, and how far passes have got (for placement to wait on).
#[derive(Default)]
pub(crate) struct Scheduler {
    wanted: Mutex<HashSet<String>>,
    running: Mutex<HashSet<String>>,
    progress: Mutex<HashMap<String, watch::Sender<Progress>>>,
    wake: Notify,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl Scheduler {
    /// Asks for a pass over `sku` soon.
    pub(crate) fn request(&self, sku: &str) {
        lock(&self.wanted).insert(sku.to_string());
        self.wake.notify_one();
    }

    fn sender(&self, sku: &str) -> watch::Sender<Progress> {
        lock(&self.progress).entry(sku.to_string()).or_insert_with(|| watch::channel(Progress::default()).0).clone()
    }

    /// Pass progress on `sku`.
    pub(crate) fn progress(&self, sku: &str) -> watch::Receiver<Progress> {
        self.sender(sku).subscribe()
    }

    fn take_wanted(&self) -> HashSet<String> {
        std::mem::take(&mut *lock(&self.wanted))
    }

    fn still_wanted(&self, sku: &str) -> bool {
        lock(&self.wanted).remove(sku)
    }
}

/// Removes a product from the running set when its task ends, however it ends.
struct Running<'a> {
    svc: &'a Orders,
    sku: String,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        lock(&self.svc.inner.scheduler.running).remove(&self.sku);
    }
}

/// Schedules passes until shutdown: on request, and on a tick for marks left by other replicas.
pub(crate) async fn run(svc: Orders, shutdown: Shutdown) {
    let tick = svc.options().tick;
    let full_every = svc.options().full_reconcile_every;
    let mut last_full = Instant::now();
    let mut last_scan = Instant::now();
    loop {
        tokio::select! {
            () = shutdown.wait() => return,
            () = svc.inner.scheduler.wake.notified() => {}
            () = tokio::time::sleep(tick) => {}
        }
        let mut todo = svc.inner.scheduler.take_wanted();
        // Local requests need no look at the store; marks left by other replicas (or by a replica
        // that died) are found by a scan once per tick.
        if last_scan.elapsed() >= tick {
            last_scan = Instant::now();
            match svc.dirty_products(!full_every.is_zero() && last_full.elapsed() >= full_every).await {
                Ok((dirty, full)) => {
                    if full {
                        last_full = Instant::now();
                    }
                    todo.extend(dirty);
                }
                Err(e) => tracing::warn!(error = ?e, "can't read dirty marks; retrying next tick"),
            }
        }
        for sku in todo {
            let start = lock(&svc.inner.scheduler.running).insert(sku.clone());
            if start {
                let svc = svc.clone();
                let shutdown = shutdown.clone();
                tokio::spawn(async move { svc.run_product(sku, shutdown).await });
            } else {
                // A pass is running; make it go round once more.
                lock(&svc.inner.scheduler.wanted).insert(sku);
            }
        }
    }
}

/// What evaluating waiting orders carries from one batch to the next.
struct StageA<'a> {
    /// Why each buyer's orders are being looked at.
    causes: &'a HashMap<String, Vec<Cause>>,
    /// Waves whose snapshot of this product may still hold orders (each evaluated order leaves them).
    unsettled: &'a [String],
    /// Buyers with an order waiting for quota, and which: their later orders wait behind it.
    blocked: HashMap<String, String>,
    /// Whether orders that take quota may take stock at once (nobody waits ahead in the backlog).
    inline: bool,
}

/// The lease a pass runs under.
struct Lease {
    sku: String,
    token: u64,
    renewed: Instant,
}

impl Orders {
    /// Products with marks, and (every `full_reconcile_every`) every product marked for a full look.
    async fn dirty_products(&self, full: bool) -> Result<(Vec<String>, bool), Error> {
        let products = self.store().smembers(&keys::products()).await?;
        if full && !products.is_empty() {
            let cause = Cause::new(CauseKind::Reconciled, "");
            let tp = RequestContext::background("full-reconcile", None).traceparent();
            let mut t = Txn::new();
            for sku in &products {
                crate::marks::awaiting(&mut t, sku, crate::marks::Who::All, &cause, &tp);
                crate::marks::holders(&mut t, sku, crate::marks::Who::All, &cause, &tp);
                crate::marks::drain(&mut t, sku, &cause, &tp);
            }
            self.store().commit(&t).await.map_err(|e| Error::Internal(e.to_string()))?;
            return Ok((products, true));
        }
        let busy = try_join_all(products.iter().map(|sku| async move {
            let (dirty_key, working_key) = (keys::dirty(sku), keys::working(sku));
            let (d, w) = tokio::try_join!(self.store().hgetall(&dirty_key), self.store().hgetall(&working_key))?;
            Ok::<bool, chipgate_state::StateError>(!d.is_empty() || !w.is_empty())
        }))
        .await?;
        Ok((products.into_iter().zip(busy).filter(|(_, b)| *b).map(|(s, _)| s).collect(), false))
    }

    async fn run_product(&self, sku: String, shutdown: Shutdown) {
        let _running = Running { svc: self, sku: sku.clone() };
        let ttl = self.options().lease_ttl;
        let token = loop {
            match self.store().lease_acquire(&keys::lease(&sku), &keys::lease_counter(&sku), ttl).await {
                Ok(Some(t)) => break t,
                Ok(None) => {
                    // Another replica is working on this product; try again shortly (our own waiters
                    // need a pass of ours to finish, which will find the work done).
                    if shutdown.is_triggered() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(5 + fastrand::u64(0..20))).await;
                }
                Err(e) => {
                    tracing::warn!(%sku, error = %e, "can't take the product lease; retrying later");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    self.inner.scheduler.request(&sku);
                    return;
                }
            }
        };
        let mut lease = Lease { sku: sku.clone(), token, renewed: Instant::now() };
        loop {
            let result = self.pass(&mut lease).await;
            match result {
                Ok(()) => {}
                Err(Error::Superseded(why)) => {
                    tracing::warn!(%sku, %why, "lease lost mid-pass; another replica carries on");
                    return;
                }
                Err(e) => {
                    tracing::warn!(%sku, error = ?e, "pass failed; will retry");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    self.inner.scheduler.request(&sku);
                    break;
                }
            }
            if shutdown.is_triggered() || !self.inner.scheduler.still_wanted(&sku) {
                break;
            }
        }
        if let Err(e) = self.store().lease_release(&keys::lease(&sku), token).await {
            tracing::warn!(%sku, error = %e, "can't release the product lease; it will expire");
        }
    }

    /// Extends the lease when a third of its lifetime has passed.
    async fn keep(&self, lease: &mut Lease) -> Result<(), Error> {
        let ttl = self.options().lease_ttl;
        if lease.renewed.elapsed() < ttl / 3 {
            return Ok(());
        }
        if self.store().lease_renew(&keys::lease(&lease.sku), lease.token, ttl).await? {
            lease.renewed = Instant::now();
            Ok(())
        } else {
            Err(Error::Superseded(format!("lease of {} expired", lease.sku)))
        }
    }

    /// One pass over a product: every mark present when it starts, and those set while it runs.
    ///
    /// Marks move from the dirty hash to the product's working hash before the world is read, and
    /// leave the working hash only once their work is done: a pass cut short by a crash leaves its
    /// marks for whoever takes the lease next.
    async fn pass(&self, lease: &mut Lease) -> Result<(), Error> {
        let progress = self.inner.scheduler.sender(&lease.sku);
        loop {
            // Each round counts: placement waits for the first round that starts after its commit.
            progress.send_modify(|p| p.started += 1);
            let result = self.round(lease).await;
            progress.send_modify(|p| p.completed += 1);
            if !result? {
                return Ok(());
            }
        }
    }

    /// One round of a pass; false when there was nothing to do.
    async fn round(&self, lease: &mut Lease) -> Result<bool, Error> {
        {
            let began = Instant::now();
            let (dirty_key, working_key) = (keys::dirty(&lease.sku), keys::working(&lease.sku));
            let (dirty, working) =
                tokio::try_join!(self.store().hgetall(&dirty_key), self.store().hgetall(&working_key))?;
            if dirty.is_empty() && working.is_empty() {
                return Ok(false);
            }
            let mut t = Txn::new();
            t.expect_lease(keys::lease(&lease.sku), lease.token);
            for (f, v) in &dirty {
                t.hdel(keys::dirty(&lease.sku), f);
                t.hset(keys::working(&lease.sku), f, v.clone());
            }
            commit_under_lease(self, &t).await?;
            if !working.is_empty() {
                tracing::info!(sku = %lease.sku, marks = working.len(), "finishing work a previous lease holder left unfinished");
            }
            // The round continues the trace of what marked the product (the others become links).
            let mut causes: Vec<String> = dirty
                .iter()
                .chain(working.iter())
                .filter_map(|(_, v)| std::str::from_utf8(v).ok())
                .filter(|tp| chipgate_runtime::context::parse_traceparent(tp).is_some())
                .map(str::to_string)
                .collect();
            causes.sort();
            causes.dedup();
            let mut fields: Vec<String> = dirty.into_iter().chain(working).map(|(f, _)| f).collect();
            fields.sort();
            fields.dedup();
            let marks = Marks::parse(fields);
            let mut ctx = RequestContext::background("reconcile", causes.first().map(String::as_str));
            let links: Vec<&str> = causes.iter().skip(1).take(MAX_LINKS).map(String::as_str).collect();
            let span = telemetry::work_span(&mut ctx, "reconcile round", &lease.sku, &links);
            let result = self.round_work(&ctx, lease, &marks, began).instrument(span).await;
            let elapsed = began.elapsed();
            self.inner.counters.rounds.get_or_create(&[("product", lease.sku.clone())]).inc();
            self.inner.counters.round_seconds.observe(elapsed.as_secs_f64());
            result.map(|()| true)
        }
    }

    /// The work of a round, once its marks are taken.
    async fn round_work(
        &self,
        ctx: &RequestContext,
        lease: &mut Lease,
        marks: &Marks,
        began: Instant,
    ) -> Result<(), Error> {
        if marks.any_holders() {
            self.recheck_holders(ctx, lease, marks).await?;
        }
        let marked = began.elapsed();
        // Stock goes to the backlog as it stands first (its orders are already waiting for it).
        if !marks.drain.is_empty() {
            self.drain_backlog(ctx, lease, &marks.drain[0], &HashMap::new()).await?;
        }
        let mut left_waiting: HashMap<String, Cause> = HashMap::new();
        if marks.any_awaiting() {
            left_waiting = self.evaluate_awaiting(ctx, lease, marks).await?;
        }
        let evaluated = began.elapsed();
        if !left_waiting.is_empty() {
            let cause = marks.drain.first().cloned().unwrap_or_else(|| Cause::new(CauseKind::Reconciled, ""));
            self.drain_backlog(ctx, lease, &cause, &left_waiting).await?;
        }
        let mut t = Txn::new();
        t.expect_lease(keys::lease(&lease.sku), lease.token);
        for f in &marks.fields {
            t.hdel(keys::working(&lease.sku), f);
        }
        commit_under_lease(self, &t).await?;
        tracing::debug!(
            sku = %lease.sku,
            marks = marks.fields.len(),
            backlogged = left_waiting.len(),
            marks_ms = marked.as_millis() as u64,
            evaluate_ms = (evaluated - marked).as_millis() as u64,
            total_ms = began.elapsed().as_millis() as u64,
            "round done"
        );
        Ok(())
    }

    /// Waiting orders of the marked buyers, oldest first: take quota (and stock, when nobody waits for
    /// it ahead of them), wait, or be rejected. Returns the orders left waiting for stock in the backlog.
    async fn evaluate_awaiting(
        &self,
        ctx: &RequestContext,
        lease: &mut Lease,
        marks: &Marks,
    ) -> Result<HashMap<String, Cause>, Error> {
        let sku = lease.sku.clone();
        let buyers: Vec<String> = if marks.all_awaiting.is_empty() {
            marks.awaiting.keys().cloned().collect()
        } else {
            let mut b = self.store().smembers(&keys::awaiting_buyers(&sku)).await?;
            b.extend(marks.awaiting.keys().cloned());
            b.sort();
            b.dedup();
            b
        };
        let queues = try_join_all(buyers.iter().map(|b| {
            let key = keys::awaiting(&sku, b);
            async move { self.store().zrange(&key, 0, -1, false).await }
        }))
        .await?;
        let mut queue: Vec<(u64, String)> =
            queues.into_iter().flatten().map(|(id, score)| (score as u64, id)).collect();
        queue.sort();
        let causes: HashMap<String, Vec<Cause>> =
            buyers.iter().map(|b| (b.clone(), marks.awaiting_causes(b))).collect();
        // Read after the marks were taken, so a wave whose publication marked this round is among them.
        let unsettled = self.unsettled_waves(&sku).await?;
        // Orders that take quota can take stock in the same step while nobody waits ahead of them in
        // the backlog (and stock lasts); otherwise they join the backlog and a drain serves them in
        // placement order.
        let inline = self.store().zcard(&keys::backlog(&sku)).await? == 0;
        let mut stage = StageA { causes: &causes, unsettled: &unsettled, blocked: HashMap::new(), inline };
        let mut backlogged = HashMap::new();
        for chunk in queue.chunks(self.options().chunk.max(1)) {
            self.keep(lease).await?;
            let ids: Vec<String> = chunk.iter().map(|(_, id)| id.clone()).collect();
            backlogged.extend(self.evaluate_batch(ctx, lease, &ids, &mut stage).await?);
        }
        if !unsettled.is_empty() {
            self.settle_waves(&sku, &unsettled).await?;
        }
        Ok(backlogged)
    }

    /// One batch of waiting orders (retried whole when a concurrent change to one of them wins).
    #[allow(clippy::too_many_lines)]
    async fn evaluate_batch(
        &self,
        ctx: &RequestContext,
        lease: &Lease,
        ids: &[String],
        stage: &mut StageA<'_>,
    ) -> Result<HashMap<String, Cause>, Error> {
        let causes = stage.causes;
        let keys_: Vec<String> = ids.iter().map(|id| keys::order(id)).collect();
        for _attempt in 0..BATCH_ATTEMPTS {
            let t0 = Instant::now();
            let orders: Vec<(u64, OrderRecord)> = self
                .load_many::<OrderRecord>(&keys_)
                .await?
                .into_iter()
                .flatten()
                .filter(|(_, o)| o.status().is_waiting())
                .collect();
            let t_load = t0.elapsed();
            if orders.is_empty() {
                return Ok(HashMap::new());
            }
            let mut blocked = stage.blocked.clone();
            // Orders of a buyer already waiting for quota go too, marked: licensing takes nothing for
            // them, but tells which can never be served (to be rejected rather than left waiting).
            let items: Vec<lpb::QuotaItem> = orders
                .iter()
                .map(|(_, o)| lpb::QuotaItem {
                    order_id: o.id.clone(),
                    generation: o.generation,
                    buyer_id: o.buyer_id.clone(),
                    units: o.units,
                    justification: o.justification.clone(),
                    queued_behind: blocked.get(&o.buyer_id).cloned().unwrap_or_default(),
                })
                .collect();
            let results: HashMap<String, lpb::QuotaItemResult> = if items.is_empty() {
                HashMap::new()
            } else {
                let msg = lpb::BatchReserveQuotaRequest {
                    request_id: String::new(),
                    product_sku: lease.sku.clone(),
                    items,
                    fence_token: lease.token,
                };
                let asked = Instant::now();
                let resp = rpc!(ctx, self.inner.peers.licensing, batch_reserve_quota, msg).map_err(peer_error)?;
                tracing::debug!(items = orders.len(), ms = asked.elapsed().as_millis() as u64, "quota batch");
                resp.results.into_iter().map(|r| (r.order_id.clone(), r)).collect()
            };
            let t_quota = t0.elapsed();
            // Stock for those that got quota, in placement order, while the backlog ahead is empty.
            let mut inline_now = stage.inline;
            let mut holds: HashMap<String, ipb::ReserveItemResult> = HashMap::new();
            if inline_now {
                let items: Vec<ipb::ReserveItem> = orders
                    .iter()
                    .filter(|(_, o)| results.get(&o.id).is_some_and(|r| r.reservation.is_some() && !r.stale))
                    .map(|(_, o)| ipb::ReserveItem {
                        order_id: o.id.clone(),
                        generation: o.generation,
                        units: o.units,
                        allow_partial: true,
                        hold_seconds: self.options().hold_seconds,
                    })
                    .collect();
                if !items.is_empty() {
                    let msg = ipb::BatchReserveRequest {
                        request_id: String::new(),
                        product_sku: lease.sku.clone(),
                        items,
                        fence_token: lease.token,
                    };
                    let resp = rpc!(ctx, self.inner.peers.inventory, batch_reserve, msg).map_err(peer_error)?;
                    inline_now = resp.results.iter().all(|r| r.outcome() == ipb::ReserveOutcome::Held);
                    holds = resp.results.into_iter().map(|r| (r.order_id.clone(), r)).collect();
                }
            }
            let t_hold = t0.elapsed();
            let now = now_ms();
            let mut t = Txn::new();
            let mut events = book::Events::traced(ctx);
            t.expect_lease(keys::lease(&lease.sku), lease.token);
            let mut entered = HashMap::new();
            for (ver, o) in &orders {
                let mut new = o.clone();
                let cause = if o.status() == OrderStatus::Pending {
                    Cause::new(CauseKind::Placed, &o.id)
                } else {
                    causes
                        .get(&o.buyer_id)
                        .and_then(|c| c.first().cloned())
                        .unwrap_or_else(|| Cause::new(CauseKind::Reconciled, ""))
                };
                let moved = {
                    match results.get(&o.id) {
                        Some(r) if r.stale => {
                            // This generation's quota was released underneath the order (it can't
                            // reserve it again): continue at the next generation.
                            tracing::warn!(order = %o.id, generation = o.generation, "stale quota generation for a waiting order; moving on");
                            new.owe(true, true, "stale generation");
                            new.generation += 1;
                            Ok(true)
                        }
                        Some(lpb::QuotaItemResult { reservation: Some(r), .. }) => {
                            let took = new.take_quota(&r.license_id, &r.wave_id, cause.clone(), now);
                            let held = holds.get(&o.id).and_then(|h| {
                                matches!(h.outcome(), ipb::ReserveOutcome::Held | ipb::ReserveOutcome::Partial)
                                    .then_some(h.reservation.as_ref())
                                    .flatten()
                            });
                            if let (Ok(_), Some(h)) = (&took, held) {
                                let expire = h.expire_time.as_ref().map(ms_of).unwrap_or(0);
                                new.hold_stock(h.held_units, expire, cause.clone(), now)
                                    .map_err(|e| Error::Internal(format!("order {}: {e}", o.id)))?;
                            }
                            if new.status() == OrderStatus::Backordered {
                                entered.insert(o.id.clone(), cause);
                            }
                            took
                        }
                        Some(r) => {
                            let failures: Vec<Failure> = r.failures.iter().map(failure_from).collect();
                            if r.rejectable {
                                new.move_to(OrderStatus::Rejected, cause, "", failures, now)
                            } else {
                                // The same test licensing's planner applies within a batch (capacity that may
                                // come back): a stricter one here would park later orders the planner has
                                // already reserved quota for, leaking that quota.
                                let capacity = failures.iter().any(|f| {
                                    (f.condition().is_capacity() && !f.permanent)
                                        || f.condition() == Condition::QueueOrder
                                });
                                if capacity {
                                    blocked.insert(o.buyer_id.clone(), o.id.clone());
                                }
                                new.move_to(OrderStatus::AwaitingLicense, cause, "", failures, now)
                            }
                        }
                        None => Ok(false),
                    }
                };
                match moved {
                    Ok(true) => book::write(&mut t, &mut events, *ver, Some(o), &new),
                    Ok(false) => {}
                    Err(e) => return Err(Error::Internal(format!("order {}: {e}", o.id))),
                }
            }
            let ids: Vec<&str> = orders.iter().map(|(_, o)| o.id.as_str()).collect();
            crate::waves::evaluated(&mut t, &lease.sku, stage.unsettled, &ids, now);
            events.flush(&mut t);
            let t_built = t0.elapsed();
            let committed = self.store().commit(&t).await;
            tracing::debug!(
                orders = orders.len(),
                load_us = t_load.as_micros() as u64,
                quota_us = (t_quota - t_load).as_micros() as u64,
                hold_us = (t_hold - t_quota).as_micros() as u64,
                build_us = (t_built - t_hold).as_micros() as u64,
                commit_us = (t0.elapsed() - t_built).as_micros() as u64,
                "batch evaluated"
            );
            match committed {
                Ok(_) => {
                    stage.inline = inline_now;
                    stage.blocked = blocked;
                    return Ok(entered);
                }
                Err(CommitError::Conflict { .. }) => continue,
                Err(e) => return Err(commit_error(e)),
            }
        }
        Err(Error::Contention { attempts: BATCH_ATTEMPTS })
    }

    /// Free stock to the backlog, oldest first, until an order can't be fully served.
    async fn drain_backlog(
        &self,
        ctx: &RequestContext,
        lease: &mut Lease,
        cause: &Cause,
        entered: &HashMap<String, Cause>,
    ) -> Result<(), Error> {
        let chunk = self.options().chunk.max(1);
        loop {
            self.keep(lease).await?;
            let entries = self.store().zrange(&keys::backlog(&lease.sku), 0, chunk as i64 - 1, false).await?;
            if entries.is_empty() {
                return Ok(());
            }
            let ids: Vec<String> = entries.iter().map(|(id, _)| id.clone()).collect();
            let all_served = self.drain_batch(ctx, lease, &ids, cause, entered).await?;
            if !all_served || entries.len() < chunk {
                return Ok(());
            }
            // Every order of the batch was served and left the backlog: the next batch starts at the top.
        }
    }

    /// One batch of backlog orders. Returns whether every one was fully served.
    async fn drain_batch(
        &self,
        ctx: &RequestContext,
        lease: &Lease,
        ids: &[String],
        cause: &Cause,
        entered: &HashMap<String, Cause>,
    ) -> Result<bool, Error> {
        let keys_: Vec<String> = ids.iter().map(|id| keys::order(id)).collect();
        for _attempt in 0..BATCH_ATTEMPTS {
            let orders: Vec<(u64, OrderRecord)> = self
                .load_many::<OrderRecord>(&keys_)
                .await?
                .into_iter()
                .flatten()
                .filter(|(_, o)| o.status() == OrderStatus::Backordered)
                .collect();
            if orders.is_empty() {
                return Ok(true);
            }
            let msg = ipb::BatchReserveRequest {
                request_id: String::new(),
                product_sku: lease.sku.clone(),
                items: orders
                    .iter()
                    .map(|(_, o)| ipb::ReserveItem {
                        order_id: o.id.clone(),
                        generation: o.generation,
                        units: o.units,
                        allow_partial: true,
                        hold_seconds: self.options().hold_seconds,
                    })
                    .collect(),
                fence_token: lease.token,
            };
            let resp = rpc!(ctx, self.inner.peers.inventory, batch_reserve, msg).map_err(peer_error)?;
            let results: HashMap<&str, &ipb::ReserveItemResult> =
                resp.results.iter().map(|r| (r.order_id.as_str(), r)).collect();
            let now = now_ms();
            let mut t = Txn::new();
            let mut events = book::Events::traced(ctx);
            t.expect_lease(keys::lease(&lease.sku), lease.token);
            let mut all_served = true;
            for (ver, o) in &orders {
                let Some(r) = results.get(o.id.as_str()) else { continue };
                let why = entered.get(&o.id).cloned().unwrap_or_else(|| cause.clone());
                let mut new = o.clone();
                let changed = match (r.outcome(), &r.reservation) {
                    (ipb::ReserveOutcome::Held | ipb::ReserveOutcome::Partial, Some(h)) => {
                        let expire = h.expire_time.as_ref().map(ms_of).unwrap_or(0);
                        new.hold_stock(h.held_units, expire, why, now)
                            .map_err(|e| Error::Internal(format!("order {}: {e}", o.id)))?
                    }
                    (ipb::ReserveOutcome::Stale, _) => {
                        // The hold of this generation was released underneath the order: start it
                        // over at the next generation rather than block the backlog behind it.
                        tracing::warn!(order = %o.id, generation = o.generation, "stale hold generation for a backordered order; re-evaluating it");
                        let f = Failure::new(Condition::Unspecified, "", "its stock hold was lost; re-evaluating");
                        new.unwind(Cause::new(CauseKind::Reconciled, &o.id), vec![f], now)
                            .map_err(|e| Error::Internal(format!("order {}: {e}", o.id)))?;
                        crate::marks::awaiting(
                            &mut t,
                            &lease.sku,
                            crate::marks::Who::Buyer(&o.buyer_id),
                            &Cause::new(CauseKind::Reconciled, ""),
                            &ctx.traceparent(),
                        );
                        true
                    }
                    _ => false,
                };
                if r.outcome() != ipb::ReserveOutcome::Held {
                    all_served = false;
                }
                if changed {
                    book::write(&mut t, &mut events, *ver, Some(o), &new);
                }
            }
            events.flush(&mut t);
            match self.store().commit(&t).await {
                Ok(_) => return Ok(all_served),
                Err(CommitError::Conflict { .. }) => continue,
                Err(e) => return Err(commit_error(e)),
            }
        }
        Err(Error::Contention { attempts: BATCH_ATTEMPTS })
    }

    /// Orders holding unconfirmed quota whose licence or product gate closed go back to waiting.
    ///
    /// Whether quota may still be used is licensing's rule ([`chipgate_domain::licensing::holding_failures`]),
    /// asked with `RecheckQuota` for a chunk of holders at a time; the failures it names become the
    /// order's reasons.
    async fn recheck_holders(&self, ctx: &RequestContext, lease: &mut Lease, marks: &Marks) -> Result<(), Error> {
        let sku = lease.sku.clone();
        let entries = self.store().zrange(&keys::holding(&sku), 0, -1, false).await?;
        if entries.is_empty() {
            return Ok(());
        }
        let all = !marks.all_holders.is_empty();
        let ids: Vec<String> = entries.into_iter().map(|(id, _)| id).collect();
        for chunk in ids.chunks(self.options().chunk.max(1)) {
            self.keep(lease).await?;
            let order_keys: Vec<String> = chunk.iter().map(|id| keys::order(id)).collect();
            for attempt in 0..=BATCH_ATTEMPTS {
                if attempt == BATCH_ATTEMPTS {
                    return Err(Error::Contention { attempts: BATCH_ATTEMPTS });
                }
                let orders: Vec<(u64, OrderRecord)> = self
                    .load_many::<OrderRecord>(&order_keys)
                    .await?
                    .into_iter()
                    .flatten()
                    .filter(|(_, o)| {
                        o.status().holds_unconfirmed_quota() && (all || marks.holders.contains_key(&o.buyer_id))
                    })
                    .collect();
                if orders.is_empty() {
                    break;
                }
                let msg = lpb::RecheckQuotaRequest {
                    product_sku: sku.clone(),
                    items: orders
                        .iter()
                        .map(|(_, o)| lpb::ReleaseItem { order_id: o.id.clone(), generation: o.generation })
                        .collect(),
                };
                let resp = rpc!(ctx, self.inner.peers.licensing, recheck_quota, msg).map_err(peer_error)?;
                let failed: HashMap<&str, &lpb::RecheckResult> =
                    resp.results.iter().filter(|r| !r.failures.is_empty()).map(|r| (r.order_id.as_str(), r)).collect();
                if failed.is_empty() {
                    break;
                }
                let now = now_ms();
                let mut t = Txn::new();
                let mut events = book::Events::traced(ctx);
                t.expect_lease(keys::lease(&sku), lease.token);
                for (ver, o) in &orders {
                    let Some(r) = failed.get(o.id.as_str()) else { continue };
                    let cause = marks
                        .holder_causes(&o.buyer_id)
                        .into_iter()
                        .next()
                        .unwrap_or_else(|| Cause::new(CauseKind::Reconciled, ""));
                    let mut new = o.clone();
                    new.unwind(cause, r.failures.iter().map(failure_from).collect(), now)
                        .map_err(|e| Error::Internal(format!("order {}: {e}", o.id)))?;
                    book::write(&mut t, &mut events, *ver, Some(o), &new);
                }
                events.flush(&mut t);
                match self.store().commit(&t).await {
                    Ok(_) => {
                        self.inner.cleanup_wake.notify_one();
                        break;
                    }
                    Err(CommitError::Conflict { .. }) => continue,
                    Err(e) => return Err(commit_error(e)),
                }
            }
        }
        Ok(())
    }
}

async fn commit_under_lease(svc: &Orders, t: &Txn) -> Result<(), Error> {
    svc.store().commit(t).await.map(|_| ()).map_err(commit_error)
}

fn commit_error(e: CommitError) -> Error {
    match e {
        CommitError::LeaseLost { key } | CommitError::Fenced { key } => Error::Superseded(format!("lease {key} lost")),
        CommitError::State(s) => Error::State(s),
        CommitError::Conflict { key } => Error::Internal(format!("unexpected conflict on {key}")),
    }
}

/// A peer's refusal of our fencing token (ABORTED with `ErrorInfo.reason` [`chipgate_contract::FENCED_REASON`]) means another
/// replica took the product over.
fn peer_error(s: tonic::Status) -> Error {
    use tonic_types::StatusExt;
    let fenced = s.code() == Code::Aborted
        && s.get_error_details().error_info().is_some_and(|i| i.reason == chipgate_contract::FENCED_REASON);
    if fenced { Error::Superseded(s.message().to_string()) } else { Error::Peer(s) }
}
