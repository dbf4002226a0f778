#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Two appliances, one store: nodes A and B on one PostgreSQL database
//! (a throwaway cluster from Debian's package, TLS with a throwaway CA)
//! and one SoftHSM2 token, each the real binary over real TLS. What one
//! node accepts once, the other refuses; a re-bind on one reaches the
//! other; a node killed mid-write or a database restarted under load
//! loses nothing acknowledged.

mod harness;

use harness::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Node A (`dev --postgres`, bound) and node B (`serve` on A's database
/// and token).
async fn two_nodes() -> (tempfile::TempDir, Appliance, Appliance) {
    let tmp = tempfile::tempdir().unwrap();
    let mut a = Appliance::start_dev_postgres(&tmp.path().join("a"));
    a.bind().await;
    let b = a.second_node(&tmp.path().join("b"));
    (tmp, a, b)
}

#[tokio::test]
async fn a_ticket_used_on_node_a_is_refused_on_node_b() {
    let (_tmp, a, b) = two_nodes().await;
    a.store_ok("svc", json!({"accessToken": "shared-1"})).await;
    // B reads what A stored (one store), with a ticket of its own.
    let (s, v) = b.credential("svc", "").await;
    assert_eq!(
        (s, &v["token"]["accessToken"]),
        (200, &json!("shared-1")),
        "{v}"
    );
    // One ticket: accepted by A, then refused by B.
    let tk = a.ticket("agent_credential", "svc", json!({}));
    let url = |n: &Appliance| format!("{}?ticket={tk}&service=svc", n.url("/v1/credential"));
    let r = a.client.get(url(&a)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = b.client.get(url(&b)).send().await.unwrap();
    let s = r.status().as_u16();
    let v: Value = r.json().await.unwrap();
    assert_refused(s, &v, 401, "ticket_invalid");
    assert_eq!(v["message"], "Ticket already used");
    // And a request id signed once: A takes it, B refuses it.
    let (rid, secret, body) = (new_rid(), a.secret.clone().unwrap(), json!({}));
    let (s, _) = a.signed_with(&secret, "/v1/health", &body, &rid).await;
    assert_eq!(s, 200);
    let (s, v) = b.signed_with(&secret, "/v1/health", &body, &rid).await;
    assert_refused(s, &v, 401, "auth_failed");
    assert_eq!(v["message"], "Request id already used");
}

#[tokio::test]
async fn a_totp_code_accepted_on_node_a_is_refused_on_node_b() {
    let (_tmp, a, b) = two_nodes().await;
    let code = enrol_hour_totp(&a, "otp").await;
    // B sees the seed A enrolled in the shared token: it computes the
    // same code.
    let v = b.totp_code("otp").await;
    assert_eq!(v["code"], json!(code), "{v}");
    let verify = |n: &Appliance| {
        let body = json!({"ticket": n.ticket("totp_verify", "otp", json!({})), "service": "otp", "code": code});
        n.client.post(n.url("/v1/totp-verify")).json(&body).send()
    };
    let v: Value = verify(&a).await.unwrap().json().await.unwrap();
    assert_eq!(v["valid"], true, "{v}");
    let v: Value = verify(&b).await.unwrap().json().await.unwrap();
    assert_eq!(v["valid"], false, "the code A accepted, replayed on B: {v}");
}

#[tokio::test]
async fn a_rebind_on_node_a_makes_the_old_secret_fail_on_node_b() {
    let (_tmp, mut a, mut b) = two_nodes().await;
    let old = a.secret.clone().unwrap();
    let (s, _) = b
        .signed("/v1/health", json!({"requestId": new_rid()}))
        .await;
    assert_eq!(s, 200, "B takes the secret A was bound with");
    a.bind().await;
    assert_ne!(a.secret.as_ref().unwrap(), &old);
    // B notices the new key (its check runs each second).
    b.wait_log("the active HMAC key changed in the store").await;
    let (s, v) = b
        .signed("/v1/health", json!({"requestId": new_rid()}))
        .await;
    assert_refused(s, &v, 401, "auth_failed");
    b.secret = a.secret.clone();
    let (s, _) = b
        .signed("/v1/health", json!({"requestId": new_rid()}))
        .await;
    assert_eq!(s, 200, "B takes the new secret");
    let (s, _) = a
        .signed("/v1/health", json!({"requestId": new_rid()}))
        .await;
    assert_eq!(s, 200, "and so does A");
}

/// Acknowledged stores: service → the value its 200 answer acknowledged.
type Acked = Arc<Mutex<BTreeMap<String, String>>>;

/// `clients` tasks storing distinct services through `nodes` in turn,
/// each at most `per_client` times or until `stop`; every status seen is
/// counted.
fn writers(
    nodes: Vec<(String, reqwest::Client, Vec<u8>)>,
    clients: usize,
    per_client: usize,
    stop: Arc<AtomicBool>,
    acked: Acked,
    statuses: Arc<Mutex<BTreeMap<u16, usize>>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..clients)
        .map(|c| {
            let (nodes, stop, acked, statuses) =
                (nodes.clone(), stop.clone(), acked.clone(), statuses.clone());
            tokio::spawn(async move {
                for i in 0..per_client {
                    if stop.load(Ordering::Acquire) {
                        return;
                    }
                    let (base, client, secret) = &nodes[(c + i) % nodes.len()];
                    let svc = format!("svc-{c}-{i}");
                    let val = format!("value-{c}-{i}");
                    let body = json!({
                        "ticket": make_ticket(secret, "store", &svc, json!({})),
                        "service": svc, "tokenData": {"accessToken": val}
                    });
                    let r = client
                        .post(format!("{base}/v1/store"))
                        .json(&body)
                        .send()
                        .await;
                    let s = match r {
                        Ok(r) => r.status().as_u16(),
                        // The node was killed under the request.
                        Err(_) => 0,
                    };
                    *statuses.lock().unwrap().entry(s).or_default() += 1;
                    if s == 200 {
                        acked.lock().unwrap().insert(svc, val);
                    }
                }
            })
        })
        .collect()
}

/// Every acknowledged store reads back, exactly, from `n`.
async fn all_readable(n: &Appliance, acked: &BTreeMap<String, String>) {
    let mut wrong = Vec::new();
    for (svc, val) in acked {
        let (s, v) = n.credential(svc, "").await;
        if s != 200 || v["token"]["accessToken"] != json!(val) {
            wrong.push((svc.clone(), s));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} acknowledged stores lost: {wrong:?}",
        wrong.len(),
        acked.len()
    );
}

fn node(n: &Appliance) -> (String, reqwest::Client, Vec<u8>) {
    (n.base.clone(), n.client.clone(), n.secret.clone().unwrap())
}

const NO_LIMITS: &str = "[direct_access]\nrate_limit_per_minute = 0\n";

/// Lifts the per-address store limit on a node's config (the writers all
/// come from 127.0.0.1).
fn unlimited(dir: &std::path::Path) {
    let p = dir.join("config.toml");
    let mut cfg = std::fs::read_to_string(&p).unwrap();
    cfg.push('\n');
    cfg.push_str(NO_LIMITS);
    std::fs::write(p, cfg).unwrap();
}

/// A and B as in [`two_nodes`], with no per-address rate limit.
async fn two_unlimited_nodes() -> (tempfile::TempDir, Appliance, Appliance) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    let mut first = Appliance::start_dev_postgres(&dir);
    first.terminate();
    unlimited(&dir);
    let mut a = Appliance::start_serve(&dir);
    a.bind().await;
    drop(first);
    let b = a.second_node(&tmp.path().join("b"));
    (tmp, a, b)
}

#[tokio::test]
async fn kill_9_of_one_node_mid_writes_loses_nothing_it_acknowledged() {
    let (_tmp, a, mut b) = two_unlimited_nodes().await;
    let acked: Acked = Arc::default();
    let statuses = Arc::new(Mutex::new(BTreeMap::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = writers(
        vec![node(&a), node(&b)],
        8,
        60,
        stop.clone(),
        acked.clone(),
        statuses.clone(),
    );
    // Kill B once both nodes have acknowledged stores (an event: a count).
    loop {
        let n = acked.lock().unwrap().len();
        if n >= 40 {
            break;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    b.kill9();
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let statuses = statuses.lock().unwrap().clone();
    assert!(
        statuses.get(&0).copied().unwrap_or(0) > 0,
        "some requests were cut by the kill: {statuses:?}"
    );
    // Everything either node acknowledged, A serves.
    all_readable(&a, &acked).await;
    eprintln!(
        "{} stores acknowledged, all readable on A: {statuses:?}",
        acked.len()
    );
}

#[tokio::test]
async fn a_database_restart_under_load_answers_503_then_recovers_and_loses_nothing() {
    let (_tmp, a, b) = two_unlimited_nodes().await;
    let pg = a.pg.clone().unwrap();
    let acked: Acked = Arc::default();
    let statuses = Arc::new(Mutex::new(BTreeMap::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = writers(
        vec![node(&a), node(&b)],
        6,
        100_000,
        stop.clone(),
        acked.clone(),
        statuses.clone(),
    );
    let wait_for = |pred: Box<dyn Fn() -> bool>| async move {
        while !pred() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    let acked2 = acked.clone();
    wait_for(Box::new(move || acked2.lock().unwrap().len() >= 20)).await;
    pg.stop();
    // Both nodes see it: health degraded, writes 503.
    for n in [&a, &b] {
        n.wait_log("database unreachable").await;
        let h = n.health().await;
        assert_eq!(h["status"], "degraded", "{h}");
    }
    let st = statuses.clone();
    wait_for(Box::new(move || st.lock().unwrap().contains_key(&503))).await;
    let (s, v) = a.store("during", json!({"accessToken": "x"})).await;
    assert_refused(s, &v, 503, "store_unavailable");
    pg.start();
    for n in [&a, &b] {
        n.wait_log("database reachable again").await;
    }
    // Stores are acknowledged again, through both nodes, without a restart.
    let before = acked.lock().unwrap().len();
    let acked2 = acked.clone();
    wait_for(Box::new(move || {
        acked2.lock().unwrap().len() >= before + 20
    }))
    .await;
    stop.store(true, Ordering::Release);
    for t in tasks {
        t.await.unwrap();
    }
    for n in [&a, &b] {
        let h = n.health().await;
        assert_eq!(h["status"], "healthy", "{h}");
    }
    let acked = acked.lock().unwrap().clone();
    all_readable(&a, &acked).await;
    all_readable(&b, &acked).await;
    let statuses = statuses.lock().unwrap().clone();
    // Nothing but acknowledged stores and 503s while it was down.
    assert!(
        statuses.keys().all(|s| *s == 200 || *s == 503),
        "{statuses:?}"
    );
    eprintln!(
        "{} stores acknowledged across the restart: {statuses:?}",
        acked.len()
    );
}

#[tokio::test]
async fn backup_on_postgres_refuses_with_a_pg_dump_recipe_that_restores() {
    let tmp = tempfile::tempdir().unwrap();
    let mut a = Appliance::start_dev_postgres(&tmp.path().join("a"));
    a.bind().await;
    a.store_ok("before", json!({"accessToken": "kept"})).await;
    let out = tmp.path().join("backup.lmdb");
    let err = a.cli_err(&["backup", "--out", out.to_str().unwrap()]);
    assert!(
        err.contains("refused with store.backend = \"postgres\""),
        "{err}"
    );
    assert!(!out.exists());
    let err_restore = a.cli_err(&["restore", "--from", a.config().to_str().unwrap()]);
    assert!(err_restore.contains("restore is refused"), "{err_restore}");
    // The recipe, run as printed: dump, change the store, restore.
    let line = |prefix: &str| {
        err.lines()
            .map(str::trim)
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} line in: {err}"))
            .to_string()
    };
    let pg = a.pg.clone().unwrap();
    let run = |cmdline: &str| {
        let o = std::process::Command::new("sh")
            .arg("-c")
            .arg(cmdline)
            .current_dir(tmp.path())
            .env(
                "PGPASSWORD",
                std::fs::read_to_string(pg.dir.join("password"))
                    .unwrap()
                    .trim(),
            )
            .env("PGSSLMODE", "verify-full")
            .env("PGSSLROOTCERT", pg.dir.join("ca.pem"))
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{cmdline}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    run(&line("pg_dump "));
    a.store_ok("after", json!({"accessToken": "dropped"})).await;
    a.terminate();
    run(&line("pg_restore "));
    let a2 = a.serve_again();
    let (s, v) = a2.credential("before", "").await;
    assert_eq!(
        (s, &v["token"]["accessToken"]),
        (200, &json!("kept")),
        "{v}"
    );
    let (s, v) = a2.credential("after", "").await;
    assert_refused(s, &v, 404, "token_not_found");
}

#[tokio::test]
async fn rotate_key_on_node_a_while_both_serve_and_one_rotation_across_nodes() {
    let (_tmp, a, b) = two_nodes().await;
    for i in 0..4 {
        a.store_ok(
            &format!("before-{i}"),
            json!({"accessToken": format!("v{i}")}),
        )
        .await;
    }
    let cfg_a = a.config().to_str().unwrap().to_string();
    let cfg_b = b.config().to_str().unwrap().to_string();
    // A slow rotation from A's box; a second one from B's box is refused
    // while it runs.
    let mut first = std::process::Command::new(BIN)
        .args([
            "--config",
            &cfg_a,
            "rotate-key",
            "--batch",
            "1",
            "--pause-ms",
            "1000",
        ])
        .env_remove("SOFTHSM2_CONF")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(first.stderr.take().unwrap()));
    let started = lines.next().unwrap().unwrap();
    assert!(
        started.contains("created AES key generation 2"),
        "{started}"
    );
    let second = cli(&["--config", &cfg_b, "rotate-key"]);
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains("key rotation running in another process"),
        "{err}"
    );
    // Both nodes serve meanwhile: B reads what A stored, and stores.
    let (s, v) = b.credential("before-0", "").await;
    assert_eq!((s, &v["token"]["accessToken"]), (200, &json!("v0")), "{v}");
    b.store_ok("during", json!({"accessToken": "mid"})).await;
    let _rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let out = first.wait_with_output().unwrap();
    assert!(out.status.success());
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (r["from"].clone(), r["to"].clone()),
        (json!(1), json!(2)),
        "{r}"
    );
    // After it: every document reads on both nodes (the old key is gone
    // from the shared token), and a store on B reads on A.
    b.store_ok("after", json!({"accessToken": "late"})).await;
    for n in [&a, &b] {
        for (svc, val) in [("before-3", "v3"), ("during", "mid"), ("after", "late")] {
            let (s, v) = n.credential(svc, "").await;
            assert_eq!(
                (s, &v["token"]["accessToken"]),
                (200, &json!(val)),
                "{svc}: {v}"
            );
        }
    }
    let st = cli_json(&["--config", &cfg_b, "rotate-key", "--status"]);
    assert_eq!(st["deviceGenerations"], json!([2]), "{st}");
}

#[tokio::test]
async fn listings_on_postgres_are_lmdbs_byte_for_byte() {
    // One clock for both appliances: their documents' times are equal.
    let at = now().to_string();
    let tmp = tempfile::tempdir().unwrap();
    let mut nodes = Vec::new();
    for (name, pg) in [("lmdb", false), ("pg", true)] {
        let dir = tmp.path().join(name);
        let mut first = if pg {
            Appliance::start_dev_postgres(&dir)
        } else {
            Appliance::start_dev_lmdb(&dir)
        };
        first.terminate();
        let mut n = Appliance::start_serve_env(&dir, &[("TVW_TEST_FROZEN_CLOCK", &at)]);
        n.pg = first.pg.clone();
        n.bind().await;
        nodes.push(n);
    }
    // The same writes on both: tokens of several types and keys whose
    // bytes sort differently from their characters, configs, audit.
    let keys = ["b", "a", "A", "a-1", "a.1", "é", "z", "0", "svc/x", "~"];
    for n in &nodes {
        for (i, k) in keys.iter().enumerate() {
            let data = match i % 3 {
                0 => json!({"accessToken": format!("t{i}"), "tokenType": "Bearer"}),
                1 => json!({"totpSecret": "JBSWY3DPEHPK3PXP"}),
                _ => json!({"apiKey": format!("k{i}"), "team": "x"}),
            };
            n.store_ok(k, data).await;
            n.storage(json!({"operation":"set","collection":"proxy_configs","key":k,"data":{"upstream":"https://api.example.com"}}))
                .await;
        }
        n.storage(json!({"operation":"delete","collection":"tokens","key":"z"}))
            .await;
        for (k, e) in [
            ("2026-02-15T10:30:00Z", "SECRET_ACCESS"),
            ("2026-02-15T10:31:00Z", "TOKEN_STORED"),
        ] {
            n.storage(json!({"operation":"set","collection":"audit","key":k,"data":{"event_type":e,"source":"agent"}}))
                .await;
        }
    }
    // Every listing, page by page with cursors, filtered, reversed: the
    // same bytes from both stores.
    let asks = [
        json!({"operation":"list","collection":"tokens"}),
        json!({"operation":"list","collection":"tokens","options":{"limit":3}}),
        json!({"operation":"list","collection":"proxy_configs","options":{"limit":4}}),
        json!({"operation":"list","collection":"tokens","options":{"limit":2,"filters":{"hasTotpSecret":true}}}),
        json!({"operation":"list","collection":"tokens","options":{"filters":{"tokenType":"Bearer"}}}),
        json!({"operation":"list","collection":"audit","options":{"limit":1}}),
        json!({"operation":"list_batch","collections":["tokens","proxy_configs","audit"]}),
        json!({"operation":"get","collection":"tokens","key":"é"}),
        json!({"operation":"get","collection":"tokens","key":"z"}),
    ];
    for ask in asks {
        let mut answers = Vec::new();
        for n in &nodes {
            let mut pages = Vec::new();
            let mut body = ask.clone();
            loop {
                let mut v = n.storage(body.clone()).await;
                // Each request's own id is echoed: not the store's answer.
                v.as_object_mut().unwrap().remove("requestId");
                pages.push(serde_json::to_string(&v).unwrap());
                match v["pagination"]["nextCursor"].as_str() {
                    Some(c) if pages.len() < 20 => {
                        body["options"]["after"] = json!(c);
                    }
                    _ => break,
                }
            }
            answers.push(pages);
        }
        assert!(!answers[0].is_empty());
        for (l, p) in answers[0].iter().zip(&answers[1]) {
            let at = l.bytes().zip(p.bytes()).position(|(x, y)| x != y);
            assert!(
                l == p,
                "{ask}: LMDB and PostgreSQL differ at byte {at:?}: …{}… vs …{}…",
                &l[at.unwrap_or(0).saturating_sub(60)..(at.unwrap_or(0) + 60).min(l.len())],
                &p[at.unwrap_or(0).saturating_sub(60)..(at.unwrap_or(0) + 60).min(p.len())]
            );
        }
        assert_eq!(answers[0].len(), answers[1].len(), "{ask}: pages");
    }
}

#[tokio::test]
async fn a_node_refuses_a_schema_newer_than_it_knows_and_init_makes_a_missing_one() {
    let tmp = tempfile::tempdir().unwrap();
    let mut a = Appliance::start_dev_postgres(&tmp.path().join("a"));
    a.terminate();
    let pg = a.pg.clone().unwrap();
    assert_eq!(pg.sql("SELECT version FROM tvw_schema"), "1");
    // A newer node migrated the database: this one refuses to serve.
    pg.sql("UPDATE tvw_schema SET version = 99");
    let err = a.cli_err(&["serve"]);
    assert!(
        err.contains("schema is version 99, newer than this build knows (1)"),
        "{err}"
    );
    let err = a.cli_err(&["configtest"]);
    assert!(err.contains("newer than this build"), "{err}");
    // No schema at all: serve says to run init, and init makes it.
    pg.sql("DROP TABLE tvw_kv, tvw_sizes, tvw_schema");
    let err = a.cli_err(&["serve"]);
    assert!(err.contains("run `tokenvault-webhook init`"), "{err}");
    let out = a.cli_ok(&["init"]);
    assert!(out.contains("store postgres"), "{out}");
    assert_eq!(pg.sql("SELECT version FROM tvw_schema"), "1");
}
