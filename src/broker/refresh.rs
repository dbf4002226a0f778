//! Refresh flows: `/v1/refresh-notify` (the appliance refreshes with its own
//! OAuth client) and `/v1/refresh` (Token Vault refreshes; capability
//! `tv-refresh`). A refresh replaces only the token fields; every other field
//! and meta key is preserved, and a failed refresh changes nothing.

use super::oauth::{self, ClientAuth};
use crate::clock::Clock;
use crate::custody::fields::{self, open_field, seal_field};
use crate::keys::Backend;
use crate::protocol::document::{public_meta, TokenDocument};
use crate::protocol::storage::Collection;
use crate::protocol::ApiError;
use crate::store::{Store, StoreError};
use futures::future::{BoxFuture, FutureExt, Shared};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use time::format_description::well_known::Rfc3339;
use zeroize::Zeroizing;

/// What the refresh flows use of the appliance (cheap to clone: a
/// refresh in flight owns one).
#[derive(Clone)]
pub struct Deps {
    pub backend: Backend,
    pub store: Store,
    pub refresher: std::sync::Arc<Refresher>,
    pub clock: Clock,
}

/// A refresh in flight: its id (only its starter removes it) and its future.
type Flight = (u64, Shared<BoxFuture<'static, Outcome>>);

pub struct Refresher {
    http: reqwest::Client,
    inflight: Mutex<HashMap<String, Flight>>,
    next_flight: std::sync::atomic::AtomicU64,
    /// Notifications that joined a refresh already in flight.
    joined: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub status: &'static str,
    pub new_expires_at: Option<String>,
}

fn outcome(status: &'static str) -> Outcome {
    Outcome {
        status,
        new_expires_at: None,
    }
}

pub fn iso(ms: i64) -> Option<String> {
    time::OffsetDateTime::from_unix_timestamp(ms / 1000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
}

impl Refresher {
    pub fn new() -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            // No idle connections: their buffers would keep the last
            // provider answer (new tokens) in memory.
            .pool_max_idle_per_host(0)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Refresher {
            http,
            inflight: Mutex::new(HashMap::new()),
            next_flight: std::sync::atomic::AtomicU64::new(1),
            joined: std::sync::atomic::AtomicU64::new(0),
        })
    }
}

/// New token material to store.
pub struct NewTokens {
    pub access: Zeroizing<String>,
    pub refresh: Option<Zeroizing<String>>,
    pub expiry_ms: i64,
}

pub enum UpdateOutcome {
    Updated,
    NoToken,
    /// The document changed since `expected` was read; nothing written.
    Conflict,
}

/// Seals the new tokens into the stored document, preserving everything
/// else, with compare-and-set on the bytes read (`expected`, or the current
/// document when `None`).
pub async fn update_tokens(
    d: &Deps,
    service: &str,
    t: &NewTokens,
    expected: Option<Vec<u8>>,
) -> Result<UpdateOutcome, ApiError> {
    let Some(raw) = d.store.get_raw(Collection::Tokens, service)? else {
        return Ok(UpdateOutcome::NoToken);
    };
    if expected.as_ref().is_some_and(|e| *e != raw) {
        return Ok(UpdateOutcome::Conflict);
    }
    let mut doc: TokenDocument =
        serde_json::from_slice(&raw).map_err(|_| StoreError::Corrupt("token document"))?;
    // The whole document under the active generation, then the new tokens
    // under the same one.
    let gen = d.backend.aes_active()?;
    fields::rekey(&d.backend, service, &mut doc, gen)?;
    doc.fields.insert(
        "accessToken".into(),
        seal_field(
            &d.backend,
            service,
            gen,
            "accessToken",
            &Value::String(t.access.to_string()),
        )?,
    );
    if let Some(r) = &t.refresh {
        doc.fields.insert(
            "refreshToken".into(),
            seal_field(
                &d.backend,
                service,
                gen,
                "refreshToken",
                &Value::String(r.to_string()),
            )?,
        );
    }
    doc.meta.insert(
        "updatedAt".into(),
        Value::String(crate::clock::rfc3339(d.clock.now())),
    );
    doc.meta
        .insert("expiryTime".into(), Value::from(t.expiry_ms));
    doc.meta.insert(
        "hasRefreshToken".into(),
        Value::Bool(doc.fields.contains_key("refreshToken")),
    );
    if d.store
        .replace_token_if_unchanged(service.to_string(), raw, doc)
        .await?
    {
        Ok(UpdateOutcome::Updated)
    } else {
        Ok(UpdateOutcome::Conflict)
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct RefreshHint {
    pub provider: Option<String>,
    pub token_url: Option<String>,
}

/// The body of `/v1/refresh-notify`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NotifyRequest {
    pub request_id: Option<String>,
    pub service: Option<String>,
    #[serde(default)]
    pub refresh_hint: Option<RefreshHint>,
}

/// Single flight per service: concurrent notifications share one refresh.
/// Only the notification that started a refresh removes its entry (a waiter
/// that finishes first must not drop a newer refresh's entry).
pub async fn notify(
    d: &Deps,
    service: String,
    provider: Option<String>,
    hinted_url: Option<String>,
) -> Outcome {
    let r = &d.refresher;
    let (fut, owner) = {
        let Ok(mut map) = r.inflight.lock() else {
            return outcome("error");
        };
        if let Some((_, f)) = map.get(&service) {
            r.joined.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            (f.clone(), None)
        } else {
            let d2 = d.clone();
            let svc = service.clone();
            let f = async move {
                run_refresh(&d2, &svc, provider.as_deref(), hinted_url.as_deref()).await
            }
            .boxed()
            .shared();
            let id = r
                .next_flight
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            map.insert(service.clone(), (id, f.clone()));
            (f, Some(id))
        }
    };
    let o = fut.await;
    if let Some(id) = owner {
        remove_flight(&r.inflight, &service, id);
    }
    o
}

impl Refresher {
    /// Notifications so far that joined a refresh already in flight.
    pub fn joined(&self) -> u64 {
        self.joined.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Removes `service`'s single-flight entry if it is still flight `id`.
fn remove_flight(inflight: &Mutex<HashMap<String, Flight>>, service: &str, id: u64) {
    if let Ok(mut map) = inflight.lock() {
        if map.get(service).is_some_and(|(cur, _)| *cur == id) {
            map.remove(service);
        }
    }
}

async fn run_refresh(
    d: &Deps,
    service: &str,
    provider: Option<&str>,
    hinted_url: Option<&str>,
) -> Outcome {
    // The protocol's answers for a missing token (or refresh token) hold
    // whether or not a client is configured: `acknowledged` would promise
    // a refresh that can never happen.
    match refreshable(d, service) {
        Ok(None) => {}
        Ok(Some(o)) => return o,
        Err(e) => {
            tracing::error!(service, error = %e, "refresh-notify failed");
            return outcome("error");
        }
    }
    let client = oauth::for_service(&d.store, service);
    if let Some(p) = provider.filter(|p| client.as_ref().is_none_or(|c| oauth::key(p) != c.name)) {
        // The hint never chooses the client: a refresh token goes only to
        // the client registered for its service.
        tracing::warn!(service, hinted = %p, "refresh-notify: refreshHint.provider names another client than the service's; ignored");
    }
    let Some(client) = client else {
        tracing::info!(
            service,
            "refresh-notify: no local OAuth client; acknowledged"
        );
        return outcome("acknowledged");
    };
    if let Some(h) = hinted_url.filter(|h| *h != client.token_url) {
        // Never follow the hint: the secret goes only to the registered URL.
        tracing::warn!(service, client = %client.name, hinted = %h, "refresh-notify: hinted tokenUrl differs from the registered one; ignored");
    }
    match refresh_with(d, service, &client).await {
        Ok(o) => o,
        Err(e) => {
            tracing::error!(service, error = %e, "refresh-notify failed");
            outcome("error")
        }
    }
}

/// `no_token` / `no_refresh_token` when there is nothing to refresh, else
/// `None` (the metadata says whether a refresh token is held; nothing is
/// decrypted here).
fn refreshable(d: &Deps, service: &str) -> Result<Option<Outcome>, ApiError> {
    let Some(raw) = d.store.get_raw(Collection::Tokens, service)? else {
        return Ok(Some(outcome("no_token")));
    };
    let doc: TokenDocument =
        serde_json::from_slice(&raw).map_err(|_| StoreError::Corrupt("token document"))?;
    if !doc.fields.contains_key("refreshToken") {
        return Ok(Some(outcome("no_refresh_token")));
    }
    Ok(None)
}

async fn refresh_with(
    d: &Deps,
    service: &str,
    client: &oauth::OAuthClient,
) -> Result<Outcome, ApiError> {
    let Some(raw) = d.store.get_raw(Collection::Tokens, service)? else {
        return Ok(outcome("no_token"));
    };
    let doc: TokenDocument =
        serde_json::from_slice(&raw).map_err(|_| StoreError::Corrupt("token document"))?;
    let refresh = match open_field(&d.backend, service, &doc, "refreshToken")? {
        Some(Value::String(r)) if !r.is_empty() => Zeroizing::new(r),
        _ => return Ok(outcome("no_refresh_token")),
    };
    let secret = client.secret(&d.backend)?;
    let mut rb = d
        .refresher
        .http
        .post(&client.token_url)
        .header("accept", "application/json");
    let body = {
        let mut form = url::form_urlencoded::Serializer::new(String::new());
        form.append_pair("grant_type", "refresh_token")
            .append_pair("refresh_token", &refresh);
        match client.auth {
            ClientAuth::Post => {
                form.append_pair("client_id", &client.client_id)
                    .append_pair("client_secret", &secret);
            }
            ClientAuth::Basic => {
                let enc = |x: &str| {
                    url::form_urlencoded::byte_serialize(x.as_bytes()).collect::<String>()
                };
                let creds = Zeroizing::new(format!("{}:{}", enc(&client.client_id), enc(&secret)));
                rb = rb.header(
                    "authorization",
                    format!(
                        "Basic {}",
                        base64::Engine::encode(
                            &base64::engine::general_purpose::STANDARD,
                            creds.as_bytes()
                        )
                    ),
                );
            }
        }
        Zeroizing::new(form.finish())
    };
    drop(secret);
    drop(refresh);
    let resp = match rb
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body.as_bytes().to_vec())
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(service, client = %client.name, timeout = e.is_timeout(), "OAuth provider unreachable");
            return Ok(outcome("refresh_failed"));
        }
    };
    let status = resp.status();
    let bytes = Zeroizing::new(resp.bytes().await.map(|b| b.to_vec()).unwrap_or_default());
    if !status.is_success() {
        tracing::warn!(service, client = %client.name, status = status.as_u16(), "OAuth provider refused the refresh");
        return Ok(outcome("refresh_failed"));
    }
    let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let Some(access) = v
        .get("access_token")
        .and_then(Value::as_str)
        .filter(|a| !a.is_empty())
    else {
        tracing::warn!(service, client = %client.name, "OAuth provider reply has no access_token");
        return Ok(outcome("refresh_failed"));
    };
    let expires_in = v
        .get("expires_in")
        .and_then(Value::as_i64)
        .unwrap_or(3600)
        .max(0);
    let expiry_ms = (d.clock.now() + expires_in) * 1000;
    let t = NewTokens {
        access: Zeroizing::new(access.to_string()),
        refresh: v
            .get("refresh_token")
            .and_then(Value::as_str)
            .filter(|r| !r.is_empty())
            .map(|r| Zeroizing::new(r.to_string())),
        expiry_ms,
    };
    Ok(match update_tokens(d, service, &t, Some(raw)).await? {
        UpdateOutcome::Updated => Outcome {
            status: "refreshed",
            new_expires_at: iso(expiry_ms),
        },
        UpdateOutcome::NoToken => outcome("no_token"),
        UpdateOutcome::Conflict => {
            tracing::warn!(
                service,
                "token document changed during refresh; refreshed tokens not stored"
            );
            outcome("error")
        }
    })
}

/// The body of `/v1/refresh`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TvRefreshRequest {
    pub request_id: Option<String>,
    pub action: Option<String>,
    pub service: Option<String>,
    pub tokens: Option<Map<String, Value>>,
}

/// `/v1/refresh` `get`: what Token Vault gets back.
pub enum TvGet {
    NoToken,
    NoRefreshToken,
    /// The refresh token, and the token's public metadata.
    RefreshToken {
        token: Zeroizing<String>,
        meta: Map<String, Value>,
    },
}

/// The refresh token of `service`, for Token Vault to refresh with.
pub fn tv_get(d: &Deps, service: &str) -> Result<TvGet, ApiError> {
    let Some(raw) = d.store.get_raw(Collection::Tokens, service)? else {
        return Ok(TvGet::NoToken);
    };
    let doc: TokenDocument =
        serde_json::from_slice(&raw).map_err(|_| StoreError::Corrupt("token document"))?;
    let token = match open_field(&d.backend, service, &doc, "refreshToken")? {
        Some(Value::String(r)) if !r.is_empty() => Zeroizing::new(r),
        _ => return Ok(TvGet::NoRefreshToken),
    };
    tracing::info!(service = %service, "tv-refresh: refresh token handed to Token Vault");
    Ok(TvGet::RefreshToken {
        token,
        meta: public_meta(doc.meta),
    })
}

/// `/v1/refresh` `update`: Token Vault's refreshed tokens sealed into the
/// document (everything else kept). `Some(expiry ms)` once written, `None`
/// when there is no such token.
pub async fn tv_update(
    d: &Deps,
    service: &str,
    tokens: &Map<String, Value>,
) -> Result<Option<i64>, ApiError> {
    let access = tokens
        .get("accessToken")
        .and_then(Value::as_str)
        .filter(|a| !a.is_empty())
        .ok_or_else(|| ApiError::invalid("Missing required field: tokens.accessToken"))?;
    let expiry_ms = match tokens.get("expiryTime") {
        Some(v) => v.as_i64().ok_or_else(|| {
            ApiError::invalid("Field tokens.expiryTime must be ms since the epoch")
        })?,
        None => (d.clock.now() + 3600) * 1000,
    };
    let t = NewTokens {
        access: Zeroizing::new(access.to_string()),
        refresh: tokens
            .get("refreshToken")
            .and_then(Value::as_str)
            .filter(|r| !r.is_empty())
            .map(|r| Zeroizing::new(r.to_string())),
        expiry_ms,
    };
    let mut tries = 0;
    loop {
        match update_tokens(d, service, &t, None).await? {
            UpdateOutcome::Updated => return Ok(Some(expiry_ms)),
            UpdateOutcome::NoToken => return Ok(None),
            UpdateOutcome::Conflict if tries < 3 => tries += 1,
            UpdateOutcome::Conflict => return Err(ApiError::Internal),
        }
    }
}
