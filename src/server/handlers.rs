//! Health, storage and exchange.

use super::auth::{read_body, Signed};
use super::AppState;
use crate::binding;
use crate::custody::fields::{self, merge_meta, seal_token_data};
use crate::protocol::document::{public_meta, TokenDocument, CREDENTIAL_KEYS, OWNER_POLICY};
use crate::protocol::storage::{Collection, ListOptions, StorageRequest};
use crate::protocol::{ApiError, VERSION};
use crate::store::{PutOutcome, StoreError};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use serde_json::{json, Map, Value};

// ---- health -------------------------------------------------------------

fn health_body(s: &AppState) -> Value {
    let mut healthy = s.backend.healthy();
    if !healthy {
        // Probe so a device that came back is noticed without a restart.
        healthy = s.backend.probe().is_ok();
    }
    let token_count = s.store.count(Collection::Tokens);
    // A certificate with under 7 days left means renewal is failing (ACME
    // renews at two thirds of the lifetime) or nobody renewed the file.
    let tls_left = s.tls_seconds_left();
    let tls_ok = tls_left.is_none_or(|l| l >= 7 * 86_400);
    // A store in a database that is unreachable: degraded (and key paths
    // answer 503) until the probe sees it again.
    let store_up = s.store.engine_health().up();
    let status = if healthy && store_up && token_count.is_ok() && tls_ok {
        "healthy"
    } else {
        "degraded"
    };
    let mut body = json!({
        "status": status,
        "version": VERSION,
        "keyConfigured": s.backend.aes_key_present(),
        "capabilities": s.capabilities(),
        "uptime": s.started.elapsed().as_secs(),
        "tokenCount": token_count.unwrap_or(0),
    });
    if let Some(l) = tls_left {
        body["tlsCertificateDaysLeft"] = json!(l.div_euclid(86_400));
    }
    body
}

pub async fn health_public(State(s): State<AppState>) -> Json<Value> {
    Json(health_body(&s))
}

pub async fn health_signed(State(s): State<AppState>, signed: Signed) -> Json<Value> {
    let mut v = health_body(&s);
    if let Some(rid) = body_request_id(&signed) {
        v["requestId"] = Value::String(rid);
    }
    Json(v)
}

fn body_request_id(signed: &Signed) -> Option<String> {
    serde_json::from_slice::<Value>(&signed.body)
        .ok()
        .and_then(|v| {
            v.get("requestId")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
}

// ---- exchange -----------------------------------------------------------

pub async fn exchange(State(s): State<AppState>, req: Request) -> Result<Response, ApiError> {
    let client = super::shield::client_of(&s, &req);
    s.http
        .shield
        .exchange_allowed(client)
        .map_err(ApiError::RateLimited)?;
    let (parts, body) = req.into_parts();
    let body = read_body(&s, &parts, body, super::shield::EXCHANGE_BODY_LIMIT).await?;
    let v: Value = serde_json::from_slice(&body)
        .map_err(|_| ApiError::invalid("Request body must be a JSON object"))?;
    let code = v
        .get("code")
        .and_then(Value::as_str)
        .filter(|c| !c.is_empty())
        .ok_or_else(|| ApiError::invalid("Missing required field: code"))?;
    if code.len() > 64 {
        return Err(ApiError::CodeExpired);
    }
    let ex = binding::exchange(&s.backend, &s.store, code, s.now()).await?;
    crate::store::trail::note(|n| n.authenticated = true);
    s.set_bound();
    tracing::info!(webhook_id = %s.settings.webhook_id, "bound: HMAC key installed from exchange");
    let secret_b64 = zeroize::Zeroizing::new(
        base64::engine::general_purpose::STANDARD.encode(ex.secret.as_slice()),
    );
    super::custody::secret_json(&json!({
        "hmacSecret": secret_b64.as_str(),
        "webhookId": s.settings.webhook_id,
        "version": VERSION,
        "capabilities": s.capabilities(),
    }))
}

// ---- storage ------------------------------------------------------------

const MAX_KEY_LEN: usize = 256;

fn valid_key(k: &str) -> bool {
    !k.is_empty() && k.len() <= MAX_KEY_LEN && !k.contains('\0')
}

fn required_key(r: &StorageRequest) -> Result<String, ApiError> {
    let k = r
        .key
        .as_deref()
        .ok_or_else(|| ApiError::invalid("Missing required field: key"))?;
    if !valid_key(k) {
        return Err(ApiError::invalid(format!(
            "Field key must be 1-{MAX_KEY_LEN} bytes without NUL"
        )));
    }
    Ok(k.to_string())
}

fn collection(name: Option<&str>) -> Result<Collection, ApiError> {
    let name = name.ok_or_else(|| ApiError::invalid("Missing required field: collection"))?;
    Collection::parse(name).ok_or_else(|| ApiError::invalid("Unknown collection"))
}

/// The parts of a stored token document that may leave the appliance.
/// `fields` is skipped by the parser, never copied.
#[derive(serde::Deserialize)]
struct TokenMetaView {
    #[serde(default)]
    v: u32,
    #[serde(default)]
    alg: String,
    #[serde(default)]
    meta: Map<String, Value>,
}

/// What a token document looks like outside the appliance: never its
/// fields; its meta as in the listing item (allowlisted, `serviceName`
/// defaulting to the key, `ownerPolicy` when the owner set a policy).
pub(super) fn token_view(raw: &[u8], key: &str, owner_policy: bool) -> Result<Value, StoreError> {
    let doc: TokenMetaView =
        serde_json::from_slice(raw).map_err(|_| StoreError::Corrupt("token document"))?;
    let mut meta = public_meta(doc.meta);
    meta.entry("serviceName")
        .or_insert_with(|| Value::String(key.to_string()));
    if owner_policy {
        meta.insert(OWNER_POLICY.into(), Value::Bool(true));
    }
    Ok(json!({"v": doc.v, "alg": doc.alg, "meta": Value::Object(meta)}))
}

fn obj(pairs: [(&str, Value); 2]) -> Value {
    Value::Object(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

pub(super) fn project(c: Collection) -> impl Fn(&[u8], &[u8]) -> Result<Value, StoreError> {
    move |k: &[u8], v: &[u8]| {
        let key = String::from_utf8_lossy(k).into_owned();
        match c {
            // Listed from the tokens' listing items, and audit records
            // are stored as {key, data}: already the wire shape.
            Collection::Tokens | Collection::Audit => {
                serde_json::from_slice(v).map_err(|_| StoreError::Corrupt("listing item"))
            }
            Collection::ProxyConfigs | Collection::VaultConfig => {
                let data: Value =
                    serde_json::from_slice(v).map_err(|_| StoreError::Corrupt("document"))?;
                Ok(obj([("key", Value::String(key)), ("data", data)]))
            }
        }
    }
}

fn list_limit(o: &ListOptions) -> Result<Option<usize>, ApiError> {
    match o.limit {
        None => Ok(None),
        Some(l) if l >= 1 => Ok(Some(l as usize)),
        Some(_) => Err(ApiError::invalid(
            "options.limit must be a positive integer",
        )),
    }
}

/// `list` of `tokens` without filters, the hot listing: the answer is
/// assembled from the listing items rendered at write time.
fn list_tokens_raw(s: &AppState, o: &ListOptions, rid: &str) -> Result<Response, ApiError> {
    let copy = |_: &[u8], item: &[u8]| Ok(item.to_vec());
    let (items, page) = s.store.list_as(
        Collection::Tokens,
        true,
        list_limit(o)?,
        o.after.as_deref(),
        None,
        &copy,
    )?;
    let len: usize = items.iter().map(|i| i.len() + 1).sum();
    let mut body = Vec::with_capacity(len + 128);
    body.extend_from_slice(b"{\"items\":[");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(item);
    }
    body.extend_from_slice(b"],\"pagination\":");
    serde_json::to_writer(&mut body, &page).map_err(|_| ApiError::Internal)?;
    body.extend_from_slice(b",\"requestId\":");
    serde_json::to_writer(&mut body, rid).map_err(|_| ApiError::Internal)?;
    body.push(b'}');
    Ok((
        StatusCode::OK,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response())
}

fn list_one(s: &AppState, c: Collection, o: &ListOptions) -> Result<Value, ApiError> {
    let limit = list_limit(o)?;
    let filter_field = if c == Collection::Tokens {
        "meta"
    } else {
        "data"
    };
    let r = s.store.list(
        c,
        limit,
        o.after.as_deref(),
        o.filters.as_ref(),
        filter_field,
        &project(c),
    )?;
    let mut page = Map::new();
    page.insert("hasMore".into(), Value::Bool(r.pagination.has_more));
    if let Some(n) = r.pagination.next_cursor {
        page.insert("nextCursor".into(), Value::String(n));
    }
    page.insert("totalCount".into(), Value::from(r.pagination.total_count));
    Ok(obj([
        ("items", Value::Array(r.items)),
        ("pagination", Value::Object(page)),
    ]))
}

/// What a `/v1/storage set` on `tokens` asks for.
enum TokenWrite {
    /// Metadata only: merged onto the document, sealed fields kept.
    Meta(Map<String, Value>),
    /// Carries plaintext credential fields: sealed like `/v1/store`, plus meta.
    Credential {
        token_data: Value,
        meta: Map<String, Value>,
    },
}

fn token_write(data: &Value) -> Result<TokenWrite, ApiError> {
    let obj = data
        .as_object()
        .ok_or_else(|| ApiError::invalid("Field data must be an object"))?;
    let meta = match obj.get("meta") {
        Some(Value::Object(m)) => m.clone(),
        Some(_) => return Err(ApiError::invalid("Field data.meta must be an object")),
        None => Map::new(),
    };
    let has_fields = obj
        .get("fields")
        .is_some_and(|f| f.as_object().is_some_and(|o| !o.is_empty()));
    if has_fields {
        if obj
            .get("alg")
            .and_then(Value::as_str)
            .is_some_and(|a| a != fields::ALG_NONE)
        {
            return Err(ApiError::invalid(
                "Encrypted fields from another webhook cannot be stored here; use `tokenvault-webhook import`",
            ));
        }
        let mut td = obj.get("fields").cloned().unwrap_or(Value::Null);
        if let (Some(t), Some(m)) = (td.as_object_mut(), Some(&meta)) {
            for k in fields::META_INPUT {
                if let Some(v) = m.get(*k) {
                    t.entry(k.to_string()).or_insert_with(|| v.clone());
                }
            }
        }
        return Ok(TokenWrite::Credential {
            token_data: td,
            meta,
        });
    }
    if CREDENTIAL_KEYS.iter().any(|k| obj.contains_key(*k)) {
        let td: Map<String, Value> = obj
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "v" | "alg" | "fields" | "meta" | "enc"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        return Ok(TokenWrite::Credential {
            token_data: Value::Object(td),
            meta,
        });
    }
    if meta.is_empty() {
        // A flat metadata object.
        let flat: Map<String, Value> = obj
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "v" | "alg" | "fields" | "enc"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        return Ok(TokenWrite::Meta(flat));
    }
    Ok(TokenWrite::Meta(meta))
}

pub async fn storage(State(s): State<AppState>, signed: Signed) -> Result<Response, ApiError> {
    let req: StorageRequest = serde_json::from_slice(&signed.body)
        .map_err(|_| ApiError::invalid("Request body must be a JSON storage request"))?;
    let rid = req
        .request_id
        .clone()
        .unwrap_or_else(|| signed.request_id.clone());
    let op = req
        .operation
        .as_deref()
        .ok_or_else(|| ApiError::invalid("Missing required field: operation"))?;
    let mut out = match op {
        "list_batch" => {
            let cols = req
                .collections
                .as_ref()
                .ok_or_else(|| ApiError::invalid("Missing required field: collections"))?;
            let opts = req.options.unwrap_or_default();
            let mut results = Map::new();
            for name in cols {
                if let Some(c) = Collection::parse(name) {
                    results.insert(name.clone(), list_one(&s, c, &opts)?);
                }
            }
            json!({"results": results})
        }
        "list" => {
            let c = collection(req.collection.as_deref())?;
            let opts = req.options.unwrap_or_default();
            if c == Collection::Tokens && opts.filters.as_ref().is_none_or(|f| f.is_empty()) {
                return list_tokens_raw(&s, &opts, &rid);
            }
            list_one(&s, c, &opts)?
        }
        "get" => {
            let c = collection(req.collection.as_deref())?;
            let key = required_key(&req)?;
            let data = match c {
                Collection::Audit => s.store.audit_get(&key)?,
                Collection::Tokens => s
                    .store
                    .token_with_policy(&key)?
                    .map(|(raw, policy)| token_view(&raw, &key, policy))
                    .transpose()?,
                _ => s
                    .store
                    .get_raw(c, &key)?
                    .map(|raw| serde_json::from_slice(&raw))
                    .transpose()
                    .map_err(|_| StoreError::Corrupt("document"))?,
            };
            json!({"data": data})
        }
        "set" => {
            let c = collection(req.collection.as_deref())?;
            let key = required_key(&req)?;
            let data = req
                .data
                .clone()
                .filter(|d| !d.is_null())
                .ok_or_else(|| ApiError::invalid("Missing required field: data"))?;
            match c {
                Collection::Audit => s.store.audit_append(key, data).await?,
                Collection::Tokens => match token_write(&data)? {
                    TokenWrite::Credential { token_data, meta } => {
                        let t = s.now();
                        let mut prepared = seal_token_data(&s.backend, &key, &token_data, None, t)?;
                        merge_meta(&mut prepared.doc, &meta, &key);
                        match super::custody::put_prepared(&s, key, prepared, None, false, t)
                            .await?
                        {
                            PutOutcome::Stored { .. } => {}
                            PutOutcome::Exists | PutOutcome::NonceUsed => {
                                return Err(ApiError::Internal)
                            }
                        }
                    }
                    TokenWrite::Meta(meta) => {
                        let k = key.clone();
                        s.store
                            .update_token(key, move |cur| {
                                let mut doc = cur.unwrap_or_else(|| TokenDocument {
                                    v: 1,
                                    alg: fields::ALG_NONE.into(),
                                    enc: None,
                                    kid: None,
                                    fields: Default::default(),
                                    meta: Map::new(),
                                    otp: None,
                                });
                                merge_meta(&mut doc, &meta, &k);
                                doc
                            })
                            .await?
                    }
                },
                Collection::ProxyConfigs | Collection::VaultConfig => {
                    let raw = serde_json::to_vec(&data).map_err(|_| ApiError::Internal)?;
                    s.store.put_raw(c, key, raw, false).await?;
                }
            }
            json!({"status": "ok"})
        }
        "delete" => {
            let c = collection(req.collection.as_deref())?;
            let key = required_key(&req)?;
            if c == Collection::Audit {
                return Err(ApiError::invalid("The audit collection is append-only"));
            }
            if c == Collection::Tokens {
                super::custody::delete_token(&s, key).await?;
            } else {
                s.store.delete_raw(c, key).await?;
            }
            json!({"status": "ok"})
        }
        _ => return Err(ApiError::invalid("Unknown operation")),
    };
    out["requestId"] = Value::String(rid);
    Ok((StatusCode::OK, Json(out)).into_response())
}
