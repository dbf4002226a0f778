//! Cost of wipe-on-free: alloc + write + free cycles through the system
//! allocator and through `ZeroizingAlloc`. `cargo bench --bench zalloc`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::time::Instant;
use tokenvault_webhook::sandbox::zalloc::ZeroizingAlloc;

fn cycle<A: GlobalAlloc>(a: &A, size: usize, iters: u32) -> f64 {
    let layout = Layout::from_size_align(size, 8).unwrap_or(Layout::new::<u8>());
    let start = Instant::now();
    for i in 0..iters {
        // SAFETY: layout is non-zero; the block is written then freed.
        unsafe {
            let p = a.alloc(layout);
            if p.is_null() {
                return f64::NAN;
            }
            std::ptr::write_bytes(p, i as u8, size);
            std::hint::black_box(p);
            a.dealloc(p, layout);
        }
    }
    start.elapsed().as_nanos() as f64 / iters as f64
}

fn main() {
    println!("| block size | system alloc+free | zeroizing alloc+free | extra |");
    println!("|---|---|---|---|");
    for size in [32usize, 256, 4096, 32 * 1024, 256 * 1024] {
        let iters = (64 * 1024 * 1024 / size).clamp(2_000, 2_000_000) as u32;
        // Warm up, then take the best of 5 runs of each.
        let best = |f: &dyn Fn() -> f64| (0..5).map(|_| f()).fold(f64::INFINITY, f64::min);
        cycle(&System, size, iters);
        let sys = best(&|| cycle(&System, size, iters));
        let z = best(&|| cycle(&ZeroizingAlloc, size, iters));
        println!("| {size} B | {sys:.1} ns | {z:.1} ns | {:.1} ns |", z - sys);
    }
}
