//! Wire types and codecs. Pure: no I/O, no keys.

pub mod document;
pub mod error;
pub mod signature;
pub mod storage;
pub mod ticket;

pub use error::ApiError;

/// Capabilities this build implements. `/v1/exchange` and `/v1/health` both
/// answer with exactly this list.
pub const CAPABILITIES: &[&str] = &[
    "storage",
    "credential",
    "store",
    "ticketConstraints",
    "totp-verify",
    "proxy",
    "refresh",
    "tv-refresh",
];

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// `hmac_hash` of a registration URL: lowercase hex SHA-256 of the raw secret.
pub fn registration_hmac_hash(secret: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(secret))
}

#[cfg(test)]
mod tests {
    use crate::testvectors as tv;

    #[test]
    fn spec_vector_hmac_hash() {
        let v = tv::get("hmacHash");
        assert_eq!(
            super::registration_hmac_hash(&tv::hex_bytes(v, "secretHex")),
            tv::s(v, "sha256Hex")
        );
    }
}
