//! Which licences each buyer's index of a product named when this replica last read it.
//!
//! A quota call needs the licences its buyers' indexes name, and used to read them only once the
//! indexes were back: two round trips in a row on every call (every placement's round, every batch of
//! a wave). With a guess of what each index names, the licences are read beside the indexes, and
//! only those a fresh index names beyond the guess are read after it. The guess never decides
//! anything: the licences a call uses are exactly those its fresh read of the indexes names, so a
//! wrong or missing guess costs a round trip, never a wrong answer. Replicas stay stateless: a new
//! one starts without guesses and learns them from its first reads.

use std::collections::HashMap;
use std::sync::Mutex;

/// Guesses kept at most; past this the whole map is dropped and learnt again (a bound on memory for
/// a replica that sees many buyers and products, at the price of one extra round trip per index).
const MAX_GUESSES: usize = 100_000;

/// Licence ids by index key, as last read.
#[derive(Debug, Default)]
pub(crate) struct IndexGuesses {
    by_index: Mutex<HashMap<String, Vec<String>>>,
}

impl IndexGuesses {
    /// The ids last read from the indexes `keys` (sorted, distinct); those never read add none.
    pub(crate) fn guess(&self, keys: &[String]) -> Vec<String> {
        let mut ids: Vec<String> = {
            // A panic elsewhere while holding the lock leaves the map as it was: still valid guesses.
            let map = self.by_index.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            keys.iter().filter_map(|k| map.get(k)).flatten().cloned().collect()
        };
        ids.sort();
        ids.dedup();
        ids
    }

    /// Remembers what each index named when read (`None`: no such index, so no licence).
    pub(crate) fn learn<'a>(&self, read: impl IntoIterator<Item = (&'a String, Option<&'a [String]>)>) {
        let mut map = self.by_index.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (key, ids) in read {
            match ids {
                Some(ids) if !ids.is_empty() => {
                    if map.get(key).is_some_and(|known| known.as_slice() == ids) {
                        continue;
                    }
                    if map.len() >= MAX_GUESSES && !map.contains_key(key) {
                        map.clear();
                    }
                    map.insert(key.clone(), ids.to_vec());
                }
                _ => {
                    map.remove(key);
                }
            }
        }
    }

    /// Guesses held (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_index.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_guess_is_what_the_indexes_named_when_last_read() {
        let g = IndexGuesses::default();
        let (a, b, c) = ("idx:a".to_string(), "idx:b".to_string(), "idx:c".to_string());
        assert!(g.guess(&[a.clone(), b.clone()]).is_empty(), "nothing read yet");
        let (la, lb) = (ids(&["lic-2", "lic-1"]), ids(&["lic-1", "lic-3"]));
        g.learn([(&a, Some(la.as_slice())), (&b, Some(lb.as_slice())), (&c, None)]);
        assert_eq!(g.guess(&[a.clone(), b.clone(), c.clone()]), ids(&["lic-1", "lic-2", "lic-3"]));
        assert_eq!(g.guess(std::slice::from_ref(&b)), ids(&["lic-1", "lic-3"]));
        // An index read again replaces its guess; one found gone (or empty) forgets it.
        let newer = ids(&["lic-4"]);
        g.learn([(&a, Some(newer.as_slice())), (&b, None)]);
        assert_eq!(g.guess(&[a.clone(), b.clone()]), ids(&["lic-4"]));
        g.learn([(&a, Some(&[][..]))]);
        assert!(g.guess(&[a, b]).is_empty());
        assert_eq!(g.len(), 0);
    }

    #[test]
    fn guesses_are_bounded() {
        let g = IndexGuesses::default();
        let one = ids(&["lic-1"]);
        let keys: Vec<String> = (0..=MAX_GUESSES).map(|i| format!("idx:{i}")).collect();
        for k in &keys {
            g.learn([(k, Some(one.as_slice()))]);
        }
        assert!(g.len() <= MAX_GUESSES, "{} guesses kept", g.len());
        // The newest is kept: the map started again with it.
        assert_eq!(g.guess(&keys[MAX_GUESSES..]), one);
    }
}
