//! Placements waiting for their order's first evaluation, and what the rounds decided for them.
//!
//! A placement commits its order, asks for a round of its product and waits for that round to
//! finish; the round has the order's new record in hand when it commits, so it leaves it here and
//! the placement answers from it instead of reading the order back from Redis (one read and one
//! decode less per placement, on the path every buyer waits on). A placement that finds nothing here
//! (another replica's round evaluated its order, or the wait ran out) reads the order as before.
//!
//! Every commit of a round that moves orders leaves their records here, so the answer is the order
//! as the round left it — what a read right after the round showed. A change someone else commits
//! after the round (a cancellation, an expiry) is not in it, as it would not have been in a read
//! made a moment earlier: either way the answer is a state the order held during the call.
//!
//! A record the rest of its round can't change any more (RESERVED: every unit held; REJECTED) also
//! wakes its placement at once: the round's later steps (handing stock to the backlog, judging
//! waiting orders again, the waves' snapshots and figures) only touch orders that still wait, so the
//! answer is the same one the round's end would give, a round trip or more sooner. An order left
//! waiting or in the backlog is answered when the round ends, as the drain may still serve it.
//!
//! It also knows which products have placements waiting, so a long round of one product (a wave)
//! can cut smaller batches while buyers of other products wait on this replica (see
//! [`Answers::waiting_elsewhere`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chipgate_domain::orders::{OrderRecord, OrderStatus};
use tokio::sync::Notify;

/// The orders placements wait on, each with the latest record a round of this replica committed
/// for it (None until one did).
#[derive(Clone, Default)]
pub(crate) struct Answers {
    waiting: Arc<Mutex<Waiting>>,
}

#[derive(Default)]
struct Waiting {
    /// By order id.
    orders: HashMap<String, Slot>,
    /// Placements waiting, by product (no entry when none).
    products: HashMap<String, usize>,
}

/// What a placement waits on: the latest record a round committed, and the wake-up for a final one.
struct Slot {
    record: Option<OrderRecord>,
    settled: Arc<Notify>,
}

/// Whether a round that just committed `o` leaves it as it is for the rest of the round: RESERVED
/// and REJECTED orders no longer wait for anything the round does after its evaluation commits.
fn final_for_the_round(o: &OrderRecord) -> bool {
    matches!(o.status(), OrderStatus::Reserved | OrderStatus::Rejected)
}

/// A placement's claim on its order's answer; dropping it (the call was cancelled, or it answered)
/// forgets the order, so nothing stays behind.
pub(crate) struct Ticket {
    answers: Answers,
    id: String,
    sku: String,
    settled: Arc<Notify>,
}

impl Answers {
    /// Waits for the answer of product `sku`'s order `id` (call before asking for the round that
    /// evaluates it).
    pub(crate) fn expect(&self, id: &str, sku: &str) -> Ticket {
        let settled = Arc::new(Notify::new());
        if let Ok(mut w) = self.waiting.lock() {
            w.orders.insert(id.to_string(), Slot { record: None, settled: settled.clone() });
            *w.products.entry(sku.to_string()).or_default() += 1;
        }
        Ticket { answers: self.clone(), id: id.to_string(), sku: sku.to_string(), settled }
    }

    /// Whether placements of a product other than `sku` are waiting on this replica for a round.
    pub(crate) fn waiting_elsewhere(&self, sku: &str) -> bool {
        self.waiting.lock().is_ok_and(|w| w.products.keys().any(|p| p != sku))
    }

    /// Keeps the records of `moved` (just committed) that placements wait on; later commits of the
    /// same round replace earlier ones, so the answer is where the round left the order. A record
    /// final for the round ([`final_for_the_round`]) wakes its placement.
    pub(crate) fn committed<'a>(&self, moved: impl IntoIterator<Item = &'a OrderRecord>) {
        let Ok(mut w) = self.waiting.lock() else { return };
        if w.orders.is_empty() {
            return;
        }
        for o in moved {
            if let Some(slot) = w.orders.get_mut(&o.id) {
                slot.record = Some(o.clone());
                if final_for_the_round(o) {
                    // A permit is kept if the placement isn't waiting yet: the wake-up can't be lost.
                    slot.settled.notify_one();
                }
            }
        }
    }
}

impl Ticket {
    /// Resolves once a round committed the order in a state final for that round (never, if none
    /// does: the placement also waits for the round's end).
    pub(crate) async fn settled(&self) {
        self.settled.notified().await
    }

    /// The latest record a round committed for the order, if any (the ticket is spent).
    pub(crate) fn take(self) -> Option<OrderRecord> {
        // The ticket is dropped on return, which takes it off its product's count.
        self.answers.waiting.lock().ok().and_then(|mut w| w.orders.remove(&self.id)).and_then(|s| s.record)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Ok(mut w) = self.answers.waiting.lock() {
            w.orders.remove(&self.id);
            if let Some(n) = w.products.get_mut(&self.sku) {
                *n -= 1;
                if *n == 0 {
                    w.products.remove(&self.sku);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use super::*;

    fn order(id: &str, status: i32) -> OrderRecord {
        OrderRecord { id: id.into(), status, ..Default::default() }
    }

    #[test]
    fn a_ticket_gets_the_last_committed_record_of_its_order_only() {
        let a = Answers::default();
        let t = a.expect("ord-A-1", "A");
        a.committed([&order("ord-A-2", 3)]);
        a.committed([&order("ord-A-1", 3), &order("ord-A-3", 3)]);
        a.committed([&order("ord-A-1", 4)]);
        assert_eq!(t.take().map(|o| o.status), Some(4));
        assert!(
            a.waiting.lock().map(|w| w.orders.is_empty() && w.products.is_empty()).unwrap_or(false),
            "nothing stays behind"
        );
    }

    /// Whether the ticket's wake-up has come, without waiting for it.
    fn woken(t: &Ticket) -> bool {
        let mut f = std::pin::pin!(t.settled());
        f.as_mut().poll(&mut std::task::Context::from_waker(std::task::Waker::noop())).is_ready()
    }

    #[test]
    fn only_a_record_final_for_the_round_wakes_its_placement_even_before_it_waits() {
        let a = Answers::default();
        let t = a.expect("ord-A-1", "A");
        let other = a.expect("ord-A-2", "A");
        a.committed([&order("ord-A-1", OrderStatus::AwaitingLicense as i32)]);
        assert!(!woken(&t), "an order left waiting may still move in this round");
        a.committed([&order("ord-A-1", OrderStatus::Backordered as i32)]);
        assert!(!woken(&t), "the drain may still serve a backordered order in this round");
        a.committed([&order("ord-A-1", OrderStatus::Reserved as i32)]);
        assert!(woken(&t), "a reserved order is answered at once, though committed before the wait began");
        assert!(!woken(&other), "another order's record wakes nobody else");
        a.committed([&order("ord-A-2", OrderStatus::Rejected as i32)]);
        assert!(woken(&other));
        assert_eq!(t.take().map(|o| o.status()), Some(OrderStatus::Reserved));
    }

    #[test]
    fn nothing_committed_means_no_answer_and_a_dropped_ticket_leaves_nothing() {
        let a = Answers::default();
        assert!(a.expect("ord-A-1", "A").take().is_none());
        let t = a.expect("ord-A-2", "A");
        drop(t);
        a.committed([&order("ord-A-2", 3)]);
        assert!(a.waiting.lock().map(|w| w.orders.is_empty() && w.products.is_empty()).unwrap_or(false));
    }

    #[test]
    fn placements_waiting_on_other_products_are_counted_until_each_answers() {
        let a = Answers::default();
        assert!(!a.waiting_elsewhere("A"));
        let b1 = a.expect("ord-B-1", "B");
        let b2 = a.expect("ord-B-2", "B");
        let a1 = a.expect("ord-A-1", "A");
        assert!(a.waiting_elsewhere("A"), "B's placements wait");
        assert!(a.waiting_elsewhere("B"), "A's placement waits");
        assert!(a.waiting_elsewhere("C"), "a third product sees both");
        drop(a1);
        assert!(!a.waiting_elsewhere("B"), "only B's own placements wait now");
        assert!(a.waiting_elsewhere("A"));
        assert!(b1.take().is_none());
        assert!(a.waiting_elsewhere("A"), "one of B's placements still waits");
        drop(b2);
        assert!(!a.waiting_elsewhere("A"), "none waits any more");
    }
}
