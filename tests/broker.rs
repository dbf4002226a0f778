#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Brokering over real HTTPS on SoftHSM2, against an upstream API and an
//! OAuth provider running in this test process on loopback.

mod fakes;
mod harness;

use base64::Engine;
use fakes::*;
use harness::*;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;

#[tokio::test]
async fn proxy_injects_credentials_and_passes_responses_through() {
    let (base, up) = upstream().await;
    let (_t, a) = bound("").await;
    a.store_ok("gh", json!({"accessToken":"ghp_proxy_secret"}))
        .await;
    let templates =
        json!({"Authorization":"Bearer ${TOKEN}","X-Api-Key":"${TOKEN}","X-Both":"a ${TOKEN} b"});
    pin_with(&a, "p1", &format!("{base}/api"), "gh", templates.clone()).await;
    let r = proxy(&a, "gh", Some("p1"), json!({
        "url": format!("{base}/api/echo?q=1"), "method": "POST",
        "headers": {"Content-Type":"application/json","Connection":"x-drop","X-Drop":"1","Host":"evil.example","X-Keep":"k"},
        "body": base64::engine::general_purpose::STANDARD.encode(br#"{"a":1}"#)
    }), templates).await;
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
        (json!({"url": "ftp://x/api"}), json!({})),
    ] {
        let r = proxy(&a, "gh", Some("p1"), upd, tmpl).await;
        assert_eq!(r.status(), 400);
        assert!(!r.text().await.unwrap().contains("ghp_proxy_secret"));
    }
    // A stored template that would inject a line break: 400 too.
    pin_with(
        &a,
        "p2",
        &format!("{base}/api"),
        "gh",
        json!({"X-Evil": "${TOKEN}\r\nX-Other: 1"}),
    )
    .await;
    let r = proxy_echo(&a, &base, "gh", "p2").await;
    assert_eq!(r.status(), 400);
    assert!(!r.text().await.unwrap().contains("ghp_proxy_secret"));
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
    let r = proxy_echo(&a, &base, "gh", "p1").await;
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
    pin_with(
        &a,
        "p1",
        &format!("{base}/api"),
        "otp",
        json!({"X-TOTP":"${TOKEN}"}),
    )
    .await;
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

#[tokio::test]
async fn refresh_notify_with_a_local_client() {
    let (purl, prov) = provider().await;
    let (_t, a) = bound("").await;
    // Registered while the server runs; list never shows the secret.
    add_client(
        &a,
        "MyProvider",
        &format!("{purl}/token"),
        "post",
        &["svc", "norefresh"],
    );
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
            && listed.contains("norefresh,svc")
            && !listed.contains("client-secret-xyz"),
        "{listed}"
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
    // The hint never picks the client: the service's own is called (the
    // fake provider takes only the first refresh token, so this one fails).
    let calls = prov.calls.load(Ordering::SeqCst);
    assert_eq!(
        notify(&a, "svc", "unknown-provider", "").await["status"],
        "refresh_failed"
    );
    assert_eq!(prov.calls.load(Ordering::SeqCst), calls + 1);
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
    // One client per service (each named like its service).
    add_client(&a, "bad", &format!("{purl}/token-error"), "post", &[]);
    add_client(
        &a,
        "noaccess",
        &format!("{purl}/token-noaccess"),
        "post",
        &[],
    );
    add_client(
        &a,
        "norotate",
        &format!("{purl}/token-norotate"),
        "basic",
        &["svc"],
    );
    add_client(&a, "down", "http://127.0.0.1:1/token", "post", &[]);
    for p in ["bad", "noaccess", "down"] {
        seed_oauth_token(&a, p).await;
        let raw_before = a
            .storage(json!({"operation":"get","collection":"tokens","key":p}))
            .await["data"]
            .clone();
        assert_eq!(
            notify(&a, p, p, "").await["status"],
            "refresh_failed",
            "{p}"
        );
        assert_eq!(
            a.storage(json!({"operation":"get","collection":"tokens","key":p}))
                .await["data"],
            raw_before,
            "{p}: unchanged"
        );
        assert_eq!(
            a.credential(p, "").await.1["token"]["accessToken"],
            "at-old"
        );
    }
    seed_oauth_token(&a, "svc").await;
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
    add_client(
        &a,
        "gated",
        &format!("{purl}/token-gated"),
        "post",
        &["svc"],
    );
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
    let (_t, a) = bound("[refresh]\ntv_refresh = \"on\"\n").await;
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
