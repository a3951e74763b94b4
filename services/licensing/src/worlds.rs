//! What this replica last knew of each product's quota world, so that a quota call can be decided
//! and committed without reading first (see `reserve_items` in [`crate::quota`]).
//!
//! A quota call reads its orders' reservations, the buyers' licence indexes and licences, the
//! product's gates and its audit chain's head, decides, then commits: two round trips in a row on
//! every call, in every placement's round and every wave batch. The replica that made the last
//! change to a product (its quota calls for a product queue up behind one another) knows that world
//! as it now stands, and a call's orders are almost always new (no reservation yet). So the call is
//! decided from the world remembered here and committed at once, with every part of it guarded: the
//! chain head (every change in the product's partition appends to its chain), each buyer's index
//! and each licence at the version remembered, the gates, and each order's reservation absent. A
//! wrong guess fails the commit, nothing changed, and the call reads and decides as before: it can
//! cost a round trip, never an answer.
//!
//! Only calls whose licences carry no domestic-purchase ratio are decided so: the buyers' ledgers
//! live outside the product's partition, where its commit can't guard them.
//!
//! A product that another replica also serves would make guesses miss; after a miss the next calls
//! read first, for twice as many calls each time it misses again (up to [`MAX_BACKOFF`]).
//!
//! Guessing must not starve the other replica. A replica that guesses commits in one round trip,
//! while one that reads needs two: if the guesser commits between the other's read and its commit,
//! that commit fails, runs again, and can keep losing for as long as the guesser has calls queued
//! (two replicas of one product gave up after 16 attempts so; under load two readers do too). So
//! the loser takes its turn and the winner gives way ([`chipgate_runtime::txn::turns`]): a call
//! whose commit lost to another replica's change bumps the product's quota turn
//! ([`crate::keys::quota_turn`]) before it reads again; a guessed commit guards the turn at the
//! version its replica last read, and a read that finds the turn moved since then waits a few
//! milliseconds and reads again, so the loser commits first.

use std::collections::HashMap;
use std::sync::Mutex;

use chipgate_domain::ids::{BuyerId, Sku};
use chipgate_domain::licensing::{LicenseRecord, ProductGate};

/// Calls that read first after a run of misses, at most.
const MAX_BACKOFF: u32 = 64;
/// Indexes and licences remembered per product, at most (beyond it the product is forgotten).
const MAX_ENTRIES: usize = 200_000;

/// One product's world as this replica last read or wrote it.
#[derive(Default)]
struct Product {
    /// The audit chain's head this replica's last commit left: sequence number and hash.
    head: Option<(u64, String)>,
    /// Each buyer's licence index: its version (0: none) and the licence ids it names.
    indexes: HashMap<String, (u64, Vec<String>)>,
    /// Licences by id, with their versions.
    licences: HashMap<String, (u64, LicenseRecord)>,
    /// The gates, with the versions of the policy and export records (0: none).
    gate: Option<(ProductGate, u64, u64)>,
    /// The version of the product's quota turn when last read (0: none).
    turn: Option<u64>,
    /// Calls left to read first before guessing again.
    skip: u32,
    /// How many calls read first after the next miss.
    backoff: u32,
}

/// A quota world to decide a call from without reading, and what its commit must guard.
pub(crate) struct Guess {
    /// The licences the buyers' indexes name, with their versions, by id.
    pub licences: Vec<(u64, LicenseRecord)>,
    /// The product's gates.
    pub gate: ProductGate,
    /// Version of the policy record (0: none).
    pub policy_version: u64,
    /// Version of the export record (0: none).
    pub exports_version: u64,
    /// Each buyer's index version (0: none), to guard.
    pub indexes: Vec<(BuyerId, u64)>,
    /// The chain head to link to.
    pub head: (u64, String),
    /// The quota turn's version (0: none), to guard.
    pub turn: u64,
}

/// Per replica, behind a lock held only to copy records in or out.
#[derive(Default)]
pub(crate) struct WorldsSeen {
    by_product: Mutex<HashMap<String, Product>>,
}

impl WorldsSeen {
    fn with<R>(&self, f: impl FnOnce(&mut HashMap<String, Product>) -> R) -> R {
        let mut map = self.by_product.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut map)
    }

    /// The world of `sku` for `buyers`, when everything it needs is known and trusted.
    pub(crate) fn guess(&self, sku: &Sku, buyers: &[BuyerId]) -> Option<Guess> {
        self.with(|m| {
            let p = m.get_mut(sku.as_str())?;
            if p.skip > 0 {
                p.skip -= 1;
                return None;
            }
            let head = p.head.clone()?;
            let (gate, policy_version, exports_version) = p.gate.clone()?;
            let turn = p.turn?;
            let mut indexes = Vec::with_capacity(buyers.len());
            let mut ids: Vec<&String> = Vec::new();
            for b in buyers {
                let (version, named) = p.indexes.get(b.as_str())?;
                indexes.push((b.clone(), *version));
                ids.extend(named.iter());
            }
            ids.sort();
            ids.dedup();
            let mut licences = Vec::with_capacity(ids.len());
            for id in ids {
                let (version, l) = p.licences.get(id)?;
                // The buyer's ledger would count: not guessed (see the module docs).
                if l.conditions.as_ref().is_some_and(|c| c.domestic_ratio_bps > 0) {
                    return None;
                }
                licences.push((*version, l.clone()));
            }
            Some(Guess { licences, gate, policy_version, exports_version, indexes, head, turn })
        })
    }

    /// What a call read of `sku`: each buyer's index (`None`: none) with the licence ids it names
    /// (of this product), the licences, the gates with their records' versions, and the quota
    /// turn's version. Answers the turn's version as last seen before (`None`: never).
    pub(crate) fn read(
        &self,
        sku: &Sku,
        indexes: impl IntoIterator<Item = (String, u64, Vec<String>)>,
        licences: &[(u64, LicenseRecord)],
        gate: (&ProductGate, u64, u64),
        turn: u64,
    ) -> Option<u64> {
        self.with(|m| {
            let p = m.entry(sku.to_string()).or_default();
            let known = p.turn;
            for (buyer, version, ids) in indexes {
                p.indexes.insert(buyer, (version, ids));
            }
            for (version, l) in licences {
                p.licences.insert(l.id.clone(), (*version, l.clone()));
            }
            p.gate = Some((gate.0.clone(), gate.1, gate.2));
            p.turn = Some(turn);
            if p.indexes.len() + p.licences.len() > MAX_ENTRIES {
                m.remove(sku.as_str());
            }
            known
        })
    }

    /// This replica committed a change to `sku`: the licences it wrote, at their new versions, and
    /// the chain head it left (`None`: it appended nothing, the head is as it was).
    pub(crate) fn wrote(&self, sku: &Sku, licences: Vec<(u64, LicenseRecord)>, head: Option<(u64, String)>) {
        self.with(|m| {
            let p = m.entry(sku.to_string()).or_default();
            for (version, l) in licences {
                p.licences.insert(l.id.clone(), (version, l));
            }
            if head.is_some() {
                p.head = head;
            }
        });
    }

    /// A guess for `sku` committed: guessing goes on.
    pub(crate) fn hit(&self, sku: &Sku) {
        self.with(|m| {
            if let Some(p) = m.get_mut(sku.as_str()) {
                p.backoff = 0;
            }
        });
    }

    /// A guess for `sku` failed its commit: what was remembered is stale somewhere. The next calls
    /// read first (their reads refresh it), twice as many as after the previous miss in a row.
    pub(crate) fn missed(&self, sku: &Sku) {
        self.with(|m| {
            if let Some(p) = m.get_mut(sku.as_str()) {
                p.backoff = (p.backoff * 2).clamp(1, MAX_BACKOFF);
                p.skip = p.backoff;
                p.head = None;
            }
        });
    }

    /// Some other change of this replica's committed in `sku`'s partition: nothing of it is trusted
    /// until a quota call's reads and commit learn it again.
    pub(crate) fn forget(&self, sku: &Sku) {
        self.with(|m| {
            if let Some(p) = m.get_mut(sku.as_str()) {
                p.head = None;
                p.gate = None;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use chipgate_domain::licensing::Conditions;

    use super::*;

    fn licence(id: &str, ratio: u32) -> LicenseRecord {
        LicenseRecord {
            id: id.into(),
            conditions: Some(Conditions { domestic_ratio_bps: ratio, ..Default::default() }),
            ..Default::default()
        }
    }

    fn learn(seen: &WorldsSeen, sku: &Sku, ratio: u32) {
        let l = licence("lic-1", ratio);
        seen.read(
            sku,
            [("b1".to_string(), 3, vec!["lic-1".to_string()]), ("b2".to_string(), 0, vec![])],
            &[(5, l.clone())],
            (&ProductGate::default(), 2, 0),
            4,
        );
        seen.wrote(sku, vec![(6, l)], Some((9, "h".into())));
    }

    #[test]
    fn a_world_is_guessed_once_read_and_written() {
        let seen = WorldsSeen::default();
        let sku = Sku::from_trusted("H200");
        let buyers = [BuyerId::from_trusted("b1"), BuyerId::from_trusted("b2")];
        assert!(seen.guess(&sku, &buyers).is_none());
        learn(&seen, &sku, 0);
        let g = seen.guess(&sku, &buyers).expect("known");
        assert_eq!(g.licences.iter().map(|(v, l)| (*v, l.id.as_str())).collect::<Vec<_>>(), vec![(6, "lic-1")]);
        assert_eq!(g.indexes.iter().map(|(b, v)| (b.as_str(), *v)).collect::<Vec<_>>(), vec![("b1", 3), ("b2", 0)]);
        assert_eq!((g.policy_version, g.exports_version, g.head, g.turn), (2, 0, (9, "h".to_string()), 4));
        // A buyer never read is not guessed.
        assert!(seen.guess(&sku, &[BuyerId::from_trusted("b3")]).is_none());
    }

    #[test]
    fn licences_that_count_domestic_purchases_are_never_guessed() {
        let seen = WorldsSeen::default();
        let sku = Sku::from_trusted("H200");
        learn(&seen, &sku, 5_000);
        assert!(seen.guess(&sku, &[BuyerId::from_trusted("b1")]).is_none());
        assert!(seen.guess(&sku, &[BuyerId::from_trusted("b2")]).is_some(), "b2 has no licence");
    }

    #[test]
    fn misses_back_off_and_other_changes_are_forgotten() {
        let seen = WorldsSeen::default();
        let sku = Sku::from_trusted("H200");
        let b1 = [BuyerId::from_trusted("b1")];
        learn(&seen, &sku, 0);
        seen.missed(&sku);
        // The call after a miss reads first (and learns what it read and wrote) ...
        assert!(seen.guess(&sku, &b1).is_none());
        assert!(seen.guess(&sku, &b1).is_none(), "the head is no longer known until a commit says it");
        learn(&seen, &sku, 0);
        // ... and the next decides without reading.
        assert!(seen.guess(&sku, &b1).is_some());
        // A second miss in a row: two calls read first.
        seen.missed(&sku);
        assert!(seen.guess(&sku, &b1).is_none());
        learn(&seen, &sku, 0);
        assert!(seen.guess(&sku, &b1).is_none());
        learn(&seen, &sku, 0);
        assert!(seen.guess(&sku, &b1).is_some());
        // A hit starts the count again.
        seen.hit(&sku);
        seen.missed(&sku);
        assert!(seen.guess(&sku, &b1).is_none());
        learn(&seen, &sku, 0);
        assert!(seen.guess(&sku, &b1).is_some());
        // Another change of the product by this replica: read again.
        seen.forget(&sku);
        assert!(seen.guess(&sku, &b1).is_none());
    }
}
