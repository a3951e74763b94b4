//! The orders service's clients of licensing and inventory.
//!
//! Calls carry the service's own `service` bearer token (from a token file or minted from a signing
//! key; see [`chipgate_runtime::auth::TokenSource`]) and the caller's request id, trace and remaining
//! deadline. UNAVAILABLE (a peer restarting,
//! a connection dropping) is retried a bounded number of times with jittered exponential backoff, never
//! past the deadline; every other error is returned at once, because retrying it can't help.

use std::future::Future;
use std::time::Duration;

use chipgate_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use chipgate_proto::licensing::v1::licensing_service_client::LicensingServiceClient;
use chipgate_runtime::RequestContext;
use chipgate_runtime::auth::{AuthChannel, TokenSource, with_token};
use chipgate_runtime::server::TlsConfig;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// Attempts per call (the first plus retries).
const ATTEMPTS: u32 = 4;

/// Deadline of calls made for background work (no caller deadline to inherit).
const BACKGROUND_TIMEOUT: Duration = Duration::from_secs(30);

/// Clients of the services orders depends on.
#[derive(Clone)]
pub struct Peers {
    /// Licensing.
    pub licensing: LicensingServiceClient<AuthChannel>,
    /// Inventory.
    pub inventory: InventoryServiceClient<AuthChannel>,
}

fn channel(url: &str, tls: Option<&TlsConfig>) -> Result<Channel, String> {
    let mut endpoint = Endpoint::from_shared(url.to_string()).map_err(|e| format!("bad url {url:?}: {e}"))?;
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls.client()).map_err(|e| format!("TLS for {url:?}: {e}"))?;
    }
    Ok(endpoint
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .connect_lazy())
}

impl Peers {
    /// Lazily-connecting clients (the peers may start after orders does) whose calls carry `tokens`,
    /// over mTLS when `tls` is given (then the URLs are `https://`).
    ///
    /// # Errors
    /// When a URL is malformed.
    pub fn connect(
        licensing_url: &str,
        inventory_url: &str,
        max_message_bytes: usize,
        tokens: TokenSource,
        tls: Option<&TlsConfig>,
    ) -> Result<Self, String> {
        Ok(Peers {
            licensing: LicensingServiceClient::new(with_token(channel(licensing_url, tls)?, tokens.clone()))
                .max_decoding_message_size(max_message_bytes)
                .max_encoding_message_size(max_message_bytes),
            inventory: InventoryServiceClient::new(with_token(channel(inventory_url, tls)?, tokens))
                .max_decoding_message_size(max_message_bytes)
                .max_encoding_message_size(max_message_bytes),
        })
    }
}

/// A request for `msg` on behalf of `ctx` (background work gets its own deadline).
pub fn request<T>(ctx: &RequestContext, msg: T) -> tonic::Request<T> {
    let mut req = ctx.outgoing(msg);
    if ctx.deadline.is_none() {
        req.set_timeout(BACKGROUND_TIMEOUT);
    }
    req
}

/// Runs `call` (which builds and sends one request), retrying UNAVAILABLE as described above.
///
/// # Errors
/// The peer's status, or UNAVAILABLE/DEADLINE_EXCEEDED once retries or time run out.
pub async fn call<T, F, Fut>(ctx: &RequestContext, what: &str, mut call: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, Status>>,
{
    let mut backoff = Duration::from_millis(25);
    for attempt in 1..=ATTEMPTS {
        match call().await {
            Ok(r) => return Ok(r.into_inner()),
            Err(s) if s.code() == Code::Unavailable && attempt < ATTEMPTS => {
                let pause = backoff / 2 + Duration::from_micros(fastrand::u64(0..=backoff.as_micros() as u64 / 2));
                if ctx.remaining().is_some_and(|left| left <= pause) {
                    return Err(s);
                }
                tracing::debug!(what, attempt, error = %s.message(), ?pause, "peer unavailable; retrying");
                tokio::time::sleep(pause).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            // tonic's client enforces the deadline it sends, and reports running out of it as
            // CANCELLED ("Timeout expired"): to our caller it is a deadline that passed.
            Err(s) if s.code() == Code::Cancelled && ctx.expired() => {
                return Err(Status::deadline_exceeded(format!("{what}: the deadline passed before the peer answered")));
            }
            Err(s) => return Err(s),
        }
    }
    Err(Status::unavailable(format!("{what}: no answer after {ATTEMPTS} attempts")))
}

/// Calls `$method` of a peer client with `$msg` on behalf of `$ctx`, through [`call`] (each attempt
/// clones the client, which is cheap: it shares one HTTP/2 connection).
macro_rules! rpc {
    ($ctx:expr, $client:expr, $method:ident, $msg:expr) => {{
        let msg = $msg;
        let client = $client.clone();
        $crate::clients::call($ctx, stringify!($method), || {
            let mut c = client.clone();
            let req = $crate::clients::request($ctx, msg.clone());
            async move { c.$method(req).await }
        })
        .await
    }};
}
pub(crate) use rpc;

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn answers(codes: &'static [Code]) -> (AtomicU32, impl Fn(u32) -> Result<tonic::Response<u32>, Status>) {
        (AtomicU32::new(0), move |n: u32| match codes.get(n as usize) {
            Some(c) => Err(Status::new(*c, "peer says no")),
            None => Ok(tonic::Response::new(n)),
        })
    }

    #[tokio::test]
    async fn unavailable_is_retried_until_an_answer() {
        let (n, answer) = answers(&[Code::Unavailable, Code::Unavailable]);
        let ctx = RequestContext::background("test", None);
        let got = call(&ctx, "peer", || {
            let k = n.fetch_add(1, Ordering::SeqCst);
            std::future::ready(answer(k))
        })
        .await;
        assert_eq!(got.expect("third attempt answers"), 2);
        assert_eq!(n.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn other_codes_are_never_retried() {
        for code in [Code::Internal, Code::DeadlineExceeded, Code::ResourceExhausted, Code::FailedPrecondition] {
            let codes: &'static [Code] = Box::leak(Box::new([code]));
            let (n, answer) = answers(codes);
            let ctx = RequestContext::background("test", None);
            let got = call(&ctx, "peer", || std::future::ready(answer(n.fetch_add(1, Ordering::SeqCst)))).await;
            assert_eq!(got.expect_err("refused").code(), code);
            assert_eq!(n.load(Ordering::SeqCst), 1, "{code:?} must not be retried");
        }
    }

    #[tokio::test]
    async fn a_peer_call_cut_off_by_the_deadline_is_deadline_exceeded_not_cancelled() {
        // What tonic's channel answers when the deadline it sent passes first.
        let timed_out = || std::future::ready(Err::<tonic::Response<u32>, _>(Status::cancelled("Timeout expired")));
        let mut ctx = RequestContext::background("test", None);
        ctx.deadline = Some(tokio::time::Instant::now());
        let got = call(&ctx, "peer", timed_out).await;
        assert_eq!(got.expect_err("deadline").code(), Code::DeadlineExceeded);
        // A peer's own CANCELLED, with time left, is passed on as it is.
        ctx.deadline = Some(tokio::time::Instant::now() + Duration::from_secs(60));
        let got = call(&ctx, "peer", timed_out).await;
        assert_eq!(got.expect_err("cancelled").code(), Code::Cancelled);
    }

    #[tokio::test]
    async fn attempts_are_bounded_and_backoff_grows() {
        let (n, answer) = answers(&[Code::Unavailable; 16]);
        let ctx = RequestContext::background("test", None);
        let began = std::time::Instant::now();
        let got = call(&ctx, "peer", || std::future::ready(answer(n.fetch_add(1, Ordering::SeqCst)))).await;
        assert_eq!(got.expect_err("gives up").code(), Code::Unavailable);
        assert_eq!(n.load(Ordering::SeqCst), ATTEMPTS);
        // Pauses of at least 12.5 + 25 + 50 ms (half of each doubling backoff, plus jitter).
        assert!(began.elapsed() >= Duration::from_millis(87), "{:?}", began.elapsed());
    }

    /// Every peer call orders makes, read from its code: `(service path prefix, Method)` for each
    /// `rpc!(ctx, <client>, <method>, <message>)` in `src/`.
    fn peer_calls_in_the_code() -> std::collections::BTreeSet<String> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut found = std::collections::BTreeSet::new();
        let mut files: Vec<_> =
            std::fs::read_dir(&dir).expect("src").filter_map(Result::ok).map(|e| e.path()).collect();
        files.sort();
        for file in files.iter().filter(|p| p.extension().is_some_and(|x| x == "rs")) {
            let text = std::fs::read_to_string(file).expect("source file");
            // The code, without its tests (which may name clients in other ways).
            let text = text.split("#[cfg(test)]").next().unwrap_or_default();
            let code: String =
                text.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n");
            // A call that bypasses `rpc!` would escape this test (and the retry policy).
            for client in ["peers.licensing", "peers.inventory"] {
                for (at, _) in code.match_indices(client) {
                    let next = code[at + client.len()..].trim_start().chars().next();
                    assert!(
                        matches!(next, Some(',' | ')')),
                        "{}: {client} used other than as an rpc! argument",
                        file.display()
                    );
                }
            }
            for (at, _) in code.match_indices("rpc!(") {
                if code[..at].ends_with("macro_rules! ") {
                    continue;
                }
                // The macro's arguments, split at top-level commas.
                let (mut depth, mut args, mut cur) = (0i32, Vec::new(), String::new());
                for ch in code[at + 5..].chars() {
                    match ch {
                        '(' | '{' | '[' => depth += 1,
                        ')' | '}' | ']' if depth == 0 => break,
                        ')' | '}' | ']' => depth -= 1,
                        ',' if depth == 0 => {
                            args.push(std::mem::take(&mut cur));
                            continue;
                        }
                        _ => {}
                    }
                    cur.push(ch);
                }
                args.push(cur);
                if args.len() < 4 || args[0].trim() == "$ctx:expr" {
                    continue; // the macro's own definition
                }
                let service = if args[1].contains("licensing") {
                    "/chipgate.licensing.v1.LicensingService/"
                } else if args[1].contains("inventory") {
                    "/chipgate.inventory.v1.InventoryService/"
                } else {
                    panic!("{}: rpc! on an unknown client {:?}", file.display(), args[1].trim());
                };
                let method: String = args[2]
                    .trim()
                    .split('_')
                    .map(|w| {
                        let mut c = w.chars();
                        c.next().map(|f| f.to_ascii_uppercase().to_string() + c.as_str()).unwrap_or_default()
                    })
                    .collect();
                found.insert(format!("{service}{method}"));
            }
        }
        found
    }

    /// The `service` role (the token orders sends its peers) is admitted to exactly the RPCs orders
    /// calls: a missing grant stalls propagation in the authenticated configuration (as a missing
    /// ListExportAuthorizations grant once did), and an extra one widens what a leaked token reads.
    #[test]
    fn the_service_role_is_granted_exactly_the_calls_orders_makes() {
        use chipgate_runtime::auth::Role;
        use chipgate_runtime::policy::{Decision, TABLE, decide};
        let called = peer_calls_in_the_code();
        assert!(called.len() >= 6, "found too few calls to trust the scan: {called:?}");
        let admitted: std::collections::BTreeSet<String> = TABLE
            .iter()
            .map(|(svc, method, _)| format!("{svc}{method}"))
            .filter(|path| decide(path, Role::Service) == Decision::Allow)
            .collect();
        let missing: Vec<&String> = called.difference(&admitted).collect();
        let extra: Vec<&String> = admitted.difference(&called).collect();
        assert!(missing.is_empty(), "orders calls these, but the policy refuses them to `service`: {missing:?}");
        assert!(extra.is_empty(), "the policy admits `service` to these, which orders never calls: {extra:?}");
    }

    #[tokio::test]
    async fn retries_stop_before_the_deadline() {
        let (n, answer) = answers(&[Code::Unavailable; 16]);
        let mut ctx = RequestContext::background("test", None);
        ctx.deadline = Some(tokio::time::Instant::now() + Duration::from_millis(40));
        let began = std::time::Instant::now();
        let got = call(&ctx, "peer", || std::future::ready(answer(n.fetch_add(1, Ordering::SeqCst)))).await;
        assert_eq!(got.expect_err("gives up").code(), Code::Unavailable);
        assert!(n.load(Ordering::SeqCst) < ATTEMPTS, "no time for every attempt");
        // No pause that would end past the deadline is started (20 ms of slack for a loaded machine's
        // timers; without the check every attempt would run, ≥ 87 ms).
        assert!(began.elapsed() < Duration::from_millis(60), "never waits past the deadline: {:?}", began.elapsed());
    }
}
