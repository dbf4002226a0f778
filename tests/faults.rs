#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Mutated requests against every endpoint of the real binary: ~1,000 per
//! endpoint, structure-aware (JSON values replaced by other types, huge,
//! nested or missing) and byte-level (flips, truncation, invalid UTF-8),
//! signed requests re-signed so they reach the body parsers. No answer may
//! be a 5xx (502/504 allowed from the brokering endpoints, which call
//! upstreams), every error must be the spec's JSON shape, and the server
//! must be alive and healthy afterwards. Seeded: TVW_MUTATION_SEED replays.

mod harness;

use harness::*;
use serde_json::{json, Value};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn junk_value(r: &mut Rng) -> Value {
    match r.below(12) {
        0 => Value::Null,
        1 => json!(true),
        2 => json!(-1),
        3 => json!(1e308),
        4 => json!(u64::MAX),
        5 => json!(""),
        6 => json!("x".repeat(100_000)),
        7 => json!([]),
        8 => json!({}),
        9 => json!("\u{0000}\u{202e}../../etc/passwd"),
        10 => json!([[[[[[[[[[1]]]]]]]]]]),
        _ => json!({"$ne": null, "__proto__": {"admin": true}}),
    }
}

/// Replaces, removes or adds one value somewhere in the document.
fn mutate_json(v: &mut Value, r: &mut Rng, depth: usize) {
    match v {
        Value::Object(m) if !m.is_empty() && depth < 6 => {
            let keys: Vec<String> = m.keys().cloned().collect();
            let k = keys[r.below(keys.len())].clone();
            match r.below(4) {
                0 => {
                    m.remove(&k);
                }
                1 => {
                    m.insert(k, junk_value(r));
                }
                2 => {
                    m.insert(format!("extra{}", r.below(100)), junk_value(r));
                }
                _ => mutate_json(m.get_mut(&k).unwrap(), r, depth + 1),
            }
        }
        Value::Array(a) if !a.is_empty() && depth < 6 => {
            let i = r.below(a.len());
            mutate_json(&mut a[i], r, depth + 1);
        }
        other => *other = junk_value(r),
    }
}

fn mutate_bytes(b: &mut Vec<u8>, r: &mut Rng) {
    match r.below(5) {
        0 if !b.is_empty() => {
            let i = r.below(b.len());
            b[i] ^= 1 << r.below(8);
        }
        1 if !b.is_empty() => {
            let n = r.below(b.len());
            b.truncate(n);
        }
        2 => b.extend_from_slice(&[0xff, 0xfe, 0xc0, 0x80]),
        3 => {
            *b = "[".repeat(50_000).into_bytes();
        }
        _ => {
            let i = if b.is_empty() { 0 } else { r.below(b.len()) };
            b.insert(i, b'"');
        }
    }
}

/// Builds a fresh valid body (new tickets) for one endpoint.
type BaseBody = Box<dyn Fn(&Appliance) -> Value>;

#[derive(Clone, Copy)]
enum Kind {
    Signed,
    Direct,
    DirectGet,
}

fn check(path: &str, status: u16, body: &[u8], seed: u64, what: &str) {
    let brokered = matches!(path, "/v1/proxy" | "/v1/refresh-notify" | "/v1/refresh");
    assert!(
        status < 500 || (brokered && (status == 502 || status == 504)),
        "{path}: {status} for {what} (seed {seed}): {}",
        String::from_utf8_lossy(body)
    );
    if status >= 400 {
        let v: Value = serde_json::from_slice(body).unwrap_or_else(|_| {
            panic!(
                "{path}: {status} not JSON for {what} (seed {seed}): {}",
                String::from_utf8_lossy(body)
            )
        });
        assert!(
            v["error"].is_string() && v["message"].is_string(),
            "{path}: {status} not in the spec's error shape (seed {seed}): {v}"
        );
    }
}

#[tokio::test]
async fn a_thousand_mutations_per_endpoint_never_5xx_and_the_server_lives() {
    let seed: u64 = std::env::var("TVW_MUTATION_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let mut b = [0u8; 8];
            getrandom::getrandom(&mut b).unwrap();
            u64::from_le_bytes(b) | 1
        });
    eprintln!("mutation seed {seed} (TVW_MUTATION_SEED={seed} replays it)");
    let mut r = Rng(seed);
    // Parsers, not abuse handling, are under test: the per-address limits
    // (tests/hostile.rs) would answer most of these 429 after a minute's
    // budget of failures.
    let (_tmp, mut a) = Appliance::start_configured(
        "[direct_access]\nrate_limit_per_minute = 0\n[limits]\nfailures_per_minute = 0\n",
    );
    a.bind().await;
    let secret = a.secret.clone().unwrap();
    a.store(
        "svc",
        json!({"accessToken": "t", "meta": {"tokenType": "PlainText"}}),
    )
    .await;
    a.store("otp", json!({"totpSecret": "JBSWY3DPEHPK3PXP"}))
        .await;
    a.storage(json!({"operation":"set","collection":"proxy_configs","key":"p1","data":{"name":"x","serviceName":"svc","baseUrl":"http://127.0.0.1:9/","headers":{"authorization":"Bearer ${TOKEN}"}}}))
        .await;

    let cases: Vec<(&str, Kind, BaseBody)> = vec![
        (
            "/v1/health",
            Kind::Signed,
            Box::new(|_| json!({"requestId":"req_x"})),
        ),
        (
            "/v1/storage",
            Kind::Signed,
            Box::new(
                |_| json!({"operation":"set","collection":"tokens","key":"k1","data":{"meta":{"tokenType":"JWT","displayName":"d"},"fields":{}}}),
            ),
        ),
        (
            "/v1/storage",
            Kind::Signed,
            Box::new(
                |_| json!({"operation":"list","collection":"audit","options":{"limit":5,"cursor":"tvc1:00","filters":{"source":"agent"}}}),
            ),
        ),
        (
            "/v1/storage",
            Kind::Signed,
            Box::new(|_| json!({"operation":"get","collection":"tokens","key":"svc"})),
        ),
        (
            "/v1/proxy",
            Kind::Signed,
            Box::new(
                |_| json!({"service":"svc","proxyConfigId":"p1","upstream":{"method":"GET","url":"http://127.0.0.1:9/x","headers":{"accept":"*/*"},"body":null}}),
            ),
        ),
        (
            "/v1/refresh-notify",
            Kind::Signed,
            Box::new(
                |_| json!({"service":"svc","refreshHint":{"provider":"nobody","tokenUrl":"http://127.0.0.1:9/t"}}),
            ),
        ),
        (
            "/v1/refresh",
            Kind::Signed,
            Box::new(|_| json!({"service":"svc","provider":"google","refreshToken":"r"})),
        ),
        (
            "/v1/exchange",
            Kind::Direct,
            Box::new(|_| json!({"code":"00000000-0000-0000-0000-000000000000"})),
        ),
        (
            "/v1/store",
            Kind::Direct,
            Box::new(
                |a| json!({"ticket": a.ticket("store","svc",json!({})), "service":"svc", "tokenData":{"accessToken":"t2","meta":{"tokenType":"PlainText"}}}),
            ),
        ),
        (
            "/v1/credential",
            Kind::Direct,
            Box::new(
                |a| json!({"ticket": a.ticket("agent_credential","svc",json!({})), "service":"svc"}),
            ),
        ),
        (
            "/v1/credential",
            Kind::DirectGet,
            Box::new(
                |a| json!({"ticket": a.ticket("agent_credential","svc",json!({})), "service":"svc"}),
            ),
        ),
        (
            "/v1/totp-code",
            Kind::Direct,
            Box::new(|a| json!({"ticket": a.ticket("totp_code","otp",json!({})), "service":"otp"})),
        ),
        (
            "/v1/totp-verify",
            Kind::Direct,
            Box::new(
                |a| json!({"ticket": a.ticket("totp_verify","otp",json!({})), "service":"otp", "code":"123456"}),
            ),
        ),
        ("/bind", Kind::Direct, Box::new(|_| json!({"frontend":"x"}))),
    ];
    let per_case = 1000 / cases.iter().filter(|c| c.0 == "/v1/storage").count().max(1);
    for (path, kind, base) in &cases {
        let n = if *path == "/v1/storage" {
            per_case
        } else {
            1000
        };
        for i in 0..n {
            let mut v = base(&a);
            let structured = r.below(3) != 0;
            let mut raw = if structured {
                mutate_json(&mut v, &mut r, 0);
                serde_json::to_vec(&v).unwrap()
            } else {
                let mut b = serde_json::to_vec(&v).unwrap();
                mutate_bytes(&mut b, &mut r);
                b
            };
            let what = format!("case {i} ({})", if structured { "json" } else { "bytes" });
            let resp = match kind {
                Kind::Signed => {
                    let ts = now().to_string();
                    // Mostly re-signed (reaches the parsers); sometimes not.
                    let sig = if r.below(10) == 0 {
                        "sha256=00".to_string()
                    } else {
                        sign(&secret, &ts, &raw)
                    };
                    a.client
                        .post(a.url(path))
                        .header("content-type", "application/json")
                        .header("x-tokenvault-signature", sig)
                        .header("x-tokenvault-timestamp", ts)
                        .header("x-tokenvault-request-id", new_rid())
                        .body(std::mem::take(&mut raw))
                        .send()
                        .await
                }
                Kind::Direct => {
                    let ct = [
                        "application/json",
                        "text/plain",
                        "application/x-www-form-urlencoded",
                        "",
                    ][r.below(4)];
                    let mut req = a.client.post(a.url(path)).body(std::mem::take(&mut raw));
                    if !ct.is_empty() {
                        req = req.header("content-type", ct);
                    }
                    req.send().await
                }
                Kind::DirectGet => {
                    let q = format!(
                        "ticket={}&service={}",
                        percent(&v["ticket"]),
                        percent(&v["service"])
                    );
                    a.client.get(format!("{}?{q}", a.url(path))).send().await
                }
            };
            let resp = resp.unwrap_or_else(|e| {
                let mut e = e.to_string();
                e.truncate(300);
                panic!("{path}: transport error {e} ({what}, seed {seed})")
            });
            let status = resp.status().as_u16();
            let body = resp.bytes().await.unwrap();
            check(path, status, &body, seed, &what);
        }
    }
    // Alive, healthy, and never panicked.
    let h = a.health().await;
    assert_eq!(h["status"], "healthy", "{h}");
    assert!(!a.log_text().contains("panicked"), "{}", a.log_text());
    assert_eq!(a.terminate(), Some(0));
}

fn percent(v: &Value) -> String {
    let mut s = match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    // Past the URL length a client sends at all (the server answers 414/431
    // to longer ones; reqwest refuses to build them).
    s.truncate(s.char_indices().nth(4096).map_or(s.len(), |(i, _)| i));
    percent_encoding::utf8_percent_encode(&s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

#[tokio::test]
async fn a_full_store_answers_507_loses_nothing_and_recovers_when_space_returns() {
    // A 1 MiB LMDB map stands in for a full disk.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    let mut a = Appliance::start_dev(&dir);
    a.terminate();
    let cfg = std::fs::read_to_string(dir.join("config.toml")).unwrap();
    let small = cfg.replace("map_size_mib = 256", "map_size_mib = 1")
        + "\n[direct_access]\nrate_limit_per_minute = 0\n";
    assert!(small.contains("map_size_mib = 1\n"));
    std::fs::write(dir.join("config.toml"), &small).unwrap();
    let mut a = Appliance::start_serve(&dir);
    a.bind().await;
    let blob = "x".repeat(16 * 1024);
    let mut stored = Vec::new();
    let mut full = None;
    for i in 0..200 {
        let svc = format!("fill-{i}");
        let (st, v) = a
            .store(&svc, json!({"accessToken": format!("{i}-{blob}")}))
            .await;
        match st {
            200 => stored.push(svc),
            507 => {
                full = Some(v);
                break;
            }
            other => panic!("{svc}: {other} {v}"),
        }
    }
    let v = full.expect("the 1 MiB map never filled");
    assert_eq!(
        (v["error"].as_str(), v["message"].is_string()),
        (Some("insufficient_storage"), true),
        "{v}"
    );
    assert!(stored.len() > 5, "{}", stored.len());
    // Signed writes are refused the same way; reads still work; alive.
    let (st, v) = a
        .signed(
            "/v1/storage",
            json!({"operation":"set","collection":"vault_config","key":"big","data":{"b": blob.repeat(8)}}),
        )
        .await;
    assert_eq!(
        (st, v["error"].as_str()),
        (507, Some("insufficient_storage")),
        "{v}"
    );
    for (i, svc) in stored.iter().enumerate() {
        let (st, v) = a.credential(svc, "").await;
        assert_eq!(st, 200, "{svc}");
        assert_eq!(v["token"]["accessToken"], json!(format!("{i}-{blob}")));
    }
    let h = a.health().await;
    assert_eq!(h["status"], "healthy", "{h}");
    // Space returns (a bigger map after a restart): writes work, nothing lost.
    a.terminate();
    std::fs::write(
        dir.join("config.toml"),
        small.replace("map_size_mib = 1\n", "map_size_mib = 64\n"),
    )
    .unwrap();
    let secret = a.secret.clone();
    let mut b = Appliance::start_serve(&dir);
    b.secret = secret;
    let (st, v) = b.store("after", json!({"accessToken": blob})).await;
    assert_eq!(st, 200, "{v}");
    for svc in stored.iter().step_by(3) {
        assert_eq!(b.credential(svc, "").await.0, 200, "{svc}");
    }
    assert!(!b.log_text().contains("panicked"));
}
