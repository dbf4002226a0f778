#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Custody over real HTTPS, SoftHSM2 and LMDB: every token type, concurrent
//! stores, GCP minting against a local token endpoint, and canary scans of
//! the server's memory, its files and its log.

mod harness;

use base64::Engine;
use harness::*;
use serde_json::{json, Value};

#[tokio::test]
async fn every_token_type_round_trips() {
    let (_tmp, mut a) = Appliance::start_new();
    a.bind().await;
    let cases = [
        ("pat", json!({"accessToken":"ghp_pat_123"}), "PlainText"),
        (
            "oauth",
            json!({"accessToken":"ya29.a","refreshToken":"1//r","tokenType":"JWT","expiresAt":"2026-12-01T00:00:00Z","scope":"repo read:org"}),
            "JWT",
        ),
        (
            "cert",
            json!({"certificateData":"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----","privateKeyData":"-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----","certificateChain":"chain"}),
            "Certificate",
        ),
        (
            "ssh",
            json!({"sshPrivateKey":"-----BEGIN OPENSSH PRIVATE KEY-----\nb3Bl\n-----END OPENSSH PRIVATE KEY-----","sshPublicKey":"ssh-ed25519 AAAA"}),
            "SSHKey",
        ),
        (
            "raw",
            json!({"accessToken":"{\"aws_access_key_id\":\"AKIA\",\"aws_secret_access_key\":\"s\"}","tokenType":"Raw","region":"eu-west-1","port":5432,"tls":true}),
            "Raw",
        ),
    ];
    for (svc, data, ty) in &cases {
        let (s, v) = a.store(svc, data.clone()).await;
        assert_eq!(s, 200, "{svc}: {v}");
        assert_eq!(v["meta"]["tokenType"], *ty);
        let text = v.to_string();
        for (k, val) in data.as_object().unwrap() {
            if !["tokenType", "expiresAt", "scope"].contains(&k.as_str()) {
                assert!(
                    !text.contains(&val.to_string().trim_matches('"').to_string()),
                    "{svc}.{k} echoed"
                );
            }
        }
    }
    for (svc, data, ty) in &cases {
        let (s, v) = a.credential(svc, "").await;
        assert_eq!(s, 200, "{svc}: {v}");
        let tok = &v["token"];
        assert_eq!(tok["tokenType"], *ty);
        assert_eq!(tok["serviceName"], *svc);
        for (k, val) in data.as_object().unwrap() {
            if !["tokenType", "expiresAt"].contains(&k.as_str()) {
                assert_eq!(&tok[k], val, "{svc}.{k}");
            }
        }
    }
    let (_, v) = a.credential("oauth", "").await;
    assert_eq!(v["token"]["hasRefreshToken"], true);
    assert_eq!(v["token"]["expiryTime"], 1796083200000i64);
    let (_, v) = a.credential("cert", "").await;
    assert_eq!(
        (
            v["token"]["hasCertificate"].clone(),
            v["token"]["hasPrivateKey"].clone()
        ),
        (json!(true), json!(true))
    );
    // TOTP: stored, listed, and its seed never answered.
    let (s, v) = a
        .store("otp", json!({"totpSecret":"JBSWY3DPEHPK3PXP"}))
        .await;
    assert_eq!((s, v["meta"]["tokenType"].as_str()), (200, Some("TOTP")));
    let (s, v) = a.credential("otp", "").await;
    assert_eq!(s, 200);
    assert!(!v.to_string().contains("JBSWY3DPEHPK3PXP"));
    // Storage lists metadata only.
    let v = a
        .storage(json!({"operation":"list","collection":"tokens"}))
        .await;
    assert_eq!(v["items"].as_array().unwrap().len(), 6);
    assert!(!v.to_string().contains("ghp_pat_123") && !v.to_string().contains("OPENSSH"));
}

#[tokio::test]
async fn two_hundred_concurrent_stores_are_all_readable() {
    let (_tmp, mut a) = Appliance::start_new();
    a.bind().await;
    let names: Vec<String> = (0..200).map(|i| format!("svc-{i:03}")).collect();
    let futs: Vec<_> = names
        .iter()
        .enumerate()
        .map(|(i, n)| a.store(n, json!({"accessToken": format!("tok-{i}")})))
        .collect();
    for (s, v) in futures::future::join_all(futs).await {
        assert_eq!(s, 200, "{v}");
    }
    let futs: Vec<_> = names.iter().map(|n| a.credential(n, "")).collect();
    for (i, (s, v)) in futures::future::join_all(futs)
        .await
        .into_iter()
        .enumerate()
    {
        assert_eq!(s, 200);
        assert_eq!(v["token"]["accessToken"], format!("tok-{i}"));
    }
    let (s, v) = a.signed("/v1/health", json!({})).await;
    assert_eq!((s, v["tokenCount"].as_u64()), (200, Some(200)));
}

/// A local OAuth token endpoint that checks the RS256 assertion like Google does.
async fn fake_google(
    public_key_der: Vec<u8>,
) -> (
    String,
    tokio::task::JoinHandle<()>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use axum::routing::post;
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h2 = hits.clone();
    let app = axum::Router::new().route(
        "/token",
        post(move |body: String| {
            let key = public_key_der.clone();
            let hits = h2.clone();
            async move {
                hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let form: std::collections::HashMap<String, String> = url::form_urlencoded::parse(body.as_bytes()).into_owned().collect();
                if form.get("grant_type").map(String::as_str) != Some("urn:ietf:params:oauth:grant-type:jwt-bearer") {
                    return (axum::http::StatusCode::BAD_REQUEST, "{\"error\":\"unsupported_grant_type\"}".to_string());
                }
                let jwt = form.get("assertion").cloned().unwrap_or_default();
                let parts: Vec<&str> = jwt.split('.').collect();
                let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
                let sig = b64.decode(parts[2]).unwrap();
                let ok = ring::signature::UnparsedPublicKey::new(&ring::signature::RSA_PKCS1_2048_8192_SHA256, &key)
                    .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig)
                    .is_ok();
                let header: Value = serde_json::from_slice(&b64.decode(parts[0]).unwrap()).unwrap();
                let claims: Value = serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
                if !ok || header["kid"] != "key-1" || claims["iss"] != "svc@proj.iam.gserviceaccount.com" || claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap() != 3600 {
                    return (axum::http::StatusCode::BAD_REQUEST, "{\"error\":\"invalid_grant\"}".to_string());
                }
                let scope = claims["scope"].as_str().unwrap().replace(' ', "+");
                (axum::http::StatusCode::OK, json!({"access_token": format!("ya29.minted.{scope}"), "expires_in": 3599, "token_type": "Bearer"}).to_string())
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let h = tokio::spawn(async move {
        axum::serve(l, app).await.unwrap();
    });
    (format!("http://{addr}/token"), h, hits)
}

#[tokio::test]
async fn gcp_service_accounts_are_minted_never_revealed() {
    let (pem, public) = gcp_test_key();
    let (token_uri, _srv, hits) = fake_google(public).await;
    let (_tmp, mut a) = Appliance::start_new();
    a.bind().await;
    let sa = json!({"type":"service_account","project_id":"proj","private_key_id":"key-1","private_key":pem,"client_email":"svc@proj.iam.gserviceaccount.com","token_uri":token_uri}).to_string();
    let (s, _) = a.store("gcp", json!({"accessToken": sa})).await;
    assert_eq!(s, 200);
    let (s, v) = a.credential("gcp", "").await;
    assert_eq!(s, 200, "{v}");
    let tok = &v["token"];
    assert_eq!(
        tok["accessToken"],
        "ya29.minted.https://www.googleapis.com/auth/cloud-platform"
    );
    assert_eq!(tok["tokenType"], "Bearer");
    assert_eq!(tok["gcpMinted"], true);
    assert_eq!(tok["serviceAccount"], "svc@proj.iam.gserviceaccount.com");
    assert!(tok["expiresAt"].as_str().unwrap().ends_with('Z'));
    assert!(!v.to_string().contains("PRIVATE KEY"));
    // Cached per scopes: a second read does not call the endpoint; new scopes do.
    let (s, again) = a.credential("gcp", "").await;
    assert_eq!(s, 200);
    assert_eq!(
        again["token"]["accessToken"], tok["accessToken"],
        "the cached token"
    );
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
    let (_, v) = a
        .credential(
            "gcp",
            "&scopes=https://www.googleapis.com/auth/devstorage.read_only,openid",
        )
        .await;
    assert_eq!(
        v["token"]["accessToken"],
        "ya29.minted.https://www.googleapis.com/auth/devstorage.read_only+openid"
    );
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 2);
    // A key the endpoint refuses: 502, no key material in the answer.
    let bad = sa.replace("key-1", "key-2");
    a.store_ok("gcp-bad", json!({"accessToken": bad})).await;
    let (s, v) = a.credential("gcp-bad", "").await;
    assert_eq!((s, v["error"].as_str()), (502, Some("gcp_mint_failed")));
    assert!(!v.to_string().contains("PRIVATE"));
}

/// The test service account's PEM key and its public key (DER).
fn gcp_test_key() -> (String, Vec<u8>) {
    let pem = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/gcp-test-sa-key.pem"
    ))
    .unwrap();
    let der = rustls_pemfile::private_key(&mut pem.as_bytes())
        .unwrap()
        .unwrap();
    let kp = ring::signature::RsaKeyPair::from_pkcs8(der.secret_der()).unwrap();
    let public = ring::signature::KeyPair::public_key(&kp).as_ref().to_vec();
    (pem, public)
}

fn find_all(hay: &[u8], needle: &[u8]) -> usize {
    memchr::memmem::find_iter(hay, needle).count()
}

fn scan_process(pid: u32, needle: &[u8]) -> (usize, usize) {
    let mem = read_process_memory(pid);
    (find_all(&mem, needle), mem.len())
}

#[tokio::test]
async fn no_canary_in_memory_files_or_log() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test reads /proc/PID/mem of a non-dumpable process: run it as root (CI does)"
    );
    let (_tmp, mut a) = Appliance::start_configured("[metrics]\nlisten = \"127.0.0.1:0\"\n");
    a.bind().await;
    let canary = |i: usize| format!("tvwcanary{i:03}{}", "x".repeat(24));
    // 200 canaries, a few per token type and field.
    for i in 0..200 {
        let data = match i % 4 {
            0 => json!({"accessToken": canary(i)}),
            1 => json!({"accessToken": "a", "refreshToken": canary(i), "tokenType": "JWT"}),
            2 => json!({"sshPrivateKey": canary(i)}),
            _ => json!({"customSecret": canary(i), "certificateData": "c"}),
        };
        let (s, v) = a.store(&format!("c{i:03}"), data).await;
        assert_eq!(s, 200, "{v}");
    }
    for i in 0..200 {
        let (s, v) = a.credential(&format!("c{i:03}"), "").await;
        assert_eq!(s, 200);
        assert!(v.to_string().contains(&canary(i)), "canary {i} read back");
    }
    // Close every connection; the event: the server has dropped them all.
    let pid = a.pid();
    a.client = client_trusting(&a.dir.join("tls/cert.pem"));
    a.wait_connections(0).await;
    let (hits, bytes) = scan_process(pid, b"tvwcanary");
    assert!(bytes > 1 << 20, "scanned {bytes} bytes");
    assert_eq!(
        hits, 0,
        "canary bytes found in the server's memory ({bytes} bytes scanned)"
    );
    // The scan can find what is there: the probe string below is in the binary's own text.
    let (probe, _) = scan_process(pid, b"tokenvault-webhook/field/v1");
    assert!(probe > 0, "scanner sanity check");
    a.terminate();
    for f in files_under(&a.dir, &[]) {
        let data = std::fs::read(&f).unwrap();
        assert_eq!(
            find_all(&data, b"tvwcanary"),
            0,
            "canary in {}",
            f.display()
        );
    }
    assert!(!a.log_text().contains("tvwcanary"));
}

/// The issue's mixed traffic: a PlainText token read by GET, POST,
/// `user_reveal` and by curl (HTTP/1.1 and HTTP/2, as an agent following
/// Token Vault's 307 does), and a GCP service account minted and read.
/// With every client gone, the idle server holds neither the PlainText token nor the minted token
/// outside its locked cache pages.
#[tokio::test]
async fn idle_memory_holds_no_credential_after_mixed_reads() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test reads /proc/PID/mem of a non-dumpable process: run it as root (CI does)"
    );
    let (pem, public) = gcp_test_key();
    let (token_uri, _srv, _hits) = fake_google(public).await;
    let (_tmp, mut a) = Appliance::start_configured("[metrics]\nlisten = \"127.0.0.1:0\"\n");
    a.bind().await;
    let plain = format!("tvwplaintext{}", "p".repeat(24));
    let (s, _) = a
        .store(
            "plain",
            json!({"accessToken": plain, "tokenType": "PlainText"}),
        )
        .await;
    assert_eq!(s, 200);
    // GET, POST, and a user_reveal ticket.
    let (s, v) = a.credential("plain", "").await;
    assert_eq!(
        (s, v["token"]["accessToken"].as_str()),
        (200, Some(plain.as_str()))
    );
    let tk = a.ticket("agent_credential", "plain", json!({}));
    let v = json_of(
        a.client
            .post(a.url("/v1/credential"))
            .json(&json!({"ticket": tk, "service": "plain"})),
    )
    .await;
    assert_eq!(v["token"]["accessToken"], plain.as_str());
    let tk = a.ticket("user_reveal", "plain", json!({}));
    let v = json_of(a.client.get(format!(
        "{}?ticket={tk}&service=plain",
        a.url("/v1/credential")
    )))
    .await;
    assert_eq!(v["token"]["accessToken"], plain.as_str());
    // curl, as an agent following the 307 would, over both protocols.
    for proto in ["--http1.1", "--http2"] {
        let tk = a.ticket("agent_credential", "plain", json!({}));
        let out = std::process::Command::new("curl")
            .args(["-sS", "-L", proto, "--cacert"])
            .arg(a.dir.join("tls/cert.pem"))
            .arg(format!(
                "{}?ticket={tk}&service=plain",
                a.url("/v1/credential")
            ))
            .output()
            .expect("curl (apt-get install curl)");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(&plain),
            "curl {proto}"
        );
    }
    // A GCP service account, minted and read.
    let sa = json!({"type":"service_account","project_id":"proj","private_key_id":"key-1","private_key":pem,"client_email":"svc@proj.iam.gserviceaccount.com","token_uri":token_uri}).to_string();
    let (s, _) = a.store("gcp", json!({"accessToken": sa})).await;
    assert_eq!(s, 200);
    let (s, v) = a.credential("gcp", "&scopes=tvwmintedscope").await;
    assert_eq!(s, 200, "{v}");
    let minted = "ya29.minted.tvwmintedscope";
    assert_eq!(v["token"]["accessToken"], minted);
    // The client keeps its pooled connections: the server itself closes a
    // connection that carried a secret once it is quiet (the event waited
    // for: no connection open).
    a.wait_connections(0).await;
    let pid = a.pid();
    let found = mappings_holding(pid, plain.as_bytes());
    assert!(found.is_empty(), "the PlainText token is in: {found:?}");
    let found = mappings_holding(pid, minted.as_bytes());
    let unlocked: Vec<_> = found.iter().filter(|(_, locked)| !locked).collect();
    assert!(
        unlocked.is_empty(),
        "the minted token outside locked pages: {unlocked:?}"
    );
    // The scan sees what is there: the cache holds the minted token, locked.
    assert!(
        found.iter().any(|(_, locked)| *locked),
        "the minted token is cached in locked memory"
    );
}
