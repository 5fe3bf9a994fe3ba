//! The read side's background task inside `serve`: every interval it brings the summary views up
//! to date (a slow materialized view less often: `views::RefreshPacing`) and applies the audit
//! retention (which does nothing until a month passes its limit).
//! Failures are logged and retried at the next tick; they never touch the ledger.

use std::time::Duration;

use sqlx::PgPool;

use super::views;
use crate::audit::retention;

/// The shortest interval accepted: a refresh re-reads the balances and transactions tables for
/// their materialized views, so more often than this would only load PostgreSQL (and a zero
/// interval is not a timer).
pub const MIN_INTERVAL_MS: u64 = 1_000;

/// Refreshes and retention every `interval` (at least [`MIN_INTERVAL_MS`]), until the task is aborted.
pub async fn run_forever(pool: PgPool, interval: Duration) {
    let mut ticker = tokio::time::interval(interval.max(Duration::from_millis(MIN_INTERVAL_MS)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pacing = views::RefreshPacing::default();
    // Counting operations may take half of each interval; more, and the task would fall behind
    // its own ticks.
    let counting_budget = interval.max(Duration::from_millis(MIN_INTERVAL_MS)) / 2;
    loop {
        ticker.tick().await;
        if let Err(error) = run_paced(&pool, &mut pacing, Some(counting_budget)).await {
            tracing::warn!(%error, "read-side maintenance failed; retrying at the next tick");
        }
    }
}

/// One round: refresh every view, apply retention (`diboas-ledger retention`).
pub async fn run_once(pool: &PgPool) -> Result<retention::RetentionReport, sqlx::Error> {
    run_paced(pool, &mut views::RefreshPacing::default(), None).await
}

/// One round of the task: refresh the views `pacing` says are due, count operations for up to
/// `counting_budget`, apply retention.
async fn run_paced(
    pool: &PgPool,
    pacing: &mut views::RefreshPacing,
    counting_budget: Option<Duration>,
) -> Result<retention::RetentionReport, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let counted = views::refresh_paced(&mut conn, pacing, counting_budget).await?;
    if counted > 0 {
        tracing::debug!(counted, "journal records counted into the operation totals");
    }
    let report = retention::apply(&mut conn, chrono::Utc::now()).await?;
    if report != retention::RetentionReport::default() {
        tracing::info!(archived = report.archived, dropped = report.dropped, "audit retention applied");
    }
    Ok(report)
}
