//! Import licences (licensing): show, list, finalise terms, suspend, reinstate, revoke; and the
//! eligibility check of a prospective order against every licence condition.

use chipgate_proto::licensing::v1 as lpb;
use clap::{Args, Subcommand, ValueEnum};

use super::{ListArgs, pages, parse_time, print_listing, show};
use crate::client::{Ctx, Outcome, Svc};
use crate::out::{self, thousands};
use crate::view;

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
    #[command(after_help = "Example:\n  chipgate license show lic-H200-SXM-141GB-1")]
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
        after_help = "Examples:\n  chipgate license finalize lic-H200-SXM-141GB-1\n  chipgate license finalize lic-H200-SXM-141GB-2 --domestic-ratio-bps 1500"
    )]
    Finalize {
        /// Licence id.
        license: String,
        #[command(flatten)]
        terms: FinalTerms,
    },
    /// Suspend an ACTIVE licence: its unconfirmed orders go back to waiting and their quota returns.
    #[command(after_help = "Example:\n  chipgate license suspend lic-H200-SXM-141GB-1 --reason 'ratio audit pending'")]
    Suspend {
        /// Licence id.
        license: String,
        /// Why (recorded in the audit log and shown to the buyer).
        #[arg(long)]
        reason: String,
    },
    /// Reinstate a SUSPENDED licence; its buyer's waiting orders are re-evaluated.
    #[command(after_help = "Example:\n  chipgate license reinstate lic-H200-SXM-141GB-1 --reason 'audit passed'")]
    Reinstate {
        /// Licence id.
        license: String,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Revoke a licence for good.
    #[command(after_help = "Example:\n  chipgate license revoke lic-H200-SXM-141GB-1 --reason 'diversion suspected'")]
    Revoke {
        /// Licence id.
        license: String,
        /// Why.
        #[arg(long)]
        reason: String,
    },
}

fn show_license<M: prost::Message>(ctx: &Ctx, r: &M, l: Option<&lpb::License>) {
    show(ctx, r, || view::print_license(&l.cloned().unwrap_or_default()));
}

/// `chipgate license …`.
pub async fn license(ctx: &Ctx, cmd: LicenseCmd) -> Outcome {
    match cmd {
        LicenseCmd::Show { license } => {
            let msg = lpb::GetLicenseRequest { license_id: license };
            let r = ctx.call(Svc::Licensing, None, ctx.lic().get_license(ctx.req(msg))).await?;
            show_license(ctx, &r, r.license.as_ref());
        }
        LicenseCmd::List { buyer, product, wave, state, list } => {
            let (buyer, product, wave) =
                (buyer.unwrap_or_default(), product.unwrap_or_default(), wave.unwrap_or_default());
            let state = state.map_or(0, |s| s.proto() as i32);
            let listed = pages(&list, |page_size, page_token| {
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
            let response = |licenses, next_page_token| lpb::ListLicensesResponse { licenses, next_page_token };
            print_listing(ctx, listed, response, view::licenses_table, "no licences");
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
            show_license(ctx, &r, r.license.as_ref());
        }
        LicenseCmd::Suspend { license, reason } => {
            let rid = ctx.rid();
            let msg = lpb::SuspendLicenseRequest { request_id: rid.clone(), license_id: license, reason };
            let r = ctx.call(Svc::Licensing, Some(&rid), ctx.lic().suspend_license(ctx.req(msg))).await?;
            show_license(ctx, &r, r.license.as_ref());
        }
        LicenseCmd::Reinstate { license, reason } => {
            let rid = ctx.rid();
            let msg = lpb::ReinstateLicenseRequest { request_id: rid.clone(), license_id: license, reason };
            let r = ctx.call(Svc::Licensing, Some(&rid), ctx.lic().reinstate_license(ctx.req(msg))).await?;
            show_license(ctx, &r, r.license.as_ref());
        }
        LicenseCmd::Revoke { license, reason } => {
            let rid = ctx.rid();
            let msg = lpb::RevokeLicenseRequest { request_id: rid.clone(), license_id: license, reason };
            let r = ctx.call(Svc::Licensing, Some(&rid), ctx.lic().revoke_license(ctx.req(msg))).await?;
            show_license(ctx, &r, r.license.as_ref());
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
        out::json(&view::msg(&r));
    } else if r.eligible {
        out::say(&format!(
            "eligible: an order of {} x {} by {} would take quota from {}",
            thousands(a.units),
            a.product,
            a.buyer,
            r.license_id
        ));
    } else {
        out::say(&format!(
            "not eligible{}: an order of {} x {} by {} fails these conditions",
            if r.rejectable { " (and never will be under the licences held)" } else { " yet" },
            thousands(a.units),
            a.product,
            a.buyer
        ));
        out::say("");
        view::failures_table(&r.failures).print_or("");
    }
    Ok(())
}
