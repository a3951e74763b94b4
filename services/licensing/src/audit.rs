//! Reading and verifying the audit log, and its signed checkpoints.
//!
//! Each entry is stored with its sequence number, the previous entry's hash and its own hash, where
//! `hash = SHA-256(prev_hash || SHA-256(entry))` was computed by the state backend inside the same
//! atomic step that made the change. Verification recomputes every link from the stored entries, so
//! an edited entry, a removed entry or a reordered log is found.
//!
//! That alone can't catch someone who writes Redis and re-links what follows an edit, or cuts the end
//! off and moves the head back: the chain's only anchor is its head, in the same Redis. A checkpoint
//! ([`crate::checkpoint`]) signed with a key outside Redis pins every chain's head; verification with
//! a kept checkpoint checks that each chain still reaches the pinned hash at the pinned sequence.

use chipgate_proto::licensing::v1 as pb;
use chipgate_runtime::errors::Violations;
use chipgate_runtime::paging::{self, Page};
use chipgate_runtime::service::Records;
use chipgate_runtime::validate;
use chipgate_state::{AUDIT_GENESIS, AuditChain, Backend, StreamEntry, audit_link, sha256_hex};
use prost::Message;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use crate::checkpoint::{self, Defect};
use crate::keys::Part;
use crate::{Error, Licensing, keys};

/// Entries read per round trip while scanning.
const SCAN_CHUNK: usize = 1000;

fn text(e: &StreamEntry, field: &str) -> Option<String> {
    e.field(field).and_then(|b| std::str::from_utf8(b).ok()).map(str::to_string)
}

fn decode(e: &StreamEntry) -> Result<pb::AuditEntry, Error> {
    let raw = e.field("entry").ok_or_else(|| Error::Internal(format!("audit entry {} has no body", e.id)))?;
    let mut entry = pb::AuditEntry::decode(raw)
        .map_err(|err| Error::Internal(format!("audit entry {} is undecodable: {err}", e.id)))?;
    entry.sequence = text(e, "seq").and_then(|s| s.parse().ok()).unwrap_or(0);
    entry.prev_hash = text(e, "prev").unwrap_or_default();
    entry.hash = text(e, "hash").unwrap_or_default();
    Ok(entry)
}

impl Licensing {
    pub(crate) async fn list_audit_entries(
        &self,
        req: pb::ListAuditEntriesRequest,
    ) -> Result<pb::ListAuditEntriesResponse, Error> {
        let mut v = Violations::new();
        validate::optional_id(&mut v, "subject", &req.subject);
        let sku = validate::parse_optional::<chipgate_domain::ids::Sku>(&mut v, "product_sku", req.product_sku.clone());
        let page = Page::parse(&mut v, req.page_size, &req.page_token);
        let sku = validate::finish(v, sku)?;
        let part = sku.as_ref().map_or(Part::Desk, Part::Product);
        let stream = part.audit().stream;
        let mut after = if page.cursor.is_empty() { None } else { Some(page.cursor.clone()) };
        let mut entries = Vec::new();
        // With a subject filter, scan at most this many entries per call and hand back a token.
        let mut budget = 50 * SCAN_CHUNK;
        loop {
            let chunk = self.store().xrange(&stream, after.as_deref(), SCAN_CHUNK.min(budget).max(1)).await?;
            if chunk.is_empty() {
                return Ok(pb::ListAuditEntriesResponse { entries, next_page_token: String::new() });
            }
            budget = budget.saturating_sub(chunk.len());
            for e in &chunk {
                after = Some(e.id.clone());
                let entry = decode(e)?;
                if req.subject.is_empty() || entry.subject == req.subject {
                    entries.push(entry);
                    if entries.len() == page.size {
                        return Ok(pb::ListAuditEntriesResponse { entries, next_page_token: paging::token(&e.id) });
                    }
                }
            }
            if budget == 0 {
                let token = after.as_deref().map(paging::token).unwrap_or_default();
                return Ok(pb::ListAuditEntriesResponse { entries, next_page_token: token });
            }
        }
    }

    /// A checkpoint of every audit chain now, signed with the audit key when the service has one.
    pub(crate) async fn audit_checkpoint(&self) -> Result<pb::AuditCheckpoint, Error> {
        let chains = keys::audit_chains(&self.products().await?);
        let head_keys: Vec<String> = chains.iter().map(|(_, c)| c.head.clone()).collect();
        // One read of every head: each head is written in the same atomic step as its entry, so each
        // one read is a real state of its chain.
        let heads = self.store().get(&head_keys).await?;
        let heads = chains
            .into_iter()
            .zip(heads)
            .map(|((name, _), head)| {
                let (sequence, head_hash) = match head {
                    Some(r) => (r.version, String::from_utf8_lossy(&r.data).to_string()),
                    None => (0, AUDIT_GENESIS.to_string()),
                };
                pb::AuditChainHead { chain: name, sequence, head_hash }
            })
            .collect();
        checkpoint::make(heads, chipgate_runtime::time::now_ms(), self.inner.audit_key.as_ref()).map_err(|d| {
            // A head that can't be put in a checkpoint was written by something other than licensing.
            Error::precondition(
                "AUDIT_HEAD_CORRUPT",
                &d.field,
                format!("an audit chain's head can't be checkpointed: {}", d.description),
            )
        })
    }

    pub(crate) async fn get_audit_checkpoint(
        &self,
        _req: pb::GetAuditCheckpointRequest,
    ) -> Result<pb::GetAuditCheckpointResponse, Error> {
        Ok(pb::GetAuditCheckpointResponse { checkpoint: Some(self.audit_checkpoint().await?) })
    }

    pub(crate) async fn verify_audit_log(
        &self,
        req: pb::VerifyAuditLogRequest,
    ) -> Result<pb::VerifyAuditLogResponse, Error> {
        let signed = match &req.checkpoint {
            Some(cp) => Some(checkpoint::check(cp, self.inner.audit_key.as_ref()).map_err(refuse)?),
            None => None,
        };
        // By name: with licensing partitioned by buyer, a checkpoint may pin thousands of chains.
        let pins: std::collections::HashMap<&str, &pb::AuditChainHead> = req
            .checkpoint
            .as_ref()
            .map(|c| c.chains.iter().map(|p| (p.chain.as_str(), p)).collect())
            .unwrap_or_default();
        let chains = keys::audit_chains(&self.products().await?);
        let mut out = pb::VerifyAuditLogResponse {
            valid: true,
            checkpoint_signed: signed.unwrap_or(false),
            extends_checkpoint: req.checkpoint.is_some(),
            ..Default::default()
        };
        let fail = |out: &mut pb::VerifyAuditLogResponse, chain: &str, seq: u64, problem: String| {
            if out.valid {
                out.bad_chain = chain.to_string();
                out.first_bad_sequence = seq;
                out.problem = problem;
            }
            out.valid = false;
        };
        let archive = self.archive_target().cloned();
        out.archive = archive.as_ref().map(chipgate_archive::Target::url).unwrap_or_default();
        for (name, chain) in &chains {
            let pin = pins.get(name.as_str()).map(|p| (p.sequence, p.head_hash.as_str()));
            let (v, reached) = self.verify_chain(name, chain, pin, archive.as_ref()).await?;
            out.entries_checked += v.entries_checked;
            if out.chains.is_empty() {
                out.head_hash.clone_from(&v.head_hash);
            }
            if !reached {
                out.extends_checkpoint = false;
            }
            if !v.valid {
                if out.valid {
                    out.bad_segment.clone_from(&v.bad_segment);
                }
                fail(&mut out, name, v.first_bad_sequence, v.problem.clone());
            }
            out.chains.push(v);
        }
        // A pinned chain the service no longer has: its entries are gone (an empty one pins nothing).
        let known: std::collections::HashSet<&str> = chains.iter().map(|(n, _)| n.as_str()).collect();
        let mut gone: Vec<&pb::AuditChainHead> =
            pins.values().copied().filter(|p| p.sequence > 0 && !known.contains(p.chain.as_str())).collect();
        gone.sort_by(|a, b| a.chain.as_bytes().cmp(b.chain.as_bytes()));
        for p in gone {
            out.extends_checkpoint = false;
            fail(
                &mut out,
                &p.chain,
                1,
                format!("the checkpoint covers entries 1 to {} of a chain this log no longer has", p.sequence),
            );
        }
        Ok(out)
    }

    /// Verifies one chain: its archived segments (when the service has an archive), then the live
    /// tail in Redis from the archived base, as one chain. With `pin` (a checkpoint's sequence and
    /// hash for it), also that the chain still reaches that hash at that sequence. Returns the
    /// outcome and whether the pinned entry was reached intact (always true without a pin).
    async fn verify_chain(
        &self,
        name: &str,
        chain: &AuditChain,
        pin: Option<(u64, &str)>,
        archive: Option<&chipgate_archive::Target>,
    ) -> Result<(pb::AuditChainVerification, bool), Error> {
        let pin_seq = pin.map_or(0, |p| p.0);
        let (_, base_seq, base_hash) = crate::archive::archived_base(self.store(), chain).await?;
        let mut v = pb::AuditChainVerification {
            chain: name.to_string(),
            valid: true,
            head_hash: base_hash.clone(),
            checkpoint_sequence: pin_seq,
            archived_sequence: base_seq,
            archived_hash: base_hash.clone(),
            ..Default::default()
        };
        let fail = |mut v: pb::AuditChainVerification, seq: u64, problem: String, segment: &str| {
            v.valid = false;
            v.first_bad_sequence = seq;
            v.problem = problem;
            v.bad_segment = segment.to_string();
            v
        };
        // An empty pin (sequence 0) is reached before the first entry.
        let mut reached = pin_seq == 0;
        // Where each archived segment ends (sequence → hash, segment): the archived base must be
        // one of them, and one written but not trimmed yet must agree with Redis.
        let mut ends = std::collections::BTreeMap::new();
        if let Some(target) = archive {
            let check_cp = |cp: &pb::AuditCheckpoint| self.check_sealed_checkpoint(cp);
            match chipgate_archive::audit::verify_chain(target, name, pin, &check_cp).await {
                Ok(a) => {
                    v.segments_checked = a.segments;
                    v.entries_checked = a.entries.min(base_seq);
                    reached |= a.pin_reached;
                    ends = a.ends;
                }
                Err(p) => return Ok((fail(v, p.sequence, p.problem, &p.segment), reached)),
            }
            if base_seq > 0 && ends.get(&base_seq).map(|(h, _)| h.as_str()) != Some(base_hash.as_str()) {
                let segment = ends.range(base_seq..).next().map(|(_, (_, s))| s.clone()).unwrap_or_default();
                let problem = format!(
                    "Redis holds the chain from entry {} on, but the archive has no segment ending at entry \
                     {base_seq} with the hash Redis starts from: archived entries are missing or were replaced",
                    base_seq + 1
                );
                return Ok((fail(v, base_seq, problem, &segment), reached));
            }
        }
        if let Some((s, h)) = pin
            && s <= base_seq
            && !reached
        {
            if s == base_seq && h == base_hash {
                reached = true;
            } else if archive.is_none() {
                let problem = format!(
                    "the checkpoint pins entry {s}, which was archived out of Redis, and this service has no archive \
                     configured to check it"
                );
                return Ok((fail(v, s, problem, ""), false));
            }
        }
        let mut prev = base_hash.clone();
        let mut expected_seq = base_seq + 1;
        let mut live = 0u64;
        let mut after: Option<String> = None;
        loop {
            let chunk = self.store().xrange(&chain.stream, after.as_deref(), SCAN_CHUNK).await?;
            if chunk.is_empty() {
                break;
            }
            for e in &chunk {
                after = Some(e.id.clone());
                live += 1;
                v.entries_checked += 1;
                v.head_hash.clone_from(&prev);
                let seq: u64 = text(e, "seq").and_then(|s| s.parse().ok()).unwrap_or(0);
                let bad =
                    |v: pb::AuditChainVerification, problem: String| Ok((fail(v, expected_seq, problem, ""), reached));
                if seq != expected_seq {
                    return bad(v, format!("entry {expected_seq} is missing (found sequence {seq} in its place)"));
                }
                let stored_prev = text(e, "prev").unwrap_or_default();
                if stored_prev != prev {
                    return bad(v, "its previous-hash does not match the entry before it".into());
                }
                let body = e.field("entry").unwrap_or_default();
                let Some(link) = audit_link(&prev, &sha256_hex(body)) else {
                    return bad(v, "its previous-hash is not a SHA-256 digest".into());
                };
                let stored_hash = text(e, "hash").unwrap_or_default();
                if stored_hash != link {
                    return bad(v, "its content does not match its hash (the entry was altered)".into());
                }
                if let Some((s, h)) = pin
                    && s == seq
                {
                    if link != h {
                        return bad(
                            v,
                            format!(
                                "entry {seq} no longer has the hash the checkpoint pinned: the log up to it was \
                                 rewritten and re-linked"
                            ),
                        );
                    }
                    reached = true;
                }
                // A segment written and not trimmed yet holds this entry too: both copies must agree.
                if let Some((h, segment)) = ends.get(&seq)
                    && *h != link
                {
                    let problem = format!("the archive's copy of entry {seq} differs from the one in Redis");
                    return Ok((fail(v, seq, problem, segment), reached));
                }
                prev = link;
                expected_seq += 1;
            }
        }
        v.head_hash.clone_from(&prev);
        let last = base_seq + live;
        // The head must point at the last entry, or entries were cut off the end.
        let head = self.store().get(std::slice::from_ref(&chain.head)).await?.pop().flatten();
        if let Some(h) = head {
            let head_hash = String::from_utf8_lossy(&h.data).to_string();
            if h.version != last || head_hash != prev {
                let problem = format!("the log ends at entry {last} but its head records entry {}", h.version);
                return Ok((fail(v, last + 1, problem, ""), reached));
            }
        } else if last > 0 {
            return Ok((fail(v, last, "the log has entries but no head".into(), ""), reached));
        }
        if let Some((&end, (_, segment))) = ends.last_key_value()
            && end > last
        {
            let problem = format!("the chain in Redis ends at entry {last} but the archive holds entries up to {end}");
            return Ok((fail(v, last + 1, problem, segment), reached));
        }
        if !reached {
            // Consistent, but shorter than the checkpoint: the end was cut off and the head moved back
            // (or the whole log deleted).
            let problem = format!(
                "the chain ends at entry {last} but the checkpoint pinned entry {pin_seq}: entries {} to {pin_seq} \
                 were removed",
                last + 1
            );
            return Ok((fail(v, last + 1, problem, ""), false));
        }
        Ok((v, true))
    }
}

/// INVALID_ARGUMENT for a checkpoint that can't be trusted, with the field and a stable reason.
fn refuse(d: Defect) -> Error {
    let message = format!("checkpoint refused: {}: {}", d.field, d.description);
    let mut details = ErrorDetails::with_bad_request(vec![FieldViolation::new(d.field, d.description)]);
    details.set_error_info(d.reason, chipgate_runtime::errors::DOMAIN, []);
    Error::Status(Status::with_error_details(Code::InvalidArgument, message, details))
}
