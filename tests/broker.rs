#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Brokering over real HTTPS on SoftHSM2, against an upstream API and an
//! OAuth provider running in this test process on loopback.

mod harness;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use base64::Engine;
use harness::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Clone, Default)]
struct Upstream {
    hits: Arc<Mutex<HashMap<String, usize>>>,
    sse_go: Arc<tokio::sync::Notify>,
}

fn count(u: &Upstream, p: &str) {
    *u.hits.lock().unwrap().entry(p.to_string()).or_default() += 1;
}

impl Upstream {
    fn hits(&self, path: &str) -> usize {
        *self.hits.lock().unwrap().get(path).unwrap_or(&0)
    }
    fn total(&self) -> usize {
        self.hits.lock().unwrap().values().sum()
    }
}

async fn serve(app: axum::Router) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    format!("http://{addr}")
}

async fn upstream() -> (String, Upstream) {
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
fn async_stream(
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

async fn bound(extra: &str) -> (tempfile::TempDir, Appliance) {
    let (tmp, mut a) = Appliance::start_configured(extra);
    a.bind().await;
    (tmp, a)
}

async fn proxy(
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

async fn pin(a: &Appliance, pid: &str, upstream_url: &str, svc: &str) {
    a.storage(json!({"operation":"set","collection":"proxy_configs","key":pid,"data":{"name":"test","upstreamUrl":upstream_url,"serviceName":svc,"headerTemplates":{"Authorization":"Bearer ${TOKEN}"}}})).await;
}

#[tokio::test]
async fn proxy_injects_credentials_and_passes_responses_through() {
    let (base, up) = upstream().await;
    let (_t, a) = bound("").await;
    a.store_ok("gh", json!({"accessToken":"ghp_proxy_secret"}))
        .await;
    pin(&a, "p1", &format!("{base}/api"), "gh").await;
    let r = proxy(&a, "gh", Some("p1"), json!({
        "url": format!("{base}/api/echo?q=1"), "method": "POST",
        "headers": {"Content-Type":"application/json","Connection":"x-drop","X-Drop":"1","Host":"evil.example","X-Keep":"k"},
        "body": base64::engine::general_purpose::STANDARD.encode(br#"{"a":1}"#)
    }), json!({"Authorization":"Bearer ${TOKEN}","X-Api-Key":"${TOKEN}","X-Both":"a ${TOKEN} b"})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-upstream-status"], "200");
    assert_eq!(r.headers()["x-echo"], "yes");
    assert!(
        r.headers().get("keep-alive").is_none(),
        "hop-by-hop dropped on the way back"
    );
    let v: Value = r.json().await.unwrap();
    let h = &v["headers"];
    assert_eq!(h["authorization"], "Bearer ghp_proxy_secret");
    assert_eq!(h["x-api-key"], "ghp_proxy_secret");
    assert_eq!(h["x-both"], "a ghp_proxy_secret b");
    assert_eq!(h["x-keep"], "k");
    assert!(h.get("x-drop").is_none(), "named in Connection: dropped");
    assert_eq!(h["host"], base.trim_start_matches("http://"));
    assert_eq!(v["method"], "POST");
    assert_eq!(v["path"], "/api/echo?q=1");
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(v["body"].as_str().unwrap())
            .unwrap(),
        br#"{"a":1}"#
    );
    // Upstream errors and redirects pass through unchanged (not followed).
    let r = proxy(
        &a,
        "gh",
        Some("p1"),
        json!({"url": format!("{base}/api/missing")}),
        json!({}),
    )
    .await;
    assert_eq!(
        (
            r.status().as_u16(),
            r.headers()["x-upstream-status"]
                .to_str()
                .unwrap()
                .to_string()
        ),
        (404, "404".into())
    );
    assert_eq!(r.text().await.unwrap(), "nope");
    let r = proxy(
        &a,
        "gh",
        Some("p1"),
        json!({"url": format!("{base}/api/redirect")}),
        json!({}),
    )
    .await;
    assert_eq!(r.status(), 302);
    assert_eq!(r.headers()["location"], "http://127.0.0.1:1/elsewhere");
    // Bad input: 400, nothing sent upstream.
    let before = up.total();
    for (upd, tmpl) in [
        (
            json!({"url": format!("{base}/api/echo"), "method": "TRACE"}),
            json!({}),
        ),
        (
            json!({"url": format!("{base}/api/echo"), "body": "***"}),
            json!({}),
        ),
        (
            json!({"url": format!("{base}/api/echo"), "headers": {"X-Bad": "a\r\nInjected: 1"}}),
            json!({}),
        ),
        (
            json!({"url": format!("{base}/api/echo")}),
            json!({"X-Evil": "${TOKEN}\r\nX-Other: 1"}),
        ),
        (json!({"url": "ftp://x/api"}), json!({})),
    ] {
        let r = proxy(&a, "gh", Some("p1"), upd, tmpl).await;
        assert_eq!(r.status(), 400);
        assert!(!r.text().await.unwrap().contains("ghp_proxy_secret"));
    }
    assert_eq!(up.total(), before);
    assert!(!a.log_text().contains("ghp_proxy_secret"));
}

#[tokio::test]
async fn proxy_streams_server_sent_events() {
    let (base, up) = upstream().await;
    let (_t, a) = bound("").await;
    a.store_ok("gh", json!({"accessToken":"t"})).await;
    pin(&a, "p1", &format!("{base}/api"), "gh").await;
    let mut r = proxy(
        &a,
        "gh",
        Some("p1"),
        json!({"url": format!("{base}/api/sse")}),
        json!({}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    // The first event arrives while the upstream still holds the second back.
    let first = tokio::time::timeout(std::time::Duration::from_secs(20), r.chunk())
        .await
        .expect("first event streamed, not buffered")
        .unwrap()
        .unwrap();
    assert_eq!(&first[..], b"data: first\n\n");
    up.sse_go.notify_one();
    let mut rest = Vec::new();
    while let Some(c) = r.chunk().await.unwrap() {
        rest.extend_from_slice(&c);
    }
    assert_eq!(rest, b"data: second\n\n");
}

#[tokio::test]
async fn proxy_timeout_and_size_cap() {
    let (base, _up) = upstream().await;
    let (_t, a) = bound("[proxy]\ntimeout_secs = 1\nmax_response_bytes = 1048576\n").await;
    a.store_ok("gh", json!({"accessToken":"t"})).await;
    pin(&a, "p1", &format!("{base}/api"), "gh").await;
    let r = proxy(
        &a,
        "gh",
        Some("p1"),
        json!({"url": format!("{base}/api/slow")}),
        json!({}),
    )
    .await;
    assert_eq!(r.status(), 504);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "upstream_timeout"
    );
    let r = proxy(
        &a,
        "gh",
        Some("p1"),
        json!({"url": format!("{base}/api/big")}),
        json!({}),
    )
    .await;
    assert_eq!(r.status(), 502);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "upstream_error");
    // Transport failure: nothing listens there.
    pin(&a, "p2", "http://127.0.0.1:1/", "gh").await;
    let r = proxy(
        &a,
        "gh",
        Some("p2"),
        json!({"url": "http://127.0.0.1:1/x"}),
        json!({}),
    )
    .await;
    assert_eq!(r.status(), 502);
}

#[tokio::test]
async fn proxy_is_pinned_to_the_stored_config() {
    let (base, up) = upstream().await;
    let (foreign, foreign_up) = upstream().await;
    let (_t, a) = bound("[proxy]\nrequire_config = true\n").await;
    a.store_ok("gh", json!({"accessToken":"t"})).await;
    a.store_ok("other", json!({"accessToken":"o"})).await;
    pin(&a, "p1", &format!("{base}/api"), "gh").await;
    for (svc, pid, url) in [
        ("gh", Some("p1"), format!("{foreign}/api/echo")),
        ("gh", Some("p1"), format!("{base}/apix")),
        ("other", Some("p1"), format!("{base}/api/echo")),
        ("gh", None, format!("{base}/api/echo")),
        ("gh", Some("nope"), format!("{base}/api/echo")),
    ] {
        let r = proxy(
            &a,
            svc,
            pid,
            json!({"url": url}),
            json!({"Authorization":"Bearer ${TOKEN}"}),
        )
        .await;
        assert_eq!(r.status(), 403, "{svc} {pid:?} {url}");
        assert_eq!(
            r.json::<Value>().await.unwrap()["error"],
            "proxy_not_allowed"
        );
    }
    assert_eq!(
        foreign_up.total(),
        0,
        "the foreign upstream received nothing"
    );
    assert_eq!(up.total(), 0);
    let r = proxy(
        &a,
        "gh",
        Some("p1"),
        json!({"url": format!("{base}/api/echo")}),
        json!({}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(up.hits("/api/echo"), 1);
    // A non-proxy ticket is refused.
    let body = json!({"ticket": a.ticket("agent_credential", "gh", json!({"pid":"p1"})), "service": "gh", "upstream": {"url": format!("{base}/api/echo")}});
    let (s, v) = a.signed("/v1/proxy", body).await;
    assert_eq!((s, v["error"].as_str()), (401, Some("ticket_invalid")));
}

#[tokio::test]
async fn egress_policy_refuses_local_and_metadata_addresses() {
    let (base, up) = upstream().await;
    let (_t, a) = bound("[proxy]\nallow_loopback = false\nrequire_config = false\n").await;
    a.store_ok("gh", json!({"accessToken":"t"})).await;
    let port = base.rsplit(':').next().unwrap();
    for url in [
        format!("{base}/api/echo"),
        format!("http://localhost:{port}/api/echo"),
        "http://169.254.169.254/latest/meta-data/".into(),
        "http://10.0.0.1/x".into(),
        "http://[::1]:9/x".into(),
    ] {
        let r = proxy(
            &a,
            "gh",
            None,
            json!({"url": url}),
            json!({"Authorization":"Bearer ${TOKEN}"}),
        )
        .await;
        assert_eq!(r.status(), 403, "{url}");
        assert_eq!(r.json::<Value>().await.unwrap()["error"], "egress_denied");
    }
    assert_eq!(up.total(), 0);
}

#[tokio::test]
async fn totp_token_is_injected_as_its_current_code() {
    use tokenvault_webhook::custody::totp::{base32_decode, code_software, Params};
    let (base, _up) = upstream().await;
    let (_t, a) = bound("").await;
    a.store_ok("otp", json!({"totpSecret":"JBSWY3DPEHPK3PXP"}))
        .await;
    pin(&a, "p1", &format!("{base}/api"), "otp").await;
    let t0 = now();
    let r = proxy(
        &a,
        "otp",
        Some("p1"),
        json!({"url": format!("{base}/api/echo")}),
        json!({"X-TOTP":"${TOKEN}"}),
    )
    .await;
    let v: Value = r.json().await.unwrap();
    let seed = base32_decode("JBSWY3DPEHPK3PXP").unwrap();
    let ok: Vec<String> = [t0, now()]
        .iter()
        .map(|t| code_software(&seed, &Params::default(), *t as u64).to_string())
        .collect();
    assert!(ok.contains(&v["headers"]["x-totp"].as_str().unwrap().to_string()));
}

// ---- refresh ----------------------------------------------------------------

#[derive(Clone)]
struct Provider {
    calls: Arc<AtomicUsize>,
    evil: Arc<AtomicUsize>,
    last_auth: Arc<Mutex<Option<String>>>,
    last_form: Arc<Mutex<HashMap<String, String>>>,
    /// `/token-gated` answers only once a permit is added here.
    gate: Arc<tokio::sync::Semaphore>,
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

async fn provider() -> (String, Provider) {
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

fn add_client(a: &Appliance, name: &str, url: &str, auth: &str) {
    a.add_oauth_client(name, url, &["--auth", auth]);
}

async fn notify(a: &Appliance, svc: &str, provider: &str, hinted: &str) -> Value {
    let (s, v) = a.signed("/v1/refresh-notify", json!({"requestId": new_rid(), "service": svc, "reason": "token_expiring", "expiresAt": "2026-02-17T15:30:00Z", "refreshHint": {"provider": provider, "tokenUrl": hinted, "clientId": "cid-1"}})).await;
    assert_eq!(s, 200, "{v}");
    v
}

async fn seed_oauth_token(a: &Appliance, svc: &str) {
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

#[tokio::test]
async fn refresh_notify_with_a_local_client() {
    let (purl, prov) = provider().await;
    let (_t, a) = bound("").await;
    // Registered while the server runs; list never shows the secret.
    add_client(&a, "MyProvider", &format!("{purl}/token"), "post");
    let out = cli(&[
        "--config",
        a.config().to_str().unwrap(),
        "oauth-client",
        "list",
    ]);
    let listed = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        listed.contains("myprovider")
            && listed.contains("cid-1")
            && !listed.contains("client-secret-xyz")
    );
    seed_oauth_token(&a, "svc").await;
    let before = a
        .storage(json!({"operation":"get","collection":"tokens","key":"svc"}))
        .await;
    // The hint's tokenUrl is never used.
    let v = notify(&a, "svc", "MYPROVIDER", &format!("{purl}/evil")).await;
    assert_eq!(v["status"], "refreshed");
    assert!(v["newExpiresAt"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        prov.evil.load(Ordering::SeqCst),
        0,
        "hinted URL received nothing"
    );
    let form = prov.last_form.lock().unwrap().clone();
    assert_eq!(
        (form["client_id"].as_str(), form["client_secret"].as_str()),
        ("cid-1", "client-secret-xyz")
    );
    let tok = a.credential("svc", "").await.1["token"].clone();
    assert_eq!(
        (tok["accessToken"].as_str(), tok["refreshToken"].as_str()),
        (Some("at-new"), Some("rt-new"))
    );
    assert_eq!(
        (
            tok["certificateData"].as_str(),
            tok["scope"].as_str(),
            tok["tokenType"].as_str()
        ),
        (Some("cert-keep"), Some("repo"), Some("JWT"))
    );
    let after = a
        .storage(json!({"operation":"get","collection":"tokens","key":"svc"}))
        .await;
    assert_eq!(
        after["data"]["meta"]["createdAt"],
        before["data"]["meta"]["createdAt"]
    );
    assert_eq!(after["data"]["meta"]["creationId"], "creation-1");
    assert_ne!(
        after["data"]["meta"]["expiryTime"],
        before["data"]["meta"]["expiryTime"]
    );
    // Statuses.
    assert_eq!(
        notify(&a, "nothing", "myprovider", "").await["status"],
        "no_token"
    );
    a.store_ok("norefresh", json!({"accessToken":"x"})).await;
    assert_eq!(
        notify(&a, "norefresh", "myprovider", "").await["status"],
        "no_refresh_token"
    );
    assert_eq!(
        notify(&a, "svc", "unknown-provider", "").await["status"],
        "acknowledged"
    );
    let out = cli(&[
        "--config",
        a.config().to_str().unwrap(),
        "oauth-client",
        "remove",
        "myprovider",
    ]);
    assert!(out.status.success());
    assert_eq!(
        notify(&a, "svc", "myprovider", "").await["status"],
        "acknowledged"
    );
    assert!(!a.log_text().contains("client-secret-xyz") && !a.log_text().contains("rt-new"));
}

#[tokio::test]
async fn refresh_failures_keep_the_old_document() {
    let (purl, prov) = provider().await;
    let (_t, a) = bound("").await;
    add_client(&a, "bad", &format!("{purl}/token-error"), "post");
    add_client(&a, "noaccess", &format!("{purl}/token-noaccess"), "post");
    add_client(&a, "norotate", &format!("{purl}/token-norotate"), "basic");
    add_client(&a, "down", "http://127.0.0.1:1/token", "post");
    seed_oauth_token(&a, "svc").await;
    let raw_before = a
        .storage(json!({"operation":"get","collection":"tokens","key":"svc"}))
        .await["data"]
        .clone();
    for p in ["bad", "noaccess", "down"] {
        assert_eq!(
            notify(&a, "svc", p, "").await["status"],
            "refresh_failed",
            "{p}"
        );
        assert_eq!(
            a.storage(json!({"operation":"get","collection":"tokens","key":"svc"}))
                .await["data"],
            raw_before,
            "{p}: unchanged"
        );
    }
    assert_eq!(
        a.credential("svc", "").await.1["token"]["accessToken"],
        "at-old"
    );
    // No rotation: the old refresh token is kept. Basic auth used.
    assert_eq!(
        notify(&a, "svc", "norotate", "").await["status"],
        "refreshed"
    );
    let auth = prov.last_auth.lock().unwrap().clone().unwrap();
    let decoded = String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(auth.trim_start_matches("Basic "))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(decoded, "cid-1:client-secret-xyz");
    assert!(!prov.last_form.lock().unwrap().contains_key("client_secret"));
    let tok = a.credential("svc", "").await.1["token"].clone();
    assert_eq!(
        (tok["accessToken"].as_str(), tok["refreshToken"].as_str()),
        (Some("at-new"), Some("rt-old"))
    );
}

#[tokio::test]
async fn concurrent_notifies_are_a_single_flight() {
    let (purl, prov) = provider().await;
    let (_t, a) = bound("[metrics]\nlisten = \"127.0.0.1:0\"\n").await;
    add_client(&a, "gated", &format!("{purl}/token-gated"), "post");
    seed_oauth_token(&a, "svc").await;
    // The provider holds its answer until all 20 notifications are in:
    // the first one's call has arrived and the other 19 have joined it.
    let futs: Vec<_> = (0..20).map(|_| notify(&a, "svc", "gated", "")).collect();
    let (results, ()) = tokio::join!(futures::future::join_all(futs), async {
        a.wait_metrics("19 notifications joined the refresh in flight", |m| {
            metric(m, "tvw_refresh_joined_total") == 19
        })
        .await;
        assert_eq!(prov.calls.load(Ordering::SeqCst), 1);
        prov.gate.add_permits(1);
    });
    assert!(
        results.iter().all(|v| v["status"] == "refreshed"),
        "{results:?}"
    );
    assert_eq!(
        prov.calls.load(Ordering::SeqCst),
        1,
        "one provider call for 20 notifications"
    );
}

#[tokio::test]
async fn tv_mediated_refresh() {
    let (_t, a) = bound("").await;
    seed_oauth_token(&a, "google").await;
    let (s, v) = a
        .signed(
            "/v1/refresh",
            json!({"requestId":"req_tv1","action":"get","service":"google"}),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(
        (
            v["status"].as_str(),
            v["refreshToken"].as_str(),
            v["requestId"].as_str()
        ),
        (Some("ok"), Some("rt-old"), Some("req_tv1"))
    );
    assert_eq!(v["meta"]["tokenType"], "JWT");
    assert!(v["meta"].get("accessToken").is_none());
    let (s, v) = a.signed("/v1/refresh", json!({"action":"update","service":"google","tokens":{"accessToken":"ya29.new","refreshToken":"1//rt2","expiryTime":1900000000000i64}})).await;
    assert_eq!(s, 200);
    assert_eq!(v["status"], "updated");
    assert_eq!(v["newExpiresAt"], "2030-03-17T17:46:40Z");
    assert!(!v.to_string().contains("ya29.new"));
    let tok = a.credential("google", "").await.1["token"].clone();
    assert_eq!(
        (
            tok["accessToken"].as_str(),
            tok["refreshToken"].as_str(),
            tok["certificateData"].as_str()
        ),
        (Some("ya29.new"), Some("1//rt2"), Some("cert-keep"))
    );
    assert_eq!(tok["expiryTime"], 1900000000000i64);
    a.store_ok("plain", json!({"accessToken":"x"})).await;
    assert_eq!(
        a.signed("/v1/refresh", json!({"action":"get","service":"plain"}))
            .await
            .1["status"],
        "no_refresh_token"
    );
    assert_eq!(
        a.signed("/v1/refresh", json!({"action":"get","service":"none"}))
            .await
            .1["status"],
        "no_token"
    );
    assert_eq!(
        a.signed(
            "/v1/refresh",
            json!({"action":"update","service":"none","tokens":{"accessToken":"a"}})
        )
        .await
        .1["status"],
        "no_token"
    );
    let (s, v) = a
        .signed("/v1/refresh", json!({"action":"delete","service":"google"}))
        .await;
    assert_eq!((s, v["error"].as_str()), (400, Some("invalid_request")));
}
