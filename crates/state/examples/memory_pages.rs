//! How long the embedded backend takes to copy a long sorted set a page at a time
//! (`Txn::zcopy_page`, as a wave's snapshot copies a buyer's queue) and to read it back in pages
//! after a score (`zrange_by_score`, as a drain reads its backlog). A measurement, not a test:
//!
//! ```sh
//! cargo run --release -p chipgate-state --example memory_pages
//! ```
#![allow(clippy::unwrap_used, clippy::print_stdout, missing_docs)]
use std::ops::Bound;
use std::time::Instant;

use chipgate_state::{Backend, MemoryBackend, Txn};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let b = MemoryBackend::new();
    let (n, page) = (200_000u64, 500u64);
    let mut t = Txn::new();
    for i in 1..=n {
        t.zadd("{m}:src", format!("ord-{i}"), i as f64);
    }
    b.commit(&t).await.unwrap();

    let began = Instant::now();
    let mut steps = 0;
    loop {
        let mut t = Txn::new();
        t.zcopy_page(
            "{m}:dst",
            "{m}:src",
            n as f64,
            page,
            ("{m}:tally".into(), "copied".into()),
            ("{m}:tally".into(), "cursor".into()),
        );
        b.commit(&t).await.unwrap();
        steps += 1;
        if b.zcard("{m}:dst").await.unwrap() == n && steps > n / page {
            break;
        }
    }
    println!("zcopy_page: {n} members in {steps} pages of {page}: {} ms", began.elapsed().as_millis());

    let began = Instant::now();
    let (mut after, mut read) = (Bound::Unbounded, 0);
    loop {
        let got = b.zrange_by_score("{m}:src", after, Bound::Unbounded, page as usize).await.unwrap();
        let Some((_, last)) = got.last() else { break };
        after = Bound::Excluded(*last);
        read += got.len();
    }
    println!("zrange_by_score: {read} members in pages of {page}: {} ms", began.elapsed().as_millis());
}
