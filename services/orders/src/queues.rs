//! The waiting orders a round evaluates, oldest first across the buyers' awaiting queues, read a page
//! at a time.
//!
//! Each buyer's awaiting queue is a sorted set scored by placement number. A round used to read every
//! queue whole and sort the union before its first batch: at a million waiting orders that was
//! seconds before the first order moved, and every id held at once. [`Merge`] instead keeps a page of
//! each queue and hands out the oldest order across them; a buyer whose page runs dry is read again
//! (with every buyer running low, in one round of reads) before anything more is handed out, so the
//! order is exactly the sorted union's. Only orders placed before the round began are handed out (up
//! to the product's placement number read at its start): a later placement is its own round's work,
//! as it was when the queues were read whole.
//!
//! [`Merge`] is the bookkeeping, with no I/O; [`Queues`] reads the pages for it.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::ops::Bound;

use chipgate_domain::ids::{BuyerId, Sku};
use chipgate_domain::orders::OrderRecord;
use chipgate_runtime::records::Loaded;
use chipgate_runtime::service::Records;
use chipgate_state::Backend;
use futures_util::future::try_join_all;

use crate::{Error, Orders, keys};

/// Orders read from one queue at a time.
const PAGE: usize = 512;

/// One buyer's queue as read so far.
#[derive(Default)]
struct Queue {
    /// Read and not handed out yet: (placement number, order id), oldest first.
    read: VecDeque<(u64, String)>,
    /// The placement number of the last order read (pages continue after it).
    after: Option<u64>,
    /// Read to its end (or to the round's last placement number).
    done: bool,
}

/// The oldest-first union of several queues, fed page by page.
pub(crate) struct Merge {
    queues: Vec<Queue>,
    /// The oldest unread-out order of each queue with any read: (placement number, queue).
    heads: BinaryHeap<Reverse<(u64, usize)>>,
    /// Orders placed after this are left out.
    last: u64,
    page: usize,
    /// Queues with orders left and none read.
    dry: usize,
}

impl Merge {
    /// A merge of queues, each from the placement number in `starts` on (None: from its oldest
    /// order), up to placement number `last`, read `page` orders at a time.
    pub(crate) fn new(starts: &[Option<u64>], last: u64, page: usize) -> Self {
        Merge {
            queues: starts
                .iter()
                .map(|s| Queue { after: s.map(|s| s.saturating_sub(1)), ..Queue::default() })
                .collect(),
            heads: BinaryHeap::new(),
            last,
            page: page.max(1),
            dry: starts.len(),
        }
    }

    /// The queues to read next, each with the placement number its page starts after: none while
    /// every queue with orders left has some read; otherwise every queue running low (a quarter of a
    /// page or less), so that queues consumed at the same pace are read together.
    pub(crate) fn wanted(&self) -> Vec<(usize, Option<u64>)> {
        if self.dry == 0 {
            return Vec::new();
        }
        let low = self.page / 4;
        self.queues
            .iter()
            .enumerate()
            .filter(|(_, q)| !q.done && q.read.len() <= low)
            .map(|(i, q)| (i, q.after))
            .collect()
    }

    /// Adds a page of queue `i` as read (`(order id, placement number)`, oldest first).
    pub(crate) fn fill(&mut self, i: usize, page: Vec<(String, f64)>) {
        let Some(q) = self.queues.get_mut(i) else { return };
        let full = page.len() >= self.page;
        let was_empty = q.read.is_empty();
        let was_dry = was_empty && !q.done;
        for (id, score) in page {
            let seq = score as u64;
            if seq > self.last {
                q.done = true;
                break;
            }
            q.after = Some(seq);
            q.read.push_back((seq, id));
        }
        if !full {
            q.done = true;
        }
        if was_empty && let Some((seq, _)) = q.read.front() {
            self.heads.push(Reverse((*seq, i)));
        }
        let is_dry = q.read.is_empty() && !q.done;
        if was_dry && !is_dry {
            self.dry -= 1;
        }
    }

    /// The oldest order not handed out yet, with its queue; None when every queue is through, or
    /// when one must be read first ([`Merge::wanted`]).
    pub(crate) fn pop(&mut self) -> Option<(String, usize)> {
        if self.dry > 0 {
            return None;
        }
        let Reverse((_, i)) = self.heads.pop()?;
        let q = &mut self.queues[i];
        let (_, id) = q.read.pop_front()?;
        match q.read.front() {
            Some((seq, _)) => self.heads.push(Reverse((*seq, i))),
            None if !q.done => self.dry += 1,
            None => {}
        }
        Some((id, i))
    }
}

/// The waiting orders of some buyers of a product, oldest first, read as they are handed out.
pub(crate) struct Queues {
    sku: Sku,
    buyers: Vec<String>,
    merge: Merge,
    /// Orders read before their batch was cut, by key (see [`Queues::prefetched`]).
    prefetched: HashMap<String, Loaded<OrderRecord>>,
}

impl Queues {
    /// The queues of `buyers` of `sku`, each from the placement number in `starts` on (None: whole),
    /// up to placement number `last`.
    pub(crate) fn new(sku: &Sku, buyers: Vec<String>, starts: &[Option<u64>], last: u64) -> Self {
        let merge = Merge::new(starts, last, PAGE);
        Queues { sku: sku.clone(), buyers, merge, prefetched: HashMap::new() }
    }

    /// Keeps orders read ahead (`keys`, as read) for the batch that hands them out.
    pub(crate) fn prefetch(&mut self, keys: Vec<String>, orders: Vec<Loaded<OrderRecord>>) {
        self.prefetched.extend(keys.into_iter().zip(orders));
    }

    /// The orders at `keys` when every one of them was read ahead (each is handed out once: a batch
    /// decided again reads its orders afresh); None when any was not.
    pub(crate) fn prefetched(&mut self, keys: &[String]) -> Option<Vec<Loaded<OrderRecord>>> {
        if self.prefetched.is_empty() || !keys.iter().all(|k| self.prefetched.contains_key(k)) {
            return None;
        }
        keys.iter().map(|k| self.prefetched.remove(k)).collect()
    }

    /// Adds the first page of the queues ([`first_pages`], in buyer order) read from where they
    /// start (None: a page read from elsewhere, left out); the first [`Queues::next`] reads the rest.
    pub(crate) fn fill_first(&mut self, pages: Vec<Option<Vec<(String, f64)>>>) {
        for (i, page) in pages.into_iter().enumerate() {
            if let Some(page) = page {
                self.merge.fill(i, page);
            }
        }
    }

    /// The ids of up to `n` more orders, oldest first (empty when all are out).
    pub(crate) async fn next(&mut self, svc: &Orders, n: usize) -> Result<Vec<String>, Error> {
        let mut out = Vec::with_capacity(n.min(4096));
        while out.len() < n {
            let wanted = self.merge.wanted();
            if !wanted.is_empty() {
                let pages = read_pages(svc, &self.sku, &self.buyers, &wanted).await?;
                for ((i, _), page) in wanted.into_iter().zip(pages) {
                    self.merge.fill(i, page);
                }
                continue;
            }
            match self.merge.pop() {
                Some((id, _)) => out.push(id),
                None => break,
            }
        }
        Ok(out)
    }
}

/// The first page of each of `buyers`' queues of `sku`, from the placement number in `starts` on
/// (None: the oldest order), read with the rest of what a round starts from, so a round's first batch
/// waits for no read of its own.
pub(crate) async fn first_pages(
    svc: &Orders,
    sku: &Sku,
    buyers: &[String],
    starts: &[Option<u64>],
) -> Result<Vec<Vec<(String, f64)>>, Error> {
    let all: Vec<(usize, Option<u64>)> =
        starts.iter().enumerate().map(|(i, s)| (i, s.map(|s| s.saturating_sub(1)))).collect();
    read_pages(svc, sku, buyers, &all).await
}

/// The pages `wanted` names: (buyer index, placement number the page starts after).
async fn read_pages(
    svc: &Orders,
    sku: &Sku,
    buyers: &[String],
    wanted: &[(usize, Option<u64>)],
) -> Result<Vec<Vec<(String, f64)>>, Error> {
    Ok(try_join_all(wanted.iter().map(|&(i, after)| async move {
        let key = keys::awaiting(sku, &BuyerId::from_trusted(buyers[i].as_str()));
        let min = match after {
            Some(s) => Bound::Excluded(s as f64),
            None => Bound::Unbounded,
        };
        svc.store().zrange_by_score(&key, min, Bound::Unbounded, PAGE).await
    }))
    .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `merge` from `queues` (each oldest first) until it hands out nothing more.
    fn drain(merge: &mut Merge, queues: &[Vec<u64>], page: usize, reads: &mut usize) -> Vec<(u64, usize)> {
        let mut out = Vec::new();
        loop {
            let wanted = merge.wanted();
            if !wanted.is_empty() {
                *reads += 1;
                for (i, after) in wanted {
                    let rest: Vec<(String, f64)> = queues[i]
                        .iter()
                        .filter(|&&s| after.is_none_or(|a| s > a))
                        .take(page)
                        .map(|&s| (format!("o{s}"), s as f64))
                        .collect();
                    merge.fill(i, rest);
                }
                continue;
            }
            match merge.pop() {
                Some((id, i)) => out.push((id[1..].parse().expect("number"), i)),
                None => return out,
            }
        }
    }

    #[test]
    fn orders_come_out_oldest_first_across_queues_exactly_once() {
        let mut rng = fastrand::Rng::with_seed(7);
        for case in 0..200 {
            let n = rng.usize(1..6);
            let page = rng.usize(1..9);
            let mut queues: Vec<Vec<u64>> = vec![Vec::new(); n];
            for seq in 1..=rng.u64(0..120) {
                queues[rng.usize(0..n)].push(seq);
            }
            let last = rng.u64(0..130);
            let mut merge = Merge::new(&vec![None; n], last, page);
            let mut reads = 0;
            let got = drain(&mut merge, &queues, page, &mut reads);
            let mut want: Vec<(u64, usize)> =
                queues.iter().enumerate().flat_map(|(i, q)| q.iter().map(move |&s| (s, i))).collect();
            want.retain(|(s, _)| *s <= last);
            want.sort();
            assert_eq!(got, want, "case {case}: {n} queues, page {page}, last {last}");
        }
    }

    #[test]
    fn a_queue_with_a_start_hands_out_only_its_orders_from_there_on() {
        let queues: Vec<Vec<u64>> = vec![vec![1, 4, 6, 9, 12], vec![2, 3, 5, 8, 10, 11]];
        for start in 0..=13 {
            let mut merge = Merge::new(&[Some(start), None], u64::MAX, 2);
            let mut reads = 0;
            let got: Vec<u64> = drain(&mut merge, &queues, 2, &mut reads).into_iter().map(|(s, _)| s).collect();
            let mut want: Vec<u64> = queues[0].iter().filter(|&&s| s >= start).chain(&queues[1]).copied().collect();
            want.sort();
            assert_eq!(got, want, "queue 0 from {start}");
        }
    }

    #[test]
    fn queues_read_at_the_same_pace_are_read_together() {
        // 10 buyers with 100 orders each, interleaved: pages of 20 mean 5 pages per queue, and each
        // round of reads serves all ten queues (they run low together), not one read per queue.
        let queues: Vec<Vec<u64>> = (0..10).map(|b| (0..100).map(|k| k * 10 + b + 1).collect()).collect();
        let mut merge = Merge::new(&[None; 10], u64::MAX, 20);
        let mut reads = 0;
        let got = drain(&mut merge, &queues, 20, &mut reads);
        assert_eq!(got.len(), 1000);
        assert!(got.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(reads <= 7, "{reads} rounds of reads");
    }

    #[test]
    fn nothing_is_handed_out_while_a_queue_with_orders_left_has_none_read() {
        let mut merge = Merge::new(&[None; 2], u64::MAX, 2);
        merge.fill(0, vec![("o5".into(), 5.0), ("o6".into(), 6.0)]);
        assert!(merge.pop().is_none(), "queue 1 may hold something older than 5");
        assert_eq!(merge.wanted(), vec![(1, None)], "queue 0 has a page read");
        merge.fill(1, vec![("o1".into(), 1.0)]);
        assert_eq!(merge.pop(), Some(("o1".into(), 1)));
        assert_eq!(merge.pop(), Some(("o5".into(), 0)));
        assert_eq!(merge.pop(), Some(("o6".into(), 0)));
        assert_eq!(merge.wanted(), vec![(0, Some(6))], "queue 0 was a full page: there may be more");
        merge.fill(0, vec![]);
        assert_eq!(merge.pop(), None);
        assert!(merge.wanted().is_empty());
    }
}
