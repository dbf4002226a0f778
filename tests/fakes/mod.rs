//! Fakes the brokering tests talk to: an upstream API and an OAuth
//! provider served by the test process on loopback, and the calls that
//! drive an appliance against them (proxy, pinned configs, OAuth clients,
//! refresh notifications).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::harness::*;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use base64::Engine;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Clone, Default)]
pub struct Upstream {
    pub hits: Arc<Mutex<HashMap<String, usize>>>,
    pub sse_go: Arc<tokio::sync::Notify>,
}

pub fn count(u: &Upstream, p: &str) {
    *u.hits.lock().unwrap().entry(p.to_string()).or_default() += 1;
}

impl Upstream {
    pub fn hits(&self, path: &str) -> usize {
        *self.hits.lock().unwrap().get(path).unwrap_or(&0)
    }
    pub fn total(&self) -> usize {
        self.hits.lock().unwrap().values().sum()
    }
}

pub async fn serve(app: axum::Router) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    format!("http://{addr}")
}

pub async fn upstream() -> (String, Upstream) {
    let u = Upstream::default();
    let app = axum::Router::new()
        .route(
            "/api/echo",
            any(move |State(u): State<Upstream>, req: Request| async move {
                count(&u, "/api/echo");
                let (parts, body) = req.into_parts();
                let body = axum::body::to_bytes(body, 1 << 20).await.unwrap();
                let headers: HashMap<String, String> = parts.headers.iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string())).collect();
                let mut r = axum::Json(json!({"method": parts.method.as_str(), "path": parts.uri.to_string(), "headers": headers, "body": base64::engine::general_purpose::STANDARD.encode(&body)})).into_response();
                r.headers_mut().insert("x-echo", "yes".parse().unwrap());
                r.headers_mut().insert("keep-alive", "timeout=5".parse().unwrap());
                r
            }),
        )
        .route("/api/missing", get(|State(u): State<Upstream>| async move { count(&u, "/api/missing"); (StatusCode::NOT_FOUND, "nope") }))
        .route("/api/redirect", get(|State(u): State<Upstream>| async move {
            count(&u, "/api/redirect");
            (StatusCode::FOUND, [("location", "http://127.0.0.1:1/elsewhere")], "")
        }))
        .route("/api/slow", get(|State(u): State<Upstream>| async move {
            count(&u, "/api/slow");
            // Never answers: the proxy's own timeout is what ends the call.
            std::future::pending::<()>().await;
            "never"
        }))
        .route("/api/big", get(|State(u): State<Upstream>| async move { count(&u, "/api/big"); vec![b'x'; 2 << 20] }))
        .route("/api/sse", get(|State(u): State<Upstream>| async move {
            count(&u, "/api/sse");
            let go = u.sse_go.clone();
            let stream = async_stream(go);
            Response::builder().header("content-type", "text/event-stream").body(Body::from_stream(stream)).unwrap()
        }))
        .with_state(u.clone());
    (serve(app).await, u)
}

/// First event at once; the second only after the test has seen the first.
pub fn async_stream(
    go: Arc<tokio::sync::Notify>,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> {
    futures::stream::unfold(0u8, move |n| {
        let go = go.clone();
        async move {
            match n {
                0 => Some((Ok(Bytes::from_static(b"data: first\n\n")), 1)),
                1 => {
                    go.notified().await;
                    Some((Ok(Bytes::from_static(b"data: second\n\n")), 2))
                }
                _ => None,
            }
        }
    })
}

pub async fn bound(extra: &str) -> (tempfile::TempDir, Appliance) {
    let (tmp, mut a) = Appliance::start_configured(extra);
    a.bind().await;
    (tmp, a)
}

/// A proxy call under pinned config `pid` to the fake upstream's echo
/// endpoint, with the stored templates only.
pub async fn proxy_echo(a: &Appliance, base: &str, svc: &str, pid: &str) -> reqwest::Response {
    let url = json!({"url": format!("{base}/api/echo")});
    proxy(a, svc, Some(pid), url, json!({})).await
}

pub async fn proxy(
    a: &Appliance,
    svc: &str,
    pid: Option<&str>,
    up: Value,
    templates: Value,
) -> reqwest::Response {
    let extra = match pid {
        Some(p) => json!({"pid": p}),
        None => json!({}),
    };
    let body = json!({"requestId": new_rid(), "ticket": a.ticket("proxy", svc, extra), "service": svc, "upstream": up, "headerTemplates": templates});
    let raw = serde_json::to_vec(&body).unwrap();
    let ts = now().to_string();
    a.client
        .post(a.url("/v1/proxy"))
        .header("content-type", "application/json")
        .header(
            "x-tokenvault-signature",
            sign(a.secret.as_ref().unwrap(), &ts, &raw),
        )
        .header("x-tokenvault-timestamp", &ts)
        .header("x-tokenvault-request-id", new_rid())
        .body(raw)
        .send()
        .await
        .unwrap()
}

pub async fn pin(a: &Appliance, pid: &str, upstream_url: &str, svc: &str) {
    pin_with(
        a,
        pid,
        upstream_url,
        svc,
        json!({"Authorization":"Bearer ${TOKEN}"}),
    )
    .await;
}

/// A stored proxy config with these header templates (the only ones a
/// proxy call may use).
pub async fn pin_with(a: &Appliance, pid: &str, upstream_url: &str, svc: &str, templates: Value) {
    let v = a.storage(json!({"operation":"set","collection":"proxy_configs","key":pid,"data":{"name":"test","upstreamUrl":upstream_url,"serviceName":svc,"headerTemplates":templates}})).await;
    assert_eq!(v["status"], "ok", "{v}");
}

#[derive(Clone)]
pub struct Provider {
    pub calls: Arc<AtomicUsize>,
    pub evil: Arc<AtomicUsize>,
    pub last_auth: Arc<Mutex<Option<String>>>,
    pub last_form: Arc<Mutex<HashMap<String, String>>>,
    /// `/token-gated` answers only once a permit is added here.
    pub gate: Arc<tokio::sync::Semaphore>,
}

impl Default for Provider {
    fn default() -> Self {
        Provider {
            calls: Default::default(),
            evil: Default::default(),
            last_auth: Default::default(),
            last_form: Default::default(),
            gate: Arc::new(tokio::sync::Semaphore::new(0)),
        }
    }
}

pub async fn provider() -> (String, Provider) {
    let p = Provider::default();
    let handle = |mode: &'static str| {
        move |State(p): State<Provider>, headers: HeaderMap, body: String| async move {
            p.calls.fetch_add(1, Ordering::SeqCst);
            let form: HashMap<String, String> = url::form_urlencoded::parse(body.as_bytes())
                .into_owned()
                .collect();
            *p.last_auth.lock().unwrap() = headers
                .get("authorization")
                .map(|v| v.to_str().unwrap().to_string());
            *p.last_form.lock().unwrap() = form.clone();
            if form.get("grant_type").map(String::as_str) != Some("refresh_token")
                || form.get("refresh_token").map(String::as_str) != Some("rt-old")
            {
                return (
                    StatusCode::BAD_REQUEST,
                    axum::Json(json!({"error":"invalid_grant"})),
                );
            }
            match mode {
                "gated" => {
                    p.gate.acquire().await.unwrap().forget();
                    (
                        StatusCode::OK,
                        axum::Json(
                            json!({"access_token":"at-new","refresh_token":"rt-new","expires_in":7200}),
                        ),
                    )
                }
                "norotate" => (StatusCode::OK, axum::Json(json!({"access_token":"at-new"}))),
                "error" => (
                    StatusCode::BAD_REQUEST,
                    axum::Json(json!({"error":"invalid_grant"})),
                ),
                "noaccess" => (StatusCode::OK, axum::Json(json!({"token_type":"Bearer"}))),
                _ => (
                    StatusCode::OK,
                    axum::Json(
                        json!({"access_token":"at-new","refresh_token":"rt-new","expires_in":7200}),
                    ),
                ),
            }
        }
    };
    let evil = |State(p): State<Provider>| async move {
        p.evil.fetch_add(1, Ordering::SeqCst);
        (StatusCode::OK, axum::Json(json!({"access_token":"stolen"})))
    };
    let app = axum::Router::new()
        .route("/token", post(handle("ok")))
        .route("/token-gated", post(handle("gated")))
        .route("/token-norotate", post(handle("norotate")))
        .route("/token-error", post(handle("error")))
        .route("/token-noaccess", post(handle("noaccess")))
        .route("/evil", post(evil))
        .with_state(p.clone());
    (serve(app).await, p)
}

/// Registers client `name` for `services` (none: the service of its name).
pub fn add_client(a: &Appliance, name: &str, url: &str, auth: &str, services: &[&str]) {
    let mut extra = vec!["--auth", auth];
    for s in services {
        extra.extend(["--service", s]);
    }
    a.add_oauth_client(name, url, &extra);
}

pub async fn notify(a: &Appliance, svc: &str, provider: &str, hinted: &str) -> Value {
    let (s, v) = a.signed("/v1/refresh-notify", json!({"requestId": new_rid(), "service": svc, "reason": "token_expiring", "expiresAt": "2026-02-17T15:30:00Z", "refreshHint": {"provider": provider, "tokenUrl": hinted, "clientId": "cid-1"}})).await;
    assert_eq!(s, 200, "{v}");
    v
}

pub async fn seed_oauth_token(a: &Appliance, svc: &str) {
    let body = json!({"ticket": a.ticket("store", svc, json!({"cid":"creation-1"})), "service": svc, "tokenData": {"accessToken":"at-old","refreshToken":"rt-old","tokenType":"JWT","scope":"repo","certificateData":"cert-keep"}});
    let r = a
        .client
        .post(a.url("/v1/store"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
