//! The event consumers: licensing and inventory changes become dirty marks on exactly the products
//! (and buyers) they concern.
//!
//! Each replica reads licensing's stream and every product's inventory stream (inventory's state is
//! partitioned by product, its events with it; new products are found in the catalogue) through the
//! consumer group `orders`, so every event goes to one replica. An event is acknowledged only after its marks are committed; if a replica dies holding
//! events, another takes them over once they have been pending for `claim_idle`. Marks are idempotent,
//! so an event applied twice changes nothing more than applying it once.

use chipgate_runtime::service::Records;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use chipgate_domain::ids::{BuyerId, OrderId, Sku};
use chipgate_domain::orders::{Cause, CauseKind, OrderStatus};
use chipgate_proto::inventory::v1 as ipb;
use chipgate_proto::licensing::v1 as lpb;
use chipgate_runtime::time::now_ms;
use chipgate_runtime::{RequestContext, Shutdown, telemetry};
use chipgate_state::{Backend, StreamEntry, Txn};
use prost::Message;
use tracing::Instrument;

use crate::marks::{self, Who};
use crate::{EffectOnly, Error, Orders, book, keys};

/// The consumer group of the orders service on both streams.
pub(crate) const GROUP: &str = chipgate_contract::ORDERS_GROUP;

/// Which stream a consumer follows.
#[derive(Clone, Debug)]
pub(crate) enum Source {
    /// Licensing's desk events (applications, waves being decided, domestic purchases).
    Licensing,
    /// One product's licensing events (its licences, a wave's part for it, quota, gates).
    LicensingProduct(Sku),
    /// One product's inventory events.
    Inventory(Sku),
}

impl Source {
    pub(crate) fn stream(&self) -> String {
        match self {
            Source::Licensing => chipgate_contract::streams::licensing(),
            Source::LicensingProduct(sku) => chipgate_contract::streams::licensing_product(sku),
            Source::Inventory(sku) => chipgate_contract::streams::inventory(sku),
        }
    }

    /// The label the metrics use.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Source::Licensing | Source::LicensingProduct(_) => "licensing",
            Source::Inventory(_) => "inventory",
        }
    }
}

/// Follows licensing's desk stream, every product's licensing stream and every product's inventory
/// stream until shutdown: a consumer per stream, one more for each product the catalogue (or
/// licensing's list of products) names later (its consumer group starts at the stream's beginning,
/// so nothing it carried before is missed).
///
/// New products are looked for every [`crate::Options::discover_every`], and at once when the desk
/// consumer applied events or a placement names a product new to this replica
/// ([`crate::Orders::discover_soon`]). Before, only the periodic look found them: a wave published
/// within two seconds of its products' first licensing change (a fresh deployment, a new product)
/// waited for it, with its events in a stream nobody read (measured: the first order of a 100k
/// wave moved 480 ms later than it could).
pub(crate) async fn run_all(svc: Orders, shutdown: Shutdown) {
    tokio::spawn(run(svc.clone(), Source::Licensing, shutdown.clone()));
    let mut inventory = std::collections::HashSet::new();
    let mut licensing = std::collections::HashSet::new();
    loop {
        match chipgate_contract::catalogue::all(svc.store()).await {
            Ok(skus) => {
                for sku in skus {
                    if inventory.insert(sku.clone()) {
                        tokio::spawn(run(svc.clone(), Source::Inventory(sku), shutdown.clone()));
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "can't read the catalogue to follow its products' streams; retrying"),
        }
        match chipgate_contract::licensing_products::all(svc.store()).await {
            Ok(skus) => {
                for sku in skus {
                    if licensing.insert(sku.clone()) {
                        tokio::spawn(run(svc.clone(), Source::LicensingProduct(sku), shutdown.clone()));
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "can't read licensing's products to follow their streams; retrying"),
        }
        tokio::select! {
            () = shutdown.wait() => return,
            () = tokio::time::sleep(svc.options().discover_every) => {}
            () = svc.inner.discover.notified() => {}
        }
    }
}

fn licensing_kind(ev: &lpb::LicensingEvent) -> &'static str {
    use lpb::licensing_event::Kind;
    match &ev.kind {
        Some(Kind::ApplicationChanged(_)) => "application_changed",
        Some(Kind::WaveChanged(_)) => "wave_changed",
        Some(Kind::WavePublished(_)) => "wave_published",
        Some(Kind::LicenseChanged(_)) => "license_changed",
        Some(Kind::QuotaChanged(_)) => "quota_changed",
        Some(Kind::DomesticPurchaseRecorded(_)) => "domestic_purchase_recorded",
        Some(Kind::ExportAuthorizationChanged(_)) => "export_authorization_changed",
        Some(Kind::ImportPolicyChanged(_)) => "import_policy_changed",
        None => "unknown",
    }
}

fn inventory_kind(ev: &ipb::InventoryEvent) -> &'static str {
    use ipb::inventory_event::Kind;
    match &ev.kind {
        Some(Kind::SupplyReceived(_)) => "supply_received",
        Some(Kind::HoldsPlaced(_)) => "holds_placed",
        Some(Kind::HoldsReleased(_)) => "holds_released",
        Some(Kind::HoldsExpired(_)) => "holds_expired",
        Some(Kind::HoldsConfirmed(_)) => "holds_confirmed",
        Some(Kind::HoldsShipped(_)) => "holds_shipped",
        Some(Kind::ProductUpserted(_)) => "product_upserted",
        None => "unknown",
    }
}

/// Follows one stream until shutdown.
pub(crate) async fn run(svc: Orders, source: Source, shutdown: Shutdown) {
    let stream = source.stream();
    loop {
        match svc.store().group_ensure(&stream, GROUP).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(%stream, error = %e, "can't join the consumer group yet; retrying");
                tokio::select! {
                    () = shutdown.wait() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
    let claim_every = svc.options().claim_idle / 2;
    // None: claim at once. (Not `now - claim_every`, which panics when the monotonic clock started
    // less than that long ago, e.g. a long --claim-idle on a freshly booted host.)
    let mut last_claim: Option<Instant> = None;
    loop {
        if shutdown.is_triggered() {
            return;
        }
        let mut entries = Vec::new();
        if last_claim.is_none_or(|t| t.elapsed() >= claim_every) {
            last_claim = Some(Instant::now());
            match svc.store().autoclaim(&stream, GROUP, &svc.inner.consumer, svc.options().claim_idle, 256).await {
                Ok(claimed) => {
                    if !claimed.is_empty() {
                        tracing::info!(%stream, events = claimed.len(), "took over events a stalled replica left pending");
                    }
                    entries = claimed;
                }
                Err(e) if e.is_missing_group() => rejoin(&svc, &stream).await,
                Err(e) => tracing::warn!(%stream, error = %e, "can't claim pending events"),
            }
        }
        if entries.is_empty() {
            let read = tokio::select! {
                () = shutdown.wait() => return,
                r = svc.store().read_group(&stream, GROUP, &svc.inner.consumer, 256, Some(Duration::from_secs(2))) => r,
            };
            match read {
                Ok(e) => entries = e,
                Err(e) if e.is_missing_group() => {
                    rejoin(&svc, &stream).await;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(%stream, error = %e, "can't read events; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            }
        }
        if entries.is_empty() {
            continue;
        }
        match svc.apply_events(&source, &entries).await {
            Ok((products, kinds)) => {
                for kind in kinds {
                    svc.inner
                        .counters
                        .events
                        .get_or_create(&[("stream", source.name().into()), ("kind", kind.into())])
                        .inc();
                }
                let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
                if let Err(e) = svc.store().ack(&stream, GROUP, &ids).await {
                    tracing::warn!(%stream, error = %e, "can't acknowledge events; they will be applied again (harmlessly)");
                }
                for sku in products {
                    svc.inner.scheduler.request(&sku);
                }
                // A desk event (a wave decided, an application) often comes just before the first
                // events of a product nobody follows yet.
                if matches!(source, Source::Licensing) {
                    svc.discover_soon();
                }
            }
            Err(e) => {
                // Not acknowledged: they stay pending and are claimed again after `claim_idle`.
                tracing::warn!(%stream, error = ?e, "can't apply events; they will be retried");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Creates the consumer group again when it is gone. Groups are created without waiting for a
/// replica, so a Redis failover soon after one was created can lose it (and with it where the group
/// had got to); its consumers would otherwise fail every read from then on and the stream's events
/// would never be applied. The new group starts at the stream's beginning: every event still in the
/// stream is applied again, which changes nothing (marks are idempotent), and none is missed.
async fn rejoin(svc: &Orders, stream: &str) {
    tracing::warn!(%stream, "the orders consumer group is gone (lost in a redis failover?); creating it again from the stream's start");
    if let Err(e) = svc.store().group_ensure(stream, GROUP).await {
        tracing::warn!(%stream, error = %e, "can't create the consumer group again; retrying");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The transaction collecting the marks of product `sku`.
fn at<'a>(marks: &'a mut BTreeMap<String, Txn>, sku: &str) -> &'a mut Txn {
    marks.entry(sku.to_string()).or_default()
}

/// The span one event is handled in (a child of the span that made the change) and its traceparent,
/// which the marks it sets carry on to the reconciliation rounds.
fn consume_span(traceparent: &str, kind: &'static str) -> (tracing::Span, String) {
    let mut ctx = RequestContext::background("consume", (!traceparent.is_empty()).then_some(traceparent));
    let span = telemetry::work_span(&mut ctx, "consume event", kind, &[]);
    (span, ctx.traceparent())
}

impl Orders {
    /// Looks for product streams to follow now rather than at the next periodic look ([`run_all`]).
    /// Cheap to call often: wake-ups while a look runs add up to one more.
    pub(crate) fn discover_soon(&self) {
        self.inner.discover.notify_one();
    }

    /// Turns events into marks (and expiries); returns the products concerned.
    /// Each event is handled in its own span, continuing the trace of the change that caused it.
    async fn apply_events(
        &self,
        source: &Source,
        entries: &[StreamEntry],
    ) -> Result<(BTreeSet<String>, Vec<&'static str>), Error> {
        // Marks per product, each committed in its product's partition.
        let mut t: BTreeMap<String, Txn> = BTreeMap::new();
        let mut products = BTreeSet::new();
        let mut kinds = Vec::with_capacity(entries.len());
        for e in entries {
            let Some(raw) = e.field(chipgate_contract::EVENT_FIELD) else { continue };
            match source {
                Source::Licensing | Source::LicensingProduct(_) => match lpb::LicensingEvent::decode(raw) {
                    Ok(ev) => {
                        kinds.push(licensing_kind(&ev));
                        let (span, tp) = consume_span(&ev.traceparent, licensing_kind(&ev));
                        self.licensing_event(&mut t, &mut products, ev, &tp).instrument(span).await?
                    }
                    Err(err) => tracing::warn!(id = %e.id, error = %err, "undecodable licensing event skipped"),
                },
                Source::Inventory(_) => match ipb::InventoryEvent::decode(raw) {
                    Ok(ev) => {
                        kinds.push(inventory_kind(&ev));
                        let (span, tp) = consume_span(&ev.traceparent, inventory_kind(&ev));
                        self.inventory_event(&mut t, &mut products, ev, &tp).instrument(span).await?
                    }
                    Err(err) => tracing::warn!(id = %e.id, error = %err, "undecodable inventory event skipped"),
                },
            }
        }
        // Marks are idempotent: if one product's commit fails, the events are not acknowledged and the
        // redelivery sets every mark again.
        for (sku, txn) in t {
            if !txn.is_empty() {
                self.store().commit(&txn).await.map_err(|e| Error::Internal(format!("marks of {sku}: {e}")))?;
            }
        }
        Ok((products, kinds))
    }

    async fn licensing_event(
        &self,
        t: &mut BTreeMap<String, Txn>,
        products: &mut BTreeSet<String>,
        ev: lpb::LicensingEvent,
        tp: &str,
    ) -> Result<(), Error> {
        use lpb::licensing_event::Kind;
        match ev.kind {
            Some(Kind::WavePublished(w)) => {
                let cause = Cause::new(CauseKind::WavePublished, &w.wave_id);
                for l in &w.licenses {
                    // Events are our own services' records: their ids were parsed on entry.
                    let sku = Sku::from_trusted(l.product_sku.as_str());
                    marks::awaiting(at(t, &sku), &sku, Who::Buyer(&l.buyer_id), &cause, tp);
                    products.insert(l.product_sku.clone());
                }
                self.observe_wave(&w, ev.time.as_ref()).await?;
            }
            Some(Kind::LicenseChanged(c)) => {
                let to = c.to_state();
                let kind = match to {
                    lpb::LicenseState::Suspended => CauseKind::LicenseSuspended,
                    lpb::LicenseState::Revoked => CauseKind::LicenseRevoked,
                    _ if c.from_state() == lpb::LicenseState::PendingTerms => CauseKind::TermsFinalized,
                    _ => CauseKind::LicenseReinstated,
                };
                let cause = Cause::new(kind, &c.license_id);
                let sku = Sku::from_trusted(c.product_sku.as_str());
                if matches!(to, lpb::LicenseState::Suspended | lpb::LicenseState::Revoked) {
                    marks::holders(at(t, &sku), &sku, Who::Buyer(&c.buyer_id), &cause, tp);
                }
                marks::awaiting(at(t, &sku), &sku, Who::Buyer(&c.buyer_id), &cause, tp);
                products.insert(c.product_sku);
            }
            Some(Kind::DomesticPurchaseRecorded(d)) => {
                let cause = Cause::new(CauseKind::DomesticPurchase, &d.buyer_id);
                let buyer = BuyerId::from_trusted(d.buyer_id.as_str());
                for sku in self.store().smembers(&keys::buyer_products(&buyer)).await? {
                    let sku = Sku::from_trusted(sku);
                    marks::awaiting(at(t, &sku), &sku, Who::Buyer(&d.buyer_id), &cause, tp);
                    products.insert(sku.into_string());
                }
            }
            Some(Kind::ExportAuthorizationChanged(x)) => {
                let sku = Sku::from_trusted(x.product_sku.as_str());
                if x.active {
                    marks::awaiting(
                        at(t, &sku),
                        &sku,
                        Who::All,
                        &Cause::new(CauseKind::ExportAuthorized, &x.product_sku),
                        tp,
                    );
                } else {
                    marks::holders(
                        at(t, &sku),
                        &sku,
                        Who::All,
                        &Cause::new(CauseKind::ExportRevoked, &x.product_sku),
                        tp,
                    );
                    marks::awaiting(
                        at(t, &sku),
                        &sku,
                        Who::All,
                        &Cause::new(CauseKind::ExportRevoked, &x.product_sku),
                        tp,
                    );
                }
                products.insert(x.product_sku);
            }
            Some(Kind::ImportPolicyChanged(p)) => {
                let sku = Sku::from_trusted(p.product_sku.as_str());
                if p.to_stance() == lpb::ImportStance::Embargoed {
                    let cause = Cause::new(CauseKind::EmbargoSet, &p.product_sku);
                    marks::holders(at(t, &sku), &sku, Who::All, &cause, tp);
                    marks::awaiting(at(t, &sku), &sku, Who::All, &cause, tp);
                } else {
                    marks::awaiting(
                        at(t, &sku),
                        &sku,
                        Who::All,
                        &Cause::new(CauseKind::EmbargoLifted, &p.product_sku),
                        tp,
                    );
                }
                products.insert(p.product_sku);
            }
            Some(Kind::QuotaChanged(q)) => {
                let sku = Sku::from_trusted(q.product_sku.as_str());
                // Quota given back (an order cancelled, expired or unwound) may let a waiting order of
                // the same buyer through.
                for r in q.reservations.iter().filter(|r| r.state() == lpb::ReservationState::Released && r.units > 0) {
                    marks::awaiting(
                        at(t, &sku),
                        &sku,
                        Who::Buyer(&r.buyer_id),
                        &Cause::new(CauseKind::QuotaReturned, &r.license_id),
                        tp,
                    );
                    products.insert(q.product_sku.clone());
                }
            }
            Some(Kind::ApplicationChanged(_) | Kind::WaveChanged(_)) | None => {}
        }
        Ok(())
    }

    async fn inventory_event(
        &self,
        t: &mut BTreeMap<String, Txn>,
        products: &mut BTreeSet<String>,
        ev: ipb::InventoryEvent,
        tp: &str,
    ) -> Result<(), Error> {
        use ipb::inventory_event::Kind;
        let sku = Sku::from_trusted(ev.stock.as_ref().map(|s| s.product_sku.clone()).unwrap_or_default());
        match ev.kind {
            Some(Kind::SupplyReceived(r)) => {
                let receipt = r.receipt.map(|r| r.receipt_id).unwrap_or_default();
                marks::drain(at(t, &sku), &sku, &Cause::new(CauseKind::SupplyReceived, &receipt), tp);
                products.insert(sku.into_string());
            }
            Some(Kind::HoldsReleased(r)) if r.units_freed > 0 => {
                marks::drain(at(t, &sku), &sku, &Cause::new(CauseKind::StockReleased, &sku), tp);
                products.insert(sku.into_string());
            }
            Some(Kind::HoldsExpired(x)) => {
                for h in &x.reservations {
                    self.expire_order(&OrderId::from_trusted(h.order_id.as_str()), h.generation, tp).await?;
                }
                marks::drain(at(t, &sku), &sku, &Cause::new(CauseKind::StockReleased, &sku), tp);
                products.insert(sku.into_string());
            }
            _ => {}
        }
        Ok(())
    }

    /// An order's hold expired in inventory: RESERVED → EXPIRED, its quota owed back.
    async fn expire_order(&self, order_id: &OrderId, generation: u64, traceparent: &str) -> Result<(), Error> {
        let ctx = RequestContext::background("expire", Some(traceparent));
        self.run_txn(None, || async {
            let Some((ver, o)) = self.load_order(keys::order(order_id)).await? else {
                return Ok((Txn::new(), EffectOnly {}));
            };
            if o.status() != OrderStatus::Reserved || o.generation != generation {
                return Ok((Txn::new(), EffectOnly {}));
            }
            let mut new = o.clone();
            new.expire(now_ms()).map_err(|e| Error::Internal(format!("order {order_id}: {e}")))?;
            let mut t = Txn::new();
            let mut events = book::Events::traced(&ctx);
            book::write(&mut t, &mut events, ver, Some(&o.before()), &new);
            events.flush(&mut t);
            Ok((t, EffectOnly {}))
        })
        .await?;
        self.inner.cleanup_wake.notify_one();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chipgate_domain::ids::Sku;
    use chipgate_proto::licensing::v1 as lpb;
    use chipgate_state::{Backend, Store, Txn};
    use prost::Message;

    use crate::{Options, Orders};

    /// Licensing events of `kind` this replica applied, by its metrics.
    async fn applied(svc: &Orders, kind: &str) -> u64 {
        let text = svc.metrics().render().await;
        text.lines()
            .filter(|l| l.starts_with("chipgate_events_processed") && l.contains(&format!("kind=\"{kind}\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// Waits (bounded) until `kind` was applied `n` times; false if it never was.
    async fn until_applied(svc: &Orders, kind: &str, n: u64) -> bool {
        for _ in 0..400 {
            if applied(svc, kind).await >= n {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    fn event(kind: lpb::licensing_event::Kind) -> Vec<(String, Vec<u8>)> {
        let ev = lpb::LicensingEvent { kind: Some(kind), ..Default::default() };
        vec![(chipgate_contract::EVENT_FIELD.to_string(), ev.encode_to_vec())]
    }

    /// A product licensing starts keeping state for after the service started is followed as soon
    /// as a desk event comes, not at the next periodic look (an hour away here): its events are
    /// applied.
    #[tokio::test]
    async fn a_desk_event_makes_the_service_follow_new_products_at_once() {
        let store = Store::memory();
        let options = Options { discover_every: Duration::from_secs(3600), ..Options::default() };
        let (svc, shutdown) = crate::test_service(store.clone(), options);
        let desk = || {
            let mut t = Txn::new();
            let wave = lpb::WaveChanged { wave_id: "wave-1".into() };
            t.xadd(chipgate_contract::streams::licensing(), event(lpb::licensing_event::Kind::WaveChanged(wave)), None);
            t
        };
        // The desk consumer runs (and the first look, at start, found no licensing product).
        store.commit(&desk()).await.expect("desk event");
        assert!(until_applied(&svc, "wave_changed", 1).await, "the desk stream is followed from the start");

        // Licensing registers a product and writes its first event, in the product's stream.
        let sku = Sku::from_trusted("H100-NEW");
        let mut t = Txn::new();
        t.zadd(chipgate_contract::licensing_products::key(), sku.as_str(), 0.0);
        store.commit(&t).await.expect("product registered");
        let changed = lpb::LicenseChanged {
            license_id: "lic-1".into(),
            buyer_id: "buyer-1".into(),
            product_sku: sku.to_string(),
            from_state: lpb::LicenseState::PendingTerms as i32,
            to_state: lpb::LicenseState::Active as i32,
            reason: String::new(),
        };
        let mut t = Txn::new();
        t.xadd(
            chipgate_contract::streams::licensing_product(&sku),
            event(lpb::licensing_event::Kind::LicenseChanged(changed)),
            None,
        );
        store.commit(&t).await.expect("product event");
        // Then the desk event of the wave that licensed it.
        store.commit(&desk()).await.expect("desk event");
        assert!(
            until_applied(&svc, "license_changed", 1).await,
            "the new product's stream was followed after the desk event, without waiting for the periodic look"
        );
        shutdown.trigger();
    }
}
