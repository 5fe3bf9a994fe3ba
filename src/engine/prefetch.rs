//! Cache prefetch hints: the engine's only `unsafe`, kept in one place.
//!
//! Nearly every request touches memory that is not in cache: a new idempotency entry, the index
//! slot under a random hash, the shard that holds its key, the buffer its effects are written to.
//! Asking the CPU for those lines before they are needed lets the wait overlap other work instead
//! of stalling the shard's critical section. A prefetch is only a hint: it never faults and
//! writes nothing, whatever the address, and targets other than x86_64 skip it.

/// Bytes per cache line on the targets we prefetch for.
const CACHE_LINE_BYTES: usize = 64;

/// Asks for every cache line of the `bytes` bytes starting at `start` to be brought into cache.
pub(crate) fn prefetch_bytes<T>(start: *const T, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    prefetch_lines::<{ std::arch::x86_64::_MM_HINT_T0 }>(start.cast(), bytes);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (start, bytes);
}

/// [`prefetch_bytes`] for memory about to be written: the lines come in owned, so the stores
/// that follow need not ask for them again. Stores to lines not yet in cache are what a lock's
/// release waits for, since a locked instruction waits for every earlier store to land.
pub(crate) fn prefetch_bytes_for_write<T>(start: *const T, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    prefetch_lines::<{ std::arch::x86_64::_MM_HINT_ET0 }>(start.cast(), bytes);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (start, bytes);
}

/// Every line from the one holding `start` to the one holding its last byte. A plain loop over
/// line addresses: these ranges span one to three lines, and an iterator chain cost more
/// instructions than the prefetches themselves.
#[cfg(target_arch = "x86_64")]
fn prefetch_lines<const HINT: i32>(start: *const i8, bytes: usize) {
    use std::arch::x86_64::_mm_prefetch;
    // Counted from the start of the first line, not by address, so the loop ends whatever the
    // address (even in the last line of the address space).
    let into_line = start as usize % CACHE_LINE_BYTES;
    let span = into_line.saturating_add(bytes);
    let first_line = start.wrapping_sub(into_line);
    let mut offset = 0;
    while offset < span {
        // SAFETY: a prefetch only moves a line into cache and cannot fault, whatever the
        // address; `wrapping_add` keeps computing the address itself free of undefined
        // behaviour too.
        unsafe { _mm_prefetch::<HINT>(first_line.wrapping_add(offset)) };
        offset += CACHE_LINE_BYTES;
    }
}
