//! What this replica last knew of each product's stock record, so that a batch of holds can be
//! planned and committed without reading the stock first (see [`crate::holds`]).
//!
//! A reservation batch reads the product's stock and the orders' holds, then commits under the
//! stock's version guard: two round trips to Redis in a row on every batch, in every placement's
//! round and every wave batch. The replica that made the last change to a product's stock knows
//! the record as it now stands, and the orders of a batch are almost always new (no hold yet). So
//! the batch is planned from the record remembered here and committed at once, guarded by the
//! remembered version and by every order's hold being absent: the guards make a wrong guess fail
//! the commit (nothing changed) and the batch is then read and planned as before. A guess can cost
//! a round trip, never an answer.
//!
//! A product whose stock other writers change (another replica, a receipt, the expiry sweeper)
//! would make guesses miss. After a miss the product is not guessed again until a read finds the
//! record at the version this replica left it, i.e. nobody else wrote in between.
//!
//! A guessing replica must not starve one that reads (one round trip against two: its commits can
//! keep landing between the other's read and commit), nor a reader another under load. A batch
//! whose commit lost to another replica's change takes the product's hold turn before it reads
//! again ([`chipgate_runtime::txn::turns`]); guessed commits guard the turn at the version last
//! read, and a read that finds the turn moved since waits a few milliseconds: the loser goes first.

use std::collections::HashMap;
use std::sync::Mutex;

use chipgate_domain::ids::Sku;
use chipgate_domain::inventory::StockRecord;

/// Products remembered at most; beyond it everything is forgotten (there are a few dozen products).
const MAX_PRODUCTS: usize = 10_000;

/// What one product's stock was when this replica last read or wrote it.
struct Seen {
    /// The record's version.
    version: u64,
    /// The record.
    stock: StockRecord,
    /// Whether the next batch may be planned from it without reading.
    trusted: bool,
    /// The version of the product's hold turn when last read (0: never taken).
    turn: u64,
}

/// The stock of a product to plan a batch from without reading, and what its commit must guard.
pub(crate) struct Guess {
    /// The stock record's version.
    pub version: u64,
    /// The stock record.
    pub stock: StockRecord,
    /// The hold turn's version.
    pub turn: u64,
}

/// Per replica, behind a lock held only to copy a record in or out.
#[derive(Default)]
pub(crate) struct StockSeen {
    by_product: Mutex<HashMap<String, Seen>>,
}

impl StockSeen {
    fn with<R>(&self, f: impl FnOnce(&mut HashMap<String, Seen>) -> R) -> R {
        // A panic elsewhere while the lock was held leaves nothing half-written in this map.
        let mut map = self.by_product.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut map)
    }

    /// The stock of `sku` to plan the next batch from, without reading it; `None` when unknown or
    /// not trusted.
    pub(crate) fn guess(&self, sku: &Sku) -> Option<Guess> {
        self.with(|m| {
            m.get(sku.as_str()).filter(|s| s.trusted).map(|s| Guess {
                version: s.version,
                stock: s.stock.clone(),
                turn: s.turn,
            })
        })
    }

    /// A guess for `sku` failed its commit: someone else changed the stock or an order's hold.
    pub(crate) fn missed(&self, sku: &Sku) {
        self.with(|m| {
            if let Some(s) = m.get_mut(sku.as_str()) {
                s.trusted = false;
            }
        });
    }

    /// The stock of `sku` as read at `version`, beside the hold turn's version. Guessing is (again)
    /// trusted when nobody else wrote since this replica did (the version is the one it left), or
    /// when nothing was known. Answers the turn's version as last seen before (`None`: never).
    pub(crate) fn read(&self, sku: &Sku, version: u64, stock: &StockRecord, turn: u64) -> Option<u64> {
        self.with(|m| {
            let before = m.get(sku.as_str());
            let trusted = before.is_none_or(|s| s.version == version);
            let known = before.map(|s| s.turn);
            Self::put(m, sku, Seen { version, stock: stock.clone(), trusted, turn });
            known
        })
    }

    /// This replica committed the stock of `sku` at `version`: the next batch may start from it
    /// when it was trusted before.
    pub(crate) fn wrote(&self, sku: &Sku, version: u64, stock: StockRecord) {
        self.with(|m| {
            let (trusted, turn) = m.get(sku.as_str()).map_or((true, 0), |s| (s.trusted, s.turn));
            Self::put(m, sku, Seen { version, stock, trusted, turn });
        });
    }

    fn put(m: &mut HashMap<String, Seen>, sku: &Sku, seen: Seen) {
        if m.len() >= MAX_PRODUCTS && !m.contains_key(sku.as_str()) {
            m.clear();
        }
        m.insert(sku.to_string(), seen);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stock(available: u64) -> StockRecord {
        StockRecord { available, ..Default::default() }
    }

    #[test]
    fn a_product_is_guessed_from_what_this_replica_left() {
        let seen = StockSeen::default();
        let sku = Sku::from_trusted("H200");
        assert!(seen.guess(&sku).is_none(), "nothing known yet");
        seen.read(&sku, 3, &stock(10), 2);
        seen.wrote(&sku, 4, stock(6));
        assert_eq!(seen.guess(&sku).map(|g| (g.version, g.stock.available, g.turn)), Some((4, 6, 2)));
    }

    #[test]
    fn a_miss_stops_guessing_until_a_read_finds_nobody_else_wrote() {
        let seen = StockSeen::default();
        let sku = Sku::from_trusted("H200");
        seen.read(&sku, 3, &stock(10), 0);
        seen.wrote(&sku, 4, stock(6));
        seen.missed(&sku);
        assert!(seen.guess(&sku).is_none());
        // Another writer had moved it on: still not guessed, even after this replica's own write.
        seen.read(&sku, 7, &stock(2), 0);
        seen.wrote(&sku, 8, stock(1));
        assert!(seen.guess(&sku).is_none());
        // Found as this replica left it: guessed again.
        seen.read(&sku, 8, &stock(1), 0);
        assert_eq!(seen.guess(&sku).map(|g| g.version), Some(8));
    }

    #[test]
    fn products_are_kept_apart() {
        let seen = StockSeen::default();
        let (a, b) = (Sku::from_trusted("A"), Sku::from_trusted("B"));
        seen.read(&a, 1, &stock(1), 0);
        seen.missed(&b);
        assert!(seen.guess(&b).is_none());
        assert_eq!(seen.guess(&a).map(|g| g.version), Some(1));
    }
}
