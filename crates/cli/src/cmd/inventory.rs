//! The catalogue, stock and supply (the inventory service).

use std::time::Duration;

use chipgate_proto::inventory::v1 as ipb;
use chipgate_proto::orders::v1 as opb;
use clap::{Args, Subcommand};

use super::{ListArgs, pages, print_listing, show, watch_until};
use crate::client::{Ctx, Outcome, Svc, random_id};
use crate::out::{self, thousands};
use crate::view;

/// `chipgate products`.
#[derive(Args, Debug)]
#[command(after_help = "Example:\n  chipgate products")]
pub struct ProductsArgs {
    #[command(flatten)]
    pub list: ListArgs,
}

/// `chipgate products`.
pub async fn products(ctx: &Ctx, a: ProductsArgs) -> Outcome {
    let listed = pages(&a.list, |page_size, page_token| {
        let msg = ipb::ListProductsRequest { page_size, page_token };
        async move {
            let r = ctx.call(Svc::Inventory, None, ctx.inv().list_products(ctx.req(msg))).await?;
            Ok((r.products, r.next_page_token))
        }
    })
    .await?;
    let table = |all: &[ipb::Product]| {
        let mut t = out::Table::new(&["SKU", "NAME", "CLASS", "VENDOR", ">PERF (H20=1)"]);
        for p in all {
            t.row(vec![
                p.sku.clone(),
                p.name.clone(),
                view::short(p.product_class().as_str_name(), "PRODUCT_CLASS_"),
                p.vendor.clone(),
                format!("{:.1}", p.relative_performance),
            ]);
        }
        t
    };
    let response = |products, next_page_token| ipb::ListProductsResponse { products, next_page_token };
    print_listing(ctx, listed, response, table, "the catalogue is empty");
    Ok(())
}

/// Options of `chipgate stock`.
#[derive(Args, Debug)]
#[command(
    args_conflicts_with_subcommands = true,
    after_help = "Examples:\n  chipgate stock\n  chipgate stock H200-SXM-141GB\n  chipgate stock watch H200-SXM-141GB --count 10"
)]
pub struct StockArgs {
    #[command(subcommand)]
    pub cmd: Option<StockCmd>,
    /// Only this product (every product when absent).
    pub product: Option<String>,
}

/// `chipgate stock …`.
#[derive(Subcommand, Debug)]
pub enum StockCmd {
    /// Stream stock changes as they happen (supply received, holds taken, released, confirmed,
    /// shipped), one line each (JSON lines with -o json).
    #[command(after_help = "Example:\n  chipgate stock watch H200-SXM-141GB --for 5m")]
    Watch {
        /// Only this product.
        product: Option<String>,
        /// Stop after this many changes.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this long.
        #[arg(long = "for", value_parser = crate::client::parse_duration)]
        duration: Option<Duration>,
    },
}

/// `chipgate stock`.
pub async fn stock(ctx: &Ctx, a: StockArgs) -> Outcome {
    if let Some(StockCmd::Watch { product, count, duration }) = a.cmd {
        let msg = ipb::WatchStockRequest { product_sku: product.unwrap_or_default() };
        let stream = ctx.call(Svc::Inventory, None, ctx.inv().watch_stock(ctx.stream_req(msg))).await?;
        return watch_until(ctx, Svc::Inventory, stream, count, duration, |c: ipb::WatchStockResponse| {
            if ctx.json() {
                out::json_line(&view::msg(&c));
            } else {
                let s = c.stock.clone().unwrap_or_default();
                out::say(&format!(
                    "{}  {}  {}  {}  available {}  held {}  committed {}  shipped {}  received {}",
                    view::ts_short(c.time.as_ref()),
                    s.product_sku,
                    c.cause,
                    view::dash(&c.reference),
                    thousands(s.available),
                    thousands(s.held),
                    thousands(s.committed),
                    thousands(s.shipped),
                    thousands(s.received)
                ));
            }
            true
        })
        .await;
    }
    let all = match a.product {
        Some(sku) => {
            let msg = ipb::GetStockRequest { product_sku: sku };
            let r = ctx.call(Svc::Inventory, None, ctx.inv().get_stock(ctx.req(msg))).await?;
            if ctx.json() {
                out::json(&view::msg(&r));
                return Ok(());
            }
            r.stock.into_iter().collect::<Vec<_>>()
        }
        None => {
            let r = ctx.call(Svc::Inventory, None, ctx.inv().list_stock(ctx.req(ipb::ListStockRequest {}))).await?;
            if ctx.json() {
                out::json(&view::msg(&r));
                return Ok(());
            }
            r.stock
        }
    };
    view::stock_table(&all).print_or("no stock yet");
    Ok(())
}

/// `chipgate supply …`.
#[derive(Subcommand, Debug)]
pub enum SupplyCmd {
    /// Book a supply receipt into stock. The backlog takes it at once, oldest order first. A receipt id
    /// that was booked before changes nothing, so retrying is safe.
    #[command(
        after_help = "Example:\n  chipgate supply receive --product H200-SXM-141GB --units 25000 --receipt TW-2026-001 --source 'Kaohsiung shipment'"
    )]
    Receive {
        /// Catalogue SKU.
        #[arg(long)]
        product: String,
        /// Units received.
        #[arg(long)]
        units: u64,
        /// Receipt id, unique per receipt (generated when absent).
        #[arg(long)]
        receipt: Option<String>,
        /// Where the supply came from.
        #[arg(long, default_value = "")]
        source: String,
    },
    /// Which backordered orders a receipt of this size would fill, partly fill or leave waiting under
    /// the product's allocation policy, and each buyer's share — changing nothing.
    #[command(after_help = "Example:
  chipgate --as vendor supply preview --product H200-SXM-141GB --units 25000")]
    Preview {
        /// Catalogue SKU.
        #[arg(long)]
        product: String,
        /// Units the receipt would bring.
        #[arg(long)]
        units: u64,
        /// List at most this many orders.
        #[arg(long, default_value_t = 50)]
        max_orders: i32,
    },
}

/// `chipgate supply …`.
pub async fn supply(ctx: &Ctx, cmd: SupplyCmd) -> Outcome {
    let (product, units, receipt, source) = match cmd {
        SupplyCmd::Receive { product, units, receipt, source } => (product, units, receipt, source),
        SupplyCmd::Preview { product, units, max_orders } => {
            let msg = opb::PreviewSupplyRequest { product_sku: product, units, max_orders };
            let r = ctx.call(Svc::Orders, None, ctx.ord().preview_supply(ctx.req(msg))).await?;
            show(ctx, &r, || print_supply_preview(&r));
            return Ok(());
        }
    };
    let rid = ctx.rid();
    let receipt_id = receipt.unwrap_or_else(|| random_id("rcpt"));
    let msg = ipb::ReceiveSupplyRequest { request_id: rid.clone(), receipt_id, product_sku: product, units, source };
    let r = ctx.call(Svc::Inventory, Some(&rid), ctx.inv().receive_supply(ctx.req(msg))).await?;
    show(ctx, &r, || {
        let rc = r.receipt.clone().unwrap_or_default();
        if r.newly_booked {
            out::say(&format!("booked receipt {}: {} x {}", rc.receipt_id, thousands(rc.units), rc.product_sku));
        } else {
            out::say(&format!("receipt {} was already booked; nothing changed", rc.receipt_id));
        }
        out::say("");
        view::stock_table(r.stock.as_slice()).print_or("");
    });
    Ok(())
}

/// A supply preview for people: each buyer's share, then the orders it fills or partly fills.
pub fn print_supply_preview(r: &opb::PreviewSupplyResponse) {
    out::say(&format!(
        "a receipt of {} x {} ({} available now):",
        thousands(r.units),
        r.product_sku,
        thousands(r.available_units)
    ));
    out::say("");
    if let Some(a) = &r.allocation {
        view::print_allocation(a);
    }
    out::say("");
    view::outcomes_table(&r.orders).print_or("it would fill no order");
    if r.orders_truncated {
        out::note("(more orders would take units: --max-orders to list them)");
    }
    out::say(&format!(
        "left waiting: {} order(s), {} units",
        thousands(r.orders_left_waiting),
        thousands(r.units_left_waiting)
    ));
}
