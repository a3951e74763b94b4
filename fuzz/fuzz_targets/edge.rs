//! Fuzzes what the edge parses before any handler runs: the bearer token (JWT structure, base64,
//! JSON claims, signature) and the protobuf reader that finds a buyer id in a raw request frame.
//! Neither may panic, and a token signed by nobody must never verify.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

fn verifier() -> &'static chipgate_runtime::auth::Verifier {
    static V: OnceLock<chipgate_runtime::auth::Verifier> = OnceLock::new();
    V.get_or_init(|| chipgate_runtime::auth::Signer::generate().expect("key").verifier())
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        assert!(verifier().verify(text).is_err(), "a token nobody signed verified");
    }
    if let Some(msg) = chipgate_runtime::policy::single_frame(data) {
        let _ = chipgate_runtime::policy::string_field(msg, 2);
    }
    for field in [1u32, 2, 15] {
        let _ = chipgate_runtime::policy::string_field(data, field);
    }
});
