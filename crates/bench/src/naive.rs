//! The naive baseline: the same propagation one order at a time — one quota call, one hold call and
//! one order write per order, with the same number of calls in flight — to show what batching buys.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chipgate_proto::inventory::v1 as ipb;
use chipgate_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use chipgate_proto::licensing::v1 as lpb;
use chipgate_proto::licensing::v1::licensing_service_client::LicensingServiceClient;
use chipgate_runtime::auth::{Role, TokenSource, with_token};
use chipgate_state::{Backend, Txn};
use chipgate_testkit::{Cluster, ClusterOptions};

use crate::Args;
use crate::load;
use crate::place::{SKUS, buyer, license_everyone, supply};

/// Results of the naive baseline.
pub struct NaiveResult {
    /// Orders propagated.
    pub orders: usize,
    /// Time taken.
    pub elapsed: Duration,
    /// Calls that failed.
    pub errors: usize,
}

impl NaiveResult {
    /// Orders per second.
    pub fn rate(&self) -> f64 {
        self.orders as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs the naive baseline (licensing and inventory only; this loop plays the orders service).
pub async fn run(args: &Args) -> NaiveResult {
    // Authentication as the wave runs (on unless --no-auth): this loop calls licensing and inventory
    // with the orders service's token, as the orders service does.
    let options = ClusterOptions { orders_in_process: false, auth: !args.no_auth, ..ClusterOptions::default() };
    let cluster = Cluster::start_with(options).await;
    let service = || match cluster.signer {
        Some(_) => TokenSource::Static(cluster.token(Role::Service)),
        None => TokenSource::None,
    };
    let products = args.products.clamp(1, SKUS.len());
    let buyers = args.buyers.max(1);
    license_everyone(&cluster, buyers, products, Some(1_000_000_000)).await;
    let per_product = (args.naive_orders as u64 * 10 / products as u64 / 3).max(1);
    for (p, sku) in SKUS[..products].iter().enumerate() {
        supply(&cluster, sku, per_product, p).await;
    }
    let lic_ch = load::connections(&cluster.licensing.url(), args.connections).await;
    let inv_ch = load::connections(&cluster.inventory.url(), args.connections).await;
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let total = args.naive_orders;
    let pb = load::bar("naive", total as u64);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..args.in_flight.max(1) {
        let mut lic = LicensingServiceClient::new(with_token(lic_ch[t % lic_ch.len()].clone(), service()));
        let mut inv = InventoryServiceClient::new(with_token(inv_ch[t % inv_ch.len()].clone(), service()));
        let store = cluster.store.clone();
        let next = next.clone();
        let errors = errors.clone();
        let pb = pb.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return;
                }
                let order = format!("naive-{i}");
                let sku = SKUS[(i / buyers) % products].to_string();
                // One order per call (what a naive client would do), through the batch forms, the only
                // ones the services' API has.
                let q = lic
                    .batch_reserve_quota(lpb::BatchReserveQuotaRequest {
                        request_id: format!("{order}-q"),
                        product_sku: sku.clone(),
                        items: vec![lpb::QuotaItem {
                            order_id: order.clone(),
                            generation: 1,
                            buyer_id: buyer(i % buyers),
                            units: 10,
                            justification: String::new(),
                            queued_behind: String::new(),
                            judge_only: false,
                        }],
                        fence_token: 0,
                    })
                    .await;
                let h = inv
                    .batch_reserve(ipb::BatchReserveRequest {
                        request_id: format!("{order}-h"),
                        product_sku: sku,
                        items: vec![ipb::ReserveItem {
                            order_id: order.clone(),
                            generation: 1,
                            units: 10,
                            allow_partial: true,
                            hold_seconds: 900,
                            known_held: None,
                            max_units: None,
                        }],
                        fence_token: 0,
                    })
                    .await;
                if q.is_err() || h.is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                // The order's own write, as the orders service would make it.
                let key = format!("{{ord}}:naive:{order}");
                let _ = store.get(std::slice::from_ref(&key)).await;
                let mut t = Txn::new();
                t.put(key, vec![0u8; 200]);
                if store.commit(&t).await.is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                pb.inc(1);
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    pb.finish_and_clear();
    let elapsed = started.elapsed();
    cluster.stop().await;
    NaiveResult { orders: total, elapsed, errors: errors.load(Ordering::Relaxed) }
}
