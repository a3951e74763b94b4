//! The tamper-evident audit log (licensing): list, verify, and signed checkpoints to keep and verify
//! against later.

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
    #[command(
        after_help = "Examples:\n  chipgate audit list --limit 20\n  chipgate audit list --subject wave-1\n  chipgate audit list --product H200-SXM-141GB   # its licences, quota, gates"
    )]
    List {
        /// Only entries about this subject (a wave, licence, application, product...).
        #[arg(long)]
        subject: Option<String>,
        /// List this product's chain (its licences, quota decisions, export authorisations, import
        /// policy and its part of each wave) instead of the desk's (applications, the queue, waves,
        /// domestic purchases).
        #[arg(long, value_name = "SKU")]
        product: Option<String>,
        #[command(flatten)]
        list: ListArgs,
    },
    /// Recompute the audit log's hash chains; exit 11 if any entry does not verify or, with
    /// --checkpoint, if the log no longer extends the kept checkpoint (entries removed or rewritten).
    #[command(
        after_help = "Examples:\n  chipgate audit verify\n  chipgate audit verify --checkpoint cp.json   # a checkpoint kept earlier"
    )]
    Verify {
        /// A checkpoint kept from `chipgate audit checkpoint` (its JSON document, or the bare
        /// checkpoint): the log must still extend it. One whose signature does not verify is refused
        /// (exit 3).
        #[arg(long, value_name = "FILE")]
        checkpoint: Option<std::path::PathBuf>,
        /// Also check an archive of the log from this machine (a directory, `file:///path` or
        /// `/path`, or a bucket, `s3://bucket/prefix` with the AWS_* environment): every segment's data hash, every link, each segment's signed checkpoint, the
        /// chain across segments, and that the live log in Redis starts where the archive ends. A
        /// broken segment is named (exit 11).
        #[arg(long, value_name = "URL")]
        archive: Option<String>,
        /// With --archive: the audit key's public half (PEM), pinned out of band, that the segments'
        /// checkpoints must be signed with. Without it each checkpoint's own embedded key is used,
        /// which proves the segments consistent but not who sealed them.
        #[arg(long, value_name = "PEM", requires = "archive")]
        audit_public_key: Option<std::path::PathBuf>,
    },
    /// Take a signed checkpoint of the audit log (every chain's head, a root, the time, the service's
    /// Ed25519 signature) and print it as JSON, to keep somewhere Redis writers can't reach.
    ///
    /// The JSON document always goes to stdout (it is the thing to keep); a summary for people goes
    /// to stderr unless -o json.
    #[command(
        after_help = "Examples:\n  chipgate audit checkpoint > cp.json\n  chipgate audit verify --checkpoint cp.json"
    )]
    Checkpoint,
}

/// `chipgate audit …`.
pub async fn audit(ctx: &Ctx, cmd: AuditCmd) -> Outcome {
    match cmd {
        AuditCmd::List { subject, product, list } => {
            let subject = subject.unwrap_or_default();
            let product = product.unwrap_or_default();
            let listed = pages(&list, |page_size, page_token| {
                let msg = lpb::ListAuditEntriesRequest {
                    subject: subject.clone(),
                    page_size,
                    page_token,
                    product_sku: product.clone(),
                };
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
        AuditCmd::Verify { checkpoint, archive, audit_public_key } => {
            let checkpoint = checkpoint.as_deref().map(read_checkpoint).transpose()?;
            let msg = lpb::VerifyAuditLogRequest { checkpoint };
            let with_checkpoint = msg.checkpoint.is_some();
            let r = ctx.call(Svc::Licensing, None, ctx.lic().verify_audit_log(ctx.req(msg))).await?;
            if ctx.json() {
                out::json(&view::msg(&r));
            } else {
                print_verification(&r, with_checkpoint);
            }
            if r.valid
                && let Some(url) = archive
            {
                return verify_archive(ctx, &r, &url, audit_public_key.as_deref()).await;
            }
            if r.valid {
                Ok(())
            } else {
                let chain = if r.bad_chain.is_empty() { String::new() } else { format!(" of {}", r.bad_chain) };
                let segment = if r.bad_segment.is_empty() {
                    String::new()
                } else {
                    format!(" (archived segment {})", r.bad_segment)
                };
                Err(Failure::Check(format!(
                    "audit entry {}{chain} does not verify{segment}: {}",
                    r.first_bad_sequence, r.problem
                )))
            }
        }
        AuditCmd::Checkpoint => {
            let msg = lpb::GetAuditCheckpointRequest {};
            let r = ctx.call(Svc::Licensing, None, ctx.lic().get_audit_checkpoint(ctx.req(msg))).await?;
            // The document is what gets kept (`> cp.json`), so it is printed in every output mode.
            out::json(&view::msg(&r));
            if !ctx.json()
                && let Some(cp) = &r.checkpoint
            {
                for line in checkpoint_summary(cp) {
                    out::note(&line);
                }
            }
            Ok(())
        }
    }
}

/// Checks an archive of the log on this machine, chain by chain, and that each live chain starts
/// where its archive ends.
async fn verify_archive(
    ctx: &Ctx,
    live: &lpb::VerifyAuditLogResponse,
    url: &str,
    public_key: Option<&std::path::Path>,
) -> Outcome {
    let target = chipgate_archive::Target::parse(url).map_err(|e| Failure::Input(e.to_string()))?;
    if public_key.is_none() {
        out::note("no --audit-public-key: segment checkpoints are checked with the key each one embeds");
    }
    let check_cp = checkpoint_checker(public_key)?;
    let mut t = out::Table::new(&["CHAIN", ">SEGMENTS", ">ARCHIVED", ">IN REDIS FROM", "STATUS"]);
    let mut problem: Option<String> = None;
    for c in &live.chains {
        let status = match chipgate_archive::audit::verify_chain(&target, &c.chain, None, &check_cp).await {
            Err(p) => Err((p.segment.clone(), format!("entry {}: {}", p.sequence, p.problem), 0, 0)),
            Ok(a)
                if c.archived_sequence > 0
                    && a.ends.get(&c.archived_sequence).map(|(h, _)| h) != Some(&c.archived_hash) =>
            {
                Err((
                    a.ends.range(c.archived_sequence..).next().map(|(_, (_, s))| s.clone()).unwrap_or_default(),
                    format!(
                        "Redis starts after entry {}, which no segment of this archive ends at",
                        c.archived_sequence
                    ),
                    a.segments,
                    a.entries,
                ))
            }
            Ok(a) => Ok((a.segments, a.entries)),
        };
        let (segments, entries, text) = match status {
            Ok((s, e)) => (s, e, "ok".to_string()),
            Err((segment, why, s, e)) => {
                let text = format!("BROKEN in {segment}: {why}");
                problem.get_or_insert(format!("{}: {text}", c.chain));
                (s, e, text)
            }
        };
        t.row(vec![c.chain.clone(), thousands(segments), thousands(entries), thousands(c.archived_sequence + 1), text]);
    }
    if !ctx.json() {
        t.print_or("no audit chains");
    }
    match problem {
        None => {
            if !ctx.json() {
                out::say(&format!("archive {} intact and continued by the live log", target.url()));
            }
            Ok(())
        }
        Some(p) => Err(Failure::Check(format!("the audit archive does not verify: {p}"))),
    }
}

/// Reads a kept checkpoint: a `chipgate audit checkpoint` document (`{"checkpoint": {...}}`), or the
/// bare checkpoint.
fn read_checkpoint(path: &std::path::Path) -> Result<lpb::AuditCheckpoint, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::Input(format!("can't read the checkpoint {}: {e}", path.display())))?;
    let doc: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Failure::Input(format!("{} is not JSON: {e}", path.display())))?;
    let bad = |e: String| Failure::Input(format!("{} is not an audit checkpoint: {e}", path.display()));
    match doc.get("checkpoint") {
        Some(inner) => view::from_json::<lpb::GetAuditCheckpointResponse>(&serde_json::json!({ "checkpoint": inner }))
            .map_err(bad)?
            .checkpoint
            .ok_or_else(|| Failure::Input(format!("{}: the checkpoint is null", path.display()))),
        None => view::from_json::<lpb::AuditCheckpoint>(&doc).map_err(bad),
    }
}

/// What a checkpoint says, for people (stderr: stdout holds the document to keep).
fn checkpoint_summary(cp: &lpb::AuditCheckpoint) -> Vec<String> {
    let signed = if cp.signature.is_empty() {
        "UNSIGNED (the service has no audit key: dev only; this proves nothing to anyone else)".to_string()
    } else {
        format!("signed by {}", cp.key_id)
    };
    let mut lines =
        vec![format!("audit checkpoint at {}: {signed}; root {}", view::ts_short(cp.time.as_ref()), cp.root)];
    let mut t = out::Table::new(&["CHAIN", ">SEQUENCE", "HEAD"]);
    for c in &cp.chains {
        t.row(vec![c.chain.clone(), thousands(c.sequence), c.head_hash.clone()]);
    }
    lines.extend(t.render());
    lines
}

fn print_verification(r: &lpb::VerifyAuditLogResponse, with_checkpoint: bool) {
    let mut t = out::Table::new(&["CHAIN", ">ENTRIES", ">CHECKPOINT", "STATUS", "HEAD"]);
    for c in &r.chains {
        let status =
            if c.valid { "ok".to_string() } else { format!("BROKEN at {}: {}", c.first_bad_sequence, c.problem) };
        let pinned = if with_checkpoint { thousands(c.checkpoint_sequence) } else { "-".to_string() };
        t.row(vec![c.chain.clone(), thousands(c.entries_checked), pinned, status, view::dash(&c.head_hash)]);
    }
    t.print_or("no audit chains");
    let checkpoint = match (with_checkpoint, r.extends_checkpoint, r.checkpoint_signed) {
        (false, _, _) => String::new(),
        (true, true, true) => "; it extends the signed checkpoint".to_string(),
        (true, true, false) => "; it extends the (unsigned) checkpoint".to_string(),
        (true, false, _) => "; it does NOT extend the checkpoint".to_string(),
    };
    if r.valid {
        out::say(&format!("audit log intact: {} entries verify{checkpoint}", thousands(r.entries_checked)));
    } else {
        let mut chain = if r.bad_chain.is_empty() { String::new() } else { format!(" in {}", r.bad_chain) };
        if !r.bad_segment.is_empty() {
            chain.push_str(&format!(" (archived segment {})", r.bad_segment));
        }
        out::say(&format!(
            "audit log BROKEN at entry {}{chain}: {} ({} entries checked){checkpoint}",
            r.first_bad_sequence,
            r.problem,
            thousands(r.entries_checked)
        ));
    }
}

/// How sealed checkpoints are checked: against the audit key's public half in `public_key` (PEM,
/// pinned out of band), or, without one, against the key each checkpoint embeds.
pub(crate) fn checkpoint_checker(
    public_key: Option<&std::path::Path>,
) -> Result<impl Fn(&lpb::AuditCheckpoint) -> Result<(), String> + Sync, Failure> {
    let pinned = match public_key {
        Some(p) => {
            let pem = std::fs::read_to_string(p).map_err(|e| Failure::Input(format!("{}: {e}", p.display())))?;
            Some(
                chipgate_runtime::auth::public_key_from_pem(&pem)
                    .map_err(|e| Failure::Input(format!("{}: {e}", p.display())))?,
            )
        }
        None => None,
    };
    Ok(move |cp: &lpb::AuditCheckpoint| {
        let key = match &pinned {
            Some(k) => Some(*k),
            None if cp.public_key_pem.is_empty() => None,
            None => Some(chipgate_runtime::auth::public_key_from_pem(&cp.public_key_pem).map_err(|e| e.to_string())?),
        };
        chipgate_licensing::checkpoint::check_with_public_key(cp, key.as_ref())
            .map(|_| ())
            .map_err(|d| format!("{}: {}", d.field, d.description))
    })
}
