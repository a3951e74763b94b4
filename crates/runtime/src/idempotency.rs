//! Retry-safe mutations.
//!
//! A mutating call stores its answer under `(method, caller, request_id)` together with a fingerprint
//! of the request, in the *same atomic commit* as its effect. A retry with the same request id finds the
//! stored answer and gets it back unchanged; the same request id with a different request is refused
//! with INVALID_ARGUMENT. Two concurrent calls with one request id can't both apply: the record is
//! written with a "must not exist" guard, so the loser's commit conflicts and it replays the winner's
//! answer.
//!
//! Request ids belong to an **account**, like Stripe's idempotency keys: two accounts that happen to
//! pick the same id (`order-1`) get two independent calls, and no account can replay or even detect
//! another's. The account is the same with and without authentication wherever the call shows one
//! (see [`crate::edge::identity`]): a buyer's — named in the request where the policy table reads a
//! buyer field (PlaceOrder, SubmitApplication, ...), or by the buyer's token otherwise — is that
//! buyer (whichever of its tokens it uses, so a retry with a renewed token still replays); every
//! other call shares one account: the authorities, customs and the vendor (each mutating RPC
//! admits one of them, and the key includes the method), the services' own calls (so a replica
//! finishing a dead one's work replays its answers), and, without authentication, every call that
//! names no buyer (there is one anonymous caller). The edge runs each call inside [`ACCOUNT`].

use std::time::Duration;

use chipgate_state::{Backend, CommitError, Partition, Record, Space, Store, Txn};
use prost::Message;
use tonic::Status;

use crate::errors;

tokio::task_local! {
    /// The account of the call being handled (set by the edge around the handler; None: the shared
    /// account).
    pub static ACCOUNT: Option<String>;
}

/// How long answers are kept for replay by default.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);

/// The idempotency records of one service.
#[derive(Clone, Copy, Debug)]
pub struct Idempotency {
    space: Space,
    ttl: Duration,
}

/// SHA-256 of a request's encoding: what tells a retry (the same request) from a different request
/// under the same request id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// Its lower-case hex text (64 characters), as records written before compact ones kept it.
    pub fn hex(&self) -> String {
        chipgate_state::to_hex(&self.0)
    }

    /// The part a compact record keeps.
    fn compact(&self) -> &[u8] {
        &self.0[..FP_BYTES]
    }
}

/// The [`Fingerprint`] of a request.
pub fn fingerprint<M: Message>(msg: &M) -> Fingerprint {
    Fingerprint(chipgate_state::sha256(&msg.encode_to_vec()))
}

impl Idempotency {
    /// Records in `space`, kept for `ttl`.
    pub const fn new(space: Space, ttl: Duration) -> Self {
        Idempotency { space, ttl }
    }

    /// The record key of a call (scoped to the current [`ACCOUNT`], if any), in the space's own slot.
    pub fn key(&self, method: &str, request_id: &str) -> String {
        self.key_in(None, method, request_id)
    }

    /// The record key of a call kept in `partition` (the partition its effect commits in, so the
    /// answer and the effect stay one transaction in one hash slot), or in the space's own slot.
    pub fn key_in(&self, partition: Option<&Partition>, method: &str, request_id: &str) -> String {
        let account = ACCOUNT.try_with(Clone::clone).ok().flatten();
        // Length-prefixed, so no (account, request id) pair can spell another's key.
        let scoped = account.map(|a| format!("@{}:{a}", a.len()));
        let mut parts = vec!["idem", method];
        if let Some(s) = &scoped {
            parts.push(s);
        }
        parts.push(request_id);
        match partition {
            Some(p) => p.key(parts),
            None => self.space.key(parts),
        }
    }

    /// The stored answer of an earlier call with this request id, if any.
    ///
    /// # Errors
    /// INVALID_ARGUMENT when the earlier call had a different request; UNAVAILABLE/INTERNAL when the
    /// store fails.
    pub async fn lookup<R: Message + Default>(
        &self,
        store: &Store,
        partition: Option<&Partition>,
        method: &str,
        request_id: &str,
        fingerprint: &Fingerprint,
    ) -> Result<Option<R>, Status> {
        let key = self.key_in(partition, method, request_id);
        Ok(self.read(store, &key, method, request_id, fingerprint).await?.map(|(_, answer)| answer))
    }

    /// [`lookup`](Self::lookup) for a caller whose own commit conflicted on the record: the record
    /// is written again (the same bytes, its TTL renewed) before its answer is returned. The call
    /// that stored it may not have answered yet, or never will (a commit re-sent after a reconnect
    /// finds its own first copy's record, see `Txn::without_receipt`), and only a write on the
    /// caller's own connection is followed by the replicas' acknowledgement (`WAIT`, see the state
    /// layer's durability) that covers the record: nothing is answered that a failover could lose.
    ///
    /// The write is unguarded: every writer of an existing record writes the bytes it read, so
    /// concurrent retries (a client sending one call eight times at once) can't undo each other,
    /// and none has to wait for another.
    ///
    /// # Errors
    /// As [`lookup`](Self::lookup).
    pub async fn lookup_durable<R: Message + Default>(
        &self,
        store: &Store,
        partition: Option<&Partition>,
        method: &str,
        request_id: &str,
        fingerprint: &Fingerprint,
    ) -> Result<Option<R>, Status> {
        let key = self.key_in(partition, method, request_id);
        let Some((rec, answer)) = self.read(store, &key, method, request_id, fingerprint).await? else {
            return Ok(None);
        };
        let mut t = Txn::new();
        t.put_with_ttl(key, rec.data, self.ttl);
        match store.commit(&t).await {
            Ok(_) => Ok(Some(answer)),
            Err(CommitError::State(e)) => Err(errors::from_state(request_id, &e)),
            Err(e) => Err(errors::internal(request_id, e)),
        }
    }

    /// The record at `key` and its answer, checked against the request's fingerprint.
    async fn read<R: Message + Default>(
        &self,
        store: &Store,
        key: &str,
        method: &str,
        request_id: &str,
        fingerprint: &Fingerprint,
    ) -> Result<Option<(Record, R)>, Status> {
        let rec = store.get(&[key.to_string()]).await.map_err(|e| errors::from_state(request_id, &e))?;
        let Some(rec) = rec.into_iter().next().flatten() else { return Ok(None) };
        let Some((same, body)) = stored(&rec.data, fingerprint) else {
            return Err(errors::internal(request_id, format!("idempotency record {key} is truncated")));
        };
        if !same {
            return Err(errors::invalid_argument(
                "request_id",
                format!(
                    "request_id {request_id:?} was already used for a different {method} request; use a new \
                     request_id for a new request"
                ),
            ));
        }
        let answer =
            R::decode(body).map_err(|e| errors::internal(request_id, format!("stored answer undecodable: {e}")))?;
        Ok(Some((rec, answer)))
    }

    /// Adds the answer to `txn`, guarded so only one call with this request id can ever commit.
    pub fn record<R: Message>(
        &self,
        txn: &mut Txn,
        partition: Option<&Partition>,
        method: &str,
        request_id: &str,
        fingerprint: &Fingerprint,
        answer: &R,
    ) {
        let key = self.key_in(partition, method, request_id);
        let mut data = Vec::with_capacity(1 + FP_BYTES + answer.encoded_len());
        data.push(COMPACT);
        data.extend_from_slice(fingerprint.compact());
        answer.encode(&mut data).unwrap_or_default();
        txn.replace_with_ttl(key, 0, data, self.ttl);
    }
}

/// First byte of a compact record; a record written before them starts with its fingerprint's hex
/// text, never a zero byte.
const COMPACT: u8 = 0;
/// Bytes of the fingerprint a compact record keeps: the first 128 bits of the SHA-256. They only
/// tell a retry (the same request) from a different request under the same id, which an honest
/// client can't hit by chance and a dishonest one could only do to its own request ids.
const FP_BYTES: usize = 16;
/// Bytes of a fingerprint in the records written before compact ones (its hex text).
const FP_HEX: usize = 64;

/// Whether a stored record was written for the request of `fingerprint`, and its answer's bytes:
/// compact records (a [`COMPACT`] byte, [`FP_BYTES`] of the fingerprint) and those written before
/// them (the fingerprint's [`FP_HEX`] hex characters), which live out their TTL after an upgrade.
/// None when the record is too short to be either.
fn stored<'a>(data: &'a [u8], fingerprint: &Fingerprint) -> Option<(bool, &'a [u8])> {
    if data.first() == Some(&COMPACT) {
        let fp = data.get(1..=FP_BYTES)?;
        return Some((fp == fingerprint.compact(), &data[1 + FP_BYTES..]));
    }
    let (fp, body) = (data.get(..FP_HEX)?, data.get(FP_HEX..)?);
    Some((fp == fingerprint.hex().as_bytes(), body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn replays_and_refuses_mismatches() {
        let store = Store::memory();
        let idem = Idempotency::new(Space::new("t"), DEFAULT_TTL);
        let req_a = prost_types::Duration { seconds: 1, nanos: 0 };
        let req_b = prost_types::Duration { seconds: 2, nanos: 0 };
        let answer = prost_types::Timestamp { seconds: 42, nanos: 0 };
        let fa = fingerprint(&req_a);
        assert!(idem.lookup::<prost_types::Timestamp>(&store, None, "M", "r1", &fa).await.expect("lookup").is_none());

        let mut t = Txn::new();
        idem.record(&mut t, None, "M", "r1", &fa, &answer);
        store.commit(&t).await.expect("first commit");
        // A second commit of the same request id conflicts: only one can apply.
        assert!(store.commit(&t).await.is_err());

        let replay = idem.lookup::<prost_types::Timestamp>(&store, None, "M", "r1", &fa).await.expect("lookup");
        assert_eq!(replay, Some(answer));
        let err = idem.lookup::<prost_types::Timestamp>(&store, None, "M", "r1", &fingerprint(&req_b)).await;
        assert_eq!(err.expect_err("mismatch").code(), tonic::Code::InvalidArgument);
        // Another method with the same request id is independent.
        assert!(idem.lookup::<prost_types::Timestamp>(&store, None, "N", "r1", &fa).await.expect("lookup").is_none());
    }

    /// A record keeps 17 bytes of fingerprint (was 64), and one written before that (its
    /// fingerprint's hex text) is still replayed and still refuses a different request.
    #[tokio::test]
    async fn records_are_compact_and_those_written_before_still_replay() {
        let store = Store::memory();
        let idem = Idempotency::new(Space::new("t"), DEFAULT_TTL);
        let answer = prost_types::Timestamp { seconds: 42, nanos: 0 };
        let (fa, fb) = (
            fingerprint(&prost_types::Duration { seconds: 1, nanos: 0 }),
            fingerprint(&prost_types::Duration { seconds: 2, nanos: 0 }),
        );
        let mut t = Txn::new();
        idem.record(&mut t, None, "M", "new", &fa, &answer);
        store.commit(&t).await.expect("commit");
        let rec = store.get(&[idem.key("M", "new")]).await.expect("get").remove(0).expect("stored");
        assert_eq!(rec.data.len(), 1 + FP_BYTES + answer.encoded_len());
        // As an earlier version wrote it: the hex fingerprint, then the answer.
        let mut old = fa.hex().into_bytes();
        answer.encode(&mut old).expect("encode");
        let mut t = Txn::new();
        t.put(idem.key("M", "old"), old);
        store.commit(&t).await.expect("commit");
        for id in ["new", "old"] {
            let replay = idem.lookup::<prost_types::Timestamp>(&store, None, "M", id, &fa).await.expect("lookup");
            assert_eq!(replay, Some(answer), "{id}");
            let err = idem.lookup::<prost_types::Timestamp>(&store, None, "M", id, &fb).await;
            assert_eq!(err.expect_err("a different request").code(), tonic::Code::InvalidArgument, "{id}");
        }
        // Cut short: an error, not a replay of half an answer.
        let mut t = Txn::new();
        t.put(idem.key("M", "cut"), vec![COMPACT, 1, 2]);
        store.commit(&t).await.expect("commit");
        let err = idem.lookup::<prost_types::Timestamp>(&store, None, "M", "cut", &fa).await;
        assert_eq!(err.expect_err("truncated").code(), tonic::Code::Internal);
    }

    /// A caller answering from a record its own commit conflicted on writes it again first (so the
    /// replicas' acknowledgement of that write covers it); a different request under the id is
    /// refused without a write, and an absent record is just absent.
    #[tokio::test]
    async fn a_durable_lookup_writes_the_record_again_before_answering() {
        let store = Store::memory();
        let idem = Idempotency::new(Space::new("t"), DEFAULT_TTL);
        let answer = prost_types::Timestamp { seconds: 42, nanos: 0 };
        let fa = fingerprint(&prost_types::Duration { seconds: 1, nanos: 0 });
        let fb = fingerprint(&prost_types::Duration { seconds: 2, nanos: 0 });
        let version = |store: &Store| {
            let store = store.clone();
            let key = idem.key("M", "r1");
            async move { store.get(&[key]).await.expect("get").remove(0).map(|r| (r.version, r.data)) }
        };
        assert_eq!(
            idem.lookup_durable::<prost_types::Timestamp>(&store, None, "M", "r1", &fa).await.expect("absent"),
            None
        );
        let mut t = Txn::new();
        idem.record(&mut t, None, "M", "r1", &fa, &answer);
        store.commit(&t).await.expect("commit");
        let (v1, data) = version(&store).await.expect("stored");
        let replay = idem.lookup_durable::<prost_types::Timestamp>(&store, None, "M", "r1", &fa).await;
        assert_eq!(replay.expect("replay"), Some(answer));
        assert_eq!(version(&store).await, Some((v1 + 1, data.clone())), "written again, unchanged");
        let err = idem.lookup_durable::<prost_types::Timestamp>(&store, None, "M", "r1", &fb).await;
        assert_eq!(err.expect_err("a different request").code(), tonic::Code::InvalidArgument);
        assert_eq!(version(&store).await, Some((v1 + 1, data.clone())), "a refused request writes nothing");
        // Eight retries at once all answer (none waits for or undoes another), each having written.
        let mut replays = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let store = store.clone();
            replays.spawn(
                async move { idem.lookup_durable::<prost_types::Timestamp>(&store, None, "M", "r1", &fa).await },
            );
        }
        while let Some(r) = replays.join_next().await {
            assert_eq!(r.expect("task").expect("concurrent replay"), Some(answer));
        }
        assert_eq!(version(&store).await, Some((v1 + 9, data)));
    }

    #[tokio::test]
    async fn request_ids_are_each_accounts_own() {
        let store = Store::memory();
        let idem = Idempotency::new(Space::new("t"), DEFAULT_TTL);
        let answer = prost_types::Timestamp { seconds: 7, nanos: 0 };
        let fp = fingerprint(&prost_types::Duration { seconds: 1, nanos: 0 });
        let other_fp = fingerprint(&prost_types::Duration { seconds: 2, nanos: 0 });
        ACCOUNT
            .scope(Some("buyer:alpha".into()), async {
                let mut t = Txn::new();
                idem.record(&mut t, None, "M", "order-1", &fp, &answer);
                store.commit(&t).await.expect("alpha's call");
                let replay = idem.lookup::<prost_types::Timestamp>(&store, None, "M", "order-1", &fp).await;
                assert_eq!(replay.expect("lookup"), Some(answer));
            })
            .await;
        // Beta's "order-1", even with another body, is a new call: no replay, no refusal, no hint.
        ACCOUNT
            .scope(Some("buyer:beta".into()), async {
                let seen = idem.lookup::<prost_types::Timestamp>(&store, None, "M", "order-1", &other_fp).await;
                assert_eq!(seen.expect("lookup"), None);
            })
            .await;
        // Outside any account (the shared one) alpha's record is not among them.
        assert_eq!(
            idem.lookup::<prost_types::Timestamp>(&store, None, "M", "order-1", &fp).await.expect("lookup"),
            None
        );
        assert_ne!(
            ACCOUNT.sync_scope(Some("a:b".into()), || idem.key("M", "c")),
            ACCOUNT.sync_scope(Some("a".into()), || idem.key("M", "b:c")),
            "accounts are length-prefixed"
        );
    }
}
