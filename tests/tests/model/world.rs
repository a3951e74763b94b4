//! The parties and what they share: each party is a real client with its own token (a buyer's token
//! names its buyer id; the authorities, customs and the vendor hold their role), talking to licensing,
//! inventory and every orders replica over its own channels.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chipgate_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use chipgate_proto::licensing::v1::licensing_service_client::LicensingServiceClient;
use chipgate_proto::orders::v1::order_service_client::OrderServiceClient;
use chipgate_runtime::auth::{AuthChannel, Role, Signer};
use tonic::Status;

use crate::calls::{Mode, SharedStats, call};
use crate::model::Model;

/// The export-controlled products the parties trade.
pub const PRODUCTS: [&str; 3] = ["H200-SXM-141GB", "H200-NVL-141GB", "H20-96GB"];
/// Importing countries: most licences are for CN, some for HK (export authorisations are per
/// destination).
pub const DESTINATIONS: [&str; 2] = ["CN", "HK"];
/// The buyers.
pub const BUYERS: [&str; 6] = ["bytedance", "alibaba", "tencent", "baidu", "moonshot", "zhipu"];

/// How long the parties' tokens live (longer than any soak).
const TOKEN_TTL: Duration = Duration::from_secs(48 * 3600);

/// Where the services listen.
#[derive(Clone, Debug)]
pub struct Urls {
    pub licensing: String,
    pub inventory: String,
    pub orders: Vec<String>,
}

/// One party's clients.
#[derive(Clone)]
pub struct Party {
    /// Its token's subject (the audit log's actor).
    pub subject: String,
    pub lic: LicensingServiceClient<AuthChannel>,
    pub inv: InventoryServiceClient<AuthChannel>,
    ord: Vec<OrderServiceClient<AuthChannel>>,
}

impl Party {
    fn new(urls: &Urls, subject: String, token: &str) -> Self {
        let authed = |u: &str| chipgate_testkit::Cluster::authed(u, token);
        Party {
            subject,
            lic: LicensingServiceClient::new(authed(&urls.licensing)),
            inv: InventoryServiceClient::new(authed(&urls.inventory)),
            ord: urls.orders.iter().map(|u| OrderServiceClient::new(authed(u))).collect(),
        }
    }

    /// A role's party.
    pub fn role(urls: &Urls, signer: &Signer, role: Role) -> Self {
        Party::new(urls, role.as_str().to_string(), &signer.mint_role(role, TOKEN_TTL))
    }

    /// A buyer's party.
    pub fn buyer(urls: &Urls, signer: &Signer, buyer: &str) -> Self {
        Party::new(urls, format!("buyer:{buyer}"), &signer.mint_buyer(buyer, TOKEN_TTL))
    }

    /// An orders client; `attempt` picks the replica (a resend goes to the next one).
    pub fn ord(&self, attempt: usize) -> OrderServiceClient<AuthChannel> {
        self.ord[attempt % self.ord.len()].clone()
    }
}

/// What every actor shares.
#[derive(Clone)]
pub struct Ctx {
    pub model: Arc<Mutex<Model>>,
    pub stats: SharedStats,
    /// Problems with calls themselves (server faults, replays that differ, unresolved calls).
    pub faults: Arc<Mutex<Vec<String>>>,
    pub stop: Arc<AtomicBool>,
    pub seed: u64,
    pub urls: Urls,
    pub signer: Signer,
}

static IDS: AtomicU64 = AtomicU64::new(0);

impl Ctx {
    /// A fresh request id (unique in the run; the seed in it ties logs to the run).
    pub fn rid(&self, tag: &str) -> String {
        format!("{tag}-{:x}-{}", self.seed & 0xffff_ffff, IDS.fetch_add(1, Ordering::Relaxed))
    }

    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Sends a call (see [`call`]).
    pub async fn call<T, F, Fut, K>(&self, kind: &str, mode: Mode, send: F, same: K) -> Result<T, Status>
    where
        F: Fn(usize) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
        K: Fn(&T, &T) -> bool,
    {
        call(&self.stats, &self.faults, kind, mode, send, same).await
    }

    /// Reports a violation found while the run goes on.
    pub fn violation(&self, v: impl Into<String>) {
        self.model.lock().unwrap().violation(v);
    }
}

/// Builds the closure [`Ctx::call`] sends for an RPC on a licensing or inventory client: the request
/// (with its `request_id` in the header too) is cloned into each attempt.
#[macro_export]
macro_rules! send {
    ($client:expr, $method:ident, $msg:expr) => {{
        let client = $client.clone();
        let msg = $msg.clone();
        move |_attempt: usize| {
            let mut c = client.clone();
            let m = msg.clone();
            async move { c.$method($crate::calls::req(&m.request_id.clone(), m)).await }
        }
    }};
}

/// Like [`send!`] for an orders RPC: each attempt goes to the replica `attempt` picks.
#[macro_export]
macro_rules! send_ord {
    ($party:expr, $method:ident, $msg:expr) => {{
        let party = $party.clone();
        let msg = $msg.clone();
        move |attempt: usize| {
            let mut c = party.ord(attempt);
            let m = msg.clone();
            async move { c.$method($crate::calls::req(&m.request_id.clone(), m)).await }
        }
    }};
}

impl Ctx {
    /// Checks a definite answer against what the model allows: acknowledged (`ok`) or refused with one
    /// of `codes`. Returns whether it was allowed.
    pub fn expect<T>(&self, kind: &str, what: &str, r: &Result<T, Status>, ok: bool, codes: &[tonic::Code]) -> bool {
        let allowed = match r {
            Ok(_) => ok,
            // A call that never got a definite answer is already reported as a fault.
            Err(s) if s.code() == tonic::Code::DeadlineExceeded && s.message().starts_with("unresolved") => true,
            Err(s) => codes.contains(&s.code()),
        };
        if !allowed {
            let want = match (ok, codes.is_empty()) {
                (true, true) => "OK".to_string(),
                (true, false) => format!("OK or {codes:?}"),
                (false, _) => format!("{codes:?}"),
            };
            let got = match r {
                Ok(_) => "OK".to_string(),
                Err(s) => format!("{:?} ({})", s.code(), s.message()),
            };
            self.violation(format!("{kind} {what}: answered {got}, the model expected {want}"));
        }
        allowed
    }
}
