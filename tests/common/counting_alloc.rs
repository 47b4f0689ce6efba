//! A global allocator that counts live heap bytes, so memory is measured, not guessed, and
//! counts the allocations and live blocks of the threads that ask for it, so "allocates nothing
//! per X" and "holds nothing per X" are checked, not assumed. Shared by `tests/tls_memory.rs`,
//! `tests/fanout_allocations.rs`, `tests/idle_connection_heap.rs` and `benches/holds.rs` (each
//! includes this file with `#[path]` and so installs it as its binary's allocator).
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicIsize, AtomicU64, Ordering};

struct Counting;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

/// Allocations (and reallocations) made by threads that called [`count_this_thread`].
static COUNTED_ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

/// Blocks allocated minus blocks freed by those threads, and likewise their bytes.
static COUNTED_LIVE_BLOCKS: AtomicIsize = AtomicIsize::new(0);
static COUNTED_LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

thread_local! {
    // Const-initialised and without a destructor: reading it from inside the allocator never
    // allocates or registers anything.
    static COUNTED: Cell<bool> = const { Cell::new(false) };
}

/// Heap bytes allocated and not yet freed, by this process.
pub fn live_bytes() -> isize {
    LIVE_BYTES.load(Ordering::Relaxed)
}

/// From now on, allocations made by the calling thread are counted in [`allocations`].
pub fn count_this_thread() {
    COUNTED.with(|counted| counted.set(true));
}

/// Allocations and reallocations made so far by the threads that asked to be counted.
pub fn allocations() -> u64 {
    COUNTED_ALLOCATIONS.load(Ordering::Relaxed)
}

/// Heap blocks the counted threads allocated and have not freed (a block freed by another
/// thread stays counted: meant for a single-threaded server that frees what it allocates).
pub fn counted_live_blocks() -> isize {
    COUNTED_LIVE_BLOCKS.load(Ordering::Relaxed)
}

/// Bytes of those blocks (reallocations included).
pub fn counted_live_bytes() -> isize {
    COUNTED_LIVE_BYTES.load(Ordering::Relaxed)
}

fn counted() -> bool {
    COUNTED.try_with(Cell::get).unwrap_or(false)
}

// SAFETY: forwards every call to the system allocator unchanged; only counts sizes and calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        if counted() {
            COUNTED_ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
            COUNTED_LIVE_BLOCKS.fetch_add(1, Ordering::Relaxed);
            COUNTED_LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        // SAFETY: the caller upholds `alloc`'s contract, which we pass on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        if counted() {
            COUNTED_LIVE_BLOCKS.fetch_sub(1, Ordering::Relaxed);
            COUNTED_LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        }
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        if counted() {
            COUNTED_ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
            COUNTED_LIVE_BYTES.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        // SAFETY: as for `dealloc`, and `new_size` is the caller's valid request.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;
