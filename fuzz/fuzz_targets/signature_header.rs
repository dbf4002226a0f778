//! X-TokenVault-Signature / -Timestamp / -Request-Id parsing.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tokenvault_webhook::protocol::signature::*;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(mac) = parse_signature_header(s) {
        // Round trip: a parsed MAC is 32 bytes that re-render to the header.
        assert_eq!(parse_signature_header(&format!("sha256={}", hex_lower(&mac))).ok(), Some(mac));
    }
    let _ = parse_timestamp(s, 1_700_000_000);
    let _ = validate_request_id(s);
    let _ = signing_payload(s, data);
});

fn hex_lower(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
