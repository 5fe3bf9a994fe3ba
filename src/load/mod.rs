//! The load generator (`diboas-ledger load`): drives a running server over gRPC and reports
//! durable operations per second, latency percentiles and errors by code; with `--baseline` it
//! also runs the same workload as per-operation PostgreSQL transactions, in the same run, and
//! prints the ratio.
//!
//! - [`workload`]: the operation mix and the users (uniform or Zipf-skewed).
//! - [`grpc_driver`]: set-up (open and fund the users) and the run, unary or batch, closed or open loop.
//! - [`baseline`]: the same workload, one PostgreSQL transaction per operation, row locks.
//! - [`report`]: tallies and the printed report.
//!
//! Every operation is acknowledged only once durable, so "operations per second" here is always
//! durable operations per second.
//!
//! Its reservations expire after a minute, and a unary reserve-commit whose commit fails is
//! released at once (untallied), so an overloaded run does not leave funds reserved for the
//! default 30 minutes nor fill a hot user's cap of active reservations.

pub mod baseline;
pub mod grpc_driver;
pub mod report;
pub mod workload;

use std::sync::Arc;

use thiserror::Error;

use self::report::Report;
use self::workload::{Mix, Users};

/// The most in-flight requests (closed-loop workers or open-loop slots) a run may use.
pub const MAX_IN_FLIGHT: usize = 10_000;

/// The most gRPC connections a run may open.
pub const MAX_CONNECTIONS: usize = 256;

/// How requests are paced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pacing {
    /// Each in-flight slot sends its next request as soon as the last one answers.
    Closed,
    /// Requests start on a fixed schedule, whatever the answers do.
    Open { requests_per_second: f64 },
}

#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// The server, e.g. `http://127.0.0.1:50051`.
    pub target: String,
    /// A bearer token (none for a development-mode server).
    pub token: Option<String>,
    pub connections: usize,
    pub in_flight: usize,
    pub mix: Mix,
    pub users: Users,
    /// Units per SubmitBatch; 0 sends unary RPCs.
    pub batch_size: usize,
    pub duration_s: u64,
    pub pacing: Pacing,
    /// Seeds the workers' random choices (each worker mixes in its slot number).
    pub seed: u64,
    /// Makes this run's idempotency keys its own (see [`new_run_id`]).
    pub run_id: String,
    /// Also run the PostgreSQL baseline, against this database.
    pub baseline: bool,
    pub baseline_database_url: String,
}

#[derive(Debug, Error)]
pub enum LoadError {
    #[error("the target `{0}` is not a URI")]
    Target(String),
    #[error("the token cannot be sent as metadata")]
    Token,
    #[error("connecting to the server: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("the server refused: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("setting up: {0}")]
    SetUp(String),
    #[error("PostgreSQL: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("a load worker panicked")]
    Worker,
    #[error("{what} must be 1 to {max}")]
    OutOfRange { what: &'static str, max: usize },
}

impl LoadConfig {
    fn check(&self) -> Result<(), LoadError> {
        if !(1..=MAX_CONNECTIONS).contains(&self.connections) {
            return Err(LoadError::OutOfRange { what: "connections", max: MAX_CONNECTIONS });
        }
        if !(1..=MAX_IN_FLIGHT).contains(&self.in_flight) {
            return Err(LoadError::OutOfRange { what: "in-flight", max: MAX_IN_FLIGHT });
        }
        if self.batch_size > crate::engine::operation::MAX_BATCH_OPERATIONS / 2 {
            return Err(LoadError::OutOfRange {
                what: "batch size",
                max: crate::engine::operation::MAX_BATCH_OPERATIONS / 2,
            });
        }
        Ok(())
    }

    fn describe(&self) -> String {
        let mode = if self.batch_size == 0 { "unary".to_owned() } else { format!("batch of {}", self.batch_size) };
        let pacing = match self.pacing {
            Pacing::Closed => "closed loop".to_owned(),
            Pacing::Open { requests_per_second } => format!("open loop at {requests_per_second} requests/s"),
        };
        format!(
            "{mode}, {pacing}, {} connections, {} in flight, {} users, {} s",
            self.connections,
            self.in_flight,
            self.users.count(),
            self.duration_s
        )
    }
}

/// A fresh run id: 16 hex digits, short enough that every key stays within the 64-byte limit.
pub fn new_run_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

impl LoadConfig {
    /// The run id as a number, for reservation ids.
    fn run_nonce(&self) -> u64 {
        u64::from_str_radix(&self.run_id, 16).unwrap_or(0)
    }
}

/// Sets up and runs the workload against the server (and the baseline if asked); one report each.
pub async fn run(config: LoadConfig) -> Result<Vec<Report>, LoadError> {
    config.check()?;
    let config = Arc::new(config);
    grpc_driver::set_up(&config).await?;
    let (tally, elapsed) = grpc_driver::run(Arc::clone(&config)).await?;
    let mut reports = vec![Report { label: format!("ledger over gRPC: {}", config.describe()), elapsed, tally }];
    if config.baseline {
        let pool = baseline::set_up(&config).await?;
        let (tally, elapsed) = baseline::run(Arc::clone(&config), pool.clone()).await?;
        pool.close().await;
        let connections = config.in_flight.clamp(1, baseline::MAX_BASELINE_CONNECTIONS);
        reports.push(Report {
            label: format!(
                "baseline, one PostgreSQL transaction per operation: closed loop, {connections} connections, {} users, {} s",
                config.users.count(),
                config.duration_s
            ),
            elapsed,
            tally,
        });
    }
    Ok(reports)
}
