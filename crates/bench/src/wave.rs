//! Wave propagation: K orders wait for a licence; one published wave makes them all eligible against
//! stock for about a third of them; measured from the publish call until every order is RESERVED or
//! BACKORDERED.

use std::time::{Duration, Instant};

use chipgate_orders::BulkOrder;
use chipgate_proto::licensing::v1 as lpb;
use chipgate_proto::orders::v1 as opb;
use chipgate_state::Backend;
use chipgate_testkit::{Cluster, ClusterOptions};

use crate::Args;
use crate::load;
use crate::place::{SKUS, buyer, license_everyone, supply};

/// Units of each order.
const UNITS: u64 = 10;

/// Results of the wave benchmark.
pub struct WaveResult {
    /// Orders the wave made eligible.
    pub orders: usize,
    /// From the publish call until every order was RESERVED or BACKORDERED.
    pub elapsed: Duration,
    /// From the publish call until the first order moved.
    pub first_move: Duration,
    /// Orders held / backordered at the end.
    pub reserved: u64,
    /// Backordered at the end.
    pub backordered: u64,
    /// Redis memory used, per order, once everything settled (orders, queues, quota, holds, events).
    pub bytes_per_order: f64,
    /// Redis memory used, per order, while the orders waited.
    pub bytes_per_waiting_order: f64,
    /// Units of quota in use at the end over units of the orders holding it (must be 1).
    pub quota_check: bool,
}

impl WaveResult {
    /// Orders per second.
    pub fn rate(&self) -> f64 {
        self.orders as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

async fn used_memory(cluster: &Cluster) -> u64 {
    cluster.store.info().await.ok().and_then(|i| i.used_memory).unwrap_or(0)
}

/// Runs the wave benchmark.
pub async fn run(args: &Args) -> WaveResult {
    // Load loops send no tokens: measured without authentication (BENCHMARKS.md).
    let cluster = Cluster::start_with(ClusterOptions { auth: false, ..ClusterOptions::default() }).await;
    let products = args.products.clamp(1, SKUS.len());
    let buyers = args.buyers.max(1);
    let apps = license_everyone(&cluster, buyers, products, None).await;
    let before = used_memory(&cluster).await;

    // Seed the waiting orders.
    let orders = cluster.orders_service.clone().expect("orders in process");
    let pb = load::bar("seed", args.orders as u64);
    let mut demand = vec![0u64; products];
    // Seed in scripts of 2,000 orders: a 10,000-order script blocks Redis long enough (over a second at
    // 1M orders) for the services' health pings to time out.
    let batch: usize = 2_000;
    let mut k = 0;
    while k < args.orders {
        let n = batch.min(args.orders - k);
        let chunk: Vec<BulkOrder> = (k..k + n)
            .map(|i| {
                let p = (i / buyers) % products;
                demand[p] += UNITS;
                BulkOrder { buyer_id: buyer(i % buyers), sku: SKUS[p].to_string(), units: UNITS }
            })
            .collect();
        orders.bulk_load_awaiting(&chunk).await.expect("bulk load");
        k += n;
        pb.set_position(k as u64);
    }
    pb.finish_and_clear();
    let seeded = used_memory(&cluster).await;
    for (p, units) in demand.iter().enumerate() {
        supply(&cluster, SKUS[p], (units / 3).max(1), p).await;
    }

    // The wave.
    let mut ord = cluster.orders_client();
    let wave_id = crate::place::draft(&cluster, &apps, 1_000_000_000).await;
    let started = Instant::now();
    crate::place::publish_draft(&cluster, &wave_id).await;
    let pb = load::bar("wave", args.orders as u64);
    let mut first_move = None;
    let deadline = started + Duration::from_secs(600);
    let (reserved, backordered) = loop {
        let p = ord
            .get_wave_progress(opb::GetWaveProgressRequest { wave_id: wave_id.clone() })
            .await
            .expect("progress")
            .into_inner()
            .progress
            .unwrap_or_default();
        let moved = p.orders_reserved + p.orders_backordered;
        if moved > 0 && first_move.is_none() {
            first_move = Some(started.elapsed());
        }
        pb.set_position(moved);
        if moved as usize >= args.orders || Instant::now() > deadline {
            break (p.orders_reserved, p.orders_backordered);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let elapsed = started.elapsed();
    pb.finish_and_clear();
    let after = used_memory(&cluster).await;

    // Sanity: the quota in use equals the units of the orders that moved.
    let mut lic = cluster.licensing_client();
    let mut used = 0;
    let mut token = String::new();
    loop {
        let r = lic
            .list_licenses(lpb::ListLicensesRequest { page_size: 1000, page_token: token, ..Default::default() })
            .await
            .expect("licences")
            .into_inner();
        used += r.licenses.iter().map(|l| l.used_units).sum::<u64>();
        if r.next_page_token.is_empty() {
            break;
        }
        token = r.next_page_token;
    }
    cluster.stop().await;
    let n = args.orders.max(1) as f64;
    WaveResult {
        orders: args.orders,
        elapsed,
        first_move: first_move.unwrap_or(elapsed),
        reserved,
        backordered,
        bytes_per_order: after.saturating_sub(before) as f64 / n,
        bytes_per_waiting_order: seeded.saturating_sub(before) as f64 / n,
        quota_check: used == (reserved + backordered) * UNITS,
    }
}
