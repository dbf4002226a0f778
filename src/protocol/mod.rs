//! Wire types and codecs. Pure: no I/O, no keys.

pub mod document;
pub mod error;
pub mod signature;
pub mod storage;
pub mod ticket;

pub use error::ApiError;

/// Capabilities this build implements. `/v1/exchange` and `/v1/health` both
/// answer with exactly this list.
pub const CAPABILITIES: &[&str] = &["storage"];

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
