//! Streaming calls (WatchStock, WatchOrders, Health/Watch, reflection) are long-lived: each holds a
//! task, buffers and an HTTP/2 stream for as long as it is open, however little work it does. So
//! each takes, for its whole life (until its response body ends or is dropped), a slot of a global
//! quota ([`StreamLimits::max_open`]) and one of its caller's ([`StreamLimits::per_caller`]; the
//! caller is the token's subject, or the peer address for open paths and without authentication);
//! over either it is refused RESOURCE_EXHAUSTED at once. A stream on which nothing has been sent for
//! [`StreamLimits::idle`] is ended cleanly (status OK; the client watches again, as Kubernetes watch
//! clients do when the API server ends a watch), and its request side is closed with it, so a
//! forgotten watcher gives its slot back. These quotas are apart from the global concurrency limit
//! ([`shed`](super::shed)): open watchers must not starve the calls that do work.
//!
//! When the server drains ([`StreamsLayer::end_all`], after health has said NOT_SERVING and the drain
//! delay has passed), every open stream is ended the same clean way: a watch (Health/Watch above all,
//! which would otherwise never end) must not hold a stopping server for its whole grace period, and
//! its client watches again, on another replica.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::body::Body;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};
use tower::{Layer, Service};

use super::{BoxFuture, Counters, Req, Resp, peer_key, refuse};
use crate::context::RequestContext;

/// The stream quotas and the idle bound.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamLimits {
    /// Streams open at once across all connections and callers.
    pub max_open: usize,
    /// Streams one caller may hold open at once.
    pub per_caller: usize,
    /// A stream on which nothing was sent for this long is ended (None: never).
    pub idle: Option<Duration>,
}

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits { max_open: 1000, per_caller: 32, idle: Some(Duration::from_secs(600)) }
    }
}

/// The streaming methods every server has: health's Watch and both reflection versions.
pub fn always_streaming() -> [String; 3] {
    [
        "/grpc.health.v1.Health/Watch".to_string(),
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo".to_string(),
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo".to_string(),
    ]
}

struct Shared {
    limits: StreamLimits,
    open: Arc<Semaphore>,
    by_caller: Mutex<HashMap<String, usize>>,
    paths: HashSet<String>,
    /// Turns true when the server drains: every open stream ends ([`StreamsLayer::end_all`]).
    ending: tokio::sync::watch::Sender<bool>,
}

/// Builds [`Streams`]; clones share the quotas.
#[derive(Clone)]
pub struct StreamsLayer {
    shared: Arc<Shared>,
    counters: Counters,
}

impl StreamsLayer {
    /// `limits` for health's Watch and reflection (add the services' own with
    /// [`with_paths`](Self::with_paths)).
    pub fn new(limits: StreamLimits, counters: Counters) -> Self {
        let limits = StreamLimits { max_open: limits.max_open.max(1), per_caller: limits.per_caller.max(1), ..limits };
        StreamsLayer {
            shared: Arc::new(Shared {
                open: Arc::new(Semaphore::new(limits.max_open)),
                limits,
                by_caller: Mutex::default(),
                paths: always_streaming().into_iter().collect(),
                ending: tokio::sync::watch::Sender::new(false),
            }),
            counters,
        }
    }

    /// Fresh quotas that also cover the methods in `paths` (full paths, e.g.
    /// `/chipgate.inventory.v1.InventoryService/WatchStock`).
    #[must_use]
    pub fn with_paths(self, paths: impl IntoIterator<Item = String>) -> Self {
        let mut all = self.shared.paths.clone();
        all.extend(paths);
        let fresh = StreamsLayer::new(self.shared.limits.clone(), self.counters);
        let shared = Shared {
            limits: fresh.shared.limits.clone(),
            open: fresh.shared.open.clone(),
            by_caller: Mutex::default(),
            paths: all,
            ending: tokio::sync::watch::Sender::new(false),
        };
        StreamsLayer { shared: Arc::new(shared), counters: fresh.counters }
    }

    /// The same quotas reporting to `counters`.
    #[must_use]
    pub fn with_counters(mut self, counters: Counters) -> Self {
        self.counters = counters;
        self
    }

    /// The server drains: ends every stream open now, and every one opened from now on, cleanly
    /// (status OK, "watch again") between two messages, as the idle bound does.
    pub fn end_all(&self) {
        if !self.shared.ending.send_replace(true) {
            tracing::info!(
                open = self.shared.limits.max_open - self.shared.open.available_permits(),
                "draining: ending the open streams"
            );
        }
    }
}

impl<S> Layer<S> for StreamsLayer {
    type Service = Streams<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Streams { inner, layer: self.clone() }
    }
}

/// See the [module docs](self).
#[derive(Clone)]
pub struct Streams<S> {
    inner: S,
    layer: StreamsLayer,
}

/// One open stream's share of the quotas, given back when dropped.
struct Slot {
    shared: Arc<Shared>,
    caller: String,
    _global: OwnedSemaphorePermit,
    counters: Counters,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut by_caller = self.shared.by_caller.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = by_caller.get_mut(&self.caller) {
            *n -= 1;
            if *n == 0 {
                by_caller.remove(&self.caller);
            }
        }
        self.counters.stream_opened(false);
    }
}

fn too_many(message: String, subject: &str, description: &str) -> Status {
    let mut details = ErrorDetails::new();
    details.add_quota_failure_violation(subject, description);
    details.set_error_info("TOO_MANY_STREAMS", crate::errors::DOMAIN, []);
    Status::with_error_details(Code::ResourceExhausted, message, details)
}

impl StreamsLayer {
    /// A slot for `caller`, or why not.
    fn open(&self, caller: &str) -> Result<Slot, Status> {
        let shared = &self.shared;
        let Ok(global) = shared.open.clone().try_acquire_owned() else {
            return Err(too_many(
                format!("the server has {} streams open; retry with backoff", shared.limits.max_open),
                "server",
                "streams open on this server",
            ));
        };
        let mut by_caller = shared.by_caller.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = by_caller.entry(caller.to_string()).or_insert(0);
        if *n >= shared.limits.per_caller {
            return Err(too_many(
                format!(
                    "this caller already has {} streams open (the most one caller may hold); close one first",
                    shared.limits.per_caller
                ),
                "caller",
                "streams open per caller",
            ));
        }
        *n += 1;
        self.counters.stream_opened(true);
        Ok(Slot {
            shared: shared.clone(),
            caller: caller.to_string(),
            _global: global,
            counters: self.counters.clone(),
        })
    }
}

/// Whose quota a stream takes from: the token's subject, else the peer address.
fn caller(req: &Req) -> String {
    match req.extensions().get::<RequestContext>().and_then(|c| c.principal.as_ref()) {
        Some(p) => p.subject.clone(),
        None => peer_key(req).unwrap_or_else(|| "unknown".to_string()),
    }
}

impl<S> Service<Req> for Streams<S>
where
    S: Service<Req, Response = Resp> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Resp;
    type Error = S::Error;
    type Future = BoxFuture<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        if !self.layer.shared.paths.contains(req.uri().path()) {
            return Box::pin(self.inner.call(req));
        }
        let who = caller(&req);
        let slot = match self.layer.open(&who) {
            Ok(slot) => slot,
            Err(status) => {
                self.layer.counters.stream_refused();
                tracing::info!(caller = %who, "stream refused: {}", status.message());
                return refuse(status);
            }
        };
        let closer = Arc::new(Closer::default());
        let (parts, body) = req.into_parts();
        let req = http::Request::from_parts(parts, Body::new(Closing { inner: body, closer: closer.clone() }));
        let idle = self.layer.shared.limits.idle;
        let counters = self.layer.counters.clone();
        let mut ending = self.layer.shared.ending.subscribe();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            let (parts, body) = resp.into_parts();
            let watched = Watched {
                inner: body,
                idle,
                sleep: idle.map(|d| Box::pin(tokio::time::sleep(d))),
                ending: Box::pin(async move {
                    // The sender lives as long as the layer's shared state, which this stream's slot
                    // holds; should it go, the stream just never drains.
                    let drained = ending.wait_for(|e| *e).await.is_ok();
                    if !drained {
                        std::future::pending::<()>().await;
                    }
                }),
                done: false,
                closer,
                counters,
                _slot: slot,
            };
            // An answer without a body (a refusal) drops the slot right here.
            Ok(http::Response::from_parts(parts, Body::new(watched)))
        })
    }
}

/// Lets the response side end the request side of a stream (a bidirectional stream whose handler
/// waits for the client's next message).
#[derive(Default)]
struct Closer {
    closed: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Closer {
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        if let Some(w) = self.waker.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
            w.wake();
        }
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}

/// A stream's request body, ended early once its [`Closer`] closes.
struct Closing {
    inner: Body,
    closer: Arc<Closer>,
}

impl HttpBody for Closing {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if this.closer.is_closed() {
            return Poll::Ready(None);
        }
        *this.closer.waker.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(cx.waker().clone());
        if this.closer.is_closed() {
            return Poll::Ready(None);
        }
        Pin::new(&mut this.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.closer.is_closed() || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A stream's response body: holds its [`Slot`] and ends the stream once it has been idle too long,
/// or when the server drains.
struct Watched {
    inner: Body,
    idle: Option<Duration>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Ready once the server drains ([`StreamsLayer::end_all`]).
    ending: Pin<Box<dyn Future<Output = ()> + Send>>,
    done: bool,
    closer: Arc<Closer>,
    counters: Counters,
    _slot: Slot,
}

impl HttpBody for Watched {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if frame.is_data()
                    && let (Some(sleep), Some(idle)) = (this.sleep.as_mut(), this.idle)
                {
                    sleep.as_mut().reset(tokio::time::Instant::now() + idle);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Pending => {
                if this.ending.as_mut().poll(cx).is_ready() {
                    tracing::debug!("server draining; stream ended (the client watches again)");
                    return Poll::Ready(Some(Ok(this.end("server draining; watch again"))));
                }
                let Some(sleep) = this.sleep.as_mut() else { return Poll::Pending };
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.counters.stream_idle_closed();
                tracing::info!(idle = ?this.idle, "stream idle; ended (the client watches again)");
                Poll::Ready(Some(Ok(this.end("idle; watch again"))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.done { SizeHint::with_exact(0) } else { self.inner.size_hint() }
    }
}

impl Watched {
    /// Ends the stream cleanly between messages (the trailers to send, status OK with `message`), and
    /// lets go of the handler's side (its task sees the client gone) and of the request side.
    fn end(&mut self, message: &'static str) -> Frame<Bytes> {
        self.done = true;
        self.inner = Body::empty();
        self.closer.close();
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        trailers.insert("grpc-message", http::HeaderValue::from_static(message));
        Frame::trailers(trailers)
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        // However the stream ended (finished, client gone, idle), its request side is done too.
        self.closer.close();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::super::testing::*;
    use super::*;
    use crate::auth::{Principal, Role};

    const WATCH: &str = "/x.Y/Watch";

    /// The senders feeding each response body a [`watcher`] handed out.
    type Feeds = Arc<Mutex<Vec<tokio::sync::mpsc::Sender<Result<Frame<Bytes>, Status>>>>>;

    /// A streaming handler: answers at once with a body fed by the returned sender, and counts (in
    /// `ended`) request bodies it saw end.
    fn watcher(
        ended: Arc<AtomicUsize>,
    ) -> (
        impl Service<Req, Response = Resp, Error = std::convert::Infallible, Future = impl Send> + Clone + Send + 'static,
        Feeds,
    ) {
        let senders = Arc::new(Mutex::new(Vec::new()));
        let s = senders.clone();
        let svc = tower::service_fn(move |req: Req| {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            s.lock().expect("lock").push(tx);
            let ended = ended.clone();
            async move {
                // Like a bidirectional handler: wait for the client's messages in a task of its own.
                let mut body = req.into_body();
                tokio::spawn(async move {
                    while let Some(Ok(_)) = body.frame().await {}
                    ended.fetch_add(1, Ordering::SeqCst);
                });
                let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
                Ok::<_, std::convert::Infallible>(http::Response::new(Body::new(http_body_util::StreamBody::new(
                    stream,
                ))))
            }
        });
        (svc, senders)
    }

    fn pending_body() -> Body {
        let (_tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Status>>(1);
        std::mem::forget(_tx);
        Body::new(http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    fn stream_req(subject: &str) -> Req {
        let mut req = http::Request::builder().uri(WATCH).body(pending_body()).expect("request");
        let mut ctx = RequestContext::from_headers(req.headers(), WATCH, None);
        ctx.authenticated(Principal { subject: subject.into(), role: Role::Buyer, buyer_id: Some(subject.into()) });
        req.extensions_mut().insert(ctx);
        req
    }

    fn layer(limits: StreamLimits) -> (StreamsLayer, Counters) {
        let counters = Counters::default();
        (StreamsLayer::new(limits, counters.clone()).with_paths([WATCH.to_string()]), counters)
    }

    #[tokio::test]
    async fn each_caller_holds_at_most_its_quota_for_the_streams_whole_life() {
        let (layer, counters) = layer(StreamLimits { max_open: 100, per_caller: 3, idle: None });
        let (handler, _senders) = watcher(Arc::default());
        let svc = layer.layer(handler);
        let mut open = Vec::new();
        for _ in 0..3 {
            let resp = svc.clone().oneshot(stream_req("alpha")).await.expect("answer");
            assert_eq!(status_of(&resp), None);
            open.push(resp);
        }
        // The response headers are out, but the streams still count.
        let refused = svc.clone().oneshot(stream_req("alpha")).await.expect("answer");
        let s = status(&refused).expect("refused");
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert_eq!(s.get_error_details().error_info().map(|i| i.reason.clone()).as_deref(), Some("TOO_MANY_STREAMS"));
        assert_eq!(
            status_of(&svc.clone().oneshot(stream_req("beta")).await.expect("answer")),
            None,
            "beta has its own"
        );
        // Closing one (the client drops it) gives the slot back.
        drop(open.pop());
        assert_eq!(status_of(&svc.clone().oneshot(stream_req("alpha")).await.expect("answer")), None);
        assert_eq!(counters.stats().streams_refused.load(Ordering::Relaxed), 1);
        // Unary paths don't count.
        let unary = layer.layer(answering(None));
        for _ in 0..10 {
            let mut req = stream_req("alpha");
            *req.uri_mut() = "/x.Y/Get".parse().expect("uri");
            assert_eq!(status_of(&unary.clone().oneshot(req).await.expect("answer")), None);
        }
    }

    #[tokio::test]
    async fn the_server_holds_at_most_its_global_quota() {
        let (layer, _) = layer(StreamLimits { max_open: 2, per_caller: 10, idle: None });
        let (handler, _senders) = watcher(Arc::default());
        let svc = layer.layer(handler);
        let a = svc.clone().oneshot(stream_req("a")).await.expect("answer");
        let b = svc.clone().oneshot(stream_req("b")).await.expect("answer");
        let c = svc.clone().oneshot(stream_req("c")).await.expect("answer");
        assert_eq!((status_of(&a), status_of(&b), status_of(&c).as_deref()), (None, None, Some("8")));
        // A stream that finishes gives its slot back too.
        let mut body = a.into_body();
        drop(_senders.lock().expect("lock").remove(0));
        assert!(body.frame().await.is_none(), "the handler ended the stream");
        drop(body);
        assert_eq!(status_of(&svc.clone().oneshot(stream_req("c")).await.expect("answer")), None);
    }

    #[tokio::test]
    async fn an_idle_stream_ends_cleanly_and_its_request_side_with_it() {
        let idle = Duration::from_millis(300);
        let (layer, counters) = layer(StreamLimits { max_open: 10, per_caller: 1, idle: Some(idle) });
        let ended = Arc::new(AtomicUsize::new(0));
        let (handler, senders) = watcher(ended.clone());
        let svc = layer.layer(handler);
        let opened = tokio::time::Instant::now();
        let resp = svc.clone().oneshot(stream_req("alpha")).await.expect("answer");
        let mut body = resp.into_body();
        // A message within the bound keeps it open (and restarts the bound).
        tokio::time::sleep(idle * 2 / 3).await;
        let tx = senders.lock().expect("lock")[0].clone();
        tx.send(Ok(Frame::data(Bytes::from_static(b"msg")))).await.expect("send");
        let spoke = tokio::time::Instant::now();
        let first = body.frame().await.expect("a frame").expect("ok");
        assert!(first.is_data());
        // Then silence for the whole bound: trailers with OK, then the end.
        let last = body.frame().await.expect("trailers").expect("ok");
        assert!(spoke.elapsed() >= idle, "ended {:?} after the last message", spoke.elapsed());
        assert!(opened.elapsed() >= idle + idle * 2 / 3, "the message restarted the bound");
        let trailers = last.into_trailers().expect("trailers");
        assert_eq!(trailers.get("grpc-status").and_then(|v| v.to_str().ok()), Some("0"));
        assert!(body.frame().await.is_none());
        assert!(tx.is_closed(), "the handler's side was let go");
        for _ in 0..100 {
            if ended.load(Ordering::SeqCst) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(ended.load(Ordering::SeqCst), 1, "the request side was ended too");
        assert_eq!(counters.stats().streams_idle_closed.load(Ordering::Relaxed), 1);
        drop(body);
        // Its slot is free again.
        assert_eq!(status_of(&svc.clone().oneshot(stream_req("alpha")).await.expect("answer")), None);
    }

    /// Draining ends every open stream cleanly (OK, between messages) and gives its slot back; a
    /// stream opened while draining gets what is ready and ends too.
    #[tokio::test]
    async fn draining_ends_every_open_stream_cleanly() {
        let (layer, counters) = layer(StreamLimits { max_open: 10, per_caller: 2, idle: None });
        let ended = Arc::new(AtomicUsize::new(0));
        let (handler, senders) = watcher(ended.clone());
        let svc = layer.layer(handler);
        let mut bodies = Vec::new();
        for _ in 0..2 {
            bodies.push(svc.clone().oneshot(stream_req("alpha")).await.expect("answer").into_body());
        }
        let a_tx = senders.lock().expect("lock")[0].clone();
        a_tx.send(Ok(Frame::data(Bytes::from_static(b"msg")))).await.expect("send");
        assert!(bodies[0].frame().await.expect("a frame").expect("ok").is_data());
        // Not idle-bounded, nothing to send: open until the server drains.
        let waiting = tokio::time::timeout(Duration::from_millis(100), bodies[1].frame()).await;
        assert!(waiting.is_err(), "open while the server serves");
        layer.end_all();
        for body in &mut bodies {
            let last = tokio::time::timeout(Duration::from_secs(5), body.frame())
                .await
                .expect("ended at once")
                .expect("trailers")
                .expect("ok");
            let trailers = last.into_trailers().expect("trailers");
            assert_eq!(trailers.get("grpc-status").and_then(|v| v.to_str().ok()), Some("0"));
            assert!(body.frame().await.is_none());
        }
        assert!(a_tx.is_closed(), "the handler's side was let go");
        assert_eq!(counters.stats().streams_idle_closed.load(Ordering::Relaxed), 0, "not counted as idle");
        drop(bodies);
        // The slots are free; a stream opened while draining ends as soon as nothing is ready.
        let late = svc.clone().oneshot(stream_req("alpha")).await.expect("answer");
        assert_eq!(status_of(&late), None);
        let last = late.into_body().frame().await.expect("trailers").expect("ok");
        assert!(last.is_trailers());
    }
}
