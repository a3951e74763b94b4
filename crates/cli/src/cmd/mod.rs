//! The client commands, one module per resource, and what they share: paging, printing listings,
//! watching streams.

pub mod allocation;
pub mod applications;
pub mod archive;
pub mod audit;
pub mod customs;
pub mod domestic;
pub mod export;
pub mod inventory;
pub mod licenses;
pub mod orders;
pub mod waves;

use std::future::Future;
use std::time::Duration;

use clap::Args;

use crate::client::{Ctx, Failure, Outcome, Svc};
use crate::{out, view};

/// Parses an RFC 3339 instant (a flag value).
pub fn parse_time(s: &str) -> Result<prost_types::Timestamp, String> {
    s.parse().map_err(|_| format!("{s:?} is not an RFC 3339 instant (e.g. 2026-02-01T00:00:00Z)"))
}

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

/// Prints a command's answer: with `-o json` the response message itself (see [`view::msg`]),
/// otherwise what `people` prints.
pub fn show<M: prost::Message>(ctx: &Ctx, response: &M, people: impl FnOnce()) {
    if ctx.json() {
        out::json(&view::msg(response));
    } else {
        people();
    }
}

/// Prints a fetched listing: with `-o json` the RPC's response message made of every page fetched
/// (`response(items, next_page_token)`); otherwise the table (or `empty` when there is nothing) and a
/// hint when there is more.
pub fn print_listing<T, M: prost::Message>(
    ctx: &Ctx,
    (items, next): (Vec<T>, String),
    response: impl FnOnce(Vec<T>, String) -> M,
    table: impl FnOnce(&[T]) -> out::Table,
    empty: &str,
) {
    if ctx.json() {
        out::json(&view::msg(&response(items, next)));
    } else {
        table(&items).print_or(empty);
        more_hint(&next);
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
            Err(s) => return Err(ctx.fail::<T>(svc, None, s)),
        }
    }
}
