//! Journal records, and the sink the engine hands them to.
//!
//! Every change the engine makes (an operation's effects, a recorded refusal, an expiry
//! sweep) becomes one `JournalRecord` with the next global sequence number. The engine calls
//! the sink in sequence order, gap-free, while it still holds the locks of every shard the
//! record touches, so the sink sees a valid serial order of all changes. What the sink does
//! with the records (the PostgreSQL journal, a test's vector) is not the engine's business.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::effect::Effect;
use super::error::EngineError;
use super::idempotency::IdempotencyKey;
use super::operation::{Operation, Receipt};

/// What caused a record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "origin", content = "data", rename_all = "snake_case")]
#[expect(
    clippy::large_enum_variant,
    reason = "almost every record is a request; boxing it would cost an allocation each"
)]
pub enum Origin {
    /// A caller's request, with the outcome remembered under its idempotency key, and who asked
    /// (opaque to the engine) so the journal entry can be traced back and audited.
    Request {
        key: IdempotencyKey,
        operation: Operation,
        outcome: Result<Receipt, EngineError>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        context: Option<Box<RequestContext>>,
    },
    /// The expiry sweep releasing reservations whose time ran out.
    ExpirySweep,
}

/// Who asked for a change and through what: recorded with the change for tracing and audit. The
/// engine never looks inside; the API layer fills it from the request (its correlation id, the
/// authenticated calling service, the peer address and user agent of the connection).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestContext {
    pub correlation_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalRecord {
    /// Global, gap-free, starting at 1.
    pub sequence: u64,
    /// The request's time (or the sweep's), UTC milliseconds.
    pub at_ms: i64,
    pub origin: Origin,
    /// The state changes, in the order they were applied; empty for a recorded refusal.
    pub effects: Vec<Effect>,
}

/// The journal is no longer accepting records (its writer stopped). The record was not
/// appended and comes back, so the engine can undo its effects.
#[derive(Debug, Error)]
#[error("the journal is closed")]
pub struct JournalClosed {
    pub record: Box<JournalRecord>,
}

/// Where the engine sends records. Called in sequence order with shard locks held, under the
/// engine's sequencer lock (so one call at a time, and `&mut self`): an implementation must be
/// quick, must not call back into the engine, and may block only to apply back-pressure.
/// Returning `Err` makes the engine undo the change and refuse it.
pub trait JournalSink: Send {
    fn append(&mut self, record: JournalRecord) -> Result<(), JournalClosed>;
}

/// The production sink: a bounded channel drained by the journal writer. When the channel is
/// full, the engine waits (back-pressure); when the writer is gone, the journal is closed.
///
/// Records travel boxed. Carried inline, each took a 392-byte slot of a ring of
/// `channel_capacity` slots (25 MB at the default), and the engine wrote every record into a slot
/// that was out of cache, under the sequencer's lock. Boxed, a slot is 16 bytes (its stamp and
/// the pointer; a 1 MB ring) and the record goes to memory the allocator hands out: reserve +
/// commit 733-799 ns against 808-872 ns (`reserve_commit_journal_channel` in
/// benches/engine.rs; docs/BENCHMARKS.md, "Session 18").
impl JournalSink for crossbeam_channel::Sender<Box<JournalRecord>> {
    fn append(&mut self, record: JournalRecord) -> Result<(), JournalClosed> {
        self.send(Box::new(record)).map_err(|refused| JournalClosed { record: refused.0 })
    }
}

/// A sink that keeps every record in memory, in order: for tests, fuzzing and benchmarks that
/// need to replay or count the journal without a database.
#[derive(Debug, Default)]
pub struct MemoryJournal {
    records: Vec<JournalRecord>,
}

impl MemoryJournal {
    /// Takes the records appended so far, leaving the journal empty.
    pub fn drain(&mut self) -> Vec<JournalRecord> {
        std::mem::take(&mut self.records)
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

impl JournalSink for MemoryJournal {
    fn append(&mut self, record: JournalRecord) -> Result<(), JournalClosed> {
        self.records.push(record);
        Ok(())
    }
}
