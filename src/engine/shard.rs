//! The engine's storage: shards of user state, and the locking of several shards at once.
//!
//! A user's accounts and reservations live in the shard chosen by hashing the `user_id`.
//! Each shard also holds its own sub-account of every system account (summed when read) and
//! a part of the idempotency store. An operation locks every shard it touches in ascending
//! index order, so two operations can never wait on each other in a cycle. Beside each shard's
//! lock sits the address of its closed-reservation index (`index_hints`), published when a
//! change to that store lets go of the lock.

use std::collections::{HashMap, VecDeque};
use std::ops::Deref;

use crossbeam_utils::CachePadded;
use parking_lot::{Mutex, MutexGuard};
use uuid::Uuid;

use super::account::{AccountConfig, Balance, Domain, SystemKind};
use super::asset::Asset;
use super::closed::ClosedReservations;
use super::expiry::ExpiryIndex;
use super::id_hash::IdHashState;
use super::idempotency::{IdempotencyStore, KeyHash};
use super::index_hints::IndexHints;
use super::limits::OutflowUsage;
use super::money::MAX_AMOUNT_MINOR;
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
    pub reservations: HashMap<Uuid, Reservation, IdHashState>,
    /// Unfinished transactions, and finished ones still within the retention window.
    pub transactions: HashMap<Uuid, Transaction, IdHashState>,
    /// How many of `transactions` are unfinished, kept by the transaction effects (and their
    /// undoing) so the cap on them (`MAX_UNFINISHED_TRANSACTIONS_PER_USER`) costs no scan.
    pub unfinished_transactions: usize,
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

    /// Its unfinished transactions, counted afresh: what `unfinished_transactions` must equal.
    pub fn recount_unfinished(&self) -> usize {
        self.transactions.values().filter(|transaction| !transaction.status.is_finished()).count()
    }

    pub fn account_mut(&mut self, domain: Domain, asset: Asset) -> Option<&mut AccountState> {
        self.accounts.iter_mut().find(|state| state.domain == domain && state.asset == asset)
    }
}

#[derive(Debug)]
pub(crate) struct Shard {
    pub users: HashMap<Uuid, UserState, IdHashState>,
    /// This shard's sub-account of each system account: `[kind index][asset index]`, available only.
    pub system_minor: [[i128; Asset::COUNT]; SystemKind::COUNT],
    /// Active reservations by expiry, for the sweep.
    pub expiry: ExpiryIndex,
    /// Closed reservations, until the retention window has passed (see `closed`). Changed only
    /// through [`LockedShards::closed_reservations_mut`], whose release publishes where the
    /// store's index is (`index_hints`).
    closed_reservations: ClosedReservations,
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
    pub fn closed_reservations(&self) -> &ClosedReservations {
        &self.closed_reservations
    }

    /// A reservation of a user of this shard: active, or closed and still remembered.
    pub fn reservation(&self, user_id: Uuid, reservation_id: Uuid) -> Option<&Reservation> {
        self.reservation_of(self.users.get(&user_id), user_id, reservation_id)
    }

    /// [`Shard::reservation`] for a caller that has already looked `user_id` up (`user`).
    pub fn reservation_of<'s>(
        &'s self,
        user: Option<&'s UserState>,
        user_id: Uuid,
        reservation_id: Uuid,
    ) -> Option<&'s Reservation> {
        user.and_then(|user| user.reservations.get(&reservation_id))
            .or_else(|| self.closed_reservations.get(user_id, reservation_id))
    }

    pub fn new() -> Shard {
        Shard {
            users: HashMap::default(),
            system_minor: [[0; Asset::COUNT]; SystemKind::COUNT],
            expiry: ExpiryIndex::default(),
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

    /// The most a system account's sub-account in one shard may hold, either way: the maximum
    /// amount shared out over the shards, so that the account's total (what PostgreSQL stores
    /// and a restart loads) stays within the maximum amount too. Bounded by the whole maximum a
    /// shard, totals could reach the shard count times it, which the store refuses to load, and
    /// a restart failed for good (session 22).
    pub fn system_bound_minor(self) -> i128 {
        // Every fee and deposit asks: a shift, not a 128-bit division, for the usual counts.
        match self.power_of_two_mask {
            Some(_) => MAX_AMOUNT_MINOR >> self.shard_count.trailing_zeros(),
            None => MAX_AMOUNT_MINOR / i128::from(self.shard_count),
        }
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

/// The shards most requests lock (a commit or a transfer across shards, plus its key's shard)
/// fit inline; a plan of more (a linked batch, a snapshot of every shard) goes to the heap. Every
/// request plans, locks and looks its shards up several times, and a `SmallVec` checks whether
/// it spilled on each of those accesses: measured as about 40 instructions a request.
const INLINE_SHARDS: usize = 4;

/// The set of shards an operation will lock, built before any lock is taken.
#[derive(Debug, Default)]
pub(crate) struct LockPlan {
    few: [u32; INLINE_SHARDS],
    few_len: usize,
    /// Shards past the inline ones, unsorted and possibly repeated.
    more: Vec<u32>,
}

impl LockPlan {
    pub fn add(&mut self, index: u32) {
        if self.few[..self.few_len].contains(&index) {
            return;
        }
        if self.few_len < INLINE_SHARDS {
            self.few[self.few_len] = index;
            self.few_len += 1;
        } else {
            self.more.push(index);
        }
    }
}

impl LockPlan {
    /// Room for `additional` more shards past the inline ones without regrowing (a linked
    /// batch adds a few per operation).
    pub fn reserve(&mut self, additional: usize) {
        self.more.reserve(additional);
    }
}

impl FromIterator<u32> for LockPlan {
    fn from_iter<I: IntoIterator<Item = u32>>(indexes: I) -> LockPlan {
        let mut plan = LockPlan::default();
        indexes.into_iter().for_each(|index| plan.add(index));
        plan
    }
}

/// One shard behind its lock, with the address of its closed-reservation index beside it.
/// `repr(C)` keeps the declared order: the lock word and the shard's first fields open the cell.
#[derive(Debug)]
#[repr(C)]
pub(crate) struct ShardCell {
    shard: Mutex<Shard>,
    /// On lines of their own: they are read by every reserve, commit and release headed for this
    /// shard before it locks, and written only when the index moves; the shard's lines change on
    /// every request.
    hints: CachePadded<IndexHints>,
}

impl ShardCell {
    pub fn new(shard: Shard) -> ShardCell {
        let hints = CachePadded::new(IndexHints::new(&shard.closed_reservations));
        ShardCell { shard: Mutex::new(shard), hints }
    }

    /// Readable without the lock; see `index_hints`.
    pub fn hints(&self) -> &IndexHints {
        &self.hints
    }

    /// The shard, locked, to read. Changes go through [`LockedShards`], which publishes where the
    /// closed-reservation index is when it lets go.
    pub fn read(&self) -> impl Deref<Target = Shard> + '_ {
        self.shard.lock()
    }
}

type Guard<'a> = (u32, MutexGuard<'a, Shard>);

/// The shards one operation holds, locked in ascending index order.
pub(crate) struct LockedShards<'a> {
    /// Every shard, for their index hints (see `Drop`).
    cells: &'a [CachePadded<ShardCell>],
    /// Ascending by shard index.
    guards: Guards<'a>,
    /// Whether a closed-reservation store was handed out to change, so its index may have moved.
    closed_changed: bool,
}

/// Publishes where the locked shards' closed-reservation indexes are before their locks are
/// released, if one may have moved (filing, rotation, a restore), so the move is published before
/// the next holder starts. Requests that file nothing skip the check, and the lines it reads.
///
/// A panic while the locks are held aborts the process instead of unwinding. Effects apply as the
/// rules emit them, so a panic part-way (a broken invariant in an effect, a sink that panics)
/// would otherwise release the locks over changes no journal record describes, and the server
/// would go on serving a state its journal cannot rebuild (promises 2 and 7). parking_lot's
/// mutexes do not poison, so nothing else would stop the next request. Aborting is the
/// fail-stop answer: a restart recovers the state from the journal, which holds only what was
/// acknowledged.
impl Drop for LockedShards<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            std::process::abort();
        }
        if !self.closed_changed {
            return;
        }
        let cells = self.cells;
        for (index, shard) in self.guards() {
            cells[*index as usize].hints.publish_if_moved(&mut shard.closed_reservations);
        }
    }
}

enum Guards<'a> {
    /// The first `len` slots hold guards.
    Inline {
        guards: [Option<Guard<'a>>; INLINE_SHARDS],
        len: usize,
    },
    Heap(Vec<Guard<'a>>),
}

impl<'a> LockedShards<'a> {
    /// Locks every shard of `plan`, in ascending order.
    pub fn lock(shards: &'a [CachePadded<ShardCell>], plan: LockPlan) -> LockedShards<'a> {
        let lock = |index: u32| (index, shards[index as usize].shard.lock());
        let guards = if plan.more.is_empty() {
            let mut few = plan.few;
            let few = &mut few[..plan.few_len];
            // At most four distinct indexes: an insertion sort, without the general sort's set-up.
            for unsorted in 1..few.len() {
                let mut at = unsorted;
                while at > 0 && few[at - 1] > few[at] {
                    few.swap(at - 1, at);
                    at -= 1;
                }
            }
            let mut guards = [None, None, None, None];
            for (slot, &index) in guards.iter_mut().zip(few.iter()) {
                *slot = Some(lock(index));
            }
            Guards::Inline { guards, len: few.len() }
        } else {
            let mut indexes = plan.more;
            indexes.extend_from_slice(&plan.few[..plan.few_len]);
            indexes.sort_unstable();
            indexes.dedup();
            Guards::Heap(indexes.into_iter().map(lock).collect())
        };
        LockedShards { cells: shards, guards, closed_changed: false }
    }

    /// Every guard, ascending by shard index.
    fn guards(&mut self) -> impl Iterator<Item = &mut Guard<'a>> {
        let (inline, heap): (&mut [Option<Guard<'a>>], &mut [Guard<'a>]) = match &mut self.guards {
            Guards::Inline { guards, len } => (&mut guards[..*len], &mut []),
            Guards::Heap(guards) => (&mut [], guards),
        };
        inline.iter_mut().flatten().chain(heap)
    }

    /// The time a change to these shards is made at: `requested_ms`, or the latest time any of
    /// them has seen if that is later. All of them move to it.
    pub fn advance_clock(&mut self, requested_ms: i64) -> i64 {
        let now_ms = self.guards().map(|(_, shard)| shard.clock_ms).fold(requested_ms, i64::max);
        for (_, shard) in self.guards() {
            shard.clock_ms = now_ms;
        }
        now_ms
    }

    /// The closed reservations of locked shard `index`, to change (see `closed_changed`).
    pub fn closed_reservations_mut(&mut self, index: u32) -> &mut ClosedReservations {
        self.closed_changed = true;
        &mut self.get(index).closed_reservations
    }

    /// The locked shard `index`. Asking for a shard that was not locked is a bug in the
    /// engine's lock planning, never something a caller can cause.
    pub fn get(&mut self, index: u32) -> &mut Shard {
        let found = match &mut self.guards {
            Guards::Inline { guards, len } => guards[..*len].iter_mut().flatten().find(|(locked, _)| *locked == index),
            Guards::Heap(guards) => match guards.binary_search_by_key(&index, |(locked, _)| *locked) {
                Ok(position) => Some(&mut guards[position]),
                Err(_) => None,
            },
        };
        match found {
            Some((_, shard)) => shard,
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

    /// The shift is the division for powers of two, and the bounds of all shards together stay
    /// within the maximum amount.
    #[test]
    fn a_system_bound_is_the_maximum_shared_out() {
        for count in [1_usize, 2, 3, 7, 64, 100, 4_096] {
            let bound = ShardMap::new(count).system_bound_minor();
            assert_eq!(bound, MAX_AMOUNT_MINOR / count as i128, "{count} shards");
            assert!(bound * count as i128 <= MAX_AMOUNT_MINOR);
        }
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

    /// Plans of every size lock each shard once, in ascending order, and find each by index.
    #[test]
    fn a_plan_locks_each_shard_once_in_order() {
        let shards: Vec<CachePadded<ShardCell>> =
            (0..16).map(|_| CachePadded::new(ShardCell::new(Shard::new()))).collect();
        for plan in
            [vec![3], vec![9, 2, 9, 2, 5], vec![7, 1, 4, 0], vec![15, 3, 8, 3, 1, 12, 0, 8], (0..16).rev().collect()]
        {
            let mut expected = plan.clone();
            expected.sort_unstable();
            expected.dedup();
            let mut locked = LockedShards::lock(&shards, plan.iter().copied().collect());
            let order: Vec<u32> = locked.guards().map(|(index, _)| *index).collect();
            assert_eq!(order, expected, "plan {plan:?}");
            for &index in &expected {
                locked.get(index).clock_ms = i64::from(index);
            }
            drop(locked);
            for &index in &expected {
                let shard = shards[index as usize].shard.try_lock().expect("unlocked when the plan is dropped");
                assert_eq!(shard.clock_ms, i64::from(index));
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
