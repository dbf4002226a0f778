#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The listener's own limits on the real binary: the TLS handshake, header
//! and idle timeouts close a connection that stalls in each phase, and
//! `server.max_connections` holds a further client until a slot frees.
//! Each test waits for the event (the server closing the socket, a
//! handshake completing), never for a time.

mod harness;

use harness::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Reads until the peer closes; what was read (a hang guard bounds it).
async fn until_closed(mut s: impl tokio::io::AsyncRead + Unpin) -> Vec<u8> {
    let mut out = Vec::new();
    let guard = tokio::time::timeout(std::time::Duration::from_secs(120), async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(guard.is_ok(), "the server never closed the connection");
    out
}

/// One HTTP/1.1 request on a raw TLS stream; the status of its answer.
async fn get_health<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: &mut S) -> u16 {
    s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // Headers, then exactly Content-Length bytes of body.
    loop {
        let n = s.read(&mut buf).await.unwrap();
        assert!(
            n > 0,
            "closed mid-answer: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if got.len() >= end + 4 + len {
                return text[9..12].parse().unwrap();
            }
        }
    }
}

#[tokio::test]
async fn a_client_that_never_finishes_its_handshake_is_closed() {
    let (_t, a) = Appliance::start_edited(
        |c| c.replace("[server]\n", "[server]\nhandshake_timeout_secs = 1\n"),
        "",
    );
    // TCP only: not one TLS byte.
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", a.port()))
        .await
        .unwrap();
    let got = until_closed(&mut tcp).await;
    assert!(got.is_empty(), "{got:?}");
    // The server serves the next client.
    assert_eq!(a.health().await["status"], "healthy");
}

#[tokio::test]
async fn a_client_that_stops_inside_its_headers_is_closed_unanswered() {
    let (_t, a) = Appliance::start_edited(
        |c| c.replace("[server]\n", "[server]\nheader_timeout_secs = 1\n"),
        "",
    );
    let mut s = raw_tls(&a, "127.0.0.1").await.unwrap();
    s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .unwrap();
    let got = until_closed(&mut s).await;
    assert!(
        !String::from_utf8_lossy(&got).contains("200 OK"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    assert_eq!(a.health().await["status"], "healthy");
}

#[tokio::test]
async fn a_kept_alive_connection_with_no_request_is_closed_after_its_idle_time() {
    let (_t, a) = Appliance::start_edited(
        |c| c.replace("[server]\n", "[server]\nidle_timeout_secs = 1\n"),
        "[metrics]\nlisten = \"127.0.0.1:0\"\n",
    );
    let mut s = raw_tls(&a, "127.0.0.1").await.unwrap();
    assert_eq!(get_health(&mut s).await, 200);
    // Kept alive: a second request on the same connection is answered.
    assert_eq!(get_health(&mut s).await, 200);
    // Then nothing: the server closes it (by the request-level idle
    // watch or the byte-level one below hyper, whichever fires first) and
    // no connection is left open.
    let got = until_closed(&mut s).await;
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    a.wait_connections(0).await;
}

#[tokio::test]
async fn past_max_connections_a_client_waits_for_a_free_slot_and_is_then_served() {
    let (_t, a) = Appliance::start_edited(
        |c| c.replace("[server]\n", "[server]\nmax_connections = 2\n"),
        "[limits]\nmax_connections_per_ip = 0\n",
    );
    let mut first = raw_tls(&a, "127.0.0.1").await.unwrap();
    let mut second = raw_tls(&a, "127.0.0.1").await.unwrap();
    assert_eq!(get_health(&mut first).await, 200);
    assert_eq!(get_health(&mut second).await, 200);
    // A third: its TCP connect lands in the backlog; its handshake waits.
    let a2 = &a;
    let third = raw_tls(a2, "127.0.0.1");
    tokio::pin!(third);
    // While both slots are held, the server answers 20 requests on the
    // first connection and the third handshake still has not completed
    // (a server without the cap would have finished it long before).
    for _ in 0..20 {
        tokio::select! {
            biased;
            r = &mut third => panic!("the third connection was served past max_connections: {:?}", r.is_ok()),
            st = get_health(&mut first) => assert_eq!(st, 200),
        }
    }
    // A slot frees: the third is served.
    drop(second);
    let mut third = third.await.unwrap();
    assert_eq!(get_health(&mut third).await, 200);
}
