//! Token documents as stored in the `tokens` collection, and the metadata
//! allowlist used wherever a document's meta leaves the appliance.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::collections::BTreeMap;

pub const ALG_SEALED: &str = "AES-256-GCM";
pub const ALG_NONE: &str = "none";
/// Marks this appliance's field encoding (AAD-bound, JSON plaintext).
pub const ENC: &str = "tvw-field-v1";
/// The AES key generation of sealed documents that do not record one.
pub const FIRST_KID: u32 = 1;

/// Stored form. `fields` hold sealed credential fields only (never plaintext).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenDocument {
    pub v: u32,
    pub alg: String,
    /// Field encoding of this appliance (absent in the spec's own formats).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enc: Option<String>,
    /// Generation of the AES key every field is sealed under (absent: 1,
    /// the key `init` created). `rotate-key` moves documents to the next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<u32>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fields: BTreeMap<String, String>,
    #[serde(default)]
    pub meta: Map<String, Value>,
    /// Id of the TOTP seed held as a key in the key backend (never the seed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otp: Option<String>,
}

impl TokenDocument {
    /// The key generation this document's fields need, if they are sealed
    /// in this appliance's encoding.
    pub fn sealed_gen(&self) -> Option<u32> {
        sealed_gen(&self.alg, self.enc.as_deref(), self.kid)
    }
}

fn sealed_gen(alg: &str, enc: Option<&str>, kid: Option<u32>) -> Option<u32> {
    (alg == ALG_SEALED && enc == Some(ENC)).then_some(kid.unwrap_or(FIRST_KID))
}

/// Meta keys that may leave the appliance (list, get, store answers).
pub const META_ALLOWLIST: &[&str] = &[
    "serviceName",
    "tokenType",
    "createdAt",
    "updatedAt",
    "expiryTime",
    "expiresAt",
    "hasRefreshToken",
    "scope",
    "scopes",
    "provider",
    "name",
    "displayName",
    "description",
    "tags",
    "creationId",
    "totpIssuer",
    "totpAccountName",
    "totpAlgorithm",
    "totpDigits",
    "totpPeriod",
    "hasTotpSecret",
    "refreshMode",
    "lastRefreshedAt",
    "hasCertificate",
    "hasPrivateKey",
    "hasSSHKey",
];

/// Meta keys describing the sealed fields: set by the appliance, never by `/v1/storage`.
pub const META_PROTECTED: &[&str] = &[
    "hasRefreshToken",
    "hasCertificate",
    "hasPrivateKey",
    "hasSSHKey",
    "hasTotpSecret",
    "creationId",
    "totpAlgorithm",
    "totpDigits",
    "totpPeriod",
];

/// Keys that carry credential material. `/v1/storage` refuses them in `tokens`.
pub const CREDENTIAL_KEYS: &[&str] = &[
    "accessToken",
    "refreshToken",
    "idToken",
    "clientSecret",
    "password",
    "privateKey",
    "certificate",
    "totpSecret",
    "totpUri",
    "secret",
    "apiKey",
];

/// Keeps only allowlisted meta keys (moves, no copies).
pub fn public_meta(meta: Map<String, Value>) -> Map<String, Value> {
    meta.into_iter()
        .filter(|(k, _)| META_ALLOWLIST.contains(&k.as_str()))
        .collect()
}

/// A token document's public metadata, borrowed from the stored bytes:
/// keys and values are not parsed into a `Value` tree.
#[derive(Deserialize)]
struct RawMetaView<'a> {
    #[serde(borrow, default)]
    meta: BTreeMap<Cow<'a, str>, &'a RawValue>,
    #[serde(borrow, default)]
    alg: Cow<'a, str>,
    #[serde(borrow, default)]
    enc: Option<Cow<'a, str>>,
    #[serde(default)]
    kid: Option<u32>,
}

#[derive(Serialize)]
struct RawTokenItem<'a> {
    key: &'a str,
    meta: BTreeMap<&'a str, &'a RawValue>,
}

/// The meta key that tells Token Vault the owner has set a policy for a
/// token on the appliance (`true`, never what the policy allows). It is
/// derived, never stored: a written `ownerPolicy` is not allowlisted.
pub const OWNER_POLICY: &str = "ownerPolicy";

/// A `tokens` listing item, `{"key":…,"meta":{…}}`, rendered straight from
/// the stored document: the same bytes as the `Value` path (allowlisted
/// meta, sorted keys, `serviceName` defaulting to the key, `ownerPolicy`
/// when `owner_policy`) without building and dropping a tree per item.
pub fn list_item(k: &[u8], v: &[u8], owner_policy: bool) -> Result<Vec<u8>, serde_json::Error> {
    render_item(k, v, owner_policy).map(|(item, _)| item)
}

/// [`list_item`], plus the document's [`TokenDocument::sealed_gen`] (one parse).
pub fn render_item(
    k: &[u8],
    v: &[u8],
    owner_policy: bool,
) -> Result<(Vec<u8>, Option<u32>), serde_json::Error> {
    let doc: RawMetaView = serde_json::from_slice(v)?;
    let gen = sealed_gen(&doc.alg, doc.enc.as_deref(), doc.kid);
    let key = String::from_utf8_lossy(k);
    let mut meta: BTreeMap<&str, &RawValue> = doc
        .meta
        .iter()
        .filter(|(k, _)| META_ALLOWLIST.contains(&k.as_ref()))
        .map(|(k, v)| (k.as_ref(), *v))
        .collect();
    let service;
    if !meta.contains_key("serviceName") {
        service = serde_json::value::to_raw_value(key.as_ref())?;
        meta.insert("serviceName", &service);
    }
    let flag;
    if owner_policy {
        flag = serde_json::value::to_raw_value(&true)?;
        meta.insert(OWNER_POLICY, &flag);
    }
    let mut out = Vec::with_capacity(256);
    serde_json::to_writer(&mut out, &RawTokenItem { key: &key, meta })?;
    Ok((out, gen))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Found by the token_document fuzz target: without serde_json's
    /// correctly rounded float parsing a stored number drifted by one ULP on
    /// each read-modify-write of a document.
    #[test]
    fn meta_numbers_round_trip_exactly() {
        let raw = br#"{"v":1,"alg":"none","meta":{"n":76.1e111,"m":7411e9,"x":0.1}}"#;
        let d: TokenDocument = serde_json::from_slice(raw).unwrap();
        let again: TokenDocument =
            serde_json::from_slice(&serde_json::to_vec(&d).unwrap()).unwrap();
        assert_eq!(again, d);
        assert_eq!(d.meta["n"], json!(7.61e112));
    }

    #[test]
    fn allowlist_drops_unknown_and_credential_keys() {
        let meta = json!({"serviceName":"gh","accessToken":"x","weird":1,"tokenType":"JWT"});
        let out = public_meta(meta.as_object().unwrap().clone());
        assert_eq!(
            Value::Object(out),
            json!({"serviceName":"gh","tokenType":"JWT"})
        );
        for k in CREDENTIAL_KEYS {
            assert!(!META_ALLOWLIST.contains(k), "{k} must never be public");
        }
    }
}
