//! PostgreSQL, the system of record: connecting, migrations, recovery at start-up, and `verify`.
//!
//! The journal writer (`crate::journal`) is the only code that writes ledger rows; this module
//! prepares the database (create if missing, migrate, seed the asset registry, create journal
//! partitions ahead) and reads it back: at start-up [`begin_recovery`] reads the state from the
//! projections for `Engine::without_keys` and then streams the idempotency keys into that engine;
//! [`load_state`] reads the whole state at once (tests, tools), and [`verify`] replays the whole
//! journal into a fresh engine and compares the result with those projections.

pub mod codec;
mod load;
pub mod transaction_queries;
mod transactions;
mod verify;

use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use thiserror::Error;

use crate::engine::asset::Asset;

pub use self::load::{Recovery, begin_recovery, load_state};
pub use self::verify::{Difference, VerifyReport, verify};

/// The schema, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How many months of journal partitions exist beyond the current one.
pub const JOURNAL_PARTITION_MONTHS_AHEAD: i32 = 3;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("PostgreSQL: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migrating the schema: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The database holds something the engine could not have written.
    #[error("the database is inconsistent: {0}")]
    Corrupt(String),
    /// A shard's idempotency key store ran out of room (its 32-bit positions) for the keys
    /// recovery brings back: far more keys within the retention window than any configured
    /// capacity allows.
    #[error("a shard's idempotency key store ran out of room for the keys to recover")]
    KeyCapacity,
}

impl StoreError {
    /// Whether the failure is about reaching PostgreSQL (worth retrying) rather than its content.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Database(error) => is_unavailable(error),
            StoreError::Migrate(_) | StoreError::Corrupt(_) | StoreError::KeyCapacity => false,
        }
    }
}

/// Whether a sqlx error means PostgreSQL cannot be reached or cannot accept writes right now.
pub fn is_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(database) => database.code().is_some_and(|code| {
            code.starts_with("08") || matches!(code.as_ref(), "57P01" | "57P02" | "57P03" | "53300" | "53200" | "53100")
        }),
        _ => false,
    }
}

/// Creates the database named in `url` if it does not exist (tolerating a concurrent create).
pub async fn create_database_if_missing(url: &str) -> Result<(), StoreError> {
    if sqlx::Postgres::database_exists(url).await? {
        return Ok(());
    }
    match sqlx::Postgres::create_database(url).await {
        Ok(()) => Ok(()),
        Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("42P04") => Ok(()),
        Err(error) => Err(error.into()),
    }
}

/// Migrates the schema, seeds the asset registry and creates the journal partitions ahead.
/// Safe to run concurrently and repeatedly.
pub async fn prepare(options: &PgConnectOptions) -> Result<(), StoreError> {
    let mut conn = PgConnection::connect_with(options).await?;
    MIGRATOR.run(&mut conn).await?;
    seed_assets(&mut conn).await?;
    ensure_partitions(&mut conn, None).await?;
    conn.close().await?;
    Ok(())
}

/// Days of idempotency-key partitions created ahead of today.
const IDEMPOTENCY_KEY_PARTITION_DAYS_AHEAD: i32 = 3;

/// How many past days of idempotency keys to keep for an engine that remembers keys for
/// `retention_ms`: it may hold a key up to twice that, recovery needs those within it of the
/// latest request, and one more day covers callers' clocks running behind the database's.
pub fn idempotency_key_keep_days(retention_ms: i64) -> i32 {
    const MS_PER_DAY: i64 = 24 * 60 * 60 * 1_000;
    let days = (2 * retention_ms.max(0) + MS_PER_DAY - 1) / MS_PER_DAY + 1;
    i32::try_from(days).unwrap_or(i32::MAX)
}

/// Creates the current month's journal partition and the next ones, and the idempotency-key
/// partitions of today and the next days, if missing. With `keep_days`, also drops the
/// idempotency-key partitions of days older than that (see [`idempotency_key_keep_days`]);
/// `migrate` passes `None`, since only the running ledger knows its retention.
pub async fn ensure_partitions(conn: &mut PgConnection, keep_days: Option<i32>) -> Result<(), StoreError> {
    sqlx::query("SELECT ledger.ensure_journal_partitions(now(), $1)")
        .bind(JOURNAL_PARTITION_MONTHS_AHEAD)
        .execute(&mut *conn)
        .await?;
    sqlx::query("SELECT ledger.ensure_transaction_partitions(now(), $1)")
        .bind(JOURNAL_PARTITION_MONTHS_AHEAD)
        .execute(&mut *conn)
        .await?;
    sqlx::query("SELECT ledger.ensure_idempotency_key_partitions(now(), $1, $2)")
        .bind(IDEMPOTENCY_KEY_PARTITION_DAYS_AHEAD)
        .bind(keep_days)
        .execute(&mut *conn)
        .await?;
    crate::audit::partitions::ensure(conn).await?;
    Ok(())
}

/// How long the running writer's partition maintenance waits for a table lock before giving up
/// until the next attempt. Dropping a partition needs an exclusive lock, which a long query on
/// the keys (say, on `ledger.idempotency_outcomes`) would otherwise make the writer wait for.
const PARTITION_MAINTENANCE_LOCK_TIMEOUT_MS: u32 = 250;

/// PostgreSQL's SQLSTATE for a lock that could not be had within `lock_timeout`.
const LOCK_NOT_AVAILABLE: &str = "55P03";

/// The running writer's partition maintenance ([`ensure_partitions`] with `keep_days`), in its
/// own short transaction so it never delays a batch. Returns `Ok(false)` when a table lock
/// could not be had quickly: nothing changed, try again later (partitions are created days and
/// months ahead, so a late attempt is harmless).
pub async fn maintain_partitions(conn: &mut PgConnection, keep_days: i32) -> Result<bool, StoreError> {
    let mut tx = conn.begin().await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("SET LOCAL lock_timeout = {PARTITION_MAINTENANCE_LOCK_TIMEOUT_MS}")))
        .execute(&mut *tx)
        .await?;
    match ensure_partitions(&mut tx, Some(keep_days)).await {
        Ok(()) => {
            tx.commit().await?;
            Ok(true)
        }
        Err(StoreError::Database(sqlx::Error::Database(error)))
            if error.code().as_deref() == Some(LOCK_NOT_AVAILABLE) =>
        {
            tx.rollback().await?;
            Ok(false)
        }
        Err(error) => Err(error),
    }
}

/// Writes the binary's asset registry; an existing asset whose scale differs is refused, since
/// every amount already stored for it would change meaning.
async fn seed_assets(conn: &mut PgConnection) -> Result<(), StoreError> {
    for asset in Asset::all() {
        let spec = asset.spec();
        let index = i16::try_from(asset.index()).map_err(|_| StoreError::Corrupt("asset index".to_owned()))?;
        let scale = i16::try_from(spec.scale).map_err(|_| StoreError::Corrupt("asset scale".to_owned()))?;
        let stored: (i16,) = sqlx::query_as(
            "INSERT INTO ledger.assets (symbol, code, chain, scale, engine_index) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (symbol) DO UPDATE SET code = EXCLUDED.code
             RETURNING scale",
        )
        .bind(spec.symbol)
        .bind(spec.code)
        .bind(spec.chain.map(|chain| chain.name()))
        .bind(scale)
        .bind(index)
        .fetch_one(&mut *conn)
        .await?;
        if stored.0 != scale {
            return Err(StoreError::Corrupt(format!(
                "asset {} has scale {} in the database but {} in this binary",
                spec.symbol, stored.0, scale
            )));
        }
    }
    Ok(())
}
