//! Who may call what, held against every RPC the services expose: the RPCs come from the descriptor
//! set (so a new RPC without a rule fails here), each is called by every role, by another buyer, and
//! with no token, an expired token and a token signed by another key, over real gRPC to a cluster with
//! authentication on. Only UNAUTHENTICATED and PERMISSION_DENIED count as a refusal; an allowed call
//! may still fail for other reasons (INVALID_ARGUMENT for an empty request, NOT_FOUND, ...).

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use chipgate_proto::licensing::v1 as lpb;
use chipgate_proto::licensing::v1::licensing_service_client::LicensingServiceClient;
use chipgate_proto::orders::v1 as opb;
use chipgate_proto::orders::v1::order_service_client::OrderServiceClient;
use chipgate_runtime::auth::{Claims, Role, Signer};
use chipgate_runtime::policy::{self, BuyerAccess};
use chipgate_testkit::{BackendKind, Cluster, ClusterOptions};
use prost::Message;
use tonic::Code;

const H200: &str = "H200-SXM-141GB";
const ALPHA: &str = "alpha-ai";
const BETA: &str = "beta-ai";

/// Calls `path` with `body`; Ok(()) when answered (any non-auth outcome), Err(status) otherwise.
async fn call(url: &str, path: &str, streaming: bool, body: Bytes, token: Option<&str>) -> Result<(), tonic::Status> {
    match chipgate_testkit::raw::call(url, path, streaming, body, token).await {
        Err(s) if matches!(s.code(), Code::Unauthenticated | Code::PermissionDenied) => Err(s),
        _ => Ok(()),
    }
}

/// A protobuf message with the given top-level string fields.
fn message(fields: &[(u32, &str)]) -> Bytes {
    let mut out = Vec::new();
    for (n, v) in fields {
        prost::encoding::string::encode(*n, &v.to_string(), &mut out);
    }
    Bytes::from(out)
}

/// Every RPC of the three services: `(path, service url key, server streaming)`.
fn every_rpc() -> Vec<(String, &'static str, bool)> {
    let set = prost_types::FileDescriptorSet::decode(chipgate_proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut out = Vec::new();
    for file in &set.file {
        for svc in &file.service {
            let full = format!("{}.{}", file.package(), svc.name());
            let which = match full.as_str() {
                "chipgate.licensing.v1.LicensingService" => "licensing",
                "chipgate.inventory.v1.InventoryService" => "inventory",
                "chipgate.orders.v1.OrderService" => "orders",
                _ => continue,
            };
            for m in &svc.method {
                out.push((format!("/{full}/{}", m.name()), which, m.server_streaming()));
            }
        }
    }
    out
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Caller {
    Role(Role),
    OtherBuyer,
    NoToken,
    Expired,
    BadSignature,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_by_every_caller_is_allowed_or_refused_as_the_table_says() {
    let cluster =
        Cluster::start_with(ClusterOptions { backend: BackendKind::Memory, auth: true, ..Default::default() }).await;
    let signer = cluster.signer.clone().unwrap();
    let orders_url = cluster.orders.as_ref().unwrap().url();
    let urls: BTreeMap<&str, String> = [
        ("licensing", cluster.licensing.url()),
        ("inventory", cluster.inventory.url()),
        ("orders", orders_url.clone()),
    ]
    .into();

    // Alpha's application, licence and order (made with the roles that may make them).
    let alpha = cluster.buyer_token(ALPHA);
    let ia = cluster.token(Role::ImportAuthority);
    let mut lic_alpha = LicensingServiceClient::new(Cluster::authed(&cluster.licensing.url(), &alpha));
    let mut lic_ia = LicensingServiceClient::new(Cluster::authed(&cluster.licensing.url(), &ia));
    let app = lic_alpha
        .submit_application(lpb::SubmitApplicationRequest {
            request_id: "app-1".into(),
            buyer_id: ALPHA.into(),
            product_sku: H200.into(),
            quantity: 100,
            end_use: "training".into(),
            site: "DC".into(),
            destination: "CN".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .application
        .unwrap()
        .application_id;
    let wave = lic_ia
        .create_wave(lpb::CreateWaveRequest { request_id: "wave-1".into(), display_name: "w".into() })
        .await
        .unwrap()
        .into_inner()
        .wave
        .unwrap()
        .wave_id;
    lic_ia
        .add_wave_grant(lpb::AddWaveGrantRequest {
            request_id: "grant-1".into(),
            wave_id: wave.clone(),
            application_id: app.clone(),
            granted_units: 50,
            conditions: Some(lpb::LicenseConditions::default()),
        })
        .await
        .unwrap();
    let published = lic_ia
        .publish_wave(lpb::PublishWaveRequest { request_id: "pub-1".into(), wave_id: wave })
        .await
        .unwrap()
        .into_inner();
    let licence = published.licenses[0].license_id.clone();
    // A second application, still queued, for WithdrawApplication.
    let queued = lic_alpha
        .submit_application(lpb::SubmitApplicationRequest {
            request_id: "app-2".into(),
            buyer_id: ALPHA.into(),
            product_sku: "H20-96GB".into(),
            quantity: 10,
            end_use: "inference".into(),
            site: "DC".into(),
            destination: "CN".into(),
        })
        .await;
    let queued = queued.map(|r| r.into_inner().application.unwrap().application_id).unwrap_or_else(|_| app.clone());
    let mut ord_alpha = OrderServiceClient::new(Cluster::authed(&orders_url, &alpha));
    let order = ord_alpha
        .place_order(opb::PlaceOrderRequest {
            request_id: "ord-1".into(),
            buyer_id: ALPHA.into(),
            product_sku: H200.into(),
            units: 5,
            justification: "training".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap()
        .order_id;
    let secret_ids = [app.clone(), queued.clone(), licence.clone(), order.clone(), ALPHA.to_string()];

    // The callers.
    let other_key = Signer::generate().unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let expired = signer.sign(&Claims {
        sub: "auditor".into(),
        role: "auditor".into(),
        buyer_id: None,
        aud: "chipgate".into(),
        iat: now - 7200,
        exp: now - 3600,
        nbf: None,
    });
    let mut callers: Vec<(Caller, Option<String>)> = Role::ALL
        .into_iter()
        .map(|r| {
            let t = if r == Role::Buyer { alpha.clone() } else { signer.mint_role(r, Duration::from_secs(600)) };
            (Caller::Role(r), Some(t))
        })
        .collect();
    callers.push((Caller::OtherBuyer, Some(signer.mint_buyer(BETA, Duration::from_secs(600)))));
    callers.push((Caller::NoToken, None));
    callers.push((Caller::Expired, Some(expired)));
    callers.push((Caller::BadSignature, Some(other_key.mint_role(Role::ImportAuthority, Duration::from_secs(600)))));

    let rpcs = every_rpc();
    assert!(rpcs.len() >= 57, "the descriptor set lists the RPCs: {}", rpcs.len());
    let mut unexpected_allows = Vec::new();
    let mut unexpected_denies = Vec::new();
    let mut leaks = Vec::new();
    let mut calls = 0;
    for (path, which, streaming) in &rpcs {
        let rule = policy::rule(path).unwrap_or_else(|| panic!("{path} has no rule in the policy table"));
        // Requests name alpha or alpha's resources wherever the rule looks at them.
        let body = match rule.buyer {
            BuyerAccess::Field(n) => message(&[(n, ALPHA)]),
            BuyerAccess::Owner(n) => {
                let id = if path.contains("Application") {
                    if path.ends_with("WithdrawApplication") { &queued } else { &app }
                } else if path.contains("License") {
                    &licence
                } else {
                    &order
                };
                let rid = format!("rid-{}", path.rsplit('/').next().unwrap_or_default());
                if n == 1 { message(&[(1, id)]) } else { message(&[(1, &rid), (n, id)]) }
            }
            BuyerAccess::Open | BuyerAccess::Denied => message(&[]),
        };
        for (caller, token) in &callers {
            let expected = match caller {
                Caller::Role(Role::Buyer) => rule.buyer != BuyerAccess::Denied,
                Caller::Role(r) => rule.roles.contains(r),
                Caller::OtherBuyer => rule.buyer == BuyerAccess::Open,
                Caller::NoToken | Caller::Expired | Caller::BadSignature => false,
            };
            calls += 1;
            let got = call(&urls[which], path, *streaming, body.clone(), token.as_deref()).await;
            match (&got, expected) {
                (Ok(()), false) => unexpected_allows.push(format!("{path} by {caller:?}")),
                (Err(s), true) => unexpected_denies.push(format!("{path} by {caller:?}: {s:?}")),
                (Err(s), false) => {
                    let want = match caller {
                        Caller::NoToken | Caller::Expired | Caller::BadSignature => Code::Unauthenticated,
                        _ => Code::PermissionDenied,
                    };
                    assert_eq!(s.code(), want, "{path} by {caller:?}: {s:?}");
                    let text = format!("{} {:?}", s.message(), String::from_utf8_lossy(s.details()));
                    if secret_ids.iter().any(|id| text.contains(id.as_str())) {
                        leaks.push(format!("{path} by {caller:?}: {text}"));
                    }
                }
                (Ok(()), true) => {}
            }
        }
    }
    eprintln!("authorisation matrix: {} RPCs x {} callers = {calls} calls", rpcs.len(), callers.len());
    assert!(unexpected_allows.is_empty(), "unexpected allows:\n{}", unexpected_allows.join("\n"));
    assert!(unexpected_denies.is_empty(), "unexpected refusals:\n{}", unexpected_denies.join("\n"));
    assert!(leaks.is_empty(), "refusals that name the data:\n{}", leaks.join("\n"));

    // A buyer can't tell another buyer's resource from one that doesn't exist: both refusals are the
    // same. (Roles that may see everything still get NOT_FOUND.)
    let beta = signer.mint_buyer(BETA, Duration::from_secs(600));
    let mut owner_rpcs = 0;
    for (path, which, streaming) in &rpcs {
        let Some(BuyerAccess::Owner(n)) = policy::rule(path).map(|r| r.buyer) else { continue };
        owner_rpcs += 1;
        let ask = |id: &str| {
            let rid = format!("probe-{}-{id}", path.rsplit('/').next().unwrap_or_default());
            if n == 1 { message(&[(1, id)]) } else { message(&[(1, &rid), (n, id)]) }
        };
        let real = if path.contains("Application") {
            if path.ends_with("WithdrawApplication") { &queued } else { &app }
        } else if path.contains("License") {
            &licence
        } else {
            &order
        };
        let theirs =
            chipgate_testkit::raw::call(&urls[which], path, *streaming, ask(real), Some(&beta)).await.unwrap_err();
        let absent = chipgate_testkit::raw::call(&urls[which], path, *streaming, ask("no-such-id-42"), Some(&beta))
            .await
            .unwrap_err();
        assert_eq!(
            (theirs.code(), theirs.message()),
            (absent.code(), absent.message()),
            "{path}: another buyer's and a missing resource must look alike"
        );
        assert_eq!(absent.code(), Code::PermissionDenied, "{path}");
    }
    assert!(owner_rpcs >= 5, "the table has owner-checked RPCs: {owner_rpcs}");
    let mut ord_ia = OrderServiceClient::new(Cluster::authed(&orders_url, &ia));
    let missing = ord_ia.get_order(opb::GetOrderRequest { order_id: "no-such-id-42".into() }).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "roles that see everything still learn what doesn't exist");

    // Health and reflection stay open without a token.
    let mut health = tonic_health::pb::health_client::HealthClient::new(chipgate_testkit::channel(&orders_url));
    health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_belong_to_their_caller() {
    let cluster =
        Cluster::start_with(ClusterOptions { backend: BackendKind::Memory, auth: true, ..Default::default() }).await;
    let orders_url = cluster.orders.as_ref().unwrap().url();
    let place = |buyer: &'static str, units: u64| opb::PlaceOrderRequest {
        request_id: "order-1".into(),
        buyer_id: buyer.into(),
        product_sku: H200.into(),
        units,
        justification: "training".into(),
    };
    let mut alpha = OrderServiceClient::new(Cluster::authed(&orders_url, &cluster.buyer_token(ALPHA)));
    let mut beta = OrderServiceClient::new(Cluster::authed(&orders_url, &cluster.buyer_token(BETA)));
    let a = alpha.place_order(place(ALPHA, 5)).await.unwrap().into_inner().order.unwrap();
    // Beta picks the same request id (with another body): a call of its own, not a clash with alpha's.
    let b = beta.place_order(place(BETA, 7)).await.unwrap().into_inner().order.unwrap();
    assert_ne!(a.order_id, b.order_id);
    assert_eq!((a.buyer_id.as_str(), b.buyer_id.as_str()), (ALPHA, BETA));
    // Each retry replays its own caller's answer.
    let a2 = alpha.place_order(place(ALPHA, 5)).await.unwrap().into_inner().order.unwrap();
    let b2 = beta.place_order(place(BETA, 7)).await.unwrap().into_inner().order.unwrap();
    assert_eq!((a2.order_id, b2.order_id), (a.order_id, b.order_id));
    // And a caller still can't reuse its own id for a different request.
    let clash = alpha.place_order(place(ALPHA, 6)).await.unwrap_err();
    assert_eq!(clash.code(), Code::InvalidArgument);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buyer_follows_one_of_its_orders_and_only_its_own() {
    let cluster =
        Cluster::start_with(ClusterOptions { backend: BackendKind::Memory, auth: true, ..Default::default() }).await;
    let orders_url = cluster.orders.as_ref().unwrap().url();
    let mut alpha = OrderServiceClient::new(Cluster::authed(&orders_url, &cluster.buyer_token(ALPHA)));
    let mut beta = OrderServiceClient::new(Cluster::authed(&orders_url, &cluster.buyer_token(BETA)));
    let order = alpha
        .place_order(opb::PlaceOrderRequest {
            request_id: "w-1".into(),
            buyer_id: ALPHA.into(),
            product_sku: H200.into(),
            units: 3,
            justification: "training".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap()
        .order_id;
    let watch = |buyer: &str, order: &str| opb::WatchOrdersRequest { buyer_id: buyer.into(), order_id: order.into() };
    // By order id alone a buyer's token names no buyer: refused.
    let refused = alpha.watch_orders(watch("", &order)).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    // Beta naming alpha: refused; beta naming itself and alpha's order: sees nothing of it.
    assert_eq!(beta.watch_orders(watch(ALPHA, &order)).await.unwrap_err().code(), Code::PermissionDenied);
    let mut beta_stream = beta.watch_orders(watch(BETA, &order)).await.unwrap().into_inner();
    // Alpha with its own buyer id and the order: sees the order's next transition.
    let mut stream = alpha.watch_orders(watch(ALPHA, &order)).await.unwrap().into_inner();
    alpha
        .cancel_order(opb::CancelOrderRequest { request_id: "w-2".into(), order_id: order.clone(), reason: "x".into() })
        .await
        .unwrap();
    loop {
        let seen = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.unwrap().unwrap().unwrap();
        assert_eq!(seen.order_id, order);
        if seen.transition.unwrap().to_state() == opb::OrderState::Cancelled {
            break;
        }
    }
    let leaked = tokio::time::timeout(Duration::from_millis(500), beta_stream.message()).await;
    assert!(leaked.is_err(), "beta saw alpha's transition: {leaked:?}");
    cluster.stop().await;
}

/// Tokens are checked for more than a signature: `nbf`, a lifetime longer than the role's maximum,
/// and a key signing a role it is not given are all refused, with the public keys read from a PEM
/// bundle as an operator mounts it (the `roles:` lines before blocks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_refused_for_nbf_lifetime_and_a_key_signing_another_role() {
    let service_key = Signer::generate().unwrap();
    let people_key = Signer::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("public.pem");
    std::fs::write(
        &bundle,
        format!(
            "# orders' own key: service tokens only\nroles: service\n{}# the operators' key\n{}",
            service_key.public_pem(),
            people_key.public_pem()
        ),
    )
    .unwrap();
    let verifier = chipgate_runtime::auth::Verifier::from_file(&bundle).unwrap();
    let mut options =
        ClusterOptions { backend: BackendKind::Memory, auth: false, orders_in_process: false, ..Default::default() };
    options.server.auth = Some(std::sync::Arc::new(verifier));
    let cluster = Cluster::start_with(options).await;
    let url = cluster.licensing.url();
    let queue = |token: String| {
        let url = url.clone();
        async move {
            LicensingServiceClient::new(Cluster::authed(&url, &token))
                .list_queue(lpb::ListQueueRequest::default())
                .await
        }
    };
    let reason = |s: &tonic::Status| {
        use tonic_types::StatusExt;
        s.get_error_details().error_info().map(|i| i.reason.clone()).unwrap_or_default()
    };
    let ttl = Duration::from_secs(600);
    queue(people_key.mint_role(Role::ImportAuthority, ttl)).await.expect("the operators' key signs the authority");
    // Orders' key can't mint an import authority, nor a buyer; it still signs service tokens.
    for forged in [service_key.mint_role(Role::ImportAuthority, ttl), service_key.mint_buyer(ALPHA, ttl)] {
        let s = queue(forged).await.unwrap_err();
        assert_eq!((s.code(), reason(&s).as_str()), (Code::Unauthenticated, "TOKEN_INVALID"), "{s:?}");
    }
    let service = service_key.mint_role(Role::Service, ttl);
    let got = LicensingServiceClient::new(Cluster::authed(&url, &service))
        .confirm_quota(lpb::ConfirmQuotaRequest {
            request_id: "cq-1".into(),
            order_id: "ord-1".into(),
            generation: 1,
            product_sku: "H200-SXM-141GB".into(),
        })
        .await;
    assert!(!matches!(got.map_err(|s| s.code()), Err(Code::Unauthenticated | Code::PermissionDenied)));

    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let claims = |iat: u64, exp: u64, nbf: Option<u64>| Claims {
        sub: "import_authority".into(),
        role: "import_authority".into(),
        buyer_id: None,
        aud: "chipgate".into(),
        iat,
        exp,
        nbf,
    };
    let s = queue(people_key.sign(&claims(now, now + 600, Some(now + 300)))).await.unwrap_err();
    assert_eq!((s.code(), reason(&s).as_str()), (Code::Unauthenticated, "TOKEN_NOT_YET_VALID"));
    queue(people_key.sign(&claims(now, now + 600, Some(now)))).await.expect("nbf now is fine");
    // A year-long authority token: longer than the role's maximum (7 days by default).
    let s = queue(people_key.sign(&claims(now, now + 365 * 24 * 3600, None))).await.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    // (A `crit` header: refused by the verifier, see auth.rs's unit tests.)
    cluster.stop().await;
}

/// A buyer watching stock sees the figures, but not which orders moved them; the vendor does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buyer_watching_stock_sees_no_other_buyers_orders() {
    use chipgate_proto::inventory::v1 as ipb;
    use chipgate_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
    let cluster =
        Cluster::start_with(ClusterOptions { backend: BackendKind::Memory, auth: true, ..Default::default() }).await;
    let url = cluster.inventory.url();
    let watch = |token: String| {
        let url = url.clone();
        async move {
            let mut w = InventoryServiceClient::new(Cluster::authed(&url, &token))
                .watch_stock(ipb::WatchStockRequest { product_sku: H200.into() })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(w.message().await.unwrap().unwrap().cause, "snapshot");
            w
        }
    };
    let mut buyer = watch(cluster.buyer_token(BETA)).await;
    let mut vendor = watch(cluster.token(Role::Vendor)).await;
    let vendor_token = cluster.token(Role::Vendor);
    InventoryServiceClient::new(Cluster::authed(&url, &vendor_token))
        .receive_supply(ipb::ReceiveSupplyRequest {
            request_id: "rs-1".into(),
            receipt_id: "rcpt-1".into(),
            product_sku: H200.into(),
            units: 100,
            source: "air".into(),
        })
        .await
        .unwrap();
    // Alpha's order takes 40 units (the orders service's call).
    let service = cluster.token(Role::Service);
    InventoryServiceClient::new(Cluster::authed(&url, &service))
        .batch_reserve(ipb::BatchReserveRequest {
            request_id: "rv-1".into(),
            product_sku: H200.into(),
            items: vec![ipb::ReserveItem {
                order_id: "ord-alpha-77".into(),
                generation: 1,
                units: 40,
                allow_partial: false,
                hold_seconds: 600,
                known_held: None,
                max_units: None,
            }],
            fence_token: 0,
        })
        .await
        .unwrap();
    async fn next_hold(w: &mut tonic::Streaming<ipb::WatchStockResponse>) -> ipb::WatchStockResponse {
        loop {
            let c = tokio::time::timeout(Duration::from_secs(10), w.message()).await.unwrap().unwrap().unwrap();
            if c.cause == "holds.placed" {
                return c;
            }
        }
    }
    let held = next_hold(&mut buyer).await;
    assert_eq!(held.reference, "", "a buyer learns nothing of whose order it was");
    assert_eq!(held.stock.unwrap().held, 40, "the figures are public");
    let vendor_view = next_hold(&mut vendor).await;
    assert_eq!(vendor_view.reference, "ord-alpha-77", "the vendor sees the order");
    cluster.stop().await;
}

/// Request ids belong to the buyer's account, with authentication and without: two buyers picking
/// the same id get independent calls, each retry replays its own answer, and (with authentication)
/// a retry with another of the buyer's tokens is still the buyer's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_mean_the_same_with_and_without_authentication() {
    for auth in [true, false] {
        let cluster =
            Cluster::start_with(ClusterOptions { backend: BackendKind::Memory, auth, ..Default::default() }).await;
        let place = |buyer: &'static str, units: u64| opb::PlaceOrderRequest {
            request_id: "order-1".into(),
            buyer_id: buyer.into(),
            product_sku: H200.into(),
            units,
            justification: "training".into(),
        };
        let mut ord = cluster.orders_client();
        let a = ord.place_order(place(ALPHA, 5)).await.unwrap().into_inner().order.unwrap();
        let b = ord
            .place_order(place(BETA, 7))
            .await
            .unwrap_or_else(|s| panic!("auth {auth}: {s:?}"))
            .into_inner()
            .order
            .unwrap();
        assert_ne!(a.order_id, b.order_id, "auth {auth}");
        let a2 = ord.place_order(place(ALPHA, 5)).await.unwrap().into_inner().order.unwrap();
        let b2 = ord.place_order(place(BETA, 7)).await.unwrap().into_inner().order.unwrap();
        assert_eq!((&a2.order_id, &b2.order_id), (&a.order_id, &b.order_id), "auth {auth}: retries replay");
        let clash = ord.place_order(place(ALPHA, 6)).await.unwrap_err();
        assert_eq!(clash.code(), Code::InvalidArgument, "auth {auth}");
        if auth {
            // Another token of alpha's (another subject, e.g. its CI's): the same account.
            let token =
                cluster.signer.as_ref().unwrap().mint("alpha-ci", Role::Buyer, Some(ALPHA), Duration::from_secs(600));
            let orders_url = cluster.orders.as_ref().unwrap().url();
            let again = OrderServiceClient::new(Cluster::authed(&orders_url, &token))
                .place_order(place(ALPHA, 5))
                .await
                .unwrap()
                .into_inner()
                .order
                .unwrap();
            assert_eq!(again.order_id, a.order_id, "the buyer's retry with its other token replays");
        }
        cluster.stop().await;
    }
}
