#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! `import` of a public reference webhook's stores (fixtures built here in
//! their format), then the same credentials through `/v1/credential`.

mod harness;

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use harness::*;
use serde_json::{json, Value};
use tokenvault_webhook::custody::totp::{base32_decode, code_software, Params};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The reference layout: base64(IV12 ‖ ciphertext ‖ tag16), no AAD.
fn reference_seal(key: &[u8; 32], plaintext: &str, iv: u8) -> String {
    let c = Aes256Gcm::new_from_slice(key).unwrap();
    let nonce = [iv; 12];
    let ct = c
        .encrypt(&Nonce::from(nonce), plaintext.as_bytes())
        .unwrap();
    let mut raw = nonce.to_vec();
    raw.extend(ct);
    B64.encode(raw)
}

/// `import --from STORE --kv KV` on the appliance's config.
fn import(a: &Appliance, store: &std::path::Path, kv: &std::path::Path) -> std::process::Output {
    let cfg = a.config();
    cli(&[
        "--config",
        cfg.to_str().unwrap(),
        "import",
        "--from",
        store.to_str().unwrap(),
        "--kv",
        kv.to_str().unwrap(),
    ])
}

#[tokio::test]
async fn a_reference_store_imports_and_serves_the_same_credentials() {
    let (tmp, mut a) = Appliance::start_new();
    a.bind().await;
    // One token the appliance already holds: import keeps it.
    let (s, _) = a
        .store("kept", json!({"accessToken": "appliance_own"}))
        .await;
    assert_eq!(s, 200);
    a.terminate();

    let key: [u8; 32] = core::array::from_fn(|i| (i as u8).wrapping_mul(7).wrapping_add(3));
    let store_file = tmp.path().join("tokenvault_store.json");
    std::fs::write(
        &store_file,
        json!({"encryption_key": B64.encode(key), "hmac_secret": B64.encode([9u8; 32])})
            .to_string(),
    )
    .unwrap();
    let kv = json!({
        "tokens": {
            "github": {"v": 1, "alg": "AES-256-GCM",
                "fields": {"accessToken": reference_seal(&key, "gho_imported_secret", 1),
                           "refreshToken": reference_seal(&key, "ghr_imported_refresh", 2)},
                "meta": {"serviceName": "github", "tokenType": "JWT", "createdAt": "2026-02-01T10:00:00Z",
                         "expiryTime": 1720003600000u64, "hasRefreshToken": true, "displayName": "GitHub"}},
            "gitlab": {"v": 1, "alg": "none", "fields": {"accessToken": "glpat_plain_import"},
                "meta": {"serviceName": "gitlab", "tokenType": "PlainText", "createdAt": "2026-02-02T10:00:00Z"}},
            "legacy": {"v": 1, "alg": "none", "accessToken": "legacy_top_level",
                "meta": {"tokenType": "PlainText"}},
            "twofa": {"v": 1, "alg": "none",
                "meta": {"tokenType": "PlainText", "totpUri": "otpauth://totp/Acme:me?secret=JBSWY3DPEHPK3PXP&issuer=Acme"}},
            "kept": {"v": 1, "alg": "none", "fields": {"accessToken": "from_reference"}, "meta": {}}
        },
        "proxy_configs": {"p-1": {"name": "gh", "serviceName": "github", "upstreamUrl": "https://api.github.com/mcp"}},
        "vault_config": {"settings": {"theme": "dark"}},
        "audit": {"2026-02-15T10:30:00Z": {"event": "credential_read", "service": "github"},
                  "2026-02-15T10:30:01Z": {"event": "store", "service": "gitlab"}}
    });
    let kv_file = tmp.path().join("tokenvault_kv_store.json");
    std::fs::write(&kv_file, kv.to_string()).unwrap();

    let _tpm = start_swtpm_for(&a.dir);
    let out = import(&a, &store_file, &kv_file);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["tokens"], json!({"imported": 4, "skipped": 1}), "{r}");
    assert_eq!(r["proxyConfigs"]["imported"], 1, "{r}");
    assert_eq!(r["vaultConfig"]["imported"], 1, "{r}");
    assert_eq!(r["auditEvents"], 2, "{r}");
    drop(_tpm);

    let mut b = a.serve_again();
    for (svc, field, want) in [
        ("github", "accessToken", "gho_imported_secret"),
        ("github", "refreshToken", "ghr_imported_refresh"),
        ("gitlab", "accessToken", "glpat_plain_import"),
        ("legacy", "accessToken", "legacy_top_level"),
        ("kept", "accessToken", "appliance_own"),
    ] {
        let (s, v) = b.credential(svc, "").await;
        assert_eq!(s, 200, "{svc}: {v}");
        assert_eq!(v["token"][field], want, "{svc}.{field}: {v}");
    }
    let (_, v) = b.credential("github", "").await;
    assert_eq!(v["token"]["createdAt"], "2026-02-01T10:00:00Z", "{v}");
    // The legacy seed became a TOTP enrolment: codes come out, the seed
    // is nowhere in the metadata.
    let seed = base32_decode("JBSWY3DPEHPK3PXP").unwrap();
    let tk = b.ticket("totp_code", "twofa", json!({}));
    let t0 = now();
    let v = json_of(b.client.get(format!(
        "{}?ticket={tk}&service=twofa",
        b.url("/v1/totp-code")
    )))
    .await;
    let t1 = now();
    let codes: Vec<String> = [t0, t1]
        .iter()
        .map(|t| code_software(&seed, &Params::default(), *t as u64).to_string())
        .collect();
    assert!(
        codes.contains(&v["code"].as_str().unwrap_or("").to_string()),
        "{v}"
    );
    let meta = b
        .storage(json!({"operation": "get", "collection": "tokens", "key": "twofa"}))
        .await;
    assert!(!meta.to_string().contains("JBSWY3DPEHPK3PXP"), "{meta}");
    assert_eq!(meta["data"]["meta"]["hasTotpSecret"], true, "{meta}");
    let p = b
        .storage(json!({"operation": "get", "collection": "proxy_configs", "key": "p-1"}))
        .await;
    assert_eq!(p["data"]["upstreamUrl"], "https://api.github.com/mcp");
    let audit = b
        .storage(json!({"operation": "list", "collection": "audit"}))
        .await;
    assert!(
        audit["pagination"]["totalCount"].as_u64().unwrap() >= 2,
        "{audit}"
    );
    b.terminate();

    // Nothing imported is stored in plaintext.
    let skip = b.device_dirs();
    let skip: Vec<&std::path::Path> = skip.iter().map(|p| p.as_path()).collect();
    for f in files_under(&b.dir, &skip) {
        let bytes = std::fs::read(&f).unwrap();
        for secret in [
            "gho_imported_secret",
            "glpat_plain_import",
            "legacy_top_level",
            "JBSWY3DPEHPK3PXP",
        ] {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{secret} in {}",
                f.display()
            );
        }
    }
}

#[tokio::test]
async fn an_import_with_the_wrong_key_changes_nothing() {
    let (tmp, mut a) = Appliance::start_new();
    a.bind().await;
    a.terminate();
    let key = [1u8; 32];
    let store_file = tmp.path().join("s.json");
    std::fs::write(
        &store_file,
        json!({"encryption_key": B64.encode([2u8; 32])}).to_string(),
    )
    .unwrap();
    let kv_file = tmp.path().join("kv.json");
    std::fs::write(
        &kv_file,
        json!({"tokens": {
            "aaa-plain": {"v":1,"alg":"none","fields":{"accessToken":"fine"},"meta":{}},
            "github": {"v":1,"alg":"AES-256-GCM","fields":{"accessToken": reference_seal(&key, "x", 3)},"meta":{}}}})
        .to_string(),
    )
    .unwrap();
    let _tpm = start_swtpm_for(&a.dir);
    let out = import(&a, &store_file, &kv_file);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not decrypt"), "{err}");
    drop(_tpm);
    let b = a.serve_again();
    // Nothing at all was imported, not even the document before the bad one.
    for svc in ["aaa-plain", "github"] {
        let (s, v) = b.credential(svc, "").await;
        assert_eq!(s, 404, "{svc}: {v}");
    }
}

/// Each malformed input is refused with a message naming what is wrong,
/// never a panic, and nothing of it (not even its valid entries) lands;
/// then the spec's reference-layout vector (vectors.json
/// `tokenDocumentField`) imports and serves its plaintext.
#[tokio::test]
async fn malformed_import_files_are_refused_and_change_nothing() {
    let (tmp, mut a) = Appliance::start_new();
    a.bind().await;
    a.terminate();
    let good_store = json!({"encryption_key": B64.encode([4u8; 32])});
    let plain = |n: usize| json!({"v":1,"alg":"none","fields":{"accessToken":format!("fine-{n}")},"meta":{}});
    let cases: Vec<(&str, Vec<u8>, Vec<u8>, &str)> = vec![
        ("store not JSON", b"{not json".to_vec(), b"{}".to_vec(), "is not JSON"),
        (
            "key not base64",
            json!({"encryption_key": "!!!not base64!!!"}).to_string().into_bytes(),
            json!({"tokens": {"aaa-0": plain(0)}}).to_string().into_bytes(),
            "is not base64",
        ),
        (
            "short key",
            json!({"encryption_key": B64.encode([4u8; 16])}).to_string().into_bytes(),
            json!({"tokens": {"aaa-1": plain(1)}}).to_string().into_bytes(),
            "is not 32 bytes",
        ),
        (
            "kv not JSON",
            good_store.to_string().into_bytes(),
            b"[1, 2".to_vec(),
            "is not JSON",
        ),
        (
            "unknown alg",
            good_store.to_string().into_bytes(),
            json!({"tokens": {"aaa-2": plain(2), "zzz": {"v":1,"alg":"ROT13","fields":{"accessToken":"x"},"meta":{}}}}).to_string().into_bytes(),
            "unknown alg",
        ),
        (
            "token not an object",
            good_store.to_string().into_bytes(),
            json!({"tokens": {"aaa-3": plain(3), "zzz": 5}}).to_string().into_bytes(),
            "not an object",
        ),
        (
            "collection neither object nor list",
            good_store.to_string().into_bytes(),
            json!({"tokens": {"aaa-4": plain(4)}, "proxy_configs": "nope"}).to_string().into_bytes(),
            "neither an object nor a list",
        ),
        (
            "list entry without a key",
            good_store.to_string().into_bytes(),
            json!({"tokens": [{"key": "aaa-5", "data": plain(5)}, {"data": plain(6)}]}).to_string().into_bytes(),
            "has no key",
        ),
    ];
    let _tpm = start_swtpm_for(&a.dir);
    for (i, (what, store, kv, needle)) in cases.iter().enumerate() {
        let s = tmp.path().join(format!("s{i}.json"));
        let k = tmp.path().join(format!("kv{i}.json"));
        std::fs::write(&s, store).unwrap();
        std::fs::write(&k, kv).unwrap();
        let out = import(&a, &s, &k);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {err}");
        assert!(err.contains(needle), "{what}: {err}");
        assert!(!err.contains("panicked"), "{what}: {err}");
        assert!(
            !err.contains("!!!not base64!!!"),
            "{what} echoed the key: {err}"
        );
    }
    // The spec's vector: its key, its sealed field, its plaintext.
    let f = testvectors::get("tokenDocumentField");
    let s = tmp.path().join("vector-store.json");
    let k = tmp.path().join("vector-kv.json");
    let key = hex::decode(testvectors::s(f, "keyHex")).unwrap();
    std::fs::write(&s, json!({"encryption_key": B64.encode(&key)}).to_string()).unwrap();
    std::fs::write(
        &k,
        json!({"tokens": {"conformance": {"v":1,"alg":"AES-256-GCM","fields":{"accessToken": testvectors::s(f, "base64IvCiphertextTag")},"meta":{"tokenType":"PlainText"}}}}).to_string(),
    )
    .unwrap();
    let out = import(&a, &s, &k);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(_tpm);
    let mut b = a.serve_again();
    for n in 0..=6 {
        let svc = format!("aaa-{n}");
        let (st, v) = b.credential(&svc, "").await;
        assert_eq!(st, 404, "{svc}: {v}");
    }
    let (st, v) = b.credential("conformance", "").await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["token"]["accessToken"], testvectors::s(f, "plaintext"));
    b.terminate();
}
