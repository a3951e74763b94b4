//! `chipgate audit checkpoint > cp.json` and `chipgate audit verify --checkpoint cp.json` against a
//! real cluster (authentication on, real Redis, licensing signing with its own audit key): the kept
//! file verifies while the log grows, a truncation made directly in the state store fails the check
//! (exit 11) naming the chain and the entry, and a file whose signature was touched is refused (exit 3).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use chipgate_state::{Backend, Txn};
use chipgate_testkit::Cluster;
use common::{Cli, H200};
use serde_json::Value;

const STREAM: &str = "{lic}:audit";

async fn decide(cli: &Cli, buyers: &[&str]) {
    for b in buyers {
        cli.as_(&format!("buyer:{b}"))
            .json(&[
                "apply",
                "--buyer",
                b,
                "--product",
                H200,
                "--quantity",
                "10",
                "--end-use",
                "training",
                "--site",
                "DC",
            ])
            .await;
    }
}

/// Cuts the audit log back to its first `keep` entries and moves the head back to match, as someone
/// with write access to the state store could.
async fn truncate(cluster: &Cluster, keep: usize) {
    let entries = cluster.store.xrange(STREAM, None, 10_000).await.unwrap();
    let last = &entries[keep - 1];
    let mut txn = Txn::new();
    txn.delete(STREAM);
    for e in &entries[..keep] {
        txn.xadd(STREAM, e.fields.clone(), None);
    }
    txn.ops.push(chipgate_state::Op::PutAt {
        key: format!("{STREAM}:head"),
        version: keep as u64,
        data: last.field("hash").unwrap().to_vec(),
        ttl: None,
    });
    cluster.store.commit(&txn).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_checkpoint_file_verifies_until_the_log_is_cut_back() {
    let cluster = Cluster::start().await;
    let cli = Cli::for_cluster(&cluster);
    let auditor = cli.as_("auditor");
    decide(&cli, &["bytedance", "alibaba", "tencent"]).await;
    let dir = tempfile::tempdir().unwrap();
    let cp_path = dir.path().join("cp.json");
    let cp_file = cp_path.to_str().unwrap();

    // `chipgate audit checkpoint > cp.json`: the document on stdout in table mode too, a summary on
    // stderr for people.
    let out = auditor.raw(&["audit", "checkpoint"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(&cp_path, &out.stdout).unwrap();
    let doc: Value = serde_json::from_slice(&out.stdout).expect("stdout is the JSON document");
    let cp = &doc["checkpoint"];
    let key = cluster.audit_key.as_ref().unwrap();
    assert_eq!(cp["key_id"], chipgate_licensing::checkpoint::key_id(&key.public_key()));
    assert_eq!(cp["chains"][0]["chain"], STREAM);
    assert_eq!(cp["chains"][0]["sequence"], "3");
    assert!(cp["public_key_pem"].as_str().unwrap().contains("BEGIN PUBLIC KEY"), "{cp}");
    let summary = String::from_utf8_lossy(&out.stderr);
    assert!(summary.contains("signed by ed25519:") && summary.contains(STREAM), "{summary}");
    // -o json prints the same kind of document (and nothing on stderr).
    let again = auditor.json(&["audit", "checkpoint"]).await;
    assert_eq!(again["checkpoint"]["root"], cp["root"], "nothing changed in between: same heads, same root");

    // The log grows; it still extends the kept checkpoint.
    decide(&cli, &["baidu", "moonshot"]).await;
    let v = auditor.json(&["audit", "verify", "--checkpoint", cp_file]).await;
    assert_eq!((v["valid"].clone(), v["extends_checkpoint"].clone()), (true.into(), true.into()), "{v}");
    assert_eq!(v["checkpoint_signed"], true);
    assert_eq!(v["entries_checked"], "5");
    assert_eq!(v["chains"][0]["checkpoint_sequence"], "3");
    let out = auditor.raw(&["audit", "verify", "--checkpoint", cp_file]).await;
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("audit log intact: 5 entries verify; it extends the signed checkpoint"), "{text}");
    assert!(text.lines().next().unwrap().starts_with("CHAIN"), "a table of the chains first: {text}");
    // A bare checkpoint (the inner object) is accepted as well.
    let bare = dir.path().join("bare.json");
    std::fs::write(&bare, serde_json::to_vec(cp).unwrap()).unwrap();
    let v = auditor.json(&["audit", "verify", "--checkpoint", bare.to_str().unwrap()]).await;
    assert_eq!(v["extends_checkpoint"], true);

    // Cut back to entry 2 with the head moved to match: the plain check passes, the kept one fails.
    truncate(&cluster, 2).await;
    let plain = auditor.json(&["audit", "verify"]).await;
    assert_eq!(plain["valid"], true, "the chain alone can't tell: {plain}");
    let out = auditor.raw(&["-o", "json", "audit", "verify", "--checkpoint", cp_file]).await;
    assert_eq!(out.status.code(), Some(11), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((v["valid"].clone(), v["extends_checkpoint"].clone()), (false.into(), false.into()), "{v}");
    assert_eq!((v["bad_chain"].as_str().unwrap(), v["first_bad_sequence"].as_str().unwrap()), (STREAM, "3"));
    let out = auditor.raw(&["audit", "verify", "--checkpoint", cp_file]).await;
    assert_eq!(out.status.code(), Some(11));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("BROKEN at entry 3 in {STREAM}")) && text.contains("does NOT extend"), "{text}");

    // One flipped character of the signature: refused as invalid input (exit 3) with the reason.
    let mut forged = doc.clone();
    let sig = forged["checkpoint"]["signature"].as_str().unwrap().to_string();
    let flip = if sig.starts_with('A') { "B" } else { "A" };
    forged["checkpoint"]["signature"] = Value::from(format!("{flip}{}", &sig[1..]));
    let forged_path = dir.path().join("forged.json");
    std::fs::write(&forged_path, serde_json::to_vec(&forged).unwrap()).unwrap();
    let (code, err) = auditor.fails(&["audit", "verify", "--checkpoint", forged_path.to_str().unwrap()]).await;
    assert_eq!(code, 3, "{err}");
    assert_eq!(err["error"]["details"]["error_info"]["reason"], "CHECKPOINT_BAD_SIGNATURE");
    assert_eq!(err["error"]["details"]["bad_request"][0]["field"], "checkpoint.signature");

    // Not a checkpoint at all: a local input error, no call made.
    let junk = dir.path().join("junk.json");
    std::fs::write(&junk, r#"{"checkpoint": {"chains": "nope"}}"#).unwrap();
    let (code, err) = auditor.fails(&["audit", "verify", "--checkpoint", junk.to_str().unwrap()]).await;
    assert_eq!((code, err["error"]["code"].as_str().unwrap()), (3, "INPUT"), "{err}");
    // A buyer may not take checkpoints.
    let (code, _) = cli.as_("buyer:bytedance").fails(&["audit", "checkpoint"]).await;
    assert_eq!(code, 8);
    cluster.stop().await;
}

/// `chipgate audit verify --archive DIR --audit-public-key PEM` checks the archive on this machine and
/// that the live log continues it, and names a tampered segment (exit 11); `chipgate order show ID
/// --archive DIR` reads an archived order without the service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_archive_verifies_offline_and_names_a_tampered_segment() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive");
    let options = chipgate_testkit::ClusterOptions {
        archive: Some(chipgate_archive::Target::Dir(archive.clone())),
        ..Default::default()
    };
    let cluster = Cluster::start_with(options).await;
    let cli = Cli::for_cluster(&cluster);
    let auditor = cli.as_("auditor");
    decide(&cli, &["bytedance", "alibaba", "tencent", "moonshot"]).await;
    let later = chipgate_runtime::time::now_ms() + 1000;
    let run = cluster.licensing_service.archive_audit(later, 2, None).await.expect("archived");
    assert_eq!((run.segments, run.records), (2, 4));
    decide(&cli, &["zhipu"]).await;
    let key = dir.path().join("audit-public.pem");
    std::fs::write(&key, cluster.audit_key.as_ref().unwrap().public_pem()).unwrap();
    let (url, key) = (archive.to_str().unwrap(), key.to_str().unwrap());
    let out = auditor.raw(&["audit", "verify", "--archive", url, "--audit-public-key", key]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("intact and continued by the live log"), "{text}");

    // Another key pinned: the segments' checkpoints are refused.
    let other = dir.path().join("other.pem");
    std::fs::write(&other, chipgate_runtime::auth::Signer::generate().unwrap().public_pem()).unwrap();
    let out = auditor.raw(&["audit", "verify", "--archive", url, "--audit-public-key", other.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(11), "{}", String::from_utf8_lossy(&out.stdout));

    // A tampered segment is named.
    let manifest = chipgate_archive::segment::audit_manifest(STREAM, 3);
    let sealed = std::fs::read(archive.join(&manifest)).unwrap();
    let data = chipgate_archive::Manifest::parse(&manifest, &sealed).unwrap().data;
    let path = archive.join(&data);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let out = auditor.raw(&["audit", "verify", "--archive", url, "--audit-public-key", key]).await;
    assert_eq!(out.status.code(), Some(11));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&manifest), "{err}");
}

/// `chipgate order list --archive URL` lists the closed orders an archive holds, by product, buyer
/// and state, each naming its segment, and `chipgate order show ID --archive URL` reads one, from a
/// directory and from S3-compatible storage (a real moto server; the CLI takes the standard AWS_*
/// environment), without the service. A removed segment is named (exit 11), not skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archived_orders_are_listed_and_shown_offline_from_a_directory_and_from_s3() {
    let dir = tempfile::tempdir().unwrap();
    let moto = chipgate_archive::testing::MotoServer::start();
    let s3 = moto.target("records/chipgate");
    let aws: Vec<(String, String)> = vec![
        ("AWS_ENDPOINT_URL".into(), moto.endpoint()),
        ("AWS_REGION".into(), "us-east-1".into()),
        ("AWS_ACCESS_KEY_ID".into(), "chipgate-test".into()),
        ("AWS_SECRET_ACCESS_KEY".into(), "chipgate-test-secret".into()),
        ("AWS_ALLOW_HTTP".into(), "true".into()),
    ];
    for target in [chipgate_archive::Target::Dir(dir.path().join("archive")), s3] {
        let options = chipgate_testkit::ClusterOptions { archive: Some(target.clone()), ..Default::default() };
        let cluster = Cluster::start_with(options).await;
        let mut cli = Cli::for_cluster(&cluster);
        cli.env = aws.clone();
        let mut placed = Vec::new();
        for buyer in ["alibaba", "tencent", "alibaba"] {
            let b = cli.as_(&format!("buyer:{buyer}"));
            let o = b.json(&["order", "place", "--buyer", buyer, "--product", H200, "--units", "4"]).await;
            let id = o["order"]["order_id"].as_str().unwrap().to_string();
            b.json(&["order", "cancel", &id, "--reason", "test"]).await;
            placed.push(id);
        }
        let later = chipgate_runtime::time::now_ms() + 1000;
        let run = cluster.orders_service.as_ref().unwrap().archive_orders(later, 2, None).await.expect("archived");
        assert_eq!((run.segments, run.records), (2, 3), "{}", target.url());
        let url = target.url();
        let auditor = cli.as_("auditor");
        let listed = auditor.json(&["order", "list", "--archive", &url, "--buyer", "alibaba", "--limit", "0"]).await;
        let orders = listed["orders"].as_array().unwrap();
        let ids: Vec<&str> = orders.iter().map(|o| o["order_id"].as_str().unwrap()).collect();
        assert_eq!(ids, vec![placed[0].as_str(), placed[2].as_str()], "{url}: {listed}");
        assert!(orders.iter().all(|o| o["archived_in"].as_str().unwrap().starts_with("orders/")), "{listed}");
        assert!(
            orders.iter().all(|o| o["history"].as_array().is_none_or(|h| h.is_empty())),
            "history only with --history: {listed}"
        );
        let all = auditor
            .json(&["order", "list", "--archive", &url, "--product", H200, "--state", "cancelled", "--history"])
            .await;
        assert_eq!(all["orders"].as_array().unwrap().len(), 3, "{all}");
        assert!(all["orders"][0]["history"].as_array().is_some_and(|h| h.len() >= 2), "{all}");
        let none = auditor.json(&["order", "list", "--archive", &url, "--state", "shipped"]).await;
        assert!(none["orders"].as_array().is_none_or(|o| o.is_empty()), "{none}");
        // One order read back without the service.
        let shown = auditor.json(&["order", "show", &placed[1], "--archive", &url]).await;
        assert_eq!(shown["order"]["buyer_id"], "tencent", "{shown}");
        assert_eq!(shown["order"]["archived_in"], all["orders"][1]["archived_in"], "{shown}");
        // The first segment removed: the listing names it instead of skipping it.
        let first = chipgate_archive::segment::orders_manifest(H200, 1);
        let kept = target.get(&first).await.unwrap().unwrap();
        target.delete(&first).await.unwrap();
        let out = auditor.raw(&["order", "list", "--archive", &url]).await;
        assert_eq!(out.status.code(), Some(11), "{url}: {}", String::from_utf8_lossy(&out.stdout));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&first) && err.contains("missing"), "{err}");
        target.put(&first, kept).await.unwrap();

        // Pruning past retention (here 0 days: everything but the newest segment): a dry run
        // first, then --apply; what is kept still lists and verifies.
        let key = dir.path().join("audit-public.pem");
        std::fs::write(&key, cluster.audit_key.as_ref().unwrap().public_pem()).unwrap();
        let key = key.to_str().unwrap();
        let prune = ["archive", "prune", "--archive", &url, "--retention", "0d", "--audit-public-key", key];
        let out = auditor.raw(&prune).await;
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains(H200), "{text}{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stderr).contains("dry run"), "{text}");
        assert_eq!(auditor.json(&["order", "list", "--archive", &url]).await["orders"].as_array().unwrap().len(), 3);
        let out = auditor.raw(&[&prune[..], &["--apply"]].concat()).await;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let left = auditor.json(&["order", "list", "--archive", &url]).await;
        let ids: Vec<&str> =
            left["orders"].as_array().unwrap().iter().map(|o| o["order_id"].as_str().unwrap()).collect();
        assert_eq!(ids, vec![placed[2].as_str()], "{left}");
        assert!(target.get(&first).await.unwrap().is_none(), "segment 1 is gone");
        let p = chipgate_archive::orders::verify_product(&target, H200, Some(2)).await.unwrap();
        assert_eq!((p.segments, p.first_segment), (1, 2));
        cluster.stop().await;
    }
}
