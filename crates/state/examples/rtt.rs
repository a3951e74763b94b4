//! Measures sequential round-trip latency of the Redis backend (a diagnostic, not a test).
#![allow(clippy::unwrap_used, clippy::print_stdout, missing_docs)]
use std::time::Instant;

use chipgate_state::{Backend, RedisBackend, RedisOptions, Txn};

#[tokio::main]
async fn main() {
    let url = std::env::args().nth(1).unwrap_or_else(|| "redis://127.0.0.1:6379/15".into());
    let b = RedisBackend::connect(&url, RedisOptions::default()).await.unwrap();
    let keys = vec!["{rtt}:k".to_string()];
    let chain = chipgate_state::AuditChain::of(chipgate_state::Space::new("rtt"));
    for (name, n) in [("get", 2000), ("commit", 2000), ("audit", 500)] {
        let t0 = Instant::now();
        for i in 0..n {
            if name == "get" {
                b.get(&keys).await.unwrap();
            } else if name == "commit" {
                let mut t = Txn::new();
                t.put("{rtt}:k", vec![i as u8; 100]);
                b.commit(&t).await.unwrap();
            } else {
                let mut t = Txn::new();
                t.audit(&chain, vec![i as u8; 200]);
                b.commit(&t).await.unwrap();
            }
        }
        println!("{name}: {:.1} µs per call", t0.elapsed().as_micros() as f64 / n as f64);
    }
}
