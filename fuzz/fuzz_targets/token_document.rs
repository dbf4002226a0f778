//! Stored token documents (and the meta allowlist applied to them).
#![no_main]
use libfuzzer_sys::fuzz_target;
use tokenvault_webhook::protocol::document::{public_meta, TokenDocument};

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = serde_json::from_slice::<TokenDocument>(data) {
        let again: TokenDocument =
            serde_json::from_slice(&serde_json::to_vec(&d).unwrap()).unwrap();
        assert_eq!(again, d);
        let _ = public_meta(d.meta);
    }
});
