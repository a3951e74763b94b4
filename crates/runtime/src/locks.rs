//! Per-key async locks inside one process. They don't replace the optimistic guards (other replicas
//! don't see them); they keep one replica's concurrent calls on the same key from conflicting with
//! each other, so retries are rare.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

/// A lock per key. Keys are never forgotten, so use it for small key sets (products, chains).
#[derive(Clone, Default)]
pub struct KeyedLocks {
    inner: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

impl KeyedLocks {
    /// No locks yet.
    pub fn new() -> Self {
        KeyedLocks::default()
    }

    /// Waits for the lock of `key`.
    pub async fn lock(&self, key: &str) -> OwnedMutexGuard<()> {
        let m = {
            let mut map = match self.inner.lock() {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
            map.entry(key.to_string()).or_default().clone()
        };
        m.lock_owned().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn same_key_waits_other_keys_do_not() {
        let locks = KeyedLocks::new();
        let a = locks.lock("a").await;
        let _b = locks.lock("b").await; // a different key is free
        let l2 = locks.clone();
        let waiter = tokio::spawn(async move { l2.lock("a").await });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "second holder of 'a' waits");
        drop(a);
        waiter.await.expect("acquired after release");
    }
}
