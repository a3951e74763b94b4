//! The optimistic-transaction loop every mutating call runs through.
//!
//! A call reads what it needs, decides in plain Rust, and returns a [`Txn`] (guarded by the versions it
//! read) plus its answer. The loop commits it; if someone else changed what was read, it reads and
//! decides again (with a little jitter), up to a bound. When the call carries a request id, the answer
//! is committed in the same transaction as the effect ([`Idempotency`]), and a retried call replays it.

use std::future::Future;
use std::time::Duration;

use chipgate_state::{Backend, CommitError, Committed, Partition, Store, Txn};
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

/// Runs `attempt` until its transaction commits (see the module docs). Returns the answer and what the
/// commit produced (stream ids, audit entries); a replayed answer comes with an empty [`Committed`].
///
/// # Errors
/// Whatever `attempt` fails with, or what the commit fails with other than a conflict.
pub async fn run<T, E, F, Fut>(store: &Store, idem: Option<&IdemKey<'_>>, mut attempt: F) -> Result<(T, Committed), E>
where
    T: Message + Default,
    E: TxnError,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(Txn, T), E>>,
{
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
        let (mut txn, answer) = attempt().await?;
        if let Some(k) = idem {
            k.idem.record(&mut txn, k.partition.as_ref(), k.method, k.request_id, &k.fingerprint, &answer);
        }
        if txn.needs_linking() {
            // Link audit entries to the heads as they are now; a concurrent append makes the head
            // guard fail and the attempt run again.
            let mut heads = Vec::new();
            for chain in txn.audit_chains() {
                let (seq, hash) = chain.head(store).await.map_err(|e| E::from_commit(CommitError::State(e)))?;
                heads.push((chain, seq, hash));
            }
            txn.link_audit(&heads);
        }
        match store.commit(&txn).await {
            Ok(c) => return Ok((answer, c)),
            Err(CommitError::Conflict { key }) => {
                tracing::debug!(attempt = n, %key, "concurrent change; retrying");
                let jitter = fastrand::u64(0..=(200 * u64::from(n)));
                tokio::time::sleep(Duration::from_micros(jitter)).await;
            }
            Err(e) => return Err(E::from_commit(e)),
        }
    }
    Err(E::contention(MAX_ATTEMPTS))
}
