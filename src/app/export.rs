//! The audit trail off the box: every committed trail record, in order,
//! to the local syslog (RFC 5424, the record as JSON) and/or an
//! append-only file of JSON lines. A follower of the store, not a step of
//! a request: it reads what is committed, sends it, and only then moves its
//! cursor (kept in the store), so a record is sent at least once and a
//! failing sink never slows or fails a request. Failures are counted and
//! logged, and retried on the next tick.

use crate::store::trail::TrailRecord;
use crate::store::Store;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

const META_EXPORTED: &[u8] = b"audit_exported_seq";
/// Records sent per tick.
const BATCH: usize = 512;

/// Where records go.
#[derive(Debug, Clone)]
pub enum Sink {
    /// A unix datagram socket speaking syslog (`/dev/log`).
    Syslog(PathBuf),
    /// A file records are appended to.
    File(PathBuf),
}

/// One RFC 5424 line: `<PRI>1 TIMESTAMP HOST APP PROCID MSGID [SD] MSG`,
/// facility authpriv (10), severity info (6), the record as JSON.
pub fn rfc5424(r: &TrailRecord, host: &str, pid: u32) -> Result<String, serde_json::Error> {
    let json = serde_json::to_string(r)?;
    // SD-PARAM values escape '"', '\' and ']' (RFC 5424 §6.3.3).
    let esc = |s: &str| {
        s.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace(']', "\\]")
    };
    let printable = |s: &str, max: usize| -> String {
        let t: String = s
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(max)
            .collect();
        if t.is_empty() {
            "-".into()
        } else {
            t
        }
    };
    Ok(format!(
        "<{}>1 {} {} tokenvault-webhook {pid} {} [tvw@32473 seq=\"{}\" status=\"{}\"{}] {json}",
        10 * 8 + 6,
        crate::clock::rfc3339(r.ts),
        printable(host, 255),
        printable(&r.event, 32),
        r.seq,
        r.status,
        r.service
            .as_deref()
            .map(|s| format!(" service=\"{}\"", esc(s)))
            .unwrap_or_default(),
    ))
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "-".into())
}

fn send(sink: &Sink, records: &[TrailRecord], host: &str) -> std::io::Result<()> {
    match sink {
        Sink::Syslog(path) => {
            let sock = std::os::unix::net::UnixDatagram::unbound()?;
            sock.connect(path)?;
            for r in records {
                let line = rfc5424(r, host, std::process::id()).map_err(std::io::Error::other)?;
                sock.send(line.as_bytes())?;
            }
            Ok(())
        }
        Sink::File(path) => {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o600)
                .open(path)?;
            let mut buf = Vec::new();
            for r in records {
                serde_json::to_writer(&mut buf, r).map_err(std::io::Error::other)?;
                buf.push(b'\n');
            }
            f.write_all(&buf)?;
            f.sync_data()
        }
    }
}

/// Runs for the life of the server: every `every`, sends what was
/// committed since the cursor.
pub async fn run(
    store: Store,
    sinks: Vec<Sink>,
    metrics: Arc<super::metrics::Metrics>,
    every: std::time::Duration,
) {
    let host = host_name();
    // The first start exports from the present: history is `audit export`'s.
    let mut cursor = match store.meta_get(META_EXPORTED) {
        Ok(Some(v)) => v.try_into().map(u64::from_be_bytes).unwrap_or(0),
        _ => store.trail_seqs().map(|(head, _)| head).unwrap_or(0),
    };
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let batch = match store.trail_after(cursor, BATCH) {
            Ok(b) if b.is_empty() => continue,
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "audit export: reading the trail failed");
                continue;
            }
        };
        let last = batch.last().map_or(cursor, |r| r.seq);
        let (s2, h2) = (sinks.clone(), host.clone());
        let sent = tokio::task::spawn_blocking(move || {
            s2.iter()
                .map(|s| (s.clone(), send(s, &batch, &h2)))
                .filter_map(|(s, r)| r.err().map(|e| (s, e)))
                .collect::<Vec<_>>()
        })
        .await;
        match sent {
            Ok(failed) if failed.is_empty() => {
                metrics
                    .export
                    .sent
                    .fetch_add(last.saturating_sub(cursor), Ordering::Relaxed);
                cursor = last;
                if let Err(e) = store
                    .meta_set(META_EXPORTED, cursor.to_be_bytes().to_vec())
                    .await
                {
                    tracing::warn!(error = %e, "audit export: saving the cursor failed");
                }
            }
            Ok(failed) => {
                metrics.export.failures.fetch_add(1, Ordering::Relaxed);
                for (s, e) in failed {
                    tracing::warn!(sink = ?s, error = %e, "audit export failed; retrying");
                }
            }
            Err(_) => {
                metrics.export.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_one_rfc5424_line_with_the_record_as_json() {
        let r = TrailRecord {
            seq: 7,
            ts: 1_800_000_000,
            event: "credential_read".into(),
            status: 403,
            service: Some("a\"b]c".into()),
            sub: Some("u".into()),
            aid: None,
            purpose: Some("agent_credential".into()),
            result: None,
            peer: None,
            policy: Some("denied: outside hours".into()),
            prev: "00".into(),
            hash: "ab".into(),
        };
        let line = rfc5424(&r, "box 1", 42).unwrap();
        assert!(line.starts_with("<86>1 2027-01-15T08:00:00Z box1 tokenvault-webhook 42 credential_read [tvw@32473 seq=\"7\" status=\"403\" service=\"a\\\"b\\]c\"] {"), "{line}");
        let json: serde_json::Value =
            serde_json::from_str(&line[line.find("] {").unwrap() + 2..]).unwrap();
        assert_eq!(json["policy"], "denied: outside hours");
        assert!(!line.contains('\n'));
    }
}
