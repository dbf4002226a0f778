//! Request-HMAC codec: parsing the `X-TokenVault-*` headers and building the
//! signing payload. The MAC itself is computed by a key backend.

use subtle::ConstantTimeEq;

pub const SIGNATURE_HEADER: &str = "x-tokenvault-signature";
pub const TIMESTAMP_HEADER: &str = "x-tokenvault-timestamp";
pub const REQUEST_ID_HEADER: &str = "x-tokenvault-request-id";

/// Allowed clock skew between Token Vault and the webhook, seconds.
pub const MAX_SKEW_SECS: i64 = 300;
/// How long a request id is remembered at least, seconds.
pub const REQUEST_ID_TTL_SECS: i64 = 600;

/// Until when a request id accepted at `now` with timestamp `ts` must be
/// remembered: at least [`REQUEST_ID_TTL_SECS`], and always until its
/// timestamp has left the window (a request stamped in the future would
/// otherwise replay after the id was forgotten).
pub fn request_id_expiry(ts: i64, now: i64) -> i64 {
    (now + REQUEST_ID_TTL_SECS).max(ts + MAX_SKEW_SECS + 1)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignatureError {
    Missing(&'static str),
    Malformed(&'static str),
    Stale,
}

impl SignatureError {
    pub fn reason(&self) -> &'static str {
        match self {
            SignatureError::Missing(h) | SignatureError::Malformed(h) => h,
            SignatureError::Stale => "Request timestamp outside the allowed window",
        }
    }
}

/// Parses `sha256=<64 lowercase hex>` into the 32 MAC bytes.
pub fn parse_signature_header(value: &str) -> Result<[u8; 32], SignatureError> {
    let hex_part = value
        .strip_prefix("sha256=")
        .ok_or(SignatureError::Malformed(
            "Signature header must start with sha256=",
        ))?;
    if hex_part.len() != 64
        || !hex_part
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(SignatureError::Malformed(
            "Signature must be 64 lowercase hex characters",
        ));
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut out)
        .map_err(|_| SignatureError::Malformed("Signature must be hex"))?;
    Ok(out)
}

/// Parses the decimal Unix-seconds timestamp header and checks it against `now`.
pub fn parse_timestamp(value: &str, now: i64) -> Result<i64, SignatureError> {
    if value.is_empty() || value.len() > 12 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SignatureError::Malformed("Timestamp must be Unix seconds"));
    }
    let ts: i64 = value
        .parse()
        .map_err(|_| SignatureError::Malformed("Timestamp must be Unix seconds"))?;
    if (now - ts).abs() > MAX_SKEW_SECS {
        return Err(SignatureError::Stale);
    }
    Ok(ts)
}

/// Request ids are short printable tokens (`req_<hex>` from Token Vault).
pub fn validate_request_id(value: &str) -> Result<(), SignatureError> {
    if value.is_empty()
        || value.len() > 128
        || !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
    {
        return Err(SignatureError::Malformed("Request id is malformed"));
    }
    Ok(())
}

/// `"{timestamp}." ‖ raw body`: the exact bytes received, never re-serialised.
pub fn signing_payload(timestamp: &str, raw_body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(timestamp.len() + 1 + raw_body.len());
    v.extend_from_slice(timestamp.as_bytes());
    v.push(b'.');
    v.extend_from_slice(raw_body);
    v
}

/// Constant-time equality of two MACs.
pub fn mac_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testvectors as tv;

    /// The spec's vector, through this module's own parsing: the signing
    /// payload is byte for byte the vector's, and both signature headers
    /// parse to the vectors' MACs (the MAC itself is the key backend's:
    /// `keys::conformance` runs it on every backend).
    #[test]
    fn spec_vector_request_signature_payload_and_header() {
        let v = tv::get("requestSignature");
        let payload = signing_payload(tv::s(v, "timestamp"), tv::s(v, "rawBody").as_bytes());
        assert_eq!(payload, tv::s(v, "signingPayload").as_bytes());
        for sig in [v, &v["signatureUnderWrongSecret"]] {
            let header = format!("sha256={}", tv::s(sig, "signatureHex"));
            let mac = parse_signature_header(&header).unwrap();
            assert!(mac_eq(&mac, &tv::hex_bytes(sig, "signatureHex")));
        }
        let right =
            parse_signature_header(&format!("sha256={}", tv::s(v, "signatureHex"))).unwrap();
        let wrong = parse_signature_header(&format!(
            "sha256={}",
            tv::s(&v["signatureUnderWrongSecret"], "signatureHex")
        ))
        .unwrap();
        assert!(!mac_eq(&right, &wrong));
        // The timestamp parses, and is stale a window later.
        let ts = tv::s(v, "timestamp");
        let t: i64 = ts.parse().unwrap();
        assert_eq!(parse_timestamp(ts, t), Ok(t));
        assert_eq!(
            parse_timestamp(ts, t + MAX_SKEW_SECS + 1),
            Err(SignatureError::Stale)
        );
    }

    #[test]
    fn request_ids_outlive_their_window() {
        // Accepted at ts-300: the timestamp stays valid until ts+300, so the
        // id must be remembered past that.
        let ts = 1_700_000_000;
        let at = ts - MAX_SKEW_SECS;
        let exp = request_id_expiry(ts, at);
        assert!(exp > ts + MAX_SKEW_SECS);
        assert!(parse_timestamp(&ts.to_string(), exp).is_err());
        assert_eq!(request_id_expiry(ts, ts), ts + REQUEST_ID_TTL_SECS);
    }

    #[test]
    fn header_parsing() {
        let sig = format!("sha256={}", "c1".repeat(32));
        assert_eq!(parse_signature_header(&sig).unwrap(), [0xc1; 32]);
        assert!(parse_signature_header("c196ad").is_err());
        assert!(parse_signature_header(&sig.to_uppercase()).is_err());
        assert!(parse_signature_header("sha256=zz").is_err());
        assert!(parse_timestamp("1700000000", 1700000300).is_ok());
        assert_eq!(
            parse_timestamp("1700000000", 1700000301),
            Err(SignatureError::Stale)
        );
        assert_eq!(
            parse_timestamp("1700000301", 1700000000),
            Err(SignatureError::Stale)
        );
        assert!(parse_timestamp("-5", 0).is_err());
        assert!(parse_timestamp("1.5", 0).is_err());
        assert!(validate_request_id("req_0123456789ab").is_ok());
        assert!(validate_request_id("req 1").is_err());
        assert!(validate_request_id("").is_err());
        assert!(mac_eq(b"abc", b"abc"));
        assert!(!mac_eq(b"abc", b"abd"));
        assert!(!mac_eq(b"abc", b"ab"));
    }
}
