//! Order placement: licensed buyers with stock available place orders from many concurrent clients.

use std::time::Duration;

use chipgate_proto::inventory::v1 as ipb;
use chipgate_proto::licensing::v1 as lpb;
use chipgate_proto::orders::v1 as opb;
use chipgate_proto::orders::v1::order_service_client::OrderServiceClient;
use chipgate_testkit::{BackendKind, Cluster, ClusterOptions};
use tonic::metadata::{Ascii, MetadataValue};

use crate::Args;
use crate::cpu::{CpuMeter, CpuUse};
use crate::load::{self, LoadResult};

/// Product SKUs of the catalogue the benchmarks spread orders over.
pub const SKUS: [&str; 3] = ["H200-SXM-141GB", "H200-NVL-141GB", "H20-96GB"];

/// The buyer names used.
pub fn buyer(i: usize) -> String {
    format!("buyer-{i:04}")
}

fn rid(tag: &str, n: usize) -> String {
    format!("bench-{tag}-{n}")
}

/// Export authorisations, one application per buyer and product, and (unless `grant` is None) one
/// published wave granting each application `grant` units with final terms. Returns the applications.
pub async fn license_everyone(cluster: &Cluster, buyers: usize, products: usize, grant: Option<u64>) -> Vec<String> {
    let products = products.clamp(1, SKUS.len());
    license(cluster, "main", buyers, &SKUS[..products], grant).await
}

/// [`license_everyone`] for the products `skus`, its request ids tagged `tag` (so that several
/// calls in one cluster are distinct requests).
pub async fn license(cluster: &Cluster, tag: &str, buyers: usize, skus: &[&str], grant: Option<u64>) -> Vec<String> {
    let mut lic = cluster.licensing_client();
    let mut n = 0;
    for sku in skus {
        n += 1;
        lic.grant_export_authorization(lpb::GrantExportAuthorizationRequest {
            request_id: rid(&format!("{tag}-exp"), n),
            vendor: "nvidia".into(),
            product_sku: sku.to_string(),
            destination: "CN".into(),
            reference: "bench".into(),
        })
        .await
        .expect("export");
    }
    let mut apps = Vec::new();
    for b in 0..buyers {
        for sku in skus {
            n += 1;
            let a = lic
                .submit_application(lpb::SubmitApplicationRequest {
                    request_id: rid(&format!("{tag}-app"), n),
                    buyer_id: buyer(b),
                    product_sku: sku.to_string(),
                    quantity: 1_000_000_000,
                    end_use: "benchmark".into(),
                    site: "loopback".into(),
                    destination: "CN".into(),
                })
                .await
                .expect("apply");
            apps.push(a.into_inner().application.expect("application").application_id);
        }
    }
    if let Some(units) = grant {
        let wave_id = draft(cluster, tag, &apps, units).await;
        publish_draft(cluster, tag, &wave_id).await;
    }
    apps
}

/// Publishes a drafted wave.
pub async fn publish_draft(cluster: &Cluster, tag: &str, wave_id: &str) {
    let mut lic = cluster.licensing_client();
    lic.publish_wave(lpb::PublishWaveRequest {
        request_id: format!("bench-{tag}-publish"),
        wave_id: wave_id.to_string(),
    })
    .await
    .expect("publish");
}

/// Drafts a wave granting every application `units` with final terms; returns its id.
pub async fn draft(cluster: &Cluster, tag: &str, apps: &[String], units: u64) -> String {
    let mut lic = cluster.licensing_client();
    let wave = lic
        .create_wave(lpb::CreateWaveRequest { request_id: format!("bench-{tag}-wave"), display_name: tag.into() })
        .await
        .expect("wave")
        .into_inner()
        .wave
        .expect("wave");
    for (i, a) in apps.iter().enumerate() {
        lic.add_wave_grant(lpb::AddWaveGrantRequest {
            request_id: rid(&format!("{tag}-grant"), i),
            wave_id: wave.wave_id.clone(),
            application_id: a.clone(),
            granted_units: units,
            conditions: None,
        })
        .await
        .expect("grant");
    }
    wave.wave_id
}

/// Books `units` of supply for a product.
pub async fn supply(cluster: &Cluster, sku: &str, units: u64, n: usize) {
    let mut inv = cluster.inventory_client();
    inv.receive_supply(ipb::ReceiveSupplyRequest {
        request_id: rid("rcv", n),
        receipt_id: rid("rcpt", n),
        product_sku: sku.into(),
        units,
        source: "bench".into(),
    })
    .await
    .expect("supply");
}

/// The placement request call `n` of load task `task` sends: buyers in turn (every buyer's orders
/// spread over the tasks), products in turn, one unit each.
pub fn request(task: usize, n: u64, buyers: usize, products: usize, in_flight: usize) -> opb::PlaceOrderRequest {
    let i = task + n as usize * in_flight;
    opb::PlaceOrderRequest {
        request_id: format!("place-{task}-{n}"),
        buyer_id: buyer(i % buyers),
        product_sku: SKUS[(i / buyers) % products].to_string(),
        units: 1,
        justification: "benchmark".into(),
    }
}

/// The `authorization` header of each of the first `buyers` buyers ([`buyer`]), minted once before
/// the load as a client caches its token; None each when the cluster runs without authentication.
pub fn buyer_tokens(cluster: &Cluster, buyers: usize) -> std::sync::Arc<Vec<Option<MetadataValue<Ascii>>>> {
    std::sync::Arc::new(
        (0..buyers)
            .map(|b| {
                cluster.signer.is_some().then(|| {
                    format!("Bearer {}", cluster.buyer_token(&buyer(b))).parse().expect("a token is a header value")
                })
            })
            .collect(),
    )
}

/// `msg` as a call of buyer `b`, with its token from `tokens` ([`buyer_tokens`]) when there is one.
pub fn as_buyer<T>(tokens: &[Option<MetadataValue<Ascii>>], b: usize, msg: T) -> tonic::Request<T> {
    let mut call = tonic::Request::new(msg);
    if let Some(Some(t)) = tokens.get(b) {
        call.metadata_mut().insert("authorization", t.clone());
    }
    call
}

/// Results of the placement benchmark.
pub struct PlaceResult {
    /// The load.
    pub load: LoadResult,
    /// Successful placements that did not end RESERVED (should be none: stock and quota are ample).
    pub not_reserved: u64,
    /// CPU seconds each Redis process and this process spent during the timed load.
    pub cpu: CpuUse,
}

/// Runs the placement benchmark on `backend`, with authentication on or off.
///
/// With authentication on, as the services run in production: every call carries a token minted
/// for its buyer (one per buyer, minted before the load starts, as a client caches its token), and
/// orders calls licensing and inventory with its service token.
pub async fn run(args: &Args, backend: BackendKind, auth: bool) -> PlaceResult {
    let cluster = Cluster::start_with(ClusterOptions { auth, backend, ..ClusterOptions::default() }).await;
    let buyers = args.buyers.max(1);
    let products = args.products.clamp(1, SKUS.len());
    license_everyone(&cluster, buyers, products, Some(1_000_000_000)).await;
    for (i, sku) in SKUS[..products].iter().enumerate() {
        supply(&cluster, sku, 1_000_000_000, i).await;
    }
    let tokens = buyer_tokens(&cluster, buyers);
    let url = cluster.orders.as_ref().expect("orders in process").url();
    let channels = load::connections(&url, args.connections).await;
    let not_reserved = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let nr = not_reserved.clone();
    let in_flight = args.in_flight.max(1);
    let label = if auth { "place (auth)" } else { "place" };
    let cpu = CpuMeter::start(&cluster).await;
    let load = load::run(label, &channels, in_flight, args.duration, move |ch, task, n| {
        let nr = nr.clone();
        let tokens = tokens.clone();
        async move {
            let req = request(task, n, buyers, products, in_flight);
            let call = as_buyer(&tokens, (task + n as usize * in_flight) % buyers, req);
            match OrderServiceClient::new(ch).place_order(call).await {
                Ok(r) => {
                    if r.into_inner().order.is_none_or(|o| o.state() != opb::OrderState::Reserved) {
                        nr.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    true
                }
                Err(_) => false,
            }
        }
    })
    .await;
    let cpu = cpu.stop().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    cluster.stop().await;
    PlaceResult { load, not_reserved: not_reserved.load(std::sync::atomic::Ordering::Relaxed), cpu }
}
