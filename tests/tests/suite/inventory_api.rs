//! Inventory over the wire: every RPC through a real gRPC connection, with rich error details.

use chipgate_proto::inventory::v1 as pb;
use chipgate_testkit::Cluster;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_types::StatusExt;

const SKU: &str = "H200-NVL-141GB";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_inventory_rpc_answers_over_grpc() {
    let cluster = Cluster::start().await;
    let mut c = cluster.inventory_client();

    let products = c
        .list_products(pb::ListProductsRequest { page_size: 2, page_token: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(products.products.len(), 2);
    let more = c
        .list_products(pb::ListProductsRequest { page_size: 10, page_token: products.next_page_token })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(more.products.len(), 3);
    c.upsert_product(pb::UpsertProductRequest {
        request_id: "up-1".into(),
        product: Some(pb::Product {
            sku: "KUNLUN-P800".into(),
            name: "Kunlunxin P800".into(),
            product_class: pb::ProductClass::DomesticAccelerator as i32,
            relative_performance: 0.8,
            vendor: "kunlunxin".into(),
            update_time: None,
        }),
    })
    .await
    .unwrap();
    assert_eq!(
        c.get_product(pb::GetProductRequest { sku: "KUNLUN-P800".into() })
            .await
            .unwrap()
            .into_inner()
            .product
            .unwrap()
            .vendor,
        "kunlunxin"
    );

    let mut watch = c.watch_stock(pb::WatchStockRequest { product_sku: SKU.into() }).await.unwrap().into_inner();
    assert_eq!(watch.next().await.unwrap().unwrap().cause, "snapshot");

    c.receive_supply(pb::ReceiveSupplyRequest {
        request_id: "rs-1".into(),
        receipt_id: "rcpt-1".into(),
        product_sku: SKU.into(),
        units: 100,
        source: "air".into(),
    })
    .await
    .unwrap();
    let seen = tokio::time::timeout(std::time::Duration::from_secs(5), watch.next()).await.unwrap().unwrap().unwrap();
    assert_eq!((seen.cause.as_str(), seen.stock.unwrap().available), ("supply.received", 100));

    let one = |order: &str, units: u64| pb::BatchReserveRequest {
        request_id: String::new(),
        product_sku: SKU.into(),
        items: vec![pb::ReserveItem {
            order_id: order.into(),
            generation: 1,
            units,
            allow_partial: false,
            hold_seconds: 600,
            known_held: None,
        }],
        fence_token: 0,
    };
    let held = c.batch_reserve(one("ord-1", 40)).await.unwrap().into_inner().results.remove(0).reservation.unwrap();
    assert_eq!(held.state(), pb::ReservationState::Held);
    let batch = c
        .batch_reserve(pb::BatchReserveRequest {
            request_id: String::new(),
            product_sku: SKU.into(),
            items: vec![
                pb::ReserveItem {
                    order_id: "ord-2".into(),
                    generation: 1,
                    units: 50,
                    allow_partial: false,
                    hold_seconds: 0,
                    known_held: None,
                },
                pb::ReserveItem {
                    order_id: "ord-3".into(),
                    generation: 1,
                    units: 50,
                    allow_partial: true,
                    hold_seconds: 0,
                    known_held: None,
                },
            ],
            fence_token: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(batch.results[0].outcome(), pb::ReserveOutcome::Held);
    assert_eq!(batch.results[1].outcome(), pb::ReserveOutcome::Partial);
    assert_eq!(batch.stock.unwrap().available, 0);
    c.confirm_reservation(pb::ConfirmReservationRequest {
        request_id: "cf-1".into(),
        order_id: "ord-1".into(),
        generation: 1,
        product_sku: SKU.into(),
    })
    .await
    .unwrap();
    c.ship_reservation(pb::ShipReservationRequest {
        request_id: "sh-1".into(),
        order_id: "ord-1".into(),
        generation: 1,
        product_sku: SKU.into(),
    })
    .await
    .unwrap();
    c.batch_release_reservations(pb::BatchReleaseReservationsRequest {
        request_id: String::new(),
        items: vec![
            pb::ReleaseItem { order_id: "ord-2".into(), generation: 1, product_sku: SKU.into() },
            pb::ReleaseItem { order_id: "ord-3".into(), generation: 1, product_sku: SKU.into() },
        ],
        reason: "cancelled".into(),
        unless_confirmed: false,
    })
    .await
    .unwrap();
    let r = c
        .get_reservation(pb::GetReservationRequest { order_id: "ord-1".into(), product_sku: SKU.into() })
        .await
        .unwrap()
        .into_inner()
        .reservation
        .unwrap();
    assert_eq!(r.state(), pb::ReservationState::Shipped);
    let all = c
        .list_reservations(pb::ListReservationsRequest { product_sku: SKU.into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.reservations.len(), 3);
    let s = c.get_stock(pb::GetStockRequest { product_sku: SKU.into() }).await.unwrap().into_inner().stock.unwrap();
    assert_eq!((s.available, s.held, s.committed, s.shipped, s.received), (60, 0, 0, 40, 100));
    let listed = c.list_stock(pb::ListStockRequest {}).await.unwrap().into_inner();
    assert_eq!(listed.stock.len(), 6);

    // Out of stock: nothing held, and the answer shows what is left.
    let short = c.batch_reserve(one("ord-9", 61)).await.unwrap().into_inner();
    assert_eq!(short.results[0].outcome(), pb::ReserveOutcome::NotServed);
    assert_eq!(short.stock.unwrap().available, 60);
    // Bad input over the wire keeps its BadRequest.
    let bad = c.batch_reserve(one("ord-9", 0)).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert_eq!(bad.get_error_details().bad_request().unwrap().field_violations[0].field, "items[0].units");
}
