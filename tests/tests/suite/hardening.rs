//! The gRPC edge under hostile input: oversized messages, deeply nested and malformed protobuf,
//! invalid fields, one caller trying to take all the capacity, and a stream of forged tokens. Each is
//! refused cleanly (a status, never a crash or a hang) and the service keeps serving everybody else.
//! (Long-lived streams and reset floods: `streams.rs`.)

use std::time::Duration;

use bytes::Bytes;
use chipgate_proto::inventory::v1 as ipb;
use chipgate_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use chipgate_proto::licensing::v1 as lpb;
use chipgate_proto::licensing::v1::licensing_service_client::LicensingServiceClient;
use chipgate_runtime::auth::Role;
use chipgate_runtime::server::ServerConfig;
use chipgate_testkit::raw;
use chipgate_testkit::{BackendKind, Cluster, ClusterOptions};
use tonic::Code;
use tonic_types::StatusExt;

const SUBMIT: &str = "/chipgate.licensing.v1.LicensingService/SubmitApplication";

fn small_cluster() -> ClusterOptions {
    ClusterOptions {
        backend: BackendKind::Memory,
        server: ServerConfig {
            max_message_bytes: 16 * 1024,
            health_interval: Duration::from_millis(100),
            ..ServerConfig::default()
        },
        ..ClusterOptions::default()
    }
}

async fn still_serves(cluster: &Cluster) {
    let url = cluster.licensing.url();
    LicensingServiceClient::new(Cluster::authed(&url, &cluster.token(Role::ImportAuthority)))
        .list_queue(lpb::ListQueueRequest::default())
        .await
        .expect("the service still answers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_nested_and_malformed_requests_are_refused_cleanly() {
    let cluster = Cluster::start_with(small_cluster()).await;
    let url = cluster.licensing.url();
    let buyer = cluster.buyer_token("bytedance");
    let mut lic = LicensingServiceClient::new(Cluster::authed(&url, &buyer));

    // Oversized: a 64 KiB field against a 16 KiB limit.
    let big = lpb::SubmitApplicationRequest {
        request_id: "big-1".into(),
        buyer_id: "bytedance".into(),
        product_sku: "H200-SXM-141GB".into(),
        quantity: 1,
        end_use: "x".repeat(64 * 1024),
        site: "DC".into(),
        destination: "CN".into(),
    };
    let s = lic.submit_application(big).await.expect_err("an oversized message is refused");
    assert!(matches!(s.code(), Code::ResourceExhausted | Code::OutOfRange), "{s:?}");
    still_serves(&cluster).await;

    // Too deep: 200 nested groups in an unknown field (prost stops at its recursion limit).
    let mut deep = Vec::new();
    deep.extend(std::iter::repeat_n(0x7bu8, 200)); // field 15, start group
    deep.extend(std::iter::repeat_n(0x7cu8, 200)); // field 15, end group
    let s = raw::call(&url, SUBMIT, false, Bytes::from(deep), Some(&buyer)).await.expect_err("too deep");
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    still_serves(&cluster).await;

    // Malformed protobuf: a truncated length, invalid UTF-8 in a string, a wrong wire type.
    for (what, bytes) in [
        ("truncated", vec![0x12, 0x40, b'a']),
        ("invalid utf-8", vec![0x12, 0x02, 0xff, 0xfe]),
        ("wrong wire type", vec![0x15, 1, 2, 3, 4]),
    ] {
        let s = raw::call(&url, SUBMIT, false, Bytes::from(bytes), Some(&buyer)).await.expect_err(what);
        assert_eq!(s.code(), Code::InvalidArgument, "{what}: {s:?}");
        let bad = s.get_error_details().bad_request().cloned().expect("BadRequest details");
        assert_eq!(bad.field_violations[0].field, "request", "{what}");
        still_serves(&cluster).await;
    }

    // Well-formed but invalid fields: INVALID_ARGUMENT with a BadRequest naming each field.
    let s = lic
        .submit_application(lpb::SubmitApplicationRequest {
            request_id: String::new(),
            buyer_id: "bytedance".into(),
            product_sku: "bad sku with spaces\u{0}".into(),
            quantity: 0,
            end_use: String::new(),
            site: String::new(),
            destination: "CN".into(),
        })
        .await
        .expect_err("invalid fields");
    assert_eq!(s.code(), Code::InvalidArgument);
    let bad = s.get_error_details().bad_request().cloned().expect("BadRequest details");
    let fields: Vec<&str> = bad.field_violations.iter().map(|v| v.field.as_str()).collect();
    assert!(fields.contains(&"product_sku") && fields.contains(&"quantity"), "{fields:?}");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_caller_over_its_rate_is_slowed_with_retry_info_and_others_are_not() {
    let mut options = small_cluster();
    options.auth = true;
    options.server.rate_limit_per_second = 2.0;
    options.server.rate_limit_burst = 5;
    let cluster = Cluster::start_with(options).await;
    let url = cluster.inventory.url();
    let greedy = cluster.buyer_token("greedy");
    let mut c = InventoryServiceClient::new(Cluster::authed(&url, &greedy));
    let mut limited = None;
    for _ in 0..20 {
        match c.list_products(ipb::ListProductsRequest::default()).await {
            Ok(_) => {}
            Err(s) => {
                limited = Some(s);
                break;
            }
        }
    }
    let s = limited.expect("the greedy caller is limited within 20 calls");
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    let retry = s.get_error_details().retry_info().cloned().expect("RetryInfo");
    assert!(retry.retry_delay.is_some_and(|d| d <= Duration::from_secs(1)), "{retry:?}");

    // Another caller is not affected, and the greedy one gets through again after the delay.
    let vendor = cluster.token(Role::Vendor);
    InventoryServiceClient::new(Cluster::authed(&url, &vendor))
        .list_products(ipb::ListProductsRequest::default())
        .await
        .expect("another caller is served");
    tokio::time::sleep(Duration::from_millis(600)).await;
    c.list_products(ipb::ListProductsRequest::default()).await.expect("served again after the delay");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_tokens_cost_a_bounded_number_of_signature_checks_per_address() {
    let cluster = Cluster::start_with(small_cluster()).await;
    let url = cluster.inventory.url();
    let edge = cluster.inventory.running.edge.clone();
    let checks = || edge.signature_checks.load(std::sync::atomic::Ordering::Relaxed);
    // A caller whose token was verified before the flood.
    let vendor = cluster.token(Role::Vendor);
    let mut known = InventoryServiceClient::new(Cluster::authed(&url, &vendor));
    known.list_products(ipb::ListProductsRequest::default()).await.expect("the vendor is served");

    // 2,000 calls, each with a different token signed by a key the service doesn't know.
    let forger = chipgate_runtime::auth::Signer::generate().unwrap();
    let before = checks();
    let started = std::time::Instant::now();
    let (mut unauthenticated, mut exhausted, mut retry_info) = (0, 0, 0);
    for i in 0..2_000 {
        let forged = forger.mint(&format!("intruder-{i}"), Role::ImportAuthority, None, Duration::from_secs(600));
        let s = InventoryServiceClient::new(Cluster::authed(&url, &forged))
            .list_products(ipb::ListProductsRequest::default())
            .await
            .expect_err("a forged token is refused");
        match s.code() {
            Code::Unauthenticated => unauthenticated += 1,
            Code::ResourceExhausted => {
                exhausted += 1;
                retry_info += usize::from(s.get_error_details().retry_info().is_some_and(|r| r.retry_delay.is_some()));
            }
            other => panic!("unexpected {other:?}: {s:?}"),
        }
    }
    let spent = checks() - before;
    let elapsed = started.elapsed().as_secs_f64();
    eprintln!(
        "2000 forged tokens in {elapsed:.1}s: {spent} signature checks, {unauthenticated} UNAUTHENTICATED, {exhausted} \
         RESOURCE_EXHAUSTED"
    );
    // The budget: a burst of 20, then 1 a second.
    assert!((spent as f64) <= 20.0 + elapsed.ceil() + 1.0, "{spent} checks in {elapsed:.1}s");
    assert!(exhausted >= 1_900, "{exhausted} refused before any check");
    assert_eq!(retry_info, exhausted, "every such refusal says when to retry");
    // The vendor's remembered token still works from the same address, and another address has a
    // budget of its own.
    known.list_products(ipb::ListProductsRequest::default()).await.expect("a known token is still served");
    let elsewhere = tonic::transport::Endpoint::from_shared(url.clone())
        .unwrap()
        .local_address(Some("127.0.0.2".parse().unwrap()))
        .connect_lazy();
    let fresh = cluster.token(Role::Auditor);
    InventoryServiceClient::new(chipgate_runtime::auth::with_token(
        elsewhere,
        chipgate_runtime::auth::TokenSource::Static(fresh),
    ))
    .list_products(ipb::ListProductsRequest::default())
    .await
    .expect("another address is not affected");
    cluster.stop().await;
}
