//! Model-based property test: random sequences of operations (linked batches that fail halfway,
//! expiry, idempotent retries and key conflicts included) run against the engine and against a
//! deliberately simple reference model. After every step the two must agree on each outcome,
//! every balance, every reservation and every system account, and the engine's invariants must
//! hold (each asset sums to zero, reserved = sum of active reservations, available >= -overdraft).
//! A retry must repeat its key's first answer exactly (sequence, receipt or error). At the end, replaying the journal into a fresh engine must rebuild the identical state.

mod support;

use std::collections::{BTreeMap, HashMap};

use diboas_ledger::engine::account::{
    AccountConfig, AccountRef, Domain, FeeTier, OutflowLimits, Provider, SystemAccount, SystemKind, UserAccount,
};
use diboas_ledger::engine::asset::Asset;
use diboas_ledger::engine::error::EngineError;
use diboas_ledger::engine::operation::{Operation, Receipt, Request};
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
/// One hour before a UTC midnight, so sequences cross a daily-limit window.
const START_MS: i64 = 20_000 * DAY_MS - 60 * 60 * 1_000;
/// The conversion price the model knows: 0.00001 BTC per USD, i.e. 1 cent buys 10 satoshis.
const SATS_PER_CENT: i128 = 10;
const COMMISSION_BPS: u32 = 100;

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
    /// Time passes and the expiry sweep runs.
    Advance { ms: i64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct ModelAccount {
    available: i128,
    reserved: i128,
    overdraft: i128,
    frozen: bool,
    daily_limit: Option<i128>,
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
    now_ms: i64,
    accounts: BTreeMap<UserAccount, ModelAccount>,
    /// Outflow per (account, UTC day) still counted against the daily limit.
    outflow_by_day: BTreeMap<(UserAccount, i64), i128>,
    system: BTreeMap<SystemAccount, i128>,
    reservations: BTreeMap<(Uuid, Uuid), ModelReservation>,
    /// Every key used, in order, with its operation and the name of its first outcome.
    keys: Vec<(String, Operation, Result<(), String>)>,
}

/// The variant name of an engine error, which is what the model predicts.
fn error_name(error: &EngineError) -> String {
    let debug = format!("{error:?}");
    debug.split([' ', '{', '(']).next().unwrap_or_default().to_owned()
}

fn day(ms: i64) -> i64 {
    ms.div_euclid(DAY_MS)
}

impl Model {
    fn used_today(&self, account: &UserAccount) -> i128 {
        self.outflow_by_day.get(&(*account, day(self.now_ms))).copied().unwrap_or(0)
    }

    /// Money leaving a user account as outflow: the checks in the engine's documented order.
    fn outflow(&mut self, account: &UserAccount, amount: i128) -> Result<(), String> {
        let state = *self.accounts.get(account).ok_or("UnknownAccount")?;
        if state.frozen {
            return Err("AccountFrozen".into());
        }
        if state.available - amount < -state.overdraft {
            return Err("InsufficientFunds".into());
        }
        if let Some(limit) = state.daily_limit {
            if self.used_today(account) + amount > limit {
                return Err("LimitExceeded".into());
            }
            *self.outflow_by_day.entry((*account, day(self.now_ms))).or_default() += amount;
        }
        self.accounts.get_mut(account).unwrap().available -= amount;
        Ok(())
    }

    fn refund(&mut self, reservation: &ModelReservation, amount: i128) {
        if let Some(counted) = self.outflow_by_day.get_mut(&(reservation.account, day(reservation.created_at))) {
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

    /// Applies one operation to the model; on `Err` the caller discards the modified copy.
    fn apply(&mut self, operation: &Operation) -> Result<(), String> {
        match operation {
            Operation::OpenAccount { account, config } => {
                if self.accounts.contains_key(account) {
                    return Err("AccountAlreadyExists".into());
                }
                self.accounts.insert(
                    *account,
                    ModelAccount {
                        overdraft: config.overdraft_minor,
                        daily_limit: config.limits.daily_minor,
                        ..ModelAccount::default()
                    },
                );
                Ok(())
            }
            Operation::SetFrozen { account, frozen } => {
                self.accounts.get_mut(account).ok_or("UnknownAccount")?.frozen = *frozen;
                Ok(())
            }
            Operation::Deposit { account, amount, .. } => {
                self.credit(account, amount.minor())?;
                self.system_add(clearing(account.asset), -amount.minor());
                Ok(())
            }
            Operation::Withdraw { account, amount, .. } => {
                self.outflow(account, amount.minor())?;
                self.system_add(clearing(account.asset), amount.minor());
                Ok(())
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
                self.credit(to, amount.minor())
            }
            Operation::Reserve { reservation_id, account, amount, ttl_ms } => {
                let ttl = ttl_ms.unwrap_or(30 * 60 * 1_000);
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
                Ok(())
            }
            Operation::Commit { user_id, reservation_id, destination: AccountRef::User(to), amount } => {
                let reservation = *self.reservations.get(&(*user_id, *reservation_id)).ok_or("ReservationNotFound")?;
                if reservation.status != ReservationStatus::Active {
                    return Err("ReservationNotActive".into());
                }
                if self.now_ms >= reservation.expires_at {
                    return Err("ReservationExpired".into());
                }
                let committed = amount.map_or(reservation.amount, |amount| amount.minor());
                if committed > reservation.amount {
                    return Err("CommitExceedsReservation".into());
                }
                if to.asset != reservation.account.asset {
                    return Err("AssetMismatch".into());
                }
                if *to == reservation.account {
                    return Err("SameAccount".into());
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
                Ok(())
            }
            Operation::Release { user_id, reservation_id } => {
                let reservation = *self.reservations.get(&(*user_id, *reservation_id)).ok_or("ReservationNotFound")?;
                if reservation.status != ReservationStatus::Active {
                    return Err("ReservationNotActive".into());
                }
                self.close((*user_id, *reservation_id), ReservationStatus::Released);
                Ok(())
            }
            Operation::Convert { from, to, amount, .. } => {
                let bought = amount.minor() * SATS_PER_CENT;
                // Rounded up, in the platform's favour.
                let commission = (bought * i128::from(COMMISSION_BPS) + 9_999) / 10_000;
                self.accounts.get(from).ok_or("UnknownAccount")?;
                self.accounts.get(to).ok_or("UnknownAccount")?;
                self.outflow(from, amount.minor())?;
                self.system_add(liquidity(from.asset), amount.minor());
                self.credit(to, bought - commission)?;
                self.system_add(liquidity(to.asset), -bought);
                self.system_add(fees(to.asset), commission);
                Ok(())
            }
            Operation::LinkedBatch { operations } => {
                for (index, operation) in operations.iter().enumerate() {
                    self.apply(operation).map_err(|_| format!("BatchOperationFailed{index}"))?;
                }
                Ok(())
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

    fn advance(&mut self, ms: i64) {
        self.now_ms += ms;
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

fn open(account: UserAccount, overdraft: bool, limited: bool) -> Operation {
    Operation::OpenAccount {
        account,
        config: AccountConfig {
            overdraft_minor: if overdraft { 300 } else { 0 },
            limits: OutflowLimits { daily_minor: limited.then_some(600), ..OutflowLimits::default() },
            frozen: false,
        },
    }
}

fn simple_operation() -> BoxedStrategy<Operation> {
    let user = prop_oneof![4 => 0..USERS, 1 => Just(USERS)];
    let usd_account = (user.clone(), 0..2_u8).prop_map(|(user, which)| account(user, which));
    let reservation_id = (0..3_u128).prop_map(Uuid::from_u128);
    prop_oneof![
        1 => (usd_account.clone(), any::<bool>(), any::<bool>()).prop_map(|(account, overdraft, limited)| open(account, overdraft, limited)),
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
        4 => (reservation_id.clone(), usd_account.clone(), amount_strategy(), prop_oneof![Just(None), Just(Some(60_000_i64))])
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
        1 => (usd_account, 0..USERS, amount_strategy()).prop_map(|(from, user, minor)| Operation::Convert {
            from,
            to: account(user, 2),
            amount: amount(minor),
            price: Decimal::new(1, 5),
            commission_bps: COMMISSION_BPS,
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
        let settings = (any::<bool>(), any::<bool>(), 0..10_000_i128);
        proptest::collection::vec(settings, (USERS * 3) as usize)
            .prop_map(|settings| {
                let mut model = Model { now_ms: START_MS, ..Model::default() };
                for (index, (overdraft, limited, deposit)) in settings.into_iter().enumerate() {
                    let account = account(index as u128 / 3, (index % 3) as u8);
                    model.submit(&format!("init-{index}"), &open(account, overdraft, limited));
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
            let to = (0..USERS, 0..2_u8).prop_map(|(user, which)| account(user, which));
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
            2 => prop_oneof![1..=120_000_i64, Just(30 * 60 * 1_000)].prop_map(|ms| Transition::Advance { ms }),
        ]
        .boxed()
    }

    fn apply(mut state: Model, transition: &Transition) -> Model {
        match transition {
            Transition::Submit { key, operation } => state.submit(key, operation),
            Transition::Retry { .. } | Transition::Conflict { .. } => {}
            Transition::Advance { ms } => state.advance(*ms),
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
            let outcome = engine.execute(Request { key: key(text), now_ms: START_MS, operation: operation.clone() });
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
            Transition::Advance { .. } => {
                sut.engine.sweep(model.now_ms).unwrap();
            }
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
        }
        let model_system: BTreeMap<_, _> =
            model.system.iter().filter(|(_, v)| **v != 0).map(|(k, v)| (*k, *v)).collect();
        assert_eq!(state.system_minor, model_system);
        for ((user_id, reservation_id), expected) in &model.reservations {
            let reservation = state.reservations[&(*user_id, *reservation_id)];
            assert_eq!((reservation.amount_minor, reservation.status), (expected.amount, expected.status));
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

fn assert_outcome(actual: &Result<Receipt, EngineError>, expected: &Result<(), String>) {
    match (actual, expected) {
        (Ok(_), Ok(())) => {}
        (Err(EngineError::BatchOperationFailed { index, .. }), Err(name)) => {
            assert_eq!(format!("BatchOperationFailed{index}"), *name)
        }
        (Err(error), Err(name)) => assert_eq!(error_name(error), *name, "{error}"),
        (actual, expected) => panic!("engine gave {actual:?}, model expected {expected:?}"),
    }
}

prop_state_machine! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn engine_agrees_with_the_reference_model(sequential 1..80 => EngineUnderTest);
}
