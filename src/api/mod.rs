//! The gRPC API: the `diboas.ledger.v1.Ledger` service over a [`Ledger`](crate::ledger::Ledger).
//!
//! - [`pb`]: the code generated from `proto/diboas/ledger/v1/ledger.proto` (build.rs).
//! - [`convert`]: wire <-> domain conversion and validation; the only place requests are checked.
//! - [`status`]: the one mapping from refusals to gRPC statuses with machine-readable details.
//! - [`correlation`]: the `x-correlation-id` of each request, in its log lines and its response.
//! - [`service`]: the RPC handlers: validate, stamp the server's clock, submit, answer.
//! - [`events`]: the `diboas.ledger.v1.Events` stream of outbox events ([`event_convert`]: its wire form).
//! - [`server`]: the server itself: health, reflection, limits, the expiry sweep, graceful shutdown.

pub mod convert;
pub mod correlation;
pub mod event_convert;
pub mod events;
pub mod server;
pub mod service;
pub mod status;

/// Generated protobuf messages, the service trait and the client.
pub mod pb {
    tonic::include_proto!("diboas.ledger.v1");

    /// The encoded file descriptor set of the API, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ledger_descriptor");
}
