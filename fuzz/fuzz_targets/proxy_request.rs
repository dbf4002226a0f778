//! /v1/proxy request bodies: the decode before the ticket, then the upstream
//! request it asks for (URL, method, body, headers).
#![no_main]
use libfuzzer_sys::fuzz_target;
use tokenvault_webhook::broker::proxy::{ProxyCall, METHODS};

const HOP_BY_HOP: &[&str] = &["connection", "host", "transfer-encoding", "content-length", "upgrade", "te"];

fuzz_target!(|data: &[u8]| {
    let Ok(call) = ProxyCall::decode(data) else {
        return;
    };
    assert!(!call.service.is_empty() && !call.ticket.is_empty());
    let Ok(out) = call.outbound() else {
        return;
    };
    assert!(matches!(out.url.scheme(), "http" | "https"));
    assert!(out.url.host_str().is_some());
    assert!(out.url.username().is_empty() && out.url.password().is_none());
    assert!(METHODS.contains(&out.method.as_str()));
    for (name, value) in &out.headers {
        assert!(!HOP_BY_HOP.contains(&name.as_str()), "hop-by-hop header {name} kept");
        assert!(!value.as_bytes().iter().any(|b| matches!(b, b'\r' | b'\n' | 0)));
    }
});
