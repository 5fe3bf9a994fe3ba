//! Retention of the audit trail: partitions past the hot window move to the `archive` schema
//! (detached, moved, attached to `archive.<table>`: still queryable, out of the hot tables'
//! indexes and scans), and archived partitions older than the retention period are dropped.
//!
//! Audit and data-access logs are kept 7 years (regulatory). Ledger transactions (the journal)
//! are kept indefinitely and are not touched here. The rules are whole months: a partition
//! moves or goes only once every row in it is past the limit.

use chrono::{DateTime, Months, Utc};
use sqlx::{Connection, PgConnection};

use super::partitions::PARTITIONED_TABLES;

/// How long audit rows stay in the hot tables before moving to the archive.
pub const HOT_MONTHS: u32 = 13;

/// How long audit rows are kept at all: 7 years.
pub const KEEP_MONTHS: u32 = 84;

/// Partitions moved to the archive and dropped by one run, over all tables.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RetentionReport {
    pub archived: i32,
    pub dropped: i32,
}

/// How long one run waits for a table lock. Moving a partition needs an exclusive lock on the
/// parent, and while it waits every audit insert (the journal writer's batches) queues behind it,
/// so it gives up quickly and tries again at the next run.
const RETENTION_LOCK_TIMEOUT_MS: u32 = 250;

/// Applies the retention rules as of `now`, one table per transaction.
pub async fn apply(conn: &mut PgConnection, now: DateTime<Utc>) -> Result<RetentionReport, sqlx::Error> {
    let archive_before = now.checked_sub_months(Months::new(HOT_MONTHS)).unwrap_or(DateTime::<Utc>::MIN_UTC);
    let drop_before = now.checked_sub_months(Months::new(KEEP_MONTHS)).unwrap_or(DateTime::<Utc>::MIN_UTC);
    let mut report = RetentionReport::default();
    for table in PARTITIONED_TABLES {
        let mut tx = conn.begin().await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("SET LOCAL lock_timeout = {RETENTION_LOCK_TIMEOUT_MS}")))
            .execute(&mut *tx)
            .await?;
        let (archived, dropped): (i32, i32) = sqlx::query_as("SELECT * FROM audit.apply_retention($1, $2, $3)")
            .bind(table)
            .bind(archive_before)
            .bind(drop_before)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        report.archived += archived;
        report.dropped += dropped;
    }
    Ok(report)
}
