//! The write-ahead journal: a dedicated writer thread that makes the engine's records durable.
//!
//! The engine hands every [`JournalRecord`] to a bounded crossbeam channel (its sink) while it
//! holds the shard locks, so the channel carries a valid serial order. The writer blocks for the
//! first record, then takes whatever else is already queued, up to
//! [`JournalConfig::max_batch_records`] and [`JournalConfig::max_batch_bytes`] (no timer: while
//! one batch commits, the next one fills), and commits the batch in ONE PostgreSQL transaction
//! ([`batch::write_batch`]). Only after the commit does it publish the new committed sequence on
//! a `tokio::sync::watch` channel, which is what callers await before reporting anything done.
//!
//! Fail-stop: the first failure ends the writer. It publishes `failed`, then drops the channel's
//! receiver, so the engine refuses every later change (`JournalUnavailable`) instead of keeping
//! state PostgreSQL lacks. Whoever owns the engine (`crate::ledger`) then rebuilds it from
//! PostgreSQL once PostgreSQL is reachable again.

pub mod batch;
pub(crate) mod copy_rows;
mod transactions;

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, TryRecvError};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use thiserror::Error;
use tokio::sync::watch;

use self::batch::{Batch, write_batch};
use crate::engine::record::JournalRecord;
use crate::metrics::JournalMetrics;
use crate::store::StoreError;

/// How long a connection attempt to PostgreSQL may take before it counts as a failure.
pub const CONNECT_TIMEOUT_MS: u64 = 5_000;

/// How often the writer makes sure the next journal and idempotency-key partitions exist and
/// drops idempotency-key partitions past their retention.
pub const PARTITION_CHECK_INTERVAL_MS: u64 = 60 * 60 * 1_000;

/// How soon partition maintenance tries again after it could not lock its tables.
pub const PARTITION_RETRY_INTERVAL_MS: u64 = 60 * 1_000;

#[derive(Debug, Clone)]
pub struct JournalConfig {
    /// Records the engine may hand over before it waits for the writer (back-pressure).
    pub channel_capacity: usize,
    /// The most records one PostgreSQL transaction carries.
    pub max_batch_records: usize,
    /// The most encoded bytes (journal JSON plus idempotency JSON) one transaction carries; a
    /// batch stops growing once it reaches this.
    pub max_batch_bytes: usize,
    /// Batches of at least this many encoded bytes append with binary COPY rather than UNNEST
    /// (see `batch::write_batch`).
    pub copy_min_bytes: usize,
    /// The longest one batch's transaction may take. Past it the outcome is unknown and the
    /// writer stops (fail-stop), so callers are never left waiting on a hung PostgreSQL.
    pub max_commit_ms: u64,
    /// Past days of idempotency keys the periodic partition maintenance keeps (the ledger sets
    /// it from the engine's retention, see `store::idempotency_key_keep_days`).
    pub key_keep_days: i32,
    /// Where the writer records its batch sizes and commit latencies.
    pub metrics: JournalMetrics,
}

impl Default for JournalConfig {
    fn default() -> Self {
        JournalConfig {
            channel_capacity: 65_536,
            max_batch_records: 8_192,
            max_batch_bytes: 16 << 20,
            copy_min_bytes: 1 << 20,
            max_commit_ms: 30_000,
            key_keep_days: crate::store::idempotency_key_keep_days(crate::engine::EngineConfig::default().retention_ms),
            metrics: JournalMetrics::default(),
        }
    }
}

/// What the writer has made durable, as published on its watch channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Durability {
    /// Every record at or below this sequence is committed in PostgreSQL.
    pub committed_sequence: u64,
    /// The writer stopped on a failure; nothing above `committed_sequence` will be committed by it.
    pub failed: bool,
}

#[derive(Debug, Error)]
pub enum JournalError {
    #[error("PostgreSQL: {0}")]
    Database(#[from] sqlx::Error),
    #[error("encoding a journal record: {0}")]
    Encode(#[from] serde_json::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The batch does not fit what PostgreSQL holds (a bug, or another writer on the database).
    #[error("the journal is inconsistent with the database: {0}")]
    Inconsistent(String),
    #[error("starting the journal writer thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error("the journal writer thread ended before it was ready")]
    WriterGone,
    #[error("connecting to PostgreSQL took longer than {CONNECT_TIMEOUT_MS} ms")]
    ConnectTimeout,
    #[error("a batch took longer than {0} ms to commit; its outcome is unknown")]
    CommitTimeout(u64),
}

impl JournalError {
    pub fn is_unavailable(&self) -> bool {
        match self {
            JournalError::Database(error) => crate::store::is_unavailable(error),
            JournalError::Store(error) => error.is_unavailable(),
            JournalError::ConnectTimeout | JournalError::CommitTimeout(_) => true,
            _ => false,
        }
    }
}

/// The writer's session settings. Every statement of a batch joins a few bound arrays to a table
/// by its primary key. With hash or merge joins allowed, PostgreSQL's cost model prefers reading
/// the whole table (then hashing or sorting it) once the arrays hold a few dozen rows and the
/// table a few thousand (measured: every batch scanned all of `ledger.balances`), so a batch's
/// cost grew with the number of accounts rather than with its own size. Without them each row is
/// one index probe.
/// docs/BENCHMARKS.md, "Index probes instead of table scans", has the figures.
fn writer_session(options: PgConnectOptions) -> PgConnectOptions {
    options.options([("enable_hashjoin", "off"), ("enable_mergejoin", "off")])
}

/// The running writer thread.
pub struct Writer {
    thread: JoinHandle<()>,
}

impl Writer {
    /// Connects, then starts the writer thread draining `receiver`. `committed_sequence` is the
    /// checkpoint the engine was loaded at; progress and failure are published on `durability`.
    pub fn start(
        options: PgConnectOptions,
        receiver: Receiver<JournalRecord>,
        committed_sequence: u64,
        config: JournalConfig,
        durability: watch::Sender<Durability>,
    ) -> Result<Writer, JournalError> {
        let (ready_sender, ready) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new().name("journal-writer".to_owned()).spawn(move || {
            // The connection lives on this thread's own runtime, so the writer never competes
            // with request handling for an async worker.
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(error) => {
                    let _ = ready_sender.send(Err(JournalError::Thread(error)));
                    return;
                }
            };
            runtime.block_on(async move {
                let options = writer_session(options);
                let connect = PgConnection::connect_with(&options);
                let conn = match tokio::time::timeout(Duration::from_millis(CONNECT_TIMEOUT_MS), connect).await {
                    Ok(Ok(conn)) => conn,
                    Ok(Err(error)) => {
                        let _ = ready_sender.send(Err(error.into()));
                        return;
                    }
                    Err(_) => {
                        let _ = ready_sender.send(Err(JournalError::ConnectTimeout));
                        return;
                    }
                };
                let _ = ready_sender.send(Ok(()));
                let mut state = WriterLoop { conn, receiver, committed_sequence, config, durability: &durability };
                if let Err(error) = state.run().await {
                    let committed_sequence = state.committed_sequence;
                    // An outage is expected to heal; anything else is a bug or corruption.
                    if error.is_unavailable() {
                        tracing::warn!(%error, committed_sequence, "journal writer stopped: PostgreSQL unavailable");
                    } else {
                        tracing::error!(%error, committed_sequence, "journal writer stopped");
                    }
                    durability.send_modify(|durability| durability.failed = true);
                    // Dropping the receiver (with `state`) closes the journal: the engine refuses
                    // every later change, and whatever was queued is never reported done.
                    drop(state);
                }
            });
        })?;
        match ready.recv() {
            Ok(Ok(())) => Ok(Writer { thread }),
            Ok(Err(error)) => {
                let _ = thread.join();
                Err(error)
            }
            Err(_) => Err(JournalError::WriterGone),
        }
    }

    /// Waits for the thread to end: it ends once every sender is gone and the queue is written,
    /// or on its first failure.
    pub fn join(self) {
        if self.thread.join().is_err() {
            tracing::error!("the journal writer thread panicked");
        }
    }
}

struct WriterLoop<'a> {
    conn: PgConnection,
    receiver: Receiver<JournalRecord>,
    committed_sequence: u64,
    config: JournalConfig,
    durability: &'a watch::Sender<Durability>,
}

impl WriterLoop<'_> {
    async fn run(&mut self) -> Result<(), JournalError> {
        let mut batch = Batch::default();
        let mut next_partition_check = Instant::now() + Duration::from_millis(PARTITION_CHECK_INTERVAL_MS);
        // Blocking on the channel is fine: this thread's runtime serves only this loop.
        while let Ok(first) = self.receiver.recv() {
            batch.push(first)?;
            while batch.len() < self.config.max_batch_records && batch.bytes() < self.config.max_batch_bytes {
                match self.receiver.try_recv() {
                    Ok(record) => batch.push(record)?,
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            if Instant::now() >= next_partition_check {
                let maintain = crate::store::maintain_partitions(&mut self.conn, self.config.key_keep_days);
                let done = tokio::time::timeout(Duration::from_millis(self.config.max_commit_ms), maintain)
                    .await
                    .map_err(|_| JournalError::CommitTimeout(self.config.max_commit_ms))??;
                let retry_in_ms = if done {
                    PARTITION_CHECK_INTERVAL_MS
                } else {
                    tracing::warn!("partition maintenance could not lock its tables; retrying shortly");
                    PARTITION_RETRY_INTERVAL_MS
                };
                next_partition_check = Instant::now() + Duration::from_millis(retry_in_ms);
            }
            let started = Instant::now();
            let write = write_batch(&mut self.conn, &batch, self.committed_sequence, self.config.copy_min_bytes);
            tokio::time::timeout(Duration::from_millis(self.config.max_commit_ms), write)
                .await
                .map_err(|_| JournalError::CommitTimeout(self.config.max_commit_ms))??;
            self.config.metrics.commit_seconds.observe(started.elapsed().as_secs_f64());
            self.config.metrics.batch_records.observe(batch.len() as f64);
            if let Some(last) = batch.last_sequence() {
                self.committed_sequence = last;
                self.durability.send_modify(|durability| durability.committed_sequence = last);
            }
            batch.clear();
        }
        Ok(())
    }
}
