//! Talking to a running cluster: endpoints, per-call settings (deadline, caller, request id), and
//! failures with the server's rich error details and a distinct exit code per kind of failure.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chipgate_runtime::auth::{Role, Signer};

use chipgate_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use chipgate_proto::licensing::v1::licensing_service_client::LicensingServiceClient;
use chipgate_proto::orders::v1::order_service_client::OrderServiceClient;
use clap::{Args, ValueEnum};
use serde_json::{Value, json};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::out;

/// How results are shown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned tables and label/value blocks, for people.
    #[default]
    Table,
    /// One JSON document per command (JSON lines for watch and follow), for scripts.
    Json,
}

/// Options every client command takes (also from the environment).
#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Licensing service (applications, queue, waves, licences, export, customs, audit).
    #[arg(
        long,
        global = true,
        help_heading = "Cluster and output (every command)",
        env = "CHIPGATE_LICENSING_URL",
        default_value = "http://127.0.0.1:50051"
    )]
    pub licensing: String,
    /// Inventory service (catalogue, stock, supply).
    #[arg(
        long,
        global = true,
        help_heading = "Cluster and output (every command)",
        env = "CHIPGATE_INVENTORY_URL",
        default_value = "http://127.0.0.1:50052"
    )]
    pub inventory: String,
    /// Orders service (orders, backlogs, wave propagation).
    #[arg(
        long,
        global = true,
        help_heading = "Cluster and output (every command)",
        env = "CHIPGATE_ORDERS_URL",
        default_value = "http://127.0.0.1:50053"
    )]
    pub orders: String,
    /// Output format: `table` for people, `json` for scripts.
    #[arg(long, short = 'o', global = true, help_heading = "Cluster and output (every command)", env = "CHIPGATE_OUTPUT", value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Deadline of each call, e.g. 10s, 500ms, 2m.
    #[arg(long, global = true, help_heading = "Cluster and output (every command)", env = "CHIPGATE_TIMEOUT", value_parser = parse_duration, default_value = "10s")]
    pub timeout: Duration,
    /// Idempotency key of the change this command makes. Give the same one to retry a change safely
    /// (the cluster answers with the first outcome and changes nothing more). Generated when absent;
    /// commands that make many changes use it as a prefix.
    #[arg(long, global = true, help_heading = "Cluster and output (every command)")]
    pub request_id: Option<String>,
    /// Who you are, recorded in the audit log with every decision.
    #[arg(
        long,
        global = true,
        help_heading = "Cluster and output (every command)",
        env = "CHIPGATE_ACTOR",
        default_value = "chipgate-cli"
    )]
    pub actor: String,
    /// Bearer token to call with (`chipgate dev` prints one per role). Sent as `authorization: Bearer`.
    #[arg(
        long,
        global = true,
        help_heading = "Cluster and output (every command)",
        env = "CHIPGATE_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    pub token: Option<String>,
    /// File holding the bearer token to call with (`chipgate dev` writes them under its --auth-dir).
    #[arg(long, global = true, help_heading = "Cluster and output (every command)", env = "CHIPGATE_TOKEN_FILE")]
    pub token_file: Option<std::path::PathBuf>,
    /// Call as this role (import_authority, export_authority, customs, vendor, auditor, service) or
    /// buyer (`buyer:bytedance`), with a short-lived token minted from the cluster's signing key
    /// (--signing-key; by default the one a running `chipgate dev` keeps). For dev clusters.
    #[arg(
        long = "as",
        global = true,
        help_heading = "Cluster and output (every command)",
        env = "CHIPGATE_AS",
        value_name = "ROLE[:BUYER]",
        conflicts_with_all = ["token", "token_file"]
    )]
    pub act_as: Option<String>,
    /// The cluster's token signing key (PEM Ed25519), for --as, `chipgate demo` and `chipgate token`.
    /// Default for --as and the demo: the one `chipgate dev` keeps under its default --auth-dir.
    #[arg(long, global = true, help_heading = "Cluster and output (every command)", env = "CHIPGATE_SIGNING_KEY")]
    pub signing_key: Option<std::path::PathBuf>,
}

impl Global {
    /// The signing key to mint with: the one given, or the dev cluster's default (None when neither
    /// is there). A key that was named but can't be read is an error.
    pub fn signer(&self) -> Result<Option<Signer>, Failure> {
        let (path, explicit) = match &self.signing_key {
            Some(p) => (p.clone(), true),
            None => (crate::devauth::default_auth_dir().join("signing.pem"), false),
        };
        if !explicit && !path.exists() {
            return Ok(None);
        }
        Signer::from_file(&path).map(Some).map_err(|e| Failure::Input(format!("--signing-key {}: {e}", path.display())))
    }

    /// The token `--as ROLE[:BUYER]` stands for, minted from [`Global::signer`].
    fn token_as(&self, who: &str) -> Result<String, Failure> {
        let (role, buyer) = match who.split_once(':') {
            Some((r, b)) => (r, Some(b)),
            None => (who, None),
        };
        let role = Role::parse(role).ok_or_else(|| {
            Failure::Usage(format!(
                "--as {who:?}: {role:?} is not a role (import_authority, export_authority, customs, vendor, \
                 buyer:<id>, service, auditor)"
            ))
        })?;
        let signer = self.signer()?.ok_or_else(|| {
            Failure::Usage(format!(
                "--as mints a token from the cluster's signing key, and there is none at {}: start `chipgate dev` \
                 (it keeps one there) or give --signing-key / CHIPGATE_SIGNING_KEY (or call with --token)",
                crate::devauth::default_auth_dir().join("signing.pem").display()
            ))
        })?;
        match (role, buyer) {
            (Role::Buyer, Some(b)) if !b.is_empty() => Ok(signer.mint_buyer(b, Minter::TTL)),
            (Role::Buyer, _) => Err(Failure::Usage("--as buyer needs the buyer: --as buyer:bytedance".into())),
            (_, Some(_)) => Err(Failure::Usage(format!("--as {who:?}: only buyer takes a :<buyer id>"))),
            (r, None) => Ok(signer.mint_role(r, Minter::TTL)),
        }
    }
}

/// Parses "10s", "500ms", "2m", "1h" or a bare number of seconds ("1.5").
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let v: f64 = num.trim().parse().map_err(|_| format!("{s:?} is not a duration (try 10s, 500ms, 2m)"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("{s:?} is not a duration (try 10s, 500ms, 2m)"));
    }
    let secs = match unit {
        "ms" => v / 1000.0,
        "s" => v,
        "m" => v * 60.0,
        "h" => v * 3600.0,
        _ => return Err(format!("unknown unit {unit:?} in {s:?} (use ms, s, m or h)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// Which service a call went to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Svc {
    /// Licensing.
    Licensing,
    /// Inventory.
    Inventory,
    /// Orders.
    Orders,
}

impl Svc {
    fn name(self) -> &'static str {
        match self {
            Svc::Licensing => "licensing",
            Svc::Inventory => "inventory",
            Svc::Orders => "orders",
        }
    }
}

/// Why a command failed, and so its exit code.
#[derive(Debug)]
pub enum Failure {
    /// A call was refused or failed.
    Rpc {
        /// The service's answer.
        status: Box<Status>,
        /// Which service.
        svc: Svc,
        /// The RPC's path (`/chipgate.licensing.v1.LicensingService/ListQueue`).
        rpc: String,
        /// Its endpoint.
        endpoint: String,
        /// The request id of the change, when the call made one (to retry safely).
        request_id: Option<String>,
    },
    /// Bad input from the user (a file, a flag value).
    Input(String),
    /// The command line can't work as given (exit 2, like clap's own usage errors).
    Usage(String),
    /// A check the command makes did not pass (a broken audit chain, a wave that did not settle in
    /// time, rows of an import that failed).
    Check(String),
    /// Anything else on this side.
    Local(String),
}

/// A command's result.
pub type Outcome = Result<(), Failure>;

/// Exit codes, one per kind of failure (documented in `chipgate --help`).
pub mod exit {
    /// Everything went as asked.
    pub const OK: u8 = 0;
    /// A failure on this side (can't start, can't read a file...).
    pub const LOCAL: u8 = 1;
    /// The command line can't work as given (also clap's own usage errors).
    pub const USAGE: u8 = 2;
    /// Bad input: INVALID_ARGUMENT or OUT_OF_RANGE, or a malformed file or flag.
    pub const INVALID: u8 = 3;
    /// NOT_FOUND.
    pub const NOT_FOUND: u8 = 4;
    /// ALREADY_EXISTS or ABORTED (a conflict).
    pub const CONFLICT: u8 = 5;
    /// FAILED_PRECONDITION (a rule said no; the details say which).
    pub const PRECONDITION: u8 = 6;
    /// RESOURCE_EXHAUSTED (quota, stock or the cluster's capacity).
    pub const EXHAUSTED: u8 = 7;
    /// PERMISSION_DENIED or UNAUTHENTICATED.
    pub const DENIED: u8 = 8;
    /// UNAVAILABLE, DEADLINE_EXCEEDED or CANCELLED: retry with the same --request-id.
    pub const UNAVAILABLE: u8 = 9;
    /// INTERNAL, UNKNOWN, DATA_LOSS or UNIMPLEMENTED: a fault in the cluster.
    pub const SERVER: u8 = 10;
    /// A check failed (audit chain broken, wave not settled in time, import rows failed).
    pub const CHECK: u8 = 11;
}

/// The protocol name of a gRPC code ("FAILED_PRECONDITION").
pub fn code_name(c: Code) -> &'static str {
    match c {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The exit code of a gRPC code.
pub fn exit_of(c: Code) -> u8 {
    match c {
        Code::Ok => exit::OK,
        Code::InvalidArgument | Code::OutOfRange => exit::INVALID,
        Code::NotFound => exit::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => exit::CONFLICT,
        Code::FailedPrecondition => exit::PRECONDITION,
        Code::ResourceExhausted => exit::EXHAUSTED,
        Code::PermissionDenied | Code::Unauthenticated => exit::DENIED,
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => exit::UNAVAILABLE,
        Code::Internal | Code::Unknown | Code::DataLoss | Code::Unimplemented => exit::SERVER,
    }
}

/// True when retrying the same call (same request id) may succeed.
pub fn retryable(c: Code) -> bool {
    matches!(c, Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Aborted)
}

impl Failure {
    /// The process exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Rpc { status, .. } => exit_of(status.code()),
            Failure::Input(_) => exit::INVALID,
            Failure::Usage(_) => exit::USAGE,
            Failure::Check(_) => exit::CHECK,
            Failure::Local(_) => exit::LOCAL,
        }
    }

    /// The failure as JSON: `{"error": {"code", "message", "service", "request_id", "details"}}`.
    pub fn to_json(&self) -> Value {
        match self {
            Failure::Rpc { status, svc, rpc, endpoint, request_id } => {
                let mut doc = json!({"error": {
                    "code": code_name(status.code()),
                    "message": status.message(),
                    "service": svc.name(),
                    "rpc": rpc,
                    "endpoint": endpoint,
                    "request_id": request_id,
                    "retryable": retryable(status.code()),
                    "details": details_json(status),
                }});
                if let Some(callers) = allowed_callers(status.code(), rpc) {
                    doc["error"]["allowed_callers"] = json!(callers);
                }
                doc
            }
            Failure::Input(m) => json!({"error": {"code": "INPUT", "message": m}}),
            Failure::Usage(m) => json!({"error": {"code": "USAGE", "message": m}}),
            Failure::Check(m) => json!({"error": {"code": "CHECK_FAILED", "message": m}}),
            Failure::Local(m) => json!({"error": {"code": "LOCAL", "message": m}}),
        }
    }

    /// Prints the failure on stderr, for people or (in JSON mode) for scripts.
    pub fn report(&self, output: Output) {
        if output == Output::Json {
            out::json_err(&self.to_json());
            return;
        }
        match self {
            Failure::Rpc { status, svc, rpc, endpoint, request_id } => {
                out::note(&format!("chipgate: {}: {}", code_name(status.code()), status.message()));
                for l in details_lines(status) {
                    out::note(&format!("  {l}"));
                }
                if let Some(callers) = allowed_callers(status.code(), rpc) {
                    let method = rpc.rsplit('/').next().unwrap_or(rpc);
                    let example = callers.first().map_or(String::new(), |c| {
                        let c = if c.starts_with("buyer") { "buyer:<id>" } else { c.as_str() };
                        format!(" (on a dev cluster: chipgate --as {c} …)")
                    });
                    out::note(&format!(
                        "  {method} admits: {}; call with such a token: --token / --token-file / --as{example}",
                        callers.join(", ")
                    ));
                }
                if matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded) {
                    out::note(&format!(
                        "  the {} service at {endpoint} did not answer in time or can't be reached; is a cluster running? (`chipgate dev` starts one; --{} or CHIPGATE_{}_URL point elsewhere)",
                        svc.name(),
                        svc.name(),
                        svc.name().to_uppercase()
                    ));
                }
                if let Some(id) = request_id {
                    if retryable(status.code()) {
                        out::note(&format!("  retry safely with --request-id {id}"));
                    } else {
                        out::note(&format!("  request id: {id}"));
                    }
                }
            }
            Failure::Input(m) => out::note(&format!("chipgate: bad input: {m}")),
            Failure::Usage(m) => out::note(&format!("chipgate: {m}")),
            Failure::Check(m) => out::note(&format!("chipgate: check failed: {m}")),
            Failure::Local(m) => out::note(&format!("chipgate: {m}")),
        }
    }
}

/// Who may call `rpc`, from the services' own policy table, when a call was refused for want of
/// the right token (UNAUTHENTICATED or PERMISSION_DENIED); None otherwise.
pub fn allowed_callers(code: Code, rpc: &str) -> Option<Vec<String>> {
    use chipgate_runtime::policy::BuyerAccess;
    if !matches!(code, Code::Unauthenticated | Code::PermissionDenied) {
        return None;
    }
    let rule = chipgate_runtime::policy::rule(rpc)?;
    let mut callers: Vec<String> = rule.roles.iter().map(|r| r.as_str().to_string()).collect();
    match rule.buyer {
        BuyerAccess::Denied => {}
        BuyerAccess::Open => callers.push("buyer (any)".into()),
        BuyerAccess::Field(_) => callers.push("buyer (for its own buyer id)".into()),
        BuyerAccess::Owner(_) => callers.push("buyer (its own only)".into()),
    }
    Some(callers)
}

/// The path of the RPC that answers with `T` (a response message, or a stream of them): buf's lint
/// makes every response `<Method>Response`, so the type names the method.
fn rpc_path<T>(svc: Svc) -> String {
    let name = std::any::type_name::<T>().trim_end_matches('>');
    let message = name.rsplit("::").next().unwrap_or(name);
    let method = message.strip_suffix("Response").unwrap_or(message);
    let service = match svc {
        Svc::Licensing => chipgate_licensing::SERVICE_NAME,
        Svc::Inventory => chipgate_inventory::SERVICE_NAME,
        Svc::Orders => chipgate_orders::SERVICE_NAME,
    };
    format!("/{service}/{method}")
}

/// The rich error details of a status as JSON (absent kinds are left out).
pub fn details_json(status: &Status) -> Value {
    let d = status.get_error_details();
    let mut m = serde_json::Map::new();
    if let Some(b) = d.bad_request() {
        m.insert(
            "bad_request".into(),
            b.field_violations.iter().map(|v| json!({"field": v.field, "description": v.description})).collect(),
        );
    }
    if let Some(p) = d.precondition_failure() {
        m.insert(
            "precondition_failure".into(),
            p.violations
                .iter()
                .map(|v| json!({"type": v.r#type, "subject": v.subject, "description": v.description}))
                .collect(),
        );
    }
    if let Some(q) = d.quota_failure() {
        m.insert(
            "quota_failure".into(),
            q.violations.iter().map(|v| json!({"subject": v.subject, "description": v.description})).collect(),
        );
    }
    if let Some(r) = d.resource_info() {
        m.insert(
            "resource_info".into(),
            json!({"resource_type": r.resource_type, "resource_name": r.resource_name, "owner": r.owner, "description": r.description}),
        );
    }
    if let Some(e) = d.error_info() {
        let mut meta: Vec<(&String, &String)> = e.metadata.iter().collect();
        meta.sort();
        let meta: serde_json::Map<String, Value> = meta.into_iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        m.insert("error_info".into(), json!({"reason": e.reason, "domain": e.domain, "metadata": meta}));
    }
    if let Some(r) = d.retry_info() {
        m.insert("retry_delay_ms".into(), json!(r.retry_delay.map(|d| d.as_millis() as u64)));
    }
    if let Some(h) = d.help() {
        m.insert("help".into(), h.links.iter().map(|l| json!({"description": l.description, "url": l.url})).collect());
    }
    Value::Object(m)
}

/// The rich error details of a status, one line each, for people.
pub fn details_lines(status: &Status) -> Vec<String> {
    let d = status.get_error_details();
    let mut lines = Vec::new();
    if let Some(b) = d.bad_request() {
        for v in &b.field_violations {
            lines.push(format!("invalid {}: {}", v.field, v.description));
        }
    }
    if let Some(p) = d.precondition_failure() {
        for v in &p.violations {
            let subject = if v.subject.is_empty() { String::new() } else { format!(" ({})", v.subject) };
            lines.push(format!("failed condition {}{subject}: {}", v.r#type, v.description));
        }
    }
    if let Some(q) = d.quota_failure() {
        for v in &q.violations {
            lines.push(format!("quota short on {}: {}", v.subject, v.description));
        }
    }
    if let Some(r) = d.resource_info() {
        let desc = if r.description.is_empty() { String::new() } else { format!(": {}", r.description) };
        lines.push(format!("resource {} {:?}{desc}", r.resource_type, r.resource_name));
    }
    if let Some(e) = d.error_info() {
        let mut meta: Vec<String> = e.metadata.iter().map(|(k, v)| format!("{k}={v}")).collect();
        meta.sort();
        let meta = if meta.is_empty() { String::new() } else { format!(" [{}]", meta.join(", ")) };
        lines.push(format!("reason {} ({}){meta}", e.reason, e.domain));
    }
    if let Some(r) = d.retry_info()
        && let Some(delay) = r.retry_delay
    {
        lines.push(format!("retry after {:.1}s", delay.as_secs_f64()));
    }
    lines
}

/// A random request id, e.g. "cli-3f9a0c1d2e4b5a69".
pub fn random_id(prefix: &str) -> String {
    let mut s = String::with_capacity(prefix.len() + 17);
    s.push_str(prefix);
    s.push('-');
    for _ in 0..8 {
        s.push_str(&format!("{:02x}", fastrand::u8(..)));
    }
    s
}

/// Largest answer accepted (a page of 1000 orders with their histories is large).
const MAX_MESSAGE: usize = 64 << 20;

/// Who a call is made as, when a context plays several roles (the demo).
#[derive(Clone, Copy, Debug)]
pub enum As<'a> {
    /// A non-buyer role.
    Role(Role),
    /// This buyer.
    Buyer(&'a str),
}

/// Keeps one token per identity: minted from a signing key when one is at hand, or handed in
/// (`order import --buyer-tokens`).
struct Minter {
    signer: Option<Signer>,
    tokens: Mutex<HashMap<String, String>>,
}

impl Minter {
    /// Long enough for any demo; short enough that a leaked one soon expires.
    pub(crate) const TTL: Duration = Duration::from_secs(3600);

    fn token(&self, who: As<'_>) -> String {
        let key = match who {
            As::Role(r) => r.as_str().to_string(),
            As::Buyer(b) => format!("buyer:{b}"),
        };
        // Without a key only the tokens handed in exist (the caller checked there is one for each).
        let mint = || match (&self.signer, who) {
            (Some(s), As::Role(r)) => s.mint_role(r, Self::TTL),
            (Some(s), As::Buyer(b)) => s.mint_buyer(b, Self::TTL),
            (None, _) => String::new(),
        };
        match self.tokens.lock() {
            Ok(mut m) => m.entry(key).or_insert_with(mint).clone(),
            Err(_) => mint(),
        }
    }
}

/// A connection to a cluster and the settings of this invocation.
#[derive(Clone)]
pub struct Ctx {
    /// The global options.
    pub g: Global,
    /// The bearer token sent with every call (from --token or --token-file).
    token: Option<String>,
    /// With a signing key (the demo, playing every role): tokens minted per identity for
    /// [`Ctx::req_as`].
    minter: Option<Arc<Minter>>,
    lic: Channel,
    inv: Channel,
    ord: Channel,
}

fn channel(name: &str, url: &str) -> Result<Channel, Failure> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(Failure::Usage(format!(
            "--{name} {url:?} has no scheme: use http://{url} (or https:// with TLS)",
            url = url.trim_start_matches("//")
        )));
    }
    let ep = Endpoint::from_shared(url.to_string())
        .map_err(|e| Failure::Input(format!("--{name} {url:?} is not a URL: {e}")))?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true);
    Ok(ep.connect_lazy())
}

impl Ctx {
    /// Lazily-connected channels to the three services.
    pub fn new(g: Global) -> Result<Self, Failure> {
        let lic = channel("licensing", &g.licensing)?;
        let inv = channel("inventory", &g.inventory)?;
        let ord = channel("orders", &g.orders)?;
        let token = match (&g.act_as, &g.token, &g.token_file) {
            (Some(who), _, _) => Some(g.token_as(who)?),
            (None, Some(t), _) => Some(t.trim().to_string()),
            (None, None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| Failure::Input(format!("--token-file {}: {e}", path.display())))?
                    .trim()
                    .to_string(),
            ),
            (None, None, None) => None,
        };
        Ok(Ctx { g, token, minter: None, lic, inv, ord })
    }

    /// This context, acting from now on as whoever [`Ctx::req_as`] names, with tokens minted from
    /// `signer` (short-lived, one per identity, reused).
    pub fn with_signer(mut self, signer: Signer) -> Self {
        self.minter = Some(Arc::new(Minter { signer: Some(signer), tokens: Mutex::new(HashMap::new()) }));
        self
    }

    /// This context, calling as each buyer of `tokens` (buyer id → its token) for [`Ctx::req_as`].
    pub fn with_buyer_tokens(mut self, tokens: impl IntoIterator<Item = (String, String)>) -> Self {
        let tokens = tokens.into_iter().map(|(buyer, token)| (format!("buyer:{buyer}"), token)).collect();
        self.minter = Some(Arc::new(Minter { signer: None, tokens: Mutex::new(tokens) }));
        self
    }

    /// True when the output is JSON.
    pub fn json(&self) -> bool {
        self.g.output == Output::Json
    }

    /// A licensing client.
    pub fn lic(&self) -> LicensingServiceClient<Channel> {
        LicensingServiceClient::new(self.lic.clone()).max_decoding_message_size(MAX_MESSAGE)
    }

    /// An inventory client.
    pub fn inv(&self) -> InventoryServiceClient<Channel> {
        InventoryServiceClient::new(self.inv.clone()).max_decoding_message_size(MAX_MESSAGE)
    }

    /// An orders client.
    pub fn ord(&self) -> OrderServiceClient<Channel> {
        OrderServiceClient::new(self.ord.clone()).max_decoding_message_size(MAX_MESSAGE)
    }

    /// The request id of this command's change (`--request-id`, or a fresh one).
    pub fn rid(&self) -> String {
        self.g.request_id.clone().unwrap_or_else(|| random_id("cli"))
    }

    /// A prefix for the many request ids of a command that makes many changes.
    pub fn rid_prefix(&self, tag: &str) -> String {
        self.g.request_id.clone().unwrap_or_else(|| random_id(tag))
    }

    /// A unary request with the caller and the deadline set.
    pub fn req<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(self.g.timeout);
        self.stamp(&mut r);
        r
    }

    /// A unary request made as `who`: with a token minted for it when this context has a signing key
    /// (see [`Ctx::with_signer`]), with this invocation's own token otherwise.
    pub fn req_as<T>(&self, who: As<'_>, msg: T) -> tonic::Request<T> {
        let mut r = self.req(msg);
        if let Some(m) = &self.minter
            && let Ok(v) = format!("Bearer {}", m.token(who)).parse()
        {
            r.metadata_mut().insert(chipgate_runtime::auth::AUTHORIZATION_HEADER, v);
        }
        r
    }

    /// This context with `who`'s minted token as its own (for helpers that make their calls with
    /// [`Ctx::req`]); unchanged without a signing key.
    pub fn acting(&self, who: As<'_>) -> Ctx {
        let mut c = self.clone();
        if let Some(m) = &self.minter {
            c.token = Some(m.token(who));
        }
        c
    }

    /// A streaming request (no deadline) with the caller set.
    pub fn stream_req<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        self.stamp(&mut r);
        r
    }

    fn stamp<T>(&self, r: &mut tonic::Request<T>) {
        if let Ok(v) = self.g.actor.parse() {
            r.metadata_mut().insert(chipgate_runtime::context::ACTOR_HEADER, v);
        }
        if let Some(token) = &self.token
            && let Ok(v) = format!("Bearer {token}").parse()
        {
            r.metadata_mut().insert(chipgate_runtime::auth::AUTHORIZATION_HEADER, v);
        }
    }

    fn endpoint(&self, svc: Svc) -> &str {
        match svc {
            Svc::Licensing => &self.g.licensing,
            Svc::Inventory => &self.g.inventory,
            Svc::Orders => &self.g.orders,
        }
    }

    /// Awaits a call, turning a refusal into a [`Failure`] that names the service and request id.
    pub async fn call<T>(
        &self,
        svc: Svc,
        request_id: Option<&str>,
        fut: impl Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T, Failure> {
        match fut.await {
            Ok(r) => Ok(r.into_inner()),
            Err(status) => Err(self.fail::<T>(svc, request_id, status)),
        }
    }

    /// A failure of a call to `svc` whose answer is a `T` (which names the RPC).
    pub fn fail<T>(&self, svc: Svc, request_id: Option<&str>, status: Status) -> Failure {
        Failure::Rpc {
            status: Box::new(status),
            svc,
            rpc: rpc_path::<T>(svc),
            endpoint: self.endpoint(svc).to_string(),
            request_id: request_id.map(str::to_string),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn responses_name_their_rpc_and_the_policy_table_names_its_callers() {
        use chipgate_proto::licensing::v1 as lpb;
        use chipgate_proto::orders::v1 as opb;
        let path = rpc_path::<lpb::ListQueueResponse>(Svc::Licensing);
        assert_eq!(path, "/chipgate.licensing.v1.LicensingService/ListQueue");
        assert_eq!(
            rpc_path::<tonic::Streaming<opb::WatchOrdersResponse>>(Svc::Orders),
            "/chipgate.orders.v1.OrderService/WatchOrders"
        );
        assert_eq!(
            allowed_callers(Code::Unauthenticated, &path),
            Some(vec!["import_authority".to_string(), "auditor".to_string()])
        );
        let place = rpc_path::<opb::PlaceOrderResponse>(Svc::Orders);
        assert_eq!(allowed_callers(Code::PermissionDenied, &place), Some(vec!["buyer (for its own buyer id)".into()]));
        assert_eq!(allowed_callers(Code::NotFound, &path), None);
    }

    #[test]
    fn every_code_class_has_its_exit_code() {
        assert_eq!(exit_of(Code::InvalidArgument), exit::INVALID);
        assert_eq!(exit_of(Code::NotFound), exit::NOT_FOUND);
        assert_eq!(exit_of(Code::FailedPrecondition), exit::PRECONDITION);
        assert_eq!(exit_of(Code::ResourceExhausted), exit::EXHAUSTED);
        assert_eq!(exit_of(Code::Unavailable), exit::UNAVAILABLE);
        assert_eq!(exit_of(Code::Internal), exit::SERVER);
    }
}
