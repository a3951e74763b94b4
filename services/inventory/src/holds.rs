//! Holds: taking stock for orders, confirming, releasing and shipping it.
//!
//! A batch of holds for a product is decided against one read of the product's stock and the orders'
//! existing holds, strictly in order ([`HoldPlanner`]), and committed in one transaction guarded by the
//! stock record's version: two batches can never together hold more than is available. A replica that
//! left the stock as it stands plans from what it remembers instead of reading, with the holds it
//! assumes absent guarded too ([`crate::seen`]).

use chipgate_runtime::service::Records;
use std::collections::BTreeMap;

use chipgate_domain::ids::{OrderId, Sku};
use chipgate_domain::inventory::{HoldAsk, HoldOutcome, HoldPlanner, HoldRecord, HoldStatus, StockRecord};
use chipgate_proto::inventory::v1 as pb;
use chipgate_runtime::errors::Violations;
use chipgate_runtime::paging::Page;
use chipgate_runtime::time::now_ms;
use chipgate_runtime::txn::{IdemKey, TxnError, turns};
use chipgate_runtime::{RequestContext, validate};
use chipgate_state::{Backend, CommitError, Txn};

use crate::convert::{HoldBatch, ReleaseBatch, hold_status_from, hold_to, stock_to};
use crate::{Error, Inventory, emit, encode, keys, put_hold};

fn outcome_to(o: HoldOutcome) -> pb::ReserveOutcome {
    match o {
        HoldOutcome::Held => pb::ReserveOutcome::Held,
        HoldOutcome::Partial => pb::ReserveOutcome::Partial,
        HoldOutcome::NotServed => pb::ReserveOutcome::NotServed,
        HoldOutcome::Stale => pb::ReserveOutcome::Stale,
    }
}

/// Indexes a hold once, when it is first stored.
fn index_new_hold(t: &mut Txn, h: &HoldRecord) {
    // A hold's product was parsed when the hold was asked for.
    t.zadd(keys::holds_of(&Sku::from_trusted(h.sku.as_str())), &h.order_id, h.create_ms as f64);
}

/// Keeps the expiry index in step with a hold: listed while complete and unconfirmed.
fn index_expiry(t: &mut Txn, h: &HoldRecord) {
    let sku = Sku::from_trusted(h.sku.as_str());
    if h.status() == HoldStatus::Held && h.is_complete() && h.expire_ms != 0 {
        t.zadd(keys::expiry(&sku), &h.order_id, h.expire_ms as f64);
    } else {
        t.zrem(keys::expiry(&sku), &h.order_id);
    }
}

/// A batch of holds planned ([`Inventory::plan_holds`]), not committed yet.
struct PlannedHolds {
    /// Its transaction, every read it was planned from guarded.
    txn: Txn,
    /// The answer once it commits.
    answer: pb::BatchReserveResponse,
    /// The stock's version and record once it commits.
    stock: (u64, StockRecord),
}

fn refs(holds: &[pb::Reservation]) -> String {
    let ids: Vec<&str> = holds.iter().take(20).map(|h| h.order_id.as_str()).collect();
    let more = holds.len().saturating_sub(20);
    if more > 0 { format!("{} (+{more})", ids.join(",")) } else { ids.join(",") }
}

impl Inventory {
    pub(crate) async fn batch_reserve(
        &self,
        ctx: &RequestContext,
        req: pb::BatchReserveRequest,
    ) -> Result<pb::BatchReserveResponse, Error> {
        let batch = HoldBatch::try_from(req)?;
        self.reserve_items(ctx, &batch.product_sku, batch.asks, batch.fence_token).await
    }

    async fn reserve_items(
        &self,
        ctx: &RequestContext,
        sku: &Sku,
        asks: Vec<HoldAsk>,
        fence_token: u64,
    ) -> Result<pb::BatchReserveResponse, Error> {
        let _serial = self.inner.locks.lock(sku).await;
        // Taking the turn after a lost race, giving way to a peer that took it (see `seen.rs`).
        let counters = &self.inner.counters;
        let turn = turns::Turn::new(self.store(), keys::hold_turn(sku), &counters.turns_taken, &counters.turns_given);
        // The stock as this replica left it, and no hold yet for any of the orders (the common
        // case): planned and committed without reading, each assumption a guard of the commit.
        if let Some(guess) = self.inner.stock_seen.guess(sku) {
            let none = vec![None; asks.len()];
            if let Ok(mut planned) =
                Self::plan_holds(ctx, sku, &asks, fence_token, (guess.version, guess.stock), &none, true)
            {
                // No other replica lost a race since this one last read (see `seen.rs`).
                planned.txn.expect_version(turn.key(), guess.turn);
                match self.store().commit(&planned.txn).await {
                    Ok(_) => {
                        self.inner.counters.stock_guesses.inc();
                        let (v, s) = planned.stock;
                        self.inner.stock_seen.wrote(sku, v, s);
                        return Ok(planned.answer);
                    }
                    Err(CommitError::Conflict { key }) => {
                        tracing::debug!(%sku, %key, "stock or holds changed elsewhere; reading them");
                        self.inner.counters.stock_guesses_missed.inc();
                        self.inner.stock_seen.missed(sku);
                        // A peer that lost a race to this replica and took the turn commits first.
                        turn.after_guess_missed(&key).await;
                    }
                    Err(e) => return Err(Error::from_commit(e)),
                }
            }
        }
        // The stock as the committed attempt left it (the last attempt's: earlier ones conflicted).
        let after: std::sync::Mutex<Option<(u64, StockRecord)>> = std::sync::Mutex::new(None);
        // Borrowed by each attempt (the attempts' futures own only these references).
        let (turn, asks, after_in) = (&turn, &asks, &after);
        let (answer, _) =
            chipgate_runtime::txn::run_chained_seeing(self.store(), None, None, |conflicted| async move {
                turn.before_attempt(conflicted.as_deref()).await.map_err(Error::from_commit)?;
                let orders: Vec<OrderId> = asks.iter().map(|a| a.order_id.clone()).collect();
                let ((sver, stock), existing, turn_version) =
                    tokio::try_join!(self.stock_of(sku, "product_sku"), self.load_holds(sku, &orders), async {
                        Ok::<_, Error>(turn.version().await?)
                    },)?;
                let known = self.inner.stock_seen.read(sku, sver, &stock, turn_version);
                // A peer that took the turn since this replica last looked commits first. This
                // attempt's commit then fails (the stock moved) and the next reads what the peer
                // left, without taking the turn back.
                turn.after_read(known, turn_version).await;
                let planned = Self::plan_holds(ctx, sku, asks, fence_token, (sver, stock), &existing, false)?;
                *after_in.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(planned.stock);
                Ok::<_, Error>((planned.txn, planned.answer))
            })
            .await?;
        if let Some((v, s)) = after.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner) {
            self.inner.stock_seen.wrote(sku, v, s);
        }
        Ok(answer)
    }

    /// Plans a batch of holds of product `sku` from its stock `(version, record)` and the orders'
    /// `existing` holds, in order. The stock's version and the holds it writes are guarded by their
    /// writes; when the reads were `guessed`, so are the stock when nothing changes it and each hold
    /// not written, so that the plan commits only where every guess was right. (Fresh reads leave
    /// those unguarded: an answer that changes nothing is as good as the read it came from.)
    fn plan_holds(
        ctx: &RequestContext,
        sku: &Sku,
        asks: &[HoldAsk],
        fence_token: u64,
        (sver, stock): (u64, StockRecord),
        existing: &[Option<(u64, HoldRecord)>],
        guessed: bool,
    ) -> Result<PlannedHolds, Error> {
        let now = now_ms();
        let mut planner = HoldPlanner::new(stock, now);
        let mut t = Txn::new();
        if fence_token > 0 {
            t.fence(keys::fence(sku), fence_token);
        }
        let mut results = Vec::with_capacity(asks.len());
        let mut placed: Vec<pb::Reservation> = Vec::new();
        // Leftovers of attempts the caller never recorded go back first, for the whole batch,
        // so it is served afresh in its order.
        let reclaimed: Vec<Option<HoldRecord>> =
            asks.iter().zip(existing).map(|(a, ex)| planner.reclaim(a, ex.as_ref().map(|(_, h)| h))).collect();
        let reclaimed_any = reclaimed.iter().any(Option::is_some);
        for ((ask, ex), trimmed) in asks.iter().zip(existing).zip(reclaimed) {
            if let Some((_, h)) = ex
                && !h.sku.is_empty()
                && h.sku != sku.as_str()
            {
                return Err(Error::invalid(
                    "items.order_id",
                    format!("order {} holds {}, not {sku}; one order holds one product", ask.order_id, h.sku),
                ));
            }
            let prev = trimmed.as_ref().or(ex.as_ref().map(|(_, h)| h));
            let (outcome, planned) = planner.plan(ask, prev).map_err(|requested| {
                Error::precondition(
                    "HOLD_MISMATCH",
                    &ask.order_id,
                    format!(
                        "order {} generation {} already asked to hold {requested} units, not {}",
                        ask.order_id, ask.generation, ask.units
                    ),
                )
            })?;
            // A trimmed hold that gets nothing back is still stored trimmed.
            let changed = planned.or_else(|| trimmed.clone());
            let hold_version = ex.as_ref().map(|(v, _)| *v).unwrap_or(0);
            let shown = match &changed {
                Some(h) => {
                    put_hold(&mut t, sku, &ask.order_id, hold_version, h);
                    if ex.is_none() {
                        index_new_hold(&mut t, h);
                    }
                    index_expiry(&mut t, h);
                    let p = hold_to(h);
                    placed.push(p.clone());
                    Some(p)
                }
                None => {
                    if guessed {
                        t.expect_version(keys::hold(sku, &ask.order_id), hold_version);
                    }
                    prev.map(hold_to)
                }
            };
            results.push(pb::ReserveItemResult {
                order_id: ask.order_id.to_string(),
                outcome: outcome_to(outcome) as i32,
                reservation: shown,
            });
        }
        let mut stock = planner.stock;
        if placed.is_empty() && !reclaimed_any {
            if guessed {
                t.expect_version(keys::stock(sku), sver);
            }
            let s = stock_to(&stock, sver);
            return Ok(PlannedHolds {
                txn: t,
                answer: pb::BatchReserveResponse { results, stock: Some(s) },
                stock: (sver, stock),
            });
        }
        stock.update_ms = now;
        t.replace(keys::stock(sku), sver, encode(&stock));
        let holds = placed.len() as u64;
        let units = placed.iter().map(|h| h.held_units).sum();
        placed.truncate(20);
        let kind = pb::inventory_event::Kind::HoldsPlaced(pb::HoldsPlaced { reservations: placed, holds, units });
        emit(&mut t, ctx, now, &stock, sver + 1, kind);
        let answer = pb::BatchReserveResponse { results, stock: Some(stock_to(&stock, sver + 1)) };
        Ok(PlannedHolds { txn: t, answer, stock: (sver + 1, stock) })
    }

    pub(crate) async fn confirm_reservation(
        &self,
        ctx: &RequestContext,
        req: pb::ConfirmReservationRequest,
    ) -> Result<pb::ConfirmReservationResponse, Error> {
        let mut v = Violations::new();
        validate::request_id(&mut v, &req.request_id);
        let order_id = validate::parse::<OrderId>(&mut v, "order_id", req.order_id.clone());
        let sku = validate::parse::<Sku>(&mut v, "product_sku", req.product_sku.clone());
        if req.generation == 0 {
            v.add("generation", "must be at least 1");
        }
        let (order_id, sku) = validate::finish(v, (order_id, sku))?;
        let idem =
            IdemKey::new(&self.inner.idem, "ConfirmReservation", &req.request_id, &req).in_partition(keys::part(&sku));
        let (answer, _) = self
            .run_txn(Some(&idem), || async {
                let now = now_ms();
                let ((hver, mut h), (sver, mut stock)) = self.hold_with_stock(&sku, &order_id).await?;
                if h.generation == req.generation && matches!(h.status(), HoldStatus::Confirmed | HoldStatus::Shipped) {
                    return Ok((Txn::new(), pb::ConfirmReservationResponse { reservation: Some(hold_to(&h)) }));
                }
                if h.generation != req.generation {
                    return Err(Error::precondition(
                        "STALE_GENERATION",
                        &req.order_id,
                        format!("order {} holds generation {}, not {}", req.order_id, h.generation, req.generation),
                    ));
                }
                if h.is_expired(now) || h.status() == HoldStatus::Expired {
                    let at = chipgate_runtime::time::ts(h.expire_ms);
                    return Err(Error::precondition(
                        "HOLD_EXPIRED",
                        &req.order_id,
                        format!(
                            "the hold of order {} expired at {}s since the epoch before it was confirmed",
                            req.order_id, at.seconds
                        ),
                    ));
                }
                if h.status() != HoldStatus::Held {
                    return Err(Error::precondition(
                        "HOLD_NOT_HELD",
                        &req.order_id,
                        format!("the hold of order {} is {:?}", req.order_id, h.status()),
                    ));
                }
                if !h.is_complete() {
                    return Err(Error::precondition(
                        "HOLD_PARTIAL",
                        &req.order_id,
                        format!(
                            "order {} holds {} of {} units; only complete holds can be confirmed",
                            req.order_id, h.held, h.requested
                        ),
                    ));
                }
                stock.commit(h.held).map_err(|e| Error::Internal(format!("stock of {}: {e}", h.sku)))?;
                stock.update_ms = now;
                h.set_status(HoldStatus::Confirmed);
                h.update_ms = now;
                let mut t = Txn::new();
                put_hold(&mut t, &sku, &order_id, hver, &h);
                t.replace(keys::stock(&sku), sver, encode(&stock));
                index_expiry(&mut t, &h);
                let out = hold_to(&h);
                emit(
                    &mut t,
                    ctx,
                    now,
                    &stock,
                    sver + 1,
                    pb::inventory_event::Kind::HoldsConfirmed(pb::HoldsConfirmed { reservations: vec![out.clone()] }),
                );
                Ok((t, pb::ConfirmReservationResponse { reservation: Some(out) }))
            })
            .await?;
        Ok(answer)
    }

    pub(crate) async fn ship_reservation(
        &self,
        ctx: &RequestContext,
        req: pb::ShipReservationRequest,
    ) -> Result<pb::ShipReservationResponse, Error> {
        let mut v = Violations::new();
        validate::request_id(&mut v, &req.request_id);
        let order_id = validate::parse::<OrderId>(&mut v, "order_id", req.order_id.clone());
        let sku = validate::parse::<Sku>(&mut v, "product_sku", req.product_sku.clone());
        if req.generation == 0 {
            v.add("generation", "must be at least 1");
        }
        let (order_id, sku) = validate::finish(v, (order_id, sku))?;
        let idem =
            IdemKey::new(&self.inner.idem, "ShipReservation", &req.request_id, &req).in_partition(keys::part(&sku));
        let (answer, _) = self
            .run_txn(Some(&idem), || async {
                let now = now_ms();
                let ((hver, mut h), (sver, mut stock)) = self.hold_with_stock(&sku, &order_id).await?;
                if h.generation == req.generation && h.status() == HoldStatus::Shipped {
                    return Ok((Txn::new(), pb::ShipReservationResponse { reservation: Some(hold_to(&h)) }));
                }
                if h.generation != req.generation || h.status() != HoldStatus::Confirmed {
                    return Err(Error::precondition(
                        "HOLD_NOT_CONFIRMED",
                        &req.order_id,
                        format!(
                            "order {} generation {} is not confirmed (hold is generation {}, {:?})",
                            req.order_id,
                            req.generation,
                            h.generation,
                            h.status()
                        ),
                    ));
                }
                stock.ship(h.held).map_err(|e| Error::Internal(format!("stock of {}: {e}", h.sku)))?;
                stock.update_ms = now;
                h.set_status(HoldStatus::Shipped);
                h.update_ms = now;
                let mut t = Txn::new();
                put_hold(&mut t, &sku, &order_id, hver, &h);
                t.replace(keys::stock(&sku), sver, encode(&stock));
                let out = hold_to(&h);
                emit(
                    &mut t,
                    ctx,
                    now,
                    &stock,
                    sver + 1,
                    pb::inventory_event::Kind::HoldsShipped(pb::HoldsShipped { reservations: vec![out.clone()] }),
                );
                Ok((t, pb::ShipReservationResponse { reservation: Some(out) }))
            })
            .await?;
        Ok(answer)
    }

    pub(crate) async fn batch_release_reservations(
        &self,
        ctx: &RequestContext,
        req: pb::BatchReleaseReservationsRequest,
    ) -> Result<pb::BatchReleaseReservationsResponse, Error> {
        let batch = ReleaseBatch::try_from(req)?;
        let reservations = self.release_items(ctx, &batch.refs, &batch.reason, batch.unless_confirmed).await?;
        Ok(pb::BatchReleaseReservationsResponse { reservations })
    }

    /// Gives holds of `(product, order, generation)` back (see the API docs of
    /// BatchReleaseReservations); a shipped hold is left as it is. One transaction per product (each in
    /// its partition); a release is idempotent per (order, generation), so a retry after a partial
    /// failure finishes the rest. The answers come in the items' order.
    async fn release_items(
        &self,
        ctx: &RequestContext,
        items: &[(Sku, OrderId, u64)],
        reason: &str,
        unless_confirmed: bool,
    ) -> Result<Vec<pb::Reservation>, Error> {
        let mut by_product: BTreeMap<&Sku, Vec<usize>> = BTreeMap::new();
        for (i, (sku, _, _)) in items.iter().enumerate() {
            by_product.entry(sku).or_default().push(i);
        }
        let mut out: Vec<Option<pb::Reservation>> = vec![None; items.len()];
        for (sku, indexes) in by_product {
            let refs: Vec<(OrderId, u64)> = indexes.iter().map(|&i| (items[i].1.clone(), items[i].2)).collect();
            let answers = self.release_product(ctx, sku, &refs, reason, unless_confirmed).await?;
            for (i, a) in indexes.into_iter().zip(answers) {
                out[i] = Some(a);
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// Gives back holds of one product, in one transaction of its partition.
    async fn release_product(
        &self,
        ctx: &RequestContext,
        sku: &Sku,
        items: &[(OrderId, u64)],
        reason: &str,
        unless_confirmed: bool,
    ) -> Result<Vec<pb::Reservation>, Error> {
        let (answer, _) = self
            .run_txn(None, || async {
                let now = now_ms();
                let orders: Vec<OrderId> = items.iter().map(|(o, _)| o.clone()).collect();
                let (existing, mut stock) =
                    tokio::try_join!(self.load_holds(sku, &orders), self.load::<StockRecord>(keys::stock(sku)))?;
                let mut t = Txn::new();
                let mut out = Vec::with_capacity(items.len());
                let mut freed: (u64, Vec<pb::Reservation>) = (0, Vec::new());
                for ((order_id, generation), ex) in items.iter().zip(existing) {
                    let (ver, cur) = match ex {
                        Some((v, h)) => (v, Some(h)),
                        None => (0, None),
                    };
                    let tombstone = HoldRecord {
                        order_id: order_id.to_string(),
                        generation: *generation,
                        sku: sku.to_string(),
                        status: HoldStatus::Released as i32,
                        create_ms: now,
                        update_ms: now,
                        release_reason: reason.to_string(),
                        ..Default::default()
                    };
                    let next = match cur {
                        None => Some(tombstone),
                        Some(h) if h.generation > *generation => {
                            out.push(hold_to(&h));
                            None
                        }
                        Some(h)
                            if h.generation == *generation
                                && matches!(h.status(), HoldStatus::Released | HoldStatus::Expired) =>
                        {
                            out.push(hold_to(&h));
                            None
                        }
                        Some(h)
                            if h.generation == *generation
                                && h.status() == HoldStatus::Confirmed
                                && unless_confirmed =>
                        {
                            out.push(hold_to(&h));
                            None
                        }
                        Some(h) if h.generation == *generation && h.status() == HoldStatus::Shipped => {
                            out.push(hold_to(&h));
                            None
                        }
                        Some(h) => {
                            let (units, confirmed) = h.occupying();
                            if units > 0 {
                                let (_, stock) = stock
                                    .as_mut()
                                    .ok_or_else(|| Error::Internal(format!("no stock record for {sku}")))?;
                                let r =
                                    if confirmed { stock.release_committed(units) } else { stock.release_held(units) };
                                r.map_err(|e| Error::Internal(format!("stock of {sku}: {e}")))?;
                                stock.update_ms = now;
                            }
                            let rec = if h.generation == *generation {
                                let mut r = h.clone();
                                r.set_status(HoldStatus::Released);
                                r.update_ms = now;
                                r.release_reason = reason.to_string();
                                r
                            } else {
                                tombstone
                            };
                            freed.0 += units;
                            freed.1.push(hold_to(&HoldRecord { held: units, ..rec.clone() }));
                            Some(rec)
                        }
                    };
                    if let Some(rec) = next {
                        put_hold(&mut t, sku, order_id, ver, &rec);
                        if ver == 0 {
                            index_new_hold(&mut t, &rec);
                        }
                        index_expiry(&mut t, &rec);
                        out.push(hold_to(&rec));
                    }
                }
                if !freed.1.is_empty()
                    && let Some((sver, stock)) = stock
                {
                    t.replace(keys::stock(sku), sver, encode(&stock));
                    emit(
                        &mut t,
                        ctx,
                        now,
                        &stock,
                        sver + 1,
                        pb::inventory_event::Kind::HoldsReleased(pb::HoldsReleased {
                            reservations: freed.1,
                            units_freed: freed.0,
                        }),
                    );
                }
                Ok((t, pb::BatchReleaseReservationsResponse { reservations: out }))
            })
            .await?;
        Ok(answer.reservations)
    }

    pub(crate) async fn get_reservation(
        &self,
        req: pb::GetReservationRequest,
    ) -> Result<pb::GetReservationResponse, Error> {
        let mut v = Violations::new();
        let order_id = validate::parse::<OrderId>(&mut v, "order_id", req.order_id);
        let sku = validate::parse::<Sku>(&mut v, "product_sku", req.product_sku);
        let (order_id, sku) = validate::finish(v, (order_id, sku))?;
        let (_, h) = self.require_hold(&sku, &order_id).await?;
        Ok(pb::GetReservationResponse { reservation: Some(hold_to(&h)) })
    }

    pub(crate) async fn list_reservations(
        &self,
        req: pb::ListReservationsRequest,
    ) -> Result<pb::ListReservationsResponse, Error> {
        let mut v = Violations::new();
        let sku = validate::parse_optional::<Sku>(&mut v, "product_sku", req.product_sku.clone());
        let page = Page::parse(&mut v, req.page_size, &req.page_token);
        let sku = validate::finish(v, sku)?;
        let want = hold_status_from(req.state());
        // One product's holds, or every product's in SKU order; the page token is the position in
        // that sequence.
        let skus: Vec<Sku> = match sku {
            None => chipgate_contract::catalogue::all(self.store()).await?,
            Some(sku) => vec![sku],
        };
        let mut skip = page.offset();
        let mut position = page.offset();
        let mut out = Vec::new();
        let chunk = page.size.max(100);
        for sku in skus {
            let index = keys::holds_of(&sku);
            let total = self.store().zcard(&index).await? as usize;
            if skip >= total {
                skip -= total;
                continue;
            }
            let mut rank = skip;
            skip = 0;
            while rank < total {
                let ids = self.store().zrange(&index, rank as i64, (rank + chunk - 1) as i64, false).await?;
                if ids.is_empty() {
                    break;
                }
                // The index lists orders whose ids were parsed when their holds were asked for.
                let orders: Vec<OrderId> = ids.iter().map(|(o, _)| OrderId::from_trusted(o.as_str())).collect();
                for h in self.load_holds(&sku, &orders).await? {
                    position += 1;
                    if let Some((_, h)) = h
                        && want.is_none_or(|s| h.status() == s)
                    {
                        out.push(hold_to(&h));
                        if out.len() == page.size {
                            let token = chipgate_runtime::paging::token(&position.to_string());
                            return Ok(pb::ListReservationsResponse { reservations: out, next_page_token: token });
                        }
                    }
                }
                rank += ids.len();
            }
        }
        Ok(pb::ListReservationsResponse { reservations: out, next_page_token: String::new() })
    }
}

/// A short description of the orders a change concerns (for watch streams).
pub(crate) fn reference_of(holds: &[pb::Reservation]) -> String {
    refs(holds)
}
