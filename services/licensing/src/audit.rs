//! Reading and verifying the audit log.
//!
//! Each entry is stored with its sequence number, the previous entry's hash and its own hash, where
//! `hash = SHA-256(prev_hash || SHA-256(entry))` was computed by the state backend inside the same
//! atomic step that made the change. Verification recomputes every link from the stored entries, so
//! an edited entry, a removed entry or a reordered log is found.

use chipgate_proto::licensing::v1 as pb;
use chipgate_runtime::errors::Violations;
use chipgate_runtime::paging::{self, Page};
use chipgate_runtime::service::Records;
use chipgate_runtime::validate;
use chipgate_state::{AUDIT_GENESIS, Backend, StreamEntry, audit_link, sha256_hex};
use prost::Message;

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
        let page = Page::parse(&mut v, req.page_size, &req.page_token);
        v.check().map_err(Error::Status)?;
        let stream = keys::audit().stream;
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

    pub(crate) async fn verify_audit_log(
        &self,
        _req: pb::VerifyAuditLogRequest,
    ) -> Result<pb::VerifyAuditLogResponse, Error> {
        let chain = keys::audit();
        let mut prev = AUDIT_GENESIS.to_string();
        let mut expected_seq = 1u64;
        let mut checked = 0u64;
        let mut after: Option<String> = None;
        let bad = |seq: u64, checked: u64, problem: String, head: &str| pb::VerifyAuditLogResponse {
            valid: false,
            entries_checked: checked,
            first_bad_sequence: seq,
            problem,
            head_hash: head.to_string(),
        };
        loop {
            let chunk = self.store().xrange(&chain.stream, after.as_deref(), SCAN_CHUNK).await?;
            if chunk.is_empty() {
                break;
            }
            for e in &chunk {
                after = Some(e.id.clone());
                checked += 1;
                let seq: u64 = text(e, "seq").and_then(|s| s.parse().ok()).unwrap_or(0);
                if seq != expected_seq {
                    return Ok(bad(
                        expected_seq,
                        checked,
                        format!("entry {expected_seq} is missing (found sequence {seq} in its place)"),
                        &prev,
                    ));
                }
                let stored_prev = text(e, "prev").unwrap_or_default();
                if stored_prev != prev {
                    return Ok(bad(seq, checked, "its previous-hash does not match the entry before it".into(), &prev));
                }
                let body = e.field("entry").unwrap_or_default();
                let Some(link) = audit_link(&prev, &sha256_hex(body)) else {
                    return Ok(bad(seq, checked, "its previous-hash is not a SHA-256 digest".into(), &prev));
                };
                let stored_hash = text(e, "hash").unwrap_or_default();
                if stored_hash != link {
                    return Ok(bad(
                        seq,
                        checked,
                        "its content does not match its hash (the entry was altered)".into(),
                        &prev,
                    ));
                }
                prev = link;
                expected_seq += 1;
            }
        }
        // The head must point at the last entry, or entries were cut off the end.
        let head = self.store().get(std::slice::from_ref(&chain.head)).await?.pop().flatten();
        if let Some(h) = head {
            let head_hash = String::from_utf8_lossy(&h.data).to_string();
            if h.version != checked || head_hash != prev {
                return Ok(bad(
                    checked + 1,
                    checked,
                    format!("the log ends at entry {checked} but its head records entry {}", h.version),
                    &prev,
                ));
            }
        } else if checked > 0 {
            return Ok(bad(checked, checked, "the log has entries but no head".into(), &prev));
        }
        Ok(pb::VerifyAuditLogResponse {
            valid: true,
            entries_checked: checked,
            first_bad_sequence: 0,
            problem: String::new(),
            head_hash: prev,
        })
    }
}
