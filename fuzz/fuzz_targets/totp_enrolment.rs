//! otpauth:// URIs and base32 seeds as browsers paste them.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tokenvault_webhook::custody::totp::{base32_decode, base32_encode, parse_enrolment};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Some(seed) = base32_decode(s) {
        // Whatever decodes re-encodes to something that decodes the same.
        assert_eq!(
            base32_decode(&base32_encode(&seed)).map(|v| v.to_vec()),
            Some(seed.to_vec())
        );
    }
    for key in ["totpUri", "totpSecret", "accessToken"] {
        let mut m = serde_json::Map::new();
        m.insert(key.into(), serde_json::Value::String(s.to_string()));
        let _ = parse_enrolment(&m);
    }
    if let Ok(serde_json::Value::Object(m)) = serde_json::from_slice(data) {
        let _ = parse_enrolment(&m);
    }
});
