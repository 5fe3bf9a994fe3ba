//! Monthly partitions of the audit and data-access logs, created ahead by the same maintenance
//! that creates the journal's (`store::ensure_partitions`: at `migrate`, at start-up and
//! periodically by the journal writer).

use sqlx::PgConnection;

/// How many months of audit partitions exist beyond the current one.
pub const AUDIT_PARTITION_MONTHS_AHEAD: i32 = 3;

/// The partitioned tables of the `audit` schema.
pub const PARTITIONED_TABLES: [&str; 2] = ["audit_log", "data_access_log"];

/// Creates the current month's partitions and the next ones, if missing.
pub async fn ensure(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    for table in PARTITIONED_TABLES {
        sqlx::query("SELECT audit.ensure_monthly_partitions($1, now(), $2)")
            .bind(table)
            .bind(AUDIT_PARTITION_MONTHS_AHEAD)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}
