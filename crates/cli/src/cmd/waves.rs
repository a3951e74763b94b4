//! Approval waves (licensing): the import authority drafts one, grants queued applications quota
//! with conditions, publishes it, and follows its propagation into orders.

use std::time::{Duration, Instant};

use chipgate_proto::licensing::v1 as lpb;
use chipgate_proto::orders::v1 as opb;
use clap::{Args, Subcommand};

use super::{ListArgs, pages, parse_time, print_listing, show};
use crate::client::{Ctx, Failure, Outcome, Svc};
use crate::out::{self, thousands};
use crate::view;

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
    /// What publishing a draft wave now would do, changing nothing: per buyer, the orders that would
    /// take quota, be reserved or backordered, or keep waiting and why; how free stock would be
    /// shared; and every order that would move. The same rules as the publication's propagation.
    #[command(after_help = "Examples:
  chipgate --as import_authority wave preview wave-1
  chipgate --as vendor -o json wave preview wave-1 | jq .buyers")]
    Preview {
        /// Draft wave id.
        wave: String,
        /// List at most this many orders (the per-buyer figures count them all).
        #[arg(long, default_value_t = 50)]
        max_orders: i32,
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
    match cmd {
        WaveCmd::Create { name } => {
            let rid = ctx.rid();
            let msg = lpb::CreateWaveRequest { request_id: rid.clone(), display_name: name };
            let r = ctx.call(Svc::Licensing, Some(&rid), ctx.lic().create_wave(ctx.req(msg))).await?;
            show(ctx, &r, || view::print_wave(&r.wave.clone().unwrap_or_default()));
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
            show(ctx, &r, || {
                view::print_grant_change(
                    "granted",
                    &r.wave.clone().unwrap_or_default(),
                    &r.grant.clone().unwrap_or_default(),
                )
            });
        }
        WaveCmd::Ungrant { wave, application } => {
            let rid = ctx.rid();
            let msg =
                lpb::RemoveWaveGrantRequest { request_id: rid.clone(), wave_id: wave, application_id: application };
            let r = ctx.call(Svc::Licensing, Some(&rid), ctx.lic().remove_wave_grant(ctx.req(msg))).await?;
            show(ctx, &r, || {
                view::print_grant_change(
                    "removed",
                    &r.wave.clone().unwrap_or_default(),
                    &r.grant.clone().unwrap_or_default(),
                )
            });
        }
        WaveCmd::Publish { wave } => {
            let rid = ctx.rid();
            let msg = lpb::PublishWaveRequest { request_id: rid.clone(), wave_id: wave };
            let r = ctx.call(Svc::Licensing, Some(&rid), ctx.lic().publish_wave(ctx.req(msg))).await?;
            show(ctx, &r, || {
                let w = r.wave.clone().unwrap_or_default();
                out::say(&format!(
                    "published {}: {} licence(s), {} units granted",
                    w.wave_id,
                    r.licenses.len(),
                    thousands(w.total_granted_units)
                ));
                out::say("");
                view::licenses_table(&r.licenses).print_or("");
                out::say("");
                out::say(&format!("follow its propagation: chipgate wave follow {}", w.wave_id));
            });
        }
        WaveCmd::Preview { wave, max_orders } => {
            let msg = opb::PreviewWaveRequest { wave_id: wave, max_orders };
            let r = ctx.call(Svc::Orders, None, ctx.ord().preview_wave(ctx.req(msg))).await?;
            show(ctx, &r, || print_wave_preview(&r));
        }
        WaveCmd::Show { wave } => {
            let msg = lpb::GetWaveRequest { wave_id: wave };
            let r = ctx.call(Svc::Licensing, None, ctx.lic().get_wave(ctx.req(msg))).await?;
            show(ctx, &r, || view::print_wave(&r.wave.clone().unwrap_or_default()));
        }
        WaveCmd::List { list } => {
            let listed = pages(&list, |page_size, page_token| {
                let msg = lpb::ListWavesRequest { page_size, page_token };
                async move {
                    let r = ctx.call(Svc::Licensing, None, ctx.lic().list_waves(ctx.req(msg))).await?;
                    Ok((r.waves, r.next_page_token))
                }
            })
            .await?;
            let table = |waves: &[lpb::Wave]| {
                let mut t = out::Table::new(&["WAVE", "NAME", "STATE", ">GRANTS", ">GRANTED", "PUBLISHED"]);
                for w in waves {
                    t.row(vec![
                        w.wave_id.clone(),
                        view::dash(&w.display_name),
                        view::wave_state(w),
                        view::grant_count(w).to_string(),
                        thousands(w.total_granted_units),
                        view::ts_short(w.publish_time.as_ref()),
                    ]);
                }
                t
            };
            let empty = "no waves yet (draft one with `chipgate wave create`)";
            print_listing(
                ctx,
                listed,
                |waves, next_page_token| lpb::ListWavesResponse { waves, next_page_token },
                table,
                empty,
            );
        }
        WaveCmd::Follow { wave, within } => {
            follow(ctx, &wave, within).await?;
        }
    }
    Ok(())
}

/// A wave preview for people: per buyer, the licences, how stock would be shared, the orders.
pub fn print_wave_preview(r: &opb::PreviewWaveResponse) {
    out::say(&format!("if {} were published now ({} licence(s)):", r.wave_id, r.licenses.len()));
    out::say("");
    view::buyer_outcomes_table(&r.buyers).print_or("no waiting order of its buyers");
    for a in &r.allocations {
        out::say("");
        view::print_allocation(a);
    }
    if !r.orders.is_empty() {
        out::say("");
        view::outcomes_table(&r.orders).print_or("");
        if r.orders_truncated {
            out::note("(more orders would move: --max-orders to list them)");
        }
    }
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
            out::json_line(&view::msg(&opb::GetWaveProgressResponse { progress: Some(p.clone()) }));
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
                thousands(evaluated),
                thousands(concerned)
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok((last.unwrap_or_default(), result))
}
