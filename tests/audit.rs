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
    {
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
        let mut rec = read.clone();
        rec["service"] = json!("someone-else");
        let raw = serde_json::to_vec(&rec).unwrap();
        trail.put(&mut wtxn, &victim.to_be_bytes(), &raw).unwrap();
        wtxn.commit().unwrap();
    }
    let out = cli(&["--config", cfg, "audit", "verify"]);
    assert!(!out.status.success(), "a tampered trail verified");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("record {victim}: altered")), "{err}");
}
