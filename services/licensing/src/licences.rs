//! Licences: reading them, finalising terms, suspending, reinstating, revoking.

use chipgate_domain::ids::{BuyerId, LicenceId};
use chipgate_domain::licensing::{LicenseRecord, TransitionError};
use chipgate_proto::licensing::v1 as pb;
use chipgate_runtime::errors::Violations;
use chipgate_runtime::paging::Page;
use chipgate_runtime::service::Records;
use chipgate_runtime::time::now_ms;
use chipgate_runtime::txn::IdemKey;
use chipgate_runtime::{RequestContext, validate};
use chipgate_state::Txn;

use crate::convert::{conditions_from, license_state, license_to};
use crate::keys::Part;
use crate::{Error, Licensing, emit, encode, keys, record};

/// The ids of a buyer's licences for one product, oldest first.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct LicenseIndex {
    #[prost(string, repeated, tag = "1")]
    pub license_ids: Vec<String>,
}

/// The transitions an authority can ask for.
#[derive(Clone, Copy, Debug)]
enum Change {
    Finalize,
    Suspend,
    Reinstate,
    Revoke,
}

fn transition_error(id: &str, e: &TransitionError) -> Error {
    Error::Precondition {
        reason: "LICENSE_STATE",
        message: format!("licence {id}: {e}"),
        violations: vec![("LICENSE_STATE".to_string(), id.to_string(), format!("licence is {}", e.from.name()))],
    }
}

/// The partition a call about licence `id` commits its answer in (the desk's for an id that names no
/// product: the call then fails NOT_FOUND without writing anything).
fn licence_partition(id: &LicenceId) -> chipgate_state::Partition {
    id.product().map_or_else(|| keys::SPACE.partition(""), |sku| keys::part(&sku))
}

impl Licensing {
    pub(crate) async fn get_license(
        &self,
        ctx: &RequestContext,
        req: pb::GetLicenseRequest,
    ) -> Result<pb::GetLicenseResponse, Error> {
        let mut v = Violations::new();
        let id = validate::parse::<LicenceId>(&mut v, "license_id", req.license_id);
        let id = validate::finish(v, id)?;
        let key = keys::license(&id).ok_or_else(|| Error::not_found("licence", &id))?;
        let (_, lic) = self.require::<LicenseRecord>(key, "licence", &id).await?;
        ctx.check_owner(&lic.buyer_id).map_err(Error::Status)?;
        Ok(pb::GetLicenseResponse { license: Some(license_to(&lic, now_ms())) })
    }

    pub(crate) async fn list_licenses(&self, req: pb::ListLicensesRequest) -> Result<pb::ListLicensesResponse, Error> {
        let mut v = Violations::new();
        let buyer = validate::parse_optional::<BuyerId>(&mut v, "buyer_id", req.buyer_id.clone());
        validate::optional_id(&mut v, "product_sku", &req.product_sku);
        validate::optional_id(&mut v, "wave_id", &req.wave_id);
        let page = Page::parse(&mut v, req.page_size, &req.page_token);
        let buyer = validate::finish(v, buyer)?;
        let index = buyer.map_or_else(keys::licenses, |b| keys::licenses_of(&b));
        let now = now_ms();
        let state = req.state();
        let (lics, next) = self
            .scan_index::<LicenseRecord>(
                &index,
                &page,
                false,
                |id| keys::license(&LicenceId::from_trusted(id)).unwrap_or_default(),
                |l| {
                    (req.product_sku.is_empty() || l.product_sku == req.product_sku)
                        && (req.wave_id.is_empty() || l.wave_id == req.wave_id)
                        && (state == pb::LicenseState::Unspecified || license_state(l.effective_state(now)) == state)
                },
            )
            .await?;
        Ok(pb::ListLicensesResponse {
            licenses: lics.iter().map(|l| license_to(l, now)).collect(),
            next_page_token: next,
        })
    }

    pub(crate) async fn finalize_terms(
        &self,
        ctx: &RequestContext,
        req: pb::FinalizeTermsRequest,
    ) -> Result<pb::FinalizeTermsResponse, Error> {
        let mut v = Violations::new();
        validate::request_id(&mut v, &req.request_id);
        let id = validate::parse::<LicenceId>(&mut v, "license_id", req.license_id.clone());
        if let Some(c) = &req.conditions {
            for (field, problem) in conditions_from(c).problems() {
                v.add(format!("conditions.{field}"), problem);
            }
        }
        let id = validate::finish(v, id)?;
        let idem =
            IdemKey::new(&self.inner.idem, "FinalizeTerms", &req.request_id, &req).in_partition(licence_partition(&id));
        let license = self.change(ctx, &idem, &id, Change::Finalize, "", req.conditions.as_ref()).await?;
        Ok(pb::FinalizeTermsResponse { license: Some(license) })
    }

    pub(crate) async fn suspend_license(
        &self,
        ctx: &RequestContext,
        req: pb::SuspendLicenseRequest,
    ) -> Result<pb::SuspendLicenseResponse, Error> {
        let id = self.check_change(&req.request_id, &req.license_id, &req.reason, true)?;
        let idem = IdemKey::new(&self.inner.idem, "SuspendLicense", &req.request_id, &req)
            .in_partition(licence_partition(&id));
        let license = self.change(ctx, &idem, &id, Change::Suspend, &req.reason, None).await?;
        Ok(pb::SuspendLicenseResponse { license: Some(license) })
    }

    pub(crate) async fn reinstate_license(
        &self,
        ctx: &RequestContext,
        req: pb::ReinstateLicenseRequest,
    ) -> Result<pb::ReinstateLicenseResponse, Error> {
        let id = self.check_change(&req.request_id, &req.license_id, &req.reason, false)?;
        let idem = IdemKey::new(&self.inner.idem, "ReinstateLicense", &req.request_id, &req)
            .in_partition(licence_partition(&id));
        let license = self.change(ctx, &idem, &id, Change::Reinstate, &req.reason, None).await?;
        Ok(pb::ReinstateLicenseResponse { license: Some(license) })
    }

    pub(crate) async fn revoke_license(
        &self,
        ctx: &RequestContext,
        req: pb::RevokeLicenseRequest,
    ) -> Result<pb::RevokeLicenseResponse, Error> {
        let id = self.check_change(&req.request_id, &req.license_id, &req.reason, true)?;
        let idem =
            IdemKey::new(&self.inner.idem, "RevokeLicense", &req.request_id, &req).in_partition(licence_partition(&id));
        let license = self.change(ctx, &idem, &id, Change::Revoke, &req.reason, None).await?;
        Ok(pb::RevokeLicenseResponse { license: Some(license) })
    }

    fn check_change(
        &self,
        request_id: &str,
        license_id: &str,
        reason: &str,
        reason_required: bool,
    ) -> Result<LicenceId, Error> {
        let mut v = Violations::new();
        validate::request_id(&mut v, request_id);
        let id = validate::parse(&mut v, "license_id", license_id.to_string());
        validate::text(&mut v, "reason", reason, validate::MAX_TEXT_LEN, reason_required);
        Ok(validate::finish(v, id)?)
    }

    async fn change(
        &self,
        ctx: &RequestContext,
        idem: &IdemKey<'_>,
        license_id: &LicenceId,
        change: Change,
        reason: &str,
        conditions: Option<&pb::LicenseConditions>,
    ) -> Result<pb::License, Error> {
        let (Some(sku), Some(key)) = (license_id.product(), keys::license(license_id)) else {
            return Err(Error::not_found("licence", license_id));
        };
        let part = Part::Product(&sku);
        let (answer, _) = self
            .run_in(part, Some(idem), || async {
                let (ver, mut lic) = self.require::<LicenseRecord>(key.clone(), "licence", license_id).await?;
                let now = now_ms();
                let from = lic.effective_state(now);
                let result = match change {
                    Change::Finalize => lic.finalize_terms(conditions.map(conditions_from), now),
                    Change::Suspend => lic.suspend(reason, now),
                    Change::Reinstate => lic.reinstate(reason, now),
                    Change::Revoke => lic.revoke(reason, now),
                };
                result.map_err(|e| transition_error(license_id, &e))?;
                let to = lic.effective_state(now);
                let mut t = Txn::new();
                t.replace(key.clone(), ver, encode(&lic));
                emit(
                    &mut t,
                    part,
                    ctx,
                    now,
                    pb::licensing_event::Kind::LicenseChanged(pb::LicenseChanged {
                        license_id: lic.id.clone(),
                        buyer_id: lic.buyer_id.clone(),
                        product_sku: lic.product_sku.clone(),
                        from_state: license_state(from) as i32,
                        to_state: license_state(to) as i32,
                        reason: reason.to_string(),
                    }),
                );
                let action = match change {
                    Change::Finalize => "license.terms_finalized",
                    Change::Suspend => "license.suspended",
                    Change::Reinstate => "license.reinstated",
                    Change::Revoke => "license.revoked",
                };
                let c = lic.conditions();
                let detail = match change {
                    Change::Finalize => format!(
                        "{} {}: cap {}, ratio {} bps, justification {}, valid {}..{}",
                        lic.buyer_id,
                        lic.product_sku,
                        c.per_order_cap,
                        c.domestic_ratio_bps,
                        c.justification_required,
                        c.valid_from_ms,
                        c.valid_until_ms
                    ),
                    _ => format!("{} {}: {} → {}: {}", lic.buyer_id, lic.product_sku, from.name(), to.name(), reason),
                };
                record(&mut t, part, ctx, now, action, license_id, detail);
                Ok((t, pb::GetLicenseResponse { license: Some(license_to(&lic, now)) }))
            })
            .await?;
        answer.license.ok_or_else(|| Error::Internal("licence change answered without a licence".into()))
    }
}
