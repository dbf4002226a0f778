//! `audit verify` and `audit tail`: the appliance's own trail.

use super::device::open_device;
use super::setup::{load_for_run, open_store, refuse_root};
use super::AuditAction;
use anyhow::{anyhow, bail, Result};
use std::path::Path;

pub fn run(config: &Path, action: AuditAction) -> Result<()> {
    let cfg = load_for_run(config)?;
    refuse_root(&cfg)?;
    let store = open_store(&cfg)?;
    match action {
        AuditAction::Export { since } => {
            let from = parse_time(&since)?;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let mut after = 0;
            loop {
                let batch = store.trail_after(after, 1000)?;
                let Some(last) = batch.last().map(|r| r.seq) else {
                    break;
                };
                for r in batch.iter().filter(|r| r.ts >= from) {
                    serde_json::to_writer(&mut out, r)?;
                    std::io::Write::write_all(&mut out, b"\n")?;
                }
                after = last;
            }
            std::io::Write::flush(&mut out)?;
            Ok(())
        }
        AuditAction::Tail { lines } => {
            for r in store.trail_tail(lines)? {
                println!("{}", serde_json::to_string(&r)?);
            }
            Ok(())
        }
        AuditAction::Verify => {
            let report = store
                .trail_verify()
                .map_err(|e| anyhow!("audit trail BROKEN: {e}"))?;
            let signature = match &report.signed {
                None => "no signed head yet".to_string(),
                Some(s) => {
                    let backend = open_device(&cfg)?.backend();
                    let key = store
                        .meta_get(crate::store::META_HMAC_KEY_ID)?
                        .ok_or_else(|| anyhow!("the trail has a signed head but the appliance is not bound: cannot check it"))?;
                    backend.activate_hmac(&crate::keys::HmacKeyId(
                        String::from_utf8_lossy(&key).into_owned(),
                    ))?;
                    let mac =
                        backend.hmac_sha256(&crate::store::trail::head_message(s.seq, &s.hash))?;
                    let given = hex::decode(&s.mac).unwrap_or_default();
                    if !crate::protocol::signature::mac_eq(&mac, &given) {
                        bail!("audit trail BROKEN: the signature of the head (record {}) does not verify with this appliance's HMAC key (re-bound since? then it was signed with the previous key)", s.seq);
                    }
                    format!("head record {} signed and verified", s.seq)
                }
            };
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "ok": true,
                    "records": report.records,
                    "from": report.anchor.seq + 1,
                    "to": report.head.seq,
                    "signature": signature,
                    "unsignedAfterHead": report.signed.as_ref().map_or(report.head.seq, |s| report.head.seq - s.seq),
                }))?
            );
            Ok(())
        }
    }
}

/// RFC 3339 or unix seconds.
fn parse_time(s: &str) -> Result<i64> {
    if let Ok(n) = s.parse::<i64>() {
        return Ok(n);
    }
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp())
        .map_err(|_| anyhow!("--since {s:?}: give RFC 3339 (2026-12-01T00:00:00Z) or unix seconds"))
}
