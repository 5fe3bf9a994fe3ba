//! The gRPC server: the ledger service plus standard health checking and reflection, with its
//! limits, authentication, the expiry sweep on a timer, the metrics endpoint, and graceful
//! shutdown.
//!
//! [`serve`] takes already-bound listeners (the binary binds the configured addresses, tests bind
//! port 0) and a shutdown future. When the future completes the server stops accepting, lets
//! in-flight requests finish, stops the sweep and the metrics endpoint, and shuts the ledger
//! down, which flushes the journal: everything acknowledged is in PostgreSQL when `serve` returns.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use super::auth::Authenticator;
use super::directory::{DirectoryService, ReadSide};
use super::events::{EventsConfig, EventsService};
use super::gate::Gate;
use super::pb;
use super::pb::directory_server::DirectoryServer;
use super::pb::events_server::EventsServer;
use super::pb::ledger_server::LedgerServer;
use super::pb::transactions_server::TransactionsServer;
use super::service::{LedgerService, now_ms};
use super::transactions::TransactionsService;
use crate::ledger::{Ledger, LedgerError};
use crate::metrics::{Metrics, endpoint};
use crate::outbox::relay::{RelayConfig, run_forever};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeConfig {
    /// The largest request message accepted; larger ones are refused by tonic (OUT_OF_RANGE).
    pub max_message_bytes: usize,
    /// The most engine operations one SubmitBatch may carry.
    pub max_batch_operations: usize,
    /// The longest a request may run; a client's shorter `grpc-timeout` wins (see `gate`).
    pub request_timeout_ms: u64,
    /// How often the expiry sweep runs.
    pub sweep_interval_ms: u64,
    /// The most requests handled at once; past it requests are shed with RESOURCE_EXHAUSTED.
    pub max_in_flight: usize,
    /// The Events stream's limits.
    pub events: EventsConfig,
    /// The outbox relay to NATS JetStream; `None` runs none (the default here: the binary turns it on).
    pub relay: Option<RelayConfig>,
    /// PostgreSQL connections shared by the event streams and the relay.
    pub outbox_pool_connections: u32,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            max_message_bytes: 4 * 1024 * 1024,
            max_batch_operations: 4_096,
            request_timeout_ms: 30_000,
            sweep_interval_ms: 1_000,
            max_in_flight: 4_096,
            events: EventsConfig::default(),
            relay: None,
            outbox_pool_connections: 8,
        }
    }
}

#[derive(Debug, Error)]
pub enum ServeError {
    #[error("the gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("building server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("shutting the ledger down: {0}")]
    Ledger(#[from] LedgerError),
}

/// What a server needs besides the ledger and its gRPC listener.
pub struct ServeOptions {
    pub config: ServeConfig,
    pub authenticator: Authenticator,
    /// Where `/metrics` is served; `None` serves no endpoint (the metrics are still kept).
    pub metrics_listener: Option<TcpListener>,
    /// The registry; tests pass their own to read it.
    pub metrics: Arc<Metrics>,
    /// The read side (the Directory service and its periodic upkeep), if served.
    pub read_side: Option<ReadSide>,
}

impl ServeOptions {
    /// Development-mode authentication, no metrics endpoint: for tests and local runs.
    pub fn development(config: ServeConfig) -> ServeOptions {
        ServeOptions {
            config,
            authenticator: Authenticator::development(),
            metrics_listener: None,
            metrics: Arc::new(Metrics::new()),
            read_side: None,
        }
    }
}

/// Serves `ledger` on `listener` until `shutdown` completes, then shuts the ledger down.
pub async fn serve(
    ledger: Ledger,
    listener: TcpListener,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let ServeOptions { config, authenticator, metrics_listener, metrics, read_side } = options;
    if authenticator.is_development() {
        tracing::warn!(
            "DEVELOPMENT MODE: no bearer tokens are checked; every caller has every scope. Never run this in production."
        );
    }
    let ledger = Arc::new(ledger);
    let gate =
        Arc::new(Gate::new(authenticator, config.max_in_flight, config.request_timeout_ms, Arc::clone(&metrics)));
    let (stop_metrics, metrics_stopped) = tokio::sync::watch::channel(false);
    let metrics_endpoint = metrics_listener.map(|listener| {
        let mut stopped = metrics_stopped;
        tokio::spawn(endpoint::serve(listener, Arc::clone(&metrics), Arc::clone(&ledger), async move {
            // A dropped sender also means stop.
            let _ = stopped.wait_for(|stop| *stop).await;
        }))
    });
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<LedgerServer<LedgerService>>().await;
    health_reporter.set_serving::<TransactionsServer<TransactionsService>>().await;
    health_reporter.set_serving::<EventsServer<EventsService>>().await;
    if read_side.is_some() {
        health_reporter.set_serving::<DirectoryServer<DirectoryService>>().await;
    }
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let ledger_service =
        LedgerServer::new(LedgerService::new(Arc::clone(&ledger), Arc::clone(&gate), config.max_batch_operations))
            .max_decoding_message_size(config.max_message_bytes);
    let directory = read_side.as_ref().map(|read_side| {
        read_side.service(Arc::clone(&gate), Arc::clone(&ledger)).max_decoding_message_size(config.max_message_bytes)
    });
    let maintenance = read_side.as_ref().map(ReadSide::spawn_maintenance);
    let transactions_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(super::transactions::MAX_POOL_CONNECTIONS)
        .connect_lazy_with(ledger.connect_options().clone());
    let transactions_service =
        TransactionsServer::new(TransactionsService::new(Arc::clone(&ledger), Arc::clone(&gate), transactions_pool))
            .max_decoding_message_size(config.max_message_bytes);
    let sweeper = tokio::spawn(sweep_forever(Arc::clone(&ledger), Duration::from_millis(config.sweep_interval_ms)));
    let outbox_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(config.outbox_pool_connections.max(1))
        .connect_lazy_with(ledger.connect_options().clone());
    let (closing, closing_seen) = tokio::sync::watch::channel(false);
    let events_service = EventsServer::new(EventsService::new(
        Arc::clone(&ledger),
        Arc::clone(&gate),
        outbox_pool.clone(),
        config.events,
        closing_seen,
    ))
    .max_decoding_message_size(config.max_message_bytes);
    let relay = config.relay.clone().map(|relay| tokio::spawn(run_forever(relay, outbox_pool, Arc::clone(&ledger))));

    let served = tonic::transport::Server::builder()
        .layer(tower::util::MapResponseLayer::new(super::status::explain_decoding_refusal))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(ledger_service)
        .add_optional_service(directory)
        .add_service(transactions_service)
        .add_service(events_service)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
            shutdown.await;
            // Open event streams end now (with their resume position): the graceful shutdown
            // waits for every open call, and a stream never ends by itself.
            let _ = closing.send(true);
            // Health checkers see the server leave before its connections do.
            health_reporter.set_not_serving::<LedgerServer<LedgerService>>().await;
            health_reporter.set_not_serving::<TransactionsServer<TransactionsService>>().await;
            health_reporter.set_not_serving::<EventsServer<EventsService>>().await;
        })
        .await;

    sweeper.abort();
    // An aborted task ends with a cancellation error: that is the expected outcome here.
    let _ = sweeper.await;
    let _ = stop_metrics.send(true);
    if let Some(metrics_endpoint) = metrics_endpoint {
        // The endpoint failing must not keep the ledger from flushing: log it and go on.
        if let Ok(Err(error)) = metrics_endpoint.await {
            tracing::warn!(%error, "the metrics endpoint failed");
        }
    }
    if let Some(maintenance) = maintenance {
        maintenance.abort();
        let _ = maintenance.await;
    }
    if let Some(relay) = relay {
        // Safe at any point: unrecorded publishes are published again (deduplicated by id).
        relay.abort();
        let _ = relay.await;
    }
    // The server and its connections are gone, so this is the last handle on the ledger.
    let ledger = Arc::try_unwrap(ledger).map_err(|_| LedgerError::Busy)?;
    ledger.shutdown().await?;
    tracing::info!("ledger shut down; the journal is flushed");
    served?;
    Ok(())
}

/// Expires due reservations every `interval`, repeating at once while a sweep reports more due.
async fn sweep_forever(ledger: Arc<Ledger>, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        loop {
            match ledger.sweep(now_ms()).await {
                Ok(report) if report.more_due => continue,
                Ok(report) => {
                    if report.expired > 0 {
                        tracing::debug!(expired = report.expired, "expired reservations");
                    }
                    break;
                }
                Err(error) => {
                    tracing::warn!(%error, "the expiry sweep failed; retrying at the next tick");
                    break;
                }
            }
        }
    }
}
