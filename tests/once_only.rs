#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Every once-only rule under a crowd: the same ticket nonce, request id,
//! TOTP code or bind code sent by many clients at the same moment (each on
//! its own connection, released together by a barrier). Exactly one is
//! accepted. Real binary, real TLS, both backends (CI runs the suite on
//! each).

mod harness;

use harness::*;
use serde_json::{json, Value};
use std::sync::Arc;

/// Clients per race: more than the server's worker threads and the
/// store's group-commit batch, so requests really overlap.
const CROWD: usize = 24;

/// Limits that would otherwise answer part of the crowd `429` (the rules
/// under test here are the once-only ones, not the rate limits).
const NO_LIMITS: &str =
    "[direct_access]\nrate_limit_per_minute = 0\n[limits]\nfailures_per_minute = 0\nexchange_per_minute = 0\n";

/// One fresh connection per client, all sent when the last is ready.
async fn crowd(
    a: &Appliance,
    build: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
) -> Vec<(u16, Value)> {
    let barrier = Arc::new(tokio::sync::Barrier::new(CROWD));
    let mut tasks = Vec::new();
    for _ in 0..CROWD {
        let c = client_trusting(&a.dir.join("tls/cert.pem"));
        // Open the connection first, so the race is between requests, not
        // handshakes.
        assert_eq!(
            c.get(a.url("/v1/health")).send().await.unwrap().status(),
            200
        );
        let req = build(&c);
        let b = barrier.clone();
        tasks.push(tokio::spawn(async move {
            b.wait().await;
            let r = req.send().await.unwrap();
            let s = r.status().as_u16();
            (s, r.json::<Value>().await.unwrap_or(Value::Null))
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// Exactly one answer is `ok`; every other one is `refused`.
fn exactly_one(
    what: &str,
    answers: &[(u16, Value)],
    ok: impl Fn(u16, &Value) -> bool,
    refused: impl Fn(u16, &Value) -> bool,
) {
    let wins = answers.iter().filter(|(s, v)| ok(*s, v)).count();
    let lost = answers.iter().filter(|(s, v)| refused(*s, v)).count();
    assert_eq!(
        (wins, lost),
        (1, CROWD - 1),
        "{what}: one accepted, the rest refused: {answers:?}"
    );
}

#[tokio::test]
async fn one_ticket_nonce_is_accepted_once_by_a_crowd_reading_and_storing() {
    let (_tmp, mut a) = Appliance::start_configured(NO_LIMITS);
    a.bind().await;
    let (s, _) = a.store("svc", json!({"accessToken": "once"})).await;
    assert_eq!(s, 200);
    let refused = |s: u16, v: &Value| s == 401 && v["message"] == "Ticket already used";
    // A credential read.
    let tk = a.ticket("agent_credential", "svc", json!({}));
    let url = format!("{}?ticket={tk}&service=svc", a.url("/v1/credential"));
    let answers = crowd(&a, |c| c.get(&url)).await;
    exactly_one(
        "credential",
        &answers,
        |s, v| s == 200 && v["token"]["accessToken"] == "once",
        refused,
    );
    // A store: the nonce is burned in the write's own transaction.
    let tk = a.ticket("store", "svc", json!({}));
    let body = json!({"ticket": tk, "service": "svc", "tokenData": {"accessToken": "stored-once"}});
    let answers = crowd(&a, |c| c.post(a.url("/v1/store")).json(&body)).await;
    exactly_one("store", &answers, |s, _| s == 200, refused);
    assert_eq!(
        a.credential("svc", "").await.1["token"]["accessToken"],
        "stored-once"
    );
}

#[tokio::test]
async fn one_request_id_is_accepted_once_by_a_crowd() {
    let (_tmp, mut a) = Appliance::start_configured(NO_LIMITS);
    a.bind().await;
    let secret = a.secret.clone().unwrap();
    let rid = new_rid();
    let raw = serde_json::to_vec(
        &json!({"operation":"set","collection":"vault_config","key":"k","data":{"n":1}}),
    )
    .unwrap();
    let ts = now().to_string();
    let sig = sign(&secret, &ts, &raw);
    let answers = crowd(&a, |c| {
        c.post(a.url("/v1/storage"))
            .header("content-type", "application/json")
            .header("x-tokenvault-signature", &sig)
            .header("x-tokenvault-timestamp", &ts)
            .header("x-tokenvault-request-id", &rid)
            .body(raw.clone())
    })
    .await;
    exactly_one(
        "request id",
        &answers,
        |s, _| s == 200,
        |s, v| s == 401 && v["message"] == "Request id already used",
    );
}

#[tokio::test]
async fn one_totp_code_is_accepted_once_by_a_crowd_with_their_own_tickets() {
    let (_tmp, mut a) = Appliance::start_configured(NO_LIMITS);
    a.bind().await;
    let code = enrol_hour_totp(&a, "otp").await;
    let answers = crowd(&a, |c| {
        let body = json!({"ticket": a.ticket("totp_verify", "otp", json!({})), "service": "otp", "code": code});
        c.post(a.url("/v1/totp-verify")).json(&body)
    })
    .await;
    exactly_one(
        "TOTP code",
        &answers,
        |s, v| s == 200 && v["valid"] == true,
        // A replayed code is a failed guess: judged invalid, or past the
        // service's failure limit answered 429 without being judged.
        |s, v| (s == 200 && v["valid"] == false) || (s == 429 && v["error"] == "rate_limited"),
    );
}

#[tokio::test]
async fn one_bind_code_is_exchanged_once_by_a_crowd_and_its_secret_works() {
    let (_tmp, mut a) = Appliance::start_configured(NO_LIMITS);
    a.bind().await;
    let reg = cli_json(&["--config", a.config().to_str().unwrap(), "register-url"]);
    let body = json!({"code": reg["code"]});
    let answers = crowd(&a, |c| c.post(a.url("/v1/exchange")).json(&body)).await;
    exactly_one(
        "bind code",
        &answers,
        |s, v| s == 200 && v["hmacSecret"].is_string(),
        |s, v| s >= 400 && v["error"] == "code_used",
    );
    // The one secret handed out is the one the appliance now checks.
    let (_, v) = answers.iter().find(|(s, _)| *s == 200).unwrap();
    a.secret = Some(secret_of(v));
    let (s, v) = a
        .signed("/v1/health", json!({"requestId": new_rid()}))
        .await;
    assert_eq!((s, v["status"].as_str()), (200, Some("healthy")), "{v}");
}
