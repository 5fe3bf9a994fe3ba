//! The summary views, brought up to date by `serve`'s maintenance task and by `retention`:
//!
//! - `ledger.user_balance_summary` (materialized): per user and asset, the balances summed over
//!   the domains.
//! - `ledger.transaction_summary` (materialized): per user, domain, type, status and asset, the
//!   count, principal and fees of the business transactions (`ledger.transactions`, issue 5).
//! - `ledger.operation_summary`: per user, domain, asset, operation and outcome, the count,
//!   amount and fees (minor units) of the money requests in the journal. A view over running
//!   totals (`ledger.operation_totals`) that [`refresh`] extends with the records committed
//!   since it last ran, never re-reading the journal: the materialized view it replaced re-read
//!   every record at each refresh (52 s at a million records). Counting takes about 20 µs a
//!   record, so a ledger journaling 16,000 records a second keeps about a third of a core busy.
//!
//! The materialized views are refreshed CONCURRENTLY (readers keep the old contents until the
//! new ones are ready; each view has the unique index that requires), and paced: a full refresh
//! re-reads a table that only grows, so `serve` refreshes a view no more than
//! [`REFRESH_TIME_SHARE`] of the time ([`RefreshPacing`]) rather than back to back once a refresh
//! outgrows the task's interval.

use std::time::{Duration, Instant};

use sqlx::PgConnection;

/// The materialized views, in refresh order.
pub const MATERIALIZED_VIEWS: [&str; 2] = ["ledger.user_balance_summary", "ledger.transaction_summary"];

/// Journal records counted into the operation totals per statement (one short transaction each).
pub const OPERATION_RECORDS_PER_STEP: i64 = 20_000;

/// A materialized view's refreshes take at most one part in this many of the time: one whose
/// refresh took 6 s is not refreshed again for 60 s, whatever the task's interval (measured:
/// `ledger.transaction_summary` took 5.9 s to refresh at a million transactions).
pub const REFRESH_TIME_SHARE: u32 = 10;

/// When each materialized view may next be refreshed (see [`REFRESH_TIME_SHARE`]). A new one has
/// every view due.
#[derive(Debug, Default)]
pub struct RefreshPacing {
    not_before: [Option<Instant>; MATERIALIZED_VIEWS.len()],
}

impl RefreshPacing {
    fn is_due(&self, view: usize, now: Instant) -> bool {
        self.not_before[view].is_none_or(|not_before| now >= not_before)
    }

    fn refreshed(&mut self, view: usize, started: Instant, took: Duration) {
        self.not_before[view] = started.checked_add(took.saturating_mul(REFRESH_TIME_SHARE));
    }
}

/// Refreshes every materialized view now and counts every journal record committed before the
/// call into the operation totals (for `diboas-ledger retention` and tests). Returns how many
/// journal sequences it counted.
pub async fn refresh(conn: &mut PgConnection) -> Result<u64, sqlx::Error> {
    refresh_paced(conn, &mut RefreshPacing::default(), None).await
}

/// Refreshes the materialized views `pacing` says are due, then counts the journal records
/// committed before the call into the operation totals, in steps of [`OPERATION_RECORDS_PER_STEP`],
/// stopping early once counting has taken `counting_budget` (the rest waits for the next call,
/// and the lag is logged). Returns how many journal sequences it counted.
pub async fn refresh_paced(
    conn: &mut PgConnection,
    pacing: &mut RefreshPacing,
    counting_budget: Option<Duration>,
) -> Result<u64, sqlx::Error> {
    for (index, view) in MATERIALIZED_VIEWS.into_iter().enumerate() {
        let started = Instant::now();
        if !pacing.is_due(index, started) {
            continue;
        }
        sqlx::query(sqlx::AssertSqlSafe(format!("REFRESH MATERIALIZED VIEW CONCURRENTLY {view}")))
            .execute(&mut *conn)
            .await?;
        let took = started.elapsed();
        pacing.refreshed(index, started, took);
        if took >= Duration::from_secs(1) {
            let next_in_ms = took.saturating_mul(REFRESH_TIME_SHARE).as_millis();
            tracing::info!(view, took_ms = took.as_millis(), next_in_ms, "slow materialized view refresh");
        }
    }
    count_operations(conn, counting_budget).await
}

/// Counts the records committed before the call into the operation totals (see [`refresh_paced`]).
async fn count_operations(conn: &mut PgConnection, budget: Option<Duration>) -> Result<u64, sqlx::Error> {
    let started = Instant::now();
    let (from, target): (i64, i64) = sqlx::query_as(
        "SELECT c.counted_through, k.committed_sequence FROM ledger.operation_totals_cursor c, ledger.checkpoint k",
    )
    .fetch_one(&mut *conn)
    .await?;
    let mut through = from;
    while through < target {
        if budget.is_some_and(|budget| started.elapsed() >= budget) {
            tracing::warn!(
                behind = target - through,
                "the operation totals are behind the journal; counting goes on next time"
            );
            break;
        }
        (through,) = sqlx::query_as("SELECT ledger.count_operations($1)")
            .bind(OPERATION_RECORDS_PER_STEP)
            .fetch_one(&mut *conn)
            .await?;
    }
    Ok(u64::try_from(through.saturating_sub(from)).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A view is due at once, then again only after `REFRESH_TIME_SHARE` times its last
    /// refresh; each view keeps its own pace.
    #[test]
    fn a_slow_refresh_defers_only_its_own_view() {
        let mut pacing = RefreshPacing::default();
        let start = Instant::now();
        assert!(pacing.is_due(0, start) && pacing.is_due(1, start));
        pacing.refreshed(1, start, Duration::from_secs(6));
        assert!(pacing.is_due(0, start + Duration::from_secs(1)));
        assert!(!pacing.is_due(1, start + Duration::from_secs(59)));
        assert!(pacing.is_due(1, start + Duration::from_secs(60)));
        pacing.refreshed(0, start, Duration::from_millis(50));
        assert!(pacing.is_due(0, start + Duration::from_millis(500)), "fast views follow the task's interval");
    }
}
