//! Prometheus metrics: what operators graph and alert on.
//!
//! One [`Metrics`] per server holds its own registry (no global recorder, so tests can run many
//! servers in one process). The API gate records every RPC (count by method and status code,
//! latency histogram by method, requests shed), the journal writer records its batches (records
//! per batch, commit latency), and the scrape itself reads the ledger's sequences to report the
//! committed-sequence lag (changes applied in memory and not yet durable) and how full the
//! engine's idempotency store is (new requests are refused once a shard is full). [`endpoint`] serves
//! the text exposition on its own port, apart from the gRPC port.

pub mod endpoint;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::engine::IdempotencyFill;

/// Labels of one RPC outcome.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    pub method: &'static str,
    pub code: &'static str,
}

/// Labels of one RPC's latency.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub method: &'static str,
}

/// Latency buckets from 50 µs to about 6.5 s, doubling.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 18))
}

/// What the journal writer records about its batches.
#[derive(Debug, Clone)]
pub struct JournalMetrics {
    /// Records per committed batch.
    pub batch_records: Histogram,
    /// Seconds from the batch's first statement to its commit.
    pub commit_seconds: Histogram,
}

impl Default for JournalMetrics {
    fn default() -> Self {
        JournalMetrics {
            // 1 to 8192 records (the batch limit), doubling.
            batch_records: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            commit_seconds: latency_histogram(),
        }
    }
}

/// Every metric of one server.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub rpc_requests: Family<RpcLabels, Counter>,
    pub rpc_latency_seconds: Family<MethodLabels, Histogram, fn() -> Histogram>,
    /// Requests refused because the server was at its concurrency limit.
    pub rpc_shed: Counter,
    pub journal: JournalMetrics,
    /// The last sequence applied in memory.
    pub applied_sequence: Gauge,
    /// The last sequence durable in PostgreSQL.
    pub committed_sequence: Gauge,
    /// Applied minus committed: changes still waiting for their batch.
    pub committed_sequence_lag: Gauge,
    /// Idempotency keys the engine holds, in all and in its fullest shard, and the per-shard
    /// limit past which new requests are refused (alert as the fullest shard nears it).
    pub idempotency_keys: Gauge,
    pub idempotency_fullest_shard_keys: Gauge,
    pub idempotency_keys_per_shard_limit: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("diboas_ledger");
        let rpc_requests = Family::<RpcLabels, Counter>::default();
        let rpc_latency_seconds =
            Family::<MethodLabels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        let rpc_shed = Counter::default();
        let journal = JournalMetrics::default();
        let (applied_sequence, committed_sequence, committed_sequence_lag) =
            (Gauge::default(), Gauge::default(), Gauge::default());
        let (idempotency_keys, idempotency_fullest_shard_keys, idempotency_keys_per_shard_limit) =
            (Gauge::default(), Gauge::default(), Gauge::default());
        registry.register("rpc_requests", "RPCs answered, by method and gRPC status code", rpc_requests.clone());
        registry.register("rpc_latency_seconds", "RPC latency, by method", rpc_latency_seconds.clone());
        registry.register("rpc_shed", "RPCs refused at the concurrency limit (RESOURCE_EXHAUSTED)", rpc_shed.clone());
        registry.register(
            "journal_batch_records",
            "Journal records per committed batch",
            journal.batch_records.clone(),
        );
        registry.register(
            "journal_commit_seconds",
            "Time to write and commit one journal batch",
            journal.commit_seconds.clone(),
        );
        registry.register("applied_sequence", "Last journal sequence applied in memory", applied_sequence.clone());
        registry.register(
            "committed_sequence",
            "Last journal sequence durable in PostgreSQL",
            committed_sequence.clone(),
        );
        registry.register(
            "committed_sequence_lag",
            "Changes applied in memory but not yet durable",
            committed_sequence_lag.clone(),
        );
        registry.register("idempotency_keys", "Idempotency keys held in memory", idempotency_keys.clone());
        registry.register(
            "idempotency_fullest_shard_keys",
            "Idempotency keys held by the fullest shard, a large outcome (a linked batch's receipts) counting as several",
            idempotency_fullest_shard_keys.clone(),
        );
        registry.register(
            "idempotency_keys_per_shard_limit",
            "Keys a shard holds before new requests are refused (RESOURCE_EXHAUSTED IDEMPOTENCY_STORE_FULL)",
            idempotency_keys_per_shard_limit.clone(),
        );
        Metrics {
            registry,
            rpc_requests,
            rpc_latency_seconds,
            rpc_shed,
            journal,
            applied_sequence,
            committed_sequence,
            committed_sequence_lag,
            idempotency_keys,
            idempotency_fullest_shard_keys,
            idempotency_keys_per_shard_limit,
        }
    }

    /// Records the ledger's sequences (read at scrape time).
    pub fn set_sequences(&self, applied: u64, committed: u64) {
        let gauge = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
        self.applied_sequence.set(gauge(applied));
        self.committed_sequence.set(gauge(committed));
        self.committed_sequence_lag.set(gauge(applied.saturating_sub(committed)));
    }

    /// Records how full the idempotency store is (read at scrape time).
    pub fn set_idempotency_fill(&self, fill: IdempotencyFill, keys_per_shard_limit: usize) {
        let gauge = |value: usize| i64::try_from(value).unwrap_or(i64::MAX);
        self.idempotency_keys.set(gauge(fill.keys));
        self.idempotency_fullest_shard_keys.set(gauge(fill.fullest_shard_keys));
        self.idempotency_keys_per_shard_limit.set(gauge(keys_per_shard_limit));
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}
