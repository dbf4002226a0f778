//! The LMDB engine (heed): one environment per store directory, one
//! database per [`Table`], reads in a snapshot inline (a few
//! microseconds), writes through the group-commit thread ([`super::writer`]).

use super::kv::{Read, Table, Visit, Write};
use super::StoreError;
use heed::types::Bytes;
use heed::{
    CommitOrAbort, CompactionOption, Database, Env, EnvOpenOptions, RoTxn, RwTxn, WithoutTls,
};
use std::borrow::Cow;
use std::ops::Bound;
use std::path::Path;

pub(in crate::store) type Db = Database<'static, Bytes, Bytes>;

/// LMDB's key size limit (its default `MDB_MAXKEYSIZE`).
pub const MAX_KEY_BYTES: usize = 511;

impl From<heed::Error> for StoreError {
    fn from(e: heed::Error) -> Self {
        match e {
            heed::Error::Mdb(heed::MdbError::MapFull) => StoreError::Full,
            heed::Error::Mdb(heed::MdbError::BadValSize) => StoreError::KeyTooLong,
            heed::Error::Io(ref io)
                if matches!(io.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) =>
            {
                StoreError::DiskFull
            }
            e => StoreError::Engine(e.to_string()),
        }
    }
}

/// The databases, one per table, in [`Table::ALL`] order.
#[derive(Clone, Copy)]
pub(in crate::store) struct Dbs([Db; 14]);

impl Dbs {
    fn db(&self, t: Table) -> Db {
        // `Table::ALL` lists every variant once, in declaration order.
        self.0[t as usize]
    }
}

pub(in crate::store) struct Lmdb {
    pub env: &'static Env<WithoutTls>,
    pub dbs: Dbs,
}

impl Lmdb {
    pub fn open(dir: &Path, map_size_bytes: usize) -> Result<Lmdb, StoreError> {
        let mut opts = EnvOpenOptions::new().read_txn_without_tls();
        opts.map_size(map_size_bytes).max_dbs(16).max_readers(256);
        // SAFETY: the environment is opened once per process for this path and
        // never opened with conflicting flags; LMDB's own locking covers other
        // processes (the CLI). It lives for the rest of the process (database
        // handles borrow it), so it is leaked deliberately.
        let env: &'static Env<WithoutTls> = Box::leak(Box::new(unsafe { opts.open(dir) }?));
        let wtxn = env.write_txn()?;
        let dbs = env
            .create_databases_and_commit(wtxn, |wdo, wtxn| -> Result<_, heed::Error> {
                let mut out = Vec::with_capacity(Table::ALL.len());
                for t in Table::ALL {
                    out.push(wdo.create_database::<Bytes, Bytes>(wtxn, Some(t.name()))?);
                }
                let arr: [Database<'_, Bytes, Bytes>; 14] = out
                    .try_into()
                    .map_err(|_| heed::Error::Mdb(heed::MdbError::Invalid))?;
                Ok(CommitOrAbort::<_, ()>::Commit(arr))
            })?
            .unwrap_commit();
        Ok(Lmdb { env, dbs: Dbs(dbs) })
    }

    pub fn read(&self) -> Result<LmdbRead<'_>, StoreError> {
        Ok(LmdbRead {
            txn: self.env.read_txn()?,
            dbs: self.dbs,
        })
    }

    /// Runs `f` in a write transaction of its own, now, on this thread
    /// (opening the store, before the writer runs).
    pub fn write_now<T>(
        &self,
        f: impl FnOnce(&mut dyn Write) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut txn = self.env.write_txn()?;
        let v = f(&mut LmdbWrite {
            txn: &mut txn,
            dbs: self.dbs,
        })?;
        txn.commit()?;
        Ok(v)
    }

    /// Capacity, bytes in use, and the data file's size.
    pub fn usage(&self) -> super::Usage {
        let info = self.env.info();
        let page = self.env.unnamed_database_stat().page_size as u64;
        super::Usage {
            capacity: info.map_size as u64,
            used: (info.last_page_number as u64 + 1) * page,
            file: self.env.real_disk_size().unwrap_or(0),
        }
    }

    /// A compacted, consistent copy of the environment into `f`.
    pub fn copy_to(&self, f: &mut std::fs::File) -> Result<(), StoreError> {
        self.env.copy_to_file(f, CompactionOption::Enabled)?;
        Ok(())
    }
}

pub(in crate::store) struct LmdbRead<'e> {
    txn: RoTxn<'e, WithoutTls>,
    dbs: Dbs,
}

pub(in crate::store) struct LmdbWrite<'t, 'p> {
    pub txn: &'t mut RwTxn<'p>,
    pub dbs: Dbs,
}

fn scan(
    txn: &RoTxn<'_, WithoutTls>,
    db: Db,
    lo: Bound<&[u8]>,
    hi: Bound<&[u8]>,
    rev: bool,
    visit: Visit<'_>,
) -> Result<(), StoreError> {
    let range = (lo, hi);
    if rev {
        for row in db.rev_range(txn, &range)? {
            let (k, v) = row?;
            if !visit(k, v)? {
                break;
            }
        }
    } else {
        for row in db.range(txn, &range)? {
            let (k, v) = row?;
            if !visit(k, v)? {
                break;
            }
        }
    }
    Ok(())
}

/// One [`Read`] for both: a snapshot reads its own transaction, a write
/// transaction reads through its parent's view with its own writes.
macro_rules! read_via {
    ($ty:ty, $txn:ident => $ro:expr) => {
        impl Read for $ty {
            fn get(&self, t: Table, k: &[u8]) -> Result<Option<Cow<'_, [u8]>>, StoreError> {
                let $txn = &self.txn;
                Ok(self.dbs.db(t).get($ro, k)?.map(Cow::Borrowed))
            }
            fn scan(
                &self,
                t: Table,
                lo: Bound<&[u8]>,
                hi: Bound<&[u8]>,
                rev: bool,
                visit: Visit<'_>,
            ) -> Result<(), StoreError> {
                let $txn = &self.txn;
                scan($ro, self.dbs.db(t), lo, hi, rev, visit)
            }
            fn len(&self, t: Table) -> Result<u64, StoreError> {
                let $txn = &self.txn;
                Ok(self.dbs.db(t).len($ro)?)
            }
            fn footprint(&self, t: Table) -> Result<Option<u64>, StoreError> {
                let $txn = &self.txn;
                Ok(Some(self.dbs.db(t).stat($ro)?.non_free_page_size() as u64))
            }
        }
    };
}

read_via!(LmdbRead<'_>, txn => txn);
read_via!(LmdbWrite<'_, '_>, txn => &***txn);

impl Write for LmdbWrite<'_, '_> {
    fn put(&mut self, t: Table, k: &[u8], v: &[u8]) -> Result<(), StoreError> {
        Ok(self.dbs.db(t).put(self.txn, k, v)?)
    }
    fn delete(&mut self, t: Table, k: &[u8]) -> Result<bool, StoreError> {
        Ok(self.dbs.db(t).delete(self.txn, k)?)
    }
    fn clear(&mut self, t: Table) -> Result<(), StoreError> {
        Ok(self.dbs.db(t).clear(self.txn)?)
    }
}
