//! The write-ahead journal: two dedicated threads that make the engine's records durable.
//!
//! The engine hands every [`JournalRecord`] to a bounded crossbeam channel (its sink) while it
//! holds the shard locks, so the channel carries a valid serial order. The batcher thread drains
//! that channel into the next [`Batch`], encoding each record and adding up its projection
//! changes and outbox rows as it arrives. The committer thread asks the batcher for a batch
//! whenever it is free, and commits it in ONE PostgreSQL transaction ([`batch::write_batch`]).
//! The batcher hands over what it holds at that moment (waiting for a first record if it holds
//! none), up to [`JournalConfig::max_batch_records`] and [`JournalConfig::max_batch_bytes`]: no
//! timer. While one batch commits, the next one fills and is encoded, so the encoding no longer
//! adds to the time between commits (docs/JOURNAL.md, "The batcher and the committer"). Only
//! after a commit does the committer publish the new committed sequence on a
//! `tokio::sync::watch` channel, which is what callers await before reporting anything done.
//!
//! Fail-stop: the first failure ends the committer (an encoding failure reaches it as the answer
//! to its ask, a vanished batcher as a hand-over channel closed without the last batch). It
//! publishes `failed`, then drops its ends of the hand-over channels; only then does the batcher
//! drop the engine channel's receiver, so the engine refuses every later change
//! (`JournalUnavailable`) instead of keeping state PostgreSQL lacks. Whoever owns the engine
//! (`crate::ledger`) then rebuilds it from PostgreSQL once PostgreSQL is reachable again.

pub mod batch;
pub mod copy_rows;
pub mod fence;
mod transactions;

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use thiserror::Error;
use tokio::sync::watch;

use self::batch::{Batch, write_batch};
use self::fence::WriterBackend;
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
    /// Records the engine may hand over before it waits for the writer (back-pressure). Not
    /// counting the batch the batcher is filling and the one being committed.
    pub channel_capacity: usize,
    /// The most records one PostgreSQL transaction carries.
    pub max_batch_records: usize,
    /// The most encoded bytes (the journal rows' JSON) one transaction carries; a
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
    #[error("a journal writer thread ended without finishing its work")]
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
///
/// A transaction left idle longer than a commit may take ends on the server's side too: the
/// writer gave up on it by then (`CommitTimeout`). Without this, a writer cut off mid-batch by a
/// network partition (its FIN never arriving) left its backend idle in transaction, holding the
/// checkpoint's and the balances' row locks, and every later writer waited on them until TCP
/// keepalive ended the backend, about two hours with the operating system's defaults.
///
/// A commit is flushed to disk before PostgreSQL answers, whatever the database or role says:
/// callers hear "OK" once their batch has committed, so `synchronous_commit = off`, a common
/// tuning, would let a PostgreSQL crash lose acknowledged batches, and recovery would then hand
/// their sequences to other operations (promises 1 and 7).
fn writer_session(options: PgConnectOptions, max_commit_ms: u64) -> PgConnectOptions {
    let idle_ms = max_commit_ms.max(1).to_string();
    options.options([
        ("enable_hashjoin", "off"),
        ("enable_mergejoin", "off"),
        ("idle_in_transaction_session_timeout", idle_ms.as_str()),
        ("synchronous_commit", "on"),
    ])
}

/// The running writer: the committer and the batcher threads.
pub struct Writer {
    committer: JoinHandle<()>,
    batcher: JoinHandle<()>,
    backend: WriterBackend,
}

impl Writer {
    /// Connects, then starts the committer and the batcher, which drains `receiver`. `committed_sequence` is the
    /// checkpoint the engine was loaded at; progress and failure are published on `durability`.
    pub fn start(
        options: PgConnectOptions,
        receiver: Receiver<Box<JournalRecord>>,
        committed_sequence: u64,
        config: JournalConfig,
        durability: watch::Sender<Durability>,
    ) -> Result<Writer, JournalError> {
        let (ready_sender, ready) = std::sync::mpsc::sync_channel(1);
        // The committer asks for a batch (`wants`) when it is free; the batcher answers on `batches`.
        let (wants_sender, wants) = crossbeam_channel::bounded::<()>(1);
        let (batches_sender, batches) = crossbeam_channel::bounded(1);
        let limits = BatchLimits { max_records: config.max_batch_records, max_bytes: config.max_batch_bytes };
        let committer = std::thread::Builder::new().name("journal-writer".to_owned()).spawn(move || {
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
                let options = writer_session(options, config.max_commit_ms);
                let connect = PgConnection::connect_with(&options);
                let mut conn = match tokio::time::timeout(Duration::from_millis(CONNECT_TIMEOUT_MS), connect).await {
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
                match fence::identify(&mut conn).await {
                    Ok(backend) => {
                        let _ = ready_sender.send(Ok(backend));
                    }
                    Err(error) => {
                        let _ = ready_sender.send(Err(error.into()));
                        return;
                    }
                }
                let mut state = WriterLoop {
                    conn,
                    wants: wants_sender,
                    batches,
                    committed_sequence,
                    config,
                    durability: &durability,
                };
                if let Err(error) = state.run().await {
                    let committed_sequence = state.committed_sequence;
                    // An outage is expected to heal; anything else is a bug or corruption.
                    if error.is_unavailable() {
                        tracing::warn!(%error, committed_sequence, "journal writer stopped: PostgreSQL unavailable");
                    } else {
                        tracing::error!(%error, committed_sequence, "journal writer stopped");
                    }
                    durability.send_modify(|durability| durability.failed = true);
                    // Dropping the hand-over channels (with `state`) stops the batcher, which drops
                    // the engine channel's receiver: the journal is closed, the engine refuses
                    // every later change, and whatever was queued is never reported done.
                    drop(state);
                }
            });
        })?;
        let backend = match ready.recv() {
            Ok(Ok(backend)) => backend,
            Ok(Err(error)) => {
                let _ = committer.join();
                return Err(error);
            }
            Err(_) => return Err(JournalError::WriterGone),
        };
        let batcher = std::thread::Builder::new()
            .name("journal-batcher".to_owned())
            .spawn(move || fill_batches(&receiver, &wants, &batches_sender, limits))?;
        Ok(Writer { committer, batcher, backend })
    }

    /// The PostgreSQL backend serving the writer's connection, for the reload after a failure
    /// to end it first (`fence`).
    pub fn backend(&self) -> WriterBackend {
        self.backend
    }

    /// Waits for both threads to end: they end once every sender is gone and the queue is written,
    /// or on its first failure.
    pub fn join(self) {
        if self.batcher.join().is_err() {
            tracing::error!("the journal batcher thread panicked");
        }
        if self.committer.join().is_err() {
            tracing::error!("the journal committer thread panicked");
        }
    }
}

/// How large the batcher lets a batch grow.
#[derive(Debug, Clone, Copy)]
struct BatchLimits {
    max_records: usize,
    max_bytes: usize,
}

impl BatchLimits {
    fn is_full(self, batch: &Batch) -> bool {
        batch.len() >= self.max_records || batch.bytes() >= self.max_bytes
    }
}

/// What the batcher answers when the committer asks for a batch.
#[derive(Debug)]
enum Handover {
    /// The next batch (never empty).
    Batch(Batch),
    /// The engine is gone: this is the last batch (possibly empty), and the batcher has ended.
    Last(Batch),
    /// Encoding a record failed; the journal must stop.
    Failed(JournalError),
}

/// The batcher thread: fills the next batch from the engine's channel, and hands it over each
/// time the committer asks. Ends after handing over the last batch once the engine's senders are
/// all gone, or when the committer stops asking (it failed, or is gone); either way it drops
/// `records`, which closes the journal to the engine. A batcher that ends any other way (a
/// panic) is noticed by the committer as a hand-over channel closed without `Last`.
fn fill_batches(
    records: &Receiver<Box<JournalRecord>>,
    wants: &Receiver<()>,
    batches: &Sender<Handover>,
    limits: BatchLimits,
) {
    let mut next = Batch::default();
    // Where records come from while the batch has room; a full batch waits for the committer.
    let no_records = crossbeam_channel::never();
    loop {
        let source = if limits.is_full(&next) { &no_records } else { records };
        crossbeam_channel::select! {
            recv(wants) -> asked => {
                if asked.is_err() {
                    return;
                }
                let handover = match fill_for_handover(records, &mut next, limits) {
                    Ok(true) => Handover::Batch(std::mem::take(&mut next)),
                    Ok(false) => Handover::Last(std::mem::take(&mut next)),
                    Err(error) => Handover::Failed(error),
                };
                let ends = !matches!(handover, Handover::Batch(_));
                let failed = matches!(handover, Handover::Failed(_));
                if batches.send(handover).is_err() || ends {
                    return finish(wants, failed);
                }
            }
            recv(source) -> record => {
                let handover = match record.map(|record| next.push(*record)) {
                    Ok(Ok(())) => continue,
                    Ok(Err(error)) => Handover::Failed(error),
                    Err(_) => Handover::Last(std::mem::take(&mut next)),
                };
                // The engine is gone, or a record could not be encoded: answer the next ask, then stop.
                let failed = matches!(handover, Handover::Failed(_));
                if wants.recv().is_ok() && batches.send(handover).is_ok() {
                    finish(wants, failed);
                }
                return;
            }
        }
    }
}

/// After its last answer: a batcher that reported a failure waits until the committer is gone
/// (it drops its end of `wants` only after publishing `failed`), so the engine's sink closes
/// after `failed` is published, never before.
fn finish(wants: &Receiver<()>, reported_failure: bool) {
    if reported_failure {
        while wants.recv().is_ok() {}
    }
}

/// Readies `next` for the committer: waits for a first record if it is empty, then takes what is
/// already queued, within `limits`. `Ok(false)`: the engine is gone, so `next` is the last batch
/// (possibly empty).
fn fill_for_handover(
    records: &Receiver<Box<JournalRecord>>,
    next: &mut Batch,
    limits: BatchLimits,
) -> Result<bool, JournalError> {
    if next.is_empty() {
        match records.recv() {
            Ok(record) => next.push(*record)?,
            Err(_) => return Ok(false),
        }
    }
    while !limits.is_full(next) {
        match records.try_recv() {
            Ok(record) => next.push(*record)?,
            Err(TryRecvError::Empty) => break,
            Err(TryRecvError::Disconnected) => return Ok(false),
        }
    }
    Ok(true)
}

/// The committer's side of the hand-over: asks for the next batch and waits for it. `Ok(None)`:
/// the batcher handed over everything and ended. A batcher that vanished without saying so (it
/// panicked) is an error, so the journal stops as it would on any other failure.
fn next_batch(
    wants: &Sender<()>,
    batches: &Receiver<Handover>,
    closed: &mut bool,
) -> Result<Option<Batch>, JournalError> {
    if *closed {
        return Ok(None);
    }
    let answer = match wants.send(()) {
        Ok(()) => batches.recv().ok(),
        Err(_) => None,
    };
    match answer {
        Some(Handover::Batch(batch)) => Ok(Some(batch)),
        Some(Handover::Last(batch)) => {
            *closed = true;
            Ok(Some(batch))
        }
        Some(Handover::Failed(error)) => Err(error),
        None => Err(JournalError::WriterGone),
    }
}

struct WriterLoop<'a> {
    conn: PgConnection,
    /// Asks the batcher for the next batch.
    wants: Sender<()>,
    batches: Receiver<Handover>,
    committed_sequence: u64,
    config: JournalConfig,
    durability: &'a watch::Sender<Durability>,
}

impl WriterLoop<'_> {
    async fn run(&mut self) -> Result<(), JournalError> {
        let mut next_partition_check = Instant::now() + Duration::from_millis(PARTITION_CHECK_INTERVAL_MS);
        let mut closed = false;
        // Blocking on the channels is fine: this thread's runtime serves only this loop.
        while let Some(batch) = next_batch(&self.wants, &self.batches, &mut closed)? {
            if batch.is_empty() {
                continue;
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
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::engine::record::Origin;

    use super::*;

    fn record(sequence: u64) -> Box<JournalRecord> {
        Box::new(JournalRecord { sequence, at_ms: 0, origin: Origin::ExpirySweep, effects: Vec::new() })
    }

    /// The writer's commits wait for the disk even where the database was tuned not to, since an
    /// acknowledged batch must survive a crash of PostgreSQL (session 23, found in review).
    #[sqlx::test(migrator = "crate::store::MIGRATOR")]
    async fn the_writer_commits_synchronously_whatever_the_database_says(pool: sqlx::PgPool) {
        let (database,): (String,) = sqlx::query_as("SELECT current_database()").fetch_one(&pool).await.unwrap();
        // The name is the test database's own, made by `sqlx::test`.
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("ALTER DATABASE \"{database}\" SET synchronous_commit = off")))
            .execute(&pool)
            .await
            .unwrap();
        let mut tuned = PgConnection::connect_with(&pool.connect_options()).await.unwrap();
        let (setting,): (String,) = sqlx::query_as("SHOW synchronous_commit").fetch_one(&mut tuned).await.unwrap();
        assert_eq!(setting, "off", "the database's own setting applies to other sessions");
        let options = writer_session((*pool.connect_options()).clone(), 1_000);
        let mut writer = PgConnection::connect_with(&options).await.unwrap();
        let (setting,): (String,) = sqlx::query_as("SHOW synchronous_commit").fetch_one(&mut writer).await.unwrap();
        assert_eq!(setting, "on");
    }

    /// A writer's transaction left idle past a commit's deadline is ended by PostgreSQL, so a
    /// writer cut off mid-batch cannot hold the checkpoint's row lock for hours (session 22).
    #[sqlx::test(migrator = "crate::store::MIGRATOR")]
    async fn a_writer_transaction_left_idle_past_the_commit_deadline_is_ended(pool: sqlx::PgPool) {
        let options = writer_session((*pool.connect_options()).clone(), 1_000);
        let mut conn = PgConnection::connect_with(&options).await.unwrap();
        let (timeout,): (String,) =
            sqlx::query_as("SHOW idle_in_transaction_session_timeout").fetch_one(&mut conn).await.unwrap();
        assert_eq!(timeout, "1s");
        let (backend_pid,): (i32,) = sqlx::query_as("SELECT pg_backend_pid()").fetch_one(&mut conn).await.unwrap();
        sqlx::raw_sql("BEGIN; SELECT committed_sequence FROM ledger.checkpoint FOR UPDATE")
            .execute(&mut conn)
            .await
            .unwrap();
        // Polled from another connection, not timed (a statement on this one would end its
        // idleness): the server ends the session once the timeout has passed (a generous 30 s
        // here), and the next statement on it fails.
        let mut ended = false;
        for _ in 0..150 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let (alive,): (i64,) = sqlx::query_as("SELECT count(*) FROM pg_stat_activity WHERE pid = $1")
                .bind(backend_pid)
                .fetch_one(&pool)
                .await
                .unwrap();
            if alive == 0 {
                ended = true;
                break;
            }
        }
        assert!(ended, "the idle transaction was ended");
        assert!(sqlx::query("SELECT 1").execute(&mut conn).await.is_err());
        let mut other = pool.acquire().await.unwrap();
        sqlx::raw_sql("SET lock_timeout = '5s'; SELECT committed_sequence FROM ledger.checkpoint FOR UPDATE")
            .execute(&mut *other)
            .await
            .unwrap();
    }

    /// Plays the committer: asks for batches until the batcher has handed over its last one.
    fn take_batches(wants: &Sender<()>, batches: &Receiver<Handover>) -> Vec<Vec<u64>> {
        let mut taken = Vec::new();
        let mut closed = false;
        while let Some(batch) = next_batch(wants, batches, &mut closed).unwrap() {
            taken.push(batch.sequences());
        }
        taken
    }

    /// A batcher thread on fresh channels, batches of at most `max_records`; returns the engine's
    /// end, the committer's two ends and the thread.
    fn start_batcher(
        max_records: usize,
    ) -> (Sender<Box<JournalRecord>>, Sender<()>, Receiver<Handover>, std::thread::JoinHandle<()>) {
        let (records_sender, records) = crossbeam_channel::bounded(64);
        let (wants_sender, wants) = crossbeam_channel::bounded(1);
        let (batches_sender, batches) = crossbeam_channel::bounded(1);
        let limits = BatchLimits { max_records, max_bytes: usize::MAX };
        let batcher = std::thread::spawn(move || fill_batches(&records, &wants, &batches_sender, limits));
        (records_sender, wants_sender, batches, batcher)
    }

    fn batch_of(handover: Handover) -> Batch {
        match handover {
            Handover::Batch(batch) => batch,
            other => panic!("expected a batch, got {other:?}"),
        }
    }

    /// Every record is handed over once, in order, in batches within the limit; once the engine
    /// is gone, what was left is handed over and the batcher ends.
    #[test]
    fn the_batcher_hands_over_every_record_in_order_within_its_limits() {
        let (records_sender, wants_sender, batches, batcher) = start_batcher(3);
        for sequence in 1..=10 {
            records_sender.send(record(sequence)).unwrap();
        }
        drop(records_sender);
        let taken = take_batches(&wants_sender, &batches);
        batcher.join().unwrap();
        assert!(taken.iter().all(|batch| batch.len() <= 3), "{taken:?}");
        assert_eq!(taken.concat(), (1..=10).collect::<Vec<u64>>());
    }

    /// Records arriving while the committer is busy wait in the next batch, and are handed over
    /// together when it asks again.
    #[test]
    fn records_arriving_during_a_commit_fill_the_next_batch() {
        let (records_sender, wants_sender, batches, batcher) = start_batcher(100);
        records_sender.send(record(1)).unwrap();
        wants_sender.send(()).unwrap();
        let first = batch_of(batches.recv().unwrap());
        assert_eq!(first.len(), 1);
        // "Committing" the first batch: these arrive meanwhile.
        for sequence in 2..=6 {
            records_sender.send(record(sequence)).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !records_sender.is_empty() {
            assert!(Instant::now() < deadline, "the batcher stopped draining the engine's channel");
            std::thread::yield_now();
        }
        wants_sender.send(()).unwrap();
        let second = batch_of(batches.recv().unwrap());
        assert_eq!(second.sequences(), vec![2, 3, 4, 5, 6]);
        drop(records_sender);
        assert!(take_batches(&wants_sender, &batches).iter().all(Vec::is_empty));
        batcher.join().unwrap();
    }

    /// A committer that stops asking (it failed) stops the batcher, which closes the journal to
    /// the engine.
    #[test]
    fn a_stopped_committer_closes_the_journal() {
        let (records_sender, wants_sender, batches, batcher) = start_batcher(100);
        records_sender.send(record(1)).unwrap();
        drop((wants_sender, batches));
        batcher.join().unwrap();
        assert!(records_sender.send(record(2)).is_err(), "the engine's sink is closed");
    }

    /// A batcher that ends without handing over its last batch (it panicked) stops the journal:
    /// the committer gets an error, not a clean end.
    #[test]
    fn a_batcher_that_vanishes_is_a_failure_not_an_end() {
        let (wants_sender, wants) = crossbeam_channel::bounded::<()>(1);
        let (batches_sender, batches) = crossbeam_channel::bounded::<Handover>(1);
        let vanishing = std::thread::spawn(move || {
            let _asked = wants.recv();
            drop(batches_sender);
        });
        let mut closed = false;
        let taken = next_batch(&wants_sender, &batches, &mut closed);
        vanishing.join().unwrap();
        assert!(matches!(taken, Err(JournalError::WriterGone)), "{taken:?}");
    }
}
