//! The `diboas-ledger` command: the gRPC server and database administration.
//!
//! - `serve`: creates the database if it is missing, migrates it, recovers the ledger from it
//!   and serves the gRPC API until SIGTERM or SIGINT, then shuts down gracefully (exit 0).
//! - `migrate`: creates the database if it is missing, applies the embedded migrations, seeds
//!   the asset registry and creates the journal partitions ahead.
//! - `verify`: replays the whole journal into a fresh engine and compares it with the
//!   projections; exits non-zero and lists the differences if they disagree.
//! - `rotate-keys`: re-seals the personal data under the active encryption key, in batches,
//!   while the server keeps serving.
//! - `retention`: refreshes the summary views and applies the audit retention once.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::str::FromStr;

use clap::{Args, Parser, Subcommand};
use std::sync::Arc;

use diboas_ledger::api::directory::ReadSide;
use diboas_ledger::api::server::{ServeConfig, ServeError, serve_with};
use diboas_ledger::directory::encryption::{Keyring, KeyringError};
use diboas_ledger::directory::{DirectoryError, rotation};
use diboas_ledger::ledger::{Ledger, LedgerConfig, LedgerError};
use diboas_ledger::readside;
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
    /// Re-seal personal data under the active encryption key (safe while serving).
    RotateKeys(RotateArgs),
    /// Refresh the summary views and apply the audit retention once.
    Retention,
}

/// The encryption keys. Both keys unset means the development keys, which `serve` logs loudly.
#[derive(Args)]
struct KeyArgs {
    /// Data keys as `version:base64-of-32-bytes`, comma separated; old versions stay until rotated away.
    #[arg(long, env = "DIBOAS_ENCRYPTION_KEYS", hide_env_values = true)]
    encryption_keys: Option<String>,
    /// The key version new values are sealed under.
    #[arg(long, env = "DIBOAS_ENCRYPTION_ACTIVE_KEY", default_value_t = 1)]
    encryption_active_key: i32,
    /// The blind-index (HMAC-SHA256) key for email lookups, base64 of 32 bytes.
    #[arg(long, env = "DIBOAS_BLIND_INDEX_KEY", hide_env_values = true)]
    blind_index_key: Option<String>,
}

impl KeyArgs {
    fn keyring(&self) -> Result<Keyring, CommandError> {
        match (&self.encryption_keys, &self.blind_index_key) {
            (Some(keys), Some(index_key)) => Ok(Keyring::parse(keys, self.encryption_active_key, index_key)?),
            (None, None) => {
                tracing::warn!(
                    "NO ENCRYPTION KEYS CONFIGURED: personal data is sealed with the public DEVELOPMENT key; \
                     set DIBOAS_ENCRYPTION_KEYS and DIBOAS_BLIND_INDEX_KEY in any real deployment"
                );
                eprintln!("WARNING: running with the development encryption keys (not for production)");
                Ok(Keyring::development())
            }
            _ => Err(CommandError::PartialKeys),
        }
    }
}

#[derive(Args)]
struct RotateArgs {
    #[command(flatten)]
    keys: KeyArgs,
    /// Values re-sealed per transaction.
    #[arg(long, env = "DIBOAS_ROTATION_BATCH_SIZE", default_value_t = 500)]
    batch_size: i64,
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
    #[command(flatten)]
    keys: KeyArgs,
    /// How often the summary views are refreshed (and audit retention applied), in milliseconds.
    #[arg(long, env = "DIBOAS_VIEW_REFRESH_INTERVAL_MS", default_value_t = 60_000)]
    view_refresh_interval_ms: u64,
    /// Statements slower than this are logged at WARN, in milliseconds.
    #[arg(long, env = "DIBOAS_SLOW_STATEMENT_MS", default_value_t = 500)]
    slow_statement_ms: u64,
    /// Most connections of the read side's pool (the Directory service and the view refresh).
    #[arg(long, env = "DIBOAS_READ_POOL_CONNECTIONS", default_value_t = 8)]
    read_pool_connections: u32,
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
    #[error("the encryption keyring: {0}")]
    Keyring(#[from] KeyringError),
    #[error("set both DIBOAS_ENCRYPTION_KEYS and DIBOAS_BLIND_INDEX_KEY, or neither (development keys)")]
    PartialKeys,
    #[error(transparent)]
    Directory(#[from] DirectoryError),
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
            };
            let shutdown = shutdown_signal().map_err(CommandError::Signals)?;
            let listener = tokio::net::TcpListener::bind(args.listen)
                .await
                .map_err(|source| CommandError::Bind { address: args.listen, source })?;
            let listening =
                listener.local_addr().map_err(|source| CommandError::Bind { address: args.listen, source })?;
            let read_side = ReadSide {
                pool: readside::pool::connect(&options, args.read_pool_connections, args.slow_statement_ms),
                keyring: Arc::new(args.keys.keyring()?),
                refresh_interval_ms: args.view_refresh_interval_ms,
            };
            let ledger = Ledger::open(LedgerConfig::new(options)).await?;
            tracing::info!(%listening, "serving diboas.ledger.v1.Ledger and diboas.ledger.v1.Directory");
            serve_with(ledger, Some(read_side), listener, config, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate => {
            store::create_database_if_missing(&cli.database_url).await?;
            store::prepare(&options).await?;
            println!("database ready");
            Ok(ExitCode::SUCCESS)
        }
        Command::RotateKeys(args) => {
            let keyring = args.keys.keyring()?;
            let pool = readside::pool::connect(&options, 1, u64::MAX);
            let rotated = rotation::rotate_all(&pool, &keyring, args.batch_size).await?;
            println!("re-sealed {rotated} values under key version {}", keyring.active_version());
            Ok(ExitCode::SUCCESS)
        }
        Command::Retention => {
            let pool = readside::pool::connect(&options, 1, u64::MAX);
            let report = readside::maintenance::run_once(&pool).await.map_err(store::StoreError::from)?;
            println!("views refreshed; {} partitions archived, {} dropped", report.archived, report.dropped);
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
