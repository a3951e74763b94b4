//! The client commands, one module per service, and what they share: paging and watching streams.

pub mod inventory;
pub mod licensing;
pub mod orders;

use std::future::Future;
use std::time::Duration;

use clap::Args;
use serde_json::{Value, json};

use crate::client::{Ctx, Failure, Outcome, Svc};
use crate::out;

/// How much of a list to fetch.
#[derive(Args, Debug, Clone)]
pub struct ListArgs {
    /// At most this many (0: everything, fetched page by page).
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
    /// Continue where an earlier listing stopped (its next_page_token).
    #[arg(long, default_value = "")]
    pub page_token: String,
}

impl Default for ListArgs {
    fn default() -> Self {
        ListArgs { limit: 100, page_token: String::new() }
    }
}

/// Tells people how to get the rest of a listing (nothing when there is no more).
pub fn more_hint(next: &str) {
    if !next.is_empty() {
        out::note(&format!("(more: --page-token {next}, or --limit 0 for everything)"));
    }
}

/// Prints a fetched listing: `{key: [each item as JSON], "next_page_token": next}` with `-o json`;
/// otherwise the table (or `empty` when there is nothing) and a hint when there is more.
pub fn print_listing<T>(
    ctx: &Ctx,
    key: &str,
    items: &[T],
    as_json: impl Fn(&T) -> Value,
    table: impl FnOnce(&[T]) -> out::Table,
    empty: &str,
    next: &str,
) {
    if ctx.json() {
        out::json(&json!({ key: items.iter().map(as_json).collect::<Vec<_>>(), "next_page_token": next }));
    } else {
        table(items).print_or(empty);
        more_hint(next);
    }
}

/// Largest page the services serve.
const MAX_PAGE: usize = 1000;

/// Fetches pages until `list.limit` items (or all of them) are in; returns them and the token to
/// continue from (empty when there is nothing more).
pub async fn pages<T, F, Fut>(list: &ListArgs, mut fetch: F) -> Result<(Vec<T>, String), Failure>
where
    F: FnMut(i32, String) -> Fut,
    Fut: Future<Output = Result<(Vec<T>, String), Failure>>,
{
    let mut items = Vec::new();
    let mut token = list.page_token.clone();
    loop {
        let want = if list.limit == 0 { MAX_PAGE } else { (list.limit - items.len()).min(MAX_PAGE) };
        let (got, next) = fetch(want as i32, token).await?;
        let empty = got.is_empty();
        items.extend(got);
        if next.is_empty() || empty || (list.limit != 0 && items.len() >= list.limit) {
            return Ok((items, next));
        }
        token = next;
    }
}

/// Reads a server stream, handing each message to `each` (which returns false to stop), until
/// `count` messages, `duration`, or the end of the stream.
pub async fn watch_until<T>(
    ctx: &Ctx,
    svc: Svc,
    mut stream: tonic::Streaming<T>,
    count: Option<u64>,
    duration: Option<Duration>,
    mut each: impl FnMut(T) -> bool,
) -> Outcome {
    if count == Some(0) {
        return Ok(());
    }
    let deadline = duration.map(|d| tokio::time::Instant::now() + d);
    let mut seen = 0;
    loop {
        let next = match deadline {
            Some(d) => match tokio::time::timeout_at(d, stream.message()).await {
                Ok(r) => r,
                Err(_) => return Ok(()),
            },
            None => stream.message().await,
        };
        match next {
            Ok(Some(m)) => {
                seen += 1;
                if !each(m) || count.is_some_and(|c| seen >= c) {
                    return Ok(());
                }
            }
            Ok(None) => {
                out::note("the stream ended (is the service shutting down?)");
                return Ok(());
            }
            Err(s) => return Err(ctx.fail(svc, None, s)),
        }
    }
}
