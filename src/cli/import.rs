//! `import --from tokenvault_store.json --kv tokenvault_kv_store.json`: the
//! public reference webhooks' stores, re-sealed under this appliance's keys.
//!
//! - `--from`: `{"encryption_key": base64 (optional), "hmac_secret": base64}`.
//!   The HMAC secret is not imported: binding this appliance is a new
//!   `/v1/exchange` (Token Vault's record moves with the re-bind).
//! - `--kv`: `{collection: {key: document}}` (a list of `{key, data}` per
//!   collection is accepted too) for `tokens`, `proxy_configs`,
//!   `vault_config` and `audit`.
//! - Token documents: `{v:1, alg:"AES-256-GCM", fields:{name: base64(IV12 ‖
//!   ciphertext ‖ tag16)}, meta}` (no AAD; plaintext UTF-8), `alg:"none"`
//!   with plaintext fields, plaintext documents with credential keys at the
//!   top level instead of `fields`, and legacy `meta.totpUri` (enrolled like
//!   a new TOTP seed; never kept in meta). Each becomes the `tokenData` of a
//!   `/v1/store` and goes through the same sealing path.
//!
//! Existing entries are kept (counted as skipped). Decrypted values are
//! wiped when freed (the zeroizing allocator) and never printed.

use super::device::open_device;
use super::setup::{load_for_run, refuse_root};
use crate::custody::fields::{merge_meta, seal_token_data};
use crate::keys::Backend;
use crate::protocol::document::CREDENTIAL_KEYS;
use crate::protocol::storage::Collection;
use crate::store::{PutOutcome, Store};
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use anyhow::{anyhow, bail, Context, Result};
use base64::Engine;
use serde_json::{json, Map, Value};
use std::path::Path;
use zeroize::Zeroizing;

pub const REFERENCE_ALG: &str = "AES-256-GCM";

/// Decrypts one reference-format field: base64(IV12 ‖ ciphertext ‖ tag16),
/// no AAD, UTF-8 plaintext.
pub fn open_reference_field(key: &[u8; 32], b64: &str) -> Option<Zeroizing<String>> {
    let raw = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    if raw.len() < 12 + 16 {
        return None;
    }
    let (iv, ct) = raw.split_at(12);
    let iv: [u8; 12] = iv.try_into().ok()?;
    let cipher = Aes256Gcm::new_from_slice(key).ok()?;
    let pt = Zeroizing::new(
        cipher
            .decrypt(&Nonce::from(iv), Payload { msg: ct, aad: b"" })
            .ok()?,
    );
    String::from_utf8(pt.to_vec()).ok().map(Zeroizing::new)
}

fn read_json(path: &Path) -> Result<Zeroizing<Vec<u8>>> {
    Ok(Zeroizing::new(std::fs::read(path).with_context(|| {
        format!("cannot read {}", path.display())
    })?))
}

/// `{key: doc}` or `[{key, data|value}]` → (key, doc) pairs.
fn entries(v: Option<&Value>) -> Result<Vec<(String, Value)>> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Object(m)) => Ok(m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|e| {
                let k = e
                    .get("key")
                    .and_then(Value::as_str)
                    .ok_or_else(|| anyhow!("a collection entry has no key"))?;
                let d = e.get("data").or_else(|| e.get("value")).cloned();
                Ok((k.to_string(), d.unwrap_or(Value::Null)))
            })
            .collect(),
        Some(_) => bail!("a collection is neither an object nor a list"),
    }
}

/// A reference token document → the `tokenData` of a store, and its meta.
fn token_data(
    service: &str,
    doc: &Value,
    key: Option<&[u8; 32]>,
) -> Result<(Value, Map<String, Value>)> {
    let obj = doc
        .as_object()
        .ok_or_else(|| anyhow!("token {service:?}: not an object"))?;
    let mut meta = obj
        .get("meta")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let alg = obj.get("alg").and_then(Value::as_str).unwrap_or("none");
    // Freed through the zeroizing allocator, like a /v1/store body.
    let mut td = Value::Object(Map::new());
    let out = td
        .as_object_mut()
        .ok_or_else(|| anyhow!("internal: tokenData"))?;
    match obj.get("fields").and_then(Value::as_object) {
        Some(fields) => {
            for (name, v) in fields {
                let Some(s) = v.as_str().filter(|s| !s.is_empty()) else {
                    continue;
                };
                let value = match alg {
                    REFERENCE_ALG => {
                        let k = key.ok_or_else(|| {
                            anyhow!("token {service:?} is encrypted but the store file has no encryption_key")
                        })?;
                        open_reference_field(k, s).ok_or_else(|| {
                            anyhow!("token {service:?}: field {name:?} does not decrypt with the store file's key")
                        })?
                    }
                    "none" => Zeroizing::new(s.to_string()),
                    other => bail!("token {service:?}: unknown alg {other:?}"),
                };
                out.insert(name.clone(), Value::String(value.to_string()));
            }
        }
        // Plaintext documents without `fields`: credentials at the top level.
        None => {
            for k in CREDENTIAL_KEYS {
                if let Some(Value::String(s)) = obj.get(*k).filter(|v| v.is_string()) {
                    out.insert(k.to_string(), Value::String(s.clone()));
                }
            }
        }
    }
    // A legacy TOTP seed in meta: enrolled, never kept in meta.
    if let Some(uri) = meta.remove("totpUri") {
        out.insert("totpUri".into(), uri);
    }
    for k in crate::custody::fields::META_INPUT {
        if let Some(v) = meta.get(*k) {
            out.entry(k.to_string()).or_insert_with(|| v.clone());
        }
    }
    Ok((td, meta))
}

#[derive(Default)]
struct Counts {
    imported: u64,
    skipped: u64,
}

/// All or nothing up to the writes: every document is decrypted and sealed
/// before the first one is written, so a wrong key or a bad document
/// changes nothing.
async fn import_tokens(
    store: &Store,
    backend: &Backend,
    docs: Vec<(String, Value)>,
    key: Option<&[u8; 32]>,
    now: i64,
) -> Result<Counts> {
    let mut opened = Vec::with_capacity(docs.len());
    for (service, doc) in docs {
        let (td, meta) = token_data(&service, &doc, key)?;
        opened.push((service, td, meta));
    }
    let mut sealed = Vec::with_capacity(opened.len());
    for (service, td, meta) in opened {
        match seal_token_data(backend, &service, &td, None, now) {
            Ok(mut prepared) => {
                merge_meta(&mut prepared.doc, &meta, &service);
                if let Some(c) = meta.get("createdAt") {
                    prepared.doc.meta.insert("createdAt".into(), c.clone());
                }
                sealed.push((service, prepared));
            }
            Err(e) => {
                for (_, p) in &sealed {
                    if let Some(id) = &p.installed_otp {
                        let _ = backend.destroy_otp(id);
                    }
                }
                bail!("token {service:?}: {}", e.message());
            }
        }
    }
    let mut c = Counts::default();
    for (service, prepared) in sealed {
        let installed = prepared.installed_otp.clone();
        let r = store
            .put_token(service.clone(), prepared.doc, None, true, now)
            .await;
        match r {
            Ok(PutOutcome::Stored { .. }) => c.imported += 1,
            other => {
                if let Some(id) = installed {
                    let _ = backend.destroy_otp(&id);
                }
                match other {
                    Ok(_) => c.skipped += 1,
                    Err(e) => bail!("token {service:?}: {e}"),
                }
            }
        }
    }
    Ok(c)
}

async fn import_plain(store: &Store, c: Collection, docs: Vec<(String, Value)>) -> Result<Counts> {
    let mut n = Counts::default();
    for (key, data) in docs {
        let raw = serde_json::to_vec(&data)?;
        let stored = store.put_raw(c, key, raw, true).await?;
        if stored {
            n.imported += 1;
        } else {
            n.skipped += 1;
        }
    }
    Ok(n)
}

pub fn import(config: &Path, from: &Path, kv: &Path) -> Result<()> {
    let cfg = load_for_run(config)?;
    refuse_root(&cfg)?;
    let secrets: Value = serde_json::from_slice(&read_json(from)?)
        .with_context(|| format!("{} is not JSON", from.display()))?;
    let key: Option<Zeroizing<[u8; 32]>> = match secrets
        .get("encryption_key")
        .and_then(Value::as_str)
    {
        None | Some("") => None,
        Some(b64) => {
            let raw = Zeroizing::new(
                base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map_err(|_| anyhow!("encryption_key in {} is not base64", from.display()))?,
            );
            let mut k = Zeroizing::new([0u8; 32]);
            if raw.len() != 32 {
                bail!("encryption_key in {} is not 32 bytes", from.display());
            }
            k.copy_from_slice(&raw);
            Some(k)
        }
    };
    drop(secrets);
    let kv_doc: Value = serde_json::from_slice(&read_json(kv)?)
        .with_context(|| format!("{} is not JSON", kv.display()))?;
    let store = super::setup::open_store(&cfg)?;
    let backend = crate::custody::keyring::keyring(open_device(&cfg)?.backend(), &store);
    let now = crate::server::now();
    // Every collection's shape is checked before anything is written: a
    // malformed later collection must not leave the earlier ones imported.
    let token_docs = entries(kv_doc.get("tokens"))?;
    let proxy_docs = entries(kv_doc.get("proxy_configs"))?;
    let vault_docs = entries(kv_doc.get("vault_config"))?;
    let audit_docs = entries(kv_doc.get("audit"))?;
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    let report = rt.block_on(async {
        let tokens = import_tokens(&store, &backend, token_docs, key.as_deref(), now).await?;
        let proxy = import_plain(&store, Collection::ProxyConfigs, proxy_docs).await?;
        let vault = import_plain(&store, Collection::VaultConfig, vault_docs).await?;
        let mut audit = 0u64;
        for (k, data) in audit_docs {
            store.audit_append(k, data).await?;
            audit += 1;
        }
        Ok::<_, anyhow::Error>(json!({
            "tokens": {"imported": tokens.imported, "skipped": tokens.skipped},
            "proxyConfigs": {"imported": proxy.imported, "skipped": proxy.skipped},
            "vaultConfig": {"imported": vault.imported, "skipped": vault.skipped},
            "auditEvents": audit,
        }))
    })?;
    drop(kv_doc);
    println!("{}", serde_json::to_string_pretty(&report)?);
    eprintln!(
        "imported and re-sealed under this appliance's keys. The old files hold the reference webhook's keys and credentials: shred them now (shred -u {} {}), and bind this appliance to Token Vault (register-url).",
        from.display(),
        kv.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// vectors.json `tokenDocumentField`: the reference layout.
    #[test]
    fn reference_field_vector_decrypts() {
        use crate::testvectors as tv;
        let f = tv::get("tokenDocumentField");
        assert!(f["aad"].is_null(), "the reference layout has no AAD");
        let key: [u8; 32] = tv::hex_bytes(f, "keyHex").try_into().unwrap();
        let sealed = tv::s(f, "base64IvCiphertextTag");
        let raw = base64::engine::general_purpose::STANDARD
            .decode(sealed)
            .unwrap();
        assert_eq!(raw[..12], tv::hex_bytes(f, "ivHex")[..], "IV first");
        let v = open_reference_field(&key, sealed).unwrap();
        assert_eq!(v.as_str(), tv::s(f, "plaintext"));
        let mut wrong = key;
        wrong[0] ^= 1;
        assert!(open_reference_field(&wrong, sealed).is_none());
        assert!(open_reference_field(&key, "AAAA").is_none());
    }

    #[test]
    fn legacy_totp_uri_leaves_meta_and_becomes_an_enrolment() {
        let doc = json!({"v":1,"alg":"none","meta":{"tokenType":"PlainText","totpUri":"otpauth://totp/x?secret=JBSWY3DPEHPK3PXP"}});
        let (td, meta) = token_data("svc", &doc, None).unwrap();
        assert!(meta.get("totpUri").is_none());
        assert_eq!(td["totpUri"], "otpauth://totp/x?secret=JBSWY3DPEHPK3PXP");
        assert_eq!(td["tokenType"], "PlainText");
        let top = json!({"v":1,"alg":"none","accessToken":"a","meta":{}});
        let (td, _) = token_data("svc", &top, None).unwrap();
        assert_eq!(td["accessToken"], "a");
    }
}
