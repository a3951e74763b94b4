//! Retention expiry: removing segments older than the legal retention, by an explicit operator
//! command only (`chipgate archive prune`; nothing prunes by itself).
//!
//! Export-control records must be kept five years (15 CFR 762.6); after that a compliance team may
//! delete them. A stream (an audit chain, a product's orders) loses only its *oldest* segments, in
//! order, each wholly older than the cutoff (its latest record), never its newest one (Redis, and the
//! next segment's seal, continue from it). Before anything is removed the stream must verify, and a
//! **pruning marker** is written create-only beside the segments (`<last pruned>.pruned.json`): what
//! was removed (each segment's names, hash, records and times), when and under which retention, and
//! where the kept history starts. For an audit chain that start is vouched for by the last pruned
//! segment's **signed checkpoint**, carried in the marker: verification then starts from the pinned
//! sequence and hash instead of the genesis, so a forged start (without the audit key) is refused,
//! and a marker whose checkpoint is younger than the retention says the records were removed early.
//! For orders the marker holds the SHA-256 of the last pruned manifest, which the next kept segment
//! links to. A crash after the marker and before every deletion leaves segments the marker already
//! covers; readers skip them and the next prune removes them.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::segment::{self, Manifest};
use crate::{Problem, Target};

/// Suffix of pruning markers.
pub const PRUNED_SUFFIX: &str = ".pruned.json";

/// One removed segment, as the marker records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removed {
    /// Its manifest's name.
    pub manifest: String,
    /// Its data object's name.
    pub data: String,
    /// Its data's SHA-256.
    pub data_sha256: String,
    /// Records it held.
    pub records: u64,
    /// Its first and last sequence (audit) or its number (orders).
    pub first: u64,
    /// See `first`.
    pub last: u64,
    /// Its latest record's time (RFC 3339).
    pub last_time: String,
}

/// A pruning marker: where a stream's kept history starts, and what was removed before it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Marker {
    /// [`segment::FORMAT`].
    pub format: String,
    /// `audit` or `orders`.
    pub kind: String,
    /// The chain or SKU.
    pub stream: String,
    /// Audit: the last removed entry's sequence. Orders: the last removed segment's number.
    pub through: u64,
    /// Audit: that entry's hash (what the first kept entry links to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub through_hash: Option<String>,
    /// Orders: the SHA-256 of the last removed manifest (what the first kept segment links to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub through_manifest_sha256: Option<String>,
    /// Audit: the last removed segment's signed checkpoint, which pins `through` and `through_hash`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Value>,
    /// The retention that was applied (as given, e.g. `1825d`).
    pub retention: String,
    /// Records older than this were removable (RFC 3339).
    pub cutoff: String,
    /// When the pruning ran (RFC 3339).
    pub pruned_at: String,
    /// What ran it.
    pub pruned_by: String,
    /// The segments this pruning removed (an earlier marker lists earlier ones).
    pub removed: Vec<Removed>,
}

impl Marker {
    /// Parses a stored marker named `name`.
    ///
    /// # Errors
    /// Not a marker of this format.
    pub fn parse(name: &str, bytes: &[u8]) -> Result<Self, Problem> {
        let m: Marker = serde_json::from_slice(bytes)
            .map_err(|e| Problem::new(name, 0, format!("the pruning marker is not readable: {e}")))?;
        if m.format != segment::FORMAT {
            return Err(Problem::new(name, 0, format!("unknown marker format {:?}", m.format)));
        }
        Ok(m)
    }
}

/// The newest pruning marker under `dir`, with its name (None: nothing was pruned).
///
/// # Errors
/// The target failed or the marker is not readable.
pub async fn latest(target: &Target, dir: &str) -> Result<Option<(String, Marker)>, Problem> {
    let names = target
        .list(dir, PRUNED_SUFFIX)
        .await
        .map_err(|e| Problem::new(dir, 0, format!("the archive can't be listed: {e}")))?;
    let Some(name) = names.last() else { return Ok(None) };
    let bytes = target
        .get(name)
        .await
        .map_err(|e| Problem::new(name, 0, format!("can't be read: {e}")))?
        .ok_or_else(|| Problem::new(name, 0, "the pruning marker is missing"))?;
    Ok(Some((name.clone(), Marker::parse(name, &bytes)?)))
}

/// Milliseconds of an RFC 3339 time (None when unreadable: such a segment is never taken as old).
pub(crate) fn ms_of(rfc3339: &str) -> Option<u64> {
    let t: prost_types::Timestamp = rfc3339.parse().ok()?;
    u64::try_from(t.seconds).ok().map(|s| s * 1000 + u64::try_from(t.nanos).unwrap_or(0) / 1_000_000)
}

/// What pruning did (or, without `apply`, would do) to one stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pruned {
    /// `audit` or `orders`.
    pub kind: &'static str,
    /// The chain or SKU.
    pub stream: String,
    /// Segments removed.
    pub segments: u64,
    /// Records in them.
    pub records: u64,
    /// Where the kept history now starts after (sequence or segment number).
    pub through: u64,
}

/// Prunes every audit chain and product of `target`: the leading segments whose latest record is
/// at or before `cutoff_ms`, never a stream's newest segment, after checking the stream (audit:
/// `check_cp` checks each checkpoint's signature, as [`crate::audit::verify_chain`]). Without
/// `apply`, only says what it would remove.
///
/// # Errors
/// The first stream that doesn't verify (nothing of it is removed), or a failure of the target.
pub async fn prune(
    target: &Target,
    cutoff_ms: u64,
    retention: &str,
    apply: bool,
    pruned_by: &str,
    check_cp: &(dyn Fn(&chipgate_proto::licensing::v1::AuditCheckpoint) -> Result<(), String> + Sync),
) -> Result<Vec<Pruned>, Problem> {
    let mut out = Vec::new();
    let now = crate::rfc3339(chipgate_runtime::time::now_ms());
    let list_err = |d: &str| {
        let d = d.to_string();
        move |e: crate::TargetError| Problem::new(&d, 0, format!("the archive can't be listed: {e}"))
    };
    for kind in ["audit", "orders"] {
        for dir in target.list_dirs(kind).await.map_err(list_err(kind))? {
            let dir = format!("{kind}/{dir}");
            let names = target.list(&dir, segment::MANIFEST_SUFFIX).await.map_err(list_err(&dir))?;
            let Some(first) = names.first() else { continue };
            let bytes = target.get(first).await.map_err(|e| Problem::new(first, 0, e.to_string()))?.unwrap_or_default();
            let stream = Manifest::parse(first, &bytes)?.stream;
            // The stream must verify before anything of it goes.
            let kept_from = if kind == "audit" {
                crate::audit::verify_chain(target, &stream, None, check_cp).await?.first_seq
            } else {
                crate::orders::verify_product(target, &stream, None).await?.first_segment
            };
            let mut removable = Vec::new();
            for name in &names {
                let bytes =
                    target.get(name).await.map_err(|e| Problem::new(name, 0, e.to_string()))?.unwrap_or_default();
                let m = Manifest::parse(name, &bytes)?;
                if m.first < kept_from {
                    // Already covered by a marker (a crash between marker and deletions): remove.
                    removable.push((name.clone(), m, bytes));
                    continue;
                }
                match ms_of(&m.last_time) {
                    Some(t) if t <= cutoff_ms => removable.push((name.clone(), m, bytes)),
                    _ => break,
                }
            }
            // Never the newest segment: Redis and the next seal continue from it.
            if removable.len() >= names.len() {
                removable.truncate(names.len().saturating_sub(1));
            }
            let Some((last_name, last, last_bytes)) = removable.last() else { continue };
            let fresh: Vec<&(String, Manifest, Vec<u8>)> =
                removable.iter().filter(|(_, m, _)| m.first >= kept_from).collect();
            let marker = Marker {
                format: segment::FORMAT.to_string(),
                kind: kind.to_string(),
                stream: stream.clone(),
                through: last.last,
                through_hash: last.last_hash.clone(),
                through_manifest_sha256: (kind == "orders").then(|| chipgate_state::sha256_hex(last_bytes)),
                checkpoint: last.checkpoint.clone(),
                retention: retention.to_string(),
                cutoff: crate::rfc3339(cutoff_ms),
                pruned_at: now.clone(),
                pruned_by: pruned_by.to_string(),
                removed: fresh
                    .iter()
                    .map(|(name, m, _)| Removed {
                        manifest: name.clone(),
                        data: m.data.clone(),
                        data_sha256: m.data_sha256.clone(),
                        records: m.records,
                        first: m.first,
                        last: m.last,
                        last_time: m.last_time.clone(),
                    })
                    .collect(),
            };
            out.push(Pruned {
                kind,
                stream: stream.clone(),
                segments: removable.len() as u64,
                records: removable.iter().map(|(_, m, _)| m.records).sum(),
                through: last.last,
            });
            if !apply {
                continue;
            }
            let width = if kind == "audit" { 20 } else { 12 };
            let marker_name = format!("{dir}/{:0width$}{PRUNED_SUFFIX}", last.last);
            if !fresh.is_empty() {
                let mut bytes = serde_json::to_vec_pretty(&marker).unwrap_or_default();
                bytes.push(b'\n');
                match target.create(&marker_name, bytes).await {
                    Ok(crate::Created::Written | crate::Created::Same) => {}
                    Ok(crate::Created::Differs) => {
                        return Err(Problem::new(&marker_name, 0, "a different pruning marker of that name exists"));
                    }
                    Err(e) => return Err(Problem::new(&marker_name, 0, e.to_string())),
                }
            }
            tracing::info!(kind, stream, through = last.last, segment = %last_name, "pruning segments past retention");
            for (name, m, _) in &removable {
                for object in [&m.data, name] {
                    target.delete(object).await.map_err(|e| Problem::new(name, 0, e.to_string()))?;
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use chipgate_proto::licensing::v1 as lpb;
    use chipgate_proto::orders::v1 as opb;
    use chipgate_state::{AUDIT_GENESIS, audit_link, sha256_hex};
    use prost::Message;

    use super::*;
    use crate::audit::{self, Entry};
    use crate::orders::{self, ClosedOrder};

    const DAY: i64 = 86_400;
    const T0: i64 = 1_600_000_000;

    /// Entries 1..=9, entry `seq` on day `seq` after T0.
    fn chain() -> Vec<Entry> {
        let mut prev = AUDIT_GENESIS.to_string();
        (1..=9u64)
            .map(|seq| {
                let body = lpb::AuditEntry {
                    action: "test".into(),
                    time: Some(prost_types::Timestamp { seconds: T0 + seq as i64 * DAY, nanos: 0 }),
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

    fn pin(e: &Entry) -> lpb::AuditCheckpoint {
        lpb::AuditCheckpoint {
            chains: vec![lpb::AuditChainHead { chain: "c".into(), sequence: e.seq, head_hash: e.hash.clone() }],
            root: "r".into(),
            time: Some(prost_types::Timestamp::default()),
            ..Default::default()
        }
    }

    fn closed(seq: u64) -> ClosedOrder {
        let t = T0 + seq as i64 * DAY;
        ClosedOrder {
            seq,
            order: opb::Order {
                order_id: format!("ord-H200-{seq}"),
                buyer_id: "acme".into(),
                product_sku: "H200".into(),
                update_time: Some(prost_types::Timestamp { seconds: t, nanos: 0 }),
                ..Default::default()
            },
            closed_ms: t as u64 * 1000,
        }
    }

    #[tokio::test]
    async fn old_segments_are_pruned_and_the_rest_still_verifies() {
        let dir = tempfile::tempdir().expect("tempdir");
        pruning_on(&Target::Dir(dir.path().to_path_buf())).await;
    }

    #[tokio::test]
    async fn old_segments_are_pruned_and_the_rest_still_verifies_on_s3() {
        let moto = crate::testing::MotoServer::start();
        pruning_on(&moto.target("records")).await;
    }

    async fn pruning_on(t: &Target) {
        let entries = chain();
        for range in [0..3, 3..6, 6..9] {
            let last = &entries[range.end - 1];
            audit::seal("c", &entries[range], &pin(last), 0, "t").write(t).await.expect("write");
        }
        let mut previous = None;
        for n in 1..=3u64 {
            let s = orders::seal("H200", n, &[closed(3 * n - 2), closed(3 * n - 1), closed(3 * n)], previous, 0, "t");
            s.write(t).await.expect("write");
            previous = orders::manifest_sha256(t, &s.manifest_name).await.expect("read");
        }
        let ok = |_: &lpb::AuditCheckpoint| Ok(());
        // Everything up to day 7 is past retention: segments 1 and 2 of each stream may go.
        let cutoff = (T0 + 7 * DAY) as u64 * 1000;

        // An archive that doesn't verify is not pruned (that would destroy the evidence).
        let refuse = |_: &lpb::AuditCheckpoint| Err("bad signature".to_string());
        let err = prune(t, cutoff, "5y", true, "test", &refuse).await.expect_err("refused");
        assert!(err.problem.contains("bad signature"), "{err}");
        assert_eq!(t.list("audit/c", segment::MANIFEST_SUFFIX).await.expect("list").len(), 3);

        // A dry run says what would go and removes nothing.
        let plan = prune(t, cutoff, "5y", false, "test", &ok).await.expect("plan");
        let summary: Vec<(&str, u64, u64, u64)> =
            plan.iter().map(|p| (p.kind, p.segments, p.records, p.through)).collect();
        assert_eq!(summary, vec![("audit", 2, 6, 6), ("orders", 2, 6, 2)]);
        assert_eq!(t.list("audit/c", segment::MANIFEST_SUFFIX).await.expect("list").len(), 3);

        let done = prune(t, cutoff, "5y", true, "test", &ok).await.expect("pruned");
        assert_eq!(done, plan);
        assert_eq!(t.list("audit/c", segment::MANIFEST_SUFFIX).await.expect("list").len(), 1);
        assert_eq!(t.list("orders/H200", "").await.expect("list").len(), 3, "one segment (2 objects) and the marker");
        let v = audit::verify_chain(t, "c", None, &ok).await.expect("the kept history verifies");
        assert_eq!((v.segments, v.entries, v.first_seq, v.last_seq), (1, 3, 7, 9));
        let p = orders::verify_product(t, "H200", Some(3)).await.expect("the kept segments verify");
        assert_eq!((p.segments, p.orders, p.first_segment), (1, 3, 3));
        let (_, marker) = latest(t, "audit/c").await.expect("read").expect("a marker");
        assert_eq!((marker.through, marker.removed.len(), marker.retention.as_str()), (6, 2, "5y"));
        assert_eq!(marker.removed[0].manifest, segment::audit_manifest("c", 1));

        // The newest segment is never pruned, however old.
        let again = prune(t, u64::MAX / 2, "5y", true, "test", &ok).await.expect("nothing more");
        assert!(again.is_empty(), "{again:?}");

        // A marker whose start was changed is refused: its signed checkpoint pins the real one.
        let name = format!("audit/c/{:020}{PRUNED_SUFFIX}", 6);
        let mut forged = marker.clone();
        forged.through_hash = Some(entries[4].hash.clone());
        t.put(&name, serde_json::to_vec(&forged).expect("json")).await.expect("tamper");
        let err = audit::verify_chain(t, "c", None, &ok).await.expect_err("forged start");
        assert_eq!(err.segment, name);
        assert!(err.problem.contains("does not pin"), "{err}");
    }
}
