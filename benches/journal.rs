//! Durable throughput of the journal, against the per-operation baseline, in one run.
//!
//! Journal alone: transfers between 10 000 accounts (and, last, among 100 hot ones) are executed
//! in an engine whose sink is an in-memory channel; the records are then made durable with the
//! writer's own batch code (`journal::batch`: JSON encoding, one transaction per batch with the
//! projections coalesced per account, fsync on commit) at batch sizes 1, 16, 256 and 4096.
//!
//! Through the ledger: the same kind of transfers submitted by 64 and by 4096 concurrent callers
//! to `Ledger::submit`, each answered only once its batch committed (engine, channel, writer thread
//! and PostgreSQL, with batches forming by themselves).
//!
//! Baseline: what a service without the engine would do: each transfer its own transaction
//! (SELECT ... FOR UPDATE both balances, UPDATE both, INSERT a history row, COMMIT), with 1 and
//! with 16 concurrent connections, and with 16 on the 100 hot accounts.
//!
//! PostgreSQL's own ceiling: the same appends (journal rows, idempotency keys, outbox events), shaped
//! like the rows the journal alone wrote, sent with binary COPY from payloads built before the
//! clock starts, in transactions of 4 096 operations, on one and on two backends. The client only
//! sends bytes, so this is about as fast as PostgreSQL, with its settings and over the same kind
//! of connection as the writer, appends these rows here. Then the same appends in transactions of
//! 128 operations, one UNNEST statement each, as the writer's small batches under unary load.
//!
//! Run: `cargo bench --bench journal` (DATABASE_URL names a role that can create databases and
//! run CHECKPOINT, i.e. a superuser or a member of pg_checkpoint; default
//! postgres://postgres@127.0.0.1:5432/postgres). It creates and drops its own databases.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use diboas_ledger::engine::account::{AccountConfig, AccountRef, Domain, Provider, UserAccount};
use diboas_ledger::engine::asset::Asset;
use diboas_ledger::engine::idempotency::IdempotencyKey;
use diboas_ledger::engine::money::Amount;
use diboas_ledger::engine::operation::{Operation, Request};
use diboas_ledger::engine::record::JournalRecord;
use diboas_ledger::engine::{Engine, EngineConfig};
use diboas_ledger::journal::JournalConfig;
use diboas_ledger::journal::batch::{Batch, write_batch};
use diboas_ledger::journal::copy_rows::CopyRows;
use diboas_ledger::ledger::{Ledger, LedgerConfig};
use diboas_ledger::store;
use rust_decimal::Decimal;
use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

const ACCOUNTS: u64 = 10_000;
/// Transfers in the hot runs stay among this many accounts (where coalescing per account pays).
const HOT_ACCOUNTS: u64 = 100;
/// (batch size, transfers written at that size, accounts they move between): a few seconds each.
const JOURNAL_RUNS: [(usize, usize, u64); 5] = [
    (1, 2_000, ACCOUNTS),
    (16, 16_000, ACCOUNTS),
    (256, 200_000, ACCOUNTS),
    (4_096, 400_000, ACCOUNTS),
    (4_096, 400_000, HOT_ACCOUNTS),
];
/// Concurrent callers and transfers for the run through `Ledger::submit`.
/// (concurrent callers, transfers) for the runs through `Ledger::submit`: few callers show the
/// latency of a lightly loaded ledger, many show its throughput.
const LEDGER_RUNS: [(usize, usize); 2] = [(64, 50_000), (4_096, 400_000)];
/// (concurrent connections, transfers, accounts) for the per-operation baseline.
const BASELINE_RUNS: [(usize, usize, u64); 3] =
    [(1, 2_000, ACCOUNTS), (16, 8_000, ACCOUNTS), (16, 8_000, HOT_ACCOUNTS)];
/// Operations per transaction in the ceiling's rounds: the writer's large batches.
const CEILING_OPERATIONS_PER_TRANSACTION: i64 = 4_096;
/// Operations each backend appends in one ceiling round: about a second's worth or more.
const CEILING_OPERATIONS_PER_ROUND: i64 = 25 * CEILING_OPERATIONS_PER_TRANSACTION;
/// Rounds of each ceiling configuration, so its spread shows.
const CEILING_ROUNDS: usize = 3;
/// Operations per transaction in the small-transaction ceiling: about the batch a unary caller's
/// p99 under 10 ms leaves room for.
const CEILING_SMALL_OPERATIONS_PER_TRANSACTION: usize = 128;
/// Transactions in one small-transaction round: about a second's worth or more.
const CEILING_SMALL_TRANSACTIONS_PER_ROUND: usize = 200;
/// A transfer's appends for a whole small transaction in one statement, so one round trip, as the
/// writer's `ledger.write_batch` call does for batches below `copy_min_bytes`.
const CEILING_SMALL_TRANSACTION: &str = "WITH journal AS (
        INSERT INTO ledger.journal (sequence, at_ms, kind, idempotency_key, record)
        SELECT s, $2, 'request', k, r::json FROM UNNEST($1::bigint[], $3::text[], $4::text[]) AS t(s, k, r)
    ), keys AS (
        INSERT INTO ledger.idempotency_keys (key, sequence, recorded_at_ms)
        SELECT k, s, $2 FROM UNNEST($3::text[], $1::bigint[]) AS t(k, s)
    )
    INSERT INTO ledger.outbox_events (event_id, sequence, ordinal, aggregate_type, aggregate_id, event_type, version,
        payload, metadata)
    SELECT i, s, o, at, ai, et, $5, p::json, m::json
    FROM UNNEST($6::uuid[], $7::bigint[], $8::integer[], $9::text[], $10::text[], $11::text[], $12::text[],
        $13::text[]) WITH ORDINALITY AS t(i, s, o, at, ai, et, p, m, n)
    ORDER BY n";
const JOURNAL_DATABASE: &str = "diboas_bench_journal";
const LEDGER_DATABASE: &str = "diboas_bench_ledger";
/// A fixed request time, so every run writes the same records.
const AT_MS: i64 = 1_800_000_000_000;

type BenchError = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), BenchError> {
    let base =
        std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let base = PgConnectOptions::from_str(&base)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async {
        let journal_options = fresh_database(&base, JOURNAL_DATABASE).await?;
        let journal = journal_alone(&journal_options).await?;
        let baseline = baseline(&journal_options).await?;
        // After the baseline: the ceiling writes gigabytes that PostgreSQL flushes for a while.
        let ceiling = postgres_ceiling(&journal_options).await?;
        drop_database(&journal_options).await?;
        let ledger_options = fresh_database(&base, LEDGER_DATABASE).await?;
        let ledger = through_ledger(&ledger_options).await?;
        drop_database(&ledger_options).await?;
        println!("best journal alone / best baseline: {:.1}x", journal / baseline);
        println!(
            "best journal alone / PostgreSQL's ceiling for the same appends on one backend: {:.0} %",
            100.0 * journal / ceiling
        );
        println!("through the ledger / best baseline: {:.1}x", ledger / baseline);
        Ok(())
    })
}

/// The URL of `options`; a Unix socket directory as host is percent-encoded, so the bench also
/// runs over a socket (`DATABASE_URL=postgres://postgres@%2Fvar%2Frun%2Fpostgresql/postgres`).
fn url_of(options: &PgConnectOptions) -> String {
    let database = options.get_database().unwrap_or("postgres");
    let host = options.get_host().replace('/', "%2F");
    format!("postgres://{}@{host}:{}/{database}", options.get_username(), options.get_port())
}

async fn fresh_database(base: &PgConnectOptions, name: &str) -> Result<PgConnectOptions, BenchError> {
    let options = base.clone().database(name);
    drop_database(&options).await?;
    sqlx::Postgres::create_database(&url_of(&options)).await?;
    store::prepare(&options).await?;
    Ok(options)
}

async fn drop_database(options: &PgConnectOptions) -> Result<(), BenchError> {
    let url = url_of(options);
    if sqlx::Postgres::database_exists(&url).await? {
        sqlx::Postgres::force_drop_database(&url).await?;
    }
    Ok(())
}

fn user_account(n: u64) -> UserAccount {
    UserAccount { user_id: Uuid::from_u64_pair(0xbe7c, n), domain: Domain::Banking, asset: Asset::USD }
}

fn amount(minor: i128) -> Amount {
    Amount::from_minor(minor).unwrap_or_else(|_| unreachable!("bench amounts are positive and small"))
}

fn key(text: &str) -> IdempotencyKey {
    IdempotencyKey::new(text).unwrap_or_else(|_| unreachable!("bench keys are short and printable"))
}

/// A small deterministic generator, so every run makes the same transfers.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Two different accounts among the first `accounts`.
    fn pair(&mut self, accounts: u64) -> (u64, u64) {
        let from = self.next() % accounts;
        (from, (from + 1 + self.next() % (accounts - 1)) % accounts)
    }
}

fn setup_operations() -> impl Iterator<Item = Operation> {
    (0..ACCOUNTS).flat_map(|n| {
        [
            Operation::OpenAccount { account: user_account(n), config: AccountConfig::default() },
            Operation::Deposit { account: user_account(n), amount: amount(1_000_000_000), provider: Provider::Stripe },
        ]
    })
}

fn transfer(random: &mut XorShift, accounts: u64) -> Operation {
    let (from, to) = random.pair(accounts);
    Operation::Transfer {
        from: AccountRef::User(user_account(from)),
        to: AccountRef::User(user_account(to)),
        amount: amount(1 + (random.next() % 1_000) as i128),
    }
}

async fn journal_alone(options: &PgConnectOptions) -> Result<f64, BenchError> {
    let (sender, receiver) = crossbeam_channel::unbounded();
    let engine = Engine::new(EngineConfig::default(), sender);
    let mut executed = 0_u64;
    let mut execute = |operation: Operation| {
        executed += 1;
        let outcome = engine.execute(Request { key: key(&format!("bench-{executed}")), now_ms: AT_MS, operation });
        assert!(outcome.result.is_ok(), "{outcome:?}");
    };
    setup_operations().for_each(&mut execute);
    let setup: Vec<JournalRecord> = receiver.try_iter().map(|record| *record).collect();
    let mut random = XorShift(0x2545_f491_4f6c_dd1d);
    for (_, count, accounts) in JOURNAL_RUNS {
        for _ in 0..count {
            execute(transfer(&mut random, accounts));
        }
    }
    let mut records: Vec<JournalRecord> = receiver.try_iter().map(|record| *record).collect();

    let mut conn = PgConnection::connect_with(options).await?;
    let mut committed = 0;
    for chunk in setup.chunks(4_096) {
        committed = write(&mut conn, chunk, committed).await?;
    }
    println!("journal alone (durable; JSON encoding + one transaction per batch), {ACCOUNTS} accounts:");
    let mut best: f64 = 0.0;
    for (batch_size, count, accounts) in JOURNAL_RUNS {
        let run: Vec<JournalRecord> = records.drain(..count).collect();
        let started = Instant::now();
        for chunk in run.chunks(batch_size) {
            committed = write(&mut conn, chunk, committed).await?;
        }
        let per_second = count as f64 / started.elapsed().as_secs_f64();
        best = best.max(per_second);
        println!(
            "  batch {batch_size:>5}: {count:>7} transfers among {accounts:>5} accounts, {per_second:>9.0} durable ops/s"
        );
    }
    conn.close().await?;
    Ok(best)
}

/// One outbox event of the sampled transfer, as the writer stores it.
struct SampleEvent {
    aggregate_type: String,
    aggregate_id: String,
    event_type: String,
    payload: String,
    metadata: String,
}

/// The last transfer the journal alone wrote: its record's JSON and its outbox events.
struct CeilingSample {
    record: String,
    events: Vec<SampleEvent>,
}

/// What a ceiling configuration appends per operation.
#[derive(Clone, Copy)]
enum CeilingRows {
    /// The journal row only.
    Journal,
    /// What the writer appends per transfer: journal row, idempotency key, outbox events.
    Full,
}

/// The COPY payloads of one transaction, built before the clock starts.
struct CeilingTransaction {
    operations: u64,
    journal: CopyRows,
    /// In a `CeilingRows::Full` configuration only.
    keys_and_events: Option<KeysAndEvents>,
}

/// The idempotency keys (one per operation) and outbox events of one transaction.
struct KeysAndEvents {
    keys: CopyRows,
    events: CopyRows,
    event_rows: u64,
}

/// PostgreSQL appending, with nothing else to do, the rows the writer appends. Returns the best
/// operations per second of the full set (journal row, idempotency key and the transfer's outbox
/// events) on one backend, as the writer has one connection.
///
/// Every payload is built before its round starts, with the writer's own binary COPY encoder
/// (`CopyRows`), so during a round the client only sends bytes: BEGIN, the COPYs, COMMIT, with
/// `CEILING_OPERATIONS_PER_TRANSACTION` operations per transaction as in the writer's large
/// batches, over the same connection kind as the writer (sqlx, `DATABASE_URL`). The rows copy the
/// last transfer the journal alone wrote, so they are as large as real ones. Balance updates are
/// left out, so the figure is generous. Every round starts after an untimed CHECKPOINT, so no
/// round pays for an earlier one's dirty pages.
async fn postgres_ceiling(options: &PgConnectOptions) -> Result<f64, BenchError> {
    let mut conn = PgConnection::connect_with(options).await?;
    let (last_sequence,): (i64,) =
        sqlx::query_as("SELECT max(sequence) FROM ledger.journal").fetch_one(&mut conn).await?;
    let (record,): (String,) = sqlx::query_as("SELECT record::text FROM ledger.journal WHERE sequence = $1")
        .bind(last_sequence)
        .fetch_one(&mut conn)
        .await?;
    let events: Vec<(String, String, String, String, String)> = sqlx::query_as(
        "SELECT aggregate_type, aggregate_id, event_type, payload::text, metadata::text
         FROM ledger.outbox_events WHERE sequence = $1 ORDER BY ordinal",
    )
    .bind(last_sequence)
    .fetch_all(&mut conn)
    .await?;
    if events.is_empty() {
        return Err("the last transfer has no outbox events to copy".into());
    }
    let events = events
        .into_iter()
        .map(|(aggregate_type, aggregate_id, event_type, payload, metadata)| SampleEvent {
            aggregate_type,
            aggregate_id,
            event_type,
            payload,
            metadata,
        })
        .collect();
    let sample = CeilingSample { record, events };
    let event_json_bytes: usize = sample.events.iter().map(|event| event.payload.len() + event.metadata.len()).sum();
    println!(
        "PostgreSQL's own ceiling (durable ops/s per round; binary COPY of payloads built beforehand, then COMMIT, {CEILING_OPERATIONS_PER_TRANSACTION} operations per transaction, unless the line says otherwise):"
    );
    let mut second = PgConnection::connect_with(options).await?;
    let mut next_sequence = last_sequence + 1;
    let mut best_one_backend_full_per_second: f64 = 0.0;
    let configurations = [
        (CeilingRows::Journal, 1, format!("journal rows only ({} bytes of JSON each)", sample.record.len())),
        (
            CeilingRows::Full,
            1,
            format!(
                "journal row + idempotency key + {} outbox events ({event_json_bytes} bytes of JSON)",
                sample.events.len()
            ),
        ),
        (CeilingRows::Journal, 2, "journal rows only, two backends side by side".to_owned()),
        (CeilingRows::Full, 2, "journal row + key + events, two backends side by side".to_owned()),
    ];
    for (rows, backends, what) in configurations {
        let mut rounds_per_second = Vec::new();
        for _ in 0..CEILING_ROUNDS {
            let first = ceiling_payloads(&sample, rows, next_sequence)?;
            next_sequence += CEILING_OPERATIONS_PER_ROUND;
            let other = if backends == 2 {
                let payloads = ceiling_payloads(&sample, rows, next_sequence)?;
                next_sequence += CEILING_OPERATIONS_PER_ROUND;
                payloads
            } else {
                Vec::new()
            };
            sqlx::raw_sql("CHECKPOINT").execute(&mut conn).await?;
            let started = Instant::now();
            let (first_operations, other_operations) =
                tokio::try_join!(ceiling_round(&mut conn, first), ceiling_round(&mut second, other))?;
            rounds_per_second.push((first_operations + other_operations) as f64 / started.elapsed().as_secs_f64());
        }
        if matches!(rows, CeilingRows::Full) && backends == 1 {
            best_one_backend_full_per_second =
                rounds_per_second.iter().copied().fold(best_one_backend_full_per_second, f64::max);
        }
        let rounds: Vec<String> = rounds_per_second.iter().map(|per_second| format!("{per_second:.0}")).collect();
        println!("  {what}: {}", rounds.join(" / "));
    }
    small_transaction_ceiling(&mut conn, &sample, &mut next_sequence).await?;
    second.close().await?;
    conn.close().await?;
    Ok(best_one_backend_full_per_second)
}

/// The arrays of one small transaction (see `CEILING_SMALL_TRANSACTION`), built before the clock
/// starts.
#[derive(Default)]
struct SmallTransaction {
    sequences: Vec<i64>,
    keys: Vec<String>,
    records: Vec<String>,
    event_ids: Vec<Uuid>,
    event_sequences: Vec<i64>,
    event_ordinals: Vec<i32>,
    aggregate_types: Vec<String>,
    aggregate_ids: Vec<String>,
    event_types: Vec<String>,
    payloads: Vec<String>,
    metadata: Vec<String>,
}

/// The full appends in transactions of `CEILING_SMALL_OPERATIONS_PER_TRANSACTION`, one statement
/// each, on one backend: the bound a writer meets when unary callers want an answer within a few
/// milliseconds. Prints each round's operations per second and mean commit time.
async fn small_transaction_ceiling(
    conn: &mut PgConnection,
    sample: &CeilingSample,
    next_sequence: &mut i64,
) -> Result<(), BenchError> {
    let mut rounds = Vec::new();
    for _ in 0..CEILING_ROUNDS {
        let mut transactions = Vec::with_capacity(CEILING_SMALL_TRANSACTIONS_PER_ROUND);
        for _ in 0..CEILING_SMALL_TRANSACTIONS_PER_ROUND {
            let mut transaction = SmallTransaction::default();
            for _ in 0..CEILING_SMALL_OPERATIONS_PER_TRANSACTION {
                let sequence = *next_sequence;
                *next_sequence += 1;
                transaction.sequences.push(sequence);
                transaction.keys.push(format!("ceiling-{sequence}"));
                transaction.records.push(sample.record.clone());
                for (ordinal, event) in sample.events.iter().enumerate() {
                    transaction.event_ids.push(Uuid::from_u64_pair(sequence as u64, ordinal as u64));
                    transaction.event_sequences.push(sequence);
                    transaction.event_ordinals.push(i32::try_from(ordinal)?);
                    transaction.aggregate_types.push(event.aggregate_type.clone());
                    transaction.aggregate_ids.push(event.aggregate_id.clone());
                    transaction.event_types.push(event.event_type.clone());
                    transaction.payloads.push(event.payload.clone());
                    transaction.metadata.push(event.metadata.clone());
                }
            }
            transactions.push(transaction);
        }
        sqlx::raw_sql("CHECKPOINT").execute(&mut *conn).await?;
        let started = Instant::now();
        for transaction in &transactions {
            let event_rows = sqlx::query(CEILING_SMALL_TRANSACTION)
                .bind(&transaction.sequences)
                .bind(AT_MS)
                .bind(&transaction.keys)
                .bind(&transaction.records)
                .bind(diboas_ledger::outbox::event::PAYLOAD_VERSION)
                .bind(&transaction.event_ids)
                .bind(&transaction.event_sequences)
                .bind(&transaction.event_ordinals)
                .bind(&transaction.aggregate_types)
                .bind(&transaction.aggregate_ids)
                .bind(&transaction.event_types)
                .bind(&transaction.payloads)
                .bind(&transaction.metadata)
                .execute(&mut *conn)
                .await?
                .rows_affected();
            if event_rows != transaction.event_ids.len() as u64 {
                return Err(format!("a small ceiling transaction appended {event_rows} events").into());
            }
        }
        let elapsed_s = started.elapsed().as_secs_f64();
        let operations = (CEILING_SMALL_TRANSACTIONS_PER_ROUND * CEILING_SMALL_OPERATIONS_PER_TRANSACTION) as f64;
        let transaction_ms = 1_000.0 * elapsed_s / CEILING_SMALL_TRANSACTIONS_PER_ROUND as f64;
        rounds.push(format!("{:.0} ({transaction_ms:.1} ms each)", operations / elapsed_s));
    }
    println!(
        "  journal row + key + events, {CEILING_SMALL_OPERATIONS_PER_TRANSACTION} operations per transaction in one statement (UNNEST), one backend: {}",
        rounds.join(" / ")
    );
    Ok(())
}

/// The COPY payloads of `CEILING_OPERATIONS_PER_ROUND` operations from `first_sequence` on, one
/// entry per transaction.
fn ceiling_payloads(
    sample: &CeilingSample,
    rows: CeilingRows,
    first_sequence: i64,
) -> Result<Vec<CeilingTransaction>, BenchError> {
    let transactions = CEILING_OPERATIONS_PER_ROUND / CEILING_OPERATIONS_PER_TRANSACTION;
    let operations = CEILING_OPERATIONS_PER_TRANSACTION as usize;
    let mut payloads = Vec::new();
    for transaction in 0..transactions {
        let first = first_sequence + transaction * CEILING_OPERATIONS_PER_TRANSACTION;
        let sequences = first..first + CEILING_OPERATIONS_PER_TRANSACTION;
        let mut journal = CopyRows::new(operations * (sample.record.len() + 64));
        for sequence in sequences.clone() {
            journal.row(5);
            journal.int8(sequence);
            journal.int8(AT_MS);
            journal.text("request")?;
            journal.text(&format!("ceiling-{sequence}"))?;
            journal.text(&sample.record)?;
        }
        let keys_and_events = match rows {
            CeilingRows::Journal => None,
            CeilingRows::Full => Some(ceiling_keys_and_events(sample, sequences)?),
        };
        payloads.push(CeilingTransaction { operations: operations as u64, journal, keys_and_events });
    }
    Ok(payloads)
}

/// The idempotency keys and outbox events of the operations numbered `sequences`.
fn ceiling_keys_and_events(
    sample: &CeilingSample,
    sequences: std::ops::Range<i64>,
) -> Result<KeysAndEvents, BenchError> {
    let operations = sequences.clone().count();
    let event_bytes: usize = sample.events.iter().map(|event| event.payload.len() + event.metadata.len() + 128).sum();
    let mut keys = CopyRows::new(operations * 64);
    let mut events = CopyRows::new(operations * event_bytes);
    for sequence in sequences {
        keys.row(3);
        keys.text(&format!("ceiling-{sequence}"))?;
        keys.int8(sequence);
        keys.int8(AT_MS);
        for (ordinal, event) in sample.events.iter().enumerate() {
            events.row(9);
            events.uuid(Uuid::from_u64_pair(sequence as u64, ordinal as u64));
            events.int8(sequence);
            events.int4(i32::try_from(ordinal)?);
            events.text(&event.aggregate_type)?;
            events.text(&event.aggregate_id)?;
            events.text(&event.event_type)?;
            events.int2(diboas_ledger::outbox::event::PAYLOAD_VERSION);
            events.text(&event.payload)?;
            events.text(&event.metadata)?;
        }
    }
    Ok(KeysAndEvents { keys, events, event_rows: (operations * sample.events.len()) as u64 })
}

/// One round on one connection: each transaction's payloads with binary COPY, then COMMIT.
/// Returns the operations committed.
async fn ceiling_round(conn: &mut PgConnection, transactions: Vec<CeilingTransaction>) -> Result<u64, BenchError> {
    let mut operations = 0;
    for payloads in transactions {
        let mut tx = conn.begin().await?;
        let journal_rows = payloads
            .journal
            .copy_into(
                &mut tx,
                "COPY ledger.journal (sequence, at_ms, kind, idempotency_key, record) FROM STDIN WITH (FORMAT binary)",
            )
            .await?;
        let (key_rows, event_rows, expected_event_rows) = match payloads.keys_and_events {
            None => (payloads.operations, 0, 0),
            Some(KeysAndEvents { keys, events, event_rows }) => {
                let key_rows = keys
                    .copy_into(
                        &mut tx,
                        "COPY ledger.idempotency_keys (key, sequence, recorded_at_ms) FROM STDIN WITH (FORMAT binary)",
                    )
                    .await?;
                let copied_event_rows = events
                    .copy_into(
                        &mut tx,
                        "COPY ledger.outbox_events (event_id, sequence, ordinal, aggregate_type, aggregate_id,
                            event_type, version, payload, metadata) FROM STDIN WITH (FORMAT binary)",
                    )
                    .await?;
                (key_rows, copied_event_rows, event_rows)
            }
        };
        if journal_rows != payloads.operations || key_rows != payloads.operations || event_rows != expected_event_rows {
            return Err(format!(
                "a ceiling transaction of {} operations copied {journal_rows} journal rows, {key_rows} keys and \
                 {event_rows} events",
                payloads.operations
            )
            .into());
        }
        tx.commit().await?;
        operations += journal_rows;
    }
    Ok(operations)
}

async fn write(conn: &mut PgConnection, records: &[JournalRecord], committed: u64) -> Result<u64, BenchError> {
    let mut batch = Batch::default();
    for record in records {
        batch.push(record.clone())?;
    }
    write_batch(conn, &batch, committed, JournalConfig::default().copy_min_bytes).await?;
    Ok(batch.last_sequence().unwrap_or(committed))
}

async fn through_ledger(options: &PgConnectOptions) -> Result<f64, BenchError> {
    let ledger = Arc::new(Ledger::open(LedgerConfig::new(options.clone())).await?);
    for (index, operation) in setup_operations().enumerate() {
        let outcome = ledger.submit(Request { key: key(&format!("setup-{index}")), now_ms: AT_MS, operation }).await?;
        assert!(outcome.result.is_ok(), "{outcome:?}");
    }
    println!("through the ledger (Ledger::submit, each caller waits for durability), {ACCOUNTS} accounts:");
    let mut best: f64 = 0.0;
    for (run, (callers, transfers)) in LEDGER_RUNS.into_iter().enumerate() {
        let next = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for caller in 0..callers {
            let (ledger, next) = (ledger.clone(), next.clone());
            tasks.push(tokio::spawn(async move {
                let mut random = XorShift(0x9e37_79b9_7f4a_7c15 ^ (caller as u64 + 1));
                let mut latencies_us = Vec::new();
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    if index >= transfers {
                        return Ok::<Vec<u64>, diboas_ledger::ledger::LedgerError>(latencies_us);
                    }
                    let request = Request {
                        key: key(&format!("r{run}-{index}")),
                        now_ms: AT_MS,
                        operation: transfer(&mut random, ACCOUNTS),
                    };
                    let submitted = Instant::now();
                    ledger.submit(request).await?;
                    latencies_us.push(submitted.elapsed().as_micros() as u64);
                }
            }));
        }
        let mut latencies_us = Vec::with_capacity(transfers);
        for task in tasks {
            latencies_us.extend(task.await??);
        }
        let per_second = transfers as f64 / started.elapsed().as_secs_f64();
        best = best.max(per_second);
        latencies_us.sort_unstable();
        let percentile = |p: f64| latencies_us[((latencies_us.len() - 1) as f64 * p) as usize] as f64 / 1_000.0;
        println!(
            "  {callers:>5} callers: {transfers:>7} transfers, {per_second:>9.0} durable ops/s, latency p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms",
            percentile(0.5),
            percentile(0.99),
            percentile(0.999)
        );
    }
    Arc::into_inner(ledger).ok_or("callers still hold the ledger")?.shutdown().await?;
    Ok(best)
}

async fn baseline(options: &PgConnectOptions) -> Result<f64, BenchError> {
    let mut conn = PgConnection::connect_with(options).await?;
    sqlx::raw_sql(
        "CREATE TABLE baseline_balances (id bigint PRIMARY KEY, available numeric NOT NULL);
         CREATE TABLE baseline_history (id bigserial PRIMARY KEY, from_id bigint NOT NULL, to_id bigint NOT NULL,
             amount numeric NOT NULL, created_at timestamptz NOT NULL DEFAULT now());",
    )
    .execute(&mut conn)
    .await?;
    sqlx::query("INSERT INTO baseline_balances SELECT n, 10000000.00 FROM generate_series(0, $1 - 1) AS n")
        .bind(ACCOUNTS as i64)
        .execute(&mut conn)
        .await?;
    conn.close().await?;
    println!("baseline (a transaction per transfer: SELECT FOR UPDATE, UPDATE x2, INSERT history, COMMIT):");
    let mut best: f64 = 0.0;
    for (connections, count, accounts) in BASELINE_RUNS {
        let per_second = baseline_run(options, connections, count, accounts).await?;
        best = best.max(per_second);
        println!(
            "  {connections:>2} connections: {count:>7} transfers among {accounts:>5} accounts, {per_second:>9.0} durable ops/s"
        );
    }
    Ok(best)
}

/// `count` transfers among the first `accounts` over `connections` connections, each its own transaction.
async fn baseline_run(
    options: &PgConnectOptions,
    connections: usize,
    count: usize,
    accounts: u64,
) -> Result<f64, BenchError> {
    let pool = PgPoolOptions::new().max_connections(connections as u32).connect_with(options.clone()).await?;
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..connections {
        let (pool, next) = (pool.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut random = XorShift(0x9e37_79b9_7f4a_7c15 ^ (worker as u64 + 1));
            while next.fetch_add(1, Ordering::Relaxed) < count {
                let (from, to) = random.pair(accounts);
                let (from, to) = (from as i64, to as i64);
                let amount = Decimal::new(1 + (random.next() % 1_000) as i64, 2);
                let mut tx = pool.begin().await?;
                let rows: Vec<(i64, Decimal)> = sqlx::query_as(
                    "SELECT id, available FROM baseline_balances WHERE id = ANY($1) ORDER BY id FOR UPDATE",
                )
                .bind(vec![from, to])
                .fetch_all(&mut *tx)
                .await?;
                if rows.iter().any(|(id, available)| *id == from && *available >= amount) {
                    for (id, delta) in [(from, -amount), (to, amount)] {
                        sqlx::query("UPDATE baseline_balances SET available = available + $2 WHERE id = $1")
                            .bind(id)
                            .bind(delta)
                            .execute(&mut *tx)
                            .await?;
                    }
                    sqlx::query("INSERT INTO baseline_history (from_id, to_id, amount) VALUES ($1, $2, $3)")
                        .bind(from)
                        .bind(to)
                        .bind(amount)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
            }
            Ok::<(), sqlx::Error>(())
        }));
    }
    for worker in workers {
        worker.await??;
    }
    let per_second = count as f64 / started.elapsed().as_secs_f64();
    pool.close().await;
    Ok(per_second)
}
