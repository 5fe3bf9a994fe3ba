//! Operator actions on the outbox: re-queue failed events (the `diboas-ledger outbox requeue`
//! command) and prune published ones past their retention (the relay does this periodically).

use std::time::{Duration, Instant};

use sqlx::PgConnection;

use super::OutboxError;

/// The most rows one prune statement deletes, so pruning never holds a long transaction.
pub const MAX_PRUNE_ROWS: i64 = 10_000;

/// The longest one pruning pass keeps deleting before the relay publishes again. A pass that
/// runs out of time is followed by another after the next round, so pruning keeps pace with
/// events as fast as PostgreSQL deletes them without holding up their publication for long.
pub const PRUNE_PASS_BUDGET: Duration = Duration::from_millis(250);

/// What one pruning pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrunePass {
    pub deleted: u64,
    /// Nothing more was due when it stopped; otherwise it ran out of time.
    pub caught_up: bool,
}

/// Puts every Failed event back to Pending with its attempts reset, due at once, keeping its
/// last error for the record. Returns how many were re-queued.
pub async fn requeue_failed(conn: &mut PgConnection) -> Result<u64, OutboxError> {
    let requeued = sqlx::query(
        "UPDATE ledger.outbox_retries SET status = 'pending', attempts = 0, next_attempt_at = now()
         WHERE status = 'failed'",
    )
    .execute(&mut *conn)
    .await?;
    Ok(requeued.rows_affected())
}

/// Prunes statement after statement (each [`prune_published`] of at most `rows_per_statement`,
/// its own short transaction) until nothing more is due or `budget` has passed. Found in session
/// 16: one statement of 10,000 rows an hour kept up with under 3 events a second.
pub async fn prune_pass(
    conn: &mut PgConnection,
    retention_ms: u64,
    rows_per_statement: i64,
    budget: Duration,
) -> Result<PrunePass, OutboxError> {
    let started = Instant::now();
    let rows_per_statement = rows_per_statement.max(1);
    let full = u64::try_from(rows_per_statement).unwrap_or(u64::MAX);
    let mut deleted = 0;
    loop {
        let batch = prune_published(conn, retention_ms, rows_per_statement).await?;
        deleted += batch;
        if batch < full {
            return Ok(PrunePass { deleted, caught_up: true });
        }
        if started.elapsed() >= budget {
            return Ok(PrunePass { deleted, caught_up: false });
        }
    }
}

/// Deletes up to `max_rows` published events whose relay round is older than `retention_ms`
/// and that come before every unpublished event, so the pruned positions are always a prefix
/// (recorded in `ledger.outbox_pruned`, which the event stream checks). Their retry rows go
/// with them, and so do relay rounds wholly below the pruned prefix (except the latest, which
/// is the cursor). Returns how many events were deleted.
pub async fn prune_published(conn: &mut PgConnection, retention_ms: u64, max_rows: i64) -> Result<u64, OutboxError> {
    let retention_ms = i64::try_from(retention_ms).unwrap_or(i64::MAX);
    let (deleted, through): (i64, Option<i64>) = sqlx::query_as(
        "WITH horizon AS (
             SELECT LEAST(
                 (SELECT COALESCE(min(position), 9223372036854775807) FROM ledger.outbox_retries
                  WHERE status <> 'published'),
                 (SELECT COALESCE(max(through_position), 0) + 1 FROM ledger.outbox_deliveries)
             ) AS first_unpublished,
             (SELECT COALESCE(max(through_position), 0) FROM ledger.outbox_deliveries
              WHERE published_at < now() - make_interval(secs => $1::float8 / 1000)) AS old_through
         ), doomed AS (
             SELECT position FROM ledger.outbox_events, horizon
             WHERE position < horizon.first_unpublished AND position <= horizon.old_through
             ORDER BY position LIMIT $2
         ), deleted AS (
             DELETE FROM ledger.outbox_events o USING doomed d WHERE o.position = d.position RETURNING o.position
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
    if let Some(through) = through {
        sqlx::query(
            "DELETE FROM ledger.outbox_deliveries
             WHERE through_position <= $1
                 AND through_position < (SELECT max(through_position) FROM ledger.outbox_deliveries)",
        )
        .bind(through)
        .execute(&mut *conn)
        .await?;
        tracing::info!(deleted, pruned_through = through, "pruned published outbox events");
    }
    Ok(deleted.max(0) as u64)
}
