//! Partitioned state on a real Redis Cluster (3 masters + 3 replicas): a three-product story —
//! export authorised, licences granted, stock received, orders placed and reserved — leaves each
//! product's licensing, inventory and orders state in the product's own hash slots, and those slots
//! land on every master. Prints how many keys each master holds.

use crate::common;

use std::time::Duration;

use chipgate_state::{Backend, key_slot};
use chipgate_testkit::{BackendKind, ClusterOptions};
use common::*;

const H20: &str = "H20-96GB";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_product_story_spreads_over_every_master() {
    let mut w = World::with(ClusterOptions { backend: BackendKind::RedisCluster, ..ClusterOptions::default() }).await;
    let mut ids = Vec::new();
    for (buyer, sku) in [("bytedance", H200), ("alibaba", NVL), ("tencent", H20)] {
        w.licensed(buyer, sku, 500).await;
        w.receive(sku, 300).await;
        for _ in 0..3 {
            ids.push(w.place(buyer, sku, 100).await.order_id);
        }
    }
    w.until(&ids, Duration::from_secs(30), |os| all_in(os, chipgate_proto::orders::v1::OrderState::Reserved)).await;

    let masters = w.cluster.store.master_key_counts().await.expect("a cluster's masters");
    assert_eq!(masters.len(), 3, "{masters:?}");
    let master_of = |key: &str| {
        let slot = key_slot(key);
        masters.iter().position(|m| m.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot))).expect("a master")
    };
    // Each product's state is in its partition: stock and orders exist there, and the partition's
    // slot is the one every key of the product shares.
    let mut used = std::collections::BTreeSet::new();
    for (sku, orders) in [(H200, &ids[0..3]), (NVL, &ids[3..6]), (H20, &ids[6..9])] {
        let sku = chipgate_domain::ids::Sku::from_trusted(sku);
        let orders: Vec<chipgate_domain::ids::OrderId> =
            orders.iter().map(|id| chipgate_domain::ids::OrderId::from_trusted(id.as_str())).collect();
        let stock = chipgate_inventory::keys::stock(&sku);
        let order_keys: Vec<String> = orders.iter().map(chipgate_orders::keys::order).collect();
        let mut keys = vec![stock.clone(), chipgate_inventory::keys::hold(&sku, &orders[0])];
        keys.extend(order_keys.iter().cloned());
        // Licensing: the order's quota reservation (a field of one of the product's reservation
        // hashes) and the product's gate, in the product's partition.
        let reservation = chipgate_licensing::keys::reservation_field(&sku, &orders[0]).expect("a numbered order");
        let lic_keys = vec![reservation.0.clone(), chipgate_licensing::keys::exports(&sku)];
        for k in &lic_keys {
            assert_eq!(key_slot(k), chipgate_licensing::keys::part(&sku).slot(), "{k}");
        }
        used.extend(lic_keys.iter().map(|k| master_of(k)));
        keys.push(chipgate_licensing::keys::exports(&sku));
        let found = w.cluster.store.get(&keys).await.expect("read");
        assert!(found.iter().all(Option::is_some), "{sku}: every key of the story exists: {keys:?}");
        let held = w.cluster.store.hget_each(std::slice::from_ref(&reservation)).await.expect("read");
        assert!(held[0].is_some(), "{sku}: the order's reservation exists: {reservation:?}");
        assert_eq!(key_slot(&stock), chipgate_inventory::keys::part(&sku).slot());
        for k in &order_keys {
            assert_eq!(key_slot(k), chipgate_orders::keys::part(&sku).slot(), "{k}");
        }
        used.insert(master_of(&stock));
        used.extend(order_keys.iter().map(|k| master_of(k)));
    }
    for m in &masters {
        eprintln!("partitions: master {} serves {:?} and holds {} keys", m.addr, m.slots, m.keys);
    }
    assert_eq!(used.len(), masters.len(), "the story's partitions land on every master: {used:?}");
}
