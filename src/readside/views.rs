//! The summary materialized views, refreshed CONCURRENTLY (readers keep the old contents until
//! the new ones are ready; each view has the unique index that requires):
//!
//! - `ledger.user_balance_summary`: per user and asset, the balances summed over the domains.
//! - `ledger.operation_summary`: per user, domain, asset, operation and outcome, the count,
//!   amount and fees (minor units) of the money requests in the journal.
//! - `ledger.transaction_summary`: per user, domain, type, status and asset, the count, principal
//!   and fees of the business transactions (`ledger.transactions`, issue 5).

use sqlx::PgConnection;

/// The views, in refresh order.
pub const VIEWS: [&str; 3] = ["ledger.user_balance_summary", "ledger.operation_summary", "ledger.transaction_summary"];

/// Refreshes every summary view.
pub async fn refresh(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    for view in VIEWS {
        sqlx::query(sqlx::AssertSqlSafe(format!("REFRESH MATERIALIZED VIEW CONCURRENTLY {view}")))
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}
