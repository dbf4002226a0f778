#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The TLS certificate key in the HSM (PKCS#11 backend, tls.key_in_hsm):
//! generated or imported once as a non-extractable P-256 key, and every
//! handshake signature made by the token. Real binary, real TLS, SoftHSM2.

mod harness;

use harness::*;
use serde_json::Value;
use std::path::Path;

fn use_hsm_key(dir: &Path) {
    let cfg = std::fs::read_to_string(dir.join("config.toml")).unwrap();
    assert!(cfg.contains("key = \"tls/key.pem\""));
    std::fs::write(
        dir.join("config.toml"),
        cfg.replace("key = \"tls/key.pem\"", "key_in_hsm = true"),
    )
    .unwrap();
    std::fs::remove_file(dir.join("tls/key.pem")).unwrap();
}

fn spki_sha256(cert_pem: &Path) -> String {
    let pem = std::fs::read(cert_pem).unwrap();
    let (_, p) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    let c = p.parse_x509().unwrap();
    hex::encode(ring::digest::digest(&ring::digest::SHA256, c.public_key().raw).as_ref())
}

fn show(dir: &Path) -> Value {
    cli_json(&[
        "--config",
        dir.join("config.toml").to_str().unwrap(),
        "tls-key",
        "show",
    ])
}

async fn health_ok(a: &Appliance) {
    let r = a.client.get(a.url("/v1/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn pkcs11_generated_tls_key_signs_every_handshake_in_the_hsm() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    let mut a = Appliance::start_dev_backend(&dir, "pkcs11");
    a.terminate();
    let config = dir.join("config.toml");
    let cert = dir.join("tls/cert.pem");
    let csr = dir.join("tls/request.csr");
    let out = cli(&[
        "--config",
        config.to_str().unwrap(),
        "tls-key",
        "generate",
        "--csr",
        csr.to_str().unwrap(),
        "--self-signed",
        cert.to_str().unwrap(),
        "--name",
        "localhost",
        "--name",
        "127.0.0.1",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::read_to_string(&csr)
        .unwrap()
        .starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
    use_hsm_key(&dir);

    // The key object: sensitive, never extractable; the certificate is its.
    let s = show(&dir);
    assert_eq!(
        (s["sensitive"].as_bool(), s["extractable"].as_bool()),
        (Some(true), Some(false))
    );
    assert_eq!(s["spkiSha256"].as_str().unwrap(), spki_sha256(&cert));

    // Served with no private key file anywhere: the handshake signature can
    // only have come from the token.
    let a = Appliance::start_serve(&dir);
    health_ok(&a).await;
    for f in files_under(&dir, &[&dir.join("hsm/tokens")]) {
        let data = std::fs::read(&f).unwrap();
        assert!(
            !data.windows(11).any(|w| w == b"PRIVATE KEY"),
            "a private key file exists: {}",
            f.display()
        );
    }
    assert!(a.log_text().contains("serving"));
    drop(a);

    // Generating again keeps the key; importing over it is refused.
    let out = cli(&["--config", config.to_str().unwrap(), "tls-key", "generate"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already holds"));
    assert_eq!(show(&dir)["spkiSha256"], s["spkiSha256"]);
    let other = rcgen::KeyPair::generate().unwrap();
    let f = tmp.path().join("other.pem");
    std::fs::write(&f, other.serialize_pem()).unwrap();
    let out = cli(&[
        "--config",
        config.to_str().unwrap(),
        "tls-key",
        "import",
        "--key-file",
        f.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("never replaced"));
}

#[tokio::test]
async fn pkcs11_imported_tls_key_serves_its_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    let mut a = Appliance::start_dev_backend(&dir, "pkcs11");
    a.terminate();
    let config = dir.join("config.toml");
    // An operator's existing key and certificate.
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(dir.join("tls/cert.pem"), cert.pem()).unwrap();
    let key_file = tmp.path().join("operator-key.pem");
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    let out = cli(&[
        "--config",
        config.to_str().unwrap(),
        "tls-key",
        "import",
        "--key-file",
        key_file.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("shred"));
    std::fs::remove_file(&key_file).unwrap();
    use_hsm_key(&dir);
    let s = show(&dir);
    assert_eq!(s["extractable"], false);
    assert_eq!(
        s["spkiSha256"].as_str().unwrap(),
        spki_sha256(&dir.join("tls/cert.pem"))
    );
    let a = Appliance::start_serve(&dir);
    health_ok(&a).await;

    // SIGHUP with the key in the HSM: a re-issued certificate for the same
    // key is installed; one for another key is refused, by name, and the
    // installed one keeps serving.
    let reissued = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let trust = tmp.path().join("reissued.pem");
    std::fs::write(&trust, reissued.pem()).unwrap();
    std::fs::write(dir.join("tls/cert.pem"), reissued.pem()).unwrap();
    a.sighup_and_wait("TLS certificate reloaded", 1).await;
    assert_eq!(a.health_trusting(&trust).await, 200);
    let stranger = rcgen::KeyPair::generate().unwrap();
    let wrong = rcgen::CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .self_signed(&stranger)
        .unwrap();
    std::fs::write(dir.join("tls/cert.pem"), wrong.pem()).unwrap();
    a.sighup_and_wait("TLS reload failed; keeping the current certificate", 1)
        .await;
    assert!(
        a.log_text().contains("not the HSM's TLS key"),
        "{}",
        a.log_text()
    );
    assert_eq!(a.health_trusting(&trust).await, 200);
    drop(a);

    // A certificate for another key is refused at start, by name (the
    // stranger's certificate is still the file).
    let out = cli(&["--config", config.to_str().unwrap(), "serve"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not the HSM's TLS key"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
