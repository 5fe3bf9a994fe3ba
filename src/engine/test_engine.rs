//! An engine with one funded account and one Active reservation, for the unit tests that look
//! inside its stores and indexes (closed reservations, the index check).

use uuid::Uuid;

use super::account::{AccountConfig, Domain, Provider, UserAccount};
use super::asset::Asset;
use super::error::EngineError;
use super::idempotency::IdempotencyKey;
use super::money::Amount;
use super::operation::{Operation, Receipt, Request};
use super::record::MemoryJournal;
use super::{Engine, EngineConfig};

/// The time every request of these tests is made at.
pub const NOW_MS: i64 = 1_000;

pub struct TestEngine {
    pub engine: Engine<MemoryJournal>,
    /// User 1's banking USD account: 100 minor units deposited under the key "fund", 10 of them
    /// reserved under the key "hold".
    pub account: UserAccount,
    /// The reservation: id 7, Active, expiring at `NOW_MS` plus the default lifetime.
    pub reservation_id: Uuid,
}

impl TestEngine {
    pub fn with_a_reservation() -> TestEngine {
        let engine = Engine::new(EngineConfig::default(), MemoryJournal::default());
        let account = UserAccount { user_id: Uuid::from_u128(1), domain: Domain::Banking, asset: Asset::USD };
        let reservation_id = Uuid::from_u128(7);
        let test = TestEngine { engine, account, reservation_id };
        let amount = |minor| Amount::from_minor(minor).unwrap_or_else(|error| panic!("{error}"));
        test.run("open", Operation::OpenAccount { account, config: AccountConfig::default() }).unwrap();
        test.run("fund", Operation::Deposit { account, amount: amount(100), provider: Provider::Stripe }).unwrap();
        test.run("hold", Operation::Reserve { reservation_id, account, amount: amount(10), ttl_ms: None }).unwrap();
        test
    }

    /// Runs `operation` under `key` at `NOW_MS`.
    pub fn run(&self, key: &str, operation: Operation) -> Result<Receipt, EngineError> {
        let key = IdempotencyKey::new(key).unwrap_or_else(|error| panic!("{error}"));
        self.engine.execute(Request { key, now_ms: NOW_MS, operation }).result
    }
}
