//! Licence applications and the approval queue (licensing): a buyer applies, withdraws; the import
//! authority shows, moves and rejects.

use std::cell::Cell;

use chipgate_proto::licensing::v1 as lpb;
use clap::{Args, Subcommand, ValueEnum};

use super::{ListArgs, more_hint, pages, print_listing, show};
use crate::client::{Ctx, Outcome, Svc};
use crate::out::{self, thousands};
use crate::view;

/// Options of `chipgate apply`.
#[derive(Args, Debug)]
#[command(
    after_help = "Example:\n  chipgate apply --buyer bytedance --product H200-SXM-141GB --quantity 200000 \\\n      --end-use 'LLM training' --site Ulanqab"
)]
pub struct ApplyArgs {
    /// The importing company, e.g. bytedance.
    #[arg(long)]
    pub buyer: String,
    /// Catalogue SKU, e.g. H200-SXM-141GB (see `chipgate products`).
    #[arg(long)]
    pub product: String,
    /// Units applied for.
    #[arg(long)]
    pub quantity: u64,
    /// What the chips will be used for.
    #[arg(long)]
    pub end_use: String,
    /// Where they will be installed.
    #[arg(long)]
    pub site: String,
    /// Importing country (ISO 3166-1 alpha-2).
    #[arg(long, default_value = "CN")]
    pub destination: String,
}

/// Where an application stands (for filters).
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum AppState {
    /// Waiting in the approval queue.
    Queued,
    /// Granted in a published wave.
    Granted,
    /// Taken back by the buyer.
    Withdrawn,
    /// Turned down by the import authority.
    Rejected,
}

impl AppState {
    fn proto(self) -> lpb::ApplicationState {
        match self {
            AppState::Queued => lpb::ApplicationState::Queued,
            AppState::Granted => lpb::ApplicationState::Granted,
            AppState::Withdrawn => lpb::ApplicationState::Withdrawn,
            AppState::Rejected => lpb::ApplicationState::Rejected,
        }
    }
}

/// `chipgate application …`.
#[derive(Subcommand, Debug)]
pub enum ApplicationCmd {
    /// Show one application: where it stands, its queue position while queued, the licence it became.
    #[command(after_help = "Example:\n  chipgate application show app-4")]
    Show {
        /// Application id, e.g. app-4.
        application: String,
    },
    /// List applications, newest first.
    #[command(
        after_help = "Examples:\n  chipgate application list --buyer moonshot\n  chipgate application list --state rejected"
    )]
    List {
        /// Only this buyer's.
        #[arg(long)]
        buyer: Option<String>,
        /// Only those in this state.
        #[arg(long, value_enum)]
        state: Option<AppState>,
        #[command(flatten)]
        list: ListArgs,
    },
    /// The buyer takes a queued application back; it leaves the queue.
    #[command(after_help = "Example:\n  chipgate application withdraw app-9 --reason 'plans changed'")]
    Withdraw {
        /// Application id.
        application: String,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// The import authority turns a queued application down; it leaves the queue.
    #[command(after_help = "Example:\n  chipgate application reject app-9 --reason 'end use not credible'")]
    Reject {
        /// Application id.
        application: String,
        /// Why the authority says no (required; the buyer sees it).
        #[arg(long)]
        reason: String,
    },
}

/// Options of `chipgate queue`.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct QueueArgs {
    #[command(subcommand)]
    pub cmd: Option<QueueCmd>,
    #[command(flatten)]
    pub list: ListArgs,
}

/// `chipgate queue …`.
#[derive(Subcommand, Debug)]
pub enum QueueCmd {
    /// Move a queued application to another position (1 = front; past the end = back).
    #[command(after_help = "Example:\n  chipgate queue move app-7 --to 1")]
    Move {
        /// Application id.
        application: String,
        /// New 1-based position.
        #[arg(long)]
        to: u64,
    },
}

fn app_fields(a: &lpb::Application) {
    let mut pairs = vec![
        ("application", a.application_id.clone()),
        ("buyer", a.buyer_id.clone()),
        ("product", format!("{} to {}", a.product_sku, a.destination)),
        ("quantity", thousands(a.quantity)),
        ("state", view::app_state(a)),
    ];
    if a.queue_position > 0 {
        pairs.push(("queue position", a.queue_position.to_string()));
    }
    if !a.reason.is_empty() {
        pairs.push(("reason", a.reason.clone()));
    }
    if !a.license_id.is_empty() {
        pairs.push(("licence", format!("{} (wave {})", a.license_id, a.wave_id)));
    }
    pairs.push(("end use", a.end_use.clone()));
    pairs.push(("site", a.site.clone()));
    pairs.push(("submitted", view::ts_short(a.submit_time.as_ref())));
    out::fields(&pairs);
}

fn show_app<M: prost::Message>(ctx: &Ctx, r: &M, a: Option<&lpb::Application>) -> Outcome {
    show(ctx, r, || app_fields(&a.cloned().unwrap_or_default()));
    Ok(())
}

/// `chipgate apply`.
pub async fn apply(ctx: &Ctx, a: ApplyArgs) -> Outcome {
    let rid = ctx.rid();
    let msg = lpb::SubmitApplicationRequest {
        request_id: rid.clone(),
        buyer_id: a.buyer,
        product_sku: a.product,
        quantity: a.quantity,
        end_use: a.end_use,
        site: a.site,
        destination: a.destination,
    };
    let r = ctx.call(Svc::Licensing, Some(&rid), ctx.lic().submit_application(ctx.req(msg))).await?;
    show_app(ctx, &r, r.application.as_ref())
}

/// `chipgate application …`.
pub async fn application(ctx: &Ctx, cmd: ApplicationCmd) -> Outcome {
    match cmd {
        ApplicationCmd::Show { application } => {
            let msg = lpb::GetApplicationRequest { application_id: application };
            let r = ctx.call(Svc::Licensing, None, ctx.lic().get_application(ctx.req(msg))).await?;
            show_app(ctx, &r, r.application.as_ref())
        }
        ApplicationCmd::List { buyer, state, list } => {
            let buyer = buyer.unwrap_or_default();
            let state = state.map_or(0, |s| s.proto() as i32);
            let listed = pages(&list, |page_size, page_token| {
                let msg = lpb::ListApplicationsRequest { buyer_id: buyer.clone(), state, page_size, page_token };
                async move {
                    let r = ctx.call(Svc::Licensing, None, ctx.lic().list_applications(ctx.req(msg))).await?;
                    Ok((r.applications, r.next_page_token))
                }
            })
            .await?;
            print_listing(
                ctx,
                listed,
                |applications, next_page_token| lpb::ListApplicationsResponse { applications, next_page_token },
                view::applications_table,
                "no applications",
            );
            Ok(())
        }
        ApplicationCmd::Withdraw { application, reason } => {
            let rid = ctx.rid();
            let msg = lpb::WithdrawApplicationRequest { request_id: rid.clone(), application_id: application, reason };
            let r = ctx.call(Svc::Licensing, Some(&rid), ctx.lic().withdraw_application(ctx.req(msg))).await?;
            show_app(ctx, &r, r.application.as_ref())
        }
        ApplicationCmd::Reject { application, reason } => {
            let rid = ctx.rid();
            let msg = lpb::RejectApplicationRequest { request_id: rid.clone(), application_id: application, reason };
            let r = ctx.call(Svc::Licensing, Some(&rid), ctx.lic().reject_application(ctx.req(msg))).await?;
            show_app(ctx, &r, r.application.as_ref())
        }
    }
}

/// `chipgate queue`.
pub async fn queue(ctx: &Ctx, q: QueueArgs) -> Outcome {
    if let Some(QueueCmd::Move { application, to }) = q.cmd {
        let rid = ctx.rid();
        let msg =
            lpb::MoveQueuedApplicationRequest { request_id: rid.clone(), application_id: application, position: to };
        let r = ctx.call(Svc::Licensing, Some(&rid), ctx.lic().move_queued_application(ctx.req(msg))).await?;
        return show_app(ctx, &r, r.application.as_ref());
    }
    let total = Cell::new(0);
    let (apps, next) = pages(&q.list, |page_size, page_token| {
        let msg = lpb::ListQueueRequest { page_size, page_token };
        let total = &total;
        async move {
            let r = ctx.call(Svc::Licensing, None, ctx.lic().list_queue(ctx.req(msg))).await?;
            total.set(r.total_queued);
            Ok((r.applications, r.next_page_token))
        }
    })
    .await?;
    if ctx.json() {
        let r = lpb::ListQueueResponse { applications: apps, next_page_token: next, total_queued: total.get() };
        out::json(&view::msg(&r));
    } else {
        out::say(&format!("approval queue: {} application(s) waiting, front first", thousands(total.get())));
        if total.get() > 0 {
            out::say("");
        }
        view::applications_table(&apps).print_or("");
        more_hint(&next);
    }
    Ok(())
}
