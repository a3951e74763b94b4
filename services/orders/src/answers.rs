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
//! It also knows which products have placements waiting, so a long round of one product (a wave)
//! can cut smaller batches while buyers of other products wait on this replica (see
//! [`Answers::waiting_elsewhere`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chipgate_domain::orders::OrderRecord;

/// The orders placements wait on, each with the latest record a round of this replica committed
/// for it (None until one did).
#[derive(Clone, Default)]
pub(crate) struct Answers {
    waiting: Arc<Mutex<Waiting>>,
}

#[derive(Default)]
struct Waiting {
    /// By order id.
    orders: HashMap<String, Option<OrderRecord>>,
    /// Placements waiting, by product (no entry when none).
    products: HashMap<String, usize>,
}

/// A placement's claim on its order's answer; dropping it (the call was cancelled, or it answered)
/// forgets the order, so nothing stays behind.
pub(crate) struct Ticket {
    answers: Answers,
    id: String,
    sku: String,
}

impl Answers {
    /// Waits for the answer of product `sku`'s order `id` (call before asking for the round that
    /// evaluates it).
    pub(crate) fn expect(&self, id: &str, sku: &str) -> Ticket {
        if let Ok(mut w) = self.waiting.lock() {
            w.orders.insert(id.to_string(), None);
            *w.products.entry(sku.to_string()).or_default() += 1;
        }
        Ticket { answers: self.clone(), id: id.to_string(), sku: sku.to_string() }
    }

    /// Whether placements of a product other than `sku` are waiting on this replica for a round.
    pub(crate) fn waiting_elsewhere(&self, sku: &str) -> bool {
        self.waiting.lock().is_ok_and(|w| w.products.keys().any(|p| p != sku))
    }

    /// Keeps the records of `moved` (just committed) that placements wait on; later commits of the
    /// same round replace earlier ones, so the answer is where the round left the order.
    pub(crate) fn committed<'a>(&self, moved: impl IntoIterator<Item = &'a OrderRecord>) {
        let Ok(mut w) = self.waiting.lock() else { return };
        if w.orders.is_empty() {
            return;
        }
        for o in moved {
            if let Some(slot) = w.orders.get_mut(&o.id) {
                *slot = Some(o.clone());
            }
        }
    }
}

impl Ticket {
    /// The latest record a round committed for the order, if any (the ticket is spent).
    pub(crate) fn take(self) -> Option<OrderRecord> {
        // The ticket is dropped on return, which takes it off its product's count.
        self.answers.waiting.lock().ok().and_then(|mut w| w.orders.remove(&self.id)).flatten()
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
