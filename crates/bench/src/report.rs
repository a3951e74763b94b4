//! The report: a table on stdout, and (with `--json`) results.json plus the placement latency
//! histogram as an SVG.

use std::io::Write;

use serde_json::json;

use crate::Args;
use crate::audit::AuditResult;
use crate::ceilings::RedisCeiling;
use crate::load::LoadResult;
use crate::naive::NaiveResult;
use crate::place::PlaceResult;
use crate::wave::WaveResult;

/// Everything measured.
#[derive(Default)]
pub struct Results {
    /// The arguments (for the record).
    pub args: String,
    /// RPC ceiling.
    pub echo: Option<LoadResult>,
    /// Redis ceiling.
    pub redis: Option<RedisCeiling>,
    /// The place ceiling: two gRPC hops, one Lua check-and-decrement, one write.
    pub place_ceiling: Option<LoadResult>,
    /// Placement (authentication off).
    pub place: Option<PlaceResult>,
    /// Placement with authentication on (a token per buyer).
    pub place_auth: Option<PlaceResult>,
    /// Placement on a Redis Cluster.
    pub place_cluster: Option<PlaceResult>,
    /// Wave propagation (FIFO).
    pub wave: Option<WaveResult>,
    /// The same wave with the products' stock shared pro rata.
    pub wave_pro_rata: Option<WaveResult>,
    /// The FIFO wave with placements of another product alongside.
    pub wave_alongside: Option<WaveResult>,
    /// The FIFO wave on a Redis Cluster.
    pub wave_cluster: Option<WaveResult>,
    /// A smaller FIFO wave over orders placed one `PlaceOrder` at a time (`--placed-orders`): the
    /// Redis bytes per order production keeps.
    pub wave_placed: Option<WaveResult>,
    /// Naive baseline.
    pub naive: Option<NaiveResult>,
    /// Audit checkpoints and verification.
    pub audit: Option<AuditResult>,
}

/// Writes a line to stdout (the report is this program's output).
#[allow(clippy::print_stdout)]
pub fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
}

fn row(name: &str, value: String, note: &str) {
    say(&format!("  {name:<34} {value:>16}   {note}"));
}

/// Where the CPU of a measured window went: Redis per order (masters; replicas apart) and this
/// process (client and services) per order, and each master's share.
fn cpu_rows(label: &str, c: &crate::cpu::CpuUse, orders: u64) {
    let per = |secs: f64| secs * 1e6 / orders.max(1) as f64;
    let masters = c.redis.iter().filter(|(n, _)| n.master).count();
    let cores = std::thread::available_parallelism().map(usize::from).unwrap_or(1);
    let mut note = format!(
        "process {:.0} µs/order; cores busy {:.2} of {cores} (process {:.2})",
        per(c.process),
        c.cores_busy(),
        c.process / c.wall.max(1e-9)
    );
    if masters > 1 {
        note.push_str(&format!(
            "; {masters} masters {}, replicas {:.0} µs/order",
            c.master_shares(),
            per(c.replicas())
        ));
    }
    row(&format!("{label}: redis CPU (µs/order)"), format!("{:.1}", per(c.masters())), &note);
    // Where the masters' time went, by command: calls and server µs per order (top 6).
    let per_order = |n: u64| n as f64 / orders.max(1) as f64;
    let top: Vec<String> = c
        .commands
        .iter()
        .take(6)
        .map(|(name, calls, usec)| format!("{name} {:.2}× {:.1} µs", per_order(*calls), per_order(*usec)))
        .collect();
    if !top.is_empty() {
        let calls: u64 = c.commands.iter().map(|(_, n, _)| n).sum();
        row(&format!("{label}: redis commands/order"), format!("{:.1}", per_order(calls)), &top.join(", "));
    }
}

/// A wave's Redis bytes per order after it settled, against the target, with those while its
/// orders waited and `what` the wave was.
fn bytes_row(name: &str, w: &WaveResult, what: &str) {
    row(
        name,
        format!("{:.0}", w.bytes_per_order),
        &format!(
            "target ≤ 1024: {} (while waiting: {:.0}); {what}",
            verdict(w.bytes_per_order <= 1024.0),
            w.bytes_per_waiting_order
        ),
    );
}

/// Where a wave's Redis bytes went, by key family (with `--memory-breakdown`).
fn memory_rows(w: &WaveResult) {
    for (family, keys, bytes) in w.memory.iter().take(16) {
        row(
            &format!("  {family}"),
            format!("{:.0} B/order", *bytes as f64 / w.orders.max(1) as f64),
            &format!("{keys} keys, {bytes} B"),
        );
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

/// Prints the table.
pub fn print(r: &Results) {
    say("");
    say(&format!("  chipgate-bench  ({} cores)", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)));
    say("");
    if let Some(e) = &r.echo {
        row("echo ceiling (calls/s)", format!("{:.0}", e.rate()), &format!("p99 {:.2} ms", e.ms(0.99)));
    }
    if let Some(x) = &r.redis {
        row(
            "redis ceiling (scripts/s)",
            format!("{:.0}", x.scripts_per_sec),
            &format!("no-op script, pipelines of {}", x.pipeline),
        );
    }
    if let Some(c) = &r.place_ceiling {
        row(
            "place ceiling (orders/s)",
            format!("{:.0}", c.rate()),
            &format!("p99 {:.2} ms; 2 hops, EVALSHA + HSET", c.ms(0.99)),
        );
    }
    if let Some(p) = &r.place {
        let l = &p.load;
        row(
            "place (orders/s)",
            format!("{:.0}", l.rate()),
            &format!("{} calls failed, {} not reserved", l.errors, p.not_reserved),
        );
        row(
            "place latency p50/p90/p99/p99.9 (ms)",
            format!("{:.1}/{:.1}/{:.1}/{:.1}", l.ms(0.5), l.ms(0.9), l.ms(0.99), l.ms(0.999)),
            &format!("target p99 ≤ 25 ms: {}", verdict(l.ms(0.99) <= 25.0)),
        );
        if let Some(e) = &r.echo {
            let ratio = l.rate() / e.rate().max(1e-9);
            row("place / echo", format!("{ratio:.3}"), &format!("target ≥ 0.2: {}", verdict(ratio >= 0.2)));
        }
        if let Some(c) = &r.place_ceiling {
            row("place / place ceiling", format!("{:.3}", l.rate() / c.rate().max(1e-9)), "");
        }
        cpu_rows("place", &p.cpu, l.ok);
    }
    if let Some(a) = &r.place_auth {
        let l = &a.load;
        row(
            "place, auth on (orders/s)",
            format!("{:.0}", l.rate()),
            &format!("p99 {:.1} ms; {} failed, {} not reserved", l.ms(0.99), l.errors, a.not_reserved),
        );
        if let Some(p) = &r.place {
            let x = l.rate() / p.load.rate().max(1e-9);
            row("place auth on / off", format!("{x:.3}"), &format!("target ≥ 0.9: {}", verdict(x >= 0.9)));
        }
    }
    if let Some(p) = &r.place_cluster {
        let l = &p.load;
        row(
            "place, redis cluster (orders/s)",
            format!("{:.0}", l.rate()),
            &format!("p99 {:.1} ms; {} failed, {} not reserved", l.ms(0.99), l.errors, p.not_reserved),
        );
        cpu_rows("place, cluster", &p.cpu, l.ok);
    }
    if let Some(w) = &r.wave {
        let auth = if w.auth { "authentication on" } else { "authentication off (--no-auth)" };
        let note = format!("{} reserved, {} backordered; {auth}", w.reserved, w.backordered);
        row("wave orders", format!("{}", w.orders), &note);
        row(
            "wave time (s)",
            format!("{:.2}", w.elapsed.as_secs_f64()),
            &format!("first move after {:.0} ms", w.first_move.as_secs_f64() * 1000.0),
        );
        // 100,000 in ≤ 2 s and 1,000,000 in ≤ 20 s are both 50,000 orders/s.
        row(
            "wave (orders/s)",
            format!("{:.0}", w.rate()),
            &format!("target ≥ 50,000: {}", verdict(w.rate() >= 50_000.0)),
        );
        if let Some(x) = &r.redis {
            row("wave / redis ceiling", format!("{:.3}", w.rate() / x.scripts_per_sec.max(1e-9)), "");
        }
        let seeded = if w.placed { "orders placed one PlaceOrder at a time" } else { "orders bulk-seeded" };
        bytes_row("redis bytes per order", w, seeded);
        row("quota in use = units moved", format!("{}", w.quota_check), "");
        row("progress settled", format!("{}", w.progress_settled), "every concerned order evaluated, settle time set");
        cpu_rows("wave", &w.cpu, w.orders as u64);
        memory_rows(w);
        row(
            "FIFO: buyers served / gap (pp)",
            format!("{}/{} / {:.1}", w.buyers_served, w.buyers, w.share_gap_pp),
            "share of stock vs share of demand, worst buyer",
        );
    }
    if let Some(w) = &r.wave_pro_rata {
        row(
            "pro-rata wave time (s)",
            format!("{:.2}", w.elapsed.as_secs_f64()),
            &format!("{} orders, {} reserved, {} backordered", w.orders, w.reserved, w.backordered),
        );
        row("pro-rata wave (orders/s)", format!("{:.0}", w.rate()), "");
        if let Some(f) = &r.wave {
            row(
                "pro-rata / FIFO",
                format!("{:.2}", w.rate() / f.rate().max(1e-9)),
                "time to settle, FIFO over pro rata",
            );
        }
        row(
            "pro rata: buyers served / gap (pp)",
            format!("{}/{} / {:.1}", w.buyers_served, w.buyers, w.share_gap_pp),
            "share of stock vs share of demand, worst buyer",
        );
    }
    if let Some(w) = &r.wave_alongside {
        match &w.alongside {
            Some(l) => row(
                "place during a wave p50/p99 (ms)",
                format!("{:.1}/{:.1}", l.ms(0.5), l.ms(0.99)),
                &format!(
                    "target p99 ≤ 50 ms: {}; {} placements of another product, max {:.0} ms; wave {:.0} orders/s",
                    verdict(l.ms(0.99) <= 50.0),
                    l.ok,
                    l.ms(1.0),
                    w.rate()
                ),
            ),
            None => row("place during a wave", "-".into(), "every product is in the wave (--products < 3)"),
        }
    }
    if let Some(w) = &r.wave_placed {
        let what =
            format!("{} orders placed one PlaceOrder at a time, then a wave ({:.0} orders/s)", w.orders, w.rate());
        bytes_row("redis bytes per order, placed", w, &what);
        memory_rows(w);
    }
    if let Some(w) = &r.wave_cluster {
        row(
            "wave, redis cluster (orders/s)",
            format!("{:.0}", w.rate()),
            &format!("{:.2} s, first move {:.0} ms", w.elapsed.as_secs_f64(), w.first_move.as_secs_f64() * 1000.0),
        );
        cpu_rows("wave, cluster", &w.cpu, w.orders as u64);
    }
    if let Some(n) = &r.naive {
        row("naive (orders/s)", format!("{:.0}", n.rate()), &format!("{} orders, {} errors", n.orders, n.errors));
        if let Some(w) = &r.wave {
            let x = w.rate() / n.rate().max(1e-9);
            row("wave / naive", format!("{x:.1}×"), &format!("target ≥ 20×: {}", verdict(x >= 20.0)));
        }
    }
    if let Some(a) = &r.audit {
        row(
            "audit checkpoint p50/p99 (ms)",
            format!("{:.2}/{:.2}", a.checkpoint_ms(0.5), a.checkpoint_ms(0.99)),
            &format!("{} entries, signed", a.entries),
        );
        row("audit verify (s)", format!("{:.2}", a.verify.as_secs_f64()), &format!("{:.0} entries/s", a.verify_rate()));
        row("audit verify with checkpoint (s)", format!("{:.2}", a.verify_with_checkpoint.as_secs_f64()), "");
    }
    say("");
}

/// Writes results.json and place-latency.svg under `--out` (only with `--json`).
///
/// # Errors
/// When the files can't be written.
pub fn write(args: &Args, r: &Results) -> std::io::Result<()> {
    if !args.json {
        return Ok(());
    }
    std::fs::create_dir_all(&args.out)?;
    let load = |l: &LoadResult| {
        json!({
            "per_sec": l.rate(), "ok": l.ok, "errors": l.errors,
            "p50_ms": l.ms(0.5), "p90_ms": l.ms(0.9), "p99_ms": l.ms(0.99), "p999_ms": l.ms(0.999),
        })
    };
    let cpu = |c: &crate::cpu::CpuUse, orders: u64| {
        json!({
            "wall_seconds": c.wall, "process_seconds": c.process, "cores_busy": c.cores_busy(),
            "redis_master_seconds": c.masters(), "redis_replica_seconds": c.replicas(),
            "redis_master_us_per_order": c.masters() * 1e6 / orders.max(1) as f64,
            "nodes": c.redis.iter().map(|(n, s)| json!({"port": n.port, "master": n.master, "seconds": s})).collect::<Vec<_>>(),
            "commands": c.commands.iter().map(|(name, calls, usec)| json!({"command": name, "calls": calls, "usec": usec})).collect::<Vec<_>>(),
        })
    };
    let place = |p: &PlaceResult| {
        let mut v = load(&p.load);
        v["not_reserved"] = json!(p.not_reserved);
        v["cpu"] = cpu(&p.cpu, p.load.ok);
        v
    };
    let doc = json!({
        "args": r.args,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "echo": r.echo.as_ref().map(load),
        "redis": r.redis.as_ref().map(|x| json!({"scripts_per_sec": x.scripts_per_sec, "pipeline": x.pipeline})),
        "place_ceiling": r.place_ceiling.as_ref().map(load),
        "place": r.place.as_ref().map(|p| {
            let mut v = place(p);
            if let Some(e) = &r.echo { v["place_over_echo"] = json!(p.load.rate() / e.rate().max(1e-9)); }
            if let Some(c) = &r.place_ceiling { v["place_over_ceiling"] = json!(p.load.rate() / c.rate().max(1e-9)); }
            v
        }),
        "place_auth": r.place_auth.as_ref().map(|a| {
            let mut v = place(a);
            if let Some(p) = &r.place { v["auth_over_off"] = json!(a.load.rate() / p.load.rate().max(1e-9)); }
            v
        }),
        "place_cluster": r.place_cluster.as_ref().map(place),
        "wave_alongside": r.wave_alongside.as_ref().map(|w| json!({
            "orders": w.orders, "seconds": w.elapsed.as_secs_f64(), "per_sec": w.rate(),
            "placements": w.alongside.as_ref().map(load), "not_reserved": w.alongside_not_reserved,
        })),
        "wave_cluster": r.wave_cluster.as_ref().map(|w| json!({
            "orders": w.orders, "seconds": w.elapsed.as_secs_f64(), "per_sec": w.rate(),
            "first_move_ms": w.first_move.as_secs_f64() * 1000.0, "cpu": cpu(&w.cpu, w.orders as u64),
            "bytes_per_order": w.bytes_per_order, "quota_check": w.quota_check, "progress_settled": w.progress_settled,
        })),
        "wave": r.wave.as_ref().map(|w| json!({
            "cpu": cpu(&w.cpu, w.orders as u64),
            "orders": w.orders, "seconds": w.elapsed.as_secs_f64(), "per_sec": w.rate(),
            "first_move_ms": w.first_move.as_secs_f64() * 1000.0,
            "reserved": w.reserved, "backordered": w.backordered,
            "bytes_per_order": w.bytes_per_order, "bytes_per_waiting_order": w.bytes_per_waiting_order,
            "quota_check": w.quota_check, "progress_settled": w.progress_settled, "auth": w.auth, "placed": w.placed,
            "over_redis_ceiling": r.redis.as_ref().map(|x| w.rate() / x.scripts_per_sec.max(1e-9)),
        })),
        "wave_placed": r.wave_placed.as_ref().map(|w| json!({
            "orders": w.orders, "seconds": w.elapsed.as_secs_f64(), "per_sec": w.rate(),
            "bytes_per_order": w.bytes_per_order, "bytes_per_waiting_order": w.bytes_per_waiting_order,
            "quota_check": w.quota_check, "progress_settled": w.progress_settled,
        })),
        "wave_pro_rata": r.wave_pro_rata.as_ref().map(|w| json!({
            "orders": w.orders, "seconds": w.elapsed.as_secs_f64(), "per_sec": w.rate(),
            "reserved": w.reserved, "backordered": w.backordered, "stock_left": w.stock_left,
            "buyers_served": w.buyers_served, "buyers": w.buyers, "share_gap_pp": w.share_gap_pp,
            "quota_check": w.quota_check, "progress_settled": w.progress_settled,
        })),
        "audit": r.audit.as_ref().map(|a| json!({
            "entries": a.entries, "checkpoint_p50_ms": a.checkpoint_ms(0.5), "checkpoint_p99_ms": a.checkpoint_ms(0.99),
            "verify_seconds": a.verify.as_secs_f64(), "verify_per_sec": a.verify_rate(),
            "verify_with_checkpoint_seconds": a.verify_with_checkpoint.as_secs_f64(), "correct": a.correct,
        })),
        "naive": r.naive.as_ref().map(|n| json!({
            "orders": n.orders, "seconds": n.elapsed.as_secs_f64(), "per_sec": n.rate(), "errors": n.errors,
            "wave_over_naive": r.wave.as_ref().map(|w| w.rate() / n.rate().max(1e-9)),
        })),
    });
    std::fs::write(args.out.join("results.json"), serde_json::to_string_pretty(&doc).unwrap_or_default())?;
    if let Some(p) = &r.place {
        std::fs::write(args.out.join("place-latency.svg"), svg(&p.load))?;
    }
    say(&format!("  wrote {}", args.out.display()));
    Ok(())
}

/// A latency histogram as an SVG: log-spaced buckets, bar height = share of calls.
fn svg(l: &LoadResult) -> String {
    let buckets: Vec<(u64, u64)> =
        l.histogram.iter_log(100, 1.25).map(|v| (v.value_iterated_to(), v.count_since_last_iteration())).collect();
    let total = l.histogram.len().max(1) as f64;
    let (w, h, pad) = (900.0, 360.0, 50.0);
    let n = buckets.len().max(1) as f64;
    let bw = (w - 2.0 * pad) / n;
    let max_share = buckets.iter().map(|(_, c)| *c as f64 / total).fold(0.0, f64::max).max(1e-9);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{pad}\" y=\"20\" font-size=\"14\">PlaceOrder latency ({} calls, p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms)</text>\n",
        l.histogram.len(),
        l.ms(0.5),
        l.ms(0.99),
        l.ms(0.999)
    );
    for (i, (upto, count)) in buckets.iter().enumerate() {
        let share = *count as f64 / total;
        let bh = (h - 2.0 * pad) * share / max_share;
        let x = pad + i as f64 * bw;
        let y = h - pad - bh;
        s.push_str(&format!(
            "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"#3b7dd8\"><title>≤ {:.2} ms: {count}</title></rect>\n",
            (bw - 1.0).max(0.5),
            *upto as f64 / 1000.0
        ));
        if i % 4 == 0 {
            s.push_str(&format!(
                "<text x=\"{x:.1}\" y=\"{:.1}\" transform=\"rotate(45 {x:.1} {:.1})\">{:.2}</text>\n",
                h - pad + 12.0,
                h - pad + 12.0,
                *upto as f64 / 1000.0
            ));
        }
    }
    s.push_str(&format!(
        "<text x=\"{:.1}\" y=\"{:.1}\">latency (ms, log scale)</text>\n</svg>\n",
        w / 2.0 - 60.0,
        h - 5.0
    ));
    s
}

/// What went wrong, as opposed to what was slow: errors, orders that didn't settle, quota that doesn't
/// add up. A benchmark whose results are wrong has no figures worth reading, so these fail the run
/// (and the CI smoke run with it).
pub fn faults(r: &Results) -> Vec<String> {
    let mut out = Vec::new();
    for (name, load) in [
        ("echo", r.echo.as_ref()),
        ("place ceiling", r.place_ceiling.as_ref()),
        ("place", r.place.as_ref().map(|p| &p.load)),
        ("place, auth on", r.place_auth.as_ref().map(|p| &p.load)),
        ("place, redis cluster", r.place_cluster.as_ref().map(|p| &p.load)),
        ("place during a wave", r.wave_alongside.as_ref().and_then(|w| w.alongside.as_ref())),
    ] {
        if let Some(l) = load {
            if l.errors > 0 {
                out.push(format!("{name}: {} calls failed", l.errors));
            }
            if l.ok == 0 {
                out.push(format!("{name}: no call succeeded"));
            }
        }
    }
    for (name, p) in
        [("place", &r.place), ("place, auth on", &r.place_auth), ("place, redis cluster", &r.place_cluster)]
    {
        if let Some(p) = p
            && p.not_reserved > 0
        {
            out.push(format!("{name}: {} orders not reserved although stock and quota were ample", p.not_reserved));
        }
    }
    if let Some(w) = &r.wave_alongside
        && w.alongside_not_reserved > 0
    {
        out.push(format!(
            "place during a wave: {} orders not reserved although stock and quota were ample",
            w.alongside_not_reserved
        ));
    }
    for w in [
        r.wave.as_ref(),
        r.wave_pro_rata.as_ref(),
        r.wave_alongside.as_ref(),
        r.wave_cluster.as_ref(),
        r.wave_placed.as_ref(),
    ]
    .into_iter()
    .flatten()
    {
        let settled = (w.reserved + w.backordered) as usize;
        if settled != w.orders {
            out.push(format!("wave ({}): {settled} of {} orders settled", w.strategy, w.orders));
        }
        if !w.quota_check {
            out.push(format!("wave ({}): quota in use differs from the units of the orders that moved", w.strategy));
        }
        if !w.progress_settled {
            out.push(format!("wave ({}): its progress never showed every concerned order evaluated", w.strategy));
        }
        if w.stock_left > 0 {
            out.push(format!("wave ({}): {} units left available beside the backlog", w.strategy, w.stock_left));
        }
    }
    if let Some(n) = &r.naive
        && n.errors > 0
    {
        out.push(format!("naive: {} orders failed", n.errors));
    }
    if let Some(a) = &r.audit
        && !a.correct
    {
        out.push(
            "audit: a checkpoint or a verification answered wrong (not covering, not valid, or not extending)".into(),
        );
    }
    out
}
