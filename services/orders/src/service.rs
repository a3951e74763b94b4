//! The tonic service: each RPC reads its context, hands the request to the matching operation, and
//! turns a failure into a status in one place ([`crate::Error::into_status`]).

use chipgate_proto::orders::v1 as pb;
use chipgate_proto::orders::v1::order_service_server::OrderService;
use chipgate_runtime::{mutating, reading};
use tonic::{Request, Response, Status};

use crate::Orders;

#[tonic::async_trait]
impl OrderService for Orders {
    type WatchOrdersStream = crate::queries::WatchStream;

    async fn place_order(&self, r: Request<pb::PlaceOrderRequest>) -> Result<Response<pb::PlaceOrderResponse>, Status> {
        mutating!(self, r, place_order)
    }
    async fn get_order(&self, r: Request<pb::GetOrderRequest>) -> Result<Response<pb::GetOrderResponse>, Status> {
        mutating!(self, r, get_order)
    }
    async fn list_orders(&self, r: Request<pb::ListOrdersRequest>) -> Result<Response<pb::ListOrdersResponse>, Status> {
        reading!(self, r, list_orders)
    }
    async fn cancel_order(
        &self,
        r: Request<pb::CancelOrderRequest>,
    ) -> Result<Response<pb::CancelOrderResponse>, Status> {
        mutating!(self, r, cancel_order)
    }
    async fn confirm_order(
        &self,
        r: Request<pb::ConfirmOrderRequest>,
    ) -> Result<Response<pb::ConfirmOrderResponse>, Status> {
        mutating!(self, r, confirm_order)
    }
    async fn ship_order(&self, r: Request<pb::ShipOrderRequest>) -> Result<Response<pb::ShipOrderResponse>, Status> {
        mutating!(self, r, ship_order)
    }
    async fn watch_orders(
        &self,
        r: Request<pb::WatchOrdersRequest>,
    ) -> Result<Response<Self::WatchOrdersStream>, Status> {
        reading!(self, r, watch_orders, slot)
    }
    async fn get_backlog(&self, r: Request<pb::GetBacklogRequest>) -> Result<Response<pb::GetBacklogResponse>, Status> {
        reading!(self, r, get_backlog)
    }
    async fn get_wave_progress(
        &self,
        r: Request<pb::GetWaveProgressRequest>,
    ) -> Result<Response<pb::GetWaveProgressResponse>, Status> {
        reading!(self, r, get_wave_progress)
    }
    async fn set_allocation_policy(
        &self,
        r: Request<pb::SetAllocationPolicyRequest>,
    ) -> Result<Response<pb::SetAllocationPolicyResponse>, Status> {
        mutating!(self, r, set_allocation_policy)
    }
    async fn get_allocation_policy(
        &self,
        r: Request<pb::GetAllocationPolicyRequest>,
    ) -> Result<Response<pb::GetAllocationPolicyResponse>, Status> {
        reading!(self, r, get_allocation_policy)
    }
    async fn preview_wave(
        &self,
        r: Request<pb::PreviewWaveRequest>,
    ) -> Result<Response<pb::PreviewWaveResponse>, Status> {
        mutating!(self, r, preview_wave)
    }
    async fn preview_supply(
        &self,
        r: Request<pb::PreviewSupplyRequest>,
    ) -> Result<Response<pb::PreviewSupplyResponse>, Status> {
        mutating!(self, r, preview_supply)
    }
}
