//! A client channel that acts as whichever party an RPC needs, with that party's own token.
//!
//! The suites run the services the way an operator does — authentication on, every call checked
//! against the policy table — but most scenarios play several parties at once (the import authority
//! publishes a wave, a buyer places an order, the vendor ships it). [`Parties`] keeps those scenarios
//! readable: for each call it looks the RPC up in the policy table
//! ([`chipgate_runtime::policy::rule`]) and sends a token for a role the table admits, minted from the
//! cluster's signing key:
//! * an RPC open to some non-buyer role goes as the first role the table lists for it;
//! * a buyer's RPC that names the buyer in a field (PlaceOrder, SubmitApplication) goes as that buyer,
//!   read from the request itself;
//! * a buyer's RPC on a resource by id (CancelOrder, ConfirmOrder, WithdrawApplication) goes as the
//!   resource's owner, asked of the service with an auditor's token (an unknown id goes as a buyer
//!   that owns nothing, so it is refused exactly as a stranger's call would be).
//!
//! The services see ordinary signed tokens; nothing in them knows about this. With authentication off
//! the channel sends no token at all. Suites that are about who may call what make their own clients
//! with explicit tokens ([`crate::Cluster::authed`]).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use chipgate_proto::licensing::v1 as lpb;
use chipgate_proto::licensing::v1::licensing_service_client::LicensingServiceClient;
use chipgate_proto::orders::v1 as opb;
use chipgate_proto::orders::v1::order_service_client::OrderServiceClient;
use chipgate_runtime::auth::{Role, Signer, TokenSource, with_token};
use chipgate_runtime::policy::{self, BuyerAccess};
use http_body_util::BodyExt;
use tonic::body::Body;
use tonic::transport::Channel;
use tower::{Service, ServiceExt};

/// The error type of the channel (what tonic's generated clients accept).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long minted tokens live (a test never runs that long).
const TTL: Duration = Duration::from_secs(4 * 3600);

/// A channel whose every call carries the token of a party the policy table admits for it.
#[derive(Clone)]
pub struct Parties {
    channel: Channel,
    signer: Option<Signer>,
}

impl Parties {
    /// Calls over `channel` with tokens minted by `signer` (None: authentication is off, no token).
    pub fn new(channel: Channel, signer: Option<Signer>) -> Self {
        Parties { channel, signer }
    }
}

/// The token for calling `path` with the request message `msg`.
async fn token_for(channel: &Channel, signer: &Signer, path: &str, msg: &[u8]) -> Option<String> {
    let rule = policy::rule(path)?;
    if let Some(role) = rule.roles.first() {
        return Some(signer.mint_role(*role, TTL));
    }
    let buyer = match rule.buyer {
        BuyerAccess::Field(n) => policy::string_field(msg, n).unwrap_or_default(),
        BuyerAccess::Owner(n) => {
            let id = policy::string_field(msg, n).unwrap_or_default();
            owner_of(channel, signer, path, &id).await.unwrap_or_else(|| "nobody-owns-this".to_string())
        }
        BuyerAccess::Denied | BuyerAccess::Open => return None,
    };
    Some(signer.mint_buyer(&buyer, TTL))
}

/// The buyer owning the order or application `id` named in a call to `path`, asked as the auditor.
async fn owner_of(channel: &Channel, signer: &Signer, path: &str, id: &str) -> Option<String> {
    let auditor = TokenSource::Static(signer.mint_role(Role::Auditor, TTL));
    if path.starts_with("/chipgate.orders.v1.") {
        let mut c = OrderServiceClient::new(with_token(channel.clone(), auditor));
        let o = c.get_order(opb::GetOrderRequest { order_id: id.to_string() }).await.ok()?.into_inner();
        o.order.map(|o| o.buyer_id)
    } else if path.starts_with("/chipgate.licensing.v1.") && path.ends_with("Application") {
        let mut c = LicensingServiceClient::new(with_token(channel.clone(), auditor));
        let a = c.get_application(lpb::GetApplicationRequest { application_id: id.to_string() }).await.ok()?;
        a.into_inner().application.map(|a| a.buyer_id)
    } else {
        None
    }
}

impl Service<http::Request<Body>> for Parties {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Service::poll_ready(&mut self.channel, cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        // The channel polled ready is the one that must take the call; a fresh clone is left behind.
        let clone = self.channel.clone();
        let mut channel = std::mem::replace(&mut self.channel, clone);
        let Some(signer) = self.signer.clone() else {
            return Box::pin(async move { channel.call(req).await.map_err(Into::into) });
        };
        Box::pin(async move {
            let (mut parts, body) = req.into_parts();
            // Unary and server-streaming requests carry one message: read it to see whom it is for.
            let bytes = body.collect().await.map_err(|e| -> BoxError { Box::new(e) })?.to_bytes();
            let msg = policy::single_frame(&bytes).unwrap_or_default();
            let lookup = channel.clone().ready_oneshot().await.map_err(|e| -> BoxError { Box::new(e) })?;
            if let Some(token) = token_for(&lookup, &signer, parts.uri.path(), msg).await {
                let value =
                    http::HeaderValue::try_from(format!("Bearer {token}")).map_err(|e| -> BoxError { Box::new(e) })?;
                parts.headers.insert(http::header::AUTHORIZATION, value);
            }
            let req = http::Request::from_parts(parts, Body::new(http_body_util::Full::new(bytes)));
            channel.call(req).await.map_err(Into::into)
        })
    }
}
