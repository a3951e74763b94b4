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
        self.licence("1", units, None).await;
    }

    /// Buyer x applies for `units` and is granted them in a wave of its own (request ids end in `n`).
    async fn licence(&mut self, n: &str, units: u64, conditions: Option<lpb::LicenseConditions>) -> String {
        let app = self
            .buyer_lic
            .submit_application(lpb::SubmitApplicationRequest {
                request_id: format!("apply-{n}"),
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
            .create_wave(lpb::CreateWaveRequest { request_id: format!("wave-{n}"), display_name: "w".into() })
            .await
            .unwrap()
            .into_inner()
            .wave
            .unwrap()
            .wave_id;
        self.authority
            .add_wave_grant(lpb::AddWaveGrantRequest {
                request_id: format!("grant-{n}"),
                wave_id: wave.clone(),
                application_id: app,
                granted_units: units,
                conditions,
            })
            .await
            .unwrap();
        let published = self
            .authority
            .publish_wave(lpb::PublishWaveRequest { request_id: format!("publish-{n}"), wave_id: wave })
            .await
            .unwrap()
            .into_inner();
        published.licenses[0].license_id.clone()
    }

    async fn licence_used(&mut self, id: &str) -> u64 {
        self.authority
            .get_license(lpb::GetLicenseRequest { license_id: id.into() })
            .await
            .unwrap()
            .into_inner()
            .license
            .unwrap()
            .used_units
    }

    async fn supply(&mut self, units: u64) {
        self.vendor
            .receive_supply(ipb::ReceiveSupplyRequest {
                request_id: format!("supply-{units}"),
                receipt_id: format!("r-{units}"),
                product_sku: SKU.into(),
                units,
                source: "air".into(),
            })
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
    w.supply(1000).await;
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

/// Found by the checker (seeds 0x4, 0x5): licensing's quota planner lets a buyer's later order through
/// when an earlier one fails quota only for good (more units than a licence grants in all), but the
/// orders service parked that later order as CONDITION_QUEUE_ORDER anyway — ignoring the quota licensing
/// had just reserved for it. The licence showed units in use that no order held (leaked until the
/// order was looked at again), and the order waited although it could be served. Orders now block a
/// buyer's later orders on the same condition the planner does (capacity that may come back).
#[tokio::test]
async fn an_order_too_big_for_ever_does_not_park_a_later_one_that_licensing_served() {
    let mut w = World::start().await;
    w.licensed(100).await;
    let first = format!("lic-{SKU}-1");
    // A second licence whose terms are pending: the big order is not rejectable, it waits.
    let pending = lpb::LicenseConditions { terms_pending: true, ..Default::default() };
    w.licence("2", 500, Some(pending)).await;
    w.supply(1000).await;
    let big = w.place("big", 150).await;
    let big = w.reaches(&big.order_id, OrderState::AwaitingLicense).await.expect("the big order waits");
    assert!(big.reasons.iter().any(|r| r.condition() == lpb::Condition::Quota && r.permanent), "{:?}", big.reasons);
    let small = w.place("small", 10).await;
    let served = w.reaches(&small.order_id, OrderState::Reserved).await;
    let got = w.order(&small.order_id).await;
    let used = w.licence_used(&first).await;
    w.cluster.stop().await;
    let held = if matches!(got.state(), OrderState::Backordered | OrderState::Reserved) { got.units } else { 0 };
    assert_eq!(
        used,
        held,
        "licence {first} has {used} units in use, its orders hold {held} (small order {:?}: {:?})",
        got.state(),
        got.reasons
    );
    assert!(
        served.is_some(),
        "the small order fits licence {first} and is not behind an order waiting for quota that may come back: {:?} {:?}",
        got.state(),
        got.reasons
    );
}

/// Found by the checker (seeds 0x5, 0x7): the same ShipOrder sent twice at once can answer INTERNAL
/// ("stock of …: can't ship 70 units: only 0 there"). Inventory's ShipReservation reads the hold, then
/// the stock, inside one optimistic attempt; when the other copy commits in between, the attempt sees
/// the hold still CONFIRMED but the stock already shipped, and the stock's refusal comes back as an
/// internal error instead of the attempt being read again (which would replay the shipment). Inventory
/// now reads the hold and the stock as a consistent pair (ConfirmReservation too, same pattern).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_shipment_sent_at_once_never_answers_internal() {
    let mut w = World::start().await;
    w.licensed(1000).await;
    w.supply(1000).await;
    let vendor = OrderServiceClient::new(Cluster::authed(
        &w.cluster.orders.as_ref().expect("orders in process").url(),
        &w.cluster.token(Role::Vendor),
    ));
    let mut internal = Vec::new();
    for i in 0..60 {
        let o = w.place(&format!("o{i}"), 10).await;
        w.reaches(&o.order_id, OrderState::Reserved).await.expect("reserved");
        w.buyer
            .confirm_order(opb::ConfirmOrderRequest {
                request_id: format!("confirm-{i}"),
                order_id: o.order_id.clone(),
            })
            .await
            .unwrap();
        let ship = opb::ShipOrderRequest { request_id: format!("ship-{i}"), order_id: o.order_id.clone() };
        let calls: Vec<_> = (0..4)
            .map(|_| {
                let (mut c, r) = (vendor.clone(), ship.clone());
                tokio::spawn(async move { c.ship_order(r).await })
            })
            .collect();
        for call in calls {
            if let Err(s) = call.await.expect("the call's task") {
                internal.push(format!("{}: {:?} {}", o.order_id, s.code(), s.message()));
            }
        }
    }
    w.cluster.stop().await;
    assert!(internal.is_empty(), "{} of 240 shipments answered an error: {internal:?}", internal.len());
}
