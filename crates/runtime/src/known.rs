//! What one replica already knows holds in the store, so a hot path asks the store once per item
//! rather than once per call: a product is in the catalogue, a product is registered in a listing
//! set, a (buyer, product) pair is registered. The set only grows, and only with facts that stay
//! true (products are never removed, registrations are set adds), so a remembered item never goes
//! stale; what isn't known yet is asked again next time.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::hash::Hash;
use std::sync::RwLock;

use chipgate_domain::ids::Sku;
use chipgate_state::{Backend, StateError};

/// A grow-only set of facts this replica has seen hold in the store.
#[derive(Debug)]
pub struct Known<T> {
    known: RwLock<HashSet<T>>,
}

impl<T> Default for Known<T> {
    fn default() -> Self {
        Known { known: RwLock::new(HashSet::new()) }
    }
}

impl<T: Hash + Eq> Known<T> {
    /// Whether `item` is known to hold.
    pub fn contains<Q>(&self, item: &Q) -> bool
    where
        T: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        // A panic elsewhere while holding the lock leaves the set as it was: still a valid set.
        match self.known.read() {
            Ok(k) => k.contains(item),
            Err(poisoned) => poisoned.into_inner().contains(item),
        }
    }

    /// Remembers that `item` holds; true when it was not known yet.
    pub fn insert(&self, item: T) -> bool {
        match self.known.write() {
            Ok(mut k) => k.insert(item),
            Err(poisoned) => poisoned.into_inner().insert(item),
        }
    }
}

impl Known<Sku> {
    /// Whether `sku` is in inventory's catalogue (asking the store the first time). Only products
    /// that exist are remembered, so the set never grows past the catalogue whatever callers send.
    ///
    /// # Errors
    /// When the store can't be read.
    pub async fn in_catalogue(&self, store: &impl Backend, sku: &Sku) -> Result<bool, StateError> {
        if self.contains(sku) {
            return Ok(true);
        }
        let exists = chipgate_contract::catalogue::has_product(store, sku).await?;
        if exists {
            self.insert(sku.clone());
        }
        Ok(exists)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn remembers_products_that_exist_and_asks_again_for_the_rest() {
        let store = chipgate_state::MemoryBackend::new();
        let known = Known::<Sku>::default();
        let h200 = Sku::from_trusted("H200");
        assert!(!known.in_catalogue(&store, &h200).await.unwrap_or(true));
        assert!(!known.contains("H200"));
        let mut t = chipgate_state::Txn::new();
        t.put(chipgate_contract::catalogue::product(&h200), b"p".to_vec());
        assert!(store.commit(&t).await.is_ok());
        assert!(known.in_catalogue(&store, &h200).await.unwrap_or(false));
        assert!(known.contains("H200"));
        assert!(!known.insert(h200));
    }

    #[test]
    fn pairs_are_known_once() {
        let known = Known::<(String, String)>::default();
        assert!(known.insert(("acme".into(), "H200".into())));
        assert!(!known.insert(("acme".into(), "H200".into())));
        assert!(known.contains(&("acme".to_string(), "H200".to_string())));
    }
}
