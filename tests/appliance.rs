#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Integration: the real binary over real TLS, SoftHSM2 keys, an LMDB file.

mod harness;
use std::path::Path;

use base64::Engine;
use harness::*;
use serde_json::{json, Value};

#[tokio::test]
async fn dev_binds_over_https_and_serves_health_and_storage() {
    let (_tmp, mut a) = Appliance::start_new();
    // Unauthenticated health before binding.
    let h = a.health().await;
    assert_eq!(h["status"], "healthy");
    assert_eq!(h["keyConfigured"], true);
    // Every capability of the build but tv-refresh, which is off by default.
    let expected: Vec<&str> = tokenvault_webhook::protocol::CAPABILITIES
        .iter()
        .copied()
        .filter(|c| *c != "tv-refresh")
        .collect();
    assert_eq!(h["capabilities"], json!(expected));
    let r = a.client.head(a.url("/v1/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // Signed endpoints refuse before the exchange.
    let (s, v) = a
        .signed_with(
            &[1u8; 32],
            "/v1/storage",
            &json!({"operation":"list","collection":"tokens"}),
            &new_rid(),
        )
        .await;
    assert_eq!((s, v["error"].as_str()), (403, Some("setup_required")));

    // register-url over HTTP from loopback, as the spec's helper.
    let reg = json_of(a.client.get(a.url("/v1/register-url"))).await;
    assert_eq!(reg["webhookUrl"], a.base);
    assert!(reg["registrationUrl"]
        .as_str()
        .unwrap()
        .starts_with("https://tokenvault.uk/vault/webhook-bind?code="));
    // ...and the CLI, then exchange.
    let ex = a.bind().await;
    assert!(ex["webhookId"].as_str().unwrap().starts_with("wh_"));
    assert_eq!(ex["capabilities"], h["capabilities"]);
    // The HTTP-issued code still works once, then is used.
    let (s, v) = a.exchange(&reg["code"]).await;
    assert_eq!(s, 200, "a second code re-binds (rotates the key): {v}");
    let (s, v) = a.exchange(&reg["code"]).await;
    assert_eq!((s, v["error"].as_str()), (410, Some("code_used")));

    let (s, v) = a
        .signed("/v1/health", json!({"requestId":"req_health1"}))
        .await;
    assert_eq!(s, 200);
    assert_eq!(v["requestId"], "req_health1");

    // Storage over every collection.
    a.storage(json!({"operation":"set","collection":"proxy_configs","key":"proxy-1","data":{"name":"GitHub MCP","upstreamUrl":"https://api.github.com/mcp","serviceName":"github","headerTemplates":{"Authorization":"Bearer ${TOKEN}"}}})).await;
    a.storage(json!({"operation":"set","collection":"vault_config","key":"settings","data":{"theme":"dark"}})).await;
    a.storage(json!({"operation":"set","collection":"tokens","key":"github","data":{"meta":{"tokenType":"JWT","createdAt":"2026-02-01T10:00:00Z"}}})).await;
    a.storage(json!({"operation":"set","collection":"audit","key":"2026-02-15T10:30:00Z","data":{"event_type":"SECRET_ACCESS","source":"agent"}})).await;
    let v = a.storage(json!({"requestId":"req_lb","operation":"list_batch","collections":["tokens","proxy_configs","audit","vault_config","bogus"]})).await;
    assert_eq!(v["requestId"], "req_lb");
    assert_eq!(
        v["results"]["tokens"]["items"],
        json!([{"key":"github","meta":{"serviceName":"github","tokenType":"JWT","createdAt":"2026-02-01T10:00:00Z"}}])
    );
    assert_eq!(
        v["results"]["proxy_configs"]["items"][0]["data"]["serviceName"],
        "github"
    );
    assert_eq!(v["results"]["audit"]["items"][0]["data"]["source"], "agent");
    assert_eq!(v["results"]["vault_config"]["items"][0]["key"], "settings");
    assert!(v["results"].get("bogus").is_none());
    let v = a
        .storage(json!({"operation":"get","collection":"vault_config","key":"settings"}))
        .await;
    assert_eq!(v["data"], json!({"theme":"dark"}));
    a.storage(json!({"operation":"delete","collection":"tokens","key":"github"}))
        .await;
    let v = a
        .storage(json!({"operation":"get","collection":"tokens","key":"github"}))
        .await;
    assert_eq!(v["data"], Value::Null);
    let (s, v) = a
        .signed(
            "/v1/storage",
            json!({"operation":"nope","collection":"tokens"}),
        )
        .await;
    assert_eq!((s, v["error"].as_str()), (400, Some("invalid_request")));

    // Unknown path and oversized body: JSON errors.
    let r = a.client.get(a.url("/v1/nothing")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "not_found");
    let big = vec![b'x'; (1 << 20) + 10];
    let r = a
        .client
        .post(a.url("/v1/exchange"))
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "payload_too_large"
    );

    // One access-log line per request, without bodies or secrets.
    let log = a.log_text();
    assert!(log.contains("path=/v1/storage") && log.contains("status=200"));
    assert!(!log.contains("GitHub MCP") && !log.contains("theme"));
    assert_eq!(a.terminate(), Some(0), "SIGTERM shuts down cleanly");
}

#[tokio::test]
async fn replay_is_refused_across_kill_9_and_restart_with_serve() {
    let (_tmp, mut a) = Appliance::start_new();
    let ex = a.bind().await;
    let secret = a.secret.clone().unwrap();
    let body =
        json!({"operation":"set","collection":"vault_config","key":"settings","data":{"n":1}});
    let rid = new_rid();
    assert_eq!(
        a.signed_with(&secret, "/v1/storage", &body, &rid).await.0,
        200
    );
    assert_eq!(
        a.signed_with(&secret, "/v1/storage", &body, &rid).await.0,
        401
    );
    a.kill9();

    // DIR/config.toml is a normal config: `serve --config` runs it.
    let mut b = Appliance::start_serve(&a.dir);
    b.secret = Some(secret.clone());
    let (s, v) = b.signed_with(&secret, "/v1/storage", &body, &rid).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (401, Some("auth_failed")),
        "request id remembered across kill -9"
    );
    assert_eq!(v["message"], "Request id already used");
    // Same keys, same binding, same data.
    let v = b
        .storage(json!({"operation":"get","collection":"vault_config","key":"settings"}))
        .await;
    assert_eq!(v["data"], json!({"n":1}));
    b.kill9();

    // Re-running dev with the same DIR reuses everything.
    let c = Appliance::start_dev(&a.dir);
    let (s, _) = c
        .signed_with(&secret, "/v1/health", &json!({}), &new_rid())
        .await;
    assert_eq!(s, 200);
    let reg = cli_json(&["--config", c.config().to_str().unwrap(), "register-url"]);
    let r = c
        .client
        .post(c.url("/v1/exchange"))
        .json(&json!({"code": reg["code"]}))
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["webhookId"], ex["webhookId"],
        "webhook id is stable per install"
    );
    // That re-bind rotated the key: the old secret no longer verifies.
    let (s, _) = c
        .signed_with(&secret, "/v1/health", &json!({}), &new_rid())
        .await;
    assert_eq!(s, 401);
}

#[tokio::test]
async fn audit_cursor_walk_over_250_events_with_duplicate_timestamps() {
    let (_tmp, mut a) = Appliance::start_new();
    a.bind().await;
    // 250 events over 25 timestamps, 10 per timestamp, sent concurrently.
    let mut futs = Vec::new();
    for i in 0..250u32 {
        let key = format!("2026-02-15T10:{:02}:00Z", i % 25);
        futs.push(a.signed("/v1/storage", json!({"operation":"set","collection":"audit","key":key,"data":{"event_type":"SECRET_ACCESS","i":i,"source": if i % 3 == 0 {"agent"} else {"proxy"}}})));
    }
    for (s, v) in futures::future::join_all(futs).await {
        assert_eq!(s, 200, "{v}");
    }
    let mut seen: Vec<(String, u64)> = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut opts = json!({"limit": 40});
        if let Some(c) = &after {
            opts["after"] = json!(c);
        }
        let v = a
            .storage(json!({"operation":"list","collection":"audit","options":opts}))
            .await;
        assert_eq!(v["pagination"]["totalCount"], 250);
        for it in v["items"].as_array().unwrap() {
            seen.push((
                it["key"].as_str().unwrap().into(),
                it["data"]["i"].as_u64().unwrap(),
            ));
        }
        pages += 1;
        if v["pagination"]["hasMore"] == false {
            break;
        }
        after = Some(v["pagination"]["nextCursor"].as_str().unwrap().into());
    }
    assert_eq!(pages, 7);
    assert_eq!(seen.len(), 250);
    let mut ids: Vec<u64> = seen.iter().map(|s| s.1).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 250, "no event skipped or repeated");
    assert!(seen.windows(2).all(|w| w[0].0 >= w[1].0), "newest first");
    assert_eq!(seen[0].0, "2026-02-15T10:24:00Z");
    // Filtered walk.
    let v = a.storage(json!({"operation":"list","collection":"audit","options":{"limit":200,"filters":{"source":"agent"}}})).await;
    assert_eq!(v["pagination"]["totalCount"], 84);
    assert_eq!(v["items"].as_array().unwrap().len(), 84);
}

#[tokio::test]
async fn no_key_material_outside_the_token() {
    let (_tmp, mut a) = Appliance::start_new();
    a.bind().await;
    a.storage(
        json!({"operation":"set","collection":"vault_config","key":"settings","data":{"x":1}}),
    )
    .await;
    let secret = a.secret.clone().unwrap();
    // Also a pending (unexchanged) code: its secret is sealed, not stored.
    cli_json(&["--config", a.config().to_str().unwrap(), "register-url"]);
    a.terminate();
    let needles: Vec<Vec<u8>> = vec![
        secret.clone(),
        hex::encode(&secret).into_bytes(),
        base64::engine::general_purpose::STANDARD
            .encode(&secret)
            .into_bytes(),
    ];
    let skip = a.device_dirs();
    let skip: Vec<&Path> = skip.iter().map(|p| p.as_path()).collect();
    let mut files = files_under(&a.dir, &skip);
    match &a.pg {
        // The database's own files: tables and write-ahead log.
        Some(pg) => {
            files.extend(files_under(&pg.dir.join("data"), &[]));
            assert!(files
                .iter()
                .any(|f| f.to_string_lossy().contains("/pg_wal/")));
        }
        None => assert!(files.iter().any(|f| f.ends_with("state/data.mdb"))),
    }
    for f in files {
        let data = std::fs::read(&f).unwrap();
        for n in &needles {
            assert!(
                !data.windows(n.len()).any(|w| w == n.as_slice()),
                "HMAC secret found in {}",
                f.display()
            );
        }
    }
    let log = a.log_text();
    for n in &needles[1..] {
        assert!(
            !log.contains(std::str::from_utf8(n).unwrap()),
            "secret in log"
        );
    }
}

#[tokio::test]
async fn sighup_reloads_the_certificate_without_dropping_connections() {
    let (_tmp, a) = Appliance::start_new();
    assert_eq!(
        a.client
            .get(a.url("/v1/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // A new certificate, trusted by a second client only.
    let ck =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    let new_dir = tempfile::tempdir().unwrap();
    std::fs::write(new_dir.path().join("cert.pem"), ck.cert.pem()).unwrap();
    let new_client = client_trusting(&new_dir.path().join("cert.pem"));
    assert!(
        new_client.get(a.url("/v1/health")).send().await.is_err(),
        "new cert not served yet"
    );
    std::fs::write(a.dir.join("tls/key.pem"), ck.key_pair.serialize_pem()).unwrap();
    std::fs::write(a.dir.join("tls/cert.pem"), ck.cert.pem()).unwrap();
    a.sighup_and_wait("TLS certificate reloaded", 1).await;
    assert_eq!(
        a.health_trusting(&new_dir.path().join("cert.pem")).await,
        200
    );
    // The old client's pooled connection still works.
    assert_eq!(
        a.client
            .get(a.url("/v1/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // Failed reloads: a file that is no certificate, then a certificate
    // whose key is not the key file's. Each is logged, and the certificate
    // already served keeps serving new connections.
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    for (n, cert_pem) in [
        (1, "not a certificate\n".to_string()),
        (2, other.cert.pem()),
    ] {
        std::fs::write(a.dir.join("tls/cert.pem"), cert_pem).unwrap();
        a.sighup_and_wait("TLS reload failed; keeping the current certificate", n)
            .await;
        assert_eq!(
            a.health_trusting(&new_dir.path().join("cert.pem")).await,
            200,
            "reload failure {n}"
        );
    }
    assert_eq!(
        a.log_text().matches("TLS certificate reloaded").count(),
        1,
        "the failures installed nothing"
    );
    assert!(!a.log_text().contains("panicked"));
}

#[test]
fn cli_configtest_version_and_root_policy() {
    let out = cli(&["--version"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, "version = 1\nsurprise = true\n").unwrap();
    let out = cli(&["--config", bad.to_str().unwrap(), "configtest"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("surprise"));
    // The shipped reference config is valid; its TLS files don't exist here (a warning).
    let reference = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/packaging/config.reference.toml"
    );
    let out = cli(&["--config", reference, "configtest"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("warning: tls.cert"));
    // doctor finds the problems and fails.
    let out = cli(&["--config", reference, "doctor"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("PROBLEM"));
    if unsafe { libc::geteuid() } == 0 {
        // Production profile refuses root.
        let out = cli(&["--config", reference, "serve"]);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to run as root"));
    }
}

#[tokio::test]
async fn dev_dir_configtest_passes() {
    let (_tmp, a) = Appliance::start_new();
    let out = cli(&["--config", a.config().to_str().unwrap(), "configtest"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration OK"));
    // doctor passes on a fresh dev appliance (SoftHSM token, keys, TLS, modes).
    let out = cli(&["--config", a.config().to_str().unwrap(), "doctor"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let expected = if harness::tpm() {
        "AES-256 key unsealed from the TPM into locked memory"
    } else {
        "AES-256 key present, sensitive, non-extractable"
    };
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(expected),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("refresh.tv_refresh off"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // init on an initialised install is idempotent and keeps the webhook id.
    let before = cli_json(&["--config", a.config().to_str().unwrap(), "register-url"]);
    let out = cli(&["--config", a.config().to_str().unwrap(), "init"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("initialised: webhook id wh_"));
    assert!(before["registrationUrl"]
        .as_str()
        .unwrap()
        .contains("hmac_hash="));
    // PIN files and the TLS key are private.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(a.dir.join("state"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    let private: &[&str] = if harness::tpm() {
        &["state/tpm/aes.json", "tls/key.pem", "config.toml"]
    } else {
        &["hsm/user-pin", "hsm/so-pin", "tls/key.pem", "config.toml"]
    };
    for f in private {
        let mode = std::fs::metadata(a.dir.join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
}

#[tokio::test]
async fn health_is_degraded_when_the_certificate_nears_expiry_and_recovers_on_reload() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    let mut a = Appliance::start_dev(&dir);
    a.terminate();
    let write_cert = |days: i64| {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p =
            rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::days(1);
        p.not_after = now + time::Duration::days(days);
        let c = p.self_signed(&key).unwrap();
        std::fs::write(dir.join("tls/cert.pem"), c.pem()).unwrap();
        std::fs::write(dir.join("tls/key.pem"), key.serialize_pem()).unwrap();
    };
    write_cert(3);
    let a = Appliance::start_serve(&dir);
    let h = a.health().await;
    assert_eq!(h["status"], "degraded", "{h}");
    // Whole days left, rounded down: 2 or 3 depending on the second.
    assert!(
        (2..=3).contains(&h["tlsCertificateDaysLeft"].as_i64().unwrap()),
        "{h}"
    );
    // A renewed certificate, reloaded on SIGHUP without a restart.
    write_cert(90);
    unsafe { libc::kill(a.pid() as i32, libc::SIGHUP) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let fresh = client_trusting(&dir.join("tls/cert.pem"));
        if let Ok(r) = fresh.get(a.url("/v1/health")).send().await {
            let h: Value = r.json().await.unwrap();
            if h["status"] == "healthy" {
                assert!(
                    (89..=90).contains(&h["tlsCertificateDaysLeft"].as_i64().unwrap()),
                    "{h}"
                );
                break;
            }
        }
        assert!(std::time::Instant::now() < deadline, "not reloaded");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
