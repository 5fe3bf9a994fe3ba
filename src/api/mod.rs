//! The gRPC API: the `diboas.ledger.v1.Ledger` service over a [`Ledger`](crate::ledger::Ledger).
//!
//! - [`pb`]: the code generated from `proto/diboas/ledger/v1/ledger.proto` (build.rs).
//! - [`convert`]: wire <-> domain conversion and validation; the only place requests are checked.
//! - [`status`]: the one mapping from refusals to gRPC statuses with machine-readable details.
//! - [`correlation`]: the `x-correlation-id` of each request, in its log lines and its response,
//!   and the request's context recorded with its changes.
//! - [`auth`]: bearer tokens (stored as digests) and scopes (operations and domains).
//! - [`gate`]: the one way into every RPC: correlation, load shedding, authentication, metrics.
//! - [`service`]: the RPC handlers: validate, check scopes, stamp the server's clock, submit, answer.
//! - [`server`]: the server itself: health, reflection, limits, the expiry sweep, metrics
//!   endpoint, graceful shutdown.
//! - [`directory`], [`directory_convert`]: the `Directory` service (users, wallets, compliance
//!   data, database statistics) and its request checks.
//! - [`transactions`], [`transactions_convert`], [`provider_events`]: the Transactions service
//!   (business transactions, fees, history, compliance records, the provider inbox).
//! - [`events`]: the `diboas.ledger.v1.Events` stream of outbox events ([`event_convert`]: its wire form).

pub mod auth;
pub mod convert;
pub mod correlation;
pub mod directory;
pub mod directory_convert;
pub mod event_convert;
pub mod events;
pub mod gate;
pub mod provider_events;
pub mod server;
pub mod service;
pub mod status;
pub mod transactions;
pub mod transactions_convert;

/// Generated protobuf messages, the service trait and the client.
pub mod pb {
    tonic::include_proto!("diboas.ledger.v1");

    /// The encoded file descriptor set of the API, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ledger_descriptor");
}
