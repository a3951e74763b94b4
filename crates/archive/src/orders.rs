//! Closed-order segments: one product's orders closed longer than the retention window, as the API
//! shows them (`chipgate.orders.v1.Order` in proto3 JSON, with every transition and its reasons).
//!
//! A product's segments are numbered 1, 2, …; each manifest carries the SHA-256 of the one before,
//! so a removed or replaced segment breaks the sequence, and lists the order numbers it holds, so an
//! order is found by reading manifests only.

use chipgate_proto::orders::v1 as pb;
use serde_json::{Value, json};

use crate::segment::{self, Manifest, Sealed};
use crate::{Problem, Target, json as pj};

/// An order to archive.
#[derive(Clone, Debug, PartialEq)]
pub struct ClosedOrder {
    /// Its placement sequence (`ord-<SKU>-<seq>`).
    pub seq: u64,
    /// The order with its whole history, as `GetOrder` shows it.
    pub order: pb::Order,
    /// When it closed (ms).
    pub closed_ms: u64,
}

/// Seals segment number `n` of product `sku` from `orders` (non-empty, by sequence);
/// `previous_manifest_sha256` is the SHA-256 of segment `n - 1`'s manifest (None for segment 1).
pub fn seal(
    sku: &str,
    n: u64,
    orders: &[ClosedOrder],
    previous_manifest_sha256: Option<String>,
    now_ms: u64,
    written_by: &str,
) -> Sealed {
    let mut json = Vec::new();
    for o in orders {
        let line = json!({
            "order_id": o.order.order_id,
            "buyer_id": o.order.buyer_id,
            "product_sku": o.order.product_sku,
            "sequence": o.seq,
            "closed_at": crate::rfc3339(o.closed_ms),
            "order": pj::to_json(&o.order).unwrap_or(Value::Null),
        });
        segment::push_line(&mut json, &line);
    }
    let data = segment::compress(&json);
    let manifest_name = segment::orders_manifest(sku, n);
    let data_name = segment::data_name(&manifest_name, &chipgate_state::sha256_hex(&data));
    let closed: Vec<u64> = orders.iter().map(|o| o.closed_ms).collect();
    let manifest = Manifest {
        format: segment::FORMAT.to_string(),
        kind: "orders".to_string(),
        stream: sku.to_string(),
        data: data_name.clone(),
        data_sha256: chipgate_state::sha256_hex(&data),
        data_bytes: data.len() as u64,
        json_bytes: json.len() as u64,
        records: orders.len() as u64,
        first: n,
        last: n,
        first_prev_hash: None,
        last_hash: None,
        first_time: crate::rfc3339(closed.iter().copied().min().unwrap_or(0)),
        last_time: crate::rfc3339(closed.iter().copied().max().unwrap_or(0)),
        previous_manifest_sha256,
        order_seqs: ranges(orders.iter().map(|o| o.seq)),
        checkpoint: None,
        created_at: crate::rfc3339(now_ms),
        written_by: written_by.to_string(),
    };
    Sealed { data_name, data, manifest_name, manifest }
}

/// Sorted numbers as inclusive ranges.
fn ranges(seqs: impl Iterator<Item = u64>) -> Vec<[u64; 2]> {
    let mut all: Vec<u64> = seqs.collect();
    all.sort_unstable();
    all.dedup();
    let mut out: Vec<[u64; 2]> = Vec::new();
    for s in all {
        match out.last_mut() {
            Some(r) if r[1] + 1 == s => r[1] = s,
            _ => out.push([s, s]),
        }
    }
    out
}

fn holds(m: &Manifest, seq: u64) -> bool {
    m.order_seqs.iter().any(|r| r[0] <= seq && seq <= r[1])
}

/// Checks a product's segment (manifest `m` named `name`, its JSON Lines) and returns its orders:
/// each line an order of `sku` that the manifest lists, in the API's JSON.
///
/// # Errors
/// The first problem.
pub fn check_segment(name: &str, m: &Manifest, json: &[u8], sku: &str) -> Result<Vec<ClosedOrder>, Problem> {
    if m.kind != "orders" || m.stream != sku {
        return Err(Problem::new(
            name,
            0,
            format!("the manifest is of {} {:?}, not of product {sku:?}", m.kind, m.stream),
        ));
    }
    let lines = segment::lines(json).map_err(|e| Problem::new(name, 0, e))?;
    if lines.len() as u64 != m.records {
        return Err(Problem::new(name, 0, format!("holds {} lines, its manifest says {}", lines.len(), m.records)));
    }
    let mut out = Vec::with_capacity(lines.len());
    for (i, l) in lines.iter().enumerate() {
        let bad = |why: String| Problem::new(name, 0, format!("line {}: {why}", i + 1));
        let order: pb::Order =
            l.get("order").ok_or_else(|| bad("no order".into())).and_then(|v| pj::from_json(v).map_err(bad))?;
        let seq = l.get("sequence").and_then(Value::as_u64).unwrap_or(0);
        if order.product_sku != sku || order.order_id != format!("ord-{sku}-{seq}") || !holds(m, seq) {
            return Err(bad(format!("order {} is not one the manifest lists", order.order_id)));
        }
        if l.get("order_id").and_then(Value::as_str) != Some(order.order_id.as_str()) {
            return Err(bad("its order_id does not match its order".into()));
        }
        out.push(ClosedOrder { seq, closed_ms: order.update_time.as_ref().map_or(0, ms), order });
    }
    Ok(out)
}

fn ms(t: &prost_types::Timestamp) -> u64 {
    (t.seconds.max(0) as u64) * 1000 + (t.nanos.max(0) as u64) / 1_000_000
}

/// Hex SHA-256 of a stored manifest (None when there is none).
///
/// # Errors
/// The target failed.
pub async fn manifest_sha256(target: &Target, name: &str) -> Result<Option<String>, crate::TargetError> {
    Ok(target.get(name).await?.map(|b| chipgate_state::sha256_hex(&b)))
}

/// Finds an archived order of product `sku` with sequence `seq`: reads the product's manifests,
/// then the one segment that lists it (its data checked against the manifest). Returns the order
/// and the manifest's name.
///
/// # Errors
/// The target failed, or the segment that should hold it doesn't check.
pub async fn find_order(target: &Target, sku: &str, seq: u64) -> Result<Option<(pb::Order, String)>, Problem> {
    let dir = segment::orders_dir(sku);
    let names = target
        .list(&dir, segment::MANIFEST_SUFFIX)
        .await
        .map_err(|e| Problem::new(&dir, 0, format!("the archive can't be listed: {e}")))?;
    // Newest first: a segment written again after a failed run replaces an older copy's claim.
    for name in names.into_iter().rev() {
        let bytes = match target.get(&name).await {
            Ok(Some(b)) => b,
            Ok(None) => continue,
            Err(e) => return Err(Problem::new(&name, 0, format!("can't be read: {e}"))),
        };
        let m = Manifest::parse(&name, &bytes)?;
        if !holds(&m, seq) {
            continue;
        }
        let (m, json) = segment::read_checked(target, &name).await?;
        let found = check_segment(&name, &m, &json, sku)?.into_iter().find(|o| o.seq == seq);
        if let Some(o) = found {
            return Ok(Some((o.order, name)));
        }
    }
    Ok(None)
}

/// What a product's archive holds, once checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProductArchive {
    /// Segments checked.
    pub segments: u64,
    /// Orders in them.
    pub orders: u64,
    /// Compressed bytes.
    pub bytes: u64,
    /// The first segment the archive still holds (1, or just after the pruned ones).
    pub first_segment: u64,
}

/// Checks a product's segments 1..=`committed` (how many Redis records as archived; None: every
/// segment present): each one present, its data hash, its lines, and the chain of manifests.
///
/// # Errors
/// The first problem, naming its segment.
pub async fn verify_product(target: &Target, sku: &str, committed: Option<u64>) -> Result<ProductArchive, Problem> {
    walk_product(target, sku, committed, |_, _| {}).await
}

/// Walks a product's segments as [`verify_product`] checks them, handing each order (with the
/// manifest that holds it) to `each`.
async fn walk_product(
    target: &Target,
    sku: &str,
    committed: Option<u64>,
    mut each: impl FnMut(ClosedOrder, &str),
) -> Result<ProductArchive, Problem> {
    let dir = segment::orders_dir(sku);
    let present = target
        .list(&dir, segment::MANIFEST_SUFFIX)
        .await
        .map_err(|e| Problem::new(&dir, 0, format!("the archive can't be listed: {e}")))?;
    // The highest segment number present (names are `<n, 12 digits>.manifest.json`): a removed one
    // below it is then found missing.
    let highest =
        present.iter().filter_map(|n| n.rsplit('/').next()?.split('.').next()?.parse::<u64>().ok()).max().unwrap_or(0);
    let count = committed.unwrap_or(highest);
    let mut out = ProductArchive { first_segment: 1, ..ProductArchive::default() };
    let mut previous: Option<String> = None;
    // Past the legal retention the oldest segments may have been pruned: the first kept one links
    // to the last pruned manifest, whose hash the marker holds.
    if let Some((marker_name, marker)) = crate::prune::latest(target, &dir).await? {
        if marker.kind != "orders" || marker.stream != sku || marker.through_manifest_sha256.is_none() {
            return Err(Problem::new(&marker_name, 0, "the pruning marker is not one of this product's"));
        }
        previous = marker.through_manifest_sha256;
        out.first_segment = marker.through + 1;
    }
    for n in out.first_segment..=count {
        let name = segment::orders_manifest(sku, n);
        let (m, json) = segment::read_checked(target, &name).await?;
        if m.first != n || m.previous_manifest_sha256 != previous {
            return Err(Problem::new(
                &name,
                0,
                "the segment before it was removed or replaced (manifest chain broken)",
            ));
        }
        let orders = check_segment(&name, &m, &json, sku)?;
        out.orders += orders.len() as u64;
        out.segments += 1;
        out.bytes += m.data_bytes;
        for o in orders {
            each(o, &name);
        }
        previous = manifest_sha256(target, &name).await.map_err(|e| Problem::new(&name, 0, e.to_string()))?;
    }
    Ok(out)
}

/// The products the archive holds closed orders of (the SKUs their manifests name), sorted.
///
/// # Errors
/// The archive can't be listed or a product's first manifest read.
pub async fn archived_products(target: &Target) -> Result<Vec<String>, Problem> {
    let dirs =
        target.list_dirs("orders").await.map_err(|e| Problem::new("orders", 0, format!("can't be listed: {e}")))?;
    let mut out = Vec::with_capacity(dirs.len());
    for dir in dirs {
        let dir = format!("orders/{dir}");
        let names = target
            .list(&dir, segment::MANIFEST_SUFFIX)
            .await
            .map_err(|e| Problem::new(&dir, 0, format!("can't be listed: {e}")))?;
        let Some(first) = names.first() else { continue };
        let bytes = target
            .get(first)
            .await
            .map_err(|e| Problem::new(first, 0, format!("can't be read: {e}")))?
            .ok_or_else(|| Problem::new(first, 0, "the manifest is missing"))?;
        let m = Manifest::parse(first, &bytes)?;
        if segment::orders_dir(&m.stream) != dir {
            return Err(Problem::new(first, 0, format!("names product {:?}, which is not kept here", m.stream)));
        }
        out.push(m.stream);
    }
    out.sort();
    Ok(out)
}

/// Every archived order of `products` (all the archive holds when None) placed by `buyer` (any when
/// None), by product and sequence, each with `archived_in` naming its segment: what an auditor
/// lists of closed orders that left Redis. Every segment of each product is checked on the way (data
/// hash, lines, the chain of manifests), so a listing never silently skips a removed segment.
///
/// # Errors
/// The first problem, naming its segment.
pub async fn list_orders(
    target: &Target,
    products: Option<&[String]>,
    buyer: Option<&str>,
) -> Result<Vec<pb::Order>, Problem> {
    let products = match products {
        Some(p) => p.to_vec(),
        None => archived_products(target).await?,
    };
    let mut out = Vec::new();
    for sku in products {
        let mut found: Vec<(u64, pb::Order)> = Vec::new();
        walk_product(target, &sku, None, |o, segment| {
            if buyer.is_none_or(|b| b == o.order.buyer_id) {
                found.push((o.seq, pb::Order { archived_in: segment.to_string(), ..o.order }));
            }
        })
        .await?;
        found.sort_by_key(|(seq, _)| *seq);
        out.extend(found.into_iter().map(|(_, o)| o));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(sku: &str, seq: u64) -> ClosedOrder {
        ClosedOrder {
            seq,
            order: pb::Order {
                order_id: format!("ord-{sku}-{seq}"),
                buyer_id: "acme".into(),
                product_sku: sku.into(),
                units: 5,
                update_time: Some(prost_types::Timestamp { seconds: 1_700_000_000, nanos: 0 }),
                ..Default::default()
            },
            closed_ms: 1_700_000_000_000,
        }
    }

    #[tokio::test]
    async fn orders_are_found_and_segments_chain() {
        let dir = tempfile::tempdir().expect("tempdir");
        orders_chain_on(&Target::Dir(dir.path().to_path_buf())).await;
    }

    #[tokio::test]
    async fn orders_are_found_and_segments_chain_on_s3() {
        let moto = crate::testing::MotoServer::start();
        orders_chain_on(&moto.target("")).await;
    }

    async fn orders_chain_on(t: &Target) {
        let t = t.clone();
        let one = seal("H200", 1, &[order("H200", 1), order("H200", 2), order("H200", 5)], None, 0, "t");
        one.write(&t).await.expect("write");
        let sha = manifest_sha256(&t, &one.manifest_name).await.expect("read");
        assert_eq!(one.manifest.order_seqs, vec![[1, 2], [5, 5]]);
        let two = seal("H200", 2, &[order("H200", 3)], sha, 0, "t");
        two.write(&t).await.expect("write");
        let v = verify_product(&t, "H200", Some(2)).await.expect("verifies");
        assert_eq!((v.segments, v.orders), (2, 4));
        let (o, name) = find_order(&t, "H200", 5).await.expect("reads").expect("found");
        assert_eq!((o.order_id.as_str(), name), ("ord-H200-5", one.manifest_name.clone()));
        assert_eq!(find_order(&t, "H200", 4).await.expect("reads"), None);
        // Listed by product and sequence, each naming its segment; by buyer.
        let mut other_buyer = order("H100", 1);
        other_buyer.order.buyer_id = "zeta".into();
        seal("H100", 1, &[other_buyer], None, 0, "t").write(&t).await.expect("write");
        assert_eq!(archived_products(&t).await.expect("lists"), vec!["H100".to_string(), "H200".to_string()]);
        let all = list_orders(&t, None, None).await.expect("lists");
        let ids: Vec<(&str, &str)> = all.iter().map(|o| (o.order_id.as_str(), o.archived_in.as_str())).collect();
        assert_eq!(
            ids,
            vec![
                ("ord-H100-1", "orders/H100/000000000001.manifest.json"),
                ("ord-H200-1", one.manifest_name.as_str()),
                ("ord-H200-2", one.manifest_name.as_str()),
                ("ord-H200-3", two.manifest_name.as_str()),
                ("ord-H200-5", one.manifest_name.as_str()),
            ]
        );
        let zeta = list_orders(&t, None, Some("zeta")).await.expect("lists");
        assert_eq!(zeta.iter().map(|o| o.order_id.as_str()).collect::<Vec<_>>(), vec!["ord-H100-1"]);
        let h200 = list_orders(&t, Some(&["H200".to_string()]), Some("acme")).await.expect("lists");
        assert_eq!(h200.len(), 4);

        // Sealing segment 1 again with other orders is refused: a sealed segment is never replaced
        // (writing the very same one again is fine).
        one.write(&t).await.expect("the same segment again");
        let other = seal("H200", 1, &[order("H200", 1)], None, 0, "t");
        let refused = other.write(&t).await.expect_err("refused");
        assert!(matches!(&refused, segment::SealError::Differs(n) if *n == other.manifest_name), "{refused}");
        assert!(verify_product(&t, "H200", Some(2)).await.is_ok());
        // Replaced behind the archiver's back by another, self-consistent one: segment 2's link to
        // it breaks.
        t.put(&other.data_name, other.data.clone()).await.expect("tamper");
        t.put(&other.manifest_name, other.manifest.to_bytes()).await.expect("tamper");
        let err = verify_product(&t, "H200", Some(2)).await.expect_err("chain broken");
        assert_eq!(err.segment, two.manifest_name);
        let err = list_orders(&t, None, Some("acme")).await.expect_err("a listing checks too");
        assert_eq!(err.segment, two.manifest_name);
    }
}
