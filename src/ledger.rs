//! The durable ledger: the engine plus its journal, as callers (the gRPC layer) use them.
//!
//! [`Ledger::submit`] executes a request in the engine, then waits until the journal has
//! committed the request's sequence in PostgreSQL; only then does it return the outcome.
//!
//! Reads wait the same way: a read takes its answer from memory, then waits until everything
//! the engine had applied when it answered is committed. A read therefore never shows a change
//! that could still be lost, at the cost of up to one batch commit of latency.
//!
//! Fail-stop on storage failure: when the journal writer fails, it closes the journal, so the
//! current engine refuses every change, and every caller waiting on an uncommitted sequence
//! gets [`LedgerError::Unavailable`] (outcome unknown; retrying with the same idempotency key
//! is safe, because the key is either committed with its first outcome or not at all). A
//! supervisor task then reconnects with exponential backoff, rebuilds a fresh engine from what
//! PostgreSQL holds (recovery), starts a new writer and swaps the new engine in. Whatever the
//! old engine had applied but PostgreSQL did not commit is dropped with it.

use std::sync::{Arc, Weak};
use std::time::Duration;

use crossbeam_channel::Sender;
use parking_lot::{Mutex, RwLock};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use thiserror::Error;
use tokio::sync::watch;
use uuid::Uuid;

use crate::engine::account::{AccountRef, Balance, Domain};
use crate::engine::error::EngineError;
use crate::engine::idempotency::IdempotencyKey;
use crate::engine::operation::Request;
use crate::engine::record::{JournalRecord, RequestContext};
use crate::engine::state::{AccountView, EngineState, InvariantViolation};
use crate::engine::{Engine, EngineConfig, IdempotencyFill, Outcome, SweepReport};
use crate::journal::fence::{self, WriterBackend};
use crate::journal::{CONNECT_TIMEOUT_MS, Durability, JournalConfig, JournalError, Writer};
use crate::store::{self, StoreError};

/// How often a request waiting for room in the journal's channel looks again between commits.
const ROOM_POLL_MS: u64 = 1;

#[derive(Debug, Clone)]
pub struct LedgerConfig {
    pub connect: PgConnectOptions,
    pub engine: EngineConfig,
    pub journal: JournalConfig,
    /// First wait before reconnecting after a storage failure; doubles up to the maximum.
    pub reconnect_min_backoff_ms: u64,
    pub reconnect_max_backoff_ms: u64,
    /// The longest a reload from PostgreSQL after a storage failure may take before it is
    /// abandoned and tried again. sqlx sets no TCP keepalive, so a connection whose peer
    /// vanished mid-recovery (a failover, a dead network path) would otherwise never answer and
    /// the ledger would stay unavailable until restarted. Set it above what loading the largest
    /// store takes: a reload that never fits in it never succeeds.
    pub reload_timeout_ms: u64,
}

impl LedgerConfig {
    pub fn new(connect: PgConnectOptions) -> LedgerConfig {
        LedgerConfig {
            connect,
            engine: EngineConfig::default(),
            journal: JournalConfig::default(),
            reconnect_min_backoff_ms: 50,
            reconnect_max_backoff_ms: 5_000,
            reload_timeout_ms: 10 * 60 * 1_000,
        }
    }
}

#[derive(Debug, Error)]
pub enum LedgerError {
    #[error(
        "the ledger is unavailable: PostgreSQL cannot be written; the outcome is unknown and retrying with the same idempotency key is safe"
    )]
    Unavailable,
    /// A read the engine refused (an unknown account).
    #[error(transparent)]
    Refused(EngineError),
    #[error("the ledger's storage: {0}")]
    Store(#[from] StoreError),
    #[error("the ledger's journal: {0}")]
    Journal(#[from] JournalError),
    #[error("connecting to PostgreSQL took longer than {CONNECT_TIMEOUT_MS} ms")]
    ConnectTimeout,
    #[error("reloading the ledger from PostgreSQL took longer than {timeout_ms} ms")]
    ReloadTimeout { timeout_ms: u64 },
    #[error("the state stored in PostgreSQL breaks an invariant, refusing to start: {0}")]
    Invariant(#[from] InvariantViolation),
    #[error("shutdown while requests are still using the ledger")]
    Busy,
}

impl LedgerError {
    /// Whether the failure is PostgreSQL being unreachable (retry later) rather than a refusal,
    /// a bug or corrupted state. The gRPC layer maps these to UNAVAILABLE.
    pub fn is_unavailable(&self) -> bool {
        match self {
            LedgerError::Unavailable | LedgerError::ConnectTimeout | LedgerError::ReloadTimeout { .. } => true,
            LedgerError::Store(error) => error.is_unavailable(),
            LedgerError::Journal(error) => error.is_unavailable(),
            LedgerError::Refused(_) | LedgerError::Invariant(_) | LedgerError::Busy => false,
        }
    }
}

/// One engine and the writer journaling it. Replaced as a whole after a storage failure.
struct Generation {
    engine: Engine<Sender<Box<JournalRecord>>>,
    /// The engine's journal channel, kept to see how full it is (see `wait_for_room`).
    queue: Sender<Box<JournalRecord>>,
    durability: watch::Receiver<Durability>,
    writer: Mutex<Option<Writer>>,
}

impl Generation {
    /// Loads the state from PostgreSQL and starts a writer. After a failure, `failed_writer` is
    /// the failed generation's writer backend, ended before anything is read (see `fence`).
    async fn start(config: &LedgerConfig, failed_writer: Option<WriterBackend>) -> Result<Generation, LedgerError> {
        let connect = PgConnection::connect_with(&config.connect);
        let mut conn = tokio::time::timeout(Duration::from_millis(CONNECT_TIMEOUT_MS), connect)
            .await
            .map_err(|_| LedgerError::ConnectTimeout)?
            .map_err(StoreError::from)?;
        if let Some(backend) = failed_writer {
            fence::end(&mut conn, backend).await?;
        }
        // Start-up (and every reload) makes sure the journal can take this month's rows, and
        // drops expired key partitions if it can lock them at once: a long reader holding one (a
        // dump, an audit query) must not hang start-up. Found in session 16. The writer's hourly
        // maintenance drops them later; creating a missing partition still waits, as it must.
        let key_keep_days = store::idempotency_key_keep_days(config.engine.retention_ms);
        if !store::maintain_partitions(&mut conn, key_keep_days).await? {
            tracing::warn!(
                "a partition lock was busy at start-up: expired idempotency-key partitions are dropped later"
            );
            store::ensure_partitions(&mut conn, None).await?;
        }
        let recovery = store::begin_recovery(&mut conn, config.engine.retention_ms).await?;
        let state = recovery.state();
        state.check_invariants()?;
        let (committed_sequence, accounts) = (state.next_sequence - 1, state.accounts.len());
        let (sender, receiver) = crossbeam_channel::bounded(config.journal.channel_capacity);
        let engine = Engine::without_keys(config.engine, sender.clone(), state, recovery.latest_ms());
        let keys = recovery.restore_keys(&engine).await?;
        conn.close().await.map_err(StoreError::from)?;
        let (durability_sender, durability) = watch::channel(Durability { committed_sequence, failed: false });
        let (options, journal) = (config.connect.clone(), JournalConfig { key_keep_days, ..config.journal.clone() });
        let writer = tokio::task::spawn_blocking(move || {
            Writer::start(options, receiver, committed_sequence, journal, durability_sender)
        })
        .await
        .map_err(|_| JournalError::WriterGone)??;
        tracing::info!(committed_sequence, accounts, idempotency_keys = keys, "ledger loaded from PostgreSQL");
        Ok(Generation { engine, queue: sender, durability, writer: Mutex::new(Some(writer)) })
    }

    /// Waits, without holding a runtime worker, while the journal's channel is more than half
    /// full. The engine hands records over with its locks held and blocks when the channel is
    /// full; a request that met a full channel there blocked its worker thread, and on 2 cores
    /// every worker, so health checks, metrics and the gate's deadlines stalled until the writer
    /// drained it or failed (found in review, session 22). Waiting here first, requests queue as
    /// futures: only more than half the channel's capacity of requests passing this check at
    /// once (the gate admits 4,096 against 65,536 by default) can still block in the engine.
    async fn wait_for_room(&self) -> Result<(), LedgerError> {
        let Some(capacity) = self.queue.capacity() else { return Ok(()) };
        if self.queue.len() <= capacity / 2 {
            return Ok(());
        }
        let mut durability = self.durability.clone();
        while self.queue.len() > capacity / 2 {
            if durability.borrow_and_update().failed {
                return Err(LedgerError::Unavailable);
            }
            // The batcher takes records off the channel between commits: after a commit, or a
            // short pause, is when to look again.
            tokio::select! {
                changed = durability.changed() => if changed.is_err() { return Err(LedgerError::Unavailable) },
                () = tokio::time::sleep(Duration::from_millis(ROOM_POLL_MS)) => {}
            }
        }
        Ok(())
    }

    /// Waits until `sequence` is committed, or the writer has stopped without committing it.
    async fn wait_durable(&self, sequence: u64) -> Result<(), LedgerError> {
        let mut durability = self.durability.clone();
        loop {
            let now = *durability.borrow_and_update();
            if now.committed_sequence >= sequence {
                return Ok(());
            }
            if now.failed {
                return Err(LedgerError::Unavailable);
            }
            if durability.changed().await.is_err() {
                // The writer ended; what it published last is final.
                let last = *durability.borrow();
                return if last.committed_sequence >= sequence { Ok(()) } else { Err(LedgerError::Unavailable) };
            }
        }
    }
}

struct Shared {
    config: LedgerConfig,
    current: RwLock<Arc<Generation>>,
}

pub struct Ledger {
    shared: Arc<Shared>,
    supervisor: tokio::task::JoinHandle<()>,
}

impl Ledger {
    /// Recovers the ledger from PostgreSQL (which must be migrated: see `store::prepare`),
    /// checks its invariants and starts the journal writer. Must run inside a Tokio runtime.
    pub async fn open(config: LedgerConfig) -> Result<Ledger, LedgerError> {
        let generation = Generation::start(&config, None).await?;
        let shared = Arc::new(Shared { config, current: RwLock::new(Arc::new(generation)) });
        let supervisor = tokio::spawn(supervise(Arc::downgrade(&shared)));
        Ok(Ledger { shared, supervisor })
    }

    fn current(&self) -> Arc<Generation> {
        self.shared.current.read().clone()
    }

    /// Executes `request` and returns its outcome once it is durable. A refusal that is not
    /// journaled returns at once (the store has no room for a new key), except an idempotency
    /// conflict, which waits until the key's first use is durable. While the journal's channel is
    /// more than half full, the request waits (asynchronously) before it executes: back-pressure
    /// that holds no runtime worker (see `Generation::wait_for_room`).
    pub async fn submit(&self, request: Request) -> Result<Outcome, LedgerError> {
        self.submit_correlated(request, None).await
    }

    /// [`Ledger::submit`], recording who asked (see [`RequestContext`]) in the journal entry.
    pub async fn submit_correlated(
        &self,
        request: Request,
        context: Option<Box<RequestContext>>,
    ) -> Result<Outcome, LedgerError> {
        let generation = self.current();
        generation.wait_for_room().await?;
        let outcome = generation.engine.execute_with(request, context);
        match outcome.sequence {
            Some(sequence) => {
                generation.wait_durable(sequence).await?;
                Ok(outcome)
            }
            None if outcome.result == Err(EngineError::JournalUnavailable) => Err(LedgerError::Unavailable),
            // The key's first use may not be durable yet: if its batch fails, the reload forgets
            // the key, and this same request retried would then apply. Answer, as reads do, once
            // everything the engine has applied is durable (until session 22: at once).
            None if matches!(outcome.result, Err(EngineError::IdempotencyConflict { .. })) => {
                generation.wait_durable(generation.engine.last_sequence()).await?;
                Ok(outcome)
            }
            None => Ok(outcome),
        }
    }

    /// Expires due reservations at `now_ms` (see `Engine::sweep`), once the expiries are durable.
    pub async fn sweep(&self, now_ms: i64) -> Result<SweepReport, LedgerError> {
        let generation = self.current();
        let report = generation.engine.sweep(now_ms).map_err(|error| match error {
            EngineError::JournalUnavailable => LedgerError::Unavailable,
            other => LedgerError::Refused(other),
        })?;
        generation.wait_durable(generation.engine.last_sequence()).await?;
        Ok(report)
    }

    /// The balance of one account, as durable in PostgreSQL.
    pub async fn balance(&self, account: &AccountRef) -> Result<Balance, LedgerError> {
        let generation = self.current();
        let balance = generation.engine.balance(account);
        generation.wait_durable(generation.engine.last_sequence()).await?;
        balance.map_err(LedgerError::Refused)
    }

    /// Every account of a user, as durable in PostgreSQL.
    pub async fn accounts_of(&self, user_id: Uuid) -> Result<Vec<AccountView>, LedgerError> {
        let generation = self.current();
        let views = generation.engine.accounts_of(user_id);
        generation.wait_durable(generation.engine.last_sequence()).await?;
        Ok(views)
    }

    /// A consistent copy of the whole state, as durable in PostgreSQL.
    pub async fn state(&self) -> Result<EngineState, LedgerError> {
        let generation = self.current();
        let state = generation.engine.state();
        generation.wait_durable(state.next_sequence - 1).await?;
        Ok(state)
    }

    /// How full the engine's idempotency store is, and the per-shard limit it refuses new keys at.
    pub fn idempotency_fill(&self) -> (IdempotencyFill, usize) {
        let generation = self.current();
        (generation.engine.idempotency_fill(), generation.engine.config().idempotency_capacity_per_shard)
    }

    /// The last sequence applied in memory (committed or still waiting for its batch).
    pub fn applied_sequence(&self) -> u64 {
        self.current().engine.last_sequence()
    }

    /// The domain of a reservation's account, if the reservation is known (for scope checks of
    /// commit and release, which name only the reservation).
    pub fn reservation_domain(&self, user_id: Uuid, reservation_id: Uuid) -> Option<Domain> {
        self.current().engine.reservation(user_id, reservation_id).map(|reservation| reservation.account.domain)
    }

    /// Whether the engine still remembers the idempotency key `key`.
    pub fn remembers_key(&self, key: &IdempotencyKey) -> bool {
        self.current().engine.remembers_key(key)
    }

    /// The domain of a transaction, if the engine holds it (for scope checks of its transitions).
    pub fn transaction_domain(&self, user_id: Uuid, transaction_id: Uuid) -> Option<Domain> {
        self.current().engine.transaction(user_id, transaction_id).map(|transaction| transaction.spec.domain)
    }

    /// The last sequence committed in PostgreSQL.
    pub fn committed_sequence(&self) -> u64 {
        self.current().durability.borrow().committed_sequence
    }

    /// The current journal writer's durability, to wake on commits (the outbox relay and the
    /// event stream). It closes when a storage failure replaces the writer: ask again then.
    pub fn durability(&self) -> watch::Receiver<Durability> {
        self.current().durability.clone()
    }

    /// The PostgreSQL the ledger journals to (the outbox relay and the event stream read it).
    pub fn connect_options(&self) -> &PgConnectOptions {
        &self.shared.config.connect
    }

    /// Stops taking requests, lets the writer commit everything queued, and waits for it.
    pub async fn shutdown(self) -> Result<(), LedgerError> {
        self.supervisor.abort();
        // An aborted task ends with a cancellation error: that is the expected outcome here.
        let _ = self.supervisor.await;
        let shared = Arc::try_unwrap(self.shared).map_err(|_| LedgerError::Busy)?;
        let generation = Arc::try_unwrap(shared.current.into_inner()).map_err(|_| LedgerError::Busy)?;
        let Generation { engine, queue, writer, .. } = generation;
        // Dropping the engine and the queue's watcher drops the channel's senders: the writer
        // drains the queue and ends (a sender left alive would keep it waiting for good).
        drop((engine, queue));
        if let Some(writer) = writer.into_inner() {
            tokio::task::spawn_blocking(move || writer.join()).await.map_err(|_| JournalError::WriterGone)?;
        }
        Ok(())
    }
}

/// Watches the current generation's writer; when it fails, rebuilds the ledger from
/// PostgreSQL with exponential backoff and swaps the new generation in. Ends with the ledger.
async fn supervise(shared: Weak<Shared>) {
    loop {
        let mut durability = match shared.upgrade() {
            Some(shared) => shared.current.read().durability.clone(),
            None => return,
        };
        loop {
            if durability.borrow_and_update().failed {
                break;
            }
            if durability.changed().await.is_err() {
                // The writer thread is gone. On shutdown this task was aborted first and a
                // dropped ledger fails the upgrade below, so here it died unexpectedly (a
                // panic): recover exactly as from a failure.
                break;
            }
        }
        tracing::warn!("journal writer failed: refusing changes until the ledger is reloaded from PostgreSQL");
        let failed_writer = match shared.upgrade() {
            Some(shared) => shared.current.read().writer.lock().as_ref().map(Writer::backend),
            None => return,
        };
        let mut backoff_ms = None;
        loop {
            let Some(strong) = shared.upgrade() else { return };
            let config = strong.config.clone();
            let min_ms = config.reconnect_min_backoff_ms;
            let max_ms = config.reconnect_max_backoff_ms.max(min_ms);
            drop(strong);
            if let Some(wait_ms) = backoff_ms {
                tokio::time::sleep(Duration::from_millis(wait_ms)).await;
            }
            let timeout_ms = config.reload_timeout_ms;
            let reload =
                tokio::time::timeout(Duration::from_millis(timeout_ms), Generation::start(&config, failed_writer))
                    .await;
            match reload.unwrap_or(Err(LedgerError::ReloadTimeout { timeout_ms })) {
                Ok(generation) => {
                    let Some(strong) = shared.upgrade() else { return };
                    let committed_sequence = generation.durability.borrow().committed_sequence;
                    *strong.current.write() = Arc::new(generation);
                    tracing::info!(committed_sequence, "ledger resumed after a storage failure");
                    break;
                }
                Err(error) => {
                    let next_ms = backoff_ms.map_or(min_ms, |wait_ms: u64| wait_ms.saturating_mul(2).min(max_ms));
                    if error.is_unavailable() {
                        tracing::warn!(%error, retry_in_ms = next_ms, "PostgreSQL still unavailable");
                    } else {
                        tracing::error!(%error, retry_in_ms = next_ms, "reloading the ledger from PostgreSQL failed");
                    }
                    backoff_ms = Some(next_ms);
                }
            }
        }
    }
}
