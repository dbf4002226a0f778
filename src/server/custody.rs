//! `/v1/store` and `/v1/credential`: the zero-knowledge paths.

use super::auth::read_body;
use super::AppState;
use crate::custody::fields::{self, open_fields, reseal, seal_token_data};
use crate::custody::policy::{self, Use};
use crate::custody::{codes, gcp, ticket, totp};
use crate::protocol::document::{public_meta, TokenDocument};
use crate::protocol::ApiError;
use crate::store::PutOutcome;
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
    carried_secret(&mut resp);
    Ok(resp)
}

/// Marks the answer as carrying a secret (see [`super::CarriedSecret`]).
pub fn carried_secret(resp: &mut Response) {
    resp.extensions_mut().insert(super::CarriedSecret);
}

fn destroy_otp_quietly(s: &AppState, id: &str) {
    if let Err(e) = s.backend.destroy_otp(id) {
        tracing::warn!(error = %e, "could not destroy a TOTP key object; it is removed at next start");
    }
}

/// Writes a prepared document. The device TOTP key of the document it
/// replaced is destroyed; if the write did not land, its own is.
pub async fn put_prepared(
    s: &AppState,
    service: String,
    p: fields::Prepared,
    nonce: Option<(String, i64)>,
    create_only: bool,
    at: i64,
) -> Result<PutOutcome, ApiError> {
    let installed = p.installed_otp.clone();
    let r = s
        .store
        .put_token(service, p.doc, nonce, create_only, at)
        .await;
    match &r {
        Ok(PutOutcome::Stored { replaced_otp, .. }) => {
            if let Some(old) = replaced_otp {
                destroy_otp_quietly(s, old);
            }
        }
        _ => {
            if let Some(id) = &installed {
                destroy_otp_quietly(s, id);
            }
        }
    }
    Ok(r?)
}

/// Deletes a token document and its device TOTP key.
pub async fn delete_token(s: &AppState, service: String) -> Result<(), ApiError> {
    if let Some(id) = s.store.delete_token(service).await? {
        destroy_otp_quietly(s, &id);
    }
    Ok(())
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
    let raw = read_body(&s, &parts, body, s.http.body_limit).await?;
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
    let t = s.now();
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
    let prepared = seal_token_data(&s.backend, &service, &token_data, tk.cid.as_deref(), t)?;
    drop(token_data);
    match put_prepared(
        &s,
        service.clone(),
        prepared,
        Some((tk.nonce.clone(), tk.exp)),
        create_only,
        t,
    )
    .await?
    {
        PutOutcome::Stored { meta, .. } => {
            // The request carried the credential.
            let mut r = axum::response::IntoResponse::into_response(axum::Json(json!({
                "status": "stored",
                "service": service,
                "meta": public_meta(meta),
            })));
            carried_secret(&mut r);
            Ok(r)
        }
        PutOutcome::Exists => Err(ApiError::AlreadyExists(service)),
        PutOutcome::NonceUsed => Err(ApiError::TicketInvalid("Ticket already used")),
    }
}

#[derive(Deserialize, Default)]
pub struct DirectParams {
    ticket: Option<String>,
    service: Option<String>,
    scopes: Option<String>,
    code: Option<String>,
}

/// What every ticket-authorised read shares: parameters from the query (GET)
/// or a JSON body (POST), ticket verified, document loaded, `cid` checked.
/// The ticket is not burned yet.
struct Prelude {
    service: String,
    ticket: ticket::Ticket,
    raw: Vec<u8>,
    doc: TokenDocument,
    params: DirectParams,
    at: i64,
}

async fn prelude(
    s: &AppState,
    query: DirectParams,
    req: Request,
    purposes: &[&str],
) -> Result<Prelude, ApiError> {
    let p = if req.method() == Method::POST {
        let (parts, body) = req.into_parts();
        let raw = read_body(s, &parts, body, super::shield::TICKET_BODY_LIMIT).await?;
        serde_json::from_slice::<DirectParams>(&raw)
            .map_err(|_| ApiError::invalid("Request body must be a JSON object"))?
    } else {
        query
    };
    let service = p
        .service
        .clone()
        .filter(|x| !x.is_empty())
        .ok_or_else(|| ApiError::invalid("Missing required field: service"))?;
    if !valid_service(&service) {
        return Err(ApiError::invalid("Field service is malformed"));
    }
    let raw_ticket = p
        .ticket
        .clone()
        .filter(|x| !x.is_empty())
        .ok_or(ApiError::TicketInvalid("Missing ticket"))?;
    let at = s.now();
    let tk = ticket::verify(&s.backend, &s.store, &raw_ticket, purposes, &service, at)?;
    let (raw, doc) = ticket::load_document(&s.store, &tk)?;
    Ok(Prelude {
        service,
        ticket: tk,
        raw,
        doc,
        params: p,
        at,
    })
}

pub async fn credential(
    State(s): State<AppState>,
    Query(q): Query<DirectParams>,
    req: Request,
) -> Result<Response, ApiError> {
    let scopes = gcp::parse_scopes(q.scopes.as_deref())?;
    let Prelude {
        service,
        ticket: tk,
        raw,
        doc,
        params,
        at: t,
    } = prelude(&s, q, req, ticket::CREDENTIAL).await?;
    let scopes = match params.scopes.as_deref() {
        Some(sc) => gcp::parse_scopes(Some(sc))?,
        None => scopes,
    };
    let code = codes::answers_with_code(&doc);
    let what = match (tk.pur.as_str(), code) {
        ("user_reveal", _) => Use::Reveal,
        (_, true) => Use::TotpCode,
        _ => Use::Credential,
    };
    let policy = s
        .gate()
        .admit(&service, what, tk.sub.as_deref(), tk.aid.as_deref())
        .await?;
    ticket::consume(&s.store, &tk, t).await?;
    // TOTP tokens answer a code and nothing else.
    if code {
        let c = codes::current_code(&s.backend, &service, &doc, t as u64)?;
        return secret_json(&json!({"token": {
            "accessToken": c.code.as_str(),
            "tokenType": "TOTP",
            "serviceName": service,
            "remainingSeconds": c.remaining,
            "period": c.params.period,
            "digits": c.params.digits,
            "totpGenerated": true,
        }}));
    }
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
    // The plaintext itself: refused under no-reveal (after the nonce, like
    // any answer this ticket got).
    policy::reveals(policy.as_ref(), true)?;
    // Seeds never leave, whatever the token's type.
    fields.remove(fields::TOTP_FIELD);
    let mut token: Map<String, Value> = public_meta(doc.meta);
    token
        .entry("serviceName")
        .or_insert_with(|| Value::String(service.clone()));
    for (k, v) in fields {
        token.insert(k, v);
    }
    secret_json(&json!({ "token": token }))
}

/// `GET|POST /v1/totp-code`: the current code of a TOTP token.
pub async fn totp_code(
    State(s): State<AppState>,
    Query(q): Query<DirectParams>,
    req: Request,
) -> Result<Response, ApiError> {
    let Prelude {
        service,
        ticket: tk,
        doc,
        at: t,
        ..
    } = prelude(&s, q, req, ticket::TOTP_CODE).await?;
    if !codes::is_totp(&doc) {
        return Err(ApiError::NotTotp);
    }
    let what = if tk.pur == "user_reveal" {
        Use::Reveal
    } else {
        Use::TotpCode
    };
    s.gate()
        .admit(&service, what, tk.sub.as_deref(), tk.aid.as_deref())
        .await?;
    ticket::consume(&s.store, &tk, t).await?;
    let c = codes::current_code(&s.backend, &service, &doc, t as u64)?;
    secret_json(&json!({
        "code": c.code.as_str(),
        "remainingSeconds": c.remaining,
        "period": c.params.period,
        "digits": c.params.digits,
    }))
}

/// Failures allowed per time step before `/v1/totp-verify` answers 429.
pub const VERIFY_FAILURES_PER_STEP: u32 = 5;

/// `POST /v1/totp-verify`: checks a peer's code against a seed it never
/// sees. Each code is accepted at most once (RFC 6238 §5.2), ±1 step of drift.
pub async fn totp_verify(
    State(s): State<AppState>,
    Query(q): Query<DirectParams>,
    req: Request,
) -> Result<Response, ApiError> {
    let Prelude {
        service,
        ticket: tk,
        doc,
        params,
        at: t,
        ..
    } = prelude(&s, q, req, ticket::TOTP_VERIFY).await?;
    if !codes::is_totp(&doc) {
        return Err(ApiError::NotTotp);
    }
    let p = totp::params_from_meta(&doc.meta);
    let code = params
        .code
        .filter(|c| c.len() == p.digits as usize && c.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| {
            ApiError::invalid(format!(
                "Field code must be exactly {} ASCII digits",
                p.digits
            ))
        })?;
    let step = t as u64 / p.period;
    let state = s.store.totp_state(&service)?;
    if state.fail_step == step && state.fail_count >= VERIFY_FAILURES_PER_STEP {
        return Err(ApiError::RateLimited(totp::remaining(&p, t as u64)));
    }
    ticket::consume(&s.store, &tk, t).await?;
    let steps = [step.saturating_sub(1), step, step + 1];
    let codes = codes::codes_at_steps(&s.backend, &service, &doc, &steps)?;
    let mut matched = None;
    for (st, c) in steps.iter().zip(codes.iter()) {
        if crate::protocol::signature::mac_eq(c.as_bytes(), code.as_bytes()) {
            matched = Some(*st);
        }
    }
    let valid = match s
        .store
        .totp_record(service.clone(), matched, step, VERIFY_FAILURES_PER_STEP)
        .await?
    {
        crate::store::TotpVerdict::Accepted => true,
        crate::store::TotpVerdict::Rejected => false,
        crate::store::TotpVerdict::Limited => {
            crate::store::trail::note(|n| n.result = Some("limited".into()));
            return Err(ApiError::RateLimited(totp::remaining(&p, t as u64)));
        }
    };
    tracing::info!(service = %service, valid, "totp-verify");
    s.metrics().totp_verify(valid);
    crate::store::trail::note(|n| {
        n.result = Some(if valid { "accepted" } else { "rejected" }.into())
    });
    Ok(axum::response::IntoResponse::into_response(axum::Json(
        json!({
            "valid": valid,
            "service": service,
        }),
    )))
}
