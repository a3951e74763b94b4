//! chipgate's domain rules, in plain Rust with no I/O: what a licence allows and when, which conditions
//! an order fails and whether it could ever pass them, how stock adds up and how holds move, how orders
//! move between states, and the order in which queues are served.
//!
//! The services (licensing, inventory, orders) read state, call these rules, and commit the result;
//! the transport layer converts between these types and the protobuf API at the edge. The record types
//! derive `prost::Message` only so the state layer can store them compactly; they are not the API.

pub mod allocation;
pub mod ids;
pub mod inventory;
pub mod licensing;
pub mod orders;
pub mod shares;

/// Integer ceiling of `a * b / d` without overflow for the figures used here (units, basis points).
pub fn mul_div_ceil(a: u64, b: u64, d: u64) -> u64 {
    if d == 0 {
        return u64::MAX;
    }
    let p = u128::from(a) * u128::from(b);
    let q = p.div_ceil(u128::from(d));
    u64::try_from(q).unwrap_or(u64::MAX)
}

/// `head`'s encoding followed by `extra`'s: the stored forms of records (orders, reservations,
/// holds) put the fields they add in tags the record itself leaves free, so one decode of the bytes as
/// the record and one as the extra message each read their own part back.
pub(crate) fn encode_stored(head: &impl prost::Message, extra: &impl prost::Message) -> Vec<u8> {
    let mut out = Vec::with_capacity(head.encoded_len() + extra.encoded_len());
    // Encoding into a Vec can't run out of room.
    let _ = head.encode(&mut out);
    let _ = extra.encode(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mul_div_ceil_rounds_up() {
        assert_eq!(mul_div_ceil(10, 2500, 10_000), 3);
        assert_eq!(mul_div_ceil(8, 2500, 10_000), 2);
        assert_eq!(mul_div_ceil(0, 2500, 10_000), 0);
        assert_eq!(mul_div_ceil(u64::MAX, 10_000, 10_000), u64::MAX);
    }
}
