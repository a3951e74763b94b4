//! `chipgate demo`: the seed story, played against a running cluster (or a private one).
//!
//! Customs embargoes the H200; Washington lets NVIDIA export it; a dozen Chinese buyers order more
//! than 2,000,000 chips while nothing is licensed; they apply; wave 1 grants ByteDance, Alibaba and
//! Tencent 400,000+ units with terms pending and a domestic-chip ratio — and nothing moves; the embargo
//! lifts; the terms are finalised; the buyers record domestic purchases; stock is far below demand;
//! supply arrives in a few receipts; the other buyers are still queued. Wave 1 is previewed before it
//! is published, and the first shipment under FIFO and pro rata before the vendor chooses pro rata.
//!
//! The demo's inputs (who orders how much, who is granted what) are its script; every figure it
//! prints is read back from the services (ListOrders, GetWaveProgress, GetStock, GetBacklog,
//! ListLicenses, ListQueue, VerifyAuditLog), never worked out from the script.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use chipgate_proto::inventory::v1 as ipb;
use chipgate_proto::licensing::v1 as lpb;
use chipgate_proto::orders::v1 as opb;
use chipgate_runtime::Shutdown;
use chipgate_runtime::auth::Role;
use clap::Args;
use serde_json::{Value, json};

use crate::client::{As, Ctx, Failure, Outcome, Svc};
use crate::import::Row;
use crate::out::{self, thousands};
use crate::view;

/// The product of the story.
const H200: &str = "H200-SXM-141GB";

/// Options of `chipgate demo`.
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Start a private cluster in this process, on free loopback ports with the embedded state, and
    /// play the story there (the --licensing/--inventory/--orders endpoints are then ignored).
    #[arg(long)]
    pub self_contained: bool,
    /// Orders placed at the same time.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub concurrency: u16,
    /// How long each step may take to settle before the demo gives up (exit 11).
    #[arg(long, value_parser = crate::client::parse_duration, default_value = "60s")]
    pub step_timeout: Duration,
}

/// One buyer of the story.
struct Buyer {
    id: &'static str,
    name: &'static str,
    /// Units ordered in all, over many orders.
    orders_units: u64,
    /// Units applied for.
    applies: u64,
    /// Units wave 1 grants (None: stays queued).
    grant: Option<u64>,
    /// Domestic units bought, and from whom.
    domestic: Option<(u64, &'static str)>,
    end_use: &'static str,
    site: &'static str,
}

const BUYERS: &[Buyer] = &[
    Buyer {
        id: "bytedance",
        name: "ByteDance",
        orders_units: 420_000,
        applies: 200_000,
        grant: Some(180_000),
        domestic: Some((36_000, "huawei")),
        end_use: "Doubao model training",
        site: "Ulanqab",
    },
    Buyer {
        id: "alibaba",
        name: "Alibaba",
        orders_units: 360_000,
        applies: 150_000,
        grant: Some(130_000),
        domestic: Some((20_000, "cambricon")),
        end_use: "Qwen training and Alibaba Cloud",
        site: "Zhangbei",
    },
    Buyer {
        id: "tencent",
        name: "Tencent",
        orders_units: 300_000,
        applies: 120_000,
        grant: Some(100_000),
        domestic: Some((25_000, "huawei")),
        end_use: "Hunyuan training",
        site: "Qingyuan",
    },
    Buyer {
        id: "baidu",
        name: "Baidu",
        orders_units: 220_000,
        applies: 100_000,
        grant: None,
        domestic: None,
        end_use: "ERNIE training",
        site: "Yangquan",
    },
    Buyer {
        id: "moonshot",
        name: "Moonshot AI",
        orders_units: 150_000,
        applies: 60_000,
        grant: None,
        domestic: None,
        end_use: "Kimi training",
        site: "Beijing",
    },
    Buyer {
        id: "zhipu",
        name: "Zhipu AI",
        orders_units: 140_000,
        applies: 50_000,
        grant: None,
        domestic: None,
        end_use: "GLM training",
        site: "Beijing",
    },
    Buyer {
        id: "minimax",
        name: "MiniMax",
        orders_units: 120_000,
        applies: 40_000,
        grant: None,
        domestic: None,
        end_use: "multimodal models",
        site: "Shanghai",
    },
    Buyer {
        id: "kuaishou",
        name: "Kuaishou",
        orders_units: 110_000,
        applies: 50_000,
        grant: None,
        domestic: None,
        end_use: "Kling video generation",
        site: "Wuhu",
    },
    Buyer {
        id: "stepfun",
        name: "StepFun",
        orders_units: 100_000,
        applies: 30_000,
        grant: None,
        domestic: None,
        end_use: "Step model training",
        site: "Shanghai",
    },
    Buyer {
        id: "iflytek",
        name: "iFlytek",
        orders_units: 90_000,
        applies: 30_000,
        grant: None,
        domestic: None,
        end_use: "Spark speech models",
        site: "Hefei",
    },
    Buyer {
        id: "deepseek",
        name: "DeepSeek",
        orders_units: 80_000,
        applies: 40_000,
        grant: None,
        domestic: None,
        end_use: "reasoning model research",
        site: "Hangzhou",
    },
    Buyer {
        id: "meituan",
        name: "Meituan",
        orders_units: 60_000,
        applies: 20_000,
        grant: None,
        domestic: None,
        end_use: "LongCat models",
        site: "Beijing",
    },
];

/// Order sizes, cycled through per buyer (large orders: a few hundred orders in all).
const SIZES: &[u64] = &[5_000, 2_000, 8_000, 1_000, 4_000, 10_000, 3_000, 6_000];

/// Domestic ratio of wave 1: one domestic chip per five H200 in use.
const RATIO_BPS: u32 = 2_000;

/// Supply receipts: (receipt, units, source).
const RECEIPTS: &[(&str, u64, &str)] = &[
    ("rcpt-tw-001", 20_000, "first H200 shipment, Kaohsiung"),
    ("rcpt-tw-002", 35_000, "second shipment"),
    ("rcpt-tw-003", 25_000, "third shipment"),
];

/// The orders of the script, buyers interleaved as demand arrives.
fn script_orders() -> Vec<Row> {
    let mut per_buyer: Vec<Vec<(usize, u64)>> = Vec::new();
    for (b, buyer) in BUYERS.iter().enumerate() {
        let mut left = buyer.orders_units;
        let mut v = Vec::new();
        let mut i = b;
        while left > 0 {
            let u = SIZES[i % SIZES.len()].min(left);
            v.push((b, u));
            left -= u;
            i += 1;
        }
        per_buyer.push(v);
    }
    let mut rows = Vec::new();
    let longest = per_buyer.iter().map(Vec::len).max().unwrap_or(0);
    for k in 0..longest {
        for v in &per_buyer {
            if let Some((b, units)) = v.get(k) {
                let buyer = &BUYERS[*b];
                rows.push(Row {
                    line: rows.len() + 1,
                    buyer: buyer.id.to_string(),
                    product: H200.to_string(),
                    units: *units,
                    justification: format!("{}: {}", buyer.name, buyer.end_use),
                    request_id: String::new(),
                });
            }
        }
    }
    rows
}

/// An order's id, state, units held and failed conditions (with their figures).
type OrderMark = (String, i32, u64, Vec<(i32, u64)>);
/// What must stay the same for the world to count as settled.
type Fingerprint = (Vec<OrderMark>, ipb::Stock, u64);

/// What the services say at one moment: every order of the product, and its stock.
#[derive(Clone, Debug, Default)]
struct World {
    orders: Vec<opb::Order>,
    stock: ipb::Stock,
    backlog: u64,
}

impl World {
    /// What must stay the same for the world to count as settled.
    fn fingerprint(&self) -> Fingerprint {
        let orders = self
            .orders
            .iter()
            .map(|o| {
                let reasons = o.reasons.iter().map(|f| (f.condition, f.actual)).collect();
                (o.order_id.clone(), o.state, o.held_units, reasons)
            })
            .collect();
        (orders, self.stock.clone(), self.backlog)
    }

    fn awaiting(&self) -> impl Iterator<Item = &opb::Order> {
        self.orders.iter().filter(|o| o.state() == opb::OrderState::AwaitingLicense)
    }
}

fn has(o: &opb::Order, c: lpb::Condition) -> bool {
    o.reasons.iter().any(|f| f.condition() == c)
}

/// Causes whose reference is the order itself are grouped by kind alone.
fn cause_group(c: Option<&opb::Cause>) -> String {
    match c {
        Some(c)
            if matches!(
                c.kind(),
                opb::CauseKind::Placed
                    | opb::CauseKind::Cancelled
                    | opb::CauseKind::Confirmed
                    | opb::CauseKind::Shipped
                    | opb::CauseKind::HoldExpired
            ) =>
        {
            view::short(c.kind().as_str_name(), "CAUSE_KIND_")
        }
        other => view::cause_text(other),
    }
}

fn reasons_text(o: &opb::Order) -> String {
    let mut names: Vec<String> = o.reasons.iter().map(|f| view::condition_name(f.condition())).collect();
    names.dedup();
    if names.is_empty() { "-".to_string() } else { names.join(" + ") }
}

/// Plays the story and keeps what it has told.
struct Demo<'a> {
    ctx: &'a Ctx,
    prefix: String,
    timeout: Duration,
    /// Orders placed at the same time.
    concurrency: usize,
    /// Each buyer's application (step 4, granted in step 5).
    apps: BTreeMap<&'static str, lpb::Application>,
    /// Wave 1 as published (step 5), whose licences later steps finalise and follow.
    published: lpb::PublishWaveResponse,
    step: usize,
    steps: Vec<Value>,
    /// The world as the last report left it (with histories).
    prev: World,
    started: Instant,
}

impl Demo<'_> {
    fn say(&self, line: &str) {
        if !self.ctx.json() {
            out::say(line);
        }
    }

    fn rid(&self, what: &str) -> String {
        format!("{}-{what}", self.prefix)
    }

    fn title(&mut self, title: &str) {
        self.step += 1;
        let head = format!("── {}. {title} ", self.step);
        let fill = 100usize.saturating_sub(head.chars().count());
        self.say("");
        self.say(&format!("{head}{}", "─".repeat(fill)));
    }

    /// Every order of the product (without histories unless asked), its stock and backlog size.
    async fn world(&self, history: bool) -> Result<World, Failure> {
        let ctx = self.ctx;
        let mut orders = Vec::new();
        let mut token = String::new();
        loop {
            let msg = opb::ListOrdersRequest {
                product_sku: H200.to_string(),
                page_size: 1000,
                page_token: token,
                omit_history: !history,
                ..Default::default()
            };
            let r =
                ctx.call(Svc::Orders, None, ctx.ord().list_orders(ctx.req_as(As::Role(Role::Auditor), msg))).await?;
            orders.extend(r.orders);
            if r.next_page_token.is_empty() {
                break;
            }
            token = r.next_page_token;
        }
        let msg = ipb::GetStockRequest { product_sku: H200.to_string() };
        let stock = ctx
            .call(Svc::Inventory, None, ctx.inv().get_stock(ctx.req_as(As::Role(Role::Auditor), msg)))
            .await?
            .stock
            .unwrap_or_default();
        let msg = opb::GetBacklogRequest { product_sku: H200.to_string(), page_size: 1, page_token: String::new() };
        let backlog = ctx
            .call(Svc::Orders, None, ctx.ord().get_backlog(ctx.req_as(As::Role(Role::Auditor), msg)))
            .await?
            .total_orders;
        Ok(World { orders, stock, backlog })
    }

    /// Waits until `done` holds for what the services report and nothing changes for a moment; returns
    /// that world with histories.
    async fn settle(&self, what: &str, done: impl Fn(&World) -> bool) -> Result<World, Failure> {
        let start = Instant::now();
        let mut last: Option<World> = None;
        loop {
            let now = self.world(false).await?;
            let stable = last.as_ref().is_some_and(|l| l.fingerprint() == now.fingerprint());
            if stable && done(&now) {
                break;
            }
            if start.elapsed() > self.timeout {
                return Err(Failure::Check(format!(
                    "step {} ({what}) did not settle within {:.0?}; is the orders service keeping up?",
                    self.step, self.timeout
                )));
            }
            last = Some(now);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.world(true).await
    }

    /// Tells how orders moved since the last report, and why; records the step for JSON.
    fn report(&mut self, title: &str, events: Vec<String>, now: World) {
        let before: BTreeMap<&str, &opb::Order> = self.prev.orders.iter().map(|o| (o.order_id.as_str(), o)).collect();
        // (from, to, cause) → (orders, units)
        let mut moved: BTreeMap<(String, String, String), (u64, u64)> = BTreeMap::new();
        // cause → orders re-evaluated that stay waiting with other reasons
        let mut reevaluated: BTreeMap<String, u64> = BTreeMap::new();
        for o in &now.orders {
            let cause = cause_group(o.history.last().and_then(|t| t.cause.as_ref()));
            match before.get(o.order_id.as_str()) {
                None => {
                    let e = moved.entry(("NEW".to_string(), view::order_state_name(o.state()), cause)).or_default();
                    e.0 += 1;
                    e.1 += o.units;
                }
                Some(b) if b.state != o.state || b.held_units != o.held_units => {
                    let to = if b.state == o.state {
                        format!("{} (more held)", view::order_state_name(o.state()))
                    } else {
                        view::order_state_name(o.state())
                    };
                    let e = moved.entry((view::order_state_name(b.state()), to, cause)).or_default();
                    e.0 += 1;
                    e.1 += o.units;
                }
                Some(b) if b.reasons != o.reasons => *reevaluated.entry(cause).or_default() += 1,
                Some(_) => {}
            }
        }
        let mut waiting: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for o in now.awaiting() {
            let e = waiting.entry(reasons_text(o)).or_default();
            e.0 += 1;
            e.1 += o.units;
        }
        let mut by_state: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
        for o in &now.orders {
            let e = by_state.entry(view::order_state_name(o.state())).or_default();
            e.0 += 1;
            e.1 += o.units;
            e.2 += o.held_units;
        }

        if !self.ctx.json() {
            for e in &events {
                out::say(&format!("  {e}"));
            }
            if moved.is_empty() {
                out::say("  moved: no order changed state");
            } else {
                out::say("  moved:");
                let mut t = out::Table::new(&[">ORDERS", ">UNITS", "FROM", "", "TO", "BECAUSE"]);
                for ((from, to, cause), (c, u)) in &moved {
                    t.row(vec![thousands(*c), thousands(*u), from.clone(), "→".into(), to.clone(), cause.clone()]);
                }
                for l in t.render() {
                    out::say(&format!("    {l}"));
                }
            }
            for (cause, c) in &reevaluated {
                out::say(&format!(
                    "  re-evaluated, still waiting with new reasons: {} order(s) (because {cause})",
                    thousands(*c)
                ));
            }
            if !waiting.is_empty() {
                out::say("  waiting for a licence, and why:");
                let mut t = out::Table::new(&[">ORDERS", ">UNITS", "FAILED CONDITIONS"]);
                for (why, (c, u)) in &waiting {
                    t.row(vec![thousands(*c), thousands(*u), why.clone()]);
                }
                for l in t.render() {
                    out::say(&format!("    {l}"));
                }
            }
            let states: Vec<String> = by_state
                .iter()
                .map(|(s, (c, u, _))| format!("{s} {} ({} units)", thousands(*c), thousands(*u)))
                .collect();
            if states.is_empty() {
                out::say("  orders now: none yet");
            } else {
                out::say(&format!("  orders now: {}", states.join(" · ")));
            }
        }
        self.steps.push(json!({
            "step": self.step,
            "title": title,
            "events": events,
            "moved": moved.iter().map(|((from, to, cause), (c, u))| json!({
                "from": from, "to": to, "because": cause, "orders": c, "units": u,
            })).collect::<Vec<_>>(),
            "reevaluated": reevaluated.iter().map(|(cause, c)| json!({"because": cause, "orders": c})).collect::<Vec<_>>(),
            "waiting": waiting.iter().map(|(why, (c, u))| json!({"failed_conditions": why, "orders": c, "units": u})).collect::<Vec<_>>(),
            "orders_by_state": by_state.iter().map(|(s, (c, u, h))| (s.clone(), json!({"orders": c, "units": u, "units_held": h}))).collect::<serde_json::Map<_, _>>(),
            "stock": view::msg(&now.stock),
            "backlog_orders": now.backlog,
        }));
        self.prev = now;
    }

    /// How many orders changed state since the last report.
    fn changed_state(&self, now: &World) -> usize {
        let before: BTreeMap<&str, i32> = self.prev.orders.iter().map(|o| (o.order_id.as_str(), o.state)).collect();
        now.orders.iter().filter(|o| before.get(o.order_id.as_str()) != Some(&o.state)).count()
    }

    fn stock_line(s: &ipb::Stock, backlog: u64) -> String {
        format!(
            "stock of {}: received {} · available {} · held {} · committed {} · shipped {}; backlog {} orders",
            s.product_sku,
            thousands(s.received),
            thousands(s.available),
            thousands(s.held),
            thousands(s.committed),
            thousands(s.shipped),
            thousands(backlog)
        )
    }
}

/// What a cluster already holds that the story would collide with: orders, licences, applications,
/// stock of the H200 (each with its count), in words; empty on a fresh cluster.
async fn leftovers(ctx: &Ctx, world: &World) -> Result<Vec<String>, Failure> {
    let auditor = || As::Role(Role::Auditor);
    let msg = lpb::ListLicensesRequest { product_sku: H200.to_string(), page_size: 1000, ..Default::default() };
    let licences =
        ctx.call(Svc::Licensing, None, ctx.lic().list_licenses(ctx.req_as(auditor(), msg))).await?.licenses.len();
    let msg = lpb::ListApplicationsRequest { page_size: 1000, ..Default::default() };
    let apps = ctx.call(Svc::Licensing, None, ctx.lic().list_applications(ctx.req_as(auditor(), msg))).await?;
    let apps = apps.applications.iter().filter(|a| a.product_sku == H200).count();
    let count = |n: usize, one: &str, many: &str| match n {
        0 => None,
        1 => Some(format!("1 {one}")),
        n => Some(format!("{n} {many}")),
    };
    let mut found: Vec<String> = [
        count(world.orders.len(), "order", "orders"),
        count(licences, "licence", "licences"),
        count(apps, "application", "applications"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if world.stock.received > 0 {
        found.push(format!("{} units of stock received", thousands(world.stock.received)));
    }
    Ok(found)
}

/// The first `page_size` applications of the approval queue, as the import authority sees them.
async fn queue(ctx: &Ctx, page_size: i32) -> Result<lpb::ListQueueResponse, Failure> {
    let msg = lpb::ListQueueRequest { page_size, page_token: String::new() };
    ctx.call(Svc::Licensing, None, ctx.lic().list_queue(ctx.req_as(As::Role(Role::ImportAuthority), msg))).await
}

/// A step's lines about the queue: `heading`, then the queued applications' table, indented.
fn queue_lines(heading: String, q: &lpb::ListQueueResponse) -> Vec<String> {
    let mut lines = vec![heading];
    lines.extend(view::applications_table(&q.applications).render().into_iter().map(|l| format!("  {l}")));
    lines
}

/// `chipgate demo`.
pub async fn run(ctx: &Ctx, a: DemoArgs) -> Outcome {
    if !a.self_contained {
        // The demo acts as each party of the story (customs, the export and import authorities, the
        // vendor, every buyer, an auditor for the figures) with tokens from the cluster's signing key.
        return match ctx.g.signer()? {
            Some(signer) => play(&ctx.clone().with_signer(signer), &a).await,
            // No key: every call carries --token (if any); enough for a cluster without auth.
            None => play(ctx, &a).await,
        };
    }
    let shutdown = Shutdown::new();
    let args = crate::dev::DevArgs {
        bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
        licensing_port: 0,
        inventory_port: 0,
        orders_port: 0,
        redis_url: None,
        catalogue: None,
        // The demo plays every role on a private, loopback-only cluster of its own.
        auth_dir: None,
        insecure_no_auth: true,
        // Nobody watches the private cluster's logs.
        audit_checkpoint_every: Duration::ZERO,
    };
    let cluster = crate::dev::start_cluster(&args, &shutdown).await.map_err(Failure::Local)?;
    let mut g = ctx.g.clone();
    g.licensing = cluster.licensing_url();
    g.inventory = cluster.inventory_url();
    g.orders = cluster.orders_url();
    if !ctx.json() {
        out::say(&format!(
            "started a private cluster (embedded state): licensing {} · inventory {} · orders {}",
            g.licensing, g.inventory, g.orders
        ));
    }
    let local = Ctx::new(g)?;
    let result = play(&local, &a).await;
    shutdown.trigger();
    if let Err(e) = cluster.stopped().await {
        tracing::warn!(error = %e, "the private cluster did not stop cleanly");
    }
    result
}

async fn play(ctx: &Ctx, a: &DemoArgs) -> Outcome {
    let mut d = Demo {
        ctx,
        prefix: ctx.rid_prefix("demo"),
        timeout: a.step_timeout,
        concurrency: usize::from(a.concurrency),
        apps: BTreeMap::new(),
        published: lpb::PublishWaveResponse::default(),
        step: 0,
        steps: Vec::new(),
        prev: World::default(),
        started: Instant::now(),
    };

    // The story starts from a clean slate: it checks everything its steps would trip over (before
    // changing anything, so a refused run leaves the cluster as it was).
    let start = d.world(false).await?;
    let found = leftovers(ctx, &start).await?;
    if !found.is_empty() {
        return Err(Failure::Check(format!(
            "this cluster already has {} for {H200}; the demo plays on a fresh cluster \
             (restart `chipgate dev`, or run `chipgate demo --self-contained`)",
            found.join(", ")
        )));
    }
    d.prev = start;
    d.say("chipgate demo: the H200 and China, January 2026 — every figure below is what the services report.");

    for step in STORY {
        d.title(step.title);
        (step.play)(&mut d).await?;
    }
    let wave_id = d.published.wave.as_ref().map(|w| w.wave_id.clone()).unwrap_or_default();
    summary(&d, &wave_id).await
}

/// What a step does: act as the parties would, wait until the cluster settles, report how orders
/// moved and why.
type Play = for<'a, 'c> fn(&'a mut Demo<'c>) -> std::pin::Pin<Box<dyn std::future::Future<Output = Outcome> + 'a>>;

/// One numbered step of the story.
struct Step {
    title: &'static str,
    play: Play,
}

/// The story, in order (its figures are read back from the services after each step).
const STORY: &[Step] = &[
    Step { title: "Customs: the H200 may not enter China", play: |d| Box::pin(customs_embargo(d)) },
    Step { title: "Washington lets NVIDIA export the H200 to China", play: |d| Box::pin(export_authorisation(d)) },
    Step { title: "Chinese tech firms order H200s while nothing is licensed", play: |d| Box::pin(demand(d)) },
    Step {
        title: "Every buyer applies for an import licence; the approval queue forms",
        play: |d| Box::pin(applications(d)),
    },
    Step {
        title: "Wave 1: Beijing approves ByteDance, Alibaba and Tencent — with conditions",
        play: |d| Box::pin(wave_one(d)),
    },
    Step { title: "Customs lifts the embargo", play: |d| Box::pin(embargo_lifted(d)) },
    Step { title: "The terms of wave 1 are finalised", play: |d| Box::pin(terms_finalised(d)) },
    Step { title: "The three buyers record domestic chip purchases", play: |d| Box::pin(domestic_purchases(d)) },
    Step { title: "Stock is far below demand", play: |d| Box::pin(stock(d)) },
    Step { title: "Supply arrives: receipt 1 of 3", play: |d| Box::pin(supply(d, 0)) },
    Step { title: "Supply arrives: receipt 2 of 3", play: |d| Box::pin(supply(d, 1)) },
    Step { title: "Supply arrives: receipt 3 of 3", play: |d| Box::pin(supply(d, 2)) },
    Step { title: "Everyone else is still queued for a later wave", play: |d| Box::pin(still_queued(d)) },
];

/// Customs embargoes the H200.
async fn customs_embargo(d: &mut Demo<'_>) -> Outcome {
    let ctx = d.ctx;
    let msg = lpb::SetImportPolicyRequest {
        request_id: d.rid("customs-embargo"),
        product_sku: H200.to_string(),
        stance: lpb::ImportStance::Embargoed as i32,
        reason: "customs notice to agents: H200 chips may not enter the country".to_string(),
    };
    let p = ctx
        .call(Svc::Licensing, None, ctx.lic().set_import_policy(ctx.req_as(As::Role(Role::Customs), msg)))
        .await?
        .policy
        .unwrap_or_default();
    let ev = vec![format!(
        "customs set {} to {}: {}",
        p.product_sku,
        view::short(p.stance().as_str_name(), "IMPORT_STANCE_"),
        p.reason
    )];
    let now = d.world(true).await?;
    d.report("customs embargo", ev, now);
    Ok(())
}

/// Washington authorises the export.
async fn export_authorisation(d: &mut Demo<'_>) -> Outcome {
    let ctx = d.ctx;
    let msg = lpb::GrantExportAuthorizationRequest {
        request_id: d.rid("export"),
        vendor: "nvidia".to_string(),
        product_sku: H200.to_string(),
        destination: "CN".to_string(),
        reference: "BIS H200 China export licence".to_string(),
    };
    let x = ctx
        .call(
            Svc::Licensing,
            None,
            ctx.lic().grant_export_authorization(ctx.req_as(As::Role(Role::ExportAuthority), msg)),
        )
        .await?
        .authorization
        .unwrap_or_default();
    let ev = vec![format!(
        "export authorisation for {} from {} to {}: {} ({})",
        x.product_sku,
        x.vendor,
        x.destination,
        if x.active { "active" } else { "inactive" },
        x.reference
    )];
    let now = d.world(true).await?;
    d.report("export authorisation", ev, now);
    Ok(())
}

/// A dozen buyers order 2,000,000+ chips while nothing is licensed.
async fn demand(d: &mut Demo<'_>) -> Outcome {
    let ctx = d.ctx;
    let rows = script_orders();
    let bar = (!ctx.json()).then(|| out::progress(rows.len() as u64, "ordering"));
    let placed = crate::import::place_all(ctx, &rows, &d.rid("ord"), d.concurrency, bar.as_ref()).await;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    if let Some(e) = placed.into_iter().flatten().find_map(|(_, r)| r.err()) {
        return Err(e);
    }
    let now = d
        .settle("first evaluation of every order", |w| w.orders.iter().all(|o| o.state() != opb::OrderState::Pending))
        .await?;
    let buyers: std::collections::BTreeSet<&str> = now.orders.iter().map(|o| o.buyer_id.as_str()).collect();
    let ev = vec![format!(
        "{} buyers placed {} orders for {} units of {} — far more than exists",
        buyers.len(),
        thousands(now.orders.len() as u64),
        thousands(now.orders.iter().map(|o| o.units).sum()),
        H200
    )];
    d.report("orders placed", ev, now);
    Ok(())
}

/// Every buyer applies; the approval queue forms.
async fn applications(d: &mut Demo<'_>) -> Outcome {
    let ctx = d.ctx;
    let mut apps = BTreeMap::new();
    for b in BUYERS {
        let msg = lpb::SubmitApplicationRequest {
            request_id: d.rid(&format!("apply-{}", b.id)),
            buyer_id: b.id.to_string(),
            product_sku: H200.to_string(),
            quantity: b.applies,
            end_use: b.end_use.to_string(),
            site: b.site.to_string(),
            destination: "CN".to_string(),
        };
        let app = ctx
            .call(Svc::Licensing, None, ctx.lic().submit_application(ctx.req_as(As::Buyer(b.id), msg)))
            .await?
            .application;
        apps.insert(b.id, app.unwrap_or_default());
    }
    d.apps = apps;
    let q = queue(ctx, 100).await?;
    let ev = queue_lines(format!("{} applications queued, criteria unpublished:", thousands(q.total_queued)), &q);
    let now = d.world(true).await?;
    d.report("applications", ev, now);
    Ok(())
}

/// Wave 1 licenses three buyers with terms pending and a domestic ratio; nothing moves.
async fn wave_one(d: &mut Demo<'_>) -> Outcome {
    let ctx = d.ctx;
    let msg = lpb::CreateWaveRequest { request_id: d.rid("wave-1"), display_name: "wave 1 (January 2026)".to_string() };
    let wave = ctx
        .call(Svc::Licensing, None, ctx.lic().create_wave(ctx.req_as(As::Role(Role::ImportAuthority), msg)))
        .await?
        .wave
        .unwrap_or_default();
    let conditions = lpb::LicenseConditions {
        terms_pending: true,
        domestic_ratio_bps: RATIO_BPS,
        justification_required: true,
        ..Default::default()
    };
    for b in BUYERS {
        let (Some(units), Some(app)) = (b.grant, d.apps.get(b.id)) else { continue };
        let msg = lpb::AddWaveGrantRequest {
            request_id: d.rid(&format!("grant-{}", b.id)),
            wave_id: wave.wave_id.clone(),
            application_id: app.application_id.clone(),
            granted_units: units,
            conditions: Some(conditions),
        };
        ctx.call(Svc::Licensing, None, ctx.lic().add_wave_grant(ctx.req_as(As::Role(Role::ImportAuthority), msg)))
            .await?;
    }
    // What publishing would do, before anyone commits it.
    let msg = opb::PreviewWaveRequest { wave_id: wave.wave_id.clone(), max_orders: 10_000 };
    let preview =
        ctx.call(Svc::Orders, None, ctx.ord().preview_wave(ctx.req_as(As::Role(Role::ImportAuthority), msg))).await?;
    let eligible: u64 = preview.buyers.iter().map(|b| b.orders_eligible).sum();
    let waiting: u64 = preview.buyers.iter().map(|b| b.orders_waiting).sum();
    let mut why: Vec<String> =
        preview.buyers.iter().flat_map(|b| b.reasons.iter().map(|f| view::condition_name(f.condition()))).collect();
    why.sort();
    why.dedup();
    let mut ev = vec![format!(
        "preview of {} before publishing: {} orders would take quota, {} would keep waiting ({})",
        wave.wave_id,
        thousands(eligible),
        thousands(waiting),
        if why.is_empty() { "-".to_string() } else { why.join(", ") }
    )];
    ev.extend(view::buyer_outcomes_table(&preview.buyers).render().into_iter().map(|l| format!("  {l}")));
    let msg = lpb::PublishWaveRequest { request_id: d.rid("publish-1"), wave_id: wave.wave_id.clone() };
    let published = ctx
        .call(Svc::Licensing, None, ctx.lic().publish_wave(ctx.req_as(As::Role(Role::ImportAuthority), msg)))
        .await?;
    let pw = published.wave.clone().unwrap_or_default();
    ev.push(format!(
        "{} published: {} licences, {} units granted together; conditions: {}",
        pw.wave_id,
        published.licenses.len(),
        thousands(pw.total_granted_units),
        view::conditions_text(pw.grants.first().and_then(|g| g.conditions.as_ref()))
    ));
    ev.extend(view::licenses_table(&published.licenses).render().into_iter().map(|l| format!("  {l}")));
    let (progress, settled) = crate::cmd::waves::follow_progress(
        &ctx.acting(As::Role(Role::ImportAuthority)),
        &pw.wave_id,
        d.timeout,
        !ctx.json(),
        false,
    )
    .await?;
    settled?;
    ev.push(format!(
        "propagation: {} observed; {} orders concerned, {} evaluated; {} backordered, {} reserved, {} still awaiting",
        pw.wave_id,
        thousands(progress.orders_concerned),
        thousands(progress.orders_evaluated),
        thousands(progress.orders_backordered),
        thousands(progress.orders_reserved),
        thousands(progress.orders_awaiting)
    ));
    let now = d.settle("wave 1 propagation", |_| true).await?;
    ev.push(as_previewed(&preview.orders, &now));
    if d.changed_state(&now) == 0 {
        let terms = now.awaiting().filter(|o| has(o, lpb::Condition::TermsFinal)).count() as u64;
        let customs = now.awaiting().filter(|o| has(o, lpb::Condition::ImportPolicy)).count() as u64;
        ev.push(format!(
            "nothing moves: {} orders now wait on pending terms, {} on customs",
            thousands(terms),
            thousands(customs)
        ));
    }
    d.report("wave 1 published", ev, now);
    d.published = published;
    Ok(())
}

/// The embargo lifts.
async fn embargo_lifted(d: &mut Demo<'_>) -> Outcome {
    let ctx = d.ctx;
    let msg = lpb::SetImportPolicyRequest {
        request_id: d.rid("customs-open"),
        product_sku: H200.to_string(),
        stance: lpb::ImportStance::Open as i32,
        reason: "import approvals granted: H200 may enter under licence".to_string(),
    };
    let p = ctx
        .call(Svc::Licensing, None, ctx.lic().set_import_policy(ctx.req_as(As::Role(Role::Customs), msg)))
        .await?
        .policy
        .unwrap_or_default();
    let ev =
        vec![format!("customs set {} to {}", p.product_sku, view::short(p.stance().as_str_name(), "IMPORT_STANCE_"))];
    let now = d.settle("embargo lifted", |w| w.awaiting().all(|o| !has(o, lpb::Condition::ImportPolicy))).await?;
    d.report("embargo lifted", ev, now);
    Ok(())
}

/// The terms of wave 1 are finalised; the domestic ratio still holds orders back.
async fn terms_finalised(d: &mut Demo<'_>) -> Outcome {
    let ctx = d.ctx;
    let published = d.published.clone();
    let wave_buyers: Vec<&str> = published.licenses.iter().map(|l| l.buyer_id.as_str()).collect();
    let mut ev = Vec::new();
    for l in &published.licenses {
        let msg = lpb::FinalizeTermsRequest {
            request_id: d.rid(&format!("finalize-{}", l.license_id)),
            license_id: l.license_id.clone(),
            conditions: None,
        };
        let fl = ctx
            .call(Svc::Licensing, None, ctx.lic().finalize_terms(ctx.req_as(As::Role(Role::ImportAuthority), msg)))
            .await?
            .license
            .unwrap_or_default();
        ev.push(format!(
            "{} of {}: {} — {}",
            fl.license_id,
            fl.buyer_id,
            view::license_state(&fl),
            view::conditions_text(fl.conditions.as_ref())
        ));
    }
    let now = d
        .settle("terms finalised", |w| {
            w.awaiting()
                .filter(|o| wave_buyers.contains(&o.buyer_id.as_str()))
                .all(|o| !has(o, lpb::Condition::TermsFinal))
        })
        .await?;
    let ratio = now.awaiting().filter(|o| has(o, lpb::Condition::DomesticRatio)).count() as u64;
    let behind = now.awaiting().filter(|o| has(o, lpb::Condition::QueueOrder)).count() as u64;
    if ratio > 0 {
        ev.push(format!(
            "still nothing moves: the domestic-chip ratio holds back {} order(s), and {} more wait behind them in placement order",
            thousands(ratio),
            thousands(behind)
        ));
    }
    d.report("terms finalised", ev, now);
    Ok(())
}

/// The three buyers record domestic purchases; their orders take quota.
async fn domestic_purchases(d: &mut Demo<'_>) -> Outcome {
    let ctx = d.ctx;
    let pw = d.published.wave.clone().unwrap_or_default();
    let mut ev = Vec::new();
    let mut totals: BTreeMap<String, u64> = BTreeMap::new();
    for b in BUYERS {
        let Some((units, supplier)) = b.domestic else { continue };
        let msg = lpb::RecordDomesticPurchaseRequest {
            request_id: d.rid(&format!("domestic-{}", b.id)),
            buyer_id: b.id.to_string(),
            units,
            supplier: supplier.to_string(),
            evidence_ref: format!("{}-domestic-invoice-2026-01", b.id),
        };
        let r = ctx
            .call(
                Svc::Licensing,
                None,
                ctx.lic().record_domestic_purchase(ctx.req_as(As::Role(Role::ImportAuthority), msg)),
            )
            .await?;
        let p = r.purchase.unwrap_or_default();
        ev.push(format!(
            "{} bought {} domestic accelerators from {}; {} domestic units on record",
            p.buyer_id,
            thousands(p.units),
            p.supplier,
            thousands(r.total_domestic_units)
        ));
        totals.insert(p.buyer_id, r.total_domestic_units);
    }
    let now = d
        .settle("domestic purchases", |w| {
            w.awaiting().all(|o| {
                totals.get(&o.buyer_id).is_none_or(|total| {
                    o.reasons.iter().all(|f| f.condition() != lpb::Condition::DomesticRatio || f.actual >= *total)
                })
            })
        })
        .await?;
    let msg = lpb::ListLicensesRequest { wave_id: pw.wave_id.clone(), page_size: 100, ..Default::default() };
    let ls = ctx
        .call(Svc::Licensing, None, ctx.lic().list_licenses(ctx.req_as(As::Role(Role::Auditor), msg)))
        .await?
        .licenses;
    for l in &ls {
        ev.push(format!(
            "{} of {}: {} of {} units in use, {} left",
            l.license_id,
            l.buyer_id,
            thousands(l.used_units),
            thousands(l.granted_units),
            thousands(l.remaining_units)
        ));
    }
    d.report("domestic purchases", ev, now);
    Ok(())
}

/// Stock is far below demand.
async fn stock(d: &mut Demo<'_>) -> Outcome {
    let now = d.world(true).await?;
    let backlog_units: u64 =
        now.orders.iter().filter(|o| o.state() == opb::OrderState::Backordered).map(|o| o.units).sum();
    let ev = vec![
        Demo::stock_line(&now.stock, now.backlog),
        format!("the backlog wants {} units; licensed orders wait for stock, oldest first", thousands(backlog_units)),
    ];
    d.report("stock", ev, now);
    Ok(())
}

/// The other buyers are still queued.
async fn still_queued(d: &mut Demo<'_>) -> Outcome {
    let ctx = d.ctx;
    let q = queue(ctx, 100).await?;
    let ev = queue_lines(
        format!("{} applications still queued; nobody has said on what criteria:", thousands(q.total_queued)),
        &q,
    );
    let now = d.world(true).await?;
    d.report("still queued", ev, now);
    Ok(())
}

/// How many of the orders a preview named stand as it said.
fn as_previewed(outcomes: &[opb::OrderOutcome], now: &World) -> String {
    let by_id: BTreeMap<&str, &opb::Order> = now.orders.iter().map(|o| (o.order_id.as_str(), o)).collect();
    let same = outcomes
        .iter()
        .filter(|p| {
            by_id.get(p.order_id.as_str()).is_some_and(|o| o.state == p.next_state && o.held_units == p.next_held_units)
        })
        .count();
    format!(
        "as previewed: {} of {} orders stand where the preview said",
        thousands(same as u64),
        thousands(outcomes.len() as u64)
    )
}

/// A receipt's preview under the product's current policy, as the vendor asks it.
async fn preview_supply(d: &Demo<'_>, units: u64) -> Result<opb::PreviewSupplyResponse, Failure> {
    let ctx = d.ctx;
    let msg = opb::PreviewSupplyRequest { product_sku: H200.to_string(), units, max_orders: 10_000 };
    ctx.call(Svc::Orders, None, ctx.ord().preview_supply(ctx.req_as(As::Role(Role::Vendor), msg))).await
}

/// The first shipment, previewed first come first served and pro rata, side by side; the vendor
/// chooses pro rata, so no buyer early in the queue takes the whole shipment.
async fn fifo_or_pro_rata(
    d: &Demo<'_>,
    units: u64,
    ev: &mut Vec<String>,
) -> Result<opb::PreviewSupplyResponse, Failure> {
    let ctx = d.ctx;
    let fifo = preview_supply(d, units).await?;
    let msg = opb::SetAllocationPolicyRequest {
        request_id: d.rid("pro-rata"),
        product_sku: H200.to_string(),
        strategy: opb::AllocationStrategy::ProRata as i32,
        max_share_percent: 0,
        reason: "share the shortage among the licensed buyers".to_string(),
    };
    ctx.call(Svc::Orders, None, ctx.ord().set_allocation_policy(ctx.req_as(As::Role(Role::Vendor), msg))).await?;
    let pro_rata = preview_supply(d, units).await?;
    let share = |p: &opb::PreviewSupplyResponse| -> BTreeMap<String, (u64, u64)> {
        p.allocation
            .as_ref()
            .map(|a| a.buyers.iter().map(|b| (b.buyer_id.clone(), (b.units_waiting, b.units))).collect())
            .unwrap_or_default()
    };
    let (f, r) = (share(&fifo), share(&pro_rata));
    ev.push(format!(
        "previewed before it is booked: FIFO fills {} orders, pro rata {}; the vendor chooses pro rata",
        thousands(fifo.orders.iter().filter(|o| o.next_state() == opb::OrderState::Reserved).count() as u64),
        thousands(pro_rata.orders.iter().filter(|o| o.next_state() == opb::OrderState::Reserved).count() as u64)
    ));
    let mut t = out::Table::new(&["BUYER", ">WAITS FOR", ">FIFO", ">PRO RATA"]);
    for (buyer, (waits, units)) in &r {
        let fifo_units = f.get(buyer).map(|x| x.1).unwrap_or(0);
        t.row(vec![buyer.clone(), thousands(*waits), thousands(fifo_units), thousands(*units)]);
    }
    ev.extend(t.render().into_iter().map(|l| format!("  {l}")));
    Ok(pro_rata)
}

/// One supply receipt arrives (the `i`-th of [`RECEIPTS`]); the backlog takes it as the product's
/// allocation policy says (the first one is previewed under FIFO and pro rata first).
async fn supply(d: &mut Demo<'_>, i: usize) -> Outcome {
    let ctx = d.ctx;
    let (receipt, units, source) = RECEIPTS[i];
    let mut ev = Vec::new();
    let preview = if i == 0 { fifo_or_pro_rata(d, units, &mut ev).await? } else { preview_supply(d, units).await? };
    let msg = ipb::ReceiveSupplyRequest {
        request_id: d.rid(receipt),
        receipt_id: receipt.to_string(),
        product_sku: H200.to_string(),
        units,
        source: source.to_string(),
    };
    let r = ctx.call(Svc::Inventory, None, ctx.inv().receive_supply(ctx.req_as(As::Role(Role::Vendor), msg))).await?;
    let rc = r.receipt.unwrap_or_default();
    ev.push(format!("receipt {}: {} x {} ({})", rc.receipt_id, thousands(rc.units), rc.product_sku, rc.source));
    let now = d.settle("supply", |w| w.stock.available == 0 || w.backlog == 0).await?;
    ev.push(as_previewed(&preview.orders, &now));
    ev.push(Demo::stock_line(&now.stock, now.backlog));
    d.report("supply", ev, now);
    Ok(())
}

/// Everything the closing summary shows, read from the services once the story is over.
struct Closing {
    world: World,
    licences: Vec<lpb::License>,
    progress: opb::WaveProgress,
    queue: lpb::ListQueueResponse,
    audit: lpb::VerifyAuditLogResponse,
}

impl Closing {
    /// Reads it all as the auditor (the queue as the import authority).
    async fn read(d: &Demo<'_>, wave_id: &str) -> Result<Self, Failure> {
        let ctx = d.ctx;
        let auditor = || As::Role(Role::Auditor);
        let world = d.world(false).await?;
        let msg = lpb::ListLicensesRequest { product_sku: H200.to_string(), page_size: 1000, ..Default::default() };
        let licences =
            ctx.call(Svc::Licensing, None, ctx.lic().list_licenses(ctx.req_as(auditor(), msg))).await?.licenses;
        let msg = opb::GetWaveProgressRequest { wave_id: wave_id.to_string() };
        let progress = ctx
            .call(Svc::Orders, None, ctx.ord().get_wave_progress(ctx.req_as(auditor(), msg)))
            .await?
            .progress
            .unwrap_or_default();
        let queue = queue(ctx, 1000).await?;
        let msg = lpb::VerifyAuditLogRequest::default();
        let audit = ctx.call(Svc::Licensing, None, ctx.lic().verify_audit_log(ctx.req_as(auditor(), msg))).await?;
        Ok(Closing { world, licences, progress, queue, audit })
    }

    /// One row per buyer: the story's cast in its order, then anyone else the cluster knows of.
    fn buyers(&self) -> Vec<BuyerRow<'_>> {
        let mut per: BTreeMap<&str, Figures> = BTreeMap::new();
        for o in &self.world.orders {
            per.entry(o.buyer_id.as_str()).or_default().add(o);
        }
        let mut ids: Vec<&str> = BUYERS.iter().map(|b| b.id).filter(|b| per.contains_key(b)).collect();
        ids.extend(per.keys().filter(|b| !ids.contains(b)).copied().collect::<Vec<_>>());
        ids.into_iter()
            .filter_map(|id| {
                let figures = per.remove(id)?;
                let licences = self.licences.iter().filter(|l| l.buyer_id == id).collect();
                let queued = self.queue.applications.iter().find(|a| a.buyer_id == id);
                Some(BuyerRow { id, figures, licences, queued })
            })
            .collect()
    }
}

/// A buyer's orders, counted.
#[derive(Default)]
struct Figures {
    orders: u64,
    units: u64,
    reserved: u64,
    backordered: u64,
    awaiting: u64,
    held: u64,
    by_state: BTreeMap<String, u64>,
}

impl Figures {
    fn add(&mut self, o: &opb::Order) {
        self.orders += 1;
        self.units += o.units;
        self.held += o.held_units;
        match o.state() {
            opb::OrderState::Reserved => self.reserved += 1,
            opb::OrderState::Backordered => self.backordered += 1,
            opb::OrderState::AwaitingLicense => self.awaiting += 1,
            _ => {}
        }
        *self.by_state.entry(o.state().as_str_name().to_string()).or_default() += 1;
    }

    fn sum<'a>(all: impl Iterator<Item = &'a Figures>) -> Figures {
        let mut t = Figures::default();
        for f in all {
            t.orders += f.orders;
            t.units += f.units;
            t.reserved += f.reserved;
            t.backordered += f.backordered;
            t.awaiting += f.awaiting;
            t.held += f.held;
        }
        t
    }
}

/// A line of the summary table.
struct BuyerRow<'a> {
    id: &'a str,
    figures: Figures,
    licences: Vec<&'a lpb::License>,
    queued: Option<&'a lpb::Application>,
}

impl BuyerRow<'_> {
    fn licence_cells(&self) -> [String; 3] {
        if self.licences.is_empty() {
            return ["-".into(), "-".into(), "-".into()];
        }
        let names: Vec<String> =
            self.licences.iter().map(|l| format!("{} {}", l.license_id, view::license_state(l))).collect();
        [
            names.join(", "),
            thousands(self.licences.iter().map(|l| l.granted_units).sum()),
            thousands(self.licences.iter().map(|l| l.used_units).sum()),
        ]
    }

    fn json(&self) -> Value {
        let f = &self.figures;
        json!({
            "buyer_id": self.id,
            "orders": f.orders,
            "units_ordered": f.units,
            "orders_reserved": f.reserved,
            "orders_backordered": f.backordered,
            "orders_awaiting": f.awaiting,
            "orders_by_state": f.by_state,
            "units_held": f.held,
            "licenses": self.licences.iter().map(|l| view::msg(*l)).collect::<Vec<_>>(),
            "queued_application": self.queued.map(view::msg),
        })
    }
}

/// A figure column of the summary table: its header and what it counts.
type Column = (&'static str, fn(&Figures) -> u64);

/// The summary table's figure columns.
const FIGURE_COLUMNS: &[Column] = &[
    (">ORDERS", |f| f.orders),
    (">ORDERED", |f| f.units),
    (">RESERVED", |f| f.reserved),
    (">BACKORDERED", |f| f.backordered),
    (">AWAITING", |f| f.awaiting),
    (">UNITS HELD", |f| f.held),
];

/// The closing table (and the JSON document), every figure read from the services.
async fn summary(d: &Demo<'_>, wave_id: &str) -> Outcome {
    let c = Closing::read(d, wave_id).await?;
    let rows = c.buyers();
    let total = Figures::sum(rows.iter().map(|r| &r.figures));
    let granted: u64 = c.licences.iter().map(|l| l.granted_units).sum();
    let used: u64 = c.licences.iter().map(|l| l.used_units).sum();
    if d.ctx.json() {
        out::json(&json!({
            "product_sku": H200,
            "cluster": {"licensing": d.ctx.g.licensing, "inventory": d.ctx.g.inventory, "orders": d.ctx.g.orders},
            "steps": d.steps,
            "buyers": rows.iter().map(BuyerRow::json).collect::<Vec<_>>(),
            "totals": {
                "orders": total.orders,
                "units_ordered": total.units,
                "orders_reserved": total.reserved,
                "orders_backordered": total.backordered,
                "orders_awaiting": total.awaiting,
                "units_held": total.held,
                "licensed_units_granted": granted,
                "licensed_units_used": used,
            },
            "licenses": c.licences.iter().map(view::msg).collect::<Vec<_>>(),
            "stock": view::msg(&c.world.stock),
            "backlog": {"total_orders": c.world.backlog},
            "queue": {
                "total_queued": c.queue.total_queued,
                "applications": c.queue.applications.iter().map(view::msg).collect::<Vec<_>>(),
            },
            "wave": view::msg(&c.progress),
            "audit": {"valid": c.audit.valid, "entries_checked": c.audit.entries_checked, "head_hash": c.audit.head_hash},
            "elapsed_seconds": d.started.elapsed().as_secs_f64(),
        }));
    } else {
        let mut headers = vec!["BUYER"];
        headers.extend(FIGURE_COLUMNS.iter().map(|(h, _)| *h));
        headers.extend(["LICENCE", ">GRANTED", ">USED", "QUEUE"]);
        let mut t = out::Table::new(&headers);
        let figures = |f: &Figures| FIGURE_COLUMNS.iter().map(|(_, cell)| thousands(cell(f))).collect::<Vec<_>>();
        for r in &rows {
            let mut cells = vec![r.id.to_string()];
            cells.extend(figures(&r.figures));
            cells.extend(r.licence_cells());
            cells.push(r.queued.map_or("-".to_string(), |a| format!("#{}", a.queue_position)));
            t.row(cells);
        }
        let mut cells = vec!["all".to_string()];
        cells.extend(figures(&total));
        cells.extend([format!("{} licences", c.licences.len()), thousands(granted), thousands(used)]);
        cells.push(format!("{} queued", c.queue.total_queued));
        t.row(cells);
        print_summary(d, &c, &t);
    }
    if c.audit.valid {
        Ok(())
    } else {
        Err(Failure::Check(format!(
            "the audit log does not verify at entry {}: {}",
            c.audit.first_bad_sequence, c.audit.problem
        )))
    }
}

/// The closing lines for people: the table, stock, the wave's propagation, the audit log.
fn print_summary(d: &Demo<'_>, c: &Closing, table: &out::Table) {
    let p = &c.progress;
    out::say("");
    out::say(&format!("── Summary {}", "─".repeat(89)));
    out::say("");
    for l in table.render() {
        out::say(&format!("  {l}"));
    }
    out::say("");
    out::say(&format!("  {}", Demo::stock_line(&c.world.stock, c.world.backlog)));
    out::say(&format!(
        "  {}: {} orders concerned, {} evaluated; {} reserved, {} backordered, {} awaiting; {} units held",
        p.wave_id,
        thousands(p.orders_concerned),
        thousands(p.orders_evaluated),
        thousands(p.orders_reserved),
        thousands(p.orders_backordered),
        thousands(p.orders_awaiting),
        thousands(p.units_held)
    ));
    out::say(&format!(
        "  audit log: {} entries, {}",
        thousands(c.audit.entries_checked),
        if c.audit.valid { "hash chain intact" } else { "BROKEN" }
    ));
    out::say(&format!("  played in {:.1}s", d.started.elapsed().as_secs_f64()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_orders_more_than_two_million_in_hundreds_of_orders() {
        let rows = script_orders();
        let units: u64 = rows.iter().map(|r| r.units).sum();
        assert!(units > 2_000_000, "{units}");
        assert!(rows.len() < 1_000, "{}", rows.len());
        let granted: u64 = BUYERS.iter().filter_map(|b| b.grant).sum();
        assert!(granted > 400_000);
        for b in BUYERS {
            let mine: u64 = rows.iter().filter(|r| r.buyer == b.id).map(|r| r.units).sum();
            assert_eq!(mine, b.orders_units, "{}", b.id);
            assert!(b.grant.is_none_or(|g| g <= b.applies));
        }
    }
}
