//! Approval waves: drafted, then published atomically.

use chipgate_domain::licensing::{
    ApplicationRecord, ApplicationStatus, GrantRecord, LicenseRecord, LicenseStatus, WaveError, WaveRecord, WaveStatus,
};
use chipgate_proto::licensing::v1 as pb;
use chipgate_runtime::errors::Violations;
use chipgate_runtime::paging::Page;
use chipgate_runtime::service::Records;
use chipgate_runtime::time::now_ms;
use chipgate_runtime::txn::IdemKey;
use chipgate_runtime::{RequestContext, validate};
use chipgate_state::{Backend, Txn};

use crate::apps::QueueVersion;
use crate::convert::{conditions_from, license_to, wave_to};
use crate::licences::LicenseIndex;
use crate::{Error, Licensing, MAX_UNITS, emit, encode, keys, record};

/// Most grants one wave may hold.
pub const MAX_GRANTS: usize = 10_000;

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

/// The licence a grant becomes when its wave is published (`seq` numbers it).
fn licence_of(grant: &GrantRecord, app: &ApplicationRecord, wave_id: &str, seq: u64, now: u64) -> LicenseRecord {
    let conditions = grant.conditions.clone().unwrap_or_default();
    let status = if conditions.terms_pending { LicenseStatus::PendingTerms } else { LicenseStatus::Active };
    LicenseRecord {
        id: format!("lic-{seq}"),
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

impl Licensing {
    /// The licences publishing draft `wave_id` now would create, numbered as they would be if nothing
    /// else is published first (a preview: nothing is taken or changed).
    ///
    /// # Errors
    /// NOT_FOUND for an unknown wave; FAILED_PRECONDITION for a published one, or one whose publication
    /// would be refused (a granted application no longer queued).
    pub(crate) async fn would_be_licences(&self, wave_id: &str) -> Result<Vec<LicenseRecord>, Error> {
        let (_, wave) = self.require::<WaveRecord>(keys::wave(wave_id), "wave", wave_id).await?;
        if wave.status() != WaveStatus::Draft {
            return Err(wave_error(wave_id, "", WaveError::Published));
        }
        let app_keys: Vec<String> = wave.grants.iter().map(|g| keys::application(&g.application_id)).collect();
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
            .run_txn(Some(&idem), || async {
                let seq = self.next_ids("wave", 1).await?;
                let now = now_ms();
                let id = format!("wave-{seq}");
                let wave = WaveRecord {
                    id: id.clone(),
                    display_name: if req.display_name.is_empty() { id.clone() } else { req.display_name.clone() },
                    status: WaveStatus::Draft as i32,
                    create_ms: now,
                    seq,
                    ..Default::default()
                };
                let mut t = Txn::new();
                t.replace(keys::wave(&id), 0, encode(&wave));
                t.zadd(keys::waves(), &id, seq as f64);
                emit(&mut t, ctx, now, pb::licensing_event::Kind::WaveChanged(pb::WaveChanged { wave_id: id.clone() }));
                record(&mut t, ctx, now, "wave.drafted", &id, format!("draft {:?}", wave.display_name));
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
        validate::id(&mut v, "wave_id", &req.wave_id);
        validate::id(&mut v, "application_id", &req.application_id);
        validate::units(&mut v, "granted_units", req.granted_units, MAX_UNITS);
        let conditions = req.conditions.as_ref().map(conditions_from).unwrap_or_default();
        for (field, problem) in conditions.problems() {
            v.add(format!("conditions.{field}"), problem);
        }
        v.check().map_err(Error::Status)?;
        let idem = IdemKey::new(&self.inner.idem, "AddWaveGrant", &req.request_id, &req);
        let (answer, _) = self
            .run_txn(Some(&idem), || async {
                let (wver, mut wave) =
                    self.require::<WaveRecord>(keys::wave(&req.wave_id), "wave", &req.wave_id).await?;
                let (aver, app) = self
                    .require::<ApplicationRecord>(
                        keys::application(&req.application_id),
                        "application",
                        &req.application_id,
                    )
                    .await?;
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
                if wave.grants.len() >= MAX_GRANTS && !wave.grants.iter().any(|g| g.application_id == app.id) {
                    return Err(Error::precondition(
                        "WAVE_FULL",
                        &wave.id,
                        format!("a wave holds at most {MAX_GRANTS} grants"),
                    ));
                }
                wave.upsert_grant(GrantRecord {
                    application_id: app.id.clone(),
                    buyer_id: app.buyer_id.clone(),
                    product_sku: app.product_sku.clone(),
                    granted: req.granted_units,
                    conditions: Some(conditions.clone()),
                    license_id: String::new(),
                })
                .map_err(|e| wave_error(&wave.id, &app.id, e))?;
                let now = now_ms();
                let mut t = Txn::new();
                t.replace(keys::wave(&wave.id), wver, encode(&wave));
                t.expect_version(keys::application(&app.id), aver);
                emit(
                    &mut t,
                    ctx,
                    now,
                    pb::licensing_event::Kind::WaveChanged(pb::WaveChanged { wave_id: wave.id.clone() }),
                );
                record(
                    &mut t,
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
                Ok((t, pb::AddWaveGrantResponse { wave: Some(wave_to(&wave)) }))
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
        validate::id(&mut v, "wave_id", &req.wave_id);
        validate::id(&mut v, "application_id", &req.application_id);
        v.check().map_err(Error::Status)?;
        let idem = IdemKey::new(&self.inner.idem, "RemoveWaveGrant", &req.request_id, &req);
        let (answer, _) = self
            .run_txn(Some(&idem), || async {
                let (wver, mut wave) =
                    self.require::<WaveRecord>(keys::wave(&req.wave_id), "wave", &req.wave_id).await?;
                wave.remove_grant(&req.application_id).map_err(|e| wave_error(&wave.id, &req.application_id, e))?;
                let now = now_ms();
                let mut t = Txn::new();
                t.replace(keys::wave(&wave.id), wver, encode(&wave));
                emit(
                    &mut t,
                    ctx,
                    now,
                    pb::licensing_event::Kind::WaveChanged(pb::WaveChanged { wave_id: wave.id.clone() }),
                );
                record(&mut t, ctx, now, "wave.grant_removed", &wave.id, req.application_id.clone());
                Ok((t, pb::RemoveWaveGrantResponse { wave: Some(wave_to(&wave)) }))
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
        validate::id(&mut v, "wave_id", &req.wave_id);
        v.check().map_err(Error::Status)?;
        let idem = IdemKey::new(&self.inner.idem, "PublishWave", &req.request_id, &req);
        let (answer, _) = self.run_txn(Some(&idem), || self.publish_attempt(ctx, &req.wave_id)).await?;
        Ok(answer)
    }

    async fn publish_attempt(
        &self,
        ctx: &RequestContext,
        wave_id: &str,
    ) -> Result<(Txn, pb::PublishWaveResponse), Error> {
        let (wver, mut wave) = self.require::<WaveRecord>(keys::wave(wave_id), "wave", wave_id).await?;
        if wave.status() != WaveStatus::Draft {
            return Err(wave_error(wave_id, "", WaveError::Published));
        }
        if wave.grants.is_empty() {
            return Err(Error::precondition("WAVE_EMPTY", wave_id, format!("wave {wave_id} has no grants to publish")));
        }
        let app_keys: Vec<String> = wave.grants.iter().map(|g| keys::application(&g.application_id)).collect();
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
        let index_keys: Vec<String> =
            wave.grants.iter().map(|g| keys::license_index(&g.buyer_id, &g.product_sku)).collect();
        let indexes = self.load_many::<LicenseIndex>(&index_keys).await?;
        let qver = self.load::<QueueVersion>(keys::queue_version()).await?.map(|(v, _)| v).unwrap_or(0);
        let n = wave.grants.len() as u64;
        let first = self.next_ids("lic", n).await?;
        let now = now_ms();

        let mut t = Txn::new();
        t.replace(keys::queue_version(), qver, encode(&QueueVersion {}));
        let mut licenses = Vec::with_capacity(wave.grants.len());
        let mut granted = Vec::with_capacity(wave.grants.len());
        let mut detail = Vec::with_capacity(wave.grants.len());
        // Several grants of one wave can't share a (buyer, product) index (one open application each),
        // but guard against it anyway by carrying the index forward within the transaction.
        let mut index_now: std::collections::HashMap<String, (u64, LicenseIndex)> = std::collections::HashMap::new();
        for (i, ((grant, app), index)) in wave.grants.iter_mut().zip(apps).zip(indexes).enumerate() {
            let Some((aver, mut app)) = app else { continue };
            let lic = licence_of(grant, &app, wave_id, first + i as u64, now);
            let conditions = lic.conditions();
            grant.license_id = lic.id.clone();
            app.set_status(ApplicationStatus::Granted);
            app.wave_id = wave_id.to_string();
            app.license_id = lic.id.clone();
            app.update_ms = now;
            t.replace(keys::application(&app.id), aver, encode(&app));
            t.delete(keys::open_application(&app.buyer_id, &app.product_sku));
            t.zrem(keys::queue(), &app.id);
            t.replace(keys::license(&lic.id), 0, encode(&lic));
            t.zadd(keys::licenses(), &lic.id, lic.seq as f64);
            t.zadd(keys::licenses_of(&lic.buyer_id), &lic.id, lic.seq as f64);
            let ikey = keys::license_index(&lic.buyer_id, &lic.product_sku);
            let entry = index_now.entry(ikey.clone()).or_insert_with(|| index.unwrap_or((0, LicenseIndex::default())));
            entry.1.license_ids.push(lic.id.clone());
            detail.push(format!(
                "{}→{} ({} {} x {}, {})",
                app.id,
                lic.id,
                lic.buyer_id,
                lic.granted,
                lic.product_sku,
                if conditions.terms_pending { "terms pending" } else { "active" }
            ));
            granted.push(pb::GrantedLicense {
                license_id: lic.id.clone(),
                buyer_id: lic.buyer_id.clone(),
                product_sku: lic.product_sku.clone(),
                state: crate::convert::license_state(lic.effective_state(now)) as i32,
                granted_units: lic.granted,
            });
            licenses.push(license_to(&lic, now));
        }
        for (key, (ver, index)) in index_now {
            t.replace(key, ver, encode(&index));
        }
        wave.set_status(WaveStatus::Published);
        wave.publish_ms = now;
        t.replace(keys::wave(wave_id), wver, encode(&wave));
        emit(
            &mut t,
            ctx,
            now,
            pb::licensing_event::Kind::WavePublished(pb::WavePublished {
                wave_id: wave_id.to_string(),
                licenses: granted,
            }),
        );
        record(
            &mut t,
            ctx,
            now,
            "wave.published",
            wave_id,
            format!("{} grants, {} units: {}", wave.grants.len(), wave.total_granted(), detail.join("; ")),
        );
        Ok((t, pb::PublishWaveResponse { wave: Some(wave_to(&wave)), licenses }))
    }

    pub(crate) async fn get_wave(&self, req: pb::GetWaveRequest) -> Result<pb::GetWaveResponse, Error> {
        let mut v = Violations::new();
        validate::id(&mut v, "wave_id", &req.wave_id);
        v.check().map_err(Error::Status)?;
        let (_, wave) = self.require::<WaveRecord>(keys::wave(&req.wave_id), "wave", &req.wave_id).await?;
        Ok(pb::GetWaveResponse { wave: Some(wave_to(&wave)) })
    }

    pub(crate) async fn list_waves(&self, req: pb::ListWavesRequest) -> Result<pb::ListWavesResponse, Error> {
        let mut v = Violations::new();
        let page = Page::parse(&mut v, req.page_size, &req.page_token);
        v.check().map_err(Error::Status)?;
        let (waves, next) = self.scan_index::<WaveRecord>(&keys::waves(), &page, true, keys::wave, |_| true).await?;
        Ok(pb::ListWavesResponse { waves: waves.iter().map(wave_to).collect(), next_page_token: next })
    }
}
