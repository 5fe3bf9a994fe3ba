//! diBoaS Ledger: the balance and ledger engine behind diBoaS's Banking, Investing and DeFi domains.
//!
//! The crate is laid out along the data flow of a request:
//!
//! - [`engine`]: the in-memory, sharded, synchronous balance engine (no I/O). It applies
//!   operations atomically and hands every change, in sequence order, to a journal sink.
//! - [`journal`]: the writer thread that commits those changes to PostgreSQL in batches and
//!   publishes the committed sequence.
//! - [`store`]: PostgreSQL itself: migrations, recovery at start-up, `verify`.
//! - [`ledger`]: the durable handle callers use: execute, then wait until the change is durable;
//!   fail-stop and reload when PostgreSQL fails.
//! - [`outbox`]: the events other services hear about, written with each journal batch, relayed
//!   to NATS JetStream and streamed over gRPC.
//! - [`api`]: the gRPC service and server over the ledger: validation, error mapping, lifecycle.

pub mod api;
pub mod engine;
pub mod journal;
pub mod ledger;
pub mod outbox;
pub mod store;
