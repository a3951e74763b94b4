//! Fuzzes each service's request validation: the first byte picks an RPC of licensing, inventory
//! or orders, the rest is decoded as its request message and handed to the real handler (on the
//! in-memory state backend). Whatever the bytes, the handler must answer with a status, never panic.
//! Streaming RPCs are left out (they validate like the unary ones and then wait for events).

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../common/requests.rs"]
mod common;

use common::{call, world};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, bytes)) = data.split_first() else {
        return;
    };
    let w = world();
    let _ = w.rt.block_on(call(w, sel, bytes));
});
