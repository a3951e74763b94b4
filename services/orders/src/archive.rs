//! Archiving closed orders out of Redis, product by product, and reading them back.
//!
//! An order that closed (shipped, cancelled, expired, rejected) longer ago than the retention window
//! and owes nothing more (no pending releases) is written, as `GetOrder` shows it with its whole
//! history, into its product's next segment ([`chipgate_archive::orders`]), read back and checked,
//! and only then removed from Redis with its indexes — in one transaction in the product's partition
//! that also advances the product's archive cursor (`{ord:SKU}:archive`: segments committed),
//! guarded by every removed order's version and the product's archive lease. A crash before that
//! transaction leaves the orders in Redis and an uncommitted segment that the next run finishes
//! when it holds exactly what Redis holds (else the run stops and names it: a sealed segment is
//! never replaced); after it, the archive holds them. Never neither.
//!
//! What is *not* removed: the per-buyer units (`allocated`) and wave figures, which count what
//! happened and are kept by `book::write` on transitions only; archiving is not a transition.
//!
//! Orders are read through the same decoding as every other read ([`Records::load_many`] and
//! [`crate::convert::order_to`]), so a change of the stored format lands in one place.

use std::time::Duration;

use chipgate_archive::orders::{self as seg, ClosedOrder};
use chipgate_archive::segment;
pub use chipgate_archive::status::Step;
use chipgate_archive::status::{self, Run};
use chipgate_archive::{Problem, Target};
use chipgate_domain::ids::{OrderId, Sku};
use chipgate_domain::orders::{OrderRecord, OrderStatus};
use chipgate_proto::orders::v1 as pb;
use chipgate_runtime::service::Records;
use chipgate_state::{Backend, CommitError, Txn};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::keys::OrderIds;
use crate::{Error, Orders, keys};

/// What wrote a segment (in its manifest).
const WRITTEN_BY: &str = concat!("chipgate-orders ", env!("CARGO_PKG_VERSION"));

/// How long a replica holds a product's archive lease between renewals.
const LEASE_TTL: Duration = Duration::from_secs(120);

/// Orders read per round trip while looking for closed ones.
const SCAN: usize = 1000;

/// The states an order is closed in.
const CLOSED: [OrderStatus; 4] =
    [OrderStatus::Shipped, OrderStatus::Cancelled, OrderStatus::Expired, OrderStatus::Rejected];

/// How the orders archive runs.
#[derive(Clone, Debug)]
pub struct ArchiveOptions {
    /// Where segments go.
    pub target: Target,
    /// Closed orders stay in Redis at least this long after they closed.
    pub retention: Duration,
    /// How often a run starts (0: never by itself; [`Orders::archive_orders`] runs one).
    pub every: Duration,
    /// Most orders per segment.
    pub max_segment_orders: usize,
    /// How long runs may keep failing before `chipgate.orders.v1.Archive` reports NOT_SERVING.
    pub unhealthy_after: Duration,
}

impl ArchiveOptions {
    /// Archiving to `target` with the defaults: 30 days' retention, hourly runs, 5,000 orders per
    /// segment, unhealthy after 6 h of failures.
    pub fn new(target: Target) -> Self {
        ArchiveOptions {
            target,
            retention: Duration::from_secs(30 * 86_400),
            every: Duration::from_secs(3600),
            max_segment_orders: 5000,
            unhealthy_after: Duration::from_secs(6 * 3600),
        }
    }
}

/// The health name that goes NOT_SERVING when archiving orders keeps failing.
pub const ARCHIVE_HEALTH: &str = "chipgate.orders.v1.Archive";

fn archive_error(p: Problem) -> Error {
    Error::Internal(format!("orders archive: {p}"))
}

impl Orders {
    /// The archive, when configured.
    pub fn archive_target(&self) -> Option<&Target> {
        self.options().archive.as_ref().map(|a| &a.target)
    }

    /// Segments of `sku` whose trim committed (the archive cursor), with the cursor's version.
    async fn archive_cursor(&self, sku: &Sku) -> Result<(u64, u64), Error> {
        let key = keys::archive_cursor(sku);
        match self.store().get(std::slice::from_ref(&key)).await?.pop().flatten() {
            None => Ok((0, 0)),
            Some(r) => {
                let n = std::str::from_utf8(&r.data).ok().and_then(|s| s.parse().ok());
                Ok((r.version, n.ok_or_else(|| Error::Internal(format!("{key} is not a number")))?))
            }
        }
    }

    /// One run over every product: archives the orders closed at or before `closed_before_ms`, at
    /// most `max_segment_orders` per segment. `stop_after` stops as if the process died after that
    /// step (crash tests; None in production).
    ///
    /// # Errors
    /// No archive, or the archive or Redis failed; other products are still archived and the first
    /// error is returned with what was done.
    pub async fn archive_orders(
        &self,
        closed_before_ms: u64,
        max_segment_orders: usize,
        stop_after: Option<Step>,
    ) -> Result<Run, (Run, Error)> {
        let mut run = Run::default();
        let Some(target) = self.archive_target().cloned() else {
            return Err((run, Error::Internal("no archive is configured (--archive)".into())));
        };
        let skus = match self.store().smembers(&keys::products()).await {
            Ok(s) => s,
            Err(e) => return Err((run, e.into())),
        };
        let products = skus.into_iter().map(|sku| {
            // Products registered by placements, whose SKUs were parsed on entry.
            let sku = Sku::from_trusted(sku);
            (keys::archive_lease(&sku), keys::archive_lease_counter(&sku), sku)
        });
        let first_error = status::each_leased(self.store(), products, LEASE_TTL, stop_after, &mut run, |sku, token| {
            let target = &target;
            async move {
                let mut did = Run::default();
                let done = self
                    .archive_product(target, &sku, token, closed_before_ms, max_segment_orders, stop_after, &mut did)
                    .await;
                (did, done)
            }
        })
        .await;
        match first_error {
            None => Ok(run),
            Some(e) => Err((run, e)),
        }
    }

    /// Closed orders of `sku` old enough to archive, at most `max`, by sequence, with their versions.
    async fn closed_orders(
        &self,
        sku: &Sku,
        closed_before_ms: u64,
        max: usize,
    ) -> Result<Vec<(u64, OrderRecord)>, Error> {
        let mut out = Vec::new();
        for state in CLOSED {
            let index = keys::orders_in(sku, state);
            let mut pos = 0i64;
            loop {
                let ids = self.store().zrange(&index, pos, pos + SCAN as i64 - 1, false).await?;
                if ids.is_empty() {
                    break;
                }
                pos += ids.len() as i64;
                let order_keys: Vec<String> =
                    ids.iter().map(|(m, _)| keys::order(&keys::indexed_order(sku, m))).collect();
                for (version, o) in self.load_orders(&order_keys).await?.into_iter().flatten() {
                    if o.status().is_final() && o.pending.is_empty() && o.update_ms <= closed_before_ms {
                        out.push((version, o));
                    }
                }
            }
        }
        out.sort_by_key(|(_, o)| o.seq);
        out.truncate(max);
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    async fn archive_product(
        &self,
        target: &Target,
        sku: &Sku,
        token: u64,
        closed_before_ms: u64,
        max: usize,
        stop_after: Option<Step>,
        run: &mut Run,
    ) -> Result<(), Error> {
        let crash = |step: Step| Error::Internal(step.crashed());
        loop {
            let (version, committed) = self.archive_cursor(sku).await?;
            let n = committed + 1;
            let previous = if committed == 0 {
                None
            } else {
                let name = segment::orders_manifest(sku, committed);
                let mut sha = seg::manifest_sha256(target, &name)
                    .await
                    .map_err(|e| Error::Internal(format!("orders archive: {e}")))?;
                if sha.is_none() {
                    // Pruned past the legal retention: the marker holds the link.
                    let marker = chipgate_archive::prune::latest(target, &segment::orders_dir(sku))
                        .await
                        .map_err(archive_error)?;
                    sha = marker.and_then(|(_, m)| (m.through == committed).then_some(m.through_manifest_sha256)?);
                }
                Some(sha.ok_or_else(|| {
                    Error::Internal(format!("orders archive: committed segment {name} is missing from the archive"))
                })?)
            };
            let manifest_name = segment::orders_manifest(sku, n);
            let existing =
                target.get(&manifest_name).await.map_err(|e| Error::Internal(format!("orders archive: {e}")))?;
            let (found, data_bytes, adopted) = if existing.is_some() {
                // An earlier run wrote segment n and didn't get to commit it (it crashed, or lost
                // its lease): finish it when it holds exactly what Redis holds, else stop and say so
                // (a sealed segment is never replaced).
                let (found, bytes) = self.adopt_segment(target, sku, &manifest_name, previous.as_deref()).await?;
                (found, bytes, true)
            } else {
                let found = self.closed_orders(sku, closed_before_ms, max.max(1)).await?;
                if found.is_empty() {
                    return Ok(());
                }
                let closed: Vec<ClosedOrder> = found
                    .iter()
                    .map(|(_, o)| ClosedOrder {
                        seq: o.seq,
                        order: crate::convert::order_to(o, 0, true),
                        closed_ms: o.update_ms,
                    })
                    .collect();
                let now = chipgate_runtime::time::now_ms();
                let sealed = seg::seal(sku, n, &closed, previous, now, WRITTEN_BY);
                sealed.write(target).await.map_err(|e| Error::Internal(format!("orders archive: {e}")))?;
                if stop_after == Some(Step::Written) {
                    return Err(crash(Step::Written));
                }
                let (m, json) = segment::read_checked(target, &sealed.manifest_name).await.map_err(archive_error)?;
                let back = seg::check_segment(&sealed.manifest_name, &m, &json, sku).map_err(archive_error)?;
                if back.iter().map(|o| &o.order).ne(closed.iter().map(|o| &o.order)) {
                    return Err(archive_error(Problem {
                        segment: sealed.manifest_name.clone(),
                        sequence: 0,
                        problem: "read back, it is not what Redis holds".into(),
                    }));
                }
                if stop_after == Some(Step::Verified) {
                    return Err(crash(Step::Verified));
                }
                (found, m.data_bytes, false)
            };
            let mut t = Txn::new();
            t.expect_lease(keys::archive_lease(sku), token).replace(
                keys::archive_cursor(sku),
                version,
                n.to_string().into_bytes(),
            );
            let mut freed = 0u64;
            for (v, o) in &found {
                let key = keys::order(&o.typed_id());
                t.expect_version(key.clone(), *v).delete(key);
                let member = keys::index_member(&o.typed_id());
                t.zrem(keys::orders_of(sku, &o.typed_buyer()), &member).zrem(keys::orders_in(sku, o.status()), &member);
                freed += o.to_stored().len() as u64 + 2 * member.len() as u64;
            }
            match self.store().commit(&t).await {
                Ok(_) => {}
                // An order changed meanwhile, or another replica archived: the next run writes
                // this segment again from what Redis then holds.
                Err(CommitError::Conflict { .. } | CommitError::LeaseLost { .. } | CommitError::Fenced { .. }) => {
                    return Ok(());
                }
                Err(CommitError::State(e)) => return Err(e.into()),
            }
            run.segments += 1;
            run.records += found.len() as u64;
            run.bytes += data_bytes;
            run.redis_bytes_freed += freed;
            tracing::info!(sku = %sku, segment = n, orders = found.len(), bytes = data_bytes, "closed orders archived");
            if stop_after == Some(Step::Trimmed) {
                return Err(crash(Step::Trimmed));
            }
            // After finishing an earlier run's segment, go on: more may be due.
            if (!adopted && found.len() < max)
                || !self.store().lease_renew(&keys::archive_lease(sku), token, LEASE_TTL).await?
            {
                return Ok(());
            }
        }
    }

    /// The orders of an uncommitted segment (`name`, number `committed + 1`) as Redis holds them, with
    /// their versions (and the segment's data size), when the segment checks, continues the product's chain of manifests and holds
    /// exactly those orders as they are now.
    async fn adopt_segment(
        &self,
        target: &Target,
        sku: &str,
        name: &str,
        previous: Option<&str>,
    ) -> Result<(Vec<(u64, OrderRecord)>, u64), Error> {
        let refuse = |why: String| {
            archive_error(Problem {
                segment: name.to_string(),
                sequence: 0,
                problem: format!("an unfinished segment {why}, and a sealed segment is never replaced; inspect it"),
            })
        };
        let (m, json) =
            segment::read_checked(target, name).await.map_err(|p| refuse(format!("does not check ({p})")))?;
        if m.previous_manifest_sha256.as_deref() != previous {
            return Err(refuse("does not follow the last committed segment".into()));
        }
        let archived = seg::check_segment(name, &m, &json, sku).map_err(|p| refuse(format!("does not check ({p})")))?;
        // The ids come from a segment that just checked against its manifest's hashes: our own record.
        let order_keys: Vec<String> =
            archived.iter().map(|o| keys::order(&OrderId::from_trusted(o.order.order_id.as_str()))).collect();
        let held = self.load_orders(&order_keys).await?;
        let mut found = Vec::with_capacity(archived.len());
        for (a, h) in archived.iter().zip(held) {
            match h {
                Some((v, o)) if o.pending.is_empty() && crate::convert::order_to(&o, 0, true) == a.order => {
                    found.push((v, o));
                }
                _ => return Err(refuse(format!("holds order {} other than Redis holds it", a.order.order_id))),
            }
        }
        tracing::info!(sku, segment = name, orders = found.len(), "finishing a segment an earlier run wrote");
        Ok((found, m.data_bytes))
    }

    /// An order no longer in Redis: from the archive when the service has one and the order is
    /// there (`archived_in` says where), else NOT_FOUND — with a hint when the product's closed
    /// orders have been archived.
    pub(crate) async fn archived_order(&self, id: &OrderId) -> Result<pb::Order, Error> {
        let Some(sku) = keys::sku_of(id) else { return Err(Error::not_found("order", id)) };
        let seq: u64 = id.rsplit('-').next().and_then(|s| s.parse().ok()).unwrap_or(0);
        let (_, committed) = self.archive_cursor(&sku).await?;
        if let Some(target) = self.archive_target() {
            match seg::find_order(target, &sku, seq).await {
                Ok(Some((mut order, segment))) => {
                    order.archived_in = segment;
                    return Ok(order);
                }
                Ok(None) => {}
                // The archive can't answer now: say so rather than claim the order doesn't exist.
                Err(p) => {
                    tracing::warn!(order = %id, problem = %p, "can't read the archive");
                    return Err(Error::Status(errors_unavailable(id, &p.to_string())));
                }
            }
        }
        if committed == 0 {
            return Err(Error::not_found("order", id));
        }
        let placed = self.store().incr(&keys::seq(&sku), 0).await?;
        if seq == 0 || seq > placed {
            return Err(Error::not_found("order", id));
        }
        let message = format!(
            "order {id:?} is not in Redis: closed orders of {sku} are archived after the retention window ({committed} \
             segments so far){}; read it with `chipgate order show {id} --archive <URL>`",
            if self.archive_target().is_some() { ", but the archive does not hold it" } else { "" }
        );
        let mut details = ErrorDetails::with_resource_info("order", id, "", message.clone());
        details.set_error_info(
            "ORDER_ARCHIVED",
            chipgate_runtime::errors::DOMAIN,
            [("product_sku".to_string(), sku.to_string()), ("segments".to_string(), committed.to_string())],
        );
        Err(Error::Status(Status::with_error_details(Code::NotFound, message, details)))
    }

    /// Runs [`archive_orders`](Self::archive_orders) every `every` until shutdown.
    pub(crate) fn spawn_archiver(&self, shutdown: chipgate_runtime::Shutdown) {
        let Some(options) = self.options().archive.clone() else { return };
        if options.every.is_zero() {
            return;
        }
        self.inner.archive_status.set_unhealthy_after(options.unhealthy_after);
        let service = self.clone();
        let max = options.max_segment_orders;
        chipgate_archive::status::spawn_every(options.every, options.retention, shutdown, move |now, cutoff| {
            let service = service.clone();
            async move {
                match service.archive_orders(cutoff, max, None).await {
                    Ok(run) => service.inner.archive_status.succeeded(&run, now),
                    Err((run, e)) => service.inner.archive_status.failed(&run, &e.describe()),
                }
            }
        });
    }
}

fn errors_unavailable(id: &str, why: &str) -> Status {
    let mut details = ErrorDetails::new();
    details.set_error_info(
        "ARCHIVE_UNAVAILABLE",
        chipgate_runtime::errors::DOMAIN,
        [("order_id".to_string(), id.to_string())],
    );
    Status::with_error_details(
        Code::Unavailable,
        format!("order {id:?} is not in Redis and the archive can't be read now: {why}"),
        details,
    )
}
