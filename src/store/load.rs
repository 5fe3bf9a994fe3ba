//! Recovery: rebuilds the engine's state from the projections the journal writer maintains.
//!
//! Everything is read in one REPEATABLE READ transaction, so the state is one consistent
//! snapshot at the checkpoint's sequence. The caller checks the invariants before starting an
//! engine on it.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;

use futures_util::TryStreamExt;
use rust_decimal::Decimal;
use serde::Deserialize;
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

use super::StoreError;
use super::codec;
use crate::engine::Engine;
use crate::engine::account::{AccountConfig, Balance, OutflowLimits, SystemAccount, UserAccount};
use crate::engine::idempotency::{IdempotencyKey, IdempotencyRecord};
use crate::engine::limits::OutflowUsage;
use crate::engine::record::{JournalSink, Origin};
use crate::engine::reservation::{Reservation, ReservationStatus};
use crate::engine::state::{AccountView, EngineState};

type AccountRow = (
    Uuid,
    String,
    String,
    Decimal,
    Option<Decimal>,
    Option<Decimal>,
    Option<Decimal>,
    bool,
    i64,
    Decimal,
    i64,
    Decimal,
    Decimal,
    Decimal,
);

type ReservationRow = (Uuid, Uuid, String, String, Decimal, i64, i64, String, Option<i64>);

/// The state as of the last committed batch. With `retention_ms`, idempotency keys recorded, and
/// reservations closed, more than `retention_ms` before the latest time the state has seen are
/// left out: the engine forgets them too (`Engine::from_state` measures from the same latest
/// time), so recovery does not depend on the wall clock. `None` loads everything.
pub async fn load_state(conn: &mut PgConnection, retention_ms: Option<i64>) -> Result<EngineState, StoreError> {
    let mut tx = conn.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY").execute(&mut *tx).await?;
    let state = read_state(&mut tx, retention_ms).await?;
    tx.commit().await?;
    Ok(state)
}

/// Recovery's read of the database, in one REPEATABLE READ snapshot: everything but the
/// idempotency keys first ([`Recovery::state`], for the caller to check and build an engine
/// from with `Engine::without_keys`), then the keys streamed a row at a time into that engine
/// ([`Recovery::restore_keys`]). A full key store is tens of millions of keys: held in an
/// `EngineState` beside the engine's own store as well, a million of them took start-up's peak
/// from 311 MB to 727 MB (docs/BENCHMARKS.md, "Session 17").
pub struct Recovery<'c> {
    tx: sqlx::Transaction<'c, sqlx::Postgres>,
    state: EngineState,
    latest_ms: i64,
    cutoff_ms: i64,
}

/// Opens recovery's snapshot and reads the state without its keys. Keys and closed reservations
/// recorded more than `retention_ms` before the latest time the state has seen are left out, as in
/// [`load_state`].
pub async fn begin_recovery(conn: &mut PgConnection, retention_ms: i64) -> Result<Recovery<'_>, StoreError> {
    let mut tx = conn.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY").execute(&mut *tx).await?;
    let latest_ms = read_latest_ms(&mut tx).await?;
    let cutoff_ms = latest_ms.saturating_sub(retention_ms);
    let state = read_state_without_keys(&mut tx, cutoff_ms).await?;
    Ok(Recovery { tx, state, latest_ms, cutoff_ms })
}

impl Recovery<'_> {
    /// Everything but the idempotency keys.
    pub fn state(&self) -> &EngineState {
        &self.state
    }

    /// The latest time the whole state has seen, keys included (`EngineState::latest_ms`):
    /// the recovered engine's clock starts there.
    pub fn latest_ms(&self) -> i64 {
        self.latest_ms
    }

    /// Streams the keys into `engine` (built from [`Recovery::state`] at [`Recovery::latest_ms`])
    /// and closes the snapshot. Returns how many keys were read.
    pub async fn restore_keys<S: JournalSink>(self, engine: &Engine<S>) -> Result<usize, StoreError> {
        let Recovery { mut tx, state, cutoff_ms, .. } = self;
        drop(state);
        let keys = stream_keys(&mut tx, cutoff_ms, |rows| restore_in_parallel(engine, rows)).await?;
        tx.commit().await?;
        Ok(keys)
    }
}

/// The latest time the state has seen, as `EngineState::latest_ms` computes it from a whole
/// state; `i64::MIN` for an empty ledger.
async fn read_latest_ms(tx: &mut PgConnection) -> Result<i64, StoreError> {
    let (latest_ms,): (Option<i64>,) = sqlx::query_as(
        "SELECT GREATEST((SELECT max(recorded_at_ms) FROM ledger.idempotency_keys),
                         (SELECT max(GREATEST(created_at_ms, closed_at_ms)) FROM ledger.reservations),
                         (SELECT max(updated_at_ms) FROM ledger.transactions))",
    )
    .fetch_one(&mut *tx)
    .await?;
    Ok(latest_ms.unwrap_or(i64::MIN))
}

/// [`load_state`] inside a transaction the caller opened (REPEATABLE READ, for one snapshot).
pub(super) async fn read_state(tx: &mut PgConnection, retention_ms: Option<i64>) -> Result<EngineState, StoreError> {
    let cutoff_ms = match retention_ms {
        Some(retention_ms) => read_latest_ms(tx).await?.saturating_sub(retention_ms),
        None => i64::MIN,
    };
    let mut state = read_state_without_keys(tx, cutoff_ms).await?;
    let idempotency = &mut state.idempotency;
    stream_keys(tx, cutoff_ms, |rows| {
        for row in rows {
            let (key, record) = parse_key_row(row)?;
            keep_later(idempotency, key, record);
        }
        Ok(())
    })
    .await?;
    Ok(state)
}

/// Records `record` under `key` unless `keys` holds a later one (a higher sequence): of two uses
/// of a key, the live engine remembers the later.
fn keep_later(keys: &mut BTreeMap<IdempotencyKey, IdempotencyRecord>, key: IdempotencyKey, record: IdempotencyRecord) {
    match keys.entry(key) {
        Entry::Occupied(mut kept) if kept.get().sequence < record.sequence => {
            kept.insert(record);
        }
        Entry::Occupied(_) => {}
        Entry::Vacant(slot) => {
            slot.insert(record);
        }
    }
}

/// Everything but the idempotency keys, leaving out what closed or finished at or before
/// `cutoff_ms`.
async fn read_state_without_keys(tx: &mut PgConnection, cutoff_ms: i64) -> Result<EngineState, StoreError> {
    let (committed,): (i64,) =
        sqlx::query_as("SELECT committed_sequence FROM ledger.checkpoint").fetch_one(&mut *tx).await?;
    let mut state = EngineState { next_sequence: codec::from_bigint(committed)? + 1, ..EngineState::default() };

    let accounts: Vec<AccountRow> = sqlx::query_as(
        "SELECT a.user_id, a.domain, a.asset, a.overdraft, a.limit_per_transaction, a.limit_daily, a.limit_monthly,
                a.frozen, a.usage_day, a.usage_day_used, a.usage_month, a.usage_month_used, b.available, b.reserved
         FROM ledger.accounts a JOIN ledger.balances b USING (user_id, domain, asset)",
    )
    .fetch_all(&mut *tx)
    .await?;
    for row in accounts {
        let (user_id, domain, asset, overdraft, per_transaction, daily, monthly, frozen) =
            (row.0, row.1, row.2, row.3, row.4, row.5, row.6, row.7);
        let asset = codec::asset(&asset)?;
        let optional = |value: Option<Decimal>| value.map(|value| codec::to_minor(value, asset)).transpose();
        let account = UserAccount { user_id, domain: codec::domain(&domain)?, asset };
        let view = AccountView {
            account,
            config: AccountConfig {
                overdraft_minor: codec::to_minor(overdraft, asset)?,
                limits: OutflowLimits {
                    per_transaction_minor: optional(per_transaction)?,
                    daily_minor: optional(daily)?,
                    monthly_minor: optional(monthly)?,
                },
                frozen,
            },
            balance: Balance {
                available_minor: codec::to_minor(row.12, asset)?,
                reserved_minor: codec::to_minor(row.13, asset)?,
            },
            usage: OutflowUsage {
                day: row.8,
                day_used_minor: codec::to_minor(row.9, asset)?,
                month: row.10,
                month_used_minor: codec::to_minor(row.11, asset)?,
            },
        };
        state.accounts.insert(account, view);
    }

    let systems: Vec<(String, String, Decimal)> =
        sqlx::query_as("SELECT kind, asset, balance FROM ledger.system_balances WHERE balance <> 0")
            .fetch_all(&mut *tx)
            .await?;
    for (kind, asset, balance) in systems {
        let asset = codec::asset(&asset)?;
        state
            .system_minor
            .insert(SystemAccount { kind: codec::system_kind(&kind)?, asset }, codec::to_minor(balance, asset)?);
    }

    let reservations: Vec<ReservationRow> = sqlx::query_as(
        "SELECT user_id, reservation_id, domain, asset, amount, created_at_ms, expires_at_ms, status, closed_at_ms
         FROM ledger.reservations WHERE status = 'active' OR closed_at_ms > $1",
    )
    .bind(cutoff_ms)
    .fetch_all(&mut *tx)
    .await?;
    for (user_id, id, domain, asset, amount, created_at_ms, expires_at_ms, status, closed_at_ms) in reservations {
        let asset = codec::asset(&asset)?;
        let reservation = Reservation {
            id,
            account: UserAccount { user_id, domain: codec::domain(&domain)?, asset },
            amount_minor: codec::to_minor(amount, asset)?,
            created_at_ms,
            expires_at_ms,
            status: codec::status(&status)?,
            closed_at_ms,
        };
        if (reservation.status == ReservationStatus::Active) != reservation.closed_at_ms.is_none() {
            return Err(StoreError::Corrupt(format!(
                "reservation {id} has status {status} and closed_at {closed_at_ms:?}"
            )));
        }
        state.reservations.insert((user_id, id), reservation);
    }

    super::transactions::read(tx, cutoff_ms, &mut state).await?;
    Ok(state)
}

/// The parts of a journal record a key's recovery needs: its sequence and its request (key,
/// operation, first outcome). Its effects, often most of the record, are skipped as they are
/// read rather than built.
/// `at_ms` and `effects` are required, as in a whole record, but never built.
#[derive(Deserialize)]
struct KeyedRecord {
    sequence: u64,
    origin: Origin,
    #[expect(dead_code, reason = "required, so that a record without it is refused as corrupt")]
    at_ms: i64,
    #[expect(dead_code, reason = "required, so that a record without it is refused as corrupt")]
    effects: serde::de::IgnoredAny,
}

/// Key rows handed on at a time: one batch of work for the threads that parse them.
const KEY_ROWS_PER_CHUNK: usize = 4_096;

/// The most threads recovery parses key rows on.
const MAX_KEY_PARSING_THREADS: usize = 8;

/// One idempotency key's row: the key, its sequence, when it was recorded, its journal record.
type KeyRow = (String, i64, i64, String);

/// Hands `each` every idempotency key row recorded after `cutoff_ms`, [`KEY_ROWS_PER_CHUNK`] at a
/// time, in no particular order; returns how many. The operation and first outcome of each key
/// live in its journal record ([`parse_key_row`]). A key the engine forgot and then saw again
/// has a row for each time, and the one with the later sequence is the one to keep, as the
/// engine keeps it: `each` decides. No `ORDER BY`: sorting a million joined rows (each with its
/// whole record) went to disk and made the query more than twice as slow as the join alone
/// (docs/BENCHMARKS.md, "Session 17"). Streamed: a full key store is tens of millions of keys.
async fn stream_keys(
    tx: &mut PgConnection,
    cutoff_ms: i64,
    mut each: impl FnMut(Vec<KeyRow>) -> Result<(), StoreError>,
) -> Result<usize, StoreError> {
    let mut count = 0;
    let mut keys = sqlx::query_as::<_, KeyRow>(
        "SELECT k.key, k.sequence, k.recorded_at_ms, j.record::text
         FROM ledger.idempotency_keys k JOIN ledger.journal j ON j.sequence = k.sequence
         WHERE k.recorded_at_ms > $1",
    )
    .bind(cutoff_ms)
    .fetch(&mut *tx);
    let mut chunk = Vec::with_capacity(KEY_ROWS_PER_CHUNK);
    while let Some(row) = keys.try_next().await? {
        chunk.push(row);
        count += 1;
        if chunk.len() == KEY_ROWS_PER_CHUNK {
            each(std::mem::replace(&mut chunk, Vec::with_capacity(KEY_ROWS_PER_CHUNK)))?;
        }
    }
    each(chunk)?;
    Ok(count)
}

/// A key row as the key and what the store remembers of it, checked against its journal record.
fn parse_key_row(
    (key, sequence, recorded_at_ms, text): KeyRow,
) -> Result<(IdempotencyKey, IdempotencyRecord), StoreError> {
    let corrupt = |what: &str| StoreError::Corrupt(format!("idempotency key {key:?}: {what}"));
    let parsed_key = IdempotencyKey::new(&key).map_err(|error| corrupt(&error.to_string()))?;
    let record: KeyedRecord =
        serde_json::from_str(&text).map_err(|error| corrupt(&format!("its journal record does not parse: {error}")))?;
    let Origin::Request { key: recorded_key, operation, outcome, .. } = record.origin else {
        return Err(corrupt("its journal record is not a request"));
    };
    if recorded_key != parsed_key || record.sequence != codec::from_bigint(sequence)? {
        return Err(corrupt("its journal record belongs to another request"));
    }
    Ok((parsed_key, IdempotencyRecord::new(&operation, outcome, record.sequence, recorded_at_ms)))
}

/// Parses `rows` and restores their keys into `engine` on up to [`MAX_KEY_PARSING_THREADS`]
/// threads: parsing the journal records is most of recovery's own work (3.5 s of CPU a million
/// keys), and keys may be restored in any order. Blocks the calling thread until done; recovery
/// runs before the server takes requests.
fn restore_in_parallel<S: JournalSink>(engine: &Engine<S>, rows: Vec<KeyRow>) -> Result<(), StoreError> {
    let threads = std::thread::available_parallelism().map_or(1, usize::from).clamp(1, MAX_KEY_PARSING_THREADS);
    let restore = |part: Vec<KeyRow>| -> Result<(), StoreError> {
        for row in part {
            let (key, record) = parse_key_row(row)?;
            engine.restore_key(&key, &record).map_err(|_| StoreError::KeyCapacity)?;
        }
        Ok(())
    };
    let mut parts: Vec<Vec<KeyRow>> = Vec::with_capacity(threads);
    let mut rows = rows.into_iter();
    let per_thread = rows.len().div_ceil(threads).max(1);
    loop {
        let part: Vec<KeyRow> = rows.by_ref().take(per_thread).collect();
        if part.is_empty() {
            break;
        }
        parts.push(part);
    }
    let Some(own) = parts.pop() else { return Ok(()) };
    std::thread::scope(|scope| {
        let helpers: Vec<_> = parts.into_iter().map(|part| scope.spawn(move || restore(part))).collect();
        let mut result = restore(own);
        for helper in helpers {
            let helped = helper.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            result = result.and(helped);
        }
        result
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::operation::{Operation, Receipt};

    /// Rows cut over several threads, the later of two uses of a key among them: every key is
    /// restored, with its later record; one corrupt row fails the whole restore.
    #[test]
    fn keys_restored_in_parallel_are_all_there_and_a_corrupt_row_fails_the_restore() {
        use crate::engine::record::{JournalRecord, MemoryJournal};
        use crate::engine::{EngineConfig, state::EngineState};

        let operation = Operation::Release { user_id: Uuid::nil(), reservation_id: Uuid::nil() };
        let row = |key: &str, sequence: u64| -> KeyRow {
            let record = JournalRecord {
                sequence,
                at_ms: 1_000,
                origin: Origin::Request {
                    key: IdempotencyKey::new(key).unwrap(),
                    operation: operation.clone(),
                    outcome: Ok(Receipt::Done),
                    context: None,
                },
                effects: Vec::new(),
            };
            (key.to_owned(), sequence as i64, 1_000, serde_json::to_string(&record).unwrap())
        };
        let state = EngineState { next_sequence: 10_002, ..EngineState::default() };
        let engine = Engine::without_keys(EngineConfig::default(), MemoryJournal::default(), &state, 1_000);
        let mut rows: Vec<KeyRow> = (1..=9_999).map(|n| row(&format!("key-{n}"), n)).collect();
        rows.insert(17, row("key-5", 10_001));
        restore_in_parallel(&engine, rows).unwrap();
        let restored = engine.state().idempotency;
        assert_eq!(restored.len(), 9_999);
        assert_eq!(restored.get(&IdempotencyKey::new("key-5").unwrap()).map(|kept| kept.sequence), Some(10_001));

        let mut rows: Vec<KeyRow> = (1..=100).map(|n| row(&format!("other-{n}"), n)).collect();
        rows[60].3.truncate(20);
        assert!(matches!(restore_in_parallel(&engine, rows), Err(StoreError::Corrupt(_))));
    }

    /// Keys stream in no order: the later of two uses of a key wins whichever comes first.
    #[test]
    fn the_later_use_of_a_key_is_kept_in_either_order() {
        let key = IdempotencyKey::new("k").unwrap();
        let operation = Operation::Release { user_id: Uuid::nil(), reservation_id: Uuid::nil() };
        let record = |sequence| IdempotencyRecord::new(&operation, Ok(Receipt::Done), sequence, 0);
        for order in [[1, 9], [9, 1]] {
            let mut keys = BTreeMap::new();
            for sequence in order {
                keep_later(&mut keys, key, record(sequence));
            }
            assert_eq!(keys.get(&key).map(|kept| kept.sequence), Some(9), "order {order:?}");
        }
    }
}
