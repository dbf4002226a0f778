//! The appliance's own audit trail: every credential read, TOTP code,
//! verify, proxy call, refresh, store and bind, append-only and hash-chained
//! (`hash = SHA-256` of the record, which holds the previous record's hash).
//! Periodically the chain head is signed with the backend's HMAC key
//! (`sign_head`); `audit verify` checks the links, the hashes and that
//! signature; retention drops the oldest records and keeps their last hash as
//! the chain's anchor.
//!
//! Records are appended by the request's middleware in the writer's next
//! group commit after the answer: a crash can lose the last few ms of
//! events, never break the chain (each append is one transaction).

use super::kv::{Read, ReadExt, Table, Write};
use super::{Store, StoreError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::cell::RefCell;

const META_HEAD: &[u8] = b"trail_head";
const META_ANCHOR: &[u8] = b"trail_anchor";
const META_SIGNED: &[u8] = b"trail_signed";
const ZERO: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Who and what, from the verified ticket, filled in while the request runs.
#[derive(Debug, Clone, Default)]
pub struct TrailNote {
    pub service: Option<String>,
    pub sub: Option<String>,
    pub aid: Option<String>,
    pub purpose: Option<String>,
    pub result: Option<String>,
    /// The owner policy's decision (allowed, denied and why, approval asked
    /// or spent), when a policy applied.
    pub policy: Option<String>,
    /// The request proved something (a valid signature, ticket or bind
    /// code). Only such requests are recorded; failures that proved nothing
    /// are counted in memory instead, so they cost no durable bytes.
    pub authenticated: bool,
}

tokio::task_local! {
    static NOTE: RefCell<TrailNote>;
}

/// Runs `f` (a request) with an empty note; returns the note it left.
pub async fn with_note<F: std::future::Future>(f: F) -> (F::Output, TrailNote) {
    NOTE.scope(RefCell::new(TrailNote::default()), async move {
        let out = f.await;
        let note = NOTE.with(|n| n.borrow().clone());
        (out, note)
    })
    .await
}

/// Changes the running request's note (no-op outside a request).
pub fn note(f: impl FnOnce(&mut TrailNote)) {
    let _ = NOTE.try_with(|n| f(&mut n.borrow_mut()));
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrailRecord {
    pub seq: u64,
    pub ts: i64,
    pub event: String,
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    pub prev: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hash: String,
}

impl TrailRecord {
    fn compute_hash(&self) -> Result<String, StoreError> {
        let mut r = self.clone();
        r.hash.clear();
        let bytes = serde_json::to_vec(&r).map_err(|_| StoreError::Corrupt("trail record"))?;
        Ok(hex::encode(Sha256::digest(&bytes)))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Link {
    pub seq: u64,
    pub hash: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignedHead {
    pub seq: u64,
    pub hash: String,
    pub ts: i64,
    pub mac: String,
}

/// What [`Store::trail_verify`] found.
#[derive(Debug)]
pub struct TrailReport {
    pub anchor: Link,
    pub head: Link,
    pub records: u64,
    pub signed: Option<SignedHead>,
}

/// The message the backend's HMAC key signs for a head.
pub fn head_message(seq: u64, hash: &str) -> Vec<u8> {
    format!("tvw-trail-head-v1:{seq}:{hash}").into_bytes()
}

fn get_link(r: &dyn Read, key: &[u8]) -> Result<Link, StoreError> {
    Ok(r.get_json(Table::Meta, key, "trail link")?
        .unwrap_or_else(|| Link {
            seq: 0,
            hash: ZERO.into(),
        }))
}

fn signed_head(r: &dyn Read) -> Result<Option<SignedHead>, StoreError> {
    r.get_json(Table::Meta, META_SIGNED, "trail signed head")
}

/// The signed head's sequence; a signed head that does not parse
/// protects nothing (`None`), an engine failure is an error.
fn signed_seq(r: &dyn Read) -> Result<Option<u64>, StoreError> {
    match signed_head(r) {
        Ok(s) => Ok(s.map(|s| s.seq)),
        Err(StoreError::Corrupt(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// An event to append (the chain fields are filled in by the writer).
#[derive(Debug, Clone)]
pub struct TrailEvent {
    pub ts: i64,
    pub event: &'static str,
    pub status: u16,
    pub note: TrailNote,
    pub peer: Option<String>,
}

/// Events waiting for the writer: one job appends all of them, so a batch
/// of requests costs one nested transaction, not one each.
#[derive(Default)]
pub struct TrailQueue {
    pending: std::sync::Mutex<Vec<TrailEvent>>,
    scheduled: std::sync::atomic::AtomicBool,
    bound: std::sync::Mutex<Option<TrailBound>>,
    /// Records dropped to keep the trail within its bound, since start.
    pruned: std::sync::atomic::AtomicU64,
}

/// The trail's size bound: at most `share_percent` of the map, and never
/// into the `reserve_percent` of the map kept for the writes that matter.
#[derive(Debug, Clone, Copy)]
pub struct TrailBound {
    pub capacity: u64,
    pub share_percent: u8,
    pub reserve_percent: u8,
}

impl TrailBound {
    /// Bytes the trail may use while the rest of the store uses `others`.
    pub fn budget(&self, others: u64) -> u64 {
        let share = self.capacity / 100 * u64::from(self.share_percent);
        let open = (self.capacity / 100 * u64::from(100 - self.reserve_percent.min(100)))
            .saturating_sub(others);
        share.min(open)
    }
}

/// Drops the oldest records while the trail is over its bound; the last
/// dropped becomes the anchor (so the chain still verifies). A signed head
/// among the dropped records is removed too: the next signing covers the
/// new head. Returns how many records were dropped.
fn enforce_bound(w: &mut dyn Write, bound: TrailBound) -> Result<u64, StoreError> {
    let Some(used) = w.footprint(Table::Trail)? else {
        return Ok(0);
    };
    let mut others = 0u64;
    for t in Table::ALL.into_iter().filter(|t| *t != Table::Trail) {
        others += w.footprint(t)?.unwrap_or(0);
    }
    let budget = bound.budget(others);
    if used <= budget {
        return Ok(0);
    }
    // Counted only when over the bound (a count is a scan on PostgreSQL).
    let entries = w.len(Table::Trail)?;
    if entries == 0 {
        return Ok(0);
    }
    // Down to 90 % of the budget, so this runs once per many appends.
    let per = (used / entries).max(1);
    let excess = used - budget / 10 * 9;
    let n = (excess / per).clamp(1, entries);
    let signed = signed_seq(&*w)?;
    let mut keys = Vec::with_capacity(n as usize);
    let mut anchor = None;
    w.each(Table::Trail, &mut |k, v| {
        let rec: TrailRecord =
            serde_json::from_slice(v).map_err(|_| StoreError::Corrupt("trail record"))?;
        keys.push(k.to_vec());
        anchor = Some(Link {
            seq: rec.seq,
            hash: rec.hash,
        });
        Ok((keys.len() as u64) < n)
    })?;
    for k in &keys {
        w.delete(Table::Trail, k)?;
    }
    if let Some(a) = anchor {
        if signed.is_some_and(|s| s <= a.seq) {
            w.delete(Table::Meta, META_SIGNED)?;
        }
        let raw = serde_json::to_vec(&a).map_err(|_| StoreError::Corrupt("trail link"))?;
        w.put(Table::Meta, META_ANCHOR, &raw)?;
    }
    Ok(keys.len() as u64)
}

fn append_one(w: &mut dyn Write, ev: TrailEvent) -> Result<(), StoreError> {
    let head = get_link(&*w, META_HEAD)?;
    let mut r = TrailRecord {
        seq: head.seq + 1,
        ts: ev.ts,
        event: ev.event.to_string(),
        status: ev.status,
        service: ev.note.service,
        sub: ev.note.sub,
        aid: ev.note.aid,
        purpose: ev.note.purpose,
        result: ev.note.result,
        policy: ev.note.policy,
        peer: ev.peer,
        prev: head.hash,
        hash: String::new(),
    };
    r.hash = r.compute_hash()?;
    let raw = serde_json::to_vec(&r).map_err(|_| StoreError::Corrupt("trail record"))?;
    w.put(Table::Trail, &r.seq.to_be_bytes(), &raw)?;
    let link = serde_json::to_vec(&Link {
        seq: r.seq,
        hash: r.hash,
    })
    .map_err(|_| StoreError::Corrupt("trail link"))?;
    w.put(Table::Meta, META_HEAD, &link)
}

impl Store {
    /// Bounds the trail's size (see [`TrailBound`]); without a bound it is
    /// limited by retention alone.
    pub fn set_trail_bound(&self, share_percent: u8, reserve_percent: u8) {
        if let Ok(mut b) = self.trail_queue.bound.lock() {
            *b = Some(TrailBound {
                capacity: self.usage().capacity,
                share_percent,
                reserve_percent,
            });
        }
    }

    /// Records dropped by the size bound since start.
    /// The trail's head sequence and the last signed one (0: none yet),
    /// for metrics: a signing that caught up shows as equal numbers.
    pub fn trail_seqs(&self) -> Result<(u64, u64), StoreError> {
        let r = self.read()?;
        let head = get_link(&*r, META_HEAD)?.seq;
        let signed = signed_head(&*r)?.map_or(0, |s| s.seq);
        Ok((head, signed))
    }

    pub fn trail_pruned(&self) -> u64 {
        self.trail_queue
            .pruned
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Queues an event for the next group commit (not awaited). All events
    /// queued by then are appended by one job, in queue order.
    pub fn trail_append(&self, ev: TrailEvent) {
        let q = self.trail_queue.clone();
        if let Ok(mut p) = q.pending.lock() {
            p.push(ev);
        }
        if q.scheduled.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        // The drained events stay with the job: if its batch fails and the
        // writer retries the job alone, the same events are appended.
        let mut taken: Option<Vec<TrailEvent>> = None;
        let job = move |w: &mut dyn Write| {
            let events = taken.get_or_insert_with(|| {
                q.scheduled
                    .store(false, std::sync::atomic::Ordering::Release);
                q.pending
                    .lock()
                    .map(|mut p| std::mem::take(&mut *p))
                    .unwrap_or_default()
            });
            for ev in events.iter() {
                if let Err(e) = append_one(w, ev.clone()) {
                    tracing::warn!(error = %e, events = events.len(), "audit trail: events not recorded");
                    return Err(e);
                }
            }
            let bound = q.bound.lock().ok().and_then(|b| *b);
            if let Some(b) = bound {
                let n = enforce_bound(w, b)?;
                if n > 0 {
                    q.pruned.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(
                        dropped = n,
                        "audit trail: oldest records dropped to stay within audit.max_share_percent"
                    );
                }
            }
            Ok(())
        };
        if self.enqueue(job).is_err() {
            tracing::warn!("audit trail: the store writer has stopped; events not recorded");
        }
    }

    /// Up to `limit` records after sequence `after`, oldest first (what an
    /// export sends next). Records retention already dropped are skipped:
    /// the first one returned may be later than `after + 1`.
    pub fn trail_after(&self, after: u64, limit: usize) -> Result<Vec<TrailRecord>, StoreError> {
        let lo = (after.saturating_add(1)).to_be_bytes();
        let mut out = Vec::new();
        self.read()?.scan(
            Table::Trail,
            std::ops::Bound::Included(&lo[..]),
            std::ops::Bound::Unbounded,
            false,
            &mut |_, v| {
                out.push(
                    serde_json::from_slice(v).map_err(|_| StoreError::Corrupt("trail record"))?,
                );
                Ok(out.len() < limit)
            },
        )?;
        Ok(out)
    }

    /// The newest `n` records, oldest first.
    pub fn trail_tail(&self, n: usize) -> Result<Vec<TrailRecord>, StoreError> {
        let mut out = Vec::new();
        if n == 0 {
            return Ok(out);
        }
        self.read()?.scan(
            Table::Trail,
            std::ops::Bound::Unbounded,
            std::ops::Bound::Unbounded,
            true,
            &mut |_, v| {
                out.push(
                    serde_json::from_slice(v).map_err(|_| StoreError::Corrupt("trail record"))?,
                );
                Ok(out.len() < n)
            },
        )?;
        out.reverse();
        Ok(out)
    }

    /// Walks the chain from the anchor: sequence, links and hashes.
    pub fn trail_verify(&self) -> Result<TrailReport, String> {
        let r = self.read().map_err(|e| e.to_string())?;
        let anchor = get_link(&*r, META_ANCHOR).map_err(|e| e.to_string())?;
        let head = get_link(&*r, META_HEAD).map_err(|e| e.to_string())?;
        let mut prev = anchor.clone();
        let mut records = 0u64;
        let mut broken: Option<String> = None;
        r.each(Table::Trail, &mut |k, v| {
            let found = (|| {
                let rec: TrailRecord = serde_json::from_slice(v)
                    .map_err(|_| format!("record {}: does not parse", hex::encode(k)))?;
                if k != rec.seq.to_be_bytes() {
                    return Err(format!("record {}: stored under another key", rec.seq));
                }
                if rec.seq != prev.seq + 1 {
                    return Err(format!(
                        "record {} follows {}: records are missing",
                        rec.seq, prev.seq
                    ));
                }
                if rec.prev != prev.hash {
                    return Err(format!(
                        "record {}: its link does not match record {}'s hash",
                        rec.seq, prev.seq
                    ));
                }
                let h = rec.compute_hash().map_err(|e| e.to_string())?;
                if h != rec.hash {
                    return Err(format!("record {}: altered (hash mismatch)", rec.seq));
                }
                Ok(Link {
                    seq: rec.seq,
                    hash: rec.hash,
                })
            })();
            match found {
                Ok(link) => {
                    prev = link;
                    records += 1;
                    Ok(true)
                }
                Err(e) => {
                    broken = Some(e);
                    Ok(false)
                }
            }
        })
        .map_err(|e| e.to_string())?;
        if let Some(e) = broken {
            return Err(e);
        }
        if prev != head {
            return Err(format!(
                "the chain ends at record {} but the head says {}",
                prev.seq, head.seq
            ));
        }
        let signed = signed_head(&*r).map_err(|_| "the signed head does not parse".to_string())?;
        if let Some(s) = &signed {
            if s.seq > head.seq || s.seq < anchor.seq {
                return Err(format!(
                    "the signed head (record {}) is outside the chain ({}..{})",
                    s.seq, anchor.seq, head.seq
                ));
            }
            let at = if s.seq == anchor.seq {
                anchor.hash.clone()
            } else {
                let raw = r
                    .get(Table::Trail, &s.seq.to_be_bytes())
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("the signed record {} is missing", s.seq))?;
                serde_json::from_slice::<TrailRecord>(&raw)
                    .map_err(|_| format!("record {}: does not parse", s.seq))?
                    .hash
            };
            if at != s.hash {
                return Err(format!("record {} differs from the signed head", s.seq));
            }
        }
        Ok(TrailReport {
            anchor,
            head,
            records,
            signed,
        })
    }

    /// Signs the current head with `mac` (the backend's HMAC key).
    pub async fn trail_sign_head(
        &self,
        ts: i64,
        mac: impl Fn(&[u8]) -> Option<[u8; 32]>,
    ) -> Result<Option<Link>, StoreError> {
        let head = get_link(&*self.read()?, META_HEAD)?;
        if head.seq == 0 {
            return Ok(None);
        }
        let Some(m) = mac(&head_message(head.seq, &head.hash)) else {
            return Ok(None);
        };
        let signed = serde_json::to_vec(&SignedHead {
            seq: head.seq,
            hash: head.hash.clone(),
            ts,
            mac: hex::encode(m),
        })
        .map_err(|_| StoreError::Corrupt("trail head"))?;
        self.write(move |w| {
            // Only forward: never replace a newer signature.
            if signed_seq(&*w)?.is_some_and(|old| old >= head.seq) {
                return Ok(());
            }
            w.put(Table::Meta, META_SIGNED, &signed)
        })
        .await?;
        Ok(Some(head))
    }

    /// Drops records older than `before` (keeping the signed head's record
    /// and everything after it); the last dropped record becomes the anchor.
    pub async fn trail_prune(&self, before: i64) -> Result<u64, StoreError> {
        self.write(move |w| {
            let keep_from = signed_seq(&*w)?.unwrap_or(u64::MAX);
            let mut drop_keys = Vec::new();
            let mut anchor = None;
            w.each(Table::Trail, &mut |k, v| {
                let rec: TrailRecord =
                    serde_json::from_slice(v).map_err(|_| StoreError::Corrupt("trail record"))?;
                if rec.ts >= before || rec.seq >= keep_from {
                    return Ok(false);
                }
                drop_keys.push(k.to_vec());
                anchor = Some(Link {
                    seq: rec.seq,
                    hash: rec.hash,
                });
                Ok(true)
            })?;
            for k in &drop_keys {
                w.delete(Table::Trail, k)?;
            }
            if let Some(a) = anchor {
                let raw = serde_json::to_vec(&a).map_err(|_| StoreError::Corrupt("trail link"))?;
                w.put(Table::Meta, META_ANCHOR, &raw)?;
            }
            Ok(drop_keys.len() as u64)
        })
        .await
    }
}
