//! Quota: eligibility checks, and taking, returning and confirming quota for orders.
//!
//! A batch is decided against one consistent read of the licences, the buyers' ledgers and the
//! product's gates, strictly in the order given ([`QuotaPlanner`]), and committed in one transaction
//! guarded by the versions of every licence it took from and of the product's gates. So two batches can
//! never together exceed a licence's quota, and a batch can't slip in after an embargo it didn't see.
//! A replica that left the product as it stands decides from what it remembers instead of reading,
//! with every part of that guarded too ([`crate::worlds`]).
//! Every reservation is keyed by (order, generation): retries never double-count, and a released
//! generation is never reopened.

use chipgate_runtime::records;
use chipgate_runtime::service::Records;
use std::collections::{BTreeMap, HashMap};

use chipgate_domain::allocation::QuotaAsk;
use chipgate_domain::ids::{BuyerId, LicenceId, OrderId, Sku, WaveId};
use chipgate_domain::licensing::{
    Ask, LedgerRecord, LicenseRecord, Planned, PolicyRecord, ProductExportRecord, ProductGate, QuotaPlanner,
    ReservationRecord, ReservationStatus, ReserveCheck, Verdict, evaluate, holding_failures,
};
use chipgate_proto::licensing::v1 as pb;
use chipgate_runtime::errors::Violations;
use chipgate_runtime::time::now_ms;
use chipgate_runtime::txn::{IdemKey, TxnError, turns};
use chipgate_runtime::{RequestContext, validate};
use chipgate_state::{Backend, CommitError, Guard, Record, Txn};

use crate::convert::{QuotaBatch, QuotaRef, Recheck, ReleaseBatch, failure_to, reservation_to};
use crate::keys::Part;
use crate::licences::LicenseIndex;
use crate::{Error, Licensing, MAX_UNITS, emit, encode, failure_codes, keys, record};

/// What eligibility needs to know about one product and some of its buyers, read at once.
struct World {
    licences: Vec<(u64, LicenseRecord)>,
    domestic: HashMap<String, u64>,
    gate: ProductGate,
    policy_version: u64,
    exports_version: u64,
    /// Each buyer's index as read: the buyer, its version (0: none) and the ids of this product's
    /// licences it names (for [`crate::worlds`]).
    indexes: Vec<(String, u64, Vec<String>)>,
}

/// A quota call decided, not committed yet.
struct Decided {
    /// Its transaction.
    txn: Txn,
    /// The answer once it commits.
    answer: pb::BatchReserveQuotaResponse,
    /// The licences it writes, at the versions they will have.
    written: Vec<(u64, LicenseRecord)>,
}

/// An order id a batch named (checked at the edge, in `convert.rs`) or a reservation holds: the
/// domain's quota asks carry ids as text.
fn order_of(id: &str) -> OrderId {
    OrderId::from_trusted(id)
}

/// A licence id read back from licensing's own records and indexes.
fn licence_of(id: &str) -> LicenceId {
    LicenceId::from_trusted(id)
}

/// Why quota an order's own generation held went back, when asked again while it may not take any
/// ([`ReserveCheck::Withdraw`]); the event lists the reservation released with it.
const WITHDRAWN: &str = "given back: asked again while it may not take quota (its first answer never landed)";

/// The version a reservation was read at, and where: a field of its product's reservation hashes
/// (`keys::reservation_field`), or a key of its own (`keys::reservation`: one written before
/// reservations moved into hashes, or an order id of another form).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct ReadAt {
    /// The version read (0: none).
    version: u64,
    /// Read from a key of its own.
    own_key: bool,
}

/// Reservations as read, one per order asked.
type LoadedReservations = Vec<Option<(ReadAt, ReservationRecord)>>;

/// The version a reservation was read at, for the write that follows (`ReadAt::default()`: none).
fn read_at(ex: &Option<(ReadAt, ReservationRecord)>) -> ReadAt {
    ex.as_ref().map(|(at, _)| *at).unwrap_or_default()
}

/// Writes the reservation of product `sku`'s order `order_id`, guarded by the version it was read
/// at: in its stored form ([`ReservationRecord::to_stored`], read back by
/// [`Licensing::load_reservations`] with the key's product and order) when the record's own are
/// exactly those, else whole (so nothing the key doesn't say is ever left out).
///
/// It goes into its field of the product's reservation hashes; one read from a key of its own
/// moves there in the same commit (the key is removed, guarded by the version read).
fn put_reservation(t: &mut Txn, sku: &Sku, order_id: &str, at: ReadAt, r: &ReservationRecord) {
    let data = if r.product_sku == sku.as_str() && r.order_id == order_id { r.to_stored() } else { encode(r) };
    let order = order_of(order_id);
    match keys::reservation_field(sku, &order) {
        Some((hash, field)) if at.own_key => {
            let key = keys::reservation(sku, &order);
            t.expect_version(key.clone(), at.version).delete(key);
            t.replace_field(hash, field, 0, &data);
        }
        Some((hash, field)) => {
            t.replace_field(hash, field, at.version, &data);
        }
        None => {
            t.replace(keys::reservation(sku, &order), at.version, data);
        }
    }
}

/// Removes the reservation of product `sku`'s order `order_id`, guarded by the version it was read at.
fn forget_reservation(t: &mut Txn, sku: &Sku, order_id: &str, at: ReadAt) {
    let order = order_of(order_id);
    match keys::reservation_field(sku, &order) {
        Some((hash, field)) if !at.own_key => {
            t.expect_field_version(hash.clone(), field.clone(), at.version).hdel(hash, field);
        }
        _ => {
            let key = keys::reservation(sku, &order);
            t.expect_version(key.clone(), at.version).delete(key);
        }
    }
}

impl Licensing {
    /// Reads the quota reservations of product `sku`'s `orders`, one answer per order: each stored
    /// form is read with the product and order its place names ([`ReservationRecord::from_stored`]).
    ///
    /// Each order's field in the reservation hashes and its key of its own are read at once (two
    /// commands in one round trip): the key holds what an earlier version wrote until the next
    /// write moves it. Were both there, the field is the later.
    async fn load_reservations(&self, sku: &Sku, orders: &[&str]) -> Result<LoadedReservations, Error> {
        let ids: Vec<OrderId> = orders.iter().map(|o| order_of(o)).collect();
        let own_keys: Vec<String> = ids.iter().map(|o| keys::reservation(sku, o)).collect();
        // The fields, in the orders' order, for the orders that have one.
        let mut fields = Vec::with_capacity(orders.len());
        let has_field: Vec<bool> =
            ids.iter().map(|o| keys::reservation_field(sku, o).map(|place| fields.push(place)).is_some()).collect();
        let (in_keys, in_fields) = tokio::try_join!(self.store().get(&own_keys), self.store().hget_each(&fields))?;
        let mut in_fields = fields.iter().zip(in_fields);
        // Where a field is, for an error only (the read path formats nothing).
        let field_name = |(hash, field): &(String, String)| format!("{hash} field {field}");
        let mut out = Vec::with_capacity(orders.len());
        for (((order, has_field), in_key), key) in orders.iter().zip(has_field).zip(in_keys).zip(own_keys) {
            let in_field = if has_field { in_fields.next() } else { None };
            let (record, own_key, place) = match (in_field, in_key) {
                (Some((place, Some(raw))), in_key) => {
                    if in_key.is_some() {
                        tracing::warn!(%key, "a quota reservation is both in its hash and in a key of its own; the hash's is used");
                    }
                    let record = Record::from_stored(raw).ok_or_else(|| records::LoadError::Corrupt {
                        key: field_name(place),
                        reason: "no version prefix".into(),
                    })?;
                    (record, false, Some(place))
                }
                (_, Some(record)) => (record, true, None),
                (_, None) => {
                    out.push(None);
                    continue;
                }
            };
            let r = ReservationRecord::from_stored(&record.data, sku.as_str(), order).map_err(|e| {
                records::LoadError::Corrupt { key: place.map(field_name).unwrap_or(key), reason: e.to_string() }
            })?;
            out.push(Some((ReadAt { version: record.version, own_key }, r)));
        }
        Ok(out)
    }

    /// Reads the quota reservation of product `sku`'s order `order`: NOT_FOUND when there is none.
    async fn require_reservation(&self, sku: &Sku, order: &str) -> Result<(ReadAt, ReservationRecord), Error> {
        self.load_reservations(sku, &[order])
            .await?
            .pop()
            .flatten()
            .ok_or_else(|| Error::not_found("quota reservation", order))
    }

    /// Reads the licences of `buyers` for `sku`, their ledgers and the product's gates. The licences
    /// the buyers' indexes named when last read ([`crate::guesses`]) are read beside the indexes, in
    /// the same round trip; only those a fresh index names beyond that are read after it, and only
    /// those the fresh indexes name are used.
    async fn read_world(&self, sku: &Sku, buyers: &[BuyerId]) -> Result<World, Error> {
        let index_keys: Vec<String> = buyers.iter().map(|b| keys::license_index(b, sku)).collect();
        let ledger_keys: Vec<String> = buyers.iter().map(keys::ledger).collect();
        // Only this product's licences (an id of another product would be a corrupt index).
        let licence_keys = |ids: &[String]| -> Vec<String> {
            ids.iter()
                .filter(|id| keys::license_sku(id) == Some(sku.as_str()))
                .filter_map(|id| keys::license(&LicenceId::from_trusted(id.as_str())))
                .collect()
        };
        let guessed = self.inner.guesses.guess(&index_keys);
        let (indexes, ledgers, policy, exports, mut licences) = tokio::try_join!(
            self.load_many::<LicenseIndex>(&index_keys),
            self.load_many::<LedgerRecord>(&ledger_keys),
            self.load::<PolicyRecord>(keys::policy(sku)),
            self.load::<ProductExportRecord>(keys::exports(sku)),
            async {
                if guessed.is_empty() {
                    Ok(Vec::new())
                } else {
                    self.load_many::<LicenseRecord>(&licence_keys(&guessed)).await
                }
            },
        )?;
        self.inner.guesses.learn(
            index_keys.iter().zip(&indexes).map(|(k, i)| (k, i.as_ref().map(|(_, i)| i.license_ids.as_slice()))),
        );
        let index_seen: Vec<(String, u64, Vec<String>)> = buyers
            .iter()
            .zip(&indexes)
            .map(|(b, i)| {
                let (version, ids) = match i {
                    Some((v, i)) => (*v, i.license_ids.clone()),
                    None => (0, Vec::new()),
                };
                let ids = ids.into_iter().filter(|id| keys::license_sku(id) == Some(sku.as_str())).collect();
                (b.to_string(), version, ids)
            })
            .collect();
        let mut ids: Vec<String> = indexes.into_iter().flatten().flat_map(|(_, i)| i.license_ids).collect();
        ids.sort();
        ids.dedup();
        let unguessed: Vec<String> = ids.iter().filter(|id| guessed.binary_search(id).is_err()).cloned().collect();
        if !unguessed.is_empty() {
            licences.extend(self.load_many::<LicenseRecord>(&licence_keys(&unguessed)).await?);
        }
        // Exactly the licences the fresh indexes name (a guess may name one they no longer do).
        let mut licences: Vec<(u64, LicenseRecord)> =
            licences.into_iter().flatten().filter(|(_, l)| ids.binary_search(&l.id).is_ok()).collect();
        licences.sort_by(|(_, a), (_, b)| a.id.cmp(&b.id));
        let domestic = ledgers.into_iter().flatten().map(|(_, l)| (l.buyer_id, l.total_units)).collect();
        let gate = ProductGate::from_records(policy.as_ref().map(|(_, p)| p), exports.as_ref().map(|(_, e)| e));
        Ok(World {
            licences,
            domestic,
            gate,
            policy_version: policy.map(|(v, _)| v).unwrap_or(0),
            exports_version: exports.map(|(v, _)| v).unwrap_or(0),
            indexes: index_seen,
        })
    }

    pub(crate) async fn check_eligibility(
        &self,
        req: pb::CheckEligibilityRequest,
    ) -> Result<pb::CheckEligibilityResponse, Error> {
        let mut v = Violations::new();
        let buyer = validate::parse::<BuyerId>(&mut v, "buyer_id", req.buyer_id.clone());
        let sku = validate::parse::<Sku>(&mut v, "product_sku", req.product_sku.clone());
        validate::units(&mut v, "units", req.units, MAX_UNITS);
        validate::text(&mut v, "justification", &req.justification, validate::MAX_TEXT_LEN, false);
        let (buyer, sku) = validate::finish(v, (buyer, sku))?;
        let world = self.read_world(&sku, &[buyer]).await?;
        let mut mine: Vec<&LicenseRecord> =
            world.licences.iter().map(|(_, l)| l).filter(|l| l.buyer_id == req.buyer_id).collect();
        mine.sort_by_key(|l| l.seq);
        let ask = Ask { buyer_id: &req.buyer_id, units: req.units, justification: &req.justification };
        let domestic = world.domestic.get(&req.buyer_id).copied().unwrap_or(0);
        Ok(match evaluate(&mine, &ask, domestic, &world.gate, now_ms()) {
            Verdict::Eligible(i) => pb::CheckEligibilityResponse {
                eligible: true,
                license_id: mine[i].id.clone(),
                failures: vec![],
                rejectable: false,
            },
            Verdict::Refused { failures, rejectable } => pb::CheckEligibilityResponse {
                eligible: false,
                license_id: String::new(),
                failures: failures.iter().map(failure_to).collect(),
                rejectable,
            },
        })
    }

    pub(crate) async fn batch_reserve_quota(
        &self,
        ctx: &RequestContext,
        req: pb::BatchReserveQuotaRequest,
    ) -> Result<pb::BatchReserveQuotaResponse, Error> {
        let batch = QuotaBatch::try_from(req)?;
        let results = self.reserve_items(ctx, &batch.product_sku, batch.asks, batch.fence_token).await?;
        Ok(pb::BatchReserveQuotaResponse { results })
    }

    /// Takes quota for `items` of product `sku`, in order (see the module docs): decided from the
    /// product's world as this replica last left it when it can be ([`crate::worlds`]), else read
    /// first.
    async fn reserve_items(
        &self,
        ctx: &RequestContext,
        sku: &Sku,
        items: Vec<QuotaAsk>,
        fence_token: u64,
    ) -> Result<Vec<pb::QuotaItemResult>, Error> {
        // Calls of this replica for one product queue up here instead of conflicting in the store.
        let began = std::time::Instant::now();
        let _serial = self.inner.locks.lock(sku).await;
        let locked = began.elapsed();
        let mut buyers: Vec<BuyerId> = items.iter().map(|it| BuyerId::from_trusted(it.buyer_id.as_str())).collect();
        buyers.sort_unstable();
        buyers.dedup();
        // Taking the turn after a lost race, giving way to a peer that took it (see `worlds.rs`).
        let counters = &self.inner.counters;
        let turn = turns::Turn::new(self.store(), keys::quota_turn(sku), &counters.turns_taken, &counters.turns_given);
        if let Some(guess) = self.inner.worlds.guess(sku, &buyers)
            && let Some(answer) = self.reserve_guessed(ctx, sku, &items, fence_token, guess, &turn).await?
        {
            self.inner.counters.unread.inc();
            tracing::debug!(
                items = items.len(),
                lock_us = locked.as_micros() as u64,
                total_us = began.elapsed().as_micros() as u64,
                "quota reserved without reading"
            );
            return Ok(answer.results);
        }
        // The licences the committed attempt wrote (the last attempt's: earlier ones conflicted).
        let written: std::sync::Mutex<Vec<(u64, LicenseRecord)>> = std::sync::Mutex::new(Vec::new());
        // Borrowed by each attempt (the attempts' futures own only these references).
        let (turn, items, written_in) = (&turn, &items, &written);
        let (answer, committed) = self
            .run_in_remembering(Part::Product(sku), None, |conflicted| async move {
                turn.before_attempt(conflicted.as_deref()).await.map_err(<Error as TxnError>::from_commit)?;
                let read_began = std::time::Instant::now();
                let ((existing, world), turn_version) =
                    tokio::try_join!(self.read_for(sku, items), async { Ok::<_, Error>(turn.version().await?) })?;
                let known = self.remember_read(sku, &world, turn_version);
                // A peer that took the turn since this replica last looked commits first. This
                // attempt's commit then fails (the chain's head moved) and the next reads what the
                // peer left, without taking the turn back.
                turn.after_read(known, turn_version).await;
                tracing::debug!(items = items.len(), read_us = read_began.elapsed().as_micros() as u64, "quota read");
                let d = self.decide(ctx, sku, items, fence_token, &existing, world)?;
                *written_in.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = d.written;
                Ok((d.txn, d.answer))
            })
            .await?;
        let written = written.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.inner.worlds.wrote(sku, written, committed.audit.last().cloned());
        tracing::debug!(
            items = items.len(),
            lock_us = locked.as_micros() as u64,
            total_us = began.elapsed().as_micros() as u64,
            "quota reserved"
        );
        Ok(answer.results)
    }

    /// Remembers what a quota call read of product `sku`'s world and its quota turn's version
    /// ([`crate::worlds`]); answers the turn's version this replica saw before (`None`: never).
    fn remember_read(&self, sku: &Sku, world: &World, turn_version: u64) -> Option<u64> {
        self.inner.worlds.read(
            sku,
            world.indexes.iter().cloned(),
            &world.licences,
            (&world.gate, world.policy_version, world.exports_version),
            turn_version,
        )
    }

    /// Decides a quota call from `guess` with none of its orders holding a reservation, and commits
    /// it with every part of the guess guarded (see [`crate::worlds`]): the answer, or `None` when
    /// the guess was wrong (nothing changed; the caller reads and decides again).
    async fn reserve_guessed(
        &self,
        ctx: &RequestContext,
        sku: &Sku,
        items: &[QuotaAsk],
        fence_token: u64,
        guess: crate::worlds::Guess,
        turn: &turns::Turn<'_>,
    ) -> Result<Option<pb::BatchReserveQuotaResponse>, Error> {
        let part = Part::Product(sku);
        self.register_product(sku).await?;
        let chain = part.audit();
        let _chain = self.inner.chains.lock(&chain.stream).await;
        let world = World {
            licences: guess.licences.clone(),
            domestic: HashMap::new(),
            gate: guess.gate,
            policy_version: guess.policy_version,
            exports_version: guess.exports_version,
            indexes: Vec::new(),
        };
        let none: LoadedReservations = items.iter().map(|_| None).collect();
        let Decided { mut txn, answer, written } = self.decide(ctx, sku, items, fence_token, &none, world)?;
        let t = &mut txn;
        // What the decision's writes guard already needs no guard of its own.
        let guarded: std::collections::HashSet<String> = t
            .guards
            .iter()
            .filter_map(|g| match g {
                Guard::Version { key, .. } => Some(key.clone()),
                _ => None,
            })
            .collect();
        for (buyer, version) in &guess.indexes {
            t.expect_version(keys::license_index(buyer, sku), *version);
        }
        // The gates (a decision that changes nothing has no guard of them yet).
        for (key, version) in [(keys::policy(sku), guess.policy_version), (keys::exports(sku), guess.exports_version)] {
            if !guarded.contains(&key) {
                t.expect_version(key, version);
            }
        }
        for (version, l) in &guess.licences {
            if let Some(key) = keys::license(&licence_of(&l.id))
                && !guarded.contains(&key)
            {
                t.expect_version(key, *version);
            }
        }
        // No peer lost a race since this replica last read (see `worlds.rs`: the loser bumps the
        // turn); first, so that a turn never bumped joins the run of absent keys below.
        t.expect_version(turn.key(), guess.turn);
        // No order holds a reservation: the ones written are guarded by their writes (version 0).
        // The keys of their own first, then the fields: each kind a run the store checks at once.
        for (it, r) in items.iter().zip(&answer.results) {
            let order = order_of(&it.order_id);
            if keys::reservation_field(sku, &order).is_some() || r.reservation.is_none() {
                t.expect_version(keys::reservation(sku, &order), 0);
            }
        }
        for (it, r) in items.iter().zip(&answer.results) {
            if let (Some((hash, field)), None) = (keys::reservation_field(sku, &order_of(&it.order_id)), &r.reservation)
            {
                t.expect_field_version(hash, field, 0);
            }
        }
        let (seq, hash) = guess.head;
        if t.needs_linking() {
            t.link_audit(&[(chain.clone(), seq, hash)]);
        } else {
            t.expect_version(chain.head.clone(), seq);
        }
        match self.store().commit(&txn).await {
            Ok(c) => {
                self.inner.worlds.wrote(sku, written, c.audit.last().cloned());
                self.inner.worlds.hit(sku);
                Ok(Some(answer))
            }
            Err(CommitError::Conflict { key }) => {
                tracing::debug!(%sku, %key, "quota world changed elsewhere; reading it");
                self.inner.counters.unread_missed.inc();
                self.inner.worlds.missed(sku);
                // A peer that lost a race to this replica and took the turn commits first.
                drop(_chain);
                turn.after_guess_missed(&key).await;
                Ok(None)
            }
            Err(e) => Err(<Error as TxnError>::from_commit(e)),
        }
    }

    /// Reads what a quota call for `items` of product `sku` is decided from: the orders'
    /// reservations and the world, and the licences an older generation still holds quota of when
    /// (rarely) they are not among the buyers' own.
    async fn read_for(&self, sku: &Sku, items: &[QuotaAsk]) -> Result<(LoadedReservations, World), Error> {
        let orders: Vec<&str> = items.iter().map(|it| it.order_id.as_str()).collect();
        let mut buyers: Vec<BuyerId> = items.iter().map(|it| BuyerId::from_trusted(it.buyer_id.as_str())).collect();
        buyers.sort_unstable();
        buyers.dedup();
        let (existing, mut world) =
            tokio::try_join!(self.load_reservations(sku, &orders), self.read_world(sku, &buyers))?;
        let missing: Vec<String> = existing
            .iter()
            .flatten()
            .filter(|(_, r)| r.held_units() > 0 && !world.licences.iter().any(|(_, l)| l.id == r.license_id))
            .filter(|(_, r)| keys::license_sku(&r.license_id) == Some(sku.as_str()))
            .filter_map(|(_, r)| keys::license(&LicenceId::from_trusted(r.license_id.as_str())))
            .collect();
        if !missing.is_empty() {
            world.licences.extend(self.load_many::<LicenseRecord>(&missing).await?.into_iter().flatten());
        }
        Ok((existing, world))
    }

    async fn reserve_attempt(
        &self,
        ctx: &RequestContext,
        sku: &Sku,
        items: &[QuotaAsk],
        fence_token: u64,
        draft: &[LicenseRecord],
    ) -> Result<(Txn, pb::BatchReserveQuotaResponse), Error> {
        let (existing, mut world) = self.read_for(sku, items).await?;
        // A preview adds the licences a draft wave would create (never written: its transaction is dropped).
        world.licences.extend(draft.iter().filter(|l| l.product_sku == sku.as_str()).map(|l| (0, l.clone())));
        let d = self.decide(ctx, sku, items, fence_token, &existing, world)?;
        Ok((d.txn, d.answer))
    }

    /// Decides a quota call for `items` of product `sku` from the orders' `existing` reservations
    /// and `world`, in order (see the module docs); the transaction guards the versions of what it
    /// writes and of the product's gates.
    fn decide(
        &self,
        ctx: &RequestContext,
        sku: &Sku,
        items: &[QuotaAsk],
        fence_token: u64,
        existing: &[Option<(ReadAt, ReservationRecord)>],
        world: World,
    ) -> Result<Decided, Error> {
        let now = now_ms();
        let began = std::time::Instant::now();
        let versions: HashMap<String, u64> = world.licences.iter().map(|(v, l)| (l.id.clone(), *v)).collect();

        // Older generations still holding quota give it back first (the order has moved on).
        let mut licences: HashMap<String, LicenseRecord> =
            world.licences.into_iter().map(|(_, l)| (l.id.clone(), l)).collect();
        let mut touched: std::collections::HashSet<String> = std::collections::HashSet::new();
        let mut checks = Vec::with_capacity(items.len());
        for (it, ex) in items.iter().zip(existing) {
            let check = match ex {
                None => ReserveCheck::Evaluate,
                Some((_, r)) => r.check_reserve(it.generation, it.queued_behind.is_none() && !it.judge_only),
            };
            let give_back = match &check {
                ReserveCheck::Supersede { license_id, units, confirmed } => Some((license_id, *units, *confirmed)),
                ReserveCheck::Withdraw { license_id, units } => Some((license_id, *units, false)),
                ReserveCheck::Evaluate | ReserveCheck::AlreadyHeld | ReserveCheck::Stale => None,
            };
            if let Some((license_id, units, confirmed)) = give_back
                && let Some(l) = licences.get_mut(license_id)
            {
                l.used = l.used.saturating_sub(units);
                if confirmed {
                    l.confirmed = l.confirmed.saturating_sub(units);
                }
                touched.insert(license_id.clone());
            }
            checks.push(check);
        }

        let mut planner = QuotaPlanner::new(
            licences.values().filter(|l| l.product_sku == sku.as_str()).cloned().collect(),
            &world.domestic,
            &world.gate,
            now,
        );
        let mut t = Txn::new();
        if fence_token > 0 {
            t.fence(keys::fence(sku), fence_token);
        }
        let mut results = Vec::with_capacity(items.len());
        // Newly reserved quota is only counted in the event (released reservations are listed).
        let (mut reserved_orders, mut reserved_units) = (0u64, 0u64);
        let mut changed_released = Vec::new();
        let mut reserved_detail = Vec::new();
        let mut refused_detail = Vec::new();
        let mut withdrawn_detail = Vec::new();
        for ((it, ex), check) in items.iter().zip(existing).zip(checks) {
            let ver = read_at(ex);
            match check {
                ReserveCheck::AlreadyHeld => {
                    let r = ex.as_ref().map(|(_, r)| reservation_to(r));
                    results.push(pb::QuotaItemResult {
                        order_id: it.order_id.clone(),
                        reservation: r,
                        ..Default::default()
                    });
                }
                ReserveCheck::Stale => {
                    let r = ex.as_ref().map(|(_, r)| reservation_to(r));
                    results.push(pb::QuotaItemResult {
                        order_id: it.order_id.clone(),
                        reservation: r,
                        stale: true,
                        ..Default::default()
                    });
                }
                ReserveCheck::Evaluate | ReserveCheck::Supersede { .. } | ReserveCheck::Withdraw { .. } => {
                    let ask = Ask { buyer_id: &it.buyer_id, units: it.units, justification: &it.justification };
                    if let Some(earlier) = &it.queued_behind {
                        planner.queue_behind(&it.buyer_id, earlier);
                    }
                    let planned = if it.judge_only {
                        planner.judge(&it.order_id, &ask)
                    } else {
                        planner.plan(&it.order_id, &ask)
                    };
                    // What the existing record held went back to its licence above, in this same
                    // commit; when nothing was taken in its place the record says so.
                    let gave_back = match check {
                        ReserveCheck::Supersede { .. } => Some(format!("superseded by generation {}", it.generation)),
                        ReserveCheck::Withdraw { .. } => Some(WITHDRAWN.to_string()),
                        ReserveCheck::Evaluate | ReserveCheck::AlreadyHeld | ReserveCheck::Stale => None,
                    };
                    if let (Some(reason), Some((_, old))) = (gave_back, ex)
                        && !matches!(planned, Planned::Reserved { .. })
                    {
                        let mut released = old.clone();
                        released.set_status(ReservationStatus::Released);
                        released.update_ms = now;
                        released.release_reason = reason;
                        if let ReserveCheck::Supersede { .. } = check {
                            // An older generation's is kept, released, or a later release of that
                            // generation would give the same units back a second time.
                            put_reservation(&mut t, sku, &it.order_id, ver, &released);
                        } else {
                            // This generation's own is forgotten, so that its next ask is judged
                            // afresh (a released record would answer it stale, and the order would
                            // move on to its next generation unjudged); a later release of it finds
                            // nothing to give back.
                            forget_reservation(&mut t, sku, &it.order_id, ver);
                            withdrawn_detail
                                .push(format!("{}/{}:{}:{}", it.order_id, it.generation, old.license_id, old.units));
                        }
                        // Listed as released either way, so the buyer's waiting orders are looked at.
                        changed_released.push(reservation_to(&released));
                    }
                    match planned {
                        Planned::Reserved { license_id, wave_id } => {
                            let r = ReservationRecord {
                                order_id: it.order_id.clone(),
                                generation: it.generation,
                                license_id: license_id.clone(),
                                wave_id,
                                buyer_id: it.buyer_id.clone(),
                                product_sku: sku.to_string(),
                                units: it.units,
                                status: ReservationStatus::Held as i32,
                                create_ms: now,
                                update_ms: now,
                                release_reason: String::new(),
                            };
                            put_reservation(&mut t, sku, &it.order_id, ver, &r);
                            reserved_detail
                                .push(format!("{}/{}:{}:{}", it.order_id, it.generation, license_id, it.units));
                            reserved_orders += 1;
                            reserved_units += r.units;
                            results.push(pb::QuotaItemResult {
                                order_id: it.order_id.clone(),
                                reservation: Some(reservation_to(&r)),
                                ..Default::default()
                            });
                        }
                        Planned::Servable => {
                            results.push(pb::QuotaItemResult {
                                order_id: it.order_id.clone(),
                                servable: true,
                                ..Default::default()
                            });
                        }
                        Planned::Refused { failures, rejectable } => {
                            refused_detail.push(format!(
                                "{}/{}:{}",
                                it.order_id,
                                it.generation,
                                failure_codes(&failures)
                            ));
                            results.push(pb::QuotaItemResult {
                                order_id: it.order_id.clone(),
                                failures: failures.iter().map(failure_to).collect(),
                                rejectable,
                                ..Default::default()
                            });
                        }
                    }
                }
            }
        }
        let mut written = Vec::new();
        for l in planner.into_touched() {
            touched.remove(&l.id);
            let ver = versions.get(&l.id).copied().unwrap_or(0);
            if let Some(key) = keys::license(&licence_of(&l.id)) {
                t.replace(key, ver, encode(&l));
                written.push((ver + 1, l));
            }
        }
        // Licences that only gave back superseded quota.
        for id in touched {
            if let (Some(l), Some(key)) = (licences.get(&id), keys::license(&licence_of(&id))) {
                let ver = versions.get(&id).copied().unwrap_or(0);
                t.replace(key, ver, encode(l));
                written.push((ver + 1, l.clone()));
            }
        }
        if t.is_empty() && reserved_detail.is_empty() && refused_detail.is_empty() && withdrawn_detail.is_empty() {
            return Ok(Decided { txn: t, answer: pb::BatchReserveQuotaResponse { results }, written });
        }
        tracing::debug!(items = items.len(), plan_us = began.elapsed().as_micros() as u64, "quota decided");
        // The decision stands only if the product's gates are as read.
        t.expect_version(keys::policy(sku), world.policy_version);
        t.expect_version(keys::exports(sku), world.exports_version);
        if reserved_orders > 0 || !changed_released.is_empty() {
            // Released reservations are listed (they may let a waiting order of the buyer through);
            // newly reserved ones only counted.
            emit(
                &mut t,
                Part::Product(sku),
                ctx,
                now,
                pb::licensing_event::Kind::QuotaChanged(pb::QuotaChanged {
                    product_sku: sku.to_string(),
                    reservations: changed_released,
                    reserved_orders,
                    reserved_units,
                }),
            );
        }
        record(&mut t, Part::Product(sku), ctx, now, "quota.decided", sku, {
            let mut detail =
                format!("reserved [{}]; refused [{}]", reserved_detail.join(" "), refused_detail.join(" "));
            if !withdrawn_detail.is_empty() {
                detail.push_str(&format!("; given back (never landed) [{}]", withdrawn_detail.join(" ")));
            }
            detail
        });
        Ok(Decided { txn: t, answer: pb::BatchReserveQuotaResponse { results }, written })
    }

    /// What publishing a draft wave now would do to quota (see `PreviewWaveQuota`): the very decision
    /// BatchReserveQuota makes, over the world with the draft's licences added, whose transaction is
    /// dropped instead of committed.
    pub(crate) async fn preview_wave_quota(
        &self,
        ctx: &RequestContext,
        req: pb::PreviewWaveQuotaRequest,
    ) -> Result<pb::PreviewWaveQuotaResponse, Error> {
        let mut v = Violations::new();
        let wave_id = validate::parse::<WaveId>(&mut v, "wave_id", req.wave_id.clone());
        let wave_id = validate::finish(v, wave_id)?;
        let batch = if req.items.is_empty() {
            None
        } else {
            Some(QuotaBatch::try_from(pb::BatchReserveQuotaRequest {
                request_id: String::new(),
                product_sku: req.product_sku,
                items: req.items,
                fence_token: 0,
            })?)
        };
        let draft = self.would_be_licences(&wave_id).await?;
        let now = now_ms();
        let licenses = draft.iter().map(|l| crate::convert::license_to(l, now)).collect();
        let results = match batch {
            None => Vec::new(),
            Some(b) => self.reserve_attempt(ctx, &b.product_sku, &b.asks, 0, &draft).await?.1.results,
        };
        Ok(pb::PreviewWaveQuotaResponse { licenses, results })
    }

    pub(crate) async fn batch_release_quota(
        &self,
        ctx: &RequestContext,
        req: pb::BatchReleaseQuotaRequest,
    ) -> Result<pb::BatchReleaseQuotaResponse, Error> {
        let batch = ReleaseBatch::try_from(req)?;
        // Reservations live in their products' partitions: one commit per product, each idempotent
        // (a retried call finds its releases done and answers them as they stand), in the order the
        // products first appear; the answer keeps the items' order.
        let mut by_product: BTreeMap<Sku, Vec<(usize, &QuotaRef)>> = BTreeMap::new();
        for (i, r) in batch.refs.iter().enumerate() {
            // Checked at the edge (`convert.rs`).
            by_product.entry(Sku::from_trusted(r.product_sku.as_str())).or_default().push((i, r));
        }
        let mut answers: Vec<Option<pb::QuotaReservation>> = vec![None; batch.refs.len()];
        for (sku, refs) in by_product {
            let items: Vec<(String, u64)> = refs.iter().map(|(_, r)| (r.order_id.clone(), r.generation)).collect();
            let out = self.release_items(ctx, &sku, &items, &batch.reason, batch.unless_confirmed).await?;
            for ((i, _), r) in refs.iter().zip(out) {
                answers[*i] = Some(r);
            }
        }
        Ok(pb::BatchReleaseQuotaResponse { reservations: answers.into_iter().flatten().collect() })
    }

    /// Returns quota of `(order, generation)` pairs of product `sku` to their licences (see
    /// `ReleaseQuota`): one answer per item, in order.
    async fn release_items(
        &self,
        ctx: &RequestContext,
        sku: &Sku,
        items: &[(String, u64)],
        reason: &str,
        unless_confirmed: bool,
    ) -> Result<Vec<pb::QuotaReservation>, Error> {
        let part = Part::Product(sku);
        let (answer, _) = self
            .run_in(part, None, || async {
                let now = now_ms();
                let orders: Vec<&str> = items.iter().map(|(o, _)| o.as_str()).collect();
                let existing = self.load_reservations(sku, &orders).await?;
                let mut lic_ids: Vec<String> = existing
                    .iter()
                    .flatten()
                    .filter(|(_, r)| r.held_units() > 0)
                    .map(|(_, r)| r.license_id.clone())
                    .collect();
                lic_ids.sort();
                lic_ids.dedup();
                let lic_keys: Vec<String> = lic_ids
                    .iter()
                    .filter(|id| keys::license_sku(id) == Some(sku.as_str()))
                    .filter_map(|id| keys::license(&LicenceId::from_trusted(id.as_str())))
                    .collect();
                let mut licences: HashMap<String, (u64, LicenseRecord)> = self
                    .load_many::<LicenseRecord>(&lic_keys)
                    .await?
                    .into_iter()
                    .flatten()
                    .map(|(v, l)| (l.id.clone(), (v, l)))
                    .collect();
                let mut t = Txn::new();
                let mut out = Vec::with_capacity(items.len());
                let mut changed = Vec::new();
                let mut detail = Vec::new();
                let mut touched = std::collections::BTreeSet::new();
                for ((order_id, generation), ex) in items.iter().zip(existing) {
                    let (ver, cur) = match ex {
                        Some((v, r)) => (v, Some(r)),
                        None => (ReadAt::default(), None),
                    };
                    let tombstone = |base: Option<&ReservationRecord>| ReservationRecord {
                        order_id: order_id.clone(),
                        generation: *generation,
                        status: ReservationStatus::Released as i32,
                        create_ms: now,
                        update_ms: now,
                        release_reason: reason.to_string(),
                        product_sku: sku.to_string(),
                        buyer_id: base.map(|b| b.buyer_id.clone()).unwrap_or_default(),
                        ..Default::default()
                    };
                    let next = match cur {
                        None => Some(tombstone(None)),
                        Some(r) if r.generation > *generation => {
                            out.push(reservation_to(&r));
                            None
                        }
                        Some(r) if r.generation == *generation && r.status() == ReservationStatus::Released => {
                            out.push(reservation_to(&r));
                            None
                        }
                        Some(r)
                            if r.generation == *generation
                                && r.status() == ReservationStatus::Confirmed
                                && unless_confirmed =>
                        {
                            out.push(reservation_to(&r));
                            None
                        }
                        Some(r) => {
                            // Held or confirmed at this generation, or anything at an older one: give back
                            // what it holds.
                            if r.held_units() > 0
                                && let Some((_, l)) = licences.get_mut(&r.license_id)
                            {
                                l.used = l.used.saturating_sub(r.units);
                                if r.status() == ReservationStatus::Confirmed {
                                    l.confirmed = l.confirmed.saturating_sub(r.units);
                                }
                                l.update_ms = now;
                                touched.insert(r.license_id.clone());
                            }
                            if r.generation == *generation {
                                let mut released = r.clone();
                                released.set_status(ReservationStatus::Released);
                                released.update_ms = now;
                                released.release_reason = reason.to_string();
                                Some(released)
                            } else {
                                Some(tombstone(Some(&r)))
                            }
                        }
                    };
                    if let Some(rec) = next {
                        put_reservation(&mut t, sku, order_id, ver, &rec);
                        detail.push(format!("{order_id}/{generation}:{}", rec.units));
                        let p = reservation_to(&rec);
                        changed.push(p.clone());
                        out.push(p);
                    }
                }
                for id in touched {
                    if let (Some((v, l)), Some(key)) = (licences.get(&id), keys::license(&licence_of(&id))) {
                        t.replace(key, *v, encode(l));
                    }
                }
                if t.is_empty() {
                    return Ok((t, pb::BatchReleaseQuotaResponse { reservations: out }));
                }
                emit(
                    &mut t,
                    part,
                    ctx,
                    now,
                    pb::licensing_event::Kind::QuotaChanged(pb::QuotaChanged {
                        product_sku: sku.to_string(),
                        reservations: changed,
                        ..Default::default()
                    }),
                );
                record(&mut t, part, ctx, now, "quota.released", sku, format!("{}: {}", reason, detail.join(" ")));
                Ok((t, pb::BatchReleaseQuotaResponse { reservations: out }))
            })
            .await?;
        Ok(answer.reservations)
    }

    pub(crate) async fn confirm_quota(
        &self,
        ctx: &RequestContext,
        req: pb::ConfirmQuotaRequest,
    ) -> Result<pb::ConfirmQuotaResponse, Error> {
        let mut v = Violations::new();
        validate::request_id(&mut v, &req.request_id);
        let order_id = validate::parse::<OrderId>(&mut v, "order_id", req.order_id.clone());
        let sku = validate::parse::<Sku>(&mut v, "product_sku", req.product_sku.clone());
        if req.generation == 0 {
            v.add("generation", "must be at least 1");
        }
        let (order_id, sku) = validate::finish(v, (order_id, sku))?;
        let sku = &sku;
        let part = Part::Product(sku);
        let idem = IdemKey::new(&self.inner.idem, "ConfirmQuota", &req.request_id, &req).in_partition(keys::part(sku));
        let (answer, _) = self
            .run_in(part, Some(&idem), || async {
                let now = now_ms();
                let (rver, mut r) = self.require_reservation(sku, order_id.as_str()).await?;
                if r.generation == req.generation && r.status() == ReservationStatus::Confirmed {
                    return Ok((Txn::new(), pb::ConfirmQuotaResponse { reservation: Some(reservation_to(&r)) }));
                }
                if r.generation != req.generation || r.status() != ReservationStatus::Held {
                    return Err(Error::precondition(
                        "RESERVATION_NOT_HELD",
                        &req.order_id,
                        format!(
                            "order {} holds no quota at generation {} (reservation is at generation {}, {:?})",
                            req.order_id,
                            req.generation,
                            r.generation,
                            r.status()
                        ),
                    ));
                }
                let lkey = keys::license(&LicenceId::from_trusted(r.license_id.as_str()))
                    .filter(|_| keys::license_sku(&r.license_id) == Some(sku.as_str()))
                    .ok_or_else(|| Error::not_found("licence", &r.license_id))?;
                let ((lver, mut lic), policy, exports) = tokio::try_join!(
                    self.require::<LicenseRecord>(lkey.clone(), "licence", &r.license_id),
                    self.load::<PolicyRecord>(keys::policy(sku)),
                    self.load::<ProductExportRecord>(keys::exports(sku)),
                )?;
                // Confirming commits the quota for good: only while the licence and the product's
                // gates still allow holding it (the rule the orders service re-checks holders by).
                let gate = ProductGate::from_records(policy.as_ref().map(|(_, p)| p), exports.as_ref().map(|(_, e)| e));
                let failures = holding_failures(&lic, &gate, now);
                if !failures.is_empty() {
                    let why: Vec<&str> = failures.iter().map(|f| f.description.as_str()).collect();
                    return Err(Error::Precondition {
                        reason: "QUOTA_NOT_USABLE",
                        message: format!("order {}'s quota can't be confirmed: {}", r.order_id, why.join("; ")),
                        violations: failures
                            .iter()
                            .map(|f| {
                                let subject =
                                    if f.license_id.is_empty() { r.product_sku.clone() } else { f.license_id.clone() };
                                (f.condition().api_name().to_string(), subject, f.description.clone())
                            })
                            .collect(),
                    });
                }
                lic.confirmed = lic.confirmed.saturating_add(r.units);
                lic.update_ms = now;
                r.set_status(ReservationStatus::Confirmed);
                r.update_ms = now;
                let mut t = Txn::new();
                t.replace(lkey.clone(), lver, encode(&lic));
                put_reservation(&mut t, sku, order_id.as_str(), rver, &r);
                t.expect_version(keys::policy(sku), policy.map(|(v, _)| v).unwrap_or(0));
                t.expect_version(keys::exports(sku), exports.map(|(v, _)| v).unwrap_or(0));
                let out = reservation_to(&r);
                emit(
                    &mut t,
                    part,
                    ctx,
                    now,
                    pb::licensing_event::Kind::QuotaChanged(pb::QuotaChanged {
                        product_sku: r.product_sku.clone(),
                        reservations: vec![out.clone()],
                        ..Default::default()
                    }),
                );
                record(
                    &mut t,
                    part,
                    ctx,
                    now,
                    "quota.confirmed",
                    &r.order_id,
                    format!("{} units of {}", r.units, lic.id),
                );
                Ok((t, pb::ConfirmQuotaResponse { reservation: Some(out) }))
            })
            .await?;
        Ok(answer)
    }

    pub(crate) async fn get_quota_reservation(
        &self,
        req: pb::GetQuotaReservationRequest,
    ) -> Result<pb::GetQuotaReservationResponse, Error> {
        let mut v = Violations::new();
        let order_id = validate::parse::<OrderId>(&mut v, "order_id", req.order_id);
        let sku = validate::parse::<Sku>(&mut v, "product_sku", req.product_sku);
        let (order_id, sku) = validate::finish(v, (order_id, sku))?;
        let (_, r) = self.require_reservation(&sku, order_id.as_str()).await?;
        Ok(pb::GetQuotaReservationResponse { reservation: Some(reservation_to(&r)) })
    }

    /// Whether quota orders hold may still be used (see `RecheckQuota`): one read of the
    /// reservations, their licences and the product's gates, judged by
    /// [`holding_failures`] — the same rules, in the same words, as evaluation.
    pub(crate) async fn recheck_quota(&self, req: pb::RecheckQuotaRequest) -> Result<pb::RecheckQuotaResponse, Error> {
        let req = Recheck::try_from(req)?;
        let sku = &req.product_sku;
        let orders: Vec<&str> = req.refs.iter().map(|(order, _)| order.as_str()).collect();
        let (existing, policy, exports) = tokio::try_join!(
            self.load_reservations(sku, &orders),
            self.load::<PolicyRecord>(keys::policy(sku)),
            self.load::<ProductExportRecord>(keys::exports(sku)),
        )?;
        let gate = ProductGate::from_records(policy.as_ref().map(|(_, p)| p), exports.as_ref().map(|(_, e)| e));
        let mut lic_ids: Vec<String> = existing.iter().flatten().map(|(_, r)| r.license_id.clone()).collect();
        lic_ids.sort();
        lic_ids.dedup();
        lic_ids.retain(|id| !id.is_empty());
        let lic_keys: Vec<String> = lic_ids
            .iter()
            .filter(|id| keys::license_sku(id) == Some(sku.as_str()))
            .filter_map(|id| keys::license(&LicenceId::from_trusted(id.as_str())))
            .collect();
        let licences: HashMap<String, LicenseRecord> = self
            .load_many::<LicenseRecord>(&lic_keys)
            .await?
            .into_iter()
            .flatten()
            .map(|(_, l)| (l.id.clone(), l))
            .collect();
        let now = now_ms();
        let results = req
            .refs
            .iter()
            .zip(existing)
            .map(|((order_id, generation), ex)| {
                let Some((_, r)) = ex else {
                    return pb::RecheckResult { order_id: order_id.clone(), ..Default::default() };
                };
                let holds = r.generation == *generation && r.held_units() > 0 && r.product_sku == sku.as_str();
                let failures = match licences.get(&r.license_id) {
                    Some(l) if holds => holding_failures(l, &gate, now).iter().map(failure_to).collect(),
                    _ => Vec::new(),
                };
                pb::RecheckResult { order_id: order_id.clone(), reservation: Some(reservation_to(&r)), failures }
            })
            .collect();
        Ok(pb::RecheckQuotaResponse { results })
    }
}
