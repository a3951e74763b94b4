//! The `requests` fuzz target's body, run on the stable toolchain by CI: seeded random protobuf
//! requests (random fields of every wire type, random-length UTF-8 with controls, huge and zero
//! numbers, nested garbage) to every unary RPC's real handler on the in-memory backend. A panic in any
//! handler's validation fails the test; the seed is printed so a failure replays
//! (`CHIPGATE_FUZZ_SEED`). The real fuzzer (`cargo +nightly fuzz run requests`) explores far more.

#[path = "../../../fuzz/common/requests.rs"]
mod requests;

/// Cases per RPC.
const CASES: usize = 200;

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn text(rng: &mut fastrand::Rng) -> String {
    let len = match rng.u8(0..10) {
        0 => 0,
        1 => rng.usize(1000..5000),
        _ => rng.usize(1..40),
    };
    (0..len)
        .map(|_| match rng.u8(0..10) {
            0 => char::from(rng.u8(0..32)),
            1 => ' ',
            2 => rng.char('\u{80}'..'\u{10FFFF}'),
            _ => rng.alphanumeric(),
        })
        .collect()
}

fn number(rng: &mut fastrand::Rng) -> u64 {
    match rng.u8(0..6) {
        0 => 0,
        1 => u64::MAX,
        2 => u64::from(u32::MAX) + 1,
        3 => rng.u64(..),
        _ => rng.u64(0..2000),
    }
}

/// A random message: up to 8 fields numbered 1–12 with a random wire type each.
fn message(rng: &mut fastrand::Rng, depth: u8) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..rng.usize(0..8) {
        let field = rng.u64(1..13);
        match rng.u8(0..5) {
            0 | 1 => {
                varint(&mut out, field << 3);
                varint(&mut out, number(rng));
            }
            2 | 3 => {
                let body = if depth < 3 && rng.bool() { message(rng, depth + 1) } else { text(rng).into_bytes() };
                varint(&mut out, (field << 3) | 2);
                varint(&mut out, body.len() as u64);
                out.extend(body);
            }
            _ => {
                varint(&mut out, (field << 3) | 1);
                out.extend(rng.u64(..).to_le_bytes());
            }
        }
    }
    out
}

#[test]
fn every_handler_answers_random_requests_without_panicking() {
    let seed =
        std::env::var("CHIPGATE_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| fastrand::u64(..));
    eprintln!("fuzz smoke seed {seed} (CHIPGATE_FUZZ_SEED={seed} replays)");
    let mut rng = fastrand::Rng::with_seed(seed);
    let w = requests::world();
    let (mut calls, mut handled) = (0, vec![0usize; requests::RPCS]);
    for (sel, handled) in handled.iter_mut().enumerate() {
        for _ in 0..CASES {
            let bytes = message(&mut rng, 0);
            calls += 1;
            if w.rt.block_on(requests::call(w, sel as u8, &bytes)) {
                *handled += 1;
            }
        }
    }
    let total: usize = handled.iter().sum();
    eprintln!("{calls} random requests over {} RPCs; {total} decoded and reached a handler; no panic", requests::RPCS);
    // Random bytes that never decode would test nothing: every RPC's handler must have been reached.
    assert!(handled.iter().all(|&n| n > 0), "RPCs never reached: {handled:?}");
    assert!(total * 5 >= calls, "only {total} of {calls} requests reached a handler");
}
