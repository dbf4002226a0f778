#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The TPM 2.0 backend through the real binary: `dev --backend tpm` runs its
//! own swtpm (state in DIR); keys are sealed to it and unsealed into locked
//! memory. The rest of the integration suite also runs on this backend
//! (TVW_TEST_BACKEND=tpm); these tests cover what is the TPM's own.

mod harness;

use base64::Engine;
use harness::*;
use serde_json::json;
use std::time::{Duration, Instant};
use tokenvault_webhook::keys::tpm::swtpm;

fn require_swtpm() {
    assert!(
        swtpm::available(),
        "swtpm is required (apt-get install swtpm swtpm-tools); this test does not skip"
    );
}

fn blobs(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("state/tpm"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn locked_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test]
async fn tpm_dev_binds_serves_and_holds_keys_in_locked_memory() {
    require_swtpm();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    let mut a = Appliance::start_dev_backend(&dir, "tpm");
    let h = a.health().await;
    assert_eq!(
        (h["status"].as_str(), h["keyConfigured"].as_bool()),
        (Some("healthy"), Some(true))
    );
    assert_eq!(blobs(&dir), vec!["aes.json"]);
    assert!(
        !dir.join("hsm").exists(),
        "no SoftHSM token under the TPM backend"
    );

    a.bind().await;
    let secret = a.secret.clone().unwrap();
    let first = blobs(&dir);
    assert_eq!(first.len(), 2, "{first:?}");
    assert!(first[1].starts_with("hmac-"));
    // The AES key and the HMAC secret: one locked page each.
    assert!(locked_kib(a.pid()) >= 8, "VmLck {} kB", locked_kib(a.pid()));

    let (s, v) = a.store("gh", json!({"accessToken":"ghp_tpm_sealed"})).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = a.credential("gh", "").await;
    assert_eq!(
        (s, v["token"]["accessToken"].as_str()),
        (200, Some("ghp_tpm_sealed"))
    );

    // A re-bind seals the new secret and removes the old sealed one.
    a.bind().await;
    let second = blobs(&dir);
    assert_eq!(second.len(), 2, "{second:?}");
    assert_ne!(first[1], second[1]);
    let rebound = a.secret.clone().unwrap();
    assert_eq!(
        a.signed_with(&secret, "/v1/health", &json!({}), &new_rid())
            .await
            .0,
        401
    );

    // Restart: keys unseal again, data and binding intact.
    assert_eq!(a.terminate(), Some(0));
    let mut a = Appliance::start_dev(&dir);
    a.secret = Some(rebound);
    let (s, v) = a.credential("gh", "").await;
    assert_eq!(
        (s, v["token"]["accessToken"].as_str()),
        (200, Some("ghp_tpm_sealed"))
    );
    let new_secret = {
        let mut b = a;
        b.bind().await;
        let s = b.secret.clone().unwrap();
        b.terminate();
        s
    };
    // No secret in any file in DIR, the simulator's own state included.
    for needle in [
        new_secret.clone(),
        hex::encode(&new_secret).into_bytes(),
        base64::engine::general_purpose::STANDARD
            .encode(&new_secret)
            .into_bytes(),
        b"ghp_tpm_sealed".to_vec(),
    ] {
        for f in files_under(&dir, &[]) {
            let data = std::fs::read(&f).unwrap();
            assert!(
                !data.windows(needle.len()).any(|w| w == needle.as_slice()),
                "secret found in {}",
                f.display()
            );
        }
    }
    // The DIR remembers its backend.
    let out = cli(&["dev", "--dir", dir.to_str().unwrap(), "--backend", "pkcs11"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("was created with backend Tpm"));
}

#[test]
fn tpm_serve_refuses_another_tpm_by_name() {
    require_swtpm();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    let mut a = Appliance::start_dev_backend(&dir, "tpm");
    a.terminate();
    // Another TPM (fresh simulator state, so another owner seed) where the
    // configured one was.
    let cfg = std::fs::read_to_string(dir.join("config.toml")).unwrap();
    let port = cfg
        .lines()
        .find_map(|l| l.trim().strip_prefix("tcti = \""))
        .and_then(|t| swtpm::port_of(t.trim_end_matches('"')))
        .unwrap();
    let _other = swtpm::start(&tmp.path().join("other-tpm"), port).unwrap();
    let mut child = std::process::Command::new(BIN)
        .args([
            "--config",
            dir.join("config.toml").to_str().unwrap(),
            "serve",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A bound on a refusal, not a performance assertion.
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("serve kept running on another TPM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("made by a different TPM"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // And with no TPM at all the error names the TCTI.
    drop(_other);
    let out = cli(&[
        "--config",
        dir.join("config.toml").to_str().unwrap(),
        "serve",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot reach the TPM via \"swtpm:host=127.0.0.1"),
        "{err}"
    );
}
