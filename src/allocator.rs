//! The process's global allocator: mimalloc, asked through its plain entry points whenever
//! those already give the alignment a layout needs.
//!
//! Why not `mimalloc::MiMalloc`: it sends every allocation to `mi_malloc_aligned`, and mimalloc
//! v3 serves an aligned request from its fast path only when a block of that size happens to be
//! free, which never happens for a size whose block is not a power of two (the bin it would come
//! from is only ever filled by plain `mi_malloc`). Such requests over-allocate into the next bin
//! through a slow path, every time: the engine's effects vector (640 bytes, 16-aligned) paid
//! that on every request (docs/BENCHMARKS.md, "Session 11"). The same problem is reported upstream
//! (purpleprotocol/mimalloc_rust#170).
//!
//! Plain `mi_malloc` returns blocks aligned to 8 bytes, and to 16 (`MI_MAX_ALIGN_SIZE`, what C's
//! `malloc` promises for `max_align_t`) for any size above 8: its bins above one word are whole
//! multiples of 16 bytes and pages start their first block 16-aligned. So a layout asking for at
//! most 8, or for 16 with a size of at least 16, takes the plain path; anything else keeps the
//! aligned one. `debug_assert!`s check every pointer handed out.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys::{
    mi_free, mi_malloc, mi_malloc_aligned, mi_realloc, mi_realloc_aligned, mi_zalloc, mi_zalloc_aligned,
};

/// The alignment plain `mi_malloc` gives any block larger than one word.
const PLAIN_ALIGN_BYTES: usize = 16;

/// The alignment plain `mi_malloc` gives every block, even a one-word one.
const WORD_ALIGN_BYTES: usize = 8;

/// mimalloc with the plain path for naturally aligned layouts; see the module comment.
pub struct LedgerAllocator;

/// Whether plain `mi_malloc(size)` is aligned enough for `layout`.
fn plain_fits(size: usize, align: usize) -> bool {
    align <= WORD_ALIGN_BYTES || (align <= PLAIN_ALIGN_BYTES && size >= PLAIN_ALIGN_BYTES)
}

fn checked(pointer: *mut c_void, align: usize) -> *mut u8 {
    debug_assert!(pointer.is_null() || (pointer as usize).is_multiple_of(align), "mimalloc misaligned a block");
    pointer.cast()
}

// SAFETY: every method hands the request to mimalloc, whose blocks satisfy the layout: either
// through its aligned entry points, or through the plain ones only where `plain_fits` holds
// (see the module comment). Every block is freed by `mi_free`, which takes blocks from either.
unsafe impl GlobalAlloc for LedgerAllocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let (size, align) = (layout.size(), layout.align());
        // SAFETY: mimalloc may be called with any size and a power-of-two alignment.
        let pointer = unsafe { if plain_fits(size, align) { mi_malloc(size) } else { mi_malloc_aligned(size, align) } };
        checked(pointer, align)
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let (size, align) = (layout.size(), layout.align());
        // SAFETY: as in `alloc`.
        let pointer = unsafe { if plain_fits(size, align) { mi_zalloc(size) } else { mi_zalloc_aligned(size, align) } };
        checked(pointer, align)
    }

    #[inline]
    unsafe fn dealloc(&self, pointer: *mut u8, _layout: Layout) {
        // SAFETY: `pointer` came from this allocator, so from mimalloc.
        unsafe { mi_free(pointer.cast()) }
    }

    #[inline]
    unsafe fn realloc(&self, pointer: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let align = layout.align();
        // SAFETY: `pointer` came from this allocator; the new block keeps the layout's alignment
        // by the same rule as `alloc`.
        let moved = unsafe {
            if plain_fits(new_size, align) {
                mi_realloc(pointer.cast(), new_size)
            } else {
                mi_realloc_aligned(pointer.cast(), new_size, align)
            }
        };
        checked(moved, align)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every size up to a few pages and every alignment up to a page: each block is aligned,
    /// writable across its size, keeps its contents through a realloc that grows it, stays
    /// aligned through one that shrinks it below a word (from the plain path to the aligned one),
    /// and zeroed blocks are zero.
    #[test]
    fn every_layout_gets_an_aligned_block() {
        let allocator = LedgerAllocator;
        for align in (0..=12).map(|shift| 1_usize << shift) {
            for size in (1..=256).chain([640, 1_000, 4_096, 10_000, 70_000]) {
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: the layout has a non-zero size; the block is written within it and
                // freed once.
                unsafe {
                    let block = allocator.alloc(layout);
                    assert!(!block.is_null());
                    assert!((block as usize).is_multiple_of(align), "size {size} align {align}");
                    block.write_bytes(0xAB, size);
                    let grown = allocator.realloc(block, layout, size * 3);
                    assert!((grown as usize).is_multiple_of(align), "realloc of size {size} align {align}");
                    assert!((0..size).all(|at| *grown.add(at) == 0xAB));
                    allocator.dealloc(grown, Layout::from_size_align(size * 3, align).unwrap());

                    // Shrinking a 16-aligned block below 16 bytes leaves the plain path.
                    let shrunk = allocator.realloc(allocator.alloc(layout), layout, 1);
                    assert!((shrunk as usize).is_multiple_of(align), "shrunk size {size} align {align}");
                    allocator.dealloc(shrunk, Layout::from_size_align(1, align).unwrap());

                    let zeroed = allocator.alloc_zeroed(layout);
                    assert!((zeroed as usize).is_multiple_of(align), "zeroed size {size} align {align}");
                    assert!((0..size).all(|at| *zeroed.add(at) == 0));
                    allocator.dealloc(zeroed, layout);
                }
            }
        }
    }
}
