//! Audit-log segments: sealing a run of a chain's entries and checking sealed ones.
//!
//! A line is one entry: `{"seq", "prev", "hash", "entry", "record"}` where `entry` is the exact bytes
//! the chain hashed (base64 of the encoded `chipgate.licensing.v1.AuditEntry`), so
//! `hash = SHA-256(prev ‖ SHA-256(entry))` is recomputed from the archive alone, and `record` is the
//! same entry in proto3 JSON for people (checked against `entry`, so it can't say something else).
//! The manifest carries the hash the segment starts from and ends at and a checkpoint, signed with
//! licensing's audit key, pinning the chain at the segment's last entry: a segment rewritten and
//! re-linked by someone without the key no longer matches it.

use std::collections::BTreeMap;

use base64::Engine;
use chipgate_proto::licensing::v1 as pb;
use chipgate_state::{AUDIT_GENESIS, audit_link, sha256_hex};
use prost::Message;
use serde_json::{Value, json};

use crate::segment::{self, Manifest, Sealed};
use crate::{Problem, Target, json as pj};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// One audit entry: as the chain's stream holds it, or as a segment line holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Its sequence number (1-based).
    pub seq: u64,
    /// The previous entry's hash.
    pub prev: String,
    /// Its hash.
    pub hash: String,
    /// The encoded entry, exactly as hashed.
    pub entry: Vec<u8>,
}

impl Entry {
    /// The entry's time in milliseconds (0 when it has none or doesn't decode).
    pub fn time_ms(&self) -> u64 {
        pb::AuditEntry::decode(self.entry.as_slice())
            .ok()
            .and_then(|e| e.time)
            .map(|t| (t.seconds.max(0) as u64) * 1000 + (t.nanos.max(0) as u64) / 1_000_000)
            .unwrap_or(0)
    }

    /// The entry as `ListAuditEntries` shows it (sequence and hashes filled in), in proto3 JSON; null
    /// when the bytes are not an audit entry.
    fn record(&self) -> Value {
        match pb::AuditEntry::decode(self.entry.as_slice()) {
            Ok(mut e) => {
                e.sequence = self.seq;
                e.prev_hash.clone_from(&self.prev);
                e.hash.clone_from(&self.hash);
                pj::to_json(&e).unwrap_or(Value::Null)
            }
            Err(_) => Value::Null,
        }
    }

    fn line(&self) -> Value {
        json!({
            "seq": self.seq,
            "prev": self.prev,
            "hash": self.hash,
            "entry": B64.encode(&self.entry),
            "record": self.record(),
        })
    }
}

/// Seals `entries` (consecutive, non-empty, linked) of `chain` with `checkpoint` (which must pin the
/// chain at the last entry).
pub fn seal(chain: &str, entries: &[Entry], checkpoint: &pb::AuditCheckpoint, now_ms: u64, written_by: &str) -> Sealed {
    let mut json = Vec::new();
    for e in entries {
        segment::push_line(&mut json, &e.line());
    }
    let data = segment::compress(&json);
    let (first, last) = (entries.first(), entries.last());
    let manifest_name = segment::audit_manifest(chain, first.map_or(0, |e| e.seq));
    let data_name = segment::data_name(&manifest_name, &sha256_hex(&data));
    let times: Vec<u64> = entries.iter().map(Entry::time_ms).collect();
    let manifest = Manifest {
        format: segment::FORMAT.to_string(),
        kind: "audit".to_string(),
        stream: chain.to_string(),
        data: data_name.clone(),
        data_sha256: sha256_hex(&data),
        data_bytes: data.len() as u64,
        json_bytes: json.len() as u64,
        records: entries.len() as u64,
        first: first.map_or(0, |e| e.seq),
        last: last.map_or(0, |e| e.seq),
        first_prev_hash: first.map(|e| e.prev.clone()),
        last_hash: last.map(|e| e.hash.clone()),
        first_time: crate::rfc3339(times.iter().copied().min().unwrap_or(0)),
        last_time: crate::rfc3339(times.iter().copied().max().unwrap_or(0)),
        previous_manifest_sha256: None,
        order_seqs: Vec::new(),
        checkpoint: pj::to_json(checkpoint).ok(),
        created_at: crate::rfc3339(now_ms),
        written_by: written_by.to_string(),
    };
    Sealed { data_name, data, manifest_name, manifest }
}

/// Checks a segment's manifest `m` (named `name`) and its JSON Lines against `chain`, starting at
/// sequence `first` from hash `prev`: every line's link recomputed, the manifest's ends, and its
/// checkpoint (`check_cp` checks the signature; here, that it pins the last entry). Returns the
/// entries.
///
/// # Errors
/// The first problem, with the segment and the sequence where it is.
pub fn check_segment(
    name: &str,
    m: &Manifest,
    json: &[u8],
    chain: &str,
    first: u64,
    prev: &str,
    check_cp: &(dyn Fn(&pb::AuditCheckpoint) -> Result<(), String> + Sync),
) -> Result<Vec<Entry>, Problem> {
    let bad = |seq: u64, why: String| Err(Problem::new(name, seq, why));
    if m.kind != "audit" || m.stream != chain {
        return bad(0, format!("the manifest is of {} {:?}, not of audit chain {chain:?}", m.kind, m.stream));
    }
    if m.first != first {
        return bad(
            first,
            if m.first > first {
                format!("entries {first} to {} are missing from the archive", m.first - 1)
            } else {
                format!(
                    "the segment starts at entry {}, inside the previous segment (which ends at {})",
                    m.first,
                    first - 1
                )
            },
        );
    }
    if m.first_prev_hash.as_deref() != Some(prev) {
        return bad(
            first,
            "its first entry's previous-hash in the manifest is not the previous segment's last hash".into(),
        );
    }
    let lines = segment::lines(json).map_err(|e| Problem::new(name, first, e))?;
    if lines.len() as u64 != m.records || lines.is_empty() {
        return bad(first, format!("holds {} lines, its manifest says {}", lines.len(), m.records));
    }
    let mut out = Vec::with_capacity(lines.len());
    let mut running = prev.to_string();
    for (i, l) in lines.iter().enumerate() {
        let seq = first + i as u64;
        let text = |f: &str| l.get(f).and_then(Value::as_str).unwrap_or_default().to_string();
        if l.get("seq").and_then(Value::as_u64) != Some(seq) {
            return bad(seq, format!("entry {seq} is missing (line {} holds another sequence)", i + 1));
        }
        let Ok(entry) = B64.decode(text("entry")) else {
            return bad(seq, "its entry is not base64".into());
        };
        let e = Entry { seq, prev: text("prev"), hash: text("hash"), entry };
        if e.prev != running {
            return bad(seq, "its previous-hash does not match the entry before it".into());
        }
        let Some(link) = audit_link(&running, &sha256_hex(&e.entry)) else {
            return bad(seq, "its previous-hash is not a SHA-256 digest".into());
        };
        if e.hash != link {
            return bad(seq, "its content does not match its hash (the entry was altered)".into());
        }
        if l.get("record") != Some(&e.record()) {
            return bad(seq, "its readable record does not say what its hashed entry says".into());
        }
        running = link;
        out.push(e);
    }
    let last = out.last().map_or(0, |e| e.seq);
    if m.last != last || m.last_hash.as_deref() != Some(running.as_str()) {
        return bad(last, "the manifest's last sequence or hash is not the segment's last entry".into());
    }
    let cp = m
        .checkpoint
        .as_ref()
        .ok_or_else(|| Problem::new(name, last, "the manifest has no checkpoint"))
        .and_then(|v| pj::from_json::<pb::AuditCheckpoint>(v).map_err(|e| Problem::new(name, last, e)))?;
    check_cp(&cp).map_err(|e| Problem::new(name, last, format!("its checkpoint is refused: {e}")))?;
    if !cp.chains.iter().any(|c| c.chain == chain && c.sequence == last && c.head_hash == running) {
        return bad(last, format!("its checkpoint does not pin entry {last} with the segment's last hash"));
    }
    Ok(out)
}

/// What a chain's archive holds, once checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChainArchive {
    /// Segments checked.
    pub segments: u64,
    /// Entries checked.
    pub entries: u64,
    /// Compressed bytes read.
    pub bytes: u64,
    /// The last archived entry's sequence (0: nothing archived).
    pub last_seq: u64,
    /// Its hash (64 zeros when nothing is archived).
    pub last_hash: String,
    /// Each segment's last sequence → (its hash, the segment's manifest name): where Redis may start.
    pub ends: BTreeMap<u64, (String, String)>,
    /// Whether a pinned entry (see [`verify_chain`]) was found in the archive with its pinned hash
    /// (or lies in pruned history, which can no longer be checked).
    pub pin_reached: bool,
    /// The first entry the archive still holds (1, or just after the pruned history).
    pub first_seq: u64,
}

/// Checks every segment of `chain` in the archive, in order, from the genesis: each segment's data
/// hash, every link, the links across segment boundaries, and each segment's signed checkpoint. With
/// `pin` (a kept checkpoint's sequence and hash), also that the archive has that hash there when it
/// holds that sequence.
///
/// # Errors
/// The first problem, naming its segment.
pub async fn verify_chain(
    target: &Target,
    chain: &str,
    pin: Option<(u64, &str)>,
    check_cp: &(dyn Fn(&pb::AuditCheckpoint) -> Result<(), String> + Sync),
) -> Result<ChainArchive, Problem> {
    let dir = segment::audit_dir(chain);
    let names = target
        .list(&dir, segment::MANIFEST_SUFFIX)
        .await
        .map_err(|e| Problem::new(&dir, 0, format!("the archive can't be listed: {e}")))?;
    let mut out = ChainArchive { last_hash: AUDIT_GENESIS.to_string(), first_seq: 1, ..ChainArchive::default() };
    // Past the legal retention the oldest segments may have been pruned: the kept history then
    // starts where the marker's signed checkpoint pins it.
    if let Some((marker_name, marker)) = crate::prune::latest(target, &dir).await? {
        let bad = |why: String| Problem::new(&marker_name, marker.through, why);
        let hash = marker.through_hash.clone().unwrap_or_default();
        if marker.kind != "audit" || marker.stream != chain {
            return Err(bad(format!("the pruning marker is of {} {:?}", marker.kind, marker.stream)));
        }
        let cp = marker
            .checkpoint
            .as_ref()
            .ok_or_else(|| bad("the pruning marker has no checkpoint".into()))
            .and_then(|v| pj::from_json::<pb::AuditCheckpoint>(v).map_err(bad))?;
        check_cp(&cp).map_err(|e| bad(format!("the pruning marker's checkpoint is refused: {e}")))?;
        if !cp.chains.iter().any(|c| c.chain == chain && c.sequence == marker.through && c.head_hash == hash) {
            return Err(bad(format!(
                "the pruning marker's checkpoint does not pin entry {} with its hash",
                marker.through
            )));
        }
        if let Some((s, h)) = pin
            && s <= marker.through
        {
            if s == marker.through && h != hash {
                return Err(bad(format!("entry {s} no longer has the hash the checkpoint pinned")));
            }
            out.pin_reached = true;
        }
        out.last_seq = marker.through;
        out.ends.insert(marker.through, (hash.clone(), marker_name.clone()));
        out.last_hash = hash;
        out.first_seq = marker.through + 1;
    }
    for name in names {
        let (m, json) = segment::read_checked(target, &name).await?;
        if m.last < out.first_seq && out.first_seq > 1 {
            // Pruned (the marker covers it); a crash left it before its deletion.
            continue;
        }
        let entries = check_segment(&name, &m, &json, chain, out.last_seq + 1, &out.last_hash, check_cp)?;
        if let Some((s, h)) = pin
            && let Some(e) = entries.iter().find(|e| e.seq == s)
        {
            if e.hash != h {
                return Err(Problem::new(
                    &name,
                    s,
                    format!("entry {s} no longer has the hash the checkpoint pinned: the archive was rewritten"),
                ));
            }
            out.pin_reached = true;
        }
        out.segments += 1;
        out.entries += entries.len() as u64;
        out.bytes += m.data_bytes;
        out.last_seq = m.last;
        out.last_hash = m.last_hash.clone().unwrap_or_default();
        out.ends.insert(m.last, (out.last_hash.clone(), name));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain_of(n: u64) -> Vec<Entry> {
        let mut prev = AUDIT_GENESIS.to_string();
        (1..=n)
            .map(|seq| {
                let body = pb::AuditEntry {
                    action: "test".into(),
                    subject: format!("s{seq}"),
                    time: Some(prost_types::Timestamp { seconds: 1_700_000_000 + seq as i64, nanos: 0 }),
                    ..Default::default()
                }
                .encode_to_vec();
                let hash = audit_link(&prev, &sha256_hex(&body)).expect("hex");
                let e = Entry { seq, prev: prev.clone(), hash: hash.clone(), entry: body };
                prev = hash;
                e
            })
            .collect()
    }

    fn pin(chain: &str, e: &Entry) -> pb::AuditCheckpoint {
        pb::AuditCheckpoint {
            chains: vec![pb::AuditChainHead { chain: chain.into(), sequence: e.seq, head_hash: e.hash.clone() }],
            root: "r".into(),
            time: Some(prost_types::Timestamp::default()),
            ..Default::default()
        }
    }

    /// Writes a segment, replacing what is there (tampering, as the tests need).
    async fn write(t: &Target, s: &Sealed) {
        t.put(&s.data_name, s.data.clone()).await.expect("data");
        t.put(&s.manifest_name, s.manifest.to_bytes()).await.expect("manifest");
    }

    #[tokio::test]
    async fn segments_verify_across_boundaries_and_name_the_broken_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        segments_verify_on(&Target::Dir(dir.path().to_path_buf())).await;
    }

    #[tokio::test]
    async fn segments_verify_across_boundaries_and_name_the_broken_one_on_s3() {
        let moto = crate::testing::MotoServer::start();
        segments_verify_on(&moto.target("archive")).await;
    }

    async fn segments_verify_on(t: &Target) {
        let t = t.clone();
        let entries = chain_of(10);
        let ok = |_: &pb::AuditCheckpoint| Ok(());
        let a = seal("c", &entries[..4], &pin("c", &entries[3]), 0, "test");
        let b = seal("c", &entries[4..], &pin("c", &entries[9]), 0, "test");
        write(&t, &a).await;
        write(&t, &b).await;
        let v = verify_chain(&t, "c", Some((6, &entries[5].hash)), &ok).await.expect("verifies");
        assert_eq!((v.segments, v.entries, v.last_seq), (2, 10, 10));
        assert!(v.pin_reached);
        assert_eq!(v.ends.get(&4).map(|e| e.1.as_str()), Some(a.manifest_name.as_str()));
        let err = verify_chain(&t, "c", Some((6, &entries[6].hash)), &ok).await.expect_err("pin mismatch");
        assert_eq!((err.segment.as_str(), err.sequence), (b.manifest_name.as_str(), 6));

        // A checkpoint that doesn't pin the last entry, or that the key refuses.
        let refuse = |_: &pb::AuditCheckpoint| Err("bad signature".to_string());
        let err = verify_chain(&t, "c", None, &refuse).await.expect_err("refused");
        assert!(err.problem.contains("bad signature"), "{err}");

        // One byte of the second segment's data changed: its hash no longer matches its manifest.
        let mut data = b.data.clone();
        let last = data.len() - 10;
        data[last] ^= 1;
        t.put(&b.data_name, data).await.expect("tamper");
        let err = verify_chain(&t, "c", None, &ok).await.expect_err("tampered");
        assert_eq!(err.segment, b.manifest_name);

        // A re-sealed segment with an edited entry (data and manifest consistent again, links
        // recomputed) still fails: the manifest's checkpoint pins the old last hash.
        let mut forged = chain_of(10);
        forged[5].entry = b"edited".to_vec();
        let mut prev = forged[4].hash.clone();
        for e in &mut forged[5..] {
            e.prev = prev.clone();
            e.hash = audit_link(&prev, &sha256_hex(&e.entry)).expect("hex");
            prev = e.hash.clone();
        }
        let f = seal("c", &forged[4..], &pin("c", &entries[9]), 0, "test");
        write(&t, &f).await;
        let err = verify_chain(&t, "c", None, &ok).await.expect_err("forged");
        assert_eq!((err.segment.as_str(), err.sequence), (b.manifest_name.as_str(), 10));
        assert!(err.problem.contains("does not pin"), "{err}");

        // A missing first segment: entries 1..4 are gone.
        write(&t, &b).await;
        t.delete(&a.manifest_name).await.expect("rm");
        let err = verify_chain(&t, "c", None, &ok).await.expect_err("gap");
        assert!(err.problem.contains("entries 1 to 4 are missing"), "{err}");
    }
}
