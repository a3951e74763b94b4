//! The tamper-evident audit log (licensing): list and verify.

use chipgate_proto::licensing::v1 as lpb;
use clap::Subcommand;

use super::{ListArgs, pages, print_listing};
use crate::client::{Ctx, Failure, Outcome, Svc};
use crate::out::{self, thousands};
use crate::view;

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
            let listed = pages(&list, |page_size, page_token| {
                let msg = lpb::ListAuditEntriesRequest { subject: subject.clone(), page_size, page_token };
                async move {
                    let r = ctx.call(Svc::Licensing, None, ctx.lic().list_audit_entries(ctx.req(msg))).await?;
                    Ok((r.entries, r.next_page_token))
                }
            })
            .await?;
            let table = |entries: &[lpb::AuditEntry]| {
                let mut t = out::Table::new(&[">SEQ", "TIME", "ACTOR", "ACTION", "SUBJECT", "DETAIL"]);
                for e in entries {
                    t.row(vec![
                        e.sequence.to_string(),
                        view::ts_short(e.time.as_ref()),
                        e.actor.clone(),
                        e.action.clone(),
                        e.subject.clone(),
                        e.detail.clone(),
                    ]);
                }
                t
            };
            let response = |entries, next_page_token| lpb::ListAuditEntriesResponse { entries, next_page_token };
            print_listing(ctx, listed, response, table, "no audit entries");
            Ok(())
        }
        AuditCmd::Verify => {
            let r = ctx
                .call(Svc::Licensing, None, ctx.lic().verify_audit_log(ctx.req(lpb::VerifyAuditLogRequest::default())))
                .await?;
            if ctx.json() {
                out::json(&view::msg(&r));
            } else if r.valid {
                out::say(&format!(
                    "audit log intact: {} entries verify; head {}",
                    thousands(r.entries_checked),
                    view::dash(&r.head_hash)
                ));
            } else {
                out::say(&format!(
                    "audit log BROKEN at entry {}: {} ({} entries checked)",
                    r.first_bad_sequence,
                    r.problem,
                    thousands(r.entries_checked)
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
