//! Group commit. One thread owns every write transaction: it takes all jobs
//! waiting in the queue, runs each in a nested transaction of one parent,
//! commits the parent once (one fsync for the batch) and only then answers
//! each job. A job that fails aborts its nested transaction alone. If the
//! batch commit itself fails, each job is retried in a transaction of its own
//! so one oversized write cannot fail its neighbours.

use super::kv::Write;
use super::lmdb::{Dbs, LmdbWrite};
use super::StoreError;
use heed::{Env, WithoutTls};
use std::sync::mpsc;
use tokio::sync::oneshot;

pub(in crate::store) type JobFn = Box<dyn FnMut(&mut dyn Write) -> Result<(), StoreError> + Send>;

pub(in crate::store) struct Job {
    pub run: JobFn,
    pub done: oneshot::Sender<Result<(), StoreError>>,
}

pub(in crate::store) const MAX_BATCH: usize = 512;

pub(in crate::store) fn spawn(
    env: &'static Env<WithoutTls>,
    dbs: Dbs,
) -> std::io::Result<mpsc::Sender<Job>> {
    let (tx, rx) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("lmdb-writer".into())
        .spawn(move || run(env, dbs, rx))?;
    Ok(tx)
}

fn run(env: &'static Env<WithoutTls>, dbs: Dbs, rx: mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        commit_batch(env, &dbs, batch);
    }
}

/// Whether the file system holding `dir` has (almost) no room left.
fn no_room(dir: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: a valid NUL-terminated path and a buffer of the right type.
    if unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: statvfs succeeded and filled it.
    let st = unsafe { st.assume_init() };
    (st.f_bavail as u128) * (st.f_frsize as u128) < 1 << 20
}

fn commit_batch(env: &Env<WithoutTls>, dbs: &Dbs, mut batch: Vec<Job>) {
    let outcome: Result<Vec<Result<(), StoreError>>, StoreError> = (|| {
        let mut parent = env.write_txn()?;
        let mut results = Vec::with_capacity(batch.len());
        for job in batch.iter_mut() {
            let mut child = env.nested_write_txn(&mut parent)?;
            let ran = (job.run)(&mut LmdbWrite {
                txn: &mut child,
                dbs: *dbs,
            });
            match ran {
                Ok(()) => {
                    child.commit()?;
                    results.push(Ok(()));
                }
                Err(e) => {
                    child.abort();
                    results.push(Err(e));
                }
            }
        }
        parent.commit()?;
        Ok(results)
    })();
    // LMDB reports a short write as EIO: on a file system with no room
    // left, that is a full disk, not a failing one.
    let outcome = outcome.map_err(|e| match e {
        StoreError::Engine(_) if no_room(env.path()) => StoreError::DiskFull,
        e => e,
    });
    match outcome {
        Ok(results) => {
            for (job, r) in batch.into_iter().zip(results) {
                let _ = job.done.send(r);
            }
        }
        Err(e) if batch.len() == 1 => {
            for job in batch {
                let _ = job.done.send(Err(e.clone()));
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, jobs = batch.len(), "batch commit failed; retrying jobs one by one");
            for job in batch {
                commit_batch(env, dbs, vec![job]);
            }
        }
    }
}
