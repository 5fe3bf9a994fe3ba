//! The engine's storage: shards of user state, and the locking of several shards at once.
//!
//! A user's accounts and reservations live in the shard chosen by hashing the `user_id`.
//! Each shard also holds its own sub-account of every system account (summed when read) and
//! a part of the idempotency store. An operation locks every shard it touches in ascending
//! index order, so two operations can never wait on each other in a cycle.

use std::collections::{BTreeSet, HashMap, VecDeque};

use crossbeam_utils::CachePadded;
use parking_lot::{Mutex, MutexGuard};
use smallvec::SmallVec;
use uuid::Uuid;

use super::account::{AccountConfig, Balance, Domain, SystemKind};
use super::asset::Asset;
use super::closed::ClosedReservations;
use super::idempotency::{IdempotencyStore, KeyHash};
use super::limits::OutflowUsage;
use super::reservation::Reservation;
use super::transaction::{ComplianceRecord, Transaction};

/// The most shards an engine may have.
pub const MAX_SHARDS: usize = 4_096;

/// One user account's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AccountState {
    pub domain: Domain,
    pub asset: Asset,
    pub config: AccountConfig,
    pub balance: Balance,
    pub usage: OutflowUsage,
}

/// Everything the engine holds about one user. A user has at most 3 domains x 11 assets
/// accounts, so a vector searched linearly beats a map.
#[derive(Debug, Default)]
pub(crate) struct UserState {
    pub accounts: Vec<AccountState>,
    /// Active reservations only; a reservation moves to the shard's `closed_reservations` when it
    /// closes, so this map stays as small as what can still change.
    pub reservations: HashMap<Uuid, Reservation, foldhash::fast::RandomState>,
    /// Unfinished transactions, and finished ones still within the retention window.
    pub transactions: HashMap<Uuid, Transaction, foldhash::fast::RandomState>,
    pub compliance: Option<ComplianceRecord>,
}

impl UserState {
    pub fn account(&self, domain: Domain, asset: Asset) -> Option<&AccountState> {
        self.accounts.iter().find(|state| state.domain == domain && state.asset == asset)
    }

    /// Nothing left to remember about this user.
    pub fn is_empty(&self) -> bool {
        self.accounts.is_empty()
            && self.reservations.is_empty()
            && self.transactions.is_empty()
            && self.compliance.is_none()
    }

    pub fn account_mut(&mut self, domain: Domain, asset: Asset) -> Option<&mut AccountState> {
        self.accounts.iter_mut().find(|state| state.domain == domain && state.asset == asset)
    }
}

#[derive(Debug)]
pub(crate) struct Shard {
    pub users: HashMap<Uuid, UserState, foldhash::fast::RandomState>,
    /// This shard's sub-account of each system account: `[kind index][asset index]`, available only.
    pub system_minor: [[i128; Asset::COUNT]; SystemKind::COUNT],
    /// Active reservations by expiry, for the sweep: (expires_at_ms, user_id, reservation_id).
    pub expiry: BTreeSet<(i64, Uuid, Uuid)>,
    /// Closed reservations, until the retention window has passed (see `closed`).
    pub closed_reservations: ClosedReservations,
    /// Transactions by the time they finished (user_id, transaction_id), so they can be forgotten
    /// after the retention window. An entry whose transaction moved on (Completed ->
    /// Compensating) is skipped when it comes due.
    pub finished: VecDeque<(i64, Uuid, Uuid)>,
    pub idempotency: IdempotencyStore,
    /// The latest time any change in this shard was made at. Callers' clocks disagree a little;
    /// a change is dated no earlier than this, so time never goes back within a shard (limit
    /// windows cannot move backwards, and what a sweep forgot stays forgotten in replay).
    pub clock_ms: i64,
}

impl Shard {
    /// A reservation of a user of this shard: active, or closed and still remembered.
    pub fn reservation(&self, user_id: Uuid, reservation_id: Uuid) -> Option<&Reservation> {
        self.users
            .get(&user_id)
            .and_then(|user| user.reservations.get(&reservation_id))
            .or_else(|| self.closed_reservations.get(user_id, reservation_id))
    }

    pub fn new() -> Shard {
        Shard {
            users: HashMap::default(),
            system_minor: [[0; Asset::COUNT]; SystemKind::COUNT],
            expiry: BTreeSet::new(),
            closed_reservations: ClosedReservations::default(),
            finished: VecDeque::new(),
            idempotency: IdempotencyStore::default(),
            clock_ms: i64::MIN,
        }
    }
}

/// Maps users and idempotency keys to shards. Users map by a fixed function, since journal
/// records name the shard of system sub-accounts; keys by their hash from the engine's
/// `KeyHasher`, the same for the engine's whole life, replays included.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ShardMap {
    shard_count: u32,
    /// `shard_count - 1` when the count is a power of two (the default 64). The remainder is then
    /// a mask: every request maps several ids to shards, and a 64-bit division takes tens of
    /// cycles each time. The mapping is the same either way.
    power_of_two_mask: Option<u32>,
}

impl ShardMap {
    pub fn new(shard_count: usize) -> ShardMap {
        assert!((1..=MAX_SHARDS).contains(&shard_count), "shard count must be 1..={MAX_SHARDS}");
        let shard_count = shard_count as u32;
        ShardMap { shard_count, power_of_two_mask: shard_count.is_power_of_two().then(|| shard_count - 1) }
    }

    pub fn count(self) -> u32 {
        self.shard_count
    }

    /// `value % shard_count`.
    pub fn reduce(self, value: u32) -> u32 {
        match self.power_of_two_mask {
            Some(mask) => value & mask,
            None => value % self.shard_count,
        }
    }

    pub fn of_user(self, user_id: Uuid) -> u32 {
        let bits = user_id.as_u128();
        let folded = (bits as u64) ^ ((bits >> 64) as u64);
        // Fibonacci hashing spreads sequential or patterned ids over all shards.
        let mixed = folded.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.reduce((mixed >> 32) as u32)
    }

    /// The shard of a key, from its hash. The store inside the shard uses the low bits of the
    /// same hash, so those stay spread within a shard.
    pub fn of_key(self, hash: KeyHash) -> u32 {
        self.reduce((hash.0 >> 32) as u32)
    }
}

/// Up to this many locked shards are searched by a scan, more by bisection.
const SCANNED_GUARDS: usize = 4;

/// The shards one operation holds, locked in ascending index order.
pub(crate) struct LockedShards<'a> {
    guards: SmallVec<[(u32, MutexGuard<'a, Shard>); 4]>,
}

impl<'a> LockedShards<'a> {
    /// Locks `indexes` (any order, duplicates allowed) in ascending order.
    pub fn lock(shards: &'a [CachePadded<Mutex<Shard>>], mut indexes: SmallVec<[u32; 4]>) -> LockedShards<'a> {
        indexes.sort_unstable();
        indexes.dedup();
        let mut guards = SmallVec::with_capacity(indexes.len());
        for &index in indexes.iter() {
            guards.push((index, shards[index as usize].lock()));
        }
        LockedShards { guards }
    }

    /// The time a change to these shards is made at: `requested_ms`, or the latest time any of
    /// them has seen if that is later. All of them move to it.
    pub fn advance_clock(&mut self, requested_ms: i64) -> i64 {
        let now_ms = self.guards.iter().map(|(_, shard)| shard.clock_ms).fold(requested_ms, i64::max);
        for (_, shard) in &mut self.guards {
            shard.clock_ms = now_ms;
        }
        now_ms
    }

    /// The locked shard `index`. Asking for a shard that was not locked is a bug in the
    /// engine's lock planning, never something a caller can cause.
    pub fn get(&mut self, index: u32) -> &mut Shard {
        // Most requests hold one to three shards, where a scan beats a binary search; a linked
        // batch may hold them all.
        let position = if self.guards.len() <= SCANNED_GUARDS {
            self.guards.iter().position(|(locked, _)| *locked == index)
        } else {
            self.guards.binary_search_by_key(&index, |(locked, _)| *locked).ok()
        };
        match position {
            Some(position) => &mut self.guards[position].1,
            None => panic!("shard {index} used without being locked"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::idempotency::{IdempotencyKey, KeyHasher};

    #[test]
    fn users_spread_over_all_shards() {
        let map = ShardMap::new(16);
        let mut seen = [0usize; 16];
        for n in 0..16_000u128 {
            seen[map.of_user(Uuid::from_u128(n)) as usize] += 1;
        }
        assert!(seen.iter().all(|&count| count > 500), "{seen:?}");
    }

    #[test]
    fn keys_spread_over_all_shards() {
        let map = ShardMap::new(16);
        let hasher = KeyHasher::default();
        let mut seen = [0usize; 16];
        for n in 0..16_000 {
            seen[map.of_key(hasher.hash(&IdempotencyKey::new(&format!("order-{n}")).unwrap())) as usize] += 1;
        }
        assert!(seen.iter().all(|&count| count > 500), "{seen:?}");
    }

    /// The mask is the remainder for powers of two, so the mapping does not depend on which
    /// path computes it (journal records name the shards of system sub-accounts).
    #[test]
    fn a_mask_reduces_like_the_remainder() {
        for count in [1_usize, 2, 3, 7, 64, 100, 4_096] {
            let map = ShardMap::new(count);
            for value in [0_u32, 1, 63, 64, 65, 12_345, u32::MAX - 1, u32::MAX] {
                assert_eq!(map.reduce(value), value % count as u32, "count {count} value {value}");
            }
        }
    }

    #[test]
    fn single_shard_maps_everything_to_zero() {
        let map = ShardMap::new(1);
        assert_eq!(map.of_user(Uuid::new_v4()), 0);
        assert_eq!(map.of_key(KeyHasher::default().hash(&IdempotencyKey::new("k").unwrap())), 0);
    }
}
