//! Customs' import policy per product (licensing): open or embargoed.

use chipgate_proto::licensing::v1 as lpb;
use clap::{Subcommand, ValueEnum};

use super::{ListArgs, pages, print_listing, show};
use crate::client::{Ctx, Outcome, Svc};
use crate::view;

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
            show(ctx, &r, || view::policies_table(r.policy.as_slice()).print_or(""));
        }
        CustomsCmd::Show { product } => {
            let msg = lpb::GetImportPolicyRequest { product_sku: product };
            let r = ctx.call(Svc::Licensing, None, ctx.lic().get_import_policy(ctx.req(msg))).await?;
            show(ctx, &r, || view::policies_table(r.policy.as_slice()).print_or(""));
        }
        CustomsCmd::List { list } => {
            let listed = pages(&list, |page_size, page_token| {
                let msg = lpb::ListImportPoliciesRequest { page_size, page_token };
                async move {
                    let r = ctx.call(Svc::Licensing, None, ctx.lic().list_import_policies(ctx.req(msg))).await?;
                    Ok((r.policies, r.next_page_token))
                }
            })
            .await?;
            let response = |policies, next_page_token| lpb::ListImportPoliciesResponse { policies, next_page_token };
            let empty = "no import policy was ever set: every product is OPEN";
            print_listing(ctx, listed, response, view::policies_table, empty);
        }
    }
    Ok(())
}
