//! Which AES key generation is in use, recorded in the store (the key
//! ring in `custody::keyring` reads it for every seal), and the batch
//! operations a rotation runs over what is sealed.
//!
//! `rotate-key` (see `custody::rotate`) moves the store from generation M to
//! N in steps, each one durable in `meta` before the next:
//!
//! 1. `active = N, previous = M`: every process seals new material under N
//!    (the key ring reads the state for each seal) and reads either.
//! 2. Documents are re-sealed in batches, compare-and-set, so a concurrent
//!    write wins and is picked up on the next pass.
//! 3. `closed = true`: from this commit on every token write refuses any
//!    document sealed under M, so a write that sealed under M before step 1
//!    and commits late fails (and is retried by its client) instead of
//!    landing under a key about to go. A final pass then finds every
//!    remaining M document.
//! 4. M is destroyed in the device; `previous` is cleared.
//!
//! Any step can crash: re-running `rotate-key` continues from the state.

use super::kv::{Read, ReadExt, Table, Write};
use super::{Store, StoreError};
use crate::protocol::document::FIRST_KID;
use serde::{Deserialize, Serialize};

const META_AES_STATE: &[u8] = b"aes_state";

/// The AES generations of this store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AesState {
    /// Generation new seals use.
    pub active: u32,
    /// The generation a running rotation moves away from (still readable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<u32>,
    /// `previous` is closed for writes (the rotation's final pass).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub closed: bool,
    /// When the running rotation started (unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<i64>,
    /// Generations retired by finished rotations (destroyed in the device).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired: Vec<u32>,
}

impl Default for AesState {
    fn default() -> Self {
        AesState {
            active: FIRST_KID,
            previous: None,
            closed: false,
            started_at: None,
            retired: Vec::new(),
        }
    }
}

impl AesState {
    /// Generations material may be under: active first.
    pub fn readable(&self) -> Vec<u32> {
        let mut v = vec![self.active];
        v.extend(self.previous);
        v
    }

    /// Whether a document sealed under `gen` may be written: the active
    /// generation, or the previous one until the rotation closes it.
    pub fn writable(&self, gen: u32) -> bool {
        gen == self.active || (self.previous == Some(gen) && !self.closed)
    }
}

/// The state as `r` sees it (a write transaction: with its own writes).
pub(in crate::store) fn aes_state_in(r: &dyn Read) -> Result<AesState, StoreError> {
    Ok(r.get_json(Table::Meta, META_AES_STATE, "aes state")?
        .unwrap_or_default())
}

fn put_aes_state(w: &mut dyn Write, st: &AesState) -> Result<(), StoreError> {
    let raw = serde_json::to_vec(st).map_err(|_| StoreError::Corrupt("aes state"))?;
    w.put(Table::Meta, META_AES_STATE, &raw)
}

impl Store {
    pub fn aes_state(&self) -> Result<AesState, StoreError> {
        aes_state_in(&*self.read()?)
    }

    /// Changes the state in one durable write; returns the new state.
    pub fn update_aes_state(
        &self,
        f: impl Fn(&mut AesState) + Send + 'static,
    ) -> Result<AesState, StoreError> {
        self.write_blocking(move |w| {
            let mut st = aes_state_in(&*w)?;
            f(&mut st);
            put_aes_state(w, &st)?;
            Ok(st)
        })
    }
}

/// One batch of documents to move to another generation.
pub struct TokenBatch {
    /// (service, stored bytes) of documents not under the target generation.
    pub docs: Vec<(String, Vec<u8>)>,
    /// Where the next batch starts (exclusive); `None` at the end.
    pub next: Option<String>,
}

impl Store {
    /// Up to `limit` documents after `after` whose fields are not sealed
    /// under `gen` (sealed under another generation, or plaintext).
    pub fn tokens_not_under(
        &self,
        gen: u32,
        after: Option<&str>,
        limit: usize,
    ) -> Result<TokenBatch, StoreError> {
        use crate::protocol::document::{TokenDocument, ALG_NONE};
        use std::ops::Bound;
        let r = self.read()?;
        let lo = match after {
            Some(a) => Bound::Excluded(a.as_bytes().to_vec()),
            None => Bound::Unbounded,
        };
        let mut docs = Vec::new();
        let mut last = None;
        let mut full = false;
        r.scan(
            Table::Tokens,
            super::kv::bound(&lo),
            Bound::Unbounded,
            false,
            &mut |k, v| {
                if docs.len() >= limit {
                    full = true;
                    return Ok(false);
                }
                last = Some(String::from_utf8_lossy(k).into_owned());
                let doc: TokenDocument =
                    serde_json::from_slice(v).map_err(|_| StoreError::Corrupt("token document"))?;
                let needs = match doc.sealed_gen() {
                    Some(g) => g != gen,
                    None => doc.alg == ALG_NONE && !doc.fields.is_empty(),
                };
                if needs {
                    docs.push((String::from_utf8_lossy(k).into_owned(), v.to_vec()));
                }
                Ok(true)
            },
        )?;
        Ok(TokenBatch {
            docs,
            next: if full { last } else { None },
        })
    }

    /// Documents by the generation they are sealed under (`0`: not sealed
    /// by this appliance).
    pub fn tokens_by_generation(&self) -> Result<std::collections::BTreeMap<u32, u64>, StoreError> {
        let mut out = std::collections::BTreeMap::new();
        self.read()?.each(Table::Tokens, &mut |_, v| {
            let doc: crate::protocol::document::TokenDocument =
                serde_json::from_slice(v).map_err(|_| StoreError::Corrupt("token document"))?;
            *out.entry(doc.sealed_gen().unwrap_or(0)).or_insert(0) += 1;
            Ok(true)
        })?;
        Ok(out)
    }

    /// Writes each (service, expected bytes, new bytes) in one durable
    /// transaction where the stored document is still `expected`. Returns
    /// how many were written.
    pub fn replace_tokens_if_unchanged_blocking(
        &self,
        rows: Vec<(String, Vec<u8>, Vec<u8>)>,
    ) -> Result<usize, StoreError> {
        self.write_blocking(move |w| {
            let mut n = 0;
            for (service, expected, raw) in &rows {
                if w.holds(Table::Tokens, service.as_bytes(), expected)? {
                    super::put_token_doc(w, service, raw)?;
                    n += 1;
                }
            }
            Ok(n)
        })
    }

    /// Every bind code with its record.
    pub fn bind_codes_all(&self) -> Result<Vec<(String, super::BindCode)>, StoreError> {
        let mut out = Vec::new();
        self.read()?.each(Table::BindCodes, &mut |k, v| {
            let rec = serde_json::from_slice(v).map_err(|_| StoreError::Corrupt("bind code"))?;
            out.push((String::from_utf8_lossy(k).into_owned(), rec));
            Ok(true)
        })?;
        Ok(out)
    }

    /// Replaces a bind code's sealed secret if the record is still `expected`.
    pub fn replace_bind_code_blocking(
        &self,
        code: &str,
        expected: &super::BindCode,
        new: &super::BindCode,
    ) -> Result<bool, StoreError> {
        let (k, old) = super::bind_code_kv(code, expected)?;
        let (_, v) = super::bind_code_kv(code, new)?;
        self.write_blocking(move |w| {
            if !w.holds(Table::BindCodes, &k, &old)? {
                return Ok(false);
            }
            w.put(Table::BindCodes, &k, &v)?;
            Ok(true)
        })
    }

    /// Replaces an OAuth client record if it is still `expected`.
    pub fn replace_oauth_blocking(
        &self,
        name: String,
        expected: Vec<u8>,
        new: Vec<u8>,
    ) -> Result<bool, StoreError> {
        self.write_blocking(move |w| {
            if !w.holds(Table::OauthClients, name.as_bytes(), &expected)? {
                return Ok(false);
            }
            w.put(Table::OauthClients, name.as_bytes(), &new)?;
            Ok(true)
        })
    }
}
