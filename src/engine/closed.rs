//! Closed reservations, remembered for the retention window: a late commit or release then hears
//! "Completed", "Released" or "Expired" rather than "not found", and an id cannot be reused
//! while its first reservation is remembered.
//!
//! One store per shard, in two generations like the idempotency keys (`generations`): a
//! reservation moves here from its user's map when it closes, and is remembered at least
//! `retention_ms` and at most about twice that. Before, closed reservations stayed in their
//! user's map and a queue by close time forgot them one by one: a hash-table removal each, under
//! the lock, and a user map that grew cold for every reserve.

use std::hash::BuildHasher;

use uuid::Uuid;

use super::generations::{self, Generations};
use super::position_index::{PositionIndex, SlotsAddress};
use super::prefetch::prefetch_bytes_for_write;
use super::reservation::Reservation;

/// Reservations per chunk of a generation (96 KiB): a new chunk is rare, and an idle generation
/// holds little memory.
const CHUNK_RESERVATIONS: usize = 1_024;

/// One generation: closed reservations in the order they closed, found through an index by
/// (user_id, reservation_id).
///
/// Why not a hash map of reservations: closing writes into this table on every commit, and a
/// map's slots are large (a reservation and its key) and land at random, so each close wrote
/// two cold lines of a table many times the cache (measured: about 200 ns per reserve and
/// commit, docs/BENCHMARKS.md session 12). Here the random write is one 8-byte index slot in
/// a table a twelfth of that size, and the reservation goes to the end of the newest chunk,
/// whose next lines are asked for in advance.
#[derive(Debug, Default)]
pub(crate) struct ClosedGeneration {
    index: PositionIndex,
    /// Chunks of `CHUNK_RESERVATIONS`, allocated whole so they never move. An entry that was
    /// removed (an undone close, or an id reused in a journal replay) stays, unindexed, until
    /// the generation is retired.
    chunks: Vec<Vec<Reservation>>,
}

impl generations::Generation for ClosedGeneration {
    fn with_capacity(reservations: usize) -> ClosedGeneration {
        ClosedGeneration { index: PositionIndex::with_capacity(reservations), chunks: Vec::new() }
    }

    fn len(&self) -> usize {
        self.index.len()
    }
}

impl ClosedGeneration {
    fn entry(&self, position: u32) -> &Reservation {
        let position = position as usize;
        &self.chunks[position / CHUNK_RESERVATIONS][position % CHUNK_RESERVATIONS]
    }

    fn holds(&self, user_id: Uuid, reservation_id: Uuid) -> impl Fn(u32) -> bool + '_ {
        move |position| {
            let entry = self.entry(position);
            entry.id == reservation_id && entry.account.user_id == user_id
        }
    }

    fn get(&self, hash: u64, user_id: Uuid, reservation_id: Uuid) -> Option<&Reservation> {
        self.index.find(hash, self.holds(user_id, reservation_id)).map(|position| self.entry(position))
    }

    fn insert(&mut self, hash: u64, reservation: Reservation) {
        if self.chunks.last().is_none_or(|chunk| chunk.len() == CHUNK_RESERVATIONS) {
            self.chunks.push(Vec::with_capacity(CHUNK_RESERVATIONS));
        }
        let full_chunks = self.chunks.len() - 1;
        let chunk = &mut self.chunks[full_chunks];
        let position = full_chunks * CHUNK_RESERVATIONS + chunk.len();
        // Positions are 32-bit: four billion reservations closed within one retention window
        // would take some 400 GB of memory first.
        let position = u32::try_from(position)
            .ok()
            .filter(|position| *position < u32::MAX)
            .unwrap_or_else(|| panic!("more than 2^32 reservations closed within one retention window"));
        chunk.push(reservation);
        if chunk.len() < CHUNK_RESERVATIONS {
            prefetch_bytes_for_write(chunk.as_ptr().wrapping_add(chunk.len()), std::mem::size_of::<Reservation>());
        }
        self.index.insert(hash, position);
    }

    /// Takes back the last entry if it is this reservation, leaving nothing behind.
    ///
    /// An undo that empties the last chunk keeps it, so a close and its undo repeated at a chunk
    /// boundary (a caller retrying a conflicting release) do not free and allocate a chunk each
    /// time. The next undo, which takes from the chunk before, drops it first: the newest entry
    /// is then the end of that chunk, and the next close fills it again with no gap.
    fn pop_last(&mut self, hash: u64, user_id: Uuid, reservation_id: Uuid) -> Option<Reservation> {
        if self.chunks.last().is_some_and(Vec::is_empty) {
            self.chunks.pop();
        }
        let full_chunks = self.chunks.len().checked_sub(1)?;
        let last = self.chunks[full_chunks].last()?;
        if last.id != reservation_id || last.account.user_id != user_id {
            return None;
        }
        let position = full_chunks * CHUNK_RESERVATIONS + self.chunks[full_chunks].len() - 1;
        let unindexed = self.index.remove(hash, |candidate| candidate as usize == position);
        debug_assert!(unindexed, "the last entry is indexed until it is taken back");
        self.chunks[full_chunks].pop()
    }

    /// Entries held, removed ones included.
    #[cfg(test)]
    fn stored(&self) -> usize {
        self.chunks.iter().map(Vec::len).sum()
    }

    /// Unindexes the entry of this reservation and says where it stays: its entry is kept in
    /// its chunk until the generation retires, so [`ClosedGeneration::reindex`] can bring it back.
    fn remove(&mut self, hash: u64, user_id: Uuid, reservation_id: Uuid) -> Option<(Reservation, u32)> {
        let position = self.index.find(hash, self.holds(user_id, reservation_id))?;
        let reservation = *self.entry(position);
        self.index.remove(hash, |candidate| candidate == position);
        Some((reservation, position))
    }

    /// Indexes again an entry [`ClosedGeneration::remove`] unindexed.
    fn reindex(&mut self, hash: u64, position: u32) {
        self.index.insert(hash, position);
    }

    fn iter(&self) -> impl Iterator<Item = &Reservation> + '_ {
        self.index.positions().map(|position| self.entry(position))
    }
}

/// A closed reservation a journal replay forgot ([`ClosedReservations::remove`]), and where its
/// entry stays, so a record that fails to replay can put it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ForgottenReservation {
    pub reservation: Reservation,
    in_previous: bool,
    position: u32,
}

/// Hashes (user_id, reservation_id) for one store. Seeded per store, so ids chosen to collide in
/// one engine do not collide in another; a copy beside the shard's lock (`index_hints`) finds
/// the index lines of a reservation before the lock is taken.
#[derive(Debug, Clone, Default)]
pub(crate) struct ReservationHasher(foldhash::fast::RandomState);

impl ReservationHasher {
    pub fn hash(&self, user_id: Uuid, reservation_id: Uuid) -> u64 {
        self.0.hash_one((user_id.as_u128(), reservation_id.as_u128()))
    }
}

#[derive(Debug, Default)]
pub(crate) struct ClosedReservations {
    generations: Generations<ClosedGeneration>,
    hasher: ReservationHasher,
}

impl ClosedReservations {
    fn hash(&self, user_id: Uuid, reservation_id: Uuid) -> u64 {
        self.hasher.hash(user_id, reservation_id)
    }

    pub fn hasher(&self) -> &ReservationHasher {
        &self.hasher
    }

    /// Whether [`ClosedReservations::index_addresses`] changed since the last call. A previous
    /// generation only changes when a new current one starts, which counts as a change.
    pub fn take_index_moved(&mut self) -> bool {
        self.generations.current.index.take_moved()
    }

    /// Where the current and the previous generation's indexes are (see `index_hints`).
    pub fn index_addresses(&self) -> [SlotsAddress; 2] {
        [self.generations.current.index.address(), self.generations.previous.index.address()]
    }

    pub fn get(&self, user_id: Uuid, reservation_id: Uuid) -> Option<&Reservation> {
        let hash = self.hash(user_id, reservation_id);
        self.generations
            .current
            .get(hash, user_id, reservation_id)
            .or_else(|| self.generations.previous.get(hash, user_id, reservation_id))
    }

    /// Remembers `reservation`, which has just closed.
    pub fn insert(&mut self, reservation: Reservation) {
        debug_assert!(reservation.closed_at_ms.is_some(), "only closed reservations are kept here");
        debug_assert!(self.get(reservation.account.user_id, reservation.id).is_none(), "a reservation closed twice");
        let hash = self.hash(reservation.account.user_id, reservation.id);
        self.generations.current.insert(hash, reservation);
    }

    /// Takes back the reservation the latest `insert` filed: the undoing of its close. A close and
    /// its undoing happen under one shard lock with no rotation between, and effects are undone
    /// newest first, so it is the current generation's last entry and is removed whole. Undone
    /// closes are not rare enough to leave behind: a commit or release that meets an idempotency
    /// conflict, or a full key store, is undone after its rules ran, and a caller can repeat it.
    pub fn undo_insert(&mut self, user_id: Uuid, reservation_id: Uuid) -> Option<Reservation> {
        let hash = self.hash(user_id, reservation_id);
        let popped = self.generations.current.pop_last(hash, user_id, reservation_id);
        debug_assert!(popped.is_some(), "an undone close is the latest one filed");
        popped.or_else(|| self.remove(user_id, reservation_id).map(|forgotten| forgotten.reservation))
    }

    /// Forgets the closed reservation `reservation_id` of `user_id`, from either generation. Its
    /// entry stays, unindexed, until the generation retires: only a journal replay that meets a
    /// reused id does this, once per record, and [`ClosedReservations::restore`] undoes it if
    /// the record turns out not to replay.
    pub fn remove(&mut self, user_id: Uuid, reservation_id: Uuid) -> Option<ForgottenReservation> {
        let hash = self.hash(user_id, reservation_id);
        let (in_previous, (reservation, position)) =
            match self.generations.current.remove(hash, user_id, reservation_id) {
                Some(found) => (false, found),
                None => (true, self.generations.previous.remove(hash, user_id, reservation_id)?),
            };
        Some(ForgottenReservation { reservation, in_previous, position })
    }

    /// Remembers again a reservation [`ClosedReservations::remove`] forgot, where it was. Call
    /// before the store rotates, and before any other reservation with its id is filed.
    pub fn restore(&mut self, forgotten: ForgottenReservation) {
        let ForgottenReservation { reservation, in_previous, position } = forgotten;
        debug_assert!(self.get(reservation.account.user_id, reservation.id).is_none(), "restored over a remembered id");
        let hash = self.hash(reservation.account.user_id, reservation.id);
        let generation = if in_previous { &mut self.generations.previous } else { &mut self.generations.current };
        debug_assert_eq!(*generation.entry(position), reservation, "the forgotten entry stays where it was");
        generation.reindex(hash, position);
    }

    /// See [`Generations::rotate`].
    pub fn rotate(&mut self, now_ms: i64, retention_ms: i64) -> Option<ClosedGeneration> {
        self.generations.rotate(now_ms, retention_ms)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Reservation> + '_ {
        self.generations.current.iter().chain(self.generations.previous.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::account::{Domain, UserAccount};
    use crate::engine::asset::Asset;
    use crate::engine::generations::Generation as _;
    use crate::engine::reservation::ReservationStatus;

    fn closed(id: u128, closed_at_ms: i64) -> Reservation {
        Reservation {
            id: Uuid::from_u128(id),
            account: UserAccount { user_id: Uuid::from_u128(1), domain: Domain::Banking, asset: Asset::USD },
            amount_minor: 5,
            created_at_ms: 0,
            expires_at_ms: 1_000,
            status: ReservationStatus::Completed,
            closed_at_ms: Some(closed_at_ms),
        }
    }

    #[test]
    fn a_closed_reservation_is_kept_at_least_one_window_and_at_most_two() {
        let retention_ms = 100;
        let mut store = ClosedReservations::default();
        assert!(store.rotate(1_000, retention_ms).is_some(), "the first rotation starts the first window");
        store.insert(closed(1, 1_050));
        let user_id = Uuid::from_u128(1);
        assert!(store.rotate(1_099, retention_ms).is_none(), "the window is not over");
        assert_eq!(store.rotate(1_100, retention_ms).map(|retired| retired.len()), Some(0));
        assert!(store.get(user_id, Uuid::from_u128(1)).is_some(), "one window after it started: still kept");
        let retired = store.rotate(1_200, retention_ms).unwrap_or_default();
        assert_eq!(retired.len(), 1);
        assert!(store.get(user_id, Uuid::from_u128(1)).is_none());
        assert_eq!(store.iter().count(), 0);
    }

    #[test]
    fn thousands_across_chunks_stay_findable_through_removals_and_closes_again() {
        let mut store = ClosedReservations::default();
        let user_id = Uuid::from_u128(1);
        let count = 3 * CHUNK_RESERVATIONS as u128 + 7;
        for id in 0..count {
            store.insert(closed(id, 10));
        }
        for id in (0..count).step_by(3) {
            assert_eq!(
                store.remove(user_id, Uuid::from_u128(id)).map(|forgotten| forgotten.reservation.id),
                Some(Uuid::from_u128(id))
            );
        }
        // An undone close that closes again later: a new entry under the same id.
        for id in (0..count).step_by(6) {
            store.insert(closed(id, 20));
        }
        for id in 0..count {
            let expected = match (id % 3, id % 6) {
                (_, 0) => Some(20),
                (0, _) => None,
                _ => Some(10),
            };
            let found = store.get(user_id, Uuid::from_u128(id)).and_then(|r| r.closed_at_ms);
            assert_eq!(found, expected, "id {id}");
        }
        let expected_len = (0..count).filter(|id| id % 3 != 0 || id % 6 == 0).count();
        assert_eq!(store.iter().count(), expected_len);
        // Another user's reservation with the same id is another reservation.
        assert!(store.get(Uuid::from_u128(2), Uuid::from_u128(1)).is_none());
    }

    #[test]
    fn undone_closes_leave_nothing_behind() {
        let mut store = ClosedReservations::default();
        let user_id = Uuid::from_u128(1);
        for round in 0..(2 * CHUNK_RESERVATIONS as u128) {
            store.insert(closed(1_000_000, 5));
            store.insert(closed(round, 10));
            store.insert(closed(round + 1, 10));
            assert_eq!(
                store.undo_insert(user_id, Uuid::from_u128(round + 1)).map(|r| r.id),
                Some(Uuid::from_u128(round + 1))
            );
            assert_eq!(store.undo_insert(user_id, Uuid::from_u128(round)).map(|r| r.id), Some(Uuid::from_u128(round)));
            assert_eq!(
                store.undo_insert(user_id, Uuid::from_u128(1_000_000)).map(|r| r.id),
                Some(Uuid::from_u128(1_000_000))
            );
        }
        assert_eq!(store.generations.current.stored(), 0);
        assert_eq!(store.iter().count(), 0);
    }

    /// Found in review: two closes undone newest first, the later one the first entry of a new
    /// chunk. Undoing it left that chunk empty, and the earlier one, last of the chunk before,
    /// was then not found at the end (a debug assertion; release builds left its entry behind).
    #[test]
    fn undone_closes_across_a_chunk_boundary_leave_nothing_behind() {
        let mut store = ClosedReservations::default();
        let user_id = Uuid::from_u128(1);
        for filler in 0..(CHUNK_RESERVATIONS as u128 - 1) {
            store.insert(closed(1_000_000 + filler, 5));
        }
        store.insert(closed(1, 10));
        store.insert(closed(2, 10));
        assert_eq!(store.undo_insert(user_id, Uuid::from_u128(2)).map(|r| r.id), Some(Uuid::from_u128(2)));
        assert_eq!(store.undo_insert(user_id, Uuid::from_u128(1)).map(|r| r.id), Some(Uuid::from_u128(1)));
        assert_eq!(store.generations.current.stored(), CHUNK_RESERVATIONS - 1);
        assert!(store.get(user_id, Uuid::from_u128(1)).is_none());
        store.insert(closed(3, 10));
        assert_eq!(store.get(user_id, Uuid::from_u128(3)).map(|r| r.id), Some(Uuid::from_u128(3)));
        assert_eq!(store.iter().count(), CHUNK_RESERVATIONS);
    }

    /// A close and its undo repeated at a chunk boundary (a caller retrying a conflicting
    /// release there) reuse the chunk the first close opened instead of freeing and allocating it
    /// each time (found in review of the fix above).
    #[test]
    fn a_close_undone_at_a_chunk_boundary_again_and_again_keeps_its_chunk() {
        let mut store = ClosedReservations::default();
        let user_id = Uuid::from_u128(1);
        for filler in 0..(CHUNK_RESERVATIONS as u128) {
            store.insert(closed(1_000_000 + filler, 5));
        }
        for _ in 0..3 {
            store.insert(closed(1, 10));
            assert_eq!(store.generations.current.chunks.len(), 2);
            assert_eq!(store.undo_insert(user_id, Uuid::from_u128(1)).map(|r| r.id), Some(Uuid::from_u128(1)));
            assert_eq!(store.generations.current.chunks.len(), 2, "the emptied chunk is kept");
        }
        store.insert(closed(1, 10));
        assert_eq!(store.get(user_id, Uuid::from_u128(1)).map(|r| r.id), Some(Uuid::from_u128(1)));
        assert_eq!(store.iter().count(), CHUNK_RESERVATIONS + 1);
    }

    /// Found in review: a release that meets an idempotency conflict closes the reservation in
    /// its rules, then is undone. Repeated, it must not grow the store.
    #[test]
    fn a_repeated_conflicting_release_does_not_grow_the_store() {
        use crate::engine::error::EngineError;
        use crate::engine::operation::Operation;
        use crate::engine::test_engine::TestEngine;

        let test = TestEngine::with_a_reservation();
        let (account, reservation_id) = (test.account, test.reservation_id);
        let release = Operation::Release { user_id: account.user_id, reservation_id };
        for _ in 0..100 {
            let refused = test.run("fund", release.clone());
            assert!(matches!(refused, Err(EngineError::IdempotencyConflict { .. })), "{refused:?}");
        }
        let engine = &test.engine;
        let shard = engine.shards[engine.map.of_user(account.user_id) as usize].read();
        assert_eq!(
            shard.closed_reservations().generations.current.stored()
                + shard.closed_reservations().generations.previous.stored(),
            0
        );
        assert!(shard.reservation(account.user_id, reservation_id).is_some_and(|r| r.closed_at_ms.is_none()));
    }

    #[test]
    fn remove_finds_either_generation_and_restore_puts_it_back_there() {
        let mut store = ClosedReservations::default();
        store.insert(closed(1, 10));
        store.rotate(100, 50);
        store.insert(closed(2, 110));
        assert_eq!(store.iter().count(), 2);
        let user_id = Uuid::from_u128(1);
        let first = store.remove(user_id, Uuid::from_u128(1)).expect("in the previous generation");
        let second = store.remove(user_id, Uuid::from_u128(2)).expect("in the current generation");
        assert_eq!((first.reservation, second.reservation), (closed(1, 10), closed(2, 110)));
        assert!(store.remove(user_id, Uuid::from_u128(2)).is_none());
        assert_eq!(store.iter().count(), 0);

        store.restore(second);
        store.restore(first);
        assert_eq!(store.get(user_id, Uuid::from_u128(1)), Some(&closed(1, 10)));
        assert_eq!(store.get(user_id, Uuid::from_u128(2)), Some(&closed(2, 110)));
        // Each went back to its own generation: the next rotation forgets the older one only.
        store.rotate(200, 50);
        assert!(store.get(user_id, Uuid::from_u128(1)).is_none());
        assert_eq!(store.get(user_id, Uuid::from_u128(2)), Some(&closed(2, 110)));
    }

    /// One step of the property test below: what the engine does to a shard's store.
    #[derive(Debug, Clone)]
    enum Step {
        /// Requests close this many new reservations and keep them.
        Close(usize),
        /// Requests close new reservations until the current generation holds `short` entries
        /// fewer than a whole number of chunks: where an undo crosses a chunk boundary.
        CloseUpToBoundary { short: usize },
        /// One request closes this many new reservations, then fails (a linked batch, a key
        /// conflict) and undoes them newest first.
        CloseThenUndo(usize),
        /// A replay forgets a remembered reservation (`pick` chooses which), and puts it back if
        /// its record then fails to replay.
        Forget { pick: usize, restore: bool },
        /// A retention window passes and the sweep rotates.
        Rotate,
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            (1..1_100_usize).prop_map(Step::Close),
            (0..3_usize).prop_map(|short| Step::CloseUpToBoundary { short }),
            (1..5_usize).prop_map(Step::CloseThenUndo),
            (any::<usize>(), any::<bool>()).prop_map(|(pick, restore)| Step::Forget { pick, restore }),
            Just(Step::Rotate),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

        /// The store against a model of two sets (current and previous generation): after every
        /// step it remembers exactly the model's reservations, and holds no entry an undone
        /// close left behind. Sequences reach past chunk boundaries, where the chunked entries
        /// and the undo meet (a review found an undo across a boundary broken).
        #[test]
        fn the_store_remembers_what_a_model_of_two_sets_does(steps in proptest::collection::vec(step(), 1..24)) {
            use std::collections::BTreeSet;

            let retention_ms = 100;
            let user_id = Uuid::from_u128(1);
            let mut store = ClosedReservations::default();
            let (mut current, mut previous) = (BTreeSet::new(), BTreeSet::new());
            // Entries in the current generation's chunks, forgotten ones included.
            let mut current_stored = 0_usize;
            let (mut next_id, mut now_ms) = (1_u128, 1_000_i64);
            let mut ever = Vec::new();
            for step in steps {
                let mut touched = Vec::new();
                match step {
                    Step::Close(count) | Step::CloseThenUndo(count) => {
                        let ids: Vec<u128> = (next_id..next_id + count as u128).collect();
                        next_id += count as u128;
                        for &id in &ids {
                            store.insert(closed(id, now_ms));
                        }
                        if matches!(step, Step::CloseThenUndo(_)) {
                            for &id in ids.iter().rev() {
                                proptest::prop_assert_eq!(store.undo_insert(user_id, Uuid::from_u128(id)), Some(closed(id, now_ms)));
                            }
                        } else {
                            current.extend(ids.iter().copied());
                            current_stored += count;
                        }
                        touched.extend(ids);
                    }
                    Step::CloseUpToBoundary { short } => {
                        let target = current_stored.next_multiple_of(CHUNK_RESERVATIONS).max(CHUNK_RESERVATIONS) - short;
                        let target = if target < current_stored { target + CHUNK_RESERVATIONS } else { target };
                        while current_stored < target {
                            store.insert(closed(next_id, now_ms));
                            current.insert(next_id);
                            touched.push(next_id);
                            next_id += 1;
                            current_stored += 1;
                        }
                    }
                    Step::Forget { pick, restore } => {
                        let remembered: Vec<u128> = current.iter().chain(previous.iter()).copied().collect();
                        if let Some(&id) = remembered.get(pick % remembered.len().max(1)) {
                            let forgotten = store.remove(user_id, Uuid::from_u128(id));
                            proptest::prop_assert_eq!(forgotten.map(|f| f.reservation.id), Some(Uuid::from_u128(id)));
                            match forgotten {
                                Some(forgotten) if restore => store.restore(forgotten),
                                _ => {
                                    current.remove(&id);
                                    previous.remove(&id);
                                }
                            }
                            touched.push(id);
                        }
                    }
                    Step::Rotate => {
                        now_ms += retention_ms;
                        proptest::prop_assert!(store.rotate(now_ms, retention_ms).is_some());
                        touched.extend(previous.iter().copied());
                        previous = std::mem::take(&mut current);
                        current_stored = 0;
                    }
                }
                ever.extend(touched.iter().copied());
                for id in touched {
                    let expected = current.contains(&id) || previous.contains(&id);
                    proptest::prop_assert_eq!(store.get(user_id, Uuid::from_u128(id)).is_some(), expected, "id {}", id);
                }
                proptest::prop_assert_eq!(store.iter().count(), current.len() + previous.len());
                proptest::prop_assert_eq!(store.generations.current.stored(), current_stored);
            }
            for id in ever {
                let expected = current.contains(&id) || previous.contains(&id);
                proptest::prop_assert_eq!(store.get(user_id, Uuid::from_u128(id)).is_some(), expected, "id {}", id);
            }
        }
    }
}
