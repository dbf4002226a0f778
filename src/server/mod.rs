//! HTTP layer: `app(state) -> Router`, the TLS accept loop, middleware.

pub mod auth;
pub mod bind;
pub mod broker;
pub mod custody;
pub mod direct;
pub mod errors;
pub mod handlers;
pub mod listener;
pub mod metrics;
pub mod shield;

use crate::app::App;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

/// Peer address of the TCP connection, set by the accept loop in canonical
/// form (see [`crate::netaddr`]).
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

impl PeerAddr {
    pub fn is_loopback(&self) -> bool {
        crate::netaddr::is_loopback(self.0.ip())
    }
}

/// Response extension: this answer carried a secret (a credential, a TOTP
/// code, the exchange answer, a refresh token, or the answer to a
/// `/v1/store` body). Its connection is closed once it has been quiet for
/// [`listener::SECRET_IDLE`] (both protocols), so no connection buffer
/// (hyper's, the TLS layer's) keeps the secret while a client idles; a
/// client sending one request after another keeps its connection. Freed
/// buffers are wiped by the zeroizing allocator.
#[derive(Debug, Clone, Copy)]
pub struct CarriedSecret;

/// The HTTP layer's own settings: browser origins and limits, body size,
/// the hostile-network shield, where the bind helpers are served.
pub struct HttpSettings {
    pub direct: direct::DirectSettings,
    pub body_limit: usize,
    /// Hostile-network limits (connections, bodies, failures, log lines).
    pub shield: Arc<shield::Shield>,
    /// `dev` only: the bind helpers are also served on the public listener
    /// (to loopback peers without forwarding headers). Outside `dev` they
    /// exist only on the helper listener/socket ([`helper_app`]).
    pub helpers_on_public: bool,
    /// `[refresh] tv_refresh`: which services `/v1/refresh` serves.
    pub tv_refresh: crate::config::ServiceSwitch,
}

/// What a handler gets: the application core (through `Deref`) and the
/// HTTP layer's settings.
#[derive(Clone)]
pub struct AppState {
    pub app: App,
    pub http: Arc<HttpSettings>,
    /// The serving certificate (expiry in health), once the listener has one.
    tls: Arc<std::sync::OnceLock<Arc<crate::tls::TlsState>>>,
}

impl std::ops::Deref for AppState {
    type Target = App;
    fn deref(&self) -> &App {
        &self.app
    }
}

impl AppState {
    pub fn new(app: App, http: HttpSettings) -> Self {
        AppState {
            app,
            http: Arc::new(http),
            tls: Arc::new(std::sync::OnceLock::new()),
        }
    }

    /// Lets health report the serving certificate's expiry.
    pub fn watch_tls(&self, tls: Arc<crate::tls::TlsState>) {
        let _ = self.tls.set(tls);
    }

    /// Seconds until the serving certificate expires (None: unknown).
    pub fn tls_seconds_left(&self) -> Option<i64> {
        let t = self.tls.get()?.not_after();
        (t > 0).then(|| t - self.now())
    }

    pub fn direct(&self) -> &direct::DirectSettings {
        &self.http.direct
    }

    /// The capabilities this appliance advertises: the build's, less
    /// `tv-refresh` while `[refresh] tv_refresh` is off.
    pub fn capabilities(&self) -> Vec<&'static str> {
        crate::protocol::CAPABILITIES
            .iter()
            .copied()
            .filter(|c| *c != "tv-refresh" || self.http.tv_refresh.any())
            .collect()
    }
}

pub fn now() -> i64 {
    crate::clock::system_now()
}

pub fn app(state: AppState) -> Router {
    let direct_routes = Router::new()
        .route("/v1/store", post(custody::store))
        .route(
            "/v1/credential",
            get(custody::credential).post(custody::credential),
        )
        .route(
            "/v1/totp-code",
            get(custody::totp_code).post(custody::totp_code),
        )
        .route("/v1/totp-verify", post(custody::totp_verify))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            direct::access,
        ));
    let mut router = Router::new()
        .merge(direct_routes)
        .route(
            "/v1/health",
            get(handlers::health_public).post(handlers::health_signed),
        )
        .route("/v1/storage", post(handlers::storage))
        .route("/v1/proxy", post(broker::proxy))
        .route("/v1/refresh-notify", post(broker::refresh_notify))
        .route("/v1/refresh", post(broker::tv_refresh))
        .route("/v1/exchange", post(handlers::exchange));
    if state.http.helpers_on_public {
        router = router.merge(helper_routes());
    }
    // CORS outermost: every answer of a browser route carries it, the deny
    // list's 403 and both 429s (rate limit, failure budget) included, so a
    // browser can read the error and its Retry-After.
    router
        .fallback(errors::not_found)
        .method_not_allowed_fallback(errors::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            access_log,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            direct::cors,
        ))
        .with_state(state)
}

fn helper_routes() -> Router<AppState> {
    Router::new()
        .route("/v1/register-url", get(bind::register_url))
        .route("/bind", get(bind::bind_page).post(bind::bind_start))
}

/// The bind helpers alone, for the loopback helper listener or unix socket
/// (`[helper]`): no other route, refused with forwarding headers.
pub fn helper_app(state: AppState) -> Router {
    async fn mark(mut req: Request, next: Next) -> Response {
        req.extensions_mut().insert(bind::HelperChannel);
        next.run(req).await
    }
    helper_routes()
        .layer(axum::middleware::from_fn(mark))
        .fallback(errors::not_found)
        .method_not_allowed_fallback(errors::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            access_log,
        ))
        .with_state(state)
}

/// The routes the appliance's own audit trail records, by event name.
fn trail_event(path: &str) -> Option<&'static str> {
    Some(match path {
        "/v1/credential" => "credential_read",
        "/v1/totp-code" => "totp_code",
        "/v1/totp-verify" => "totp_verify",
        "/v1/proxy" => "proxy",
        "/v1/refresh-notify" => "refresh",
        "/v1/refresh" => "tv_refresh",
        "/v1/store" => "store",
        "/v1/exchange" => "bind",
        _ => return None,
    })
}

/// One line per request: method, path (no query), status, latency, request
/// id, peer. Never a body, ticket or secret header.
///
/// Also where the failure budget is applied: an address that has spent it
/// is answered 429 here, before any body is read or key operation run; a
/// failing request that proved nothing is counted (route and status) and
/// spends from its address's budget, and its log line is rate-limited; only
/// requests that proved something reach the audit trail.
async fn access_log(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let rid = req
        .headers()
        .get(crate::protocol::signature::REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| crate::protocol::signature::validate_request_id(v).is_ok())
        .map(str::to_string);
    let peer = req.extensions().get::<PeerAddr>().map(|p| p.0);
    let client = shield::client_of(&s, &req);
    let shield = &s.http.shield;
    let route = crate::app::metrics::route_label(&path);
    if let Some(wait) = client.and_then(|c| shield.failure_blocked(c)) {
        shield.count(shield::Event::FailureLimited);
        let resp = axum::response::IntoResponse::into_response(
            crate::protocol::ApiError::RateLimited(wait),
        );
        s.metrics()
            .request(&path, resp.status().as_u16(), start.elapsed());
        if shield.log_line() {
            tracing::info!(target: "access", method = %method, path = %path, status = 429, client = %client.map(|c| c.to_string()).unwrap_or_default(), "failure budget spent");
        }
        return resp;
    }
    let (resp, note) = crate::store::trail::with_note(next.run(req)).await;
    let status = resp.status().as_u16();
    s.metrics().request(&path, status, start.elapsed());
    let unproven = !note.authenticated && resp.status().is_client_error();
    let log = if unproven {
        shield.rejected(client, route, status)
    } else {
        true
    };
    if let (Some(event), true) = (trail_event(&path), note.authenticated) {
        s.store.trail_append(crate::store::trail::TrailEvent {
            ts: s.now(),
            event,
            status,
            note,
            peer: peer.map(|p| p.ip().to_string()),
        });
    }
    if log {
        tracing::info!(
            target: "access",
            method = %method,
            path = %path,
            status,
            latency_us = start.elapsed().as_micros() as u64,
            request_id = rid.as_deref().unwrap_or("-"),
            peer = %peer.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
        );
    }
    resp
}

#[cfg(test)]
mod tests;
