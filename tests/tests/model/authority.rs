//! The import authority: one sequential client drafting, filling and publishing waves, finalising
//! terms, suspending, reinstating and revoking licences, rejecting and moving applications and
//! recording domestic purchases — with bad input mixed in. The model knows what each call must answer;
//! only applications are shared with the buyers (who withdraw them), so answers about them may go
//! either way when a buyer's call overlapped.

use std::time::Duration;

use chipgate_proto::licensing::v1 as lpb;
use chipgate_proto::orders::v1 as opb;
use chipgate_runtime::auth::Role;
use fastrand::Rng;
use tonic::Code;

use crate::calls::Mode;
use crate::model::{App, AppState, Cond, Lic, LicStatus, Purchase, Timeline, Wave, now_ms};
use crate::world::{BUYERS, Ctx, Party};
use crate::{send, send_ord};

/// A timestamp, or none for 0.
pub fn ts(ms: u64) -> Option<prost_types::Timestamp> {
    (ms != 0).then(|| prost_types::Timestamp { seconds: (ms / 1000) as i64, nanos: ((ms % 1000) * 1_000_000) as i32 })
}

fn ms_of(t: Option<&prost_types::Timestamp>) -> u64 {
    t.map(|t| t.seconds.max(0) as u64 * 1000 + t.nanos.max(0) as u64 / 1_000_000).unwrap_or(0)
}

pub fn cond_to(c: &Cond) -> lpb::LicenseConditions {
    lpb::LicenseConditions {
        valid_from: ts(c.valid_from_ms),
        valid_until: ts(c.valid_until_ms),
        per_order_cap: c.cap,
        domestic_ratio_bps: c.ratio_bps,
        justification_required: c.justification,
        terms_pending: c.terms_pending,
    }
}

pub fn cond_from(c: &lpb::LicenseConditions) -> Cond {
    Cond {
        valid_from_ms: ms_of(c.valid_from.as_ref()),
        valid_until_ms: ms_of(c.valid_until.as_ref()),
        cap: c.per_order_cap,
        ratio_bps: c.domestic_ratio_bps,
        justification: c.justification_required,
        terms_pending: c.terms_pending,
    }
}

/// The API state a licence must show.
pub fn api_state(status: LicStatus, cond: &Cond, granted: u64, used: u64, now: u64) -> lpb::LicenseState {
    match status {
        LicStatus::Revoked => lpb::LicenseState::Revoked,
        _ if cond.expired(now) => lpb::LicenseState::Expired,
        LicStatus::PendingTerms => lpb::LicenseState::PendingTerms,
        LicStatus::Suspended => lpb::LicenseState::Suspended,
        LicStatus::Active if used >= granted => lpb::LicenseState::Exhausted,
        LicStatus::Active => lpb::LicenseState::Active,
    }
}

/// Random conditions: caps, ratios, justification, pending terms, and validity windows that are
/// either open, far in the future, or long past (never one that opens or closes during a run: no
/// event marks that moment, so orders would only see it at the next full reconcile).
pub fn random_cond(rng: &mut Rng, pending_allowed: bool) -> Cond {
    let now = now_ms();
    let (valid_from_ms, valid_until_ms) = match rng.u8(..100) {
        0..=79 => (0, 0),
        80..=87 => (now + 24 * 3600 * 1000, 0),
        88..=95 => (now - 3600 * 1000, now + 24 * 3600 * 1000),
        _ => (now - 2 * 3600 * 1000, now - 3600 * 1000),
    };
    Cond {
        valid_from_ms,
        valid_until_ms,
        cap: if rng.u8(..100) < 40 { rng.u64(5..=40) * 10 } else { 0 },
        ratio_bps: if rng.u8(..100) < 25 { rng.u32(4..=20) * 250 } else { 0 },
        justification: rng.u8(..100) < 40,
        terms_pending: pending_allowed && rng.u8(..100) < 25,
    }
}

fn number(id: &str) -> u64 {
    id.rsplit('-').next().and_then(|n| n.parse().ok()).unwrap_or(0)
}

struct Authority {
    ctx: Ctx,
    party: Party,
    rng: Rng,
    draft: Option<String>,
    /// Grants the last publish named as no longer queued: removed next.
    drop_next: Vec<String>,
}

/// Runs the import authority until the run stops.
pub async fn run(ctx: Ctx) {
    let party = Party::role(&ctx.urls, &ctx.signer, Role::ImportAuthority);
    let rng = Rng::with_seed(ctx.seed ^ 0x1a17_0a17);
    let mut a = Authority { ctx, party, rng, draft: None, drop_next: Vec::new() };
    while !a.ctx.stopped() {
        tokio::time::sleep(Duration::from_millis(a.rng.u64(40..160))).await;
        match a.rng.u8(..100) {
            0..=37 => a.wave_step().await,
            38..=47 => a.finalize(false).await,
            48..=56 => a.set_status(LicStatus::Suspended).await,
            57..=65 => a.set_status(LicStatus::Active).await,
            66..=67 => a.set_status(LicStatus::Revoked).await,
            68..=70 => a.reject().await,
            71..=74 => a.move_app().await,
            75..=91 => a.domestic().await,
            _ => a.bad().await,
        }
    }
}

/// Opens every licence the authority closed (for the end of a run): reinstates the suspended ones
/// and finalises the pending ones.
pub async fn reopen(ctx: &Ctx) {
    let party = Party::role(&ctx.urls, &ctx.signer, Role::ImportAuthority);
    let mut a = Authority {
        ctx: ctx.clone(),
        party,
        rng: Rng::with_seed(ctx.seed ^ 0x0be4),
        draft: None,
        drop_next: Vec::new(),
    };
    let (suspended, pending): (Vec<String>, Vec<String>) = {
        let m = ctx.model.lock().unwrap();
        let now = now_ms();
        let live = |l: &&Lic| !l.cond().expired(now);
        (
            m.licences
                .values()
                .filter(live)
                .filter(|l| l.status() == LicStatus::Suspended)
                .map(|l| l.id.clone())
                .collect(),
            m.licences
                .values()
                .filter(live)
                .filter(|l| l.status() == LicStatus::PendingTerms)
                .map(|l| l.id.clone())
                .collect(),
        )
    };
    for id in suspended {
        a.change_status(&id, LicStatus::Active).await;
    }
    for id in pending {
        a.finalize_one(&id, false).await;
    }
}

impl Authority {
    fn mode(&mut self) -> Mode {
        Mode::pick(&mut self.rng)
    }

    /// Books an acknowledged licensing change that must leave one audit entry.
    fn audited(&self, request_id: &str, what: &'static str) {
        self.ctx.model.lock().unwrap().audited.push((self.party.subject.clone(), request_id.to_string(), what));
    }

    fn refused<T>(&self, request_id: &str, r: &Result<T, tonic::Status>) {
        if r.is_err() {
            self.ctx.model.lock().unwrap().refused.push(request_id.to_string());
        }
    }

    async fn wave_step(&mut self) {
        let Some(wave_id) = self.draft.clone() else {
            return self.create_wave().await;
        };
        if let Some(app) = self.drop_next.pop() {
            return self.remove_grant(&wave_id, &app, true).await;
        }
        let (wave, candidates) = {
            let m = self.ctx.model.lock().unwrap();
            let wave = m.waves[&wave_id].clone();
            let candidates: Vec<App> = m
                .apps
                .values()
                .filter(|a| a.state == AppState::Queued && !a.c.busy())
                .filter(|a| !wave.grants.iter().any(|g| g.0 == a.id))
                .cloned()
                .collect();
            (wave, candidates)
        };
        let roll = self.rng.u8(..100);
        if !candidates.is_empty() && (wave.grants.len() < 2 || roll < 55) {
            let app = candidates[self.rng.usize(..candidates.len())].clone();
            self.add_grant(&wave_id, &app).await;
        } else if !wave.grants.is_empty() && roll < 62 {
            let app = wave.grants[self.rng.usize(..wave.grants.len())].0.clone();
            self.remove_grant(&wave_id, &app, true).await;
        } else if !wave.grants.is_empty() {
            self.publish(&wave_id).await;
        }
    }

    async fn create_wave(&mut self) {
        let msg = lpb::CreateWaveRequest {
            request_id: self.ctx.rid("wave"),
            display_name: format!("wave {}", self.rng.u16(..)),
        };
        let mode = self.mode();
        let r = self
            .ctx
            .call("CreateWave", mode, send!(self.party.lic, create_wave, msg), |a: &lpb::CreateWaveResponse, b| a == b)
            .await;
        self.ctx.expect("CreateWave", "", &r, true, &[]);
        if let Ok(w) = r {
            let w = w.wave.unwrap_or_default();
            if w.state() != lpb::WaveState::Draft || !w.grants.is_empty() {
                self.ctx.violation(format!(
                    "CreateWave: new wave {} is {:?} with {} grants",
                    w.wave_id,
                    w.state(),
                    w.grants.len()
                ));
            }
            let mut m = self.ctx.model.lock().unwrap();
            if m.waves.contains_key(&w.wave_id) {
                m.violation(format!("CreateWave: wave id {} handed out twice", w.wave_id));
            }
            m.waves.insert(w.wave_id.clone(), Wave { id: w.wave_id.clone(), published: false, grants: Vec::new() });
            drop(m);
            self.audited(&msg.request_id, "wave.drafted");
            self.draft = Some(w.wave_id);
        }
    }

    /// A draft's grant count and granted units, as AddWaveGrant and RemoveWaveGrant answer them
    /// (without the grants), against the model's.
    fn check_counts(&self, kind: &str, got: &lpb::Wave) {
        let m = self.ctx.model.lock().unwrap();
        let want = &m.waves[&got.wave_id].grants;
        let want = (want.len() as u64, want.iter().map(|g| g.1).sum::<u64>());
        if (got.grant_count, got.total_granted_units) != want || !got.grants.is_empty() {
            drop(m);
            self.ctx.violation(format!(
                "{kind}: wave {} answered {} grants ({} listed), {} units; the model {want:?}",
                got.wave_id,
                got.grant_count,
                got.grants.len(),
                got.total_granted_units
            ));
        }
    }

    /// A draft's grants as GetWave lists them, in the order they were added, against the model's
    /// (a failed read, under faults, proves nothing and is skipped).
    async fn check_draft(&self, wave_id: &str) {
        let mut lic = self.party.lic.clone();
        if let Ok(w) = lic.get_wave(lpb::GetWaveRequest { wave_id: wave_id.to_string() }).await
            && let Some(w) = w.into_inner().wave
        {
            self.check_grants("GetWave", &w);
        }
    }

    fn check_grants(&self, kind: &str, got: &lpb::Wave) {
        let m = self.ctx.model.lock().unwrap();
        let want = m.waves[&got.wave_id].grants.clone();
        let got_g: Vec<(String, u64, Cond)> = got
            .grants
            .iter()
            .map(|g| (g.application_id.clone(), g.granted_units, cond_from(&g.conditions.unwrap_or_default())))
            .collect();
        if got_g != want {
            drop(m);
            self.ctx.violation(format!("{kind}: wave {} has grants {got_g:?}, the model {want:?}", got.wave_id));
        }
    }

    async fn add_grant(&mut self, wave_id: &str, app: &App) {
        let cond = random_cond(&mut self.rng, true);
        let units =
            if self.rng.u8(..100) < 30 { app.quantity } else { self.rng.u64(app.quantity / 4..=app.quantity).max(1) };
        let msg = lpb::AddWaveGrantRequest {
            request_id: self.ctx.rid("grant"),
            wave_id: wave_id.to_string(),
            application_id: app.id.clone(),
            granted_units: units,
            conditions: Some(cond_to(&cond)),
        };
        let began = self.ctx.model.lock().unwrap().apps[&app.id].c.peek();
        let mode = self.mode();
        let r = self
            .ctx
            .call(
                "AddWaveGrant",
                mode,
                send!(self.party.lic, add_wave_grant, msg),
                |a: &lpb::AddWaveGrantResponse, b| a == b,
            )
            .await;
        let (contended, queued) = {
            let m = self.ctx.model.lock().unwrap();
            let a = &m.apps[&app.id];
            (a.c.unpeek(began), a.state == AppState::Queued)
        };
        let what = format!("{} of {} ({} units)", app.id, wave_id, units);
        if contended {
            self.ctx.expect("AddWaveGrant", &what, &r, true, &[Code::FailedPrecondition]);
        } else if queued {
            self.ctx.expect("AddWaveGrant", &what, &r, true, &[]);
        } else {
            self.ctx.expect("AddWaveGrant", &what, &r, false, &[Code::FailedPrecondition]);
        }
        self.refused(&msg.request_id, &r);
        if let Ok(w) = r {
            let g = w.grant.clone().unwrap_or_default();
            let got = (g.application_id.clone(), g.granted_units, cond_from(&g.conditions.unwrap_or_default()));
            if got != (app.id.clone(), units, cond.clone()) {
                self.ctx.violation(format!("AddWaveGrant of {what} answered the grant {got:?}"));
            }
            {
                let mut m = self.ctx.model.lock().unwrap();
                let wave = m.waves.get_mut(wave_id).expect("the draft");
                match wave.grants.iter_mut().find(|g| g.0 == app.id) {
                    Some(g) => *g = (app.id.clone(), units, cond),
                    None => wave.grants.push((app.id.clone(), units, cond)),
                }
            }
            self.audited(&msg.request_id, "wave.grant_added");
            self.check_counts("AddWaveGrant", &w.wave.unwrap_or_default());
            self.check_draft(wave_id).await;
        }
    }

    async fn remove_grant(&mut self, wave_id: &str, app: &str, present: bool) {
        let msg = lpb::RemoveWaveGrantRequest {
            request_id: self.ctx.rid("ungrant"),
            wave_id: wave_id.to_string(),
            application_id: app.to_string(),
        };
        let mode = self.mode();
        let r = self
            .ctx
            .call(
                "RemoveWaveGrant",
                mode,
                send!(self.party.lic, remove_wave_grant, msg),
                |a: &lpb::RemoveWaveGrantResponse, b| a == b,
            )
            .await;
        let in_wave = self.ctx.model.lock().unwrap().waves[wave_id].grants.iter().any(|g| g.0 == app);
        if in_wave && present {
            self.ctx.expect("RemoveWaveGrant", app, &r, true, &[]);
        } else {
            self.ctx.expect("RemoveWaveGrant", app, &r, false, &[Code::NotFound]);
        }
        self.refused(&msg.request_id, &r);
        if let Ok(w) = r {
            self.ctx.model.lock().unwrap().waves.get_mut(wave_id).expect("the draft").grants.retain(|g| g.0 != app);
            self.audited(&msg.request_id, "wave.grant_removed");
            if w.grant.as_ref().map(|g| g.application_id.as_str()) != Some(app) {
                self.ctx.violation(format!("RemoveWaveGrant of {app} answered the grant {:?}", w.grant));
            }
            self.check_counts("RemoveWaveGrant", &w.wave.unwrap_or_default());
            self.check_draft(wave_id).await;
        }
    }

    async fn publish(&mut self, wave_id: &str) {
        let msg = lpb::PublishWaveRequest { request_id: self.ctx.rid("publish"), wave_id: wave_id.to_string() };
        let grants = self.ctx.model.lock().unwrap().waves[wave_id].grants.clone();
        let began: Vec<_> = {
            let mut m = self.ctx.model.lock().unwrap();
            grants.iter().map(|g| m.apps.get_mut(&g.0).expect("granted app").c.begin()).collect()
        };
        let from = now_ms();
        let mode = self.mode();
        let r = self
            .ctx
            .call("PublishWave", mode, send!(self.party.lic, publish_wave, msg), |a: &lpb::PublishWaveResponse, b| {
                a == b
            })
            .await;
        let to = now_ms();
        let mut m = self.ctx.model.lock().unwrap();
        let mut contended = false;
        let mut certainly_closed = Vec::new();
        for (g, b) in grants.iter().zip(began) {
            let a = m.apps.get_mut(&g.0).expect("granted app");
            let c = a.c.end(b);
            contended |= c;
            if !c && a.state != AppState::Queued {
                certainly_closed.push(a.id.clone());
            }
        }
        drop(m);
        let what = format!("{wave_id} ({} grants)", grants.len());
        if !certainly_closed.is_empty() {
            self.ctx.expect("PublishWave", &what, &r, false, &[Code::FailedPrecondition]);
        } else if contended {
            self.ctx.expect("PublishWave", &what, &r, true, &[Code::FailedPrecondition]);
        } else {
            self.ctx.expect("PublishWave", &what, &r, true, &[]);
        }
        self.refused(&msg.request_id, &r);
        match r {
            Ok(p) => {
                self.audited(&msg.request_id, "wave.published");
                self.draft = None;
                let mut m = self.ctx.model.lock().unwrap();
                m.waves.get_mut(wave_id).expect("the draft").published = true;
                if p.licenses.len() != grants.len() {
                    m.violation(format!(
                        "PublishWave {wave_id}: {} licences for {} grants",
                        p.licenses.len(),
                        grants.len()
                    ));
                }
                for (g, l) in grants.iter().zip(&p.licenses) {
                    let (buyer, sku, dest, state) = {
                        let a = m.apps.get_mut(&g.0).expect("granted app");
                        let s = a.state;
                        a.state = AppState::Granted;
                        a.licence = Some(l.license_id.clone());
                        (a.buyer.clone(), a.sku.clone(), a.destination.clone(), s)
                    };
                    if state != AppState::Queued {
                        m.violation(format!(
                            "PublishWave {wave_id} granted {} whose {:?} was acknowledged",
                            g.0, state
                        ));
                    }
                    let status = if g.2.terms_pending { LicStatus::PendingTerms } else { LicStatus::Active };
                    let want = api_state(status, &g.2, g.1, 0, to);
                    let got_cond = cond_from(&l.conditions.unwrap_or_default());
                    if l.buyer_id != buyer
                        || l.product_sku != sku
                        || l.destination != dest
                        || l.granted_units != g.1
                        || l.application_id != g.0
                        || l.wave_id != wave_id
                        || l.state() != want
                        || got_cond != g.2
                        || l.used_units != 0
                    {
                        m.violation(format!(
                            "PublishWave {wave_id}: licence {} for {} is {buyer}/{sku}/{dest} {} units {want:?} {:?}; got {}/{}/{} {} units {:?} {:?}",
                            l.license_id, g.0, g.1, g.2, l.buyer_id, l.product_sku, l.destination, l.granted_units, l.state(), got_cond
                        ));
                    }
                    if m.licences.contains_key(&l.license_id) {
                        m.violation(format!("PublishWave: licence id {} handed out twice", l.license_id));
                    }
                    let mut line = Timeline::new((status, g.2.clone()));
                    line.set(from, to, (status, g.2.clone()));
                    m.licences.insert(
                        l.license_id.clone(),
                        Lic {
                            id: l.license_id.clone(),
                            buyer,
                            sku,
                            destination: dest,
                            app: g.0.clone(),
                            wave: wave_id.to_string(),
                            granted: g.1,
                            seq: number(&l.license_id),
                            line,
                        },
                    );
                }
            }
            Err(s) if s.code() == Code::FailedPrecondition => {
                // The applications it names are no longer queued: drop their grants and try again.
                let named: Vec<String> = s
                    .message()
                    .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                    .filter(|w| w.starts_with("app-"))
                    .map(str::to_string)
                    .collect();
                let m = self.ctx.model.lock().unwrap();
                for a in &named {
                    if let Some(app) = m.apps.get(a)
                        && app.state == AppState::Queued
                        && !app.c.busy()
                        && !contended
                    {
                        drop(m);
                        self.ctx.violation(format!("PublishWave {wave_id}: says {a} is no longer queued, but it is"));
                        break;
                    }
                }
                self.drop_next = named;
            }
            Err(_) => {}
        }
    }

    fn pick_licence(&mut self, want: LicStatus) -> Option<String> {
        let m = self.ctx.model.lock().unwrap();
        let now = now_ms();
        let ids: Vec<String> = m
            .licences
            .values()
            .filter(|l| l.status() == want && !l.cond().expired(now))
            .map(|l| l.id.clone())
            .collect();
        drop(m);
        (!ids.is_empty()).then(|| ids[self.rng.usize(..ids.len())].clone())
    }

    async fn finalize(&mut self, wrong: bool) {
        let target =
            if wrong { self.pick_licence(LicStatus::Active) } else { self.pick_licence(LicStatus::PendingTerms) };
        if let Some(id) = target {
            self.finalize_one(&id, wrong).await;
        }
    }

    async fn finalize_one(&mut self, id: &str, wrong: bool) {
        let new = (self.rng.u8(..100) < 50).then(|| random_cond(&mut self.rng, false));
        let msg = lpb::FinalizeTermsRequest {
            request_id: self.ctx.rid("finalize"),
            license_id: id.to_string(),
            conditions: new.as_ref().map(cond_to),
        };
        let from = now_ms();
        let mode = self.mode();
        let r = self
            .ctx
            .call(
                "FinalizeTerms",
                mode,
                send!(self.party.lic, finalize_terms, msg),
                |a: &lpb::FinalizeTermsResponse, b| a == b,
            )
            .await;
        let to = now_ms();
        if wrong {
            self.ctx.expect("FinalizeTerms", &format!("{id} (active)"), &r, false, &[Code::FailedPrecondition]);
        } else {
            self.ctx.expect("FinalizeTerms", id, &r, true, &[]);
        }
        self.refused(&msg.request_id, &r);
        if let Ok(f) = r {
            self.audited(&msg.request_id, "licence.terms_finalized");
            let mut m = self.ctx.model.lock().unwrap();
            let lic = m.licences.get_mut(id).expect("known licence");
            let mut cond = new.unwrap_or_else(|| lic.cond());
            cond.terms_pending = false;
            lic.line.set(from, to, (LicStatus::Active, cond.clone()));
            let l = f.license.unwrap_or_default();
            let got = cond_from(&l.conditions.unwrap_or_default());
            let want = api_state(LicStatus::Active, &cond, 1, 0, to);
            if got != cond || (l.state() != want && l.state() != lpb::LicenseState::Exhausted) {
                m.violation(format!("FinalizeTerms {id}: now {:?} {got:?}, the model {want:?} {cond:?}", l.state()));
            }
        }
    }

    async fn set_status(&mut self, to_status: LicStatus) {
        let from_status = match to_status {
            LicStatus::Suspended => LicStatus::Active,
            LicStatus::Active => LicStatus::Suspended,
            _ => {
                if self.rng.bool() {
                    LicStatus::Active
                } else {
                    LicStatus::Suspended
                }
            }
        };
        if let Some(id) = self.pick_licence(from_status) {
            self.change_status(&id, to_status).await;
        }
    }

    /// Suspends (to Suspended), reinstates (to Active) or revokes (to Revoked) a licence; the model
    /// knows whether the licence is in a state that allows it.
    async fn change_status(&mut self, id: &str, to_status: LicStatus) {
        let (status, cond) = {
            let m = self.ctx.model.lock().unwrap();
            match m.licences.get(id) {
                Some(l) => (Some(l.status()), l.cond()),
                None => (None, Cond::default()),
            }
        };
        let reason = format!("reason {}", self.rng.u16(..));
        let request_id = self.ctx.rid("licence");
        let mode = self.mode();
        let from = now_ms();
        let (kind, r) = match to_status {
            LicStatus::Suspended => {
                let msg = lpb::SuspendLicenseRequest { request_id: request_id.clone(), license_id: id.into(), reason };
                let r = self
                    .ctx
                    .call(
                        "SuspendLicense",
                        mode,
                        send!(self.party.lic, suspend_license, msg),
                        |a: &lpb::SuspendLicenseResponse, b| a == b,
                    )
                    .await;
                ("SuspendLicense", r.map(|x| x.license))
            }
            LicStatus::Active => {
                let msg =
                    lpb::ReinstateLicenseRequest { request_id: request_id.clone(), license_id: id.into(), reason };
                let r = self
                    .ctx
                    .call(
                        "ReinstateLicense",
                        mode,
                        send!(self.party.lic, reinstate_license, msg),
                        |a: &lpb::ReinstateLicenseResponse, b| a == b,
                    )
                    .await;
                ("ReinstateLicense", r.map(|x| x.license))
            }
            _ => {
                let msg = lpb::RevokeLicenseRequest { request_id: request_id.clone(), license_id: id.into(), reason };
                let r = self
                    .ctx
                    .call(
                        "RevokeLicense",
                        mode,
                        send!(self.party.lic, revoke_license, msg),
                        |a: &lpb::RevokeLicenseResponse, b| a == b,
                    )
                    .await;
                ("RevokeLicense", r.map(|x| x.license))
            }
        };
        let to = now_ms();
        let now = now_ms();
        let allowed = match (status, to_status) {
            (None, _) => None,
            (Some(_), _) if cond.expired(now) => Some(false),
            (Some(LicStatus::Active), LicStatus::Suspended) => Some(true),
            (Some(LicStatus::Suspended), LicStatus::Active) => Some(true),
            (Some(s), LicStatus::Revoked) => Some(s != LicStatus::Revoked),
            _ => Some(false),
        };
        match allowed {
            None => self.ctx.expect(kind, id, &r, false, &[Code::NotFound]),
            Some(true) => self.ctx.expect(kind, id, &r, true, &[]),
            Some(false) => self.ctx.expect(kind, id, &r, false, &[Code::FailedPrecondition]),
        };
        self.refused(&request_id, &r);
        if let Ok(l) = r {
            self.audited(&request_id, "licence.status");
            let l = l.unwrap_or_default();
            let mut m = self.ctx.model.lock().unwrap();
            if let Some(lic) = m.licences.get_mut(id) {
                lic.line.set(from, to, (to_status, cond.clone()));
            }
            let want = api_state(to_status, &cond, 1, 0, to);
            let ok =
                l.state() == want || (want == lpb::LicenseState::Active && l.state() == lpb::LicenseState::Exhausted);
            if !ok {
                m.violation(format!("{kind} {id}: answered state {:?}, the model {want:?}", l.state()));
            }
        }
    }

    async fn reject(&mut self) {
        let app = {
            let m = self.ctx.model.lock().unwrap();
            let ids: Vec<String> =
                m.apps.values().filter(|a| a.state == AppState::Queued && !a.c.busy()).map(|a| a.id.clone()).collect();
            drop(m);
            if ids.is_empty() {
                return;
            }
            ids[self.rng.usize(..ids.len())].clone()
        };
        let msg = lpb::RejectApplicationRequest {
            request_id: self.ctx.rid("reject"),
            application_id: app.clone(),
            reason: "does not meet the criteria".into(),
        };
        let began = self.ctx.model.lock().unwrap().apps.get_mut(&app).expect("app").c.begin();
        let mode = self.mode();
        let r = self
            .ctx
            .call(
                "RejectApplication",
                mode,
                send!(self.party.lic, reject_application, msg),
                |a: &lpb::RejectApplicationResponse, b| a == b,
            )
            .await;
        let (contended, state) = {
            let mut m = self.ctx.model.lock().unwrap();
            let a = m.apps.get_mut(&app).expect("app");
            (a.c.end(began), a.state)
        };
        if contended {
            self.ctx.expect("RejectApplication", &app, &r, true, &[Code::FailedPrecondition]);
        } else if state == AppState::Queued {
            self.ctx.expect("RejectApplication", &app, &r, true, &[]);
        } else {
            self.ctx.expect("RejectApplication", &app, &r, false, &[Code::FailedPrecondition]);
        }
        self.refused(&msg.request_id, &r);
        if let Ok(a) = r {
            self.audited(&msg.request_id, "application.rejected");
            let got = a.application.unwrap_or_default();
            let mut m = self.ctx.model.lock().unwrap();
            let prior = m.apps[&app].state;
            if prior != AppState::Queued {
                m.violation(format!("RejectApplication {app}: acknowledged, but its {prior:?} was acknowledged too"));
            }
            if got.state() != lpb::ApplicationState::Rejected {
                m.violation(format!("RejectApplication {app}: answered {:?}", got.state()));
            }
            m.apps.get_mut(&app).expect("app").state = AppState::Rejected;
        }
    }

    async fn move_app(&mut self) {
        let app = {
            let m = self.ctx.model.lock().unwrap();
            let ids: Vec<String> =
                m.apps.values().filter(|a| a.state == AppState::Queued && !a.c.busy()).map(|a| a.id.clone()).collect();
            drop(m);
            if ids.is_empty() {
                return;
            }
            ids[self.rng.usize(..ids.len())].clone()
        };
        let msg = lpb::MoveQueuedApplicationRequest {
            request_id: self.ctx.rid("move"),
            application_id: app.clone(),
            position: self.rng.u64(1..=6),
        };
        let began = self.ctx.model.lock().unwrap().apps[&app].c.peek();
        let mode = self.mode();
        let r = self
            .ctx
            .call(
                "MoveQueuedApplication",
                mode,
                send!(self.party.lic, move_queued_application, msg),
                |a: &lpb::MoveQueuedApplicationResponse, b| {
                    a.application.as_ref().map(|x| &x.application_id)
                        == b.application.as_ref().map(|x| &x.application_id)
                },
            )
            .await;
        let (contended, state) = {
            let m = self.ctx.model.lock().unwrap();
            (m.apps[&app].c.unpeek(began), m.apps[&app].state)
        };
        if contended {
            self.ctx.expect("MoveQueuedApplication", &app, &r, true, &[Code::FailedPrecondition]);
        } else if state == AppState::Queued {
            self.ctx.expect("MoveQueuedApplication", &app, &r, true, &[]);
        } else {
            self.ctx.expect("MoveQueuedApplication", &app, &r, false, &[Code::FailedPrecondition]);
        }
        self.refused(&msg.request_id, &r);
        if r.is_ok() {
            self.audited(&msg.request_id, "queue.moved");
            self.ctx.model.lock().unwrap().apps.get_mut(&app).expect("app").moved = true;
        }
    }

    async fn domestic(&mut self) {
        let buyer = BUYERS[self.rng.usize(..BUYERS.len())];
        let earlier: Option<Purchase> = {
            let m = self.ctx.model.lock().unwrap();
            m.domestic.get(buyer).and_then(|v| (!v.is_empty()).then(|| v[self.rng.usize(..v.len())].clone()))
        };
        let roll = self.rng.u8(..100);
        let (evidence, units, supplier, fresh, conflict) = match earlier {
            Some(p) if roll < 10 => (p.evidence, p.units, p.supplier, false, false),
            Some(p) if roll < 18 => (p.evidence, p.units + 1, p.supplier, false, true),
            _ => (
                self.ctx.rid("invoice"),
                self.rng.u64(5..=80) * 10,
                if self.rng.bool() { "huawei" } else { "cambricon" }.to_string(),
                true,
                false,
            ),
        };
        let msg = lpb::RecordDomesticPurchaseRequest {
            request_id: self.ctx.rid("domestic"),
            buyer_id: buyer.into(),
            units,
            supplier: supplier.clone(),
            evidence_ref: evidence.clone(),
        };
        let from = now_ms();
        let mode = self.mode();
        let r = self
            .ctx
            .call(
                "RecordDomesticPurchase",
                mode,
                send!(self.party.lic, record_domestic_purchase, msg),
                |a: &lpb::RecordDomesticPurchaseResponse, b| a == b,
            )
            .await;
        if conflict {
            self.ctx.expect(
                "RecordDomesticPurchase",
                &format!("{evidence} again with other figures"),
                &r,
                false,
                &[Code::AlreadyExists],
            );
        } else {
            self.ctx.expect("RecordDomesticPurchase", &evidence, &r, true, &[]);
        }
        self.refused(&msg.request_id, &r);
        if let Ok(p) = r {
            let mut m = self.ctx.model.lock().unwrap();
            if fresh {
                m.domestic.entry(buyer.to_string()).or_default().push(Purchase { evidence, units, supplier, from });
                m.audited.push((self.party.subject.clone(), msg.request_id.clone(), "domestic.recorded"));
            }
            let total = m.domestic_total(buyer);
            if p.total_domestic_units != total {
                m.violation(format!(
                    "RecordDomesticPurchase {buyer}: total {} units, the model {total}",
                    p.total_domestic_units
                ));
            }
        }
    }

    /// A call the model knows must be refused (and change nothing).
    async fn bad(&mut self) {
        let roll = self.rng.u8(..10);
        let draft = self.draft.clone();
        let (queued, published): (Option<App>, Option<String>) = {
            let m = self.ctx.model.lock().unwrap();
            let q: Vec<App> = m.apps.values().filter(|a| a.state == AppState::Queued && !a.c.busy()).cloned().collect();
            let p: Vec<String> = m.waves.values().filter(|w| w.published).map(|w| w.id.clone()).collect();
            (
                (!q.is_empty()).then(|| q[self.rng.usize(..q.len())].clone()),
                (!p.is_empty()).then(|| p[self.rng.usize(..p.len())].clone()),
            )
        };
        match roll {
            0 | 1 => {
                let (Some(wave), Some(app)) = (draft.or(published.clone()), queued) else { return };
                let published_wave = self.ctx.model.lock().unwrap().waves[&wave].published;
                let invalid_cond = roll == 1;
                let cond = if invalid_cond {
                    Cond { valid_from_ms: now_ms(), valid_until_ms: now_ms() - 1000, ..Cond::default() }
                } else {
                    Cond::default()
                };
                let msg = lpb::AddWaveGrantRequest {
                    request_id: self.ctx.rid("grant-bad"),
                    wave_id: wave.clone(),
                    application_id: app.id.clone(),
                    granted_units: if invalid_cond { 1 } else { app.quantity + 1 },
                    conditions: Some(cond_to(&cond)),
                };
                let r = self
                    .ctx
                    .call(
                        "AddWaveGrant",
                        Mode::Once,
                        send!(self.party.lic, add_wave_grant, msg),
                        |a: &lpb::AddWaveGrantResponse, b| a == b,
                    )
                    .await;
                let codes: &[Code] = if invalid_cond || !published_wave {
                    &[Code::InvalidArgument]
                } else {
                    &[Code::InvalidArgument, Code::FailedPrecondition]
                };
                self.ctx.expect(
                    "AddWaveGrant",
                    &format!(
                        "(bad: {})",
                        if invalid_cond { "valid_until before valid_from" } else { "more than applied for" }
                    ),
                    &r,
                    false,
                    codes,
                );
                self.refused(&msg.request_id, &r);
            }
            2 => self.finalize(true).await,
            3 => {
                let msg = lpb::SuspendLicenseRequest {
                    request_id: self.ctx.rid("suspend-bad"),
                    license_id: "lic-999999".into(),
                    reason: "x".into(),
                };
                let r = self
                    .ctx
                    .call(
                        "SuspendLicense",
                        Mode::Once,
                        send!(self.party.lic, suspend_license, msg),
                        |a: &lpb::SuspendLicenseResponse, b| a == b,
                    )
                    .await;
                self.ctx.expect("SuspendLicense", "(bad: unknown licence)", &r, false, &[Code::NotFound]);
                self.refused(&msg.request_id, &r);
            }
            4 => {
                if let Some(id) = self.pick_licence(LicStatus::Active) {
                    self.change_status(&id, LicStatus::Active).await;
                }
            }
            5 => {
                let Some(wave) = published else { return };
                let msg = lpb::PublishWaveRequest { request_id: self.ctx.rid("publish-bad"), wave_id: wave.clone() };
                let r = self
                    .ctx
                    .call(
                        "PublishWave",
                        Mode::Once,
                        send!(self.party.lic, publish_wave, msg),
                        |a: &lpb::PublishWaveResponse, b| a == b,
                    )
                    .await;
                self.ctx.expect(
                    "PublishWave",
                    &format!("(bad: {wave} already published)"),
                    &r,
                    false,
                    &[Code::FailedPrecondition],
                );
                self.refused(&msg.request_id, &r);
            }
            6 => {
                let Some(app) = queued else { return };
                let msg = lpb::RejectApplicationRequest {
                    request_id: self.ctx.rid("reject-bad"),
                    application_id: app.id.clone(),
                    reason: String::new(),
                };
                let r = self
                    .ctx
                    .call(
                        "RejectApplication",
                        Mode::Once,
                        send!(self.party.lic, reject_application, msg),
                        |a: &lpb::RejectApplicationResponse, b| a == b,
                    )
                    .await;
                self.ctx.expect("RejectApplication", "(bad: no reason)", &r, false, &[Code::InvalidArgument]);
                self.refused(&msg.request_id, &r);
            }
            7 => {
                let Some(app) = queued else { return };
                let msg = lpb::MoveQueuedApplicationRequest {
                    request_id: self.ctx.rid("move-bad"),
                    application_id: app.id.clone(),
                    position: 0,
                };
                let r = self
                    .ctx
                    .call(
                        "MoveQueuedApplication",
                        Mode::Once,
                        send!(self.party.lic, move_queued_application, msg),
                        |a: &lpb::MoveQueuedApplicationResponse, b| a == b,
                    )
                    .await;
                self.ctx.expect("MoveQueuedApplication", "(bad: position 0)", &r, false, &[Code::InvalidArgument]);
                self.refused(&msg.request_id, &r);
            }
            8 => {
                // Not the authority's to do.
                let msg = opb::PlaceOrderRequest {
                    request_id: self.ctx.rid("place-bad"),
                    buyer_id: BUYERS[0].into(),
                    product_sku: crate::world::PRODUCTS[0].into(),
                    units: 10,
                    justification: String::new(),
                };
                let r = self
                    .ctx
                    .call(
                        "PlaceOrder",
                        Mode::Once,
                        send_ord!(self.party, place_order, msg),
                        |a: &opb::PlaceOrderResponse, b| a == b,
                    )
                    .await;
                self.ctx.expect("PlaceOrder", "(bad: by the import authority)", &r, false, &[Code::PermissionDenied]);
            }
            _ => {
                let Some(wave) = draft else { return };
                if !self.ctx.model.lock().unwrap().waves[&wave].grants.is_empty() {
                    return;
                }
                let msg = lpb::PublishWaveRequest { request_id: self.ctx.rid("publish-empty"), wave_id: wave.clone() };
                let r = self
                    .ctx
                    .call(
                        "PublishWave",
                        Mode::Once,
                        send!(self.party.lic, publish_wave, msg),
                        |a: &lpb::PublishWaveResponse, b| a == b,
                    )
                    .await;
                self.ctx.expect(
                    "PublishWave",
                    &format!("(bad: {wave} has no grants)"),
                    &r,
                    false,
                    &[Code::FailedPrecondition],
                );
                self.refused(&msg.request_id, &r);
            }
        }
    }
}

/// The id's number (`app-12` → 12), for queue order.
pub fn id_number(id: &str) -> u64 {
    number(id)
}
