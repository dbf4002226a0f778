#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! ACME against Debian's `pebble` (Let's Encrypt's test server) on loopback:
//! first issuance, real TLS-ALPN-01 validation against the listener,
//! renewal of a short-lived certificate without a restart, a failing ACME
//! server (the old certificate keeps serving), and issuance with the TLS key
//! in the HSM. Real binary, real TLS, SoftHSM2, LMDB.

mod harness;

use harness::*;
use serde_json::Value;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Pebble {
    child: Child,
    acme_port: u16,
    mgmt_port: u16,
    ca: PathBuf,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Pebble {
    /// `tls_port`: where its validation authority sends TLS-ALPN-01.
    fn start(dir: &Path, tls_port: u16, always_valid: bool, validity_secs: u64) -> Pebble {
        Self::start_with_http(dir, tls_port, free_port(), always_valid, validity_secs)
    }

    /// `http_port`: where its validation authority sends HTTP-01.
    fn start_with_http(
        dir: &Path,
        tls_port: u16,
        http_port: u16,
        always_valid: bool,
        validity_secs: u64,
    ) -> Pebble {
        assert!(
            Command::new("pebble").arg("-h").output().is_ok(),
            "pebble is required (apt-get install pebble); this test does not skip"
        );
        std::fs::create_dir_all(dir).unwrap();
        // A test CA for pebble's own HTTPS endpoint.
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "pebble test CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
            .unwrap()
            .signed_by(&key, &ca_cert, &ca_key)
            .unwrap();
        let ca_path = dir.join("ca.pem");
        std::fs::write(&ca_path, ca_cert.pem()).unwrap();
        std::fs::write(dir.join("cert.pem"), leaf.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
        let (acme_port, mgmt_port) = (free_port(), free_port());
        let cfg = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{acme_port}"),
            "managementListenAddress": format!("127.0.0.1:{mgmt_port}"),
            "certificate": dir.join("cert.pem"),
            "privateKey": dir.join("key.pem"),
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
            "certificateValidityPeriod": validity_secs,
        }});
        std::fs::write(dir.join("pebble.json"), cfg.to_string()).unwrap();
        let mut cmd = Command::new("pebble");
        cmd.arg("-config")
            .arg(dir.join("pebble.json"))
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if always_valid {
            cmd.env("PEBBLE_VA_ALWAYS_VALID", "1");
        }
        let child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect((Ipv4Addr::LOCALHOST, acme_port)).is_err() {
            assert!(Instant::now() < deadline, "pebble did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Pebble {
            child,
            acme_port,
            mgmt_port,
            ca: ca_path,
        }
    }

    /// The root its issued chains end in (generated at each start).
    async fn root(&self) -> reqwest::Certificate {
        let c = client_trusting(&self.ca);
        let pem = c
            .get(format!("https://127.0.0.1:{}/roots/0", self.mgmt_port))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        reqwest::Certificate::from_pem(&pem).unwrap()
    }
}

/// A dev appliance switched to ACME for `localhost`, on a fixed port.
fn acme_appliance(tmp: &Path, pebble: &Pebble, port: u16, extra: &str) -> (PathBuf, Appliance) {
    acme_appliance_with(tmp, pebble, port, extra, "")
}

fn acme_appliance_with(
    tmp: &Path,
    pebble: &Pebble,
    port: u16,
    extra: &str,
    acme_extra: &str,
) -> (PathBuf, Appliance) {
    let dir = tmp.join("a");
    let mut a = Appliance::start_dev_backend(&dir, "pkcs11");
    a.terminate();
    let cfg = std::fs::read_to_string(dir.join("config.toml")).unwrap();
    let cfg = cfg
        .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"127.0.0.1:{port}\""))
        .replace(
            "[tls]\ncert = \"tls/cert.pem\"\nkey = \"tls/key.pem\"\n",
            &format!(
                "[tls]\nmode = \"acme\"\n{extra}\n[tls.acme]\ndirectory_url = \"https://127.0.0.1:{}/dir\"\nca_bundle = \"{}\"\nemail = \"ops@example.com\"\ndomains = [\"localhost\"]\naccept_terms = true\n{acme_extra}\n",
                pebble.acme_port,
                pebble.ca.display()
            ),
        );
    assert!(cfg.contains("mode = \"acme\""), "{cfg}");
    std::fs::write(dir.join("config.toml"), cfg).unwrap();
    let a = Appliance::start_serve(&dir);
    (dir, a)
}

/// A client that trusts only pebble's root and reaches `localhost` on `port`.
fn pebble_client(root: reqwest::Certificate, port: u16) -> reqwest::Client {
    reqwest::Client::builder()
        .add_root_certificate(root)
        .tls_built_in_root_certs(false)
        .resolve("localhost", SocketAddr::from(([127, 0, 0, 1], port)))
        .build()
        .unwrap()
}

/// Waits for a handshake that verifies against pebble's chain; returns health.
async fn wait_issued(c: &reqwest::Client, port: u16, secs: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Ok(r) = c
            .get(format!("https://localhost:{port}/v1/health"))
            .send()
            .await
        {
            return r.json().await.unwrap();
        }
        assert!(Instant::now() < deadline, "no ACME certificate served");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Serial of the leaf the server presents now (a fresh connection).
async fn served_serial(root: &reqwest::Certificate, port: u16) -> String {
    let der = served_der(root, port).await;
    let (_, c) = x509_parser::parse_x509_certificate(&der).unwrap();
    c.tbs_certificate.raw_serial_as_string()
}

/// The DER of the leaf the server presents now (a fresh connection).
async fn served_der(root: &reqwest::Certificate, port: u16) -> Vec<u8> {
    let c = reqwest::Client::builder()
        .add_root_certificate(root.clone())
        .tls_built_in_root_certs(false)
        .resolve("localhost", SocketAddr::from(([127, 0, 0, 1], port)))
        .tls_info(true)
        .build()
        .unwrap();
    let r = c
        .get(format!("https://localhost:{port}/v1/health"))
        .send()
        .await
        .unwrap();
    let info = r.extensions().get::<reqwest::tls::TlsInfo>().unwrap();
    info.peer_certificate().unwrap().to_vec()
}

#[tokio::test]
async fn acme_issues_serves_and_stores_sealed() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let pebble = Pebble::start(&tmp.path().join("pebble"), port, true, 3600 * 24 * 90);
    let (dir, a) = acme_appliance(tmp.path(), &pebble, port, "");
    let c = pebble_client(pebble.root().await, port);
    let h = wait_issued(&c, port, 60).await;
    assert_eq!(h["status"], "healthy", "{h}");
    assert!(h["tlsCertificateDaysLeft"].as_i64().unwrap() >= 88, "{h}");
    // Stored: the chain in clear, the account and the key sealed.
    let acme = dir.join("state/acme");
    assert!(std::fs::read_to_string(acme.join("cert.pem"))
        .unwrap()
        .contains("BEGIN CERTIFICATE"));
    // The served key's public half: inside any plaintext encoding of the
    // private key (PKCS#8 and SEC1 both carry it), absent from a sealed one.
    let der = served_der(&pebble.root().await, port).await;
    let (_, leaf) = x509_parser::parse_x509_certificate(&der).unwrap();
    let public = leaf.public_key().subject_public_key.data.to_vec();
    assert!(public.len() >= 32, "{}", public.len());
    for f in ["account.sealed", "key.sealed"] {
        let data = std::fs::read(acme.join(f)).unwrap();
        // AES-GCM output: a 12-byte IV and a 16-byte tag around at least
        // an account document or a key, and not text (the account is JSON,
        // valid UTF-8 in the clear; 100+ random bytes essentially never are).
        assert!(data.len() > 12 + 16 + 64, "{f}: {} bytes", data.len());
        assert!(
            std::str::from_utf8(&data).is_err(),
            "{f} is valid UTF-8: not sealed"
        );
        assert!(!data.windows(11).any(|w| w == b"PRIVATE KEY"), "{f}");
        assert!(
            !data.windows(public.len()).any(|w| w == public.as_slice()),
            "{f} holds the served key's public point: a plaintext key"
        );
    }
    assert!(a.log_text().contains("ACME certificate installed"));
    // A restart serves the stored certificate at once, without issuing.
    let mut a = a;
    a.terminate();
    let a = Appliance::start_serve(&dir);
    let h = wait_issued(&c, port, 5).await;
    assert_eq!(h["status"], "healthy");
    assert!(a.log_text().contains("serving the stored ACME certificate"));
}

#[tokio::test]
async fn acme_answers_real_tls_alpn_01_validation() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    // No PEBBLE_VA_ALWAYS_VALID: pebble's validation authority connects to
    // the listener with ALPN acme-tls/1 and checks the challenge certificate.
    let pebble = Pebble::start(&tmp.path().join("pebble"), port, false, 3600 * 24 * 90);
    let (_dir, a) = acme_appliance(tmp.path(), &pebble, port, "");
    let c = pebble_client(pebble.root().await, port);
    let h = wait_issued(&c, port, 60).await;
    assert_eq!(h["status"], "healthy", "{h}");
    assert!(
        a.log_text()
            .contains("answered a TLS-ALPN-01 validation handshake"),
        "{}",
        a.log_text()
    );
}

#[tokio::test]
async fn acme_renews_a_short_lived_certificate_without_restart_and_survives_a_dead_server() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    // 30-second certificates: renewal is due after 20 s.
    let pebble = Pebble::start(&tmp.path().join("pebble"), port, true, 30);
    let (_dir, a) = acme_appliance(tmp.path(), &pebble, port, "");
    let c = pebble_client(pebble.root().await, port);
    wait_issued(&c, port, 60).await;
    let root = pebble.root().await;
    let first = served_serial(&root, port).await;
    // One connection stays open across the swap.
    let keep = pebble_client(pebble.root().await, port);
    let r = keep
        .get(format!("https://localhost:{port}/v1/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(60);
    let second = loop {
        let s = served_serial(&root, port).await;
        if s != first {
            break s;
        }
        assert!(Instant::now() < deadline, "not renewed");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_ne!(first, second);
    assert_eq!(
        keep.get(format!("https://localhost:{port}/v1/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // The ACME server dies: the current certificate keeps serving, the
    // failure is logged, and the process stays up.
    drop(pebble);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !a
        .log_text()
        .contains("ACME issuance failed; the current certificate keeps serving")
    {
        assert!(Instant::now() < deadline, "{}", a.log_text());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(served_serial(&root, port).await, second);
}

#[tokio::test]
async fn acme_with_the_key_in_the_hsm_never_has_a_key_file() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let pebble = Pebble::start(&tmp.path().join("pebble"), port, true, 3600 * 24 * 90);
    // The dev dir first, its HSM key generated, then ACME with key_in_hsm.
    let dir = tmp.path().join("a");
    let mut a = Appliance::start_dev_backend(&dir, "pkcs11");
    a.terminate();
    let config = dir.join("config.toml");
    let out = cli(&["--config", config.to_str().unwrap(), "tls-key", "generate"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(a);
    let (dir, a) = acme_appliance(tmp.path(), &pebble, port, "key_in_hsm = true");
    let c = pebble_client(pebble.root().await, port);
    let h = wait_issued(&c, port, 60).await;
    assert_eq!(h["status"], "healthy", "{h}");
    // The served certificate's key is the HSM's, and no key file exists.
    let show = cli_json(&["--config", config.to_str().unwrap(), "tls-key", "show"]);
    assert_eq!(show["extractable"], false);
    let pem = std::fs::read(dir.join("state/acme/cert.pem")).unwrap();
    let (_, p) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    let spki = p.parse_x509().unwrap().public_key().raw.to_vec();
    assert_eq!(
        show["spkiSha256"].as_str().unwrap(),
        hex::encode(ring::digest::digest(&ring::digest::SHA256, &spki).as_ref())
    );
    assert!(!dir.join("state/acme/key.sealed").exists());
    // (`dev`'s own self-signed key, which ACME mode does not use.)
    std::fs::remove_file(dir.join("tls/key.pem")).unwrap();
    for f in files_under(&dir, &[&dir.join("hsm/tokens")]) {
        let data = std::fs::read(&f).unwrap();
        assert!(
            !data.windows(11).any(|w| w == b"PRIVATE KEY"),
            "{}",
            f.display()
        );
    }
    drop(a);
}

#[tokio::test]
async fn acme_answers_real_http_01_validation_on_its_own_listener() {
    let tmp = tempfile::tempdir().unwrap();
    let (port, http_port) = (free_port(), free_port());
    let pebble = Pebble::start_with_http(
        &tmp.path().join("pebble"),
        free_port(),
        http_port,
        false,
        3600 * 24 * 90,
    );
    let (_dir, a) = acme_appliance_with(
        tmp.path(),
        &pebble,
        port,
        "",
        &format!("challenge = \"http-01\"\nhttp01_listen = \"127.0.0.1:{http_port}\""),
    );
    let c = pebble_client(pebble.root().await, port);
    let h = wait_issued(&c, port, 60).await;
    assert_eq!(h["status"], "healthy", "{h}");
    assert!(
        a.log_text().contains("answered an HTTP-01 challenge"),
        "{}",
        a.log_text()
    );
    // That listener answers nothing else.
    let r = reqwest::get(format!("http://127.0.0.1:{http_port}/v1/health"))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = reqwest::get(format!(
        "http://127.0.0.1:{http_port}/.well-known/acme-challenge/nope"
    ))
    .await
    .unwrap();
    assert_eq!(r.status(), 404);
}
