//! `chipgate order import`: many orders from a CSV or JSON-lines file, placed with bounded concurrency
//! and a progress bar. Each row has its own request id, so an interrupted import is simply run again.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use chipgate_proto::orders::v1 as opb;
use clap::{Args, ValueEnum};
use futures_util::StreamExt;
use indicatif::ProgressBar;
use serde_json::{Value, json};
use tonic::Code;

use crate::client::{As, Ctx, Failure, Outcome, Svc};
use crate::out::{self, thousands};
use crate::view;

/// File formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// From the file name (.csv; .jsonl, .ndjson, .json) or, failing that, the first character.
    Auto,
    /// Comma-separated with a header row; fields may be "quoted".
    Csv,
    /// One JSON object per line.
    Jsonl,
}

/// Options of `chipgate order import`.
#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The file ("-" reads standard input).
    pub file: PathBuf,
    /// Its format.
    #[arg(long, value_enum, default_value_t = Format::Auto)]
    pub format: Format,
    /// Orders placed at the same time.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub concurrency: u16,
    /// A directory with a token per buyer, `buyer-<id>.jwt` (the layout `chipgate dev` writes):
    /// each row is placed with its buyer's token. Without it, rows are placed as their buyers with
    /// tokens minted from the signing key, or else all with the one token given.
    #[arg(long, value_name = "DIR")]
    pub buyer_tokens: Option<PathBuf>,
}

/// One order to place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    /// 1-based line of the file (or index, for generated rows).
    pub line: usize,
    /// The buyer.
    pub buyer: String,
    /// Catalogue SKU.
    pub product: String,
    /// Units.
    pub units: u64,
    /// Necessity justification.
    pub justification: String,
    /// Idempotency key; empty: `<prefix>-<line>`.
    pub request_id: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Col {
    Buyer,
    Product,
    Units,
    Justification,
    RequestId,
}

fn column(name: &str) -> Option<Col> {
    match name.trim().to_ascii_lowercase().as_str() {
        "buyer" | "buyer_id" => Some(Col::Buyer),
        "product" | "product_sku" | "sku" => Some(Col::Product),
        "units" | "quantity" => Some(Col::Units),
        "justification" => Some(Col::Justification),
        "request_id" => Some(Col::RequestId),
        _ => None,
    }
}

fn units_of(s: &str) -> Result<u64, String> {
    let clean: String = s.trim().chars().filter(|c| *c != '_').collect();
    match clean.parse::<u64>() {
        Ok(0) | Err(_) => Err(format!("units {s:?} is not a positive whole number")),
        Ok(v) => Ok(v),
    }
}

/// Parses CSV text into rows (RFC 4180, by the `csv` crate: quoted fields may hold commas, quotes
/// and newlines; `#` starts a comment line); every problem is reported with its line.
pub fn parse_csv(text: &str) -> Result<Vec<Row>, Vec<String>> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .trim(csv::Trim::All)
        .comment(Some(b'#'))
        .from_reader(text.as_bytes());
    let mut errors = Vec::new();
    let header = match reader.headers() {
        Ok(h) if h.iter().any(|f| !f.is_empty()) => h.clone(),
        Ok(_) => return Err(vec!["the file is empty (expected a header: buyer,product,units,justification)".into()]),
        Err(e) => return Err(vec![format!("the header: {e}")]),
    };
    let mut cols = Vec::new();
    for f in &header {
        match column(f) {
            Some(c) if !cols.contains(&c) => cols.push(c),
            Some(_) => errors.push(format!("line 1: column {f:?} appears twice")),
            None => errors
                .push(format!("line 1: unknown column {f:?} (use buyer, product, units, justification, request_id)")),
        }
    }
    for need in [Col::Buyer, Col::Product, Col::Units] {
        if !cols.contains(&need) {
            errors.push(format!("line 1: the header has no {need:?} column").to_lowercase());
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                errors.push(format!("line {line}: {}", e.kind_text()));
                continue;
            }
        };
        let line = record.position().map_or(0, |p| line_at(text, p.byte() as usize));
        if record.iter().all(str::is_empty) {
            continue;
        }
        let mut row = Row {
            line,
            buyer: String::new(),
            product: String::new(),
            units: 0,
            justification: String::new(),
            request_id: String::new(),
        };
        for (c, v) in cols.iter().zip(record.iter()) {
            match c {
                Col::Buyer => row.buyer = v.to_string(),
                Col::Product => row.product = v.to_string(),
                Col::Units => match units_of(v) {
                    Ok(u) => row.units = u,
                    Err(e) => errors.push(format!("line {line}: {e}")),
                },
                Col::Justification => row.justification = v.to_string(),
                Col::RequestId => row.request_id = v.to_string(),
            }
        }
        if row.buyer.is_empty() || row.product.is_empty() {
            errors.push(format!("line {line}: buyer and product are required"));
            continue;
        }
        rows.push(row);
    }
    if errors.is_empty() { Ok(rows) } else { Err(errors) }
}

/// The 1-based line where the record that the csv reader places at `byte` begins: its position can
/// point at blank or comment lines it skipped before the record.
fn line_at(text: &str, byte: usize) -> usize {
    let mut start = byte.min(text.len());
    loop {
        let rest = &text[start..];
        let line = rest.split('\n').next().unwrap_or_default();
        let skipped = line.trim().is_empty() || line.trim_start().starts_with('#');
        if !skipped || line.len() == rest.len() {
            break;
        }
        start += line.len() + 1;
    }
    text[..start].matches('\n').count() + 1
}

/// A CSV error in a few words (the `csv` crate's own message repeats the position).
trait KindText {
    fn kind_text(&self) -> String;
}

impl KindText for csv::Error {
    fn kind_text(&self) -> String {
        match self.kind() {
            csv::ErrorKind::UnequalLengths { expected_len, len, .. } => {
                format!("{len} fields, but the header has {expected_len}")
            }
            csv::ErrorKind::Utf8 { .. } => "not UTF-8".to_string(),
            other => format!("{other:?}"),
        }
    }
}

/// Parses JSON lines into rows; every problem is reported with its line.
pub fn parse_jsonl(text: &str) -> Result<Vec<Row>, Vec<String>> {
    let mut errors = Vec::new();
    let mut rows = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let v: Value = match serde_json::from_str(raw) {
            Ok(v) => v,
            Err(e) => {
                errors.push(format!("line {line}: not JSON: {e}"));
                continue;
            }
        };
        let Some(obj) = v.as_object() else {
            errors.push(format!("line {line}: expected a JSON object"));
            continue;
        };
        let text_of = |keys: &[&str]| -> String {
            keys.iter().find_map(|k| obj.get(*k).and_then(Value::as_str)).unwrap_or_default().to_string()
        };
        for k in obj.keys() {
            if column(k).is_none() {
                errors.push(format!("line {line}: unknown field {k:?}"));
            }
        }
        let units = match obj.get("units").or_else(|| obj.get("quantity")) {
            Some(Value::Number(x)) => {
                x.as_u64().filter(|u| *u > 0).ok_or_else(|| format!("units {x} is not a positive whole number"))
            }
            Some(Value::String(s)) => units_of(s),
            _ => Err("units is required".to_string()),
        };
        let row = Row {
            line,
            buyer: text_of(&["buyer_id", "buyer"]),
            product: text_of(&["product_sku", "product", "sku"]),
            units: match units {
                Ok(u) => u,
                Err(e) => {
                    errors.push(format!("line {line}: {e}"));
                    continue;
                }
            },
            justification: text_of(&["justification"]),
            request_id: text_of(&["request_id"]),
        };
        if row.buyer.is_empty() || row.product.is_empty() {
            errors.push(format!("line {line}: buyer_id and product_sku are required"));
            continue;
        }
        rows.push(row);
    }
    if errors.is_empty() { Ok(rows) } else { Err(errors) }
}

/// Places one order, retrying (with the same request id, so at most once in effect) while the cluster
/// is overloaded or unreachable.
pub async fn place_one(ctx: &Ctx, row: &Row, request_id: &str) -> Result<opb::Order, Failure> {
    let mut attempt = 0u32;
    loop {
        let msg = opb::PlaceOrderRequest {
            request_id: request_id.to_string(),
            buyer_id: row.buyer.clone(),
            product_sku: row.product.clone(),
            units: row.units,
            justification: row.justification.clone(),
        };
        match ctx.ord().place_order(ctx.req_as(As::Buyer(&row.buyer), msg)).await {
            Ok(r) => return Ok(r.into_inner().order.unwrap_or_default()),
            Err(s)
                if attempt < 4
                    && matches!(s.code(), Code::Unavailable | Code::ResourceExhausted | Code::DeadlineExceeded) =>
            {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt) + fastrand::u64(0..100))).await;
            }
            Err(s) => return Err(ctx.fail::<opb::PlaceOrderResponse>(Svc::Orders, Some(request_id), s)),
        }
    }
}

/// What became of one row.
pub type Placed = (String, Result<opb::Order, Failure>);

/// Places every row, `concurrency` at a time, ticking `bar`; results come back in row order. After
/// the first refusal of the caller's token (UNAUTHENTICATED, PERMISSION_DENIED) no further row is
/// tried: the rest would fail the same way. Rows never tried have no result (None).
pub async fn place_all(
    ctx: &Ctx,
    rows: &[Row],
    prefix: &str,
    concurrency: usize,
    bar: Option<&ProgressBar>,
) -> Vec<Option<Placed>> {
    let stop = std::sync::atomic::AtomicBool::new(false);
    let stop = &stop;
    let mut results: Vec<(usize, Option<Placed>)> = futures_util::stream::iter(rows.iter().enumerate())
        .map(|(i, row)| async move {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return (i, None);
            }
            let rid = if row.request_id.is_empty() { format!("{prefix}-{}", row.line) } else { row.request_id.clone() };
            let r = place_one(ctx, row, &rid).await;
            if let Err(Failure::Rpc { status, .. }) = &r
                && matches!(status.code(), Code::Unauthenticated | Code::PermissionDenied)
            {
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            if let Some(b) = bar {
                b.inc(1);
            }
            (i, Some((rid, r)))
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}

/// Every row's buyer's token from `dir` (`buyer-<id>.jwt`); all missing ones are named at once,
/// before anything is placed.
fn buyer_tokens(dir: &std::path::Path, rows: &[Row]) -> Result<Vec<(String, String)>, Failure> {
    let buyers: std::collections::BTreeSet<&str> = rows.iter().map(|r| r.buyer.as_str()).collect();
    let mut tokens = Vec::new();
    let mut missing = Vec::new();
    for b in buyers {
        let path = dir.join(format!("buyer-{b}.jwt"));
        match std::fs::read_to_string(&path) {
            Ok(t) if !t.trim().is_empty() => tokens.push((b.to_string(), t.trim().to_string())),
            _ => missing.push(path.display().to_string()),
        }
    }
    if missing.is_empty() {
        Ok(tokens)
    } else {
        Err(Failure::Input(format!("--buyer-tokens: no token for {}; nothing was placed", missing.join(", "))))
    }
}

/// The request-id prefix of an import: `--request-id`, or one derived from the file's content, so
/// importing the same file again places nothing twice.
fn import_prefix(ctx: &Ctx, text: &str) -> String {
    match &ctx.g.request_id {
        Some(p) => p.clone(),
        None => format!("import-{}", &chipgate_state::sha256_hex(text.as_bytes())[..16]),
    }
}

/// `chipgate order import`.
pub async fn run(ctx: &Ctx, a: ImportArgs) -> Outcome {
    let from_stdin = a.file.as_os_str() == "-";
    let text = if from_stdin {
        std::io::read_to_string(std::io::stdin())
            .map_err(|e| Failure::Local(format!("can't read standard input: {e}")))?
    } else {
        std::fs::read_to_string(&a.file).map_err(|e| Failure::Local(format!("can't read {}: {e}", a.file.display())))?
    };
    let format = match a.format {
        Format::Auto => {
            let ext = a.file.extension().and_then(|e| e.to_str()).unwrap_or_default().to_ascii_lowercase();
            match ext.as_str() {
                "csv" => Format::Csv,
                "jsonl" | "ndjson" | "json" => Format::Jsonl,
                _ if text.trim_start().starts_with('{') => Format::Jsonl,
                _ => Format::Csv,
            }
        }
        f => f,
    };
    let parsed = if format == Format::Jsonl { parse_jsonl(&text) } else { parse_csv(&text) };
    let rows = parsed.map_err(|errs| {
        let shown: Vec<String> = errs.iter().take(10).cloned().collect();
        let more = if errs.len() > 10 { format!("\n  … and {} more", errs.len() - 10) } else { String::new() };
        Failure::Input(format!(
            "{} has problems; nothing was placed:\n  {}{more}",
            a.file.display(),
            shown.join("\n  ")
        ))
    })?;
    let prefix = import_prefix(ctx, &text);
    // Buyers may place orders only for themselves, so each row goes as its own buyer: with the
    // tokens given per buyer, or minted from a signing key at hand (when no one token was given).
    let per_buyer = ctx.g.token.is_none() && ctx.g.token_file.is_none();
    let (ctx, as_buyers) = match (&a.buyer_tokens, if per_buyer { ctx.g.signer()? } else { None }) {
        (Some(dir), _) => (ctx.clone().with_buyer_tokens(buyer_tokens(dir, &rows)?), true),
        (None, Some(signer)) => (ctx.clone().with_signer(signer), true),
        (None, None) => (ctx.clone(), false),
    };
    let ctx = &ctx;
    let bar = (!ctx.json()).then(|| out::progress(rows.len() as u64, "placing"));
    let started = Instant::now();
    let results = place_all(ctx, &rows, &prefix, usize::from(a.concurrency), bar.as_ref()).await;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let elapsed = started.elapsed();

    let mut by_state: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut placed = Vec::new();
    let mut failed = Vec::new();
    let mut skipped = Vec::new();
    for (row, result) in rows.iter().zip(&results) {
        match result {
            Some((rid, Ok(o))) => {
                let e = by_state.entry(o.state().as_str_name().to_string()).or_default();
                e.0 += 1;
                e.1 += o.units;
                placed.push((row, rid, o));
            }
            Some((rid, Err(f))) => failed.push((row, rid, f)),
            None => skipped.push(row.line),
        }
    }
    // Rows that failed alike are told once, with their lines.
    let mut errors: BTreeMap<String, (Value, Vec<usize>)> = BTreeMap::new();
    for (row, _, f) in &failed {
        let text = match f {
            Failure::Rpc { status, .. } => format!("{}: {}", crate::client::code_name(status.code()), status.message()),
            other => format!("{other:?}"),
        };
        errors.entry(text).or_insert_with(|| (f.to_json()["error"].clone(), Vec::new())).1.push(row.line);
    }
    if ctx.json() {
        out::json(&json!({
            "file": a.file.display().to_string(),
            "rows": rows.len(),
            "placed": placed.len(),
            "failed": failed.len(),
            "not_attempted": skipped.len(),
            "request_id_prefix": prefix,
            "as_each_rows_buyer": as_buyers,
            "by_state": by_state.iter().map(|(k, (c, u))| (k.clone(), json!({"orders": c, "units": u}))).collect::<serde_json::Map<_, _>>(),
            "orders": placed.iter().map(|(row, rid, o)| json!({
                "line": row.line,
                "request_id": rid,
                "order_id": o.order_id,
                "buyer_id": o.buyer_id,
                "product_sku": o.product_sku,
                "units": o.units,
                "state": o.state().as_str_name(),
            })).collect::<Vec<_>>(),
            "errors": errors.values().map(|(e, lines)| json!({"error": e, "lines": lines})).collect::<Vec<_>>(),
        }));
    } else {
        out::say(&format!(
            "placed {} of {} orders from {} in {:.1}s ({} failed{}){}; request ids {prefix}-<line>",
            thousands(placed.len() as u64),
            thousands(rows.len() as u64),
            a.file.display(),
            elapsed.as_secs_f64(),
            failed.len(),
            if skipped.is_empty() { String::new() } else { format!(", {} not attempted", skipped.len()) },
            if as_buyers { ", each as its row's buyer" } else { "" },
        ));
        if !by_state.is_empty() {
            out::say("");
            let mut t = out::Table::new(&["WHERE THEY STAND", ">ORDERS", ">UNITS"]);
            for (state, (c, u)) in &by_state {
                t.row(vec![view::short(state, "ORDER_STATE_"), thousands(*c), thousands(*u)]);
            }
            t.print_or("");
        }
        if !errors.is_empty() {
            out::say("");
            let mut t = out::Table::new(&[">ROWS", "LINES", "ERROR"]);
            for (text, (_, lines)) in &errors {
                let mut shown: Vec<String> = lines.iter().take(5).map(usize::to_string).collect();
                if lines.len() > 5 {
                    shown.push("…".into());
                }
                t.row(vec![lines.len().to_string(), shown.join(","), text.clone()]);
            }
            t.print_or("");
            if !skipped.is_empty() {
                out::say(&format!(
                    "stopped after the cluster refused the token: the other {} rows would fail the same way",
                    skipped.len()
                ));
            }
            out::say("");
            out::say("run the same import again to retry safely: rows already placed are not placed twice");
        }
    }
    if failed.is_empty() && skipped.is_empty() {
        Ok(())
    } else {
        Err(Failure::Check(format!("{} of {} rows were not placed", failed.len() + skipped.len(), rows.len())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_and_columns() {
        let text = "buyer,product,units,justification\n\
                    baidu,H200-SXM-141GB,8000,ERNIE training\n\
                    \n\
                    moonshot, H200-SXM-141GB ,4_000,\"Kimi inference, phase \"\"2\"\"\"\n";
        let rows = parse_csv(text).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].line, 2);
        assert_eq!(rows[1].line, 4);
        assert_eq!(rows[1].product, "H200-SXM-141GB");
        assert_eq!(rows[1].units, 4000);
        assert_eq!(rows[1].justification, "Kimi inference, phase \"2\"");
    }

    #[test]
    fn csv_quoted_fields_may_span_lines() {
        let text = "buyer,product,units,justification\n\
                    baidu,H200-SXM-141GB,8000,\"ERNIE training,\nphase 2\"\n\
                    moonshot,H200-SXM-141GB,10,Kimi\n";
        let rows = parse_csv(text).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].justification, "ERNIE training,\nphase 2");
        assert_eq!((rows[1].line, rows[1].buyer.as_str()), (4, "moonshot"), "lines count the newline inside quotes");
    }

    #[test]
    fn csv_problems_are_reported_by_line() {
        let errs = parse_csv("buyer,product,units\nbaidu,H200,0\nbaidu,H200\n").unwrap_err();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs[0].starts_with("line 2:"), "{errs:?}");
        assert!(errs[1].starts_with("line 3:"), "{errs:?}");
        assert!(parse_csv("buyer,colour\n").is_err());
        assert!(parse_csv("").is_err());
    }

    #[test]
    fn jsonl_rows() {
        let rows = parse_jsonl(
            "{\"buyer_id\":\"zhipu\",\"product_sku\":\"H200-SXM-141GB\",\"units\":3000,\"justification\":\"GLM\"}\n\
             {\"buyer\":\"stepfun\",\"product\":\"H200-SXM-141GB\",\"units\":\"1200\",\"request_id\":\"r-1\"}\n",
        )
        .unwrap();
        assert_eq!(rows[0].units, 3000);
        assert_eq!(rows[1].buyer, "stepfun");
        assert_eq!(rows[1].request_id, "r-1");
        assert!(parse_jsonl("{\"buyer_id\":\"x\",\"product_sku\":\"y\",\"units\":-1}\n").is_err());
        assert!(parse_jsonl("not json\n").is_err());
    }
}
