//! A global allocator that wipes every block when it is freed (and the old
//! block when one is moved by `realloc`), so decrypted credentials, request
//! bodies and TOTP seeds do not survive in freed heap memory. Its cost is
//! measured in BENCHMARKS.md.

use std::alloc::{GlobalAlloc, Layout, System};

/// Wipes on free, over the system allocator (the process's global one).
pub type ZeroizingAlloc = Zeroizing<System>;

/// The wiping allocator over any inner allocator `A` (tests put a
/// recording one inside to see what reaches the free).
pub struct Zeroizing<A>(A);

impl ZeroizingAlloc {
    pub const fn system() -> Self {
        Zeroizing(System)
    }
}

#[inline]
unsafe fn wipe(ptr: *mut u8, len: usize) {
    // SAFETY: the caller owns `len` bytes at `ptr`.
    unsafe { std::ptr::write_bytes(ptr, 0, len) };
    // Keep the stores: the pointer escapes, so they cannot be treated as dead.
    std::hint::black_box(ptr);
}

// SAFETY: delegates to `A`; only adds writes to memory the caller owns.
unsafe impl<A: GlobalAlloc> GlobalAlloc for Zeroizing<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        unsafe { self.0.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        unsafe { self.0.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` is a live block of `layout.size()` bytes being freed.
        unsafe {
            wipe(ptr, layout.size());
            self.0.dealloc(ptr, layout)
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // Never let the system move a block without wiping the old copy:
        // allocate, copy, wipe, free.
        // SAFETY: layout validity is the caller's contract; sizes are checked.
        unsafe {
            let Ok(new_layout) = Layout::from_size_align(new_size, layout.align()) else {
                return std::ptr::null_mut();
            };
            if new_size <= layout.size() {
                // Shrinking in place: wipe the tail that is given back.
                wipe(ptr.add(new_size), layout.size() - new_size);
                return ptr;
            }
            let new = self.0.alloc(new_layout);
            if !new.is_null() {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size());
                self.dealloc(ptr, layout);
            }
            new
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// The system allocator, recording each block's bytes as they reach
    /// its `dealloc` (after the wrapper's wipe, before the memory is gone).
    #[derive(Default)]
    struct Recording {
        freed: Mutex<Vec<Vec<u8>>>,
    }

    // SAFETY: delegates to `System`; reads only the block being freed.
    unsafe impl GlobalAlloc for Recording {
        unsafe fn alloc(&self, l: Layout) -> *mut u8 {
            unsafe { System.alloc(l) }
        }
        unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
            let bytes = unsafe { std::slice::from_raw_parts(p, l.size()) }.to_vec();
            if let Ok(mut f) = self.freed.lock() {
                f.push(bytes);
            }
            unsafe { System.dealloc(p, l) }
        }
    }

    #[test]
    fn dealloc_wipes_the_block_and_realloc_wipes_the_moved_and_shrunk_bytes() {
        let a = Zeroizing(Recording::default());
        let freed = || std::mem::take(&mut *a.0.freed.lock().unwrap());
        unsafe {
            // dealloc: the block is all zeros by the time it is freed.
            let l = Layout::from_size_align(64, 8).unwrap();
            let p = a.alloc(l);
            std::ptr::write_bytes(p, 0xAB, 64);
            a.dealloc(p, l);
            assert_eq!(freed(), [vec![0u8; 64]]);
            // realloc that moves: contents arrive, the old copy is wiped.
            let p = a.alloc(l);
            std::ptr::write_bytes(p, 0xCD, 64);
            let q = a.realloc(p, l, 4096);
            assert!(!q.is_null());
            assert_ne!(p, q, "grown past the block: moved");
            assert_eq!(*q.add(0), 0xCD, "contents move");
            assert_eq!(*q.add(63), 0xCD, "contents move");
            assert_eq!(
                freed(),
                [vec![0u8; 64]],
                "old copy wiped before it was freed"
            );
            // realloc that shrinks in place: the returned tail is wiped.
            let l2 = Layout::from_size_align(4096, 8).unwrap();
            std::ptr::write_bytes(q, 0xEF, 4096);
            let r = a.realloc(q, l2, 16);
            assert_eq!(r, q);
            assert_eq!(*r.add(15), 0xEF, "kept bytes stay");
            assert!(
                std::slice::from_raw_parts(r.add(16), 4096 - 16)
                    .iter()
                    .all(|b| *b == 0),
                "shrunk tail wiped"
            );
            assert!(freed().is_empty(), "nothing freed by an in-place shrink");
            a.dealloc(r, Layout::from_size_align(16, 8).unwrap());
            assert_eq!(freed(), [vec![0u8; 16]]);
        }
    }
}
