//! The owner's rules, as records: a policy per service (opaque bytes to
//! the store: `custody::policy` gives them meaning), approvals, and
//! per-agent use counts. Written by the CLI on the box and read by the
//! server; no protocol collection (`/v1/storage`) reaches them.

use super::kv::{ReadExt, Table};
use super::{Store, StoreError};
use serde::{Deserialize, Serialize};

/// Where an approval stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApprovalState {
    /// Asked for, not decided.
    Pending,
    /// Given: usable `uses_left` more times until `expires_at`.
    Approved,
    Denied,
    /// Not decided (or not used) in time.
    Expired,
    /// Given and used up.
    Used,
}

/// One request for the owner's approval, bound to a service, a use and an
/// agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Approval {
    pub id: String,
    pub service: String,
    /// The use asked for (`credential`, `totp_code`, `proxy`, `reveal`).
    pub purpose: String,
    /// The ticket's agent (`aid`, else `sub`; `-` when it names neither).
    pub agent: String,
    pub created_at: i64,
    /// Pending: until when it may be decided. Approved: until when it may
    /// be used.
    pub expires_at: i64,
    pub state: ApprovalState,
    /// Approved: uses left.
    #[serde(default)]
    pub uses_left: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<i64>,
}

impl Approval {
    fn matches(&self, service: &str, purpose: &str, agent: &str) -> bool {
        self.service == service && self.purpose == purpose && self.agent == agent
    }
}

/// What [`Store::approval_ask`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ask {
    /// An approval for exactly this was given: one use of it is spent.
    Granted(Approval),
    /// Waiting for the owner (the one already asked, or a new one).
    Pending(Approval, bool),
    /// Too many approvals are pending: nothing was recorded.
    Full,
}

/// What [`Store::approval_decide_blocking`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decided {
    Done(Approval),
    NotFound,
    /// Not pending any more (decided, used or expired): unchanged.
    NotPending(Approval),
}

fn decode(v: &[u8]) -> Result<Approval, StoreError> {
    serde_json::from_slice(v).map_err(|_| StoreError::Corrupt("approval"))
}

fn encode(a: &Approval) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(a).map_err(|_| StoreError::Corrupt("approval"))
}

/// A use count: how many uses in the window that starts at `start`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct Uses {
    start: i64,
    count: u32,
}

impl Store {
    // ---- policies ---------------------------------------------------------

    pub fn policy_get(&self, service: &str) -> Result<Option<Vec<u8>>, StoreError> {
        if service.len() > super::MAX_KEY_BYTES {
            return Err(StoreError::KeyTooLong);
        }
        self.read()?.get_owned(Table::Policies, service.as_bytes())
    }

    /// Every policy, by service.
    pub fn policy_all(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        Ok(self
            .read()?
            .rows(Table::Policies)?
            .into_iter()
            .map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), v))
            .collect())
    }

    /// Sets a service's policy; its token's listing item then says
    /// `ownerPolicy` (in the same transaction).
    pub fn policy_put_blocking(&self, service: String, raw: Vec<u8>) -> Result<(), StoreError> {
        self.write_blocking(move |w| {
            w.put(Table::Policies, service.as_bytes(), &raw)?;
            super::rerender_item(w, &service)
        })
    }

    /// Removes a policy; false when there was none.
    pub fn policy_delete_blocking(&self, service: String) -> Result<bool, StoreError> {
        self.write_blocking(move |w| {
            let had = w.delete(Table::Policies, service.as_bytes())?;
            super::rerender_item(w, &service)?;
            Ok(had)
        })
    }

    // ---- approvals --------------------------------------------------------

    /// In one transaction: spends one use of an approval given for exactly
    /// (`service`, `purpose`, `agent`), or returns the one pending for it,
    /// or records a new pending one (`new_id`, decidable for `ttl` seconds)
    /// unless `max_pending` are pending already. Lapsed approvals it passes
    /// are marked expired.
    #[allow(clippy::too_many_arguments)]
    pub async fn approval_ask(
        &self,
        service: String,
        purpose: String,
        agent: String,
        new_id: String,
        now: i64,
        ttl: i64,
        max_pending: usize,
    ) -> Result<Ask, StoreError> {
        self.write(move |w| {
            let mut pending = 0usize;
            let mut found_pending = None;
            let mut lapsed = Vec::new();
            let mut granted = None;
            for (_, v) in w.rows(Table::Approvals)? {
                let a = decode(&v)?;
                let live = a.expires_at > now;
                match a.state {
                    ApprovalState::Pending | ApprovalState::Approved if !live => lapsed.push(a),
                    ApprovalState::Pending => {
                        pending += 1;
                        if a.matches(&service, &purpose, &agent) {
                            found_pending = Some(a);
                        }
                    }
                    ApprovalState::Approved
                        if granted.is_none()
                            && a.uses_left > 0
                            && a.matches(&service, &purpose, &agent) =>
                    {
                        granted = Some(a)
                    }
                    _ => {}
                }
            }
            for mut a in lapsed {
                a.state = ApprovalState::Expired;
                w.put(Table::Approvals, a.id.as_bytes(), &encode(&a)?)?;
            }
            if let Some(mut a) = granted {
                a.uses_left -= 1;
                if a.uses_left == 0 {
                    a.state = ApprovalState::Used;
                }
                w.put(Table::Approvals, a.id.as_bytes(), &encode(&a)?)?;
                return Ok(Ask::Granted(a));
            }
            if let Some(a) = found_pending {
                return Ok(Ask::Pending(a, false));
            }
            if pending >= max_pending {
                return Ok(Ask::Full);
            }
            let a = Approval {
                id: new_id.clone(),
                service: service.clone(),
                purpose: purpose.clone(),
                agent: agent.clone(),
                created_at: now,
                expires_at: now + ttl,
                state: ApprovalState::Pending,
                uses_left: 0,
                decided_at: None,
            };
            w.put(Table::Approvals, a.id.as_bytes(), &encode(&a)?)?;
            Ok(Ask::Pending(a, true))
        })
        .await
    }

    /// Spends one use of approval `id` if it is approved, unexpired and
    /// has uses left.
    pub async fn approval_spend(
        &self,
        id: String,
        now: i64,
    ) -> Result<Option<Approval>, StoreError> {
        self.write(move |w| {
            let Some(v) = w.get_owned(Table::Approvals, id.as_bytes())? else {
                return Ok(None);
            };
            let mut a = decode(&v)?;
            if a.state != ApprovalState::Approved || a.expires_at <= now || a.uses_left == 0 {
                return Ok(None);
            }
            a.uses_left -= 1;
            if a.uses_left == 0 {
                a.state = ApprovalState::Used;
            }
            w.put(Table::Approvals, a.id.as_bytes(), &encode(&a)?)?;
            Ok(Some(a))
        })
        .await
    }

    pub fn approval_get(&self, id: &str) -> Result<Option<Approval>, StoreError> {
        if id.len() > super::MAX_KEY_BYTES {
            return Err(StoreError::KeyTooLong);
        }
        self.read()?
            .get(Table::Approvals, id.as_bytes())?
            .map(|v| decode(&v))
            .transpose()
    }

    /// Every approval, oldest first.
    pub fn approval_all(&self) -> Result<Vec<Approval>, StoreError> {
        let mut out = Vec::new();
        self.read()?.each(Table::Approvals, &mut |_, v| {
            out.push(decode(v)?);
            Ok(true)
        })?;
        out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(out)
    }

    /// The owner's answer to a pending approval: `Some((uses, until))`
    /// approves it for `uses` uses until `until`; `None` denies it.
    pub fn approval_decide_blocking(
        &self,
        id: String,
        grant: Option<(u32, i64)>,
        now: i64,
    ) -> Result<Decided, StoreError> {
        self.write_blocking(move |w| {
            let Some(v) = w.get_owned(Table::Approvals, id.as_bytes())? else {
                return Ok(Decided::NotFound);
            };
            let mut a = decode(&v)?;
            if a.state != ApprovalState::Pending {
                return Ok(Decided::NotPending(a));
            }
            if a.expires_at <= now {
                a.state = ApprovalState::Expired;
                w.put(Table::Approvals, a.id.as_bytes(), &encode(&a)?)?;
                return Ok(Decided::NotPending(a));
            }
            match grant {
                Some((uses, until)) => {
                    a.state = ApprovalState::Approved;
                    a.uses_left = uses.max(1);
                    a.expires_at = until;
                }
                None => a.state = ApprovalState::Denied,
            }
            a.decided_at = Some(now);
            w.put(Table::Approvals, a.id.as_bytes(), &encode(&a)?)?;
            Ok(Decided::Done(a))
        })
    }

    /// Marks lapsed approvals expired (returned, for the trail) and deletes
    /// settled ones older than `keep` seconds.
    pub async fn approvals_sweep(&self, now: i64, keep: i64) -> Result<Vec<Approval>, StoreError> {
        self.write(move |w| {
            let mut lapsed = Vec::new();
            let mut old = Vec::new();
            for (k, v) in w.rows(Table::Approvals)? {
                let a = decode(&v)?;
                let live = matches!(a.state, ApprovalState::Pending | ApprovalState::Approved);
                if live && a.expires_at <= now {
                    lapsed.push(a);
                } else if !live
                    && a.decided_at.unwrap_or(a.created_at).max(a.expires_at) + keep <= now
                {
                    old.push(k);
                }
            }
            for k in old {
                w.delete(Table::Approvals, &k)?;
            }
            for a in lapsed.iter_mut() {
                a.state = ApprovalState::Expired;
                w.put(Table::Approvals, a.id.as_bytes(), &encode(a)?)?;
            }
            Ok(lapsed)
        })
        .await
    }

    // ---- use counts -------------------------------------------------------

    /// Counts one use of `service` by `agent` in the window of `window`
    /// seconds that holds `now`, if fewer than `limit` were counted in it;
    /// returns whether it was counted (allowed) and, if not, the seconds
    /// until the window ends.
    pub async fn policy_count_use(
        &self,
        service: &str,
        agent: &str,
        now: i64,
        window: i64,
        limit: u32,
    ) -> Result<Result<(), u64>, StoreError> {
        let key = format!("{service}\0{agent}\0{window}").into_bytes();
        if key.len() > super::MAX_KEY_BYTES {
            return Err(StoreError::KeyTooLong);
        }
        let start = now - now.rem_euclid(window.max(1));
        self.write(move |w| {
            let mut u: Uses = w
                .get_json(Table::PolicyUses, &key, "use count")?
                .unwrap_or_default();
            if u.start != start {
                u = Uses { start, count: 0 };
            }
            if u.count >= limit {
                return Ok(Err((start + window - now).max(1) as u64));
            }
            u.count += 1;
            let raw = serde_json::to_vec(&u).map_err(|_| StoreError::Corrupt("use count"))?;
            w.put(Table::PolicyUses, &key, &raw)?;
            Ok(Ok(()))
        })
        .await
    }

    /// Waits for the writer to commit everything queued before (the CLI's
    /// trail records, before it exits).
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.write_blocking(|_| Ok(()))
    }
}
