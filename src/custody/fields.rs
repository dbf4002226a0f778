//! Token documents: building them from a browser's `tokenData` (every field
//! sealed in the key backend unless it is on the metadata allowlist) and
//! opening them for a credential answer.
//!
//! Each field is AES-256-GCM with a fresh IV; the authenticated data binds it
//! to its service and field name, so a ciphertext moved to another service or
//! field does not decrypt. The sealed plaintext is the field's JSON value.

use super::totp;
use crate::keys::{AesGen, Backend, KeyError};
use crate::protocol::document::TokenDocument;
use crate::protocol::ApiError;
use base64::Engine;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use zeroize::Zeroizing;

pub use crate::protocol::document::{ALG_NONE, ALG_SEALED, ENC};

/// `tokenData` keys that are metadata, stored in clear. Everything else is sealed.
pub const META_INPUT: &[&str] = &["tokenType", "expiresAt", "expiryTime", "scope"];
pub const MAX_FIELDS: usize = 64;
/// Sealed field holding a TOTP seed (base32) when the backend cannot hold it.
pub const TOTP_FIELD: &str = "totpSecret";
pub const MAX_FIELD_NAME: usize = 128;

pub const TOKEN_TYPES: &[&str] = &[
    "PlainText",
    "JWT",
    "OAuth",
    "Certificate",
    "SSHKey",
    "Raw",
    "TOTP",
];

fn aad(service: &str, field: &str) -> Vec<u8> {
    let mut a = b"tokenvault-webhook/field/v1\0".to_vec();
    a.extend_from_slice(service.as_bytes());
    a.push(0);
    a.extend_from_slice(field.as_bytes());
    a
}

fn present(v: &Value) -> bool {
    match v {
        Value::String(s) => !s.is_empty(),
        Value::Null => false,
        _ => true,
    }
}

/// `expiresAt` as RFC 3339 or a number (ms, or seconds if small) → ms.
fn expiry_ms(v: &Value) -> Option<i64> {
    match v {
        Value::String(s) => OffsetDateTime::parse(s, &Rfc3339)
            .ok()
            .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64),
        Value::Number(n) => n
            .as_i64()
            .map(|x| if x < 100_000_000_000 { x * 1000 } else { x }),
        _ => None,
    }
}

/// What `/v1/store` (and `/v1/storage set` with plaintext fields) writes.
/// If the write does not land, `installed_otp` must be destroyed.
pub struct Prepared {
    pub doc: TokenDocument,
    pub installed_otp: Option<String>,
}

/// Merges caller metadata onto a document: never the flags the appliance
/// computes (`META_PROTECTED`) or anything named like a credential.
pub fn merge_meta(doc: &mut TokenDocument, meta: &Map<String, Value>, key: &str) {
    use crate::protocol::document::{CREDENTIAL_KEYS, META_PROTECTED};
    for (k, v) in meta {
        if !META_PROTECTED.contains(&k.as_str()) && !CREDENTIAL_KEYS.contains(&k.as_str()) {
            doc.meta.insert(k.clone(), v.clone());
        }
    }
    doc.meta
        .entry("serviceName")
        .or_insert_with(|| Value::String(key.to_string()));
}

/// Validates `tokenData` and seals it; `at` (Unix seconds) is its
/// `createdAt` and `updatedAt` (an overwrite keeps the old `createdAt`).
/// Messages name fields, never values.
pub fn seal_token_data(
    backend: &Backend,
    service: &str,
    token_data: &Value,
    creation_id: Option<&str>,
    at: i64,
) -> Result<Prepared, ApiError> {
    let obj = token_data
        .as_object()
        .ok_or_else(|| ApiError::invalid("Field tokenData must be an object"))?;
    if obj.len() > MAX_FIELDS {
        return Err(ApiError::invalid(format!(
            "Field tokenData has more than {MAX_FIELDS} fields"
        )));
    }
    let mut meta = Map::new();
    let mut secrets: Vec<(&String, &Value)> = Vec::new();
    let enrolment = totp::parse_enrolment(obj)?;
    for (k, v) in obj {
        if enrolment.is_some() && totp::INPUT_KEYS.contains(&k.as_str()) {
            continue;
        }
        if k.is_empty() || k.len() > MAX_FIELD_NAME || k.contains('\0') {
            return Err(ApiError::invalid(
                "Field names in tokenData must be 1-128 characters",
            ));
        }
        match v {
            Value::String(_) | Value::Number(_) | Value::Bool(_) => {}
            Value::Null => continue,
            _ => {
                return Err(ApiError::invalid(format!(
                    "Field tokenData.{k} must be a string, number or boolean"
                )))
            }
        }
        if META_INPUT.contains(&k.as_str()) {
            continue;
        }
        if present(v) {
            secrets.push((k, v));
        }
    }
    if secrets.is_empty() && enrolment.is_none() {
        return Err(ApiError::invalid("Field tokenData carries no credential"));
    }
    let has = |k: &str| obj.get(k).is_some_and(present);
    let token_type = match obj.get("tokenType") {
        Some(Value::String(t)) if !t.is_empty() => {
            if t.len() > 64 {
                return Err(ApiError::invalid("Field tokenData.tokenType is too long"));
            }
            t.clone()
        }
        Some(Value::Null) | None => if enrolment.is_some() {
            "TOTP"
        } else if has("sshPrivateKey") {
            "SSHKey"
        } else if has("certificateData") {
            "Certificate"
        } else if has("refreshToken") {
            "JWT"
        } else {
            "PlainText"
        }
        .to_string(),
        Some(_) => {
            return Err(ApiError::invalid(
                "Field tokenData.tokenType must be a string",
            ))
        }
    };
    meta.insert("serviceName".into(), Value::String(service.into()));
    meta.insert("tokenType".into(), Value::String(token_type));
    let now = crate::clock::rfc3339(at);
    meta.insert("createdAt".into(), Value::String(now.clone()));
    meta.insert("updatedAt".into(), Value::String(now));
    for key in ["expiresAt", "expiryTime"] {
        if let Some(v) = obj.get(key).filter(|v| present(v)) {
            let ms = expiry_ms(v).ok_or_else(|| {
                ApiError::invalid(format!(
                    "Field tokenData.{key} must be RFC 3339 or a number"
                ))
            })?;
            meta.insert("expiryTime".into(), Value::from(ms));
        }
    }
    if let Some(v) = obj.get("scope").filter(|v| present(v)) {
        meta.insert("scope".into(), v.clone());
    }
    meta.insert("hasRefreshToken".into(), Value::Bool(has("refreshToken")));
    meta.insert(
        "hasCertificate".into(),
        Value::Bool(has("certificateData") || has("certificateChain")),
    );
    meta.insert("hasPrivateKey".into(), Value::Bool(has("privateKeyData")));
    meta.insert("hasSSHKey".into(), Value::Bool(has("sshPrivateKey")));
    meta.insert("hasTotpSecret".into(), Value::Bool(enrolment.is_some()));
    if let Some(cid) = creation_id {
        meta.insert("creationId".into(), Value::String(cid.into()));
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    // One key generation for the whole document, recorded in it.
    let gen = backend.aes_active()?;
    let mut fields = BTreeMap::new();
    for (k, v) in secrets {
        let pt = Zeroizing::new(serde_json::to_vec(v).map_err(|_| ApiError::Internal)?);
        let sealed = backend.seal_with(gen, &aad(service, k), &pt)?;
        fields.insert(k.clone(), b64.encode(sealed));
    }
    // The TOTP seed: a device key where the backend can hold one, otherwise
    // a sealed field. Sealed fields come first, so a failure there leaves no
    // device object behind.
    let mut installed_otp = None;
    if let Some(e) = &enrolment {
        totp::meta_for(e, &mut meta);
        let seed = secrecy::SecretSlice::from(e.seed.to_vec());
        match backend.install_otp(&seed, e.params.alg)? {
            Some(id) => installed_otp = Some(id),
            None => {
                let b32 = totp::base32_encode(&e.seed);
                let pt = Zeroizing::new(
                    serde_json::to_vec(b32.as_str()).map_err(|_| ApiError::Internal)?,
                );
                let sealed = backend.seal_with(gen, &aad(service, TOTP_FIELD), &pt)?;
                fields.insert(TOTP_FIELD.into(), b64.encode(sealed));
            }
        }
    }
    Ok(Prepared {
        doc: TokenDocument {
            v: 1,
            alg: ALG_SEALED.into(),
            enc: Some(ENC.into()),
            kid: Some(gen),
            fields,
            meta,
            otp: installed_otp.clone(),
        },
        installed_otp,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("key backend: {0}")]
    Keys(KeyError),
    #[error("document format not readable: {0}")]
    Format(&'static str),
}

impl From<OpenError> for ApiError {
    fn from(e: OpenError) -> Self {
        match e {
            OpenError::Keys(k) => k.into(),
            OpenError::Format(what) => {
                tracing::error!(what, "stored token document unreadable");
                ApiError::Internal
            }
        }
    }
}

/// Decrypts every field. Plaintext (`alg: "none"`) documents are read as-is;
/// the caller re-seals them.
pub fn open_fields(
    backend: &Backend,
    service: &str,
    doc: &TokenDocument,
) -> Result<Map<String, Value>, OpenError> {
    let mut out = Map::new();
    match (doc.alg.as_str(), doc.enc.as_deref()) {
        (ALG_NONE, _) => {
            for (k, v) in &doc.fields {
                out.insert(k.clone(), Value::String(v.clone()));
            }
        }
        (ALG_SEALED, Some(ENC)) => {
            let b64 = base64::engine::general_purpose::STANDARD;
            let gen = doc
                .sealed_gen()
                .unwrap_or(crate::protocol::document::FIRST_KID);
            for (k, v) in &doc.fields {
                let sealed = b64
                    .decode(v)
                    .map_err(|_| OpenError::Format("field is not base64"))?;
                let pt = match backend.open_with(gen, &aad(service, k), &sealed) {
                    Ok(pt) => pt,
                    Err(KeyError::DecryptFailed) => {
                        return Err(OpenError::Format(
                            "field does not decrypt under this key, service and name",
                        ))
                    }
                    Err(KeyError::NoAesKey) if backend.aes_key_present() => {
                        return Err(OpenError::Format(
                            "document's key generation is not in the key backend",
                        ))
                    }
                    Err(e) => return Err(OpenError::Keys(e)),
                };
                let value: Value = serde_json::from_slice(&pt)
                    .map_err(|_| OpenError::Format("field plaintext is not JSON"))?;
                out.insert(k.clone(), value);
            }
        }
        _ => {
            return Err(OpenError::Format(
                "unknown alg/enc (import reference documents with `import`)",
            ))
        }
    }
    Ok(out)
}

/// Seals one field value for `service` under generation `gen` (the
/// document's: see [`rekey`]); base64 of IV ‖ ciphertext ‖ tag.
pub fn seal_field(
    backend: &Backend,
    service: &str,
    gen: AesGen,
    name: &str,
    value: &Value,
) -> Result<String, ApiError> {
    let pt = Zeroizing::new(serde_json::to_vec(value).map_err(|_| ApiError::Internal)?);
    let sealed = backend.seal_with(gen, &aad(service, name), &pt)?;
    Ok(base64::engine::general_purpose::STANDARD.encode(sealed))
}

/// Opens one field (`None` if absent).
pub fn open_field(
    backend: &Backend,
    service: &str,
    doc: &TokenDocument,
    name: &str,
) -> Result<Option<Value>, OpenError> {
    let Some(v) = doc.fields.get(name) else {
        return Ok(None);
    };
    let one = TokenDocument {
        v: doc.v,
        alg: doc.alg.clone(),
        enc: doc.enc.clone(),
        kid: doc.kid,
        fields: [(name.to_string(), v.clone())].into(),
        meta: Map::new(),
        otp: None,
    };
    Ok(open_fields(backend, service, &one)?.remove(name))
}

/// Moves a document's fields under key generation `gen`: a plaintext
/// (`alg: "none"`) document is sealed, a sealed one under another generation
/// is opened and sealed again. Returns whether anything changed. Plaintext
/// lives in zeroizing buffers only.
pub fn rekey(
    backend: &Backend,
    service: &str,
    doc: &mut TokenDocument,
    gen: AesGen,
) -> Result<bool, ApiError> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut fields = BTreeMap::new();
    match doc.sealed_gen() {
        Some(g) if g == gen => return Ok(false),
        Some(g) => {
            for (k, v) in &doc.fields {
                let sealed = b64.decode(v).map_err(|_| {
                    tracing::error!(service, "stored field is not base64");
                    ApiError::Internal
                })?;
                let pt = backend.open_with(g, &aad(service, k), &sealed)?;
                fields.insert(
                    k.clone(),
                    b64.encode(backend.seal_with(gen, &aad(service, k), &pt)?),
                );
            }
        }
        None if doc.alg == ALG_NONE => {
            for (k, v) in &doc.fields {
                let pt = Zeroizing::new(
                    serde_json::to_vec(&Value::String(v.clone()))
                        .map_err(|_| ApiError::Internal)?,
                );
                fields.insert(
                    k.clone(),
                    b64.encode(backend.seal_with(gen, &aad(service, k), &pt)?),
                );
            }
        }
        // A format this appliance does not seal (refused when read).
        None => return Ok(false),
    }
    doc.fields = fields;
    doc.alg = ALG_SEALED.into();
    doc.enc = Some(ENC.into());
    doc.kid = Some(gen);
    Ok(true)
}

/// Seals a plaintext (`alg: "none"`) document's fields in place, under the
/// active generation; sealed documents are left as they are.
pub fn reseal(backend: &Backend, service: &str, doc: &mut TokenDocument) -> Result<(), ApiError> {
    if doc.alg != ALG_NONE {
        return Ok(());
    }
    rekey(backend, service, doc, backend.aes_active()?).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::soft::SoftBackend;
    use serde_json::json;
    use std::sync::Arc;

    fn b() -> Backend {
        Arc::new(SoftBackend::new())
    }

    #[test]
    fn unknown_fields_are_sealed_meta_is_not() {
        let b = b();
        let p = seal_token_data(&b, "github", &json!({"accessToken":"ghp_a","refreshToken":"r","customSecret":"s3cr3t-custom-value","tokenType":"JWT","expiresAt":"2026-02-17T15:30:00Z","scope":"repo","n":5,"flag":true}), Some("cid-1"), 1_700_000_000).unwrap();
        let d = &p.doc;
        assert_eq!(
            d.fields.keys().collect::<Vec<_>>(),
            ["accessToken", "customSecret", "flag", "n", "refreshToken"]
        );
        // Values long enough (and with characters outside base64) that a
        // ciphertext cannot contain them by chance.
        let text = serde_json::to_string(d).unwrap();
        for secret in ["ghp_a", "s3cr3t-custom-value"] {
            assert!(!text.contains(secret));
        }
        assert_eq!(d.meta["tokenType"], "JWT");
        assert_eq!(d.meta["expiryTime"], 1771342200000i64);
        assert_eq!(d.meta["scope"], "repo");
        assert_eq!(d.meta["hasRefreshToken"], true);
        assert_eq!(d.meta["creationId"], "cid-1");
        let opened = open_fields(&b, "github", d).unwrap();
        assert_eq!(opened["accessToken"], "ghp_a");
        assert_eq!(opened["n"], 5);
        assert_eq!(opened["flag"], true);
    }

    #[test]
    fn ciphertext_bound_to_service_and_field() {
        let b = b();
        let mut d = seal_token_data(
            &b,
            "github",
            &json!({"accessToken":"ghp_a","refreshToken":"r"}),
            None,
            1_700_000_000,
        )
        .unwrap()
        .doc;
        assert!(
            open_fields(&b, "gitlab", &d).is_err(),
            "moved to another service"
        );
        let a = d.fields["accessToken"].clone();
        d.fields.insert("refreshToken".into(), a);
        assert!(
            open_fields(&b, "github", &d).is_err(),
            "moved to another field"
        );
    }

    #[test]
    fn validation_names_fields_never_values() {
        let b = b();
        for (td, needle) in [
            (json!("str"), "tokenData must be an object"),
            (
                json!({"accessToken": {"nested": "sekrit"}}),
                "tokenData.accessToken",
            ),
            (json!({"accessToken": ["sekrit"]}), "tokenData.accessToken"),
            (json!({"tokenType":"JWT"}), "carries no credential"),
            (
                json!({"accessToken":"x","expiresAt":"sekrit-date"}),
                "tokenData.expiresAt",
            ),
        ] {
            let e = seal_token_data(&b, "s", &td, None, 1_700_000_000)
                .err()
                .unwrap();
            let m = e.message();
            assert!(m.contains(needle), "{m}");
            assert!(!m.contains("sekrit"));
        }
    }

    #[test]
    fn token_types_inferred() {
        let b = b();
        for (td, t) in [
            (json!({"accessToken":"x"}), "PlainText"),
            (json!({"accessToken":"x","refreshToken":"y"}), "JWT"),
            (
                json!({"certificateData":"c","privateKeyData":"k"}),
                "Certificate",
            ),
            (json!({"sshPrivateKey":"k"}), "SSHKey"),
            (json!({"totpSecret":"JBSWY3DPEHPK3PXP"}), "TOTP"),
            (json!({"accessToken":"{}","tokenType":"Raw"}), "Raw"),
        ] {
            assert_eq!(
                seal_token_data(&b, "s", &td, None, 1_700_000_000)
                    .unwrap()
                    .doc
                    .meta["tokenType"],
                t
            );
        }
    }

    /// vectors.json `otpauthAccept` through the store path: the sealed
    /// document's metadata holds every field the vector names, tokenType
    /// included.
    #[test]
    fn otpauth_accept_vectors_give_the_vectors_metadata() {
        let b = b();
        for v in crate::testvectors::list("otpauthAccept") {
            let uri = crate::testvectors::s(v, "uri");
            let p = seal_token_data(&b, "s", &json!({ "totpUri": uri }), None, 1_700_000_000)
                .unwrap_or_else(|e| panic!("{uri}: {}", e.message()));
            for (k, want) in v["meta"].as_object().unwrap() {
                assert_eq!(p.doc.meta.get(k), Some(want), "{uri}: {k}");
            }
        }
    }

    #[test]
    fn plaintext_documents_are_readable_and_resealed() {
        let b = b();
        let mut d = TokenDocument {
            v: 1,
            alg: "none".into(),
            enc: None,
            kid: None,
            fields: [("accessToken".to_string(), "ghp_plain".to_string())].into(),
            meta: Map::new(),
            otp: None,
        };
        assert_eq!(
            open_fields(&b, "gh", &d).unwrap()["accessToken"],
            "ghp_plain"
        );
        reseal(&b, "gh", &mut d).unwrap();
        assert_eq!(d.alg, ALG_SEALED);
        assert!(!serde_json::to_string(&d).unwrap().contains("ghp_plain"));
        assert_eq!(
            open_fields(&b, "gh", &d).unwrap()["accessToken"],
            "ghp_plain"
        );
    }
}
