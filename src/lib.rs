//! diBoaS Ledger: the balance and ledger engine behind diBoaS's Banking, Investing and DeFi domains.
//!
//! The crate is laid out along the data flow of a request:
//!
//! - [`engine`]: the in-memory, sharded, synchronous balance engine (no I/O). It applies
//!   operations atomically and hands every change, in sequence order, to a journal sink.
//! - [`journal`]: the writer threads that commit those changes to PostgreSQL in batches and
//!   publish the committed sequence.
//! - [`store`]: PostgreSQL itself: migrations, recovery at start-up, `verify`.
//! - [`ledger`]: the durable handle callers use: execute, then wait until the change is durable;
//!   fail-stop and reload when PostgreSQL fails.
//! - [`api`]: the gRPC service and server over the ledger: validation, authentication, error
//!   mapping, load shedding, lifecycle.
//! - [`metrics`]: Prometheus metrics of the API and the journal, served on their own port.
//! - [`load`]: the load generator (`diboas-ledger load`) that drives a running server.
//! - [`directory`], [`audit`], [`readside`]: users and compliance data (encrypted personal data),
//!   the audit and data-access logs, summary views, retention and database statistics.
//! - [`fees`]: pure fee math for business transactions (five tiers, one rounding rule).
//! - [`outbox`]: the events other services hear about, written with each journal batch, relayed
//!   to NATS JetStream and streamed over gRPC.
//! - [`allocator`]: the process's global allocator (mimalloc, on its fast path for ordinary layouts).

pub mod allocator;
pub mod api;
pub mod audit;
pub mod directory;
pub mod engine;
pub mod fees;
pub mod journal;
pub mod ledger;
pub mod load;
pub mod metrics;
pub mod outbox;
pub mod readside;
pub mod store;
