//! Fencing a failed writer's session before the ledger reloads from PostgreSQL.
//!
//! A writer that gives up on a batch (`CommitTimeout`) drops its connection, but PostgreSQL
//! notices a vanished client only when it next talks to it: a batch still waiting on a lock or on
//! the disk goes on, and may commit after the reload has read the state. The new engine would
//! then hold less than the journal, answer reads with the older balances, and refuse a retry of
//! the abandoned request as a duplicate transaction it does not know; the next batch's checkpoint
//! check would catch it only later. So before the reload reads anything, the old writer's backend
//! is ended and waited for: whatever it was doing has then committed or rolled back for good, and
//! the reload sees which.
//!
//! A backend is named by its process id together with its start time, since a process id is
//! reused once its backend exits: the fence never ends another session.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use crate::store::StoreError;

/// How often the fence looks again while the old backend is still exiting.
const POLL_INTERVAL_MS: u64 = 10;

/// The PostgreSQL backend a writer's connection is served by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterBackend {
    pub pid: i32,
    pub started_at: DateTime<Utc>,
}

/// The backend serving `conn`.
pub async fn identify(conn: &mut PgConnection) -> Result<WriterBackend, StoreError> {
    let (pid, started_at): (i32, DateTime<Utc>) =
        sqlx::query_as("SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()")
            .fetch_one(conn)
            .await?;
    Ok(WriterBackend { pid, started_at })
}

/// Ends `backend` if it is still there, and returns once it is gone. The caller bounds how long
/// this may take (the reload's deadline): a backend ends at its next interrupt check, which a
/// batch waiting on a lock or on the disk reaches within milliseconds.
pub async fn end(conn: &mut PgConnection, backend: WriterBackend) -> Result<(), StoreError> {
    loop {
        let still_there: Option<(bool,)> = sqlx::query_as(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = $1 AND backend_start = $2",
        )
        .bind(backend.pid)
        .bind(backend.started_at)
        .fetch_optional(&mut *conn)
        .await?;
        if still_there.is_none() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(POLL_INTERVAL_MS)).await;
    }
}
