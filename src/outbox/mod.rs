//! The outbox: reliable events for the services that react to the ledger (issue 6).
//!
//! - [`event`]: the pure mapping from a journal record to its events.
//! - [`write`]: stores them in the journal batch's own PostgreSQL transaction.
//! - [`relay`]: publishes pending events, in position order, to NATS JetStream (at-least-once,
//!   deduplicated by event id), with bounded retries.
//! - [`admin`]: re-queues failed events and prunes published ones past their retention.
//! - [`read`]: reads committed events by position, for the Events gRPC stream.
//!
//! The contract (docs/OUTBOX.md): an event exists if and only if its change committed; each is
//! delivered at least once, with its id as the NATS message id so JetStream drops a republished
//! copy within its duplicate window, and consumers deduplicate by id beyond it.

pub mod admin;
pub mod event;
pub mod read;
pub mod relay;
pub mod write;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum OutboxError {
    #[error("PostgreSQL: {0}")]
    Database(#[from] sqlx::Error),
    #[error("connecting to NATS: {0}")]
    Connect(#[from] async_nats::ConnectError),
    #[error("setting up the JetStream stream: {0}")]
    Stream(#[from] async_nats::jetstream::context::CreateStreamError),
    #[error("a stored event is malformed: {0}")]
    Corrupt(String),
    /// A stream asked to resume from a position whose events were pruned.
    #[error("events up to position {pruned_through} were pruned; cannot resume from position {after_position}")]
    Pruned { after_position: i64, pruned_through: i64 },
    /// Another relay moved the delivery cursor while this one published (one relay per database).
    #[error("the outbox delivery cursor moved from {from} while this relay published; another relay is running")]
    CursorMoved { from: i64 },
}

impl OutboxError {
    pub fn is_unavailable(&self) -> bool {
        match self {
            OutboxError::Database(error) => crate::store::is_unavailable(error),
            OutboxError::Connect(_) => true,
            _ => false,
        }
    }
}
