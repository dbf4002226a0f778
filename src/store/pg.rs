//! The PostgreSQL engine (`store.backend = "postgres"`): the store's tables
//! as rows of one table, `tvw_kv (tbl, k, v)`, keyed by (table name, key
//! bytes). `bytea` compares as bytes, so scans come back in the order LMDB
//! gives.
//!
//! - Writes run on one writer thread per node, in batches (group commit,
//!   as with LMDB): one transaction per batch; a job that fails rolls the
//!   batch back and every job of it runs again alone. Each
//!   transaction first takes one advisory lock, so writes are serialised
//!   across every node: a job reads the latest committed state (READ
//!   COMMITTED after the lock) and the audit trail stays one hash chain.
//! - Reads run in a REPEATABLE READ, READ ONLY transaction opened on the
//!   first query of a snapshot (pipelined with it: one round trip).
//! - The store's calls are synchronous. Their queries run on a small
//!   runtime of the engine's own, and the caller waits on a channel
//!   (inside `block_in_place` on a server worker), so they work from the
//!   command line, the writer thread and the handlers alike.
//! - A probe checks the database every second. While it is unreachable,
//!   every call fails at once with [`StoreError::Unavailable`] (a 503),
//!   and the store recovers when the probe succeeds again, without a
//!   restart.
//! - Table sizes (rows, and bytes of keys and values) are kept in
//!   `tvw_sizes`, updated in the transaction that changes them: counts and
//!   the trail's bound read them instead of scanning a table.

use super::kv::{Read, Table, Visit, Write};
use super::StoreError;
use secrecy::{ExposeSecret, SecretString};
use std::collections::HashMap;
use std::future::Future;
use std::ops::Bound;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};
use tokio_postgres_rustls::MakeRustlsConnect;

/// A session lock of the database, held while its connection lives.
pub struct PgSessionLock {
    _conn: Arc<Conn>,
}

/// The session advisory lock one `rotate-key` holds, on whichever node
/// it runs ("tvw_rot").
const ROTATE_LOCK: i64 = 0x0074_7677_5f72_6f74;

/// The schema version this build writes and reads.
pub const PG_SCHEMA_VERSION: i32 = 1;
/// The one advisory lock every write transaction takes ("tvw_kv").
const WRITE_LOCK: i64 = 0x7476_775f_6b76;
/// Longest a query may take before the database counts as unreachable.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a caller waits for a free connection.
const POOL_WAIT: Duration = Duration::from_secs(5);
/// Rows fetched per round trip of a scan.
const SCAN_CHUNK: i64 = 256;
const PROBE_EVERY: Duration = Duration::from_secs(1);

const BEGIN_SNAPSHOT: &str = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY";

/// How to reach the database.
#[derive(Clone)]
pub struct PgSettings {
    /// `postgres://user@host:port/db` (no password: that comes from
    /// `password`).
    pub url: String,
    pub password: SecretString,
    /// The CA the server's certificate must chain to (its name is checked
    /// against the URL's host).
    pub ca_file: PathBuf,
    pub pool_size: usize,
    /// Bytes the appliance's data may take in the database (the trail's
    /// bound is a share of it).
    pub capacity_bytes: u64,
}

/// What `/metrics`, `/v1/health` and `doctor` see of the database.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PgHealth {
    pub up: bool,
    pub pool_max: usize,
    pub pool_open: usize,
    pub pool_idle: usize,
    /// The last probe's round trip, microseconds.
    pub probe_micros: u64,
    /// Probes that failed, since start.
    pub probe_failures: u64,
}

impl std::fmt::Debug for PgSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgSettings")
            .field("url", &self.url)
            .field("ca_file", &self.ca_file)
            .field("pool_size", &self.pool_size)
            .finish_non_exhaustive()
    }
}

/// A database error as a store error: unreachable, full, or engine detail
/// (for the log).
fn map_err(e: tokio_postgres::Error) -> StoreError {
    use tokio_postgres::error::SqlState;
    match e.code() {
        None => StoreError::Unavailable,
        Some(c) if *c == SqlState::DISK_FULL || *c == SqlState::OUT_OF_MEMORY => {
            StoreError::DiskFull
        }
        Some(c) if *c == SqlState::PROGRAM_LIMIT_EXCEEDED => StoreError::KeyTooLong,
        Some(c)
            if c.code().starts_with("08")
                || c.code().starts_with("57P")
                || *c == SqlState::TOO_MANY_CONNECTIONS
                || *c == SqlState::READ_ONLY_SQL_TRANSACTION =>
        {
            StoreError::Unavailable
        }
        Some(c) => StoreError::Engine(match e.as_db_error() {
            Some(db) => format!("{} ({})", db.message(), c.code()),
            None => e.to_string(),
        }),
    }
}

/// One connection and the statements prepared on it.
struct Conn {
    client: Client,
    stmts: Mutex<HashMap<String, Statement>>,
}

impl Conn {
    async fn stmt(&self, sql: &str) -> Result<Statement, tokio_postgres::Error> {
        let cached = self.stmts.lock().ok().and_then(|m| m.get(sql).cloned());
        if let Some(s) = cached {
            return Ok(s);
        }
        let s = self.client.prepare(sql).await?;
        if let Ok(mut m) = self.stmts.lock() {
            m.insert(sql.to_string(), s.clone());
        }
        Ok(s)
    }
}

/// A query's argument, owned (queries run on the engine's runtime).
#[derive(Debug, Clone)]
enum Arg {
    Text(&'static str),
    Bytes(Vec<u8>),
    Int(i64),
    Texts(Vec<&'static str>),
    Ints(Vec<i64>),
}

impl Arg {
    fn sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            Arg::Text(s) => s,
            Arg::Bytes(b) => b,
            Arg::Int(i) => i,
            Arg::Texts(v) => v,
            Arg::Ints(v) => v,
        }
    }
}

async fn query(
    conn: &Conn,
    sql: &str,
    args: &[Arg],
    begin: Option<&'static str>,
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    let st = conn.stmt(sql).await?;
    let params: Vec<&(dyn ToSql + Sync)> = args.iter().map(Arg::sql).collect();
    match begin {
        // Sent back to back: one round trip for both.
        Some(b) => {
            let (began, rows) = tokio::join!(
                conn.client.batch_execute(b),
                conn.client.query(&st, &params)
            );
            began?;
            rows
        }
        None => conn.client.query(&st, &params).await,
    }
}

#[derive(Default)]
struct PoolState {
    idle: Vec<Arc<Conn>>,
    open: usize,
}

struct Inner {
    rt: tokio::runtime::Handle,
    cfg: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    pool: Mutex<PoolState>,
    freed: Condvar,
    pool_max: usize,
    up: AtomicBool,
    probe_micros: AtomicU64,
    probe_failures: AtomicU64,
    /// Bytes of every table, as the last probe read them.
    used: AtomicU64,
    capacity: u64,
}

/// The engine: a pool of connections, a probe, and the writer's
/// connection (see [`spawn_writer`]).
#[derive(Clone)]
pub(in crate::store) struct Pg(Arc<Inner>);

impl Inner {
    /// Runs `fut` on the engine's runtime and waits for it. A query that
    /// cannot reach the database marks it down, so the calls after it fail
    /// at once until the probe sees it again.
    fn block<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T, tokio_postgres::Error>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.rt.spawn(async move {
            let r = tokio::time::timeout(QUERY_TIMEOUT, fut).await;
            let _ = tx.send(r);
        });
        let wait = move || rx.recv();
        let on_worker = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let got = if on_worker {
            tokio::task::block_in_place(wait)
        } else {
            wait()
        };
        let r = match got {
            Ok(Ok(r)) => r.map_err(map_err),
            // Timed out, or the runtime is gone.
            Ok(Err(_)) | Err(_) => Err(StoreError::Unavailable),
        };
        if let Err(StoreError::Unavailable) = r {
            self.mark_down(None);
        }
        r
    }

    /// The database is unreachable: said once, when it goes down.
    fn mark_down(&self, why: Option<String>) {
        if self.up.swap(false, Ordering::AcqRel) {
            match why {
                Some(e) => tracing::error!(error = %e, "database unreachable"),
                None => tracing::error!("database unreachable (a query failed or timed out)"),
            }
        }
    }

    async fn connect(
        cfg: tokio_postgres::Config,
        tls: MakeRustlsConnect,
    ) -> Result<Conn, tokio_postgres::Error> {
        let (client, connection) = cfg.connect(tls).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "database connection closed");
            }
        });
        Ok(Conn {
            client,
            stmts: Mutex::new(HashMap::new()),
        })
    }

    fn connect_blocking(&self) -> Result<Arc<Conn>, StoreError> {
        let (cfg, tls) = (self.cfg.clone(), self.tls.clone());
        self.block(async move { Self::connect(cfg, tls).await })
            .map(Arc::new)
    }

    fn checkout(&self) -> Result<Arc<Conn>, StoreError> {
        if !self.up.load(Ordering::Acquire) {
            return Err(StoreError::Unavailable);
        }
        let deadline = Instant::now() + POOL_WAIT;
        let mut st = self.pool.lock().map_err(|_| StoreError::Closed)?;
        loop {
            while let Some(c) = st.idle.pop() {
                if !c.client.is_closed() {
                    return Ok(c);
                }
                st.open -= 1;
            }
            if st.open < self.pool_max {
                st.open += 1;
                drop(st);
                let c = self.connect_blocking();
                if c.is_err() {
                    if let Ok(mut st) = self.pool.lock() {
                        st.open -= 1;
                    }
                    self.freed.notify_one();
                }
                return c;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(StoreError::Unavailable);
            }
            st = self
                .freed
                .wait_timeout(st, left)
                .map_err(|_| StoreError::Closed)?
                .0;
        }
    }

    /// Returns a connection to the pool (or drops a broken one).
    fn checkin(&self, c: Arc<Conn>, healthy: bool) {
        if let Ok(mut st) = self.pool.lock() {
            if healthy && !c.client.is_closed() {
                st.idle.push(c);
            } else {
                st.open -= 1;
            }
        }
        self.freed.notify_one();
    }
}

/// The TLS client for the database: the CA file's roots only, rustls with
/// ring, the URL's host checked against the certificate.
fn tls_for(ca_file: &std::path::Path) -> Result<MakeRustlsConnect, String> {
    let pem = std::fs::read(ca_file)
        .map_err(|e| format!("store.postgres.ca_file {}: {e}", ca_file.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    let mut n = 0;
    for c in rustls_pemfile::certs(&mut pem.as_slice()) {
        let c = c.map_err(|e| format!("store.postgres.ca_file {}: {e}", ca_file.display()))?;
        roots
            .add(c)
            .map_err(|e| format!("store.postgres.ca_file {}: {e}", ca_file.display()))?;
        n += 1;
    }
    if n == 0 {
        return Err(format!(
            "store.postgres.ca_file {} holds no certificate",
            ca_file.display()
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(cfg))
}

/// Parses the URL (the configuration has checked it: see
/// `config::PostgresConfig::checked_url`); refuses again what must never
/// reach a connection: a password in it, TLS off, a Unix socket.
pub fn parse_url(url: &str) -> Result<tokio_postgres::Config, String> {
    let cfg: tokio_postgres::Config = url
        .parse()
        .map_err(|e| format!("store.postgres.url: {e}"))?;
    if cfg.get_password().is_some() {
        return Err("store.postgres.url must not hold a password: use store.postgres.password_file or password_credential".into());
    }
    if cfg.get_ssl_mode() == tokio_postgres::config::SslMode::Disable {
        return Err("store.postgres.url: sslmode=disable is refused; TLS to the database is always on and verified against store.postgres.ca_file".into());
    }
    if cfg.get_hosts().is_empty() {
        return Err("store.postgres.url must name a host".into());
    }
    if cfg
        .get_hosts()
        .iter()
        .any(|h| !matches!(h, tokio_postgres::config::Host::Tcp(_)))
    {
        return Err("store.postgres.url: connect over TCP with TLS, not a Unix socket".into());
    }
    Ok(cfg)
}

/// What [`Pg::open`] finds of the schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchemaState {
    Missing,
    At(i32),
}

impl Pg {
    /// Connects, checks the schema (creating or migrating it when
    /// `migrate`), and starts the probe.
    pub fn open(s: &PgSettings, migrate: bool) -> Result<Pg, StoreError> {
        let mut cfg = parse_url(&s.url).map_err(StoreError::Config)?;
        cfg.password(s.password.expose_secret().as_bytes());
        cfg.ssl_mode(tokio_postgres::config::SslMode::Require);
        cfg.application_name("tokenvault-webhook");
        cfg.connect_timeout(QUERY_TIMEOUT);
        let tls = tls_for(&s.ca_file).map_err(StoreError::Config)?;
        // The runtime lives as long as the process (as LMDB's environment
        // does): a store is opened once per process.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("pg")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Engine(e.to_string()))?;
        let handle = rt.handle().clone();
        std::mem::forget(rt);
        let inner = Arc::new(Inner {
            rt: handle,
            cfg,
            tls,
            pool: Mutex::new(PoolState::default()),
            freed: Condvar::new(),
            pool_max: s.pool_size.max(1),
            up: AtomicBool::new(true),
            probe_micros: AtomicU64::new(0),
            probe_failures: AtomicU64::new(0),
            used: AtomicU64::new(0),
            capacity: s.capacity_bytes,
        });
        let pg = Pg(inner);
        pg.schema(migrate)?;
        pg.spawn_probe();
        Ok(pg)
    }

    /// Checks the schema version; with `migrate`, creates or upgrades it
    /// (under the write lock, so nodes starting together do it once).
    fn schema(&self, migrate: bool) -> Result<(), StoreError> {
        let conn = self.0.connect_blocking()?;
        let c = conn.clone();
        let found = self.0.block(async move { schema_state(&c.client).await })?;
        match found {
            SchemaState::At(v) if v > PG_SCHEMA_VERSION => {
                return Err(StoreError::Config(format!(
                    "the database's schema is version {v}, newer than this build knows ({PG_SCHEMA_VERSION}): upgrade this node"
                )))
            }
            SchemaState::At(v) if v == PG_SCHEMA_VERSION => return Ok(()),
            _ if !migrate => {
                return Err(StoreError::Config(format!(
                    "the database's schema is {}; run `tokenvault-webhook init` to create or migrate it",
                    match found {
                        SchemaState::Missing => "missing".to_string(),
                        SchemaState::At(v) => format!("at version {v} (this build: {PG_SCHEMA_VERSION})"),
                    }
                )))
            }
            _ => {}
        }
        let c = conn.clone();
        self.0
            .block(async move { migrate_schema(&c.client).await })?;
        tracing::info!(version = PG_SCHEMA_VERSION, "database schema ready");
        Ok(())
    }

    fn spawn_probe(&self) {
        let inner = Arc::downgrade(&self.0);
        self.0.rt.spawn(async move {
            let mut conn: Option<Conn> = None;
            loop {
                let Some(i) = inner.upgrade() else { return };
                let t0 = Instant::now();
                let ok = tokio::time::timeout(QUERY_TIMEOUT, async {
                    if conn.as_ref().is_none_or(|c| c.client.is_closed()) {
                        conn = Some(Inner::connect(i.cfg.clone(), i.tls.clone()).await?);
                    }
                    let c = conn
                        .as_ref()
                        .ok_or_else(|| std::io::Error::other("no probe connection"));
                    let c = match c {
                        Ok(c) => c,
                        Err(_) => return Ok::<_, tokio_postgres::Error>(None),
                    };
                    let row = c
                        .client
                        .query_one("SELECT coalesce(sum(bytes), 0)::int8 FROM tvw_sizes", &[])
                        .await?;
                    Ok(Some(row.get::<_, i64>(0)))
                })
                .await;
                match ok {
                    Ok(Ok(Some(used))) => {
                        i.used.store(used.max(0) as u64, Ordering::Relaxed);
                        i.probe_micros
                            .store(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
                        if !i.up.swap(true, Ordering::AcqRel) {
                            tracing::warn!("database reachable again");
                        }
                    }
                    other => {
                        conn = None;
                        i.probe_failures.fetch_add(1, Ordering::Relaxed);
                        i.mark_down(Some(match other {
                            Ok(Err(e)) => e.to_string(),
                            _ => "the probe timed out".to_string(),
                        }));
                    }
                }
                drop(i);
                tokio::time::sleep(PROBE_EVERY).await;
            }
        });
    }

    pub fn health(&self) -> PgHealth {
        let (open, idle) = self
            .0
            .pool
            .lock()
            .map(|s| (s.open, s.idle.len()))
            .unwrap_or_default();
        PgHealth {
            up: self.0.up.load(Ordering::Acquire),
            pool_max: self.0.pool_max,
            pool_open: open,
            pool_idle: idle,
            probe_micros: self.0.probe_micros.load(Ordering::Relaxed),
            probe_failures: self.0.probe_failures.load(Ordering::Relaxed),
        }
    }

    /// (capacity, bytes in use) as the last probe saw them.
    pub fn usage(&self) -> (u64, u64) {
        (self.0.capacity, self.0.used.load(Ordering::Relaxed))
    }

    /// One `rotate-key` at a time across every node: a session advisory
    /// lock on a connection of its own, released when the guard drops (or
    /// the process dies: the connection closes).
    pub fn lock_rotation(&self) -> Result<PgSessionLock, StoreError> {
        let conn = self.0.connect_blocking()?;
        let c = conn.clone();
        let got = self.0.block(async move {
            c.client
                .query_one(&format!("SELECT pg_try_advisory_lock({ROTATE_LOCK})"), &[])
                .await
                .map(|r| r.get::<_, bool>(0))
        })?;
        if !got {
            return Err(StoreError::Config(
                "the store has a key rotation running in another process (on this node or another)"
                    .into(),
            ));
        }
        Ok(PgSessionLock { _conn: conn })
    }

    pub fn read(&self) -> Result<PgRead, StoreError> {
        Ok(PgRead {
            q: Q {
                pg: self.0.clone(),
                conn: self.0.checkout()?,
            },
            begun: std::cell::Cell::new(false),
            broken: std::cell::Cell::new(false),
        })
    }

    /// Runs `f` in a transaction of its own, at once (schema preparation).
    pub fn write_now<T>(
        &self,
        f: impl FnOnce(&mut dyn Write) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let conn = self.0.connect_blocking()?;
        let mut w = Writer {
            pg: self.0.clone(),
            conn: Some(conn),
        };
        let mut f = Some(f);
        let mut out = None;
        let r = w.commit(&mut [&mut |tx: &mut dyn Write| {
            if let Some(f) = f.take() {
                out = Some(f(tx)?);
            }
            Ok(())
        }])?;
        r.into_iter().next().unwrap_or(Err(StoreError::Closed))?;
        out.ok_or(StoreError::Closed)
    }
}

/// What `configtest` and `doctor` learn of the database.
#[derive(Debug, Clone)]
pub struct PgCheck {
    pub server_version: String,
    /// The protocol version of the verified TLS session (from the server's
    /// own view, `pg_stat_ssl`).
    pub tls: String,
    pub schema: SchemaState,
}

/// Connects as the store would (TLS verified against the CA file, the
/// password), and reads the server's version, the TLS session and the
/// schema version. Opens nothing else.
pub fn check(s: &PgSettings) -> Result<PgCheck, StoreError> {
    let mut cfg = parse_url(&s.url).map_err(StoreError::Config)?;
    cfg.password(s.password.expose_secret().as_bytes());
    cfg.ssl_mode(tokio_postgres::config::SslMode::Require);
    cfg.connect_timeout(QUERY_TIMEOUT);
    let tls = tls_for(&s.ca_file).map_err(StoreError::Config)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| StoreError::Engine(e.to_string()))?;
    rt.block_on(async move {
        let conn = tokio::time::timeout(QUERY_TIMEOUT, Inner::connect(cfg, tls))
            .await
            .map_err(|_| StoreError::Unavailable)?
            .map_err(|e| match e.as_db_error() {
                Some(db) => StoreError::Config(format!("the database refused the connection: {}", db.message())),
                None => StoreError::Config(match std::error::Error::source(&e) {
                    Some(why) => format!("cannot reach the database: {e}: {why}"),
                    None => format!("cannot reach the database: {e}"),
                }),
            })?;
        let c = &conn.client;
        let version: String = c
            .query_one("SHOW server_version", &[])
            .await
            .map_err(map_err)?
            .get(0);
        let tls: Option<String> = c
            .query_one(
                "SELECT CASE WHEN ssl THEN version END FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .map_err(map_err)?
            .get(0);
        let schema = schema_state(c).await.map_err(map_err)?;
        Ok(PgCheck {
            server_version: version,
            tls: tls.unwrap_or_else(|| "none".into()),
            schema,
        })
    })
}

async fn schema_state(c: &Client) -> Result<SchemaState, tokio_postgres::Error> {
    let exists = c
        .query_one("SELECT to_regclass('tvw_schema') IS NOT NULL", &[])
        .await?
        .get::<_, bool>(0);
    if !exists {
        return Ok(SchemaState::Missing);
    }
    let row = c
        .query_opt("SELECT version FROM tvw_schema WHERE id = 1", &[])
        .await?;
    Ok(match row {
        Some(r) => SchemaState::At(r.get(0)),
        None => SchemaState::Missing,
    })
}

async fn migrate_schema(c: &Client) -> Result<(), tokio_postgres::Error> {
    let names: Vec<&str> = Table::ALL.iter().map(|t| t.name()).collect();
    c.batch_execute(&format!(
        "BEGIN; SELECT pg_advisory_xact_lock({WRITE_LOCK});
         CREATE TABLE IF NOT EXISTS tvw_schema (id int PRIMARY KEY CHECK (id = 1), version int NOT NULL);
         CREATE TABLE IF NOT EXISTS tvw_kv (tbl text NOT NULL, k bytea NOT NULL, v bytea NOT NULL, PRIMARY KEY (tbl, k));
         CREATE TABLE IF NOT EXISTS tvw_sizes (tbl text PRIMARY KEY, rows int8 NOT NULL, bytes int8 NOT NULL);"
    ))
    .await?;
    let done = async {
        c.execute(
            "INSERT INTO tvw_sizes (tbl, rows, bytes) SELECT unnest($1::text[]), 0, 0 ON CONFLICT DO NOTHING",
            &[&names],
        )
        .await?;
        // Never downgrades: a newer node may have migrated meanwhile.
        c.execute(
            "INSERT INTO tvw_schema (id, version) VALUES (1, $1) ON CONFLICT (id) DO UPDATE SET version = GREATEST(tvw_schema.version, EXCLUDED.version)",
            &[&PG_SCHEMA_VERSION],
        )
        .await?;
        c.batch_execute("COMMIT").await
    }
    .await;
    if done.is_err() {
        let _ = c.batch_execute("ROLLBACK").await;
    }
    done
}

// ---- queries over the seam --------------------------------------------

/// A connection of the engine, for the queries of one snapshot or
/// transaction.
struct Q {
    pg: Arc<Inner>,
    conn: Arc<Conn>,
}

fn check_key(k: &[u8]) -> Result<(), StoreError> {
    // LMDB's rule, so both engines refuse the same keys.
    if k.is_empty() || k.len() > super::MAX_KEY_BYTES {
        return Err(StoreError::KeyTooLong);
    }
    Ok(())
}

fn scan_sql(lo: &Bound<&[u8]>, hi: &Bound<&[u8]>, rev: bool) -> (String, bool, bool) {
    let mut sql = String::from("SELECT k, v FROM tvw_kv WHERE tbl = $1");
    let mut n = 1;
    // One condition per bound, its parameter numbered after the last.
    let mut bound = |b: &Bound<&[u8]>, included: &str, excluded: &str| {
        let op = match b {
            Bound::Included(_) => included,
            Bound::Excluded(_) => excluded,
            Bound::Unbounded => return false,
        };
        n += 1;
        sql.push_str(&format!(" AND k {op} ${n}"));
        true
    };
    let has_lo = bound(lo, ">=", ">");
    let has_hi = bound(hi, "<=", "<");
    sql.push_str(if rev {
        " ORDER BY k DESC"
    } else {
        " ORDER BY k ASC"
    });
    sql.push_str(&format!(" LIMIT ${}", n + 1));
    (sql, has_lo, has_hi)
}

fn bytes_of(b: &Bound<&[u8]>) -> Option<Vec<u8>> {
    match b {
        Bound::Included(k) | Bound::Excluded(k) => Some(k.to_vec()),
        Bound::Unbounded => None,
    }
}

impl Q {
    fn run(
        &self,
        sql: String,
        args: Vec<Arg>,
        begin: Option<&'static str>,
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        let conn = self.conn.clone();
        self.pg
            .block(async move { query(&conn, &sql, &args, begin).await })
    }

    fn get(
        &self,
        t: Table,
        k: &[u8],
        begin: Option<&'static str>,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        check_key(k)?;
        let rows = self.run(
            "SELECT v FROM tvw_kv WHERE tbl = $1 AND k = $2".into(),
            vec![Arg::Text(t.name()), Arg::Bytes(k.to_vec())],
            begin,
        )?;
        Ok(rows.into_iter().next().map(|r| r.get::<_, Vec<u8>>(0)))
    }

    fn scan(
        &self,
        t: Table,
        lo: Bound<&[u8]>,
        hi: Bound<&[u8]>,
        rev: bool,
        visit: Visit<'_>,
        mut begin: Option<&'static str>,
    ) -> Result<(), StoreError> {
        // Chunks: the next one starts past the last key seen.
        let mut lo = lo.map(<[u8]>::to_vec);
        let mut hi = hi.map(<[u8]>::to_vec);
        loop {
            let (l, h) = (super::kv::bound(&lo), super::kv::bound(&hi));
            let (sql, has_lo, has_hi) = scan_sql(&l, &h, rev);
            let mut args = vec![Arg::Text(t.name())];
            if has_lo {
                args.push(Arg::Bytes(bytes_of(&l).unwrap_or_default()));
            }
            if has_hi {
                args.push(Arg::Bytes(bytes_of(&h).unwrap_or_default()));
            }
            args.push(Arg::Int(SCAN_CHUNK));
            let rows = self.run(sql, args, begin.take())?;
            let n = rows.len() as i64;
            let mut last = None;
            for r in rows {
                let k: Vec<u8> = r.get(0);
                let v: Vec<u8> = r.get(1);
                if !visit(&k, &v)? {
                    return Ok(());
                }
                last = Some(k);
            }
            match last {
                Some(k) if n == SCAN_CHUNK => {
                    if rev {
                        hi = Bound::Excluded(k);
                    } else {
                        lo = Bound::Excluded(k);
                    }
                }
                _ => return Ok(()),
            }
        }
    }

    /// (rows, bytes) of a table, as its last committed write left them.
    fn size(&self, t: Table, begin: Option<&'static str>) -> Result<(u64, u64), StoreError> {
        let rows = self.run(
            "SELECT rows, bytes FROM tvw_sizes WHERE tbl = $1".into(),
            vec![Arg::Text(t.name())],
            begin,
        )?;
        Ok(rows.first().map_or((0, 0), |r| {
            (
                r.get::<_, i64>(0).max(0) as u64,
                r.get::<_, i64>(1).max(0) as u64,
            )
        }))
    }
}

/// A snapshot: a REPEATABLE READ, READ ONLY transaction begun by its
/// first query and ended when dropped.
pub(in crate::store) struct PgRead {
    q: Q,
    begun: std::cell::Cell<bool>,
    broken: std::cell::Cell<bool>,
}

impl PgRead {
    fn begin(&self) -> Option<&'static str> {
        (!self.begun.replace(true)).then_some(BEGIN_SNAPSHOT)
    }

    fn note<T>(&self, r: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(StoreError::Unavailable) = r {
            self.broken.set(true);
        }
        r
    }
}

impl Drop for PgRead {
    fn drop(&mut self) {
        let (pg, conn) = (self.q.pg.clone(), self.q.conn.clone());
        if self.broken.get() {
            pg.checkin(conn, false);
        } else if !self.begun.get() {
            pg.checkin(conn, true);
        } else {
            let rt = pg.rt.clone();
            rt.spawn(async move {
                let ok = conn.client.batch_execute("COMMIT").await.is_ok();
                pg.checkin(conn, ok);
            });
        }
    }
}

impl Read for PgRead {
    fn get(&self, t: Table, k: &[u8]) -> Result<Option<std::borrow::Cow<'_, [u8]>>, StoreError> {
        let r = self.q.get(t, k, self.begin());
        Ok(self.note(r)?.map(std::borrow::Cow::Owned))
    }

    fn scan(
        &self,
        t: Table,
        lo: Bound<&[u8]>,
        hi: Bound<&[u8]>,
        rev: bool,
        visit: Visit<'_>,
    ) -> Result<(), StoreError> {
        let r = self.q.scan(t, lo, hi, rev, visit, self.begin());
        self.note(r)
    }

    fn len(&self, t: Table) -> Result<u64, StoreError> {
        let r = self.q.size(t, self.begin());
        Ok(self.note(r)?.0)
    }

    fn footprint(&self, t: Table) -> Result<Option<u64>, StoreError> {
        let r = self.q.size(t, self.begin());
        Ok(Some(self.note(r)?.1))
    }
}

// ---- writes ---------------------------------------------------------------

/// (rows, bytes) per table: at a batch's start, or changes since.
type Sizes = HashMap<Table, (i64, i64)>;

fn add(m: &mut Sizes, t: Table, rows: i64, bytes: i64) {
    let e = m.entry(t).or_default();
    e.0 += rows;
    e.1 += bytes;
}

/// A job's view of the batch's transaction.
struct PgWrite<'a> {
    q: &'a Q,
    /// Table sizes at the batch's start, the batch's changes so far, and
    /// this job's own.
    base: &'a Sizes,
    batch: &'a Sizes,
    job: Sizes,
}

impl PgWrite<'_> {
    fn size(&self, t: Table) -> (i64, i64) {
        let mut out = (0, 0);
        for m in [self.base, self.batch, &self.job] {
            if let Some((r, b)) = m.get(&t) {
                out.0 += r;
                out.1 += b;
            }
        }
        out
    }
}

impl Read for PgWrite<'_> {
    fn get(&self, t: Table, k: &[u8]) -> Result<Option<std::borrow::Cow<'_, [u8]>>, StoreError> {
        Ok(self.q.get(t, k, None)?.map(std::borrow::Cow::Owned))
    }

    fn scan(
        &self,
        t: Table,
        lo: Bound<&[u8]>,
        hi: Bound<&[u8]>,
        rev: bool,
        visit: Visit<'_>,
    ) -> Result<(), StoreError> {
        self.q.scan(t, lo, hi, rev, visit, None)
    }

    fn len(&self, t: Table) -> Result<u64, StoreError> {
        Ok(self.size(t).0.max(0) as u64)
    }

    fn footprint(&self, t: Table) -> Result<Option<u64>, StoreError> {
        Ok(Some(self.size(t).1.max(0) as u64))
    }
}

impl Write for PgWrite<'_> {
    fn put(&mut self, t: Table, k: &[u8], v: &[u8]) -> Result<(), StoreError> {
        check_key(k)?;
        let rows = self.q.run(
            "WITH old AS (SELECT octet_length(k) + octet_length(v) AS n FROM tvw_kv WHERE tbl = $1 AND k = $2), \
             ins AS (INSERT INTO tvw_kv (tbl, k, v) VALUES ($1, $2, $3) ON CONFLICT (tbl, k) DO UPDATE SET v = EXCLUDED.v) \
             SELECT coalesce((SELECT n FROM old), 0)::int8"
                .into(),
            vec![
                Arg::Text(t.name()),
                Arg::Bytes(k.to_vec()),
                Arg::Bytes(v.to_vec()),
            ],
            None,
        )?;
        // Keys are never empty: no old row is 0 bytes.
        let old = rows.first().map(|r| r.get::<_, i64>(0)).unwrap_or(0);
        let new_row = i64::from(old == 0);
        add(&mut self.job, t, new_row, (k.len() + v.len()) as i64 - old);
        Ok(())
    }

    fn delete(&mut self, t: Table, k: &[u8]) -> Result<bool, StoreError> {
        check_key(k)?;
        let rows = self.q.run(
            "DELETE FROM tvw_kv WHERE tbl = $1 AND k = $2 RETURNING (octet_length(k) + octet_length(v))::int8".into(),
            vec![Arg::Text(t.name()), Arg::Bytes(k.to_vec())],
            None,
        )?;
        match rows.first() {
            Some(r) => {
                add(&mut self.job, t, -1, -r.get::<_, i64>(0));
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn clear(&mut self, t: Table) -> Result<(), StoreError> {
        self.q.run(
            "DELETE FROM tvw_kv WHERE tbl = $1".into(),
            vec![Arg::Text(t.name())],
            None,
        )?;
        let (rows, bytes) = self.size(t);
        add(&mut self.job, t, -rows, -bytes);
        Ok(())
    }
}

/// The writer's connection and its batches.
struct Writer {
    pg: Arc<Inner>,
    conn: Option<Arc<Conn>>,
}

type JobRun<'j> = &'j mut dyn FnMut(&mut dyn Write) -> Result<(), StoreError>;

impl Writer {
    fn conn(&mut self) -> Result<Arc<Conn>, StoreError> {
        if let Some(c) = &self.conn {
            if !c.client.is_closed() {
                return Ok(c.clone());
            }
        }
        self.conn = None;
        if !self.pg.up.load(Ordering::Acquire) {
            return Err(StoreError::Unavailable);
        }
        let c = self.pg.connect_blocking()?;
        self.conn = Some(c.clone());
        Ok(c)
    }

    /// Runs the jobs in one transaction and commits it: each job's outcome,
    /// or the batch's failure (nothing of it landed; a job's own failure
    /// fails a batch of several, whose jobs then run alone).
    fn commit(
        &mut self,
        jobs: &mut [JobRun<'_>],
    ) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        let conn = self.conn()?;
        let q = Q {
            pg: self.pg.clone(),
            conn,
        };
        let r = self.run_batch(&q, jobs);
        if let Err(e) = &r {
            // The transaction is gone with the error: roll back what is
            // left of it (a broken connection is dropped instead).
            if *e == StoreError::Unavailable || q.run("ROLLBACK".into(), vec![], None).is_err() {
                self.conn = None;
            }
        }
        r
    }

    fn run_batch(
        &mut self,
        q: &Q,
        jobs: &mut [JobRun<'_>],
    ) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        let single = jobs.len() == 1;
        let lock = format!("SELECT pg_advisory_xact_lock({WRITE_LOCK})");
        q.run(lock, vec![], Some("BEGIN ISOLATION LEVEL READ COMMITTED"))?;
        let sizes = q.run(
            "SELECT tbl, rows, bytes FROM tvw_sizes".into(),
            vec![],
            None,
        )?;
        let mut base = Sizes::new();
        for r in sizes {
            let name: String = r.get(0);
            if let Some(t) = Table::ALL.into_iter().find(|t| t.name() == name) {
                base.insert(t, (r.get::<_, i64>(1), r.get::<_, i64>(2)));
            }
        }
        let mut batch = Sizes::new();
        let mut results = Vec::with_capacity(jobs.len());
        for job in jobs.iter_mut() {
            let mut w = PgWrite {
                q,
                base: &base,
                batch: &batch,
                job: Sizes::new(),
            };
            let ran = job(&mut w);
            let mine = std::mem::take(&mut w.job);
            match ran {
                Ok(()) => {
                    for (t, (r, b)) in mine {
                        add(&mut batch, t, r, b);
                    }
                    results.push(Ok(()));
                }
                // A job alone: its error is its answer (nothing landed).
                Err(e) if single && e != StoreError::Unavailable => {
                    q.run("ROLLBACK".into(), vec![], None)?;
                    return Ok(vec![Err(e)]);
                }
                // In a batch: the batch is rolled back and each job runs
                // again alone (see `run_jobs`), so one failing job costs its
                // neighbours a retry, never a result; no savepoint per job.
                Err(e) => return Err(e),
            }
        }
        let mut names = Vec::new();
        let (mut rows, mut bytes) = (Vec::new(), Vec::new());
        for (t, (r, b)) in batch {
            if (r, b) != (0, 0) {
                names.push(t.name());
                rows.push(r);
                bytes.push(b);
            }
        }
        if !names.is_empty() {
            q.run(
                "UPDATE tvw_sizes s SET rows = s.rows + d.r, bytes = s.bytes + d.b FROM unnest($1::text[], $2::int8[], $3::int8[]) AS d(t, r, b) WHERE s.tbl = d.t".into(),
                vec![Arg::Texts(names), Arg::Ints(rows), Arg::Ints(bytes)],
                None,
            )?;
        }
        q.run("COMMIT".into(), vec![], None)?;
        Ok(results)
    }
}

/// Starts the writer thread: batches of up to `max_batch` jobs, each batch
/// one transaction; a batch whose commit fails (but not for want of the
/// database) is retried job by job, as with LMDB.
pub(in crate::store) fn spawn_writer(
    pg: &Pg,
    max_batch: usize,
) -> std::io::Result<mpsc::Sender<super::writer::Job>> {
    let (tx, rx) = mpsc::channel::<super::writer::Job>();
    let mut w = Writer {
        pg: pg.0.clone(),
        conn: None,
    };
    std::thread::Builder::new()
        .name("pg-writer".into())
        .spawn(move || {
            while let Ok(first) = rx.recv() {
                let mut batch = vec![first];
                while batch.len() < max_batch {
                    match rx.try_recv() {
                        Ok(j) => batch.push(j),
                        Err(_) => break,
                    }
                }
                run_jobs(&mut w, batch);
            }
        })?;
    Ok(tx)
}

fn run_jobs(w: &mut Writer, mut batch: Vec<super::writer::Job>) {
    let outcome = {
        let mut runs: Vec<JobRun<'_>> = batch
            .iter_mut()
            .map(|j| &mut *j.run as JobRun<'_>)
            .collect();
        w.commit(&mut runs)
    };
    match outcome {
        Ok(results) => {
            for (job, r) in batch.into_iter().zip(results) {
                let _ = job.done.send(r);
            }
        }
        Err(e) if batch.len() == 1 || e == StoreError::Unavailable => {
            for job in batch {
                let _ = job.done.send(Err(e.clone()));
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, jobs = batch.len(), "batch commit failed; retrying jobs one by one");
            for job in batch {
                run_jobs(w, vec![job]);
            }
        }
    }
}
