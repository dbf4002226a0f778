//! A global allocator that wipes every block when it is freed (and the old
//! block when one is moved by `realloc`), so decrypted credentials, request
//! bodies and TOTP seeds do not survive in freed heap memory. Its cost is
//! measured in BENCHMARKS.md.

use std::alloc::{GlobalAlloc, Layout, System};

pub struct ZeroizingAlloc;

#[inline]
unsafe fn wipe(ptr: *mut u8, len: usize) {
    // SAFETY: the caller owns `len` bytes at `ptr`.
    unsafe { std::ptr::write_bytes(ptr, 0, len) };
    // Keep the stores: the pointer escapes, so they cannot be treated as dead.
    std::hint::black_box(ptr);
}

// SAFETY: delegates to `System`; only adds writes to memory the caller owns.
unsafe impl GlobalAlloc for ZeroizingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` is a live block of `layout.size()` bytes being freed.
        unsafe {
            wipe(ptr, layout.size());
            System.dealloc(ptr, layout)
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
            let new = System.alloc(new_layout);
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

    #[test]
    fn dealloc_and_realloc_wipe() {
        let a = ZeroizingAlloc;
        unsafe {
            let l = Layout::from_size_align(64, 8).unwrap();
            let p = a.alloc(l);
            std::ptr::write_bytes(p, 0xAB, 64);
            let q = a.realloc(p, l, 4096);
            assert!(!q.is_null());
            assert_eq!(*q.add(63), 0xAB, "contents move");
            let l2 = Layout::from_size_align(4096, 8).unwrap();
            let r = a.realloc(q, l2, 16);
            assert_eq!(r, q);
            assert_eq!(*r.add(16), 0, "shrunk tail wiped");
            a.dealloc(r, Layout::from_size_align(16, 8).unwrap());
        }
    }
}
