//! Backups of the store, and restoring one.
//!
//! A backup is LMDB's compacting copy of the environment, taken in one read
//! transaction: consistent while the service writes, documents still sealed
//! (useless without the same HSM or TPM keys). Restoring swaps a verified
//! copy in for `data.mdb` while nothing has the store open.
//!
//! Every process that opens the store holds a shared `flock` on
//! `<store>/appliance.lock` for its lifetime; `restore` takes it exclusively,
//! so it refuses while the service (or any command) has the store open, and
//! nothing can open the store mid-swap.

use super::{Store, StoreError};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

pub const LOCK_FILE: &str = "appliance.lock";
pub const DATA_FILE: &str = "data.mdb";

/// The store directory's lock, held for as long as it lives.
pub struct StoreLock(#[allow(dead_code)] File);

fn lock_file(path: &Path) -> Result<File, StoreError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| StoreError::Engine(format!("{}: {e}", path.display())))
}

fn flock(f: &File, op: libc::c_int) -> std::io::Result<()> {
    // SAFETY: flock on a descriptor this function borrows; no memory involved.
    if unsafe { libc::flock(f.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn lock(dir: &Path, op: libc::c_int, busy: &str) -> Result<StoreLock, StoreError> {
    lock_at(&dir.join(LOCK_FILE), dir, op, busy)
}

fn lock_at(path: &Path, dir: &Path, op: libc::c_int, busy: &str) -> Result<StoreLock, StoreError> {
    let f = lock_file(path)?;
    flock(&f, op).map_err(|_| StoreError::Engine(format!("{} {busy}", dir.display())))?;
    Ok(StoreLock(f))
}

/// Exclusive, on its own file: one `rotate-key` at a time (the service and
/// other commands keep running).
pub fn lock_rotation(dir: &Path) -> Result<StoreLock, StoreError> {
    lock_at(
        &dir.join("rotate.lock"),
        dir,
        libc::LOCK_EX,
        "has a key rotation running in another process",
    )
}

/// Shared: any process using the store (taken by [`Store::open`]).
pub(crate) fn lock_shared(dir: &Path) -> Result<StoreLock, StoreError> {
    lock(
        dir,
        libc::LOCK_SH,
        "is being restored; try again when the restore has finished",
    )
}

/// Exclusive: nobody else has the store open.
pub fn lock_exclusive(dir: &Path) -> Result<StoreLock, StoreError> {
    lock(
        dir,
        libc::LOCK_EX,
        "is in use (is the service running? stop it first: systemctl stop tokenvault-webhook)",
    )
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |e| StoreError::Engine(format!("{}: {e}", path.display()))
}

fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    crate::fsutil::fsync_dir(dir).map_err(io(dir))
}

impl Store {
    /// Writes a compacted, consistent copy of the store to `out` (mode 0600,
    /// written to a temporary name, fsynced, then renamed). Returns its size.
    pub fn backup_to(&self, out: &Path) -> Result<u64, StoreError> {
        let tmp = out.with_extension("partial");
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .read(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io(&tmp))?;
        let copied = self
            .copy_engine_to(&mut f)
            .and_then(|()| f.sync_all().map_err(io(&tmp)));
        if let Err(e) = copied {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        let size = f.metadata().map_err(io(&tmp))?.len();
        std::fs::rename(&tmp, out).map_err(io(out))?;
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            fsync_dir(parent)?;
        }
        Ok(size)
    }
}

/// A restore in progress: the backup copied into `<store>/restore/` and
/// opened there, under the exclusive lock. [`Staged::store`] is for the
/// caller's checks; [`Staged::commit`] swaps it in.
pub struct Staged {
    dir: PathBuf,
    staging: PathBuf,
    store: Store,
    _lock: StoreLock,
}

/// Copies `backup` next to the store (under the exclusive lock) and opens it.
/// Refuses to stage over an existing store unless `force`.
pub fn stage_restore(
    dir: &Path,
    backup: &Path,
    force: bool,
    map_size_bytes: usize,
) -> Result<Staged, StoreError> {
    Store::ensure_dir(dir)?;
    let lock = lock_exclusive(dir)?;
    if dir.join(DATA_FILE).exists() && !force {
        return Err(StoreError::Engine(format!(
            "{} already holds a store; pass --force to replace it (the current one is kept as {}.before-restore-<time>)",
            dir.display(),
            DATA_FILE
        )));
    }
    let staging = dir.join("restore");
    let _ = std::fs::remove_dir_all(&staging);
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&staging)
            .map_err(io(&staging))?;
    }
    let target = staging.join(DATA_FILE);
    std::fs::copy(backup, &target).map_err(io(backup))?;
    File::open(&target)
        .and_then(|f| f.sync_all())
        .map_err(io(&target))?;
    // Opening checks LMDB's format and the schema version.
    let store = Store::open_unlocked(&staging, map_size_bytes)?;
    Ok(Staged {
        dir: dir.to_path_buf(),
        staging,
        store,
        _lock: lock,
    })
}

impl Staged {
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Swaps the staged copy in: the current `data.mdb` is renamed to
    /// `data.mdb.before-restore-<unix time>` (returned), LMDB's lock file
    /// is removed (it is recreated), and the directory is fsynced.
    pub fn commit(self) -> Result<Option<PathBuf>, StoreError> {
        let data = self.dir.join(DATA_FILE);
        let kept = if data.exists() {
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let kept = self.dir.join(format!("{DATA_FILE}.before-restore-{secs}"));
            std::fs::rename(&data, &kept).map_err(io(&data))?;
            Some(kept)
        } else {
            None
        };
        std::fs::rename(self.staging.join(DATA_FILE), &data).map_err(io(&data))?;
        let _ = std::fs::remove_file(self.dir.join("lock.mdb"));
        fsync_dir(&self.dir)?;
        let _ = std::fs::remove_dir_all(&self.staging);
        Ok(kept)
    }
}
