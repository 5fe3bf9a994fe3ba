//! The baseline the ledger is measured against: the same workload done the conventional way,
//! each operation its own PostgreSQL transaction taking row locks (SELECT ... FOR UPDATE in a
//! fixed order, check, UPDATE, INSERT the posting with its idempotency key, COMMIT).
//!
//! It runs in its own database (created if missing) and is deliberately kind to itself: it keeps
//! no system-account rows (a real double-entry baseline would also lock a clearing or fee row per
//! operation, a hot spot), so the ratio it gives is a lower bound on the ledger's advantage.

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::SmallRng;
use rust_decimal::Decimal;
use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use super::report::Tally;
use super::workload::{AMOUNT, FUNDING, Kind, Unit, next_unit, reservation_id};
use super::{LoadConfig, LoadError};

/// PostgreSQL's default max_connections is 100; leave room for everyone else.
pub const MAX_BASELINE_CONNECTIONS: usize = 80;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS baseline_balances (
    user_id uuid PRIMARY KEY,
    available numeric NOT NULL,
    reserved numeric NOT NULL
);
CREATE TABLE IF NOT EXISTS baseline_reservations (
    id uuid PRIMARY KEY,
    user_id uuid NOT NULL,
    amount numeric NOT NULL,
    status text NOT NULL
);
CREATE TABLE IF NOT EXISTS baseline_postings (
    id bigserial PRIMARY KEY,
    idempotency_key text NOT NULL UNIQUE,
    kind text NOT NULL,
    debit uuid,
    credit uuid,
    amount numeric NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
TRUNCATE baseline_balances, baseline_reservations, baseline_postings;
";

/// A refusal of the baseline's own rules (the ledger's INSUFFICIENT_FUNDS and NOT_FOUND).
#[derive(Debug)]
enum Refusal {
    InsufficientFunds,
    UnknownAccount,
    Database(sqlx::Error),
}

impl From<sqlx::Error> for Refusal {
    fn from(error: sqlx::Error) -> Refusal {
        Refusal::Database(error)
    }
}

impl Refusal {
    fn name(&self) -> String {
        match self {
            Refusal::InsufficientFunds => "FailedPrecondition".to_owned(),
            Refusal::UnknownAccount => "NotFound".to_owned(),
            Refusal::Database(error) => format!("PostgreSQL: {error}"),
        }
    }
}

/// Creates the database if missing, creates and empties the tables, and funds every user.
pub async fn set_up(config: &LoadConfig) -> Result<PgPool, LoadError> {
    crate::store::create_database_if_missing(&config.baseline_database_url).await?;
    // Lock waits are what the baseline measures; sqlx's slow-statement warnings would only drown
    // the report.
    let options = PgConnectOptions::from_str(&config.baseline_database_url)
        .map_err(crate::store::StoreError::from)?
        .log_slow_statements(log::LevelFilter::Off, Duration::from_secs(0));
    let connections = config.in_flight.clamp(1, MAX_BASELINE_CONNECTIONS);
    let pool = PgPoolOptions::new()
        .max_connections(u32::try_from(connections).unwrap_or(1))
        .connect_with(options)
        .await
        .map_err(crate::store::StoreError::from)?;
    sqlx::raw_sql(SCHEMA).execute(&pool).await.map_err(crate::store::StoreError::from)?;
    let users: Vec<Uuid> = (0..config.users.count()).map(|n| config.users.id(n)).collect();
    let funding = Decimal::from_str(FUNDING).map_err(|_| LoadError::SetUp("funding".to_owned()))?;
    sqlx::query("INSERT INTO baseline_balances SELECT unnest($1::uuid[]), $2, 0")
        .bind(&users)
        .bind(funding)
        .execute(&pool)
        .await
        .map_err(crate::store::StoreError::from)?;
    Ok(pool)
}

/// Locks `users` in id order (no deadlocks) and returns their available balances in that order.
async fn lock(tx: &mut Transaction<'_, Postgres>, users: &[Uuid]) -> Result<Vec<(Uuid, Decimal)>, Refusal> {
    let mut ordered = users.to_vec();
    ordered.sort_unstable();
    ordered.dedup();
    let rows: Vec<(Uuid, Decimal)> = sqlx::query_as(
        "SELECT user_id, available FROM baseline_balances WHERE user_id = ANY($1) ORDER BY user_id FOR UPDATE",
    )
    .bind(&ordered)
    .fetch_all(&mut **tx)
    .await?;
    if rows.len() != ordered.len() {
        return Err(Refusal::UnknownAccount);
    }
    Ok(rows)
}

fn available_of(rows: &[(Uuid, Decimal)], user: Uuid) -> Decimal {
    rows.iter().find(|(id, _)| *id == user).map_or(Decimal::ZERO, |(_, available)| *available)
}

async fn post(
    tx: &mut Transaction<'_, Postgres>,
    key: &str,
    kind: &str,
    debit: Option<Uuid>,
    credit: Option<Uuid>,
    amount: Decimal,
) -> Result<(), Refusal> {
    sqlx::query(
        "INSERT INTO baseline_postings (idempotency_key, kind, debit, credit, amount) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(key)
    .bind(kind)
    .bind(debit)
    .bind(credit)
    .bind(amount)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn move_available(tx: &mut Transaction<'_, Postgres>, user: Uuid, delta: Decimal) -> Result<(), Refusal> {
    sqlx::query("UPDATE baseline_balances SET available = available + $2 WHERE user_id = $1")
        .bind(user)
        .bind(delta)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// One operation, one transaction. Returns the operations it made durable.
async fn step(pool: &PgPool, key: &str, unit: &Unit, amount: Decimal, commit_step: bool) -> Result<u64, Refusal> {
    let mut tx = pool.begin().await?;
    match (unit.kind, commit_step) {
        (Kind::Deposit, _) => {
            lock(&mut tx, &[unit.user]).await?;
            move_available(&mut tx, unit.user, amount).await?;
            post(&mut tx, key, "deposit", None, Some(unit.user), amount).await?;
        }
        (Kind::Withdraw, _) => {
            let rows = lock(&mut tx, &[unit.user]).await?;
            if available_of(&rows, unit.user) < amount {
                return Err(Refusal::InsufficientFunds);
            }
            move_available(&mut tx, unit.user, -amount).await?;
            post(&mut tx, key, "withdraw", Some(unit.user), None, amount).await?;
        }
        (Kind::Transfer, _) => {
            let rows = lock(&mut tx, &[unit.user, unit.other]).await?;
            if available_of(&rows, unit.user) < amount {
                return Err(Refusal::InsufficientFunds);
            }
            move_available(&mut tx, unit.user, -amount).await?;
            move_available(&mut tx, unit.other, amount).await?;
            post(&mut tx, key, "transfer", Some(unit.user), Some(unit.other), amount).await?;
        }
        (Kind::ReserveCommit, false) => {
            let rows = lock(&mut tx, &[unit.user]).await?;
            if available_of(&rows, unit.user) < amount {
                return Err(Refusal::InsufficientFunds);
            }
            sqlx::query(
                "UPDATE baseline_balances SET available = available - $2, reserved = reserved + $2 WHERE user_id = $1",
            )
            .bind(unit.user)
            .bind(amount)
            .execute(&mut *tx)
            .await?;
            sqlx::query("INSERT INTO baseline_reservations VALUES ($1, $2, $3, 'active')")
                .bind(unit.reservation)
                .bind(unit.user)
                .bind(amount)
                .execute(&mut *tx)
                .await?;
            post(&mut tx, key, "reserve", Some(unit.user), Some(unit.user), amount).await?;
        }
        (Kind::ReserveCommit, true) => {
            lock(&mut tx, &[unit.user, unit.other]).await?;
            let closed = sqlx::query(
                "UPDATE baseline_reservations SET status = 'completed' WHERE id = $1 AND status = 'active'",
            )
            .bind(unit.reservation)
            .execute(&mut *tx)
            .await?;
            if closed.rows_affected() != 1 {
                return Err(Refusal::UnknownAccount);
            }
            sqlx::query("UPDATE baseline_balances SET reserved = reserved - $2 WHERE user_id = $1")
                .bind(unit.user)
                .bind(amount)
                .execute(&mut *tx)
                .await?;
            move_available(&mut tx, unit.other, amount).await?;
            post(&mut tx, key, "commit", Some(unit.user), Some(unit.other), amount).await?;
        }
    }
    tx.commit().await?;
    Ok(1)
}

/// Runs the workload closed-loop for the configured duration, `in_flight` transactions at once.
pub async fn run(config: Arc<LoadConfig>, pool: PgPool) -> Result<(Tally, Duration), LoadError> {
    let amount = Decimal::from_str(AMOUNT).map_err(|_| LoadError::SetUp("amount".to_owned()))?;
    let began = Instant::now();
    let until = began + Duration::from_secs(config.duration_s);
    let slots = config.in_flight.clamp(1, MAX_BASELINE_CONNECTIONS);
    let workers: Vec<_> = (0..slots)
        .map(|slot| {
            let (config, pool) = (Arc::clone(&config), pool.clone());
            tokio::spawn(async move {
                let mut rng = SmallRng::seed_from_u64(config.seed ^ slot as u64);
                let mut tally = Tally::default();
                let mut sent: u64 = 0;
                while Instant::now() < until {
                    let reservation = reservation_id(config.run_nonce(), slot as u64, sent, 0);
                    let unit = next_unit(&config.mix, &config.users, &mut rng, reservation);
                    let started = Instant::now();
                    let steps = if unit.kind == Kind::ReserveCommit { 2 } else { 1 };
                    for commit_step in [false, true].into_iter().take(steps) {
                        let key = format!("load-{}-{slot}-{sent}-{}", config.run_id, u8::from(commit_step));
                        match step(&pool, &key, &unit, amount, commit_step).await {
                            Ok(operations) => tally.operations += operations,
                            Err(refusal) => {
                                tally.record_error(refusal.name());
                                break;
                            }
                        }
                    }
                    tally.record_latency(started.elapsed());
                    sent += 1;
                }
                tally
            })
        })
        .collect();
    let mut total = Tally::default();
    for worker in workers {
        total.merge(&worker.await.map_err(|_| LoadError::Worker)?);
    }
    Ok((total, began.elapsed()))
}
