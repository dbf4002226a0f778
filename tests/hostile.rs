#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The appliance against a hostile network: the real binary over real TLS,
//! attackers and legitimate clients on other loopback addresses (127.0.0.2
//! and up play "another client"). Every loop is bounded in count and time.

mod harness;

use harness::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn metrics_of(a: &Appliance) -> String {
    a.metrics().await
}

const METRICS: &str = "[metrics]\nlisten = \"127.0.0.1:0\"\n";

#[tokio::test]
async fn an_unauthenticated_flood_costs_no_durable_bytes_and_a_real_store_still_lands() {
    // The failure budget and the rate limits off, so every request reaches
    // its deepest check.
    let (_t, mut a) = Appliance::start_configured(&format!(
        "{METRICS}[direct_access]\nrate_limit_per_minute = 0\n[limits]\nfailures_per_minute = 0\nexchange_per_minute = 0\nfailure_log_lines_per_minute = 30\n"
    ));
    a.bind().await;
    let used = |m: &str| metric(m, "tvw_store_used_bytes");
    let before = used(&metrics_of(&a).await);
    let secret = a.secret.clone().unwrap();
    let bad_ticket = make_ticket(
        b"not-the-secret-not-the-secret-!!",
        "agent_credential",
        "x",
        json!({}),
    );
    let client = a.client.clone();
    let base = a.base.clone();
    const N: usize = 4000;
    let started = Instant::now();
    let statuses: Vec<u16> = futures::future::join_all((0..32).map(|w| {
        let (client, base, bad_ticket) = (client.clone(), base.clone(), bad_ticket.clone());
        async move {
            let mut out = Vec::new();
            for i in (w..N).step_by(32) {
                let rb = match i % 4 {
                    0 => client
                        .post(format!("{base}/v1/exchange"))
                        .json(&json!({"code": "x"})),
                    1 => client.get(format!("{base}/v1/credential?ticket=malformed&service=x")),
                    2 => client.get(format!(
                        "{base}/v1/credential?ticket={bad_ticket}&service=x"
                    )),
                    _ => {
                        let ts = now().to_string();
                        client
                            .post(format!("{base}/v1/storage"))
                            .header(
                                "x-tokenvault-signature",
                                format!("sha256={}", "0".repeat(64)),
                            )
                            .header("x-tokenvault-timestamp", &ts)
                            .header("x-tokenvault-request-id", new_rid())
                            .body("{\"operation\":\"list\",\"collection\":\"tokens\"}")
                    }
                };
                out.push(rb.send().await.unwrap().status().as_u16());
            }
            out
        }
    }))
    .await
    .into_iter()
    .flatten()
    .collect();
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(statuses.len(), N);
    let distinct: std::collections::BTreeSet<u16> = statuses.iter().copied().collect();
    assert!(
        distinct.iter().all(|s| [401, 410].contains(s)),
        "{distinct:?}"
    );
    let m = metrics_of(&a).await;
    let after = used(&m);
    let grown = after.saturating_sub(before);
    eprintln!(
        "flood: {N} failing requests in {secs:.2} s ({:.0}/s), store grew {grown} bytes ({:.2} bytes per request)",
        N as f64 / secs,
        grown as f64 / N as f64
    );
    // A fixed budget, not a record per request (it was ~274 bytes each).
    assert!(
        grown <= 64 << 10,
        "the store grew {grown} bytes for {N} failing requests"
    );
    let rejected: u64 = m
        .lines()
        .filter(|l| l.starts_with("tvw_unauthenticated_rejections_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert!(rejected >= N as u64, "{rejected} counted\n{m}");
    assert!(metric(&m, "tvw_shield_total{event=\"log_suppressed\"}") > 0);
    let access_lines = a
        .log_text()
        .lines()
        .filter(|l| l.contains("access:"))
        .count();
    assert!(
        access_lines < N / 4,
        "{access_lines} access lines for {N} failures"
    );
    // A legitimate 20 KB store afterwards: stored, readable, in the trail.
    let big = "s".repeat(20 << 10);
    let (s, v) = a.store("after-flood", json!({"accessToken": big})).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = a.credential("after-flood", "").await;
    assert_eq!(
        (s, v["token"]["accessToken"].as_str().map(str::len)),
        (200, Some(20 << 10))
    );
    drop(secret);
    a.terminate();
    let _tpm = start_swtpm_for(&a.dir);
    let cfg = a.config();
    let v = cli_json(&["--config", cfg.to_str().unwrap(), "audit", "verify"]);
    assert_eq!(v["ok"], true, "{v}");
    let out = cli(&[
        "--config",
        cfg.to_str().unwrap(),
        "audit",
        "tail",
        "-n",
        "20",
    ]);
    let events: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(events
        .iter()
        .any(|e| e["event"] == "store" && e["service"] == "after-flood" && e["status"] == 200));
    assert!(
        events.iter().all(|e| e["status"].as_u64().unwrap() < 400),
        "no failure that proved nothing is in the trail: {events:?}"
    );
}

#[tokio::test]
async fn slow_bodies_from_one_address_do_not_keep_another_address_from_being_served() {
    let (_t, mut a) = Appliance::start_configured(
        &format!("{METRICS}[limits]\nmax_connections_per_ip = 8\nbody_grace_secs = 1\nmin_body_bytes_per_sec = 1024\n"),
    );
    a.bind().await;
    let secret = a.secret.clone().unwrap();
    // 40 connections from 127.0.0.1, each with the headers of a signed
    // /v1/storage and a 100000-byte body that trickles.
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..40 {
        let Ok(mut c) = raw_tls(&a, "127.0.0.1").await else {
            refused += 1;
            continue;
        };
        let ts = now().to_string();
        let head = format!(
            "POST /v1/storage HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: 100000\r\nx-tokenvault-signature: {}\r\nx-tokenvault-timestamp: {ts}\r\nx-tokenvault-request-id: {}\r\n\r\n{{",
            sign(&secret, &ts, b"{}"),
            new_rid()
        );
        if c.write_all(head.as_bytes()).await.is_err() || c.flush().await.is_err() {
            refused += 1;
            continue;
        }
        held.push(c);
    }
    // Connections over the cap are closed at accept: their first read ends.
    let mut open = Vec::new();
    for mut c in held {
        let mut b = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(300), c.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => refused += 1,
            // The answer may already have begun (a body past its rate).
            Ok(Ok(_)) => open.push((c, vec![b[0]])),
            Err(_) => open.push((c, Vec::new())),
        }
    }
    assert!(open.len() <= 8, "{} slow connections held", open.len());
    assert!(refused >= 32, "{refused} refused");
    // Another address is served at once.
    let other = client_from(&a, "127.0.0.2");
    let r = other.get(a.url("/v1/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // The slow bodies miss their minimum rate: 408 and the connection ends.
    for (mut c, mut got) in open {
        let r = tokio::time::timeout(Duration::from_secs(20), c.read_to_end(&mut got)).await;
        assert!(r.is_ok(), "a slow body was never cut off");
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        assert!(text.contains("request_timeout"), "{text}");
    }
    let m = a.metrics().await;
    assert!(metric(&m, "tvw_shield_total{event=\"connection_per_ip\"}") >= 32);
    assert!(metric(&m, "tvw_shield_total{event=\"body_deadline\"}") >= 1);
}

#[tokio::test]
async fn a_dual_stack_listener_refuses_an_ipv4_client_in_deny_cidrs() {
    let (_t, mut a) = Appliance::start_edited(
        |c| c.replace("listen = \"127.0.0.1:0\"", "listen = \"[::]:0\""),
        "[direct_access]\ndeny_cidrs = [\"127.0.0.1/32\"]\n",
    );
    // READY names [::]: reach it over IPv4 (seen as ::ffff:127.0.0.1).
    a.base = format!("https://127.0.0.1:{}", a.port());
    a.bind().await;
    let (s, _) = a.store("svc", json!({"accessToken": "x"})).await;
    assert_eq!(s, 403, "IPv4 client on a dual-stack listener");
    let (s, v) = a.credential("svc", "").await;
    assert_eq!((s, v["error"].as_str()), (403, Some("forbidden")));
    // The same request over IPv6 loopback is not denied.
    let v6 = format!("https://[::1]:{}", a.port());
    let tk = a.ticket("store", "svc", json!({}));
    let r = a
        .client
        .post(format!("{v6}/v1/store"))
        .json(&json!({"ticket": tk, "service": "svc", "tokenData": {"accessToken": "x"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn parallel_wrong_totp_guesses_are_judged_at_most_the_limit() {
    let (_t, mut a) = Appliance::start_new();
    a.bind().await;
    let (s, _) = a
        .store("otp", json!({"totpSecret": "JBSWY3DPEHPK3PXP"}))
        .await;
    assert_eq!(s, 200);
    // 30 guesses at once, each with its own ticket; all in one 30-s step
    // (a burst that straddles a step boundary is sent again, at most 3 times).
    for attempt in 0..3 {
        let step = now() / 30;
        let futs: Vec<_> = (0..30)
            .map(|_| {
                let tk = a.ticket("totp_verify", "otp", json!({}));
                a.client
                    .post(a.url("/v1/totp-verify"))
                    .json(&json!({"ticket": tk, "service": "otp", "code": "000000"}))
                    .send()
            })
            .collect();
        let mut judged = 0;
        let mut limited = 0;
        for r in futures::future::join_all(futs).await {
            let r = r.unwrap();
            match r.status().as_u16() {
                200 => {
                    let v: Value = r.json().await.unwrap();
                    if v["valid"] == false {
                        judged += 1;
                    }
                }
                429 => limited += 1,
                other => panic!("unexpected {other}"),
            }
        }
        if now() / 30 != step {
            assert!(attempt < 2, "three bursts straddled a step boundary");
            continue;
        }
        // 000000 is the current code one time in a million: then it is
        // accepted once and no failure is counted for it.
        assert!(judged <= 5, "{judged} wrong guesses judged in one step");
        assert!(limited >= 24, "{limited} answered 429");
        return;
    }
}

/// Outside `dev` the public router has no helper routes (a unit test in
/// `server::tests` shows that: production refuses to run as root, as these
/// tests do); here the helper listener itself, in `dev`.
#[tokio::test]
async fn the_helper_listener_serves_only_the_bind_helpers_and_refuses_forwarded_requests() {
    let (_t, mut a) = Appliance::start_configured("[helper]\nlisten = \"127.0.0.1:0\"\n");
    let helper = a
        .log_text()
        .lines()
        .find_map(|l| l.strip_prefix("HELPER ").map(str::to_string))
        .expect("the HELPER line");
    let plain = reqwest::Client::new();
    let r = plain
        .get(format!("{helper}/v1/register-url"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let reg: Value = r.json().await.unwrap();
    assert!(reg["code"].is_string());
    // Through a proxy (forwarding headers): refused.
    for h in ["x-forwarded-for", "forwarded", "x-forwarded-host"] {
        let r = plain
            .get(format!("{helper}/v1/register-url"))
            .header(h, "203.0.113.7")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{h}");
    }
    // The helper serves nothing else.
    let r = plain
        .get(format!("{helper}/v1/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // The code from the helper binds.
    let (s, v) = a.exchange(&reg["code"]).await;
    assert_eq!(s, 200, "{v}");
}

#[tokio::test]
async fn dev_keeps_register_url_for_loopback_but_not_through_a_forwarder() {
    let (_t, a) = Appliance::start_new();
    let r = a
        .client
        .get(a.url("/v1/register-url"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = a
        .client
        .get(a.url("/v1/register-url"))
        .header("x-forwarded-for", "198.51.100.4")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(a
        .log_text()
        .contains("dev: /v1/register-url and /bind are also served"));
}

#[tokio::test]
async fn refresh_notify_answers_no_token_with_and_without_a_client() {
    let (_t, mut a) = Appliance::start_new();
    a.bind().await;
    let notify = |svc: &'static str| {
        let body = json!({"requestId": new_rid(), "service": svc});
        async move { body }
    };
    let (s, v) = a.signed("/v1/refresh-notify", notify("absent").await).await;
    assert_eq!((s, v["status"].as_str()), (200, Some("no_token")));
    let (s, _) = a.store("norefresh", json!({"accessToken": "at"})).await;
    assert_eq!(s, 200);
    let (s, v) = a
        .signed("/v1/refresh-notify", notify("norefresh").await)
        .await;
    assert_eq!((s, v["status"].as_str()), (200, Some("no_refresh_token")));
    // With a client registered for these services: the same answers.
    let secret_file = a.dir.join("client-secret");
    std::fs::write(&secret_file, "cs").unwrap();
    std::fs::set_permissions(
        &secret_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    for name in ["absent", "norefresh"] {
        let out = cli(&[
            "--config",
            a.config().to_str().unwrap(),
            "oauth-client",
            "add",
            name,
            "--client-id",
            "cid",
            "--client-secret-file",
            secret_file.to_str().unwrap(),
            "--token-url",
            "https://127.0.0.1:9/token",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (s, v) = a.signed("/v1/refresh-notify", notify("absent").await).await;
    assert_eq!((s, v["status"].as_str()), (200, Some("no_token")));
    let (s, v) = a
        .signed("/v1/refresh-notify", notify("norefresh").await)
        .await;
    assert_eq!((s, v["status"].as_str()), (200, Some("no_refresh_token")));
}

#[tokio::test]
async fn unauthenticated_failures_spend_a_per_address_budget_and_exchange_is_rate_limited() {
    let (_t, a) = Appliance::start_configured(
        // One refill a minute: the bursts below hold however slowly the
        // requests land, short of a minute per request.
        "[limits]\nfailures_per_minute = 1\nfailure_burst = 10\nexchange_per_minute = 1\nexchange_burst = 3\n",
    );
    let attacker = client_from(&a, "127.0.0.3");
    let mut codes = Vec::new();
    for _ in 0..20 {
        let r = attacker
            .get(a.url("/v1/credential?ticket=malformed&service=x"))
            .send()
            .await
            .unwrap();
        codes.push(r.status().as_u16());
    }
    assert_eq!(codes.iter().filter(|c| **c == 401).count(), 10, "{codes:?}");
    assert!(codes[10..].iter().all(|c| *c == 429), "{codes:?}");
    // Every route is closed to it now, even the cheapest.
    let r = attacker.get(a.url("/v1/health")).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    // Another address is not affected.
    let other = client_from(&a, "127.0.0.4");
    let r = other.get(a.url("/v1/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // /v1/exchange: a burst of 3, then 429, from a fresh address.
    let ex = client_from(&a, "127.0.0.5");
    let mut codes = Vec::new();
    for _ in 0..5 {
        let r = ex
            .post(a.url("/v1/exchange"))
            .json(&json!({"code": "00000000-0000-0000-0000-000000000000"}))
            .send()
            .await
            .unwrap();
        codes.push(r.status().as_u16());
    }
    assert_eq!(codes, [410, 410, 410, 429, 429]);
}

#[tokio::test]
async fn concurrent_exchanges_leave_exactly_one_working_secret_that_survives_a_restart() {
    let (_t, mut a) = Appliance::start_new();
    let reg = || cli_json(&["--config", a.config().to_str().unwrap(), "register-url"]);
    let (c1, c2) = (reg(), reg());
    let ex = |code: Value| {
        a.client
            .post(a.url("/v1/exchange"))
            .json(&json!({"code": code}))
            .send()
    };
    let (r1, r2) = tokio::join!(ex(c1["code"].clone()), ex(c2["code"].clone()));
    let mut secrets = Vec::new();
    for r in [r1, r2] {
        let r = r.unwrap();
        assert_eq!(
            r.status(),
            200,
            "both codes are valid; each exchange runs alone"
        );
        let v: Value = r.json().await.unwrap();
        secrets.push(
            base64::Engine::decode(
                &base64::engine::general_purpose::STANDARD,
                v["hmacSecret"].as_str().unwrap(),
            )
            .unwrap(),
        );
    }
    let mut ok = Vec::new();
    for s in &secrets {
        ok.push(
            a.signed_with(s, "/v1/health", &json!({}), &new_rid())
                .await
                .0
                == 200,
        );
    }
    assert_eq!(ok.iter().filter(|x| **x).count(), 1, "{ok:?}");
    let winner = secrets[ok.iter().position(|x| *x).unwrap()].clone();
    // The committed key was not destroyed by the other exchange.
    a.terminate();
    let dir = a.dir.clone();
    let b = Appliance::start_serve(&dir);
    assert_eq!(
        b.signed_with(&winner, "/v1/health", &json!({}), &new_rid())
            .await
            .0,
        200
    );
}
