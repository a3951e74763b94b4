//! Archiving the audit log out of Redis, so it outlives Redis and Redis stays bounded.
//!
//! For each audit chain, entries older than the retention window are sealed into a segment
//! ([`chipgate_archive::audit`]) with a checkpoint signed by the audit key that pins the segment's
//! last entry, and only then removed from Redis. The order of steps is what makes a crash harmless:
//!
//! 1. **write** the data object, then the manifest (each durably, under a name derived from the
//!    segment's first sequence);
//! 2. **read back and verify**: the manifest's data hash, every link from the archived base, the
//!    checkpoint's signature and pin, and that each entry is the one Redis holds;
//! 3. **trim**: one transaction in the chain's own partition (its hash slot) moves the archived base
//!    (`<stream>:archived`, `sequence:hash`) to the segment's end and removes exactly those entries
//!    from the stream, guarded by the base's version and the archive lease.
//!
//! A crash before 3 leaves both copies: the next run finds the segment that starts after the base,
//! checks it against Redis and goes on to trim. One that doesn't check (or holds other entries than
//! Redis) is never replaced: the run stops with an error naming it, Redis keeps every entry, and the
//! health name goes bad until someone looks. A data object whose manifest was never written is an
//! orphan no reader follows (its name carries its own hash, so the next run's data never collides
//! with it). A crash after 3 leaves the archive copy. Never neither. The live chain
//! verifies from the archived base, and `VerifyAuditLog` checks the archive and the live tail as one
//! chain.
//!
//! The chains come from [`keys::audit_chains`], each archived under its own lease in its own
//! partition, so the archiver follows licensing's partitioning without change.

use std::time::Duration;

use chipgate_archive::audit::{self as seg, Entry};
use chipgate_archive::segment;
pub use chipgate_archive::status::Step;
use chipgate_archive::status::{self, Run};
use chipgate_archive::{Problem, Target};
use chipgate_proto::licensing::v1 as pb;
use chipgate_runtime::service::Records;
use chipgate_state::{AUDIT_GENESIS, AuditChain, Backend, CommitError, StreamEntry, Txn, audit_link, sha256_hex};

use crate::{Error, Licensing, checkpoint, keys};

/// How long a replica holds a chain's archive lease between renewals.
const LEASE_TTL: Duration = Duration::from_secs(120);

/// What wrote a segment (in its manifest).
const WRITTEN_BY: &str = concat!("chipgate-licensing ", env!("CARGO_PKG_VERSION"));

/// How the background archiver runs.
#[derive(Clone, Debug)]
pub struct ArchiveOptions {
    /// Entries stay in Redis at least this long (by their time) before they are archived.
    pub retention: Duration,
    /// How often a run starts.
    pub every: Duration,
    /// Most entries per segment.
    pub max_segment_entries: usize,
    /// How long runs may keep failing before `chipgate.licensing.v1.Archive` reports NOT_SERVING.
    pub unhealthy_after: Duration,
}

impl Default for ArchiveOptions {
    fn default() -> Self {
        ArchiveOptions {
            retention: Duration::from_secs(7 * 24 * 3600),
            every: Duration::from_secs(3600),
            max_segment_entries: 50_000,
            unhealthy_after: Duration::from_secs(6 * 3600),
        }
    }
}

fn text(e: &StreamEntry, field: &str) -> String {
    e.field(field).and_then(|b| std::str::from_utf8(b).ok()).unwrap_or_default().to_string()
}

/// An entry of the stream as the archive holds it.
fn entry_of(e: &StreamEntry) -> Entry {
    Entry {
        seq: text(e, "seq").parse().unwrap_or(0),
        prev: text(e, "prev"),
        hash: text(e, "hash"),
        entry: e.field("entry").unwrap_or_default().to_vec(),
    }
}

/// The smallest stream id after `id` (`<ms>-<n>` → `<ms>-<n+1>`): trimming below it removes `id` and
/// everything before it, and nothing appended later.
fn next_id(id: &str) -> Option<String> {
    let (ms, n) = chipgate_state::parse_stream_id(id)?;
    Some(format!("{ms}-{}", n.checked_add(1)?))
}

fn archive_error(p: Problem) -> Error {
    Error::Internal(format!("audit archive: {p}"))
}

/// The archived base of a chain: the record's version, and the sequence and hash of the last
/// archived entry (`(0, 0, genesis)` when nothing is archived).
pub(crate) async fn archived_base<B: Backend>(store: &B, chain: &AuditChain) -> Result<(u64, u64, String), Error> {
    let key = chain.archived_key();
    match store.get(std::slice::from_ref(&key)).await?.pop().flatten() {
        None => Ok((0, 0, AUDIT_GENESIS.to_string())),
        Some(r) => {
            let text = String::from_utf8_lossy(&r.data).to_string();
            let parsed = text.split_once(':').and_then(|(s, h)| Some((s.parse::<u64>().ok()?, h.to_string())));
            let (seq, hash) =
                parsed.ok_or_else(|| Error::Internal(format!("{key} holds {text:?}, not <sequence>:<hash>")))?;
            Ok((r.version, seq, hash))
        }
    }
}

impl Licensing {
    /// Archives to `target` from now on (`VerifyAuditLog` reads it too). Returns false when an archive
    /// was already set.
    pub fn use_archive(&self, target: Target) -> bool {
        self.inner.archive.set(target).is_ok()
    }

    /// The archive, when one is set.
    pub fn archive_target(&self) -> Option<&Target> {
        self.inner.archive.get()
    }

    /// Whether the audit archiver is healthy (see `chipgate.licensing.v1.Archive`).
    pub fn archive_healthy(&self) -> bool {
        self.inner.archive_status.is_healthy()
    }

    /// How a checkpoint sealed in a segment is checked: signed by this service's audit key (or
    /// unsigned, when the service has none).
    pub(crate) fn check_sealed_checkpoint(&self, cp: &pb::AuditCheckpoint) -> Result<(), String> {
        checkpoint::check(cp, self.inner.audit_key.as_ref())
            .map(|_| ())
            .map_err(|d| format!("{}: {}", d.field, d.description))
    }

    /// One archiving run over every audit chain: archives the entries whose time is at or before
    /// `older_than_ms`, at most `max_segment_entries` per segment. `stop_after` stops the run as if
    /// the process died after that step (crash tests; None in production).
    ///
    /// # Errors
    /// No archive set, the archive or Redis failed, or a chain doesn't verify (nothing of that
    /// chain is archived then). Other chains are still archived; the first error is returned.
    pub async fn archive_audit(
        &self,
        older_than_ms: u64,
        max_segment_entries: usize,
        stop_after: Option<Step>,
    ) -> Result<Run, (Run, Error)> {
        let mut run = Run::default();
        let Some(target) = self.archive_target().cloned() else {
            return Err((run, Error::Internal("no archive is configured (--archive)".into())));
        };
        let products = match self.products().await {
            Ok(p) => p,
            Err(e) => return Err((run, e)),
        };
        let chains = keys::audit_chains(&products)
            .into_iter()
            .map(|(name, chain)| (chain.archive_lease_key(), chain.archive_lease_counter(), (name, chain)));
        let first_error =
            status::each_leased(self.store(), chains, LEASE_TTL, stop_after, &mut run, |(name, chain), token| {
                let target = &target;
                async move {
                    let mut did = Run::default();
                    let done = self
                        .archive_chain(
                            target,
                            &name,
                            &chain,
                            token,
                            older_than_ms,
                            max_segment_entries,
                            stop_after,
                            &mut did,
                        )
                        .await;
                    (did, done)
                }
            })
            .await;
        match first_error {
            None => Ok(run),
            Some(e) => Err((run, e)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn archive_chain(
        &self,
        target: &Target,
        name: &str,
        chain: &AuditChain,
        token: u64,
        older_than_ms: u64,
        max_entries: usize,
        stop_after: Option<Step>,
        run: &mut Run,
    ) -> Result<(), Error> {
        let max_entries = max_entries.max(1);
        let crash = |step: Step| Error::Internal(step.crashed());
        loop {
            let (version, base_seq, base_hash) = archived_base(self.store(), chain).await?;
            let chunk = self.store().xrange(&chain.stream, None, max_entries).await?;
            let live: Vec<(String, Entry)> = chunk.iter().map(|e| (e.id.clone(), entry_of(e))).collect();
            // The live chain must continue the archive and verify before anything of it is sealed:
            // archiving an altered entry would seal the alteration under a signed checkpoint.
            let mut prev = base_hash.clone();
            for (i, (_, e)) in live.iter().enumerate() {
                let link = audit_link(&prev, &sha256_hex(&e.entry));
                if e.seq != base_seq + 1 + i as u64 || e.prev != prev || link.as_deref() != Some(e.hash.as_str()) {
                    return Err(Error::Internal(format!(
                        "audit chain {name} does not verify at entry {} (expected {}): not archiving it",
                        e.seq,
                        base_seq + 1 + i as u64
                    )));
                }
                prev = e.hash.clone();
            }
            let manifest_name = segment::audit_manifest(name, base_seq + 1);
            let check_cp = |cp: &pb::AuditCheckpoint| self.check_sealed_checkpoint(cp);
            // A segment an earlier run wrote and didn't get to trim (it crashed, or lost its lease)
            // is finished: it must check and hold exactly the entries Redis holds there. One that
            // doesn't is left as it is and reported (a sealed segment is never replaced).
            let adopted = match target.get(&manifest_name).await {
                Ok(Some(_)) => {
                    let (m, entries) = segment::read_checked(target, &manifest_name)
                        .await
                        .and_then(|(m, json)| {
                            seg::check_segment(&manifest_name, &m, &json, name, base_seq + 1, &base_hash, &check_cp)
                                .map(|entries| (m, entries))
                        })
                        .map_err(|p| {
                            Error::Internal(format!(
                                "audit archive: an unfinished segment does not check, and a sealed segment is \
                                 never replaced; inspect it: {p}"
                            ))
                        })?;
                    if entries.len() > live.len() || entries.iter().zip(&live).any(|(a, (_, b))| a != b) {
                        return Err(archive_error(Problem {
                            segment: manifest_name.clone(),
                            sequence: base_seq + 1,
                            problem: "an unfinished segment does not hold what Redis holds, and a sealed segment \
                                      is never replaced; inspect it"
                                .into(),
                        }));
                    }
                    tracing::info!(chain = name, segment = %manifest_name, "finishing a segment an earlier run wrote");
                    Some((entries.len(), m.data_bytes))
                }
                Ok(None) => None,
                Err(e) => return Err(Error::Internal(format!("audit archive: {e}"))),
            };
            let (count, bytes) = match adopted {
                Some(found) => found,
                None => {
                    let take = live.iter().take_while(|(_, e)| e.time_ms() <= older_than_ms).count();
                    if take == 0 {
                        return Ok(());
                    }
                    let entries: Vec<Entry> = live[..take].iter().map(|(_, e)| e.clone()).collect();
                    let last = &entries[take - 1];
                    let now = chipgate_runtime::time::now_ms();
                    let pin = pb::AuditChainHead {
                        chain: name.to_string(),
                        sequence: last.seq,
                        head_hash: last.hash.clone(),
                    };
                    let cp = checkpoint::make(vec![pin], now, self.inner.audit_key.as_ref()).map_err(|d| {
                        Error::Internal(format!("can't checkpoint audit chain {name}: {}", d.description))
                    })?;
                    let sealed = seg::seal(name, &entries, &cp, now, WRITTEN_BY);
                    sealed.write(target).await.map_err(|e| Error::Internal(format!("audit archive: {e}")))?;
                    if stop_after == Some(Step::Written) {
                        return Err(crash(Step::Written));
                    }
                    // Read back what is stored, not what was meant to be.
                    let (m, json) =
                        segment::read_checked(target, &sealed.manifest_name).await.map_err(archive_error)?;
                    let back =
                        seg::check_segment(&sealed.manifest_name, &m, &json, name, base_seq + 1, &base_hash, &check_cp)
                            .map_err(archive_error)?;
                    if back != entries {
                        return Err(archive_error(Problem {
                            segment: sealed.manifest_name.clone(),
                            sequence: base_seq + 1,
                            problem: "read back, it is not what Redis holds".into(),
                        }));
                    }
                    if stop_after == Some(Step::Verified) {
                        return Err(crash(Step::Verified));
                    }
                    (take, m.data_bytes)
                }
            };
            let (last_id, last) = &live[count - 1];
            let min_id = next_id(last_id).ok_or_else(|| Error::Internal(format!("bad stream id {last_id:?}")))?;
            let mut t = Txn::new();
            t.expect_lease(chain.archive_lease_key(), token)
                .replace(chain.archived_key(), version, format!("{}:{}", last.seq, last.hash).into_bytes())
                .xtrim_before(&chain.stream, min_id);
            match self.store().commit(&t).await {
                Ok(_) => {}
                Err(CommitError::Conflict { .. } | CommitError::LeaseLost { .. } | CommitError::Fenced { .. }) => {
                    // Another replica archived it meanwhile (our lease ran out): nothing to do here.
                    return Ok(());
                }
                Err(CommitError::State(e)) => return Err(e.into()),
            }
            let freed: usize =
                live[..count].iter().map(|(id, e)| id.len() + e.entry.len() + e.prev.len() + e.hash.len() + 20).sum();
            run.segments += 1;
            run.records += count as u64;
            run.bytes += bytes;
            run.redis_bytes_freed += freed as u64;
            tracing::info!(
                chain = name,
                first = base_seq + 1,
                last = last.seq,
                bytes,
                "audit entries archived and trimmed"
            );
            if stop_after == Some(Step::Trimmed) {
                return Err(crash(Step::Trimmed));
            }
            if !self.store().lease_renew(&chain.archive_lease_key(), token, LEASE_TTL).await? {
                return Ok(());
            }
        }
    }

    /// Runs [`archive_audit`](Self::archive_audit) every `options.every` until `shutdown`, archiving
    /// what is older than `options.retention`; each run's figures go to the archive metrics and its
    /// failures to the health name `chipgate.licensing.v1.Archive`.
    pub fn spawn_audit_archiver(
        &self,
        options: ArchiveOptions,
        shutdown: chipgate_runtime::Shutdown,
    ) -> tokio::task::JoinHandle<()> {
        let service = self.clone();
        service.inner.archive_status.set_unhealthy_after(options.unhealthy_after);
        let every = options.every.max(Duration::from_millis(10));
        let max = options.max_segment_entries;
        chipgate_archive::status::spawn_every(every, options.retention, shutdown, move |now, cutoff| {
            let service = service.clone();
            async move {
                match service.archive_audit(cutoff, max, None).await {
                    Ok(run) => service.inner.archive_status.succeeded(&run, now),
                    Err((run, e)) => service.inner.archive_status.failed(&run, &e.describe()),
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trim_id_is_just_after_the_last_archived_entry() {
        assert_eq!(next_id("1700000000000-0").as_deref(), Some("1700000000000-1"));
        assert_eq!(next_id("5-41").as_deref(), Some("5-42"));
        assert_eq!(next_id("x"), None);
    }
}
