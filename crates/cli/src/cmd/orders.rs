//! What buyers and the vendor do with orders (the orders service): place, show, list, cancel, confirm,
//! ship, watch; the backlog of a product.

use std::time::Duration;

use chipgate_proto::orders::v1 as opb;
use clap::{ArgGroup, Args, Subcommand, ValueEnum};

use super::{ListArgs, pages, print_listing, show, watch_until};
use crate::client::{Ctx, Failure, Outcome, Svc};
use crate::out::{self, thousands};
use crate::view;

/// Where an order stands (for filters).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum State {
    /// Placed, being evaluated.
    Pending,
    /// Waiting for a usable licence (its reasons say which conditions fail).
    AwaitingLicense,
    /// Holds licence quota, waits for stock in the backlog.
    Backordered,
    /// Every unit held until the hold expires.
    Reserved,
    /// Confirmed by the buyer.
    Confirmed,
    /// Shipped.
    Shipped,
    /// Cancelled.
    Cancelled,
    /// The hold expired before confirmation.
    Expired,
    /// Can never be served.
    Rejected,
}

impl State {
    /// As the API's enum.
    pub fn proto(self) -> opb::OrderState {
        match self {
            State::Pending => opb::OrderState::Pending,
            State::AwaitingLicense => opb::OrderState::AwaitingLicense,
            State::Backordered => opb::OrderState::Backordered,
            State::Reserved => opb::OrderState::Reserved,
            State::Confirmed => opb::OrderState::Confirmed,
            State::Shipped => opb::OrderState::Shipped,
            State::Cancelled => opb::OrderState::Cancelled,
            State::Expired => opb::OrderState::Expired,
            State::Rejected => opb::OrderState::Rejected,
        }
    }
}

/// `chipgate order …`.
#[derive(Subcommand, Debug)]
pub enum OrderCmd {
    /// Place an order; it is evaluated at once and moves on by itself as the world changes.
    ///
    /// The answer shows where it stands after its first evaluation: waiting for a licence (with the
    /// conditions that fail), holding quota and waiting for stock in the backlog, or reserved. It moves
    /// on by itself when the world changes (a wave, final terms, a domestic purchase, supply...).
    #[command(
        after_help = "Example:\n  chipgate order place --buyer bytedance --product H200-SXM-141GB --units 5000 \\\n      --justification 'Doubao model training cluster'"
    )]
    Place(PlaceArgs),
    /// Show one order: where it stands, why, and its whole history.
    #[command(after_help = "Example:\n  chipgate order show ord-H200-SXM-141GB-17")]
    Show {
        /// Order id.
        order: String,
        /// Read it from an archive of closed orders instead of the service, from this machine (a
        /// directory, `file:///path` or `/path`, or a bucket, `s3://bucket/prefix` with the AWS_*
        /// environment): the segment is checked against its manifest.
        #[arg(long, value_name = "URL")]
        archive: Option<String>,
    },
    /// List orders, oldest first, optionally of one buyer, product or state; with --archive, the
    /// closed orders an archive holds instead of what the service lists.
    #[command(
        after_help = "Examples:\n  chipgate order list --buyer alibaba\n  chipgate order list --state backordered --limit 0\n  \
                      chipgate order list --archive s3://records/chipgate --buyer alibaba --limit 0"
    )]
    List {
        /// Only this buyer's.
        #[arg(long)]
        buyer: Option<String>,
        /// Only of this product.
        #[arg(long)]
        product: Option<String>,
        /// Only in this state.
        #[arg(long, value_enum)]
        state: Option<State>,
        /// Include each order's history (larger answers).
        #[arg(long)]
        history: bool,
        /// List the closed orders archived out of Redis, read from this machine (a directory,
        /// `file:///path` or `/path`, or a bucket, `s3://bucket/prefix` with the AWS_* environment),
        /// by product and sequence, each naming its segment (`archived_in`). Every segment of each
        /// product listed is checked against its manifest and the chain of manifests; a broken one
        /// is named (exit 11).
        #[arg(long, value_name = "URL")]
        archive: Option<String>,
        #[command(flatten)]
        list: ListArgs,
    },
    /// Cancel an order that has not shipped; its quota and stock go back (and move the next in line).
    #[command(after_help = "Example:\n  chipgate order cancel ord-H200-SXM-141GB-17 --reason 'duplicate'")]
    Cancel {
        /// Order id.
        order: String,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Confirm a RESERVED order before its hold expires: stock and quota are committed.
    #[command(after_help = "Example:\n  chipgate order confirm ord-H200-SXM-141GB-17")]
    Confirm {
        /// Order id.
        order: String,
    },
    /// Ship a CONFIRMED order.
    #[command(after_help = "Example:\n  chipgate order ship ord-H200-SXM-141GB-17")]
    Ship {
        /// Order id.
        order: String,
    },
    /// Follow order transitions live, of one buyer or one order, one line each (JSON lines with -o json).
    #[command(
        group(ArgGroup::new("whose").required(true).multiple(true).args(["buyer", "order"])),
        after_help = "Examples:\n  chipgate order watch --buyer tencent\n  chipgate order watch --order ord-H200-SXM-141GB-17 --until reserved --for 5m"
    )]
    Watch {
        /// Transitions of this buyer's orders.
        #[arg(long)]
        buyer: Option<String>,
        /// Transitions of this one order (with --buyer too when calling with a buyer's token, which only
        /// admits its own buyer id).
        #[arg(long)]
        order: Option<String>,
        /// Stop after this many transitions.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this long.
        #[arg(long = "for", value_parser = crate::client::parse_duration)]
        duration: Option<Duration>,
        /// Stop once an order reaches this state (with --order: at once if it already has).
        #[arg(long, value_enum)]
        until: Option<State>,
    },
    /// Place many orders from a CSV or JSON-lines file, with a progress bar and bounded concurrency.
    ///
    /// CSV needs a header: buyer,product,units,justification[,request_id] (RFC 4180: "quoted" fields
    /// may hold commas, quotes and newlines). JSON lines are objects
    /// {"buyer_id","product_sku","units","justification"[,"request_id"]}. Nothing is placed if any
    /// row is malformed. Rows without a request_id get <prefix>-<line>, the prefix derived from the
    /// file's content (or --request-id), so importing the same file again places nothing twice.
    ///
    /// With a signing key (--signing-key, or the dev cluster's) and no --token, each row is placed
    /// as its own buyer; otherwise every row is placed with the one token given. The first row the
    /// cluster refuses for the token (UNAUTHENTICATED, PERMISSION_DENIED) stops the import.
    #[command(
        after_help = "Example:\n  chipgate order import demand.csv --concurrency 32 --signing-key signing.pem\n\ndemand.csv:\n  buyer,product,units,justification\n  baidu,H200-SXM-141GB,8000,ERNIE training\n  moonshot,H200-SXM-141GB,4000,\"Kimi inference, phase 2\""
    )]
    Import(crate::import::ImportArgs),
}

/// Options of `chipgate order place`.
#[derive(Args, Debug)]
pub struct PlaceArgs {
    /// The buyer.
    #[arg(long)]
    pub buyer: String,
    /// Catalogue SKU.
    #[arg(long)]
    pub product: String,
    /// Units ordered.
    #[arg(long)]
    pub units: u64,
    /// Why the chips are necessary (required by licences that demand a justification).
    #[arg(long, default_value = "")]
    pub justification: String,
}

fn show_order<M: prost::Message>(ctx: &Ctx, r: &M, o: Option<&opb::Order>) {
    show(ctx, r, || view::print_order(&o.cloned().unwrap_or_default()));
}

/// `chipgate order …`.
pub async fn order(ctx: &Ctx, cmd: OrderCmd) -> Outcome {
    match cmd {
        OrderCmd::Place(p) => {
            let rid = ctx.rid();
            let msg = opb::PlaceOrderRequest {
                request_id: rid.clone(),
                buyer_id: p.buyer,
                product_sku: p.product,
                units: p.units,
                justification: p.justification,
            };
            let r = ctx.call(Svc::Orders, Some(&rid), ctx.ord().place_order(ctx.req(msg))).await?;
            show_order(ctx, &r, r.order.as_ref());
        }
        OrderCmd::Show { order, archive: Some(url) } => {
            let target = chipgate_archive::Target::parse(&url).map_err(|e| Failure::Input(e.to_string()))?;
            let (sku, seq) = order
                .strip_prefix("ord-")
                .and_then(|rest| rest.rsplit_once('-'))
                .and_then(|(sku, n)| Some((sku, n.parse::<u64>().ok()?)))
                .ok_or_else(|| Failure::Input(format!("{order:?} is not an order id (ord-<SKU>-<n>)")))?;
            let found = chipgate_archive::orders::find_order(&target, sku, seq)
                .await
                .map_err(|p| Failure::Check(format!("the archive does not check: {p}")))?;
            let Some((mut o, segment)) = found else {
                return Err(Failure::Check(format!("{order} is not in the archive at {}", target.url())));
            };
            o.archived_in = segment;
            let r = opb::GetOrderResponse { order: Some(o) };
            show_order(ctx, &r, r.order.as_ref());
        }
        OrderCmd::Show { order, archive: None } => {
            let msg = opb::GetOrderRequest { order_id: order };
            let r = ctx.call(Svc::Orders, None, ctx.ord().get_order(ctx.req(msg))).await?;
            show_order(ctx, &r, r.order.as_ref());
        }
        OrderCmd::List { buyer, product, state, history, archive: Some(url), list } => {
            if !list.page_token.is_empty() {
                return Err(Failure::Input("--page-token does not apply to --archive listings".into()));
            }
            let target = chipgate_archive::Target::parse(&url).map_err(|e| Failure::Input(e.to_string()))?;
            let products = product.map(|p| vec![p]);
            let mut orders = chipgate_archive::orders::list_orders(&target, products.as_deref(), buyer.as_deref())
                .await
                .map_err(|p| Failure::Check(format!("the archive does not check: {p}")))?;
            if let Some(s) = state {
                orders.retain(|o| o.state == s.proto() as i32);
            }
            if list.limit != 0 {
                orders.truncate(list.limit);
            }
            if !history {
                orders.iter_mut().for_each(|o| o.history.clear());
            }
            let response = |orders, next_page_token| opb::ListOrdersResponse { orders, next_page_token };
            print_listing(ctx, (orders, String::new()), response, view::orders_table, "no archived orders");
        }
        OrderCmd::List { buyer, product, state, history, archive: None, list } => {
            let (buyer, product) = (buyer.unwrap_or_default(), product.unwrap_or_default());
            let state = state.map_or(0, |s| s.proto() as i32);
            let listed = pages(&list, |page_size, page_token| {
                let msg = opb::ListOrdersRequest {
                    buyer_id: buyer.clone(),
                    product_sku: product.clone(),
                    state,
                    page_size,
                    page_token,
                    omit_history: !history,
                };
                async move {
                    let r = ctx.call(Svc::Orders, None, ctx.ord().list_orders(ctx.req(msg))).await?;
                    Ok((r.orders, r.next_page_token))
                }
            })
            .await?;
            let response = |orders, next_page_token| opb::ListOrdersResponse { orders, next_page_token };
            print_listing(ctx, listed, response, view::orders_table, "no orders");
        }
        OrderCmd::Cancel { order, reason } => {
            let rid = ctx.rid();
            let msg = opb::CancelOrderRequest { request_id: rid.clone(), order_id: order, reason };
            let r = ctx.call(Svc::Orders, Some(&rid), ctx.ord().cancel_order(ctx.req(msg))).await?;
            show_order(ctx, &r, r.order.as_ref());
        }
        OrderCmd::Confirm { order } => {
            let rid = ctx.rid();
            let msg = opb::ConfirmOrderRequest { request_id: rid.clone(), order_id: order };
            let r = ctx.call(Svc::Orders, Some(&rid), ctx.ord().confirm_order(ctx.req(msg))).await?;
            show_order(ctx, &r, r.order.as_ref());
        }
        OrderCmd::Ship { order } => {
            let rid = ctx.rid();
            let msg = opb::ShipOrderRequest { request_id: rid.clone(), order_id: order };
            let r = ctx.call(Svc::Orders, Some(&rid), ctx.ord().ship_order(ctx.req(msg))).await?;
            show_order(ctx, &r, r.order.as_ref());
        }
        OrderCmd::Watch { buyer, order, count, duration, until } => {
            watch(ctx, buyer, order, count, duration, until).await?;
        }
        OrderCmd::Import(a) => crate::import::run(ctx, a).await?,
    }
    Ok(())
}

async fn watch(
    ctx: &Ctx,
    buyer: Option<String>,
    order: Option<String>,
    count: Option<u64>,
    duration: Option<Duration>,
    until: Option<State>,
) -> Outcome {
    let msg =
        opb::WatchOrdersRequest { buyer_id: buyer.unwrap_or_default(), order_id: order.clone().unwrap_or_default() };
    let stream = ctx.call(Svc::Orders, None, ctx.ord().watch_orders(ctx.stream_req(msg))).await?;
    // Subscribed: an order already in the wanted state won't transition into it again.
    if let (Some(id), Some(want)) = (&order, until) {
        let msg = opb::GetOrderRequest { order_id: id.clone() };
        let o = ctx.call(Svc::Orders, None, ctx.ord().get_order(ctx.req(msg))).await?.order.unwrap_or_default();
        if o.state() == want.proto() {
            if ctx.json() {
                // As the watch would have printed the transition that got it there.
                out::json_line(&view::msg(&opb::WatchOrdersResponse {
                    transition: o.history.last().cloned(),
                    order_id: o.order_id,
                    buyer_id: o.buyer_id,
                    product_sku: o.product_sku,
                    held_units: o.held_units,
                }));
            } else {
                out::say(&format!("{} is already {}", o.order_id, view::order_state_name(o.state())));
            }
            return Ok(());
        }
    }
    let mut reached = false;
    let reached_ref = &mut reached;
    watch_until(ctx, Svc::Orders, stream, count, duration, |c: opb::WatchOrdersResponse| {
        let t = c.transition.clone().unwrap_or_default();
        if ctx.json() {
            out::json_line(&view::msg(&c));
        } else {
            out::say(&format!(
                "{}  {}  {}  {} -> {}  ({})  held {}  {}",
                view::ts_short(t.time.as_ref()),
                c.order_id,
                c.buyer_id,
                view::order_state_name(t.from_state()),
                view::order_state_name(t.to_state()),
                view::cause_text(t.cause.as_ref()),
                thousands(c.held_units),
                t.detail
            ));
        }
        if until.is_some_and(|u| u.proto() == t.to_state()) {
            *reached_ref = true;
            return false;
        }
        true
    })
    .await?;
    if until.is_some() && !reached {
        return Err(Failure::Check("stopped before an order reached the state asked for with --until".to_string()));
    }
    Ok(())
}

/// Options of `chipgate backlog`.
#[derive(Args, Debug)]
#[command(after_help = "Example:\n  chipgate backlog H200-SXM-141GB --limit 20")]
pub struct BacklogArgs {
    /// Catalogue SKU.
    pub product: String,
    #[command(flatten)]
    pub list: ListArgs,
}

/// `chipgate backlog`.
pub async fn backlog(ctx: &Ctx, a: BacklogArgs) -> Outcome {
    let total = std::cell::Cell::new(0);
    let (entries, next) = pages(&a.list, |page_size, page_token| {
        let msg = opb::GetBacklogRequest { product_sku: a.product.clone(), page_size, page_token };
        let total = &total;
        async move {
            let r = ctx.call(Svc::Orders, None, ctx.ord().get_backlog(ctx.req(msg))).await?;
            total.set(r.total_orders);
            Ok((r.entries, r.next_page_token))
        }
    })
    .await?;
    if ctx.json() {
        out::json(&view::msg(&opb::GetBacklogResponse {
            product_sku: a.product,
            entries,
            next_page_token: next,
            total_orders: total.get(),
        }));
    } else {
        out::say(&format!(
            "{}: {} order(s) hold licence quota and wait for stock, served oldest first",
            a.product,
            thousands(total.get())
        ));
        if !entries.is_empty() {
            out::say("");
        }
        let mut t = out::Table::new(&[">POS", "ORDER", "BUYER", ">UNITS", ">HELD", ">SEQ", "PLACED"]);
        for e in &entries {
            t.row(vec![
                e.position.to_string(),
                e.order_id.clone(),
                e.buyer_id.clone(),
                thousands(e.units),
                thousands(e.held_units),
                e.sequence.to_string(),
                view::ts_short(e.create_time.as_ref()),
            ]);
        }
        t.print_or("");
        super::more_hint(&next);
    }
    Ok(())
}
