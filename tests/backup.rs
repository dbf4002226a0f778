#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! `backup` under load and `restore`, on the real binary and key device.

mod harness;

use harness::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

async fn all_tokens(a: &Appliance) -> BTreeMap<String, ()> {
    let mut out = BTreeMap::new();
    let mut after: Option<String> = None;
    loop {
        let mut opts = json!({"limit": 200});
        if let Some(c) = &after {
            opts["after"] = json!(c);
        }
        let v = a
            .storage(json!({"operation": "list", "collection": "tokens", "options": opts}))
            .await;
        for i in v["items"].as_array().unwrap() {
            out.insert(i["key"].as_str().unwrap().to_string(), ());
        }
        match v["pagination"]["nextCursor"].as_str() {
            Some(c) if v["pagination"]["hasMore"] == true => after = Some(c.to_string()),
            _ => return out,
        }
    }
}

/// `restore --from FILE [--force]` on a config.
fn restore(cfg: &str, from: &std::path::Path, force: bool) -> std::process::Output {
    let from = from.to_str().unwrap();
    let mut args = vec!["--config", cfg, "restore", "--from", from];
    if force {
        args.push("--force");
    }
    cli(&args)
}

#[tokio::test]
async fn a_backup_under_load_restores_every_acknowledged_credential() {
    let (tmp, mut a) = Appliance::start_new();
    a.bind().await;
    let cfg = a.config();
    let cfg_s = cfg.to_str().unwrap().to_string();
    let out = tmp.path().join("store.backup");

    // Stores from 32 concurrent clients while the backup runs.
    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::new(Mutex::new(Vec::new()));
    let acked_before = Arc::new(Mutex::new(0usize));
    let done = Arc::new(AtomicBool::new(false));
    let backup = {
        let (acked, acked_before, done, out, cfg_s) = (
            acked.clone(),
            acked_before.clone(),
            done.clone(),
            out.clone(),
            cfg_s.clone(),
        );
        tokio::task::spawn_blocking(move || {
            // Let the load build up, then take the backup.
            while acked.lock().unwrap().len() < 200 {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            *acked_before.lock().unwrap() = acked.lock().unwrap().len();
            let v = cli_json(&["--config", &cfg_s, "backup", "--out", out.to_str().unwrap()]);
            done.store(true, Ordering::SeqCst);
            v
        })
    };
    let a_ref = &a;
    let mut round = 0;
    while !done.load(Ordering::SeqCst) {
        let batch = futures::future::join_all((0..32).map(|i| {
            let svc = format!("svc-{round}-{i}");
            let value = format!("value-{round}-{i}-{}", new_rid());
            async move {
                let (s, v) = a_ref
                    .store(&svc, json!({"accessToken": value.clone()}))
                    .await;
                assert_eq!(s, 200, "{v}");
                (svc, value)
            }
        }))
        .await;
        acked.lock().unwrap().extend(batch);
        round += 1;
    }
    let report = backup.await.unwrap();
    assert!(report["bytes"].as_u64().unwrap() > 0, "{report}");
    let before = *acked_before.lock().unwrap();
    let acked = acked.lock().unwrap().clone();
    eprintln!(
        "backup under load: {} stores acknowledged before it started, {} in all, {report}",
        before,
        acked.len()
    );
    let mode = std::fs::metadata(&out).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o077,
        0
    );
    let raw = std::fs::read(&out).unwrap();
    for (_, value) in &acked {
        assert!(
            !raw.windows(value.len()).any(|w| w == value.as_bytes()),
            "a plaintext credential is in the backup"
        );
    }
    let listed_at_end = all_tokens(&a).await;

    // While the service runs, restore refuses (the store is in use).
    let o = restore(&cfg_s, &out, true);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("in use"), "{err}");
    a.terminate();
    // `dev` ran its own swtpm (TPM backend): the commands need one now.
    let tpm = start_swtpm_for(&a.dir);
    // An existing store is replaced only with --force.
    let o = restore(&cfg_s, &out, false);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--force"), "{err}");
    let o = restore(&cfg_s, &out, true);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["bound"], true, "{r}");
    assert!(r["previous"].is_string(), "{r}");
    let tokens = r["tokens"].as_u64().unwrap() as usize;
    assert!(tokens >= before, "{r}");
    assert!(
        r["fieldsVerified"].as_u64().unwrap() >= tokens as u64,
        "{r}"
    );

    drop(tpm);
    let secret = a.secret.clone();
    let mut b = Appliance::start_serve(&a.dir);
    b.secret = secret;
    // The restored store is the snapshot: everything acknowledged before the
    // backup began, each with its value, nothing that was never stored.
    let listed = all_tokens(&b).await;
    assert_eq!(listed.len(), tokens);
    assert!(listed.keys().all(|k| listed_at_end.contains_key(k)));
    let values: BTreeMap<_, _> = acked.iter().cloned().collect();
    for (svc, value) in &acked[..before] {
        assert!(listed.contains_key(svc), "{svc} lost");
        let (s, v) = b.credential(svc, "").await;
        assert_eq!(s, 200, "{svc}: {v}");
        assert_eq!(v["token"]["accessToken"], json!(value));
    }
    for svc in listed.keys() {
        let (s, v) = b.credential(svc, "").await;
        assert_eq!(s, 200, "{svc}: {v}");
        assert_eq!(v["token"]["accessToken"], json!(values[svc]));
    }
}

#[tokio::test]
async fn restore_refuses_a_backup_sealed_under_other_keys_and_keeps_the_store() {
    let (tmp, mut a) = Appliance::start_new();
    a.bind().await;
    let (s, _) = a.store("github", json!({"accessToken": "gho_mine"})).await;
    assert_eq!(s, 200);
    // Another appliance: its own HSM token (or TPM) and its own keys.
    let other = tmp.path().join("other");
    let mut o = Appliance::start_dev(&other);
    o.bind().await;
    let (s, _) = o.store("github", json!({"accessToken": "gho_other"})).await;
    assert_eq!(s, 200);
    let out = tmp.path().join("other.backup");
    let oc = o.config();
    cli_json(&[
        "--config",
        oc.to_str().unwrap(),
        "backup",
        "--out",
        out.to_str().unwrap(),
    ]);
    o.terminate();

    a.terminate();
    let tpm = start_swtpm_for(&a.dir);
    let cfg = a.config();
    let o = restore(cfg.to_str().unwrap(), &out, true);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("does not decrypt"), "{err}");
    drop(tpm);
    let secret = a.secret.clone();
    let mut b = Appliance::start_serve(&a.dir);
    b.secret = secret;
    let (s, v) = b.credential("github", "").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["token"]["accessToken"], "gho_mine");
    // And the appliance is whole: healthy, holding exactly its one token.
    let h = b.health().await;
    assert_eq!(
        (h["status"].as_str(), h["tokenCount"].as_u64()),
        (Some("healthy"), Some(1)),
        "{h}"
    );
}

/// Backup and restore carry what is sealed besides the documents: a TOTP
/// seed (its device object on SoftHSM2, a sealed field on the TPM), an
/// OAuth client's secret and an outstanding bind code. Each is checked to
/// open before the restore replaces anything, and each works afterwards.
#[tokio::test]
async fn totp_seeds_oauth_clients_and_bind_codes_survive_backup_and_restore() {
    let (tmp, mut a) = Appliance::start_new();
    a.bind().await;
    let (s, v) = a
        .store("otp", json!({"totpSecret": "JBSWY3DPEHPK3PXP"}))
        .await;
    assert_eq!(s, 200, "{v}");
    let cfg = a.config();
    let cfg = cfg.to_str().unwrap();
    a.add_oauth_client("prov", "https://oauth.example/token", &[]);
    let reg = cli_json(&["--config", cfg, "register-url"]);
    a.terminate();
    let _tpm = start_swtpm_for(&a.dir);
    let backup = tmp.path().join("all.backup");
    let v = cli_json(&["--config", cfg, "backup", "--out", backup.to_str().unwrap()]);
    assert_eq!(v["tokens"], 1, "{v}");
    // After the backup: the client removed, another token stored.
    let out = cli(&["--config", cfg, "oauth-client", "remove", "prov"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(_tpm);
    let mut b = a.serve_again();
    let (s, _) = b
        .store("later", json!({"accessToken": "after-the-backup"}))
        .await;
    assert_eq!(s, 200);
    b.terminate();
    let _tpm = start_swtpm_for(&a.dir);
    let o = restore(cfg, &backup, true);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (
            r["tokens"].as_u64(),
            r["oauthClientsVerified"].as_u64(),
            r["bindCodesVerified"].as_u64(),
            r["bound"].as_bool()
        ),
        (Some(1), Some(1), Some(2), Some(true)),
        "the bind code used by the first bind and the outstanding one: {r}"
    );
    if !tpm() {
        assert_eq!(r["totpKeysVerified"], 1, "{r}");
    }
    let list = cli(&["--config", cfg, "oauth-client", "list"]);
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(list.contains("prov"), "{list}");
    assert!(!list.contains("client-secret-xyz"), "{list}");
    drop(_tpm);
    let mut c = a.serve_again();
    assert_eq!(
        c.credential("later", "").await.0,
        404,
        "the restore replaced the store"
    );
    let v = c.totp_code("otp").await;
    assert!(v["code"].as_str().is_some_and(|s| s.len() == 6), "{v}");
    // The outstanding bind code from before the backup still exchanges,
    // and its secret is the one the appliance then checks.
    let (s, v) = c.exchange(&reg["code"]).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = c
        .signed("/v1/health", json!({"requestId": new_rid()}))
        .await;
    assert_eq!((s, v["status"].as_str()), (200, Some("healthy")), "{v}");
}
