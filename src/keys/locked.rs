//! Key bytes in locked memory: a private anonymous mapping that is
//! `mlock`ed (never swapped), excluded from core dumps (`MADV_DONTDUMP`),
//! wiped in a forked child (`MADV_WIPEONFORK`), and zeroized before it is
//! unmapped. Used by backends that hold unsealed keys in process memory.

use zeroize::Zeroize;

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("secret of {0} bytes does not fit a locked page")]
    TooLarge(usize),
    #[error("mmap failed: {0}")]
    Map(std::io::Error),
    #[error("mlock failed ({0}): raise LimitMEMLOCK= or RLIMIT_MEMLOCK")]
    Lock(std::io::Error),
}

pub struct LockedKey {
    ptr: *mut u8,
    cap: usize,
    len: usize,
}

// SAFETY: the mapping is owned exclusively by this value; `&LockedKey` only
// hands out shared reads of initialised bytes.
unsafe impl Send for LockedKey {}
// SAFETY: no interior mutability through `&LockedKey`.
unsafe impl Sync for LockedKey {}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

impl LockedKey {
    /// Copies `bytes` into a fresh locked page. The caller zeroizes its copy.
    pub fn new(bytes: &[u8]) -> Result<LockedKey, LockError> {
        let cap = page_size();
        if bytes.len() > cap {
            return Err(LockError::TooLarge(bytes.len()));
        }
        // SAFETY: anonymous private mapping, no address hint; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                cap,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(LockError::Map(std::io::Error::last_os_error()));
        }
        let ptr = ptr as *mut u8;
        // From here on `Drop` unmaps (len 0: nothing to wipe yet).
        let mut key = LockedKey { ptr, cap, len: 0 };
        // SAFETY: `ptr..ptr+cap` is our mapping.
        if unsafe { libc::mlock(ptr as *const libc::c_void, cap) } != 0 {
            return Err(LockError::Lock(std::io::Error::last_os_error()));
        }
        // Best effort: older kernels lack these advice values; the page is
        // locked either way and core dumps are disabled process-wide.
        // SAFETY: advice on our own mapping.
        unsafe {
            libc::madvise(ptr as *mut libc::c_void, cap, libc::MADV_DONTDUMP);
            libc::madvise(ptr as *mut libc::c_void, cap, libc::MADV_WIPEONFORK);
        }
        // SAFETY: `bytes.len() <= cap`, the regions cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr, bytes.len()) };
        key.len = bytes.len();
        Ok(key)
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the first `len` bytes of the mapping were initialised in `new`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the page is currently resident and locked (for tests and doctor).
    pub fn is_locked(&self) -> bool {
        let mut vec = [0u8; 1];
        // SAFETY: one page at `ptr`, `vec` has room for one entry.
        let r = unsafe { libc::mincore(self.ptr as *mut libc::c_void, self.cap, vec.as_mut_ptr()) };
        r == 0 && vec[0] & 1 == 1
    }
}

impl Drop for LockedKey {
    fn drop(&mut self) {
        // SAFETY: our mapping; zeroize uses volatile writes the compiler keeps.
        unsafe {
            std::slice::from_raw_parts_mut(self.ptr, self.cap).zeroize();
            libc::munlock(self.ptr as *const libc::c_void, self.cap);
            libc::munmap(self.ptr as *mut libc::c_void, self.cap);
        }
    }
}

impl std::fmt::Debug for LockedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LockedKey({} bytes, redacted)", self.len)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn holds_bytes_locked_and_refuses_oversize() {
        let k = LockedKey::new(&[7u8; 32]).unwrap();
        assert_eq!(k.as_slice(), &[7u8; 32]);
        assert_eq!(k.len(), 32);
        assert!(k.is_locked());
        assert_eq!(format!("{k:?}"), "LockedKey(32 bytes, redacted)");
        // The locked page shows up in the process's locked-memory total.
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let vmlck: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmLck:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap();
        assert!(vmlck >= 4, "VmLck {vmlck} kB");
        drop(k);
        assert!(matches!(
            LockedKey::new(&vec![0u8; page_size() + 1]),
            Err(LockError::TooLarge(_))
        ));
    }
}
