//! The store: the four protocol collections plus internal tables for
//! replay memory, bind codes, appliance metadata, TOTP state, OAuth
//! clients, listing items, the audit trail and the owner's policies.
//! Every operation is written once against the engine seam ([`kv`]); the
//! engine (LMDB, [`lmdb`]) reads inline (a few microseconds) and writes
//! through the group-commit thread.

pub mod audit;
pub mod backup;
pub mod generations;
mod kv;
mod lmdb;
pub mod pg;
pub mod policy;
pub mod trail;
mod writer;

pub use lmdb::MAX_KEY_BYTES;

use crate::protocol::document::TokenDocument;
use crate::protocol::storage::{Collection, ListResult, Pagination, MAX_PAGE};
use kv::{bound, Read, ReadExt, Table, Write};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::ops::Bound;
use std::path::Path;
use std::sync::{mpsc, Arc};
use tokio::sync::oneshot;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store's configured capacity is reached (LMDB: `store.map_size_mib`).
    #[error("the store is full")]
    Full,
    #[error("stored record is corrupt: {0}")]
    Corrupt(&'static str),
    /// The storage engine failed (detail for the log, never for a client).
    #[error("storage engine error: {0}")]
    Engine(String),
    #[error("store writer has stopped")]
    Closed,
    /// A token document sealed under an AES generation that is not (or no
    /// longer) writable: `rotate-key` closed or retired it; nothing was
    /// written (the caller retries).
    #[error("document sealed under a retiring AES key generation")]
    KeyRetired,
    /// A listing cursor this store never handed out (malformed): refused,
    /// never read as "from the start".
    #[error("malformed listing cursor")]
    BadCursor,
    /// A key longer than the store can hold (LMDB refuses it): no such
    /// record can exist, and none can be written.
    #[error("key longer than the store's key limit")]
    KeyTooLong,
    /// The file system under the store is full (ENOSPC, EDQUOT, or a short
    /// write while it has no room left): nothing of the write landed.
    #[error("the store's file system is full")]
    DiskFull,
    /// The database (the PostgreSQL engine) cannot be reached, or did not
    /// answer in time: nothing was written; retry shortly.
    #[error("the store's database is unreachable")]
    Unavailable,
    /// The store cannot be opened as configured (detail for the operator).
    #[error("{0}")]
    Config(String),
}

/// Writes a token document and its listing item (one transaction).
/// A document sealed under a generation `rotate-key` has closed or
/// retired is refused: after the close, no such document can land (see
/// [`keyring`]).
fn put_token_doc(w: &mut dyn Write, key: &str, raw: &[u8]) -> Result<(), StoreError> {
    let owner_policy = w.get(Table::Policies, key.as_bytes())?.is_some();
    let (item, gen) = crate::protocol::document::render_item(key.as_bytes(), raw, owner_policy)
        .map_err(|_| StoreError::Corrupt("token document"))?;
    if let Some(gen) = gen {
        if !generations::aes_state_in(&*w)?.writable(gen) {
            return Err(StoreError::KeyRetired);
        }
    }
    w.put(Table::Tokens, key.as_bytes(), raw)?;
    w.put(Table::TokenItems, key.as_bytes(), &item)?;
    Ok(())
}

/// Renders a token's listing item again from its document (after its
/// policy was set or cleared); nothing when there is no such token.
fn rerender_item(w: &mut dyn Write, key: &str) -> Result<(), StoreError> {
    let Some(raw) = w.get_owned(Table::Tokens, key.as_bytes())? else {
        return Ok(());
    };
    let owner_policy = w.get(Table::Policies, key.as_bytes())?.is_some();
    let item = crate::protocol::document::list_item(key.as_bytes(), &raw, owner_policy)
        .map_err(|_| StoreError::Corrupt("token document"))?;
    w.put(Table::TokenItems, key.as_bytes(), &item)
}

/// Stores written before the listing index (or its current version):
/// renders every item once.
fn ensure_token_items(w: &mut dyn Write) -> Result<(), StoreError> {
    if w.get(Table::Meta, META_TOKEN_ITEMS)?.is_some() {
        return Ok(());
    }
    let mut keys = Vec::new();
    w.each(Table::Tokens, &mut |k, _| {
        keys.push(String::from_utf8_lossy(k).into_owned());
        Ok(true)
    })?;
    // Items only: the documents stay as they are, whatever generation
    // sealed them.
    w.clear(Table::TokenItems)?;
    for k in &keys {
        rerender_item(w, k)?;
    }
    w.put(Table::Meta, META_TOKEN_ITEMS, b"1")?;
    if !keys.is_empty() {
        tracing::info!(tokens = keys.len(), "token listing index built");
    }
    Ok(())
}

/// Deletes a token document and its listing item.
fn delete_token_doc(w: &mut dyn Write, key: &str) -> Result<(), StoreError> {
    w.delete(Table::Tokens, key.as_bytes())?;
    w.delete(Table::TokenItems, key.as_bytes())?;
    Ok(())
}

/// Namespaces of the replay memory.
#[derive(Debug, Clone, Copy)]
pub enum ReplayNs {
    RequestId = 1,
    TicketNonce = 2,
}

fn replay_key(ns: ReplayNs, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(id.len() + 1);
    k.push(ns as u8);
    k.extend_from_slice(id.as_bytes());
    k
}

/// A bind code as stored: the HMAC secret sealed under the backend AES key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BindCode {
    pub expires_at: i64,
    pub used: bool,
    /// base64(IV ‖ ciphertext ‖ tag); emptied once the code is used.
    pub sealed_secret: String,
}

/// Per-token TOTP verification state (RFC 6238 §5.2 single use, failure limit).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TotpState {
    pub last_step: u64,
    pub fail_step: u64,
    pub fail_count: u32,
}

pub const META_WEBHOOK_ID: &[u8] = b"webhook_id";
pub const META_HMAC_KEY_ID: &[u8] = b"hmac_key_id";
pub const META_BOUND_AT: &[u8] = b"bound_at";
const META_AUDIT_SEQ: &[u8] = b"audit_seq";
const META_SCHEMA: &[u8] = b"schema_version";
/// Set once `token_items` holds every token's listing item (v2: with
/// `ownerPolicy`).
const META_TOKEN_ITEMS: &[u8] = b"token_items_v2";
const SCHEMA_VERSION: &[u8] = b"1";

type Slot<T> = Arc<std::sync::Mutex<Option<T>>>;
type Done = oneshot::Receiver<Result<(), StoreError>>;
/// Turns a stored (key, value) into a listing item (a JSON object).
pub type Projector<'a, T = Value> = &'a dyn Fn(&[u8], &[u8]) -> Result<T, StoreError>;

/// A write operation: runs in one transaction of the engine, and may be
/// run again (the writer retries a job alone when its batch fails).
type Job<T> = Box<dyn FnMut(&mut dyn Write) -> Result<T, StoreError> + Send>;

/// The engine behind a store (one per store, behind its `Arc`: the
/// variants' sizes do not matter).
#[allow(clippy::large_enum_variant)]
enum Engine {
    Lmdb {
        db: lmdb::Lmdb,
        writer: mpsc::Sender<writer::Job>,
    },
    Postgres {
        pg: pg::Pg,
        writer: mpsc::Sender<writer::Job>,
    },
}

/// The engine a store runs on, and how it is, for `/metrics`, `/v1/health`
/// and `doctor`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineHealth {
    Lmdb,
    Postgres(pg::PgHealth),
}

impl EngineHealth {
    /// Whether the store can serve (LMDB always can, once open).
    pub fn up(&self) -> bool {
        match self {
            EngineHealth::Lmdb => true,
            EngineHealth::Postgres(h) => h.up,
        }
    }
}

#[derive(Clone)]
pub struct Store {
    engine: Arc<Engine>,
    /// The shared lock on the store directory (see [`backup`]).
    _lock: Option<Arc<backup::StoreLock>>,
    trail_queue: Arc<trail::TrailQueue>,
}

impl Store {
    /// Opens (creating) the store in `dir`, holding the directory's shared
    /// lock for as long as the process keeps it.
    /// A second open of the same directory in one process returns the
    /// store already open (LMDB allows one environment per file and
    /// process).
    pub fn open(dir: &Path, map_size_bytes: usize) -> Result<Store, StoreError> {
        static OPEN: std::sync::Mutex<Vec<(std::path::PathBuf, Store)>> =
            std::sync::Mutex::new(Vec::new());
        Self::ensure_dir(dir)?;
        let key = std::fs::canonicalize(dir).map_err(|e| StoreError::Engine(e.to_string()))?;
        let mut open = OPEN.lock().map_err(|_| StoreError::Closed)?;
        if let Some((_, s)) = open.iter().find(|(p, _)| *p == key) {
            return Ok(s.clone());
        }
        let lock = backup::lock_shared(dir)?;
        let mut store = Self::open_unlocked(dir, map_size_bytes)?;
        store._lock = Some(Arc::new(lock));
        open.push((key, store.clone()));
        Ok(store)
    }

    fn ensure_dir(dir: &Path) -> Result<(), StoreError> {
        if !dir.exists() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| StoreError::Engine(e.to_string()))?;
        }
        Ok(())
    }

    /// [`Store::open`] without the directory lock (a restore's staging copy,
    /// opened under the exclusive lock).
    pub(crate) fn open_unlocked(dir: &Path, map_size_bytes: usize) -> Result<Store, StoreError> {
        Self::ensure_dir(dir)?;
        let db = lmdb::Lmdb::open(dir, map_size_bytes)?;
        db.write_now(prepare)?;
        let writer =
            writer::spawn(db.env, db.dbs).map_err(|e| StoreError::Engine(e.to_string()))?;
        Ok(Store {
            engine: Arc::new(Engine::Lmdb { db, writer }),
            _lock: None,
            trail_queue: Arc::new(trail::TrailQueue::default()),
        })
    }

    /// Opens the store in a PostgreSQL database shared by every node:
    /// checks its schema (creating or migrating it when `migrate`: `init`
    /// and `dev`), then prepares it as [`Store::open`] does. Opened once per
    /// process and database URL.
    pub fn open_postgres(s: &pg::PgSettings, migrate: bool) -> Result<Store, StoreError> {
        static OPEN: std::sync::Mutex<Vec<(String, Store)>> = std::sync::Mutex::new(Vec::new());
        let mut open = OPEN.lock().map_err(|_| StoreError::Closed)?;
        if let Some((_, st)) = open.iter().find(|(u, _)| *u == s.url) {
            return Ok(st.clone());
        }
        let db = pg::Pg::open(s, migrate)?;
        db.write_now(prepare)?;
        let writer = pg::spawn_writer(&db, writer::MAX_BATCH)
            .map_err(|e| StoreError::Engine(e.to_string()))?;
        let store = Store {
            engine: Arc::new(Engine::Postgres { pg: db, writer }),
            _lock: None,
            trail_queue: Arc::new(trail::TrailQueue::default()),
        };
        open.push((s.url.clone(), store.clone()));
        Ok(store)
    }

    /// Capacity, bytes in use, and the data file's size (0 on PostgreSQL:
    /// the database's files are its own).
    pub fn usage(&self) -> Usage {
        match &*self.engine {
            Engine::Lmdb { db, .. } => db.usage(),
            Engine::Postgres { pg, .. } => {
                let (capacity, used) = pg.usage();
                Usage {
                    capacity,
                    used,
                    file: 0,
                }
            }
        }
    }

    pub fn engine_health(&self) -> EngineHealth {
        match &*self.engine {
            Engine::Lmdb { .. } => EngineHealth::Lmdb,
            Engine::Postgres { pg, .. } => EngineHealth::Postgres(pg.health()),
        }
    }

    /// One `rotate-key` at a time: a file lock in `dir` on LMDB, a session
    /// lock of the database (across every node) on PostgreSQL.
    pub fn lock_rotation(&self, dir: &Path) -> Result<RotationLock, StoreError> {
        match &*self.engine {
            Engine::Lmdb { .. } => Ok(RotationLock::File(backup::lock_rotation(dir)?)),
            Engine::Postgres { pg, .. } => Ok(RotationLock::Db(pg.lock_rotation()?)),
        }
    }

    /// Whether the store is in a database shared with other nodes.
    pub fn is_shared(&self) -> bool {
        matches!(&*self.engine, Engine::Postgres { .. })
    }

    /// A compacted, consistent copy of the engine's data into `f` (see
    /// [`Store::backup_to`]); PostgreSQL is backed up with its own tools.
    fn copy_engine_to(&self, f: &mut std::fs::File) -> Result<(), StoreError> {
        match &*self.engine {
            Engine::Lmdb { db, .. } => db.copy_to(f),
            Engine::Postgres { .. } => Err(StoreError::Config(
                "backup of a PostgreSQL store is pg_dump's job (see README, High availability)"
                    .into(),
            )),
        }
    }

    /// A snapshot of every table.
    pub(in crate::store) fn read(&self) -> Result<Box<dyn Read + '_>, StoreError> {
        match &*self.engine {
            Engine::Lmdb { db, .. } => Ok(Box::new(db.read()?)),
            Engine::Postgres { pg, .. } => Ok(Box::new(pg.read()?)),
        }
    }

    fn enqueue<T: Send + 'static>(
        &self,
        mut f: impl FnMut(&mut dyn Write) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<(Done, Slot<T>), StoreError> {
        let slot = Arc::new(std::sync::Mutex::new(None));
        let s2 = slot.clone();
        let (tx, rx) = oneshot::channel();
        let job = writer::Job {
            run: Box::new(move |w| {
                let v = f(w)?;
                if let Ok(mut g) = s2.lock() {
                    *g = Some(v);
                }
                Ok(())
            }),
            done: tx,
        };
        match &*self.engine {
            Engine::Lmdb { writer, .. } => writer.send(job).map_err(|_| StoreError::Closed)?,
            Engine::Postgres { pg, writer } => {
                // Fail at once while the database is unreachable, rather
                // than queue behind a timeout.
                if !pg.health().up {
                    return Err(StoreError::Unavailable);
                }
                writer.send(job).map_err(|_| StoreError::Closed)?
            }
        }
        Ok((rx, slot))
    }

    fn take<T>(slot: Slot<T>) -> Result<T, StoreError> {
        slot.lock()
            .ok()
            .and_then(|mut g| g.take())
            .ok_or(StoreError::Closed)
    }

    /// Runs `f` in the next group commit; resolves once its batch is durable.
    pub(in crate::store) async fn write<T: Send + 'static>(
        &self,
        f: impl FnMut(&mut dyn Write) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (rx, slot) = self.enqueue(f)?;
        rx.await.map_err(|_| StoreError::Closed)??;
        Self::take(slot)
    }

    /// The same, for synchronous callers (CLI); never call from async code.
    pub(in crate::store) fn write_blocking<T: Send + 'static>(
        &self,
        f: impl FnMut(&mut dyn Write) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (rx, slot) = self.enqueue(f)?;
        rx.blocking_recv().map_err(|_| StoreError::Closed)??;
        Self::take(slot)
    }

    // ---- metadata -------------------------------------------------------

    pub fn meta_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.read()?.get_owned(Table::Meta, key)
    }

    pub fn count(&self, c: Collection) -> Result<u64, StoreError> {
        self.read()?.len(Table::of(c))
    }

    // ---- replay memory --------------------------------------------------

    /// Fast read-side check: has `id` been seen and not yet expired?
    pub fn replay_seen(&self, ns: ReplayNs, id: &str, now: i64) -> Result<bool, StoreError> {
        let r = self.read()?;
        Ok(match r.get(Table::Replay, &replay_key(ns, id))? {
            Some(v) => decode_i64(&v)? > now,
            None => false,
        })
    }

    /// Records `id` until `expires_at`. Returns false if it was already
    /// recorded and unexpired. Durable when this resolves.
    pub async fn replay_remember(
        &self,
        ns: ReplayNs,
        id: &str,
        expires_at: i64,
        now: i64,
    ) -> Result<bool, StoreError> {
        let key = replay_key(ns, id);
        self.write(move |w| {
            if let Some(v) = w.get(Table::Replay, &key)? {
                if decode_i64(&v)? > now {
                    return Ok(false);
                }
            }
            w.put(Table::Replay, &key, &expires_at.to_be_bytes())?;
            Ok(true)
        })
        .await
    }

    /// Deletes expired replay entries and stale bind codes. Returns how many.
    pub async fn prune(&self, now: i64) -> Result<usize, StoreError> {
        self.write(move |w| {
            let mut stale = Vec::new();
            w.each(Table::Replay, &mut |k, v| {
                if decode_i64(v)? <= now {
                    stale.push(k.to_vec());
                }
                Ok(stale.len() < 50_000)
            })?;
            let mut n = stale.len();
            for k in stale {
                w.delete(Table::Replay, &k)?;
            }
            let mut stale = Vec::new();
            w.each(Table::BindCodes, &mut |k, v| {
                let code: BindCode =
                    serde_json::from_slice(v).map_err(|_| StoreError::Corrupt("bind code"))?;
                // Used codes are kept a day so a late exchange still reads "code_used".
                if code.expires_at + 86_400 <= now || (!code.used && code.expires_at <= now) {
                    stale.push(k.to_vec());
                }
                Ok(true)
            })?;
            n += stale.len();
            for k in stale {
                w.delete(Table::BindCodes, &k)?;
            }
            Ok(n)
        })
        .await
    }

    // ---- bind codes -----------------------------------------------------

    pub fn bind_code(&self, code: &str) -> Result<Option<BindCode>, StoreError> {
        self.read()?
            .get_json(Table::BindCodes, code.as_bytes(), "bind code")
    }

    pub fn put_bind_code_blocking(&self, code: &str, rec: &BindCode) -> Result<(), StoreError> {
        let (k, v) = bind_code_kv(code, rec)?;
        self.write_blocking(move |w| w.put(Table::BindCodes, &k, &v))
    }

    pub async fn put_bind_code(&self, code: &str, rec: &BindCode) -> Result<(), StoreError> {
        let (k, v) = bind_code_kv(code, rec)?;
        self.write(move |w| w.put(Table::BindCodes, &k, &v)).await
    }

    /// Atomically consumes a bind code and records the newly installed HMAC
    /// key as the active one. Returns the previous key id on success.
    pub async fn complete_binding(
        &self,
        code: &str,
        new_key_id: &str,
        now: i64,
    ) -> Result<BindOutcome, StoreError> {
        let code = code.to_string();
        let new_key_id = new_key_id.to_string();
        self.write(move |w| {
            let Some(mut rec) =
                w.get_json::<BindCode>(Table::BindCodes, code.as_bytes(), "bind code")?
            else {
                return Ok(BindOutcome::Expired);
            };
            if rec.used {
                return Ok(BindOutcome::Used);
            }
            if rec.expires_at <= now {
                return Ok(BindOutcome::Expired);
            }
            rec.used = true;
            rec.sealed_secret.clear();
            let (k, v) = bind_code_kv(&code, &rec)?;
            w.put(Table::BindCodes, &k, &v)?;
            let previous = w
                .get(Table::Meta, META_HMAC_KEY_ID)?
                .map(|p| String::from_utf8_lossy(&p).into_owned());
            w.put(Table::Meta, META_HMAC_KEY_ID, new_key_id.as_bytes())?;
            w.put(Table::Meta, META_BOUND_AT, now.to_string().as_bytes())?;
            Ok(BindOutcome::Bound { previous })
        })
        .await
    }

    /// Sets a metadata value if absent; returns the stored value.
    pub fn meta_get_or_init_blocking(
        &self,
        key: &'static [u8],
        value: Vec<u8>,
    ) -> Result<Vec<u8>, StoreError> {
        self.write_blocking(move |w| {
            if let Some(v) = w.get_owned(Table::Meta, key)? {
                return Ok(v);
            }
            w.put(Table::Meta, key, &value)?;
            Ok(value.clone())
        })
    }

    /// Sets a metadata value (durable when this resolves).
    pub async fn meta_set(&self, key: &'static [u8], value: Vec<u8>) -> Result<(), StoreError> {
        self.write(move |w| w.put(Table::Meta, key, &value)).await
    }

    /// Removes a metadata value (durable when this returns).
    pub fn meta_delete_blocking(&self, key: &'static [u8]) -> Result<(), StoreError> {
        self.write_blocking(move |w| {
            w.delete(Table::Meta, key)?;
            Ok(())
        })
    }

    // ---- token documents ------------------------------------------------

    /// Writes a token document in one durable step with the ticket nonce that
    /// authorised it: either both land or neither. `createdAt` of an existing
    /// document is kept.
    pub async fn put_token(
        &self,
        service: String,
        doc: TokenDocument,
        nonce: Option<(String, i64)>,
        create_only: bool,
        now: i64,
    ) -> Result<PutOutcome, StoreError> {
        self.write(move |w| {
            if let Some((n, _)) = &nonce {
                if let Some(v) = w.get(Table::Replay, &replay_key(ReplayNs::TicketNonce, n))? {
                    if decode_i64(&v)? > now {
                        return Ok(PutOutcome::NonceUsed);
                    }
                }
            }
            let mut doc = doc.clone();
            let mut replaced_otp = None;
            if let Some(old) =
                w.get_json::<TokenDocument>(Table::Tokens, service.as_bytes(), "token document")?
            {
                if create_only {
                    return Ok(PutOutcome::Exists);
                }
                if let Some(c) = old.meta.get("createdAt") {
                    doc.meta.insert("createdAt".into(), c.clone());
                }
                replaced_otp = old.otp.filter(|o| doc.otp.as_ref() != Some(o));
            }
            let raw =
                serde_json::to_vec(&doc).map_err(|_| StoreError::Corrupt("token document"))?;
            put_token_doc(w, &service, &raw)?;
            w.delete(Table::TotpState, service.as_bytes())?;
            if let Some((n, exp)) = &nonce {
                w.put(
                    Table::Replay,
                    &replay_key(ReplayNs::TicketNonce, n),
                    &exp.to_be_bytes(),
                )?;
            }
            Ok(PutOutcome::Stored {
                meta: doc.meta,
                replaced_otp,
            })
        })
        .await
    }

    /// Deletes a token document; returns its device TOTP key id, if any.
    pub async fn delete_token(&self, service: String) -> Result<Option<String>, StoreError> {
        self.write(move |w| {
            let otp = match w.get(Table::Tokens, service.as_bytes())? {
                Some(raw) => serde_json::from_slice::<TokenDocument>(&raw)
                    .map(|d| d.otp)
                    .unwrap_or(None),
                None => None,
            };
            delete_token_doc(w, &service)?;
            w.delete(Table::TotpState, service.as_bytes())?;
            Ok(otp)
        })
        .await
    }

    pub fn totp_state(&self, service: &str) -> Result<TotpState, StoreError> {
        Ok(self
            .read()?
            .get_json(Table::TotpState, service.as_bytes(), "totp state")?
            .unwrap_or_default())
    }

    /// Judges and records a verification attempt in one write transaction.
    /// `matched` is the time step the code matched, if any; it is accepted
    /// only if later than the last accepted step. Failures are counted per
    /// `current_step`; once `max_failures` are recorded for the step, later
    /// attempts in it are not judged at all ([`TotpVerdict::Limited`]), so
    /// parallel guesses cannot all pass a check made before the write.
    pub async fn totp_record(
        &self,
        service: String,
        matched: Option<u64>,
        current_step: u64,
        max_failures: u32,
    ) -> Result<TotpVerdict, StoreError> {
        self.write(move |w| {
            let mut st: TotpState = w
                .get_json(Table::TotpState, service.as_bytes(), "totp state")?
                .unwrap_or_default();
            if st.fail_step == current_step && st.fail_count >= max_failures {
                return Ok(TotpVerdict::Limited);
            }
            let accepted = matches!(matched, Some(s) if s > st.last_step);
            if let (true, Some(s)) = (accepted, matched) {
                st.last_step = s;
            } else {
                if st.fail_step != current_step {
                    st.fail_step = current_step;
                    st.fail_count = 0;
                }
                st.fail_count = st.fail_count.saturating_add(1);
            }
            let raw = serde_json::to_vec(&st).map_err(|_| StoreError::Corrupt("totp state"))?;
            w.put(Table::TotpState, service.as_bytes(), &raw)?;
            Ok(if accepted {
                TotpVerdict::Accepted
            } else {
                TotpVerdict::Rejected
            })
        })
        .await
    }

    // ---- OAuth clients (for refresh-notify) -------------------------------

    pub fn oauth_get(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.read()?.get_owned(Table::OauthClients, name.as_bytes())
    }

    pub fn oauth_all(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        Ok(self
            .read()?
            .rows(Table::OauthClients)?
            .into_iter()
            .map(|(_, v)| v)
            .collect())
    }

    pub fn oauth_put_blocking(&self, name: String, value: Vec<u8>) -> Result<(), StoreError> {
        self.write_blocking(move |w| w.put(Table::OauthClients, name.as_bytes(), &value))
    }

    pub fn oauth_delete_blocking(&self, name: String) -> Result<bool, StoreError> {
        self.write_blocking(move |w| w.delete(Table::OauthClients, name.as_bytes()))
    }

    /// Device TOTP key ids referenced by stored documents.
    pub fn referenced_otp_keys(&self) -> Result<std::collections::HashSet<String>, StoreError> {
        let mut out = std::collections::HashSet::new();
        self.read()?.each(Table::Tokens, &mut |_, v| {
            if let Ok(d) = serde_json::from_slice::<TokenDocument>(v) {
                out.extend(d.otp);
            }
            Ok(true)
        })?;
        Ok(out)
    }

    /// Replaces a token document only if it is still byte-identical to
    /// `expected` (used to re-seal plaintext documents after a read).
    pub async fn replace_token_if_unchanged(
        &self,
        service: String,
        expected: Vec<u8>,
        doc: TokenDocument,
    ) -> Result<bool, StoreError> {
        let raw = serde_json::to_vec(&doc).map_err(|_| StoreError::Corrupt("token document"))?;
        self.write(move |w| {
            if !w.holds(Table::Tokens, service.as_bytes(), &expected)? {
                return Ok(false);
            }
            put_token_doc(w, &service, &raw)?;
            Ok(true)
        })
        .await
    }

    /// Writes a document as stored bytes into `c` (a token document also
    /// gets its listing item, and is refused under a closed generation).
    /// `create_only`: an existing document is kept and false returned. The
    /// audit collection is append-only ([`Store::audit_append`]).
    pub async fn put_raw(
        &self,
        c: Collection,
        key: String,
        raw: Vec<u8>,
        create_only: bool,
    ) -> Result<bool, StoreError> {
        self.write(put_raw_job(c, key, raw, create_only)).await
    }

    /// [`Store::put_raw`] for synchronous callers (CLI); never from async code.
    pub fn put_raw_blocking(
        &self,
        c: Collection,
        key: String,
        raw: Vec<u8>,
        create_only: bool,
    ) -> Result<bool, StoreError> {
        self.write_blocking(put_raw_job(c, key, raw, create_only))
    }

    /// Deletes a document of a configuration collection (tokens:
    /// [`Store::delete_token`]; audit: append-only). Deleting nothing is fine.
    pub async fn delete_raw(&self, c: Collection, key: String) -> Result<(), StoreError> {
        if matches!(c, Collection::Audit | Collection::Tokens) {
            return Err(StoreError::Corrupt("not a configuration collection"));
        }
        self.write(move |w| {
            w.delete(Table::of(c), key.as_bytes())?;
            Ok(())
        })
        .await
    }

    /// Reads, changes and writes one token document in one transaction:
    /// `f` gets the stored document (None: absent) and returns the one to
    /// store. `createdAt` and the TOTP state are the caller's to keep.
    pub async fn update_token(
        &self,
        service: String,
        mut f: impl FnMut(Option<TokenDocument>) -> TokenDocument + Send + 'static,
    ) -> Result<(), StoreError> {
        self.write(move |w| {
            let cur = w.get_json(Table::Tokens, service.as_bytes(), "token document")?;
            let raw =
                serde_json::to_vec(&f(cur)).map_err(|_| StoreError::Corrupt("token document"))?;
            put_token_doc(w, &service, &raw)
        })
        .await
    }

    // ---- collections ----------------------------------------------------

    pub fn get_raw(&self, c: Collection, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        // LMDB checks the key's size on some lookups only (by the tree's
        // shape): refuse it the same way every time.
        if key.len() > MAX_KEY_BYTES {
            return Err(StoreError::KeyTooLong);
        }
        self.read()?.get_owned(Table::of(c), key.as_bytes())
    }

    /// A token document and whether the owner set a policy for it, read
    /// in one snapshot (what `/v1/storage get` shows of it).
    pub fn token_with_policy(&self, key: &str) -> Result<Option<(Vec<u8>, bool)>, StoreError> {
        if key.len() > MAX_KEY_BYTES {
            return Err(StoreError::KeyTooLong);
        }
        let r = self.read()?;
        let Some(raw) = r.get_owned(Table::Tokens, key.as_bytes())? else {
            return Ok(None);
        };
        Ok(Some((
            raw,
            r.get(Table::Policies, key.as_bytes())?.is_some(),
        )))
    }

    /// Newest audit event stored under exactly this key.
    pub fn audit_get(&self, key: &str) -> Result<Option<Value>, StoreError> {
        let r = self.read()?;
        let prefix = audit::sort_prefix(key);
        let mut hi = prefix.clone();
        hi.extend_from_slice(&u64::MAX.to_be_bytes());
        let mut found = None;
        r.scan(
            Table::Audit,
            Bound::Included(&prefix),
            Bound::Included(&hi),
            true,
            &mut |_, v| {
                let rec: Value =
                    serde_json::from_slice(v).map_err(|_| StoreError::Corrupt("audit"))?;
                if rec.get("key").and_then(Value::as_str) == Some(key) {
                    found = rec.get("data").cloned();
                    return Ok(false);
                }
                Ok(true)
            },
        )?;
        Ok(found)
    }

    pub async fn audit_append(&self, key: String, data: Value) -> Result<(), StoreError> {
        let rec = serde_json::to_vec(&serde_json::json!({"key": key, "data": data}))
            .map_err(|_| StoreError::Corrupt("audit"))?;
        self.write(move |w| {
            let seq = match w.get(Table::Meta, META_AUDIT_SEQ)? {
                Some(v) => decode_u64(&v)? + 1,
                None => 1,
            };
            w.put(Table::Meta, META_AUDIT_SEQ, &seq.to_be_bytes())?;
            w.put(Table::Audit, &audit::full_key(&key, seq), &rec)?;
            Ok(())
        })
        .await
    }

    /// Lists a collection: ascending by key (audit: newest first), cursor
    /// exclusive, equality filters AND-ed on the item's `filter_field` object.
    pub fn list(
        &self,
        c: Collection,
        limit: Option<usize>,
        after: Option<&str>,
        filters: Option<&Map<String, Value>>,
        filter_field: &str,
        project: Projector<'_>,
    ) -> Result<ListResult, StoreError> {
        let matches = |item: &Value| match filters {
            None => true,
            Some(f) => {
                let target = item.get(filter_field).and_then(Value::as_object);
                f.iter()
                    .all(|(k, v)| target.and_then(|t| t.get(k)) == Some(v))
            }
        };
        let filtered = filters.is_some_and(|f| !f.is_empty());
        let keep: Option<&dyn Fn(&Value) -> bool> = if filtered { Some(&matches) } else { None };
        // Tokens are listed from their listing items (`{"key","meta"}`).
        let items_db = c == Collection::Tokens;
        let (items, pagination) = self.list_as(c, items_db, limit, after, keep, project)?;
        Ok(ListResult { items, pagination })
    }

    /// [`Store::list`] for any item type: `project` renders a stored row,
    /// `keep` (if any) filters the rendered items, and then totalCount visits
    /// every row.
    pub fn list_as<T>(
        &self,
        c: Collection,
        prerendered: bool,
        limit: Option<usize>,
        after: Option<&str>,
        keep: Option<&dyn Fn(&T) -> bool>,
        project: Projector<'_, T>,
    ) -> Result<(Vec<T>, Pagination), StoreError> {
        let r = self.read()?;
        // `prerendered`: the tokens' listing items instead of the documents.
        let table = if prerendered && c == Collection::Tokens {
            Table::TokenItems
        } else {
            Table::of(c)
        };
        let limit = limit.map_or(usize::MAX, |l| l.min(MAX_PAGE));
        let filtered = keep.is_some();
        let matches = |item: &T| keep.is_none_or(|k| k(item));
        let mut items = Vec::new();
        let mut last_key: Option<Vec<u8>> = None;
        let mut has_more = false;
        let mut visit = |k: &[u8], v: &[u8]| -> Result<bool, StoreError> {
            let item = project(k, v)?;
            if !matches(&item) {
                return Ok(true);
            }
            if items.len() < limit {
                items.push(item);
                last_key = Some(k.to_vec());
                Ok(true)
            } else {
                has_more = true;
                Ok(false)
            }
        };
        if c == Collection::Audit {
            let hi = match after {
                Some(a) => Bound::Excluded(audit::upper_bound(a).ok_or(StoreError::BadCursor)?),
                None => Bound::Unbounded,
            };
            r.scan(table, Bound::Unbounded, bound(&hi), true, &mut visit)?;
        } else {
            let lo = match after {
                Some(a) => Bound::Excluded(a.as_bytes().to_vec()),
                None => Bound::Unbounded,
            };
            r.scan(table, bound(&lo), Bound::Unbounded, false, &mut visit)?;
        }
        // totalCount: every matching item of the collection, wherever the cursor is.
        let total = if filtered {
            let mut n = 0u64;
            r.each(table, &mut |k, v| {
                if matches(&project(k, v)?) {
                    n += 1;
                }
                Ok(true)
            })?;
            n
        } else {
            r.len(table)?
        };
        let next_cursor = if has_more {
            last_key.as_deref().map(|k| match c {
                Collection::Audit => audit::cursor_for(k),
                _ => String::from_utf8_lossy(k).into_owned(),
            })
        } else {
            None
        };
        Ok((
            items,
            Pagination {
                has_more,
                next_cursor,
                total_count: total,
            },
        ))
    }
}

/// What every open does first, in one transaction: the schema version
/// (a store newer than this build is refused) and the listing index.
fn prepare(w: &mut dyn Write) -> Result<(), StoreError> {
    match w.get_owned(Table::Meta, META_SCHEMA)? {
        None => w.put(Table::Meta, META_SCHEMA, SCHEMA_VERSION)?,
        Some(v) if v == SCHEMA_VERSION => {}
        Some(_) => return Err(StoreError::Corrupt("unknown schema version")),
    }
    ensure_token_items(w)
}

/// Held while a `rotate-key` runs (see [`Store::lock_rotation`]).
pub enum RotationLock {
    File(backup::StoreLock),
    Db(pg::PgSessionLock),
}

/// What [`Store::usage`] reports.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    /// The most the store may hold (LMDB: the map size).
    pub capacity: u64,
    pub used: u64,
    pub file: u64,
}

/// Result of [`Store::totp_record`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TotpVerdict {
    Accepted,
    Rejected,
    /// The step's failure limit was already reached: not judged, not recorded.
    Limited,
}

/// Result of [`Store::put_token`].
#[derive(Debug)]
pub enum PutOutcome {
    /// Written; the stored meta, and the device TOTP key of the document it
    /// replaced (the caller destroys it).
    Stored {
        meta: Map<String, Value>,
        replaced_otp: Option<String>,
    },
    /// `create_only` and a document exists: nothing written.
    Exists,
    /// The ticket nonce was already used: nothing written.
    NonceUsed,
}

#[derive(Debug, PartialEq, Eq)]
pub enum BindOutcome {
    Bound { previous: Option<String> },
    Used,
    Expired,
}

fn put_raw_job(c: Collection, key: String, raw: Vec<u8>, create_only: bool) -> Job<bool> {
    Box::new(move |w| {
        if c == Collection::Audit {
            return Err(StoreError::Corrupt("the audit collection is append-only"));
        }
        let t = Table::of(c);
        if create_only && w.get(t, key.as_bytes())?.is_some() {
            return Ok(false);
        }
        match c {
            Collection::Tokens => put_token_doc(w, &key, &raw)?,
            _ => w.put(t, key.as_bytes(), &raw)?,
        }
        Ok(true)
    })
}

fn bind_code_kv(code: &str, rec: &BindCode) -> Result<(Vec<u8>, Vec<u8>), StoreError> {
    let v = serde_json::to_vec(rec).map_err(|_| StoreError::Corrupt("bind code"))?;
    Ok((code.as_bytes().to_vec(), v))
}

fn decode_i64(v: &[u8]) -> Result<i64, StoreError> {
    Ok(i64::from_be_bytes(
        v.try_into()
            .map_err(|_| StoreError::Corrupt("replay entry"))?,
    ))
}

fn decode_u64(v: &[u8]) -> Result<u64, StoreError> {
    Ok(u64::from_be_bytes(
        v.try_into().map_err(|_| StoreError::Corrupt("counter"))?,
    ))
}

#[cfg(test)]
mod tests;
