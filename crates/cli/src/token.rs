//! `chipgate token`: mints a bearer token from a signing key, so that an operator can hand a role to
//! a person or a workload (e.g. the `service` token Secret of the orders Deployment) without any
//! other tool. Only whoever holds the private key can do this; the services only hold public keys.

use std::time::Duration;

use chipgate_runtime::auth::Role;
use clap::Args;

use crate::client::{Failure, Global, Outcome};

/// Options of `chipgate token`.
#[derive(Args, Debug, Clone)]
pub struct TokenArgs {
    /// Role: import_authority, export_authority, customs, vendor, buyer, service or auditor.
    #[arg(long)]
    pub role: String,
    /// The buyer (buyer tokens only).
    #[arg(long)]
    pub buyer: Option<String>,
    /// Subject recorded in the audit log (default: the role, or buyer:<id>).
    #[arg(long)]
    pub subject: Option<String>,
    /// Lifetime, e.g. 1h, 30m, 720h.
    #[arg(long, value_parser = chipgate_runtime::time::parse_duration, default_value = "1h")]
    pub ttl: Duration,
}

/// Prints the token on stdout, signed with `--signing-key` (a PEM Ed25519 private key, PKCS#8, e.g.
/// from `openssl genpkey -algorithm ed25519`; by default the dev cluster's).
pub fn run(g: &Global, a: &TokenArgs) -> Outcome {
    let role = Role::parse(&a.role).ok_or_else(|| Failure::Input(format!("--role {:?} is not a role", a.role)))?;
    let signer = g.signer()?.ok_or_else(|| {
        Failure::Usage("--signing-key is required (no `chipgate dev` key in its default place either)".into())
    })?;
    let buyer = match (role, a.buyer.as_deref()) {
        (Role::Buyer, Some(b)) if !b.is_empty() => Some(b),
        (Role::Buyer, _) => return Err(Failure::Input("a buyer token needs --buyer".into())),
        (_, Some(_)) => return Err(Failure::Input("--buyer is only for --role buyer".into())),
        (_, None) => None,
    };
    let subject = a.subject.clone().unwrap_or_else(|| match buyer {
        Some(b) => format!("buyer:{b}"),
        None => role.as_str().to_string(),
    });
    crate::out::say(&signer.mint(&subject, role, buyer, a.ttl));
    Ok(())
}
