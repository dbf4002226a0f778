//! Operator helpers, answered only to loopback peers (others get 404):
//! `GET /v1/register-url` and the `/bind` page.

use super::{now, AppState, PeerAddr};
use crate::binding::{self, Registration};
use crate::protocol::storage::Collection;
use crate::protocol::ApiError;
use axum::extract::{Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;

fn loopback_only(peer: Option<Extension<PeerAddr>>) -> Result<(), ApiError> {
    match peer {
        Some(Extension(p)) if p.is_loopback() => Ok(()),
        _ => Err(ApiError::NotFound),
    }
}

pub async fn create(s: &AppState) -> Result<Registration, ApiError> {
    let t = now();
    let (reg, rec) = binding::prepare(
        &s.backend,
        &s.settings.frontend_url,
        &s.settings.public_url,
        s.settings.code_ttl_secs,
        t,
    )?;
    s.store.put_bind_code(&reg.code, &rec).await?;
    Ok(reg)
}

pub async fn register_url(
    State(s): State<AppState>,
    peer: Option<Extension<PeerAddr>>,
) -> Result<Response, ApiError> {
    loopback_only(peer)?;
    let reg = create(&s).await?;
    let mut r = Json(reg).into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(r)
}

#[derive(Deserialize)]
pub struct BindQuery {
    force: Option<String>,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

pub async fn bind_page(
    State(s): State<AppState>,
    peer: Option<Extension<PeerAddr>>,
    Query(q): Query<BindQuery>,
) -> Result<Response, ApiError> {
    loopback_only(peer)?;
    let force = q.force.as_deref() == Some("1");
    let body = if s.is_bound() && !force {
        let tokens = s.store.count(Collection::Tokens).unwrap_or(0);
        format!(
            "<h1>Connected to Token Vault</h1>\
             <p>Webhook ID: <code>{}</code></p><p>Tokens stored: {}</p><p>Uptime: {} s</p>\
             <p><a href=\"/bind?force=1\">Re-bind</a> (rotates the HMAC key)</p>",
            esc(&s.settings.webhook_id),
            tokens,
            s.started.elapsed().as_secs()
        )
    } else {
        format!(
            "<h1>Connect to Token Vault</h1>\
             <p>This appliance will be reachable at <code>{}</code>.</p>\
             <form method=\"post\" action=\"/bind\"><button type=\"submit\">Connect to TokenVault</button></form>",
            esc(&s.settings.public_url)
        )
    };
    let page = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>tokenvault-webhook</title></head><body>{body}</body></html>"
    );
    let mut r = Html(page).into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(r)
}

/// Creates a code and sends the browser to Token Vault's bind page.
pub async fn bind_start(
    State(s): State<AppState>,
    peer: Option<Extension<PeerAddr>>,
) -> Result<Response, ApiError> {
    loopback_only(peer)?;
    let reg = create(&s).await?;
    let loc = HeaderValue::from_str(&reg.registration_url).map_err(|_| ApiError::Internal)?;
    let mut r = StatusCode::SEE_OTHER.into_response();
    r.headers_mut().insert(header::LOCATION, loc);
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(r)
}
