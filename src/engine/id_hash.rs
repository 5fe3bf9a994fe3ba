//! Hashing for the engine's maps keyed by a `Uuid` (users, their reservations, their
//! transactions).
//!
//! Every request looks a user up several times, so the hash of a 16-byte id is on the hot path.
//! A `Uuid` hashes as one write of its 16 bytes, which a general-purpose hasher treats as a
//! write of unknown length. This one takes 16 bytes as one 64x64 -> 128-bit multiplication, as
//! in `foldhash` (`write_usize` is there for keys that write a length too). Seeded at random
//! once per process, so callers cannot pick ids that collide in every run.

use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;

/// Builds [`IdHasher`]s; the `S` of the engine's `HashMap<Uuid, _, IdHashState>`s.
#[derive(Debug, Clone, Copy)]
pub(crate) struct IdHashState {
    seeds: [u64; 2],
}

impl Default for IdHashState {
    fn default() -> IdHashState {
        static SEEDS: OnceLock<[u64; 2]> = OnceLock::new();
        let seeds = *SEEDS.get_or_init(|| {
            let random = foldhash::fast::RandomState::default();
            [random.hash_one(0x6964_u64) | 1, random.hash_one(0x6861_7368_u64)]
        });
        IdHashState { seeds }
    }
}

impl BuildHasher for IdHashState {
    type Hasher = IdHasher;

    fn build_hasher(&self) -> IdHasher {
        IdHasher { state: self.seeds[0], seed: self.seeds[1] }
    }
}

pub(crate) struct IdHasher {
    state: u64,
    seed: u64,
}

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        // A `Uuid` is the only key these maps hold; any other length still hashes every byte.
        for chunk in bytes.chunks(16) {
            let mut word = [0_u8; 16];
            word[..chunk.len()].copy_from_slice(chunk);
            let word = u128::from_le_bytes(word);
            self.state = folded_multiply(word as u64 ^ self.state, (word >> 64) as u64 ^ self.seed);
        }
    }

    fn write_usize(&mut self, length: usize) {
        self.state = self.state.rotate_left(length as u32 & 63) ^ length as u64;
    }

    fn finish(&self) -> u64 {
        folded_multiply(self.state, self.seed)
    }
}

/// `foldhash`'s mixing step: the 128-bit product of two words, its halves folded together.
/// The operation fingerprints (`idempotency::fingerprint`) fold with it too.
pub(crate) fn folded_multiply(left: u64, right: u64) -> u64 {
    let product = u128::from(left) * u128::from(right);
    product as u64 ^ (product >> 64) as u64
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use uuid::Uuid;

    use super::*;

    #[test]
    fn ids_hash_apart_and_maps_find_them() {
        let state = IdHashState::default();
        // Counters in either half, and random ids (0 appears once: it is both first counters).
        let ids: Vec<Uuid> = (0..10_000_u128)
            .flat_map(|n| [Uuid::from_u128(n), Uuid::from_u128((n + 1) << 64), Uuid::new_v4()])
            .collect();
        let hashes: HashSet<u64> = ids.iter().map(|id| state.hash_one(id)).collect();
        assert_eq!(hashes.len(), ids.len(), "no two of these ids share a hash");
        // hashbrown takes the bucket from the low bits and a tag from the top 7: both must spread.
        // 30,000 hashes over 256 buckets are about 117 a bucket: each must get more than a third and
        // well under twice that (a fair hash, 7 standard deviations off, misses with odds below 10^-9).
        let mut buckets = [0_usize; 256];
        ids.iter().for_each(|id| buckets[(state.hash_one(id) & 0xff) as usize] += 1);
        assert!(buckets.iter().all(|count| (40..=200).contains(count)), "{buckets:?}");
        let tags: HashSet<u64> = ids.iter().map(|id| state.hash_one(id) >> 57).collect();
        assert_eq!(tags.len(), 128);
        let map: HashMap<Uuid, usize, IdHashState> = ids.iter().enumerate().map(|(n, id)| (*id, n)).collect();
        assert!(ids.iter().enumerate().all(|(n, id)| map.get(id) == Some(&n)));
    }
}
