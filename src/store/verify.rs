//! `verify`: replays the whole journal into a fresh engine and compares it with the projections.
//!
//! The journal is the system of record and the projections are derived from it in the same
//! transactions, so the two must agree exactly: every account (settings, balances, counters),
//! system balance, reservation and idempotency key. Both are read in one REPEATABLE READ
//! snapshot, so `verify` can run against a live ledger. Idempotency keys are compared over the
//! retention window only: the replay forgets older ones as the live engine does, and the table
//! keeps them a few days longer; keys whose day partition is gone are not compared either. So
//! the replay must run with the ledger's retention (the
//! shortest it has run with): with a longer one it would call a key legitimately reused after
//! the ledger's window a corrupt journal.
//! The journal is read in pages of [`PAGE_RECORDS`] so memory stays bounded by the engine's
//! state, not the journal's length.

use std::collections::BTreeMap;
use std::fmt::Debug;

use sqlx::{Connection, PgConnection};

use super::load::read_state;
use super::{StoreError, codec};
use crate::engine::record::{JournalClosed, JournalRecord, JournalSink};
use crate::engine::state::EngineState;
use crate::engine::{Engine, EngineConfig};

/// Journal records read per query.
pub const PAGE_RECORDS: i64 = 10_000;

/// Differences listed in a report; past this only the count grows.
pub const MAX_REPORTED_DIFFERENCES: usize = 100;

/// One place where the replayed journal and the projections disagree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub what: String,
    pub replayed: String,
    pub projected: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub records_replayed: u64,
    pub accounts: usize,
    pub differences: Vec<Difference>,
    /// All differences found, including those past [`MAX_REPORTED_DIFFERENCES`].
    pub difference_count: usize,
}

impl VerifyReport {
    pub fn agrees(&self) -> bool {
        self.difference_count == 0
    }
}

/// A sink for an engine that only replays: `apply_record` never calls it, and a request would be refused.
struct ReplayOnly;

impl JournalSink for ReplayOnly {
    fn append(&mut self, record: JournalRecord) -> Result<(), JournalClosed> {
        Err(JournalClosed { record: Box::new(record) })
    }
}

/// Replays the journal into an engine of `config` (its retention must be the ledger's: see the
/// module comment) and compares it with the projections.
pub async fn verify(conn: &mut PgConnection, config: EngineConfig) -> Result<VerifyReport, StoreError> {
    let mut tx = conn.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY").execute(&mut *tx).await?;
    let engine = Engine::new(config, ReplayOnly);
    let mut after: i64 = 0;
    let mut records_replayed = 0_u64;
    loop {
        let page: Vec<(i64, String)> = sqlx::query_as(
            "SELECT sequence, record::text FROM ledger.journal WHERE sequence > $1 ORDER BY sequence LIMIT $2",
        )
        .bind(after)
        .bind(PAGE_RECORDS)
        .fetch_all(&mut *tx)
        .await?;
        let Some(&(last, _)) = page.last() else { break };
        for (sequence, text) in page {
            let record: JournalRecord = serde_json::from_str(&text)
                .map_err(|error| StoreError::Corrupt(format!("journal record {sequence} does not parse: {error}")))?;
            if codec::to_bigint(record.sequence)? != sequence {
                return Err(StoreError::Corrupt(format!("journal row {sequence} holds record {}", record.sequence)));
            }
            engine
                .apply_record(&record)
                .map_err(|error| StoreError::Corrupt(format!("the journal does not replay: {error}")))?;
            records_replayed += 1;
        }
        after = last;
    }
    let projected = read_state(&mut tx, None).await?;
    let keys_kept_from_sequence = first_sequence_with_kept_keys(&mut tx).await?;
    tx.commit().await?;
    let replayed = engine.state();

    let mut report = VerifyReport {
        records_replayed,
        accounts: projected.accounts.len(),
        differences: Vec::new(),
        difference_count: 0,
    };
    let mut differ = |what: String, replayed: &dyn Debug, projected: &dyn Debug| {
        report.difference_count += 1;
        if report.differences.len() < MAX_REPORTED_DIFFERENCES {
            report.differences.push(Difference {
                what,
                replayed: format!("{replayed:?}"),
                projected: format!("{projected:?}"),
            });
        }
    };
    if replayed.next_sequence != projected.next_sequence {
        differ("last committed sequence".to_owned(), &(replayed.next_sequence - 1), &(projected.next_sequence - 1));
    }
    compare("account", &replayed.accounts, &projected.accounts, &mut differ);
    compare("system balance", &replayed.system_minor, &projected.system_minor, &mut differ);
    compare("reservation", &replayed.reservations, &projected.reservations, &mut differ);
    // The replay forgets idempotency keys as the live engine does, one to two retention windows
    // after they were recorded, while the table keeps them for days (`idempotency_key_keep_days`):
    // compare the keys both must hold, those recorded within the window before the latest moment
    // both sides have seen. (The earlier of the two: a projected time past the journal's must
    // not move the window past keys the replay holds.)
    // Nor can the table hold keys whose day partition the wall clock has dropped: after the
    // ledger stood idle for longer than those are kept, the latest moment is days old and its
    // window reaches back into dropped days (`first_sequence_with_kept_keys`).
    let latest_ms = replayed.latest_ms().min(projected.latest_ms());
    let keys_since_ms = latest_ms.saturating_sub(engine.config().retention_ms);
    let recent_keys = |state: &EngineState| {
        let mut keys = state.idempotency.clone();
        keys.retain(|_, record| {
            record.recorded_at_ms > keys_since_ms
                && keys_kept_from_sequence.is_some_and(|first| record.sequence >= first)
        });
        keys
    };
    compare("idempotency key", &recent_keys(&replayed), &recent_keys(&projected), &mut differ);
    compare("transaction", &replayed.transactions, &projected.transactions, &mut differ);
    compare("user compliance", &replayed.compliance, &projected.compliance, &mut differ);
    if let Err(violation) = EngineState::check_invariants(&projected) {
        differ("invariants of the projections".to_owned(), &"hold", &violation);
    }
    Ok(report)
}

/// The first journal sequence whose idempotency keys the table can still hold: the first record
/// committed on or after the day of the oldest key partition left (a key row and its journal
/// row are written in one transaction, so they share `created_at`, and key partitions are whole
/// UTC days of it). `None` when no record was committed since: every key's partition is gone.
async fn first_sequence_with_kept_keys(tx: &mut PgConnection) -> Result<Option<u64>, StoreError> {
    let (first,): (Option<i64>,) = sqlx::query_as(
        "SELECT min(j.sequence) FROM ledger.journal j
         WHERE j.created_at >= (
             SELECT min(to_date(substring(child.relname FROM 18), 'YYYY_MM_DD'))::timestamp AT TIME ZONE 'UTC'
             FROM pg_inherits
             JOIN pg_class child ON child.oid = pg_inherits.inhrelid
             JOIN pg_class parent ON parent.oid = pg_inherits.inhparent
             JOIN pg_namespace ns ON ns.oid = parent.relnamespace
             WHERE ns.nspname = 'ledger' AND parent.relname = 'idempotency_keys'
               AND child.relname ~ '^idempotency_keys_\\d{4}_\\d{2}_\\d{2}$')",
    )
    .fetch_one(&mut *tx)
    .await?;
    first.map(codec::from_bigint).transpose()
}

fn compare<K: Ord + Debug, V: PartialEq + Debug>(
    what: &str,
    replayed: &BTreeMap<K, V>,
    projected: &BTreeMap<K, V>,
    differ: &mut impl FnMut(String, &dyn Debug, &dyn Debug),
) {
    for (key, value) in replayed {
        match projected.get(key) {
            Some(other) if other == value => {}
            other => differ(format!("{what} {key:?}"), value, &other),
        }
    }
    for (key, value) in projected {
        if !replayed.contains_key(key) {
            differ(format!("{what} {key:?}"), &None::<()>, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use sqlx::PgPool;

    use super::*;

    /// Journal rows committed `days_ago` UTC days back (one second past midnight), with the
    /// key partitions and journal partitions reaching back that far.
    async fn journal_on_days(conn: &mut PgConnection, days_ago: &[i32]) {
        sqlx::query("SELECT ledger.ensure_idempotency_key_partitions(now() - interval '3 days', 3, NULL)")
            .execute(&mut *conn)
            .await
            .unwrap();
        sqlx::query("SELECT ledger.ensure_journal_partitions(now() - interval '3 days', 1)")
            .execute(&mut *conn)
            .await
            .unwrap();
        for (sequence, days) in (1_i64..).zip(days_ago) {
            sqlx::query(
                "INSERT INTO ledger.journal (sequence, created_at, at_ms, kind, record)
                 VALUES ($1, (date_trunc('day', now() AT TIME ZONE 'UTC') - make_interval(days => $2)
                              + interval '1 second') AT TIME ZONE 'UTC', 0, 'expiry_sweep', '{}')",
            )
            .bind(sequence)
            .bind(days)
            .execute(&mut *conn)
            .await
            .unwrap();
        }
    }

    /// The bound moves with each dropped day: the first record committed on the oldest day whose
    /// key partition is left (found missing in review: only "nothing dropped" and "everything
    /// dropped" were tested).
    #[sqlx::test(migrator = "crate::store::MIGRATOR")]
    async fn keys_are_compared_from_the_first_record_of_the_oldest_kept_day(pool: PgPool) {
        let mut conn = pool.acquire().await.unwrap();
        journal_on_days(&mut conn, &[2, 1, 1, 0]).await;
        assert_eq!(first_sequence_with_kept_keys(&mut conn).await.unwrap(), Some(1));
        for (keep_days, first) in [(1, Some(2)), (0, Some(4))] {
            sqlx::query("SELECT ledger.ensure_idempotency_key_partitions(now(), 3, $1)")
                .bind(keep_days)
                .execute(&mut *conn)
                .await
                .unwrap();
            assert_eq!(first_sequence_with_kept_keys(&mut conn).await.unwrap(), first, "keeping {keep_days} days");
        }
        sqlx::query("SELECT ledger.ensure_idempotency_key_partitions(now() + interval '1 day', 3, 0)")
            .execute(&mut *conn)
            .await
            .unwrap();
        assert_eq!(first_sequence_with_kept_keys(&mut conn).await.unwrap(), None, "no record since tomorrow");
    }
}
