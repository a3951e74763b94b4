//! Wave progress, in one place: which waiting orders a published wave concerns, and how far their
//! evaluation has got.
//!
//! When the orders service first consumes a wave's publication it records, for each product the wave
//! licenses, a **snapshot** of the waiting orders of the wave's buyers (server-side copies of their
//! awaiting queues, a few small queues or a page of a long one per step, each counted in its step;
//! see [`Orders::take_snapshot`]) and marks the wave *unsettled* for the product.
//! The snapshot is what the wave concerns — exactly those orders, whatever happens next:
//! * an order leaves the snapshot when a reconciliation round of its product evaluates it (for any
//!   cause: the round runs after the publication, so the wave is in effect), or when it stops waiting
//!   some other way (a cancel);
//! * an order placed after the snapshot is not the wave's concern (it is evaluated on its own
//!   placement);
//! * the wave is **settled** once every snapshot is empty; its settle time is that of the last order
//!   leaving, and its unsettled marks are cleared.
//!
//! So `evaluated` never exceeds `concerned`, a cancelled order never keeps a wave from settling, and a
//! replica taking over mid-wave changes neither figure. The counts by state (orders holding the wave's
//! quota, units held) are kept by [`crate::book`] as orders move.

use chipgate_runtime::service::Records;
use std::collections::{BTreeMap, HashMap};

use chipgate_domain::ids::{BuyerId, Sku, WaveId};
use chipgate_domain::orders::{OrderRecord, OrderStatus};
use chipgate_proto::licensing::v1 as lpb;
use chipgate_proto::orders::v1 as pb;
use chipgate_runtime::errors::Violations;
use chipgate_runtime::time::{now_ms, ts_opt};
use chipgate_runtime::validate;
use chipgate_state::{Backend, CommitError, Txn};
use futures_util::future::try_join_all;
use prost::Message;

use crate::convert::state_to;
use crate::keys::OrderIds;
use crate::{Error, Orders, keys};

/// Field of a wave's per-product tally: orders the snapshot took (it grows step by step while the
/// snapshot is being taken).
const CONCERNED: &str = "concerned";
/// In a snapshot while it is being taken, never an order id (those start with `ord-`).
const TAKING: &str = "~taking";

/// The steps of a snapshot: each a list of (queue, members to copy at most) holding at most
/// `limit()` members together, as it says when each step is cut (by `sizes`, read before). Small
/// queues go whole into one step; a queue larger than what a step has room for is split across
/// steps, each copying the next page of it (empty queues left out). The last page of a queue may
/// copy one member more than its size said, so that it comes up short and marks the copy done.
fn snapshot_steps(
    queues: Vec<String>,
    sizes: &[u64],
    mut limit: impl FnMut() -> u64,
) -> impl Iterator<Item = Vec<(String, u64)>> {
    let mut left = queues.into_iter().zip(sizes.iter().copied()).filter(|(_, n)| *n > 0);
    // A queue split across steps, with what is left of it.
    let mut split: Option<(String, u64)> = None;
    std::iter::from_fn(move || {
        let mut room = limit().max(1);
        let mut step = Vec::new();
        while room > 0 {
            let Some((q, n)) = split.take().or_else(|| left.next()) else { break };
            if n <= room {
                step.push((q, n + 1));
                room -= n;
            } else {
                step.push((q.clone(), room));
                split = Some((q, n - room));
                room = 0;
            }
        }
        (!step.is_empty()).then_some(step)
    })
}

/// Field of a wave's per-product tally: when an order last left the snapshot (ms).
const LAST_MS: &str = "last_ms";
/// Field of a wave's figures: units held by orders under its licences.
pub(crate) const UNITS_HELD: &str = "units_held";

/// When the orders service first saw a wave, and which queues it concerns.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct WaveMeta {
    #[prost(string, tag = "1")]
    pub wave_id: String,
    #[prost(uint64, tag = "2")]
    pub observed_ms: u64,
    /// `sku|buyer` of each licence of the wave.
    #[prost(string, repeated, tag = "4")]
    pub queues: Vec<String>,
    /// When licensing published it (the event's time).
    #[prost(uint64, tag = "5")]
    pub published_ms: u64,
}

impl WaveMeta {
    /// The products the wave licenses, each with its buyers.
    fn products(&self) -> BTreeMap<&str, Vec<&str>> {
        let mut by_sku: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for q in &self.queues {
            if let Some((sku, buyer)) = q.split_once('|') {
                by_sku.entry(sku).or_default().push(buyer);
            }
        }
        by_sku
    }
}

/// The waves whose snapshot of a product may still hold orders, as read together with the version
/// of the product's [`keys::waves_epoch`], which every snapshot's first step moves.
///
/// An order that stops waiting must leave every snapshot that holds it, in the same commit. A
/// snapshot started after the waves were read holds it too (it still waited when its queue was
/// copied), so a commit that takes orders out of waiting is guarded on the epoch
/// ([`Unsettled::leave`]): it conflicts when a snapshot started since, and is redone from a fresh
/// read. Before, the round (or cancel) left such snapshots in a second step after its commits, and
/// a replica killed between the two, or a round cut short by an error, left the order in the
/// snapshot for good: the wave never settled.
#[derive(Clone, Debug, Default)]
pub(crate) struct Unsettled {
    /// The epoch's version when the waves were read (0: no snapshot of the product ever started).
    pub epoch: u64,
    /// The waves.
    pub waves: Vec<WaveId>,
}

impl Unsettled {
    /// Adds to `t` that the orders `ids` of `sku` were evaluated (or stopped waiting) at `now_ms`:
    /// they leave the snapshots of these waves, and the commit fails if another snapshot started
    /// since they were read.
    pub(crate) fn leave(&self, t: &mut Txn, sku: &Sku, ids: Vec<String>, now_ms: u64) {
        if ids.is_empty() {
            return;
        }
        t.expect_version(keys::waves_epoch(sku), self.epoch);
        evaluated(t, sku, &self.waves, ids, now_ms);
    }
}

/// Adds to `t` what it means for the orders `ids` of product `sku` to have been evaluated (or to
/// have stopped waiting) now: they leave the snapshot of every wave still unsettled for the product.
pub(crate) fn evaluated(t: &mut Txn, sku: &Sku, unsettled: &[WaveId], ids: Vec<String>, now_ms: u64) {
    if ids.is_empty() {
        return;
    }
    for wave in unsettled {
        // Stamped only when one of `ids` was still in the snapshot: `unsettled` may be stale (read
        // at the start of a round), and an evaluation of orders the wave doesn't concern must not
        // move the settle time of a wave whose snapshot is already empty.
        t.zrem_stamp(
            keys::wave_pending(wave, sku),
            ids.clone(),
            keys::wave_tally(wave, sku),
            LAST_MS,
            now_ms.to_string().into_bytes(),
        );
    }
}

impl Orders {
    /// Waves whose snapshot for `sku` may still hold orders.
    pub(crate) async fn unsettled_waves(&self, sku: &Sku) -> Result<Vec<WaveId>, Error> {
        // Wave ids this service stored from licensing's events.
        Ok(self.store().smembers(&keys::unsettled_waves(sku)).await?.into_iter().map(WaveId::from_trusted).collect())
    }

    /// The product's unsettled waves with the epoch they were read at: the epoch first, so a
    /// snapshot started between the two reads is among the waves or moves the epoch past the one
    /// read (a guarded commit then conflicts).
    pub(crate) async fn unsettled(&self, sku: &Sku) -> Result<Unsettled, Error> {
        // One round trip (both keys are in the product's slot), every round waits on it.
        let (epoch, waves) =
            self.store().get_then_members(&keys::waves_epoch(sku), &keys::unsettled_waves(sku)).await?;
        let epoch = epoch.map_or(0, |r| r.version);
        Ok(Unsettled { epoch, waves: waves.into_iter().map(WaveId::from_trusted).collect() })
    }

    /// Clears `sku`'s unsettled marks of the waves among `waves` whose snapshot for it is empty.
    pub(crate) async fn settle_waves(&self, sku: &Sku, waves: &[WaveId]) -> Result<(), Error> {
        let sizes = try_join_all(waves.iter().map(|w| {
            let key = keys::wave_pending(w, sku);
            async move { self.store().zcard(&key).await }
        }))
        .await?;
        let mut t = Txn::new();
        for (w, n) in waves.iter().zip(sizes) {
            if n == 0 {
                t.srem(keys::unsettled_waves(sku), w);
            }
        }
        if !t.is_empty() {
            self.store().commit(&t).await.map_err(|e| Error::Internal(format!("settling waves: {e}")))?;
        }
        Ok(())
    }

    /// Takes order `id` of `sku`, no longer waiting, out of the snapshot of every wave unsettled for
    /// the product now. [`left_waiting`](Self::left_waiting) does it inside the order's own commit,
    /// from the unsettled waves read before it: a snapshot taken in between holds the order too (it
    /// still waited then), and nothing else would take it out (the wave would never settle).
    pub(crate) async fn leave_snapshots(&self, sku: &Sku, id: &str) -> Result<(), Error> {
        let unsettled = self.unsettled_waves(sku).await?;
        if unsettled.is_empty() {
            return Ok(());
        }
        let mut t = Txn::new();
        evaluated(&mut t, sku, &unsettled, vec![id.to_string()], now_ms());
        self.store().commit(&t).await.map_err(|e| Error::Internal(format!("leaving wave snapshots: {e}")))?;
        Ok(())
    }

    /// An order of `o.sku` that stops waiting outside a reconciliation round (a cancel): it leaves the
    /// snapshots of the product's unsettled waves in `t`, which conflicts if another snapshot starts
    /// before it commits ([`Unsettled`]).
    pub(crate) async fn left_waiting(&self, t: &mut Txn, old: &OrderRecord, new: &OrderRecord) -> Result<(), Error> {
        if old.status().is_waiting() && !new.status().is_waiting() {
            let sku = new.typed_sku();
            self.unsettled(&sku).await?.leave(t, &sku, vec![new.id.clone()], now_ms());
        }
        Ok(())
    }

    /// Records a wave the first time its publication is consumed (a redelivered event changes
    /// nothing): its meta, then per product the snapshot of the waiting orders it concerns. Each step
    /// is its own idempotent commit, so a crash part-way is finished by the redelivery.
    pub(crate) async fn observe_wave(
        &self,
        w: &lpb::WavePublished,
        published: Option<&prost_types::Timestamp>,
    ) -> Result<(), Error> {
        let observed_ms = now_ms();
        let published_ms = published
            .and_then(|t| {
                u64::try_from(t.seconds).ok().map(|s| s * 1000 + u64::try_from(t.nanos).unwrap_or(0) / 1_000_000)
            })
            .unwrap_or(observed_ms);
        // Licensing publishes a wave product by product (each product's licences, with their event, in
        // its own partition): each event adds its products' queues to the one meta, first one creating
        // it.
        let queues: Vec<String> = w.licenses.iter().map(|l| format!("{}|{}", l.product_sku, l.buyer_id)).collect();
        // Licensing's event: its ids were parsed on entry there.
        let wave_id = WaveId::from_trusted(w.wave_id.as_str());
        let mut attempts = 0;
        let meta = loop {
            attempts += 1;
            let (ver, mut meta) = self
                .load::<WaveMeta>(keys::wave_meta(&wave_id))
                .await?
                .unwrap_or((0, WaveMeta { wave_id: w.wave_id.clone(), observed_ms, queues: Vec::new(), published_ms }));
            let new: Vec<String> = queues.iter().filter(|q| !meta.queues.contains(q)).cloned().collect();
            if ver > 0 && new.is_empty() {
                break meta;
            }
            meta.queues.extend(new);
            let mut t = Txn::new();
            t.replace(keys::wave_meta(&wave_id), ver, meta.encode_to_vec());
            if ver == 0 {
                t.zadd(keys::waves(), &w.wave_id, published_ms as f64);
            }
            match self.store().commit(&t).await {
                Ok(_) => break meta,
                // Another product's event of the same wave got there first: merge again.
                Err(CommitError::Conflict { .. }) if attempts < 16 => {}
                Err(e) => return Err(Error::Internal(format!("wave {} meta: {e}", w.wave_id))),
            }
        };
        // Each product's snapshot is taken on its own event (a redelivery finishes it), so two
        // products' consumers don't take the same one side by side.
        let ours: std::collections::BTreeSet<&str> = w.licenses.iter().map(|l| l.product_sku.as_str()).collect();
        for (sku, buyers) in meta.products().into_iter().filter(|(sku, _)| ours.contains(sku)) {
            self.take_snapshot(&wave_id, &Sku::from_trusted(sku), &buyers).await?;
        }
        Ok(())
    }

    /// Takes wave `wave_id`'s snapshot of product `sku`: the waiting orders of `buyers` (see the
    /// module docs), in steps of at most [`crate::Options::snapshot_step`] orders (a tenth of it
    /// while placements of another product wait on this replica), each a short script.
    ///
    /// One `ZUNIONSTORE` of every queue kept Redis from everything else for as long as it ran: two
    /// seconds at a million waiting orders, during which no placement of any product was answered.
    /// Now the wave is marked unsettled first, with [`TAKING`] in the snapshot so that it can't look
    /// empty (and be settled by a round) before the last step, which takes it out and sets the
    /// marker that the snapshot is taken. Every step is guarded on that marker's absence, so a
    /// redelivered event after the end changes nothing, and records how far it copied each queue
    /// (a cursor per queue, [`chipgate_state::Op::ZCopyPage`]), so a redelivery after a crash
    /// part-way continues from there. A queue longer than a step is copied a page per step: at a
    /// million waiting orders a buyer's queue of 5,000 was one step, and placements of another
    /// product waited behind it.
    ///
    /// Orders a round evaluates meanwhile are handled as for a snapshot taken in one step: a round
    /// that knows the wave takes them out of it (if already copied), or they are no longer in their
    /// queue when their step copies it; a round that started earlier finds its next commit in
    /// conflict with the first step and redoes it knowing the wave ([`Unsettled`]). While a
    /// snapshot is being taken its `concerned` figure grows step by step.
    async fn take_snapshot(&self, wave_id: &WaveId, sku: &Sku, buyers: &[&str]) -> Result<(), Error> {
        let done = keys::wave_snapshot_taken(wave_id, sku);
        let pending = keys::wave_pending(wave_id, sku);
        let tally = keys::wave_tally(wave_id, sku);
        // A conflict means the marker is there: taken already (by an earlier delivery).
        let commit = |t: Txn| async move {
            match self.store().commit(&t).await {
                Ok(_) => Ok(true),
                Err(CommitError::Conflict { .. }) => Ok(false),
                Err(e) => Err(Error::Internal(format!("wave {wave_id} snapshot of {sku}: {e}"))),
            }
        };
        let mut t = Txn::new();
        t.expect_version(done.clone(), 0);
        t.zadd(pending.clone(), TAKING, 0.0);
        t.hincr(tally.clone(), CONCERNED, 0);
        t.sadd(keys::unsettled_waves(sku), wave_id);
        // Commits that take orders out of waiting, decided before this, now conflict and are redone
        // knowing the wave (their orders may be copied into its snapshot from here on).
        t.put(keys::waves_epoch(sku), Vec::new());
        if !commit(t).await? {
            return Ok(());
        }
        // Each queue's copy continues from its cursor (an earlier delivery's): an order of theirs
        // evaluated since (and left waiting) would otherwise be counted twice. Read with the queues'
        // sizes and the last placement number given out, in one round trip: orders placed after
        // the publication are not the wave's concern (their own placement evaluates them), and the
        // bound keeps the copy finite while buyers keep placing.
        let steps_key = keys::wave_snapshot_steps(wave_id, sku);
        let queues: Vec<String> = buyers.iter().map(|b| keys::awaiting(sku, &BuyerId::from_trusted(*b))).collect();
        let seq_key = keys::seq(sku);
        let (cursors, sizes, upto) = tokio::try_join!(
            self.store().hgetall(&steps_key),
            try_join_all(queues.iter().map(|q| self.store().zcard(q))),
            self.store().incr(&seq_key, 0),
        )?;
        // `1`: copied whole by an earlier version, which took a queue in one step.
        let copied: std::collections::HashSet<String> = cursors
            .into_iter()
            .filter(|(_, v)| v == chipgate_state::PAGE_COPY_DONE.as_bytes() || v == b"1")
            .map(|(q, _)| q)
            .collect();
        let (queues, sizes): (Vec<String>, Vec<u64>) =
            queues.into_iter().zip(sizes).filter(|(q, _)| !copied.contains(q)).unzip();
        // A tenth of the size while placements of another product wait on this replica: each step
        // is a script they wait behind (as a round's batches are, see `Options::shared_chunk`), and
        // a queue longer than that is copied a page per step.
        let full = self.options().snapshot_step.max(1);
        let size = || if self.inner.answers.waiting_elsewhere(sku.as_str()) { (full / 10).max(1) } else { full };
        for step in snapshot_steps(queues, &sizes, size) {
            let mut t = Txn::new();
            t.expect_version(done.clone(), 0);
            for (q, limit) in step {
                let count = (tally.clone(), CONCERNED.to_string());
                let progress = (steps_key.clone(), q.clone());
                t.zcopy_page(pending.clone(), q, upto as f64, limit, count, progress);
            }
            if !commit(t).await? {
                return Ok(());
            }
        }
        let mut t = Txn::new();
        t.replace(done, 0, Vec::new());
        t.zrem(pending, TAKING);
        t.delete(steps_key);
        commit(t).await?;
        Ok(())
    }

    /// When licensing published `wave_id`, as the orders service recorded it (None: not observed).
    pub(crate) async fn wave_published_ms(&self, wave_id: &WaveId) -> Result<Option<u64>, String> {
        let meta = self.load::<WaveMeta>(keys::wave_meta(wave_id)).await.map_err(|e| format!("{e:?}"))?;
        Ok(meta.map(|(_, m)| if m.published_ms > 0 { m.published_ms } else { m.observed_ms }))
    }

    pub(crate) async fn get_wave_progress(
        &self,
        req: pb::GetWaveProgressRequest,
    ) -> Result<pb::GetWaveProgressResponse, Error> {
        let mut v = Violations::new();
        let wave_id = validate::parse::<WaveId>(&mut v, "wave_id", req.wave_id.clone());
        let wave_id = validate::finish(v, wave_id)?;
        let meta = self.load::<WaveMeta>(keys::wave_meta(&wave_id)).await?.map(|(_, m)| m);
        // The figures are kept per product (each in its partition): they add up.
        let skus: Vec<Sku> =
            meta.as_ref().map(|m| m.products().into_keys().map(Sku::from_trusted).collect()).unwrap_or_default();
        let per_product_figures = try_join_all(skus.iter().map(|sku| {
            let key = keys::wave(sku, &wave_id);
            async move { self.store().hgetall(&key).await }
        }))
        .await?;
        let mut figures: HashMap<String, u64> = HashMap::new();
        for f in per_product_figures {
            for (k, v) in number_fields(f) {
                *figures.entry(k).or_default() += v;
            }
        }
        let count = |s: OrderStatus| figures.get(state_to(s).as_str_name()).copied().unwrap_or(0);
        let products: Vec<(Sku, Vec<BuyerId>)> = meta
            .as_ref()
            .map(|m| {
                m.products()
                    .into_iter()
                    .map(|(sku, buyers)| {
                        (Sku::from_trusted(sku), buyers.into_iter().map(BuyerId::from_trusted).collect())
                    })
                    .collect()
            })
            .unwrap_or_default();
        // Every figure of every product at once (they pipeline on one connection): a poll costs one
        // round trip, not one per queue.
        let wave_id = &wave_id;
        let per_product = try_join_all(products.iter().map(|(sku, buyers)| async move {
            let tally_key = keys::wave_tally(wave_id, sku);
            let pending_key = keys::wave_pending(wave_id, sku);
            let (tally, pending, awaiting) = tokio::try_join!(
                self.store().hgetall(&tally_key),
                self.store().zcard(&pending_key),
                try_join_all(buyers.iter().map(|b| {
                    let key = keys::awaiting(sku, b);
                    async move { self.store().zcard(&key).await }
                })),
            )?;
            Ok::<_, chipgate_state::StateError>((number_fields(tally), pending, awaiting.into_iter().sum::<u64>()))
        }))
        .await?;
        let mut concerned = 0;
        let mut pending = 0;
        let mut awaiting = 0;
        let mut every_snapshot = meta.is_some();
        let mut last_ms = meta.as_ref().map(|m| m.observed_ms).unwrap_or(0);
        for (tally, p, a) in &per_product {
            match tally.get(CONCERNED) {
                Some(n) => concerned += n,
                None => every_snapshot = false,
            }
            pending += p;
            awaiting += a;
            last_ms = last_ms.max(tally.get(LAST_MS).copied().unwrap_or(0));
        }
        let settled = every_snapshot && pending == 0;
        Ok(pb::GetWaveProgressResponse {
            progress: Some(pb::WaveProgress {
                wave_id: req.wave_id.clone(),
                observed: meta.is_some(),
                orders_concerned: concerned,
                orders_evaluated: concerned.saturating_sub(pending),
                orders_backordered: count(OrderStatus::Backordered),
                orders_reserved: count(OrderStatus::Reserved),
                orders_confirmed: count(OrderStatus::Confirmed),
                orders_shipped: count(OrderStatus::Shipped),
                orders_awaiting: awaiting,
                units_held: figures.get(UNITS_HELD).copied().unwrap_or(0),
                observe_time: meta.as_ref().and_then(|m| ts_opt(m.observed_ms)),
                settle_time: if settled { ts_opt(last_ms) } else { None },
            }),
        })
    }
}

/// The integer fields of a hash (others dropped; negative figures read as 0).
fn number_fields(fields: Vec<(String, Vec<u8>)>) -> HashMap<String, u64> {
    fields
        .into_iter()
        .filter_map(|(f, v)| Some((f, std::str::from_utf8(&v).ok()?.parse::<i64>().ok()?.max(0) as u64)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wave_lists_its_products_with_their_buyers() {
        let m = WaveMeta {
            wave_id: "wave-1".into(),
            queues: vec!["H200|bytedance".into(), "H20|alibaba".into(), "H200|tencent".into(), "junk".into()],
            ..Default::default()
        };
        let p = m.products();
        assert_eq!(p.get("H200"), Some(&vec!["bytedance", "tencent"]));
        assert_eq!(p.get("H20"), Some(&vec!["alibaba"]));
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn snapshot_steps_group_small_queues_and_split_long_ones_into_pages() {
        let q = |steps: &[&[(&str, u64)]]| -> Vec<Vec<(String, u64)>> {
            steps.iter().map(|s| s.iter().map(|(n, l)| (n.to_string(), *l)).collect()).collect()
        };
        let names = |n: &[&str]| n.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        // Each whole queue may copy one more than its size said (its page comes up short: done).
        let steps: Vec<_> =
            snapshot_steps(names(&["a", "b", "c", "d", "e", "f"]), &[4, 6, 0, 25, 3, 3], || 10).collect();
        assert_eq!(
            steps,
            q(&[&[("a", 5), ("b", 7)], &[("d", 10)], &[("d", 10)], &[("d", 6), ("e", 4), ("f", 2)], &[("f", 2)]]),
            "empty c left out, d a page per step, every step filled"
        );
        assert_eq!(snapshot_steps(names(&["a"]), &[0], || 10).count(), 0);
        // The limit as it stands when each step is cut: 10, then 4 (someone waits), then 10 again.
        let mut limits = [10, 4, 10].into_iter();
        let steps: Vec<_> =
            snapshot_steps(names(&["a", "b", "c", "d", "e"]), &[3, 3, 3, 3, 3], || limits.next().unwrap_or(10))
                .collect();
        assert_eq!(
            steps,
            q(&[&[("a", 4), ("b", 4), ("c", 4), ("d", 1)], &[("d", 3), ("e", 2)], &[("e", 2)]]),
            "d split by the room left in the first step, e by the shorter second"
        );
    }

    /// A wave's snapshot of three queues (25,000 waiting orders) taken in steps holds exactly their
    /// orders, counts each once, and is marked taken; taking it again changes nothing. While it is
    /// being taken it can't be settled; a delivery that stopped part-way, one queue copied whole (as
    /// an earlier version did) and another a page into, is finished by the next one without
    /// counting any order twice; orders placed after the publication are not taken.
    #[tokio::test]
    async fn a_snapshot_is_taken_in_steps_counted_once_and_never_settled_half_taken() {
        let store = chipgate_state::Store::memory();
        let (svc, shutdown) = crate::test_service(store.clone(), crate::Options::default());
        let (sku, wave) = (Sku::from_trusted("H200"), WaveId::from_trusted("wave-1"));
        let buyers = ["alibaba", "bytedance", "tencent"];
        let queue = |b: &str| keys::awaiting(&sku, &BuyerId::from_trusted(b));
        let sizes = [12_000, 9_000, 4_000];
        let mut t = Txn::new();
        let mut seq = 0u32;
        for (b, n) in buyers.iter().zip(sizes) {
            for _ in 0..n {
                seq += 1;
                t.zadd(queue(b), format!("ord-H200-{seq}"), f64::from(seq));
            }
        }
        store.commit(&t).await.unwrap();
        store.incr(&keys::seq(&sku), u64::from(seq)).await.unwrap();
        let pending = keys::wave_pending(&wave, &sku);
        let tally = keys::wave_tally(&wave, &sku);
        let steps = keys::wave_snapshot_steps(&wave, &sku);
        let concerned = || {
            let (store, key) = (store.clone(), tally.clone());
            async move { number_fields(store.hgetall(&key).await.unwrap()).get(CONCERNED).copied() }
        };

        // A delivery that stopped after two steps: the wave is unsettled, the snapshot holds the
        // first queue (copied whole, marked `1`), the first 5,000 of the second and the sentinel.
        let mut t = Txn::new();
        t.zadd(pending.clone(), TAKING, 0.0).hincr(tally.clone(), CONCERNED, 0);
        t.sadd(keys::unsettled_waves(&sku), &wave);
        // The earlier version's step: the queue's members added, counted, and the queue marked.
        t.hset(steps.clone(), queue("alibaba"), b"1".to_vec()).hincr(tally.clone(), CONCERNED, 12_000);
        for i in 1..=12_000 {
            t.zadd(pending.clone(), format!("ord-H200-{i}"), f64::from(i));
        }
        let page = ((tally.clone(), CONCERNED.to_string()), (steps.clone(), queue("bytedance")));
        t.zcopy_page(pending.clone(), queue("bytedance"), f64::from(seq), 5_000, page.0, page.1);
        store.commit(&t).await.unwrap();
        assert_eq!(concerned().await, Some(17_000));
        // A round evaluates the first queue's orders and the second's first 1,000 (they stay
        // waiting in their queues), and finds nothing else in the snapshot: not settled.
        let ids: Vec<String> = (1..=13_000).map(|i| format!("ord-H200-{i}")).collect();
        let mut t = Txn::new();
        evaluated(&mut t, &sku, std::slice::from_ref(&wave), ids, 5);
        store.commit(&t).await.unwrap();
        svc.settle_waves(&sku, std::slice::from_ref(&wave)).await.unwrap();
        assert_eq!(svc.unsettled_waves(&sku).await.unwrap(), vec![wave.clone()], "half taken: not settled");
        // An order placed after the publication joins a queue.
        let mut t = Txn::new();
        t.zadd(queue("tencent"), "ord-H200-25001", 25_001.0);
        store.commit(&t).await.unwrap();
        store.incr(&keys::seq(&sku), 1).await.unwrap();

        // The next delivery finishes it (the bound is read anew: the late order is taken too, as it
        // is in the wave's buyers' queues when this delivery starts), each order counted once.
        svc.take_snapshot(&wave, &sku, &buyers).await.unwrap();
        assert_eq!(concerned().await, Some(25_001), "each order once");
        let members = store.zrange(&pending, 0, -1, false).await.unwrap();
        assert_eq!(members.len(), 12_001, "the second queue's last 8,000 and the third queue");
        assert!(members.iter().all(|(m, _)| m != TAKING), "the sentinel is out once taken");
        assert!(store.get(&[keys::wave_snapshot_taken(&wave, &sku)]).await.unwrap()[0].is_some(), "marked taken");
        assert!(store.hgetall(&steps).await.unwrap().is_empty(), "steps forgotten");
        // Taken: a redelivery adds nothing, even an order placed since (after the counter was read).
        let mut t = Txn::new();
        t.zadd(queue("tencent"), "ord-H200-99999", 99_999.0);
        store.commit(&t).await.unwrap();
        svc.take_snapshot(&wave, &sku, &buyers).await.unwrap();
        assert_eq!(concerned().await, Some(25_001));
        assert_eq!(store.zcard(&pending).await.unwrap(), 12_001);

        // Another wave's snapshot, taken while the counter stands at 25,001: the order placed after
        // it was read is not taken.
        let later = WaveId::from_trusted("wave-2");
        svc.take_snapshot(&later, &sku, &buyers).await.unwrap();
        let taken = store.zrange(&keys::wave_pending(&later, &sku), 0, -1, false).await.unwrap();
        assert_eq!(taken.len(), 25_001, "every waiting order up to the counter, none placed after it");
        assert!(taken.iter().all(|(m, _)| m != "ord-H200-99999"));
        shutdown.trigger();
    }

    /// A commit that takes an order out of waiting, decided from the waves read before a snapshot
    /// started (the snapshot copied the order, still waiting), conflicts instead of landing and
    /// leaving the order in the snapshot for good; decided again from a fresh read, it leaves it,
    /// and the wave settles. A snapshot of another product moves nothing here.
    #[tokio::test]
    async fn leaving_waiting_conflicts_with_a_snapshot_started_since_the_waves_were_read() {
        let store = chipgate_state::Store::memory();
        let (svc, shutdown) = crate::test_service(store.clone(), crate::Options::default());
        let (sku, other, wave) = (Sku::from_trusted("H200"), Sku::from_trusted("H20"), WaveId::from_trusted("wave-1"));
        let mut t = Txn::new();
        t.zadd(keys::awaiting(&sku, &BuyerId::from_trusted("alibaba")), "ord-H200-1", 1.0);
        store.commit(&t).await.unwrap();
        store.incr(&keys::seq(&sku), 1).await.unwrap();

        // A round reads the waves (none yet), then decides to reserve ord-H200-1.
        let read = svc.unsettled(&sku).await.unwrap();
        assert!(read.waves.is_empty());
        let decided = |u: &Unsettled| {
            let mut t = Txn::new();
            t.hset(keys::dirty(&sku), "moved", b"1".to_vec());
            u.leave(&mut t, &sku, vec!["ord-H200-1".to_string()], 7);
            t
        };
        // Another product's snapshot in between changes nothing for this one.
        svc.take_snapshot(&wave, &other, &["alibaba"]).await.unwrap();
        store.commit(&decided(&read)).await.expect("another product's wave: no conflict");
        // The wave's snapshot of this product starts and copies the order, still waiting.
        svc.take_snapshot(&wave, &sku, &["alibaba"]).await.unwrap();
        let pending = keys::wave_pending(&wave, &sku);
        assert_eq!(store.zcard(&pending).await.unwrap(), 1);
        let lost = store.commit(&decided(&read)).await;
        assert!(matches!(lost, Err(CommitError::Conflict { .. })), "decided before the snapshot: {lost:?}");
        // Redone from a fresh read: the order leaves the snapshot in the same commit, and the wave
        // settles.
        let now = svc.unsettled(&sku).await.unwrap();
        assert_eq!(now.waves, vec![wave.clone()]);
        assert!(now.epoch > read.epoch);
        store.commit(&decided(&now)).await.expect("knowing the wave");
        assert_eq!(store.zcard(&pending).await.unwrap(), 0);
        svc.settle_waves(&sku, &now.waves).await.unwrap();
        assert!(svc.unsettled_waves(&sku).await.unwrap().is_empty(), "settled");
        // Nothing left waiting: no guard, no conflict whatever started meanwhile.
        let mut t = Txn::new();
        read.leave(&mut t, &sku, Vec::new(), 9);
        assert!(t.is_empty());
        shutdown.trigger();
    }

    #[tokio::test]
    async fn evaluation_leaves_the_snapshot_of_every_unsettled_wave_and_a_settled_one_keeps_its_time() {
        let store = chipgate_state::Store::memory();
        let mut t = Txn::new();
        let (h200, w1, w2) =
            (Sku::from_trusted("H200"), WaveId::from_trusted("wave-1"), WaveId::from_trusted("wave-2"));
        let waves = [w1.clone(), w2.clone()];
        t.zadd(keys::wave_pending(&w1, &h200), "ord-1", 1.0);
        t.zadd(keys::wave_pending(&w2, &h200), "ord-1", 1.0).zadd(keys::wave_pending(&w2, &h200), "ord-2", 2.0);
        store.commit(&t).await.unwrap();
        let last = |w: &WaveId| {
            let (store, key) = (store.clone(), keys::wave_tally(w, &h200));
            async move { number_fields(store.hgetall(&key).await.unwrap()).get(LAST_MS).copied() }
        };

        let mut t = Txn::new();
        evaluated(&mut t, &h200, &waves, vec!["ord-1".to_string()], 7);
        store.commit(&t).await.unwrap();
        assert_eq!((last(&w1).await, last(&w2).await), (Some(7), Some(7)));
        assert_eq!(store.zcard(&keys::wave_pending(&w1, &h200)).await.unwrap(), 0);

        // A later round still lists both waves as unsettled (its list is read before the marks are
        // cleared) and evaluates orders wave-1 doesn't hold: wave-1 settled at 7 and stays there.
        let mut t = Txn::new();
        evaluated(&mut t, &h200, &waves, vec!["ord-2".to_string(), "ord-3".to_string()], 9);
        store.commit(&t).await.unwrap();
        assert_eq!((last(&w1).await, last(&w2).await), (Some(7), Some(9)));

        let mut none = Txn::new();
        evaluated(&mut none, &h200, &waves, Vec::new(), 11);
        assert!(none.is_empty());
    }
}
