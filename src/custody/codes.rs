//! The TOTP codes of a stored token document: its seed is a key object in
//! the device (`otp`) or a sealed field (`totpSecret`), opened through
//! `fields`; the arithmetic is `totp`'s. (Kept apart from both so that
//! `fields` → `totp` stays one way.)

use super::fields::{open_field, TOTP_FIELD};
use super::totp::{base32_decode, code_device, code_software, params_from_meta, remaining, Params};
use crate::keys::Backend;
use crate::protocol::ApiError;
use serde_json::Value;
use zeroize::Zeroizing;

/// A code and how long it stays current.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Code {
    pub code: Zeroizing<String>,
    pub remaining: u64,
    pub params: Params,
}

/// Does a read of this document answer a code (a TOTP-type token with a seed)?
pub fn answers_with_code(doc: &crate::protocol::document::TokenDocument) -> bool {
    is_totp(doc) && doc.meta.get("tokenType").and_then(Value::as_str) == Some("TOTP")
}

/// Does this document hold a TOTP seed (device key or sealed field)?
pub fn is_totp(doc: &crate::protocol::document::TokenDocument) -> bool {
    doc.otp.is_some() || doc.fields.contains_key(TOTP_FIELD)
}

/// Codes of `doc` at the given time steps (one seed access for all).
pub fn codes_at_steps(
    backend: &Backend,
    service: &str,
    doc: &crate::protocol::document::TokenDocument,
    steps: &[u64],
) -> Result<Vec<Zeroizing<String>>, ApiError> {
    let p = params_from_meta(&doc.meta);
    if let Some(id) = &doc.otp {
        return steps
            .iter()
            .map(|s| code_device(backend, id, &p, s * p.period))
            .collect();
    }
    let seed_b32 = open_field(backend, service, doc, TOTP_FIELD)?
        .ok_or_else(|| ApiError::invalid("Token is not a TOTP token"))?;
    let seed = seed_b32
        .as_str()
        .and_then(base32_decode)
        .ok_or(ApiError::Internal)?;
    drop(seed_b32);
    Ok(steps
        .iter()
        .map(|s| code_software(&seed, &p, s * p.period))
        .collect())
}

/// The current code of `doc`.
pub fn current_code(
    backend: &Backend,
    service: &str,
    doc: &crate::protocol::document::TokenDocument,
    time: u64,
) -> Result<Code, ApiError> {
    let params = params_from_meta(&doc.meta);
    let mut codes = codes_at_steps(backend, service, doc, &[time / params.period])?;
    let code = codes.pop().ok_or(ApiError::Internal)?;
    Ok(Code {
        code,
        remaining: remaining(&params, time),
        params,
    })
}
