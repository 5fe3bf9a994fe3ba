//! Finds entries by the hash of their key: open addressing with linear probing over 8-byte
//! slots, each holding 32 bits of the key's hash (its tag) and the entry's position. Used by the
//! two stores that take a new key on nearly every request and keep their entries in arrival
//! order beside it: idempotency keys (`idempotency`) and closed reservations (`closed`).
//!
//! Why a table of our own rather than `hashbrown`: nearly every request looks up a key that is
//! not there and then inserts it, in a table far larger than the cache. Here the probe reads one
//! line and the insert writes into that same line, and the line's address is known from the
//! hash alone, so the engine can ask for it ([`SlotsAddress::prefetch`]) long before it probes,
//! even before it holds the table's lock (`index_hints`).
//! `hashbrown` keeps control bytes and slots in two arrays (two cold lines per new key) and does
//! not expose where a probe will land.
//!
//! The home slot is taken from the tag itself, so growing the table re-places slots without
//! reading the entries or hashing any key again. The table is kept at most half full, so a probe
//! for a missing key reads about 2.5 slots, nearly always within one cache line.

use crate::engine::prefetch::prefetch_bytes;

/// A free slot. An occupied slot stores `position + 1` in its low half, so it is never zero.
const EMPTY: u64 = 0;

/// The smallest table: a few cache lines.
const MIN_SLOTS: usize = 16;

/// Slots in one cache line.
const SLOTS_PER_LINE: usize = 64 / std::mem::size_of::<u64>();

/// The bits of a key's hash a slot keeps. The low 32 bits: the high ones of an idempotency key's
/// hash pick its shard (`ShardMap::of_key`), so within one shard they carry less.
fn tag_of(hash: u64) -> u32 {
    hash as u32
}

#[derive(Debug)]
pub(crate) struct PositionIndex {
    slots: Box<[u64]>,
    len: usize,
    /// Whether [`PositionIndex::address`] changed (the slots moved, or the table stopped being
    /// empty) since the owner last asked (`take_moved`), to publish it anew (`index_hints`).
    moved: bool,
}

impl Default for PositionIndex {
    fn default() -> PositionIndex {
        PositionIndex::with_capacity(0)
    }
}

impl PositionIndex {
    /// A table that holds `keys` keys without growing.
    pub fn with_capacity(keys: usize) -> PositionIndex {
        let slots = keys.saturating_mul(2).next_power_of_two().max(MIN_SLOTS);
        PositionIndex { slots: vec![EMPTY; slots].into_boxed_slice(), len: 0, moved: true }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    fn home(&self, tag: u32) -> usize {
        tag as usize & self.mask()
    }

    /// Whether the address moved since the last call (see `moved`). Writes only when it did: a
    /// release after a change asks of every shard the request locked, most of which filed
    /// nothing, and a store would dirty their line for the other cores.
    pub fn take_moved(&mut self) -> bool {
        let moved = self.moved;
        if moved {
            self.moved = false;
        }
        moved
    }

    /// Where the slots are now, for a thread that will probe them later (see [`SlotsAddress`]).
    /// An empty table has nothing a lookup could find: [`SlotsAddress::NONE`].
    pub fn address(&self) -> SlotsAddress {
        match self.len {
            0 => SlotsAddress::NONE,
            _ => SlotsAddress { first_slot: self.slots.as_ptr() as usize, mask: self.mask() },
        }
    }

    /// The position of the entry of `hash` for which `holds` says yes, if any.
    pub fn find(&self, hash: u64, mut holds: impl FnMut(u32) -> bool) -> Option<u32> {
        self.find_slot(hash, &mut holds).map(|slot| position(self.slots[slot]))
    }

    fn find_slot(&self, hash: u64, holds: &mut impl FnMut(u32) -> bool) -> Option<usize> {
        let tag = tag_of(hash);
        let mut slot = self.home(tag);
        loop {
            let value = self.slots[slot];
            if value == EMPTY {
                return None;
            }
            if stored_tag(value) == tag && holds(position(value)) {
                return Some(slot);
            }
            slot = (slot + 1) & self.mask();
        }
    }

    /// Adds `position` under `hash`. The caller makes sure the key is not there yet.
    pub fn insert(&mut self, hash: u64, position: u32) {
        if (self.len + 1) * 2 > self.slots.len() {
            self.grow();
        }
        self.moved |= self.len == 0;
        self.place(encode(tag_of(hash), position));
        self.len += 1;
    }

    fn place(&mut self, value: u64) {
        let mut slot = self.home(stored_tag(value));
        while self.slots[slot] != EMPTY {
            slot = (slot + 1) & self.mask();
        }
        self.slots[slot] = value;
    }

    fn grow(&mut self) {
        let doubled = vec![EMPTY; self.slots.len() * 2].into_boxed_slice();
        let old = std::mem::replace(&mut self.slots, doubled);
        self.moved = true;
        for value in old.iter().copied().filter(|value| *value != EMPTY) {
            self.place(value);
        }
    }

    /// Removes the entry of `hash` for which `holds` says yes; returns whether there was one.
    /// The slots after it that would no longer be reached from their home slot move back
    /// (backward-shift deletion), so no probe ever needs a tombstone.
    pub fn remove(&mut self, hash: u64, mut holds: impl FnMut(u32) -> bool) -> bool {
        let Some(mut hole) = self.find_slot(hash, &mut holds) else {
            return false;
        };
        let mask = self.mask();
        let mut next = hole;
        loop {
            next = (next + 1) & mask;
            let value = self.slots[next];
            if value == EMPTY {
                break;
            }
            // The value at `next` may fill the hole only if its home is not cyclically inside
            // (hole, next]: otherwise a probe from its home would stop at the hole.
            let home = self.home(stored_tag(value));
            let reaches_hole = if hole <= next { home <= hole || home > next } else { home <= hole && home > next };
            if reaches_hole {
                self.slots[hole] = value;
                hole = next;
            }
        }
        self.slots[hole] = EMPTY;
        self.len -= 1;
        true
    }

    /// Every stored position, in slot order.
    pub fn positions(&self) -> impl Iterator<Item = u32> + '_ {
        self.slots.iter().copied().filter(|value| *value != EMPTY).map(position)
    }
}

/// Where a table's slots sat when it was read: enough to ask for the lines a probe for a hash
/// will read, without holding the table. Only ever used as a prefetch address, never
/// dereferenced, so an address that has gone stale (the table grew or was dropped since) costs a
/// wasted hint and nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SlotsAddress {
    /// The address of slot 0; 0 for no table worth probing.
    pub first_slot: usize,
    /// Slots - 1.
    pub mask: usize,
}

impl SlotsAddress {
    pub const NONE: SlotsAddress = SlotsAddress { first_slot: 0, mask: 0 };

    /// Asks for the cache lines a probe for `hash` starts in: the home slot's line, and the next
    /// one too when the home slot sits in the second half of its line (a probe reads about 2.5
    /// slots on average). The arithmetic wraps: a half-updated address read from another thread
    /// may pair any pointer with any mask, and a hint must never panic.
    pub fn prefetch(self, hash: u64) {
        if self.first_slot == 0 {
            return;
        }
        let home = tag_of(hash) as usize & self.mask;
        let in_line = home % SLOTS_PER_LINE;
        let slots = if in_line >= SLOTS_PER_LINE / 2 { 2 * SLOTS_PER_LINE - in_line } else { 1 };
        let slots = slots.min(self.mask.wrapping_sub(home).wrapping_add(1));
        let slot_bytes = std::mem::size_of::<u64>();
        let home_address =
            std::ptr::without_provenance::<u64>(self.first_slot.wrapping_add(home.wrapping_mul(slot_bytes)));
        prefetch_bytes(home_address, slots * slot_bytes);
    }
}

fn encode(tag: u32, position: u32) -> u64 {
    debug_assert!(position < u32::MAX, "positions stay below u32::MAX (EntryArena::MAX_BYTES)");
    (u64::from(tag) << 32) | u64::from(position + 1)
}

fn stored_tag(value: u64) -> u32 {
    (value >> 32) as u32
}

fn position(value: u64) -> u32 {
    (value as u32) - 1
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Against a `HashMap` from position to the full hash (standing for the entry's key):
        /// inserts (with growth) and removals (with backward shifts) under hashes drawn from a
        /// small range, so that slots collide, clusters wrap around the end of the table and
        /// distinct keys share a tag.
        #[test]
        fn the_index_agrees_with_a_map(steps in prop::collection::vec((0u64..48, any::<bool>()), 1..400)) {
            let mut index = PositionIndex::default();
            let mut model: HashMap<u32, u64> = HashMap::new();
            for (next_position, (hash_seed, remove)) in steps.into_iter().enumerate() {
                // Tags 12..=16 in a table of 16 or 32 slots, to wrap clusters around; the high
                // bits make distinct keys under one tag.
                let hash = hash_seed.wrapping_mul(7) % 5 + 12 + (hash_seed / 24) * (1 << 40);
                let snapshot = model.clone();
                let holds = |position: u32| snapshot.get(&position) == Some(&hash);
                let existing = model.iter().find(|(_, stored)| **stored == hash).map(|(position, _)| *position);
                prop_assert_eq!(index.find(hash, holds), existing);
                match (remove, existing) {
                    (true, Some(position)) => {
                        prop_assert!(index.remove(hash, holds));
                        model.remove(&position);
                    }
                    (true, None) => prop_assert!(!index.remove(hash, holds)),
                    (false, Some(_)) => {}
                    (false, None) => {
                        let position = next_position as u32;
                        index.insert(hash, position);
                        model.insert(position, hash);
                    }
                }
                prop_assert_eq!(index.len(), model.len());
                for (position, hash) in &model {
                    let found = index.find(*hash, |candidate| model.get(&candidate) == Some(hash));
                    prop_assert_eq!(found, Some(*position));
                }
                let mut listed: Vec<u32> = index.positions().collect();
                listed.sort_unstable();
                let mut expected: Vec<u32> = model.keys().copied().collect();
                expected.sort_unstable();
                prop_assert_eq!(listed, expected);
            }
        }
    }

    /// Real-looking hashes at a size where clusters are long and wrap around the end of the
    /// table after several growths: every key stays findable through inserts and removals, and
    /// a removed key is gone.
    #[test]
    fn many_random_keys_survive_growth_and_removals() {
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        let hashes: Vec<u64> = (0..100_000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state
            })
            .collect();
        // `holds` compares the full hash, as the store compares the key's bytes.
        let hashes = &hashes;
        let holds = |hash: u64| move |position: u32| hashes[position as usize] == hash;
        let mut index = PositionIndex::default();
        for (position, hash) in hashes.iter().enumerate() {
            index.insert(*hash, position as u32);
        }
        for (position, hash) in hashes.iter().enumerate().filter(|(position, _)| position % 3 == 0) {
            assert!(index.remove(*hash, holds(*hash)), "position {position}");
        }
        assert_eq!(index.len(), hashes.len() - hashes.len().div_ceil(3));
        for (position, hash) in hashes.iter().enumerate() {
            let expected = (position % 3 != 0).then_some(position as u32);
            assert_eq!(index.find(*hash, holds(*hash)), expected, "position {position}");
        }
    }

    #[test]
    fn the_table_stays_at_most_half_full() {
        let mut index = PositionIndex::with_capacity(100);
        assert_eq!(index.slots.len(), 256);
        for position in 0..1_000 {
            index.insert(u64::from(position).wrapping_mul(0x9E37_79B9_7F4A_7C15), position);
            assert!(index.len() * 2 <= index.slots.len());
        }
        assert_eq!(index.slots.len(), 2_048);
    }

    #[test]
    fn a_tag_match_is_not_a_find_unless_the_entry_holds_the_key() {
        let mut index = PositionIndex::default();
        index.insert(5, 0);
        assert_eq!(index.find(5, |_| false), None);
        // Same home slot, other tag: never offered to `holds`.
        assert_eq!(index.find(5 + (1 << 20), |_| true), None);
        assert_eq!(index.find(5 + (1 << 40), |position| position == 0), Some(0));
    }
}
