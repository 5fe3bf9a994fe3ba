//! Shared test harness for the engine tests: an engine over an in-memory journal, unique
//! idempotency keys, and an assertion that refused operations change no money state.
#![allow(dead_code, reason = "each test file uses a different part of the harness")]

use diboas_ledger::engine::account::{
    AccountConfig, AccountRef, Balance, Domain, Provider, SystemAccount, SystemKind, UserAccount,
};
use diboas_ledger::engine::asset::Asset;
use diboas_ledger::engine::effect::{Effect, Slot};
use diboas_ledger::engine::error::EngineError;
use diboas_ledger::engine::idempotency::IdempotencyKey;
use diboas_ledger::engine::money::Amount;
use diboas_ledger::engine::operation::{Operation, Receipt, Request};
use diboas_ledger::engine::record::{JournalRecord, MemoryJournal};
use diboas_ledger::engine::state::EngineState;
use diboas_ledger::engine::{Engine, EngineConfig, Outcome};
use uuid::Uuid;

pub const START_MS: i64 = 1_790_000_000_000;

pub struct Harness {
    pub engine: Engine<MemoryJournal>,
    pub now_ms: i64,
    next_key: u64,
}

pub fn amount(minor: i128) -> Amount {
    Amount::from_minor(minor).unwrap()
}

pub fn key(text: &str) -> IdempotencyKey {
    IdempotencyKey::new(text).unwrap()
}

pub fn user_account(user: u128, domain: Domain, asset: Asset) -> UserAccount {
    UserAccount { user_id: Uuid::from_u128(user), domain, asset }
}

pub fn usd(user: u128) -> UserAccount {
    user_account(user, Domain::Banking, Asset::USD)
}

pub fn clearing(provider: Provider, asset: Asset) -> SystemAccount {
    SystemAccount { kind: SystemKind::ProviderClearing(provider), asset }
}

/// The money part of the state: what a refused operation must leave exactly as it was.
pub fn money_state(state: &EngineState) -> impl PartialEq + std::fmt::Debug + use<> {
    (state.accounts.clone(), state.system_minor.clone(), state.reservations.clone())
}

impl Harness {
    pub fn new() -> Harness {
        Harness::with_config(EngineConfig { shard_count: 8, ..EngineConfig::default() })
    }

    pub fn with_config(config: EngineConfig) -> Harness {
        Harness { engine: Engine::new(config, MemoryJournal::default()), now_ms: START_MS, next_key: 0 }
    }

    pub fn fresh_key(&mut self) -> IdempotencyKey {
        self.next_key += 1;
        key(&format!("key-{}", self.next_key))
    }

    pub fn run(&mut self, operation: Operation) -> Outcome {
        let key = self.fresh_key();
        self.engine.execute(Request { key, now_ms: self.now_ms, operation })
    }

    /// Runs `operation`, which must succeed; checks the invariants afterwards.
    pub fn ok(&mut self, operation: Operation) -> Receipt {
        let outcome = self.run(operation.clone());
        let receipt = outcome.result.unwrap_or_else(|error| panic!("{operation:?} failed: {error}"));
        self.engine.state().check_invariants().unwrap();
        self.engine.check_indexes().unwrap();
        receipt
    }

    /// Runs `operation`, which must be refused without changing any money state.
    pub fn refused(&mut self, operation: Operation) -> EngineError {
        let before = money_state(&self.engine.state());
        let outcome = self.run(operation.clone());
        let error = outcome.result.expect_err(&format!("{operation:?} should have been refused"));
        assert_eq!(money_state(&self.engine.state()), before, "refused {operation:?} changed state");
        self.engine.state().check_invariants().unwrap();
        self.engine.check_indexes().unwrap();
        error
    }

    pub fn open(&mut self, account: UserAccount, config: AccountConfig) {
        self.ok(Operation::OpenAccount { account, config });
    }

    pub fn open_funded(&mut self, account: UserAccount, amount_minor: i128) {
        self.open(account, AccountConfig::default());
        if amount_minor > 0 {
            self.ok(Operation::Deposit { account, amount: amount(amount_minor), provider: Provider::Stripe });
        }
    }

    /// Moves the clock two retention windows on, sweeping after each: the engine has then
    /// forgotten every key, closed reservation and finished transaction from before.
    pub fn forget_the_past(&mut self) {
        for _ in 0..2 {
            self.now_ms += self.engine.config().retention_ms;
            self.engine.sweep(self.now_ms).unwrap();
        }
    }

    /// A new engine of this one's configuration, with `records` replayed into it.
    pub fn replayed(&self, records: &[JournalRecord]) -> Engine<MemoryJournal> {
        let replayed = Engine::new(*self.engine.config(), MemoryJournal::default());
        for record in records {
            replayed.apply_record(record).unwrap();
        }
        replayed
    }

    pub fn balance(&self, account: UserAccount) -> Balance {
        self.engine.balance(&AccountRef::User(account)).unwrap()
    }

    pub fn system_balance(&self, account: SystemAccount) -> i128 {
        self.engine.balance(&AccountRef::System(account)).unwrap().available_minor
    }
}

/// `record` with one more effect that fails its replay check (a posting from an account that
/// does not exist): a record the replay refuses only after applying `record`'s own effects.
pub fn failing_after_its_effects(record: &JournalRecord) -> JournalRecord {
    let mut failing = record.clone();
    failing.effects.push(Effect::Posting { from: Slot::User(usd(u128::MAX)), to: Slot::User(usd(1)), amount_minor: 1 });
    failing
}
