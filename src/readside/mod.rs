//! The read side's upkeep and reports, next to the ledger: the summary materialized views, the
//! periodic maintenance (view refresh, audit retention) that `serve` runs, and database
//! statistics for the admin RPC.
//!
//! - [`views`]: refreshing the summary materialized views (balances, operations, transactions).
//! - [`maintenance`]: the background task and its configuration.
//! - [`monitoring`]: pool, connection, table and index usage.
//! - [`pool`]: the read side's connection pool, with slow-statement logging.

pub mod maintenance;
pub mod monitoring;
pub mod pool;
pub mod views;
