#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Mutated requests against every endpoint of the real binary, each
//! mutation starting from a request that succeeds (signed, ticketed, with the
//! stored configs, upstream, OAuth client and codes it needs), so that the
//! mutations reach the deep branches: structure-aware JSON mutations
//! (values replaced by other types, huge, nested or missing), mutated
//! ticket claims re-signed with the real secret (so they pass the MAC and
//! reach the claim rules), byte-level mutations (flips, truncation, invalid
//! UTF-8) re-signed, and header mutations (signature, timestamp, request id,
//! forwarding headers). No answer may be a 5xx (502/504 allowed from the
//! endpoints that call upstreams), every error must be the spec's JSON
//! shape, the server must be alive and healthy afterwards, and each
//! endpoint's report (printed) must show its deep branches were reached.
//! Seeded: TVW_MUTATION_SEED replays.

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

/// One endpoint's request before mutation.
struct Base {
    /// JSON body (signed requests, direct POSTs) or the query (GETs).
    body: Value,
    /// Ticket claims: signed into `body["ticket"]` at send time (after a
    /// claims mutation, if one is drawn).
    claims: Option<Value>,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// POST with the X-TokenVault signature headers.
    Signed,
    /// POST JSON (browser and agent endpoints, /v1/exchange).
    Direct,
    /// GET with the body's fields as the query string.
    DirectGet,
    /// A bind helper (dev serves them to loopback): headers mutated only.
    Helper(&'static str),
}

type MakeBase = Box<dyn Fn(&Ctx) -> Base>;

struct Target {
    name: &'static str,
    path: &'static str,
    kind: Kind,
    n: usize,
    base: MakeBase,
    /// At least this many distinct (status, error) pairs must be reached.
    min_pairs: usize,
}

struct Ctx {
    secret: Vec<u8>,
    upstream: String,
    otp_seed: Vec<u8>,
    /// A fresh bind code (for /v1/exchange's base), from the CLI.
    config: std::path::PathBuf,
    audit_cursor: String,
}

fn claims(pur: &str, svc: &str, extra: Value) -> Value {
    let mut c = json!({"sub":"user-1","aid":"agent-1","svc":svc,"pur":pur,"iat":now(),"exp":now()+60,"nonce":new_rid().replace("req_", "n0nce")});
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

fn signed_ticket(secret: &[u8], claims: &Value) -> String {
    use base64::Engine;
    use hmac::{Hmac, Mac};
    let p = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims.to_string());
    let mut m = <Hmac<sha2::Sha256> as Mac>::new_from_slice(secret).unwrap();
    m.update(p.as_bytes());
    format!("{p}.{}", hex::encode(m.finalize().into_bytes()))
}

fn totp_now(seed: &[u8]) -> String {
    use tokenvault_webhook::custody::totp::{code_software, Params};
    code_software(seed, &Params::default(), now() as u64).to_string()
}

/// A short label for an answer: the error code and its message (digits
/// dropped), or for a success the status the body reports (`refreshed`,
/// `ok`, `valid=false`, …).
fn label(status: u16, body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    if status >= 400 {
        // The code and its reason: one invalid_request code covers many
        // branches, told apart by their (fixed) messages.
        let msg: String = v["message"]
            .as_str()
            .unwrap_or("")
            .chars()
            .filter(|c| !c.is_ascii_digit())
            .take(70)
            .collect();
        return format!("{} ({msg})", v["error"].as_str().unwrap_or("?"));
    }
    if let Some(s) = v["status"].as_str() {
        return s.to_string();
    }
    if let Some(b) = v["valid"].as_bool() {
        return format!("valid={b}");
    }
    "ok".into()
}

async fn send(
    a: &Appliance,
    t: &Target,
    ctx: &Ctx,
    mut base: Base,
    r: &mut Rng,
    mutate: bool,
) -> (u16, bytes::Bytes, String) {
    // Which mutation: 0-4 JSON, 5-6 ticket claims, 7-8 bytes, 9 headers.
    let m = if mutate { r.below(10) } else { usize::MAX };
    let ticketed = base.claims.is_some();
    let m = if (5..=6).contains(&m) && !ticketed {
        0
    } else {
        m
    };
    if let Some(mut c) = base.claims.take() {
        if (5..=6).contains(&m) {
            mutate_json(&mut c, r, 0);
        }
        base.body["ticket"] = json!(signed_ticket(&ctx.secret, &c));
    }
    if m <= 4 {
        mutate_json(&mut base.body, r, 0);
    }
    let mut raw = serde_json::to_vec(&base.body).unwrap();
    if (7..=8).contains(&m) {
        mutate_bytes(&mut raw, r);
    }
    let header_mutation = if m == 9 { r.below(6) } else { usize::MAX };
    let req = match t.kind {
        Kind::Signed => {
            let mut ts = now().to_string();
            let mut sig = sign(&ctx.secret, &ts, &raw);
            let mut rid = new_rid();
            match header_mutation {
                0 => sig = "sha256=00".into(),
                1 => sig = sig.to_uppercase(),
                2 => {
                    ts = (now() - 400).to_string();
                    sig = sign(&ctx.secret, &ts, &raw);
                }
                3 => rid = "req bad id".into(),
                4 => ts = "1.5".into(),
                5 => sig = sign(b"another secret of thirty-two b..", &ts, &raw),
                _ => {}
            }
            a.client
                .post(a.url(t.path))
                .header("content-type", "application/json")
                .header("x-tokenvault-signature", sig)
                .header("x-tokenvault-timestamp", ts)
                .header("x-tokenvault-request-id", rid)
                .body(raw)
        }
        Kind::Direct => {
            let ct = match header_mutation {
                0 => "text/plain",
                1 => "application/x-www-form-urlencoded",
                2 => "",
                _ => "application/json",
            };
            let mut req = a.client.post(a.url(t.path)).body(raw);
            if !ct.is_empty() {
                req = req.header("content-type", ct);
            }
            if header_mutation == 3 {
                req = req.header("origin", "https://evil.example");
            }
            req
        }
        Kind::DirectGet => {
            let v: Value = serde_json::from_slice(&raw).unwrap_or_else(
                |_| json!({"ticket": String::from_utf8_lossy(&raw), "service": "svc"}),
            );
            let q: Vec<String> = match v.as_object() {
                Some(o) => o
                    .iter()
                    .map(|(k, v)| format!("{}={}", percent(&json!(k)), percent(v)))
                    .collect(),
                None => vec![format!("ticket={}", percent(&v))],
            };
            a.client.get(format!("{}?{}", a.url(t.path), q.join("&")))
        }
        Kind::Helper(method) => {
            let mut req = if method == "GET" {
                a.client.get(a.url(t.path))
            } else {
                a.client.post(a.url(t.path)).body(raw)
            };
            if mutate {
                req = match r.below(4) {
                    0 => req.header("forwarded", "for=198.51.100.7"),
                    1 => req.header("x-forwarded-for", "198.51.100.7"),
                    2 => req.header("x-real-ip", "198.51.100.7"),
                    _ => req.header("x-forwarded-proto", "https"),
                };
            }
            req
        }
    };
    let resp = req.send().await.unwrap_or_else(|e| {
        let mut e = e.to_string();
        e.truncate(300);
        panic!("{}: transport error {e}", t.name)
    });
    let status = resp.status().as_u16();
    let body = resp.bytes().await.unwrap();
    let l = label(status, &body);
    (status, body, l)
}

/// The upstream the proxy calls: echoes what it got.
async fn upstream() -> String {
    let app = axum::Router::new().route(
        "/echo",
        axum::routing::any(|req: axum::extract::Request| async move {
            let (parts, body) = req.into_parts();
            let body = axum::body::to_bytes(body, 1 << 20).await.unwrap_or_default();
            axum::Json(json!({"method": parts.method.as_str(), "path": parts.uri.to_string(), "len": body.len()}))
        }),
    ).route(
        "/token",
        axum::routing::post(|body: String| async move {
            if body.contains("grant_type=refresh_token") {
                (axum::http::StatusCode::OK, axum::Json(json!({"access_token":"at-new","refresh_token":"rt-1","expires_in":3600})))
            } else {
                (axum::http::StatusCode::BAD_REQUEST, axum::Json(json!({"error":"invalid_grant"})))
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    format!("http://{addr}")
}

fn targets() -> Vec<Target> {
    let rid = || json!(new_rid());
    vec![
        Target {
            name: "health",
            path: "/v1/health",
            kind: Kind::Signed,
            n: 300,
            min_pairs: 2,
            base: Box::new(move |_| Base {
                body: json!({"requestId": rid()}),
                claims: None,
            }),
        },
        Target {
            name: "storage set",
            path: "/v1/storage",
            kind: Kind::Signed,
            n: 300,
            min_pairs: 4,
            base: Box::new(move |_| Base {
                body: json!({"requestId": rid(), "operation":"set","collection":"vault_config","key":"m-set","data":{"theme":"dark","n":1}}),
                claims: None,
            }),
        },
        Target {
            name: "storage set token",
            path: "/v1/storage",
            kind: Kind::Signed,
            n: 200,
            min_pairs: 4,
            base: Box::new(move |_| Base {
                body: json!({"requestId": rid(), "operation":"set","collection":"tokens","key":"m-tok","data":{"v":1,"alg":"none","fields":{"accessToken":"m-v"},"meta":{"tokenType":"PlainText","displayName":"m"}}}),
                claims: None,
            }),
        },
        Target {
            name: "storage list",
            path: "/v1/storage",
            kind: Kind::Signed,
            n: 200,
            min_pairs: 4,
            base: Box::new(move |c| Base {
                body: json!({"requestId": rid(), "operation":"list","collection":"audit","options":{"limit":1,"after":c.audit_cursor,"filters":{"kind":"seed"}}}),
                claims: None,
            }),
        },
        Target {
            name: "storage get",
            path: "/v1/storage",
            kind: Kind::Signed,
            n: 200,
            min_pairs: 4,
            base: Box::new(move |_| Base {
                body: json!({"requestId": rid(), "operation":"get","collection":"tokens","key":"svc"}),
                claims: None,
            }),
        },
        Target {
            name: "storage list_batch",
            path: "/v1/storage",
            kind: Kind::Signed,
            n: 100,
            min_pairs: 3,
            base: Box::new(move |_| Base {
                body: json!({"requestId": rid(), "operation":"list_batch","collections":["tokens","proxy_configs"],"options":{"limit":2}}),
                claims: None,
            }),
        },
        Target {
            name: "proxy",
            path: "/v1/proxy",
            kind: Kind::Signed,
            n: 800,
            min_pairs: 5,
            base: Box::new(move |c| Base {
                body: json!({"requestId": rid(), "service":"svc", "upstream":{"method":"POST","url":format!("{}/echo", c.upstream),"headers":{"accept":"application/json"},"body":"aGVsbG8="}, "headerTemplates":{"Authorization":"Bearer ${TOKEN}"}}),
                claims: Some(claims("proxy", "svc", json!({"pid":"p1"}))),
            }),
        },
        Target {
            name: "refresh-notify",
            path: "/v1/refresh-notify",
            kind: Kind::Signed,
            n: 500,
            min_pairs: 4,
            base: Box::new(move |c| Base {
                body: json!({"requestId": rid(), "service":"oauth","reason":"token_expiring","expiresAt":"2026-02-17T15:30:00Z","refreshHint":{"provider":"prov","tokenUrl":format!("{}/token", c.upstream),"clientId":"cid-1"}}),
                claims: None,
            }),
        },
        Target {
            name: "refresh get",
            path: "/v1/refresh",
            kind: Kind::Signed,
            n: 300,
            min_pairs: 4,
            base: Box::new(move |_| Base {
                body: json!({"requestId": rid(), "action":"get","service":"oauth"}),
                claims: None,
            }),
        },
        Target {
            name: "refresh update",
            path: "/v1/refresh",
            kind: Kind::Signed,
            n: 300,
            min_pairs: 4,
            base: Box::new(move |_| Base {
                body: json!({"requestId": rid(), "action":"update","service":"oauth2","tokens":{"accessToken":"ya29.m","refreshToken":"1//m","expiryTime":1900000000000i64}}),
                claims: None,
            }),
        },
        Target {
            name: "store",
            path: "/v1/store",
            kind: Kind::Direct,
            n: 800,
            min_pairs: 5,
            base: Box::new(|_| Base {
                body: json!({"service":"st","tokenData":{"accessToken":"t2","refreshToken":"r2","tokenType":"JWT"}}),
                claims: Some(claims("store", "st", json!({"cid":"cid-st"}))),
            }),
        },
        Target {
            name: "credential POST",
            path: "/v1/credential",
            kind: Kind::Direct,
            n: 600,
            min_pairs: 5,
            base: Box::new(|_| Base {
                body: json!({"service":"svc"}),
                claims: Some(claims("agent_credential", "svc", json!({}))),
            }),
        },
        Target {
            name: "credential GET",
            path: "/v1/credential",
            kind: Kind::DirectGet,
            n: 400,
            min_pairs: 4,
            base: Box::new(|_| Base {
                body: json!({"service":"svc"}),
                claims: Some(claims("user_reveal", "svc", json!({}))),
            }),
        },
        Target {
            name: "totp-code",
            path: "/v1/totp-code",
            kind: Kind::Direct,
            n: 500,
            min_pairs: 4,
            base: Box::new(|_| Base {
                body: json!({"service":"otp"}),
                claims: Some(claims("totp_code", "otp", json!({}))),
            }),
        },
        Target {
            name: "totp-code GET",
            path: "/v1/totp-code",
            kind: Kind::DirectGet,
            n: 200,
            min_pairs: 3,
            base: Box::new(|_| Base {
                body: json!({"service":"otp"}),
                claims: Some(claims("totp_code", "otp", json!({}))),
            }),
        },
        Target {
            name: "totp-verify",
            path: "/v1/totp-verify",
            kind: Kind::Direct,
            n: 500,
            min_pairs: 4,
            base: Box::new(|c| Base {
                body: json!({"service":"otp","code":totp_now(&c.otp_seed)}),
                claims: Some(claims("totp_verify", "otp", json!({}))),
            }),
        },
        Target {
            name: "register-url",
            path: "/v1/register-url",
            kind: Kind::Helper("GET"),
            n: 60,
            min_pairs: 2,
            base: Box::new(|_| Base {
                body: Value::Null,
                claims: None,
            }),
        },
        Target {
            name: "bind",
            path: "/bind",
            kind: Kind::Helper("POST"),
            n: 60,
            min_pairs: 2,
            base: Box::new(|_| Base {
                body: json!({}),
                claims: None,
            }),
        },
        Target {
            name: "exchange",
            path: "/v1/exchange",
            kind: Kind::Direct,
            n: 200,
            min_pairs: 3,
            base: Box::new(|c| {
                let reg = cli_json(&["--config", c.config.to_str().unwrap(), "register-url"]);
                Base {
                    body: json!({"code": reg["code"]}),
                    claims: None,
                }
            }),
        },
    ]
}

#[tokio::test]
async fn mutations_from_succeeding_requests_reach_deep_branches_never_5xx_and_the_server_lives() {
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
    // (tests/hostile.rs) would answer most of these 429 within a minute.
    let (_tmp, mut a) = Appliance::start_configured(
        "[direct_access]\nrate_limit_per_minute = 0\n[limits]\nfailures_per_minute = 0\nexchange_per_minute = 0\n[refresh]\ntv_refresh = \"on\"\n",
    );
    a.bind().await;
    let up = upstream().await;
    // The stored state every base request needs; each setup call checked.
    for (svc, td) in [
        ("svc", json!({"accessToken": "t", "tokenType": "PlainText"})),
        (
            "oauth",
            json!({"accessToken": "at-old", "refreshToken": "rt-1", "tokenType": "JWT"}),
        ),
        (
            "oauth2",
            json!({"accessToken": "at-old", "refreshToken": "rt-2", "tokenType": "JWT"}),
        ),
    ] {
        let (s, v) = a.store(svc, td).await;
        assert_eq!(s, 200, "{svc}: {v}");
    }
    let otp_seed = tokenvault_webhook::custody::totp::base32_decode("JBSWY3DPEHPK3PXP")
        .unwrap()
        .to_vec();
    let (s, v) = a
        .store("otp", json!({"totpSecret": "JBSWY3DPEHPK3PXP"}))
        .await;
    assert_eq!(s, 200, "{v}");
    a.storage(json!({"operation":"set","collection":"proxy_configs","key":"p1","data":{"name":"echo","serviceName":"svc","upstreamUrl":format!("{up}/echo"),"headerTemplates":{"Authorization":"Bearer ${TOKEN}"}}})).await;
    for i in 0..3 {
        a.storage(json!({"operation":"set","collection":"audit","key":format!("2026-02-15T10:3{i}:00Z"),"data":{"kind":"seed","n":i}})).await;
    }
    let first = a.storage(json!({"operation":"list","collection":"audit","options":{"limit":1,"filters":{"kind":"seed"}}})).await;
    let audit_cursor = first["pagination"]["nextCursor"]
        .as_str()
        .expect("an audit cursor")
        .to_string();
    a.add_oauth_client("prov", &format!("{up}/token"), &["--service", "oauth"]);
    let mut ctx = Ctx {
        secret: a.secret.clone().unwrap(),
        upstream: up,
        otp_seed,
        config: a.config(),
        audit_cursor,
    };

    let mut report = String::new();
    let mut shallow = Vec::new();
    for t in targets() {
        let mut pairs: std::collections::BTreeMap<(u16, String), usize> = Default::default();
        // The unmutated request succeeds: the mutations start from there.
        let (status, body, l) = send(&a, &t, &ctx, (t.base)(&ctx), &mut r, false).await;
        assert!(
            (200..400).contains(&status),
            "{}: the base request must succeed: {status} {}",
            t.name,
            String::from_utf8_lossy(&body)
        );
        if t.path == "/v1/exchange" {
            ctx.secret = secret_of(&serde_json::from_slice(&body).unwrap());
        }
        *pairs.entry((status, l)).or_default() += 1;
        for i in 0..t.n {
            let (status, body, l) = send(&a, &t, &ctx, (t.base)(&ctx), &mut r, true).await;
            if status >= 500 && !matches!(status, 502 | 504) {
                let log = a.log_text();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                eprintln!(
                    "server log before the 5xx (newest first):\n{}",
                    tail.join("\n")
                );
            }
            check(t.path, status, &body, seed, &format!("{} case {i}", t.name));
            if t.path == "/v1/exchange" && status == 200 {
                ctx.secret = secret_of(&serde_json::from_slice(&body).unwrap());
            }
            *pairs.entry((status, l)).or_default() += 1;
        }
        let line = pairs
            .iter()
            .map(|((s, l), n)| format!("      {s} {l} ×{n}"))
            .collect::<Vec<_>>()
            .join("\n");
        report.push_str(&format!("  {}: {} distinct\n{line}\n", t.name, pairs.len()));
        let errors = pairs.keys().filter(|(s, _)| *s >= 400).count();
        let successes = pairs.keys().filter(|(s, _)| *s < 400).count();
        if !(pairs.len() >= t.min_pairs && errors >= 1 && successes >= 1) {
            shallow.push(format!(
                "{}: {} distinct answers ({errors} errors, {successes} successes), fewer than {}",
                t.name,
                pairs.len(),
                t.min_pairs
            ));
        }
    }
    eprintln!("mutation report (status error-or-result ×count), seed {seed}:\n{report}");
    assert!(shallow.is_empty(), "mutations stayed shallow: {shallow:#?}");
    // Alive, healthy, and never panicked.
    a.secret = Some(ctx.secret.clone());
    let h = a.health().await;
    assert_eq!(h["status"], "healthy", "{h}");
    assert!(!a.log_text().contains("panicked"), "{}", a.log_text());
    assert_eq!(a.terminate(), Some(0));
}

fn check(path: &str, status: u16, body: &[u8], seed: u64, what: &str) {
    let brokered = matches!(path, "/v1/proxy" | "/v1/refresh-notify");
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
    let (stored, v) = fill_until_507(&a, "fill", &blob, 200).await;
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

/// Stores `PREFIX-i` = `"{i}-{blob}"` until one answers 507 (at most `max`
/// tries): the services stored, and the 507's body. Any other answer fails.
async fn fill_until_507(
    a: &Appliance,
    prefix: &str,
    blob: &str,
    max: usize,
) -> (Vec<String>, Value) {
    let mut stored = Vec::new();
    for i in 0..max {
        let svc = format!("{prefix}-{i}");
        let (st, v) = a
            .store(&svc, json!({"accessToken": format!("{i}-{blob}")}))
            .await;
        match st {
            200 => stored.push(svc),
            507 => return (stored, v),
            other => panic!("{svc}: {other} {v}\n{}", a.log_text()),
        }
    }
    panic!(
        "{max} stores of {} bytes never filled the store",
        blob.len()
    )
}

/// A tmpfs the test mounts over a directory, unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &std::path::Path, size: &str) -> Tmpfs {
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "mounting a tmpfs needs root (CI runs as root); this test does not skip"
        );
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_path_buf())
    }
    fn resize(&self, size: &str) {
        let out = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "remount: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// A real full disk, not a full map: the store's directory on a 4 MiB
/// tmpfs under a 64 MiB map. Writes answer 507 with nothing lost (reads
/// answer their value, or 507 when their nonce cannot be recorded), and once
/// the file system has room again every acknowledged write reads back and
/// new writes land, without a restart.
#[tokio::test]
async fn a_full_disk_answers_507_loses_nothing_and_recovers_without_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    let mut a = Appliance::start_dev(&dir);
    a.terminate();
    let state = dir.join("state");
    let orig = dir.join("state.orig");
    std::fs::rename(&state, &orig).unwrap();
    std::fs::create_dir(&state).unwrap();
    let fs = Tmpfs::mount(&state, "4m");
    let out = std::process::Command::new("cp")
        .arg("-a")
        .arg(orig.join("."))
        .arg(&state)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg = std::fs::read_to_string(dir.join("config.toml")).unwrap();
    let cfg = cfg.replace("map_size_mib = 256", "map_size_mib = 64")
        + "\n[direct_access]\nrate_limit_per_minute = 0\n";
    assert!(cfg.contains("map_size_mib = 64\n"));
    std::fs::write(dir.join("config.toml"), &cfg).unwrap();
    let mut a = Appliance::start_serve(&dir);
    a.bind().await;
    let blob = "y".repeat(16 * 1024);
    let (stored, v) = fill_until_507(&a, "disk", &blob, 1000).await;
    assert_eq!(v["error"], "insufficient_storage", "{v}");
    assert!(stored.len() > 5, "{}", stored.len());
    // While the disk is full a read answers its value, or 507 when the
    // ticket's nonce cannot be recorded (a read is a write too): never a
    // 500, never another value.
    for (i, svc) in stored.iter().enumerate() {
        let (st, v) = a.credential(svc, "").await;
        match st {
            200 => assert_eq!(v["token"]["accessToken"], json!(format!("{i}-{blob}"))),
            507 => assert_eq!(v["error"], "insufficient_storage", "{v}"),
            other => panic!("{svc}: {other} {v}"),
        }
    }
    // Room again (the file system grown in place): no restart, nothing lost:
    // every acknowledged write reads back, and new writes land.
    fs.resize("64m");
    for (i, svc) in stored.iter().enumerate() {
        let (st, v) = a.credential(svc, "").await;
        assert_eq!(st, 200, "{svc}: {v}");
        assert_eq!(v["token"]["accessToken"], json!(format!("{i}-{blob}")));
    }
    let (st, v) = a.store("after", json!({"accessToken": blob})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(a.credential("after", "").await.0, 200);
    assert!(!a.log_text().contains("panicked"));
    a.terminate();
}
