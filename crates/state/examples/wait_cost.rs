//! What `WAIT` for a replica costs per commit, on a private local Redis Cluster (3 masters, 3
//! replicas): sequential latency and concurrent throughput with `min_replicas` 0 and 1. Also prints
//! how long the cluster took to start. A measurement, not a test:
//!
//! ```sh
//! cargo run --release -p chipgate-state --example wait_cost
//! ```
#![allow(clippy::unwrap_used, clippy::print_stdout, missing_docs)]
use std::time::{Duration, Instant};

use chipgate_state::testing::RedisCluster;
use chipgate_state::{Backend, RedisOptions, Space, Txn};

const S: Space = Space::new("bench");

#[tokio::main]
async fn main() {
    let cluster = RedisCluster::start();
    println!("cluster startup: {:?} (6 processes, cluster create, replicas in sync)", cluster.startup_time());
    for min_replicas in [0, 1] {
        let store = cluster.backend_with(RedisOptions { min_replicas, ..cluster.redis_options() }).await;
        let n = 3000;
        let t0 = Instant::now();
        for i in 0..n {
            let mut t = Txn::new();
            t.put(S.partition(&format!("p{}", i % 16)).key(["rec"]), vec![1; 200]);
            store.commit(&t).await.unwrap();
        }
        let seq = t0.elapsed() / n;
        let tasks = 32;
        let per_task = 500;
        let t0 = Instant::now();
        let handles: Vec<_> = (0..tasks)
            .map(|k| {
                let store = store.clone();
                tokio::spawn(async move {
                    for i in 0..per_task {
                        let mut t = Txn::new();
                        t.put(S.partition(&format!("q{k}-{}", i % 4)).key(["rec"]), vec![1; 200]);
                        store.commit(&t).await.unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.await.unwrap();
        }
        let rate = f64::from(tasks * per_task) / t0.elapsed().as_secs_f64();
        println!(
            "min_replicas {min_replicas}: sequential {:.0} µs per commit; {tasks} concurrent writers {rate:.0} commits/s",
            seq.as_secs_f64() * 1e6
        );
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
}
