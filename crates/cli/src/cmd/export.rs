//! The vendor's export authorisations (licensing), granted and revoked by the export authority.

use chipgate_proto::licensing::v1 as lpb;
use clap::Subcommand;

use super::{ListArgs, pages, print_listing, show};
use crate::client::{Ctx, Outcome, Svc};
use crate::view;

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
            show(ctx, &r, || view::exports_table(r.authorization.as_slice()).print_or(""));
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
            show(ctx, &r, || view::exports_table(r.authorization.as_slice()).print_or(""));
        }
        ExportCmd::List { list } => {
            let listed = pages(&list, |page_size, page_token| {
                let msg = lpb::ListExportAuthorizationsRequest { page_size, page_token };
                async move {
                    let r = ctx.call(Svc::Licensing, None, ctx.lic().list_export_authorizations(ctx.req(msg))).await?;
                    Ok((r.authorizations, r.next_page_token))
                }
            })
            .await?;
            let response = |authorizations, next_page_token| lpb::ListExportAuthorizationsResponse {
                authorizations,
                next_page_token,
            };
            print_listing(ctx, listed, response, view::exports_table, "no export authorisations");
        }
    }
    Ok(())
}
