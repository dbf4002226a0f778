#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The appliance's own audit trail on the real binary: events recorded with
//! who and what, the head signed with the HSM's HMAC key, `audit verify`
//! and `audit tail`, and tampering detected.

mod harness;

use harness::*;
use serde_json::{json, Value};

#[tokio::test]
async fn every_credential_event_is_chained_signed_and_verifiable() {
    let (_tmp, mut a) = Appliance::start_configured(
        "[audit]\nsign_every_secs = 1\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
    );
    a.bind().await;
    let (s, _) = a
        .store("github", json!({"accessToken": "gho_audit_canary"}))
        .await;
    assert_eq!(s, 200);
    let (s, _) = a.credential("github", "").await;
    assert_eq!(s, 200);
    // A read that proved its ticket but failed is recorded; one whose
    // ticket proves nothing is only counted (it costs no durable bytes).
    let (s, _) = a.credential("absent", "").await;
    assert_eq!(s, 404);
    let (s, _) = a.credential("github", "&ticket=bad").await;
    assert!(s >= 400);
    // The event: all four records written and the head signed over them.
    a.wait_metrics("the trail's head signed at record 4", |m| {
        metric(m, "tvw_audit_trail_head_seq") == 4 && metric(m, "tvw_audit_trail_signed_seq") == 4
    })
    .await;
    a.terminate();
    let _tpm = start_swtpm_for(&a.dir);
    let cfg = a.config();
    let cfg = cfg.to_str().unwrap();

    let v = cli_json(&["--config", cfg, "audit", "verify"]);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(
        v["records"].as_u64().unwrap(),
        4,
        "bind, store, two reads: {v}"
    );
    assert!(
        v["signature"]
            .as_str()
            .unwrap()
            .contains("signed and verified"),
        "{v}"
    );

    let out = cli(&["--config", cfg, "audit", "tail", "-n", "50"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        !text.contains("gho_audit_canary"),
        "a credential in the trail"
    );
    let events: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert!(kinds.contains(&"bind"), "{kinds:?}");
    assert!(kinds.contains(&"store"), "{kinds:?}");
    let read = events
        .iter()
        .find(|e| e["event"] == "credential_read" && e["status"] == 200)
        .expect("a successful read");
    assert_eq!(read["service"], "github");
    assert_eq!(read["sub"], "user-1");
    assert_eq!(read["purpose"], "agent_credential");
    assert_eq!(read["peer"], "127.0.0.1");
    let failed: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "credential_read" && e["status"].as_u64().unwrap() >= 400)
        .collect();
    assert_eq!(
        failed.len(),
        1,
        "only the read with a valid ticket: {failed:?}"
    );
    assert_eq!(failed[0]["service"], "absent");
    assert_eq!(failed[0]["status"], 404);
    for w in events.windows(2) {
        assert_eq!(w[1]["prev"], w[0]["hash"], "chain link");
        assert_eq!(
            w[1]["seq"].as_u64().unwrap(),
            w[0]["seq"].as_u64().unwrap() + 1
        );
    }

    // Tamper with one record: verify fails and says which.
    let victim = read["seq"].as_u64().unwrap();
    let mut rec = read.clone();
    rec["service"] = json!("someone-else");
    let raw = serde_json::to_vec(&rec).unwrap();
    if let Some(pg) = &a.pg {
        // As someone with the database's password would: straight into
        // the table.
        pg.sql(&format!(
            "UPDATE tvw_kv SET v = '\\x{}'::bytea WHERE tbl = 'trail' AND k = '\\x{}'::bytea",
            hex::encode(&raw),
            hex::encode(victim.to_be_bytes())
        ));
    } else {
        // As someone with the disk would: straight into the LMDB file.
        let mut opts = heed::EnvOpenOptions::new();
        opts.map_size(256 << 20).max_dbs(16);
        let env = unsafe { opts.open(a.dir.join("state")) }.unwrap();
        let wtxn = env.write_txn().unwrap();
        let trail: heed::Database<heed::types::Bytes, heed::types::Bytes> = env
            .create_databases_and_commit(wtxn, |wdo, wtxn| {
                wdo.create_database(wtxn, Some("trail"))
                    .map(heed::CommitOrAbort::<_, ()>::Commit)
            })
            .unwrap()
            .unwrap_commit();
        let mut wtxn = env.write_txn().unwrap();
        trail.put(&mut wtxn, &victim.to_be_bytes(), &raw).unwrap();
        wtxn.commit().unwrap();
    }
    let out = cli(&["--config", cfg, "audit", "verify"]);
    assert!(!out.status.success(), "a tampered trail verified");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("record {victim}: altered")), "{err}");
}

#[tokio::test]
async fn the_trail_streams_to_syslog_and_a_file_and_a_failing_sink_holds_nothing_up() {
    let out = tempfile::tempdir().unwrap();
    let sock_path = out.path().join("log.sock");
    let file = out.path().join("export").join("audit.jsonl");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let (_tmp, mut a) = Appliance::start_configured(&format!(
        "[audit]\nsyslog = true\nsyslog_socket = {:?}\nexport_file = {:?}\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
        sock_path.to_str().unwrap(),
        file.to_str().unwrap()
    ));
    let since = now();
    a.bind().await;
    a.store_ok("github", json!({"accessToken": "gho_export_canary"}))
        .await;
    assert_eq!(a.credential("github", "").await.0, 200);
    // The event: bind, store and read exported.
    a.wait_metrics("three records exported", |m| {
        metric(m, "tvw_audit_exported_total") >= 3
    })
    .await;
    let lines: Vec<Value> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let read = lines
        .iter()
        .find(|r| r["event"] == "credential_read")
        .expect("the read in the file")
        .clone();
    assert_eq!(read["service"], "github");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // The same records as RFC 5424 datagrams, the record as JSON.
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    while got.len() < lines.len() {
        let n = sock.recv(&mut buf).unwrap();
        got.push(String::from_utf8(buf[..n].to_vec()).unwrap());
    }
    let syslog_read = got
        .iter()
        .find(|l| l.contains(" credential_read "))
        .expect("the read in syslog");
    assert!(syslog_read.starts_with("<86>1 "), "{syslog_read}");
    assert!(syslog_read.contains(&format!("seq=\"{}\"", read["seq"])));
    let json: Value =
        serde_json::from_str(&syslog_read[syslog_read.find("] {").unwrap() + 2..]).unwrap();
    assert_eq!(json, read);
    for l in got.iter().chain(std::fs::read_to_string(&file).iter()) {
        assert!(!l.contains("gho_export_canary"));
    }
    // The syslog socket goes away: requests are served as before, the
    // failure is counted; records wait and go once it is back.
    drop(sock);
    std::fs::remove_file(&sock_path).unwrap();
    assert_eq!(a.credential("github", "").await.0, 200);
    a.wait_metrics("a failed export", |m| {
        metric(m, "tvw_audit_export_failures_total") >= 1
    })
    .await;
    assert_eq!(a.credential("github", "").await.0, 200);
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut reads = 0;
    while reads < 2 {
        let n = sock.recv(&mut buf).unwrap();
        if String::from_utf8_lossy(&buf[..n]).contains(" credential_read ") {
            reads += 1;
        }
    }
    // audit export: the trail since a time, from the store, as JSON lines.
    let exported = a.cli_ok(&["audit", "export", "--since", &since.to_string()]);
    let recs: Vec<Value> = exported
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(recs.iter().all(|r| r["ts"].as_i64().unwrap() >= since));
    assert_eq!(
        recs.iter()
            .filter(|r| r["event"] == "credential_read")
            .count(),
        3,
        "{exported}"
    );
    assert!(recs
        .windows(2)
        .all(|w| w[1]["seq"].as_u64() > w[0]["seq"].as_u64()));
    let later = a.cli_ok(&["audit", "export", "--since", "2999-01-01T00:00:00Z"]);
    assert!(later.is_empty());
    assert!(a
        .cli_err(&["audit", "export", "--since", "yesterday"])
        .contains("RFC 3339"));
}
