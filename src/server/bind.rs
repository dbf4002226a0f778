//! Operator helpers: `GET /v1/register-url` and the `/bind` page. Outside
//! `dev` they are served only on the helper listener or socket
//! ([`super::helper_app`]), which a forwarder of the public port never
//! reaches; in `dev` also on the public listener, to loopback peers (others
//! get 404). Either way a request carrying forwarding headers (`Forwarded`,
//! `X-Forwarded-*`, `X-Real-IP`) is refused: it came through a proxy.

use super::{AppState, PeerAddr};
use crate::binding::{self, Registration};
use crate::protocol::storage::Collection;
use crate::protocol::ApiError;
use axum::extract::{Query, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

/// Marks a request that came in on the helper listener or socket.
#[derive(Debug, Clone, Copy)]
pub struct HelperChannel;

/// Whether the headers show the request was forwarded by a proxy.
pub fn forwarded(h: &HeaderMap) -> bool {
    h.keys().any(|k| {
        let k = k.as_str();
        k == "forwarded" || k.starts_with("x-forwarded-") || k == "x-real-ip"
    })
}

fn helper_only(s: &AppState, req: &Parts) -> Result<(), ApiError> {
    let on_helper = req.extensions.get::<HelperChannel>().is_some();
    let loopback = req
        .extensions
        .get::<PeerAddr>()
        .is_some_and(PeerAddr::is_loopback);
    let reachable = on_helper || (s.http.helpers_on_public && loopback);
    if !reachable {
        return Err(ApiError::NotFound);
    }
    if forwarded(&req.headers) {
        s.http.shield.count(super::shield::Event::HelperForwarded);
        tracing::warn!("bind helper refused: the request carries forwarding headers");
        return Err(ApiError::Forbidden);
    }
    Ok(())
}

pub async fn create(s: &AppState) -> Result<Registration, ApiError> {
    let t = s.now();
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

pub async fn register_url(State(s): State<AppState>, req: Parts) -> Result<Response, ApiError> {
    helper_only(&s, &req)?;
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
    Query(q): Query<BindQuery>,
    req: Parts,
) -> Result<Response, ApiError> {
    helper_only(&s, &req)?;
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
pub async fn bind_start(State(s): State<AppState>, req: Parts) -> Result<Response, ApiError> {
    helper_only(&s, &req)?;
    let reg = create(&s).await?;
    let loc = HeaderValue::from_str(&reg.registration_url).map_err(|_| ApiError::Internal)?;
    let mut r = StatusCode::SEE_OTHER.into_response();
    r.headers_mut().insert(header::LOCATION, loc);
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(r)
}
