//! One tail of a stream per replica, fanned out to every watcher.
//!
//! Server-streaming "watch" calls (WatchStock, WatchOrders) share it: a single task follows the stream
//! with a blocking read on its own connection and broadcasts each decoded entry; each watcher filters.
//! A watcher that falls too far behind is dropped with an error rather than slowing the others.

use std::sync::Arc;
use std::time::Duration;

use chipgate_state::{Backend, Store, StreamEntry};
use tokio::sync::broadcast;

use crate::Shutdown;

/// Broadcast side of a followed stream.
pub struct StreamHub<T> {
    tx: broadcast::Sender<Arc<T>>,
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
        StreamHub { tx }
    }

    /// A new watcher: receives every entry decoded after this call.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<T>> {
        self.tx.subscribe()
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
        let mut last = if let Some(from) = from {
            from
        } else {
            loop {
                tokio::select! {
                    () = shutdown.wait() => return,
                    r = store.xlast_id(&stream) => match r {
                        Ok(id) => break id,
                        Err(e) => {
                            tracing::warn!(%stream, error = %e, "watch hub can't read its stream yet; retrying");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                }
            }
        };
        loop {
            tokio::select! {
                () = shutdown.wait() => return,
                r = store.tail(&stream, &last, 256, Duration::from_secs(2)) => match r {
                    Ok(entries) => {
                        for e in entries {
                            last.clone_from(&e.id);
                            if let Some(item) = decode(&e) {
                                // No receivers is fine: nobody is watching.
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
