//! Two generations of what the engine remembers for a retention window: idempotency keys
//! (`idempotency`) and closed reservations (`closed`).
//!
//! New entries go into the current generation. Once per window the sweep retires the previous
//! generation whole and the current one becomes previous. So an entry is remembered at least
//! one window and at most about two (plus the sweep interval), and forgetting costs one free
//! per generation, made after the shard is unlocked, instead of an eviction per entry under the
//! lock.

/// One generation of a store.
pub(crate) trait Generation: Default {
    /// An empty generation that holds `entries` without growing.
    fn with_capacity(entries: usize) -> Self;

    /// Entries it holds.
    fn len(&self) -> usize;
}

#[derive(Debug, Default)]
pub(crate) struct Generations<G> {
    pub current: G,
    pub previous: G,
    /// When the current generation started taking entries.
    current_since_ms: i64,
}

impl<G: Generation> Generations<G> {
    /// Starts a new generation if the current one is at least `retention_ms` old at `now_ms`.
    /// Returns the retired generation, for the caller to drop after releasing the shard lock.
    pub fn rotate(&mut self, now_ms: i64, retention_ms: i64) -> Option<G> {
        if now_ms.saturating_sub(self.current_since_ms) < retention_ms {
            return None;
        }
        self.current_since_ms = now_ms;
        // The next generation will likely take as many entries as this one did: size it up
        // front so it does not grow while requests wait on the shard lock.
        let next = G::with_capacity(self.current.len());
        let retired = std::mem::replace(&mut self.previous, std::mem::replace(&mut self.current, next));
        Some(retired)
    }
}
