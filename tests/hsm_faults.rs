#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! HSM faults under a running server (real binary, real SoftHSM2): the
//! token pulled out, and its PIN changed. The module the appliance loads is
//! `hsm-fixtures/pkcs11-unplug.c`, a switch in front of SoftHSM2 that
//! forwards every call and, while a flag file exists, acts like a removed
//! token (SoftHSM2's sessions closed, the token gone from the slot list, new
//! sessions and operations refused). SoftHSM2 alone keeps serving from its
//! in-memory session objects whatever happens to its files, so it cannot be
//! "pulled" otherwise. Every key operation still runs in SoftHSM2.

mod harness;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use harness::*;
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

const SOFTHSM: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// Builds the switch module into `dir`. Fails (never skips) without a C
/// compiler: the Rust toolchain needs one to link anyway.
fn build_unplug_module(dir: &Path) -> PathBuf {
    let out = dir.join("pkcs11-unplug.so");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("hsm-fixtures/pkcs11-unplug.c");
    let st = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o"])
        .arg(&out)
        .arg(&src)
        .args(["-ldl", "-lpthread"])
        .status()
        .expect("cc (a C compiler) is needed to build hsm-fixtures/pkcs11-unplug.c");
    assert!(st.success(), "building {} failed", src.display());
    out
}

fn assert_unavailable(status: u16, body: &Value, what: &str) {
    assert_eq!(status, 503, "{what}: {body}");
    assert_eq!(body["error"], "hsm_unavailable", "{what}: {body}");
    assert!(body["message"].is_string(), "{what}: {body}");
}

/// Changes the user PIN in SoftHSM2 directly (the operator's tool), from
/// this process: its own SoftHSM2 instance on the appliance's token dir.
fn change_pin(dir: &Path, old: &str, new: &str) {
    std::env::set_var("SOFTHSM2_CONF", dir.join("hsm/softhsm2.conf"));
    let ctx = Pkcs11::new(SOFTHSM).unwrap();
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot = ctx.get_slots_with_initialized_token().unwrap()[0];
    let s = ctx.open_rw_session(slot).unwrap();
    s.login(UserType::User, Some(&AuthPin::from(old.to_string())))
        .unwrap();
    s.set_pin(
        &AuthPin::from(old.to_string()),
        &AuthPin::from(new.to_string()),
    )
    .unwrap();
    drop(s);
    ctx.finalize().unwrap();
}

#[tokio::test]
async fn pulled_token_and_changed_pin_answer_503_degraded_and_recover_without_restart() {
    require_softhsm();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("appliance");
    let mut a = Appliance::start_dev_backend(&dir, "pkcs11");
    a.terminate();
    let module = build_unplug_module(tmp.path());
    let flag = tmp.path().join("unplugged");
    // The server inherits this; the module checks the flag on every call.
    std::env::set_var("TVW_UNPLUG_FLAG", &flag);
    let cfg = std::fs::read_to_string(dir.join("config.toml")).unwrap();
    assert!(cfg.contains("[keys.pkcs11]\n"), "{cfg}");
    let cfg = cfg.replace(
        "[keys.pkcs11]\n",
        &format!("[keys.pkcs11]\nmodule = \"{}\"\n", module.display()),
    );
    std::fs::write(dir.join("config.toml"), cfg).unwrap();

    let mut a = Appliance::start_serve(&dir);
    a.bind().await;
    let (s, v) = a
        .store("github", json!({"accessToken": "gho_before"}))
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = a.credential("github", "").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(a.health().await["status"], "healthy");

    // 1. The token is pulled out.
    std::fs::write(&flag, b"").unwrap();
    let (s, v) = a.credential("github", "").await;
    assert_unavailable(s, &v, "credential, token pulled");
    let (s, v) = a
        .store("gitlab", json!({"accessToken": "glpat_during"}))
        .await;
    assert_unavailable(s, &v, "store, token pulled");
    let (s, v) = a
        .signed(
            "/v1/storage",
            json!({"operation": "get", "collection": "tokens", "key": "github"}),
        )
        .await;
    assert_unavailable(s, &v, "signed storage get, token pulled");
    let h = a.health().await;
    assert_eq!(h["status"], "degraded", "{h}");

    // 2. It is back: same process, nothing lost, the refused store absent.
    std::fs::remove_file(&flag).unwrap();
    let (s, v) = a.credential("github", "").await;
    assert_eq!(s, 200, "credential after the token came back: {v}");
    assert_eq!(v["token"]["accessToken"], "gho_before");
    let (s, v) = a.credential("gitlab", "").await;
    assert_eq!(s, 404, "a store answered 503 must not exist: {v}");
    assert_eq!(a.health().await["status"], "healthy");

    // 3. The PIN is changed on the HSM while the token is out (a real
    //    removal drops the login, so the next session must log in again).
    let pin_file = dir.join("hsm/user-pin");
    let old_pin = std::fs::read_to_string(&pin_file).unwrap();
    let old_pin = old_pin.trim_end();
    let new_pin = "changed-pin-4711";
    std::fs::write(&flag, b"").unwrap();
    let (s, v) = a.credential("github", "").await;
    assert_unavailable(s, &v, "credential, token pulled again");
    change_pin(&dir, old_pin, new_pin);
    std::fs::remove_file(&flag).unwrap();
    for i in 0..3 {
        let (s, v) = a.credential("github", "").await;
        assert_unavailable(s, &v, &format!("credential {i} with a refused PIN"));
        assert_eq!(a.health().await["status"], "degraded");
    }
    let log = a.log_text();
    assert!(log.contains("the token refused the PIN"), "{log}");
    // The refused PIN is presented once, not on every request (a token
    // locks its PIN after a few failures).
    assert_eq!(
        log.matches("the token refused the PIN").count(),
        1,
        "the same refused PIN was presented again:\n{log}"
    );

    // 4. The operator puts the new PIN where the appliance reads it: it is
    //    used at once, without a restart.
    std::fs::write(&pin_file, new_pin).unwrap();
    std::fs::set_permissions(&pin_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (s, v) = a.credential("github", "").await;
    assert_eq!(s, 200, "credential with the new PIN: {v}");
    assert_eq!(v["token"]["accessToken"], "gho_before");
    let (s, v) = a
        .store("gitlab", json!({"accessToken": "glpat_after"}))
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = a.credential("gitlab", "").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["token"]["accessToken"], "glpat_after");
    assert_eq!(a.health().await["status"], "healthy");

    let log = a.log_text();
    for secret in [old_pin, new_pin, "gho_before", "glpat_after"] {
        assert!(!log.contains(secret), "{secret} in the log");
    }
    assert!(!log.contains("panicked"), "{log}");
    assert!(a.terminate().is_some(), "the server did not survive");
}
