//! Ticket decoding and MAC verification (`payload_b64.hex_mac`).
#![no_main]
use libfuzzer_sys::fuzz_target;
use tokenvault_webhook::protocol::{signature::mac_eq, ticket};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(t) = ticket::split(s) {
        // A fixed key: verification must never panic, whatever the input.
        let _ = mac_eq(&t.mac, &[0u8; 32]);
        if let Ok(c) = ticket::decode_claims(t.payload_b64) {
            let _ = (c.sub, c.svc, c.pur, c.exp, c.iat, c.nonce, c.mode, c.cid);
        }
    }
    let _ = ticket::decode_claims(s);
});
