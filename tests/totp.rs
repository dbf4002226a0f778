#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! TOTP over real HTTPS on SoftHSM2: seeds become non-extractable HSM keys,
//! codes come out, seeds never do.

mod harness;

use harness::*;
use serde_json::{json, Value};
use tokenvault_webhook::custody::totp::{base32_decode, base32_encode, code_software, Params};
use tokenvault_webhook::keys::OtpAlg;

fn codes_around(seed: &[u8], p: Params, t0: i64, t1: i64) -> Vec<String> {
    [t0, t1]
        .iter()
        .map(|t| code_software(seed, &p, *t as u64).to_string())
        .collect()
}

/// Counts TOTP key objects in the appliance's SoftHSM token (server stopped).
fn count_otp_objects(dir: &std::path::Path) -> usize {
    use cryptoki::object::{Attribute, ObjectClass};
    // SAFETY: set before the module loads; this is the only SoftHSM user in this process.
    unsafe { std::env::set_var("SOFTHSM2_CONF", dir.join("hsm/softhsm2.conf")) };
    let ctx = tokenvault_webhook::keys::pkcs11::open_module(
        &tokenvault_webhook::keys::pkcs11::find_softhsm_module().unwrap(),
    )
    .unwrap();
    let slot = tokenvault_webhook::keys::pkcs11::find_token(&ctx, "tokenvault-dev")
        .unwrap()
        .unwrap();
    let s = ctx.open_ro_session(slot).unwrap();
    let pin = std::fs::read_to_string(dir.join("hsm/user-pin")).unwrap();
    s.login(
        cryptoki::session::UserType::User,
        Some(&secrecy::SecretString::from(pin.trim().to_string())),
    )
    .unwrap();
    let objs = s
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(b"tokenvault-totp".to_vec()),
        ])
        .unwrap();
    // Every one of them is sensitive and non-extractable.
    for h in &objs {
        let attrs = s
            .get_attributes(
                *h,
                &[
                    cryptoki::object::AttributeType::Sensitive,
                    cryptoki::object::AttributeType::Extractable,
                ],
            )
            .unwrap();
        assert!(
            attrs.contains(&Attribute::Sensitive(true))
                && attrs.contains(&Attribute::Extractable(false))
        );
    }
    objs.len()
}

#[tokio::test]
async fn seeds_live_in_the_hsm_and_codes_come_out() {
    let (_tmp, mut a) = Appliance::start_new();
    a.bind().await;
    let seed = base32_decode("JBSWY3DPEHPK3PXP").unwrap();
    let (s, v) = a.store("gh", json!({"totpUri":"otpauth://totp/GitHub:me?secret=jbsw-y3dp-ehpk-3pxp&issuer=GitHub&algorithm=sha512&digits=7&period=60"})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["meta"]["totpAlgorithm"], "SHA512");
    let p = Params {
        alg: OtpAlg::Sha512,
        digits: 7,
        period: 60,
    };
    // The document keeps a key reference, not the seed.
    let raw = a
        .storage(json!({"operation":"get","collection":"tokens","key":"gh"}))
        .await;
    assert_eq!(raw["data"]["meta"]["hasTotpSecret"], true);
    for _ in 0..3 {
        let t0 = now();
        let (s, v) = a.credential("gh", "").await;
        assert_eq!(s, 200);
        assert!(codes_around(&seed, p, t0, now())
            .contains(&v["token"]["accessToken"].as_str().unwrap().to_string()));
        assert_eq!(v["token"]["digits"], 7);
    }
    let tk = a.ticket("totp_code", "gh", json!({}));
    let t0 = now();
    let v = json_of(
        a.client
            .get(format!("{}?ticket={tk}&service=gh", a.url("/v1/totp-code"))),
    )
    .await;
    assert!(codes_around(&seed, p, t0, now()).contains(&v["code"].as_str().unwrap().to_string()));

    // Overwrite and delete destroy the old key objects.
    for (svc, seed) in [
        ("gh", "JBSWY3DPEHPK3PXP"),
        ("other", "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"),
        ("gone", "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"),
    ] {
        let (s, v) = a.store(svc, json!({ "totpSecret": seed })).await;
        assert_eq!(s, 200, "{svc}: {v}");
    }
    let (s, v) = a
        .signed(
            "/v1/storage",
            json!({"operation":"delete","collection":"tokens","key":"gone"}),
        )
        .await;
    assert_eq!((s, v["status"].as_str()), (200, Some("ok")), "{v}");
    assert_eq!(a.credential("gone", "").await.0, 404);
    a.terminate();
    if harness::tpm() {
        // Under the TPM backend seeds are sealed fields: no device objects.
        assert!(!a.dir.join("hsm").exists());
    } else {
        assert_eq!(
            count_otp_objects(&a.dir),
            2,
            "one object per live TOTP token"
        );
    }
}

#[tokio::test]
async fn verify_is_single_use_across_restart() {
    let (_tmp, mut a) = Appliance::start_new();
    a.bind().await;
    let secret = a.secret.clone();
    a.store_ok(
        "peer",
        json!({"totpSecret":"JBSWY3DPEHPK3PXP","totpPeriod":3600}),
    )
    .await;
    let seed = base32_decode("JBSWY3DPEHPK3PXP").unwrap();
    let code = code_software(
        &seed,
        &Params {
            period: 3600,
            ..Params::default()
        },
        now() as u64,
    )
    .to_string();
    let verify = |a: &Appliance, code: String| {
        let body = json!({"ticket": a.ticket("totp_verify", "peer", json!({})), "service": "peer", "code": code});
        let req = a.client.post(a.url("/v1/totp-verify")).json(&body).send();
        async move { req.await.unwrap().json::<Value>().await.unwrap() }
    };
    assert_eq!(verify(&a, code.clone()).await["valid"], true);
    a.kill9();
    let mut b = Appliance::start_serve(&a.dir);
    b.secret = secret;
    assert_eq!(
        verify(&b, code).await["valid"],
        false,
        "accepted step remembered across kill -9"
    );
    let h = b.health().await;
    assert!(h["capabilities"]
        .as_array()
        .unwrap()
        .contains(&json!("totp-verify")));
}

#[tokio::test]
async fn no_seed_in_memory_files_or_log_after_100_codes() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "reads /proc/PID/mem of a non-dumpable process: run as root (CI does)"
    );
    let (_tmp, mut a) = Appliance::start_configured("[metrics]\nlisten = \"127.0.0.1:0\"\n");
    a.bind().await;
    // A fresh random 160-bit seed: its raw bytes and its base32 are the canaries.
    let mut seed = [0u8; 20];
    getrandom::getrandom(&mut seed).unwrap();
    let b32 = base32_encode(&seed).to_string();
    let (s, _) = a
        .store(
            "canary-2fa",
            json!({"totpUri": format!("otpauth://totp/Canary:bot?secret={b32}&issuer=Canary")}),
        )
        .await;
    assert_eq!(s, 200);
    let p = Params::default();
    for _ in 0..100 {
        let t0 = now();
        let (s, v) = a.credential("canary-2fa", "").await;
        assert_eq!(s, 200);
        assert!(codes_around(&seed, p, t0, now())
            .contains(&v["token"]["accessToken"].as_str().unwrap().to_string()));
    }
    let pid = a.pid();
    a.client = client_trusting(&a.dir.join("tls/cert.pem"));
    a.wait_connections(0).await;
    let mem = read_process_memory(pid);
    assert!(mem.len() > 1 << 20);
    for (what, needle) in [
        ("raw seed", seed.to_vec()),
        ("base32 seed", b32.as_bytes().to_vec()),
        ("lower-case base32", b32.to_lowercase().into_bytes()),
    ] {
        assert!(
            memchr::memmem::find(&mem, &needle).is_none(),
            "{what} found in server memory"
        );
    }
    assert!(
        memchr::memmem::find(&mem, b"tokenvault-webhook/field/v1").is_some(),
        "scanner sanity"
    );
    a.terminate();
    for f in files_under(&a.dir, &[]) {
        let data = std::fs::read(&f).unwrap();
        assert!(
            memchr::memmem::find(&data, &seed).is_none(),
            "raw seed in {}",
            f.display()
        );
        assert!(
            memchr::memmem::find(&data, b32.as_bytes()).is_none(),
            "base32 seed in {}",
            f.display()
        );
    }
    assert!(!a.log_text().contains(&b32));
}

/// A seed object no document refers to (left by a crash between enrolment
/// and its write) is destroyed at the next start and says so; the live
/// one stays and keeps giving codes. SoftHSM2 only: under the TPM backend
/// seeds are sealed fields and no device object exists to orphan.
#[tokio::test]
async fn an_orphaned_totp_key_object_is_removed_at_start_and_the_live_one_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    let mut a = Appliance::start_dev_backend(&dir, "pkcs11");
    a.bind().await;
    let (s, v) = a
        .store("otp", json!({"totpSecret": "JBSWY3DPEHPK3PXP"}))
        .await;
    assert_eq!(s, 200, "{v}");
    a.terminate();
    let cfg = tokenvault_webhook::cli::load_for_run(&a.config()).unwrap();
    let live = {
        let device = tokenvault_webhook::cli::open_device(&cfg).unwrap();
        let b = device.backend();
        let live = b.list_otp().unwrap();
        assert_eq!(live.len(), 1, "{live:?}");
        let orphan = b
            .install_otp(
                &secrecy::SecretSlice::from(b"an orphaned seed, 20b".to_vec()),
                tokenvault_webhook::keys::OtpAlg::Sha1,
            )
            .unwrap()
            .expect("SoftHSM2 holds seeds as key objects");
        let mut both = b.list_otp().unwrap();
        both.sort();
        let mut want = vec![live[0].clone(), orphan];
        want.sort();
        assert_eq!(both, want);
        live
    };
    let mut b = a.serve_again();
    // On a store shared by several nodes, an object no document names yet
    // may be another node's enrolment in flight: left alone.
    let (said, left) = match &a.pg {
        None => ("removed orphaned TOTP key objects removed=1", 1),
        Some(_) => ("orphaned TOTP key objects are not swept at start", 2),
    };
    assert!(b.log_text().contains(said), "{}", b.log_text());
    let v = b.totp_code("otp").await;
    assert!(v["code"].as_str().is_some_and(|c| c.len() == 6), "{v}");
    b.terminate();
    let device = tokenvault_webhook::cli::open_device(&cfg).unwrap();
    let now = device.backend().list_otp().unwrap();
    assert_eq!(now.len(), left, "{now:?}");
    assert!(now.contains(&live[0]));
}
