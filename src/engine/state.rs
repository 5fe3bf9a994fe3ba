//! A consistent, comparable copy of everything the engine holds, and the invariants it must satisfy.
//!
//! `Engine::state` takes every shard lock (in order) to produce it, so it is a true point-in-time
//! view. Tests compare two states with `==` (a live engine against one rebuilt from its journal),
//! and recovery rebuilds an engine from one (`Engine::from_state`). System accounts appear as
//! their sum over shards: how a system balance is split across shards is not state anyone sees.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use uuid::Uuid;

use super::account::{AccountConfig, Balance, SystemAccount, UserAccount};
use super::asset::Asset;
use super::error::LimitKind;
use super::idempotency::{IdempotencyKey, IdempotencyRecord};
use super::limits::OutflowUsage;
use super::money::MAX_AMOUNT_MINOR;
use super::reservation::{Reservation, ReservationStatus};
use super::transaction::{ComplianceRecord, Transaction, TxStatus};

/// One user account as the outside world sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountView {
    pub account: UserAccount,
    pub config: AccountConfig,
    pub balance: Balance,
    pub usage: OutflowUsage,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct EngineState {
    /// The sequence the next change will get; every change below it has been handed to the journal.
    pub next_sequence: u64,
    pub accounts: BTreeMap<UserAccount, AccountView>,
    /// Summed over shards; accounts whose sum is zero are left out.
    pub system_minor: BTreeMap<SystemAccount, i128>,
    /// Active reservations, and closed ones the engine still remembers (at least the retention
    /// window, at most about twice it; `within_retention` compares what both must hold).
    pub reservations: BTreeMap<(Uuid, Uuid), Reservation>,
    pub idempotency: BTreeMap<IdempotencyKey, IdempotencyRecord>,
    /// Unfinished transactions, and finished ones still within the retention window, by (user, id).
    #[serde(default)]
    pub transactions: BTreeMap<(Uuid, Uuid), Transaction>,
    #[serde(default)]
    pub compliance: BTreeMap<Uuid, ComplianceRecord>,
}

/// A broken invariant: always an engine bug (or a corrupted journal), never a caller's mistake.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum InvariantViolation {
    #[error("balances of {asset} sum to {sum_minor}, not zero")]
    AssetDoesNotSumToZero { asset: Asset, sum_minor: i128 },
    #[error("{account:?} reserves {reserved_minor} but its active reservations sum to {active_minor}")]
    ReservedMismatch { account: UserAccount, reserved_minor: i128, active_minor: i128 },
    #[error("{account:?} is below its overdraft: available {available_minor}, overdraft {overdraft_minor}")]
    BelowOverdraft { account: UserAccount, available_minor: i128, overdraft_minor: i128 },
    #[error("a balance component of {account:?} is out of range")]
    OutOfRange { account: UserAccount },
    #[error("the total of system account {account:?} is past the maximum amount")]
    SystemTotalOutOfRange { account: SystemAccount },
    #[error("{account:?} counts {used_minor} of outflow in a window its {limit:?} limit of {limit_minor} bounds")]
    UsagePastLimit { account: UserAccount, limit: LimitKind, used_minor: i128, limit_minor: i128 },
    #[error("reservation {reservation_id} belongs to an account that does not exist")]
    OrphanReservation { reservation_id: Uuid },
    #[error("reservation {reservation_id} is malformed: {reason}")]
    MalformedReservation { reservation_id: Uuid, reason: &'static str },
    #[error("transaction {transaction_id}'s reservation does not match its status or amount")]
    TransactionReservationMismatch { transaction_id: Uuid },
    #[error(
        "reservation {reservation_id} of {user_id} is Active and can expire but is not in the expiry index, or is there and should not be"
    )]
    ExpiryIndexMismatch { user_id: Uuid, reservation_id: Uuid },
    #[error("{user_id}'s count of unfinished transactions drifted from its transactions")]
    UnfinishedCountDrift { user_id: Uuid },
}

/// A reservation as the engine makes them: filed under its own user and id, a positive amount
/// within the maximum, and a close time exactly when it has left Active. A state loaded from
/// storage is checked with these before the engine is rebuilt from it: an Active reservation
/// with a close time would be filed among the closed ones while its account still counts it.
fn check_reservation(user_id: Uuid, reservation_id: Uuid, reservation: &Reservation) -> Result<(), InvariantViolation> {
    let malformed = |reason| Err(InvariantViolation::MalformedReservation { reservation_id, reason });
    if (user_id, reservation_id) != (reservation.account.user_id, reservation.id) {
        return malformed("filed under another user or id than its own");
    }
    if !(1..=MAX_AMOUNT_MINOR).contains(&reservation.amount_minor) {
        return malformed("its amount is not between one minor unit and the maximum");
    }
    if (reservation.status == ReservationStatus::Active) != reservation.closed_at_ms.is_none() {
        return malformed("it has a close time if and only if it has left Active, and this one does not");
    }
    Ok(())
}

/// An account's outflow counters stay within its limits: limits are fixed when the account opens
/// and every outflow is checked against them as it is counted, so a counter past its limit means
/// an outflow went through unchecked (or a journal or snapshot whose counters drifted). Refunds
/// stop at zero, so a negative counter means one was written some other way.
fn check_usage(view: &AccountView) -> Result<(), InvariantViolation> {
    let limits = view.config.limits;
    let windows = [
        (LimitKind::Daily, limits.daily_minor, view.usage.day_used_minor),
        (LimitKind::Monthly, limits.monthly_minor, view.usage.month_used_minor),
    ];
    for (limit, limit_minor, used_minor) in windows {
        let limit_minor = limit_minor.unwrap_or(MAX_AMOUNT_MINOR);
        if !(0..=limit_minor).contains(&used_minor) {
            return Err(InvariantViolation::UsagePastLimit { account: view.account, limit, used_minor, limit_minor });
        }
    }
    Ok(())
}

impl EngineState {
    /// Checks the promises of double entry and reservations on this state.
    pub fn check_invariants(&self) -> Result<(), InvariantViolation> {
        let mut sum_by_asset = [0_i128; Asset::COUNT];
        for (account, amount_minor) in &self.system_minor {
            sum_by_asset[account.asset.index()] += amount_minor;
        }
        let mut active_by_account: BTreeMap<UserAccount, i128> = BTreeMap::new();
        for ((user_id, reservation_id), reservation) in &self.reservations {
            if !self.accounts.contains_key(&reservation.account) {
                return Err(InvariantViolation::OrphanReservation { reservation_id: reservation.id });
            }
            check_reservation(*user_id, *reservation_id, reservation)?;
            if reservation.status == ReservationStatus::Active {
                *active_by_account.entry(reservation.account).or_default() += reservation.amount_minor;
            }
        }
        for view in self.accounts.values() {
            let balance = view.balance;
            sum_by_asset[view.account.asset.index()] += balance.total_minor();
            let active_minor = active_by_account.get(&view.account).copied().unwrap_or(0);
            if balance.reserved_minor != active_minor {
                return Err(InvariantViolation::ReservedMismatch {
                    account: view.account,
                    reserved_minor: balance.reserved_minor,
                    active_minor,
                });
            }
            if balance.available_minor < -view.config.overdraft_minor {
                return Err(InvariantViolation::BelowOverdraft {
                    account: view.account,
                    available_minor: balance.available_minor,
                    overdraft_minor: view.config.overdraft_minor,
                });
            }
            // Credits are checked against the total, and an overdraft lets available go below
            // zero by at most the maximum, so the total is within the maximum either way.
            let in_range = |minor: i128| minor.abs() <= MAX_AMOUNT_MINOR;
            if !in_range(balance.available_minor)
                || !(0..=MAX_AMOUNT_MINOR).contains(&balance.reserved_minor)
                || !in_range(balance.total_minor())
            {
                return Err(InvariantViolation::OutOfRange { account: view.account });
            }
            check_usage(view)?;
        }
        self.check_transactions()?;
        // The store holds each system total as one amount, and a restart loads it as one.
        if let Some((account, _)) = self.system_minor.iter().find(|(_, minor)| minor.abs() > MAX_AMOUNT_MINOR) {
            return Err(InvariantViolation::SystemTotalOutOfRange { account: *account });
        }
        for asset in Asset::all() {
            let sum_minor = sum_by_asset[asset.index()];
            if sum_minor != 0 {
                return Err(InvariantViolation::AssetDoesNotSumToZero { asset, sum_minor });
            }
        }
        Ok(())
    }

    /// A transaction holding funds has an Active reservation of principal + fees (unless it
    /// expired); no other transaction has an Active one, bar one opened under its id after it
    /// finished.
    fn check_transactions(&self) -> Result<(), InvariantViolation> {
        for ((user_id, transaction_id), transaction) in &self.transactions {
            let holds_funds = matches!(
                transaction.status,
                TxStatus::BalanceReserved
                    | TxStatus::SentToProvider
                    | TxStatus::ProviderProcessing
                    | TxStatus::ProviderConfirming
            );
            let active = self
                .reservations
                .get(&(*user_id, *transaction_id))
                .filter(|reservation| reservation.status == ReservationStatus::Active);
            let consistent = match (transaction.spec.paying_account(), active) {
                // Once the engine forgot a finished transaction, a caller may reserve under its
                // id. A journal replay never forgets, so it holds both: the later reservation is
                // not the transaction's.
                (_, Some(reservation))
                    if transaction.status.is_finished() && reservation.created_at_ms > transaction.updated_at_ms =>
                {
                    true
                }
                (Some(paying), Some(reservation)) => {
                    holds_funds
                        && reservation.account == paying
                        && reservation.amount_minor == transaction.spec.reserve_minor()
                }
                (None, Some(_)) => false,
                // While a transaction holds funds, only its completion or failure closes its
                // reservation, and either moves it on: the sweep's expiry (before the provider
                // has it; journals from before session 20 also after) is the one other close,
                // since forgotten or not. Any other close is a bug.
                (Some(_), None) => {
                    !holds_funds
                        || self
                            .reservations
                            .get(&(*user_id, *transaction_id))
                            .is_none_or(|reservation| reservation.status == ReservationStatus::Expired)
                }
                (None, None) => true,
            };
            if !consistent {
                return Err(InvariantViolation::TransactionReservationMismatch { transaction_id: *transaction_id });
            }
        }
        Ok(())
    }

    /// The latest moment this state has seen: when its newest idempotency key was recorded, or
    /// its newest reservation or transaction changed; `i64::MIN` for a state with none of them.
    /// Recovery restarts the clock from it, and what the retention window keeps is measured
    /// back from it, so neither depends on the wall clock.
    pub fn latest_ms(&self) -> i64 {
        self.idempotency
            .values()
            .map(|record| record.recorded_at_ms)
            .chain(self.reservations.values().flat_map(|r| [Some(r.created_at_ms), r.closed_at_ms]).flatten())
            .chain(self.transactions.values().map(|transaction| transaction.updated_at_ms))
            .max()
            .unwrap_or(i64::MIN)
    }

    /// This state without what the engine may already have forgotten at `now_ms`: idempotency
    /// keys and closed reservations older than the retention window. Two engines with the same
    /// history agree on this even if one of them (a journal replay) never swept.
    pub fn within_retention(&self, now_ms: i64, retention_ms: i64) -> EngineState {
        let cutoff_ms = now_ms.saturating_sub(retention_ms);
        let mut state = self.clone();
        state.idempotency.retain(|_, record| record.recorded_at_ms > cutoff_ms);
        state
            .reservations
            .retain(|_, reservation| reservation.closed_at_ms.is_none_or(|closed_at_ms| closed_at_ms > cutoff_ms));
        state
            .transactions
            .retain(|_, transaction| !transaction.status.is_finished() || transaction.updated_at_ms > cutoff_ms);
        state
    }

    /// The summed balance of a system account (zero if it never moved).
    pub fn system_balance_minor(&self, account: &SystemAccount) -> i128 {
        self.system_minor.get(account).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::account::{Domain, OutflowLimits, Provider, SystemKind};

    /// One account with a daily limit of 100 and `day_used_minor` counted today.
    fn with_daily_usage(day_used_minor: i128) -> EngineState {
        let account = ACCOUNT;
        let limits = OutflowLimits { daily_minor: Some(100), ..OutflowLimits::default() };
        let view = AccountView {
            account,
            config: AccountConfig { limits, ..AccountConfig::default() },
            balance: Balance::default(),
            usage: OutflowUsage { day_used_minor, ..OutflowUsage::default() },
        };
        EngineState { accounts: BTreeMap::from([(account, view)]), ..EngineState::default() }
    }

    const ACCOUNT: UserAccount =
        UserAccount { user_id: Uuid::from_u128(1), domain: Domain::Banking, asset: Asset::USD };

    /// An Active reservation (id 7) of `ACCOUNT`.
    fn active(amount_minor: i128) -> Reservation {
        Reservation {
            id: Uuid::from_u128(7),
            account: ACCOUNT,
            amount_minor,
            created_at_ms: 0,
            expires_at_ms: 1_000,
            status: ReservationStatus::Active,
            closed_at_ms: None,
        }
    }

    /// `ACCOUNT` with `balance` and `reservation` filed under `key`, and the Stripe clearing
    /// account holding the opposite of the account's total, so the asset sums to zero.
    fn one_account(balance: Balance, reservation: Reservation, key: (Uuid, Uuid)) -> EngineState {
        let view =
            AccountView { account: ACCOUNT, config: AccountConfig::default(), balance, usage: OutflowUsage::default() };
        let system = SystemAccount { kind: SystemKind::ProviderClearing(Provider::Stripe), asset: Asset::USD };
        EngineState {
            accounts: BTreeMap::from([(ACCOUNT, view)]),
            reservations: BTreeMap::from([(key, reservation)]),
            system_minor: BTreeMap::from([(system, -balance.total_minor())]),
            ..EngineState::default()
        }
    }

    /// Found in review: states no engine makes, accepted until session 21. The first would be
    /// filed among the closed reservations while its account still counted it, and a commit of it
    /// then broke an assertion with the shard locked.
    #[test]
    fn reservations_no_engine_makes_break_an_invariant() {
        let reserved = |reserved_minor| Balance { available_minor: 0, reserved_minor };
        let own_key = (ACCOUNT.user_id, Uuid::from_u128(7));
        assert_eq!(one_account(reserved(10), active(10), own_key).check_invariants(), Ok(()));
        let cases = [
            one_account(reserved(10), Reservation { closed_at_ms: Some(5), ..active(10) }, own_key),
            one_account(reserved(0), Reservation { status: ReservationStatus::Released, ..active(10) }, own_key),
            one_account(reserved(0), active(0), own_key),
            one_account(reserved(-5), active(-5), own_key),
            one_account(reserved(10), active(10), (Uuid::from_u128(2), Uuid::from_u128(7))),
            one_account(reserved(10), active(10), (ACCOUNT.user_id, Uuid::from_u128(8))),
        ];
        for state in cases {
            assert!(
                matches!(state.check_invariants(), Err(InvariantViolation::MalformedReservation { .. })),
                "{:?}",
                state.reservations
            );
        }
    }

    /// A user account's total stays within the maximum: credits are checked against it.
    #[test]
    fn a_total_past_the_maximum_breaks_an_invariant() {
        let balance = Balance { available_minor: MAX_AMOUNT_MINOR, reserved_minor: MAX_AMOUNT_MINOR };
        let state = one_account(balance, active(MAX_AMOUNT_MINOR), (ACCOUNT.user_id, Uuid::from_u128(7)));
        assert_eq!(state.check_invariants(), Err(InvariantViolation::OutOfRange { account: ACCOUNT }));
    }

    /// A system account's total stays within the maximum too: each shard's part is bounded by the
    /// maximum over the shard count, and the store holds and loads the total as one amount.
    #[test]
    fn a_system_total_past_the_maximum_breaks_an_invariant() {
        let balance = Balance { available_minor: MAX_AMOUNT_MINOR, reserved_minor: 0 };
        let mut state = one_account(balance, active(1), (ACCOUNT.user_id, Uuid::from_u128(7)));
        state.reservations.clear();
        assert_eq!(state.check_invariants(), Ok(()));
        let clearing = SystemAccount { kind: SystemKind::ProviderClearing(Provider::Stripe), asset: Asset::USD };
        let fees =
            SystemAccount { kind: SystemKind::FeeRevenue(crate::engine::account::FeeTier::Platform), ..clearing };
        state.system_minor.insert(clearing, -MAX_AMOUNT_MINOR - 1);
        state.system_minor.insert(fees, 1);
        assert_eq!(state.check_invariants(), Err(InvariantViolation::SystemTotalOutOfRange { account: clearing }));
    }

    #[test]
    fn outflow_counters_past_their_limit_or_below_zero_break_an_invariant() {
        assert_eq!(with_daily_usage(100).check_invariants(), Ok(()));
        for used_minor in [101, -1] {
            assert!(matches!(
                with_daily_usage(used_minor).check_invariants(),
                Err(InvariantViolation::UsagePastLimit { limit: LimitKind::Daily, limit_minor: 100, .. })
            ));
        }
    }
}
