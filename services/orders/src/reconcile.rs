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
//! Every decision is made by the pure planners in [`chipgate_domain::allocation`] (what to ask of
//! licensing and inventory, and where each order moves given their answers); this module is the
//! driver around them: it loads a batch, makes the calls, and commits the planned moves through
//! [`crate::book::write`]. When passes run, and what happens when they keep failing, is
//! [`crate::scheduler`]'s business.
//!
//! Quota and hold calls carry the lease's fencing token, and every commit is guarded by the lease and
//! the orders' versions: a replica that stalled past its lease can neither take stock out of order nor
//! overwrite newer decisions. Every call is idempotent per (order, generation), so a pass cut short
//! anywhere is simply redone by the next one.

use chipgate_runtime::records::Loaded;
use chipgate_runtime::service::Records;
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use chipgate_domain::allocation::{
    self, Evaluation, HoldAnswer, MAX_REJUDGE_PASSES, QuotaAnswer, QuotaAsk, Standing, StockAsk,
};
use chipgate_domain::ids::{BuyerId, OrderId, Sku, WaveId};
use chipgate_domain::licensing::Failure;
use chipgate_domain::orders::{Cause, CauseKind, OrderRecord, OrderStatus};
use chipgate_proto::inventory::v1 as ipb;
use chipgate_proto::licensing::v1 as lpb;
use chipgate_runtime::time::now_ms;
use chipgate_runtime::{RequestContext, Shutdown, telemetry};
use chipgate_state::{Backend, CommitError, Txn};
use futures_util::future::try_join_all;
use prost::Message;
use tonic::Code;
use tracing::Instrument;

use crate::clients::rpc;
use crate::convert::{self, failure_from};
use crate::marks::Marks;
use crate::queues::Queues;
use crate::scheduler::Running;
use crate::{Error, Orders, book, keys};

/// Attempts at one batch when concurrent changes to its orders keep winning.
pub(crate) const BATCH_ATTEMPTS: u32 = 8;
/// Orders per commit when a round leaves a snapshot taken while it ran.
const SNAPSHOT_CHUNK: usize = 2_000;

/// Buyers' standings written or dropped per commit ([`Orders::keep_standings`]).
const STANDINGS_CHUNK: usize = 500;

/// Other traces a round links to at most (each further cause of the same round is only counted).
const MAX_LINKS: usize = 16;

/// What a round that evaluated waiting orders leaves for the start of the next round of its pass
/// ([`Orders::finish_leftover`]): the check for wave snapshots taken while it ran must follow its
/// last commit, and done there, beside the next round's marks step, it costs the placements that
/// round judges no round trip of their own (it cost every round one, after its last commit).
pub(crate) struct Leftover {
    /// The unsettled waves the round knew of (its commits left their snapshots).
    known: Vec<WaveId>,
    /// The orders the round took out of waiting.
    left: Vec<String>,
}

/// A round's evaluation of waiting orders, carried from one batch to the next: the decisions'
/// state ([`Evaluation`]) and what the driver needs beside it.
struct Evaluating<'a> {
    /// Why each buyer's orders are being looked at.
    causes: &'a HashMap<String, Vec<Cause>>,
    /// Waves whose snapshot of this product may still hold orders (each evaluated order leaves them),
    /// read again when a commit finds that another snapshot started since.
    unsettled: crate::waves::Unsettled,
    /// The decisions' state across batches (who waits for quota, whether stock may be taken at once).
    evaluation: Evaluation,
    /// Orders the committed batches took out of waiting ([`Orders::leave_snapshots_taken_meanwhile`]).
    left_waiting: Vec<String>,
}

impl Evaluating<'_> {
    /// Records what a batch whose moves landed took out of waiting.
    fn landed(&mut self, plan: &allocation::EvaluationPlan) {
        self.left_waiting
            .extend(plan.moves.iter().filter(|m| !m.order.status().is_waiting()).map(|m| m.order.id.clone()));
    }
}

/// A batch of waiting orders decided, its moves not committed yet.
struct Decided {
    /// Its orders' keys (to decide it again from a fresh read).
    keys: Vec<String>,
    /// The moves, under the lease and the versions the orders were read at.
    txn: Txn,
    /// What the evaluation decided (and carries into the next batch once committed).
    plan: allocation::EvaluationPlan,
}

/// A batch of waiting orders as read, before it is decided.
struct ReadBatch {
    /// Its orders' keys, in placement order.
    keys: Vec<String>,
    /// Each key's order as read (None: gone).
    orders: Vec<Loaded<OrderRecord>>,
}

impl ReadBatch {
    /// Keeps the first `n` orders (at least one) and returns the rest, if any.
    fn split_off(&mut self, n: usize) -> Option<ReadBatch> {
        let n = n.max(1);
        (self.keys.len() > n).then(|| ReadBatch { keys: self.keys.split_off(n), orders: self.orders.split_off(n) })
    }
}

/// The orders of a batch that still wait, as read.
struct Pending {
    /// Their keys, in placement order.
    keys: Vec<String>,
    /// The version each was read at.
    versions: Vec<u64>,
    /// The orders.
    orders: Vec<OrderRecord>,
}

impl Pending {
    /// The orders of `batch` that still wait (None when none does).
    fn waiting(batch: ReadBatch) -> Option<Pending> {
        let mut p = Pending { keys: Vec::new(), versions: Vec::new(), orders: Vec::new() };
        for (key, loaded) in batch.keys.into_iter().zip(batch.orders) {
            if let Some((version, order)) = loaded.filter(|(_, o)| o.status().is_waiting()) {
                p.keys.push(key);
                p.versions.push(version);
                p.orders.push(order);
            }
        }
        (!p.orders.is_empty()).then_some(p)
    }

    /// Back to a batch as read (to be asked for again).
    fn into_read(self) -> ReadBatch {
        let orders = self.versions.into_iter().zip(self.orders).map(Some).collect();
        ReadBatch { keys: self.keys, orders }
    }
}

/// A batch whose quota answers are in, its stock not asked for yet.
struct Asked {
    /// Its waiting orders.
    pending: Pending,
    /// Licensing's answer for each.
    quota: HashMap<String, QuotaAnswer>,
}

/// A batch decided and being committed, with what it takes to redo it.
struct InFlight {
    /// Its decision.
    decided: Decided,
    /// The evaluation state it was decided from.
    before: Evaluation,
}

/// The lease a pass runs under.
pub(crate) struct Lease {
    pub(crate) sku: Sku,
    pub(crate) token: u64,
    renewed: Instant,
}

/// Cuts `items` into consecutive batches, each as long as `size()` says when it is cut.
pub(crate) fn batches<'a, T>(
    items: &'a [T],
    mut size: impl FnMut() -> usize + 'a,
) -> impl Iterator<Item = &'a [T]> + 'a {
    let mut rest = items;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (head, tail) = rest.split_at(size().clamp(1, rest.len()));
        rest = tail;
        Some(head)
    })
}

impl Orders {
    /// How many orders the next batch of a round of `sku` takes: [`crate::Options::shared_chunk`]
    /// while placements of another product wait on this replica (they wait behind every script a
    /// full batch runs), otherwise [`crate::Options::chunk`].
    pub(crate) fn batch_size(&self, sku: &Sku) -> usize {
        if self.sharing(sku) { self.options().shared_chunk } else { self.options().chunk.max(1) }
    }

    /// Whether a round of `sku` shares Redis with placements of another product waiting on this
    /// replica: its batches are [`crate::Options::shared_chunk`] long, and it asks for no batch's
    /// quota ahead (each of its calls in flight is one more script they may wait behind).
    fn sharing(&self, sku: &Sku) -> bool {
        let o = self.options();
        o.shared_chunk > 0 && o.shared_chunk < o.chunk.max(1) && self.inner.answers.waiting_elsewhere(sku.as_str())
    }

    /// Counts `n` buyers whose orders of `sku` a round judged, `how` ([`crate::metrics::Counters::buyers_judged`]).
    fn count_judged(&self, sku: &Sku, how: &str, n: usize) {
        if n > 0 {
            let labels = [("product", sku.to_string()), ("from", how.to_string())];
            self.inner.counters.buyers_judged.get_or_create(&labels).inc_by(n as u64);
        }
    }

    /// Counts a batch a round of `sku` cut at `size` ([`Self::batch_size`]): `shared` when below the
    /// full size. Called once the batch holds orders, so a look that finds nothing left isn't one.
    pub(crate) fn count_batch(&self, sku: &Sku, size: usize) {
        let kind = if size < self.options().chunk.max(1) { "shared" } else { "full" };
        self.inner.counters.batches.get_or_create(&[("product", sku.to_string()), ("size", kind.to_string())]).inc();
    }

    /// Products with marks, and (every `full_reconcile_every`) every product marked for a full look.
    pub(crate) async fn dirty_products(&self, full: bool) -> Result<(Vec<Sku>, bool), Error> {
        // Products registered by placements, whose SKUs were parsed on entry.
        let products: Vec<Sku> =
            self.store().smembers(&keys::products()).await?.into_iter().map(Sku::from_trusted).collect();
        if full && !products.is_empty() {
            let cause = Cause::new(CauseKind::Reconciled, "");
            let tp = RequestContext::background("full-reconcile", None).traceparent();
            // Each product's marks in its own partition.
            for sku in &products {
                let mut t = Txn::new();
                crate::marks::awaiting(&mut t, sku, crate::marks::Who::All, &cause, &tp);
                crate::marks::holders(&mut t, sku, crate::marks::Who::All, &cause, &tp);
                crate::marks::drain(&mut t, sku, &cause, &tp);
                self.store().commit(&t).await.map_err(|e| Error::Internal(e.to_string()))?;
            }
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

    pub(crate) async fn run_product(&self, sku: Sku, shutdown: Shutdown) {
        let _running = Running { svc: self, sku: sku.to_string() };
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
                    self.inner.scheduler.failed(&sku, &format!("can't take the product lease: {e}"));
                    return;
                }
            }
        };
        let mut lease = Lease { sku: sku.clone(), token, renewed: Instant::now() };
        loop {
            let result = self.pass(&mut lease).await;
            match result {
                Ok(()) => self.inner.scheduler.succeeded(&sku),
                Err(Error::Superseded(why)) => {
                    tracing::warn!(%sku, %why, "lease lost mid-pass; another replica carries on");
                    return;
                }
                Err(e) => {
                    // The marks stay (in the working hash): the pass is redone after the pause.
                    self.inner.scheduler.failed(&sku, &e.describe());
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
    pub(crate) async fn keep(&self, lease: &mut Lease) -> Result<(), Error> {
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
        // Marks whose work the rounds so far have done; they leave the working hash in the same
        // step that takes the next round's marks (see [`Self::round`]).
        let mut finished: HashSet<String> = HashSet::new();
        // What the last round left for the next one's start (see [`Leftover`]).
        let mut leftover: Option<Leftover> = None;
        loop {
            // Each round counts: placement waits for the first round that starts after its commit.
            progress.send_modify(|p| p.started += 1);
            let result = self.round(lease, &mut finished, &mut leftover).await;
            progress.send_modify(|p| p.completed += 1);
            if !result? {
                return Ok(());
            }
        }
    }

    /// One round of a pass; false when there was nothing to do. `finished` holds the marks earlier
    /// rounds of the pass did the work of: the one step that takes this round's marks
    /// ([`chipgate_state::Backend::hash_move`], one round trip) clears them from the working hash,
    /// then moves the marks set since from the dirty hash in (a mark set again since it was done
    /// comes back), and this round's own marks are added once its work is done. `leftover` is what
    /// the previous round left to do, done beside that step; this round leaves its own there.
    async fn round(
        &self,
        lease: &mut Lease,
        finished: &mut HashSet<String>,
        leftover: &mut Option<Leftover>,
    ) -> Result<bool, Error> {
        {
            let began = Instant::now();
            // One step: the marks done by earlier rounds leave the working hash, and the marks set
            // since move in from the dirty hash; what the working hash then holds is this round's.
            let forget: Vec<String> = finished.drain().collect();
            let previous = leftover.take();
            let lease_now: &Lease = lease;
            let (moved, ()) = tokio::try_join!(
                async {
                    self.store()
                        .hash_move(
                            &keys::dirty(&lease_now.sku),
                            &keys::working(&lease_now.sku),
                            &forget,
                            &keys::lease(&lease_now.sku),
                            lease_now.token,
                        )
                        .await
                        .map_err(Error::from)
                },
                async {
                    match previous {
                        Some(l) => self.finish_leftover(lease_now, l).await,
                        None => Ok(()),
                    }
                },
            )?;
            let Some(taken) = moved else {
                return Err(Error::Superseded(format!("lease of {} was lost", lease.sku)));
            };
            if taken.fields.is_empty() {
                return Ok(false);
            }
            if taken.kept > 0 {
                tracing::info!(sku = %lease.sku, marks = taken.kept, "finishing work a previous lease holder left unfinished");
            }
            // The round continues the trace of what marked the product (the others become links).
            let mut causes: Vec<String> = taken
                .fields
                .iter()
                .filter_map(|(_, v)| std::str::from_utf8(v).ok())
                .filter(|tp| chipgate_runtime::context::parse_traceparent(tp).is_some())
                .map(str::to_string)
                .collect();
            causes.sort();
            causes.dedup();
            // Sorted and distinct already (the fields of one hash).
            let fields: Vec<String> = taken.fields.into_iter().map(|(f, _)| f).collect();
            let marks = Marks::parse(fields);
            let mut ctx = RequestContext::background("reconcile", causes.first().map(String::as_str));
            let links: Vec<&str> = causes.iter().skip(1).take(MAX_LINKS).map(String::as_str).collect();
            let span = telemetry::work_span(&mut ctx, "reconcile round", &lease.sku, &links);
            let result = self.round_work(&ctx, lease, &marks, taken.kept > 0, began).instrument(span).await;
            let result = result.map(|left| {
                finished.extend(marks.fields.iter().cloned());
                *leftover = left;
            });
            let elapsed = began.elapsed();
            self.inner.counters.rounds.get_or_create(&[("product", lease.sku.to_string())]).inc();
            self.inner.counters.round_seconds.observe(elapsed.as_secs_f64());
            result.map(|()| true)
        }
    }

    /// The work of a round, once its marks are taken; `resumed` when some of them were left by a
    /// pass cut short (they were in the working hash already). Returns what is left for the next
    /// round's start.
    async fn round_work(
        &self,
        ctx: &RequestContext,
        lease: &mut Lease,
        marks: &Marks,
        resumed: bool,
        began: Instant,
    ) -> Result<Option<Leftover>, Error> {
        if marks.any_holders() {
            self.recheck_holders(ctx, lease, marks).await?;
        }
        let marked = began.elapsed();
        // Stock goes to the backlog as it stands first (its orders are already waiting for it).
        if !marks.drain.is_empty() {
            self.drain_backlog(ctx, lease, &marks.drain[0], &HashMap::new()).await?;
        }
        let mut left_waiting: HashMap<String, Cause> = HashMap::new();
        let mut leftover = None;
        if marks.any_awaiting() {
            let (backlogged, left) = self.evaluate_awaiting(ctx, lease, marks).await?;
            (left_waiting, leftover) = (backlogged, Some(left));
        }
        let evaluated = began.elapsed();
        // A pass cut short after its evaluation committed (its lease lost during the drain, a failed
        // call) left orders in the backlog without handing them stock; the round that takes over its
        // marks finds them no longer waiting, so nothing would drain the backlog until the next
        // stock event. It drains it here (unless its marks drained it already).
        if !left_waiting.is_empty() || (resumed && marks.drain.is_empty()) {
            let cause = marks.drain.first().cloned().unwrap_or_else(|| Cause::new(CauseKind::Reconciled, ""));
            self.drain_backlog(ctx, lease, &cause, &left_waiting).await?;
        }
        // Its marks leave the working hash with the next round's first commit (see [`Self::round`]).
        tracing::debug!(
            sku = %lease.sku,
            marks = marks.fields.len(),
            backlogged = left_waiting.len(),
            marks_ms = marked.as_millis() as u64,
            evaluate_ms = (evaluated - marked).as_millis() as u64,
            total_ms = began.elapsed().as_millis() as u64,
            "round done"
        );
        Ok(leftover)
    }

    /// Waiting orders of the marked buyers, oldest first: take quota (and stock, when nobody waits for
    /// it ahead of them), wait, or be rejected. Returns the orders left waiting for stock in the
    /// backlog, and the check of the waves' snapshots left for the next round's start.
    async fn evaluate_awaiting(
        &self,
        ctx: &RequestContext,
        lease: &mut Lease,
        marks: &Marks,
    ) -> Result<(HashMap<String, Cause>, Leftover), Error> {
        let sku = lease.sku.clone();
        let began = Instant::now();
        let buyers: Vec<String> = if marks.all_awaiting.is_empty() {
            marks.awaiting.keys().cloned().collect()
        } else {
            let mut b = self.store().smembers(&keys::awaiting_buyers(&sku)).await?;
            b.extend(marks.awaiting.keys().cloned());
            b.sort();
            b.dedup();
            b
        };
        // A buyer marked only by its own placements has its orders judged from the first new one on,
        // behind where its earlier ones stood (when that is known, and none must be judged again).
        let from: Vec<Option<u64>> = buyers.iter().map(|b| marks.placed_only(&sku, b)).collect();
        let standing_keys: Vec<String> =
            buyers.iter().map(|b| keys::standing(&sku, &BuyerId::from_trusted(b.as_str()))).collect();
        // The orders whose placements alone marked their buyers are judged first (where the buyers'
        // standings allow): read beside the rest, so the first batch has its orders at once. Only
        // as many as one batch takes; an order read here and changed before its batch commits fails
        // that commit's version guard like any other.
        let marked: Vec<String> = buyers
            .iter()
            .zip(&from)
            .filter(|(_, f)| f.is_some())
            .flat_map(|(b, _)| marks.placed_orders(b))
            .take(self.batch_size(&sku))
            .map(|id| keys::order(&OrderId::from_trusted(id)))
            .collect();
        // Everything the evaluation starts from, read at once (each read is a round trip every
        // placement waits on): the buyers' queues (from the new orders on where only placements
        // marked the buyer); the unsettled waves, read after the marks were taken so a wave whose
        // publication marked this round is among them; whether anybody waits in the backlog; the
        // product's allocation policy; and where the buyers' orders stood.
        let (first, last, unsettled, backlog_len, policy, standings, marked_orders) = tokio::try_join!(
            crate::queues::first_pages(self, &sku, &buyers, &from),
            // Orders placed after this are the next round's (their placements marked it).
            async { self.store().incr(&keys::seq(&sku), 0).await.map_err(Error::from) },
            self.unsettled(&sku),
            async { self.store().zcard(&keys::backlog(&sku)).await.map_err(Error::from) },
            self.allocation_policy(&sku),
            async { self.load_many::<Standing>(&standing_keys).await },
            async { if marked.is_empty() { Ok(Vec::new()) } else { self.load_orders(&marked).await } },
        )?;
        let read_us = began.elapsed().as_micros() as u64;
        let causes: HashMap<String, Vec<Cause>> =
            buyers.iter().map(|b| (b.clone(), marks.awaiting_causes(b))).collect();
        // Orders that take quota can take stock in the same step while nobody waits ahead of them in
        // the backlog (and stock lasts); otherwise they join the backlog and a drain serves them in
        // placement order. Under an allocation policy that shares stock (or caps it), they join the
        // backlog and the drain after the evaluation shares it out.
        let inline = backlog_len == 0 && !policy.planned();
        let mut evaluation = Evaluation::new(inline);
        let starts: Vec<Option<u64>> = buyers
            .iter()
            .zip(&from)
            .zip(&standings)
            .map(|((buyer, from), standing)| match (from, standing) {
                (Some(from), Some((_, st))) if st.resumable_at(*from) => {
                    evaluation.resume(buyer, st, *from);
                    Some(*from)
                }
                _ => None,
            })
            .collect();
        let resumed = starts.iter().filter(|s| s.is_some()).count();
        if resumed > 0 {
            tracing::debug!(%sku, buyers = resumed, of = buyers.len(), "judging only the new orders of buyers marked by their placements");
        }
        self.count_judged(&sku, "new_orders", resumed);
        self.count_judged(&sku, "all", buyers.len() - resumed);
        // Oldest first across the buyers' queues, read a page at a time as batches are cut; a first
        // page read from the new orders on is left out where the whole queue is judged after all.
        let pages = first.into_iter().zip(from.iter().zip(&starts)).map(|(p, (f, s))| (f == s).then_some(p)).collect();
        let mut queue = Queues::new(&sku, buyers.clone(), &starts, last);
        queue.fill_first(pages);
        queue.prefetch(marked, marked_orders);
        let mut stage = Evaluating { causes: &causes, unsettled, evaluation, left_waiting: Vec::new() };
        let mut backlogged = self.evaluate_in_batches(ctx, lease, &mut queue, &mut stage).await?;
        let batches_us = began.elapsed().as_micros() as u64;
        // A buyer's order left waiting before a later order of theirs took quota in this round was
        // judged against quota that is gone now: its reasons miss it (and a later order of the buyer
        // may name the wrong order to queue behind). So is a buyer whose new order would have been
        // served, asked only to be judged. Their waiting orders are judged once more, from a fresh
        // evaluation, so the round ends where a new look would (rare: a waiting order with a fixable
        // reason followed by one of the same buyer that goes through). See [`MAX_REJUDGE_PASSES`].
        let mut stale = stage.evaluation.stale_buyers();
        let mut rejudged: HashSet<String> = HashSet::new();
        for _ in 0..MAX_REJUDGE_PASSES {
            if stale.is_empty() {
                break;
            }
            tracing::debug!(%sku, buyers = stale.len(), "judging waiting orders again after later ones took quota");
            // Where their orders stood no longer holds once they are judged again: gone first, so a
            // round cut short leaves the next one to judge them all.
            self.forget_standings(lease, &stale).await?;
            self.count_judged(&sku, "again", stale.len());
            rejudged.extend(stale.iter().cloned());
            // Their queues as they stand now: the orders still waiting, up to the same placement.
            let mut again = Queues::new(&sku, stale.clone(), &vec![None; stale.len()], last);
            // Anything that goes through now joins the backlog behind what waits there already.
            let mut fresh = Evaluating {
                causes: &causes,
                unsettled: stage.unsettled.clone(),
                evaluation: Evaluation::new(false),
                left_waiting: Vec::new(),
            };
            backlogged.extend(self.evaluate_in_batches(ctx, lease, &mut again, &mut fresh).await?);
            stage.left_waiting.extend(fresh.left_waiting);
            stage.unsettled = fresh.unsettled;
            stale = fresh.evaluation.stale_buyers();
        }
        let rejudged_us = began.elapsed().as_micros() as u64;
        // Where the buyers' orders stand now, for the next round marked only by their placements.
        let standing: Vec<(String, u64, Option<Standing>, Standing)> = buyers
            .iter()
            .zip(standing_keys)
            .zip(standings)
            .filter(|((b, _), _)| !rejudged.contains(*b))
            .map(|((b, key), read)| {
                let (version, old) = read.map_or((0, None), |(v, st)| (v, Some(st)));
                (key, version, old, stage.evaluation.standing(b))
            })
            .collect();
        self.keep_standings(lease, standing).await?;
        tracing::debug!(
            %sku,
            read_us,
            batches_us,
            rejudged_us,
            standings_us = began.elapsed().as_micros() as u64,
            "evaluation steps (cumulative)"
        );
        Ok((backlogged, Leftover { known: stage.unsettled.waves, left: stage.left_waiting }))
    }

    /// The waves' side of a round, done at the next round's start beside its marks step (or at the
    /// pass's end): the orders the round took out of waiting leave the snapshots taken while it ran
    /// ([`Self::leave_snapshots_taken_meanwhile`]), and waves whose snapshot is empty settle.
    async fn finish_leftover(&self, lease: &Lease, leftover: Leftover) -> Result<(), Error> {
        let unsettled = self.leave_snapshots_taken_meanwhile(lease, &leftover.known, &leftover.left).await?;
        if !unsettled.is_empty() {
            self.settle_waves(&lease.sku, &unsettled).await?;
        }
        Ok(())
    }

    /// Writes where buyers' orders stand now (key, version read, as read, as now), each unless
    /// unchanged. A standing written or dropped since it was read (a bulk load of the buyer's
    /// orders) fails its write: those are dropped instead, for the next round to judge them all.
    async fn keep_standings(
        &self,
        lease: &Lease,
        standings: Vec<(String, u64, Option<Standing>, Standing)>,
    ) -> Result<(), Error> {
        let changed: Vec<_> = standings.into_iter().filter(|(_, _, old, new)| old.as_ref() != Some(new)).collect();
        for chunk in changed.chunks(STANDINGS_CHUNK) {
            let mut t = Txn::new();
            t.expect_lease(keys::lease(&lease.sku), lease.token);
            for (key, version, _, new) in chunk {
                t.replace(key.clone(), *version, new.encode_to_vec());
            }
            match self.store().commit(&t).await {
                Ok(_) => {}
                Err(CommitError::Conflict { .. }) => {
                    let mut t = Txn::new();
                    t.expect_lease(keys::lease(&lease.sku), lease.token);
                    for (key, ..) in chunk {
                        t.delete(key.clone());
                    }
                    self.store().commit(&t).await.map_err(commit_error)?;
                }
                Err(e) => return Err(commit_error(e)),
            }
        }
        Ok(())
    }

    /// Drops where `buyers`' orders stood: the next round judges all of them.
    async fn forget_standings(&self, lease: &Lease, buyers: &[String]) -> Result<(), Error> {
        for chunk in buyers.chunks(STANDINGS_CHUNK) {
            let mut t = Txn::new();
            t.expect_lease(keys::lease(&lease.sku), lease.token);
            for b in chunk {
                t.delete(keys::standing(&lease.sku, &BuyerId::from_trusted(b.as_str())));
            }
            self.store().commit(&t).await.map_err(commit_error)?;
        }
        Ok(())
    }

    /// The product's unsettled waves now, after taking `left` (orders this round took out of waiting)
    /// out of the snapshot of every wave among them that the round did not know of when it started
    /// (`known`). A wave's publication reaches this service twice: the licences' own events mark their
    /// buyers, and the publication event takes the snapshot of the waiting orders. When the marks come
    /// first, a round can start before the snapshot and then move orders the snapshot holds; as the
    /// round's commits only leave the snapshots it knew of, nothing else would ever take those orders
    /// out, and the wave would never settle (its progress stuck short of every order evaluated).
    /// Orders the round left waiting stay in the snapshot: the publication's marks bring them to the
    /// next round, which knows the wave.
    ///
    /// The round's commits are now guarded on the product's waves epoch ([`crate::waves::Unsettled`]),
    /// so none lands without knowing a snapshot started before it, and this finds nothing to do. It
    /// stays for snapshots started by a replica of the previous version during a rollout (their
    /// first step does not move the epoch); it costs one read per round, at the next round's start
    /// ([`Leftover`]).
    async fn leave_snapshots_taken_meanwhile(
        &self,
        lease: &Lease,
        known: &[WaveId],
        left: &[String],
    ) -> Result<Vec<WaveId>, Error> {
        let now = self.unsettled_waves(&lease.sku).await?;
        let missed: Vec<WaveId> = now.iter().filter(|w| !known.contains(w)).cloned().collect();
        if missed.is_empty() || left.is_empty() {
            return Ok(now);
        }
        tracing::debug!(sku = %lease.sku, waves = ?missed, orders = left.len(), "snapshots taken while the round ran: leaving them");
        for ids in left.chunks(SNAPSHOT_CHUNK) {
            let mut t = Txn::new();
            t.expect_lease(keys::lease(&lease.sku), lease.token);
            crate::waves::evaluated(&mut t, &lease.sku, &missed, ids.to_vec(), now_ms());
            self.store().commit(&t).await.map_err(commit_error)?;
        }
        Ok(now)
    }

    /// The waiting orders `queue` hands out, oldest first, in batches: returns the orders that joined
    /// the backlog.
    ///
    /// Batches are pipelined four deep: while one batch's moves are being committed (a script that
    /// keeps Redis busy for milliseconds), the next batch asks for its stock and is decided, from
    /// the evaluation state the committing batch leaves; the batch after it asks for its quota,
    /// behind the orders the deciding batch's quota answers left waiting for quota
    /// ([`Evaluation::quota_asks_after`]); and the batch after that is read (its queue pages and its
    /// orders). Licensing and inventory still see the batches one after the other, in placement
    /// order, and the commits land in that order. When a commit loses to a concurrent change, that
    /// batch is redone from the state before it, the batch decided alongside is decided again from a
    /// fresh read, and the batch whose quota was asked alongside asks again: every ask is idempotent
    /// per (order, generation), so asking again repeats the answers, except that quota an order took
    /// in an answer that never landed goes back when it is asked again behind an earlier order
    /// (licensing gives it back rather than answer "held"), so the redo can't put it ahead of the
    /// order that blocks it now. An order read ahead that
    /// changes before its batch commits fails that commit's version guard like any other. Each
    /// batch's keys are built when it is read (a 1M-order round would otherwise hold every key at
    /// once).
    async fn evaluate_in_batches(
        &self,
        ctx: &RequestContext,
        lease: &mut Lease,
        queue: &mut Queues,
        stage: &mut Evaluating<'_>,
    ) -> Result<HashMap<String, Cause>, Error> {
        let mut backlogged = HashMap::new();
        // The four stages, oldest batch first.
        let mut committing: Option<InFlight> = None;
        let mut asked: Option<Asked> = None;
        let mut read: VecDeque<ReadBatch> = VecDeque::new();
        let mut exhausted = false;
        loop {
            if read.is_empty() && !exhausted {
                // The first batch (later ones are read alongside the others' stages).
                match self.read_batch(&lease.sku, queue).await? {
                    Some(b) => read.push_back(b),
                    None => exhausted = true,
                }
            }
            // While placements of another product wait, the next batch's quota waits for this
            // batch's decision (as their rounds' calls would wait behind more of this round's).
            let hold_back = asked.is_some() && self.sharing(&lease.sku);
            // Read at the size wanted then; cut shorter when placements of another product have
            // started to wait since (their wait is one batch, not one batch read ahead).
            let to_ask = if hold_back { None } else { read.pop_front() }.and_then(|mut batch| {
                let size = self.batch_size(&lease.sku);
                if let Some(rest) = batch.split_off(size) {
                    read.push_front(rest);
                }
                self.count_batch(&lease.sku, size);
                Pending::waiting(batch)
            });
            if to_ask.is_none() && asked.is_none() && committing.is_none() {
                if read.is_empty() && exhausted {
                    break;
                }
                // A batch with no order waiting any more: on to the next.
                continue;
            }
            self.keep(lease).await?;
            let lease: &Lease = lease;
            let asks = to_ask.as_ref().map(|p| match &asked {
                Some(a) => stage.evaluation.quota_asks_after(&a.pending.orders, &a.quota, &p.orders),
                None => stage.evaluation.quota_asks(&p.orders),
            });
            let read_more = read.is_empty() && !exhausted;
            let deciding = asked.take();
            let (landed, decided, next, more) = tokio::join!(
                async {
                    match &committing {
                        Some(c) => self.commit_batch(&c.decided).await.map(Some),
                        None => Ok(None),
                    }
                },
                async {
                    match deciding {
                        Some(a) => self.decide_asked(ctx, lease, a, stage).await.map(Some),
                        None => Ok(None),
                    }
                },
                async {
                    match (to_ask, asks) {
                        (Some(pending), Some(asks)) => self.ask_batch(ctx, lease, pending, asks).await.map(Some),
                        _ => Ok(None),
                    }
                },
                async { if read_more { self.read_batch(&lease.sku, queue).await.map(Some) } else { Ok(None) } }
            );
            // The commit first: what landed counts whatever failed beside it.
            let mut lost = false;
            if let Some(prev) = committing.take() {
                let landed = landed?.unwrap_or(true);
                lost = !landed;
                backlogged.extend(self.after_commit(ctx, lease, prev, landed, stage).await?);
            }
            match more? {
                Some(Some(b)) => read.push_back(b),
                Some(None) => exhausted = true,
                None => {}
            }
            let next = next?;
            let decided = match decided? {
                // Decided as if the previous batch's moves landed: decided again when they did not.
                Some(d) if lost => self.decide_batch(ctx, lease, &d.keys, stage).await?,
                d => d,
            };
            if let Some(decided) = decided {
                let before = stage.evaluation.clone();
                stage.evaluation.committed(&decided.plan);
                committing = Some(InFlight { decided, before });
            }
            match next {
                // Asked behind answers that were decided again: asked again, behind the new ones.
                Some(n) if lost => read.push_front(n.pending.into_read()),
                n => asked = n,
            }
        }
        Ok(backlogged)
    }

    /// The next batch `queue` hands out, its orders read (None when the queue is done).
    async fn read_batch(&self, sku: &Sku, queue: &mut Queues) -> Result<Option<ReadBatch>, Error> {
        let chunk = queue.next(self, self.batch_size(sku)).await?;
        if chunk.is_empty() {
            return Ok(None);
        }
        let keys: Vec<String> = chunk.iter().map(|id| keys::order(&OrderId::from_trusted(id.as_str()))).collect();
        let orders = match queue.prefetched(&keys) {
            Some(orders) => orders,
            None => self.read_orders(&keys).await?,
        };
        Ok(Some(ReadBatch { keys, orders }))
    }

    /// The orders at `keys` (timed in the debug log).
    async fn read_orders(&self, keys: &[String]) -> Result<Vec<Loaded<OrderRecord>>, Error> {
        let began = Instant::now();
        let orders = self.load_orders(keys).await?;
        tracing::debug!(orders = keys.len(), load_us = began.elapsed().as_micros() as u64, "batch read");
        Ok(orders)
    }

    /// Licensing's answers to `asks`, the quota asks of `pending`.
    async fn ask_batch(
        &self,
        ctx: &RequestContext,
        lease: &Lease,
        pending: Pending,
        asks: Vec<QuotaAsk>,
    ) -> Result<Asked, Error> {
        let began = Instant::now();
        let quota = self.ask_quota(ctx, lease, asks).await?;
        tracing::debug!(
            orders = pending.orders.len(),
            quota_us = began.elapsed().as_micros() as u64,
            "batch asked for quota"
        );
        Ok(Asked { pending, quota })
    }

    /// What a batch whose commit `landed` (or lost to a concurrent change) leaves: the orders it put
    /// in the backlog; a lost batch is redone alone, from the evaluation state before it.
    async fn after_commit(
        &self,
        ctx: &RequestContext,
        lease: &Lease,
        batch: InFlight,
        landed: bool,
        stage: &mut Evaluating<'_>,
    ) -> Result<HashMap<String, Cause>, Error> {
        if landed {
            stage.landed(&batch.decided.plan);
            return Ok(batch.decided.plan.backlogged.into_iter().collect());
        }
        stage.evaluation = batch.before;
        // Lost to a change of one of its orders, or to a wave's snapshot started since the waves
        // were read: redone knowing the waves as they are now.
        stage.unsettled = self.unsettled(&lease.sku).await?;
        self.evaluate_batch(ctx, lease, &batch.decided.keys, stage).await
    }

    /// One batch of waiting orders, decided and committed (retried whole when a concurrent change to
    /// one of them wins).
    async fn evaluate_batch(
        &self,
        ctx: &RequestContext,
        lease: &Lease,
        order_keys: &[String],
        stage: &mut Evaluating<'_>,
    ) -> Result<HashMap<String, Cause>, Error> {
        for _attempt in 0..BATCH_ATTEMPTS {
            let Some(d) = self.decide_batch(ctx, lease, order_keys, stage).await? else {
                return Ok(HashMap::new());
            };
            if self.commit_batch(&d).await? {
                stage.evaluation.committed(&d.plan);
                stage.landed(&d.plan);
                return Ok(d.plan.backlogged.into_iter().collect());
            }
            stage.unsettled = self.unsettled(&lease.sku).await?;
        }
        Err(Error::Contention { attempts: BATCH_ATTEMPTS })
    }

    /// The orders at `order_keys` that still wait, the calls [`Evaluation`] asks for, and the
    /// transaction of its moves (under the lease, guarded by the versions read); None when none of
    /// them waits any more.
    async fn decide_batch(
        &self,
        ctx: &RequestContext,
        lease: &Lease,
        order_keys: &[String],
        stage: &Evaluating<'_>,
    ) -> Result<Option<Decided>, Error> {
        let orders = self.read_orders(order_keys).await?;
        let Some(pending) = Pending::waiting(ReadBatch { keys: order_keys.to_vec(), orders }) else {
            return Ok(None);
        };
        let asks = stage.evaluation.quota_asks(&pending.orders);
        let asked = self.ask_batch(ctx, lease, pending, asks).await?;
        self.decide_asked(ctx, lease, asked, stage).await.map(Some)
    }

    /// The stock a batch whose quota answers are in asks for, and the transaction of its moves
    /// (under the lease, guarded by the versions read).
    async fn decide_asked(
        &self,
        ctx: &RequestContext,
        lease: &Lease,
        asked: Asked,
        stage: &Evaluating<'_>,
    ) -> Result<Decided, Error> {
        let began = Instant::now();
        let Asked { pending: Pending { keys, versions, orders }, quota } = asked;
        let holds = self.ask_stock(ctx, lease, stage.evaluation.stock_asks(&orders, &quota)).await?;
        let asked_stock = began.elapsed();
        let causes = stage.causes;
        let cause_of = |o: &OrderRecord| {
            if o.status() == OrderStatus::Pending {
                Cause::new(CauseKind::Placed, &o.id)
            } else {
                causes
                    .get(&o.buyer_id)
                    .and_then(|c| c.first().cloned())
                    .unwrap_or_else(|| Cause::new(CauseKind::Reconciled, ""))
            }
        };
        let now = now_ms();
        let evaluated: Vec<String> = orders.iter().map(|o| o.id.clone()).collect();
        let batch = orders.len();
        let plan = stage.evaluation.decide_owned(orders, &quota, &holds, cause_of, now).map_err(move_error)?;
        let mut txn = Txn::new();
        let mut events = book::Events::traced(ctx);
        txn.expect_lease(keys::lease(&lease.sku), lease.token);
        for m in &plan.moves {
            book::write(&mut txn, &mut events, versions[m.index], Some(&m.before), &m.order);
        }
        stage.unsettled.leave(&mut txn, &lease.sku, evaluated, now);
        events.flush(&mut txn);
        tracing::debug!(
            orders = batch,
            hold_us = asked_stock.as_micros() as u64,
            decide_us = (began.elapsed() - asked_stock).as_micros() as u64,
            "batch decided"
        );
        Ok(Decided { keys, txn, plan })
    }

    /// Commits a decided batch: false when a concurrent change to one of its orders won (nothing
    /// changed; decide it again).
    async fn commit_batch(&self, d: &Decided) -> Result<bool, Error> {
        let began = Instant::now();
        let committed = self.store().commit(&d.txn).await;
        tracing::debug!(moves = d.plan.moves.len(), commit_us = began.elapsed().as_micros() as u64, "batch committed");
        match committed {
            Ok(_) => {
                self.inner.answers.committed(d.plan.moves.iter().map(|m| &m.order));
                Ok(true)
            }
            Err(CommitError::Conflict { .. }) => Ok(false),
            Err(e) => Err(commit_error(e)),
        }
    }

    /// Licensing's answers to `asks` (none asked: no call).
    async fn ask_quota(
        &self,
        ctx: &RequestContext,
        lease: &Lease,
        asks: Vec<QuotaAsk>,
    ) -> Result<HashMap<String, QuotaAnswer>, Error> {
        if asks.is_empty() {
            return Ok(HashMap::new());
        }
        let msg = lpb::BatchReserveQuotaRequest {
            request_id: String::new(),
            product_sku: lease.sku.to_string(),
            items: asks.into_iter().map(convert::quota_item).collect(),
            fence_token: lease.token,
        };
        let resp = rpc!(ctx, self.inner.peers.licensing, batch_reserve_quota, msg).map_err(peer_error)?;
        Ok(resp.results.into_iter().map(|r| (r.order_id.clone(), convert::quota_answer(r))).collect())
    }

    /// Inventory's answers to `asks` (none asked: no call).
    async fn ask_stock(
        &self,
        ctx: &RequestContext,
        lease: &Lease,
        asks: Vec<StockAsk>,
    ) -> Result<HashMap<String, HoldAnswer>, Error> {
        if asks.is_empty() {
            return Ok(HashMap::new());
        }
        let hold_seconds = self.options().hold_seconds;
        let msg = ipb::BatchReserveRequest {
            request_id: String::new(),
            product_sku: lease.sku.to_string(),
            items: asks.into_iter().map(|a| convert::reserve_item(a, hold_seconds)).collect(),
            fence_token: lease.token,
        };
        let resp = rpc!(ctx, self.inner.peers.inventory, batch_reserve, msg).map_err(peer_error)?;
        Ok(resp.results.into_iter().map(|r| (r.order_id.clone(), convert::hold_answer(&r))).collect())
    }

    /// Free stock to the backlog, oldest first, until an order can't be fully served.
    async fn drain_backlog(
        &self,
        ctx: &RequestContext,
        lease: &mut Lease,
        cause: &Cause,
        entered: &HashMap<String, Cause>,
    ) -> Result<(), Error> {
        let policy = self.allocation_policy(&lease.sku).await?;
        if policy.planned() {
            return self.drain_shared(ctx, lease, policy, cause, entered).await;
        }
        loop {
            let chunk = self.batch_size(&lease.sku);
            self.keep(lease).await?;
            let entries = self.store().zrange(&keys::backlog(&lease.sku), 0, chunk as i64 - 1, false).await?;
            if entries.is_empty() {
                return Ok(());
            }
            self.count_batch(&lease.sku, chunk);
            let ids: Vec<String> =
                entries.iter().map(|(m, _)| keys::indexed_order(&lease.sku, m).into_string()).collect();
            let all_served = self.drain_batch(ctx, lease, &ids, cause, entered).await?;
            if !all_served || entries.len() < chunk {
                return Ok(());
            }
            // Every order of the batch was served and left the backlog: the next batch starts at the top.
        }
    }

    /// One batch of backlog orders: stock asked for in backlog order, [`allocation::drain`]'s moves
    /// committed under the lease. Returns whether every one was fully served.
    async fn drain_batch(
        &self,
        ctx: &RequestContext,
        lease: &Lease,
        ids: &[String],
        cause: &Cause,
        entered: &HashMap<String, Cause>,
    ) -> Result<bool, Error> {
        let order_keys: Vec<String> = ids.iter().map(|id| keys::order(&OrderId::from_trusted(id.as_str()))).collect();
        for _attempt in 0..BATCH_ATTEMPTS {
            let (versions, orders): (Vec<u64>, Vec<OrderRecord>) = self
                .load_orders(&order_keys)
                .await?
                .into_iter()
                .flatten()
                .filter(|(_, o)| o.status() == OrderStatus::Backordered)
                .unzip();
            if orders.is_empty() {
                return Ok(true);
            }
            let holds = self.ask_stock(ctx, lease, allocation::drain_asks(&orders)).await?;
            let cause_of = |o: &OrderRecord| entered.get(&o.id).cloned().unwrap_or_else(|| cause.clone());
            let plan = allocation::drain(&orders, &holds, cause_of, now_ms()).map_err(move_error)?;
            let mut t = Txn::new();
            let mut events = book::Events::traced(ctx);
            t.expect_lease(keys::lease(&lease.sku), lease.token);
            for m in &plan.moves {
                book::write(&mut t, &mut events, versions[m.index], Some(&m.before), &m.order);
            }
            for buyer in &plan.re_evaluate {
                tracing::warn!(%buyer, sku = %lease.sku, "a backordered order's stock hold was lost; re-evaluating it");
                crate::marks::awaiting(
                    &mut t,
                    &lease.sku,
                    crate::marks::Who::Buyer(buyer),
                    &Cause::new(CauseKind::Reconciled, ""),
                    &ctx.traceparent(),
                );
            }
            events.flush(&mut t);
            match self.store().commit(&t).await {
                Ok(_) => {
                    self.inner.answers.committed(plan.moves.iter().map(|m| &m.order));
                    return Ok(plan.all_served);
                }
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
        let [backordered, reserved] = keys::holding(&sku);
        let (backordered, reserved) = tokio::try_join!(
            self.store().zrange(&backordered, 0, -1, false),
            self.store().zrange(&reserved, 0, -1, false),
        )?;
        let mut entries: Vec<(u64, String)> = backordered
            .into_iter()
            .chain(reserved)
            .map(|(m, seq)| (seq as u64, keys::indexed_order(&sku, &m).into_string()))
            .collect();
        if entries.is_empty() {
            return Ok(());
        }
        // In placement order. Only a pass under this lease moves an order from one of the two to the
        // other, so the two reads see each order once; dedup all the same, a move planned twice would
        // fail the commit.
        entries.sort_unstable();
        entries.dedup();
        let all = !marks.all_holders.is_empty();
        let ids: Vec<String> = entries.into_iter().map(|(_, id)| id).collect();
        for chunk in ids.chunks(self.options().chunk.max(1)) {
            self.keep(lease).await?;
            let order_keys: Vec<String> =
                chunk.iter().map(|id| keys::order(&OrderId::from_trusted(id.as_str()))).collect();
            for attempt in 0..=BATCH_ATTEMPTS {
                if attempt == BATCH_ATTEMPTS {
                    return Err(Error::Contention { attempts: BATCH_ATTEMPTS });
                }
                let (versions, orders): (Vec<u64>, Vec<OrderRecord>) = self
                    .load_orders(&order_keys)
                    .await?
                    .into_iter()
                    .flatten()
                    .filter(|(_, o)| {
                        o.status().holds_unconfirmed_quota() && (all || marks.holders.contains_key(&o.buyer_id))
                    })
                    .unzip();
                if orders.is_empty() {
                    break;
                }
                let msg = lpb::RecheckQuotaRequest {
                    product_sku: sku.to_string(),
                    items: orders
                        .iter()
                        .map(|o| lpb::ReleaseItem {
                            order_id: o.id.clone(),
                            generation: o.generation,
                            product_sku: sku.to_string(),
                        })
                        .collect(),
                };
                let resp = rpc!(ctx, self.inner.peers.licensing, recheck_quota, msg).map_err(peer_error)?;
                let failures: HashMap<String, Vec<Failure>> = resp
                    .results
                    .into_iter()
                    .filter(|r| !r.failures.is_empty())
                    .map(|r| (r.order_id, r.failures.iter().map(failure_from).collect()))
                    .collect();
                if failures.is_empty() {
                    break;
                }
                let cause_of = |o: &OrderRecord| {
                    let first = marks.holder_causes(&o.buyer_id).into_iter().next();
                    first.unwrap_or_else(|| Cause::new(CauseKind::Reconciled, ""))
                };
                let moves = allocation::recheck(&orders, &failures, cause_of, now_ms()).map_err(move_error)?;
                let mut t = Txn::new();
                let mut events = book::Events::traced(ctx);
                t.expect_lease(keys::lease(&sku), lease.token);
                for m in &moves {
                    book::write(&mut t, &mut events, versions[m.index], Some(&m.before), &m.order);
                }
                // Orders back to waiting that no standing knows of: their buyers' next round judges
                // all their orders.
                let buyers: HashSet<&str> = moves.iter().map(|m| m.order.buyer_id.as_str()).collect();
                for b in buyers {
                    t.delete(keys::standing(&sku, &BuyerId::from_trusted(b)));
                }
                events.flush(&mut t);
                match self.store().commit(&t).await {
                    Ok(_) => {
                        self.inner.answers.committed(moves.iter().map(|m| &m.order));
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

/// A planned move the order's life cycle refuses: stored data and the rules disagree.
pub(crate) fn move_error(e: chipgate_domain::orders::MoveError) -> Error {
    Error::Internal(format!("a planned move broke the order life cycle: {e}"))
}

pub(crate) fn commit_error(e: CommitError) -> Error {
    match e {
        CommitError::LeaseLost { key } | CommitError::Fenced { key } => Error::Superseded(format!("lease {key} lost")),
        CommitError::State(s) => Error::State(s),
        CommitError::Conflict { key } => Error::Internal(format!("unexpected conflict on {key}")),
    }
}

/// A peer's refusal of our fencing token (ABORTED with `ErrorInfo.reason` [`chipgate_contract::FENCED_REASON`]) means another
/// replica took the product over.
pub(crate) fn peer_error(s: tonic::Status) -> Error {
    use tonic_types::StatusExt;
    let fenced = s.code() == Code::Aborted
        && s.get_error_details().error_info().is_some_and(|i| i.reason == chipgate_contract::FENCED_REASON);
    if fenced { Error::Superseded(s.message().to_string()) } else { Error::Peer(s) }
}

#[cfg(test)]
mod tests {
    use super::batches;
    use crate::{Options, Orders};
    use chipgate_domain::ids::Sku;
    use chipgate_runtime::Shutdown;
    use chipgate_state::Store;

    /// An orders service on the in-memory store whose peers are never called.
    fn service(options: Options) -> (Orders, Shutdown) {
        crate::test_service(Store::memory(), options)
    }

    #[test]
    fn a_batch_read_ahead_is_cut_to_the_size_wanted_when_its_turn_comes() {
        use super::ReadBatch;
        use chipgate_domain::orders::OrderRecord;
        let read = |n: u64| ReadBatch {
            keys: (1..=n).map(|i| format!("k{i}")).collect(),
            orders: (1..=n)
                .map(|i| (i % 2 == 0).then(|| (i, OrderRecord { seq: i, ..OrderRecord::default() })))
                .collect(),
        };
        // Read at 6 while nobody waited; a placement of another product now waits: 2 are decided.
        let mut batch = read(6);
        let rest = batch.split_off(2).expect("four left");
        assert_eq!(batch.keys, ["k1", "k2"]);
        assert_eq!(rest.keys, ["k3", "k4", "k5", "k6"]);
        // Each key keeps its own order (or its absence).
        let seqs = |b: &ReadBatch| b.orders.iter().map(|o| o.as_ref().map(|(_, o)| o.seq)).collect::<Vec<_>>();
        assert_eq!(seqs(&batch), [None, Some(2)]);
        assert_eq!(seqs(&rest), [None, Some(4), None, Some(6)]);
        // Nothing left when the batch is no longer than the size; a size of 0 still decides one.
        assert!(read(3).split_off(3).is_none());
        assert!(read(3).split_off(8).is_none());
        let mut one = read(3);
        assert_eq!(one.split_off(0).map(|r| r.keys.len()), Some(2));
        assert_eq!(one.keys, ["k1"]);
    }

    #[tokio::test]
    async fn rounds_cut_shared_batches_only_while_placements_of_another_product_wait() {
        let (svc, shutdown) = service(Options { chunk: 50, shared_chunk: 5, ..Options::default() });
        let (a, b) = (Sku::from_trusted("A"), Sku::from_trusted("B"));
        // A round decides each batch's size, then counts the batch once it holds orders; a short
        // batch is also one whose quota is not asked for ahead.
        let cut = |sku: &Sku| {
            let size = svc.batch_size(sku);
            assert_eq!(svc.sharing(sku), size == 5);
            svc.count_batch(sku, size);
            size
        };
        assert_eq!(cut(&a), 50, "nobody waits");
        let placing = svc.inner.answers.expect("ord-B-1", "B");
        assert_eq!(cut(&a), 5, "a placement of B waits");
        assert_eq!(cut(&b), 50, "B's own placements don't shorten B's batches");
        drop(placing);
        assert_eq!(cut(&a), 50, "the placement answered");
        let text = svc.metrics().render().await;
        let count = |size: &str, product: &str| {
            text.lines()
                .filter(|l| l.starts_with("chipgate_reconcile_batches_total"))
                .filter(|l| l.contains(&format!("product=\"{product}\"")) && l.contains(&format!("size=\"{size}\"")))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum::<u64>()
        };
        assert_eq!((count("full", "A"), count("shared", "A"), count("full", "B")), (2, 1, 1), "{text}");
        shutdown.trigger();
    }

    /// A wave's snapshot taken while a round ran (the round read no unsettled wave) loses the orders
    /// the round took out of waiting, keeps those it left waiting, and settles once empty; a snapshot
    /// the round knew of is left to the round's own commits.
    #[tokio::test]
    async fn a_round_leaves_a_snapshot_taken_while_it_ran() {
        use super::Lease;
        use crate::keys;
        use chipgate_domain::ids::WaveId;
        use chipgate_runtime::service::Records;
        use chipgate_state::{Backend, Txn};
        let (svc, shutdown) = service(Options::default());
        let sku = Sku::from_trusted("A");
        let (w1, w2) = (WaveId::from_trusted("wave-1"), WaveId::from_trusted("wave-2"));
        let store = svc.store().clone();
        let token = store
            .lease_acquire(&keys::lease(&sku), &keys::lease_counter(&sku), std::time::Duration::from_secs(30))
            .await
            .expect("lease")
            .expect("free");
        let lease = Lease { sku: sku.clone(), token, renewed: std::time::Instant::now() };
        // The snapshots as the publications took them: w1 known to the round, w2 taken meanwhile.
        let mut t = Txn::new();
        for w in [&w1, &w2] {
            for (i, id) in ["ord-A-1", "ord-A-2", "ord-A-3"].into_iter().enumerate() {
                t.zadd(keys::wave_pending(w, &sku), id, i as f64);
            }
            t.sadd(keys::unsettled_waves(&sku), w);
        }
        store.commit(&t).await.expect("snapshots");
        // The round took 1 and 2 out of waiting (3 stays waiting, for the next round).
        let left = vec!["ord-A-1".to_string(), "ord-A-2".to_string()];
        let now = svc.leave_snapshots_taken_meanwhile(&lease, std::slice::from_ref(&w1), &left).await.expect("left");
        assert_eq!(now.len(), 2, "both waves are still unsettled: {now:?}");
        let members = |w: WaveId| {
            let store = store.clone();
            let key = keys::wave_pending(&w, &sku);
            async move { store.zrange(&key, 0, -1, false).await.expect("zrange") }
        };
        assert_eq!(members(w2.clone()).await, vec![("ord-A-3".to_string(), 2.0)], "w2 lost what the round moved");
        assert_eq!(members(w1.clone()).await.len(), 3, "w1 is the round's own commits' to leave");
        let tally = store.hgetall(&keys::wave_tally(&w2, &sku)).await.expect("tally");
        assert!(tally.iter().any(|(f, _)| f == "last_ms"), "w2's settle time stamped: {tally:?}");
        // Once the next round evaluated 3 (it knows w2), w2 settles.
        let mut t = Txn::new();
        crate::waves::evaluated(&mut t, &sku, std::slice::from_ref(&w2), vec!["ord-A-3".to_string()], 1);
        store.commit(&t).await.expect("next round");
        svc.settle_waves(&sku, &[w1.clone(), w2.clone()]).await.expect("settle");
        assert_eq!(svc.unsettled_waves(&sku).await.expect("unsettled"), vec![w1], "w2 settled, w1 still holds three");
        // Nothing to leave: no snapshot taken meanwhile, or nothing moved.
        let now = svc.leave_snapshots_taken_meanwhile(&lease, &[], &[]).await.expect("nothing moved");
        assert_eq!(now.len(), 1);
        shutdown.trigger();
    }

    /// A cancelled order leaves every snapshot unsettled now, whenever it was taken; an order a
    /// snapshot doesn't hold stamps nothing.
    #[tokio::test]
    async fn a_cancelled_order_leaves_every_unsettled_snapshot() {
        use crate::keys;
        use chipgate_domain::ids::WaveId;
        use chipgate_runtime::service::Records;
        use chipgate_state::{Backend, Txn};
        let (svc, shutdown) = service(Options::default());
        let sku = Sku::from_trusted("A");
        let waves = [WaveId::from_trusted("wave-1"), WaveId::from_trusted("wave-2")];
        let store = svc.store().clone();
        let mut t = Txn::new();
        for w in &waves {
            t.zadd(keys::wave_pending(w, &sku), "ord-A-1", 1.0).zadd(keys::wave_pending(w, &sku), "ord-A-2", 2.0);
            t.sadd(keys::unsettled_waves(&sku), w);
        }
        store.commit(&t).await.expect("snapshots");
        svc.leave_snapshots(&sku, "ord-A-9").await.expect("not held");
        for w in &waves {
            assert!(store.hgetall(&keys::wave_tally(w, &sku)).await.expect("tally").is_empty(), "nothing stamped");
        }
        svc.leave_snapshots(&sku, "ord-A-1").await.expect("held");
        for w in &waves {
            let left = store.zrange(&keys::wave_pending(w, &sku), 0, -1, false).await.expect("zrange");
            assert_eq!(left, vec![("ord-A-2".to_string(), 2.0)], "{w}");
            assert!(!store.hgetall(&keys::wave_tally(w, &sku)).await.expect("tally").is_empty(), "{w} stamped");
        }
        shutdown.trigger();
    }

    #[tokio::test]
    async fn a_shared_size_of_zero_or_not_below_the_batch_size_changes_nothing() {
        for shared_chunk in [0, 50, 80] {
            let (svc, shutdown) = service(Options { chunk: 50, shared_chunk, ..Options::default() });
            let _placing = svc.inner.answers.expect("ord-B-1", "B");
            assert_eq!(svc.batch_size(&Sku::from_trusted("A")), 50, "shared size {shared_chunk}");
            shutdown.trigger();
        }
    }

    #[test]
    fn batches_take_the_size_asked_when_each_is_cut_and_cover_every_item_once_in_order() {
        let items: Vec<u32> = (0..23).collect();
        // 10, then 3 while "someone waits", then 10 again: the last batch is what is left.
        let mut sizes = [10usize, 3, 3, 10, 10].into_iter();
        let cut: Vec<&[u32]> = batches(&items, || sizes.next().unwrap_or(10)).collect();
        assert_eq!(cut.iter().map(|b| b.len()).collect::<Vec<_>>(), vec![10, 3, 3, 7]);
        assert_eq!(cut.concat(), items);
        // A size of 0 still makes progress (one item), and nothing is cut from nothing.
        assert_eq!(batches(&items[..2], || 0).count(), 2);
        assert_eq!(batches(&items[..0], || 5).count(), 0);
    }
}
