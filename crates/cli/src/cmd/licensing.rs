//! What the import authority, the export authority, customs and buyers do with the licensing service:
//! applications and the approval queue, waves, licences, eligibility checks, the domestic-purchase
//! ledger, export authorisations, import policy and the audit log.

use std::cell::Cell;
use std::time::{Duration, Instant};

use chipgate_proto::licensing::v1 as lpb;
use chipgate_proto::orders::v1 as opb;
use clap::{Args, Subcommand, ValueEnum};
use serde_json::json;

use super::{ListArgs, more_hint, pages, print_listing};
use crate::client::{Ctx, Failure, Outcome, Svc};
use crate::out::{self, n};
use crate::view;

// ---------------------------------------------------------------------------------------------------
// Applications and the queue
// ---------------------------------------------------------------------------------------------------

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
        ("quantity", n(a.quantity)),
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

fn show_app(ctx: &Ctx, a: Option<lpb::Application>) -> Outcome {
    let a = a.unwrap_or_default();
    if ctx.json() {
        out::json(&json!({"application": view::application(&a)}));
    } else {
        app_fields(&a);
    }
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
    show_app(ctx, r.application)
}

/// `chipgate application …`.
pub async fn application(ctx: &Ctx, cmd: ApplicationCmd) -> Outcome {
    match cmd {
        ApplicationCmd::Show { application } => {
            let msg = lpb::GetApplicationRequest { application_id: application };
            let r = ctx.call(Svc::Licensing, None, ctx.lic().get_application(ctx.req(msg))).await?;
            show_app(ctx, r.application)
        }
        ApplicationCmd::List { buyer, state, list } => {
            let buyer = buyer.unwrap_or_default();
            let state = state.map_or(0, |s| s.proto() as i32);
            let (apps, next) = pages(&list, |page_size, page_token| {
                let msg = lpb::ListApplicationsRequest { buyer_id: buyer.clone(), state, page_size, page_token };
                async move {
                    let r = ctx.call(Svc::Licensing, None, ctx.lic().list_applications(ctx.req(msg))).await?;
                    Ok((r.applications, r.next_page_token))
                }
            })
            .await?;
            print_listing(
                ctx,
                "applications",
                &apps,
                view::application,
                view::applications_table,
                "no applications",
                &next,
            );
            Ok(())
        }
        ApplicationCmd::Withdraw { application, reason } => {
            let rid = ctx.rid();
            let msg = lpb::WithdrawApplicationRequest { request_id: rid.clone(), application_id: application, reason };
            let r = ctx.call(Svc::Licensing, Some(&rid), ctx.lic().withdraw_application(ctx.req(msg))).await?;
            show_app(ctx, r.application)
        }
        ApplicationCmd::Reject { application, reason } => {
            let rid = ctx.rid();
            let msg = lpb::RejectApplicationRequest { request_id: rid.clone(), application_id: application, reason };
            let r = ctx.call(Svc::Licensing, Some(&rid), ctx.lic().reject_application(ctx.req(msg))).await?;
            show_app(ctx, r.application)
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
        return show_app(ctx, r.application);
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
        out::json(&json!({
            "applications": apps.iter().map(view::application).collect::<Vec<_>>(),
            "next_page_token": next,
            "total_queued": total.get(),
        }));
    } else {
        out::say(&format!("approval queue: {} application(s) waiting, front first", n(total.get())));
        if total.get() > 0 {
            out::say("");
        }
        view::applications_table(&apps).print_or("");
        more_hint(&next);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------
// Waves
// ---------------------------------------------------------------------------------------------------

/// The conditions a wave grant carries.
#[derive(Args, Debug, Clone, Default)]
pub struct GrantConditions {
    /// The terms are still being worked out: the licence is granted but unusable until
    /// `chipgate license finalize`.
    #[arg(long)]
    pub terms_pending: bool,
    /// Domestic chips the buyer must have bought per 10,000 licensed units in use (basis points;
    /// 2500 = one domestic chip for every four H200). 0: no ratio condition.
    #[arg(long, default_value_t = 0)]
    pub domestic_ratio_bps: u32,
    /// No single order may exceed this many units. 0: no cap.
    #[arg(long, default_value_t = 0)]
    pub per_order_cap: u64,
    /// Every order must carry a necessity justification ("buy only when necessary").
    #[arg(long)]
    pub justification_required: bool,
    /// Not usable before this instant (RFC 3339, e.g. 2026-02-01T00:00:00Z).
    #[arg(long, value_parser = parse_time)]
    pub valid_from: Option<prost_types::Timestamp>,
    /// Expires at this instant (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    pub valid_until: Option<prost_types::Timestamp>,
}

impl GrantConditions {
    /// As the API's message.
    pub fn proto(&self) -> lpb::LicenseConditions {
        lpb::LicenseConditions {
            valid_from: self.valid_from,
            valid_until: self.valid_until,
            per_order_cap: self.per_order_cap,
            domestic_ratio_bps: self.domestic_ratio_bps,
            justification_required: self.justification_required,
            terms_pending: self.terms_pending,
        }
    }
}

fn parse_time(s: &str) -> Result<prost_types::Timestamp, String> {
    s.parse().map_err(|_| format!("{s:?} is not an RFC 3339 instant (e.g. 2026-02-01T00:00:00Z)"))
}

/// `chipgate wave …`.
#[derive(Subcommand, Debug)]
pub enum WaveCmd {
    /// Draft an approval wave. A draft collects grants and changes until it is published.
    #[command(after_help = "Example:\n  chipgate wave create --name 'wave 1'")]
    Create {
        /// A name people recognise.
        #[arg(long, default_value = "")]
        name: String,
    },
    /// Grant a queued application some units (at most those applied for) with conditions, in a draft
    /// wave. Granting the same application again replaces its grant.
    #[command(
        after_help = "Example:\n  chipgate wave grant wave-1 app-1 --units 200000 --terms-pending --domestic-ratio-bps 2000 \\\n      --justification-required"
    )]
    Grant {
        /// Draft wave id.
        wave: String,
        /// Queued application id.
        application: String,
        /// Units granted.
        #[arg(long)]
        units: u64,
        #[command(flatten)]
        conditions: GrantConditions,
    },
    /// Take one application's grant out of a draft wave.
    #[command(after_help = "Example:\n  chipgate wave ungrant wave-1 app-3")]
    Ungrant {
        /// Draft wave id.
        wave: String,
        /// Application id.
        application: String,
    },
    /// Publish a draft wave atomically: every grant becomes a licence, its application leaves the
    /// queue, and the orders it concerns are re-evaluated (watch with `chipgate wave follow`).
    #[command(after_help = "Example:\n  chipgate wave publish wave-1 && chipgate wave follow wave-1")]
    Publish {
        /// Draft wave id.
        wave: String,
    },
    /// Show one wave and its grants.
    #[command(after_help = "Example:\n  chipgate wave show wave-1")]
    Show {
        /// Wave id.
        wave: String,
    },
    /// List waves, newest first.
    #[command(after_help = "Example:\n  chipgate wave list")]
    List {
        #[command(flatten)]
        list: ListArgs,
    },
    /// Follow a published wave's propagation into order eligibility with a progress bar, until every
    /// order it concerns is evaluated (exit 11 if that takes longer than --within).
    #[command(
        after_help = "Example:\n  chipgate wave follow wave-1 --within 2m\n  chipgate -o json wave follow wave-1   # JSON lines, one per change"
    )]
    Follow {
        /// Published wave id.
        wave: String,
        /// Give up after this long.
        #[arg(long, value_parser = crate::client::parse_duration, default_value = "60s")]
        within: Duration,
    },
}

/// `chipgate wave …`.
pub async fn wave(ctx: &Ctx, cmd: WaveCmd) -> Outcome {
    let shown = |ctx: &Ctx, w: Option<lpb::Wave>| {
        let w = w.unwrap_or_default();
        if ctx.json() {
            out::json(&json!({"wave": view::wave(&w)}));
        } else {
            view::print_wave(&w);
        }
    };
    match cmd {
        WaveCmd::Create { name } => {
            let rid = ctx.rid();
            let msg = lpb::CreateWaveRequest { request_id: rid.clone(), display_name: name };
            let r = ctx.call(Svc::Licensing, Some(&rid), ctx.lic().create_wave(ctx.req(msg))).await?;
            shown(ctx, r.wave);
        }
        WaveCmd::Grant { wave, application, units, conditions } => {
            let rid = ctx.rid();
            let msg = lpb::AddWaveGrantRequest {
                request_id: rid.clone(),
                wave_id: wave,
                application_id: application,
                granted_units: units,
                conditions: Some(conditions.proto()),
            };
            let r = ctx.call(Svc::Licensing, Some(&rid), ctx.lic().add_wave_grant(ctx.req(msg))).await?;
            shown(ctx, r.wave);
        }
        WaveCmd::Ungrant { wave, application } => {
            let rid = ctx.rid();
            let msg =
                lpb::RemoveWaveGrantRequest { request_id: rid.clone(), wave_id: wave, application_id: application };
            let r = ctx.call(Svc::Licensing, Some(&rid), ctx.lic().remove_wave_grant(ctx.req(msg))).await?;
            shown(ctx, r.wave);
        }
        WaveCmd::Publish { wave } => {
            let rid = ctx.rid();
            let msg = lpb::PublishWaveRequest { request_id: rid.clone(), wave_id: wave };
            let r = ctx.call(Svc::Licensing, Some(&rid), ctx.lic().publish_wave(ctx.req(msg))).await?;
            let w = r.wave.unwrap_or_default();
            if ctx.json() {
                out::json(&json!({
                    "wave": view::wave(&w),
                    "licenses": r.licenses.iter().map(view::license).collect::<Vec<_>>(),
                }));
            } else {
                out::say(&format!(
                    "published {}: {} licence(s), {} units granted",
                    w.wave_id,
                    r.licenses.len(),
                    n(w.total_granted_units)
                ));
                out::say("");
                view::licenses_table(&r.licenses).print_or("");
                out::say("");
                out::say(&format!("follow its propagation: chipgate wave follow {}", w.wave_id));
            }
        }
        WaveCmd::Show { wave } => {
            let msg = lpb::GetWaveRequest { wave_id: wave };
            let r = ctx.call(Svc::Licensing, None, ctx.lic().get_wave(ctx.req(msg))).await?;
            shown(ctx, r.wave);
        }
        WaveCmd::List { list } => {
            let (waves, next) = pages(&list, |page_size, page_token| {
                let msg = lpb::ListWavesRequest { page_size, page_token };
                async move {
                    let r = ctx.call(Svc::Licensing, None, ctx.lic().list_waves(ctx.req(msg))).await?;
                    Ok((r.waves, r.next_page_token))
                }
            })
            .await?;
            if ctx.json() {
                out::json(&json!({
                    "waves": waves.iter().map(view::wave).collect::<Vec<_>>(),
                    "next_page_token": next,
                }));
            } else {
                let mut t = out::Table::new(&["WAVE", "NAME", "STATE", ">GRANTS", ">GRANTED", "PUBLISHED"]);
                for w in &waves {
                    t.row(vec![
                        w.wave_id.clone(),
                        view::dash(&w.display_name),
                        view::wave_state(w),
                        w.grants.len().to_string(),
                        n(w.total_granted_units),
                        view::ts_short(w.publish_time.as_ref()),
                    ]);
                }
                t.print_or("no waves yet (draft one with `chipgate wave create`)");
                more_hint(&next);
            }
        }
        WaveCmd::Follow { wave, within } => {
            follow(ctx, &wave, within).await?;
        }
    }
    Ok(())
}

/// `chipgate wave follow`: a progress bar (or JSON lines) until the wave settles, then its figures.
async fn follow(ctx: &Ctx, wave_id: &str, within: Duration) -> Outcome {
    let (p, result) = follow_progress(ctx, wave_id, within, !ctx.json(), ctx.json()).await?;
    if !ctx.json() && p.observed {
        view::print_wave_progress(&p);
    }
    result
}

/// Follows a published wave's propagation until every order it concerns is evaluated or `within`
/// passes, with a progress bar on stderr (`bar`) and/or a JSON line per change (`lines`). Returns the
/// last progress seen and whether it settled in time (a [`Failure::Check`] when not).
pub async fn follow_progress(
    ctx: &Ctx,
    wave_id: &str,
    within: Duration,
    bar: bool,
    lines: bool,
) -> Result<(opb::WaveProgress, Outcome), Failure> {
    let msg = lpb::GetWaveRequest { wave_id: wave_id.to_string() };
    let w = ctx.call(Svc::Licensing, None, ctx.lic().get_wave(ctx.req(msg))).await?.wave.unwrap_or_default();
    if w.state() != lpb::WaveState::Published {
        return Err(Failure::Check(format!(
            "{wave_id} is a draft: nothing propagates until it is published (`chipgate wave publish {wave_id}`)"
        )));
    }
    let bar = bar.then(|| out::progress(0, "evaluated"));
    let start = Instant::now();
    let mut last: Option<opb::WaveProgress> = None;
    let result = loop {
        let msg = opb::GetWaveProgressRequest { wave_id: wave_id.to_string() };
        let p = match ctx.call(Svc::Orders, None, ctx.ord().get_wave_progress(ctx.req(msg))).await {
            Ok(r) => r.progress.unwrap_or_default(),
            Err(e) => {
                if let Some(bar) = &bar {
                    bar.finish_and_clear();
                }
                return Err(e);
            }
        };
        if let Some(bar) = &bar {
            bar.set_length(p.orders_concerned);
            bar.set_position(p.orders_evaluated.min(p.orders_concerned));
        }
        if lines && last.as_ref() != Some(&p) {
            out::json_line(&json!({"progress": view::wave_progress(&p)}));
        }
        let settled = p.observed && p.settle_time.is_some();
        let (evaluated, concerned) = (p.orders_evaluated, p.orders_concerned);
        last = Some(p);
        if settled {
            break Ok(());
        }
        if start.elapsed() >= within {
            break Err(Failure::Check(format!(
                "{wave_id} did not settle within {within:.0?}: {} of {} concerned orders evaluated",
                n(evaluated),
                n(concerned)
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok((last.unwrap_or_default(), result))
}

// ---------------------------------------------------------------------------------------------------
// Licences
// ---------------------------------------------------------------------------------------------------

/// Where a licence stands (for filters).
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LicState {
    /// Granted, terms still being worked out.
    PendingTerms,
    /// Usable.
    Active,
    /// Temporarily unusable.
    Suspended,
    /// Withdrawn for good.
    Revoked,
    /// Past its validity window.
    Expired,
    /// Every granted unit in use.
    Exhausted,
}

impl LicState {
    fn proto(self) -> lpb::LicenseState {
        match self {
            LicState::PendingTerms => lpb::LicenseState::PendingTerms,
            LicState::Active => lpb::LicenseState::Active,
            LicState::Suspended => lpb::LicenseState::Suspended,
            LicState::Revoked => lpb::LicenseState::Revoked,
            LicState::Expired => lpb::LicenseState::Expired,
            LicState::Exhausted => lpb::LicenseState::Exhausted,
        }
    }
}

/// Final terms: each flag changes only the condition it names; the others stay as granted.
#[derive(Args, Debug, Clone, Default)]
pub struct FinalTerms {
    /// New domestic ratio (basis points; 0 removes the condition).
    #[arg(long)]
    pub domestic_ratio_bps: Option<u32>,
    /// New per-order cap (0 removes it).
    #[arg(long)]
    pub per_order_cap: Option<u64>,
    /// Whether every order must carry a necessity justification.
    #[arg(long)]
    pub justification_required: Option<bool>,
    /// New start of validity (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    pub valid_from: Option<prost_types::Timestamp>,
    /// New end of validity (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    pub valid_until: Option<prost_types::Timestamp>,
}

impl FinalTerms {
    fn any(&self) -> bool {
        self.domestic_ratio_bps.is_some()
            || self.per_order_cap.is_some()
            || self.justification_required.is_some()
            || self.valid_from.is_some()
            || self.valid_until.is_some()
    }
}

/// `chipgate license …`.
#[derive(Subcommand, Debug)]
pub enum LicenseCmd {
    /// Show one licence: state, quota granted/used/remaining, conditions.
    #[command(after_help = "Example:\n  chipgate license show lic-1")]
    Show {
        /// Licence id.
        license: String,
    },
    /// List licences, optionally of one buyer, product, wave or state.
    #[command(
        after_help = "Examples:\n  chipgate license list --wave wave-1\n  chipgate license list --state pending-terms"
    )]
    List {
        /// Only this buyer's.
        #[arg(long)]
        buyer: Option<String>,
        /// Only for this product.
        #[arg(long)]
        product: Option<String>,
        /// Only from this wave.
        #[arg(long)]
        wave: Option<String>,
        /// Only in this state.
        #[arg(long, value_enum)]
        state: Option<LicState>,
        #[command(flatten)]
        list: ListArgs,
    },
    /// Finalise the terms of a licence that is PENDING_TERMS: it becomes ACTIVE and the buyer's
    /// waiting orders are re-evaluated. Flags change the conditions they name; the rest stay.
    #[command(
        after_help = "Examples:\n  chipgate license finalize lic-1\n  chipgate license finalize lic-2 --domestic-ratio-bps 1500"
    )]
    Finalize {
        /// Licence id.
        license: String,
        #[command(flatten)]
        terms: FinalTerms,
    },
    /// Suspend an ACTIVE licence: its unconfirmed orders go back to waiting and their quota returns.
    #[command(after_help = "Example:\n  chipgate license suspend lic-1 --reason 'ratio audit pending'")]
    Suspend {
        /// Licence id.
        license: String,
        /// Why (recorded in the audit log and shown to the buyer).
        #[arg(long)]
        reason: String,
    },
    /// Reinstate a SUSPENDED licence; its buyer's waiting orders are re-evaluated.
    #[command(after_help = "Example:\n  chipgate license reinstate lic-1 --reason 'audit passed'")]
    Reinstate {
        /// Licence id.
        license: String,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Revoke a licence for good.
    #[command(after_help = "Example:\n  chipgate license revoke lic-1 --reason 'diversion suspected'")]
    Revoke {
        /// Licence id.
        license: String,
        /// Why.
        #[arg(long)]
        reason: String,
    },
}

fn show_license(ctx: &Ctx, l: Option<lpb::License>) {
    let l = l.unwrap_or_default();
    if ctx.json() {
        out::json(&json!({"license": view::license(&l)}));
    } else {
        view::print_license(&l);
    }
}

/// `chipgate license …`.
pub async fn license(ctx: &Ctx, cmd: LicenseCmd) -> Outcome {
    match cmd {
        LicenseCmd::Show { license } => {
            let msg = lpb::GetLicenseRequest { license_id: license };
            let r = ctx.call(Svc::Licensing, None, ctx.lic().get_license(ctx.req(msg))).await?;
            show_license(ctx, r.license);
        }
        LicenseCmd::List { buyer, product, wave, state, list } => {
            let (buyer, product, wave) =
                (buyer.unwrap_or_default(), product.unwrap_or_default(), wave.unwrap_or_default());
            let state = state.map_or(0, |s| s.proto() as i32);
            let (ls, next) = pages(&list, |page_size, page_token| {
                let msg = lpb::ListLicensesRequest {
                    buyer_id: buyer.clone(),
                    product_sku: product.clone(),
                    wave_id: wave.clone(),
                    state,
                    page_size,
                    page_token,
                };
                async move {
                    let r = ctx.call(Svc::Licensing, None, ctx.lic().list_licenses(ctx.req(msg))).await?;
                    Ok((r.licenses, r.next_page_token))
                }
            })
            .await?;
            print_listing(ctx, "licenses", &ls, view::license, view::licenses_table, "no licences", &next);
        }
        LicenseCmd::Finalize { license, terms } => {
            let conditions = if terms.any() {
                let msg = lpb::GetLicenseRequest { license_id: license.clone() };
                let cur = ctx.call(Svc::Licensing, None, ctx.lic().get_license(ctx.req(msg))).await?;
                let mut c = cur.license.unwrap_or_default().conditions.unwrap_or_default();
                if let Some(v) = terms.domestic_ratio_bps {
                    c.domestic_ratio_bps = v;
                }
                if let Some(v) = terms.per_order_cap {
                    c.per_order_cap = v;
                }
                if let Some(v) = terms.justification_required {
                    c.justification_required = v;
                }
                if terms.valid_from.is_some() {
                    c.valid_from = terms.valid_from;
                }
                if terms.valid_until.is_some() {
                    c.valid_until = terms.valid_until;
                }
                c.terms_pending = false;
                Some(c)
            } else {
                None
            };
            let rid = ctx.rid();
            let msg = lpb::FinalizeTermsRequest { request_id: rid.clone(), license_id: license, conditions };
            let r = ctx.call(Svc::Licensing, Some(&rid), ctx.lic().finalize_terms(ctx.req(msg))).await?;
            show_license(ctx, r.license);
        }
        LicenseCmd::Suspend { license, reason } => {
            let rid = ctx.rid();
            let msg = lpb::SuspendLicenseRequest { request_id: rid.clone(), license_id: license, reason };
            let r = ctx.call(Svc::Licensing, Some(&rid), ctx.lic().suspend_license(ctx.req(msg))).await?;
            show_license(ctx, r.license);
        }
        LicenseCmd::Reinstate { license, reason } => {
            let rid = ctx.rid();
            let msg = lpb::ReinstateLicenseRequest { request_id: rid.clone(), license_id: license, reason };
            let r = ctx.call(Svc::Licensing, Some(&rid), ctx.lic().reinstate_license(ctx.req(msg))).await?;
            show_license(ctx, r.license);
        }
        LicenseCmd::Revoke { license, reason } => {
            let rid = ctx.rid();
            let msg = lpb::RevokeLicenseRequest { request_id: rid.clone(), license_id: license, reason };
            let r = ctx.call(Svc::Licensing, Some(&rid), ctx.lic().revoke_license(ctx.req(msg))).await?;
            show_license(ctx, r.license);
        }
    }
    Ok(())
}

/// Options of `chipgate check`.
#[derive(Args, Debug)]
#[command(
    after_help = "Example:\n  chipgate check --buyer alibaba --product H200-SXM-141GB --units 5000 --justification 'Qwen training'"
)]
pub struct CheckArgs {
    /// The buyer.
    #[arg(long)]
    pub buyer: String,
    /// Catalogue SKU.
    #[arg(long)]
    pub product: String,
    /// Units of the prospective order.
    #[arg(long)]
    pub units: u64,
    /// The necessity justification the order would carry.
    #[arg(long, default_value = "")]
    pub justification: String,
}

/// `chipgate check`.
pub async fn check(ctx: &Ctx, a: CheckArgs) -> Outcome {
    let msg = lpb::CheckEligibilityRequest {
        buyer_id: a.buyer.clone(),
        product_sku: a.product.clone(),
        units: a.units,
        justification: a.justification,
    };
    let r = ctx.call(Svc::Licensing, None, ctx.lic().check_eligibility(ctx.req(msg))).await?;
    if ctx.json() {
        out::json(&json!({
            "eligible": r.eligible,
            "license_id": r.license_id,
            "failures": r.failures.iter().map(view::condition_failure).collect::<Vec<_>>(),
            "rejectable": r.rejectable,
        }));
    } else if r.eligible {
        out::say(&format!(
            "eligible: an order of {} x {} by {} would take quota from {}",
            n(a.units),
            a.product,
            a.buyer,
            r.license_id
        ));
    } else {
        out::say(&format!(
            "not eligible{}: an order of {} x {} by {} fails these conditions",
            if r.rejectable { " (and never will be under the licences held)" } else { " yet" },
            n(a.units),
            a.product,
            a.buyer
        ));
        out::say("");
        view::failures_table(&r.failures).print_or("");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------
// Domestic purchases, export, customs, audit
// ---------------------------------------------------------------------------------------------------

/// `chipgate domestic …`.
#[derive(Subcommand, Debug)]
pub enum DomesticCmd {
    /// Record a buyer's purchase of domestic accelerators (counts towards domestic-ratio conditions;
    /// the buyer's waiting orders are re-evaluated). Idempotent per evidence reference.
    #[command(
        after_help = "Example:\n  chipgate domestic record --buyer bytedance --units 40000 --supplier huawei --evidence INV-2026-0113"
    )]
    Record {
        /// The buyer.
        #[arg(long)]
        buyer: String,
        /// Domestic units bought.
        #[arg(long)]
        units: u64,
        /// Who sold them, e.g. huawei or cambricon.
        #[arg(long)]
        supplier: String,
        /// Reference to the evidence (invoice, customs record); unique per buyer. Generated when absent.
        #[arg(long)]
        evidence: Option<String>,
    },
    /// Show a buyer's domestic-purchase ledger and its running total.
    #[command(after_help = "Example:\n  chipgate domestic show bytedance")]
    Show {
        /// The buyer.
        buyer: String,
        #[command(flatten)]
        list: ListArgs,
    },
}

/// `chipgate domestic …`.
pub async fn domestic(ctx: &Ctx, cmd: DomesticCmd) -> Outcome {
    match cmd {
        DomesticCmd::Record { buyer, units, supplier, evidence } => {
            let rid = ctx.rid();
            let evidence_ref = evidence.unwrap_or_else(|| format!("evidence-{rid}"));
            let msg = lpb::RecordDomesticPurchaseRequest {
                request_id: rid.clone(),
                buyer_id: buyer,
                units,
                supplier,
                evidence_ref,
            };
            let r = ctx.call(Svc::Licensing, Some(&rid), ctx.lic().record_domestic_purchase(ctx.req(msg))).await?;
            let p = r.purchase.unwrap_or_default();
            if ctx.json() {
                out::json(&json!({
                    "purchase": view::domestic_purchase(&p),
                    "total_domestic_units": r.total_domestic_units,
                }));
            } else {
                out::say(&format!(
                    "recorded {} domestic units from {} for {} (evidence {}); {} now totals {} domestic units",
                    n(p.units),
                    p.supplier,
                    p.buyer_id,
                    p.evidence_ref,
                    p.buyer_id,
                    n(r.total_domestic_units)
                ));
            }
        }
        DomesticCmd::Show { buyer, list } => {
            let total = Cell::new(0);
            let (purchases, next) = pages(&list, |page_size, page_token| {
                let msg = lpb::GetDomesticLedgerRequest { buyer_id: buyer.clone(), page_size, page_token };
                let total = &total;
                async move {
                    let r = ctx.call(Svc::Licensing, None, ctx.lic().get_domestic_ledger(ctx.req(msg))).await?;
                    total.set(r.total_domestic_units);
                    Ok((r.purchases, r.next_page_token))
                }
            })
            .await?;
            if ctx.json() {
                out::json(&json!({
                    "buyer_id": buyer,
                    "total_domestic_units": total.get(),
                    "purchases": purchases.iter().map(view::domestic_purchase).collect::<Vec<_>>(),
                    "next_page_token": next,
                }));
            } else {
                out::say(&format!("{buyer}: {} domestic units recorded", n(total.get())));
                if !purchases.is_empty() {
                    out::say("");
                }
                let mut t = out::Table::new(&["RECORDED", "SUPPLIER", ">UNITS", "EVIDENCE"]);
                for p in &purchases {
                    t.row(vec![
                        view::ts_short(p.record_time.as_ref()),
                        p.supplier.clone(),
                        n(p.units),
                        p.evidence_ref.clone(),
                    ]);
                }
                t.print_or("");
                more_hint(&next);
            }
        }
    }
    Ok(())
}

/// `chipgate export …`.
#[derive(Subcommand, Debug)]
pub enum ExportCmd {
    /// The export authority lets the vendor export a product to a destination. Without it nothing of
    /// that product is eligible, whatever the import licence says.
    #[command(
        after_help = "Example:\n  chipgate export grant --product H200-SXM-141GB --destination CN --vendor nvidia --reference BIS-2026-0042"
    )]
    Grant {
        /// Catalogue SKU.
        #[arg(long)]
        product: String,
        /// Destination country (ISO 3166-1 alpha-2).
        #[arg(long, default_value = "CN")]
        destination: String,
        /// The exporting vendor.
        #[arg(long, default_value = "nvidia")]
        vendor: String,
        /// The export licence reference, e.g. a BIS case number.
        #[arg(long, default_value = "")]
        reference: String,
    },
    /// The export authority withdraws an export authorisation; unconfirmed orders go back to waiting.
    #[command(
        after_help = "Example:\n  chipgate export revoke --product H200-SXM-141GB --destination CN --reason 'policy change'"
    )]
    Revoke {
        /// Catalogue SKU.
        #[arg(long)]
        product: String,
        /// Destination country.
        #[arg(long, default_value = "CN")]
        destination: String,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// List export authorisations.
    #[command(after_help = "Example:\n  chipgate export list")]
    List {
        #[command(flatten)]
        list: ListArgs,
    },
}

/// `chipgate export …`.
pub async fn export(ctx: &Ctx, cmd: ExportCmd) -> Outcome {
    let shown = |ctx: &Ctx, a: Option<lpb::ExportAuthorization>| {
        let a = a.unwrap_or_default();
        if ctx.json() {
            out::json(&json!({"authorization": view::export_authorization(&a)}));
        } else {
            view::exports_table(std::slice::from_ref(&a)).print_or("");
        }
    };
    match cmd {
        ExportCmd::Grant { product, destination, vendor, reference } => {
            let rid = ctx.rid();
            let msg = lpb::GrantExportAuthorizationRequest {
                request_id: rid.clone(),
                vendor,
                product_sku: product,
                destination,
                reference,
            };
            let r = ctx.call(Svc::Licensing, Some(&rid), ctx.lic().grant_export_authorization(ctx.req(msg))).await?;
            shown(ctx, r.authorization);
        }
        ExportCmd::Revoke { product, destination, reason } => {
            let rid = ctx.rid();
            let msg = lpb::RevokeExportAuthorizationRequest {
                request_id: rid.clone(),
                product_sku: product,
                destination,
                reason,
            };
            let r = ctx.call(Svc::Licensing, Some(&rid), ctx.lic().revoke_export_authorization(ctx.req(msg))).await?;
            shown(ctx, r.authorization);
        }
        ExportCmd::List { list } => {
            let (all, next) = pages(&list, |page_size, page_token| {
                let msg = lpb::ListExportAuthorizationsRequest { page_size, page_token };
                async move {
                    let r = ctx.call(Svc::Licensing, None, ctx.lic().list_export_authorizations(ctx.req(msg))).await?;
                    Ok((r.authorizations, r.next_page_token))
                }
            })
            .await?;
            print_listing(
                ctx,
                "authorizations",
                &all,
                view::export_authorization,
                view::exports_table,
                "no export authorisations",
                &next,
            );
        }
    }
    Ok(())
}

/// Customs' stance on a product.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Stance {
    /// The product may enter.
    Open,
    /// The product may not enter; nothing of it is reserved.
    Embargoed,
}

/// `chipgate customs …`.
#[derive(Subcommand, Debug)]
pub enum CustomsCmd {
    /// Customs sets a product's import policy. While EMBARGOED nothing of it is reserved; lifting the
    /// embargo (OPEN) re-evaluates every waiting order of the product.
    #[command(
        after_help = "Examples:\n  chipgate customs set H200-SXM-141GB embargoed --reason 'customs notice: H200 may not enter'\n  chipgate customs set H200-SXM-141GB open --reason 'embargo lifted'"
    )]
    Set {
        /// Catalogue SKU.
        product: String,
        /// open or embargoed.
        #[arg(value_enum)]
        stance: Stance,
        /// Why, e.g. the customs notice.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Show a product's import policy (OPEN when never set).
    #[command(after_help = "Example:\n  chipgate customs show H200-SXM-141GB")]
    Show {
        /// Catalogue SKU.
        product: String,
    },
    /// List the import policies that were ever set.
    #[command(after_help = "Example:\n  chipgate customs list")]
    List {
        #[command(flatten)]
        list: ListArgs,
    },
}

/// `chipgate customs …`.
pub async fn customs(ctx: &Ctx, cmd: CustomsCmd) -> Outcome {
    let shown = |ctx: &Ctx, p: Option<lpb::ImportPolicy>| {
        let p = p.unwrap_or_default();
        if ctx.json() {
            out::json(&json!({"policy": view::import_policy(&p)}));
        } else {
            view::policies_table(std::slice::from_ref(&p)).print_or("");
        }
    };
    match cmd {
        CustomsCmd::Set { product, stance, reason } => {
            let stance = match stance {
                Stance::Open => lpb::ImportStance::Open,
                Stance::Embargoed => lpb::ImportStance::Embargoed,
            };
            let rid = ctx.rid();
            let msg = lpb::SetImportPolicyRequest {
                request_id: rid.clone(),
                product_sku: product,
                stance: stance as i32,
                reason,
            };
            let r = ctx.call(Svc::Licensing, Some(&rid), ctx.lic().set_import_policy(ctx.req(msg))).await?;
            shown(ctx, r.policy);
        }
        CustomsCmd::Show { product } => {
            let msg = lpb::GetImportPolicyRequest { product_sku: product };
            let r = ctx.call(Svc::Licensing, None, ctx.lic().get_import_policy(ctx.req(msg))).await?;
            shown(ctx, r.policy);
        }
        CustomsCmd::List { list } => {
            let (all, next) = pages(&list, |page_size, page_token| {
                let msg = lpb::ListImportPoliciesRequest { page_size, page_token };
                async move {
                    let r = ctx.call(Svc::Licensing, None, ctx.lic().list_import_policies(ctx.req(msg))).await?;
                    Ok((r.policies, r.next_page_token))
                }
            })
            .await?;
            print_listing(
                ctx,
                "policies",
                &all,
                view::import_policy,
                view::policies_table,
                "no import policy was ever set: every product is OPEN",
                &next,
            );
        }
    }
    Ok(())
}

/// `chipgate audit …`.
#[derive(Subcommand, Debug)]
pub enum AuditCmd {
    /// List audit entries, oldest first: who decided what, when and why.
    #[command(after_help = "Examples:\n  chipgate audit list --limit 20\n  chipgate audit list --subject wave-1")]
    List {
        /// Only entries about this subject (a wave, licence, application, product...).
        #[arg(long)]
        subject: Option<String>,
        #[command(flatten)]
        list: ListArgs,
    },
    /// Recompute the audit log's hash chain; exit 11 if any entry does not verify.
    #[command(after_help = "Example:\n  chipgate audit verify")]
    Verify,
}

/// `chipgate audit …`.
pub async fn audit(ctx: &Ctx, cmd: AuditCmd) -> Outcome {
    match cmd {
        AuditCmd::List { subject, list } => {
            let subject = subject.unwrap_or_default();
            let (entries, next) = pages(&list, |page_size, page_token| {
                let msg = lpb::ListAuditEntriesRequest { subject: subject.clone(), page_size, page_token };
                async move {
                    let r = ctx.call(Svc::Licensing, None, ctx.lic().list_audit_entries(ctx.req(msg))).await?;
                    Ok((r.entries, r.next_page_token))
                }
            })
            .await?;
            if ctx.json() {
                out::json(&json!({
                    "entries": entries.iter().map(view::audit_entry).collect::<Vec<_>>(),
                    "next_page_token": next,
                }));
            } else {
                let mut t = out::Table::new(&[">SEQ", "TIME", "ACTOR", "ACTION", "SUBJECT", "DETAIL"]);
                for e in &entries {
                    t.row(vec![
                        e.sequence.to_string(),
                        view::ts_short(e.time.as_ref()),
                        e.actor.clone(),
                        e.action.clone(),
                        e.subject.clone(),
                        e.detail.clone(),
                    ]);
                }
                t.print_or("no audit entries");
                more_hint(&next);
            }
            Ok(())
        }
        AuditCmd::Verify => {
            let r = ctx
                .call(Svc::Licensing, None, ctx.lic().verify_audit_log(ctx.req(lpb::VerifyAuditLogRequest {})))
                .await?;
            if ctx.json() {
                out::json(&json!({
                    "valid": r.valid,
                    "entries_checked": r.entries_checked,
                    "first_bad_sequence": r.first_bad_sequence,
                    "problem": r.problem,
                    "head_hash": r.head_hash,
                }));
            } else if r.valid {
                out::say(&format!(
                    "audit log intact: {} entries verify; head {}",
                    n(r.entries_checked),
                    view::dash(&r.head_hash)
                ));
            } else {
                out::say(&format!(
                    "audit log BROKEN at entry {}: {} ({} entries checked)",
                    r.first_bad_sequence,
                    r.problem,
                    n(r.entries_checked)
                ));
            }
            if r.valid {
                Ok(())
            } else {
                Err(Failure::Check(format!("audit entry {} does not verify: {}", r.first_bad_sequence, r.problem)))
            }
        }
    }
}
