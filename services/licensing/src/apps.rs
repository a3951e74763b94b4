//! Applications and the approval queue.

use chipgate_domain::ids::{ApplicationId, BuyerId, Sku};
use chipgate_domain::licensing::{ApplicationRecord, ApplicationStatus};
use chipgate_proto::licensing::v1 as pb;
use chipgate_runtime::errors::Violations;
use chipgate_runtime::paging::{self, Page};
use chipgate_runtime::service::Records;
use chipgate_runtime::time::now_ms;
use chipgate_runtime::txn::IdemKey;
use chipgate_runtime::{RequestContext, validate};
use chipgate_state::{Backend, Txn};

use crate::convert::{application_status_from, application_to};
use crate::keys::Part;
use crate::{Error, Licensing, MAX_UNITS, emit, encode, keys, record};

fn changed(a: &ApplicationRecord) -> pb::licensing_event::Kind {
    pb::licensing_event::Kind::ApplicationChanged(pb::ApplicationChanged {
        application_id: a.id.clone(),
        buyer_id: a.buyer_id.clone(),
        product_sku: a.product_sku.clone(),
        state: application_to(a, 0).state,
    })
}

impl Licensing {
    pub(crate) async fn submit_application(
        &self,
        ctx: &RequestContext,
        req: pb::SubmitApplicationRequest,
    ) -> Result<pb::SubmitApplicationResponse, Error> {
        let mut v = Violations::new();
        validate::request_id(&mut v, &req.request_id);
        let buyer = validate::parse::<BuyerId>(&mut v, "buyer_id", req.buyer_id.clone());
        let sku = validate::parse::<Sku>(&mut v, "product_sku", req.product_sku.clone());
        validate::units(&mut v, "quantity", req.quantity, MAX_UNITS);
        validate::text(&mut v, "end_use", &req.end_use, validate::MAX_TEXT_LEN, true);
        validate::text(&mut v, "site", &req.site, validate::MAX_TEXT_LEN, true);
        let destination = if req.destination.is_empty() { "CN".to_string() } else { req.destination.clone() };
        validate::country(&mut v, "destination", &destination);
        let (buyer, sku) = validate::finish(v, (buyer, sku))?;
        if !self.inner.products.in_catalogue(self.store(), &sku).await? {
            return Err(Error::Status(chipgate_runtime::errors::invalid_argument(
                "product_sku",
                chipgate_contract::catalogue::unknown_product(&req.product_sku),
            )));
        }

        let idem = IdemKey::new(&self.inner.idem, "SubmitApplication", &req.request_id, &req);
        let (mut answer, _) = self.run_in(Part::Desk, Some(&idem), || async {
            let open_key = keys::open_application(&buyer, &sku);
            if let Some((_, existing)) = self.load::<OpenMarker>(open_key.clone()).await? {
                return Err(Error::AlreadyExists {
                    kind: "application",
                    id: existing.application_id.clone(),
                    message: format!(
                        "buyer {} already has an open application ({}) for {}; withdraw it or wait for its decision",
                        req.buyer_id, existing.application_id, req.product_sku
                    ),
                });
            }
            let seq = self.next_ids("app", 1).await?;
            let now = now_ms();
            let id = ApplicationId::from_trusted(format!("app-{seq}"));
            let app = ApplicationRecord {
                id: id.to_string(),
                buyer_id: req.buyer_id.clone(),
                product_sku: req.product_sku.clone(),
                quantity: req.quantity,
                end_use: req.end_use.clone(),
                site: req.site.clone(),
                destination: destination.clone(),
                status: ApplicationStatus::Queued as i32,
                submit_ms: now,
                update_ms: now,
                seq,
                ..Default::default()
            };
            let mut t = Txn::new();
            t.replace(open_key, 0, encode(&OpenMarker { application_id: app.id.clone() }));
            t.replace(keys::application(&id), 0, encode(&app));
            t.zadd(keys::queue(), &app.id, seq as f64);
            t.zadd(keys::applications(), &app.id, seq as f64);
            t.zadd(keys::applications_of(&buyer), &app.id, seq as f64);
            emit(&mut t, Part::Desk, ctx, now, changed(&app));
            record(&mut t, Part::Desk, ctx,
                now,
                "application.submitted",
                &app.id,
                format!(
                    "{} applies for {} x {} to {} (end use: {}; site: {})",
                    app.buyer_id, app.quantity, app.product_sku, app.destination, app.end_use, app.site
                ),
            );
            Ok((t, pb::SubmitApplicationResponse { application: Some(application_to(&app, 0)) }))
        })
        .await?;
        self.refresh_position(&mut answer.application).await?;
        Ok(answer)
    }

    /// Fills in the live queue position (answers are stored for replay without it).
    async fn refresh_position(&self, app: &mut Option<pb::Application>) -> Result<(), Error> {
        if let Some(a) = app.as_mut() {
            a.queue_position = if a.state == pb::ApplicationState::Queued as i32 {
                self.queue_position(&a.application_id).await?
            } else {
                0
            };
        }
        Ok(())
    }

    pub(crate) async fn get_application(
        &self,
        ctx: &RequestContext,
        req: pb::GetApplicationRequest,
    ) -> Result<pb::GetApplicationResponse, Error> {
        let mut v = Violations::new();
        let id = validate::parse::<ApplicationId>(&mut v, "application_id", req.application_id);
        let id = validate::finish(v, id)?;
        let (_, app) = self.require::<ApplicationRecord>(keys::application(&id), "application", &id).await?;
        ctx.check_owner(&app.buyer_id).map_err(Error::Status)?;
        let mut application = Some(application_to(&app, 0));
        self.refresh_position(&mut application).await?;
        Ok(pb::GetApplicationResponse { application })
    }

    pub(crate) async fn list_applications(
        &self,
        req: pb::ListApplicationsRequest,
    ) -> Result<pb::ListApplicationsResponse, Error> {
        let mut v = Violations::new();
        let buyer = validate::parse_optional::<BuyerId>(&mut v, "buyer_id", req.buyer_id.clone());
        let page = Page::parse(&mut v, req.page_size, &req.page_token);
        let buyer = validate::finish(v, buyer)?;
        let index = buyer.map_or_else(keys::applications, |b| keys::applications_of(&b));
        let want = application_status_from(req.state());
        let (apps, next) = self
            .scan_index::<ApplicationRecord>(
                &index,
                &page,
                true,
                |id| keys::application(&ApplicationId::from_trusted(id)),
                |a| want.is_none_or(|s| a.status() == s),
            )
            .await?;
        let mut out = Vec::with_capacity(apps.len());
        for a in apps {
            let mut app = Some(application_to(&a, 0));
            self.refresh_position(&mut app).await?;
            out.extend(app);
        }
        Ok(pb::ListApplicationsResponse { applications: out, next_page_token: next })
    }

    /// Pages through a sorted-set index of record ids (newest first when `rev`), keeping the records
    /// `keep` accepts. The page token is the rank to continue from. `key_of` is given ids this
    /// service wrote to the index (parsed on entry).
    pub(crate) async fn scan_index<M: prost::Message + Default>(
        &self,
        index: &str,
        page: &Page,
        rev: bool,
        key_of: fn(&str) -> String,
        keep: impl Fn(&M) -> bool,
    ) -> Result<(Vec<M>, String), Error> {
        let mut rank = page.offset();
        let mut out = Vec::new();
        let chunk = page.size.max(50);
        loop {
            let ids = self.store().zrange(index, rank as i64, (rank + chunk - 1) as i64, rev).await?;
            if ids.is_empty() {
                return Ok((out, String::new()));
            }
            let keys: Vec<String> = ids.iter().map(|(id, _)| key_of(id)).collect();
            let loaded = self.load_many::<M>(&keys).await?;
            for (i, rec) in loaded.into_iter().enumerate() {
                if let Some((_, m)) = rec
                    && keep(&m)
                {
                    out.push(m);
                    if out.len() == page.size {
                        return Ok((out, paging::token(&(rank + i + 1).to_string())));
                    }
                }
            }
            rank += ids.len();
            if ids.len() < chunk {
                return Ok((out, String::new()));
            }
        }
    }

    pub(crate) async fn withdraw_application(
        &self,
        ctx: &RequestContext,
        req: pb::WithdrawApplicationRequest,
    ) -> Result<pb::WithdrawApplicationResponse, Error> {
        let mut v = Violations::new();
        validate::request_id(&mut v, &req.request_id);
        let id = validate::parse::<ApplicationId>(&mut v, "application_id", req.application_id.clone());
        validate::text(&mut v, "reason", &req.reason, validate::MAX_TEXT_LEN, false);
        let id = validate::finish(v, id)?;
        // Ownership first, outside the idempotent transaction: a replayed answer must not reach a
        // buyer who does not own the application (an application's buyer never changes).
        let (_, app) = self.require::<ApplicationRecord>(keys::application(&id), "application", &id).await?;
        ctx.check_owner(&app.buyer_id).map_err(Error::Status)?;
        let idem = IdemKey::new(&self.inner.idem, "WithdrawApplication", &req.request_id, &req);
        let (answer, _) = self
            .run_in(Part::Desk, Some(&idem), || {
                self.close_application(ctx, &id, ApplicationStatus::Withdrawn, &req.reason)
            })
            .await?;
        Ok(pb::WithdrawApplicationResponse { application: answer.application })
    }

    pub(crate) async fn reject_application(
        &self,
        ctx: &RequestContext,
        req: pb::RejectApplicationRequest,
    ) -> Result<pb::RejectApplicationResponse, Error> {
        let mut v = Violations::new();
        validate::request_id(&mut v, &req.request_id);
        let id = validate::parse::<ApplicationId>(&mut v, "application_id", req.application_id.clone());
        validate::text(&mut v, "reason", &req.reason, validate::MAX_TEXT_LEN, true);
        let id = validate::finish(v, id)?;
        let idem = IdemKey::new(&self.inner.idem, "RejectApplication", &req.request_id, &req);
        let (answer, _) = self
            .run_in(Part::Desk, Some(&idem), || {
                self.close_application(ctx, &id, ApplicationStatus::Rejected, &req.reason)
            })
            .await?;
        Ok(pb::RejectApplicationResponse { application: answer.application })
    }

    /// Takes a queued application out of the queue as withdrawn or rejected.
    async fn close_application(
        &self,
        ctx: &RequestContext,
        id: &ApplicationId,
        to: ApplicationStatus,
        reason: &str,
    ) -> Result<(Txn, pb::GetApplicationResponse), Error> {
        let (ver, mut app) = self.require::<ApplicationRecord>(keys::application(id), "application", id).await?;
        ctx.check_owner(&app.buyer_id).map_err(Error::Status)?;
        if app.status() != ApplicationStatus::Queued {
            return Err(Error::precondition(
                "APPLICATION_NOT_QUEUED",
                id,
                format!(
                    "application {id} is {:?}, not queued; only queued applications can be withdrawn or rejected",
                    app.status()
                ),
            ));
        }
        let qver = self.load::<QueueVersion>(keys::queue_version()).await?.map(|(v, _)| v).unwrap_or(0);
        let now = now_ms();
        app.set_status(to);
        app.reason = reason.to_string();
        app.update_ms = now;
        let mut t = Txn::new();
        t.replace(keys::application(id), ver, encode(&app));
        t.replace(keys::queue_version(), qver, encode(&QueueVersion {}));
        // The application's own ids, parsed when it was submitted.
        t.delete(keys::open_application(
            &BuyerId::from_trusted(app.buyer_id.as_str()),
            &Sku::from_trusted(app.product_sku.as_str()),
        ));
        t.zrem(keys::queue(), id);
        emit(&mut t, Part::Desk, ctx, now, changed(&app));
        let action = if to == ApplicationStatus::Rejected { "application.rejected" } else { "application.withdrawn" };
        record(
            &mut t,
            Part::Desk,
            ctx,
            now,
            action,
            id,
            format!("{} for {}: {}", app.buyer_id, app.product_sku, reason),
        );
        Ok((t, pb::GetApplicationResponse { application: Some(application_to(&app, 0)) }))
    }

    pub(crate) async fn list_queue(&self, req: pb::ListQueueRequest) -> Result<pb::ListQueueResponse, Error> {
        let mut v = Violations::new();
        let page = Page::parse(&mut v, req.page_size, &req.page_token);
        v.check().map_err(Error::Status)?;
        let start = page.offset();
        let ids = self.store().zrange(&keys::queue(), start as i64, (start + page.size) as i64 - 1, false).await?;
        let total = self.store().zcard(&keys::queue()).await?;
        let keys: Vec<String> =
            ids.iter().map(|(id, _)| keys::application(&ApplicationId::from_trusted(id.as_str()))).collect();
        let apps = self.load_many::<ApplicationRecord>(&keys).await?;
        let applications: Vec<pb::Application> = apps
            .into_iter()
            .enumerate()
            .filter_map(|(i, a)| a.map(|(_, a)| application_to(&a, (start + i + 1) as u64)))
            .collect();
        let next = if ((start + ids.len()) as u64) < total && ids.len() == page.size {
            paging::token(&(start + ids.len()).to_string())
        } else {
            String::new()
        };
        Ok(pb::ListQueueResponse { applications, next_page_token: next, total_queued: total })
    }

    pub(crate) async fn move_queued_application(
        &self,
        ctx: &RequestContext,
        req: pb::MoveQueuedApplicationRequest,
    ) -> Result<pb::MoveQueuedApplicationResponse, Error> {
        let mut v = Violations::new();
        validate::request_id(&mut v, &req.request_id);
        let id = validate::parse::<ApplicationId>(&mut v, "application_id", req.application_id.clone());
        if req.position == 0 {
            v.add("position", "must be at least 1 (the front)");
        }
        let id = validate::finish(v, id)?;
        let idem = IdemKey::new(&self.inner.idem, "MoveQueuedApplication", &req.request_id, &req);
        let (mut answer, _) = self
            .run_in(Part::Desk, Some(&idem), || async {
                let (_, app) = self.require::<ApplicationRecord>(keys::application(&id), "application", &id).await?;
                if app.status() != ApplicationStatus::Queued {
                    return Err(Error::precondition(
                        "APPLICATION_NOT_QUEUED",
                        &app.id,
                        format!("application {} is not queued", app.id),
                    ));
                }
                let qver = self.load::<QueueVersion>(keys::queue_version()).await?.map(|(v, _)| v).unwrap_or(0);
                let mut order: Vec<String> =
                    self.store().zrange(&keys::queue(), 0, -1, false).await?.into_iter().map(|(m, _)| m).collect();
                order.retain(|m| m != &app.id);
                let at = (req.position as usize - 1).min(order.len());
                order.insert(at, app.id.clone());
                // Renumber the whole queue 1..n under the queue version guard: a concurrent removal or move
                // conflicts instead of being undone. New submissions score by their (larger) sequence, so
                // they still land at the back.
                let now = now_ms();
                let mut t = Txn::new();
                t.replace(keys::queue_version(), qver, encode(&QueueVersion {}));
                for (i, m) in order.iter().enumerate() {
                    t.zadd(keys::queue(), m, (i + 1) as f64);
                }
                emit(&mut t, Part::Desk, ctx, now, changed(&app));
                record(&mut t, Part::Desk, ctx, now, "queue.moved", &app.id, format!("moved to position {}", at + 1));
                Ok((t, pb::MoveQueuedApplicationResponse { application: Some(application_to(&app, 0)) }))
            })
            .await?;
        self.refresh_position(&mut answer.application).await?;
        Ok(answer)
    }
}

/// Marks the one open application of a buyer for a product.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct OpenMarker {
    #[prost(string, tag = "1")]
    pub application_id: String,
}

/// Empty record whose version is the queue version.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct QueueVersion {}
