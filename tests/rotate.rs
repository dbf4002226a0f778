#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! `rotate-key` on the real binary and key device (SoftHSM2, or swtpm with
//! TVW_TEST_BACKEND=tpm), against a running service: reads and writes go on
//! during the rotation, a SIGKILL mid-way resumes, the old key is destroyed.

mod harness;

use harness::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokenvault_webhook::custody::totp::{base32_decode, code_software, Params};
use tokenvault_webhook::keys::OtpAlg;

const SEED: &str = "JBSWY3DPEHPK3PXP";

fn status(cfg: &str) -> Value {
    cli_json(&["--config", cfg, "rotate-key", "--status"])
}

async fn check_totp(a: &Appliance) {
    let t0 = now();
    let (s, v) = a.credential("mfa", "").await;
    let t1 = now();
    assert_eq!(s, 200, "{v}\n{}", a.log_text());
    let seed = base32_decode(SEED).unwrap();
    let p = || Params {
        alg: OtpAlg::Sha1,
        digits: 6,
        period: 30,
    };
    let code = v["token"]["accessToken"].as_str().unwrap().to_string();
    assert!(
        [t0, t1]
            .iter()
            .any(|t| code_software(&seed, &p(), *t as u64).as_str() == code),
        "TOTP code after rotation does not match the seed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_key_under_traffic_resumes_after_a_kill_and_destroys_the_old_key() {
    let (_tmp, mut a) = Appliance::start_new();
    a.bind().await;
    let cfg = a.config();
    let cfg_s = cfg.to_str().unwrap().to_string();
    let before = status(&cfg_s);
    assert_eq!(before["active"], 1, "{before}");
    assert_eq!(before["deviceGenerations"], json!([1]), "{before}");

    let mut values: BTreeMap<String, String> = BTreeMap::new();
    for i in 0..80 {
        let (svc, value) = (format!("svc-{i:03}"), format!("value-{i}-{}", new_rid()));
        let (s, v) = a.store(&svc, json!({"accessToken": value})).await;
        assert_eq!(s, 200, "{v}");
        values.insert(svc, value);
    }
    let (s, v) = a.store("mfa", json!({"totpSecret": SEED})).await;
    assert_eq!(s, 200, "{v}");

    // Traffic during the rotation: reads of every stored credential, and
    // new stores. Every answer is recorded.
    let stop = Arc::new(AtomicBool::new(false));
    let stored_during: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    let reads = Arc::new(Mutex::new(0u64));
    let a = Arc::new(a);
    let traffic = {
        let (a, stop, stored_during, failures, reads, values) = (
            a.clone(),
            stop.clone(),
            stored_during.clone(),
            failures.clone(),
            reads.clone(),
            values.clone(),
        );
        tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.load(Ordering::SeqCst) {
                for (svc, value) in values.iter().skip(n % 7).step_by(7) {
                    let (s, v) = a.credential(svc, "").await;
                    if s != 200 || v["token"]["accessToken"] != json!(value) {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("read {svc}: {s} {v}"));
                    }
                    *reads.lock().unwrap() += 1;
                }
                let (svc, value) = (format!("new-{n:04}"), format!("new-value-{n}"));
                let (s, v) = a.store(&svc, json!({"accessToken": value})).await;
                match s {
                    200 => stored_during.lock().unwrap().push((svc, value)),
                    // The one refusal the rotation may cause: a write sealed
                    // under the old key that commits after the close.
                    503 if v["error"] == "key_rotating" => {}
                    _ => failures
                        .lock()
                        .unwrap()
                        .push(format!("store {svc}: {s} {v}")),
                }
                n += 1;
            }
        })
    };

    // Small batches with a pause, so the kill lands mid-way.
    let mut child = Command::new(env!("CARGO_BIN_EXE_tokenvault-webhook"))
        .args([
            "--config",
            &cfg_s,
            "rotate-key",
            "--batch",
            "4",
            "--pause-ms",
            "50",
        ])
        .env_remove("SOFTHSM2_CONF")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let mut batches = 0;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line.contains("pass 1:") {
            batches += 1;
        }
        seen.push(line);
        if batches == 3 {
            break;
        }
    }
    assert_eq!(batches, 3, "progress lines: {seen:?}");
    assert!(
        seen.iter()
            .any(|l| l.contains("created AES key generation 2")),
        "{seen:?}"
    );
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    // Mid-way: both generations in the device, documents under both.
    let mid = status(&cfg_s);
    assert_eq!(mid["rotating"], true, "{mid}");
    assert_eq!(
        (mid["active"].clone(), mid["previous"].clone()),
        (json!(2), json!(1)),
        "{mid}"
    );
    assert_eq!(mid["deviceGenerations"], json!([1, 2]), "{mid}");
    let by_gen = mid["documentsByGeneration"].as_object().unwrap();
    assert!(by_gen["1"].as_u64().unwrap() > 0, "{mid}");
    assert!(by_gen["2"].as_u64().unwrap() >= 12, "{mid}");
    check_totp(&a).await;
    let doctor = cli(&["--config", &cfg_s, "doctor"]);
    let text = String::from_utf8_lossy(&doctor.stdout);
    assert!(
        text.contains("a key rotation from generation 1 to 2 has not finished"),
        "{text}"
    );

    // Re-running resumes and finishes.
    let out = Command::new(env!("CARGO_BIN_EXE_tokenvault-webhook"))
        .args(["--config", &cfg_s, "rotate-key"])
        .env_remove("SOFTHSM2_CONF")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("resuming the rotation from generation 1 to 2"),
        "{err}"
    );
    assert!(err.contains("generation 1 destroyed"), "{err}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["resumed"], true, "{report}");
    assert_eq!(
        (report["from"].clone(), report["to"].clone()),
        (json!(1), json!(2))
    );

    stop.store(true, Ordering::SeqCst);
    traffic.await.unwrap();
    let failures = failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "{failures:?}\n{}", a.log_text());
    let reads = *reads.lock().unwrap();
    let stored_during = stored_during.lock().unwrap().clone();
    eprintln!(
        "during the rotation: {reads} credential reads, {} stores, all answered correctly",
        stored_during.len()
    );
    assert!(reads > 0 && !stored_during.is_empty());

    let after = status(&cfg_s);
    assert_eq!(after["rotating"], false, "{after}");
    assert_eq!(after["active"], 2, "{after}");
    assert_eq!(after["retired"], json!([1]), "{after}");
    assert_eq!(after["deviceGenerations"], json!([2]), "{after}");
    let by_gen = after["documentsByGeneration"].as_object().unwrap();
    assert_eq!(by_gen.len(), 1, "{after}");
    assert_eq!(
        by_gen["2"].as_u64().unwrap() as usize,
        values.len() + 1 + stored_during.len(),
        "{after}"
    );
    for (svc, value) in values
        .iter()
        .chain(stored_during.iter().map(|(s, v)| (s, v)))
    {
        let (s, v) = a.credential(svc, "").await;
        assert_eq!(s, 200, "{svc}: {v}");
        assert_eq!(v["token"]["accessToken"], json!(value), "{svc}");
    }
    check_totp(&a).await;
    let doctor = cli(&["--config", &cfg_s, "doctor"]);
    let text = String::from_utf8_lossy(&doctor.stdout);
    assert!(doctor.status.success(), "{text}");
    assert!(text.contains("AES key generation 2 active"), "{text}");

    // A restart with only generation 2 in the device serves everything.
    let mut a = Arc::try_unwrap(a).ok().unwrap();
    a.terminate();
    let secret = a.secret.clone();
    let mut b = Appliance::start_serve(&a.dir);
    b.secret = secret;
    for (svc, value) in values.iter().step_by(9) {
        let (s, v) = b.credential(svc, "").await;
        assert_eq!(s, 200, "{svc}: {v}");
        assert_eq!(v["token"]["accessToken"], json!(value), "{svc}");
    }
    check_totp(&b).await;
    let (s, v) = b
        .store("after", json!({"accessToken": "after-value"}))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        b.credential("after", "").await.1["token"]["accessToken"],
        "after-value"
    );
}

#[tokio::test]
async fn rotate_key_twice_and_one_rotation_at_a_time() {
    let (_tmp, mut a) = Appliance::start_new();
    a.bind().await;
    let (s, _) = a
        .store("github", json!({"accessToken": "gho_rotated"}))
        .await;
    assert_eq!(s, 200);
    let cfg = a.config();
    let cfg_s = cfg.to_str().unwrap();
    let old_backup = a.dir.join("before-rotation.lmdb");
    // LMDB's own backups (PostgreSQL is backed up with pg_dump; see
    // multinode.rs).
    let lmdb = a.pg.is_none();
    if lmdb {
        cli_json(&[
            "--config",
            cfg_s,
            "backup",
            "--out",
            old_backup.to_str().unwrap(),
        ]);
    }
    // A second rotate-key while one runs is refused, and changes nothing.
    let mut first = Command::new(env!("CARGO_BIN_EXE_tokenvault-webhook"))
        .args([
            "--config",
            cfg_s,
            "rotate-key",
            "--batch",
            "1",
            "--pause-ms",
            "2000",
        ])
        .env_remove("SOFTHSM2_CONF")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(first.stderr.take().unwrap()).lines();
    let started = lines.next().unwrap().unwrap();
    assert!(
        started.contains("created AES key generation 2"),
        "{started}"
    );
    let second = cli(&["--config", cfg_s, "rotate-key"]);
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains("key rotation running in another process"),
        "{err}"
    );
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let out = first.wait_with_output().unwrap();
    assert!(out.status.success(), "{rest:?}");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (r["from"].clone(), r["to"].clone(), r["resumed"].clone()),
        (json!(1), json!(2), json!(false)),
        "{r}"
    );

    let r = cli_json(&["--config", cfg_s, "rotate-key"]);
    assert_eq!(
        (r["from"].clone(), r["to"].clone(), r["documents"].clone()),
        (json!(2), json!(3), json!(1)),
        "{r}"
    );
    let st = status(cfg_s);
    assert_eq!(st["deviceGenerations"], json!([3]), "{st}");
    assert_eq!(st["retired"], json!([1, 2]), "{st}");
    let (s, v) = a.credential("github", "").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["token"]["accessToken"], "gho_rotated");

    if !lmdb {
        return;
    }
    // A backup from before the rotation needs the destroyed key: refused,
    // and the store is kept.
    a.terminate();
    let tpm = start_swtpm_for(&a.dir);
    let o = cli(&[
        "--config",
        cfg_s,
        "restore",
        "--from",
        old_backup.to_str().unwrap(),
        "--force",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("key generation is not in the key backend"),
        "{err}"
    );
    drop(tpm);
    let secret = a.secret.clone();
    let mut b = Appliance::start_serve(&a.dir);
    b.secret = secret;
    assert_eq!(
        b.credential("github", "").await.1["token"]["accessToken"],
        "gho_rotated"
    );
}
