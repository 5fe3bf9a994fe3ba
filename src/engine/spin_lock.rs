//! The lock over each shard and over the sequencer: a test-and-set lock that spins a little,
//! then yields the CPU, then sleeps, and lets go with a plain store.
//!
//! Why not `parking_lot::Mutex`, which the engine used before: every request takes two to four
//! of these locks (its shards, its key's shard, the sequencer), almost always uncontended, and
//! parking_lot lets go with a compare-and-swap, because it must notice parked waiters. A locked
//! instruction costs tens of cycles even on a line in cache, so a reserve + commit paid about
//! fourteen of them. Here nobody parks, so letting go is a release store, which costs no more
//! than an ordinary write on x86 (measured in docs/BENCHMARKS.md, session 21).
//!
//! What is given up: waiters are not queued and nothing is fair. The engine's critical sections
//! are a few hundred nanoseconds (a request's rules and its journal hand-off), so a waiter
//! usually gets the lock while spinning. The exceptions are long holders (a snapshot of every
//! shard, a sweep): a waiter then yields, and past [`YIELDS_BEFORE_SLEEP`] it sleeps between
//! tries, so a blocked request thread stops burning a core the holder or the journal writer
//! needs. The lock is built on `lock_api`, so the guards are the usual `MutexGuard`s.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lock_api::RawMutex as _;

/// Busy-wait rounds before the first yield: about the length of a request's critical section.
const SPINS_BEFORE_YIELD: u32 = 100;
/// Yields before a waiter starts sleeping between tries.
const YIELDS_BEFORE_SLEEP: u32 = 50;
/// How long a waiter sleeps between tries once the holder is clearly not about to let go.
const SLEEP_BETWEEN_TRIES: Duration = Duration::from_micros(50);

/// The raw lock; use it through [`Mutex`].
pub struct RawSpinLock {
    locked: AtomicBool,
}

pub type Mutex<T> = lock_api::Mutex<RawSpinLock, T>;
pub type MutexGuard<'a, T> = lock_api::MutexGuard<'a, RawSpinLock, T>;
pub type MappedMutexGuard<'a, T> = lock_api::MappedMutexGuard<'a, RawSpinLock, T>;

// SAFETY: `lock` and `try_lock` return only after swapping `locked` from false to true with
// Acquire ordering, so at most one holder exists at a time, and `unlock` (called only by that
// holder, as lock_api guarantees) publishes the holder's writes with a Release store.
unsafe impl lock_api::RawMutex for RawSpinLock {
    const INIT: RawSpinLock = RawSpinLock { locked: AtomicBool::new(false) };

    type GuardMarker = lock_api::GuardSend;

    #[inline]
    fn lock(&self) {
        if !self.try_lock() {
            self.lock_contended();
        }
    }

    #[inline]
    fn try_lock(&self) -> bool {
        self.locked.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_ok()
    }

    #[inline]
    unsafe fn unlock(&self) {
        debug_assert!(self.locked.load(Ordering::Relaxed), "unlocking a lock nobody holds");
        self.locked.store(false, Ordering::Release);
    }

    #[inline]
    fn is_locked(&self) -> bool {
        self.locked.load(Ordering::Relaxed)
    }
}

impl RawSpinLock {
    #[cold]
    #[inline(never)]
    fn lock_contended(&self) {
        let mut waits = 0_u32;
        loop {
            // Wait reading the line, which stays shared in every waiter's cache, and try the
            // swap, which takes the line exclusive, only once the holder has let go.
            while self.locked.load(Ordering::Relaxed) {
                if waits < SPINS_BEFORE_YIELD {
                    std::hint::spin_loop();
                } else if waits < SPINS_BEFORE_YIELD + YIELDS_BEFORE_SLEEP {
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(SLEEP_BETWEEN_TRIES);
                }
                waits = waits.saturating_add(1);
            }
            if self.try_lock() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// Several threads add to one counter under the lock, more threads than cores, so holders
    /// are preempted and waiters go through every stage (spin, yield, sleep). A lost update
    /// would show as a smaller total.
    #[test]
    fn no_update_is_lost_under_contention() {
        const THREADS: usize = 8;
        const ADDS_PER_THREAD: u64 = 20_000;
        let counter = Arc::new(Mutex::new(0_u64));
        let workers: Vec<_> = (0..THREADS)
            .map(|_| {
                let counter = Arc::clone(&counter);
                std::thread::spawn(move || {
                    for _ in 0..ADDS_PER_THREAD {
                        let mut value = counter.lock();
                        // A read and a write apart, so a second holder would interleave.
                        let seen = *value;
                        std::hint::black_box(&seen);
                        *value = seen + 1;
                    }
                })
            })
            .collect();
        for worker in workers {
            assert!(worker.join().is_ok(), "a worker panicked");
        }
        assert_eq!(*counter.lock(), THREADS as u64 * ADDS_PER_THREAD);
    }

    /// A waiter behind a long holder still gets the lock once it is let go, and sees the write.
    #[test]
    fn a_waiter_behind_a_long_holder_gets_the_lock() {
        let shared = Arc::new(Mutex::new(0_u32));
        let guard = shared.lock();
        let waiter = {
            let shared = Arc::clone(&shared);
            std::thread::spawn(move || *shared.lock())
        };
        std::thread::sleep(Duration::from_millis(20));
        let mut guard = guard;
        *guard = 7;
        drop(guard);
        assert_eq!(waiter.join().ok(), Some(7));
        assert!(!shared.is_locked());
    }
}
