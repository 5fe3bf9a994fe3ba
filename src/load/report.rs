//! What a load run measured: durable operations per second, request latency percentiles, and
//! errors by gRPC code (or PostgreSQL error for the baseline).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use hdrhistogram::Histogram;

/// The slowest latency a histogram records exactly; slower ones are clamped to it.
const MAX_LATENCY_US: u64 = 60_000_000;

/// One worker's tally; workers' tallies are merged at the end.
#[derive(Debug, Clone)]
pub struct Tally {
    latency_us: Histogram<u64>,
    /// Durable ledger operations acknowledged (a reserve-commit is two).
    pub operations: u64,
    pub requests: u64,
    /// Refusals and failures by name (gRPC code, or the baseline's error).
    pub errors: BTreeMap<String, u64>,
    /// Open loop only: requests not sent because every in-flight slot was busy.
    pub unsent: u64,
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            // 3 significant figures from 1 µs to a minute: a few hundred KiB per worker.
            latency_us: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("constant bounds are valid"),
            operations: 0,
            requests: 0,
            errors: BTreeMap::new(),
            unsent: 0,
        }
    }
}

impl Tally {
    pub fn record_latency(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(MAX_LATENCY_US).clamp(1, MAX_LATENCY_US);
        self.latency_us.saturating_record(micros);
        self.requests += 1;
    }

    pub fn record_error(&mut self, name: impl Into<String>) {
        *self.errors.entry(name.into()).or_default() += 1;
    }

    pub fn merge(&mut self, other: &Tally) {
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = self.latency_us.add(&other.latency_us);
        self.operations += other.operations;
        self.requests += other.requests;
        self.unsent += other.unsent;
        for (name, count) in &other.errors {
            *self.errors.entry(name.clone()).or_default() += count;
        }
    }
}

/// A finished run.
#[derive(Debug, Clone)]
pub struct Report {
    pub label: String,
    pub elapsed: Duration,
    pub tally: Tally,
}

impl Report {
    pub fn operations_per_second(&self) -> f64 {
        self.tally.operations as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON)
    }

    fn percentile_ms(&self, quantile: f64) -> f64 {
        self.tally.latency_us.value_at_quantile(quantile) as f64 / 1_000.0
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.label)?;
        writeln!(
            f,
            "  durable ops/s {:.0}   requests/s {:.0}   ({} ops, {} requests in {:.1} s)",
            self.operations_per_second(),
            self.tally.requests as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON),
            self.tally.operations,
            self.tally.requests,
            self.elapsed.as_secs_f64()
        )?;
        writeln!(
            f,
            "  latency ms   p50 {:.2}   p99 {:.2}   p999 {:.2}   max {:.2}",
            self.percentile_ms(0.5),
            self.percentile_ms(0.99),
            self.percentile_ms(0.999),
            self.tally.latency_us.max() as f64 / 1_000.0
        )?;
        if self.tally.unsent > 0 {
            writeln!(f, "  unsent (every in-flight slot busy at its scheduled time): {}", self.tally.unsent)?;
        }
        if self.tally.errors.is_empty() {
            writeln!(f, "  errors: none")
        } else {
            let errors: Vec<String> = self.tally.errors.iter().map(|(name, count)| format!("{name} {count}")).collect();
            writeln!(f, "  errors: {}", errors.join(", "))
        }
    }
}
