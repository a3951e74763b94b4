//! Allocation policies (orders): how the vendor shares a product's stock among the buyers waiting in
//! its backlog — first come first served, pro rata, and a cap per buyer.

use chipgate_proto::orders::v1 as opb;
use clap::{Subcommand, ValueEnum};

use super::show;
use crate::client::{Ctx, Outcome, Svc};
use crate::out::{self, thousands};
use crate::view;

/// A strategy on the command line.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum StrategyArg {
    /// First come, first served: the oldest order first, whoever placed it.
    Fifo,
    /// In proportion to the units each waiting buyer's orders still wait for.
    ProRata,
}

impl StrategyArg {
    fn proto(self) -> opb::AllocationStrategy {
        match self {
            StrategyArg::Fifo => opb::AllocationStrategy::Fifo,
            StrategyArg::ProRata => opb::AllocationStrategy::ProRata,
        }
    }
}

/// `chipgate allocation …`.
#[derive(Subcommand, Debug)]
pub enum AllocationCmd {
    /// Set how a product's stock is shared among the buyers waiting in its backlog (the vendor). It
    /// applies to stock allocated from then on; nothing already held is taken back.
    #[command(
        after_help = "Examples:\n  chipgate --as vendor allocation set H200-SXM-141GB --strategy pro-rata --reason 'share the shortage'\n  chipgate --as vendor allocation set H200-SXM-141GB --strategy fifo --max-share 40   # no buyer above 40 %"
    )]
    Set {
        /// Catalogue SKU.
        product: String,
        /// How units are shared.
        #[arg(long, value_enum)]
        strategy: StrategyArg,
        /// No buyer may hold more than this percentage of the product's allocated units (0: no cap).
        #[arg(long, default_value_t = 0)]
        max_share: u32,
        /// Why (kept with the change).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Show a product's policy, its latest changes and the units each buyer holds.
    #[command(after_help = "Example:\n  chipgate --as vendor allocation show H200-SXM-141GB")]
    Show {
        /// Catalogue SKU.
        product: String,
    },
}

/// `chipgate allocation …`.
pub async fn allocation(ctx: &Ctx, cmd: AllocationCmd) -> Outcome {
    match cmd {
        AllocationCmd::Set { product, strategy, max_share, reason } => {
            let rid = ctx.rid();
            let msg = opb::SetAllocationPolicyRequest {
                request_id: rid.clone(),
                product_sku: product,
                strategy: strategy.proto() as i32,
                max_share_percent: max_share,
                reason,
            };
            let r = ctx.call(Svc::Orders, Some(&rid), ctx.ord().set_allocation_policy(ctx.req(msg))).await?;
            show(ctx, &r, || {
                let p = r.policy.clone().unwrap_or_default();
                let rev = r.change.as_ref().map(|c| c.revision).unwrap_or(0);
                out::say(&format!("{}: {} (revision {rev})", p.product_sku, view::policy_text(Some(&p))));
            });
        }
        AllocationCmd::Show { product } => {
            let msg = opb::GetAllocationPolicyRequest { product_sku: product };
            let r = ctx.call(Svc::Orders, None, ctx.ord().get_allocation_policy(ctx.req(msg))).await?;
            show(ctx, &r, || {
                let p = r.policy.clone().unwrap_or_default();
                out::fields(&[
                    ("product", p.product_sku.clone()),
                    ("policy", view::policy_text(Some(&p))),
                    ("units held", thousands(r.allocated_units)),
                ]);
                out::say("");
                let mut t = out::Table::new(&["BUYER", ">HOLDS", ">SHARE"]);
                for a in &r.allocations {
                    t.row(vec![
                        a.buyer_id.clone(),
                        thousands(a.allocated_units),
                        format!("{:.1} %", f64::from(a.share_bps) / 100.0),
                    ]);
                }
                t.print_or("no buyer holds any yet");
                if !r.changes.is_empty() {
                    out::say("");
                    let mut t = out::Table::new(&[">REV", "TIME", "POLICY", "BY", "WHY"]);
                    for c in &r.changes {
                        t.row(vec![
                            c.revision.to_string(),
                            view::ts_short(c.change_time.as_ref()),
                            view::policy_text(c.policy.as_ref()),
                            c.changed_by.clone(),
                            view::dash(&c.reason),
                        ]);
                    }
                    t.print_or("");
                }
            });
        }
    }
    Ok(())
}
