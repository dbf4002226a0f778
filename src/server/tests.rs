//! Handler tests with `oneshot` (test-only software key backend, real LMDB).

use super::*;
use crate::app::{App, Settings};
use crate::keys::soft::SoftBackend;
use crate::keys::Backend;
use crate::protocol::storage::Collection;
use crate::store::BindCode;
use crate::store::Store;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tower::ServiceExt;

fn test_broker() -> crate::broker::Broker {
    crate::broker::Broker {
        proxy: crate::broker::proxy::Proxy::new(
            std::sync::Arc::new(crate::egress::EgressPolicy {
                allow_loopback: true,
                ..Default::default()
            }),
            false,
            std::time::Duration::from_secs(5),
            1 << 20,
        )
        .unwrap(),
        refresher: std::sync::Arc::new(crate::broker::refresh::Refresher::new().unwrap()),
    }
}

fn test_settings() -> Settings {
    Settings {
        broker: test_broker(),
        minter: crate::custody::gcp::Minter::new(
            true,
            std::sync::Arc::new(crate::egress::EgressPolicy {
                allow_loopback: true,
                ..Default::default()
            }),
        )
        .unwrap(),
        public_url: "https://hook.example.com".into(),
        frontend_url: "https://tokenvault.uk".into(),
        code_ttl_secs: 300,
        webhook_id: "wh_test".into(),
        policy: Default::default(),
    }
}

fn test_http(body_limit: usize) -> HttpSettings {
    HttpSettings {
        direct: direct::DirectSettings::permissive_for_tests(),
        body_limit,
        shield: Arc::new(shield::Shield::unlimited()),
        helpers_on_public: true,
        tv_refresh: crate::config::ServiceSwitch::On,
    }
}

struct T {
    _dir: tempfile::TempDir,
    state: AppState,
    secret: Option<Vec<u8>>,
}

fn state_with(map_mib: usize, body_limit: usize) -> T {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), map_mib << 20).unwrap();
    let backend: Backend = Arc::new(SoftBackend::new());
    let state = AppState::new(
        App::new(backend, store, test_settings(), false),
        test_http(body_limit),
    );
    T {
        _dir: dir,
        state,
        secret: None,
    }
}

const LOOPBACK: &str = "127.0.0.1:5000";
const REMOTE: &str = "203.0.113.9:5000";

async fn send(t: &T, req: Request<Body>) -> (StatusCode, Value, axum::http::HeaderMap) {
    let resp = app(t.state.clone()).oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    let v = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()))
    };
    (status, v, headers)
}

fn req(method: Method, path: &str, peer: Option<&str>, body: Vec<u8>) -> Request<Body> {
    let mut r = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap();
    if let Some(p) = peer {
        r.extensions_mut().insert(PeerAddr(p.parse().unwrap()));
    }
    r
}

fn sign(secret: &[u8], ts: &str, body: &[u8]) -> String {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap();
    m.update(ts.as_bytes());
    m.update(b".");
    m.update(body);
    format!("sha256={}", hex::encode(m.finalize().into_bytes()))
}

fn signed_req(secret: &[u8], path: &str, body: &Value, rid: &str, ts: i64) -> Request<Body> {
    let raw = serde_json::to_vec(body).unwrap();
    let ts = ts.to_string();
    let mut r = req(Method::POST, path, Some(LOOPBACK), raw.clone());
    let h = r.headers_mut();
    h.insert(
        "x-tokenvault-signature",
        sign(secret, &ts, &raw).parse().unwrap(),
    );
    h.insert("x-tokenvault-timestamp", ts.parse().unwrap());
    h.insert("x-tokenvault-request-id", rid.parse().unwrap());
    r
}

static RID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
fn rid() -> String {
    format!(
        "req_{:012x}",
        RID.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

async fn call(t: &T, path: &str, body: Value) -> (StatusCode, Value) {
    let (s, v, _) = send(
        t,
        signed_req(t.secret.as_ref().unwrap(), path, &body, &rid(), now()),
    )
    .await;
    (s, v)
}

async fn register(t: &T) -> Value {
    let (s, v, h) = send(
        t,
        req(Method::GET, "/v1/register-url", Some(LOOPBACK), vec![]),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h["cache-control"], "no-store");
    v
}

async fn bind(t: &mut T) {
    let reg = register(t).await;
    let (s, v, _) = send(
        t,
        req(
            Method::POST,
            "/v1/exchange",
            None,
            serde_json::to_vec(&json!({"code": reg["code"]})).unwrap(),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let secret = base64::engine::general_purpose::STANDARD
        .decode(v["hmacSecret"].as_str().unwrap())
        .unwrap();
    assert_eq!(secret.len(), 32);
    t.secret = Some(secret);
}

#[tokio::test]
async fn health_get_head_and_shape() {
    let t = state_with(16, 1 << 20);
    let (s, v, _) = send(&t, req(Method::GET, "/v1/health", None, vec![])).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["status"], "healthy");
    assert_eq!(v["keyConfigured"], true);
    assert_eq!(v["capabilities"], json!(crate::protocol::CAPABILITIES));
    assert_eq!(v["tokenCount"], 0);
    assert!(v["uptime"].is_u64());
    assert_eq!(v["version"], crate::protocol::VERSION);
    let (s, v, _) = send(&t, req(Method::HEAD, "/v1/health", None, vec![])).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v, Value::Null);
    // keyConfigured reflects the backend.
    let mut t2 = state_with(16, 1 << 20);
    t2.state.app.backend = Arc::new(SoftBackend::without_aes());
    let (_, v, _) = send(&t2, req(Method::GET, "/v1/health", None, vec![])).await;
    assert_eq!(v["keyConfigured"], false);
}

#[tokio::test]
async fn unknown_paths_and_methods_are_json() {
    let t = state_with(16, 1 << 20);
    let (s, v, _) = send(&t, req(Method::GET, "/nope", None, vec![])).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    let (s, v, _) = send(&t, req(Method::DELETE, "/v1/storage", None, vec![])).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::METHOD_NOT_ALLOWED, Some("method_not_allowed"))
    );
}

#[tokio::test]
async fn signed_endpoints_need_binding_first() {
    let t = state_with(16, 1 << 20);
    let secret = [7u8; 32];
    for path in ["/v1/storage", "/v1/health"] {
        let (s, v, _) = send(
            &t,
            signed_req(
                &secret,
                path,
                &json!({"operation":"list","collection":"tokens"}),
                &rid(),
                now(),
            ),
        )
        .await;
        assert_eq!(s, StatusCode::FORBIDDEN);
        assert_eq!(v["error"], "setup_required");
        assert_eq!(v["message"], "Complete /v1/exchange first");
    }
}

#[tokio::test]
async fn register_url_is_loopback_only_and_well_formed() {
    let t = state_with(16, 1 << 20);
    for peer in [Some(REMOTE), None, Some("[2001:db8::1]:443")] {
        let (s, v, _) = send(&t, req(Method::GET, "/v1/register-url", peer, vec![])).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{peer:?}");
        assert_eq!(v["error"], "not_found");
        let (s, _, _) = send(&t, req(Method::GET, "/bind", peer, vec![])).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        let (s, _, _) = send(&t, req(Method::POST, "/bind", peer, vec![])).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
    }
    // IPv6 loopback and v4-mapped loopback are local.
    for peer in ["[::1]:5000", "[::ffff:127.0.0.1]:5000"] {
        let (s, _, _) = send(&t, req(Method::GET, "/v1/register-url", Some(peer), vec![])).await;
        assert_eq!(s, StatusCode::OK);
    }
    let reg = register(&t).await;
    assert_eq!(reg["expiresIn"], 300);
    assert_eq!(reg["webhookUrl"], "https://hook.example.com");
    let code = reg["code"].as_str().unwrap();
    assert_eq!(uuid::Uuid::parse_str(code).unwrap().get_version_num(), 4);
    let url = url::Url::parse(reg["registrationUrl"].as_str().unwrap()).unwrap();
    assert_eq!(url.origin().ascii_serialization(), "https://tokenvault.uk");
    assert_eq!(url.path(), "/vault/webhook-bind");
    let q: std::collections::HashMap<_, _> = url.query_pairs().into_owned().collect();
    assert_eq!(q["code"], code);
    let wu = base64::engine::general_purpose::STANDARD
        .decode(&q["webhook_url"])
        .unwrap();
    assert_eq!(wu, b"https://hook.example.com");
    // The raw query is properly encoded (base64 '=' and '+' escaped).
    let raw_wu = url
        .query()
        .unwrap()
        .split('&')
        .find_map(|p| p.strip_prefix("webhook_url="))
        .unwrap();
    assert!(
        raw_wu
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'%'),
        "{raw_wu}"
    );
    // hmac_hash is the SHA-256 of the secret the exchange later returns.
    let (s, v, _) = send(
        &t,
        req(
            Method::POST,
            "/v1/exchange",
            None,
            serde_json::to_vec(&json!({"code": code})).unwrap(),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let secret = base64::engine::general_purpose::STANDARD
        .decode(v["hmacSecret"].as_str().unwrap())
        .unwrap();
    assert_eq!(hex::encode(Sha256::digest(&secret)), q["hmac_hash"]);
    assert_eq!(v["webhookId"], "wh_test");
    assert_eq!(v["capabilities"], json!(crate::protocol::CAPABILITIES));
    assert_eq!(v["version"], crate::protocol::VERSION);
}

#[tokio::test]
async fn bind_page_and_button() {
    let mut t = state_with(16, 1 << 20);
    let (s, v, _) = send(&t, req(Method::GET, "/bind", Some(LOOPBACK), vec![])).await;
    assert_eq!(s, StatusCode::OK);
    assert!(v.as_str().unwrap().contains("Connect to TokenVault"));
    let (s, _, h) = send(&t, req(Method::POST, "/bind", Some(LOOPBACK), vec![])).await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    assert!(h["location"]
        .to_str()
        .unwrap()
        .starts_with("https://tokenvault.uk/vault/webhook-bind?code="));
    bind(&mut t).await;
    let (_, v, _) = send(&t, req(Method::GET, "/bind", Some(LOOPBACK), vec![])).await;
    assert!(v.as_str().unwrap().contains("wh_test"));
    let (_, v, _) = send(
        &t,
        req(Method::GET, "/bind?force=1", Some(LOOPBACK), vec![]),
    )
    .await;
    assert!(v.as_str().unwrap().contains("Connect to TokenVault"));
}

#[tokio::test]
async fn exchange_errors() {
    let t = state_with(16, 1 << 20);
    let ex = |body: Value| {
        req(
            Method::POST,
            "/v1/exchange",
            None,
            serde_json::to_vec(&body).unwrap(),
        )
    };
    let (s, v, _) = send(
        &t,
        ex(json!({"code": "550e8400-e29b-41d4-a716-446655440000"})),
    )
    .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::GONE, Some("code_expired"))
    );
    assert_eq!(v["message"], "Registration code expired or not found");
    let (s, v, _) = send(&t, ex(json!({}))).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_request"))
    );
    let (s, _, _) = send(
        &t,
        req(Method::POST, "/v1/exchange", None, b"not json".to_vec()),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // Expired code.
    t.state
        .store
        .put_bind_code(
            "old",
            &BindCode {
                expires_at: now() - 1,
                used: false,
                sealed_secret: "x".into(),
            },
        )
        .await
        .unwrap();
    let (s, v, _) = send(&t, ex(json!({"code": "old"}))).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::GONE, Some("code_expired"))
    );
    // Used code.
    let reg = register(&t).await;
    let (s, _, _) = send(&t, ex(json!({"code": reg["code"]}))).await;
    assert_eq!(s, StatusCode::OK);
    let (s, v, _) = send(&t, ex(json!({"code": reg["code"]}))).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::GONE, Some("code_used"))
    );
    assert_eq!(v["message"], "Registration code already used");
    assert!(!v.to_string().contains("hmacSecret"));
}

#[tokio::test]
async fn rebind_rotates_the_hmac_key() {
    let mut t = state_with(16, 1 << 20);
    bind(&mut t).await;
    let old = t.secret.clone().unwrap();
    assert_eq!(call(&t, "/v1/health", json!({})).await.0, StatusCode::OK);
    bind(&mut t).await;
    assert_ne!(t.secret.as_ref().unwrap(), &old);
    assert_eq!(call(&t, "/v1/health", json!({})).await.0, StatusCode::OK);
    let (s, v, _) = send(
        &t,
        signed_req(&old, "/v1/health", &json!({}), &rid(), now()),
    )
    .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("auth_failed"))
    );
}

#[tokio::test]
async fn hmac_failures_and_replay() {
    let mut t = state_with(16, 1 << 20);
    bind(&mut t).await;
    let secret = t.secret.clone().unwrap();
    let body = json!({"operation":"list","collection":"tokens"});
    let bad = |r: Request<Body>| async {
        let (s, v, _) = send(&t, r).await;
        assert_eq!(
            (s, v["error"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("auth_failed")),
            "{v}"
        );
        v
    };
    // Wrong secret.
    bad(signed_req(&[9u8; 32], "/v1/storage", &body, &rid(), now())).await;
    // Stale and future timestamps.
    bad(signed_req(
        &secret,
        "/v1/storage",
        &body,
        &rid(),
        now() - 301,
    ))
    .await;
    bad(signed_req(
        &secret,
        "/v1/storage",
        &body,
        &rid(),
        now() + 301,
    ))
    .await;
    // Missing and malformed headers.
    for h in [
        "x-tokenvault-signature",
        "x-tokenvault-timestamp",
        "x-tokenvault-request-id",
    ] {
        let mut r = signed_req(&secret, "/v1/storage", &body, &rid(), now());
        r.headers_mut().remove(h);
        bad(r).await;
    }
    let mut r = signed_req(&secret, "/v1/storage", &body, &rid(), now());
    let up = r.headers()["x-tokenvault-signature"]
        .to_str()
        .unwrap()
        .to_uppercase()
        .replace("SHA256=", "sha256=");
    r.headers_mut()
        .insert("x-tokenvault-signature", up.parse().unwrap());
    bad(r).await;
    // The body is verified as received: re-serialising (spaces) breaks the MAC.
    let mut r = signed_req(&secret, "/v1/storage", &body, &rid(), now());
    let sig = r.headers()["x-tokenvault-signature"].clone();
    let ts = r.headers()["x-tokenvault-timestamp"].clone();
    let id = rid();
    r = req(
        Method::POST,
        "/v1/storage",
        Some(LOOPBACK),
        br#"{"operation": "list", "collection": "tokens"}"#.to_vec(),
    );
    r.headers_mut().insert("x-tokenvault-signature", sig);
    r.headers_mut().insert("x-tokenvault-timestamp", ts);
    r.headers_mut()
        .insert("x-tokenvault-request-id", id.parse().unwrap());
    bad(r).await;
    // A failed signature does not burn the id: the genuine request still goes through once.
    let id = rid();
    bad(signed_req(&[9u8; 32], "/v1/storage", &body, &id, now())).await;
    let (s, _, _) = send(&t, signed_req(&secret, "/v1/storage", &body, &id, now())).await;
    assert_eq!(s, StatusCode::OK);
    let v = bad(signed_req(&secret, "/v1/storage", &body, &id, now())).await;
    assert_eq!(v["message"], "Request id already used");
}

#[tokio::test]
async fn storage_operations_and_errors() {
    let mut t = state_with(16, 1 << 20);
    bind(&mut t).await;
    // set/get/delete on proxy_configs and vault_config; requestId echoed.
    let (s, v) = call(&t, "/v1/storage", json!({"requestId":"req_x1","operation":"set","collection":"proxy_configs","key":"proxy-abc","data":{"name":"GitHub MCP","upstreamUrl":"https://api.github.com/mcp","serviceName":"github"}})).await;
    assert_eq!(
        (s, v),
        (StatusCode::OK, json!({"requestId":"req_x1","status":"ok"}))
    );
    let (_, v) = call(&t, "/v1/storage", json!({"requestId":"req_x2","operation":"get","collection":"proxy_configs","key":"proxy-abc"})).await;
    assert_eq!(v["data"]["upstreamUrl"], "https://api.github.com/mcp");
    assert_eq!(v["requestId"], "req_x2");
    let (_, v) = call(
        &t,
        "/v1/storage",
        json!({"operation":"get","collection":"vault_config","key":"settings"}),
    )
    .await;
    assert_eq!(v["data"], Value::Null);
    call(
        &t,
        "/v1/storage",
        json!({"operation":"set","collection":"vault_config","key":"settings","data":{"a":1}}),
    )
    .await;
    let (_, v) = call(
        &t,
        "/v1/storage",
        json!({"operation":"get","collection":"vault_config","key":"settings"}),
    )
    .await;
    assert_eq!(v["data"], json!({"a":1}));
    let (s, _) = call(
        &t,
        "/v1/storage",
        json!({"operation":"delete","collection":"proxy_configs","key":"proxy-abc"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (_, v) = call(
        &t,
        "/v1/storage",
        json!({"operation":"get","collection":"proxy_configs","key":"proxy-abc"}),
    )
    .await;
    assert_eq!(v["data"], Value::Null);

    // Errors.
    for (body, msg) in [
        (
            json!({"collection":"tokens"}),
            "Missing required field: operation",
        ),
        (
            json!({"operation":"frobnicate","collection":"tokens"}),
            "Unknown operation",
        ),
        (
            json!({"operation":"list","collection":"secrets"}),
            "Unknown collection",
        ),
        (
            json!({"operation":"list"}),
            "Missing required field: collection",
        ),
        (
            json!({"operation":"get","collection":"tokens"}),
            "Missing required field: key",
        ),
        (
            json!({"operation":"set","collection":"vault_config","key":"k"}),
            "Missing required field: data",
        ),
        (
            json!({"operation":"delete","collection":"audit","key":"2026-01-01T00:00:00Z"}),
            "The audit collection is append-only",
        ),
        (
            json!({"operation":"list_batch"}),
            "Missing required field: collections",
        ),
        (
            json!({"operation":"list","collection":"tokens","options":{"limit":0}}),
            "options.limit must be a positive integer",
        ),
    ] {
        let (s, v) = call(&t, "/v1/storage", body.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(v, json!({"error":"invalid_request","message":msg}));
    }
    let (s, _) = call(
        &t,
        "/v1/storage",
        json!({"operation":"get","collection":"tokens","key":""}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = call(
        &t,
        "/v1/storage",
        json!({"operation":"get","collection":"tokens","key":"x".repeat(300)}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = call(&t, "/v1/storage", json!([1, 2])).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn tokens_never_leave_with_credentials() {
    let mut t = state_with(16, 1 << 20);
    bind(&mut t).await;
    // A sealed document as /v1/store will write it.
    let sealed = t.state.backend.seal(b"aad", b"ghp_supersecret").unwrap();
    let doc = json!({"v":1,"alg":"AES-256-GCM","fields":{"accessToken": base64::engine::general_purpose::STANDARD.encode(&sealed)},
        "meta":{"serviceName":"github","tokenType":"JWT","createdAt":"2026-02-01T10:00:00Z","hasRefreshToken":false,"internalNote":"x"}});
    let raw = serde_json::to_vec(&doc).unwrap();
    t.state
        .store
        .put_raw(Collection::Tokens, "github".into(), raw, false)
        .await
        .unwrap();

    let (_, v) = call(
        &t,
        "/v1/storage",
        json!({"operation":"list","collection":"tokens"}),
    )
    .await;
    assert_eq!(
        v["items"],
        json!([{"key":"github","meta":{"serviceName":"github","tokenType":"JWT","createdAt":"2026-02-01T10:00:00Z","hasRefreshToken":false}}])
    );
    let (_, v) = call(
        &t,
        "/v1/storage",
        json!({"operation":"get","collection":"tokens","key":"github"}),
    )
    .await;
    assert!(v["data"].get("fields").is_none());
    assert_eq!(v["data"]["meta"]["serviceName"], "github");
    let text = v.to_string();
    assert!(!text.contains(&base64::engine::general_purpose::STANDARD.encode(&sealed)));

    // Metadata updates keep the sealed fields and protected meta.
    let (s, _) = call(&t, "/v1/storage", json!({"operation":"set","collection":"tokens","key":"github","data":{"meta":{"displayName":"GH","hasRefreshToken":true}}})).await;
    assert_eq!(s, StatusCode::OK);
    let stored: Value = serde_json::from_slice(
        &t.state
            .store
            .get_raw(Collection::Tokens, "github")
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(stored["fields"], doc["fields"]);
    assert_eq!(stored["meta"]["displayName"], "GH");
    assert_eq!(stored["meta"]["hasRefreshToken"], false);

    // Credential material through /v1/storage is sealed on the way in.
    for (i, data) in [
        json!({"accessToken":"ghp_x"}),
        json!({"v":1,"alg":"none","fields":{"accessToken":"ghp_x"},"meta":{"tokenType":"JWT"}}),
        json!({"totpSecret":"JBSWY3DPEHPK3PXP"}),
    ]
    .into_iter()
    .enumerate()
    {
        let key = format!("other{i}");
        let (s, v) = call(
            &t,
            "/v1/storage",
            json!({"operation":"set","collection":"tokens","key":key,"data":data}),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let raw = t
            .state
            .store
            .get_raw(Collection::Tokens, &key)
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&raw);
        assert!(!text.contains("ghp_x") && !text.contains("JBSW"), "{text}");
        let stored: Value = serde_json::from_slice(&raw).unwrap();
        assert_eq!(stored["alg"], "AES-256-GCM");
    }
    let stored: Value = serde_json::from_slice(
        &t.state
            .store
            .get_raw(Collection::Tokens, "other1")
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(stored["meta"]["tokenType"], "JWT");
    // Fields sealed under some other key cannot be stored.
    let (s, v) = call(&t, "/v1/storage", json!({"operation":"set","collection":"tokens","key":"foreign","data":{"v":1,"alg":"AES-256-GCM","fields":{"accessToken":"AAEC"}}})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(v["message"].as_str().unwrap().contains("import"));
    assert!(t
        .state
        .store
        .get_raw(Collection::Tokens, "foreign")
        .unwrap()
        .is_none());
    for i in 0..3 {
        call(
            &t,
            "/v1/storage",
            json!({"operation":"delete","collection":"tokens","key":format!("other{i}")}),
        )
        .await;
    }

    // Filters on tokens match meta; list_batch skips unknown collections.
    let (_, v) = call(
        &t,
        "/v1/storage",
        json!({"operation":"list","collection":"tokens","options":{"filters":{"tokenType":"JWT"}}}),
    )
    .await;
    assert_eq!(v["items"].as_array().unwrap().len(), 1);
    let (_, v) = call(&t, "/v1/storage", json!({"operation":"list","collection":"tokens","options":{"filters":{"tokenType":"PlainText"}}})).await;
    assert_eq!(v["items"], json!([]));
    assert_eq!(v["pagination"]["totalCount"], 0);
    let (_, v) = call(&t, "/v1/storage", json!({"requestId":"req_b","operation":"list_batch","collections":["tokens","nope","audit"]})).await;
    assert_eq!(
        v["results"].as_object().unwrap().keys().collect::<Vec<_>>(),
        ["audit", "tokens"]
    );
    assert_eq!(v["results"]["tokens"]["items"][0]["key"], "github");
    assert_eq!(v["requestId"], "req_b");
    let (_, v) = call(&t, "/v1/health", json!({})).await;
    assert_eq!(v["tokenCount"], 1);
}

#[tokio::test]
async fn limits_clamp_and_pages_walk() {
    let mut t = state_with(64, 1 << 20);
    bind(&mut t).await;
    for i in 0..250 {
        let k = format!("svc-{i:03}");
        let raw =
            serde_json::to_vec(&json!({"v":1,"alg":"none","meta":{"serviceName":k}})).unwrap();
        t.state
            .store
            .put_raw(Collection::Tokens, k, raw, false)
            .await
            .unwrap();
    }
    let (_, v) = call(
        &t,
        "/v1/storage",
        json!({"operation":"list","collection":"tokens","options":{"limit":500}}),
    )
    .await;
    assert_eq!(v["items"].as_array().unwrap().len(), 200);
    assert_eq!(
        v["pagination"],
        json!({"hasMore":true,"nextCursor":"svc-199","totalCount":250})
    );
    let (_, v) = call(
        &t,
        "/v1/storage",
        json!({"operation":"list","collection":"tokens"}),
    )
    .await;
    assert_eq!(v["items"].as_array().unwrap().len(), 250, "default is all");
    let (_, v) = call(
        &t,
        "/v1/storage",
        json!({"operation":"list","collection":"tokens","options":{"limit":200,"after":"svc-199"}}),
    )
    .await;
    assert_eq!(v["items"].as_array().unwrap().len(), 50);
    assert_eq!(v["items"][0]["key"], "svc-200");
    assert_eq!(v["pagination"]["hasMore"], false);
}

#[tokio::test]
async fn body_limit_and_full_store() {
    let mut t = state_with(1, 8 << 20);
    bind(&mut t).await;
    // A write larger than the map: 507, nothing written, earlier data intact.
    call(&t, "/v1/storage", json!({"operation":"set","collection":"vault_config","key":"settings","data":{"keep":true}})).await;
    let (s, v) = call(&t, "/v1/storage", json!({"operation":"set","collection":"vault_config","key":"big","data":{"blob":"x".repeat(3 << 20)}})).await;
    assert_eq!(s, StatusCode::INSUFFICIENT_STORAGE);
    assert_eq!(v["error"], "insufficient_storage");
    let (_, v) = call(
        &t,
        "/v1/storage",
        json!({"operation":"get","collection":"vault_config","key":"settings"}),
    )
    .await;
    assert_eq!(v["data"], json!({"keep":true}));
    let (_, v) = call(
        &t,
        "/v1/storage",
        json!({"operation":"get","collection":"vault_config","key":"big"}),
    )
    .await;
    assert_eq!(v["data"], Value::Null);

    let mut small = state_with(16, 4096);
    bind(&mut small).await;
    let (s, v) = call(&small, "/v1/storage", json!({"operation":"set","collection":"vault_config","key":"k","data":{"blob":"x".repeat(5000)}})).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(v["error"], "payload_too_large");
}

#[tokio::test]
async fn audit_via_storage_keeps_duplicates_newest_first() {
    let mut t = state_with(16, 1 << 20);
    bind(&mut t).await;
    for i in 0..3 {
        call(&t, "/v1/storage", json!({"operation":"set","collection":"audit","key":"2026-02-15T10:30:00Z","data":{"event_type":"SECRET_ACCESS","n":i}})).await;
    }
    call(&t, "/v1/storage", json!({"operation":"set","collection":"audit","key":"2026-02-15T10:31:00Z","data":{"event_type":"TOKEN_REFRESH","n":3}})).await;
    let (_, v) = call(
        &t,
        "/v1/storage",
        json!({"operation":"list","collection":"audit"}),
    )
    .await;
    let ns: Vec<i64> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["data"]["n"].as_i64().unwrap())
        .collect();
    assert_eq!(ns, [3, 2, 1, 0]);
    assert_eq!(v["items"][0]["key"], "2026-02-15T10:31:00Z");
    let (_, v) = call(&t, "/v1/storage", json!({"operation":"list","collection":"audit","options":{"filters":{"event_type":"SECRET_ACCESS"},"limit":2}})).await;
    assert_eq!(v["pagination"]["totalCount"], 3);
    assert_eq!(v["pagination"]["hasMore"], true);
    let (_, v) = call(
        &t,
        "/v1/storage",
        json!({"operation":"get","collection":"audit","key":"2026-02-15T10:30:00Z"}),
    )
    .await;
    assert_eq!(v["data"]["n"], 2);
}

#[tokio::test]
async fn a_malformed_audit_cursor_is_400_not_a_restart_from_the_newest() {
    let mut t = state_with(16, 1 << 20);
    bind(&mut t).await;
    for i in 0..3 {
        let (s, _) = call(&t, "/v1/storage", json!({"operation":"set","collection":"audit","key":format!("2026-02-15T10:3{i}:00Z"),"data":{"n":i}})).await;
        assert_eq!(s, StatusCode::OK);
    }
    let list = |after: &str| json!({"operation":"list","collection":"audit","options":{"limit":1,"after":after}});
    // A cursor this listing returned walks on.
    let (s, v) = call(
        &t,
        "/v1/storage",
        json!({"operation":"list","collection":"audit","options":{"limit":1}}),
    )
    .await;
    assert_eq!(
        (s, v["items"][0]["data"]["n"].as_i64()),
        (StatusCode::OK, Some(2))
    );
    let next = v["pagination"]["nextCursor"].as_str().unwrap().to_string();
    let (s, v) = call(&t, "/v1/storage", list(&next)).await;
    assert_eq!(
        (s, v["items"][0]["data"]["n"].as_i64()),
        (StatusCode::OK, Some(1))
    );
    for bad in ["tvc1:zz", "tvc1:", "tvc1:0102", &format!("{next}ff")] {
        let (s, v) = call(&t, "/v1/storage", list(bad)).await;
        assert_eq!(
            (s, v["error"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_request")),
            "{bad}: {v}"
        );
    }
    // list_batch refuses it the same way.
    let (s, v) = call(
        &t,
        "/v1/storage",
        json!({"operation":"list_batch","collections":["audit"],"options":{"after":"tvc1:zz"}}),
    )
    .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_request")),
        "{v}"
    );
}

#[tokio::test]
async fn pagination_edges_last_page_deleted_cursor_filters_and_bad_limits() {
    let mut t = state_with(16, 1 << 20);
    bind(&mut t).await;
    for (k, kind) in [("a", "x"), ("b", "y"), ("c", "x"), ("d", "y")] {
        let (s, _) = call(
            &t,
            "/v1/storage",
            json!({"operation":"set","collection":"proxy_configs","key":k,"data":{"kind":kind}}),
        )
        .await;
        assert_eq!(s, StatusCode::OK);
    }
    let list =
        |opts: Value| json!({"operation":"list","collection":"proxy_configs","options":opts});
    let keys = |v: &Value| -> Vec<String> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["key"].as_str().unwrap().to_string())
            .collect()
    };
    // A page that ends exactly on the last item: no more, no cursor.
    let (_, v) = call(&t, "/v1/storage", list(json!({"limit":2,"after":"b"}))).await;
    assert_eq!(keys(&v), ["c", "d"]);
    assert_eq!(v["pagination"], json!({"hasMore":false,"totalCount":4}));
    let (_, v) = call(&t, "/v1/storage", list(json!({"limit":4}))).await;
    assert_eq!(keys(&v), ["a", "b", "c", "d"]);
    assert_eq!(v["pagination"], json!({"hasMore":false,"totalCount":4}));
    // A cursor naming a key deleted since: the walk goes on after it.
    let (_, v) = call(&t, "/v1/storage", list(json!({"limit":2}))).await;
    assert_eq!(v["pagination"]["nextCursor"], "b");
    let (s, _) = call(
        &t,
        "/v1/storage",
        json!({"operation":"delete","collection":"proxy_configs","key":"b"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (_, v) = call(&t, "/v1/storage", list(json!({"limit":2,"after":"b"}))).await;
    assert_eq!(keys(&v), ["c", "d"]);
    assert_eq!(v["pagination"]["totalCount"], 3);
    // Filters with `after`: matching items after the cursor; the total
    // counts every match wherever the cursor is.
    let (_, v) = call(
        &t,
        "/v1/storage",
        list(json!({"after":"a","filters":{"kind":"x"}})),
    )
    .await;
    assert_eq!(keys(&v), ["c"]);
    assert_eq!(v["pagination"], json!({"hasMore":false,"totalCount":2}));
    let (_, v) = call(
        &t,
        "/v1/storage",
        list(json!({"limit":1,"filters":{"kind":"x"}})),
    )
    .await;
    assert_eq!(keys(&v), ["a"]);
    assert_eq!(
        v["pagination"],
        json!({"hasMore":true,"nextCursor":"a","totalCount":2})
    );
    // A limit that is not a positive integer is refused, never clamped.
    for bad in [json!(1.5), json!("2"), json!(0), json!(-1), json!(true)] {
        let (s, v) = call(&t, "/v1/storage", list(json!({"limit":bad}))).await;
        assert_eq!(
            (s, v["error"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_request")),
            "limit {bad}: {v}"
        );
    }
}

/// Delegates to the software backend; while `down`, every device call fails.
struct Flaky {
    inner: SoftBackend,
    down: std::sync::atomic::AtomicBool,
}

impl Flaky {
    fn check(&self) -> Result<(), crate::keys::KeyError> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            Err(crate::keys::KeyError::Unavailable)
        } else {
            Ok(())
        }
    }
}

impl crate::keys::KeyBackendBase for Flaky {
    fn kind(&self) -> &'static str {
        "flaky"
    }
    fn healthy(&self) -> bool {
        self.check().is_ok()
    }
    fn aes_key_present(&self) -> bool {
        true
    }
    fn probe(&self) -> Result<(), crate::keys::KeyError> {
        self.check()
    }
}
impl crate::keys::RandomSource for Flaky {
    fn fill_random(&self, b: &mut [u8]) -> Result<(), crate::keys::KeyError> {
        self.check()?;
        self.inner.fill_random(b)
    }
}
impl crate::keys::MacKeys for Flaky {
    fn install_hmac(
        &self,
        s: &secrecy::SecretSlice<u8>,
    ) -> Result<crate::keys::HmacKeyId, crate::keys::KeyError> {
        self.check()?;
        self.inner.install_hmac(s)
    }
    fn activate_hmac(&self, id: &crate::keys::HmacKeyId) -> Result<(), crate::keys::KeyError> {
        self.check()?;
        self.inner.activate_hmac(id)
    }
    fn destroy_hmac_except(
        &self,
        k: Option<&crate::keys::HmacKeyId>,
    ) -> Result<usize, crate::keys::KeyError> {
        self.check()?;
        self.inner.destroy_hmac_except(k)
    }
    fn hmac_sha256(&self, d: &[u8]) -> Result<[u8; 32], crate::keys::KeyError> {
        self.check()?;
        self.inner.hmac_sha256(d)
    }
}
impl crate::keys::OtpKeys for Flaky {
    fn install_otp(
        &self,
        s: &secrecy::SecretSlice<u8>,
        a: crate::keys::OtpAlg,
    ) -> Result<Option<String>, crate::keys::KeyError> {
        self.check()?;
        self.inner.install_otp(s, a)
    }
    fn otp_hmac(
        &self,
        id: &str,
        a: crate::keys::OtpAlg,
        c: u64,
    ) -> Result<Vec<u8>, crate::keys::KeyError> {
        self.check()?;
        self.inner.otp_hmac(id, a, c)
    }
    fn destroy_otp(&self, id: &str) -> Result<(), crate::keys::KeyError> {
        self.check()?;
        self.inner.destroy_otp(id)
    }
    fn list_otp(&self) -> Result<Vec<String>, crate::keys::KeyError> {
        self.check()?;
        self.inner.list_otp()
    }
}
impl crate::keys::SealKeys for Flaky {
    fn seal_with(&self, g: u32, a: &[u8], p: &[u8]) -> Result<Vec<u8>, crate::keys::KeyError> {
        self.check()?;
        self.inner.seal_with(g, a, p)
    }
    fn open_with(
        &self,
        g: u32,
        a: &[u8],
        s: &[u8],
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, crate::keys::KeyError> {
        self.check()?;
        self.inner.open_with(g, a, s)
    }
    fn aes_active(&self) -> Result<u32, crate::keys::KeyError> {
        self.inner.aes_active()
    }
    fn aes_readable(&self) -> Result<Vec<u32>, crate::keys::KeyError> {
        self.inner.aes_readable()
    }
}
impl crate::keys::AesGenerations for Flaky {
    fn create_aes(&self, g: u32) -> Result<bool, crate::keys::KeyError> {
        self.check()?;
        self.inner.create_aes(g)
    }
    fn aes_generations(&self) -> Result<Vec<u32>, crate::keys::KeyError> {
        self.check()?;
        self.inner.aes_generations()
    }
    fn destroy_aes(&self, g: u32) -> Result<(), crate::keys::KeyError> {
        self.check()?;
        self.inner.destroy_aes(g)
    }
    fn forget_aes_except(&self, keep: &[u32]) {
        self.inner.forget_aes_except(keep)
    }
}

#[tokio::test]
async fn hsm_outage_is_503_and_degraded_then_recovers() {
    let mut t = state_with(16, 1 << 20);
    let flaky = Arc::new(Flaky {
        inner: SoftBackend::new(),
        down: false.into(),
    });
    t.state.app.backend = flaky.clone();
    bind(&mut t).await;
    assert_eq!(call(&t, "/v1/health", json!({})).await.0, StatusCode::OK);
    flaky.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let (s, v) = call(
        &t,
        "/v1/storage",
        json!({"operation":"list","collection":"tokens"}),
    )
    .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(v["error"], "hsm_unavailable");
    let (_, v, _) = send(&t, req(Method::GET, "/v1/health", None, vec![])).await;
    assert_eq!(v["status"], "degraded");
    let (s, _, _) = send(
        &t,
        req(Method::GET, "/v1/register-url", Some(LOOPBACK), vec![]),
    )
    .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    // The device comes back: no restart needed.
    flaky.down.store(false, std::sync::atomic::Ordering::SeqCst);
    let (_, v, _) = send(&t, req(Method::GET, "/v1/health", None, vec![])).await;
    assert_eq!(v["status"], "healthy");
    assert_eq!(
        call(
            &t,
            "/v1/storage",
            json!({"operation":"list","collection":"tokens"})
        )
        .await
        .0,
        StatusCode::OK
    );
}

// ---- custody ------------------------------------------------------------

fn ticket(t: &T, pur: &str, svc: &str, extra: Value) -> String {
    let mut c = json!({"sub":"user-1","svc":svc,"pur":pur,"iat":now(),"exp":now()+60,"nonce":hex::encode(rid().as_bytes())});
    if let (Some(o), Some(e)) = (c.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            o.insert(k.clone(), v.clone());
        }
    }
    let p = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(c.to_string());
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(t.secret.as_ref().unwrap()).unwrap();
    m.update(p.as_bytes());
    format!("{p}.{}", hex::encode(m.finalize().into_bytes()))
}

async fn store_tok(t: &T, svc: &str, data: Value, extra: Value) -> (StatusCode, Value) {
    let (s, v, _) = store_req(t, svc, data, extra).await;
    (s, v)
}

/// `/v1/store` with a fresh ticket; the answer with its headers.
async fn store_req(
    t: &T,
    svc: &str,
    data: Value,
    extra: Value,
) -> (StatusCode, Value, axum::http::HeaderMap) {
    let body = json!({"ticket": ticket(t, "store", svc, extra), "service": svc, "tokenData": data});
    send(
        t,
        req(
            Method::POST,
            "/v1/store",
            Some(REMOTE),
            serde_json::to_vec(&body).unwrap(),
        ),
    )
    .await
}

async fn read_tok(t: &T, svc: &str, extra: Value) -> (StatusCode, Value) {
    let tk = ticket(t, "agent_credential", svc, extra);
    let uri = format!("/v1/credential?ticket={tk}&service={svc}");
    let (s, v, _) = send(t, req(Method::GET, &uri, Some(REMOTE), vec![])).await;
    (s, v)
}

#[tokio::test]
async fn store_then_credential_get_and_post() {
    let mut t = state_with(16, 1 << 20);
    bind(&mut t).await;
    let (s, v) = store_tok(&t, "github", json!({"accessToken":"ghp_abc","refreshToken":"ghr_x","tokenType":"JWT","expiresAt":"2026-02-17T15:30:00Z"}), json!({})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "stored");
    assert_eq!(v["service"], "github");
    assert_eq!(v["meta"]["tokenType"], "JWT");
    assert_eq!(v["meta"]["hasRefreshToken"], true);
    assert!(!v.to_string().contains("ghp_abc"));
    let (s, v) = read_tok(&t, "github", json!({})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["token"]["accessToken"], "ghp_abc");
    assert_eq!(v["token"]["refreshToken"], "ghr_x");
    assert_eq!(v["token"]["serviceName"], "github");
    assert_eq!(v["token"]["expiryTime"], 1771342200000i64);
    // POST form, user_reveal purpose.
    let body =
        json!({"ticket": ticket(&t, "user_reveal", "github", json!({})), "service": "github"});
    let (s, v, h) = send(
        &t,
        req(
            Method::POST,
            "/v1/credential",
            Some(REMOTE),
            serde_json::to_vec(&body).unwrap(),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["token"]["accessToken"], "ghp_abc");
    assert_eq!(h["cache-control"], "no-store");
    // Not found.
    let (s, v) = read_tok(&t, "nothing", json!({})).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("token_not_found"))
    );
    assert_eq!(v["message"], "No token found for service: nothing");
}

#[tokio::test]
async fn tickets_are_single_use_and_purpose_bound() {
    let mut t = state_with(16, 1 << 20);
    bind(&mut t).await;
    store_tok(&t, "svc", json!({"accessToken":"tok-1"}), json!({})).await;
    let tk = ticket(&t, "agent_credential", "svc", json!({}));
    let uri = format!("/v1/credential?ticket={tk}&service=svc");
    assert_eq!(
        send(&t, req(Method::GET, &uri, Some(REMOTE), vec![]))
            .await
            .0,
        StatusCode::OK
    );
    let (s, v, _) = send(&t, req(Method::GET, &uri, Some(REMOTE), vec![])).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("ticket_invalid"))
    );
    // A store ticket cannot read; a read ticket cannot store; nothing changes.
    let tk = ticket(&t, "store", "svc", json!({}));
    let (s, v, _) = send(
        &t,
        req(
            Method::GET,
            &format!("/v1/credential?ticket={tk}&service=svc"),
            Some(REMOTE),
            vec![],
        ),
    )
    .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("ticket_invalid"))
    );
    let body = json!({"ticket": ticket(&t, "agent_credential", "svc", json!({})), "service": "svc", "tokenData": {"accessToken":"evil"}});
    let (s, _, _) = send(
        &t,
        req(
            Method::POST,
            "/v1/store",
            Some(REMOTE),
            serde_json::to_vec(&body).unwrap(),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(
        read_tok(&t, "svc", json!({})).await.1["token"]["accessToken"],
        "tok-1"
    );
    // svc mismatch is 400.
    let tk = ticket(&t, "agent_credential", "other", json!({}));
    let (s, v, _) = send(
        &t,
        req(
            Method::GET,
            &format!("/v1/credential?ticket={tk}&service=svc"),
            Some(REMOTE),
            vec![],
        ),
    )
    .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_request"))
    );
    // Missing ticket / service.
    let (s, v, _) = send(
        &t,
        req(
            Method::GET,
            "/v1/credential?service=svc",
            Some(REMOTE),
            vec![],
        ),
    )
    .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("ticket_invalid"))
    );
    let (s, _, _) = send(
        &t,
        req(Method::GET, "/v1/credential?ticket=x", Some(REMOTE), vec![]),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn store_modes_and_creation_ids() {
    let mut t = state_with(16, 1 << 20);
    t.state.app.clock = crate::clock::Clock::fixed(now());
    bind(&mut t).await;
    assert_eq!(
        store_tok(
            &t,
            "s",
            json!({"accessToken":"v1"}),
            json!({"mode":"create","cid":"c1"})
        )
        .await
        .0,
        StatusCode::OK
    );
    let created = serde_json::from_slice::<Value>(
        &t.state
            .store
            .get_raw(Collection::Tokens, "s")
            .unwrap()
            .unwrap(),
    )
    .unwrap()["meta"]["createdAt"]
        .clone();
    assert_eq!(created, crate::clock::rfc3339(t.state.now()));
    let (s, v) = store_tok(
        &t,
        "s",
        json!({"accessToken":"v2"}),
        json!({"mode":"create","cid":"c2"}),
    )
    .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::CONFLICT, Some("already_exists"))
    );
    assert_eq!(
        read_tok(&t, "s", json!({})).await.1["token"]["accessToken"],
        "v1",
        "nothing written"
    );
    let (s, _) = store_tok(
        &t,
        "s",
        json!({"accessToken":"v2"}),
        json!({"mode":"upsert"}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // A stale read: the ticket's cid is not the stored one. Checked before decryption; ticket not burned.
    let (s, v) = read_tok(&t, "s", json!({"cid":"c0"})).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::CONFLICT, Some("stale_creation"))
    );
    assert_eq!(
        read_tok(&t, "s", json!({"cid":"c1"})).await.0,
        StatusCode::OK
    );
    // Overwrite keeps createdAt and records the new creation id; a later
    // write (the clock moved on by 5 s) has a later updatedAt.
    t.state.clock.advance(5);
    let (s, v) = store_tok(
        &t,
        "s",
        json!({"accessToken":"v3"}),
        json!({"mode":"overwrite","cid":"c3"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["meta"]["createdAt"], created);
    assert_eq!(v["meta"]["creationId"], "c3");
    assert_eq!(v["meta"]["updatedAt"], crate::clock::rfc3339(t.state.now()));
    assert_ne!(v["meta"]["updatedAt"], created);
    assert_eq!(
        read_tok(&t, "s", json!({"cid":"c1"})).await.0,
        StatusCode::CONFLICT
    );
    assert_eq!(
        read_tok(&t, "s", json!({"cid":"c3"})).await.1["token"]["accessToken"],
        "v3"
    );
}

#[tokio::test]
async fn cors_is_exact_and_never_reflected() {
    let mut t = state_with(16, 1 << 20);
    bind(&mut t).await;
    for path in ["/v1/store", "/v1/credential"] {
        let mut r = req(Method::OPTIONS, path, Some(REMOTE), vec![]);
        r.headers_mut()
            .insert("origin", "https://tokenvault.uk".parse().unwrap());
        let (s, _, h) = send(&t, r).await;
        assert_eq!(s, StatusCode::NO_CONTENT);
        assert_eq!(h["access-control-allow-origin"], "https://tokenvault.uk");
        assert_eq!(h["access-control-allow-methods"], "GET, POST, OPTIONS");
        assert_eq!(h["access-control-allow-headers"], "Content-Type");
        assert_eq!(h["vary"], "Origin");
        let mut r = req(Method::OPTIONS, path, Some(REMOTE), vec![]);
        r.headers_mut()
            .insert("origin", "https://evil.example".parse().unwrap());
        let (s, _, h) = send(&t, r).await;
        assert_eq!(s, StatusCode::NO_CONTENT);
        assert!(h.get("access-control-allow-origin").is_none());
    }
    // Actual requests carry CORS headers too (errors included); other endpoints never do.
    let mut r = req(
        Method::GET,
        "/v1/credential?service=x",
        Some(REMOTE),
        vec![],
    );
    r.headers_mut()
        .insert("origin", "https://tokenvault.uk".parse().unwrap());
    let (_, _, h) = send(&t, r).await;
    assert_eq!(h["access-control-allow-origin"], "https://tokenvault.uk");
    let mut r = req(Method::GET, "/v1/health", Some(REMOTE), vec![]);
    r.headers_mut()
        .insert("origin", "https://tokenvault.uk".parse().unwrap());
    let (_, _, h) = send(&t, r).await;
    assert!(h.get("access-control-allow-origin").is_none());
}

/// `t`'s store and keys behind other direct-access and shield settings.
fn with_limits(t: &T, direct: direct::DirectSettings, shield: shield::Shield) -> T {
    let mut http = test_http(1 << 20);
    http.direct = direct;
    http.shield = Arc::new(shield);
    let mut st = t.state.clone();
    st.http = Arc::new(http);
    T {
        _dir: tempfile::tempdir().unwrap(),
        state: st,
        secret: t.secret.clone(),
    }
}

const ORIGIN: &str = "https://tokenvault.uk";

fn with_origin(mut r: Request<Body>) -> Request<Body> {
    r.headers_mut().insert("origin", ORIGIN.parse().unwrap());
    r
}

fn credential_get(t: &T, peer: &str) -> Request<Body> {
    let tk = ticket(t, "agent_credential", "s", json!({}));
    with_origin(req(
        Method::GET,
        &format!("/v1/credential?ticket={tk}&service=s"),
        Some(peer),
        vec![],
    ))
}

fn store_post(t: &T, peer: &str) -> Request<Body> {
    let body = json!({"ticket": ticket(t, "store", "s", json!({})), "service": "s", "tokenData": {"accessToken": "v2"}});
    let mut r = req(
        Method::POST,
        "/v1/store",
        Some(peer),
        serde_json::to_vec(&body).unwrap(),
    );
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    with_origin(r)
}

#[tokio::test]
async fn deny_list_and_rate_limit_answers_carry_cors_for_the_browser() {
    let mut t = state_with(16, 1 << 20);
    bind(&mut t).await;
    store_tok(&t, "s", json!({"accessToken":"v1"}), json!({})).await;
    let t2 = with_limits(
        &t,
        direct::DirectSettings {
            allowed_origins: vec![ORIGIN.into()],
            deny: vec!["203.0.113.0/24".parse().unwrap()],
            trusted_proxies: vec![],
            limiter: direct::RateLimiter::new(1, 2),
        },
        shield::Shield::unlimited(),
    );
    // REMOTE (203.0.113.9) is denied, before any ticket work, on both
    // browser routes; the browser can read the refusal.
    for r in [credential_get(&t2, REMOTE), store_post(&t2, REMOTE)] {
        let path = r.uri().path().to_string();
        let (s, v, h) = send(&t2, r).await;
        assert_eq!(
            (s, v["error"].as_str()),
            (StatusCode::FORBIDDEN, Some("forbidden")),
            "{path}"
        );
        assert_eq!(h["access-control-allow-origin"], ORIGIN, "{path}");
        assert_eq!(h["vary"], "Origin", "{path}");
    }
    // Another address gets a burst of 2 (one refill a minute), then 429
    // with Retry-After, readable by the browser on both routes.
    let other = "198.51.100.20:4000";
    let mut codes = Vec::new();
    for r in [
        credential_get(&t2, other),
        credential_get(&t2, other),
        credential_get(&t2, other),
        store_post(&t2, other),
    ] {
        let (s, v, h) = send(&t2, r).await;
        if s == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(v["error"], "rate_limited", "{v}");
            let wait: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
            assert!(wait >= 1, "{wait}");
            assert_eq!(h["access-control-allow-origin"], ORIGIN);
        }
        codes.push(s);
    }
    assert_eq!(
        codes,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    // The failure budget's 429 (applied before routing) carries CORS too,
    // and a preflight is still answered while the budget is spent.
    let t3 = with_limits(
        &t,
        direct::DirectSettings {
            allowed_origins: vec![ORIGIN.into()],
            ..direct::DirectSettings::permissive_for_tests()
        },
        shield::Shield::new(shield::ShieldSettings {
            failures_per_minute: 1,
            failure_burst: 1,
            ..shield::ShieldSettings::defaults()
        }),
    );
    let bad = || {
        with_origin(req(
            Method::GET,
            "/v1/credential?ticket=bad&service=s",
            Some(other),
            vec![],
        ))
    };
    let (s, _, h) = send(&t3, bad()).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(h["access-control-allow-origin"], ORIGIN);
    let (s, v, h) = send(&t3, bad()).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("rate_limited"))
    );
    assert!(h.get("retry-after").is_some());
    assert_eq!(h["access-control-allow-origin"], ORIGIN);
    let (s, _, h) = send(
        &t3,
        with_origin(req(Method::OPTIONS, "/v1/store", Some(other), vec![])),
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(h["access-control-allow-origin"], ORIGIN);
    // Never on the other routes, whatever the answer.
    let (s, _, h) = send(
        &t3,
        with_origin(req(Method::GET, "/v1/health", Some(other), vec![])),
    )
    .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert!(h.get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn totp_seeds_are_withheld_and_plaintext_docs_resealed() {
    let mut t = state_with(16, 1 << 20);
    bind(&mut t).await;
    store_tok(
        &t,
        "otp",
        json!({"totpSecret":"JBSWY3DPEHPK3PXP"}),
        json!({}),
    )
    .await;
    let (s, v) = read_tok(&t, "otp", json!({})).await;
    assert_eq!(s, StatusCode::OK);
    assert!(!v.to_string().contains("JBSWY3DPEHPK3PXP"));
    assert_eq!(v["token"]["totpGenerated"], true);
    // A non-TOTP token that carries a seed never answers it either.
    store_tok(
        &t,
        "mixed",
        json!({"accessToken":"a","totpSecret":"JBSWY3DPEHPK3PXP","tokenType":"PlainText"}),
        json!({}),
    )
    .await;
    let (_, v) = read_tok(&t, "mixed", json!({})).await;
    assert_eq!(v["token"]["accessToken"], "a");
    assert!(v["token"].get("totpSecret").is_none());
    assert!(!v.to_string().contains("JBSWY3DP"));
    // A document in the spec's plaintext form is readable, then re-sealed.
    let raw = serde_json::to_vec(&json!({"v":1,"alg":"none","fields":{"accessToken":"plain-tok"},"meta":{"serviceName":"legacy","tokenType":"PlainText"}})).unwrap();
    t.state
        .store
        .put_raw(Collection::Tokens, "legacy".into(), raw, false)
        .await
        .unwrap();
    assert_eq!(
        read_tok(&t, "legacy", json!({})).await.1["token"]["accessToken"],
        "plain-tok"
    );
    let stored = t
        .state
        .store
        .get_raw(Collection::Tokens, "legacy")
        .unwrap()
        .unwrap();
    assert!(!String::from_utf8_lossy(&stored).contains("plain-tok"));
    assert_eq!(
        read_tok(&t, "legacy", json!({})).await.1["token"]["accessToken"],
        "plain-tok"
    );
}

#[tokio::test]
async fn store_validation_errors() {
    let mut t = state_with(16, 1 << 20);
    bind(&mut t).await;
    let send_body = |b: Value| {
        req(
            Method::POST,
            "/v1/store",
            Some(REMOTE),
            serde_json::to_vec(&b).unwrap(),
        )
    };
    let (s, v, _) = send(&t, send_body(json!({"ticket":"x","tokenData":{}}))).await;
    assert_eq!(
        (s, v["message"].as_str()),
        (
            StatusCode::BAD_REQUEST,
            Some("Missing required field: service")
        )
    );
    let (s, v, _) = send(&t, send_body(json!({"service":"s","tokenData":{}}))).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("ticket_invalid"))
    );
    let (s, v, _) = send(
        &t,
        send_body(json!({"service":"s","ticket": ticket(&t, "store", "s", json!({}))})),
    )
    .await;
    assert_eq!(
        (s, v["message"].as_str()),
        (
            StatusCode::BAD_REQUEST,
            Some("Missing required field: tokenData")
        )
    );
    let (s, v) = store_tok(
        &t,
        "s",
        json!({"accessToken":{"deep":"sekrit-value"}}),
        json!({}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(v["message"]
        .as_str()
        .unwrap()
        .contains("tokenData.accessToken"));
    assert!(!v.to_string().contains("sekrit-value"));
    assert!(t
        .state
        .store
        .get_raw(Collection::Tokens, "s")
        .unwrap()
        .is_none());
    let (s, _, _) = send(
        &t,
        req(
            Method::POST,
            "/v1/store",
            Some(REMOTE),
            b"{not json".to_vec(),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

// ---- TOTP ---------------------------------------------------------------

fn expected_codes(
    seed_b32: &str,
    p: crate::custody::totp::Params,
    t0: i64,
    t1: i64,
) -> Vec<String> {
    let seed = crate::custody::totp::base32_decode(seed_b32).unwrap();
    [t0, t1]
        .iter()
        .map(|t| crate::custody::totp::code_software(&seed, &p, *t as u64).to_string())
        .collect()
}

#[tokio::test]
async fn totp_codes_through_credential_and_totp_code() {
    use crate::custody::totp::Params;
    use crate::keys::OtpAlg;
    let mut t = state_with(16, 1 << 20);
    bind(&mut t).await;
    let (s, v) = store_tok(&t, "gh-2fa", json!({"totpUri":"otpauth://totp/GitHub:me%40x.com?secret=JBSWY3DPEHPK3PXP&issuer=GitHub&digits=8&algorithm=SHA256"}), json!({})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["meta"]["tokenType"], "TOTP");
    assert_eq!(v["meta"]["totpIssuer"], "GitHub");
    assert_eq!(v["meta"]["totpAccountName"], "me@x.com");
    assert_eq!(v["meta"]["totpDigits"], 8);
    assert!(!v.to_string().contains("JBSW") && !v.to_string().contains("otpauth"));
    let p = Params {
        alg: OtpAlg::Sha256,
        digits: 8,
        period: 30,
    };
    let t0 = now();
    let (s, v) = read_tok(&t, "gh-2fa", json!({})).await;
    let ok = expected_codes("JBSWY3DPEHPK3PXP", p, t0, now());
    assert_eq!(s, StatusCode::OK);
    let tok = v["token"].as_object().unwrap();
    assert_eq!(
        tok.keys()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>(),
        [
            "accessToken",
            "digits",
            "period",
            "remainingSeconds",
            "serviceName",
            "tokenType",
            "totpGenerated"
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    );
    assert!(ok.contains(&tok["accessToken"].as_str().unwrap().to_string()));
    assert_eq!(
        (
            tok["tokenType"].as_str(),
            tok["digits"].as_u64(),
            tok["period"].as_u64()
        ),
        (Some("TOTP"), Some(8), Some(30))
    );
    let rem = tok["remainingSeconds"].as_u64().unwrap();
    assert!((1..=30).contains(&rem));
    // /v1/totp-code, every allowed purpose, GET and POST.
    for pur in ["totp_code", "user_reveal", "agent_credential"] {
        let tk = ticket(&t, pur, "gh-2fa", json!({}));
        let t0 = now();
        let (s, v, _) = send(
            &t,
            req(
                Method::GET,
                &format!("/v1/totp-code?ticket={tk}&service=gh-2fa"),
                Some(REMOTE),
                vec![],
            ),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{pur}: {v}");
        assert!(expected_codes("JBSWY3DPEHPK3PXP", p, t0, now())
            .contains(&v["code"].as_str().unwrap().to_string()));
        assert_eq!(v.as_object().unwrap().len(), 4);
    }
    let body = json!({"ticket": ticket(&t, "totp_code", "gh-2fa", json!({})), "service": "gh-2fa"});
    let (s, v, _) = send(
        &t,
        req(
            Method::POST,
            "/v1/totp-code",
            Some(REMOTE),
            serde_json::to_vec(&body).unwrap(),
        ),
    )
    .await;
    assert_eq!((s, v["digits"].as_u64()), (StatusCode::OK, Some(8)));
    // Wrong purpose, non-TOTP token, CORS.
    let tk = ticket(&t, "store", "gh-2fa", json!({}));
    let (s, _, _) = send(
        &t,
        req(
            Method::GET,
            &format!("/v1/totp-code?ticket={tk}&service=gh-2fa"),
            Some(REMOTE),
            vec![],
        ),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    store_tok(&t, "pat", json!({"accessToken":"x"}), json!({})).await;
    let tk = ticket(&t, "totp_code", "pat", json!({}));
    let (s, v, _) = send(
        &t,
        req(
            Method::GET,
            &format!("/v1/totp-code?ticket={tk}&service=pat"),
            Some(REMOTE),
            vec![],
        ),
    )
    .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("not_totp"))
    );
    let mut r = req(Method::OPTIONS, "/v1/totp-code", Some(REMOTE), vec![]);
    r.headers_mut()
        .insert("origin", "https://tokenvault.uk".parse().unwrap());
    let (s, _, h) = send(&t, r).await;
    assert_eq!(
        (s, h["access-control-allow-origin"].to_str().unwrap()),
        (StatusCode::NO_CONTENT, "https://tokenvault.uk")
    );
}

#[tokio::test]
async fn totp_enrolment_errors_keep_the_previous_document() {
    let mut t = state_with(16, 1 << 20);
    bind(&mut t).await;
    store_tok(
        &t,
        "otp",
        json!({"totpSecret":"JBSWY3DPEHPK3PXP"}),
        json!({}),
    )
    .await;
    let before = t
        .state
        .store
        .get_raw(Collection::Tokens, "otp")
        .unwrap()
        .unwrap();
    for (td, needle) in [
        (json!({"totpSecret":"not base32!"}), "base32"),
        (
            json!({"totpUri":"otpauth://hotp/x?secret=JBSWY3DPEHPK3PXP&counter=0"}),
            "HOTP",
        ),
        (
            json!({"totpSecret":"JBSWY3DPEHPK3PXP","totpAlgorithm":"MD5"}),
            "algorithm",
        ),
        (
            json!({"totpSecret":"JBSWY3DPEHPK3PXP","totpDigits":9}),
            "digits",
        ),
        (
            json!({"totpSecret":"JBSWY3DPEHPK3PXP","totpPeriod":0}),
            "period",
        ),
        (json!({"totpSecret":"AAAAAAAA"}), "80 bits"),
        (
            json!({"totpAlgorithm":"SHA1","tokenType":"TOTP"}),
            "missing",
        ),
    ] {
        let (s, v) = store_tok(&t, "otp", td.clone(), json!({})).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{td}");
        assert!(v["message"].as_str().unwrap().contains(needle), "{v}");
        assert!(!v.to_string().contains("JBSWY3DP") && !v.to_string().contains("AAAAAAAA"));
    }
    assert_eq!(
        t.state
            .store
            .get_raw(Collection::Tokens, "otp")
            .unwrap()
            .unwrap(),
        before
    );
}

async fn verify_code(t: &T, svc: &str, code: &str) -> (StatusCode, Value) {
    let body =
        json!({"ticket": ticket(t, "totp_verify", svc, json!({})), "service": svc, "code": code});
    let (s, v, _) = send(
        t,
        req(
            Method::POST,
            "/v1/totp-verify",
            Some(REMOTE),
            serde_json::to_vec(&body).unwrap(),
        ),
    )
    .await;
    (s, v)
}

#[tokio::test]
async fn totp_verify_single_use_drift_and_failure_limit() {
    use crate::custody::totp::{base32_decode, code_software, Params};
    let mut t = state_with(16, 1 << 20);
    bind(&mut t).await;
    // A long period keeps the test clear of step boundaries; drift is in steps.
    store_tok(
        &t,
        "peer",
        json!({"totpSecret":"JBSWY3DPEHPK3PXP","totpPeriod":3600}),
        json!({}),
    )
    .await;
    let p = Params {
        period: 3600,
        ..Params::default()
    };
    let seed = base32_decode("JBSWY3DPEHPK3PXP").unwrap();
    let at =
        |step_delta: i64| code_software(&seed, &p, (now() + step_delta * 3600) as u64).to_string();
    // The previous step's code is accepted (drift -1) ...
    let (s, v) = verify_code(&t, "peer", &at(-1)).await;
    assert_eq!(
        (s, v["valid"].as_bool()),
        (StatusCode::OK, Some(true)),
        "{v}"
    );
    // ... the current one too, once; then neither it nor the older one again.
    assert_eq!(verify_code(&t, "peer", &at(0)).await.1["valid"], true);
    assert_eq!(
        verify_code(&t, "peer", &at(0)).await.1["valid"],
        false,
        "single use"
    );
    assert_eq!(
        verify_code(&t, "peer", &at(-1)).await.1["valid"],
        false,
        "earlier step"
    );
    // Two steps away is outside the window.
    assert_eq!(verify_code(&t, "peer", &at(2)).await.1["valid"], false);
    // Malformed input: exactly 6 ASCII digits.
    for bad in ["12345", "1234567", "12345a", "١٢٣٤٥٦"] {
        let (s, v) = verify_code(&t, "peer", bad).await;
        assert_eq!(
            (s, v["error"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_request")),
            "{bad}"
        );
    }
    // 3 failures so far this step (2 replays + out of window); two more, then 429.
    assert_eq!(verify_code(&t, "peer", "000000").await.1["valid"], false);
    assert_eq!(verify_code(&t, "peer", "000001").await.1["valid"], false);
    let body = json!({"ticket": ticket(&t, "totp_verify", "peer", json!({})), "service": "peer", "code": at(1)});
    let (s, v, h) = send(
        &t,
        req(
            Method::POST,
            "/v1/totp-verify",
            Some(REMOTE),
            serde_json::to_vec(&body).unwrap(),
        ),
    )
    .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("rate_limited"))
    );
    assert!(h["retry-after"].to_str().unwrap().parse::<u64>().unwrap() <= 3600);
    // Purpose: only totp_verify.
    let body = json!({"ticket": ticket(&t, "totp_code", "peer", json!({})), "service": "peer", "code": "123456"});
    let (s, _, _) = send(
        &t,
        req(
            Method::POST,
            "/v1/totp-verify",
            Some(REMOTE),
            serde_json::to_vec(&body).unwrap(),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // Re-enrolment resets the state.
    store_tok(
        &t,
        "peer",
        json!({"totpSecret":"JBSWY3DPEHPK3PXP","totpPeriod":3600}),
        json!({}),
    )
    .await;
    assert_eq!(verify_code(&t, "peer", &at(0)).await.1["valid"], true);
}

/// A token's listing item and its `get` answer show the same meta, with
/// and without an owner policy, in the same bytes.
#[test]
fn token_listing_items_match_the_get_answers_meta() {
    let docs = [
        (
            "github",
            json!({"v":1,"alg":"AES-256-GCM","fields":{"accessToken":"c2VhbGVk"},
                   "meta":{"tokenType":"JWT","createdAt":"2026-02-01T10:00:00Z","displayName":"GitHub \"prod\" ✓"}}),
        ),
        (
            "svc with \"quotes\"\n",
            json!({"v":1,"alg":"none","meta":{"serviceName":"other","accessToken":"leak?","weird":{"a":[1,2.5,null]}}}),
        ),
        ("empty", json!({"v":1,"alg":"none"})),
        (
            "nested",
            json!({"meta":{"scopes":["a","b"],"expiresAt":1.5e9,"hasTotpSecret":true}}),
        ),
    ];
    for (key, doc) in docs {
        let raw = serde_json::to_vec(&doc).unwrap();
        for policy in [false, true] {
            let item = crate::protocol::document::list_item(key.as_bytes(), &raw, policy).unwrap();
            let view = handlers::token_view(&raw, key, policy).unwrap();
            let expected = json!({"key": key, "meta": view["meta"]});
            assert_eq!(
                String::from_utf8(item).unwrap(),
                serde_json::to_string(&expected).unwrap(),
                "{key}"
            );
            assert_eq!(view["meta"].get("ownerPolicy").is_some(), policy);
        }
    }
    assert!(crate::protocol::document::list_item(b"k", b"{not json", false).is_err());
}

#[tokio::test]
async fn a_write_sealed_under_a_closed_key_generation_is_503_key_rotating() {
    let mut t = state_with(16, 1 << 20);
    bind(&mut t).await;
    let (s, v) = store_tok(&t, "gh", json!({"accessToken":"v1"}), json!({})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // A rotation made generation 2 active and closed 1; this backend (a
    // bare device, no key ring) still seals under 1, like a request that
    // sealed just before the switch and commits after the close.
    t.state.backend.create_aes(2).unwrap();
    let store = t.state.store.clone();
    tokio::task::spawn_blocking(move || {
        store.update_aes_state(|st| {
            st.previous = Some(1);
            st.active = 2;
            st.closed = true;
        })
    })
    .await
    .unwrap()
    .unwrap();
    let (s, v, h) = store_req(&t, "gh", json!({"accessToken":"v2"}), json!({})).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["error"], "key_rotating");
    assert_eq!(h["retry-after"], "1");
    assert!(!v.to_string().contains("v2"));
    assert_eq!(
        read_tok(&t, "gh", json!({})).await.1["token"]["accessToken"],
        "v1",
        "nothing written"
    );
    // Through the key ring (what `serve` installs) the retry seals under 2.
    t.state.app.backend = crate::custody::keyring::keyring(t.state.backend.clone(), &t.state.store);
    let (s, v) = store_tok(&t, "gh", json!({"accessToken":"v2"}), json!({})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let raw = t
        .state
        .store
        .get_raw(Collection::Tokens, "gh")
        .unwrap()
        .unwrap();
    let doc: crate::protocol::document::TokenDocument = serde_json::from_slice(&raw).unwrap();
    assert_eq!(doc.kid, Some(2));
    assert_eq!(
        read_tok(&t, "gh", json!({})).await.1["token"]["accessToken"],
        "v2"
    );
}

#[tokio::test]
async fn outside_dev_the_public_listener_has_no_bind_helpers() {
    let mut t = state_with(16, 1 << 20);
    let mut http = test_http(1 << 20);
    http.helpers_on_public = false;
    t.state.http = Arc::new(http);
    for (m, p) in [
        (Method::GET, "/v1/register-url"),
        (Method::GET, "/bind"),
        (Method::POST, "/bind"),
    ] {
        let (s, v, _) = send(&t, req(m.clone(), p, Some(LOOPBACK), vec![])).await;
        assert_eq!(
            (s, v["error"].as_str()),
            (StatusCode::NOT_FOUND, Some("not_found")),
            "{m} {p} from loopback"
        );
    }
    // The helper router serves them, and refuses forwarded requests.
    let helper = helper_app(t.state.clone());
    let r = helper
        .clone()
        .oneshot(req(Method::GET, "/v1/register-url", None, vec![]))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let mut fwd = req(Method::GET, "/v1/register-url", None, vec![]);
    fwd.headers_mut()
        .insert("forwarded", "for=198.51.100.1".parse().unwrap());
    let r = helper.oneshot(fwd).await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
}
