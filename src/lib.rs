//! diBoaS Ledger: the balance and ledger engine behind diBoaS's Banking, Investing and DeFi domains.
//!
//! The crate is laid out along the data flow of a request:
//!
//! - [`engine`]: the in-memory, sharded, synchronous balance engine (no I/O). It applies
//!   operations atomically and hands every change, in sequence order, to a journal sink.

pub mod engine;
