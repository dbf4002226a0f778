//! Ticket codec: `base64url(payload).hex(HMAC-SHA256(secret, payload_b64_string))`.
//! Splitting and decoding only; the MAC is checked by a key backend and the
//! claims by the custody layer.

use base64::Engine;
use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TicketError {
    Malformed,
    BadPayload,
}

/// A ticket split into the signed string and the presented MAC.
#[derive(Debug)]
pub struct SplitTicket<'a> {
    pub payload_b64: &'a str,
    pub mac: [u8; 32],
}

pub const MAX_TICKET_LEN: usize = 4096;

pub fn split(ticket: &str) -> Result<SplitTicket<'_>, TicketError> {
    if ticket.len() > MAX_TICKET_LEN {
        return Err(TicketError::Malformed);
    }
    let (p, s) = ticket.split_once('.').ok_or(TicketError::Malformed)?;
    if p.is_empty()
        || !p
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'=')
        || s.len() != 64
    {
        return Err(TicketError::Malformed);
    }
    let mut mac = [0u8; 32];
    hex::decode_to_slice(s.to_ascii_lowercase(), &mut mac).map_err(|_| TicketError::Malformed)?;
    Ok(SplitTicket {
        payload_b64: p,
        mac,
    })
}

/// Claims as sent. `exp`/`iat` are kept as JSON values so a non-numeric `exp`
/// can be refused rather than read as "never expires".
#[derive(Debug, Clone, Deserialize)]
pub struct TicketClaims {
    pub sub: Option<String>,
    pub svc: Option<String>,
    pub pur: Option<String>,
    pub aid: Option<String>,
    pub pid: Option<String>,
    pub iat: Option<serde_json::Value>,
    pub exp: Option<serde_json::Value>,
    pub nonce: Option<String>,
    pub mode: Option<String>,
    pub cid: Option<String>,
}

pub fn decode_claims(payload_b64: &str) -> Result<TicketClaims, TicketError> {
    let trimmed = payload_b64.trim_end_matches('=');
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(trimmed)
        .map_err(|_| TicketError::BadPayload)?;
    serde_json::from_slice(&raw).map_err(|_| TicketError::BadPayload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmac::{Hmac, Mac};
    use sha2::Sha256;

    const VALUE: &str = "eyJzdWIiOiJ1c2VyX3Rlc3QiLCJzdmMiOiJnaXRodWIiLCJwdXIiOiJhZ2VudF9jcmVkZW50aWFsIiwiaWF0IjoxNzAwMDAwMDAwLCJleHAiOjk5OTk5OTk5OTksIm5vbmNlIjoiZGVhZGJlZWZkZWFkYmVlZmRlYWRiZWVmZGVhZGJlZWYiLCJhaWQiOiJhZ2VudF90ZXN0In0.b5b3f0d261e89c53c9db035d68244b1d4862a3e9c84edd111f502f9b148da74a";

    #[test]
    fn spec_vector_ticket() {
        let t = split(VALUE).unwrap();
        let secret: Vec<u8> = (0u8..32).collect();
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&secret).unwrap();
        m.update(t.payload_b64.as_bytes());
        assert_eq!(m.finalize().into_bytes().as_slice(), &t.mac);
        let c = decode_claims(t.payload_b64).unwrap();
        assert_eq!(c.svc.as_deref(), Some("github"));
        assert_eq!(c.pur.as_deref(), Some("agent_credential"));
        assert_eq!(c.exp, Some(serde_json::json!(9999999999u64)));
        assert_eq!(c.nonce.as_deref(), Some("deadbeefdeadbeefdeadbeefdeadbeef"));
    }

    #[test]
    fn malformed_tickets() {
        assert_eq!(split("abc").unwrap_err(), TicketError::Malformed);
        assert_eq!(split("abc.1234").unwrap_err(), TicketError::Malformed);
        assert_eq!(
            split(&format!("a b.{}", "0".repeat(64))).unwrap_err(),
            TicketError::Malformed
        );
        assert!(decode_claims("!!!").is_err());
        assert!(decode_claims("bm90IGpzb24").is_err()); // "not json"
    }
}
