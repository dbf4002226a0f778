//! TOTP: enrolment (otpauth URIs and base32, healed), codes and verification.
//!
//! The seed goes in once and never comes out. With a backend that can hold
//! it (PKCS#11 with the HMAC mechanisms) it becomes a non-extractable key and
//! each code is an HMAC in the device over the 8-byte counter, truncated here.
//! Otherwise it is a sealed field, opened into a zeroizing buffer per code.
//! Both paths give identical codes (RFC 6238 Appendix B vectors).

use crate::keys::{Backend, OtpAlg};
use crate::protocol::ApiError;
use serde_json::{Map, Value};
use zeroize::Zeroizing;

pub const MIN_SECRET_BYTES: usize = 10; // 80 bits
pub const MAX_SECRET_BYTES: usize = 1024;

/// tokenData keys consumed by TOTP enrolment (never stored as fields).
pub const INPUT_KEYS: &[&str] = &[
    "totpUri",
    "totpSecret",
    "totpAlgorithm",
    "totpDigits",
    "totpPeriod",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    pub alg: OtpAlg,
    pub digits: u32,
    pub period: u64,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            alg: OtpAlg::Sha1,
            digits: 6,
            period: 30,
        }
    }
}

pub struct Enrolment {
    pub seed: Zeroizing<Vec<u8>>,
    pub params: Params,
    pub issuer: Option<String>,
    pub account: Option<String>,
}

fn bad(msg: &str) -> ApiError {
    ApiError::invalid(msg)
}

/// RFC 4648 base32 after healing (case, spaces, hyphens, padding).
pub fn base32_decode(input: &str) -> Option<Zeroizing<Vec<u8>>> {
    let mut out = Zeroizing::new(Vec::with_capacity(input.len() * 5 / 8));
    let (mut buf, mut bits) = (0u64, 0u32);
    for c in input.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a',
            b'2'..=b'7' => c - b'2' + 26,
            b' ' | b'\t' | b'-' | b'=' => continue,
            _ => return None,
        };
        buf = (buf << 5) | v as u64;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
            buf &= (1 << bits) - 1;
        }
    }
    Some(out)
}

pub fn base32_encode(data: &[u8]) -> Zeroizing<String> {
    const A: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = Zeroizing::new(String::with_capacity(data.len() * 8 / 5 + 1));
    let (mut buf, mut bits) = (0u64, 0u32);
    for &b in data {
        buf = (buf << 8) | b as u64;
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(A[((buf >> bits) & 31) as usize] as char);
        }
        buf &= (1 << bits) - 1;
    }
    if bits > 0 {
        out.push(A[((buf << (5 - bits)) & 31) as usize] as char);
    }
    out
}

fn parse_alg(s: &str) -> Result<OtpAlg, ApiError> {
    match s.trim().to_ascii_uppercase().replace('-', "").as_str() {
        "SHA1" => Ok(OtpAlg::Sha1),
        "SHA256" => Ok(OtpAlg::Sha256),
        "SHA512" => Ok(OtpAlg::Sha512),
        _ => Err(bad("TOTP algorithm must be SHA1, SHA256 or SHA512")),
    }
}

fn number_field(v: &Value, what: &str) -> Result<u64, ApiError> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .ok_or_else(|| bad(&format!("{what} must be a whole number")))
}

struct UriParts {
    secret: Option<Zeroizing<String>>,
    alg: Option<String>,
    digits: Option<String>,
    period: Option<String>,
    issuer: Option<String>,
    account: Option<String>,
}

fn parse_uri(uri: &str) -> Result<UriParts, ApiError> {
    let not_uri = || bad("TOTP URI must look like otpauth://totp/Issuer:account?secret=...");
    let u = url::Url::parse(uri.trim()).map_err(|_| not_uri())?;
    if !u.scheme().eq_ignore_ascii_case("otpauth") {
        return Err(not_uri());
    }
    match u.host_str().map(str::to_ascii_lowercase).as_deref() {
        Some("totp") => {}
        Some("hotp") => return Err(bad("HOTP (otpauth://hotp) is not supported; only TOTP")),
        _ => return Err(not_uri()),
    }
    let label = percent_encoding::percent_decode_str(u.path().trim_start_matches('/'))
        .decode_utf8_lossy()
        .into_owned();
    let (mut issuer, account) = match label.split_once(':') {
        Some((i, a)) => (Some(i.trim().to_string()), a.trim().to_string()),
        None => (None, label.trim().to_string()),
    };
    let mut p = UriParts {
        secret: None,
        alg: None,
        digits: None,
        period: None,
        issuer: None,
        account: None,
    };
    for (k, v) in u.query_pairs() {
        match k.to_ascii_lowercase().as_str() {
            "secret" => p.secret = Some(Zeroizing::new(v.into_owned())),
            "algorithm" => p.alg = Some(v.into_owned()),
            "digits" => p.digits = Some(v.into_owned()),
            "period" => p.period = Some(v.into_owned()),
            "issuer" => issuer = Some(v.into_owned()),
            _ => {}
        }
    }
    p.issuer = issuer.filter(|s| !s.is_empty());
    p.account = Some(account).filter(|s| !s.is_empty());
    Ok(p)
}

fn str_field<'a>(td: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    td.get(k)
        .and_then(Value::as_str)
        .filter(|s| !s.trim().is_empty())
}

/// Reads TOTP enrolment from `tokenData`: `totpUri`, an otpauth URI in
/// `totpSecret`, or a raw base32 `totpSecret`; explicit fields win over the
/// URI. `Ok(None)` when there is no TOTP material. Messages never echo it.
pub fn parse_enrolment(td: &Map<String, Value>) -> Result<Option<Enrolment>, ApiError> {
    let uri_src = str_field(td, "totpUri").or_else(|| {
        str_field(td, "totpSecret")
            .filter(|s| s.trim_start().to_ascii_lowercase().starts_with("otpauth:"))
    });
    let mut parts = match uri_src {
        Some(u) => parse_uri(u)?,
        None => UriParts {
            secret: None,
            alg: None,
            digits: None,
            period: None,
            issuer: None,
            account: None,
        },
    };
    if uri_src.is_none() {
        match td.get("totpSecret") {
            None | Some(Value::Null) => {
                if INPUT_KEYS.iter().any(|k| td.contains_key(*k)) {
                    return Err(bad("TOTP secret is missing"));
                }
                return Ok(None);
            }
            Some(Value::String(s)) => parts.secret = Some(Zeroizing::new(s.clone())),
            Some(_) => return Err(bad("Field tokenData.totpSecret must be a string")),
        }
    }
    let secret = parts
        .secret
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| bad("TOTP secret is missing"))?;
    let seed = base32_decode(&secret).ok_or_else(|| bad("TOTP secret is not valid base32"))?;
    if seed.len() < MIN_SECRET_BYTES {
        return Err(bad("TOTP secret is shorter than 80 bits"));
    }
    if seed.len() > MAX_SECRET_BYTES {
        return Err(bad("TOTP secret is too long"));
    }
    let mut params = Params::default();
    if let Some(a) = parts.alg.as_deref() {
        params.alg = parse_alg(a)?;
    }
    if let Some(d) = parts.digits.as_deref() {
        params.digits = d
            .trim()
            .parse()
            .map_err(|_| bad("TOTP digits must be 6, 7 or 8"))?;
    }
    if let Some(p) = parts.period.as_deref() {
        params.period = p
            .trim()
            .parse()
            .map_err(|_| bad("TOTP period must be 1-3600 seconds"))?;
    }
    if let Some(v) = td.get("totpAlgorithm").filter(|v| !v.is_null()) {
        params.alg = parse_alg(
            v.as_str()
                .ok_or_else(|| bad("TOTP algorithm must be SHA1, SHA256 or SHA512"))?,
        )?;
    }
    if let Some(v) = td.get("totpDigits").filter(|v| !v.is_null()) {
        params.digits = number_field(v, "TOTP digits")? as u32;
    }
    if let Some(v) = td.get("totpPeriod").filter(|v| !v.is_null()) {
        params.period = number_field(v, "TOTP period")?;
    }
    if !(6..=8).contains(&params.digits) {
        return Err(bad("TOTP digits must be 6, 7 or 8"));
    }
    if !(1..=3600).contains(&params.period) {
        return Err(bad("TOTP period must be 1-3600 seconds"));
    }
    Ok(Some(Enrolment {
        seed,
        params,
        issuer: parts.issuer,
        account: parts.account,
    }))
}

/// Descriptors kept in meta (never the seed or the URI).
pub fn meta_for(e: &Enrolment, meta: &mut Map<String, Value>) {
    if let Some(i) = &e.issuer {
        meta.insert("totpIssuer".into(), Value::String(i.clone()));
    }
    if let Some(a) = &e.account {
        meta.insert("totpAccountName".into(), Value::String(a.clone()));
    }
    meta.insert(
        "totpAlgorithm".into(),
        Value::String(e.params.alg.name().into()),
    );
    meta.insert("totpDigits".into(), Value::from(e.params.digits));
    meta.insert("totpPeriod".into(), Value::from(e.params.period));
    meta.insert("hasTotpSecret".into(), Value::Bool(true));
}

/// Parameters recorded in a document's meta.
pub fn params_from_meta(meta: &Map<String, Value>) -> Params {
    let d = Params::default();
    Params {
        alg: meta
            .get("totpAlgorithm")
            .and_then(Value::as_str)
            .and_then(|a| parse_alg(a).ok())
            .unwrap_or(d.alg),
        digits: meta
            .get("totpDigits")
            .and_then(Value::as_u64)
            .map_or(d.digits, |x| x as u32),
        period: meta
            .get("totpPeriod")
            .and_then(Value::as_u64)
            .unwrap_or(d.period),
    }
}

/// RFC 4226 dynamic truncation of an HMAC into `digits` decimal digits.
pub fn truncate(mac: &[u8], digits: u32) -> Zeroizing<String> {
    let Some(last) = mac.last() else {
        return Zeroizing::new(String::new());
    };
    let off = (last & 0x0f) as usize;
    let bin = match mac.get(off..off + 4) {
        Some(b) => u32::from_be_bytes([b[0] & 0x7f, b[1], b[2], b[3]]),
        None => 0,
    };
    let code = bin as u64 % 10u64.pow(digits);
    Zeroizing::new(format!("{code:0width$}", width = digits as usize))
}

/// Software path (seed in a zeroizing buffer), through totp-rs.
pub fn code_software(seed: &[u8], p: &Params, time: u64) -> Zeroizing<String> {
    let alg = match p.alg {
        OtpAlg::Sha1 => totp_rs::Algorithm::SHA1,
        OtpAlg::Sha256 => totp_rs::Algorithm::SHA256,
        OtpAlg::Sha512 => totp_rs::Algorithm::SHA512,
    };
    // build_noncompliant: 80-bit seeds are legal here. Never format `totp`:
    // its Display prints the secret.
    let totp = totp_rs::Builder::new()
        .with_algorithm(alg)
        .with_digits(p.digits as u8)
        .with_step_duration(p.period)
        .with_secret(seed.to_vec())
        .build_noncompliant();
    Zeroizing::new(totp.generate(time).to_string())
}

/// Device path: HMAC of the counter in the key backend, truncated here.
pub fn code_device(
    backend: &Backend,
    id: &str,
    p: &Params,
    time: u64,
) -> Result<Zeroizing<String>, ApiError> {
    let mac = backend.otp_hmac(id, p.alg, time / p.period)?;
    Ok(truncate(&mac, p.digits))
}

pub fn remaining(p: &Params, time: u64) -> u64 {
    p.period - time % p.period
}

#[cfg(test)]
mod tests;
