//! The `diboas-ledger` command: the gRPC server and database administration.
//!
//! - `serve`: creates the database if it is missing, migrates it, recovers the ledger from it
//!   and serves the gRPC API until SIGTERM or SIGINT, then shuts down gracefully (exit 0).
//! - `migrate`: creates the database if it is missing, applies the embedded migrations, seeds
//!   the asset registry and creates the journal partitions ahead.
//! - `outbox requeue`: puts every Failed outbox event back to Pending (see docs/OUTBOX.md).
//! - `verify`: replays the whole journal into a fresh engine and compares it with the
//!   projections; exits non-zero and lists the differences if they disagree.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::str::FromStr;

use clap::{Args, Parser, Subcommand};
use diboas_ledger::api::events::EventsConfig;
use diboas_ledger::api::server::{ServeConfig, ServeError, serve};
use diboas_ledger::ledger::{Ledger, LedgerConfig, LedgerError};
use diboas_ledger::outbox::relay::RelayConfig;
use diboas_ledger::outbox::{OutboxError, admin};
use diboas_ledger::store;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use thiserror::Error;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(name = "diboas-ledger", version, about = "diBoaS Ledger: balances and the durable journal")]
struct Cli {
    /// PostgreSQL URL of the ledger's database.
    #[arg(
        long,
        env = "DIBOAS_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/diboas_ledger",
        global = true
    )]
    database_url: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the gRPC API (creates and migrates the database first).
    Serve(ServeArgs),
    /// Create the database if missing and apply the migrations.
    Migrate,
    /// Replay the journal and compare it with the projections.
    Verify,
    /// Operate the outbox of events.
    #[command(subcommand)]
    Outbox(OutboxCommand),
}

#[derive(Subcommand)]
enum OutboxCommand {
    /// Put every Failed event back to Pending (attempts reset) for the relay to publish.
    Requeue,
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "DIBOAS_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Largest request message accepted, in bytes.
    #[arg(long, env = "DIBOAS_MAX_MESSAGE_BYTES", default_value_t = ServeConfig::default().max_message_bytes)]
    max_message_bytes: usize,
    /// Most operations one SubmitBatch may carry (entries plus linked group members).
    #[arg(long, env = "DIBOAS_MAX_BATCH_OPERATIONS", default_value_t = ServeConfig::default().max_batch_operations)]
    max_batch_operations: usize,
    /// Longest a request may run, in milliseconds (a client's shorter deadline wins).
    #[arg(long, env = "DIBOAS_REQUEST_TIMEOUT_MS", default_value_t = ServeConfig::default().request_timeout_ms)]
    request_timeout_ms: u64,
    /// How often reservations past their expiry are released, in milliseconds.
    #[arg(long, env = "DIBOAS_SWEEP_INTERVAL_MS", default_value_t = ServeConfig::default().sweep_interval_ms)]
    sweep_interval_ms: u64,
    /// Do not run the outbox relay (events still go to the outbox and the Events stream).
    #[arg(long, env = "DIBOAS_NO_OUTBOX_RELAY")]
    no_outbox_relay: bool,
    /// The NATS server the outbox relay publishes to.
    #[arg(long, env = "DIBOAS_NATS_URL", default_value_t = RelayConfig::default().nats_url)]
    nats_url: String,
    /// The JetStream stream the relay creates or updates.
    #[arg(long, env = "DIBOAS_NATS_STREAM", default_value_t = RelayConfig::default().stream_name)]
    nats_stream: String,
    /// Events are published to <prefix>.<aggregate>.<type>.
    #[arg(long, env = "DIBOAS_NATS_SUBJECT_PREFIX", default_value_t = RelayConfig::default().subject_prefix)]
    nats_subject_prefix: String,
    /// The most events one relay round publishes.
    #[arg(long, env = "DIBOAS_OUTBOX_BATCH_EVENTS", default_value_t = RelayConfig::default().batch_max_events)]
    outbox_batch_events: i64,
    /// How long published events are kept before pruning, in milliseconds.
    #[arg(long, env = "DIBOAS_OUTBOX_RETENTION_MS", default_value_t = RelayConfig::default().retention_ms)]
    outbox_retention_ms: u64,
    /// Events an event stream buffers for a slow consumer before cutting it.
    #[arg(long, env = "DIBOAS_EVENTS_BUFFER", default_value_t = EventsConfig::default().buffer_events)]
    events_buffer: usize,
    /// Event streams open at once.
    #[arg(long, env = "DIBOAS_EVENTS_MAX_STREAMS", default_value_t = EventsConfig::default().max_streams)]
    events_max_streams: usize,
}

/// Everything a command can fail with.
#[derive(Debug, Error)]
enum CommandError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("starting the ledger: {0}")]
    Ledger(#[from] LedgerError),
    #[error("binding {address}: {source}")]
    Bind { address: SocketAddr, source: std::io::Error },
    #[error("installing the signal handlers: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error(transparent)]
    Outbox(#[from] OutboxError),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: starting the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode, CommandError> {
    let options = PgConnectOptions::from_str(&cli.database_url).map_err(store::StoreError::from)?;
    match cli.command {
        Command::Serve(args) => {
            store::create_database_if_missing(&cli.database_url).await?;
            store::prepare(&options).await?;
            let config = ServeConfig {
                max_message_bytes: args.max_message_bytes,
                max_batch_operations: args.max_batch_operations,
                request_timeout_ms: args.request_timeout_ms,
                sweep_interval_ms: args.sweep_interval_ms,
                events: EventsConfig {
                    buffer_events: args.events_buffer,
                    max_streams: args.events_max_streams,
                    ..EventsConfig::default()
                },
                relay: (!args.no_outbox_relay).then(|| RelayConfig {
                    nats_url: args.nats_url,
                    stream_name: args.nats_stream,
                    subject_prefix: args.nats_subject_prefix,
                    batch_max_events: args.outbox_batch_events,
                    retention_ms: args.outbox_retention_ms,
                    ..RelayConfig::default()
                }),
                ..ServeConfig::default()
            };
            let shutdown = shutdown_signal().map_err(CommandError::Signals)?;
            let listener = tokio::net::TcpListener::bind(args.listen)
                .await
                .map_err(|source| CommandError::Bind { address: args.listen, source })?;
            let listening =
                listener.local_addr().map_err(|source| CommandError::Bind { address: args.listen, source })?;
            let ledger = Ledger::open(LedgerConfig::new(options)).await?;
            tracing::info!(%listening, "serving diboas.ledger.v1.Ledger");
            serve(ledger, listener, config, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate => {
            store::create_database_if_missing(&cli.database_url).await?;
            store::prepare(&options).await?;
            println!("database ready");
            Ok(ExitCode::SUCCESS)
        }
        Command::Outbox(OutboxCommand::Requeue) => {
            let mut conn = PgConnection::connect_with(&options).await.map_err(store::StoreError::from)?;
            let requeued = admin::requeue_failed(&mut conn).await?;
            conn.close().await.map_err(store::StoreError::from)?;
            println!("re-queued {requeued} failed events");
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify => {
            let mut conn = PgConnection::connect_with(&options).await.map_err(store::StoreError::from)?;
            let report = store::verify(&mut conn).await?;
            conn.close().await.map_err(store::StoreError::from)?;
            println!("replayed {} journal records, {} accounts", report.records_replayed, report.accounts);
            for difference in &report.differences {
                println!(
                    "DIFFERENT {}: journal {} / projections {}",
                    difference.what, difference.replayed, difference.projected
                );
            }
            if report.agrees() {
                println!("the journal and the projections agree");
                Ok(ExitCode::SUCCESS)
            } else {
                println!("{} differences", report.difference_count);
                Ok(ExitCode::FAILURE)
            }
        }
    }
}

/// Completes on the first SIGTERM or SIGINT. The handlers are installed before serving starts,
/// so a signal that arrives during start-up is not lost.
fn shutdown_signal() -> Result<impl Future<Output = ()>, std::io::Error> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM: shutting down gracefully"),
            _ = interrupt.recv() => tracing::info!("SIGINT: shutting down gracefully"),
        }
    })
}
