//! `/v1/store` and `/v1/credential`: the zero-knowledge paths.

use super::auth::read_body;
use super::{now, AppState};
use crate::custody::fields::{self, open_fields, reseal, seal_token_data};
use crate::custody::{gcp, ticket};
use crate::protocol::document::{public_meta, TokenDocument};
use crate::protocol::storage::Collection;
use crate::protocol::ApiError;
use crate::store::{PutOutcome, StoreError};
use axum::body::{Body, Bytes};
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderValue, Method};
use axum::response::Response;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use zeroize::Zeroizing;

const MAX_SERVICE_LEN: usize = 256;

fn valid_service(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_SERVICE_LEN && !s.chars().any(char::is_control)
}

/// A JSON answer whose body lives in zeroizing memory and is not cached.
pub fn secret_json(v: &Value) -> Result<Response, ApiError> {
    let body = Zeroizing::new(serde_json::to_vec(v).map_err(|_| ApiError::Internal)?);
    let mut resp = Response::new(Body::from(Bytes::from_owner(body)));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

#[derive(Deserialize)]
struct StoreBody {
    ticket: Option<String>,
    service: Option<String>,
    #[serde(rename = "tokenData")]
    token_data: Option<Value>,
}

pub async fn store(State(s): State<AppState>, req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let raw = read_body(body, &parts.headers, s.settings.body_limit).await?;
    let b: StoreBody = serde_json::from_slice(&raw)
        .map_err(|_| ApiError::invalid("Request body must be a JSON object"))?;
    drop(raw);
    let service = b
        .service
        .filter(|x| !x.is_empty())
        .ok_or_else(|| ApiError::invalid("Missing required field: service"))?;
    if !valid_service(&service) {
        return Err(ApiError::invalid("Field service is malformed"));
    }
    let raw_ticket = b
        .ticket
        .filter(|x| !x.is_empty())
        .ok_or(ApiError::TicketInvalid("Missing ticket"))?;
    let t = now();
    let tk = ticket::verify(
        &s.backend,
        &s.store,
        &raw_ticket,
        ticket::STORE,
        &service,
        t,
    )?;
    let create_only = match tk.mode.as_deref() {
        None | Some("overwrite") => false,
        Some("create") => true,
        Some(_) => return Err(ApiError::invalid("Ticket mode must be create or overwrite")),
    };
    let token_data = b
        .token_data
        .ok_or_else(|| ApiError::invalid("Missing required field: tokenData"))?;
    let prepared = seal_token_data(&s.backend, &service, &token_data, tk.cid.as_deref())?;
    drop(token_data);
    match s
        .store
        .put_token(
            service.clone(),
            prepared.doc,
            Some((tk.nonce.clone(), tk.exp)),
            create_only,
            t,
        )
        .await?
    {
        PutOutcome::Stored(meta) => Ok(axum::response::IntoResponse::into_response(axum::Json(
            json!({
                "status": "stored",
                "service": service,
                "meta": public_meta(meta),
            }),
        ))),
        PutOutcome::Exists => Err(ApiError::AlreadyExists(service)),
        PutOutcome::NonceUsed => Err(ApiError::TicketInvalid("Ticket already used")),
    }
}

#[derive(Deserialize, Default)]
pub struct CredentialParams {
    ticket: Option<String>,
    service: Option<String>,
    scopes: Option<String>,
}

pub async fn credential(
    State(s): State<AppState>,
    Query(q): Query<CredentialParams>,
    req: Request,
) -> Result<Response, ApiError> {
    let p = if req.method() == Method::POST {
        let (parts, body) = req.into_parts();
        let raw = read_body(body, &parts.headers, s.settings.body_limit).await?;
        serde_json::from_slice::<CredentialParams>(&raw)
            .map_err(|_| ApiError::invalid("Request body must be a JSON object"))?
    } else {
        q
    };
    let service = p
        .service
        .filter(|x| !x.is_empty())
        .ok_or_else(|| ApiError::invalid("Missing required field: service"))?;
    if !valid_service(&service) {
        return Err(ApiError::invalid("Field service is malformed"));
    }
    let raw_ticket = p
        .ticket
        .filter(|x| !x.is_empty())
        .ok_or(ApiError::TicketInvalid("Missing ticket"))?;
    let scopes = gcp::parse_scopes(p.scopes.as_deref())?;
    let t = now();
    let tk = ticket::verify(
        &s.backend,
        &s.store,
        &raw_ticket,
        ticket::CREDENTIAL,
        &service,
        t,
    )?;
    let raw = s
        .store
        .get_raw(Collection::Tokens, &service)?
        .ok_or_else(|| ApiError::TokenNotFound(service.clone()))?;
    let doc: TokenDocument =
        serde_json::from_slice(&raw).map_err(|_| StoreError::Corrupt("token document"))?;
    ticket::check_creation(&tk, doc.meta.get("creationId").and_then(Value::as_str))?;
    ticket::consume(&s.store, &tk, t).await?;
    let mut fields = open_fields(&s.backend, &service, &doc)?;
    if doc.alg == fields::ALG_NONE && !doc.fields.is_empty() {
        let mut sealed = doc.clone();
        reseal(&s.backend, &service, &mut sealed)?;
        match s
            .store
            .replace_token_if_unchanged(service.clone(), raw.clone(), sealed)
            .await
        {
            Ok(true) => tracing::info!(service = %service, "plaintext token document re-sealed"),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(service = %service, error = %e, "could not re-seal plaintext document")
            }
        }
    }
    // Interceptors: a GCP service-account key is traded for an access token.
    if let Some(sa) = gcp::detect(fields.get("accessToken")) {
        let minted = s.settings.minter.mint(&service, &sa, &scopes, t).await?;
        let expires = time::OffsetDateTime::from_unix_timestamp(minted.expires_at)
            .ok()
            .and_then(|x| {
                x.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            });
        return secret_json(&json!({"token": {
            "accessToken": minted.access_token.as_str(),
            "tokenType": "Bearer",
            "expiresAt": expires,
            "serviceName": service,
            "serviceAccount": sa.client_email,
            "gcpMinted": true,
        }}));
    }
    // Seeds never leave: TOTP tokens answer codes (TOTP issue); until then
    // the seed is withheld.
    fields.remove("totpSecret");
    fields.remove("totpUri");
    let mut token: Map<String, Value> = public_meta(doc.meta);
    token
        .entry("serviceName")
        .or_insert_with(|| Value::String(service.clone()));
    for (k, v) in fields {
        token.insert(k, v);
    }
    secret_json(&json!({ "token": token }))
}
