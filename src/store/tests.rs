use super::*;
use serde_json::json;

/// The LMDB engine indexes its databases by a table's position in
/// `Table::ALL`.
#[test]
fn every_table_is_listed_once_in_declaration_order() {
    for (i, t) in Table::ALL.into_iter().enumerate() {
        assert_eq!(t as usize, i, "{t:?}");
    }
    let names: std::collections::HashSet<_> = Table::ALL.iter().map(|t| t.name()).collect();
    assert_eq!(names.len(), Table::ALL.len());
}

fn open() -> (tempfile::TempDir, Store) {
    let d = tempfile::tempdir().unwrap();
    let s = Store::open(d.path(), 16 << 20).unwrap();
    (d, s)
}

fn project_audit(_k: &[u8], v: &[u8]) -> Result<Value, StoreError> {
    Ok(serde_json::from_slice(v).unwrap())
}

fn project_plain(k: &[u8], v: &[u8]) -> Result<Value, StoreError> {
    let data: Value = serde_json::from_slice(v).unwrap();
    Ok(json!({"key": String::from_utf8_lossy(k), "data": data}))
}

#[tokio::test]
async fn audit_duplicates_kept_and_cursor_walk_is_exact() {
    let (_d, s) = open();
    // 30 events over 5 distinct timestamps, several per timestamp.
    for i in 0..30u32 {
        let ts = format!("2026-02-15T10:30:0{}Z", i % 5);
        s.audit_append(
            ts,
            json!({"i": i, "source": if i % 2 == 0 {"agent"} else {"direct"}}),
        )
        .await
        .unwrap();
    }
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = s
            .list(
                Collection::Audit,
                Some(7),
                after.as_deref(),
                None,
                "data",
                &project_audit,
            )
            .unwrap();
        assert_eq!(page.pagination.total_count, 30);
        for it in &page.items {
            seen.push((
                it["key"].as_str().unwrap().to_string(),
                it["data"]["i"].as_u64().unwrap(),
            ));
        }
        if !page.pagination.has_more {
            break;
        }
        after = page.pagination.next_cursor.clone();
    }
    assert_eq!(seen.len(), 30, "no item skipped or repeated");
    let mut ids: Vec<u64> = seen.iter().map(|x| x.1).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 30);
    // Newest first: keys never increase; within a timestamp, later arrivals first.
    for w in seen.windows(2) {
        assert!(w[0].0 >= w[1].0);
        if w[0].0 == w[1].0 {
            assert!(w[0].1 > w[1].1);
        }
    }
    // Filters AND-ed and counted.
    let mut f = Map::new();
    f.insert("source".into(), json!("agent"));
    let page = s
        .list(
            Collection::Audit,
            Some(3),
            None,
            Some(&f),
            "data",
            &project_audit,
        )
        .unwrap();
    assert_eq!(page.pagination.total_count, 15);
    assert!(page.pagination.has_more);
    assert!(page.items.iter().all(|i| i["data"]["source"] == "agent"));
    // A bare timestamp cursor means "strictly older".
    let page = s
        .list(
            Collection::Audit,
            None,
            Some("2026-02-15T10:30:02Z"),
            None,
            "data",
            &project_audit,
        )
        .unwrap();
    assert_eq!(page.items.len(), 12);
    assert!(page
        .items
        .iter()
        .all(|i| i["key"].as_str().unwrap() < "2026-02-15T10:30:02Z"));
    // get returns the newest event under a key.
    assert_eq!(
        s.audit_get("2026-02-15T10:30:04Z").unwrap().unwrap()["i"],
        29
    );
}

#[tokio::test]
async fn ascending_listing_with_cursor() {
    let (_d, s) = open();
    for k in ["b", "a", "d", "c", "e"] {
        let (k2, v) = (k.to_string(), serde_json::to_vec(&json!({"n": k})).unwrap());
        s.write(move |w| w.put(Table::ProxyConfigs, k2.as_bytes(), &v))
            .await
            .unwrap();
    }
    let p = s
        .list(
            Collection::ProxyConfigs,
            Some(2),
            None,
            None,
            "data",
            &project_plain,
        )
        .unwrap();
    assert_eq!(
        p.items
            .iter()
            .map(|i| i["key"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert_eq!(p.pagination.next_cursor.as_deref(), Some("b"));
    let p = s
        .list(
            Collection::ProxyConfigs,
            Some(2),
            Some("d"),
            None,
            "data",
            &project_plain,
        )
        .unwrap();
    assert_eq!(p.items.len(), 1);
    assert!(!p.pagination.has_more);
    assert_eq!(p.pagination.total_count, 5);
}

#[tokio::test]
async fn replay_memory_refuses_reuse_and_expires() {
    // Durability across a restart or kill -9 is covered by the integration tests.
    let (_d, s) = open();
    assert!(s
        .replay_remember(ReplayNs::RequestId, "req_1", 1000, 500)
        .await
        .unwrap());
    assert!(!s
        .replay_remember(ReplayNs::RequestId, "req_1", 1000, 600)
        .await
        .unwrap());
    // Another namespace is separate.
    assert!(s
        .replay_remember(ReplayNs::TicketNonce, "req_1", 1000, 600)
        .await
        .unwrap());
    assert!(s.replay_seen(ReplayNs::RequestId, "req_1", 700).unwrap());
    assert!(!s.replay_seen(ReplayNs::RequestId, "req_1", 1000).unwrap());
    // Expired ids may be reused, and pruning removes them.
    assert_eq!(s.prune(2000).await.unwrap(), 2);
    assert!(s
        .replay_remember(ReplayNs::RequestId, "req_1", 3000, 2000)
        .await
        .unwrap());
}

#[tokio::test]
async fn concurrent_writes_are_group_committed_and_all_land() {
    let (_d, s) = open();
    let mut tasks = Vec::new();
    for i in 0..400u32 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.replay_remember(ReplayNs::RequestId, &format!("req_{i}"), 10_000, 1)
                .await
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap().unwrap());
    }
    assert_eq!(s.read().unwrap().len(Table::Replay).unwrap(), 400);
}

#[tokio::test]
async fn map_full_fails_cleanly_and_keeps_earlier_data() {
    let d = tempfile::tempdir().unwrap();
    let s = Store::open(d.path(), 1 << 20).unwrap();
    s.write(|w| w.put(Table::VaultConfig, b"settings", b"{\"a\":1}"))
        .await
        .unwrap();
    let big = vec![7u8; 4 << 20];
    let err = s
        .write(move |w| w.put(Table::VaultConfig, b"big", &big))
        .await
        .unwrap_err();
    assert_eq!(err, StoreError::Full);
    // Small writes still work and the earlier value is intact.
    s.write(|w| w.put(Table::VaultConfig, b"small", b"{}"))
        .await
        .unwrap();
    assert_eq!(
        s.get_raw(Collection::VaultConfig, "settings")
            .unwrap()
            .unwrap(),
        b"{\"a\":1}"
    );
    assert!(s.get_raw(Collection::VaultConfig, "big").unwrap().is_none());
}

#[tokio::test]
async fn a_failing_job_does_not_fail_its_batch() {
    let (_d, s) = open();
    let mut tasks = Vec::new();
    for i in 0..50u32 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.write(move |w| {
                w.put(Table::VaultConfig, format!("k{i}").as_bytes(), b"1")?;
                if i % 5 == 0 {
                    return Err(StoreError::Corrupt("test"));
                }
                Ok(())
            })
            .await
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.unwrap().is_ok(), i % 5 != 0);
    }
    assert_eq!(s.count(Collection::VaultConfig).unwrap(), 40);
    assert!(s.get_raw(Collection::VaultConfig, "k5").unwrap().is_none());
}

#[tokio::test]
async fn bind_code_lifecycle() {
    let (_d, s) = open();
    let rec = BindCode {
        expires_at: 100,
        used: false,
        sealed_secret: "abc".into(),
    };
    s.put_bind_code("c1", &rec).await.unwrap();
    assert_eq!(
        s.complete_binding("nope", "k1", 50).await.unwrap(),
        BindOutcome::Expired
    );
    assert_eq!(
        s.complete_binding("c1", "k1", 100).await.unwrap(),
        BindOutcome::Expired
    );
    assert_eq!(
        s.complete_binding("c1", "k1", 50).await.unwrap(),
        BindOutcome::Bound { previous: None }
    );
    assert_eq!(
        s.complete_binding("c1", "k2", 50).await.unwrap(),
        BindOutcome::Used
    );
    assert!(s.bind_code("c1").unwrap().unwrap().sealed_secret.is_empty());
    assert_eq!(s.meta_get(META_HMAC_KEY_ID).unwrap().unwrap(), b"k1");
}

/// The listing items always match the documents: after writes, deletes and
/// replaces, and when an older store (documents only) is opened.
#[tokio::test]
async fn token_listing_items_follow_every_token_write() {
    let (_d, s) = open();
    let doc = |name: &str| {
        serde_json::to_vec(&json!({"v":1,"alg":"none","meta":{"tokenType":"JWT","displayName":name,"accessToken":"never"}}))
            .unwrap()
    };
    for k in ["a", "b", "c"] {
        let raw = doc(k);
        let k = k.to_string();
        s.write(move |w| super::put_token_doc(w, &k, &raw))
            .await
            .unwrap();
    }
    s.delete_token("b".into()).await.unwrap();
    let items = |s: &Store| s.read().unwrap().rows(Table::TokenItems).unwrap();
    let expected = |s: &Store| {
        let r = s.read().unwrap();
        let mut out = Vec::new();
        for (k, v) in r.rows(Table::Tokens).unwrap() {
            let policy = r.get(Table::Policies, &k).unwrap().is_some();
            let item = crate::protocol::document::list_item(&k, &v, policy).unwrap();
            out.push((k, item));
        }
        out
    };
    assert_eq!(items(&s).len(), 2);
    assert_eq!(items(&s), expected(&s));
    assert!(!String::from_utf8(items(&s)[0].1.clone())
        .unwrap()
        .contains("never"));

    // An older store: documents without items and without the marker.
    let raw = doc("old");
    s.write(move |w| {
        w.put(Table::Tokens, b"old", &raw)?;
        w.clear(Table::TokenItems)?;
        w.delete(Table::Meta, META_TOKEN_ITEMS)?;
        super::ensure_token_items(w)
    })
    .await
    .unwrap();
    assert_eq!(items(&s).len(), 3);
    assert_eq!(items(&s), expected(&s));

    // An owner policy shows as `ownerPolicy` in the item (set before or
    // after the token is written), and goes with the policy.
    let has_flag = |s: &Store, k: &[u8]| {
        let all = items(s);
        let item = &all.iter().find(|(key, _)| key == k).unwrap().1;
        let v: Value = serde_json::from_slice(item).unwrap();
        v["meta"].get("ownerPolicy").cloned()
    };
    // The policy writes are the CLI's (blocking) ones.
    let put = |s: &Store, k: &str| {
        let (s, k) = (s.clone(), k.to_string());
        tokio::task::spawn_blocking(move || s.policy_put_blocking(k, b"{}".to_vec()))
    };
    put(&s, "a").await.unwrap().unwrap();
    put(&s, "later").await.unwrap().unwrap();
    let raw = doc("later");
    s.write(move |w| super::put_token_doc(w, "later", &raw))
        .await
        .unwrap();
    assert_eq!(has_flag(&s, b"a"), Some(json!(true)));
    assert_eq!(has_flag(&s, b"later"), Some(json!(true)));
    assert_eq!(has_flag(&s, b"c"), None);
    assert_eq!(items(&s), expected(&s));
    let s2 = s.clone();
    let had = tokio::task::spawn_blocking(move || s2.policy_delete_blocking("a".into()));
    assert!(had.await.unwrap().unwrap());
    assert_eq!(has_flag(&s, b"a"), None);
    assert_eq!(items(&s), expected(&s));
    // A policy for a service without a token leaves the listing alone.
    put(&s, "none-yet").await.unwrap().unwrap();
    assert_eq!(items(&s).len(), 4);
}

#[tokio::test]
async fn trail_chain_verifies_and_any_change_breaks_it() {
    use super::trail::{TrailEvent, TrailNote};
    let (_d, s) = open();
    for i in 0..5 {
        s.trail_append(TrailEvent {
            ts: 1_000 + i,
            event: "credential_read",
            status: 200,
            note: TrailNote {
                service: Some(format!("svc{i}")),
                sub: Some("user-1".into()),
                ..Default::default()
            },
            peer: Some("127.0.0.1".into()),
        });
    }
    // FIFO writer: this commit lands after the appends.
    s.write(|_| Ok(())).await.unwrap();
    let r = s.trail_verify().unwrap();
    assert_eq!((r.records, r.head.seq), (5, 5));
    let mac = |m: &[u8]| Some(<[u8; 32]>::try_from(&sha2::Sha256::digest(m)[..]).unwrap());
    use sha2::Digest;
    assert_eq!(s.trail_sign_head(2_000, mac).await.unwrap().unwrap().seq, 5);
    assert_eq!(s.trail_verify().unwrap().signed.unwrap().seq, 5);
    assert_eq!(s.trail_tail(2).unwrap()[1].service.as_deref(), Some("svc4"));

    // Retention keeps the signed record: drop 1..=3, anchor at 3.
    assert_eq!(s.trail_prune(1_003).await.unwrap(), 3);
    let r = s.trail_verify().unwrap();
    assert_eq!((r.anchor.seq, r.records), (3, 2));

    // An altered record.
    let raw = {
        s.read()
            .unwrap()
            .get_owned(Table::Trail, &4u64.to_be_bytes())
            .unwrap()
            .unwrap()
    };
    let mut rec: super::trail::TrailRecord = serde_json::from_slice(&raw).unwrap();
    rec.service = Some("someone-else".into());
    let tampered = serde_json::to_vec(&rec).unwrap();
    s.write(move |w| w.put(Table::Trail, &4u64.to_be_bytes(), &tampered))
        .await
        .unwrap();
    let e = s.trail_verify().unwrap_err();
    assert!(e.contains("record 4: altered"), "{e}");
    // A removed record.
    s.write(move |w| {
        w.put(Table::Trail, &4u64.to_be_bytes(), &raw)?;
        w.delete(Table::Trail, &5u64.to_be_bytes())?;
        Ok(())
    })
    .await
    .unwrap();
    let e = s.trail_verify().unwrap_err();
    assert!(e.contains("head says 5"), "{e}");
}

#[tokio::test]
async fn trail_stays_within_its_share_and_still_verifies() {
    use super::trail::{TrailEvent, TrailNote};
    use sha2::Digest;
    // A 16 MiB map, the trail bounded to 5 % of it (about 800 KiB).
    let (_d, s) = open();
    s.set_trail_bound(5, 10);
    let budget = (16u64 << 20) / 100 * 5;
    let trail_bytes = |s: &Store| s.read().unwrap().footprint(Table::Trail).unwrap().unwrap();
    let mac = |m: &[u8]| Some(<[u8; 32]>::try_from(&sha2::Sha256::digest(m)[..]).unwrap());
    let mut seen_over = 0;
    for round in 0..40u32 {
        for i in 0..250u32 {
            s.trail_append(TrailEvent {
                ts: 1_000,
                event: "credential_read",
                status: 200,
                note: TrailNote {
                    service: Some(format!("service-{round}-{i}")),
                    sub: Some("user-with-a-longer-subject-1".into()),
                    authenticated: true,
                    ..Default::default()
                },
                peer: Some("127.0.0.1".into()),
            });
        }
        s.write(|_| Ok(())).await.unwrap();
        if trail_bytes(&s) > budget {
            seen_over += 1;
        }
        if round == 5 {
            // A signed head that the bound later drops.
            s.trail_sign_head(1_001, mac).await.unwrap();
        }
    }
    assert_eq!(seen_over, 0, "the trail never ended a batch over its bound");
    assert!(s.trail_pruned() > 0, "10,000 records do not fit in 800 KiB");
    let r = s.trail_verify().unwrap();
    assert_eq!(r.head.seq, 10_000);
    assert_eq!(r.anchor.seq + r.records, r.head.seq);
    assert!(r.anchor.seq > 0);
    assert!(r.signed.is_none(), "the dropped signed head was removed");
    // Signing again covers the retained chain.
    s.trail_sign_head(1_002, mac).await.unwrap();
    assert_eq!(s.trail_verify().unwrap().signed.unwrap().seq, 10_000);
}

#[test]
fn trail_budget_never_takes_the_reserve() {
    let b = super::trail::TrailBound {
        capacity: 1000 << 20,
        share_percent: 20,
        reserve_percent: 10,
    };
    assert_eq!(b.budget(0), 200 << 20);
    // The rest of the store uses 800 MiB: only 100 MiB are left before the
    // reserve (the last 100 MiB).
    assert_eq!(b.budget(800 << 20), 100 << 20);
    assert_eq!(b.budget(950 << 20), 0);
}

#[tokio::test]
async fn a_key_past_the_store_limit_is_key_too_long_not_an_internal_error() {
    let (_d, s) = open();
    let long = "k".repeat(MAX_KEY_BYTES + 1);
    // (LMDB checks the key's size once the database has a record.)
    s.write(move |w| w.put(Table::ProxyConfigs, b"p1", b"{}"))
        .await
        .unwrap();
    assert_eq!(
        s.get_raw(Collection::ProxyConfigs, &long),
        Err(StoreError::KeyTooLong)
    );
    let k = long.clone();
    assert_eq!(
        s.write(move |w| w.put(Table::VaultConfig, k.as_bytes(), b"{}"))
            .await,
        Err(StoreError::KeyTooLong)
    );
    // The store still works after both.
    s.write(move |w| w.put(Table::VaultConfig, b"short", b"{}"))
        .await
        .unwrap();
    assert!(s
        .get_raw(Collection::VaultConfig, "short")
        .unwrap()
        .is_some());
}
