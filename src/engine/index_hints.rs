//! Where a shard's closed-reservation index sits in memory, published beside the shard's lock,
//! so that a reserve, commit or release can ask for the index line it will touch before it waits
//! for its locks.
//!
//! Why: the index is far larger than the cache and the line is chosen by a hash, so no hardware
//! prefetcher guesses it, and a reserve probes it early in its rules. A load still in flight is
//! waited for at the next locked instruction (the sequencer's lock, the shard unlocks), so a miss
//! met under the lock stalls the request and everyone queued on its shards. Asked for before the
//! locks, the line travels while the request takes them. Measured (docs/BENCHMARKS.md, session
//! 15): reserve + commit 5.8% faster; asked for right after locking, within noise. The
//! idempotency index is not published: its lines asked for before locking made uniform
//! transfers slower, so the engine asks for them once it holds the key's shard.
//!
//! Whoever changed a shard's closed reservations publishes the addresses when it lets go of the
//! lock (`LockedShards`' drop), and writes only when the index moved (it grew, filled, or the
//! generations rotated), so the line stays shared between cores; the index flags its own moves,
//! so the check is one flag, and requests that did not touch the store skip it. Readers use
//! relaxed loads and may see a stale or half-updated address: that is harmless, because an
//! address here is only ever a prefetch hint, never dereferenced. A reservation filed into an
//! empty table gets no hint (its address is none): one miss per table.

use std::sync::atomic::{AtomicUsize, Ordering};

use uuid::Uuid;

use super::closed::{ClosedReservations, ReservationHasher};
use super::position_index::SlotsAddress;

/// One shard's published closed-reservation index addresses, and a copy of the store's hasher
/// (fixed when the store is made) to find a reservation's slot with.
#[derive(Debug)]
pub(crate) struct IndexHints {
    /// The current and the previous generation.
    closed: [PublishedAddress; 2],
    closed_hasher: ReservationHasher,
}

impl IndexHints {
    pub fn new(store: &ClosedReservations) -> IndexHints {
        let hints = IndexHints { closed: Default::default(), closed_hasher: store.hasher().clone() };
        hints.publish(store);
        hints
    }

    /// Publishes where `store`'s index is now. Called by the holder of the shard's lock.
    fn publish(&self, store: &ClosedReservations) {
        for (address, published) in store.index_addresses().into_iter().zip(&self.closed) {
            published.publish(address);
        }
    }

    /// Publishes where `store`'s index is if it moved since the last call: the check a release
    /// makes after a change to the store. A table that empties is not a move (journal replay
    /// only): the stale address left is a wasted hint until the next publish.
    pub fn publish_if_moved(&self, store: &mut ClosedReservations) {
        if store.take_index_moved() {
            self.publish(store);
        }
    }

    /// Asks for the lines a lookup or a filing of this closed reservation will touch.
    pub fn prefetch_reservation(&self, user_id: Uuid, reservation_id: Uuid) {
        let hash = self.closed_hasher.hash(user_id, reservation_id);
        self.closed.iter().for_each(|published| published.load().prefetch(hash));
    }
}

#[cfg(test)]
impl IndexHints {
    /// The addresses as a reader sees them: current, then previous generation.
    pub fn published(&self) -> [SlotsAddress; 2] {
        [self.closed[0].load(), self.closed[1].load()]
    }
}

/// A [`SlotsAddress`] readable without the shard's lock.
#[derive(Debug, Default)]
struct PublishedAddress {
    first_slot: AtomicUsize,
    mask: AtomicUsize,
}

impl PublishedAddress {
    fn load(&self) -> SlotsAddress {
        SlotsAddress { first_slot: self.first_slot.load(Ordering::Relaxed), mask: self.mask.load(Ordering::Relaxed) }
    }

    /// Writes only a changed address: an unchanged one leaves the line shared between cores.
    fn publish(&self, address: SlotsAddress) {
        if self.load() != address {
            self.first_slot.store(address.first_slot, Ordering::Relaxed);
            self.mask.store(address.mask, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::account::{Domain, UserAccount};
    use crate::engine::asset::Asset;
    use crate::engine::reservation::{Reservation, ReservationStatus};

    fn closed(id: u128) -> Reservation {
        Reservation {
            id: Uuid::from_u128(id),
            account: UserAccount { user_id: Uuid::from_u128(7), domain: Domain::Banking, asset: Asset::USD },
            amount_minor: 1,
            created_at_ms: 0,
            expires_at_ms: 1,
            status: ReservationStatus::Released,
            closed_at_ms: Some(0),
        }
    }

    /// An index that fills, grows and rotates is published where it is after each release; an
    /// empty one as no address; and a release that moved nothing writes nothing.
    #[test]
    fn publishing_follows_filling_growth_and_rotation() {
        let mut store = ClosedReservations::default();
        let hints = IndexHints::new(&store);
        assert_eq!(hints.published(), [SlotsAddress::NONE; 2], "a new store's index is empty");
        for round in 0..3_u128 {
            for n in 0..1_000 {
                store.insert(closed(n << 8 | round));
                if n == 0 {
                    hints.publish_if_moved(&mut store);
                    assert_eq!(hints.published(), store.index_addresses(), "filled, round {round}");
                }
            }
            hints.publish_if_moved(&mut store);
            assert_eq!(hints.published(), store.index_addresses(), "grown, round {round}");
            assert!(!store.take_index_moved(), "the publish took the move");
            store.rotate(i64::try_from(round).unwrap_or_default() * 10, 10);
            hints.publish_if_moved(&mut store);
            assert_eq!(hints.published(), store.index_addresses(), "rotated, round {round}");
        }
        assert!(hints.published()[1] != SlotsAddress::NONE, "the previous generation holds the last round");
    }

    /// Through the engine: releases file reservations (the index fills and grows), sweeps rotate
    /// it, and after every request the shard publishes where the index is.
    #[test]
    fn the_engine_publishes_what_its_requests_move() {
        use crate::engine::account::{AccountConfig, Provider};
        use crate::engine::idempotency::IdempotencyKey;
        use crate::engine::money::Amount;
        use crate::engine::operation::{Operation, Request};
        use crate::engine::record::MemoryJournal;
        use crate::engine::{Engine, EngineConfig};

        let retention_ms = 1_000;
        let engine = Engine::new(EngineConfig { retention_ms, ..EngineConfig::default() }, MemoryJournal::default());
        let account = UserAccount { user_id: Uuid::from_u128(1), domain: Domain::Banking, asset: Asset::USD };
        let amount = |minor| Amount::from_minor(minor).unwrap_or_else(|error| panic!("{error}"));
        let mut requests = 0_u64;
        let mut run = |now_ms: i64, operation| {
            requests += 1;
            let key = IdempotencyKey::new(&format!("request-{requests}")).unwrap_or_else(|error| panic!("{error}"));
            engine.execute(Request { key, now_ms, operation }).result.unwrap_or_else(|error| panic!("{error}"));
        };
        run(0, Operation::OpenAccount { account, config: AccountConfig::default() });
        run(0, Operation::Deposit { account, amount: amount(1_000_000), provider: Provider::Stripe });
        let cell = &engine.shards[engine.map.of_user(account.user_id) as usize];
        for window in 0..3_i64 {
            let now_ms = window * 2 * retention_ms;
            engine.sweep(now_ms).unwrap_or_else(|error| panic!("{error}"));
            assert_eq!(cell.hints().published(), cell.read().closed_reservations().index_addresses(), "swept");
            for n in 0..100_u128 {
                let reservation_id = Uuid::from_u128(u128::try_from(window).unwrap_or_default() << 32 | n);
                run(now_ms, Operation::Reserve { reservation_id, account, amount: amount(1), ttl_ms: None });
                run(now_ms, Operation::Release { user_id: account.user_id, reservation_id });
                let expected = cell.read().closed_reservations().index_addresses();
                assert_eq!(cell.hints().published(), expected, "window {window}, release {n}");
            }
        }
        assert!(cell.hints().published().iter().all(|address| *address != SlotsAddress::NONE));
    }

    /// A hint is never dereferenced: garbage and stale addresses are asked for and nothing happens.
    #[test]
    fn any_address_is_a_harmless_hint() {
        for first_slot in [1, 8, usize::MAX - 64, usize::MAX, 0xdead_beef] {
            for mask in [0, 15, usize::MAX] {
                SlotsAddress { first_slot, mask }.prefetch(u64::MAX);
                SlotsAddress { first_slot, mask }.prefetch(0);
            }
        }
    }
}
