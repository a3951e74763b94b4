//! The tonic service: each RPC reads its context, hands the request to the matching operation, and
//! turns a failure into a status in one place ([`crate::Error::into_status`]).

use chipgate_proto::licensing::v1 as pb;
use chipgate_proto::licensing::v1::licensing_service_server::LicensingService;
use chipgate_runtime::{mutating, reading};
use tonic::{Request, Response, Status};

use crate::Licensing;

#[tonic::async_trait]
impl LicensingService for Licensing {
    async fn submit_application(
        &self,
        r: Request<pb::SubmitApplicationRequest>,
    ) -> Result<Response<pb::SubmitApplicationResponse>, Status> {
        mutating!(self, r, submit_application, request_id)
    }
    async fn get_application(
        &self,
        r: Request<pb::GetApplicationRequest>,
    ) -> Result<Response<pb::GetApplicationResponse>, Status> {
        mutating!(self, r, get_application)
    }
    async fn list_applications(
        &self,
        r: Request<pb::ListApplicationsRequest>,
    ) -> Result<Response<pb::ListApplicationsResponse>, Status> {
        reading!(self, r, list_applications)
    }
    async fn withdraw_application(
        &self,
        r: Request<pb::WithdrawApplicationRequest>,
    ) -> Result<Response<pb::WithdrawApplicationResponse>, Status> {
        mutating!(self, r, withdraw_application, request_id)
    }
    async fn reject_application(
        &self,
        r: Request<pb::RejectApplicationRequest>,
    ) -> Result<Response<pb::RejectApplicationResponse>, Status> {
        mutating!(self, r, reject_application, request_id)
    }
    async fn list_queue(&self, r: Request<pb::ListQueueRequest>) -> Result<Response<pb::ListQueueResponse>, Status> {
        reading!(self, r, list_queue)
    }
    async fn move_queued_application(
        &self,
        r: Request<pb::MoveQueuedApplicationRequest>,
    ) -> Result<Response<pb::MoveQueuedApplicationResponse>, Status> {
        mutating!(self, r, move_queued_application, request_id)
    }
    async fn create_wave(&self, r: Request<pb::CreateWaveRequest>) -> Result<Response<pb::CreateWaveResponse>, Status> {
        mutating!(self, r, create_wave, request_id)
    }
    async fn add_wave_grant(
        &self,
        r: Request<pb::AddWaveGrantRequest>,
    ) -> Result<Response<pb::AddWaveGrantResponse>, Status> {
        mutating!(self, r, add_wave_grant, request_id)
    }
    async fn remove_wave_grant(
        &self,
        r: Request<pb::RemoveWaveGrantRequest>,
    ) -> Result<Response<pb::RemoveWaveGrantResponse>, Status> {
        mutating!(self, r, remove_wave_grant, request_id)
    }
    async fn publish_wave(
        &self,
        r: Request<pb::PublishWaveRequest>,
    ) -> Result<Response<pb::PublishWaveResponse>, Status> {
        mutating!(self, r, publish_wave, request_id)
    }
    async fn get_wave(&self, r: Request<pb::GetWaveRequest>) -> Result<Response<pb::GetWaveResponse>, Status> {
        reading!(self, r, get_wave)
    }
    async fn list_waves(&self, r: Request<pb::ListWavesRequest>) -> Result<Response<pb::ListWavesResponse>, Status> {
        reading!(self, r, list_waves)
    }
    async fn get_license(&self, r: Request<pb::GetLicenseRequest>) -> Result<Response<pb::GetLicenseResponse>, Status> {
        mutating!(self, r, get_license)
    }
    async fn list_licenses(
        &self,
        r: Request<pb::ListLicensesRequest>,
    ) -> Result<Response<pb::ListLicensesResponse>, Status> {
        reading!(self, r, list_licenses)
    }
    async fn finalize_terms(
        &self,
        r: Request<pb::FinalizeTermsRequest>,
    ) -> Result<Response<pb::FinalizeTermsResponse>, Status> {
        mutating!(self, r, finalize_terms, request_id)
    }
    async fn suspend_license(
        &self,
        r: Request<pb::SuspendLicenseRequest>,
    ) -> Result<Response<pb::SuspendLicenseResponse>, Status> {
        mutating!(self, r, suspend_license, request_id)
    }
    async fn reinstate_license(
        &self,
        r: Request<pb::ReinstateLicenseRequest>,
    ) -> Result<Response<pb::ReinstateLicenseResponse>, Status> {
        mutating!(self, r, reinstate_license, request_id)
    }
    async fn revoke_license(
        &self,
        r: Request<pb::RevokeLicenseRequest>,
    ) -> Result<Response<pb::RevokeLicenseResponse>, Status> {
        mutating!(self, r, revoke_license, request_id)
    }
    async fn check_eligibility(
        &self,
        r: Request<pb::CheckEligibilityRequest>,
    ) -> Result<Response<pb::CheckEligibilityResponse>, Status> {
        reading!(self, r, check_eligibility)
    }
    async fn batch_reserve_quota(
        &self,
        r: Request<pb::BatchReserveQuotaRequest>,
    ) -> Result<Response<pb::BatchReserveQuotaResponse>, Status> {
        mutating!(self, r, batch_reserve_quota, request_id)
    }
    async fn batch_release_quota(
        &self,
        r: Request<pb::BatchReleaseQuotaRequest>,
    ) -> Result<Response<pb::BatchReleaseQuotaResponse>, Status> {
        mutating!(self, r, batch_release_quota, request_id)
    }
    async fn confirm_quota(
        &self,
        r: Request<pb::ConfirmQuotaRequest>,
    ) -> Result<Response<pb::ConfirmQuotaResponse>, Status> {
        mutating!(self, r, confirm_quota, request_id)
    }
    async fn get_quota_reservation(
        &self,
        r: Request<pb::GetQuotaReservationRequest>,
    ) -> Result<Response<pb::GetQuotaReservationResponse>, Status> {
        reading!(self, r, get_quota_reservation)
    }
    async fn recheck_quota(
        &self,
        r: Request<pb::RecheckQuotaRequest>,
    ) -> Result<Response<pb::RecheckQuotaResponse>, Status> {
        reading!(self, r, recheck_quota)
    }
    async fn preview_wave_quota(
        &self,
        r: Request<pb::PreviewWaveQuotaRequest>,
    ) -> Result<Response<pb::PreviewWaveQuotaResponse>, Status> {
        mutating!(self, r, preview_wave_quota)
    }
    async fn record_domestic_purchase(
        &self,
        r: Request<pb::RecordDomesticPurchaseRequest>,
    ) -> Result<Response<pb::RecordDomesticPurchaseResponse>, Status> {
        mutating!(self, r, record_domestic_purchase, request_id)
    }
    async fn get_domestic_ledger(
        &self,
        r: Request<pb::GetDomesticLedgerRequest>,
    ) -> Result<Response<pb::GetDomesticLedgerResponse>, Status> {
        reading!(self, r, get_domestic_ledger)
    }
    async fn grant_export_authorization(
        &self,
        r: Request<pb::GrantExportAuthorizationRequest>,
    ) -> Result<Response<pb::GrantExportAuthorizationResponse>, Status> {
        mutating!(self, r, grant_export_authorization, request_id)
    }
    async fn revoke_export_authorization(
        &self,
        r: Request<pb::RevokeExportAuthorizationRequest>,
    ) -> Result<Response<pb::RevokeExportAuthorizationResponse>, Status> {
        mutating!(self, r, revoke_export_authorization, request_id)
    }
    async fn list_export_authorizations(
        &self,
        r: Request<pb::ListExportAuthorizationsRequest>,
    ) -> Result<Response<pb::ListExportAuthorizationsResponse>, Status> {
        reading!(self, r, list_export_authorizations)
    }
    async fn set_import_policy(
        &self,
        r: Request<pb::SetImportPolicyRequest>,
    ) -> Result<Response<pb::SetImportPolicyResponse>, Status> {
        mutating!(self, r, set_import_policy, request_id)
    }
    async fn get_import_policy(
        &self,
        r: Request<pb::GetImportPolicyRequest>,
    ) -> Result<Response<pb::GetImportPolicyResponse>, Status> {
        reading!(self, r, get_import_policy)
    }
    async fn list_import_policies(
        &self,
        r: Request<pb::ListImportPoliciesRequest>,
    ) -> Result<Response<pb::ListImportPoliciesResponse>, Status> {
        reading!(self, r, list_import_policies)
    }
    async fn list_audit_entries(
        &self,
        r: Request<pb::ListAuditEntriesRequest>,
    ) -> Result<Response<pb::ListAuditEntriesResponse>, Status> {
        reading!(self, r, list_audit_entries)
    }
    async fn verify_audit_log(
        &self,
        r: Request<pb::VerifyAuditLogRequest>,
    ) -> Result<Response<pb::VerifyAuditLogResponse>, Status> {
        reading!(self, r, verify_audit_log)
    }
    async fn get_audit_checkpoint(
        &self,
        r: Request<pb::GetAuditCheckpointRequest>,
    ) -> Result<Response<pb::GetAuditCheckpointResponse>, Status> {
        reading!(self, r, get_audit_checkpoint)
    }
}
