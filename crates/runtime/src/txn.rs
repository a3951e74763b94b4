//! The optimistic-transaction loop every mutating call runs through.
//!
//! A call reads what it needs, decides in plain Rust, and returns a [`Txn`] (guarded by the versions it
//! read) plus its answer. The loop commits it; if someone else changed what was read, it reads and
//! decides again (with a little jitter), up to a bound. When the call carries a request id, the answer
//! is committed in the same transaction as the effect ([`Idempotency`]), and a retried call replays it.

use std::future::Future;
use std::time::Duration;

use chipgate_state::{AuditChain, Backend, CommitError, Committed, Partition, Store, Txn};
use prost::Message;
use tonic::Status;

use crate::idempotency::{Fingerprint, Idempotency, fingerprint};

/// Attempts before a call gives up with ABORTED.
pub const MAX_ATTEMPTS: u32 = 16;

/// How a service's error type absorbs what the loop can fail with.
pub trait TxnError: Sized {
    /// A commit failed for a reason other than a version conflict (fence, lease, backend).
    fn from_commit(e: CommitError) -> Self;
    /// Too many conflicting attempts.
    fn contention(attempts: u32) -> Self;
    /// An idempotency failure (request id reused with another body, store failure).
    fn from_status(s: Status) -> Self;
}

/// Which idempotency record a call uses.
pub struct IdemKey<'a> {
    /// The service's records.
    pub idem: &'a Idempotency,
    /// RPC name.
    pub method: &'a str,
    /// The caller's request id.
    pub request_id: &'a str,
    /// Fingerprint of the request.
    pub fingerprint: Fingerprint,
    /// The partition the call's effect commits in (its answer is kept there too); None: the space's
    /// own slot.
    pub partition: Option<Partition>,
}

impl<'a> IdemKey<'a> {
    /// The idempotency key of `request` under `method`.
    pub fn new<M: Message>(idem: &'a Idempotency, method: &'a str, request_id: &'a str, request: &M) -> Self {
        IdemKey { idem, method, request_id, fingerprint: fingerprint(request), partition: None }
    }

    /// The same, with the answer kept in `partition` (where the call's effect commits). A request id
    /// is then one per partition: the same id with a body naming another partition is another call.
    pub fn in_partition(mut self, partition: Partition) -> Self {
        self.partition = Some(partition);
        self
    }
}

/// Turns: fairness between replicas that write one partition back to back. A replica that commits
/// what it guessed without reading needs one round trip, one that reads first two; and even two
/// readers are unfair under load, the one whose task runs again first winning again and again.
/// While one has calls queued for a partition, its commits can land between the other's read and
/// commit every time, and the other's attempts run out.
///
/// So the loser takes its turn and the winner gives way ([`Turn`]). An attempt that runs again
/// because another replica's change beat it bumps the version of a *turn* record (a record with
/// no data in the contended partition) before it reads. Every guessed commit guards the turn at
/// the version its replica last read, so the guesser's next guess fails on it; and a replica whose
/// read finds the turn moved since it last looked (by someone else) waits [`GIVE_WAY`] before it
/// reads again and commits. The loser, reading meanwhile, commits first.
/// A call that gave way doesn't take the turn back for the race it lost by giving way (only for
/// later ones), and every turn taken follows somebody's successful commit, so turns can't chase
/// each other for ever. Without
/// contention nothing of this runs: nobody loses a race, nobody takes a turn.
pub mod turns {
    use std::sync::Mutex;
    use std::time::Duration;

    use chipgate_state::{Backend, CommitError, StateResult, Store, Txn};

    use crate::metrics::CounterMetric;

    /// How long a replica that found the turn taken waits before it reads and commits: several
    /// round trips, so the loser's read and commit land first even on a loaded machine.
    pub const GIVE_WAY: Duration = Duration::from_millis(5);

    /// One call's side of the turn at one key: it takes the turn when it lost a race, gives way
    /// when a peer took it, and counts both. Its attempts share it by reference.
    pub struct Turn<'a> {
        store: &'a Store,
        key: String,
        taken: &'a CounterMetric,
        given: &'a CounterMetric,
        call: Mutex<CallTurns>,
    }

    impl<'a> Turn<'a> {
        /// The turn at `key` in `store`, counting turns taken and given way in `taken` and `given`.
        pub fn new(store: &'a Store, key: String, taken: &'a CounterMetric, given: &'a CounterMetric) -> Self {
            Turn { store, key, taken, given, call: Mutex::default() }
        }

        /// The turn record's key.
        pub fn key(&self) -> &str {
            &self.key
        }

        fn call(&self) -> std::sync::MutexGuard<'_, CallTurns> {
            // A panic elsewhere while the lock was held leaves two flags: still valid.
            self.call.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
        }

        /// Before an attempt's reads, given the key the previous attempt's commit conflicted on:
        /// takes the turn (bumps its version) when that attempt lost a race to a change.
        ///
        /// # Errors
        /// When the bump's commit fails (a blind write: never a conflict).
        pub async fn before_attempt(&self, conflicted: Option<&str>) -> Result<(), CommitError> {
            if self.call().take(conflicted, &self.key) {
                let mut t = Txn::new();
                t.put(self.key.clone(), Vec::new());
                self.store.commit(&t).await?;
                self.taken.inc();
                tracing::debug!(turn = %self.key, "lost a race to another replica; took the turn");
            }
            Ok(())
        }

        /// The turn's version (0: never taken): read beside an attempt's reads, guarded by
        /// guessed commits.
        ///
        /// # Errors
        /// When the store can't be read.
        pub async fn version(&self) -> StateResult<u64> {
            let read = self.store.get(std::slice::from_ref(&self.key)).await?;
            Ok(read.into_iter().flatten().map(|r| r.version).next().unwrap_or(0))
        }

        /// After a read found the turn at version `now`, where this replica last saw `known`
        /// (`None`: never looked): gives way, once per call, to a peer that took it since.
        pub async fn after_read(&self, known: Option<u64>, now: u64) {
            let give = self.call().give_way_to(known, now);
            if give {
                self.give_way().await;
            }
        }

        /// After a guessed commit failed on `conflicted`: gives way (once per call) when that is
        /// the turn, i.e. a peer lost a race to this replica and took it.
        pub async fn after_guess_missed(&self, conflicted: &str) {
            let give = conflicted == self.key && self.call().guess_met_turn();
            if give {
                self.give_way().await;
            }
        }

        /// Waits [`GIVE_WAY`] (with a little jitter, so two that give way don't wake together).
        async fn give_way(&self) {
            self.given.inc();
            tracing::debug!(turn = %self.key, "another replica took the turn; giving way");
            let jitter = Duration::from_micros(fastrand::u64(0..=1_000));
            tokio::time::sleep(GIVE_WAY + jitter).await;
        }
    }

    /// What one call did about turns, across its attempts.
    #[derive(Debug, Default)]
    struct CallTurns {
        /// It took the turn (it doesn't give way to itself).
        took: bool,
        /// It gave way (once per call is enough for the peer to commit).
        gave_way: bool,
        /// It gave way since its last attempt: the race that attempt lost was lost on purpose.
        excused: bool,
    }

    impl CallTurns {
        /// Before an attempt's reads: whether to take the turn at `turn`, given the key the previous
        /// attempt's commit conflicted on. Only a race lost to a change counts, and not the one
        /// lost by giving way.
        fn take(&mut self, conflicted: Option<&str>, turn: &str) -> bool {
            let lost = conflicted.is_some_and(|k| k != turn);
            let take = lost && !std::mem::take(&mut self.excused);
            self.took |= take;
            take
        }

        /// After reading the turn at version `now`, where this replica last saw `known` (`None`:
        /// never looked): whether to give way, once per call, to a peer that took the turn since.
        fn give_way_to(&mut self, known: Option<u64>, now: u64) -> bool {
            let give = !self.took && !self.gave_way && known.is_some_and(|k| k != now);
            self.gave_way |= give;
            self.excused |= give;
            give
        }

        /// A guessed commit failed on the turn: a peer took it. Gives way (once per call).
        fn guess_met_turn(&mut self) -> bool {
            let give = !self.gave_way;
            self.gave_way = true;
            give
        }
    }

    #[cfg(test)]
    mod tests {
        use super::CallTurns;

        #[test]
        fn a_loser_takes_the_turn_and_a_winner_gives_way_once() {
            let mut c = CallTurns::default();
            assert!(!c.take(None, "t"), "the first attempt lost nothing");
            assert!(!c.give_way_to(None, 3), "never looked before: nothing to give way to");
            assert!(!c.give_way_to(Some(3), 3), "nobody took the turn");
            assert!(!c.take(Some("t"), "t"), "losing to a turn is no race lost to a change");
            assert!(c.take(Some("licence"), "t"));
            assert!(!c.give_way_to(Some(3), 4), "the turn it took itself");

            let mut c = CallTurns::default();
            assert!(c.give_way_to(Some(3), 4), "a peer took the turn");
            assert!(!c.give_way_to(Some(4), 5), "once per call");
            assert!(!c.take(Some("licence"), "t"), "the race it lost by giving way: no turn taken back");
            assert!(c.take(Some("licence"), "t"), "a race lost after that counts");
            assert!(!c.guess_met_turn(), "nor gives way twice");

            let mut c = CallTurns::default();
            assert!(c.guess_met_turn());
            assert!(!c.give_way_to(Some(3), 4));
            assert!(c.take(Some("licence"), "t"), "a guess that met the turn read before it lost");
        }
    }
}

/// Runs `attempt` until its transaction commits (see the module docs). Returns the answer and what the
/// commit produced (stream ids, audit entries); a replayed answer comes with an empty [`Committed`].
///
/// # Errors
/// Whatever `attempt` fails with, or what the commit fails with other than a conflict.
pub async fn run<T, E, F, Fut>(store: &Store, idem: Option<&IdemKey<'_>>, attempt: F) -> Result<(T, Committed), E>
where
    T: Message + Default,
    E: TxnError,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(Txn, T), E>>,
{
    run_chained(store, idem, None, attempt).await
}

/// [`run`] for calls whose transactions append to the audit chain `chain`: each attempt reads the
/// chain's head beside its own reads instead of after its decision, one round trip fewer on every
/// such call. The entries are linked to the head as read then; when another writer appended since,
/// the head's version guard fails the commit and the attempt runs again, as it would have. Chains
/// other than `chain` are read after the decision, as [`run`] reads every chain.
///
/// # Errors
/// As [`run`].
pub async fn run_chained<T, E, F, Fut>(
    store: &Store,
    idem: Option<&IdemKey<'_>>,
    chain: Option<&AuditChain>,
    mut attempt: F,
) -> Result<(T, Committed), E>
where
    T: Message + Default,
    E: TxnError,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(Txn, T), E>>,
{
    run_chained_seeing(store, idem, chain, |_| attempt()).await
}

/// [`run_chained`] for attempts that want to know why the one before failed: each gets the key the
/// previous attempt's commit conflicted on (`None` for the first), as a call that may take its
/// [turn](turns) needs.
///
/// # Errors
/// As [`run`].
pub async fn run_chained_seeing<T, E, F, Fut>(
    store: &Store,
    idem: Option<&IdemKey<'_>>,
    chain: Option<&AuditChain>,
    mut attempt: F,
) -> Result<(T, Committed), E>
where
    T: Message + Default,
    E: TxnError,
    F: FnMut(Option<String>) -> Fut,
    Fut: Future<Output = Result<(Txn, T), E>>,
{
    let mut conflicted: Option<String> = None;
    for n in 1..=MAX_ATTEMPTS {
        if let Some(k) = idem
            && let Some(answer) = k
                .idem
                .lookup::<T>(store, k.partition.as_ref(), k.method, k.request_id, &k.fingerprint)
                .await
                .map_err(E::from_status)?
        {
            return Ok((answer, Committed::default()));
        }
        // A failed read of the head matters only to a transaction that links to it: it is read
        // again below then, and its error reported from there.
        let (attempted, head) = tokio::join!(attempt(conflicted.take()), async {
            match chain {
                Some(c) => c.head(store).await.ok(),
                None => None,
            }
        });
        let (mut txn, answer) = attempted?;
        if let Some(k) = idem {
            k.idem.record(&mut txn, k.partition.as_ref(), k.method, k.request_id, &k.fingerprint, &answer);
        }
        if txn.needs_linking() {
            // Link audit entries to the heads as read; a concurrent append makes the head guard fail
            // and the attempt run again.
            let mut heads = Vec::new();
            for c in txn.audit_chains() {
                let (seq, hash) = match (&head, chain) {
                    (Some(read), Some(prefetched)) if *prefetched == c => read.clone(),
                    _ => c.head(store).await.map_err(|e| E::from_commit(CommitError::State(e)))?,
                };
                heads.push((c, seq, hash));
            }
            txn.link_audit(&heads);
        }
        match store.commit(&txn).await {
            Ok(c) => return Ok((answer, c)),
            Err(CommitError::Conflict { key }) => {
                tracing::debug!(attempt = n, %key, "concurrent change; retrying");
                conflicted = Some(key);
                let jitter = fastrand::u64(0..=(200 * u64::from(n)));
                tokio::time::sleep(Duration::from_micros(jitter)).await;
            }
            Err(e) => return Err(E::from_commit(e)),
        }
    }
    Err(E::contention(MAX_ATTEMPTS))
}
