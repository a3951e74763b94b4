//! Who is calling, and may they: authentication, the [`policy`](crate::policy) table, the buyer a
//! request names, and the account its request id belongs to.
//!
//! With authentication on, a call (but health and reflection) must carry a bearer token the
//! [`Verifier`] accepts (UNAUTHENTICATED otherwise) and the table must admit its role
//! (PERMISSION_DENIED otherwise); the [`Principal`](crate::auth::Principal) goes into the
//! [`RequestContext`]. A token seen before costs no signature check; a new one does, and each peer
//! address has a budget of failed ones (a token bucket): once it is used up, calls from that
//! address with a token not seen before are refused RESOURCE_EXHAUSTED with RetryInfo *before* any
//! signature check, so a stream of forged tokens costs a hash each, not an Ed25519 verification.
//!
//! For RPCs whose rule names a buyer field, the buyer is read straight out of the request message
//! (the body is read once, within the call's deadline, and handed on unchanged): a buyer's token
//! must name that very buyer. A buyer asking by id for something that isn't there is refused exactly
//! like for another buyer's (NOT_FOUND becomes PERMISSION_DENIED), so ids can't be probed.
//!
//! **Accounts.** Request ids belong to an account ([`crate::idempotency::ACCOUNT`]), the same way with
//! and without authentication wherever the call shows one: a call whose rule names a buyer field is
//! that buyer's (read from the request, in both modes); any other call of a buyer's token is its
//! buyer's; everything else — the authorities, customs, the vendor, the services' own calls, and
//! without authentication every call that names no buyer — shares one account.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::Status;
use tower::{Layer, Service};

use super::{BoxFuture, Counters, Req, Resp, answer, header_status, is_open, peer_key, refuse};
use crate::auth::{AuthError, Principal, Role, Verifier};
use crate::context::RequestContext;
use crate::policy::{self, BuyerAccess, Decision};
use crate::ratelimit::RateLimiter;

/// The metrics reason of a refusal by the failed-authentication budget.
pub const BUDGET_REASON: &str = "AUTH_FAILURE_BUDGET";

/// What the identity layer needs; clones share the budget.
#[derive(Clone)]
pub struct IdentityConfig {
    verifier: Option<Arc<Verifier>>,
    failures: Option<Arc<RateLimiter>>,
    max_message_bytes: usize,
    counters: Counters,
}

impl IdentityConfig {
    /// Authentication with `verifier` (None: off, every caller trusted); request bodies read for a
    /// buyer field are at most `max_message_bytes`. Failed authentications are budgeted at 1 a
    /// second after a burst of 20 per peer address.
    pub fn new(verifier: Option<Arc<Verifier>>, max_message_bytes: usize, counters: Counters) -> Self {
        IdentityConfig { verifier, failures: None, max_message_bytes, counters }.with_failure_budget(1.0, 20)
    }

    /// The same with another verifier and message limit.
    #[must_use]
    pub fn with_verifier(mut self, verifier: Option<Arc<Verifier>>, max_message_bytes: usize) -> Self {
        self.verifier = verifier;
        self.max_message_bytes = max_message_bytes;
        self
    }

    /// The same with another failed-authentication budget (`per_second` 0: none).
    #[must_use]
    pub fn with_failure_budget(mut self, per_second: f64, burst: u32) -> Self {
        self.failures = (per_second > 0.0).then(|| Arc::new(RateLimiter::new(per_second, burst)));
        self
    }

    /// The same reporting to `counters`.
    #[must_use]
    pub fn with_counters(mut self, counters: Counters) -> Self {
        self.counters = counters;
        self
    }

    /// The principal of `req`'s bearer token, spending the peer's budget on a token not seen before.
    fn authenticate(&self, verifier: &Verifier, req: &Req) -> Result<Principal, Status> {
        let refused = |e: AuthError| {
            tracing::info!(reason = %e, "unauthenticated call refused");
            let status = e.into_status();
            self.counters.auth_refused(reason_of(&status));
            status
        };
        let token = crate::auth::bearer(req.headers()).map_err(refused)?;
        if let Some(known) = verifier.remembered(token) {
            return known.map_err(refused);
        }
        // A token not seen before: take from the peer's budget first (given back if it verifies),
        // so however many forged tokens arrive, at most the budget's worth are ever checked.
        let peer = peer_key(req);
        if let (Some(budget), Some(peer)) = (&self.failures, &peer)
            && let Err(wait) = budget.take(peer)
        {
            tracing::debug!(%peer, ?wait, "failed-authentication budget used up; refused unchecked");
            self.counters.auth_refused(BUDGET_REASON);
            return Err(crate::ratelimit::too_many_failed_authentications(wait));
        }
        self.counters.signature_checked();
        let principal = verifier.verify_fresh(token).map_err(refused)?;
        if let (Some(budget), Some(peer)) = (&self.failures, &peer) {
            budget.give_back(peer);
        }
        Ok(principal)
    }
}

/// The ErrorInfo reason of an UNAUTHENTICATED status (a fixed set, for a metric label).
fn reason_of(status: &Status) -> &'static str {
    use tonic_types::StatusExt;
    match status.get_error_details().error_info().map(|i| i.reason.as_str()) {
        Some("TOKEN_MISSING") => "TOKEN_MISSING",
        Some("TOKEN_EXPIRED") => "TOKEN_EXPIRED",
        Some("TOKEN_NOT_YET_VALID") => "TOKEN_NOT_YET_VALID",
        _ => "TOKEN_INVALID",
    }
}

/// Builds [`Identity`].
#[derive(Clone)]
pub struct IdentityLayer {
    config: IdentityConfig,
}

impl IdentityLayer {
    /// With `config`.
    pub fn new(config: IdentityConfig) -> Self {
        IdentityLayer { config }
    }
}

impl<S> Layer<S> for IdentityLayer {
    type Service = Identity<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Identity { inner, config: self.config.clone() }
    }
}

/// See the [module docs](self).
#[derive(Clone)]
pub struct Identity<S> {
    inner: S,
    config: IdentityConfig,
}

/// What to do with the buyer field of a request.
enum FieldCheck {
    /// It must name this buyer (a buyer's token).
    Enforce(String),
    /// Read it for the account, refuse nothing.
    Observe,
}

impl<S> Service<Req> for Identity<S>
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

    fn call(&mut self, mut req: Req) -> Self::Future {
        let path = req.uri().path().to_string();
        if is_open(&path) {
            return Box::pin(self.inner.call(req));
        }
        let field = match policy::rule(&path).map(|r| r.buyer) {
            Some(BuyerAccess::Field(n)) => Some(n),
            _ => None,
        };
        let mut check = field.map(|n| (n, FieldCheck::Observe));
        let mut account = None;
        // A buyer asking for a resource by id gets the same refusal whether it belongs to another
        // buyer or doesn't exist, so ids can't be probed for existence.
        let mut hide_absence = false;
        if let Some(verifier) = &self.config.verifier {
            let principal = match self.config.authenticate(verifier, &req) {
                Ok(p) => p,
                Err(status) => return refuse(status),
            };
            match policy::decide(&path, principal.role) {
                Decision::Deny => {
                    tracing::info!(subject = %principal.subject, role = %principal.role, "call refused by the policy table");
                    return refuse(crate::auth::permission_denied());
                }
                Decision::AllowOwned => hide_absence = true,
                Decision::CheckField(n) => {
                    check = Some((n, FieldCheck::Enforce(principal.buyer_id.clone().unwrap_or_default())));
                }
                Decision::Allow => {}
            }
            if principal.role == Role::Buyer {
                account = principal.buyer_id.as_deref().map(buyer_account);
            }
            if let Some(ctx) = req.extensions_mut().get_mut::<RequestContext>() {
                ctx.authenticated(principal);
            }
        }
        let deadline = req.extensions().get::<RequestContext>().and_then(|c| c.deadline);
        let max = self.config.max_message_bytes;
        // Take the service that was polled ready and leave a fresh clone in its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let req = match check {
                None => req,
                Some((field, check)) => match within(deadline, read_buyer(req, field, check, max)).await {
                    Ok((req, named)) => {
                        if let Some(b) = named {
                            account = Some(buyer_account(&b));
                        }
                        req
                    }
                    Err(status) => return Ok(answer(status)),
                },
            };
            let resp = crate::idempotency::ACCOUNT.scope(account, inner.call(req)).await?;
            if hide_absence && header_status(&resp) == Some("5") {
                tracing::info!("refused: no such resource of this buyer");
                return Ok(answer(crate::auth::permission_denied()));
            }
            Ok(resp)
        })
    }
}

/// The account of buyer `id` (spelled like a buyer token's default subject).
fn buyer_account(id: &str) -> String {
    format!("buyer:{id}")
}

/// `fut`, or DEADLINE_EXCEEDED once `deadline` passes (a client that never finishes sending must not
/// hold the call forever).
async fn within<T>(
    deadline: Option<tokio::time::Instant>,
    fut: impl Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d, fut)
            .await
            .unwrap_or_else(|_| Err(Status::deadline_exceeded("deadline exceeded while reading the request"))),
        None => fut.await,
    }
}

/// Reads the (single-message) request body and returns the request with it unchanged, and the
/// buyer named in its top-level string field `field` (None when absent or unreadable). With
/// [`FieldCheck::Enforce`] the call is refused unless that is the given buyer.
async fn read_buyer(
    req: Req,
    field: u32,
    check: FieldCheck,
    max_message_bytes: usize,
) -> Result<(Req, Option<String>), Status> {
    use http_body_util::BodyExt;
    let (parts, body) = req.into_parts();
    // The limit is on the message; the body also carries the 5-byte gRPC frame header.
    let limited = http_body_util::Limited::new(body, max_message_bytes.saturating_add(5));
    let bytes = match limited.collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            // What tonic answers for an oversized message when it decodes one itself, so a call is
            // refused the same way whether or not the edge had to read it first.
            tracing::info!(max_message_bytes, "request naming a buyer larger than the message limit");
            return Err(Status::resource_exhausted(format!(
                "request message larger than the limit of {max_message_bytes} bytes"
            )));
        }
        Err(e) => {
            tracing::info!(error = %e, "request body unreadable");
            return Err(crate::errors::invalid_argument("request", "unreadable request body"));
        }
    };
    let named = policy::single_frame(&bytes).and_then(|msg| policy::string_field(msg, field));
    let rebuilt = || http::Request::from_parts(parts, tonic::body::Body::new(http_body_util::Full::new(bytes.clone())));
    match check {
        // Whatever it says, the handler decodes it and answers for itself.
        FieldCheck::Observe => Ok((rebuilt(), named.filter(|b| !b.is_empty()))),
        FieldCheck::Enforce(buyer) => match named {
            Some(b) if b == buyer => Ok((rebuilt(), Some(b))),
            Some(_) => {
                tracing::info!(field, "refused: a buyer acting on another buyer's id");
                Err(crate::auth::permission_denied())
            }
            None => Err(crate::errors::invalid_argument(
                "request",
                "a buyer's request must be one uncompressed, well-formed message",
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::testing::*;
    use super::*;
    use tonic_types::StatusExt;
    use tower::ServiceExt;

    const PLACE: &str = "/chipgate.orders.v1.OrderService/PlaceOrder";
    const CANCEL: &str = "/chipgate.orders.v1.OrderService/CancelOrder";
    const QUEUE: &str = "/chipgate.licensing.v1.LicensingService/ListQueue";

    /// A handler answering OK with the account it ran under (header `account`), or `status`.
    fn accounting(
        status: Option<Status>,
    ) -> impl Service<Req, Response = Resp, Error = std::convert::Infallible, Future = impl Send> + Clone + Send + 'static
    {
        tower::service_fn(move |_req: Req| {
            let status = status.clone();
            async move {
                let account = crate::idempotency::ACCOUNT.try_with(Clone::clone).ok().flatten();
                let mut resp = match status {
                    Some(s) => answer(s),
                    None => http::Response::new(tonic::body::Body::empty()),
                };
                if let Some(a) = account {
                    resp.headers_mut().insert("account", a.parse().expect("header"));
                }
                Ok::<_, std::convert::Infallible>(resp)
            }
        })
    }

    fn with_token(mut req: Req, token: &str) -> Req {
        req.headers_mut().insert("authorization", format!("Bearer {token}").parse().expect("header"));
        let ctx = RequestContext::from_headers(req.headers(), "/t", None);
        req.extensions_mut().insert(ctx);
        req
    }

    fn from_peer(mut req: Req, ip: &str) -> Req {
        req.extensions_mut().insert(tonic::transport::server::TcpConnectInfo {
            local_addr: None,
            remote_addr: Some(format!("{ip}:1000").parse().expect("addr")),
        });
        req
    }

    fn account(resp: &Resp) -> Option<&str> {
        resp.headers().get("account").and_then(|v| v.to_str().ok())
    }

    fn place(buyer: &str) -> Vec<u8> {
        let mut m = Vec::new();
        prost::encoding::string::encode(1, &"rid-1".to_string(), &mut m);
        prost::encoding::string::encode(2, &buyer.to_string(), &mut m);
        m
    }

    fn authed(signer: &crate::auth::Signer) -> IdentityConfig {
        IdentityConfig::new(Some(Arc::new(signer.verifier())), 1024, Counters::default())
    }

    #[tokio::test]
    async fn tokens_and_the_table_decide() {
        let s = crate::auth::Signer::generate().expect("key");
        let svc = IdentityLayer::new(authed(&s)).layer(accounting(None));
        let ttl = Duration::from_secs(60);
        let resp = svc.clone().oneshot(request(QUEUE)).await.expect("answer");
        assert_eq!(status_of(&resp).as_deref(), Some("16"), "no token: UNAUTHENTICATED");
        let resp =
            svc.clone().oneshot(with_token(request(QUEUE), &s.mint_role(Role::Vendor, ttl))).await.expect("answer");
        assert_eq!(status_of(&resp).as_deref(), Some("7"), "the table does not admit the vendor");
        let resp =
            svc.clone().oneshot(with_token(request(QUEUE), &s.mint_role(Role::Auditor, ttl))).await.expect("answer");
        assert_eq!(status_of(&resp), None, "the auditor reads the queue");
        assert_eq!(account(&resp), None, "an authority's calls share one account");
        let health = svc.clone().oneshot(request("/grpc.health.v1.Health/Check")).await.expect("answer");
        assert_eq!(status_of(&health), None, "health is open");
    }

    #[tokio::test]
    async fn a_buyer_must_name_itself_and_can_not_probe_for_ids() {
        let s = crate::auth::Signer::generate().expect("key");
        let ttl = Duration::from_secs(60);
        let alpha = s.mint_buyer("alpha", ttl);
        let svc = IdentityLayer::new(authed(&s)).layer(accounting(None));
        let resp = svc.clone().oneshot(with_token(framed(PLACE, &place("alpha")), &alpha)).await.expect("answer");
        assert_eq!((status_of(&resp), account(&resp)), (None, Some("buyer:alpha")));
        let resp = svc.clone().oneshot(with_token(framed(PLACE, &place("beta")), &alpha)).await.expect("answer");
        assert_eq!(status_of(&resp).as_deref(), Some("7"), "another buyer's id");
        let resp = svc.clone().oneshot(with_token(framed(PLACE, &[0x12, 0x40, b'a']), &alpha)).await.expect("answer");
        let bad = status(&resp).expect("a status");
        assert_eq!(bad.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            bad.get_error_details().bad_request().map(|b| b.field_violations[0].field.clone()).as_deref(),
            Some("request")
        );
        // By id: a missing resource looks like another buyer's.
        let missing = IdentityLayer::new(authed(&s)).layer(accounting(Some(Status::not_found("no ord-9"))));
        let resp = missing.clone().oneshot(with_token(request(CANCEL), &alpha)).await.expect("answer");
        let refusal = status(&resp).expect("a status");
        assert_eq!((refusal.code(), refusal.message()), (tonic::Code::PermissionDenied, "permission denied"));
        let ia = s.mint_role(Role::Vendor, ttl);
        let resp = missing
            .oneshot(with_token(request("/chipgate.orders.v1.OrderService/GetOrder"), &ia))
            .await
            .expect("answer");
        assert_eq!(status_of(&resp).as_deref(), Some("5"), "roles that see everything learn what doesn't exist");
    }

    /// Request ids belong to the same account with and without authentication wherever the call
    /// shows one.
    #[tokio::test]
    async fn accounts_are_the_same_in_both_modes() {
        let s = crate::auth::Signer::generate().expect("key");
        let ttl = Duration::from_secs(60);
        let on = IdentityLayer::new(authed(&s)).layer(accounting(None));
        let off = IdentityLayer::new(IdentityConfig::new(None, 1024, Counters::default())).layer(accounting(None));
        // A buyer's PlaceOrder: its buyer, in both modes, whatever subject its token has.
        let other_subject = s.mint("alpha-ci", Role::Buyer, Some("alpha"), ttl);
        let by_token =
            on.clone().oneshot(with_token(framed(PLACE, &place("alpha")), &other_subject)).await.expect("answer");
        let by_request = off.clone().oneshot(framed(PLACE, &place("alpha"))).await.expect("answer");
        assert_eq!((account(&by_token), account(&by_request)), (Some("buyer:alpha"), Some("buyer:alpha")));
        // An authority's call: the shared account in both modes.
        let ia = s.mint_role(Role::ImportAuthority, ttl);
        let on_ia = on.clone().oneshot(with_token(request(QUEUE), &ia)).await.expect("answer");
        let off_ia = off.clone().oneshot(request(QUEUE)).await.expect("answer");
        assert_eq!((account(&on_ia), account(&off_ia)), (None, None));
        // A malformed body without authentication: passed on for the handler to refuse, no account.
        let odd = off.oneshot(framed(PLACE, &[0x12, 0x40, b'a'])).await.expect("answer");
        assert_eq!((status_of(&odd), account(&odd)), (None, None));
    }

    #[tokio::test]
    async fn a_peer_that_keeps_failing_is_refused_before_any_signature_check() {
        let s = crate::auth::Signer::generate().expect("key");
        let forger = crate::auth::Signer::generate().expect("key");
        let verifier = Arc::new(s.verifier());
        let ttl = Duration::from_secs(60);
        let good = s.mint_role(Role::Auditor, ttl);
        let config = IdentityConfig::new(Some(verifier.clone()), 1024, Counters::default()).with_failure_budget(0.5, 5);
        let svc = IdentityLayer::new(config).layer(accounting(None));
        // Verified once while the budget is whole: remembered from then on.
        let resp =
            svc.clone().oneshot(from_peer(with_token(request(QUEUE), &good), "192.0.2.1")).await.expect("answer");
        assert_eq!(status_of(&resp), None);
        let mut codes = Vec::new();
        for i in 0..200 {
            let forged = forger.mint(&format!("x{i}"), Role::Auditor, None, ttl);
            let resp =
                svc.clone().oneshot(from_peer(with_token(request(QUEUE), &forged), "192.0.2.1")).await.expect("answer");
            codes.push(status(&resp).expect("refused"));
        }
        assert!(verifier.signature_checks() <= 1 + 5 + 1, "checks: {}", verifier.signature_checks());
        assert!(codes[..5].iter().all(|s| s.code() == tonic::Code::Unauthenticated));
        let over = codes.last().expect("refusals");
        assert_eq!(over.code(), tonic::Code::ResourceExhausted);
        assert!(over.get_error_details().retry_info().and_then(|r| r.retry_delay).is_some(), "{over:?}");
        // The remembered good token still works from there; another address has its own budget.
        let resp =
            svc.clone().oneshot(from_peer(with_token(request(QUEUE), &good), "192.0.2.1")).await.expect("answer");
        assert_eq!(status_of(&resp), None);
        let fresh = s.mint("auditor-2", Role::Auditor, None, ttl);
        let resp =
            svc.clone().oneshot(from_peer(with_token(request(QUEUE), &fresh), "198.51.100.1")).await.expect("answer");
        assert_eq!(status_of(&resp), None);
    }
}
