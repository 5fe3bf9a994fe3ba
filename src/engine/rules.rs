//! The business rules: how each operation checks the state and which effects it emits.
//!
//! Runs with every shard the operation needs already locked (see [`lock_plan`]). Each rule
//! checks, then emits effects that apply immediately; an `Err` anywhere means the caller
//! rolls every emitted effect back, which is what makes linked batches all-or-nothing.

use ethnum::U256;
use rust_decimal::Decimal;
use uuid::Uuid;

use super::account::{AccountConfig, AccountRef, FeeTier, SystemAccount, SystemKind, UserAccount};
use super::effect::{self, Effect, Slot};
use super::error::EngineError;
use super::lifecycle;
use super::money::{Amount, MAX_AMOUNT_MINOR};
use super::operation::{
    DEFAULT_RESERVATION_TTL_MS, MAX_ACTIVE_RESERVATIONS_PER_USER, MAX_BATCH_OPERATIONS, MAX_COMMISSION_BPS,
    MAX_RESERVATION_TTL_MS, Operation, Receipt,
};
use super::prefetch::prefetch_bytes_for_write;
use super::reservation::{Reservation, ReservationStatus};
use super::shard::{AccountState, LockPlan, LockedShards, Shard, ShardMap, UserState};

/// The (user_id, reservation_id) a reserve, commit or release names: the closed-reservation
/// store will be probed for it, and the engine asks for that line before it locks.
pub(crate) fn reservation_named(operation: &Operation) -> Option<(Uuid, Uuid)> {
    match operation {
        Operation::Reserve { reservation_id, account, .. } => Some((account.user_id, *reservation_id)),
        Operation::Commit { user_id, reservation_id, .. } | Operation::Release { user_id, reservation_id } => {
            Some((*user_id, *reservation_id))
        }
        _ => None,
    }
}

/// Adds to `out` every shard `operation` touches. System sub-accounts are taken from the
/// shard of the user on the other side of the posting, so they never add a lock.
pub(crate) fn lock_plan(operation: &Operation, map: ShardMap, out: &mut LockPlan) {
    match operation {
        Operation::OpenAccount { account, .. }
        | Operation::SetFrozen { account, .. }
        | Operation::Deposit { account, .. }
        | Operation::Withdraw { account, .. }
        | Operation::Reserve { account, .. } => out.add(map.of_user(account.user_id)),
        Operation::Commit { user_id, destination, .. } => {
            out.add(map.of_user(*user_id));
            if let AccountRef::User(destination) = destination {
                out.add(map.of_user(destination.user_id));
            }
        }
        Operation::Release { user_id, .. }
        | Operation::SetCompliance { user_id, .. }
        | Operation::SetKyc { user_id, .. } => out.add(map.of_user(*user_id)),
        Operation::InitiateTransaction { transaction } => {
            out.add(map.of_user(transaction.user_id));
            if let AccountRef::User(payee) = transaction.payee {
                out.add(map.of_user(payee.user_id));
            }
        }
        Operation::TransitionTransaction { user_id, payee_user_id, .. } => {
            out.add(map.of_user(*user_id));
            if let Some(payee) = payee_user_id {
                out.add(map.of_user(*payee));
            }
        }
        Operation::Transfer { from, to, .. } => {
            out.add(system_shard(map, *from, *to));
            for side in [from, to] {
                if let AccountRef::User(account) = side {
                    out.add(map.of_user(account.user_id));
                }
            }
        }
        Operation::Convert { from, to, .. } => {
            out.add(map.of_user(from.user_id));
            out.add(map.of_user(to.user_id));
        }
        Operation::LinkedBatch { operations } => {
            // A nested batch is refused before it does anything, so its contents need no locks;
            // not recursing keeps the plan bounded by MAX_BATCH_OPERATIONS whatever the nesting.
            // About three shards an operation (two users and a system shard), most of them
            // already planned.
            out.reserve(operations.len().min(MAX_BATCH_OPERATIONS) * 3);
            for operation in operations.iter().take(MAX_BATCH_OPERATIONS) {
                if !matches!(operation, Operation::LinkedBatch { .. }) {
                    lock_plan(operation, map, out);
                }
            }
        }
    }
}

/// The shard whose system sub-accounts a transfer between `from` and `to` uses.
fn system_shard(map: ShardMap, from: AccountRef, to: AccountRef) -> u32 {
    match (from, to) {
        (AccountRef::User(account), _) | (_, AccountRef::User(account)) => map.of_user(account.user_id),
        (AccountRef::System(_), AccountRef::System(_)) => 0,
    }
}

/// Effects most requests emit (a transfer one, a commit two): room for them in one allocation.
/// A record waits in the journal's channel with this capacity, so it is kept small; rarer
/// requests regrow.
const EXPECTED_EFFECTS: usize = 2;

/// One operation in progress: the locked shards and the effects applied so far.
pub(crate) struct Tx<'l, 'a> {
    pub(super) shards: &'l mut LockedShards<'a>,
    pub(super) map: ShardMap,
    pub(super) now_ms: i64,
    effects: Vec<Effect>,
}

/// A buffer for one request's effects, allocated and asked into cache for writing before the
/// request takes its locks: its lines are most likely not in cache (the journal holds the last
/// requests' buffers), and the lock releases would otherwise wait for the stores to them.
pub(crate) fn effects_buffer() -> Vec<Effect> {
    let effects = Vec::with_capacity(EXPECTED_EFFECTS);
    prefetch_bytes_for_write(effects.as_ptr(), EXPECTED_EFFECTS * std::mem::size_of::<Effect>());
    effects
}

impl<'l, 'a> Tx<'l, 'a> {
    pub fn new(shards: &'l mut LockedShards<'a>, map: ShardMap, now_ms: i64) -> Tx<'l, 'a> {
        Tx::with_buffer(shards, map, now_ms, Vec::with_capacity(EXPECTED_EFFECTS))
    }

    /// A transaction that writes its effects into `effects` (empty; see [`effects_buffer`]).
    pub fn with_buffer(
        shards: &'l mut LockedShards<'a>,
        map: ShardMap,
        now_ms: i64,
        effects: Vec<Effect>,
    ) -> Tx<'l, 'a> {
        debug_assert!(effects.is_empty());
        Tx { shards, map, now_ms, effects }
    }

    /// Undoes every effect emitted so far, newest first.
    pub fn rollback(&mut self) {
        while let Some(effect) = self.effects.pop() {
            effect::revert(self.shards, self.map, &effect);
        }
    }

    pub fn into_effects(self) -> Vec<Effect> {
        self.effects
    }

    #[inline]
    pub(super) fn emit(&mut self, effect: Effect) {
        effect::apply(self.shards, self.map, &effect);
        self.effects.push(effect);
    }

    #[expect(
        clippy::unnecessary_lazy_evaluations,
        reason = "EngineError has drop glue: an eager refusal is built and dropped on every success"
    )]
    pub(super) fn account(&mut self, account: &UserAccount) -> Result<&AccountState, EngineError> {
        self.shards
            .get(self.map.of_user(account.user_id))
            .users
            .get(&account.user_id)
            .and_then(|user| user.account(account.domain, account.asset))
            .ok_or_else(|| EngineError::UnknownAccount { account: AccountRef::User(*account) })
    }

    /// The reservation, active or closed (and still remembered).
    pub(super) fn reservation(&mut self, user_id: Uuid, reservation_id: Uuid) -> Option<Reservation> {
        self.shards.get(self.map.of_user(user_id)).reservation(user_id, reservation_id).copied()
    }

    fn system_minor(&mut self, account: SystemAccount, shard: u32) -> i128 {
        self.shards.get(shard).system_minor[account.kind.index()][account.asset.index()]
    }

    pub(super) fn slot(&self, account: AccountRef, system_shard: u32) -> Slot {
        match account {
            AccountRef::User(account) => Slot::User(account),
            AccountRef::System(account) => Slot::System { account, shard: system_shard },
        }
    }

    pub(super) fn system_slot(&self, kind: SystemKind, account: &UserAccount) -> Slot {
        Slot::System { account: SystemAccount { kind, asset: account.asset }, shard: self.map.of_user(account.user_id) }
    }

    /// Checks that `amount_minor` may leave `account` now as an outflow, and counts it against
    /// the account's limits.
    fn take_outflow(&mut self, account: &UserAccount, amount_minor: i128) -> Result<(), EngineError> {
        let now_ms = self.now_ms;
        let state = self.account(account)?;
        if state.config.frozen {
            return Err(EngineError::AccountFrozen { account: *account });
        }
        funds_suffice(state, account, amount_minor)?;
        let limits = &state.config.limits;
        if limits.per_transaction_minor.is_none() && limits.daily_minor.is_none() && limits.monthly_minor.is_none() {
            return Ok(());
        }
        let before = state.usage;
        let after =
            before.after_outflow(limits, now_ms, amount_minor).map_err(|breach| EngineError::LimitExceeded {
                account: *account,
                limit: breach.limit,
                limit_minor: breach.limit_minor,
                used_minor: breach.used_minor,
                requested_minor: amount_minor,
            })?;
        if after != before {
            self.emit(Effect::UsageChanged { account: *account, before, after });
        }
        Ok(())
    }

    /// Gives `amount_minor`, counted as outflow at `counted_at_ms`, back to the account's limits.
    pub(super) fn refund_outflow(
        &mut self,
        account: &UserAccount,
        counted_at_ms: i64,
        amount_minor: i128,
    ) -> Result<(), EngineError> {
        let state = self.account(account)?;
        let before = state.usage;
        let after = before.after_refund(&state.config.limits, counted_at_ms, amount_minor);
        if after != before {
            self.emit(Effect::UsageChanged { account: *account, before, after });
        }
        Ok(())
    }

    /// Checks that `slot` can receive `amount_minor` without passing the maximum balance. A user
    /// account is bounded on its total, so a later release (reserved -> available) stays in range.
    pub(super) fn check_credit(&mut self, slot: Slot, amount_minor: i128) -> Result<(), EngineError> {
        let (balance_minor, bound_minor, account) = match slot {
            Slot::User(account) => {
                (self.account(&account)?.balance.total_minor(), MAX_AMOUNT_MINOR, AccountRef::User(account))
            }
            Slot::System { account, shard } => {
                (self.system_minor(account, shard), self.map.system_bound_minor(), AccountRef::System(account))
            }
        };
        if balance_minor + amount_minor > bound_minor {
            return Err(EngineError::BalanceOverflow { account });
        }
        Ok(())
    }

    /// Moves `amount_minor` from `from` to `to`. A user source must have the funds and pass its
    /// limits; a system source only has to stay within the maximum magnitude.
    pub(super) fn post(&mut self, from: Slot, to: Slot, amount_minor: i128) -> Result<(), EngineError> {
        self.post_as(from, to, amount_minor, Debit::Spend)
    }

    /// Moves back `amount_minor` that a completed transaction moved from `to` to `from` (its
    /// compensation). A user source must still have the funds, but giving money back is not the
    /// user spending: a frozen account gives it back too (a disputed account is often frozen),
    /// and the amount neither meets nor uses up the account's outflow limits.
    pub(super) fn post_reversal(&mut self, from: Slot, to: Slot, amount_minor: i128) -> Result<(), EngineError> {
        self.post_as(from, to, amount_minor, Debit::Reversal)
    }

    fn post_as(&mut self, from: Slot, to: Slot, amount_minor: i128, debit: Debit) -> Result<(), EngineError> {
        if from == to {
            return Err(EngineError::SameAccount);
        }
        // The destination first: a transfer to an account that does not exist must say so, not
        // that the source lacks funds (the refusal is kept under the key, so a misleading one
        // would be repeated to every retry).
        self.check_credit(to, amount_minor)?;
        match from {
            Slot::User(account) => match debit {
                Debit::Spend => self.take_outflow(&account, amount_minor)?,
                Debit::Reversal => funds_suffice(self.account(&account)?, &account, amount_minor)?,
            },
            Slot::System { account, shard } => {
                if self.system_minor(account, shard) - amount_minor < -self.map.system_bound_minor() {
                    return Err(EngineError::BalanceOverflow { account: AccountRef::System(account) });
                }
            }
        }
        self.emit(Effect::Posting { from, to, amount_minor });
        Ok(())
    }
}

/// Whether `account` (its `state`) has `amount_minor` available, its overdraft included.
fn funds_suffice(state: &AccountState, account: &UserAccount, amount_minor: i128) -> Result<(), EngineError> {
    if state.balance.available_minor - amount_minor < -state.config.overdraft_minor {
        return Err(EngineError::InsufficientFunds {
            account: AccountRef::User(*account),
            available_minor: state.balance.available_minor,
            overdraft_minor: state.config.overdraft_minor,
            requested_minor: amount_minor,
        });
    }
    Ok(())
}

/// Why money leaves a user account, which decides the checks it meets (see `Tx::post_as`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Debit {
    /// The user spends: frozen, funds and outflow limits.
    Spend,
    /// A completed transaction is undone: funds only.
    Reversal,
}

/// Applies `operation` inside `tx`. On `Err` the caller must roll `tx` back.
pub(crate) fn run(tx: &mut Tx<'_, '_>, operation: &Operation) -> Result<Receipt, EngineError> {
    match operation {
        Operation::OpenAccount { account, config } => open_account(tx, account, config),
        Operation::SetFrozen { account, frozen } => {
            let state = tx.account(account)?;
            if state.config.frozen != *frozen {
                tx.emit(Effect::FrozenChanged { account: *account, frozen: *frozen });
            }
            Ok(Receipt::Done)
        }
        Operation::Deposit { account, amount, provider } => {
            let clearing = tx.system_slot(SystemKind::ProviderClearing(*provider), account);
            tx.post(clearing, Slot::User(*account), amount.minor())?;
            Ok(Receipt::Done)
        }
        Operation::Withdraw { account, amount, provider } => {
            let clearing = tx.system_slot(SystemKind::ProviderClearing(*provider), account);
            tx.post(Slot::User(*account), clearing, amount.minor())?;
            Ok(Receipt::Done)
        }
        Operation::Reserve { reservation_id, account, amount, ttl_ms } => {
            reserve(tx, ReservationHolder::Caller, *reservation_id, account, *amount, *ttl_ms)
        }
        Operation::Commit { user_id, reservation_id, destination, amount } => {
            commit(tx, *user_id, *reservation_id, *destination, *amount)
        }
        Operation::Release { user_id, reservation_id } => release(tx, *user_id, *reservation_id),
        Operation::Transfer { from, to, amount } => {
            if from.asset() != to.asset() {
                return Err(EngineError::AssetMismatch { left: from.asset(), right: to.asset() });
            }
            let shard = system_shard(tx.map, *from, *to);
            let (from, to) = (tx.slot(*from, shard), tx.slot(*to, shard));
            tx.post(from, to, amount.minor())?;
            Ok(Receipt::Done)
        }
        Operation::Convert { from, to, amount, price, commission_bps } => {
            convert(tx, from, to, *amount, *price, *commission_bps)
        }
        Operation::InitiateTransaction { transaction } => lifecycle::initiate(tx, transaction),
        Operation::TransitionTransaction {
            user_id,
            transaction_id,
            to,
            reason,
            provider_event,
            fill,
            payee_user_id,
        } => {
            let change =
                lifecycle::Change { to: *to, reason, provider_event: provider_event.as_ref(), fill: fill.as_ref() };
            lifecycle::transition(tx, *user_id, *transaction_id, *payee_user_id, change)
        }
        Operation::SetCompliance { user_id, record } => lifecycle::set_compliance(tx, *user_id, *record),
        Operation::SetKyc { user_id, kyc, risk } => lifecycle::set_kyc(tx, *user_id, *kyc, *risk),
        Operation::LinkedBatch { operations } => {
            if operations.is_empty() || operations.len() > MAX_BATCH_OPERATIONS {
                return Err(EngineError::BatchSize { max: MAX_BATCH_OPERATIONS });
            }
            let mut receipts = Vec::with_capacity(operations.len());
            for (index, operation) in operations.iter().enumerate() {
                let result = match operation {
                    Operation::LinkedBatch { .. } => Err(EngineError::NestedBatch),
                    operation => run(tx, operation),
                };
                match result {
                    Ok(receipt) => receipts.push(receipt),
                    Err(cause) => return Err(EngineError::BatchOperationFailed { index, cause: Box::new(cause) }),
                }
            }
            Ok(Receipt::Batch { receipts })
        }
    }
}

fn open_account(tx: &mut Tx<'_, '_>, account: &UserAccount, config: &AccountConfig) -> Result<Receipt, EngineError> {
    let limits = &config.limits;
    // A limit of zero is refused, as the API refuses it: "nothing may leave" is the frozen flag,
    // and an absent limit, not zero, is "no cap".
    let reason = if !(0..=MAX_AMOUNT_MINOR).contains(&config.overdraft_minor) {
        Some("overdraft must be between 0 and the maximum amount")
    } else if [limits.per_transaction_minor, limits.daily_minor, limits.monthly_minor]
        .into_iter()
        .flatten()
        .any(|limit| !(1..=MAX_AMOUNT_MINOR).contains(&limit))
    {
        Some("limits must be positive and at most the maximum amount")
    } else {
        None
    };
    if let Some(reason) = reason {
        return Err(EngineError::InvalidAccountConfig { reason: reason.to_owned() });
    }
    if tx.account(account).is_ok() {
        return Err(EngineError::AccountAlreadyExists { account: *account });
    }
    tx.emit(Effect::AccountOpened { account: *account, config: *config });
    Ok(Receipt::Done)
}

/// Who opens a reservation: a caller's Reserve, or a transaction for itself (under its own id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ReservationHolder {
    Caller,
    Transaction,
}

/// A reservation id of a user as the reservation rules see it, from one lookup of the user: the
/// rules ask several questions of it, and each lookup of a user costs a hash and a probe.
struct ReservationView<'s> {
    user_id: Uuid,
    reservation_id: Uuid,
    user: Option<&'s UserState>,
    /// The reservation, active or closed (and still remembered).
    reservation: Option<&'s Reservation>,
}

impl<'s> ReservationView<'s> {
    fn of(tx: &'s mut Tx<'_, '_>, user_id: Uuid, reservation_id: Uuid) -> ReservationView<'s> {
        let shard: &'s Shard = tx.shards.get(tx.map.of_user(user_id));
        let user = shard.users.get(&user_id);
        ReservationView {
            user_id,
            reservation_id,
            user,
            reservation: shard.reservation_of(user, user_id, reservation_id),
        }
    }

    /// The user's Active reservations.
    fn active_reservations(&self) -> usize {
        self.user.map_or(0, |user| user.reservations.len())
    }

    /// A transaction's reservation moves only with the transaction: the plain reservation
    /// operations may neither take its id nor commit or release it.
    fn refuse_if_transaction(&self) -> Result<(), EngineError> {
        match self.user.is_some_and(|user| user.transactions.contains_key(&self.reservation_id)) {
            true => Err(EngineError::ReservationHeldByTransaction { reservation_id: self.reservation_id }),
            false => Ok(()),
        }
    }

    #[expect(
        clippy::unnecessary_lazy_evaluations,
        reason = "EngineError has drop glue: an eager refusal is built and dropped on every success"
    )]
    fn account(&self, account: &UserAccount) -> Result<&'s AccountState, EngineError> {
        self.user
            .and_then(|user| user.account(account.domain, account.asset))
            .ok_or_else(|| EngineError::UnknownAccount { account: AccountRef::User(*account) })
    }

    /// The reservation, if it is Active.
    #[expect(
        clippy::unnecessary_lazy_evaluations,
        reason = "EngineError has drop glue: an eager refusal is built and dropped on every success"
    )]
    fn active(&self) -> Result<Reservation, EngineError> {
        let (user_id, reservation_id) = (self.user_id, self.reservation_id);
        let reservation =
            *self.reservation.ok_or_else(|| EngineError::ReservationNotFound { user_id, reservation_id })?;
        if reservation.status != ReservationStatus::Active {
            return Err(EngineError::ReservationNotActive { reservation_id, status: reservation.status });
        }
        Ok(reservation)
    }
}

#[expect(
    clippy::unnecessary_lazy_evaluations,
    reason = "EngineError has drop glue: an eager refusal is built and dropped on every success"
)]
pub(super) fn reserve(
    tx: &mut Tx<'_, '_>,
    holder: ReservationHolder,
    reservation_id: Uuid,
    account: &UserAccount,
    amount: Amount,
    ttl_ms: Option<i64>,
) -> Result<Receipt, EngineError> {
    let now_ms = tx.now_ms;
    let view = ReservationView::of(tx, account.user_id, reservation_id);
    if holder == ReservationHolder::Caller {
        view.refuse_if_transaction()?;
    }
    let ttl_ms = ttl_ms.unwrap_or(DEFAULT_RESERVATION_TTL_MS);
    let expires_at_ms = Some(ttl_ms)
        .filter(|ttl_ms| (1..=MAX_RESERVATION_TTL_MS).contains(ttl_ms))
        .and_then(|ttl_ms| now_ms.checked_add(ttl_ms))
        .ok_or_else(|| EngineError::ReservationTtlOutOfRange { max_ttl_ms: MAX_RESERVATION_TTL_MS })?;
    let reserved_minor = view.account(account)?.balance.reserved_minor;
    if view.reservation.is_some() {
        return Err(EngineError::ReservationAlreadyExists { user_id: account.user_id, reservation_id });
    }
    if view.active_reservations() >= MAX_ACTIVE_RESERVATIONS_PER_USER {
        return Err(EngineError::TooManyActiveReservations {
            user_id: account.user_id,
            max: MAX_ACTIVE_RESERVATIONS_PER_USER,
        });
    }
    if reserved_minor + amount.minor() > MAX_AMOUNT_MINOR {
        return Err(EngineError::BalanceOverflow { account: AccountRef::User(*account) });
    }
    tx.take_outflow(account, amount.minor())?;
    tx.emit(Effect::ReservationOpened {
        reservation: Reservation {
            id: reservation_id,
            account: *account,
            amount_minor: amount.minor(),
            created_at_ms: tx.now_ms,
            expires_at_ms,
            status: ReservationStatus::Active,
            closed_at_ms: None,
        },
    });
    Ok(Receipt::Reserved { expires_at_ms })
}

/// The reservation `reservation_id` of `user_id`, if it is Active.
pub(super) fn active_reservation(
    tx: &mut Tx<'_, '_>,
    user_id: Uuid,
    reservation_id: Uuid,
) -> Result<Reservation, EngineError> {
    ReservationView::of(tx, user_id, reservation_id).active()
}

fn commit(
    tx: &mut Tx<'_, '_>,
    user_id: Uuid,
    reservation_id: Uuid,
    destination: AccountRef,
    amount: Option<Amount>,
) -> Result<Receipt, EngineError> {
    let now_ms = tx.now_ms;
    let view = ReservationView::of(tx, user_id, reservation_id);
    view.refuse_if_transaction()?;
    let reservation = view.active()?;
    if now_ms >= reservation.expires_at_ms {
        return Err(EngineError::ReservationExpired { reservation_id, expires_at_ms: reservation.expires_at_ms });
    }
    let source = reservation.account;
    let source_frozen = view.account(&source)?.config.frozen;
    // The destination's asset before the amount: an amount is in minor units of the
    // destination's asset (the edge parses it at that scale), so against a reservation in
    // another asset it means nothing, and its refusal would name the wrong fault.
    if destination.asset() != source.asset {
        return Err(EngineError::AssetMismatch { left: source.asset, right: destination.asset() });
    }
    if destination == AccountRef::User(source) {
        return Err(EngineError::SameAccount);
    }
    let committed_minor = amount.map_or(reservation.amount_minor, Amount::minor);
    if committed_minor > reservation.amount_minor {
        return Err(EngineError::CommitExceedsReservation {
            reserved_minor: reservation.amount_minor,
            requested_minor: committed_minor,
        });
    }
    let to = tx.slot(destination, tx.map.of_user(user_id));
    tx.check_credit(to, committed_minor)?;
    if source_frozen {
        return Err(EngineError::AccountFrozen { account: source });
    }
    tx.emit(Effect::ReservationClosed {
        user_id,
        reservation_id,
        status: ReservationStatus::Completed,
        closed_at_ms: tx.now_ms,
    });
    // The funds were checked and counted against the limits when reserved, so they move
    // without a second funds or limit check.
    tx.emit(Effect::Posting { from: Slot::User(source), to, amount_minor: committed_minor });
    let released_minor = reservation.amount_minor - committed_minor;
    if released_minor > 0 {
        tx.refund_outflow(&source, reservation.created_at_ms, released_minor)?;
    }
    Ok(Receipt::Committed { committed_minor, released_minor })
}

fn release(tx: &mut Tx<'_, '_>, user_id: Uuid, reservation_id: Uuid) -> Result<Receipt, EngineError> {
    let view = ReservationView::of(tx, user_id, reservation_id);
    view.refuse_if_transaction()?;
    let reservation = view.active()?;
    close_and_refund(tx, &reservation, ReservationStatus::Released)?;
    Ok(Receipt::Released { released_minor: reservation.amount_minor })
}

/// Ends an Active reservation as Released or Expired: all of it returns to available.
pub(crate) fn close_and_refund(
    tx: &mut Tx<'_, '_>,
    reservation: &Reservation,
    status: ReservationStatus,
) -> Result<(), EngineError> {
    debug_assert!(matches!(status, ReservationStatus::Released | ReservationStatus::Expired));
    tx.emit(Effect::ReservationClosed {
        user_id: reservation.account.user_id,
        reservation_id: reservation.id,
        status,
        closed_at_ms: tx.now_ms,
    });
    tx.refund_outflow(&reservation.account, reservation.created_at_ms, reservation.amount_minor)
}

fn convert(
    tx: &mut Tx<'_, '_>,
    from: &UserAccount,
    to: &UserAccount,
    amount: Amount,
    price: Decimal,
    commission_bps: u32,
) -> Result<Receipt, EngineError> {
    if from.asset == to.asset {
        return Err(EngineError::SameAsset);
    }
    if price <= Decimal::ZERO {
        return Err(EngineError::InvalidPrice);
    }
    if commission_bps > MAX_COMMISSION_BPS {
        return Err(EngineError::CommissionOutOfRange { max_bps: MAX_COMMISSION_BPS });
    }
    let bought_minor = proceeds_minor(amount.minor(), from.asset.scale(), to.asset.scale(), price)
        .ok_or(EngineError::ConversionOverflow)?;
    // Rounded up, in the platform's favour as the proceeds are: rounded down, a conversion split
    // into small enough pieces paid no commission at all (30 bps of 300 cents is 0.9 cents).
    let whole_bps = i128::from(MAX_COMMISSION_BPS);
    debug_assert!((0..=MAX_AMOUNT_MINOR).contains(&bought_minor), "proceeds are within the maximum");
    let commission_minor = (bought_minor * i128::from(commission_bps) + whole_bps - 1) / whole_bps;
    let net_minor = bought_minor - commission_minor;
    if net_minor <= 0 {
        return Err(EngineError::ConversionTooSmall);
    }
    // Both accounts before the funds (see `Tx::post_as`): the receiving one is posted to last.
    tx.account(from)?;
    tx.account(to)?;
    let sell_side = tx.system_slot(SystemKind::ExchangeLiquidity, from);
    let buy_side = tx.system_slot(SystemKind::ExchangeLiquidity, to);
    tx.post(Slot::User(*from), sell_side, amount.minor())?;
    tx.post(buy_side, Slot::User(*to), net_minor)?;
    if commission_minor > 0 {
        let revenue = tx.system_slot(SystemKind::FeeRevenue(FeeTier::Platform), to);
        tx.post(buy_side, revenue, commission_minor)?;
    }
    Ok(Receipt::Converted { sold_minor: amount.minor(), bought_minor: net_minor, commission_minor })
}

/// `amount_minor` of an asset with `from_scale` decimals, times `price`, in minor units of an
/// asset with `to_scale` decimals, rounded toward zero (the platform never pays out a fraction
/// it does not have). `None` if the result passes the maximum amount. The product is taken in
/// 256 bits: an amount near the maximum (~2^93) times a price mantissa (< 2^96) fits with room.
pub(crate) fn proceeds_minor(amount_minor: i128, from_scale: u32, to_scale: u32, price: Decimal) -> Option<i128> {
    let amount = U256::from(u128::try_from(amount_minor).ok()?);
    let mantissa = U256::from(u128::try_from(price.mantissa()).ok()?);
    let product = amount.checked_mul(mantissa)?;
    let exponent = i64::from(to_scale) - i64::from(price.scale()) - i64::from(from_scale);
    let value = if exponent >= 0 {
        product.checked_mul(U256::from(10_u32).checked_pow(u32::try_from(exponent).ok()?)?)?
    } else {
        match U256::from(10_u32).checked_pow(u32::try_from(-exponent).ok()?) {
            Some(divisor) => product / divisor,
            // 10^78 is more than any 256-bit product: the quotient is zero.
            None => U256::ZERO,
        }
    };
    i128::try_from(value).ok().filter(|value| *value <= MAX_AMOUNT_MINOR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proceeds_are_exact_and_round_toward_zero() {
        // 1.5 BTC at 60 000.25 USD/BTC = 90 000.375 USD -> 90 000.37 USD.
        let price = Decimal::new(6_000_025, 2);
        assert_eq!(proceeds_minor(150_000_000, 8, 2, price), Some(9_000_037));
        // 100 USD at 0.000016 BTC/USD = 0.0016 BTC.
        assert_eq!(proceeds_minor(10_000, 2, 8, Decimal::new(16, 6)), Some(160_000));
        // 1 wei at 3500 USD/ETH is nothing in cents.
        assert_eq!(proceeds_minor(1, 18, 2, Decimal::new(3_500, 0)), Some(0));
        // Past the maximum.
        assert_eq!(proceeds_minor(MAX_AMOUNT_MINOR, 2, 18, Decimal::new(1_000, 0)), None);
        // A price with 18 decimals (found in review): 0.1 ETH at 3500.000000000000000000 USD/ETH
        // is 350.00 USD; the 128-bit product of amount and mantissa would overflow.
        let precise_price: Decimal = "3500.000000000000000000".parse().unwrap();
        assert_eq!(proceeds_minor(100_000_000_000_000_000, 18, 2, precise_price), Some(35_000));
        // A 28-significant-digit rate, as Decimal division produces, against a large amount.
        let rate: Decimal = "0.0000285714285714285714285714".parse().unwrap();
        // 10^10 USD at that rate is 285,714.28571428|57... BTC.
        assert_eq!(proceeds_minor(1_000_000_000_000, 2, 8, rate), Some(28_571_428_571_428));
    }
}
