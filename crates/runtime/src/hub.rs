//! One tail of a stream per replica, fanned out to every watcher.
//!
//! Server-streaming "watch" calls (WatchStock, WatchOrders) share it: a single task per stream
//! follows it with a blocking read on its own connection and broadcasts each decoded entry; each
//! watcher filters. A watcher that falls too far behind is dropped with an error rather than slowing
//! the others.
//!
//! While nobody watches, the followers don't read: a replica's streams carry every change of its
//! products (an order's every transition, a product's every batch of holds), and reading and decoding
//! all of it for no watcher cost Redis and the service a share of every placement's CPU (measured in
//! BENCHMARKS.md, round 23). A follower idles once a read finds no watcher left, and a new watcher
//! ([`StreamHub::subscribe`]) wakes it and waits until it has read where its stream ends now: every
//! entry added after `subscribe` returns reaches the watcher, and none from before it idled.

use std::sync::Arc;
use std::time::Duration;

use chipgate_state::{Backend, Store, StreamEntry};
use tokio::sync::{Notify, broadcast, watch};

use crate::Shutdown;
use crate::edge::shed::Slot;

/// How long a follower's blocking read waits for new entries before it looks again whether anyone
/// still watches (so a follower idles at most this long after its last watcher left).
const TAIL_BLOCK: Duration = Duration::from_secs(2);

/// How long [`StreamHub::subscribe`] waits for idle followers to resume: a follower that can't read
/// its stream's end (the store is down) must not hold a watch call for ever. The watcher then goes
/// on without it (and may miss the changes that stream carries until it resumes; a warning says so).
const RESUME_WAIT: Duration = Duration::from_secs(2);

/// Broadcast side of a followed stream.
pub struct StreamHub<T> {
    tx: broadcast::Sender<Arc<T>>,
    /// Followers idling because nobody watched (see the module's documentation).
    idle: watch::Sender<usize>,
    /// Wakes idle followers when a watcher subscribes.
    wake: Notify,
    /// How long a follower's read blocks ([`TAIL_BLOCK`]; shorter in tests).
    block: Duration,
}

impl<T: Send + Sync + 'static> Default for StreamHub<T> {
    fn default() -> Self {
        Self::new(4096)
    }
}

impl<T: Send + Sync + 'static> StreamHub<T> {
    /// A hub that buffers up to `capacity` entries for slow watchers.
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity);
        StreamHub { tx, idle: watch::Sender::new(0), wake: Notify::new(), block: TAIL_BLOCK }
    }

    /// The same with followers' reads blocking for `block` (how soon a follower idles once its last
    /// watcher left).
    pub fn with_tail_block(mut self, block: Duration) -> Self {
        self.block = block;
        self
    }

    /// A new watcher: receives every entry added after this returns. Wakes the followers that idle
    /// because nobody watched, and returns once they have read where their streams end (or after
    /// [`RESUME_WAIT`]), so a snapshot read after it and the entries it receives leave no gap.
    ///
    /// A call that has to wait for them gives its share of the global concurrency limit back first
    /// (`slot`, the edge's): it waits rather than works, and must not shed the calls that work.
    pub async fn subscribe(&self, slot: Option<&Slot>) -> broadcast::Receiver<Arc<T>> {
        let rx = self.tx.subscribe();
        // A follower counts itself idle before it looks at the receivers (see `idle_until_watched`):
        // either it sees this receiver and carries on reading from where it was, or it was counted
        // here and is woken.
        if *self.idle.borrow() > 0 {
            if let Some(slot) = slot {
                slot.give_back();
            }
            self.wake.notify_waiters();
            let mut idle = self.idle.subscribe();
            if tokio::time::timeout(RESUME_WAIT, idle.wait_for(|n| *n == 0)).await.is_err() {
                tracing::warn!("a stream's follower could not resume in time; this watcher may miss its first changes");
            }
        }
        rx
    }

    /// Followers idling now because nobody watched (what the tests watch for).
    #[cfg(test)]
    fn idle_followers(&self) -> usize {
        *self.idle.borrow()
    }

    /// Follows `stream` from its current end until `shutdown`, broadcasting what `decode` makes of
    /// each entry (entries it returns `None` for are skipped).
    pub async fn follow(
        &self,
        store: Store,
        stream: String,
        shutdown: Shutdown,
        decode: impl Fn(&StreamEntry) -> Option<T>,
    ) {
        self.follow_from(store, stream, None, shutdown, decode).await;
    }

    /// Like [`StreamHub::follow`], from just after entry `from` (`Some("0-0")`: from the start of the
    /// stream, for a stream that appeared after the watchers subscribed) instead of its current end.
    pub async fn follow_from(
        &self,
        store: Store,
        stream: String,
        from: Option<String>,
        shutdown: Shutdown,
        decode: impl Fn(&StreamEntry) -> Option<T>,
    ) {
        let mut last = match from {
            Some(from) => from,
            None => match end_of(&store, &stream, &shutdown).await {
                Some(id) => id,
                None => return,
            },
        };
        loop {
            if self.tx.receiver_count() == 0 {
                match self.idle_until_watched(&store, &stream, &shutdown).await {
                    Resumed::At(id) => last = id,
                    Resumed::Watched => {}
                    Resumed::Shutdown => return,
                }
            }
            tokio::select! {
                () = shutdown.wait() => return,
                r = store.tail(&stream, &last, 256, self.block) => match r {
                    Ok(entries) => {
                        for e in entries {
                            last.clone_from(&e.id);
                            if let Some(item) = decode(&e) {
                                // No receivers is fine: the last watcher just left.
                                let _ = self.tx.send(Arc::new(item));
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(%stream, error = %e, "watch hub lost its stream; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        }
    }

    /// Idles a follower that found nobody watching until a watcher subscribes: `At` the stream's end
    /// as read after the wake-up (what came before no watcher asked for), or `Watched` when a watcher
    /// subscribed before the follower could idle (it reads on from where it was, missing nothing).
    async fn idle_until_watched(&self, store: &Store, stream: &str, shutdown: &Shutdown) -> Resumed {
        // Registered before the count and the look at the receivers, so a subscriber that comes
        // after the look finds the count and its wake-up reaches this follower.
        let woken = self.wake.notified();
        tokio::pin!(woken);
        self.idle.send_modify(|n| *n += 1);
        if self.tx.receiver_count() > 0 {
            self.idle.send_modify(|n| *n -= 1);
            return Resumed::Watched;
        }
        tracing::debug!(%stream, "nobody watches; the follower idles");
        let resumed = tokio::select! {
            () = shutdown.wait() => None,
            () = &mut woken => end_of(store, stream, shutdown).await,
        };
        self.idle.send_modify(|n| *n -= 1);
        match resumed {
            Some(id) => {
                tracing::debug!(%stream, from = %id, "a watcher came; the follower reads on");
                Resumed::At(id)
            }
            None => Resumed::Shutdown,
        }
    }
}

/// How an idle follower came back.
enum Resumed {
    /// Woken by a watcher: reads on after this entry (its stream's end when it woke).
    At(String),
    /// A watcher subscribed before it idled: reads on from where it was.
    Watched,
    /// The service is shutting down.
    Shutdown,
}

/// The id of `stream`'s last entry, retried until it can be read (None: shutdown came first).
async fn end_of(store: &Store, stream: &str, shutdown: &Shutdown) -> Option<String> {
    loop {
        tokio::select! {
            () = shutdown.wait() => return None,
            r = store.xlast_id(stream) => match r {
                Ok(id) => return Some(id),
                Err(e) => {
                    tracing::warn!(%stream, error = %e, "watch hub can't read its stream yet; retrying");
                    tokio::select! {
                        () = shutdown.wait() => return None,
                        () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        }
    }
}

/// Forwards what `keep` makes of each of a watcher's entries (none, one or several responses) into a
/// gRPC response stream, after `first` (an initial snapshot), until the client goes away, the watcher
/// lags, or `shutdown`.
pub fn forward<T, R>(
    mut rx: broadcast::Receiver<Arc<T>>,
    first: Vec<R>,
    shutdown: Shutdown,
    keep: impl Fn(&T) -> Vec<R> + Send + 'static,
) -> tokio_stream::wrappers::ReceiverStream<Result<R, tonic::Status>>
where
    T: Send + Sync + 'static,
    R: Send + 'static,
{
    let (tx, out) = tokio::sync::mpsc::channel(256);
    tokio::spawn(async move {
        for item in first {
            if tx.send(Ok(item)).await.is_err() {
                return;
            }
        }
        loop {
            let next = tokio::select! {
                () = shutdown.wait() => return,
                () = tx.closed() => return,
                n = rx.recv() => n,
            };
            match next {
                Ok(entry) => {
                    for r in keep(&entry) {
                        if tx.send(Ok(r)).await.is_err() {
                            return;
                        }
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    let _ = tx
                        .send(Err(tonic::Status::resource_exhausted(format!(
                            "this watcher fell {n} changes behind and was dropped; watch again"
                        ))))
                        .await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use chipgate_state::{Backend, Store, StreamEntry, Txn};

    use super::StreamHub;
    use crate::Shutdown;
    use crate::edge::shed::Slot;

    async fn append(store: &Store, n: u64) {
        let mut t = Txn::new();
        t.xadd("s", vec![("n".to_string(), n.to_string().into_bytes())], None);
        store.commit(&t).await.unwrap();
    }

    fn number(e: &StreamEntry) -> Option<u64> {
        std::str::from_utf8(e.field("n")?).ok()?.parse().ok()
    }

    /// A hub following stream `s` of `store`, its reads blocking 20 ms.
    fn follow(store: &Store, shutdown: &Shutdown) -> Arc<StreamHub<u64>> {
        let hub = Arc::new(StreamHub::new(4096).with_tail_block(Duration::from_millis(20)));
        let (h, store, shutdown) = (hub.clone(), store.clone(), shutdown.clone());
        tokio::spawn(async move { h.follow(store, "s".into(), shutdown, number).await });
        hub
    }

    async fn until(what: &str, cond: impl Fn() -> bool) {
        for _ in 0..500 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting until {what}");
    }

    /// Nobody watching: the follower idles, and what is added meanwhile goes to nobody. A watcher
    /// wakes it and receives what is added after its subscription, not what came before; once the
    /// watcher leaves, the follower idles again.
    #[tokio::test]
    async fn a_follower_idles_while_nobody_watches_and_resumes_at_the_end() {
        let store = Store::memory();
        let shutdown = Shutdown::new();
        let hub = follow(&store, &shutdown);
        // The edge's share of the global limit, as a watch call holds it.
        let limit = Arc::new(tokio::sync::Semaphore::new(2));
        let slot = || Slot::new(limit.clone().try_acquire_owned().unwrap());
        let reading = slot();
        let early = hub.subscribe(Some(&reading)).await;
        assert!(reading.held(), "nothing to wait for while the follower reads: the call keeps its share");
        drop(early);
        until("the follower idles", || hub.idle_followers() == 1).await;
        for n in 1..=3 {
            append(&store, n).await;
        }
        let waking = slot();
        let mut rx = hub.subscribe(Some(&waking)).await;
        assert!(!waking.held(), "a call waiting for an idle follower gives its share back");
        assert_eq!(hub.idle_followers(), 0, "subscribe returns once the follower reads on");
        append(&store, 4).await;
        let got = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap().unwrap();
        assert_eq!(*got, 4, "the first entry after the subscription, none from before it");
        drop(rx);
        until("the follower idles again", || hub.idle_followers() == 1).await;
        shutdown.trigger();
    }

    /// Watchers come and go while entries keep coming (the follower idling between them, or not yet):
    /// each receives every entry added after its subscription, in order, with no gap.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watchers_coming_and_going_miss_nothing_added_after_they_subscribed() {
        let store = Store::memory();
        let shutdown = Shutdown::new();
        let hub = follow(&store, &shutdown);
        let written = Arc::new(AtomicU64::new(0));
        let writer = {
            let (store, written, shutdown) = (store.clone(), written.clone(), shutdown.clone());
            tokio::spawn(async move {
                for n in 1.. {
                    if shutdown.is_triggered() {
                        return;
                    }
                    append(&store, n).await;
                    written.store(n, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_micros(500)).await;
                }
            })
        };
        let mut idled = 0;
        for round in 0..30u64 {
            idled += usize::from(hub.idle_followers() > 0);
            let mut rx = hub.subscribe(None).await;
            // Entry c + 1 may have been committed before the subscription returned (its number is
            // published after its commit); every one from c + 2 on came after it.
            let first = written.load(Ordering::SeqCst) + 2;
            let mut expected = first;
            while expected < first + 10 {
                let got = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap().unwrap();
                if *got >= first {
                    assert_eq!(*got, expected, "round {round}: entries from {first} on arrive in order, none missing");
                    expected += 1;
                }
            }
            drop(rx);
            // Sometimes long enough for the follower to idle (its reads block 20 ms), sometimes not.
            tokio::time::sleep(Duration::from_millis(round % 3 * 30)).await;
        }
        assert!(idled > 0, "the follower idled between watchers at least once");
        shutdown.trigger();
        writer.await.unwrap();
    }
}
