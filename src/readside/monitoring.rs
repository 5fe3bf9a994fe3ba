//! Database statistics for the admin RPC: the directory pool's size, the server's connections,
//! and the most scanned tables and indexes (pg_stat_user_tables / pg_stat_user_indexes), so
//! unused indexes and tables read by sequential scans show up. Slow statements are logged by
//! sqlx itself (`log_slow_statements` on the pool's connect options, threshold configured).

use sqlx::PgPool;

/// The most tables (and indexes) one report lists.
pub const MAX_REPORT_ROWS: i64 = 100;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableUsage {
    pub name: String,
    pub sequential_scans: i64,
    pub index_scans: i64,
    pub live_rows: i64,
    pub dead_rows: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexUsage {
    pub table_name: String,
    pub index_name: String,
    pub scans: i64,
    pub size_bytes: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseStats {
    pub pool_size: u32,
    pub pool_idle: u32,
    pub pool_max: u32,
    pub server_connections: i64,
    pub server_active_connections: i64,
    pub tables: Vec<TableUsage>,
    pub indexes: Vec<IndexUsage>,
}

/// Collects the statistics, listing at most `limit` tables and indexes (bounded by [`MAX_REPORT_ROWS`]).
pub async fn collect(pool: &PgPool, limit: i64) -> Result<DatabaseStats, sqlx::Error> {
    let limit = limit.clamp(1, MAX_REPORT_ROWS);
    let (server_connections, server_active_connections): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE state = 'active') FROM pg_stat_activity WHERE datname = current_database()",
    )
    .fetch_one(pool)
    .await?;
    let tables: Vec<(String, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT schemaname || '.' || relname, seq_scan, COALESCE(idx_scan, 0), n_live_tup, n_dead_tup
         FROM pg_stat_user_tables ORDER BY seq_scan + COALESCE(idx_scan, 0) DESC, 1 LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?;
    let indexes: Vec<(String, String, i64, i64)> = sqlx::query_as(
        "SELECT schemaname || '.' || relname, indexrelname, idx_scan, pg_relation_size(indexrelid)
         FROM pg_stat_user_indexes ORDER BY idx_scan DESC, 2 LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(DatabaseStats {
        pool_size: pool.size(),
        pool_idle: u32::try_from(pool.num_idle()).unwrap_or(u32::MAX),
        pool_max: pool.options().get_max_connections(),
        server_connections,
        server_active_connections,
        tables: tables
            .into_iter()
            .map(|(name, sequential_scans, index_scans, live_rows, dead_rows)| TableUsage {
                name,
                sequential_scans,
                index_scans,
                live_rows,
                dead_rows,
            })
            .collect(),
        indexes: indexes
            .into_iter()
            .map(|(table_name, index_name, scans, size_bytes)| IndexUsage { table_name, index_name, scans, size_bytes })
            .collect(),
    })
}
