//! The metrics HTTP endpoint: `GET /metrics` on its own listener, for Prometheus to scrape.
//!
//! Kept off the gRPC port so scraping needs no gRPC and no token, and so an operator can expose
//! it to the monitoring network only. Each scrape reads the ledger's applied and committed
//! sequences first, so the lag gauge is current.

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

use super::Metrics;
use crate::ledger::Ledger;

/// The content type of the OpenMetrics text format.
const OPEN_METRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

struct Scrape {
    metrics: Arc<Metrics>,
    ledger: Arc<Ledger>,
}

/// Serves `/metrics` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    ledger: Arc<Ledger>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = Router::new().route("/metrics", get(scrape)).with_state(Arc::new(Scrape { metrics, ledger }));
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await
}

async fn scrape(State(scrape): State<Arc<Scrape>>) -> impl IntoResponse {
    scrape.metrics.set_sequences(scrape.ledger.applied_sequence(), scrape.ledger.committed_sequence());
    let (fill, keys_per_shard_limit) = scrape.ledger.idempotency_fill();
    scrape.metrics.set_idempotency_fill(fill, keys_per_shard_limit);
    match scrape.metrics.encode() {
        Ok(text) => (StatusCode::OK, [(header::CONTENT_TYPE, OPEN_METRICS)], text),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, [(header::CONTENT_TYPE, "text/plain")], String::new()),
    }
}
