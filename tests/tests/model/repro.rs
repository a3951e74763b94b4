//! Minimal reproductions of what the checker found, each a plain scenario on an in-process cluster
//! (authentication on, each party with its own token).

use std::time::{Duration, Instant};

use chipgate_proto::inventory::v1 as ipb;
use chipgate_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use chipgate_proto::licensing::v1 as lpb;
use chipgate_proto::licensing::v1::licensing_service_client::LicensingServiceClient;
use chipgate_proto::orders::v1 as opb;
use chipgate_proto::orders::v1::OrderState;
use chipgate_proto::orders::v1::order_service_client::OrderServiceClient;
use chipgate_runtime::auth::{AuthChannel, Role};
use chipgate_testkit::Cluster;

const SKU: &str = "H200-SXM-141GB";

struct World {
    cluster: Cluster,
    authority: LicensingServiceClient<AuthChannel>,
    exporter: LicensingServiceClient<AuthChannel>,
    vendor: InventoryServiceClient<AuthChannel>,
    buyer_lic: LicensingServiceClient<AuthChannel>,
    buyer: OrderServiceClient<AuthChannel>,
    auditor: OrderServiceClient<AuthChannel>,
}

impl World {
    async fn start() -> Self {
        let cluster = Cluster::start().await;
        let lic = cluster.licensing.url();
        let ord = cluster.orders.as_ref().expect("orders in process").url();
        let authority = LicensingServiceClient::new(Cluster::authed(&lic, &cluster.token(Role::ImportAuthority)));
        let exporter = LicensingServiceClient::new(Cluster::authed(&lic, &cluster.token(Role::ExportAuthority)));
        let vendor =
            InventoryServiceClient::new(Cluster::authed(&cluster.inventory.url(), &cluster.token(Role::Vendor)));
        let buyer_lic = LicensingServiceClient::new(Cluster::authed(&lic, &cluster.buyer_token("x")));
        let buyer = OrderServiceClient::new(Cluster::authed(&ord, &cluster.buyer_token("x")));
        let auditor = OrderServiceClient::new(Cluster::authed(&ord, &cluster.token(Role::Auditor)));
        World { cluster, authority, exporter, vendor, buyer_lic, buyer, auditor }
    }

    /// Buyer x holds an active licence for `units` of SKU, exportable to CN.
    async fn licensed(&mut self, units: u64) {
        self.exporter
            .grant_export_authorization(lpb::GrantExportAuthorizationRequest {
                request_id: "export".into(),
                vendor: "nvidia".into(),
                product_sku: SKU.into(),
                destination: "CN".into(),
                reference: "BIS".into(),
            })
            .await
            .unwrap();
        let app = self
            .buyer_lic
            .submit_application(lpb::SubmitApplicationRequest {
                request_id: "apply".into(),
                buyer_id: "x".into(),
                product_sku: SKU.into(),
                quantity: units,
                end_use: "training".into(),
                site: "dc".into(),
                destination: "CN".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .application
            .unwrap()
            .application_id;
        let wave = self
            .authority
            .create_wave(lpb::CreateWaveRequest { request_id: "wave".into(), display_name: "w".into() })
            .await
            .unwrap()
            .into_inner()
            .wave
            .unwrap()
            .wave_id;
        self.authority
            .add_wave_grant(lpb::AddWaveGrantRequest {
                request_id: "grant".into(),
                wave_id: wave.clone(),
                application_id: app,
                granted_units: units,
                conditions: None,
            })
            .await
            .unwrap();
        self.authority
            .publish_wave(lpb::PublishWaveRequest { request_id: "publish".into(), wave_id: wave })
            .await
            .unwrap();
    }

    async fn place(&mut self, rid: &str, units: u64) -> opb::Order {
        self.buyer
            .place_order(opb::PlaceOrderRequest {
                request_id: rid.into(),
                buyer_id: "x".into(),
                product_sku: SKU.into(),
                units,
                justification: "training".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .order
            .unwrap()
    }

    async fn order(&mut self, id: &str) -> opb::Order {
        self.auditor.get_order(opb::GetOrderRequest { order_id: id.into() }).await.unwrap().into_inner().order.unwrap()
    }

    /// Waits until `id` is in `state` (None: it never got there within 5 s).
    async fn reaches(&mut self, id: &str, state: OrderState) -> Option<opb::Order> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let o = self.order(id).await;
            if o.state() == state {
                return Some(o);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Found by the checker (seed 0x3): an order waiting with CONDITION_QUEUE_ORDER behind an earlier order
/// of its buyer stayed waiting for good once that earlier order was cancelled — cancelling a waiting
/// order gives no quota back, so nothing marked the buyer's queue for another look. Cancelling a
/// waiting order now marks its buyer's waiting orders of the product.
#[tokio::test]
async fn cancelling_the_order_a_later_one_queues_behind_lets_it_through() {
    let mut w = World::start().await;
    w.licensed(100).await;
    w.vendor
        .receive_supply(ipb::ReceiveSupplyRequest {
            request_id: "supply".into(),
            receipt_id: "r1".into(),
            product_sku: SKU.into(),
            units: 1000,
            source: "air".into(),
        })
        .await
        .unwrap();
    let a = w.place("a", 80).await;
    assert_eq!(w.reaches(&a.order_id, OrderState::Reserved).await.map(|o| o.state()), Some(OrderState::Reserved));
    let b = w.place("b", 50).await; // 20 units of quota left: waits for quota
    let c = w.place("c", 10).await; // would fit, but queues behind b
    let c_now = w.reaches(&c.order_id, OrderState::AwaitingLicense).await.expect("c waits");
    assert!(c_now.reasons.iter().any(|r| r.condition() == lpb::Condition::QueueOrder), "{:?}", c_now.reasons);
    w.buyer
        .cancel_order(opb::CancelOrderRequest {
            request_id: "cancel-b".into(),
            order_id: b.order_id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap();
    let c_after = w.reaches(&c.order_id, OrderState::Reserved).await;
    let got = w.order(&c.order_id).await;
    w.cluster.stop().await;
    assert!(c_after.is_some(), "c should take the 10 units once b is gone; it is {:?}: {:?}", got.state(), got.reasons);
}
