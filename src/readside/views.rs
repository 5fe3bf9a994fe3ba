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
//!   every record at each refresh (52 s at a million records).
//!
//! The materialized views are refreshed CONCURRENTLY (readers keep the old contents until the
//! new ones are ready; each view has the unique index that requires).

use std::time::{Duration, Instant};

use sqlx::PgConnection;

/// The materialized views, in refresh order.
pub const MATERIALIZED_VIEWS: [&str; 2] = ["ledger.user_balance_summary", "ledger.transaction_summary"];

/// Journal records counted into the operation totals per statement (one short transaction each).
pub const OPERATION_RECORDS_PER_STEP: i64 = 20_000;

/// How long one [`refresh`] keeps counting operations. A ledger far behind (the migration that
/// introduced the totals, on a long journal) catches up over several refreshes rather than hold
/// one connection for minutes; a ledger in service needs one step.
pub const OPERATION_COUNTING_BUDGET_MS: u64 = 2_000;

/// Refreshes the materialized views, then counts the journal records committed since the last
/// refresh into the operation totals, for up to [`OPERATION_COUNTING_BUDGET_MS`]. Returns how
/// many journal sequences it counted.
pub async fn refresh(conn: &mut PgConnection) -> Result<u64, sqlx::Error> {
    for view in MATERIALIZED_VIEWS {
        sqlx::query(sqlx::AssertSqlSafe(format!("REFRESH MATERIALIZED VIEW CONCURRENTLY {view}")))
            .execute(&mut *conn)
            .await?;
    }
    let started = Instant::now();
    let mut counted = 0_u64;
    loop {
        let (step,): (i64,) = sqlx::query_as("SELECT ledger.count_operations($1)")
            .bind(OPERATION_RECORDS_PER_STEP)
            .fetch_one(&mut *conn)
            .await?;
        counted += u64::try_from(step).unwrap_or(0);
        if step < OPERATION_RECORDS_PER_STEP || started.elapsed() >= Duration::from_millis(OPERATION_COUNTING_BUDGET_MS)
        {
            return Ok(counted);
        }
    }
}
