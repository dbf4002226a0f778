//! Ticket verification. Order: shape → signature (in the key backend,
//! constant time) → decode → `exp` → `iat` → nonce → purpose → service.
//!
//! Verification reads the nonce memory but never writes it: a refused ticket
//! changes nothing. The handler burns the nonce ([`consume`], or inside its
//! own write transaction) once the request is about to succeed.

use crate::keys::Backend;
use crate::protocol::signature::mac_eq;
use crate::protocol::ticket::{decode_claims, split, TicketClaims};
use crate::protocol::ApiError;
use crate::store::{ReplayNs, Store};
use serde_json::Value;

/// Allowed clock skew for `iat`, seconds.
pub const IAT_SKEW_SECS: i64 = 60;
/// Longest lifetime a ticket may claim, seconds.
pub const MAX_TTL_SECS: i64 = 300;

pub const STORE: &[&str] = &["store"];
pub const CREDENTIAL: &[&str] = &["agent_credential", "user_reveal"];
pub const TOTP_CODE: &[&str] = &["totp_code", "user_reveal", "agent_credential"];
pub const PROXY: &[&str] = &["proxy"];
pub const TOTP_VERIFY: &[&str] = &["totp_verify"];

#[derive(Debug, Clone)]
pub struct Ticket {
    pub sub: Option<String>,
    pub svc: String,
    pub pur: String,
    pub aid: Option<String>,
    pub pid: Option<String>,
    pub nonce: String,
    pub exp: i64,
    pub mode: Option<String>,
    pub cid: Option<String>,
}

fn number(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite())
                .map(|f| f.floor() as i64)
        }),
        _ => None,
    }
}

fn valid_nonce(n: &str) -> bool {
    (8..=128).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Checks a ticket for an endpoint accepting `purposes` and `service`.
pub fn verify(
    backend: &Backend,
    store: &Store,
    raw: &str,
    purposes: &[&str],
    service: &str,
    now: i64,
) -> Result<Ticket, ApiError> {
    let parts = split(raw).map_err(|_| ApiError::TicketInvalid("Ticket is malformed"))?;
    let mac = backend.hmac_sha256(parts.payload_b64.as_bytes())?;
    if !mac_eq(&mac, &parts.mac) {
        return Err(ApiError::TicketInvalid("Ticket signature mismatch"));
    }
    crate::store::trail::note(|n| n.authenticated = true);
    let c: TicketClaims = decode_claims(parts.payload_b64)
        .map_err(|_| ApiError::TicketInvalid("Ticket payload is not valid JSON"))?;
    let exp = match &c.exp {
        None | Some(Value::Null) => return Err(ApiError::TicketExpired),
        Some(v) => number(v).ok_or(ApiError::TicketInvalid("Ticket exp must be a number"))?,
    };
    if exp <= now {
        return Err(ApiError::TicketExpired);
    }
    let iat = c
        .iat
        .as_ref()
        .and_then(number)
        .ok_or(ApiError::TicketInvalid("Ticket iat must be a number"))?;
    if iat > now + IAT_SKEW_SECS {
        return Err(ApiError::TicketInvalid("Ticket issued in the future"));
    }
    if exp - iat > MAX_TTL_SECS {
        return Err(ApiError::TicketInvalid("Ticket lifetime too long"));
    }
    let nonce = c
        .nonce
        .filter(|n| valid_nonce(n))
        .ok_or(ApiError::TicketInvalid("Ticket nonce missing or malformed"))?;
    if store.replay_seen(ReplayNs::TicketNonce, &nonce, now)? {
        return Err(ApiError::TicketInvalid("Ticket already used"));
    }
    let pur = c.pur.unwrap_or_default();
    if !purposes.contains(&pur.as_str()) {
        return Err(ApiError::TicketInvalid(
            "Ticket purpose not valid for this endpoint",
        ));
    }
    let svc = c
        .svc
        .filter(|s| !s.is_empty())
        .ok_or(ApiError::TicketInvalid("Ticket has no service"))?;
    if svc != service {
        return Err(ApiError::invalid(
            "Ticket service does not match the requested service",
        ));
    }
    crate::store::trail::note(|n| {
        n.service = Some(svc.clone());
        n.sub = c.sub.clone();
        n.aid = c.aid.clone();
        n.purpose = Some(pur.clone());
    });
    Ok(Ticket {
        sub: c.sub,
        svc,
        pur,
        aid: c.aid,
        pid: c.pid,
        nonce,
        exp,
        mode: c.mode,
        cid: c.cid,
    })
}

/// Burns the ticket's nonce (durable when this returns). A concurrent use of
/// the same ticket loses here.
pub async fn consume(store: &Store, t: &Ticket, now: i64) -> Result<(), ApiError> {
    if store
        .replay_remember(ReplayNs::TicketNonce, &t.nonce, t.exp, now)
        .await?
    {
        Ok(())
    } else {
        Err(ApiError::TicketInvalid("Ticket already used"))
    }
}

/// Loads the token document a verified ticket names and applies the `cid`
/// rule (before any decryption or upstream call). Returns the raw bytes too,
/// for compare-and-set writes.
pub fn load_document(
    store: &Store,
    t: &Ticket,
) -> Result<(Vec<u8>, crate::protocol::document::TokenDocument), ApiError> {
    let raw = store
        .get_raw(crate::protocol::storage::Collection::Tokens, &t.svc)?
        .ok_or_else(|| ApiError::TokenNotFound(t.svc.clone()))?;
    let doc: crate::protocol::document::TokenDocument = serde_json::from_slice(&raw)
        .map_err(|_| crate::store::StoreError::Corrupt("token document"))?;
    check_creation(t, doc.meta.get("creationId").and_then(Value::as_str))?;
    Ok((raw, doc))
}

/// `cid` rule for reads: a ticket naming a creation that is not the stored
/// one is stale. Checked before any decryption or upstream call.
pub fn check_creation(t: &Ticket, stored_creation_id: Option<&str>) -> Result<(), ApiError> {
    match (&t.cid, stored_creation_id) {
        (Some(c), Some(s)) if c != s => Err(ApiError::StaleCreation),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests;
