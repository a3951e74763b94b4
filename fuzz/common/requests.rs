//! Shared by the `requests` fuzz target (cargo-fuzz, nightly) and the stable fuzz smoke test
//! (`tests/tests/fuzz_smoke.rs`, run by CI): the real handlers of the three services on the in-memory
//! backend, and a dispatcher that decodes bytes as the request of the n-th unary RPC and calls it.

#![allow(dead_code)]

use std::sync::OnceLock;

use chipgate_proto::inventory::v1 as ipb;
use chipgate_proto::inventory::v1::inventory_service_server::InventoryService;
use chipgate_proto::licensing::v1 as lpb;
use chipgate_proto::licensing::v1::licensing_service_server::LicensingService;
use chipgate_proto::orders::v1 as opb;
use chipgate_proto::orders::v1::order_service_server::OrderService;
use prost::Message;

/// Unary RPCs the dispatcher knows (licensing 37, inventory 12, orders 12).
pub const RPCS: usize = 61;

/// The three services, in this process.
pub struct World {
    /// Runs the handlers.
    pub rt: tokio::runtime::Runtime,
    licensing: chipgate_licensing::Licensing,
    inventory: chipgate_inventory::Inventory,
    orders: chipgate_orders::Orders,
}

/// The services, started once per process.
pub fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
        let (licensing, inventory, orders) = rt.block_on(async {
            let store = chipgate_state::Store::memory();
            let shutdown = chipgate_runtime::Shutdown::new();
            let licensing = chipgate_licensing::Licensing::new(store.clone());
            let inventory = chipgate_inventory::Inventory::start(
                store.clone(),
                shutdown.clone(),
                chipgate_inventory::Options::default(),
            );
            // Peers that are never reachable: calls that get past validation fail fast.
            let peers = chipgate_orders::Peers::connect(
                "http://127.0.0.1:9",
                "http://127.0.0.1:9",
                1 << 20,
                chipgate_runtime::auth::TokenSource::None,
                None,
            )
            .expect("peer urls");
            let options = chipgate_orders::Options {
                place_wait: std::time::Duration::ZERO,
                ..chipgate_orders::Options::default()
            };
            let orders = chipgate_orders::Orders::start(store, peers, shutdown, options);
            (licensing, inventory, orders)
        });
        World { rt, licensing, inventory, orders }
    })
}

/// Decodes `bytes` as the request of the `sel`-th RPC in the list and calls it.
macro_rules! dispatch {
    ($sel:expr, $bytes:expr, $svc:expr, [$($method:ident: $req:ty),* $(,)?]) => {{
        let mut i = 0usize;
        $(
            if $sel == i {
                let Ok(r) = <$req>::decode($bytes) else { return false };
                let _ = $svc.$method(tonic::Request::new(r)).await;
                return true;
            }
            i += 1;
        )*
        let _ = i;
        false
    }};
}

/// Decodes `bytes` as the request of RPC number `sel` (modulo nothing: out of range does nothing) and
/// calls its handler; the answer is dropped (only a panic matters). True when the handler ran.
pub async fn call(w: &World, sel: u8, bytes: &[u8]) -> bool {
    let sel = usize::from(sel);
    let (lic_n, inv_n) = (37usize, 12usize);
    if sel < lic_n {
        dispatch!(sel, bytes, w.licensing, [
            submit_application: lpb::SubmitApplicationRequest,
            get_application: lpb::GetApplicationRequest,
            list_applications: lpb::ListApplicationsRequest,
            withdraw_application: lpb::WithdrawApplicationRequest,
            reject_application: lpb::RejectApplicationRequest,
            list_queue: lpb::ListQueueRequest,
            move_queued_application: lpb::MoveQueuedApplicationRequest,
            create_wave: lpb::CreateWaveRequest,
            add_wave_grant: lpb::AddWaveGrantRequest,
            remove_wave_grant: lpb::RemoveWaveGrantRequest,
            publish_wave: lpb::PublishWaveRequest,
            get_wave: lpb::GetWaveRequest,
            list_waves: lpb::ListWavesRequest,
            get_license: lpb::GetLicenseRequest,
            list_licenses: lpb::ListLicensesRequest,
            finalize_terms: lpb::FinalizeTermsRequest,
            suspend_license: lpb::SuspendLicenseRequest,
            reinstate_license: lpb::ReinstateLicenseRequest,
            revoke_license: lpb::RevokeLicenseRequest,
            check_eligibility: lpb::CheckEligibilityRequest,
            batch_reserve_quota: lpb::BatchReserveQuotaRequest,
            batch_release_quota: lpb::BatchReleaseQuotaRequest,
            confirm_quota: lpb::ConfirmQuotaRequest,
            get_quota_reservation: lpb::GetQuotaReservationRequest,
            recheck_quota: lpb::RecheckQuotaRequest,
            preview_wave_quota: lpb::PreviewWaveQuotaRequest,
            record_domestic_purchase: lpb::RecordDomesticPurchaseRequest,
            get_domestic_ledger: lpb::GetDomesticLedgerRequest,
            grant_export_authorization: lpb::GrantExportAuthorizationRequest,
            revoke_export_authorization: lpb::RevokeExportAuthorizationRequest,
            list_export_authorizations: lpb::ListExportAuthorizationsRequest,
            set_import_policy: lpb::SetImportPolicyRequest,
            get_import_policy: lpb::GetImportPolicyRequest,
            list_import_policies: lpb::ListImportPoliciesRequest,
            list_audit_entries: lpb::ListAuditEntriesRequest,
            verify_audit_log: lpb::VerifyAuditLogRequest,
            get_audit_checkpoint: lpb::GetAuditCheckpointRequest
        ])
    } else if sel < lic_n + inv_n {
        dispatch!(sel - lic_n, bytes, w.inventory, [
            upsert_product: ipb::UpsertProductRequest,
            get_product: ipb::GetProductRequest,
            list_products: ipb::ListProductsRequest,
            receive_supply: ipb::ReceiveSupplyRequest,
            get_stock: ipb::GetStockRequest,
            list_stock: ipb::ListStockRequest,
            batch_reserve: ipb::BatchReserveRequest,
            confirm_reservation: ipb::ConfirmReservationRequest,
            batch_release_reservations: ipb::BatchReleaseReservationsRequest,
            ship_reservation: ipb::ShipReservationRequest,
            get_reservation: ipb::GetReservationRequest,
            list_reservations: ipb::ListReservationsRequest
        ])
    } else {
        dispatch!(sel - lic_n - inv_n, bytes, w.orders, [
            place_order: opb::PlaceOrderRequest,
            get_order: opb::GetOrderRequest,
            list_orders: opb::ListOrdersRequest,
            cancel_order: opb::CancelOrderRequest,
            confirm_order: opb::ConfirmOrderRequest,
            ship_order: opb::ShipOrderRequest,
            get_backlog: opb::GetBacklogRequest,
            get_wave_progress: opb::GetWaveProgressRequest,
            set_allocation_policy: opb::SetAllocationPolicyRequest,
            get_allocation_policy: opb::GetAllocationPolicyRequest,
            preview_wave: opb::PreviewWaveRequest,
            preview_supply: opb::PreviewSupplyRequest
        ])
    }
}
