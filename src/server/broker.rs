//! The HTTP side of the broker's endpoints: authenticate, call the domain
//! function with plain arguments, turn its result into an answer.

use super::auth::Signed;
use super::custody::secret_json;
use super::AppState;
use crate::broker::proxy::{self, Deps};
use crate::broker::refresh;
use crate::protocol::ApiError;
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

/// `POST /v1/proxy`: the upstream's answer streamed back as it arrives.
pub async fn proxy(State(s): State<AppState>, signed: Signed) -> Result<Response, ApiError> {
    let deps = Deps {
        backend: &s.backend,
        store: &s.store,
        proxy: &s.settings.broker.proxy,
        minter: &s.settings.minter,
        gate: s.gate(),
    };
    let p = proxy::call(deps, signed.body, s.now()).await?;
    let mut out = Response::builder()
        .status(StatusCode::from_u16(p.status).unwrap_or(StatusCode::BAD_GATEWAY));
    if let Some(h) = out.headers_mut() {
        *h = p.headers;
    }
    out.body(Body::from_stream(p.body))
        .map_err(|_| ApiError::Internal)
}

fn refresh_deps(s: &AppState) -> refresh::Deps {
    refresh::Deps {
        backend: s.backend.clone(),
        store: s.store.clone(),
        refresher: s.settings.broker.refresher.clone(),
        clock: s.clock.clone(),
    }
}

/// `POST /v1/refresh-notify`: a refresh with the appliance's own OAuth
/// client (single flight per service).
pub async fn refresh_notify(
    State(s): State<AppState>,
    signed: Signed,
) -> Result<Response, ApiError> {
    let req: refresh::NotifyRequest = serde_json::from_slice(&signed.body)
        .map_err(|_| ApiError::invalid("Request body must be a JSON refresh notification"))?;
    let service = req
        .service
        .filter(|x| !x.is_empty())
        .ok_or_else(|| ApiError::invalid("Missing required field: service"))?;
    let hint = req.refresh_hint.unwrap_or_default();
    let o = refresh::notify(&refresh_deps(&s), service, hint.provider, hint.token_url).await;
    let mut v =
        json!({"requestId": req.request_id.unwrap_or(signed.request_id), "status": o.status});
    if let Some(e) = o.new_expires_at {
        v["newExpiresAt"] = Value::String(e);
    }
    Ok(Json(v).into_response())
}

/// `POST /v1/refresh` (capability `tv-refresh`): the only endpoint that
/// hands a credential (the refresh token) to Token Vault.
pub async fn tv_refresh(State(s): State<AppState>, signed: Signed) -> Result<Response, ApiError> {
    let req: refresh::TvRefreshRequest = serde_json::from_slice(&signed.body)
        .map_err(|_| ApiError::invalid("Request body must be a JSON refresh request"))?;
    let rid = req.request_id.unwrap_or(signed.request_id);
    let service = req
        .service
        .filter(|x| !x.is_empty())
        .ok_or_else(|| ApiError::invalid("Missing required field: service"))?;
    if !s.http.tv_refresh.allows(&service) {
        tracing::warn!(service = %service, "tv-refresh refused: [refresh] tv_refresh does not allow this service");
        return Err(ApiError::PolicyDenied(
            "Token Vault refresh (tv-refresh) is off for this service on this appliance",
        ));
    }
    let d = refresh_deps(&s);
    let status = |st: &str| Ok(Json(json!({"requestId": rid, "status": st})).into_response());
    match req.action.as_deref() {
        Some("get") => match refresh::tv_get(&d, &service)? {
            refresh::TvGet::NoToken => status("no_token"),
            refresh::TvGet::NoRefreshToken => status("no_refresh_token"),
            refresh::TvGet::RefreshToken { token, meta } => secret_json(
                &json!({"requestId": rid, "status": "ok", "refreshToken": token.as_str(), "meta": meta}),
            ),
        },
        Some("update") => {
            let tokens = req
                .tokens
                .ok_or_else(|| ApiError::invalid("Missing required field: tokens"))?;
            match refresh::tv_update(&d, &service, &tokens).await? {
                Some(ms) => Ok(Json(
                    json!({"requestId": rid, "status": "updated", "newExpiresAt": refresh::iso(ms)}),
                )
                .into_response()),
                None => status("no_token"),
            }
        }
        _ => Err(ApiError::invalid("Field action must be get or update")),
    }
}
