//! The balance engine: every balance, reservation and idempotency key, in memory, sharded by user.
//!
//! Pure and synchronous: no I/O, no clock, no async. A request locks the shards it touches
//! (plus the shard holding its idempotency key), applies its business rules as effects, takes
//! the next global sequence number and hands the resulting [`JournalRecord`] to the
//! [`JournalSink`] while still holding those locks, so the journal's order is a valid serial
//! order of all changes. Replaying the records in order into an empty engine
//! ([`Engine::apply_record`]) rebuilds the same state.
//!
//! Data flow: `api` validates a wire request into a [`Request`] -> [`Engine::execute`] ->
//! `rules` (checks, effects) -> `JournalSink` (the journal writer) -> the caller waits for the
//! record's sequence to be durable before answering.

pub mod account;
pub mod asset;
mod closed;
pub mod effect;
pub mod error;
mod expiry;
mod generations;
mod id_hash;
pub mod idempotency;
mod index_check;
mod index_hints;
pub mod lifecycle;
pub mod limits;
pub mod money;
pub mod operation;
mod position_index;
mod prefetch;
pub mod record;
pub mod reservation;
mod rules;
mod shard;
pub mod state;
pub mod summary;
#[cfg(test)]
mod test_engine;
pub mod transaction;

use std::collections::BTreeMap;

use crossbeam_utils::CachePadded;
use parking_lot::{MappedMutexGuard, Mutex, MutexGuard};
use thiserror::Error;
use uuid::Uuid;

use self::account::{AccountRef, Balance, SystemAccount, SystemKind, UserAccount};
use self::asset::Asset;
use self::closed::ForgottenReservation;
use self::effect::Effect;
use self::error::EngineError;
use self::idempotency::{
    FirstOutcome, IdempotencyKey, IdempotencyRecord, IdempotencyStore, KeyHash, KeyHasher, OperationFingerprint,
};
use self::operation::{Operation, Receipt, Request};
use self::record::{JournalRecord, JournalSink, Origin, RequestContext};
use self::reservation::{Reservation, ReservationStatus};
use self::shard::{LockPlan, LockedShards, Shard, ShardCell, ShardMap, UserState};
use self::state::{AccountView, EngineState};
use self::transaction::{ComplianceRecord, Transaction, TxStatus};

pub use self::shard::MAX_SHARDS;

/// The most keys one shard's idempotency store may be configured for (64 shards: about a billion
/// keys). Entries are found by 32-bit byte positions, and a key's entry is written after its
/// record is journaled, when nothing may fail any more: the bound keeps that write from ever
/// meeting a full position space.
pub const MAX_IDEMPOTENCY_CAPACITY_PER_SHARD: usize = 1 << 24;

// A full generation of the longest entries stays inside the 32-bit positions, so the write after
// the journal (`IdempotencyStore::insert`) cannot meet a full position space.
const _: () =
    assert!(MAX_IDEMPOTENCY_CAPACITY_PER_SHARD * idempotency::MAX_ENTRY_BYTES <= idempotency::MAX_GENERATION_BYTES);

/// The most reservations one sweep expires in one shard (one journal record); call again for more.
pub const MAX_EXPIRIES_PER_SHARD_SWEEP: usize = 4_096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// Number of shards, 1..=[`MAX_SHARDS`]. More shards, less contention; each costs a little memory.
    pub shard_count: usize,
    /// The most idempotency keys one shard remembers, at most
    /// [`MAX_IDEMPOTENCY_CAPACITY_PER_SHARD`]; past it new requests are refused.
    pub idempotency_capacity_per_shard: usize,
    /// How long idempotency keys (at least this, at most twice this) and closed reservations
    /// are remembered.
    pub retention_ms: i64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        // 2^20 keys a shard, 67 million in all: about 6 GB when full (docs/ENGINE.md), taken
        // only as keys arrive. With keys kept 24 hours (at most 48), that holds about 390 new
        // keys a second on average (`sustained_keys_per_s`); 65,536 a shard held 24.
        EngineConfig { shard_count: 64, idempotency_capacity_per_shard: 1 << 20, retention_ms: 24 * 60 * 60 * 1_000 }
    }
}

/// See [`Engine::idempotency_fill`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IdempotencyFill {
    pub keys: usize,
    /// The fullest shard's load: its keys, a large outcome (a linked batch's receipts) counting
    /// as several. New keys are refused once it reaches `idempotency_capacity_per_shard`.
    pub fullest_shard_keys: usize,
}

impl EngineConfig {
    /// The average rate of new idempotency keys the store holds for good, with a sweep every
    /// `sweep_interval_ms`: a generation takes keys from one rotation to the next, between
    /// `retention_ms` and `retention_ms + sweep_interval_ms`, and a shard holds two, so at
    /// `capacity / (2 x (retention + sweep interval))` a second the fullest moment just fits.
    /// Faster, and new requests are refused (`IdempotencyCapacityExhausted`) until a generation
    /// retires.
    pub fn sustained_keys_per_s(&self, sweep_interval_ms: i64) -> f64 {
        let keys = self.shard_count as f64 * self.idempotency_capacity_per_shard as f64;
        let generation_ms = self.retention_ms.max(1).saturating_add(sweep_interval_ms.max(0));
        keys / (2.0 * generation_ms as f64 / 1_000.0)
    }
}

/// What one `sweep` call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SweepReport {
    /// Reservations moved from Active to Expired.
    pub expired: usize,
    /// Some shard had more due than one call expires: call `sweep` again.
    pub more_due: bool,
}

/// What `execute` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The journal sequence of the change (or of the first outcome, for a replay). The caller may
    /// report the result only once this sequence is durable. `None` for refusals that were not
    /// recorded (they changed nothing and need no durability).
    pub sequence: Option<u64>,
    pub result: Result<Receipt, EngineError>,
    /// True when this is the remembered outcome of an earlier request with the same key.
    pub replayed: bool,
}

/// Why a journal record could not be replayed: the journal does not describe a valid history.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ReplayError {
    #[error("record {found} arrived where {expected} was expected")]
    OutOfOrder { expected: u64, found: u64 },
    #[error("record {sequence}: {reason}")]
    Inconsistent { sequence: u64, reason: &'static str },
}

pub struct Engine<S> {
    /// Each shard on cache lines of its own: two threads working on neighbouring shards must not
    /// invalidate each other's lock word and clock.
    shards: Box<[CachePadded<ShardCell>]>,
    map: ShardMap,
    /// Hashes each request's key once; seeded per engine (see `KeyHasher`).
    key_hasher: KeyHasher,
    /// The next sequence number and the sink, under one lock: taken after the shard locks,
    /// released before them. One lock orders both the numbering and the handing over, so a sink
    /// needs no synchronisation of its own. Every change writes it, so it sits on cache lines
    /// of its own, away from the fields every request only reads (`shards`, `map`,
    /// `key_hasher`): sharing a line with them made every thread miss on them after any other
    /// thread's change.
    sequencer: CachePadded<Mutex<Sequencer<S>>>,
    config: EngineConfig,
}

/// The journal's end of the engine: the sequence the next record gets, and where it goes.
struct Sequencer<S> {
    next_sequence: u64,
    sink: S,
}

impl<S: JournalSink> Engine<S> {
    /// An empty engine whose first change will be sequence 1.
    pub fn new(config: EngineConfig, sink: S) -> Engine<S> {
        assert!(
            config.idempotency_capacity_per_shard <= MAX_IDEMPOTENCY_CAPACITY_PER_SHARD,
            "idempotency capacity per shard must be at most {MAX_IDEMPOTENCY_CAPACITY_PER_SHARD}"
        );
        let map = ShardMap::new(config.shard_count);
        let key_hasher = KeyHasher::default();
        let shards = (0..map.count()).map(|_| CachePadded::new(ShardCell::new(Shard::new()))).collect();
        let sequencer = CachePadded::new(Mutex::new(Sequencer { next_sequence: 1, sink }));
        Engine { shards, map, key_hasher, sequencer, config }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The sink, locked: no change is journaled while the guard lives, so a caller must not ask
    /// the engine for anything else until it drops the guard.
    pub fn sink(&self) -> MappedMutexGuard<'_, S> {
        MutexGuard::map(self.sequencer.lock(), |sequencer| &mut sequencer.sink)
    }

    /// Executes one request: all of it or none of it, exactly once per idempotency key. The
    /// change is dated `request.now_ms`, or later if a shard it touches has already seen a later
    /// time (see `Shard::clock_ms`).
    pub fn execute(&self, request: Request) -> Outcome {
        self.execute_with(request, None)
    }

    /// [`Engine::execute`], recording who asked (see [`RequestContext`]) in the journal record.
    pub fn execute_with(&self, request: Request, context: Option<Box<RequestContext>>) -> Outcome {
        let Request { key, now_ms: requested_ms, operation } = request;
        let key_hash = self.key_hasher.hash(&key);
        let key_shard = self.map.of_key(key_hash);
        let effects = rules::effects_buffer();
        let mut plan = LockPlan::default();
        rules::lock_plan(&operation, self.map, &mut plan);
        plan.add(key_shard);
        // A reservation's slot in the closed-reservation index is most likely not in cache, and
        // a reserve looks it up early in its rules: ask for it now, before locking, so it travels
        // while the locks are taken (`index_hints`).
        if let Some((user_id, reservation_id)) = rules::reservation_named(&operation) {
            self.shards[self.map.of_user(user_id) as usize].hints().prefetch_reservation(user_id, reservation_id);
        }
        let mut shards = LockedShards::lock(&self.shards, plan);
        // The key's index lines are most likely not in cache either. Ask for them now and look
        // the key up only after the rules have run, so the wait overlaps the rules' work; a key
        // that turns out to be known undoes the rules' effects. Measured: a transfer took 1.65x
        // the global-mutex baseline this way and 2.13x with the lookup first (docs/BENCHMARKS.md).
        // A linked batch looks its key up first: a retry must not re-run thousands of operations
        // only to undo them. Asked for before locking instead, through `index_hints` like the
        // reservation's, these lines made uniform transfers slower (session 15).
        shards.get(key_shard).idempotency.prefetch(key_hash);
        let now_ms = shards.advance_clock(requested_ms);
        let fingerprint = OperationFingerprint::of(&operation);
        let speculative = !matches!(operation, Operation::LinkedBatch { .. });
        if !speculative
            && let Some(outcome) = self.known_key(&shards.get(key_shard).idempotency, &key, key_hash, fingerprint)
        {
            return outcome;
        }

        let mut tx = rules::Tx::with_buffer(&mut shards, self.map, now_ms, effects);
        let result = rules::run(&mut tx, &operation);
        let refusal = if speculative {
            self.known_key(&tx.shards.get(key_shard).idempotency, &key, key_hash, fingerprint)
        } else {
            None
        };
        if refusal.is_some() || result.is_err() {
            tx.rollback();
        }
        if let Some(outcome) = refusal {
            return outcome;
        }
        let effects = tx.into_effects();
        let outcome = result.clone();
        let appended = self.append(&mut shards, |sequence| JournalRecord {
            sequence,
            at_ms: now_ms,
            origin: Origin::Request { key, operation, outcome, context },
            effects,
        });
        let Some(sequence) = appended else {
            return refused(EngineError::JournalUnavailable);
        };
        let first = FirstOutcome { fingerprint, sequence, recorded_at_ms: now_ms, outcome: &result };
        shards.get(key_shard).idempotency.insert(&key, key_hash, first);
        Outcome { sequence: Some(sequence), result, replayed: false }
    }

    /// The answer to a request whose key `store` already knows (its first outcome, or a conflict),
    /// or the refusal of a new key the store has no room for; `None` for a new key that fits.
    fn known_key(
        &self,
        store: &IdempotencyStore,
        key: &IdempotencyKey,
        key_hash: KeyHash,
        fingerprint: OperationFingerprint,
    ) -> Option<Outcome> {
        match store.get(key, key_hash) {
            Some(first) if first.fingerprint == fingerprint => {
                Some(Outcome { sequence: Some(first.sequence), result: first.outcome(), replayed: true })
            }
            Some(_) => Some(refused(EngineError::IdempotencyConflict { key: key.as_str().to_owned() })),
            None if store.load() >= self.config.idempotency_capacity_per_shard || !store.has_room() => {
                Some(refused(EngineError::IdempotencyCapacityExhausted))
            }
            None => None,
        }
    }

    /// Takes the next sequence, builds the record that carries it and hands it to the sink. If the
    /// journal is closed, undoes the record's effects (the shards are still locked) and returns
    /// `None`. The record is built here, not passed in, so that it is written once, where the sink
    /// takes it, rather than moved again to receive its sequence (a few hundred bytes a request).
    #[inline]
    fn append(&self, shards: &mut LockedShards<'_>, record: impl FnOnce(u64) -> JournalRecord) -> Option<u64> {
        let mut sequencer = self.sequencer.lock();
        let sequence = sequencer.next_sequence;
        match sequencer.sink.append(record(sequence)) {
            Ok(()) => {
                sequencer.next_sequence += 1;
                Some(sequence)
            }
            Err(closed) => {
                drop(sequencer);
                for effect in closed.record.effects.iter().rev() {
                    effect::revert(shards, self.map, effect);
                }
                None
            }
        }
    }

    /// Expires every Active reservation whose time is up at `now_ms` (at most
    /// [`MAX_EXPIRIES_PER_SHARD_SWEEP`] per shard per call), rotates the generations of
    /// idempotency keys and of closed reservations (each kept at least the retention window and
    /// at most about twice it; see `idempotency` and `closed`), and forgets finished transactions
    /// older than the window.
    pub fn sweep(&self, requested_ms: i64) -> Result<SweepReport, EngineError> {
        let mut report = SweepReport::default();
        for index in 0..self.map.count() {
            let mut shards = LockedShards::lock(&self.shards, [index].into_iter().collect());
            let now_ms = shards.advance_clock(requested_ms);
            let due: Vec<Reservation> = {
                let shard = shards.get(index);
                shard
                    .expiry
                    .due(now_ms)
                    .take(MAX_EXPIRIES_PER_SHARD_SWEEP)
                    .filter_map(|(_, user_id, reservation_id)| {
                        shard.users.get(&user_id).and_then(|user| user.reservations.get(&reservation_id)).copied()
                    })
                    .collect()
            };
            if !due.is_empty() {
                let mut tx = rules::Tx::new(&mut shards, self.map, now_ms);
                for reservation in &due {
                    if let Err(error) = rules::close_and_refund(&mut tx, reservation, ReservationStatus::Expired) {
                        tx.rollback();
                        return Err(error);
                    }
                }
                let effects = tx.into_effects();
                let record = |sequence| JournalRecord { sequence, at_ms: now_ms, origin: Origin::ExpirySweep, effects };
                if self.append(&mut shards, record).is_none() {
                    return Err(EngineError::JournalUnavailable);
                }
                report.expired += due.len();
                report.more_due |= shards.get(index).expiry.due(now_ms).next().is_some();
            }
            let shard = shards.get(index);
            let retired_keys = shard.idempotency.rotate(now_ms, self.config.retention_ms);
            forget_finished_transactions(shard, now_ms.saturating_sub(self.config.retention_ms));
            let retired_reservations = shards.closed_reservations_mut(index).rotate(now_ms, self.config.retention_ms);
            drop(shards);
            // Freeing a retired generation takes a while; do it after the shard is unlocked.
            drop(retired_keys);
            drop(retired_reservations);
        }
        Ok(report)
    }

    /// Applies a record read back from the journal: its effects and its idempotency entry,
    /// without re-running business rules and without calling the sink. Records must come in
    /// sequence order, starting from the engine's next sequence.
    pub fn apply_record(&self, record: &JournalRecord) -> Result<(), ReplayError> {
        let mut plan: LockPlan = record.effects.iter().flat_map(|effect| effect.shards(self.map)).flatten().collect();
        let key_hash = match &record.origin {
            Origin::Request { key, .. } => Some(self.key_hasher.hash(key)),
            Origin::ExpirySweep => None,
        };
        if let Some(hash) = key_hash {
            plan.add(self.map.of_key(hash));
        }
        let mut shards = LockedShards::lock(&self.shards, plan);
        let mut sequencer = self.sequencer.lock();
        if record.sequence != sequencer.next_sequence {
            return Err(ReplayError::OutOfOrder { expected: sequencer.next_sequence, found: record.sequence });
        }
        let inconsistent = |reason| ReplayError::Inconsistent { sequence: record.sequence, reason };
        record_shape(record).map_err(inconsistent)?;
        // A key (or a reservation id) seen again is legitimate only if the live engine could have
        // forgotten the first one, i.e. the first is older than the retention window.
        let forgotten_before_ms = record.at_ms.saturating_sub(self.config.retention_ms);
        if let (Origin::Request { key, .. }, Some(key_hash)) = (&record.origin, key_hash)
            && shards
                .get(self.map.of_key(key_hash))
                .idempotency
                .get(key, key_hash)
                .is_some_and(|first| first.recorded_at_ms > forgotten_before_ms)
        {
            return Err(inconsistent("idempotency key recorded twice within the retention window"));
        }
        // What the replay forgot for this record, to bring back if a later effect fails its check.
        let mut forgotten: Vec<Forgotten> = Vec::new();
        for (applied, effect) in record.effects.iter().enumerate() {
            if let Err(reason) = replay_check(&mut shards, self.map, effect, record.at_ms, forgotten_before_ms) {
                for done in record.effects[..applied].iter().rev() {
                    effect::revert(&mut shards, self.map, done);
                }
                for item in forgotten.into_iter().rev() {
                    item.restore(&mut shards, self.map);
                }
                return Err(inconsistent(reason));
            }
            // The live engine reuses a reservation or transaction id only once it forgot the
            // first one; a replay, which never forgets, drops that first one here (replay_check
            // made sure it is older than the retention window).
            match effect {
                Effect::ReservationOpened { reservation } => {
                    let user_id = reservation.account.user_id;
                    let closed = shards.closed_reservations_mut(self.map.of_user(user_id));
                    forgotten.extend(closed.remove(user_id, reservation.id).map(Forgotten::Reservation));
                }
                Effect::TransactionCreated { transaction } => {
                    let user_id = transaction.spec.user_id;
                    let shard = shards.get(self.map.of_user(user_id));
                    forgotten
                        .extend(forget_transaction(shard, user_id, transaction.spec.id).map(Forgotten::Transaction));
                }
                _ => {}
            }
            effect::apply(&mut shards, self.map, effect);
        }
        // Only now, so that a refused record leaves the clocks as they were too.
        shards.advance_clock(record.at_ms);
        let mut retired_keys = None;
        if let (Origin::Request { key, operation, outcome, .. }, Some(key_hash)) = (&record.origin, key_hash) {
            let store = &mut shards.get(self.map.of_key(key_hash)).idempotency;
            // Rotate as the live engine's sweeps would have, so a long replay stays within capacity.
            retired_keys = store.rotate(record.at_ms, self.config.retention_ms);
            let fingerprint = OperationFingerprint::of(operation);
            let first = FirstOutcome { fingerprint, sequence: record.sequence, recorded_at_ms: record.at_ms, outcome };
            store.replace(key, key_hash, first);
        }
        sequencer.next_sequence += 1;
        drop(sequencer);
        drop(shards);
        drop(retired_keys);
        Ok(())
    }

    /// The balance of one account. A system account's is summed over its shards' parts with every
    /// shard locked at once, as `state` does: summed one shard at a time, a read could take one
    /// part before a linked batch and another after it, a total the account never had.
    pub fn balance(&self, account: &AccountRef) -> Result<Balance, EngineError> {
        match account {
            AccountRef::User(user_account) => self.shards[self.map.of_user(user_account.user_id) as usize]
                .read()
                .users
                .get(&user_account.user_id)
                .and_then(|user| user.account(user_account.domain, user_account.asset))
                .map(|state| state.balance)
                .ok_or(EngineError::UnknownAccount { account: *account }),
            AccountRef::System(system_account) => {
                let mut shards = LockedShards::lock(&self.shards, (0..self.map.count()).collect());
                let available_minor = (0..self.map.count())
                    .map(|index| {
                        shards.get(index).system_minor[system_account.kind.index()][system_account.asset.index()]
                    })
                    .sum();
                Ok(Balance { available_minor, reserved_minor: 0 })
            }
        }
    }

    /// Every account of a user, in a stable order (domain, then asset).
    pub fn accounts_of(&self, user_id: Uuid) -> Vec<AccountView> {
        let shard = self.shards[self.map.of_user(user_id) as usize].read();
        let mut views: Vec<AccountView> =
            shard.users.get(&user_id).map(|user| user_views(user_id, user).collect()).unwrap_or_default();
        views.sort_by_key(|view| view.account);
        views
    }

    /// Whether the idempotency store still remembers `key` (a request under it is answered with
    /// its first outcome).
    pub fn remembers_key(&self, key: &IdempotencyKey) -> bool {
        let hash = self.key_hasher.hash(key);
        self.shards[self.map.of_key(hash) as usize].read().idempotency.get(key, hash).is_some()
    }

    /// A reservation: active, or closed within the retention window (see `closed`).
    pub fn reservation(&self, user_id: Uuid, reservation_id: Uuid) -> Option<Reservation> {
        self.shards[self.map.of_user(user_id) as usize].read().reservation(user_id, reservation_id).copied()
    }

    /// A transaction the engine remembers (unfinished, or finished within the retention window).
    pub fn transaction(&self, user_id: Uuid, transaction_id: Uuid) -> Option<Transaction> {
        self.shards[self.map.of_user(user_id) as usize]
            .read()
            .users
            .get(&user_id)
            .and_then(|user| user.transactions.get(&transaction_id))
            .cloned()
    }

    /// The compliance record the gate reads for `user_id`.
    pub fn compliance(&self, user_id: Uuid) -> Option<ComplianceRecord> {
        self.shards[self.map.of_user(user_id) as usize].read().users.get(&user_id).and_then(|user| user.compliance)
    }

    /// The shard holding `user_id`'s accounts (for operators and benchmarks that place load).
    pub fn shard_of(&self, user_id: Uuid) -> u32 {
        self.map.of_user(user_id)
    }

    /// How full the idempotency store is: the keys held in all, and the fullest shard's load (its
    /// keys, a large outcome counting as several). New keys are refused once a shard's load
    /// reaches `idempotency_capacity_per_shard` (for operators: alert before the fullest shard
    /// gets there). Locks one shard at a time.
    pub fn idempotency_fill(&self) -> IdempotencyFill {
        let mut fill = IdempotencyFill::default();
        for cell in self.shards.iter() {
            let shard = cell.read();
            fill.keys += shard.idempotency.len();
            fill.fullest_shard_keys = fill.fullest_shard_keys.max(shard.idempotency.load());
        }
        fill
    }

    /// The sequence of the last change handed to the journal (0 before the first).
    pub fn last_sequence(&self) -> u64 {
        self.sequencer.lock().next_sequence - 1
    }

    /// A consistent copy of the whole state (locks every shard, in order).
    pub fn state(&self) -> EngineState {
        let mut shards = LockedShards::lock(&self.shards, (0..self.map.count()).collect());
        let next_sequence = self.sequencer.lock().next_sequence;
        let mut state = EngineState { next_sequence, ..EngineState::default() };
        let mut system_minor: BTreeMap<SystemAccount, i128> = BTreeMap::new();
        for index in 0..self.map.count() {
            let shard = shards.get(index);
            for (user_id, user) in &shard.users {
                state.accounts.extend(user_views(*user_id, user).map(|view| (view.account, view)));
                for reservation in user.reservations.values() {
                    state.reservations.insert((*user_id, reservation.id), *reservation);
                }
                for transaction in user.transactions.values() {
                    state.transactions.insert((*user_id, transaction.spec.id), transaction.clone());
                }
                debug_assert_eq!(
                    user.unfinished_transactions,
                    user.recount_unfinished(),
                    "the count of {user_id}'s unfinished transactions drifted from its transactions"
                );
                if let Some(record) = user.compliance {
                    state.compliance.insert(*user_id, record);
                }
            }
            for reservation in shard.closed_reservations().iter() {
                state.reservations.insert((reservation.account.user_id, reservation.id), *reservation);
            }
            for kind in SystemKind::all() {
                for asset in Asset::all() {
                    let amount_minor = shard.system_minor[kind.index()][asset.index()];
                    *system_minor.entry(SystemAccount { kind, asset }).or_default() += amount_minor;
                }
            }
            state.idempotency.extend(shard.idempotency.iter());
        }
        state.system_minor = system_minor.into_iter().filter(|(_, amount_minor)| *amount_minor != 0).collect();
        state
    }

    /// An engine holding `state` (what [`Engine::state`] gave). System balances are spread evenly
    /// over the shards; only their sums are state. Refused (`IdempotencyCapacityExhausted`) only if a shard's key
    /// store runs out of room altogether (see [`Engine::restore_key`]).
    pub fn from_state(config: EngineConfig, sink: S, state: &EngineState) -> Result<Engine<S>, EngineError> {
        let engine = Engine::without_keys(config, sink, state, state.latest_ms());
        for (key, record) in &state.idempotency {
            engine.restore_key(key, record)?;
        }
        Ok(engine)
    }

    /// [`Engine::from_state`] without `state`'s idempotency keys, whose clocks start at
    /// `latest_ms` (the latest moment the whole state has seen, keys included: see
    /// [`EngineState::latest_ms`]). Recovery streams the keys in afterwards
    /// ([`Engine::restore_key`]) rather than hold tens of millions of them in `state` beside
    /// the engine's own store (measured: 727 MB at the peak of start-up against 311 MB, with a
    /// million keys; docs/BENCHMARKS.md, "Session 17").
    pub fn without_keys(config: EngineConfig, sink: S, state: &EngineState, latest_ms: i64) -> Engine<S> {
        let engine = Engine::new(config, sink);
        engine.sequencer.lock().next_sequence = state.next_sequence.max(1);
        let mut shards = LockedShards::lock(&engine.shards, (0..engine.map.count()).collect());
        // Time restarts from the latest moment the state has seen.
        shards.advance_clock(latest_ms);
        for view in state.accounts.values() {
            let user =
                shards.get(engine.map.of_user(view.account.user_id)).users.entry(view.account.user_id).or_default();
            user.accounts.push(shard::AccountState {
                domain: view.account.domain,
                asset: view.account.asset,
                config: view.config,
                balance: view.balance,
                usage: view.usage,
            });
        }
        for reservation in state.reservations.values() {
            let user_id = reservation.account.user_id;
            let shard_index = engine.map.of_user(user_id);
            match reservation.closed_at_ms {
                None => {
                    let shard = shards.get(shard_index);
                    shard.users.entry(user_id).or_default().reservations.insert(reservation.id, *reservation);
                    // A transaction's reservation stops expiring once the transaction is with its
                    // provider (`effect::hold_at_provider`).
                    let held = state
                        .transactions
                        .get(&(user_id, reservation.id))
                        .is_some_and(|transaction| transaction.status.is_with_provider());
                    if !held {
                        shard.expiry.insert(reservation.expires_at_ms, user_id, reservation.id);
                    }
                }
                Some(_) => shards.closed_reservations_mut(shard_index).insert(*reservation),
            }
        }
        let mut finished: Vec<&Transaction> = Vec::new();
        for ((user_id, transaction_id), transaction) in &state.transactions {
            let user = shards.get(engine.map.of_user(*user_id)).users.entry(*user_id).or_default();
            user.transactions.insert(*transaction_id, transaction.clone());
            if transaction.status.is_finished() {
                finished.push(transaction);
            } else {
                user.unfinished_transactions += 1;
            }
        }
        finished.sort_by_key(|transaction| transaction.updated_at_ms);
        for transaction in finished {
            let (user_id, at_ms) = (transaction.spec.user_id, transaction.updated_at_ms);
            shards.get(engine.map.of_user(user_id)).finished.push_back((at_ms, user_id, transaction.spec.id));
        }
        for (user_id, record) in &state.compliance {
            shards.get(engine.map.of_user(*user_id)).users.entry(*user_id).or_default().compliance = Some(*record);
        }
        // A state holds each system account's total; the live engine held it as one sub-account
        // a shard, each bounded by the maximum amount over the shard count (the rules refuse a
        // posting past it), so the total is within the maximum amount. It is spread evenly over
        // the shards: all in one shard could leave that shard past its bound, or at it, refusing
        // postings the live engine took. The sum stays exact, and each share is within the
        // bound whatever the shard count (`check_invariants` holds the total to the maximum).
        let shard_count = engine.map.count();
        for (account, amount_minor) in &state.system_minor {
            let (share_minor, rest_minor) =
                (amount_minor / i128::from(shard_count), amount_minor % i128::from(shard_count));
            for shard_index in 0..shard_count {
                let extra_minor = if i128::from(shard_index) < rest_minor.abs() { rest_minor.signum() } else { 0 };
                shards.get(shard_index).system_minor[account.kind.index()][account.asset.index()] =
                    share_minor + extra_minor;
            }
        }
        drop(shards);
        engine
    }

    /// Brings back one idempotency key of the state being recovered (see
    /// [`Engine::without_keys`]), unless it is older than the retention window measured back
    /// from the recovered clock (the live engine may already have forgotten it). Keys may come
    /// in any order: of two records of one key (used again after the live engine forgot it),
    /// the one with the later sequence is kept, as the live engine kept it. Call before the
    /// engine takes requests.
    ///
    /// Every key the live engine held is brought back, even past `idempotency_capacity_per_shard`:
    /// keys land in other shards than before (the key hasher is seeded per engine), so a shard
    /// the live engine kept just under its capacity may receive more here. Such a shard refuses
    /// new keys until old ones age out, as it would live. Refused (`IdempotencyCapacityExhausted`)
    /// only when the shard's store has no room left at all (its 32-bit positions).
    pub fn restore_key(&self, key: &IdempotencyKey, record: &IdempotencyRecord) -> Result<(), EngineError> {
        let key_hash = self.key_hasher.hash(key);
        let index = self.map.of_key(key_hash);
        let mut shards = LockedShards::lock(&self.shards, [index].into_iter().collect());
        let cutoff_ms = shards.get(index).clock_ms.saturating_sub(self.config.retention_ms);
        let store = &mut shards.get(index).idempotency;
        let kept = store.get(key, key_hash).map(|kept| kept.sequence);
        if record.recorded_at_ms <= cutoff_ms || kept.is_some_and(|sequence| sequence > record.sequence) {
            return Ok(());
        }
        // Checked for a replaced key too: the entry it replaces stays in the generation, unindexed.
        if !store.has_room() {
            return Err(EngineError::IdempotencyCapacityExhausted);
        }
        store.replace(key, key_hash, record.borrowed());
        Ok(())
    }
}

fn refused(error: EngineError) -> Outcome {
    debug_assert!(!error.is_recorded());
    Outcome { sequence: None, result: Err(error), replayed: false }
}

fn user_views(user_id: Uuid, user: &UserState) -> impl Iterator<Item = AccountView> + '_ {
    user.accounts.iter().map(move |state| AccountView {
        account: UserAccount { user_id, domain: state.domain, asset: state.asset },
        config: state.config,
        balance: state.balance,
        usage: state.usage,
    })
}

/// Drops transactions that finished at or before `cutoff_ms` and are still finished.
fn forget_finished_transactions(shard: &mut Shard, cutoff_ms: i64) {
    while let Some(&(finished_at_ms, user_id, transaction_id)) = shard.finished.front() {
        if finished_at_ms > cutoff_ms {
            break;
        }
        shard.finished.pop_front();
        if let Some(user) = shard.users.get_mut(&user_id)
            && user
                .transactions
                .get(&transaction_id)
                .is_some_and(|transaction| transaction.status.is_finished() && transaction.updated_at_ms <= cutoff_ms)
        {
            user.transactions.remove(&transaction_id);
        }
    }
}

/// What a journal replay forgot to make room for a reused id (see [`Engine::apply_record`]).
enum Forgotten {
    Reservation(ForgottenReservation),
    Transaction(Box<ForgottenTransaction>),
}

impl Forgotten {
    /// Puts it back where it was, once the record's applied effects are undone.
    fn restore(self, shards: &mut LockedShards<'_>, map: ShardMap) {
        match self {
            Forgotten::Reservation(forgotten) => {
                let user_id = forgotten.reservation.account.user_id;
                shards.closed_reservations_mut(map.of_user(user_id)).restore(forgotten);
            }
            Forgotten::Transaction(forgotten) => {
                let user_id = forgotten.transaction.spec.user_id;
                restore_transaction(shards.get(map.of_user(user_id)), *forgotten);
            }
        }
    }
}

/// A finished transaction a replay forgot, and where its entries sat in the shard's queue of
/// finished transactions (ascending), so that it can be put back exactly.
struct ForgottenTransaction {
    transaction: Transaction,
    queued_at: Vec<(usize, (i64, Uuid, Uuid))>,
}

/// Forgets the finished transaction `transaction_id` of `user_id`, if the shard remembers it.
fn forget_transaction(shard: &mut Shard, user_id: Uuid, transaction_id: Uuid) -> Option<Box<ForgottenTransaction>> {
    let transaction = shard.users.get_mut(&user_id)?.transactions.remove(&transaction_id)?;
    // Only a finished one can be forgotten (replay_check), so the count of unfinished ones holds.
    debug_assert!(transaction.status.is_finished());
    let queued_at = shard
        .finished
        .iter()
        .enumerate()
        .filter(|(_, (_, user, id))| (*user, *id) == (user_id, transaction_id))
        .map(|(at, entry)| (at, *entry))
        .collect();
    shard.finished.retain(|(_, user, id)| (*user, *id) != (user_id, transaction_id));
    Some(Box::new(ForgottenTransaction { transaction, queued_at }))
}

fn restore_transaction(shard: &mut Shard, forgotten: ForgottenTransaction) {
    let ForgottenTransaction { transaction, queued_at } = forgotten;
    for (at, entry) in queued_at {
        shard.finished.insert(at, entry);
    }
    let user_id = transaction.spec.user_id;
    let previous = shard.users.entry(user_id).or_default().transactions.insert(transaction.spec.id, transaction);
    debug_assert!(previous.is_none(), "restored over a transaction the record created and did not undo");
}

/// Checks that a journal effect can apply to the current state, so a corrupt journal is
/// reported instead of breaking an invariant.
/// What the live engine writes in a record of each origin, checked before any effect applies: a
/// refusal changes nothing, only the sweep expires reservations and it does nothing else, and a
/// reservation closes at the record's time.
fn record_shape(record: &JournalRecord) -> Result<(), &'static str> {
    let expires =
        |effect: &Effect| matches!(effect, Effect::ReservationClosed { status: ReservationStatus::Expired, .. });
    let closed_at_another_time = |effect: &Effect| matches!(effect, Effect::ReservationClosed { closed_at_ms, .. } if *closed_at_ms != record.at_ms);
    if record.effects.iter().any(closed_at_another_time) {
        return Err("a reservation closed at another time than its record's");
    }
    match &record.origin {
        Origin::Request { outcome: Err(_), .. } if !record.effects.is_empty() => Err("a refused request with effects"),
        Origin::Request { .. } if record.effects.iter().any(expires) => Err("a request expiring a reservation"),
        Origin::Request { .. } => Ok(()),
        Origin::ExpirySweep => {
            let expiry_only = |effect: &Effect| expires(effect) || matches!(effect, Effect::UsageChanged { .. });
            if record.effects.is_empty() || !record.effects.iter().all(expiry_only) {
                return Err(
                    "a sweep record that expires nothing, or changes more than expiries and their outflow counts",
                );
            }
            Ok(())
        }
    }
}

fn replay_check(
    shards: &mut LockedShards<'_>,
    map: ShardMap,
    effect: &Effect,
    at_ms: i64,
    forgotten_before_ms: i64,
) -> Result<(), &'static str> {
    let mut account_exists = |account: &UserAccount| {
        shards
            .get(map.of_user(account.user_id))
            .users
            .get(&account.user_id)
            .is_some_and(|user| user.account(account.domain, account.asset).is_some())
    };
    let slot_exists = |slot: &effect::Slot, exists: &mut dyn FnMut(&UserAccount) -> bool| match slot {
        effect::Slot::User(account) => exists(account),
        effect::Slot::System { .. } => true,
    };
    match effect {
        Effect::AccountOpened { account, .. } => {
            if account_exists(account) {
                return Err("account opened twice");
            }
        }
        Effect::FrozenChanged { account, frozen } => {
            let changes = shards
                .get(map.of_user(account.user_id))
                .users
                .get(&account.user_id)
                .and_then(|user| user.account(account.domain, account.asset))
                .is_some_and(|state| state.config.frozen != *frozen);
            if !changes {
                return Err("freeze change on a missing account, or one that changes nothing");
            }
        }
        // The counters are journaled as values, before and after, so a record applied out of the
        // order the changes were made in finds other counters than it left from. Postings add up
        // the same in any order; for accounts with a limit (whose outflows journal their
        // counters) this check tells a journal in sequence order from one in the order the
        // changes happened.
        Effect::UsageChanged { account, before, .. } => {
            let usage = shards
                .get(map.of_user(account.user_id))
                .users
                .get(&account.user_id)
                .and_then(|user| user.account(account.domain, account.asset))
                .map(|state| state.usage);
            match usage {
                None => return Err("effect on a missing account"),
                Some(usage) if usage != *before => {
                    return Err("usage counters differ from the record's `before`: records out of the order of their \
                         changes, or the engine restarted from projections whose counters had drifted");
                }
                Some(_) => {}
            }
        }
        Effect::Posting { from, to, amount_minor } => {
            if *amount_minor <= 0 || !slot_exists(from, &mut account_exists) || !slot_exists(to, &mut account_exists) {
                return Err("posting with a missing account or a non-positive amount");
            }
            if from.asset() != to.asset() {
                return Err("posting between accounts of different assets");
            }
        }
        Effect::ReservationOpened { reservation } => {
            if !account_exists(&reservation.account)
                || reservation.status != ReservationStatus::Active
                || reservation.amount_minor <= 0
            {
                return Err("reservation opened on a missing account, not active, or of a non-positive amount");
            }
            let user_id = reservation.account.user_id;
            let still_remembered =
                shards.get(map.of_user(user_id)).reservation(user_id, reservation.id).is_some_and(|earlier| {
                    earlier.closed_at_ms.is_none_or(|closed_at_ms| closed_at_ms > forgotten_before_ms)
                });
            if still_remembered {
                return Err("reservation opened twice within the retention window");
            }
        }
        Effect::TransactionCreated { transaction } => {
            if transaction.status != TxStatus::Initiated {
                return Err("transaction created in another status than Initiated");
            }
            let user_id = transaction.spec.user_id;
            let still_remembered = shards
                .get(map.of_user(user_id))
                .users
                .get(&user_id)
                .and_then(|user| user.transactions.get(&transaction.spec.id))
                .is_some_and(|earlier| !earlier.status.is_finished() || earlier.updated_at_ms > forgotten_before_ms);
            if still_remembered {
                return Err("transaction created twice within the retention window");
            }
        }
        Effect::TransactionStatusChanged { change } => {
            let matches = shards
                .get(map.of_user(change.user_id))
                .users
                .get(&change.user_id)
                .and_then(|user| user.transactions.get(&change.transaction_id))
                .is_some_and(|transaction| {
                    // What undoing the change writes back must be what is there now.
                    transaction.status == change.from
                        && lifecycle::is_legal(change.from, change.to)
                        && transaction.updated_at_ms == change.previous_updated_at_ms
                        && (change.aml.is_none() || transaction.aml.is_none())
                        && (change.fill.is_none() || transaction.fill.is_none())
                });
            if !matches {
                return Err("status change of a missing transaction, from another status or time, illegal, or \
                     setting a verdict or fill it already has");
            }
        }
        Effect::ComplianceSet { user_id, before, .. } => {
            let current = shards.get(map.of_user(*user_id)).users.get(user_id).and_then(|user| user.compliance);
            if current != *before {
                return Err("compliance record differs from the record's `before`");
            }
        }
        Effect::ReservationClosed { user_id, reservation_id, status, .. } => {
            let active = shards
                .get(map.of_user(*user_id))
                .users
                .get(user_id)
                .and_then(|user| user.reservations.get(reservation_id))
                .is_some_and(|reservation| {
                    reservation.status.can_become(*status)
                        && (*status != ReservationStatus::Expired || reservation.expires_at_ms <= at_ms)
                });
            if !active {
                return Err("closing a reservation that is missing or not active, or expiring it before its time");
            }
        }
    }
    Ok(())
}
