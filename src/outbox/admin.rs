//! Operator actions on the outbox: re-queue failed events (the `diboas-ledger outbox requeue`
//! command) and prune published ones past their retention (the relay does this periodically).

use sqlx::PgConnection;

use super::OutboxError;

/// The most rows one prune statement deletes, so pruning never holds a long transaction.
pub const MAX_PRUNE_ROWS: i64 = 10_000;

/// Puts every Failed event back to Pending with its attempts reset, due at once, keeping its
/// last error for the record. Returns how many were re-queued.
pub async fn requeue_failed(conn: &mut PgConnection) -> Result<u64, OutboxError> {
    let requeued = sqlx::query(
        "UPDATE ledger.outbox SET status = 'pending', attempts = 0, next_attempt_at = now() WHERE status = 'failed'",
    )
    .execute(&mut *conn)
    .await?;
    Ok(requeued.rows_affected())
}

/// Deletes up to `max_rows` published events older than `retention_ms` that come before every
/// unpublished event, so the pruned positions are always a prefix (recorded in
/// `ledger.outbox_pruned`, which the event stream checks). Returns how many were deleted.
pub async fn prune_published(conn: &mut PgConnection, retention_ms: u64, max_rows: i64) -> Result<u64, OutboxError> {
    let retention_ms = i64::try_from(retention_ms).unwrap_or(i64::MAX);
    let (deleted, through): (i64, Option<i64>) = sqlx::query_as(
        "WITH horizon AS (
             SELECT COALESCE(min(position), 9223372036854775807) AS first_unpublished
             FROM ledger.outbox WHERE status <> 'published'
         ), doomed AS (
             SELECT position FROM ledger.outbox, horizon
             WHERE status = 'published' AND published_at < now() - make_interval(secs => $1::float8 / 1000)
                 AND position < horizon.first_unpublished
             ORDER BY position LIMIT $2
         ), deleted AS (
             DELETE FROM ledger.outbox o USING doomed d WHERE o.position = d.position RETURNING o.position
         ), moved AS (
             UPDATE ledger.outbox_pruned SET pruned_through = GREATEST(pruned_through, (SELECT max(position) FROM deleted))
             WHERE EXISTS (SELECT 1 FROM deleted)
             RETURNING pruned_through
         )
         SELECT (SELECT count(*) FROM deleted), (SELECT pruned_through FROM moved)",
    )
    .bind(retention_ms)
    .bind(max_rows)
    .fetch_one(&mut *conn)
    .await?;
    if deleted > 0 {
        tracing::info!(deleted, pruned_through = through, "pruned published outbox events");
    }
    Ok(deleted.max(0) as u64)
}
