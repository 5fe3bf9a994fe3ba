//! Model-based property test: random sequences of operations (linked batches that fail halfway,
//! expiry, idempotent retries and key conflicts included) run against the engine and against a
//! deliberately simple reference model. After every step the two must agree on each outcome,
//! every balance, every reservation and every system account, and the engine's invariants must
//! hold (each asset sums to zero, reserved = sum of active reservations, available >= -overdraft).
//! The model predicts each receipt in full and, for a failed linked batch, which operation failed
//! and why. Time moves with or without a sweep, so requests also meet reservations that are past
//! their expiry but not yet swept; runs start an hour before a UTC midnight that is either a
//! plain day boundary or a month's end, so the daily and monthly outflow windows both roll over.
//! A retry must repeat its key's first answer exactly (sequence, receipt or error). At the end,
//! replaying the journal into a fresh engine must rebuild the identical state.

mod support;

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Datelike};
use diboas_ledger::engine::account::{
    AccountConfig, AccountRef, Domain, FeeTier, OutflowLimits, Provider, SystemAccount, SystemKind, UserAccount,
};
use diboas_ledger::engine::asset::Asset;
use diboas_ledger::engine::error::EngineError;
use diboas_ledger::engine::operation::{MAX_RESERVATION_TTL_MS, Operation, Receipt, Request};
use diboas_ledger::engine::record::MemoryJournal;
use diboas_ledger::engine::reservation::ReservationStatus;
use diboas_ledger::engine::{Engine, EngineConfig, Outcome};
use proptest::prelude::*;
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest, prop_state_machine};
use rust_decimal::Decimal;
use support::{amount, key};
use uuid::Uuid;

const USERS: u128 = 4;
const DAY_MS: i64 = 24 * 60 * 60 * 1_000;
const HOUR_MS: i64 = 60 * 60 * 1_000;
/// Where a run starts: one hour before a UTC midnight, so sequences cross a daily window. The
/// first is 2024-10-03 23:00 (the month goes on); the second 2024-10-31 23:00 (the month ends too).
const START_MS: [i64; 2] = [20_000 * DAY_MS - HOUR_MS, 20_028 * DAY_MS - HOUR_MS];
/// The outflow limits an account may be opened with; a transfer of up to 5,000 meets all three.
const DAILY_LIMIT_MINOR: i128 = 600;
const MONTHLY_LIMIT_MINOR: i128 = 1_500;
const PER_TRANSACTION_LIMIT_MINOR: i128 = 2_000;
/// The two conversion prices the model knows. Buying: 0.00001 BTC per USD, 1 cent buys exactly 10
/// satoshis. Selling: 60,000.25 USD per BTC, 1 satoshi is worth 0.0600025 cents, so the proceeds
/// are rounded down to whole cents (and a few satoshis buy nothing).
const BUY_PRICE: (i64, u32) = (1, 5);
const SELL_PRICE: (i64, u32) = (6_000_025, 2);

fn user_id(user: u128) -> Uuid {
    Uuid::from_u128(user * 7_919 + 1)
}

/// The accounts of the model: per user, banking USD (0), investing USD (1) and investing BTC (2).
fn account(user: u128, which: u8) -> UserAccount {
    let (domain, asset) = match which {
        0 => (Domain::Banking, Asset::USD),
        1 => (Domain::Investing, Asset::USD),
        _ => (Domain::Investing, Asset::BTC),
    };
    UserAccount { user_id: user_id(user), domain, asset }
}

fn clearing(asset: Asset) -> SystemAccount {
    SystemAccount { kind: SystemKind::ProviderClearing(Provider::Stripe), asset }
}

fn liquidity(asset: Asset) -> SystemAccount {
    SystemAccount { kind: SystemKind::ExchangeLiquidity, asset }
}

fn fees(asset: Asset) -> SystemAccount {
    SystemAccount { kind: SystemKind::FeeRevenue(FeeTier::Platform), asset }
}

#[derive(Debug, Clone)]
enum Transition {
    /// A fresh request under a fresh key.
    Submit { key: String, operation: Operation },
    /// The request made under the `nth` key (modulo how many there are) is sent again.
    Retry { nth: usize },
    /// An earlier key is reused for a different operation.
    Conflict { nth: usize, operation: Operation },
    /// Time passes; the expiry sweep runs only if `sweep`, so until one does, Active reservations
    /// may be past their expiry.
    Advance { ms: i64, sweep: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct ModelAccount {
    available: i128,
    reserved: i128,
    overdraft: i128,
    frozen: bool,
    per_transaction_limit: Option<i128>,
    daily_limit: Option<i128>,
    monthly_limit: Option<i128>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ModelReservation {
    account: UserAccount,
    amount: i128,
    created_at: i64,
    expires_at: i64,
    status: ReservationStatus,
}

#[derive(Debug, Clone, Default)]
struct Model {
    start_ms: i64,
    now_ms: i64,
    accounts: BTreeMap<UserAccount, ModelAccount>,
    /// Outflow per (account, UTC day) still counted against the daily limit.
    outflow_by_day: BTreeMap<(UserAccount, i64), i128>,
    /// Outflow per (account, UTC month) still counted against the monthly limit.
    outflow_by_month: BTreeMap<(UserAccount, i64), i128>,
    system: BTreeMap<SystemAccount, i128>,
    reservations: BTreeMap<(Uuid, Uuid), ModelReservation>,
    /// Every key used, in order, with its operation and its first outcome: the receipt in full,
    /// or the name of the error.
    keys: Vec<(String, Operation, Result<Receipt, String>)>,
}

/// What the model predicts of an engine error: its variant name, with the limit for a limit
/// refusal and the index and cause for a failed linked batch.
fn error_name(error: &EngineError) -> String {
    match error {
        EngineError::LimitExceeded { limit, .. } => format!("LimitExceeded:{limit:?}"),
        EngineError::BatchOperationFailed { index, cause } => {
            format!("BatchOperationFailed{index}:{}", error_name(cause))
        }
        other => {
            let debug = format!("{other:?}");
            debug.split([' ', '{', '(']).next().unwrap_or_default().to_owned()
        }
    }
}

fn day(ms: i64) -> i64 {
    ms.div_euclid(DAY_MS)
}

/// The UTC calendar month (year * 12 + month index) of a time.
fn month(ms: i64) -> i64 {
    let at = DateTime::from_timestamp_millis(ms).unwrap();
    i64::from(at.year()) * 12 + i64::from(at.month0())
}

impl Model {
    fn used_today(&self, account: &UserAccount) -> i128 {
        self.outflow_by_day.get(&(*account, day(self.now_ms))).copied().unwrap_or(0)
    }

    fn used_this_month(&self, account: &UserAccount) -> i128 {
        self.outflow_by_month.get(&(*account, month(self.now_ms))).copied().unwrap_or(0)
    }

    /// Money leaving a user account as outflow: the checks in the engine's documented order
    /// (frozen, funds, then the limits per transaction, per day and per month).
    fn outflow(&mut self, account: &UserAccount, amount: i128) -> Result<(), String> {
        let state = *self.accounts.get(account).ok_or("UnknownAccount")?;
        if state.frozen {
            return Err("AccountFrozen".into());
        }
        if state.available - amount < -state.overdraft {
            return Err("InsufficientFunds".into());
        }
        if state.per_transaction_limit.is_some_and(|limit| amount > limit) {
            return Err("LimitExceeded:PerTransaction".into());
        }
        if state.daily_limit.is_some_and(|limit| self.used_today(account) + amount > limit) {
            return Err("LimitExceeded:Daily".into());
        }
        if state.monthly_limit.is_some_and(|limit| self.used_this_month(account) + amount > limit) {
            return Err("LimitExceeded:Monthly".into());
        }
        *self.outflow_by_day.entry((*account, day(self.now_ms))).or_default() += amount;
        *self.outflow_by_month.entry((*account, month(self.now_ms))).or_default() += amount;
        self.accounts.get_mut(account).unwrap().available -= amount;
        Ok(())
    }

    /// What is given back of a reservation returns to the windows it was counted in.
    fn refund(&mut self, reservation: &ModelReservation, amount: i128) {
        let account = reservation.account;
        for counted in [
            self.outflow_by_day.get_mut(&(account, day(reservation.created_at))),
            self.outflow_by_month.get_mut(&(account, month(reservation.created_at))),
        ]
        .into_iter()
        .flatten()
        {
            *counted = (*counted - amount).max(0);
        }
    }

    fn credit(&mut self, account: &UserAccount, amount: i128) -> Result<(), String> {
        self.accounts.get_mut(account).ok_or("UnknownAccount")?.available += amount;
        Ok(())
    }

    fn system_add(&mut self, account: SystemAccount, amount: i128) {
        *self.system.entry(account).or_default() += amount;
    }

    /// Applies one operation to the model and predicts its receipt; on `Err` the caller discards
    /// the modified copy.
    fn apply(&mut self, operation: &Operation) -> Result<Receipt, String> {
        match operation {
            Operation::OpenAccount { account, config } => {
                if self.accounts.contains_key(account) {
                    return Err("AccountAlreadyExists".into());
                }
                self.accounts.insert(
                    *account,
                    ModelAccount {
                        overdraft: config.overdraft_minor,
                        per_transaction_limit: config.limits.per_transaction_minor,
                        daily_limit: config.limits.daily_minor,
                        monthly_limit: config.limits.monthly_minor,
                        ..ModelAccount::default()
                    },
                );
                Ok(Receipt::Done)
            }
            Operation::SetFrozen { account, frozen } => {
                self.accounts.get_mut(account).ok_or("UnknownAccount")?.frozen = *frozen;
                Ok(Receipt::Done)
            }
            Operation::Deposit { account, amount, .. } => {
                self.credit(account, amount.minor())?;
                self.system_add(clearing(account.asset), -amount.minor());
                Ok(Receipt::Done)
            }
            Operation::Withdraw { account, amount, .. } => {
                self.outflow(account, amount.minor())?;
                self.system_add(clearing(account.asset), amount.minor());
                Ok(Receipt::Done)
            }
            Operation::Transfer { from: AccountRef::User(from), to: AccountRef::User(to), amount } => {
                if from.asset != to.asset {
                    return Err("AssetMismatch".into());
                }
                if from == to {
                    return Err("SameAccount".into());
                }
                // The destination is checked before the source.
                self.accounts.get(to).ok_or("UnknownAccount")?;
                self.outflow(from, amount.minor())?;
                self.credit(to, amount.minor())?;
                Ok(Receipt::Done)
            }
            Operation::Reserve { reservation_id, account, amount, ttl_ms } => {
                let ttl = ttl_ms.unwrap_or(30 * 60 * 1_000);
                if !(1..=MAX_RESERVATION_TTL_MS).contains(&ttl) {
                    return Err("ReservationTtlOutOfRange".into());
                }
                if !self.accounts.contains_key(account) {
                    return Err("UnknownAccount".into());
                }
                if self.reservations.contains_key(&(account.user_id, *reservation_id)) {
                    return Err("ReservationAlreadyExists".into());
                }
                self.outflow(account, amount.minor())?;
                self.accounts.get_mut(account).unwrap().reserved += amount.minor();
                self.reservations.insert(
                    (account.user_id, *reservation_id),
                    ModelReservation {
                        account: *account,
                        amount: amount.minor(),
                        created_at: self.now_ms,
                        expires_at: self.now_ms + ttl,
                        status: ReservationStatus::Active,
                    },
                );
                Ok(Receipt::Reserved { expires_at_ms: self.now_ms + ttl })
            }
            Operation::Commit { user_id, reservation_id, destination: AccountRef::User(to), amount } => {
                let reservation = *self.reservations.get(&(*user_id, *reservation_id)).ok_or("ReservationNotFound")?;
                if reservation.status != ReservationStatus::Active {
                    return Err("ReservationNotActive".into());
                }
                if self.now_ms >= reservation.expires_at {
                    return Err("ReservationExpired".into());
                }
                if to.asset != reservation.account.asset {
                    return Err("AssetMismatch".into());
                }
                if *to == reservation.account {
                    return Err("SameAccount".into());
                }
                let committed = amount.map_or(reservation.amount, |amount| amount.minor());
                if committed > reservation.amount {
                    return Err("CommitExceedsReservation".into());
                }
                self.accounts.get(to).ok_or("UnknownAccount")?;
                if self.accounts[&reservation.account].frozen {
                    return Err("AccountFrozen".into());
                }
                self.credit(to, committed)?;
                let source = self.accounts.get_mut(&reservation.account).unwrap();
                source.reserved -= reservation.amount;
                source.available += reservation.amount - committed;
                self.refund(&reservation, reservation.amount - committed);
                self.reservations.get_mut(&(*user_id, *reservation_id)).unwrap().status = ReservationStatus::Completed;
                Ok(Receipt::Committed { committed_minor: committed, released_minor: reservation.amount - committed })
            }
            Operation::Release { user_id, reservation_id } => {
                let reservation = *self.reservations.get(&(*user_id, *reservation_id)).ok_or("ReservationNotFound")?;
                if reservation.status != ReservationStatus::Active {
                    return Err("ReservationNotActive".into());
                }
                self.close((*user_id, *reservation_id), ReservationStatus::Released);
                Ok(Receipt::Released { released_minor: reservation.amount })
            }
            Operation::Convert { from, to, amount, price, commission_bps } => {
                // Proceeds rounded down (the platform never pays out a fraction it lacks), the
                // commission rounded up (in the platform's favour).
                let bought = match (from.asset, (price.mantissa() as i64, price.scale())) {
                    (Asset::USD, BUY_PRICE) => amount.minor() * 10,
                    (Asset::BTC, SELL_PRICE) => amount.minor() * 6_000_025 / 100_000_000,
                    other => unreachable!("the model does not price {other:?}"),
                };
                let commission = (bought * i128::from(*commission_bps) + 9_999) / 10_000;
                if bought - commission <= 0 {
                    return Err("ConversionTooSmall".into());
                }
                self.accounts.get(from).ok_or("UnknownAccount")?;
                self.accounts.get(to).ok_or("UnknownAccount")?;
                self.outflow(from, amount.minor())?;
                self.system_add(liquidity(from.asset), amount.minor());
                self.credit(to, bought - commission)?;
                self.system_add(liquidity(to.asset), -bought);
                self.system_add(fees(to.asset), commission);
                Ok(Receipt::Converted {
                    sold_minor: amount.minor(),
                    bought_minor: bought - commission,
                    commission_minor: commission,
                })
            }
            Operation::LinkedBatch { operations } => {
                let mut receipts = Vec::with_capacity(operations.len());
                for (index, operation) in operations.iter().enumerate() {
                    let receipt =
                        self.apply(operation).map_err(|cause| format!("BatchOperationFailed{index}:{cause}"))?;
                    receipts.push(receipt);
                }
                Ok(Receipt::Batch { receipts })
            }
            other => unreachable!("the model does not generate {other:?}"),
        }
    }

    fn close(&mut self, key: (Uuid, Uuid), status: ReservationStatus) {
        let reservation = self.reservations[&key];
        let account = self.accounts.get_mut(&reservation.account).unwrap();
        account.reserved -= reservation.amount;
        account.available += reservation.amount;
        self.refund(&reservation, reservation.amount);
        self.reservations.get_mut(&key).unwrap().status = status;
    }

    /// Runs a fresh operation all-or-nothing and records its outcome under `key`.
    fn submit(&mut self, key: &str, operation: &Operation) {
        let mut attempt = self.clone();
        let outcome = attempt.apply(operation);
        if outcome.is_ok() {
            *self = attempt;
        }
        self.keys.push((key.to_owned(), operation.clone(), outcome));
    }

    fn advance(&mut self, ms: i64, sweep: bool) {
        self.now_ms += ms;
        if !sweep {
            return;
        }
        let due: Vec<(Uuid, Uuid)> = self
            .reservations
            .iter()
            .filter(|(_, r)| r.status == ReservationStatus::Active && r.expires_at <= self.now_ms)
            .map(|(key, _)| *key)
            .collect();
        for key in due {
            self.close(key, ReservationStatus::Expired);
        }
    }
}

fn amount_strategy() -> impl Strategy<Value = i128> {
    prop_oneof![1..=50_i128, 1..=5_000_i128]
}

/// Mostly the default or a minute (which `Advance` can land on exactly), and now and then the
/// documented maximum and the values either side of the allowed range.
fn ttl_strategy() -> impl Strategy<Value = Option<i64>> {
    prop_oneof![
        4 => Just(None),
        4 => Just(Some(60_000_i64)),
        1 => Just(Some(MAX_RESERVATION_TTL_MS)),
        1 => Just(Some(MAX_RESERVATION_TTL_MS + 1)),
        1 => Just(Some(0)),
    ]
}

/// No commission, the usual one, and all of it (which leaves nothing to buy).
fn commission_strategy() -> impl Strategy<Value = u32> {
    prop_oneof![1 => Just(0_u32), 4 => Just(100), 1 => Just(10_000)]
}

/// Opens `account`; `limits` chooses which outflow limits it has: bit 0 per transaction, bit 1
/// per day, bit 2 per month.
fn open(account: UserAccount, overdraft: bool, limits: u8) -> Operation {
    Operation::OpenAccount {
        account,
        config: AccountConfig {
            overdraft_minor: if overdraft { 300 } else { 0 },
            limits: OutflowLimits {
                per_transaction_minor: (limits & 1 != 0).then_some(PER_TRANSACTION_LIMIT_MINOR),
                daily_minor: (limits & 2 != 0).then_some(DAILY_LIMIT_MINOR),
                monthly_minor: (limits & 4 != 0).then_some(MONTHLY_LIMIT_MINOR),
            },
            frozen: false,
        },
    }
}

fn simple_operation() -> BoxedStrategy<Operation> {
    let user = prop_oneof![4 => 0..USERS, 1 => Just(USERS)];
    let usd_account = (user.clone(), 0..2_u8).prop_map(|(user, which)| account(user, which));
    let reservation_id = (0..3_u128).prop_map(Uuid::from_u128);
    prop_oneof![
        1 => (usd_account.clone(), any::<bool>(), 0..8_u8).prop_map(|(account, overdraft, limits)| open(account, overdraft, limits)),
        3 => (usd_account.clone(), amount_strategy()).prop_map(|(account, minor)| Operation::Deposit {
            account,
            amount: amount(minor),
            provider: Provider::Stripe
        }),
        1 => (usd_account.clone(), amount_strategy()).prop_map(|(account, minor)| Operation::Withdraw {
            account,
            amount: amount(minor),
            provider: Provider::Stripe
        }),
        3 => (usd_account.clone(), usd_account.clone(), amount_strategy()).prop_map(|(from, to, minor)| {
            Operation::Transfer { from: AccountRef::User(from), to: AccountRef::User(to), amount: amount(minor) }
        }),
        4 => (reservation_id.clone(), usd_account.clone(), amount_strategy(), ttl_strategy())
            .prop_map(|(reservation_id, account, minor, ttl_ms)| Operation::Reserve {
                reservation_id,
                account,
                amount: amount(minor),
                ttl_ms
            }),
        4 => (user.clone(), reservation_id.clone(), usd_account.clone(), proptest::option::of(amount_strategy())).prop_map(
            |(user, reservation_id, to, minor)| Operation::Commit {
                user_id: user_id(user),
                reservation_id,
                destination: AccountRef::User(to),
                amount: minor.map(amount)
            }
        ),
        1 => (user.clone(), reservation_id).prop_map(|(user, reservation_id)| Operation::Release { user_id: user_id(user), reservation_id }),
        1 => (usd_account.clone(), any::<bool>()).prop_map(|(account, frozen)| Operation::SetFrozen { account, frozen }),
        1 => (usd_account, 0..USERS, amount_strategy(), commission_strategy()).prop_map(|(from, user, minor, commission_bps)| Operation::Convert {
            from,
            to: account(user, 2),
            amount: amount(minor),
            price: Decimal::new(BUY_PRICE.0, BUY_PRICE.1),
            commission_bps,
        }),
        1 => (user.clone(), 0..USERS, amount_strategy(), commission_strategy()).prop_map(|(from, to, minor, commission_bps)| Operation::Convert {
            from: account(from, 2),
            to: account(to, 1),
            amount: amount(minor),
            price: Decimal::new(SELL_PRICE.0, SELL_PRICE.1),
            commission_bps,
        }),
    ]
    .boxed()
}

struct LedgerModel;

impl ReferenceStateMachine for LedgerModel {
    type State = Model;
    type Transition = Transition;

    /// Every account of users 0..USERS opened with random settings and funds, through the same
    /// operations the transitions use; user USERS is never opened (unknown-account paths).
    fn init_state() -> BoxedStrategy<Model> {
        let settings = (any::<bool>(), 0..8_u8, 0..10_000_i128);
        (proptest::sample::select(START_MS.to_vec()), proptest::collection::vec(settings, (USERS * 3) as usize))
            .prop_map(|(start_ms, settings)| {
                let mut model = Model { start_ms, now_ms: start_ms, ..Model::default() };
                for (index, (overdraft, limits, deposit)) in settings.into_iter().enumerate() {
                    let account = account(index as u128 / 3, (index % 3) as u8);
                    model.submit(&format!("init-{index}"), &open(account, overdraft, limits));
                    if deposit > 0 {
                        let deposit =
                            Operation::Deposit { account, amount: amount(deposit), provider: Provider::Stripe };
                        model.submit(&format!("init-{index}-deposit"), &deposit);
                    }
                }
                model
            })
            .boxed()
    }

    fn transitions(state: &Model) -> BoxedStrategy<Transition> {
        let key = format!("k{}", state.keys.len());
        let reservations: Vec<(Uuid, Uuid)> = state.reservations.keys().copied().collect();
        let close_existing = if reservations.is_empty() {
            simple_operation()
        } else {
            // Now and then the BTC account: an asset the reservation is not in.
            let to = (0..USERS, 0..3_u8).prop_map(|(user, which)| account(user, which));
            (proptest::sample::select(reservations), to, proptest::option::of(amount_strategy()), any::<bool>())
                .prop_map(|((user_id, reservation_id), to, minor, commit)| {
                    if commit {
                        Operation::Commit {
                            user_id,
                            reservation_id,
                            destination: AccountRef::User(to),
                            amount: minor.map(amount),
                        }
                    } else {
                        Operation::Release { user_id, reservation_id }
                    }
                })
                .boxed()
        };
        let operation = prop_oneof![
            8 => simple_operation(),
            3 => close_existing,
            1 => proptest::collection::vec(simple_operation(), 1..5).prop_map(|operations| Operation::LinkedBatch { operations }),
        ];
        if state.keys.is_empty() {
            return operation.prop_map(move |operation| Transition::Submit { key: key.clone(), operation }).boxed();
        }
        prop_oneof![
            12 => operation.clone().prop_map(move |operation| Transition::Submit { key: key.clone(), operation }),
            2 => any::<usize>().prop_map(|nth| Transition::Retry { nth }),
            1 => (any::<usize>(), operation).prop_map(|(nth, operation)| Transition::Conflict { nth, operation }),
            2 => (prop_oneof![1..=120_000_i64, Just(60_000), Just(30 * 60 * 1_000), Just(HOUR_MS)], any::<bool>())
                .prop_map(|(ms, sweep)| Transition::Advance { ms, sweep }),
        ]
        .boxed()
    }

    fn apply(mut state: Model, transition: &Transition) -> Model {
        match transition {
            Transition::Submit { key, operation } => state.submit(key, operation),
            Transition::Retry { .. } | Transition::Conflict { .. } => {}
            Transition::Advance { ms, sweep } => state.advance(*ms, *sweep),
        }
        state
    }
}

struct EngineUnderTest {
    engine: Engine<MemoryJournal>,
    /// Each key's first answer (sequence and result), which every retry must repeat exactly: the
    /// model checks only the kind of outcome, this checks the receipt and the error in full.
    first_answers: HashMap<String, (Option<u64>, Result<Receipt, EngineError>)>,
}

impl EngineUnderTest {
    fn assert_first_answer(&self, text: &str, outcome: &Outcome) {
        let (sequence, result) = &self.first_answers[text];
        assert_eq!((&outcome.sequence, &outcome.result), (sequence, result), "the retry of {text} answered otherwise");
    }
}

impl StateMachineTest for EngineUnderTest {
    type SystemUnderTest = EngineUnderTest;
    type Reference = LedgerModel;

    fn init_test(model: &Model) -> EngineUnderTest {
        let config = EngineConfig { shard_count: 4, ..EngineConfig::default() };
        let engine = Engine::new(config, MemoryJournal::default());
        let mut first_answers = HashMap::new();
        for (text, operation, expected) in &model.keys {
            let outcome =
                engine.execute(Request { key: key(text), now_ms: model.start_ms, operation: operation.clone() });
            assert_outcome(&outcome.result, expected);
            first_answers.insert(text.clone(), (outcome.sequence, outcome.result));
        }
        EngineUnderTest { engine, first_answers }
    }

    fn apply(mut sut: EngineUnderTest, model: &Model, transition: Transition) -> EngineUnderTest {
        // `model` is the state after the transition; compare outcomes with what it recorded.
        match transition {
            Transition::Submit { key: text, operation } => {
                let outcome = sut.engine.execute(Request { key: key(&text), now_ms: model.now_ms, operation });
                let (_, _, expected) = model.keys.last().unwrap();
                assert_outcome(&outcome.result, expected);
                assert!(!outcome.replayed);
                sut.first_answers.insert(text, (outcome.sequence, outcome.result));
            }
            Transition::Retry { nth } => {
                let (text, operation, expected) = &model.keys[nth % model.keys.len()];
                let request = Request { key: key(text), now_ms: model.now_ms, operation: operation.clone() };
                let journal_len = sut.engine.sink().len();
                let outcome = sut.engine.execute(request);
                assert!(outcome.replayed, "a retry is answered from the idempotency store");
                assert_outcome(&outcome.result, expected);
                sut.assert_first_answer(text, &outcome);
                assert_eq!(sut.engine.sink().len(), journal_len, "a retry journals nothing");
            }
            Transition::Conflict { nth, operation } => {
                let (text, first, _) = &model.keys[nth % model.keys.len()];
                let outcome =
                    sut.engine.execute(Request { key: key(text), now_ms: model.now_ms, operation: operation.clone() });
                if operation == *first {
                    assert!(outcome.replayed);
                    sut.assert_first_answer(text, &outcome);
                } else {
                    assert!(matches!(outcome.result, Err(EngineError::IdempotencyConflict { .. })));
                }
            }
            Transition::Advance { sweep: true, .. } => {
                sut.engine.sweep(model.now_ms).unwrap();
            }
            // The next request carries the later time; nothing else happens until then.
            Transition::Advance { sweep: false, .. } => {}
        }
        sut
    }

    fn check_invariants(sut: &EngineUnderTest, model: &Model) {
        let state = sut.engine.state();
        state.check_invariants().unwrap();
        sut.engine.check_indexes().unwrap();
        assert_eq!(state.accounts.len(), model.accounts.len());
        for (account, expected) in &model.accounts {
            let view = state.accounts[account];
            assert_eq!(
                (view.balance.available_minor, view.balance.reserved_minor, view.config.frozen),
                (expected.available, expected.reserved, expected.frozen),
                "{account:?}"
            );
            if expected.daily_limit.is_some() {
                let used_today = if view.usage.day == day(model.now_ms) { view.usage.day_used_minor } else { 0 };
                assert_eq!(used_today, model.used_today(account), "daily outflow of {account:?}");
            }
            if expected.monthly_limit.is_some() {
                let used = if view.usage.month == month(model.now_ms) { view.usage.month_used_minor } else { 0 };
                assert_eq!(used, model.used_this_month(account), "monthly outflow of {account:?}");
            }
        }
        let model_system: BTreeMap<_, _> =
            model.system.iter().filter(|(_, v)| **v != 0).map(|(k, v)| (*k, *v)).collect();
        assert_eq!(state.system_minor, model_system);
        assert_eq!(
            state.reservations.len(),
            model.reservations.len(),
            "the engine holds reservations the model has not"
        );
        for ((user_id, reservation_id), expected) in &model.reservations {
            let reservation = state.reservations[&(*user_id, *reservation_id)];
            assert_eq!(
                (reservation.amount_minor, reservation.status, reservation.created_at_ms, reservation.expires_at_ms),
                (expected.amount, expected.status, expected.created_at, expected.expires_at)
            );
        }
    }

    fn teardown(sut: EngineUnderTest, _: Model) {
        let replayed = Engine::new(*sut.engine.config(), MemoryJournal::default());
        let records = sut.engine.sink().drain();
        for record in records {
            replayed.apply_record(&record).unwrap();
        }
        assert_eq!(replayed.state(), sut.engine.state(), "replaying the journal rebuilds the same state");
        replayed.check_indexes().unwrap();
    }
}

fn assert_outcome(actual: &Result<Receipt, EngineError>, expected: &Result<Receipt, String>) {
    match (actual, expected) {
        (Ok(receipt), Ok(predicted)) => assert_eq!(receipt, predicted),
        (Err(error), Err(name)) => assert_eq!(error_name(error), *name, "{error}"),
        (actual, expected) => panic!("engine gave {actual:?}, model expected {expected:?}"),
    }
}

prop_state_machine! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn engine_agrees_with_the_reference_model(sequential 1..80 => EngineUnderTest);
}
