//! The gates around licences: the buyers' domestic-purchase ledger, the vendor's export
//! authorisations, and customs' import policy.

use chipgate_domain::ids::{BuyerId, Sku};
use chipgate_domain::licensing::{
    ExportAuthRecord, LedgerRecord, PolicyRecord, ProductExportRecord, PurchaseRecord, Stance,
};
use chipgate_proto::licensing::v1 as pb;
use chipgate_runtime::errors::Violations;
use chipgate_runtime::paging::{self, Page};
use chipgate_runtime::service::Records;
use chipgate_runtime::time::now_ms;
use chipgate_runtime::txn::IdemKey;
use chipgate_runtime::{RequestContext, validate};
use chipgate_state::{Backend, Txn};

use crate::convert::{export_to, policy_to, purchase_to, stance_to};
use crate::keys::Part;
use crate::{Error, Licensing, MAX_UNITS, emit, encode, keys, record};

impl Licensing {
    pub(crate) async fn record_domestic_purchase(
        &self,
        ctx: &RequestContext,
        req: pb::RecordDomesticPurchaseRequest,
    ) -> Result<pb::RecordDomesticPurchaseResponse, Error> {
        let mut v = Violations::new();
        validate::request_id(&mut v, &req.request_id);
        let buyer = validate::parse::<BuyerId>(&mut v, "buyer_id", req.buyer_id.clone());
        validate::units(&mut v, "units", req.units, MAX_UNITS);
        validate::id(&mut v, "supplier", &req.supplier);
        validate::id(&mut v, "evidence_ref", &req.evidence_ref);
        let buyer = validate::finish(v, buyer)?;
        let idem = IdemKey::new(&self.inner.idem, "RecordDomesticPurchase", &req.request_id, &req);
        let (answer, _) = self
            .run_in(Part::Desk, Some(&idem), || async {
                let pkey = keys::purchase(&buyer, &req.evidence_ref);
                let lkey = keys::ledger(&buyer);
                let (ledger, existing) = {
                    let l = self.load::<LedgerRecord>(lkey.clone()).await?;
                    let p = self.load::<PurchaseRecord>(pkey.clone()).await?;
                    (l, p)
                };
                let (lver, mut ledger) =
                    ledger.unwrap_or((0, LedgerRecord { buyer_id: req.buyer_id.clone(), ..Default::default() }));
                if let Some((_, p)) = existing {
                    // The same evidence recorded again changes nothing; different figures under the same
                    // evidence are a conflict the caller must resolve.
                    if p.units == req.units && p.supplier == req.supplier {
                        return Ok((
                            Txn::new(),
                            pb::RecordDomesticPurchaseResponse {
                                purchase: Some(purchase_to(&p)),
                                total_domestic_units: ledger.total_units,
                            },
                        ));
                    }
                    return Err(Error::AlreadyExists {
                        kind: "domestic purchase",
                        id: req.evidence_ref.clone(),
                        message: format!(
                            "evidence {} was already recorded for {} with {} units from {}",
                            req.evidence_ref, req.buyer_id, p.units, p.supplier
                        ),
                    });
                }
                let now = now_ms();
                let purchase = PurchaseRecord {
                    buyer_id: req.buyer_id.clone(),
                    units: req.units,
                    supplier: req.supplier.clone(),
                    evidence_ref: req.evidence_ref.clone(),
                    record_ms: now,
                };
                ledger.total_units = ledger.total_units.saturating_add(req.units);
                ledger.purchases += 1;
                let mut t = Txn::new();
                t.replace(lkey, lver, encode(&ledger));
                t.replace(pkey, 0, encode(&purchase));
                t.zadd(keys::purchases_of(&buyer), &req.evidence_ref, ledger.purchases as f64);
                emit(
                    &mut t,
                    Part::Desk,
                    ctx,
                    now,
                    pb::licensing_event::Kind::DomesticPurchaseRecorded(pb::DomesticPurchaseRecorded {
                        buyer_id: req.buyer_id.clone(),
                        units: req.units,
                        total_domestic_units: ledger.total_units,
                    }),
                );
                record(
                    &mut t,
                    Part::Desk,
                    ctx,
                    now,
                    "domestic.recorded",
                    &req.buyer_id,
                    format!(
                        "{} units from {} ({}); total {}",
                        req.units, req.supplier, req.evidence_ref, ledger.total_units
                    ),
                );
                Ok((
                    t,
                    pb::RecordDomesticPurchaseResponse {
                        purchase: Some(purchase_to(&purchase)),
                        total_domestic_units: ledger.total_units,
                    },
                ))
            })
            .await?;
        Ok(answer)
    }

    pub(crate) async fn get_domestic_ledger(
        &self,
        req: pb::GetDomesticLedgerRequest,
    ) -> Result<pb::GetDomesticLedgerResponse, Error> {
        let mut v = Violations::new();
        let buyer = validate::parse::<BuyerId>(&mut v, "buyer_id", req.buyer_id.clone());
        let page = Page::parse(&mut v, req.page_size, &req.page_token);
        let buyer = validate::finish(v, buyer)?;
        let total = self.load::<LedgerRecord>(keys::ledger(&buyer)).await?.map(|(_, l)| l.total_units).unwrap_or(0);
        let start = page.offset();
        let refs = self
            .store()
            .zrange(&keys::purchases_of(&buyer), start as i64, (start + page.size) as i64 - 1, false)
            .await?;
        let pkeys: Vec<String> = refs.iter().map(|(r, _)| keys::purchase(&buyer, r)).collect();
        let purchases: Vec<pb::DomesticPurchase> = self
            .load_many::<PurchaseRecord>(&pkeys)
            .await?
            .into_iter()
            .flatten()
            .map(|(_, p)| purchase_to(&p))
            .collect();
        let next =
            if refs.len() == page.size { paging::token(&(start + refs.len()).to_string()) } else { String::new() };
        Ok(pb::GetDomesticLedgerResponse {
            buyer_id: req.buyer_id,
            total_domestic_units: total,
            purchases,
            next_page_token: next,
        })
    }

    pub(crate) async fn grant_export_authorization(
        &self,
        ctx: &RequestContext,
        req: pb::GrantExportAuthorizationRequest,
    ) -> Result<pb::GrantExportAuthorizationResponse, Error> {
        let mut v = Violations::new();
        validate::request_id(&mut v, &req.request_id);
        validate::id(&mut v, "vendor", &req.vendor);
        let sku = validate::parse::<Sku>(&mut v, "product_sku", req.product_sku.clone());
        validate::country(&mut v, "destination", &req.destination);
        validate::text(&mut v, "reference", &req.reference, 200, false);
        let sku = validate::finish(v, sku)?;
        // The listing index is in the desk: added first (idempotent), so a listing never misses a
        // product with authorisations; a product listed with none shows nothing.
        self.index_product(&keys::export_index(), &sku).await?;
        let idem = IdemKey::new(&self.inner.idem, "GrantExportAuthorization", &req.request_id, &req)
            .in_partition(keys::part(&sku));
        let (answer, _) = self
            .run_in(Part::Product(&sku), Some(&idem), || async {
                let key = keys::exports(&sku);
                let (ver, mut rec) = self.load::<ProductExportRecord>(key.clone()).await?.unwrap_or((
                    0,
                    ProductExportRecord { product_sku: req.product_sku.clone(), authorizations: vec![] },
                ));
                let now = now_ms();
                let auth = ExportAuthRecord {
                    vendor: req.vendor.clone(),
                    destination: req.destination.clone(),
                    active: true,
                    reference: req.reference.clone(),
                    update_ms: now,
                };
                match rec.authorizations.iter_mut().find(|a| a.destination == req.destination) {
                    Some(a) => *a = auth.clone(),
                    None => rec.authorizations.push(auth.clone()),
                }
                let mut t = Txn::new();
                t.replace(key, ver, encode(&rec));
                emit(
                    &mut t,
                    Part::Product(&sku),
                    ctx,
                    now,
                    pb::licensing_event::Kind::ExportAuthorizationChanged(pb::ExportAuthorizationChanged {
                        product_sku: req.product_sku.clone(),
                        destination: req.destination.clone(),
                        active: true,
                    }),
                );
                record(
                    &mut t,
                    Part::Product(&sku),
                    ctx,
                    now,
                    "export.authorized",
                    &req.product_sku,
                    format!("{} may export {} to {} ({})", req.vendor, req.product_sku, req.destination, req.reference),
                );
                Ok((
                    t,
                    pb::GrantExportAuthorizationResponse { authorization: Some(export_to(&req.product_sku, &auth)) },
                ))
            })
            .await?;
        Ok(answer)
    }

    pub(crate) async fn revoke_export_authorization(
        &self,
        ctx: &RequestContext,
        req: pb::RevokeExportAuthorizationRequest,
    ) -> Result<pb::RevokeExportAuthorizationResponse, Error> {
        let mut v = Violations::new();
        validate::request_id(&mut v, &req.request_id);
        let sku = validate::parse::<Sku>(&mut v, "product_sku", req.product_sku.clone());
        validate::country(&mut v, "destination", &req.destination);
        validate::text(&mut v, "reason", &req.reason, validate::MAX_TEXT_LEN, false);
        let sku = validate::finish(v, sku)?;
        let idem = IdemKey::new(&self.inner.idem, "RevokeExportAuthorization", &req.request_id, &req)
            .in_partition(keys::part(&sku));
        let (answer, _) = self
            .run_in(Part::Product(&sku), Some(&idem), || async {
                let key = keys::exports(&sku);
                let subject = format!("{}/{}", req.product_sku, req.destination);
                let (ver, mut rec) = self
                    .load::<ProductExportRecord>(key.clone())
                    .await?
                    .ok_or_else(|| Error::not_found("export authorization", &subject))?;
                let now = now_ms();
                let Some(auth) = rec.authorizations.iter_mut().find(|a| a.destination == req.destination) else {
                    return Err(Error::not_found("export authorization", &subject));
                };
                if !auth.active {
                    return Err(Error::precondition(
                        "EXPORT_NOT_ACTIVE",
                        &subject,
                        format!("export authorisation {subject} is already revoked"),
                    ));
                }
                auth.active = false;
                auth.update_ms = now;
                let out = export_to(&req.product_sku, auth);
                let mut t = Txn::new();
                t.replace(key, ver, encode(&rec));
                emit(
                    &mut t,
                    Part::Product(&sku),
                    ctx,
                    now,
                    pb::licensing_event::Kind::ExportAuthorizationChanged(pb::ExportAuthorizationChanged {
                        product_sku: req.product_sku.clone(),
                        destination: req.destination.clone(),
                        active: false,
                    }),
                );
                record(
                    &mut t,
                    Part::Product(&sku),
                    ctx,
                    now,
                    "export.revoked",
                    &req.product_sku,
                    format!("{subject}: {}", req.reason),
                );
                Ok((t, pb::RevokeExportAuthorizationResponse { authorization: Some(out) }))
            })
            .await?;
        Ok(answer)
    }

    pub(crate) async fn list_export_authorizations(
        &self,
        req: pb::ListExportAuthorizationsRequest,
    ) -> Result<pb::ListExportAuthorizationsResponse, Error> {
        let mut v = Violations::new();
        let page = Page::parse(&mut v, req.page_size, &req.page_token);
        v.check().map_err(Error::Status)?;
        let skus = self.store().zrange(&keys::export_index(), 0, -1, false).await?;
        // The index lists SKUs parsed on entry.
        let rkeys: Vec<String> = skus.iter().map(|(s, _)| keys::exports(&Sku::from_trusted(s.as_str()))).collect();
        let all: Vec<pb::ExportAuthorization> = self
            .load_many::<ProductExportRecord>(&rkeys)
            .await?
            .into_iter()
            .flatten()
            .flat_map(|(_, r)| r.authorizations.iter().map(|a| export_to(&r.product_sku, a)).collect::<Vec<_>>())
            .collect();
        let (items, next) = page_slice(all, &page);
        Ok(pb::ListExportAuthorizationsResponse { authorizations: items, next_page_token: next })
    }

    pub(crate) async fn set_import_policy(
        &self,
        ctx: &RequestContext,
        req: pb::SetImportPolicyRequest,
    ) -> Result<pb::SetImportPolicyResponse, Error> {
        let mut v = Violations::new();
        validate::request_id(&mut v, &req.request_id);
        let sku = validate::parse::<Sku>(&mut v, "product_sku", req.product_sku.clone());
        validate::text(&mut v, "reason", &req.reason, validate::MAX_TEXT_LEN, false);
        let stance = match req.stance() {
            pb::ImportStance::Open => Stance::Open,
            pb::ImportStance::Embargoed => Stance::Embargoed,
            pb::ImportStance::Unspecified => {
                v.add("stance", "must be IMPORT_STANCE_OPEN or IMPORT_STANCE_EMBARGOED");
                Stance::Unspecified
            }
        };
        let sku = validate::finish(v, sku)?;
        self.index_product(&keys::policy_index(), &sku).await?;
        let idem =
            IdemKey::new(&self.inner.idem, "SetImportPolicy", &req.request_id, &req).in_partition(keys::part(&sku));
        let (answer, _) = self
            .run_in(Part::Product(&sku), Some(&idem), || async {
                let key = keys::policy(&sku);
                let existing = self.load::<PolicyRecord>(key.clone()).await?;
                let from = existing.as_ref().map(|(_, p)| p.stance()).unwrap_or(Stance::Open);
                let ver = existing.map(|(v, _)| v).unwrap_or(0);
                let now = now_ms();
                let rec = PolicyRecord {
                    product_sku: req.product_sku.clone(),
                    stance: stance as i32,
                    reason: req.reason.clone(),
                    update_ms: now,
                };
                let mut t = Txn::new();
                t.replace(key, ver, encode(&rec));
                emit(
                    &mut t,
                    Part::Product(&sku),
                    ctx,
                    now,
                    pb::licensing_event::Kind::ImportPolicyChanged(pb::ImportPolicyChanged {
                        product_sku: req.product_sku.clone(),
                        from_stance: stance_to(from) as i32,
                        to_stance: stance_to(stance) as i32,
                    }),
                );
                record(
                    &mut t,
                    Part::Product(&sku),
                    ctx,
                    now,
                    if stance == Stance::Embargoed { "customs.embargoed" } else { "customs.opened" },
                    &req.product_sku,
                    req.reason.clone(),
                );
                Ok((t, pb::SetImportPolicyResponse { policy: Some(policy_to(&req.product_sku, Some(&rec))) }))
            })
            .await?;
        Ok(answer)
    }

    pub(crate) async fn get_import_policy(
        &self,
        req: pb::GetImportPolicyRequest,
    ) -> Result<pb::GetImportPolicyResponse, Error> {
        let mut v = Violations::new();
        let sku = validate::parse::<Sku>(&mut v, "product_sku", req.product_sku.clone());
        let sku = validate::finish(v, sku)?;
        let p = self.load::<PolicyRecord>(keys::policy(&sku)).await?;
        Ok(pb::GetImportPolicyResponse { policy: Some(policy_to(&req.product_sku, p.as_ref().map(|(_, p)| p))) })
    }

    pub(crate) async fn list_import_policies(
        &self,
        req: pb::ListImportPoliciesRequest,
    ) -> Result<pb::ListImportPoliciesResponse, Error> {
        let mut v = Violations::new();
        let page = Page::parse(&mut v, req.page_size, &req.page_token);
        v.check().map_err(Error::Status)?;
        let skus = self.store().zrange(&keys::policy_index(), 0, -1, false).await?;
        // The index lists SKUs parsed on entry.
        let pkeys: Vec<String> = skus.iter().map(|(s, _)| keys::policy(&Sku::from_trusted(s.as_str()))).collect();
        let all: Vec<pb::ImportPolicy> = self
            .load_many::<PolicyRecord>(&pkeys)
            .await?
            .into_iter()
            .flatten()
            .map(|(_, p)| policy_to(&p.product_sku, Some(&p)))
            .collect();
        let (items, next) = page_slice(all, &page);
        Ok(pb::ListImportPoliciesResponse { policies: items, next_page_token: next })
    }
}

/// One page of an in-memory list (for the small lists of products).
fn page_slice<T>(all: Vec<T>, page: &Page) -> (Vec<T>, String) {
    let start = page.offset().min(all.len());
    let end = (start + page.size).min(all.len());
    let next = if end < all.len() { paging::token(&end.to_string()) } else { String::new() };
    (all.into_iter().skip(start).take(end - start).collect(), next)
}
