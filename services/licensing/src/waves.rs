//! Approval waves: drafted, then published.
//!
//! A wave's applications, the approval queue and the wave itself live in the desk's partition; its
//! licences in their products' partitions. Publishing therefore happens in two steps, neither of which
//! needs a transaction across partitions:
//! 1. **Decide** (one desk commit, all or nothing): every granted application must still be queued; they
//!    become granted, leave the queue, get their licence ids; the wave becomes published and lists its
//!    products as pending (and joins [`keys::waves_pending`]). From here the wave is published for good.
//! 2. **Put in force**, product by product (one commit in each product's partition): the product's
//!    licences and its licence index are written, with the product's `WavePublished` event (what the
//!    orders service propagates) and audit entry. Each is idempotent — the licences' absence is the
//!    guard — so a retry, a second replica or the recovery task can't apply a product twice. Then one
//!    desk commit clears the pending list.
//!
//! `PublishWave` answers after both steps, so its caller sees every licence in force. A crash between
//! them leaves the wave's products pending: a retried `PublishWave` (same request id) finishes them,
//! and so does every replica's recovery task within seconds ([`Licensing::spawn_wave_recovery`]).

use chipgate_domain::ids::{ApplicationId, BuyerId, LicenceId, Sku, WaveId};
use chipgate_domain::licensing::{
    ApplicationRecord, ApplicationStatus, GrantRecord, LicenseRecord, LicenseStatus, WaveError, WaveRecord, WaveStatus,
};
use chipgate_proto::licensing::v1 as pb;
use chipgate_runtime::errors::Violations;
use chipgate_runtime::paging::{self, Page};
use chipgate_runtime::service::Records;
use chipgate_runtime::time::now_ms;
use chipgate_runtime::txn::IdemKey;
use chipgate_runtime::{RequestContext, validate};
use chipgate_state::{Backend, Txn};

use crate::apps::QueueVersion;
use crate::convert::{conditions_from, grant_to, license_to, wave_to};
use crate::keys::Part;
use crate::licences::LicenseIndex;
use crate::{Error, Licensing, MAX_UNITS, emit, encode, keys, record};

/// How often each replica looks for published waves whose licences are not all in force.
const RECOVER_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Most grants one wave may hold.
pub const MAX_GRANTS: usize = 10_000;

/// Most grants one page of ListWaves lists (it holds at least one wave, whatever its size): a page of
/// full waves (about 90 bytes a grant) would otherwise pass gRPC's 4 MB message limit, which clients
/// enforce when they decode.
pub const MAX_LISTED_GRANTS: u64 = 20_000;

fn wave_error(wave_id: &str, application_id: &str, e: WaveError) -> Error {
    match e {
        WaveError::Published => Error::precondition(
            "WAVE_PUBLISHED",
            wave_id,
            format!("wave {wave_id} is published; a published wave never changes"),
        ),
        WaveError::NoSuchGrant => Error::not_found("wave grant", &format!("{wave_id}/{application_id}")),
    }
}

/// The application a grant names (its id was parsed when the grant was added).
fn app_of(grant: &GrantRecord) -> ApplicationId {
    ApplicationId::from_trusted(grant.application_id.as_str())
}

/// The licence a grant becomes when its wave is published (`seq` numbers it).
fn licence_of(grant: &GrantRecord, app: &ApplicationRecord, wave_id: &str, seq: u64, now: u64) -> LicenseRecord {
    let conditions = grant.conditions.clone().unwrap_or_default();
    let status = if conditions.terms_pending { LicenseStatus::PendingTerms } else { LicenseStatus::Active };
    LicenseRecord {
        // The grant's product was parsed when its application was submitted.
        id: keys::license_id(&Sku::from_trusted(grant.product_sku.as_str()), seq).into_string(),
        buyer_id: grant.buyer_id.clone(),
        product_sku: grant.product_sku.clone(),
        destination: app.destination.clone(),
        application_id: app.id.clone(),
        wave_id: wave_id.to_string(),
        status: status as i32,
        conditions: Some(conditions),
        granted: grant.granted,
        create_ms: now,
        update_ms: now,
        seq,
        ..Default::default()
    }
}

/// How many times reading a draft and its grants kept apart is tried again when a grant changed in
/// between (the answer would mix two versions of the wave).
const READ_TRIES: usize = 5;

impl Licensing {
    /// Wave `wave_id` with every grant in `grants`, in the order they were added (a draft's are read
    /// from their own records), and the version of its record: a commit guarded on that version
    /// fails if any grant changed since, as every change of a grant rewrites the record.
    ///
    /// # Errors
    /// NOT_FOUND for an unknown wave; [`Error::Contention`] when its grants keep changing while they
    /// are read.
    pub(crate) async fn load_wave(&self, wave_id: &WaveId) -> Result<(u64, WaveRecord), Error> {
        let key = keys::wave(wave_id);
        for _ in 0..READ_TRIES {
            let (ver, mut wave) = self.require::<WaveRecord>(key.clone(), "wave", wave_id).await?;
            if wave.status() != WaveStatus::Draft || wave.grants_apart == 0 {
                return Ok((ver, wave));
            }
            let apart = self.grants_apart(wave_id).await?;
            // Every change of a grant rewrites the wave's record: the same version after the grants
            // were read means they are the ones it counts.
            let now = self.store().get(std::slice::from_ref(&key)).await?.pop().flatten().map(|r| r.version);
            if now == Some(ver) {
                wave.hold_grants(apart);
                return Ok((ver, wave));
            }
        }
        Err(Error::Contention { attempts: READ_TRIES as u32 })
    }

    /// Draft `wave_id`'s grants kept apart, in no particular order.
    async fn grants_apart(&self, wave_id: &WaveId) -> Result<Vec<GrantRecord>, Error> {
        let ids = self.store().zrange(&keys::wave_grants(wave_id), 0, -1, false).await?;
        let grant_keys: Vec<String> =
            ids.iter().map(|(app, _)| keys::wave_grant(wave_id, &ApplicationId::from_trusted(app.as_str()))).collect();
        Ok(self.load_many::<GrantRecord>(&grant_keys).await?.into_iter().flatten().map(|(_, g)| g).collect())
    }

    /// The application `app`'s grant in `wave` and the version its record was read at (0: none):
    /// `existing`, its own record as read. A draft written before grants were kept apart holds them
    /// in its record instead: they are moved out into `t` as records of their own
    /// ([`WaveRecord::move_grants_apart`]), except the application's, which is returned unwritten for
    /// the caller to write or drop. The caller writes the wave record in the same commit.
    fn draft_grant(
        t: &mut Txn,
        wave_id: &WaveId,
        wave: &mut WaveRecord,
        app: &str,
        existing: Option<(u64, GrantRecord)>,
    ) -> (u64, Option<GrantRecord>) {
        if wave.status() != WaveStatus::Draft || wave.grants.is_empty() {
            return existing.map_or((0, None), |(v, g)| (v, Some(g)));
        }
        let mut kept = None;
        for g in wave.move_grants_apart() {
            if g.application_id == app {
                kept = Some(g);
                continue;
            }
            t.replace(keys::wave_grant(wave_id, &app_of(&g)), 0, encode(&g));
            t.zadd(keys::wave_grants(wave_id), &g.application_id, g.place as f64);
        }
        (0, kept)
    }

    /// The licences publishing draft `wave_id` now would create, numbered as they would be if nothing
    /// else is published first (a preview: nothing is taken or changed).
    ///
    /// # Errors
    /// NOT_FOUND for an unknown wave; FAILED_PRECONDITION for a published one, or one whose publication
    /// would be refused (a granted application no longer queued).
    pub(crate) async fn would_be_licences(&self, wave_id: &WaveId) -> Result<Vec<LicenseRecord>, Error> {
        let (_, wave) = self.load_wave(wave_id).await?;
        if wave.status() != WaveStatus::Draft {
            return Err(wave_error(wave_id, "", WaveError::Published));
        }
        let app_keys: Vec<String> = wave.grants.iter().map(|g| keys::application(&app_of(g))).collect();
        let apps = self.load_many::<ApplicationRecord>(&app_keys).await?;
        // The counter as it stands: publication takes the next ids (INCRBY 0 reads without changing).
        let last = self.store().incr(&keys::counter("lic"), 0).await?;
        let now = now_ms();
        let mut out = Vec::with_capacity(wave.grants.len());
        for (i, (g, a)) in wave.grants.iter().zip(apps).enumerate() {
            match a {
                Some((_, a)) if a.status() == ApplicationStatus::Queued => {
                    out.push(licence_of(g, &a, wave_id, last + 1 + i as u64, now));
                }
                other => {
                    let state = other.map(|(_, a)| format!("{:?}", a.status())).unwrap_or_else(|| "missing".into());
                    return Err(Error::precondition(
                        "GRANT_NOT_QUEUED",
                        &g.application_id,
                        format!(
                            "wave {wave_id} grants application {} which is {state}: publishing it would be refused",
                            g.application_id
                        ),
                    ));
                }
            }
        }
        Ok(out)
    }

    pub(crate) async fn create_wave(
        &self,
        ctx: &RequestContext,
        req: pb::CreateWaveRequest,
    ) -> Result<pb::CreateWaveResponse, Error> {
        let mut v = Violations::new();
        validate::request_id(&mut v, &req.request_id);
        validate::text(&mut v, "display_name", &req.display_name, 200, false);
        v.check().map_err(Error::Status)?;
        let idem = IdemKey::new(&self.inner.idem, "CreateWave", &req.request_id, &req);
        let (answer, _) = self
            .run_in(Part::Desk, Some(&idem), || async {
                let seq = self.next_ids("wave", 1).await?;
                let now = now_ms();
                let id = WaveId::from_trusted(format!("wave-{seq}"));
                let wave = WaveRecord {
                    id: id.to_string(),
                    display_name: if req.display_name.is_empty() { id.to_string() } else { req.display_name.clone() },
                    status: WaveStatus::Draft as i32,
                    create_ms: now,
                    seq,
                    ..Default::default()
                };
                let mut t = Txn::new();
                t.replace(keys::wave(&id), 0, encode(&wave));
                t.zadd(keys::waves(), &id, seq as f64);
                emit(
                    &mut t,
                    Part::Desk,
                    ctx,
                    now,
                    pb::licensing_event::Kind::WaveChanged(pb::WaveChanged { wave_id: id.to_string() }),
                );
                record(&mut t, Part::Desk, ctx, now, "wave.drafted", &id, format!("draft {:?}", wave.display_name));
                Ok((t, pb::CreateWaveResponse { wave: Some(wave_to(&wave)) }))
            })
            .await?;
        Ok(answer)
    }

    pub(crate) async fn add_wave_grant(
        &self,
        ctx: &RequestContext,
        req: pb::AddWaveGrantRequest,
    ) -> Result<pb::AddWaveGrantResponse, Error> {
        let mut v = Violations::new();
        validate::request_id(&mut v, &req.request_id);
        let wave_id = validate::parse::<WaveId>(&mut v, "wave_id", req.wave_id.clone());
        let app_id = validate::parse::<ApplicationId>(&mut v, "application_id", req.application_id.clone());
        validate::units(&mut v, "granted_units", req.granted_units, MAX_UNITS);
        let conditions = req.conditions.as_ref().map(conditions_from).unwrap_or_default();
        for (field, problem) in conditions.problems() {
            v.add(format!("conditions.{field}"), problem);
        }
        let (wave_id, app_id) = validate::finish(v, (wave_id, app_id))?;
        let idem = IdemKey::new(&self.inner.idem, "AddWaveGrant", &req.request_id, &req);
        let (answer, _) = self
            .run_in(Part::Desk, Some(&idem), || async {
                let grant_key = keys::wave_grant(&wave_id, &app_id);
                let (wave, app, existing) = tokio::try_join!(
                    self.require::<WaveRecord>(keys::wave(&wave_id), "wave", &wave_id),
                    self.require::<ApplicationRecord>(keys::application(&app_id), "application", &app_id),
                    self.load::<GrantRecord>(grant_key.clone()),
                )?;
                let ((wver, mut wave), (aver, app)) = (wave, app);
                if wave.status() != WaveStatus::Draft {
                    return Err(wave_error(&wave.id, &app.id, WaveError::Published));
                }
                if app.status() != ApplicationStatus::Queued {
                    return Err(Error::precondition(
                        "APPLICATION_NOT_QUEUED",
                        &app.id,
                        format!(
                            "application {} is {:?}; only queued applications can be granted",
                            app.id,
                            app.status()
                        ),
                    ));
                }
                if req.granted_units > app.quantity {
                    let mut v = Violations::new();
                    v.add(
                        "granted_units",
                        format!("{} is more than the {} units applied for", req.granted_units, app.quantity),
                    );
                    return Err(Error::Invalid(v));
                }
                let mut t = Txn::new();
                // A draft written before grants were kept apart moves them out first (once); the
                // application's grant among them, if any, is the one replaced.
                let (gver, old) = Self::draft_grant(&mut t, &wave_id, &mut wave, &app.id, existing);
                if wave.grant_count() >= MAX_GRANTS as u64 && old.is_none() {
                    return Err(Error::precondition(
                        "WAVE_FULL",
                        &wave.id,
                        format!("a wave holds at most {MAX_GRANTS} grants"),
                    ));
                }
                let grant = GrantRecord {
                    application_id: app.id.clone(),
                    buyer_id: app.buyer_id.clone(),
                    product_sku: app.product_sku.clone(),
                    granted: req.granted_units,
                    conditions: Some(conditions.clone()),
                    license_id: String::new(),
                    license_seq: 0,
                    place: 0,
                };
                let grant = wave.put_grant(old.as_ref(), grant).map_err(|e| wave_error(&wave.id, &app.id, e))?;
                t.replace(grant_key, gver, encode(&grant));
                t.zadd(keys::wave_grants(&wave_id), &grant.application_id, grant.place as f64);
                let now = now_ms();
                t.replace(keys::wave(&wave_id), wver, encode(&wave));
                t.expect_version(keys::application(&app_id), aver);
                emit(
                    &mut t,
                    Part::Desk,
                    ctx,
                    now,
                    pb::licensing_event::Kind::WaveChanged(pb::WaveChanged { wave_id: wave.id.clone() }),
                );
                record(
                    &mut t,
                    Part::Desk,
                    ctx,
                    now,
                    "wave.grant_added",
                    &wave.id,
                    format!(
                        "{} ({} for {}): {} of {} units; cap {}, ratio {} bps, justification {}, terms {}",
                        app.id,
                        app.buyer_id,
                        app.product_sku,
                        req.granted_units,
                        app.quantity,
                        conditions.per_order_cap,
                        conditions.domestic_ratio_bps,
                        if conditions.justification_required { "required" } else { "not required" },
                        if conditions.terms_pending { "pending" } else { "final" },
                    ),
                );
                Ok((t, pb::AddWaveGrantResponse { wave: Some(wave_to(&wave)), grant: Some(grant_to(&grant)) }))
            })
            .await?;
        Ok(answer)
    }

    pub(crate) async fn remove_wave_grant(
        &self,
        ctx: &RequestContext,
        req: pb::RemoveWaveGrantRequest,
    ) -> Result<pb::RemoveWaveGrantResponse, Error> {
        let mut v = Violations::new();
        validate::request_id(&mut v, &req.request_id);
        let wave_id = validate::parse::<WaveId>(&mut v, "wave_id", req.wave_id.clone());
        validate::id(&mut v, "application_id", &req.application_id);
        let wave_id = validate::finish(v, wave_id)?;
        let idem = IdemKey::new(&self.inner.idem, "RemoveWaveGrant", &req.request_id, &req);
        let (answer, _) = self
            .run_in(Part::Desk, Some(&idem), || async {
                let app_id = ApplicationId::from_trusted(req.application_id.as_str());
                let grant_key = keys::wave_grant(&wave_id, &app_id);
                let ((wver, mut wave), existing) = tokio::try_join!(
                    self.require::<WaveRecord>(keys::wave(&wave_id), "wave", &wave_id),
                    self.load::<GrantRecord>(grant_key.clone()),
                )?;
                let mut t = Txn::new();
                let (gver, old) = Self::draft_grant(&mut t, &wave_id, &mut wave, app_id.as_str(), existing);
                wave.take_grant(old.as_ref()).map_err(|e| wave_error(&wave.id, &req.application_id, e))?;
                if gver > 0 {
                    t.expect_version(grant_key.clone(), gver);
                    t.delete(grant_key);
                }
                t.zrem(keys::wave_grants(&wave_id), app_id.as_str());
                let now = now_ms();
                t.replace(keys::wave(&wave_id), wver, encode(&wave));
                emit(
                    &mut t,
                    Part::Desk,
                    ctx,
                    now,
                    pb::licensing_event::Kind::WaveChanged(pb::WaveChanged { wave_id: wave.id.clone() }),
                );
                record(&mut t, Part::Desk, ctx, now, "wave.grant_removed", &wave.id, req.application_id.clone());
                Ok((t, pb::RemoveWaveGrantResponse { wave: Some(wave_to(&wave)), grant: old.as_ref().map(grant_to) }))
            })
            .await?;
        Ok(answer)
    }

    pub(crate) async fn publish_wave(
        &self,
        ctx: &RequestContext,
        req: pb::PublishWaveRequest,
    ) -> Result<pb::PublishWaveResponse, Error> {
        let mut v = Violations::new();
        validate::request_id(&mut v, &req.request_id);
        let wave_id = validate::parse::<WaveId>(&mut v, "wave_id", req.wave_id.clone());
        let wave_id = validate::finish(v, wave_id)?;
        let idem = IdemKey::new(&self.inner.idem, "PublishWave", &req.request_id, &req);
        let (mut answer, _) = self.run_in(Part::Desk, Some(&idem), || self.publish_attempt(ctx, &wave_id)).await?;
        // Decided (now or by an earlier attempt of this call): every licence in force before answering.
        answer.wave = Some(self.put_in_force(ctx, &wave_id).await?);
        Ok(answer)
    }

    /// Step 1 (see the module docs): the decision, in the desk.
    async fn publish_attempt(
        &self,
        ctx: &RequestContext,
        wave_id: &WaveId,
    ) -> Result<(Txn, pb::PublishWaveResponse), Error> {
        let (wver, mut wave) = self.load_wave(wave_id).await?;
        if wave.status() != WaveStatus::Draft {
            return Err(wave_error(wave_id, "", WaveError::Published));
        }
        if wave.grants.is_empty() {
            return Err(Error::precondition("WAVE_EMPTY", wave_id, format!("wave {wave_id} has no grants to publish")));
        }
        let app_keys: Vec<String> = wave.grants.iter().map(|g| keys::application(&app_of(g))).collect();
        let apps = self.load_many::<ApplicationRecord>(&app_keys).await?;
        let mut not_queued = Vec::new();
        for (g, a) in wave.grants.iter().zip(&apps) {
            match a {
                Some((_, a)) if a.status() == ApplicationStatus::Queued => {}
                Some((_, a)) => not_queued.push((g.application_id.clone(), format!("{:?}", a.status()))),
                None => not_queued.push((g.application_id.clone(), "missing".to_string())),
            }
        }
        if !not_queued.is_empty() {
            return Err(Error::Precondition {
                reason: "GRANT_NOT_QUEUED",
                message: format!(
                    "wave {wave_id} grants applications that are no longer queued: {}; remove those grants first",
                    not_queued.iter().map(|(id, s)| format!("{id} ({s})")).collect::<Vec<_>>().join(", ")
                ),
                violations: not_queued
                    .into_iter()
                    .map(|(id, s)| ("GRANT_NOT_QUEUED".to_string(), id, format!("application is {s}")))
                    .collect(),
            });
        }
        let qver = self.load::<QueueVersion>(keys::queue_version()).await?.map(|(v, _)| v).unwrap_or(0);
        let n = wave.grants.len() as u64;
        let first = self.next_ids("lic", n).await?;
        let now = now_ms();

        let mut t = Txn::new();
        t.replace(keys::queue_version(), qver, encode(&QueueVersion {}));
        let mut licenses = Vec::with_capacity(wave.grants.len());
        let mut detail = Vec::with_capacity(wave.grants.len());
        for (i, (grant, app)) in wave.grants.iter_mut().zip(apps).enumerate() {
            let Some((aver, mut app)) = app else { continue };
            let lic = licence_of(grant, &app, wave_id, first + i as u64, now);
            let conditions = lic.conditions();
            grant.license_id = lic.id.clone();
            grant.license_seq = lic.seq;
            app.set_status(ApplicationStatus::Granted);
            app.wave_id = wave_id.to_string();
            app.license_id = lic.id.clone();
            app.update_ms = now;
            t.replace(keys::application(&app_of(grant)), aver, encode(&app));
            t.delete(keys::open_application(
                &BuyerId::from_trusted(app.buyer_id.as_str()),
                &Sku::from_trusted(app.product_sku.as_str()),
            ));
            t.zrem(keys::queue(), &app.id);
            // The grant is held in the published wave's record from now on.
            t.delete(keys::wave_grant(wave_id, &app_of(grant)));
            // The listing indexes name the licence from the decision on; its record follows in step 2
            // (a listing in between skips it).
            t.zadd(keys::licenses(), &lic.id, lic.seq as f64);
            t.zadd(keys::licenses_of(&BuyerId::from_trusted(lic.buyer_id.as_str())), &lic.id, lic.seq as f64);
            detail.push(format!(
                "{}→{} ({} {} x {}, {})",
                app.id,
                lic.id,
                lic.buyer_id,
                lic.granted,
                lic.product_sku,
                if conditions.terms_pending { "terms pending" } else { "active" }
            ));
            licenses.push(license_to(&lic, now));
        }
        wave.set_status(WaveStatus::Published);
        wave.publish_ms = now;
        wave.pending_products = wave.products();
        t.replace(keys::wave(wave_id), wver, encode(&wave));
        t.delete(keys::wave_grants(wave_id));
        t.sadd(keys::waves_pending(), wave_id);
        emit(
            &mut t,
            Part::Desk,
            ctx,
            now,
            pb::licensing_event::Kind::WaveChanged(pb::WaveChanged { wave_id: wave_id.to_string() }),
        );
        record(
            &mut t,
            Part::Desk,
            ctx,
            now,
            "wave.published",
            wave_id,
            format!("{} grants, {} units: {}", wave.grants.len(), wave.total_granted(), detail.join("; ")),
        );
        Ok((t, pb::PublishWaveResponse { wave: Some(wave_to(&wave)), licenses }))
    }

    /// Step 2 (see the module docs): puts every pending product's licences of published wave
    /// `wave_id` in force, then clears its pending list. Idempotent; a draft is left alone. Returns the
    /// wave as it then stands.
    pub(crate) async fn put_in_force(&self, ctx: &RequestContext, wave_id: &WaveId) -> Result<pb::Wave, Error> {
        let (_, wave) = self.load_wave(wave_id).await?;
        if wave.status() != WaveStatus::Published {
            return Ok(wave_to(&wave));
        }
        if !wave.pending_products.is_empty() {
            let app_keys: Vec<String> = wave.grants.iter().map(|g| keys::application(&app_of(g))).collect();
            let apps: std::collections::HashMap<String, ApplicationRecord> = self
                .load_many::<ApplicationRecord>(&app_keys)
                .await?
                .into_iter()
                .flatten()
                .map(|(_, a)| (a.id.clone(), a))
                .collect();
            for sku in &wave.pending_products {
                self.put_product_in_force(ctx, &wave, &Sku::from_trusted(sku.as_str()), &apps).await?;
            }
        }
        let (answer, _) = self
            .run_in(Part::Desk, None, || async {
                let (ver, mut w) = self.require::<WaveRecord>(keys::wave(wave_id), "wave", wave_id).await?;
                let mut t = Txn::new();
                if !w.pending_products.is_empty() {
                    w.pending_products.clear();
                    t.replace(keys::wave(wave_id), ver, encode(&w));
                }
                t.srem(keys::waves_pending(), wave_id);
                Ok((t, pb::GetWaveResponse { wave: Some(wave_to(&w)) }))
            })
            .await?;
        answer.wave.ok_or_else(|| Error::Internal(format!("wave {wave_id} vanished")))
    }

    /// One product's part of step 2, in the product's partition.
    async fn put_product_in_force(
        &self,
        ctx: &RequestContext,
        wave: &WaveRecord,
        sku: &Sku,
        apps: &std::collections::HashMap<String, ApplicationRecord>,
    ) -> Result<(), Error> {
        let part = Part::Product(sku);
        let grants: Vec<&GrantRecord> = wave.grants.iter().filter(|g| g.product_sku == sku.as_str()).collect();
        self.run_in(part, None, || async {
            let lic_keys: Vec<String> =
                grants.iter().filter_map(|g| keys::license(&LicenceId::from_trusted(g.license_id.as_str()))).collect();
            if lic_keys.len() != grants.len() {
                return Err(Error::Internal(format!("wave {} holds a grant of {sku} without a licence id", wave.id)));
            }
            // All of a product's licences are written in one commit: one present means all are.
            let existing = self.load_many::<LicenseRecord>(&lic_keys).await?;
            if existing.iter().any(Option::is_some) {
                return Ok((Txn::new(), pb::GetWaveResponse::default()));
            }
            let mut buyers: Vec<&str> = grants.iter().map(|g| g.buyer_id.as_str()).collect();
            buyers.sort_unstable();
            buyers.dedup();
            let index_keys: Vec<String> =
                buyers.iter().map(|b| keys::license_index(&BuyerId::from_trusted(*b), sku)).collect();
            let mut indexes: std::collections::HashMap<String, (u64, LicenseIndex)> = self
                .load_many::<LicenseIndex>(&index_keys)
                .await?
                .into_iter()
                .zip(&index_keys)
                .map(|(ix, key)| (key.clone(), ix.unwrap_or((0, LicenseIndex::default()))))
                .collect();
            let now = wave.publish_ms;
            let mut t = Txn::new();
            let mut granted = Vec::with_capacity(grants.len());
            let mut detail = Vec::with_capacity(grants.len());
            for (g, key) in grants.iter().zip(lic_keys) {
                let app = apps.get(&g.application_id).ok_or_else(|| {
                    Error::Internal(format!(
                        "wave {} grants application {} which is missing",
                        wave.id, g.application_id
                    ))
                })?;
                let lic = licence_of(g, app, &wave.id, g.license_seq, now);
                t.replace(key, 0, encode(&lic));
                if let Some((_, index)) =
                    indexes.get_mut(&keys::license_index(&BuyerId::from_trusted(lic.buyer_id.as_str()), sku))
                    && !index.license_ids.contains(&lic.id)
                {
                    index.license_ids.push(lic.id.clone());
                }
                detail.push(format!("{} ({} {})", lic.id, lic.buyer_id, lic.granted));
                granted.push(pb::GrantedLicense {
                    license_id: lic.id.clone(),
                    buyer_id: lic.buyer_id.clone(),
                    product_sku: lic.product_sku.clone(),
                    state: crate::convert::license_state(lic.effective_state(now_ms())) as i32,
                    granted_units: lic.granted,
                });
            }
            for (key, (ver, index)) in &indexes {
                t.replace(key.clone(), *ver, encode(index));
            }
            // The event carries the decision's time (all of a wave's products tell the same time).
            emit(
                &mut t,
                part,
                ctx,
                now,
                pb::licensing_event::Kind::WavePublished(pb::WavePublished {
                    wave_id: wave.id.clone(),
                    licenses: granted,
                }),
            );
            record(&mut t, part, ctx, now_ms(), "wave.in_force", &wave.id, detail.join("; "));
            Ok((t, pb::GetWaveResponse::default()))
        })
        .await?;
        Ok(())
    }

    /// Finishes, every few seconds until `shutdown`, the published waves whose licences are not all
    /// in force (a crash between publishing's two steps): every replica runs it; the steps are
    /// idempotent, so two replicas finishing one wave do no harm.
    pub fn spawn_wave_recovery(&self, shutdown: chipgate_runtime::Shutdown) -> tokio::task::JoinHandle<()> {
        let service = self.clone();
        tokio::spawn(async move {
            let mut every = chipgate_runtime::periodic::Every::new(RECOVER_EVERY, shutdown);
            while every.tick().await {
                let pending = match service.store().smembers(&keys::waves_pending()).await {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(error = %e, "can't read the waves pending publication; retrying");
                        continue;
                    }
                };
                for wave_id in pending {
                    let ctx = RequestContext::background("wave-recovery", None);
                    // Waves this service published (their ids are its own).
                    match service.put_in_force(&ctx, &WaveId::from_trusted(wave_id.as_str())).await {
                        Ok(_) => tracing::info!(wave_id, "finished putting a published wave's licences in force"),
                        Err(e) => tracing::warn!(wave_id, error = %e.describe(), "can't finish a published wave yet"),
                    }
                }
            }
        })
    }

    pub(crate) async fn get_wave(&self, req: pb::GetWaveRequest) -> Result<pb::GetWaveResponse, Error> {
        let mut v = Violations::new();
        let wave_id = validate::parse::<WaveId>(&mut v, "wave_id", req.wave_id);
        let wave_id = validate::finish(v, wave_id)?;
        let (_, wave) = self.load_wave(&wave_id).await?;
        Ok(pb::GetWaveResponse { wave: Some(wave_to(&wave)) })
    }

    pub(crate) async fn list_waves(&self, req: pb::ListWavesRequest) -> Result<pb::ListWavesResponse, Error> {
        let mut v = Violations::new();
        let page = Page::parse(&mut v, req.page_size, &req.page_token);
        v.check().map_err(Error::Status)?;
        let (mut waves, mut next) = self
            .scan_index::<WaveRecord>(&keys::waves(), &page, true, |id| keys::wave(&WaveId::from_trusted(id)), |_| true)
            .await?;
        // The page ends early at the wave that would take it past MAX_LISTED_GRANTS; every wave is
        // kept by the scan, so the next page starts right after the last one listed.
        let mut listed = 0u64;
        let fits = waves
            .iter()
            .position(|w| {
                listed += w.grant_count();
                listed > MAX_LISTED_GRANTS
            })
            .map(|i| i.max(1));
        if let Some(n) = fits
            && n < waves.len()
        {
            waves.truncate(n);
            next = paging::token(&(page.offset() + n).to_string());
        }
        // Drafts keep their grants apart: read them (the listing shows every wave's grants).
        for w in waves.iter_mut().filter(|w| w.status() == WaveStatus::Draft && w.grants_apart > 0) {
            *w = self.load_wave(&WaveId::from_trusted(w.id.as_str())).await?.1;
        }
        Ok(pb::ListWavesResponse { waves: waves.iter().map(wave_to).collect(), next_page_token: next })
    }
}
