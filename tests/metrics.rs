#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Prometheus metrics on the loopback listener of the real binary.

mod harness;

use harness::*;
use serde_json::json;

fn counter(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

#[tokio::test]
async fn metrics_count_requests_key_operations_and_verifies_without_any_secret() {
    let (_tmp, mut a) = Appliance::start_configured("[metrics]\nlisten = \"127.0.0.1:0\"\n");
    let url = a
        .log_text()
        .lines()
        .find_map(|l| l.strip_prefix("METRICS ").map(str::to_string))
        .expect("the METRICS line");
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    a.bind().await;
    let svc = "github-very-private-service-name";
    let (s, _) = a
        .store(svc, json!({"accessToken": "gho_metrics_canary"}))
        .await;
    assert_eq!(s, 200);
    let (s, _) = a.credential(svc, "").await;
    assert_eq!(s, 200);
    let (s, _) = a.credential("absent", "").await;
    assert_eq!(s, 404);
    a.store_ok("peer", json!({"totpSecret": "JBSWY3DPEHPK3PXP"}))
        .await;
    let tk = a.ticket("totp_verify", "peer", json!({}));
    let body = json!({"ticket": tk, "service": "peer", "code": "000000"});
    let v = json_of(a.client.post(a.url("/v1/totp-verify")).json(&body)).await;
    // One in a million: 000000 may be the current code.
    let rejected = v["valid"] == false;

    let plain = reqwest::Client::new();
    let r = plain.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = r.text().await.unwrap();
    assert_eq!(
        counter(
            &text,
            "tvw_requests_total{route=\"/v1/credential\",status=\"200\"}"
        ),
        1
    );
    assert_eq!(
        counter(
            &text,
            "tvw_requests_total{route=\"/v1/credential\",status=\"404\"}"
        ),
        1
    );
    assert_eq!(
        counter(
            &text,
            "tvw_requests_total{route=\"/v1/store\",status=\"200\"}"
        ),
        2
    );
    assert_eq!(
        counter(
            &text,
            "tvw_request_duration_seconds_count{route=\"/v1/store\"}"
        ),
        2
    );
    let backend = if tpm() { "tpm" } else { "pkcs11" };
    // Tickets: store x2, credential x2, verify x1, each one HMAC.
    assert!(
        counter(
            &text,
            &format!("tvw_key_operations_total{{backend=\"{backend}\",op=\"hmac\"}}")
        ) >= 5,
        "{text}"
    );
    assert!(
        counter(
            &text,
            &format!("tvw_key_operations_total{{backend=\"{backend}\",op=\"seal\"}}")
        ) >= 1
    );
    assert_eq!(
        counter(
            &text,
            &format!("tvw_key_errors_total{{backend=\"{backend}\",op=\"hmac\"}}")
        ),
        0
    );
    assert_eq!(counter(&text, "tvw_key_backend_healthy"), 1);
    assert_eq!(
        counter(&text, "tvw_totp_verify_total{result=\"rejected\"}"),
        u64::from(rejected)
    );
    assert!(counter(&text, "tvw_store_map_size_bytes") > 0);
    assert!(counter(&text, "tvw_store_used_bytes") > 0);
    assert_eq!(counter(&text, "tvw_tokens"), 2);
    // The database's health and the pool, on PostgreSQL only.
    if a.pg.is_some() {
        assert_eq!(counter(&text, "tvw_db_up"), 1);
        assert_eq!(counter(&text, "tvw_db_pool_max"), 8);
        assert!(counter(&text, "tvw_db_pool_open") >= 1);
        assert!(counter(&text, "tvw_db_pool_idle") <= counter(&text, "tvw_db_pool_open"));
    } else {
        assert!(!text.contains("tvw_db_"), "{text}");
    }
    for secret in [
        svc,
        "gho_metrics_canary",
        "JBSWY3DPEHPK3PXP",
        &tk[..20],
        "peer",
    ] {
        assert!(!text.contains(secret), "{secret} in the metrics");
    }
    // Not on the TLS port.
    let (s, _) = {
        let r = a.client.get(a.url("/metrics")).send().await.unwrap();
        (r.status().as_u16(), ())
    };
    assert_eq!(s, 404);
}
