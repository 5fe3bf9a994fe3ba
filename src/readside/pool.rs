//! The read side's own connection pool (the journal writer keeps its single connection): bounded,
//! connecting lazily, and logging every statement slower than the configured threshold at WARN
//! through sqlx's own slow-statement logging (target `sqlx::query`).

use std::time::Duration;

use sqlx::ConnectOptions;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// How long a request waits for a pooled connection before failing UNAVAILABLE.
const ACQUIRE_TIMEOUT_MS: u64 = 5_000;

/// The pool over `options`, at most `max_connections`, slow statements logged above `slow_statement_ms`.
pub fn connect(options: &PgConnectOptions, max_connections: u32, slow_statement_ms: u64) -> PgPool {
    let options = options.clone().log_slow_statements(log::LevelFilter::Warn, Duration::from_millis(slow_statement_ms));
    PgPoolOptions::new()
        .max_connections(max_connections.max(1))
        .acquire_timeout(Duration::from_millis(ACQUIRE_TIMEOUT_MS))
        .connect_lazy_with(options)
}
