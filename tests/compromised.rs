#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! A compromised Token Vault: the attacker holds the HMAC secret (every
//! request here is correctly signed, every ticket correctly made) and
//! nothing else. Each test starts from a request that succeeds and shows
//! what the appliance still refuses to hand over.

mod fakes;
mod harness;

use fakes::*;
use harness::*;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;

#[tokio::test]
async fn it_cannot_move_the_token_into_an_echoed_header() {
    let (base, up) = upstream().await;
    let (_t, a) = bound("").await;
    a.store_ok("gh", json!({"accessToken":"ghp_echo_secret"}))
        .await;
    pin(&a, "p1", &format!("{base}/api"), "gh").await;
    let url = json!({"url": format!("{base}/api/echo")});
    // The owner's template: the token goes into Authorization only.
    let r = proxy(&a, "gh", Some("p1"), url.clone(), json!({})).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["headers"]["authorization"], "Bearer ghp_echo_secret");
    let others: Vec<_> = v["headers"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, v)| *k != "authorization" && v.as_str().unwrap().contains("ghp_echo_secret"))
        .collect();
    assert!(others.is_empty(), "{others:?}");
    assert_eq!(up.hits("/api/echo"), 1);
    // Templates of its own, beside or instead of the owner's: refused before
    // anything goes upstream.
    for templates in [
        json!({"Authorization":"Bearer ${TOKEN}","Origin":"${TOKEN}"}),
        json!({"X-Request-Id":"${TOKEN}"}),
        json!({"Authorization":"${TOKEN}"}),
    ] {
        let r = proxy(&a, "gh", Some("p1"), url.clone(), templates.clone()).await;
        assert_eq!(r.status(), 403, "{templates}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"], "proxy_not_allowed", "{templates}");
        assert!(
            v["message"]
                .as_str()
                .unwrap()
                .contains("stored proxy config"),
            "{v}"
        );
    }
    // Rewriting the stored config (it can: /v1/storage is signed) to echo
    // the token does not work either.
    for h in ["Referer", "Origin", "X-Forwarded-Host", "User-Agent"] {
        let v = a.storage(json!({"operation":"set","collection":"proxy_configs","key":"p1","data":{"name":"t","upstreamUrl":format!("{base}/api"),"serviceName":"gh","headerTemplates":{h: "x ${TOKEN}"}}})).await;
        assert_eq!(v["status"], "ok");
        let r = proxy(&a, "gh", Some("p1"), url.clone(), json!({})).await;
        assert_eq!(r.status(), 403, "{h}");
        assert!(r.json::<Value>().await.unwrap()["message"]
            .as_str()
            .unwrap()
            .contains("echo"));
    }
    assert_eq!(up.hits("/api/echo"), 1, "nothing more went upstream");
    assert!(!a.log_text().contains("ghp_echo_secret"));
}

#[tokio::test]
async fn it_cannot_make_refresh_notify_send_a_token_to_another_clients_url() {
    let (purl, prov) = provider().await;
    let (_t, a) = bound("").await;
    // The owner registered one client per service on the box.
    add_client(&a, "alpha", &format!("{purl}/token"), "post", &["a"]);
    add_client(&a, "beta", &format!("{purl}/evil"), "post", &["b"]);
    seed_oauth_token(&a, "a").await;
    // Service a's refresh, hinting client beta and beta's URL: a's own
    // client refreshes it at its own URL; beta's URL gets nothing.
    let v = notify(&a, "a", "beta", &format!("{purl}/evil")).await;
    assert_eq!(v["status"], "refreshed", "{v}");
    assert_eq!(
        prov.evil.load(Ordering::SeqCst),
        0,
        "beta's URL got nothing"
    );
    assert_eq!(prov.calls.load(Ordering::SeqCst), 1);
    assert_eq!(prov.last_form.lock().unwrap()["refresh_token"], "rt-old");
    assert!(a
        .log_text()
        .contains("refreshHint.provider names another client"));
    // A service no client is registered for is not refreshed by any.
    seed_oauth_token(&a, "c").await;
    let v = notify(&a, "c", "alpha", "").await;
    assert_eq!(v["status"], "acknowledged", "{v}");
    assert_eq!(prov.calls.load(Ordering::SeqCst), 1);
    // And the owner cannot register a second client for a service by mistake.
    let f = a.dir.join("gamma.secret");
    std::fs::write(&f, "s3cret\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = cli(&[
        "--config",
        a.config().to_str().unwrap(),
        "oauth-client",
        "add",
        "gamma",
        "--client-id",
        "x",
        "--client-secret-file",
        f.to_str().unwrap(),
        "--token-url",
        "https://oauth.example/token",
        "--service",
        "a",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already refreshed by OAuth client alpha")
    );
}

#[tokio::test]
async fn it_cannot_get_a_refresh_token_while_tv_refresh_is_off_and_only_listed_ones_when_on() {
    // Default: not advertised, and neither action is served.
    let (_t, a) = bound("").await;
    seed_oauth_token(&a, "google").await;
    let caps = a.health().await["capabilities"].clone();
    assert!(
        caps.as_array().unwrap().iter().all(|c| c != "tv-refresh"),
        "{caps}"
    );
    assert!(
        caps.as_array().unwrap().iter().any(|c| c == "refresh"),
        "{caps}"
    );
    for body in [
        json!({"action":"get","service":"google"}),
        json!({"action":"update","service":"google","tokens":{"accessToken":"ya29.evil"}}),
    ] {
        let (s, v) = a.signed("/v1/refresh", body).await;
        assert_refused(s, &v, 403, "policy_denied");
        assert!(!v.to_string().contains("rt-old"));
    }
    assert_eq!(
        a.credential("google", "").await.1["token"]["accessToken"],
        "at-old",
        "the refused update changed nothing"
    );
    drop(a);
    // A list: advertised, served for the listed service only.
    let (_t, a) = bound("[refresh]\ntv_refresh = [\"google\"]\n").await;
    seed_oauth_token(&a, "google").await;
    seed_oauth_token(&a, "github").await;
    let caps = a.health().await["capabilities"].clone();
    assert!(
        caps.as_array().unwrap().iter().any(|c| c == "tv-refresh"),
        "{caps}"
    );
    let (s, v) = a
        .signed("/v1/refresh", json!({"action":"get","service":"google"}))
        .await;
    assert_eq!(
        (s, v["refreshToken"].as_str()),
        (200, Some("rt-old")),
        "{v}"
    );
    let (s, v) = a
        .signed("/v1/refresh", json!({"action":"get","service":"github"}))
        .await;
    assert_refused(s, &v, 403, "policy_denied");
    assert!(!v.to_string().contains("rt-old"));
}

#[tokio::test]
async fn it_cannot_read_an_approval_gated_or_no_reveal_credential() {
    let (base, up) = upstream().await;
    let (_t, a) = bound("").await;
    a.store_ok("gated", json!({"accessToken":"ghp_gated_secret"}))
        .await;
    a.store_ok("sealed", json!({"accessToken":"ghp_noreveal_secret"}))
        .await;
    a.store_ok("otp", json!({"totpSecret":"JBSWY3DPEHPK3PXP"}))
        .await;
    a.cli_ok(&["policy", "set", "gated", "--approval"]);
    a.cli_ok(&["policy", "set", "sealed", "--no-reveal"]);
    a.cli_ok(&["policy", "set", "otp", "--no-reveal"]);
    // Gated: every way in asks the owner, whoever the ticket says it is.
    for (path, pur) in [
        ("/v1/credential", "agent_credential"),
        ("/v1/credential", "user_reveal"),
    ] {
        for claims in [json!({}), json!({"sub":"owner","aid":"admin"})] {
            let (s, v) = a.read_as(path, pur, "gated", claims).await;
            assert_refused(s, &v, 403, "approval_required");
            assert!(!v.to_string().contains("ghp_gated_secret"));
        }
    }
    a.store_ok("otp-gated", json!({"totpSecret":"JBSWY3DPEHPK3PXP"}))
        .await;
    a.cli_ok(&["policy", "set", "otp-gated", "--approval"]);
    let (s, v) = a
        .read_as("/v1/totp-code", "totp_code", "otp-gated", json!({}))
        .await;
    assert_refused(s, &v, 403, "approval_required");
    pin(&a, "pg", &format!("{base}/api"), "gated").await;
    let r = proxy_echo(&a, &base, "gated", "pg").await;
    assert_eq!(r.status(), 403);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "approval_required"
    );
    assert_eq!(up.total(), 0, "nothing went upstream");
    // No-reveal: never the plaintext, by read or reveal...
    for pur in ["agent_credential", "user_reveal"] {
        let (s, v) = a.read_as("/v1/credential", pur, "sealed", json!({})).await;
        assert_refused(s, &v, 403, "policy_denied");
        assert!(!v.to_string().contains("ghp_noreveal_secret"));
    }
    // ...but usable through the proxy, and a TOTP token still gives codes.
    pin(&a, "ps", &format!("{base}/api"), "sealed").await;
    let r = proxy_echo(&a, &base, "sealed", "ps").await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["headers"]["authorization"], "Bearer ghp_noreveal_secret");
    let (s, v) = a
        .read_as("/v1/totp-code", "totp_code", "otp", json!({}))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["code"].as_str().unwrap().len(), 6);
    let (s, v) = a
        .read_as("/v1/totp-code", "user_reveal", "otp", json!({}))
        .await;
    assert_refused(s, &v, 403, "policy_denied");
    // The upstreams rule holds whatever the stored proxy config says.
    a.cli_ok(&[
        "policy",
        "set",
        "sealed",
        "--no-reveal",
        "--upstream",
        "api.example.com",
    ]);
    let r = proxy_echo(&a, &base, "sealed", "ps").await;
    assert_eq!(r.status(), 403);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "policy_denied");
    assert_eq!(up.hits("/api/echo"), 1);
    assert!(
        !a.log_text().contains("ghp_gated_secret") && !a.log_text().contains("ghp_noreveal_secret")
    );
}

#[tokio::test]
async fn it_cannot_change_or_remove_a_policy() {
    let (_t, a) = bound("").await;
    a.store_ok("gh", json!({"accessToken":"ghp_kept_secret"}))
        .await;
    a.cli_ok(&["policy", "set", "gh", "--approval"]);
    // No collection reaches the policies.
    for op in [
        json!({"operation":"set","collection":"policies","key":"gh","data":{}}),
        json!({"operation":"delete","collection":"policies","key":"gh"}),
        json!({"operation":"get","collection":"policies","key":"gh"}),
        json!({"operation":"list","collection":"approvals"}),
    ] {
        let (s, v) = a.signed("/v1/storage", op.clone()).await;
        assert_refused(s, &v, 400, "invalid_request");
    }
    // Replacing, rewriting or deleting the credential leaves the rule on
    // the service.
    a.store_ok("gh", json!({"accessToken":"ghp_replaced"}))
        .await;
    let v = a.storage(json!({"operation":"set","collection":"tokens","key":"gh","data":{"meta":{"note":"x"}}})).await;
    assert_eq!(v["status"], "ok", "{v}");
    let (s, v) = a
        .read_as("/v1/credential", "agent_credential", "gh", json!({}))
        .await;
    assert_refused(s, &v, 403, "approval_required");
    let v = a
        .storage(json!({"operation":"delete","collection":"tokens","key":"gh"}))
        .await;
    assert_eq!(v["status"], "ok");
    a.store_ok("gh", json!({"accessToken":"ghp_new"})).await;
    let (s, v) = a
        .read_as("/v1/credential", "agent_credential", "gh", json!({}))
        .await;
    assert_refused(s, &v, 403, "approval_required");
    let shown: Value = serde_json::from_str(&a.cli_ok(&["policy", "show", "gh"])).unwrap();
    assert_eq!(shown["gh"], json!({"approval": true}));
}

#[tokio::test]
async fn it_sees_that_a_policy_exists_but_not_what_it_allows() {
    let (_t, a) = bound("").await;
    a.store_ok("gh", json!({"accessToken":"ghp_listed_secret"}))
        .await;
    a.store_ok("free", json!({"accessToken":"ghp_free_secret"}))
        .await;
    a.cli_ok(&[
        "policy",
        "set",
        "gh",
        "--approval",
        "--agent",
        "agent-seven",
        "--rate",
        "5/minute",
        "--hours",
        "08:00-18:00",
        "--upstream",
        "api.github.example",
    ]);
    let flag = |v: &Value, key: &str| -> Option<Value> {
        let items = v["items"].as_array().unwrap();
        let item = items.iter().find(|i| i["key"] == key).unwrap();
        item["meta"].get("ownerPolicy").cloned()
    };
    let rules = [
        "agent-seven",
        "api.github.example",
        "08:00",
        "approval",
        "minute",
    ];
    let list = a
        .storage(json!({"operation":"list","collection":"tokens"}))
        .await;
    assert_eq!(flag(&list, "gh"), Some(json!(true)), "{list}");
    assert_eq!(flag(&list, "free"), None, "{list}");
    let got = a
        .storage(json!({"operation":"get","collection":"tokens","key":"gh"}))
        .await;
    assert_eq!(got["data"]["meta"]["ownerPolicy"], true, "{got}");
    // Filtered and batch listings say the same; a filter finds the gated.
    let only = a.storage(json!({"operation":"list","collection":"tokens","options":{"filters":{"ownerPolicy":true}}})).await;
    assert_eq!(only["items"].as_array().unwrap().len(), 1, "{only}");
    assert_eq!(flag(&only, "gh"), Some(json!(true)));
    let batch = a
        .storage(json!({"operation":"list_batch","collections":["tokens"]}))
        .await;
    assert_eq!(
        flag(&batch["results"]["tokens"], "gh"),
        Some(json!(true)),
        "{batch}"
    );
    for answer in [&list, &got, &only, &batch] {
        let text = answer.to_string();
        for rule in rules {
            assert!(!text.contains(rule), "{rule} in {text}");
        }
    }
    // Its own writes can neither hide the flag nor fake it.
    for (key, value) in [("gh", false), ("free", true)] {
        let v = a.storage(json!({"operation":"set","collection":"tokens","key":key,"data":{"meta":{"ownerPolicy":value}}})).await;
        assert_eq!(v["status"], "ok", "{v}");
    }
    let list = a
        .storage(json!({"operation":"list","collection":"tokens"}))
        .await;
    assert_eq!(flag(&list, "gh"), Some(json!(true)), "{list}");
    assert_eq!(flag(&list, "free"), None, "{list}");
    // The owner clears the policy: the flag goes with it.
    a.cli_ok(&["policy", "clear", "gh"]);
    let list = a
        .storage(json!({"operation":"list","collection":"tokens"}))
        .await;
    assert_eq!(flag(&list, "gh"), None, "{list}");
    let got = a
        .storage(json!({"operation":"get","collection":"tokens","key":"gh"}))
        .await;
    assert!(got["data"]["meta"].get("ownerPolicy").is_none(), "{got}");
}
