//! The domestic-purchase ledger (licensing): purchases that count towards domestic-ratio conditions.

use std::cell::Cell;

use chipgate_proto::licensing::v1 as lpb;
use clap::Subcommand;

use super::{ListArgs, more_hint, pages};
use crate::client::{Ctx, Outcome, Svc};
use crate::out::{self, thousands};
use crate::view;

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
            if ctx.json() {
                out::json(&view::msg(&r));
            } else {
                let p = r.purchase.unwrap_or_default();
                out::say(&format!(
                    "recorded {} domestic units from {} for {} (evidence {}); {} now totals {} domestic units",
                    thousands(p.units),
                    p.supplier,
                    p.buyer_id,
                    p.evidence_ref,
                    p.buyer_id,
                    thousands(r.total_domestic_units)
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
                out::json(&view::msg(&lpb::GetDomesticLedgerResponse {
                    buyer_id: buyer,
                    total_domestic_units: total.get(),
                    purchases,
                    next_page_token: next,
                }));
            } else {
                out::say(&format!("{buyer}: {} domestic units recorded", thousands(total.get())));
                if !purchases.is_empty() {
                    out::say("");
                }
                let mut t = out::Table::new(&["RECORDED", "SUPPLIER", ">UNITS", "EVIDENCE"]);
                for p in &purchases {
                    t.row(vec![
                        view::ts_short(p.record_time.as_ref()),
                        p.supplier.clone(),
                        thousands(p.units),
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
