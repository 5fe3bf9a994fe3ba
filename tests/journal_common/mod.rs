//! Helpers shared by the journal tests: a prepared database, ledger settings, and requests.
//!
//! Each test gets a fresh database from `#[sqlx::test]` (DATABASE_URL must name a PostgreSQL
//! role that can create databases, e.g. postgres://postgres@127.0.0.1:5432/postgres).

#![allow(dead_code, reason = "each test binary uses a different subset of these helpers")]

use std::time::{SystemTime, UNIX_EPOCH};

use diboas_ledger::engine::account::{AccountConfig, AccountRef, Domain, OutflowLimits, Provider, UserAccount};
use diboas_ledger::engine::asset::Asset;
use diboas_ledger::engine::idempotency::IdempotencyKey;
use diboas_ledger::engine::money::Amount;
use diboas_ledger::engine::operation::{Operation, Request};
use diboas_ledger::ledger::LedgerConfig;
use diboas_ledger::store;
use rust_decimal::Decimal;
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use uuid::Uuid;

/// Migrates (already done by `#[sqlx::test]`, harmless again), seeds assets, creates partitions.
pub async fn prepared(pool: &PgPool) -> PgConnectOptions {
    let options = (*pool.connect_options()).clone();
    store::prepare(&options).await.expect("prepare the test database");
    options
}

pub fn config(options: PgConnectOptions) -> LedgerConfig {
    let mut config = LedgerConfig::new(options);
    // Small enough that the tests exercise several shards and batches, big enough for their load.
    config.engine.shard_count = 8;
    config
}

/// The database URL of `options`, for a child process.
pub fn url_of(options: &PgConnectOptions) -> String {
    format!(
        "postgres://{}@{}:{}/{}",
        options.get_username(),
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("postgres")
    )
}

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_millis() as i64
}

pub fn user(n: u128) -> Uuid {
    Uuid::from_u128(0x5eed_0000_0000_0000_0000_0000_0000_0000 + n)
}

pub fn account(n: u128, domain: Domain, asset: Asset) -> UserAccount {
    UserAccount { user_id: user(n), domain, asset }
}

pub fn request(key: &str, now_ms: i64, operation: Operation) -> Request {
    Request { key: IdempotencyKey::new(key).expect("valid key"), now_ms, operation }
}

pub fn amount(minor: i128) -> Amount {
    Amount::from_minor(minor).expect("valid amount")
}

pub fn open(account: UserAccount) -> Operation {
    Operation::OpenAccount { account, config: AccountConfig::default() }
}

pub fn deposit(account: UserAccount, minor: i128) -> Operation {
    Operation::Deposit { account, amount: amount(minor), provider: Provider::Stripe }
}

pub fn transfer(from: UserAccount, to: UserAccount, minor: i128) -> Operation {
    Operation::Transfer { from: AccountRef::User(from), to: AccountRef::User(to), amount: amount(minor) }
}

/// A workload touching every kind of change: accounts with settings, deposits, transfers across
/// shards, reservations committed in part, released and expired, a conversion, a freeze, a
/// recorded refusal and a linked batch.
pub fn mixed_workload(now_ms: i64) -> Vec<Request> {
    let alice_usd = account(1, Domain::Banking, Asset::USD);
    let bob_usd = account(2, Domain::Banking, Asset::USD);
    let alice_eth = account(1, Domain::Investing, Asset::ETH);
    let carol_usdc = account(3, Domain::Defi, Asset::USDC_SOLANA);
    let limited = AccountConfig {
        overdraft_minor: 5_000,
        limits: OutflowLimits {
            per_transaction_minor: Some(1_000_000),
            daily_minor: Some(2_000_000),
            monthly_minor: None,
        },
        frozen: false,
    };
    let mut operations = vec![
        Operation::OpenAccount { account: alice_usd, config: limited },
        open(bob_usd),
        open(alice_eth),
        open(carol_usdc),
        deposit(alice_usd, 1_000_000),
        Operation::Deposit {
            account: alice_eth,
            amount: amount(3_000_000_000_000_000_000),
            provider: Provider::Moonpay,
        },
        deposit(carol_usdc, 7_500_000),
        transfer(alice_usd, bob_usd, 250_000),
        Operation::Reserve { reservation_id: user(100), account: alice_usd, amount: amount(100_000), ttl_ms: None },
        Operation::Commit {
            user_id: alice_usd.user_id,
            reservation_id: user(100),
            destination: AccountRef::User(bob_usd),
            amount: Some(amount(60_000)),
        },
        Operation::Reserve { reservation_id: user(101), account: bob_usd, amount: amount(10_000), ttl_ms: None },
        Operation::Release { user_id: bob_usd.user_id, reservation_id: user(101) },
        Operation::Reserve { reservation_id: user(102), account: bob_usd, amount: amount(5_000), ttl_ms: Some(1_000) },
        Operation::Reserve { reservation_id: user(103), account: carol_usdc, amount: amount(1_000), ttl_ms: None },
        Operation::Convert {
            from: alice_eth,
            to: alice_usd,
            amount: amount(1_000_000_000_000_000_000),
            price: Decimal::new(3_000, 0),
            commission_bps: 50,
        },
        Operation::SetFrozen { account: carol_usdc, frozen: true },
        // Refused (insufficient funds), and the refusal is recorded under its key.
        transfer(bob_usd, alice_usd, 999_999_999),
        Operation::LinkedBatch { operations: vec![deposit(bob_usd, 1_000), transfer(bob_usd, alice_usd, 500)] },
    ];
    // The exchange needs liquidity in USD for the conversion: seeded from a deposit through it.
    operations.insert(
        5,
        Operation::Transfer {
            from: AccountRef::User(alice_usd),
            to: AccountRef::System(diboas_ledger::engine::account::SystemAccount {
                kind: diboas_ledger::engine::account::SystemKind::ExchangeLiquidity,
                asset: Asset::USD,
            }),
            amount: amount(10_000),
        },
    );
    operations
        .into_iter()
        .enumerate()
        .map(|(index, operation)| request(&format!("mixed-{index}"), now_ms, operation))
        .collect()
}
