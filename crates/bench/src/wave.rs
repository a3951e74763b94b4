//! Wave propagation: K orders wait for a licence; one published wave makes them all eligible against
//! stock for about a third of them; measured from the publish call until every order is RESERVED or
//! BACKORDERED and the stock is handed out — once first come first served (the default), once with
//! the products' allocation policy set to pro rata, where every order joins the backlog and one
//! shared drain splits the stock among the buyers by what each waits for.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chipgate_orders::BulkOrder;
use chipgate_proto::inventory::v1 as ipb;
use chipgate_proto::licensing::v1 as lpb;
use chipgate_proto::orders::v1 as opb;
use chipgate_state::Backend;
use chipgate_testkit::{BackendKind, Cluster, ClusterOptions};

use crate::cpu::{CpuMeter, CpuUse};
use crate::load::{self, LoadResult};
use crate::place::{SKUS, buyer, license_everyone, supply};
use crate::{Args, Seed};

/// Units of each order.
const UNITS: u64 = 10;
/// How long the wave's progress may take to show it settled once every order moved.
const SETTLE_WAIT: Duration = Duration::from_secs(30);

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
    /// The wave's progress came to every concerned order evaluated, with a settle time, within
    /// [`SETTLE_WAIT`] of the orders moving (a snapshot that keeps orders for ever would leave it
    /// short).
    pub progress_settled: bool,
    /// The allocation strategy the products ran.
    pub strategy: &'static str,
    /// Units still available once the wave settled (0: the stock was handed out).
    pub stock_left: u64,
    /// Buyers holding stock at the end, of those with orders.
    pub buyers_served: usize,
    /// Buyers with orders.
    pub buyers: usize,
    /// The largest gap, in percentage points, between a buyer's share of the stock handed out and
    /// its share of the demand (per product): 0 is perfectly proportional.
    pub share_gap_pp: f64,
    /// CPU seconds each Redis process and this process spent from the publish call until settled.
    pub cpu: CpuUse,
    /// Placements of another product made while the wave settled (when asked for).
    pub alongside: Option<LoadResult>,
    /// Placements alongside that did not end RESERVED.
    pub alongside_not_reserved: u64,
    /// Redis memory by key family once settled: family, keys, bytes (with `--memory-breakdown`).
    pub memory: Vec<(String, u64, u64)>,
    /// Whether the cluster ran with authentication on (`--no-auth` turns it off).
    pub auth: bool,
    /// Whether its waiting orders were placed one `PlaceOrder` at a time (`--seed place`) rather
    /// than bulk-loaded.
    pub placed: bool,
}

impl WaveResult {
    /// Orders per second.
    pub fn rate(&self) -> f64 {
        self.orders as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The wave's progress as the orders service reports it.
async fn progress(ord: &mut chipgate_testkit::OrdersClient, wave_id: &str) -> opb::WaveProgress {
    let req = opb::GetWaveProgressRequest { wave_id: wave_id.to_string() };
    ord.get_wave_progress(req).await.expect("progress").into_inner().progress.unwrap_or_default()
}

async fn used_memory(cluster: &Cluster) -> u64 {
    cluster.store.info().await.ok().and_then(|i| i.used_memory).unwrap_or(0)
}

/// Buyers placing orders of another product while the wave settles, and calls they keep in flight.
const ALONGSIDE_BUYERS: usize = 8;

/// Runs the wave benchmark on `backend`, the products' stock shared by `strategy`; with `alongside`
/// (and a product the wave doesn't touch), licensed buyers of another product keep placing orders
/// while the wave settles, and their latency is measured.
pub async fn run(args: &Args, strategy: opb::AllocationStrategy, backend: BackendKind, alongside: bool) -> WaveResult {
    // With authentication on (unless --no-auth), as operators run it: orders calls licensing and
    // inventory with its service token, and the placements (seed and alongside) carry their buyers'
    // tokens.
    let defaults = ClusterOptions::default();
    let orders = chipgate_orders::Options {
        chunk: args.batch_size.max(1),
        shared_chunk: args.shared_batch_size,
        ..defaults.orders.clone()
    };
    let cluster = Cluster::start_with(ClusterOptions { auth: !args.no_auth, backend, orders, ..defaults }).await;
    let products = args.products.clamp(1, SKUS.len());
    let buyers = args.buyers.max(1);
    let apps = license_everyone(&cluster, buyers, products, None).await;
    // The other product: licensed (its own wave, before) and stocked, for the placements alongside.
    let other = (alongside && products < SKUS.len()).then(|| SKUS[products]);
    if let Some(sku) = other {
        crate::place::license(&cluster, "other", ALONGSIDE_BUYERS, &[sku], Some(1_000_000_000)).await;
        supply(&cluster, sku, 1_000_000_000, 100).await;
    }
    let mut ord = cluster.orders_client();
    for sku in &SKUS[..products] {
        ord.set_allocation_policy(opb::SetAllocationPolicyRequest {
            request_id: format!("bench-policy-{sku}"),
            product_sku: sku.to_string(),
            strategy: strategy as i32,
            max_share_percent: 0,
            reason: "bench".into(),
        })
        .await
        .expect("allocation policy");
    }
    let before = used_memory(&cluster).await;

    // Seed the waiting orders (order i: seed_order).
    let pb = load::bar("seed", args.orders as u64);
    let mut demand = vec![0u64; products];
    let mut demand_of: BTreeMap<(usize, String), u64> = BTreeMap::new();
    for i in 0..args.orders {
        let (b, p) = seed_order(i, buyers, products);
        demand[p] += UNITS;
        *demand_of.entry((p, b)).or_default() += UNITS;
    }
    match args.seed {
        Seed::Bulk => {
            let orders = cluster.orders_service.clone().expect("orders in process");
            // Seed in scripts of 2,000 orders: a 10,000-order script blocks Redis long enough (over a
            // second at 1M orders) for the services' health pings to time out.
            let batch: usize = 2_000;
            let mut k = 0;
            while k < args.orders {
                let n = batch.min(args.orders - k);
                let chunk: Vec<BulkOrder> = (k..k + n)
                    .map(|i| {
                        let (buyer_id, p) = seed_order(i, buyers, products);
                        BulkOrder { buyer_id, sku: SKUS[p].to_string(), units: UNITS }
                    })
                    .collect();
                orders.bulk_load_awaiting(&chunk).await.expect("bulk load");
                k += n;
                pb.set_position(k as u64);
            }
        }
        Seed::Place => place_waiting(&cluster, args, &pb).await,
    }
    pb.finish_and_clear();
    let seeded = used_memory(&cluster).await;
    for (p, units) in demand.iter().enumerate() {
        supply(&cluster, SKUS[p], (units / 3).max(1), p).await;
    }

    // The wave.
    let mut inv = cluster.inventory_client();
    let wave_id = crate::place::draft(&cluster, "main", &apps, 1_000_000_000).await;
    // Placements alongside: a few buyers of the other product, one call in flight each, until the
    // wave settles (the latency of a buyer who has nothing to do with the wave).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let not_reserved = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut placing = Vec::new();
    let channels = match other {
        Some(_) => load::connections(&cluster.orders.as_ref().expect("orders in process").url(), 1).await,
        None => Vec::new(),
    };
    let tokens = crate::place::buyer_tokens(&cluster, ALONGSIDE_BUYERS);
    let cpu = CpuMeter::start(&cluster).await;
    let started = Instant::now();
    if let Some(sku) = other {
        for task in 0..ALONGSIDE_BUYERS {
            let (ch, stop, nr, tokens) = (channels[0].clone(), stop.clone(), not_reserved.clone(), tokens.clone());
            placing.push(tokio::spawn(async move {
                let mut client = opb::order_service_client::OrderServiceClient::new(ch);
                let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
                let mut errors = 0u64;
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let began = Instant::now();
                    let req = opb::PlaceOrderRequest {
                        request_id: format!("alongside-{task}-{n}"),
                        buyer_id: buyer(task),
                        product_sku: sku.to_string(),
                        units: 1,
                        justification: "benchmark".into(),
                    };
                    n += 1;
                    match client.place_order(crate::place::as_buyer(&tokens, task, req)).await {
                        Ok(r) => {
                            let _ = h.record(began.elapsed().as_micros().max(1) as u64);
                            if r.into_inner().order.is_none_or(|o| o.state() != opb::OrderState::Reserved) {
                                nr.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                        }
                        Err(_) => errors += 1,
                    }
                }
                (h, errors)
            }));
        }
    }
    crate::place::publish_draft(&cluster, "main", &wave_id).await;
    let pb = load::bar("wave", args.orders as u64);
    let mut first_move = None;
    let deadline = started + Duration::from_secs(600);
    let (reserved, backordered) = loop {
        let p = progress(&mut ord, &wave_id).await;
        let moved = p.orders_reserved + p.orders_backordered;
        if moved > 0 && first_move.is_none() {
            first_move = Some(started.elapsed());
        }
        pb.set_position(moved);
        if Instant::now() > deadline {
            break (p.orders_reserved, p.orders_backordered);
        }
        if moved as usize >= args.orders {
            // Every order moved; settled once the stock is handed out too (pro rata shares it after
            // the evaluation, in the drain that follows) and the orders record every unit inventory
            // holds for them (the drain commits after inventory answers).
            let mut out = true;
            for sku in &SKUS[..products] {
                let s = inv.get_stock(ipb::GetStockRequest { product_sku: sku.to_string() }).await.expect("stock");
                let s = s.into_inner().stock.unwrap_or_default();
                let held = ord
                    .get_allocation_policy(opb::GetAllocationPolicyRequest { product_sku: sku.to_string() })
                    .await
                    .expect("allocations")
                    .into_inner()
                    .allocated_units;
                out &= s.available == 0 && held == s.held + s.committed + s.shipped;
            }
            if out {
                // The figures as they stand now that the stock is out (the drain moved orders on).
                let p = progress(&mut ord, &wave_id).await;
                break (p.orders_reserved, p.orders_backordered);
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let elapsed = started.elapsed();
    pb.finish_and_clear();
    let cpu = cpu.stop().await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let alongside = if placing.is_empty() {
        None
    } else {
        let mut histogram = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
        let mut errors = 0;
        for t in placing {
            if let Ok((h, e)) = t.await {
                let _ = histogram.add(h);
                errors += e;
            }
        }
        Some(LoadResult { ok: histogram.len(), errors, elapsed, histogram })
    };
    // Every order moved: the progress must come to say so (the last rounds record it just after).
    let settle_by = Instant::now() + SETTLE_WAIT;
    let progress_settled = loop {
        let p = progress(&mut ord, &wave_id).await;
        if p.settle_time.is_some() && p.orders_evaluated >= p.orders_concerned {
            break true;
        }
        if Instant::now() > settle_by {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let after = used_memory(&cluster).await;
    let memory = match &cluster.redis {
        Some(chipgate_state::testing::RedisDeployment::Single(s)) if args.memory_breakdown && alongside.is_none() => {
            memory_by_family(&s.url()).await
        }
        _ => Vec::new(),
    };

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
        // The wave's products only (placements alongside use quota of another product).
        used += r
            .licenses
            .iter()
            .filter(|l| SKUS[..products].contains(&l.product_sku.as_str()))
            .map(|l| l.used_units)
            .sum::<u64>();
        if r.next_page_token.is_empty() {
            break;
        }
        token = r.next_page_token;
    }
    // Who got the stock: each buyer's share of what was handed out against its share of the demand.
    let (mut stock_left, mut served, mut gap) = (0u64, 0usize, 0f64);
    for (p, sku) in SKUS[..products].iter().enumerate() {
        let s = inv.get_stock(ipb::GetStockRequest { product_sku: sku.to_string() }).await.expect("stock");
        stock_left += s.into_inner().stock.map(|s| s.available).unwrap_or(0);
        let held = ord
            .get_allocation_policy(opb::GetAllocationPolicyRequest { product_sku: sku.to_string() })
            .await
            .expect("allocations")
            .into_inner();
        let total = held.allocated_units.max(1) as f64;
        served += held.allocations.len();
        for ((_, b), d) in demand_of.iter().filter(|((q, _), _)| *q == p) {
            let got = held.allocations.iter().find(|a| &a.buyer_id == b).map(|a| a.allocated_units).unwrap_or(0);
            let share = got as f64 / total - *d as f64 / demand[p].max(1) as f64;
            gap = gap.max(share.abs() * 100.0);
        }
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
        progress_settled,
        strategy: if strategy == opb::AllocationStrategy::ProRata { "pro rata" } else { "FIFO" },
        stock_left,
        buyers_served: served,
        buyers: demand_of.len(),
        share_gap_pp: gap,
        cpu,
        alongside,
        alongside_not_reserved: not_reserved.load(std::sync::atomic::Ordering::Relaxed),
        memory,
        auth: !args.no_auth,
        placed: args.seed == Seed::Place,
    }
}

/// A key's family: its partition's space (`{ord:H200}` → `{ord:·}`) and every later part that
/// holds a digit (ids, sequence numbers) replaced by `*`.
fn family(key: &str) -> String {
    let (tag, rest) = match key.strip_prefix('{').and_then(|k| k.split_once('}')) {
        Some((tag, rest)) => match tag.split_once(':') {
            Some((space, _)) => (format!("{{{space}:·}}"), rest),
            None => (format!("{{{tag}}}"), rest),
        },
        None => (String::new(), key),
    };
    let parts: Vec<&str> =
        rest.split(':').map(|p| if p.bytes().any(|b| b.is_ascii_digit()) { "*" } else { p }).collect();
    format!("{tag}{}", parts.join(":"))
}

/// Redis memory by key family (`MEMORY USAGE` of every key, summed): where an order's bytes go.
/// Largest first; a single server only (it scans every key: seconds at 100k orders).
pub async fn memory_by_family(url: &str) -> Vec<(String, u64, u64)> {
    let Ok(client) = redis::Client::open(url) else { return Vec::new() };
    let Ok(mut c) = client.get_multiplexed_async_connection().await else { return Vec::new() };
    let mut families: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut cursor = 0u64;
    loop {
        let Ok((next, keys)): Result<(u64, Vec<String>), _> =
            redis::cmd("SCAN").arg(cursor).arg("COUNT").arg(1000).query_async(&mut c).await
        else {
            break;
        };
        let mut p = redis::pipe();
        for k in &keys {
            p.cmd("MEMORY").arg("USAGE").arg(k).arg("SAMPLES").arg(0);
        }
        let sizes: Vec<Option<u64>> = p.query_async(&mut c).await.unwrap_or_default();
        for (k, size) in keys.iter().zip(sizes) {
            let e = families.entry(family(k)).or_default();
            e.0 += 1;
            e.1 += size.unwrap_or(0);
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    let mut out: Vec<(String, u64, u64)> = families.into_iter().map(|(f, (n, b))| (f, n, b)).collect();
    out.sort_by_key(|f| std::cmp::Reverse(f.2));
    out
}

/// The buyer of the `i`th waiting order the wave parts seed, and the index of its product in
/// [`SKUS`]: buyers in turn, and each product for `buyers` orders at a time.
fn seed_order(i: usize, buyers: usize, products: usize) -> (String, usize) {
    (buyer(i % buyers), (i / buyers) % products)
}

/// Places `--orders` orders, each answered waiting for a licence, `--in-flight` calls at a time over
/// `--connections` (order i: [`seed_order`], as in the bulk seed). Panics on a failed call or an order not waiting:
/// the wave after it would measure something else.
async fn place_waiting(cluster: &Cluster, args: &Args, pb: &indicatif::ProgressBar) {
    let url = cluster.orders.as_ref().expect("orders in process").url();
    let channels = load::connections(&url, args.connections).await;
    let (n, buyers, products) = (args.orders, args.buyers.max(1), args.products.clamp(1, SKUS.len()));
    let in_flight = args.in_flight.max(1);
    let placed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let tokens = crate::place::buyer_tokens(cluster, buyers);
    let tasks: Vec<_> = (0..in_flight)
        .map(|t| {
            let mut client = opb::order_service_client::OrderServiceClient::new(channels[t % channels.len()].clone());
            let (placed, tokens) = (placed.clone(), tokens.clone());
            tokio::spawn(async move {
                for i in (t..n).step_by(in_flight) {
                    let (buyer_id, p) = seed_order(i, buyers, products);
                    // The buyer `seed_order` names (its token).
                    let b = i % buyers;
                    let req = opb::PlaceOrderRequest {
                        request_id: format!("seed-{i}"),
                        buyer_id,
                        product_sku: SKUS[p].to_string(),
                        units: UNITS,
                        justification: "benchmark".into(),
                    };
                    let call = crate::place::as_buyer(&tokens, b, req);
                    let order = client.place_order(call).await.expect("seed placement").into_inner().order;
                    let state = order.map(|o| o.state());
                    assert_eq!(state, Some(opb::OrderState::AwaitingLicense), "seed order {i} must wait for a licence");
                    placed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            })
        })
        .collect();
    for task in tasks {
        while !task.is_finished() {
            pb.set_position(placed.load(std::sync::atomic::Ordering::Relaxed));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        task.await.expect("seed task");
    }
    pb.set_position(placed.load(std::sync::atomic::Ordering::Relaxed));
}
