//! Throughput of the outbox relay against the ledger's durable write rate, in one run.
//!
//! 1. Through the ledger: 1 024 concurrent callers submit transfers between 1 000 funded accounts
//!    with `Ledger::submit` (each waits for durability); the journal writer stores each transfer's
//!    two `balance_changed` events in the same transaction. Reported: durable ledger changes/s.
//! 2. The relay: `Relay::run_once` rounds publish that whole backlog to NATS JetStream (local
//!    server, a stream of its own), await every publish acknowledgement and move the delivery
//!    cursor past them. Reported: events published and acknowledged per second.
//!
//! Run: `cargo bench --bench outbox` (DATABASE_URL names a role that can create databases,
//! default postgres://postgres@127.0.0.1:5432/postgres; NATS with JetStream on 127.0.0.1:4222).
//! It creates and drops its own database and stream.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use diboas_ledger::engine::account::{AccountConfig, AccountRef, Domain, Provider, UserAccount};
use diboas_ledger::engine::asset::Asset;
use diboas_ledger::engine::idempotency::IdempotencyKey;
use diboas_ledger::engine::money::Amount;
use diboas_ledger::engine::operation::{Operation, Request};
use diboas_ledger::ledger::{Ledger, LedgerConfig};
use diboas_ledger::outbox::relay::{Relay, RelayConfig};
use diboas_ledger::store;
use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use uuid::Uuid;

const ACCOUNTS: u64 = 1_000;
const CALLERS: usize = 1_024;
const TRANSFERS: usize = 60_000;
/// Events per relay round.
const RELAY_BATCHES: [i64; 2] = [1_000, 5_000];
const DATABASE: &str = "diboas_bench_outbox";
const AT_MS: i64 = 1_800_000_000_000;

type BenchError = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), BenchError> {
    let base =
        std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let options = PgConnectOptions::from_str(&base)?.database(DATABASE);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async {
        let url = format!(
            "postgres://{}@{}:{}/{DATABASE}",
            options.get_username(),
            options.get_host(),
            options.get_port()
        );
        if sqlx::Postgres::database_exists(&url).await? {
            sqlx::Postgres::force_drop_database(&url).await?;
        }
        sqlx::Postgres::create_database(&url).await?;
        store::prepare(&options).await?;
        let changes_per_second = ledger_run(&options).await?;
        let pool = PgPoolOptions::new().max_connections(2).connect_with(options.clone()).await?;
        let (events,): (i64,) = sqlx::query_as("SELECT count(*) FROM ledger.outbox_events").fetch_one(&pool).await?;
        println!("outbox holds {events} events");
        for batch in RELAY_BATCHES {
            // Back to "nothing published yet": the relay's cursor and retries are its only state.
            sqlx::query("TRUNCATE ledger.outbox_deliveries, ledger.outbox_retries").execute(&pool).await?;
            sqlx::query("VACUUM ANALYZE ledger.outbox_events").execute(&pool).await?;
            let tag = Uuid::new_v4().simple().to_string();
            let config = RelayConfig {
                stream_name: format!("BENCH_{tag}"),
                subject_prefix: format!("bench{tag}.diboas.ledger"),
                batch_max_events: batch,
                ..RelayConfig::default()
            };
            let relay = Relay::connect(config.clone(), pool.clone()).await?;
            let started = Instant::now();
            let mut published = 0;
            loop {
                let attempt = relay.run_once().await?;
                if attempt.is_empty() {
                    break;
                }
                assert_eq!(attempt.acknowledged(), attempt.len(), "every publish acknowledged");
                published += attempt.len();
            }
            let per_second = published as f64 / started.elapsed().as_secs_f64();
            println!(
                "relay, {batch:>5} events per round: {published} events published and acknowledged, {per_second:>9.0} events/s ({:.2}x the ledger's changes/s)",
                per_second / changes_per_second
            );
            let client = async_nats::connect(config.nats_url.as_str()).await?;
            async_nats::jetstream::new(client).delete_stream(&config.stream_name).await?;
        }
        pool.close().await;
        sqlx::Postgres::force_drop_database(&url).await?;
        Ok(())
    })
}

fn user_account(n: u64) -> UserAccount {
    UserAccount { user_id: Uuid::from_u64_pair(0x0b7b, n), domain: Domain::Banking, asset: Asset::USD }
}

fn amount(minor: i128) -> Amount {
    Amount::from_minor(minor).unwrap_or_else(|_| unreachable!("bench amounts are positive and small"))
}

fn key(text: &str) -> IdempotencyKey {
    IdempotencyKey::new(text).unwrap_or_else(|_| unreachable!("bench keys are short and printable"))
}

/// Submits `operations` from `callers` concurrent tasks; returns how many per second were durable.
async fn submit_all(
    ledger: &Arc<Ledger>,
    callers: usize,
    operations: Vec<(String, Operation)>,
) -> Result<f64, BenchError> {
    let count = operations.len();
    let operations = Arc::new(operations);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let (ledger, next, operations) = (ledger.clone(), next.clone(), operations.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                let Some((name, operation)) = operations.get(index) else { return Ok::<(), BenchError>(()) };
                let outcome =
                    ledger.submit(Request { key: key(name), now_ms: AT_MS, operation: operation.clone() }).await?;
                assert!(outcome.result.is_ok(), "{outcome:?}");
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

async fn ledger_run(options: &PgConnectOptions) -> Result<f64, BenchError> {
    let ledger = Arc::new(Ledger::open(LedgerConfig::new(options.clone())).await?);
    let opens = (0..ACCOUNTS)
        .map(|n| {
            (format!("open-{n}"), Operation::OpenAccount { account: user_account(n), config: AccountConfig::default() })
        })
        .collect();
    submit_all(&ledger, 256, opens).await?;
    let funds = (0..ACCOUNTS)
        .map(|n| {
            let operation = Operation::Deposit {
                account: user_account(n),
                amount: amount(1_000_000_000),
                provider: Provider::Stripe,
            };
            (format!("fund-{n}"), operation)
        })
        .collect();
    submit_all(&ledger, 256, funds).await?;
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let transfers = (0..TRANSFERS)
        .map(|index| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let from = state % ACCOUNTS;
            let to = (from + 1 + (state >> 32) % (ACCOUNTS - 1)) % ACCOUNTS;
            let operation = Operation::Transfer {
                from: AccountRef::User(user_account(from)),
                to: AccountRef::User(user_account(to)),
                amount: amount(1),
            };
            (format!("t-{index}"), operation)
        })
        .collect();
    let per_second = submit_all(&ledger, CALLERS, transfers).await?;
    println!(
        "through the ledger: {CALLERS} callers, {TRANSFERS} transfers (2 events each), {per_second:>9.0} durable changes/s"
    );
    Arc::into_inner(ledger).ok_or("callers still hold the ledger")?.shutdown().await?;
    Ok(per_second)
}
