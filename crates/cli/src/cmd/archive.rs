//! `chipgate archive prune`: removing archived records past the legal retention, by an operator's
//! explicit command (nothing prunes by itself). See `chipgate_archive::prune`.

use std::path::PathBuf;

use clap::Subcommand;

use crate::client::{Ctx, Failure, Outcome};
use crate::out;

/// Work on an archive directly (a directory or a bucket), without the services.
#[derive(Subcommand, Debug)]
pub enum ArchiveCmd {
    /// Remove segments whose every record is older than the retention (default 5 years, 15 CFR
    /// 762.6), oldest first, never a stream's newest one; each stream must verify first. Shows
    /// what would go unless --apply. Writes a pruning marker per stream (what went, when, under
    /// which retention, and the signed checkpoint the kept history now starts from).
    #[command(
        after_help = "Examples:\n  chipgate archive prune --archive s3://records/chipgate --audit-public-key audit-public.pem\n  \
                      chipgate archive prune --archive /mnt/archive --audit-public-key audit-public.pem --apply"
    )]
    Prune {
        /// The archive: a directory (`file:///path` or `/path`) or a bucket (`s3://bucket/prefix`,
        /// with the AWS_* environment).
        #[arg(long, value_name = "URL")]
        archive: String,
        /// Records older than this may go (`1825d` is 5 years).
        #[arg(long, default_value = "1825d", value_parser = chipgate_archive::parse_window)]
        retention: std::time::Duration,
        /// The audit key's public half (PEM), pinned out of band: every audit segment's checkpoint
        /// must verify with it before anything is removed.
        #[arg(long, value_name = "PEM")]
        audit_public_key: PathBuf,
        /// Remove them (without it, only list what would go).
        #[arg(long)]
        apply: bool,
    },
}

/// Runs an archive command.
pub async fn archive(_ctx: &Ctx, cmd: ArchiveCmd) -> Outcome {
    match cmd {
        ArchiveCmd::Prune { archive, retention, audit_public_key, apply } => {
            let target = chipgate_archive::Target::parse(&archive).map_err(|e| Failure::Input(e.to_string()))?;
            let check_cp = super::audit::checkpoint_checker(Some(&audit_public_key))?;
            let now = chipgate_runtime::time::now_ms();
            let cutoff = now.saturating_sub(retention.as_millis() as u64);
            let text = format!("{}d", retention.as_secs() / 86_400);
            let by = concat!("chipgate ", env!("CARGO_PKG_VERSION"));
            let pruned = chipgate_archive::prune::prune(&target, cutoff, &text, apply, by, &check_cp)
                .await
                .map_err(|p| Failure::Check(format!("not pruned: {p}")))?;
            let mut t = out::Table::new(&["KIND", "STREAM", ">SEGMENTS", ">RECORDS", ">KEPT AFTER"]);
            for p in &pruned {
                t.row(vec![
                    p.kind.to_string(),
                    p.stream.clone(),
                    p.segments.to_string(),
                    p.records.to_string(),
                    p.through.to_string(),
                ]);
            }
            t.print_or("nothing is older than the retention");
            out::note(&format!(
                "{} records before {}",
                if apply { "removed" } else { "dry run: would remove (--apply removes)" },
                chipgate_archive::rfc3339(cutoff)
            ));
        }
    }
    Ok(())
}
