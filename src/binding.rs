//! Binding: one-time codes, each owning a fresh HMAC secret sealed under the
//! backend's AES key until `/v1/exchange` installs it as the HMAC key.

use crate::keys::{Backend, KeyError};
use crate::store::{BindCode, BindOutcome, Store, StoreError};
use base64::Engine;
use secrecy::SecretSlice;
use serde::Serialize;
use zeroize::Zeroizing;

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Registration {
    pub registration_url: String,
    pub code: String,
    pub expires_in: i64,
    pub webhook_url: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("key backend: {0}")]
    Keys(#[from] KeyError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("bind code expired or unknown")]
    Expired,
    #[error("bind code already used")]
    Used,
    #[error("invalid frontend URL")]
    BadFrontend,
}

fn aad(code: &str) -> Vec<u8> {
    format!("tokenvault-webhook/bind-code/v1/{code}").into_bytes()
}

/// `rotate-key`: an unused code with its secret sealed under `gen`, or
/// `None` if there is nothing to change.
/// Whether an outstanding code's sealed secret opens under the keys
/// (`restore` checks every one). Used or empty codes have nothing sealed.
pub fn code_opens(backend: &Backend, code: &str, rec: &BindCode) -> Result<(), BindError> {
    if rec.used || rec.sealed_secret.is_empty() {
        return Ok(());
    }
    let sealed = base64::engine::general_purpose::STANDARD
        .decode(&rec.sealed_secret)
        .map_err(|_| StoreError::Corrupt("bind code"))?;
    backend.open(&aad(code), &sealed)?;
    Ok(())
}

pub fn rekey_code(
    backend: &Backend,
    code: &str,
    rec: &BindCode,
    gen: crate::keys::AesGen,
) -> Result<Option<BindCode>, BindError> {
    if rec.used || rec.sealed_secret.is_empty() {
        return Ok(None);
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let sealed = b64
        .decode(&rec.sealed_secret)
        .map_err(|_| StoreError::Corrupt("bind code"))?;
    Ok(
        crate::keys::reseal_blob(backend.as_ref(), gen, &aad(code), &sealed)?.map(|s| BindCode {
            sealed_secret: b64.encode(s),
            ..rec.clone()
        }),
    )
}

/// Creates a code and its sealed secret. The caller persists the record.
pub fn prepare(
    backend: &Backend,
    frontend_url: &str,
    public_url: &str,
    ttl: i64,
    now: i64,
) -> Result<(Registration, BindCode), BindError> {
    let mut rnd = [0u8; 16];
    backend.fill_random(&mut rnd)?;
    let code = uuid::Builder::from_random_bytes(rnd)
        .into_uuid()
        .to_string();
    let mut secret = Zeroizing::new([0u8; 32]);
    backend.fill_random(secret.as_mut())?;
    let hash = crate::protocol::registration_hmac_hash(secret.as_ref());
    let sealed = backend.seal(&aad(&code), secret.as_ref())?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut url = url::Url::parse(&format!(
        "{}/vault/webhook-bind",
        frontend_url.trim_end_matches('/')
    ))
    .map_err(|_| BindError::BadFrontend)?;
    url.query_pairs_mut()
        .append_pair("code", &code)
        .append_pair("webhook_url", &b64.encode(public_url))
        .append_pair("hmac_hash", &hash);
    Ok((
        Registration {
            registration_url: url.to_string(),
            code,
            expires_in: ttl,
            webhook_url: public_url.to_string(),
        },
        BindCode {
            expires_at: now + ttl,
            used: false,
            sealed_secret: b64.encode(sealed),
        },
    ))
}

/// The exchange answer's secret, zeroized when dropped.
pub struct Exchanged {
    pub secret: Zeroizing<Vec<u8>>,
}

/// One exchange at a time in this process: each installs a key, commits it
/// and destroys every other key, so two running together could each destroy
/// the key the other had just committed.
static EXCHANGE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Validates the code, installs its secret as the new HMAC key (a re-bind
/// rotates the key: the old one is destroyed), and returns the secret.
/// Exchanges are serialised: of concurrent ones, each runs alone.
pub async fn exchange(
    backend: &Backend,
    store: &Store,
    code: &str,
    now: i64,
) -> Result<Exchanged, BindError> {
    let _one = EXCHANGE.lock().await;
    let rec = store.bind_code(code)?.ok_or(BindError::Expired)?;
    if rec.used {
        return Err(BindError::Used);
    }
    if rec.expires_at <= now {
        return Err(BindError::Expired);
    }
    let sealed = base64::engine::general_purpose::STANDARD
        .decode(&rec.sealed_secret)
        .map_err(|_| StoreError::Corrupt("bind code"))?;
    let secret = backend.open(&aad(code), &sealed)?;
    // A TPM seals the new secret (tens of ms): off the async workers.
    let (b, s) = (backend.clone(), SecretSlice::from(secret.to_vec()));
    let key_id = tokio::task::spawn_blocking(move || b.install_hmac(&s))
        .await
        .map_err(|_| crate::keys::KeyError::Unavailable)??;
    match store.complete_binding(code, &key_id.0, now).await {
        Ok(BindOutcome::Bound { previous }) => {
            backend.activate_hmac(&key_id)?;
            match backend.destroy_hmac_except(Some(&key_id)) {
                Ok(n) if n > 0 => {
                    tracing::info!(destroyed = n, previous = ?previous, "previous HMAC key destroyed (re-bind)")
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "could not destroy previous HMAC key; it is removed at next start")
                }
            }
            Ok(Exchanged { secret })
        }
        other => {
            // Lost a race with a concurrent exchange, or the store failed:
            // remove the key we just installed, keep the active one.
            let active = store
                .meta_get(crate::store::META_HMAC_KEY_ID)
                .ok()
                .flatten()
                .map(|v| crate::keys::HmacKeyId(String::from_utf8_lossy(&v).into_owned()));
            if let Err(e) = backend.destroy_hmac_except(active.as_ref()) {
                tracing::warn!(error = %e, "could not remove unused HMAC key");
            }
            match other? {
                BindOutcome::Used => Err(BindError::Used),
                _ => Err(BindError::Expired),
            }
        }
    }
}

/// At start: activate the recorded HMAC key and destroy any orphan left by a
/// crash between install and commit. Returns whether the webhook is bound.
/// On a store shared by several nodes, orphans are left alone: a key
/// another node has installed and is about to commit looks the same (the
/// next exchange, on any node, destroys every key but its own).
pub fn restore_active_key(backend: &Backend, store: &Store) -> Result<bool, BindError> {
    let active = store
        .meta_get(crate::store::META_HMAC_KEY_ID)?
        .map(|v| crate::keys::HmacKeyId(String::from_utf8_lossy(&v).into_owned()));
    if let Some(id) = &active {
        backend.activate_hmac(id)?;
    }
    if store.is_shared() {
        return Ok(active.is_some());
    }
    let n = backend.destroy_hmac_except(active.as_ref())?;
    if n > 0 {
        tracing::warn!(
            removed = n,
            "removed HMAC keys left over from an interrupted bind"
        );
    }
    Ok(active.is_some())
}

/// Several nodes on one store: the HMAC key another node's exchange made
/// active, if it is not the one `last` says this node uses. Activates it
/// (the old one then fails here too) and records it in `last`. Returns
/// whether it changed.
pub fn follow_active_key(
    backend: &Backend,
    store: &Store,
    last: &mut Option<String>,
) -> Result<bool, BindError> {
    let now = store
        .meta_get(crate::store::META_HMAC_KEY_ID)?
        .map(|v| String::from_utf8_lossy(&v).into_owned());
    if now == *last {
        return Ok(false);
    }
    if let Some(id) = &now {
        backend.activate_hmac(&crate::keys::HmacKeyId(id.clone()))?;
    }
    *last = now;
    Ok(true)
}
