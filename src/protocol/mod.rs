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
    #[test]
    fn spec_vector_hmac_hash() {
        let secret: Vec<u8> = (0u8..32).collect();
        assert_eq!(
            super::registration_hmac_hash(&secret),
            "630dcd2966c4336691125448bbb25b4ff412a49c732db2c8abc1b8581bd710dd"
        );
    }
}
