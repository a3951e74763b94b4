//! The tonic service: each RPC reads its context, hands the request to the matching operation, and
//! turns a failure into a status in one place ([`crate::Error::into_status`]).

use chipgate_proto::inventory::v1 as pb;
use chipgate_proto::inventory::v1::inventory_service_server::InventoryService;
use chipgate_runtime::{mutating, reading};
use tonic::{Request, Response, Status};

use crate::Inventory;

#[tonic::async_trait]
impl InventoryService for Inventory {
    type WatchStockStream = crate::watch::WatchStream;

    async fn upsert_product(
        &self,
        r: Request<pb::UpsertProductRequest>,
    ) -> Result<Response<pb::UpsertProductResponse>, Status> {
        mutating!(self, r, upsert_product)
    }
    async fn get_product(&self, r: Request<pb::GetProductRequest>) -> Result<Response<pb::GetProductResponse>, Status> {
        reading!(self, r, get_product)
    }
    async fn list_products(
        &self,
        r: Request<pb::ListProductsRequest>,
    ) -> Result<Response<pb::ListProductsResponse>, Status> {
        reading!(self, r, list_products)
    }
    async fn receive_supply(
        &self,
        r: Request<pb::ReceiveSupplyRequest>,
    ) -> Result<Response<pb::ReceiveSupplyResponse>, Status> {
        mutating!(self, r, receive_supply)
    }
    async fn get_stock(&self, r: Request<pb::GetStockRequest>) -> Result<Response<pb::GetStockResponse>, Status> {
        reading!(self, r, get_stock)
    }
    async fn list_stock(&self, r: Request<pb::ListStockRequest>) -> Result<Response<pb::ListStockResponse>, Status> {
        reading!(self, r, list_stock)
    }
    async fn batch_reserve(
        &self,
        r: Request<pb::BatchReserveRequest>,
    ) -> Result<Response<pb::BatchReserveResponse>, Status> {
        mutating!(self, r, batch_reserve)
    }
    async fn confirm_reservation(
        &self,
        r: Request<pb::ConfirmReservationRequest>,
    ) -> Result<Response<pb::ConfirmReservationResponse>, Status> {
        mutating!(self, r, confirm_reservation)
    }
    async fn batch_release_reservations(
        &self,
        r: Request<pb::BatchReleaseReservationsRequest>,
    ) -> Result<Response<pb::BatchReleaseReservationsResponse>, Status> {
        mutating!(self, r, batch_release_reservations)
    }
    async fn ship_reservation(
        &self,
        r: Request<pb::ShipReservationRequest>,
    ) -> Result<Response<pb::ShipReservationResponse>, Status> {
        mutating!(self, r, ship_reservation)
    }
    async fn get_reservation(
        &self,
        r: Request<pb::GetReservationRequest>,
    ) -> Result<Response<pb::GetReservationResponse>, Status> {
        reading!(self, r, get_reservation)
    }
    async fn list_reservations(
        &self,
        r: Request<pb::ListReservationsRequest>,
    ) -> Result<Response<pb::ListReservationsResponse>, Status> {
        reading!(self, r, list_reservations)
    }
    async fn watch_stock(&self, r: Request<pb::WatchStockRequest>) -> Result<Response<Self::WatchStockStream>, Status> {
        // The caller decides what a change may say (buyers don't see other buyers' orders).
        mutating!(self, r, watch_stock, slot)
    }
}
