#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Landlock inside the running service.

mod harness;

use harness::*;
use serde_json::json;

fn kernel_has_landlock() -> bool {
    tokenvault_webhook::sandbox::landlock::kernel_abi() >= 4
}

#[tokio::test]
async fn unlisted_path_and_port_are_denied_inside_the_service() {
    assert!(
        kernel_has_landlock(),
        "this test needs a kernel with Landlock ABI >= 4 (network rules); it does not skip"
    );
    let (_t, mut a) = Appliance::start_configured("[sandbox]\nconnect_ports = [443]\n");
    let log = a.log_text();
    assert!(log.contains("landlock enforced"), "{log}");
    assert!(log.contains("bind tcp/") || log.contains("bind: not restricted"));
    assert!(log.contains("connect tcp/443"));
    assert!(
        log.contains("landlock self-test: open /etc/passwd denied (EACCES)"),
        "{log}"
    );
    assert!(
        log.contains("landlock self-test: connect 127.0.0.1:1 denied (EACCES)"),
        "{log}"
    );
    // Through the product: a proxy call to a loopback upstream on an unlisted
    // port is stopped by the kernel; the upstream sees nothing.
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h2 = hits.clone();
    let app = axum::Router::new().route(
        "/x",
        axum::routing::get(move || {
            h2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async { "reached" }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    a.bind().await;
    a.store("svc", json!({"accessToken":"t"})).await;
    let body = json!({"ticket": a.ticket("proxy", "svc", json!({})), "service": "svc", "upstream": {"url": format!("http://{addr}/x")}, "headerTemplates": {}});
    let (s, v) = a.signed("/v1/proxy", body).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (502, Some("upstream_error")),
        "{v}"
    );
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    // Everything the service itself needs still works under the sandbox.
    assert_eq!(a.credential("svc", "").await.1["token"]["accessToken"], "t");
    a.terminate();
}

#[test]
fn landlock_off_is_loud() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    let mut a = Appliance::start_dev(&dir);
    a.terminate();
    let _tpm = start_swtpm_for(&dir);
    let mut cmd = std::process::Command::new(BIN);
    cmd.args([
        "--landlock",
        "off",
        "--config",
        dir.join("config.toml").to_str().unwrap(),
        "serve",
    ])
    .stderr(std::process::Stdio::piped())
    .stdout(std::process::Stdio::null());
    let child = cmd.spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("LANDLOCK DISABLED (--landlock=off)"), "{err}");
    assert!(!err.contains("landlock enforced"));
}
