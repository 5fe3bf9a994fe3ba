//! Effects: the smallest state changes, and the only way engine state ever changes.
//!
//! An operation first checks everything it can, then emits effects one by one; each is
//! applied at once so later checks (and later operations of a linked batch) see it. If a
//! later check fails, the effects emitted so far are reverted in reverse order. The effects
//! of an applied operation are what the journal records: replaying them in sequence order
//! into an empty engine rebuilds the same state without re-running any business rule.
//!
//! Applying an effect cannot fail; the checks that make it safe happened before it was
//! emitted. `debug_assert!`s here catch an engine bug that would break an invariant.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::account::{AccountConfig, Domain, SystemAccount, UserAccount};
use super::id_hash::IdHashState;
use super::limits::OutflowUsage;
use super::money::MAX_AMOUNT_MINOR;
use super::reservation::{Reservation, ReservationStatus};
use super::shard::{AccountState, LockedShards, ShardMap, UserState};
use super::transaction::{AmlResult, ComplianceRecord, FeeLine, Fill, ProviderRef, Transaction, TxStatus, TxType};

/// A balance a posting touches: a user account, or one shard's sub-account of a system account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Slot {
    User(UserAccount),
    System { account: SystemAccount, shard: u32 },
}

impl Slot {
    pub fn asset(self) -> super::asset::Asset {
        match self {
            Slot::User(account) => account.asset,
            Slot::System { account, .. } => account.asset,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "effect", content = "data", rename_all = "snake_case")]
pub enum Effect {
    AccountOpened {
        account: UserAccount,
        config: AccountConfig,
    },
    FrozenChanged {
        account: UserAccount,
        frozen: bool,
    },
    /// `amount_minor` leaves `from`'s available balance and arrives in `to`'s.
    Posting {
        from: Slot,
        to: Slot,
        amount_minor: i128,
    },
    /// Available -> reserved on the reservation's account, and the reservation becomes Active.
    ReservationOpened {
        reservation: Reservation,
    },
    /// Reserved -> available for the whole reservation, which becomes `status` (final).
    ReservationClosed {
        user_id: Uuid,
        reservation_id: Uuid,
        status: ReservationStatus,
        closed_at_ms: i64,
    },
    /// The account's outflow counters moved from `before` to `after`.
    UsageChanged {
        account: UserAccount,
        before: OutflowUsage,
        after: OutflowUsage,
    },
    /// A business transaction was recorded, in status Initiated.
    TransactionCreated {
        transaction: Box<Transaction>,
    },
    /// A transaction changed status; the postings it implies are separate `Posting` effects of
    /// the same record. Self-contained, so an outbox can publish it as it is.
    TransactionStatusChanged {
        change: Box<StatusChange>,
    },
    /// A user's compliance record was set (`before` is kept so the change can be undone).
    ComplianceSet {
        user_id: Uuid,
        before: Option<ComplianceRecord>,
        after: ComplianceRecord,
    },
}

/// One status change of a transaction, with everything a "transaction status changed" or
/// "fee posted" event needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusChange {
    pub user_id: Uuid,
    pub transaction_id: Uuid,
    pub kind: TxType,
    pub domain: Domain,
    pub from: TxStatus,
    pub to: TxStatus,
    pub reason: String,
    pub at_ms: i64,
    /// The transaction's `updated_at_ms` before this change (to undo it).
    pub previous_updated_at_ms: i64,
    pub provider_event: Option<ProviderRef>,
    /// The compliance verdict, when this change leaves Validating.
    pub aml: Option<AmlResult>,
    /// The trade's execution, when this change completes a trade.
    pub fill: Option<Fill>,
    /// Fees that went to fee revenue with this change (Completed), or came back from it
    /// (Compensated): each is a `Posting` of the same record too.
    pub fees_posted: Vec<FeeLine>,
}

impl Effect {
    /// The shard every part of this effect lives in, so a replay can lock what it needs.
    pub(crate) fn shards(&self, map: ShardMap) -> [Option<u32>; 2] {
        let slot_shard = |slot: &Slot| match slot {
            Slot::User(account) => map.of_user(account.user_id),
            Slot::System { shard, .. } => map.reduce(*shard),
        };
        match self {
            Effect::AccountOpened { account, .. }
            | Effect::FrozenChanged { account, .. }
            | Effect::UsageChanged { account, .. } => [Some(map.of_user(account.user_id)), None],
            Effect::Posting { from, to, .. } => [Some(slot_shard(from)), Some(slot_shard(to))],
            Effect::ReservationOpened { reservation } => [Some(map.of_user(reservation.account.user_id)), None],
            Effect::ReservationClosed { user_id, .. } | Effect::ComplianceSet { user_id, .. } => {
                [Some(map.of_user(*user_id)), None]
            }
            Effect::TransactionCreated { transaction } => [Some(map.of_user(transaction.spec.user_id)), None],
            Effect::TransactionStatusChanged { change } => [Some(map.of_user(change.user_id)), None],
        }
    }
}

fn account_mut<'s>(shards: &'s mut LockedShards<'_>, map: ShardMap, account: &UserAccount) -> &'s mut AccountState {
    shards
        .get(map.of_user(account.user_id))
        .users
        .get_mut(&account.user_id)
        .and_then(|user| user.account_mut(account.domain, account.asset))
        .unwrap_or_else(|| panic!("effect on an account that does not exist: {account:?}"))
}

fn add_available(shards: &mut LockedShards<'_>, map: ShardMap, slot: &Slot, delta_minor: i128) {
    match slot {
        Slot::User(account) => {
            let state = account_mut(shards, map, account);
            state.balance.available_minor += delta_minor;
            debug_assert!(state.balance.available_minor.abs() <= MAX_AMOUNT_MINOR);
        }
        Slot::System { account, shard } => {
            let sub_account =
                &mut shards.get(map.reduce(*shard)).system_minor[account.kind.index()][account.asset.index()];
            *sub_account += delta_minor;
            debug_assert!(sub_account.abs() <= map.system_bound_minor());
        }
    }
}

/// The user a reservation effect applies to, found once for both its account and its map.
fn reservation_user<'u>(users: &'u mut HashMap<Uuid, UserState, IdHashState>, user_id: &Uuid) -> &'u mut UserState {
    users.get_mut(user_id).unwrap_or_else(|| panic!("reservation effect on a user that does not exist: {user_id}"))
}

/// Moves a reservation's amount between reserved and available on its account, of `user`
/// (`sign` +1 reserves, -1 unreserves).
fn shift_reserved(user: &mut UserState, reservation: &Reservation, sign: i128) {
    let account = &reservation.account;
    let state = user
        .account_mut(account.domain, account.asset)
        .unwrap_or_else(|| panic!("reservation on an account that does not exist: {account:?}"));
    state.balance.available_minor -= sign * reservation.amount_minor;
    state.balance.reserved_minor += sign * reservation.amount_minor;
    debug_assert!(state.balance.reserved_minor >= 0);
}

/// Applies `effect`. Its checks were made when it was emitted (or it comes from the journal).
pub(crate) fn apply(shards: &mut LockedShards<'_>, map: ShardMap, effect: &Effect) {
    match effect {
        Effect::AccountOpened { account, config } => {
            let user = shards.get(map.of_user(account.user_id)).users.entry(account.user_id).or_default();
            debug_assert!(user.account(account.domain, account.asset).is_none());
            user.accounts.push(AccountState {
                domain: account.domain,
                asset: account.asset,
                config: *config,
                balance: Default::default(),
                usage: Default::default(),
            });
        }
        Effect::FrozenChanged { account, frozen } => {
            account_mut(shards, map, account).config.frozen = *frozen;
        }
        Effect::Posting { from, to, amount_minor } => {
            debug_assert!(*amount_minor > 0);
            add_available(shards, map, from, -amount_minor);
            add_available(shards, map, to, *amount_minor);
        }
        Effect::ReservationOpened { reservation } => {
            debug_assert_eq!(reservation.status, ReservationStatus::Active);
            let user_id = reservation.account.user_id;
            let shard = shards.get(map.of_user(user_id));
            shard.expiry.insert(reservation.expires_at_ms, user_id, reservation.id);
            // The rules refuse a remembered id, and a replay forgets a reused one first.
            debug_assert!(shard.closed_reservations().get(user_id, reservation.id).is_none());
            let user = reservation_user(&mut shard.users, &user_id);
            shift_reserved(user, reservation, 1);
            let previous = user.reservations.insert(reservation.id, *reservation);
            debug_assert!(previous.is_none(), "an active reservation was opened again");
        }
        Effect::ReservationClosed { user_id, reservation_id, status, closed_at_ms } => {
            let shard = shards.get(map.of_user(*user_id));
            let user = reservation_user(&mut shard.users, user_id);
            let mut reservation = user
                .reservations
                .remove(reservation_id)
                .unwrap_or_else(|| panic!("closing a reservation that is not active: {reservation_id}"));
            shift_reserved(user, &reservation, -1);
            debug_assert!(reservation.status.can_become(*status));
            reservation.status = *status;
            reservation.closed_at_ms = Some(*closed_at_ms);
            let expiring = shard.expiry.remove(reservation.expires_at_ms, *user_id, *reservation_id);
            debug_assert!(
                expiring || held_at_provider(user, *reservation_id),
                "an active reservation was neither in the expiry index nor held at a provider"
            );
            shards.closed_reservations_mut(map.of_user(*user_id)).insert(reservation);
        }
        Effect::UsageChanged { account, after, .. } => {
            account_mut(shards, map, account).usage = *after;
        }
        Effect::TransactionCreated { transaction } => {
            let user_id = transaction.spec.user_id;
            let user = shards.get(map.of_user(user_id)).users.entry(user_id).or_default();
            let previous = user.transactions.insert(transaction.spec.id, (**transaction).clone());
            // The rules refuse a remembered id, and a replay that meets a reused one forgets the
            // first transaction before (`Engine::apply_record`).
            debug_assert!(previous.is_none(), "a transaction was created twice");
            let replaced = previous.as_ref().map_or(0, |previous| unfinished(previous.status));
            recount(&mut user.unfinished_transactions, unfinished(transaction.status), replaced);
        }
        Effect::TransactionStatusChanged { change } => {
            let (transaction, unfinished_transactions) =
                transaction_mut(shards, map, change.user_id, change.transaction_id);
            debug_assert_eq!(transaction.status, change.from);
            transaction.status = change.to;
            transaction.updated_at_ms = change.at_ms;
            if let Some(aml) = &change.aml {
                transaction.aml = Some(aml.clone());
            }
            if let Some(fill) = &change.fill {
                transaction.fill = Some(fill.clone());
            }
            // Finishing takes one off; a compensation reopens a completed transaction and adds one.
            recount(unfinished_transactions, unfinished(change.to), unfinished(change.from));
            if change.to.is_finished() {
                shards.get(map.of_user(change.user_id)).finished.push_back((
                    change.at_ms,
                    change.user_id,
                    change.transaction_id,
                ));
            }
            if change.hands_to_provider() {
                hold_at_provider(shards, map, change, true);
            }
        }
        Effect::ComplianceSet { user_id, after, .. } => {
            shards.get(map.of_user(*user_id)).users.entry(*user_id).or_default().compliance = Some(*after);
        }
    }
}

/// Whether `reservation_id` is the reservation of a transaction of `user` that is with its
/// provider, which keeps the reservation out of the expiry index (`hold_at_provider`).
pub(crate) fn held_at_provider(user: &UserState, reservation_id: Uuid) -> bool {
    user.transactions.get(&reservation_id).is_some_and(|transaction| transaction.status.is_with_provider())
}

impl StatusChange {
    /// Whether this change hands the transaction to its provider (see `hold_at_provider`).
    fn hands_to_provider(&self) -> bool {
        self.to.is_with_provider() && !self.from.is_with_provider()
    }
}

/// The transaction of `change` has just been handed to its provider (`held`), or that change is
/// being undone. A held reservation leaves the expiry index, so no sweep releases funds the
/// provider may be paying out; it stays Active until completion closes it or a failure releases
/// it. The index is derived state, kept the same way in a replay (this effect) and a rebuild
/// from a snapshot (`Engine::without_keys`).
fn hold_at_provider(shards: &mut LockedShards<'_>, map: ShardMap, change: &StatusChange, held: bool) {
    let shard = shards.get(map.of_user(change.user_id));
    let reservation =
        shard.users.get(&change.user_id).and_then(|user| user.reservations.get(&change.transaction_id)).copied();
    if let Some(reservation) = reservation {
        let (expires_at_ms, user_id, reservation_id) =
            (reservation.expires_at_ms, change.user_id, change.transaction_id);
        if held {
            let removed = shard.expiry.remove(expires_at_ms, user_id, reservation_id);
            debug_assert!(removed, "an active reservation was not in the expiry index");
        } else {
            shard.expiry.insert(expires_at_ms, user_id, reservation_id);
        }
    }
}

/// 1 for a status a transaction is unfinished in, for counting them.
fn unfinished(status: TxStatus) -> usize {
    usize::from(!status.is_finished())
}

/// Adds `added` to a count of unfinished transactions and takes `removed` off. A count that would
/// go below zero has drifted from the transactions it counts: a bug, which must stop the engine
/// (the panic aborts under the shard locks, and a restart counts afresh) rather than wrap in a
/// release build and refuse the user's transactions for good.
fn recount(count: &mut usize, added: usize, removed: usize) {
    *count = (*count + added)
        .checked_sub(removed)
        .unwrap_or_else(|| panic!("a count of unfinished transactions went below zero"));
}

/// The transaction an effect names, with its user's count of unfinished transactions.
fn transaction_mut<'s>(
    shards: &'s mut LockedShards<'_>,
    map: ShardMap,
    user_id: Uuid,
    transaction_id: Uuid,
) -> (&'s mut Transaction, &'s mut usize) {
    let missing = || -> ! { panic!("effect on a transaction that does not exist: {transaction_id}") };
    let UserState { transactions, unfinished_transactions, .. } =
        shards.get(map.of_user(user_id)).users.get_mut(&user_id).unwrap_or_else(|| missing());
    let transaction = transactions.get_mut(&transaction_id).unwrap_or_else(|| missing());
    (transaction, unfinished_transactions)
}

/// Undoes `effect`, which must be the most recent effect applied to the state it touches.
pub(crate) fn revert(shards: &mut LockedShards<'_>, map: ShardMap, effect: &Effect) {
    match effect {
        Effect::AccountOpened { account, .. } => {
            let shard = shards.get(map.of_user(account.user_id));
            if let Some(user) = shard.users.get_mut(&account.user_id) {
                user.accounts.retain(|state| !(state.domain == account.domain && state.asset == account.asset));
                if user.is_empty() {
                    shard.users.remove(&account.user_id);
                }
            }
        }
        Effect::FrozenChanged { account, frozen } => {
            account_mut(shards, map, account).config.frozen = !frozen;
        }
        Effect::Posting { from, to, amount_minor } => {
            add_available(shards, map, to, -amount_minor);
            add_available(shards, map, from, *amount_minor);
        }
        Effect::ReservationOpened { reservation } => {
            let shard = shards.get(map.of_user(reservation.account.user_id));
            let removed = shard.expiry.remove(reservation.expires_at_ms, reservation.account.user_id, reservation.id);
            debug_assert!(removed, "a reservation opened and not held at a provider is in the expiry index");
            let user = reservation_user(&mut shard.users, &reservation.account.user_id);
            shift_reserved(user, reservation, -1);
            user.reservations.remove(&reservation.id);
        }
        Effect::ReservationClosed { user_id, reservation_id, .. } => {
            let mut reservation = shards
                .closed_reservations_mut(map.of_user(*user_id))
                .undo_insert(*user_id, *reservation_id)
                .unwrap_or_else(|| panic!("reopening a reservation that is not closed: {reservation_id}"));
            let shard = shards.get(map.of_user(*user_id));
            reservation.status = ReservationStatus::Active;
            reservation.closed_at_ms = None;
            let user = reservation_user(&mut shard.users, user_id);
            shift_reserved(user, &reservation, 1);
            let held = held_at_provider(user, *reservation_id);
            user.reservations.insert(*reservation_id, reservation);
            if !held {
                shard.expiry.insert(reservation.expires_at_ms, *user_id, *reservation_id);
            }
        }
        Effect::UsageChanged { account, before, .. } => {
            account_mut(shards, map, account).usage = *before;
        }
        Effect::TransactionCreated { transaction } => {
            let user_id = transaction.spec.user_id;
            let shard = shards.get(map.of_user(user_id));
            if let Some(user) = shard.users.get_mut(&user_id) {
                if let Some(removed) = user.transactions.remove(&transaction.spec.id) {
                    recount(&mut user.unfinished_transactions, 0, unfinished(removed.status));
                }
                if user.is_empty() {
                    shard.users.remove(&user_id);
                }
            }
        }
        Effect::TransactionStatusChanged { change } => {
            let (transaction, unfinished_transactions) =
                transaction_mut(shards, map, change.user_id, change.transaction_id);
            transaction.status = change.from;
            transaction.updated_at_ms = change.previous_updated_at_ms;
            recount(unfinished_transactions, unfinished(change.from), unfinished(change.to));
            if change.aml.is_some() {
                transaction.aml = None;
            }
            if change.fill.is_some() {
                transaction.fill = None;
            }
            if change.to.is_finished() {
                let undone = shards.get(map.of_user(change.user_id)).finished.pop_back();
                debug_assert_eq!(undone.map(|(_, _, id)| id), Some(change.transaction_id));
            }
            if change.hands_to_provider() {
                hold_at_provider(shards, map, change, false);
            }
        }
        Effect::ComplianceSet { user_id, before, .. } => {
            let shard = shards.get(map.of_user(*user_id));
            if let Some(user) = shard.users.get_mut(user_id) {
                user.compliance = *before;
                if user.is_empty() {
                    shard.users.remove(user_id);
                }
            }
        }
    }
}
