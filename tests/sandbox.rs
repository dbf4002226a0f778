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
    a.store_ok("svc", json!({"accessToken":"t"})).await;
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

/// Both ways of running without the sandbox say so at start, name which,
/// and the service then serves (so the absence of "landlock enforced" is
/// checked on a server that got past the sandbox step).
#[tokio::test]
async fn landlock_off_by_flag_or_config_is_loud_and_names_why() {
    let (_tmp, mut a) = Appliance::start_configured("");
    a.terminate();
    let dir = a.dir.clone();
    let mut b = Appliance::start_serve_with(&dir, &["--landlock", "off"]);
    assert_eq!(b.health().await["status"], "healthy");
    let log = b.log_text();
    assert!(log.contains("LANDLOCK DISABLED (--landlock=off)"), "{log}");
    assert!(!log.contains("landlock enforced"), "{log}");
    b.terminate();
    let cfg = std::fs::read_to_string(dir.join("config.toml")).unwrap();
    std::fs::write(
        dir.join("config.toml"),
        format!("{cfg}\n[sandbox]\nlandlock = false\n"),
    )
    .unwrap();
    let mut c = Appliance::start_serve(&dir);
    assert_eq!(c.health().await["status"], "healthy");
    let log = c.log_text();
    assert!(
        log.contains("LANDLOCK DISABLED (sandbox.landlock = false)"),
        "{log}"
    );
    assert!(!log.contains("landlock enforced"), "{log}");
    c.terminate();
}

/// An allowed path that does not exist stops the start with its name,
/// before anything is served.
#[test]
fn a_missing_allowed_path_refuses_to_start_and_names_it() {
    assert!(
        kernel_has_landlock(),
        "this test needs a kernel with Landlock; it does not skip"
    );
    let (_tmp, mut a) = Appliance::start_configured("");
    a.terminate();
    let dir = a.dir.clone();
    let cfg = std::fs::read_to_string(dir.join("config.toml")).unwrap();
    std::fs::write(
        dir.join("config.toml"),
        format!("{cfg}\n[sandbox]\nextra_read_only = [\"/nonexistent/tvw-missing\"]\n"),
    )
    .unwrap();
    let _tpm = start_swtpm_for(&dir);
    let out = cli(&[
        "--config",
        dir.join("config.toml").to_str().unwrap(),
        "serve",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("allowed path /nonexistent/tvw-missing does not exist"),
        "{err}"
    );
    assert!(!err.contains("READY"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
