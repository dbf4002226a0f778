//! The spec's independent test vectors, read from
//! `../shared/spec/vectors.json` at test time (or `TVW_SPEC_VECTORS`), never
//! pasted: a changed vector is a failing test, a missing file a loud one.
//!
//! Compiled into the unit tests (`cfg(test)`) and included by the
//! integration harness (`#[path]`), so both read the file the same way.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::Value;
use std::path::PathBuf;
use std::sync::OnceLock;

/// Where the vectors are read from.
pub fn path() -> PathBuf {
    match std::env::var_os("TVW_SPEC_VECTORS") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/spec/vectors.json"),
    }
}

/// The whole file, parsed once. Panics, naming the path, when it is missing
/// or not JSON: a test that needs the vectors never passes without them.
pub fn all() -> &'static Value {
    static V: OnceLock<Value> = OnceLock::new();
    V.get_or_init(|| {
        let p = path();
        let raw = std::fs::read(&p).unwrap_or_else(|e| {
            panic!(
                "the spec's test vectors are missing at {} ({e}); CI keeps ../shared/spec beside \
                 the checkout, or set TVW_SPEC_VECTORS",
                p.display()
            )
        });
        serde_json::from_slice(&raw).unwrap_or_else(|e| panic!("{} is not JSON: {e}", p.display()))
    })
}

/// One section (`requestSignature`, `ticket`, …); panics if absent.
pub fn get(section: &str) -> &'static Value {
    let v = &all()[section];
    assert!(!v.is_null(), "vectors.json has no section {section}");
    v
}

/// A string field of a vector; panics if absent or not a string.
pub fn s<'a>(v: &'a Value, field: &str) -> &'a str {
    v[field]
        .as_str()
        .unwrap_or_else(|| panic!("vector field {field} is not a string: {v}"))
}

/// An unsigned field of a vector.
pub fn u(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("vector field {field} is not an unsigned integer: {v}"))
}

/// A hex field, decoded.
pub fn hex_bytes(v: &Value, field: &str) -> Vec<u8> {
    hex::decode(s(v, field)).unwrap_or_else(|e| panic!("vector field {field} is not hex: {e}"))
}

/// An array section; panics if absent or empty.
pub fn list(section: &str) -> &'static [Value] {
    let a = get(section)
        .as_array()
        .unwrap_or_else(|| panic!("vectors.json {section} is not an array"));
    assert!(!a.is_empty(), "vectors.json {section} is empty");
    a
}

/// Every TOTP vector (RFC 6238 Appendix B and the spec's extras).
pub fn totp() -> Vec<&'static Value> {
    list("totpRfc6238AppendixB")
        .iter()
        .chain(list("totpExtra"))
        .collect()
}
