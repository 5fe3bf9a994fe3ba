//! The `diboas-ledger` command: the gRPC server and database administration.
//!
//! - `serve`: creates the database if it is missing, migrates it, recovers the ledger from it
//!   and serves the gRPC API until SIGTERM or SIGINT, then shuts down gracefully (exit 0).
//! - `migrate`: creates the database if it is missing, applies the embedded migrations, seeds
//!   the asset registry and creates the journal partitions ahead.
//! - `outbox requeue`: puts every Failed outbox event back to Pending (see docs/OUTBOX.md).
//! - `verify`: replays the whole journal into a fresh engine and compares it with the
//!   projections; exits non-zero and lists the differences if they disagree.
//! - `load`: the load generator: drives a running server over gRPC and reports durable ops/s,
//!   latency percentiles and errors by code; `--baseline` adds per-operation PostgreSQL
//!   transactions doing the same work, in the same run.
//! - `token`: makes a new bearer token for a calling service and prints the callers-file entry
//!   (with the token's digest) that admits it.
//! - `rotate-keys`: re-seals the personal data under the active encryption key, in batches,
//!   while the server keeps serving.
//! - `retention`: refreshes the summary views and applies the audit retention once.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand, ValueEnum};
use diboas_ledger::api::auth::{self, AuthConfigError, Authenticator, CallersFile};
use diboas_ledger::api::directory::ReadSide;
use diboas_ledger::api::events::EventsConfig;
use diboas_ledger::api::server::{ServeConfig, ServeError, ServeOptions, serve};
use diboas_ledger::directory::encryption::{Keyring, KeyringError};
use diboas_ledger::directory::{DirectoryError, rotation};
use diboas_ledger::engine::{EngineConfig, MAX_IDEMPOTENCY_CAPACITY_PER_SHARD, MAX_SHARDS};
use diboas_ledger::ledger::{Ledger, LedgerConfig, LedgerError};
use diboas_ledger::load::{self, LoadConfig, Pacing};
use diboas_ledger::metrics::Metrics;
use diboas_ledger::outbox::relay::RelayConfig;
use diboas_ledger::outbox::{OutboxError, admin};
use diboas_ledger::readside;
use diboas_ledger::store;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use thiserror::Error;

use tokio::signal::unix::{SignalKind, signal};

/// mimalloc instead of glibc's malloc, for the server and the load generator alike: under unary
/// load glibc's allocator (with `memmove`) was about a third of the server's CPU samples, and
/// mimalloc made the server and the load generator each cheaper; see docs/BENCHMARKS.md. Called
/// through `LedgerAllocator`, which keeps ordinary layouts on mimalloc's fast path.
#[global_allocator]
static ALLOCATOR: diboas_ledger::allocator::LedgerAllocator = diboas_ledger::allocator::LedgerAllocator;

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
    /// Log line format: human-readable text, or one JSON object per line for log pipelines.
    #[arg(long, env = "DIBOAS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// What is logged when RUST_LOG is not set: our own info lines, and only warnings from sqlx
/// (whose info lines are PostgreSQL notices such as "relation already exists, skipping").
const DEFAULT_LOG_FILTER: &str = "info,sqlx=warn";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the gRPC API (creates and migrates the database first).
    Serve(ServeArgs),
    /// Create the database if missing and apply the migrations.
    Migrate,
    /// Replay the journal and compare it with the projections.
    Verify(VerifyArgs),
    /// Make a bearer token for a calling service; prints the token once, and its callers-file entry.
    Token(TokenArgs),
    /// Drive a running server with load and report durable ops/s, latency and errors.
    Load(LoadArgs),
    /// Re-seal personal data under the active encryption key (safe while serving).
    RotateKeys(RotateArgs),
    /// Refresh the summary views and apply the audit retention once.
    Retention,
    /// Operate the outbox of events.
    #[command(subcommand)]
    Outbox(OutboxCommand),
}

#[derive(Args)]
struct LoadArgs {
    /// The server to drive.
    #[arg(long, env = "DIBOAS_LOAD_TARGET", default_value = "http://127.0.0.1:50051")]
    target: String,
    /// Bearer token to send (leave unset for a --dev-mode server).
    #[arg(long, env = "DIBOAS_LOAD_TOKEN")]
    token: Option<String>,
    /// gRPC connections (HTTP/2), shared round-robin by the in-flight slots.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Requests in flight at once (closed loop: workers; open loop: the cap on outstanding requests).
    #[arg(long, default_value_t = 64)]
    in_flight: usize,
    /// Operation mix, kind=weight: deposit, withdraw, transfer, reserve-commit.
    #[arg(long, default_value = "transfer=60,deposit=20,withdraw=10,reserve-commit=10")]
    mix: String,
    /// Users to spread the load over (opened and funded before the run).
    #[arg(long, default_value_t = 10_000)]
    users: u64,
    /// Skew users with a Zipf distribution of this exponent (hot accounts); unset is uniform.
    #[arg(long)]
    zipf: Option<f64>,
    /// Units per SubmitBatch; 0 sends unary RPCs.
    #[arg(long, default_value_t = 0)]
    batch_size: usize,
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 10)]
    duration_s: u64,
    /// Open loop: requests started per second, whatever the answers do; unset is closed loop.
    #[arg(long)]
    rate: Option<f64>,
    /// Seed of the random choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Also run the same workload as one PostgreSQL transaction per operation, and compare.
    #[arg(long)]
    baseline: bool,
    /// The baseline's own database (created if missing; its tables are emptied each run).
    #[arg(
        long,
        env = "DIBOAS_BASELINE_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/diboas_load_baseline"
    )]
    baseline_database_url: String,
}

#[derive(Args)]
struct TokenArgs {
    /// The calling service's name (appears in logs, metrics and the journal).
    #[arg(long)]
    service: String,
    /// RPC names it may call (e.g. Deposit,GetBalance), or `*` for all.
    #[arg(long, value_delimiter = ',', default_value = "*")]
    operations: Vec<String>,
    /// Domains it may touch (banking, investing, defi), or `*` for all.
    #[arg(long, value_delimiter = ',', default_value = "*")]
    domains: Vec<String>,
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
    /// Blind-index (HMAC-SHA256) keys for email lookups as `version:base64-of-32-bytes`, comma
    /// separated; a single key without a version is version 1.
    #[arg(long, env = "DIBOAS_BLIND_INDEX_KEY", hide_env_values = true)]
    blind_index_key: Option<String>,
    /// The blind-index key version new email indexes are made under.
    #[arg(long, env = "DIBOAS_BLIND_INDEX_ACTIVE_KEY", default_value_t = 1)]
    blind_index_active_key: i32,
}

impl KeyArgs {
    fn keyring(&self) -> Result<Keyring, CommandError> {
        match (&self.encryption_keys, &self.blind_index_key) {
            (Some(keys), Some(index_keys)) => {
                Ok(Keyring::parse(keys, self.encryption_active_key, index_keys, self.blind_index_active_key)?)
            }
            (None, None) => {
                tracing::warn!(
                    "NO ENCRYPTION KEYS CONFIGURED: personal data is sealed with the public DEVELOPMENT key; \
                     set DIBOAS_ENCRYPTION_KEYS and DIBOAS_BLIND_INDEX_KEY in any real deployment"
                );
                Ok(Keyring::development())
            }
            _ => Err(CommandError::PartialKeys),
        }
    }
}

/// The engine's sizes, for `serve`.
#[derive(Args)]
struct EngineArgs {
    /// Shards of the in-memory engine; more shards, less contention between users.
    #[arg(long, env = "DIBOAS_SHARDS", default_value_t = EngineConfig::default().shard_count as u64,
          value_parser = clap::value_parser!(u64).range(1..=MAX_SHARDS as u64))]
    shards: u64,
    #[command(flatten)]
    retention: RetentionArg,
    /// Idempotency keys one shard holds; past it new requests are refused (RESOURCE_EXHAUSTED,
    /// IDEMPOTENCY_STORE_FULL). Size it to shards x this >= 2 x (retention + sweep interval) x
    /// new keys per second (the start-up log says what the settings hold).
    #[arg(long, env = "DIBOAS_IDEMPOTENCY_KEYS_PER_SHARD",
          default_value_t = EngineConfig::default().idempotency_capacity_per_shard as u64,
          value_parser = clap::value_parser!(u64).range(1..=MAX_IDEMPOTENCY_CAPACITY_PER_SHARD as u64))]
    idempotency_keys_per_shard: u64,
}

impl EngineArgs {
    fn config(&self) -> EngineConfig {
        // The parsers bound every value far inside `usize`.
        EngineConfig {
            shard_count: self.shards as usize,
            idempotency_capacity_per_shard: self.idempotency_keys_per_shard as usize,
            retention_ms: self.retention.idempotency_retention_ms,
        }
    }
}

/// The retention window, which `serve` and `verify` share: a replay must forget idempotency keys
/// on the ledger's window, or it would call a key legitimately reused after that window a
/// corrupt journal.
#[derive(Args)]
struct RetentionArg {
    /// How long idempotency keys (and closed reservations) are remembered, in milliseconds: at
    /// least this, at most about twice. A retry after that runs as a new request. At least 10
    /// minutes, so an id reused after its window never meets its first use in one journal batch.
    /// For `verify`, the shortest the ledger has run with.
    #[arg(long, env = "DIBOAS_IDEMPOTENCY_RETENTION_MS", default_value_t = EngineConfig::default().retention_ms,
          value_parser = clap::value_parser!(i64).range(MIN_RETENTION_MS..=MAX_RETENTION_MS))]
    idempotency_retention_ms: i64,
}

/// The shortest retention accepted: a journal batch (bounded by the writer's commit timeout) must
/// never hold both the first use of an id and its reuse after the window.
const MIN_RETENTION_MS: i64 = 10 * 60 * 1_000;

/// The longest retention accepted: a week. Longer windows hold more than memory can.
const MAX_RETENTION_MS: i64 = 7 * 24 * 60 * 60 * 1_000;

#[derive(Args)]
struct VerifyArgs {
    #[command(flatten)]
    retention: RetentionArg,
}

#[derive(Args)]
struct RotateArgs {
    #[command(flatten)]
    keys: KeyArgs,
    /// Values re-sealed per transaction.
    #[arg(long, env = "DIBOAS_ROTATION_BATCH_SIZE", default_value_t = 500)]
    batch_size: i64,
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
    /// Most requests handled at once; more are refused with RESOURCE_EXHAUSTED (load shedding).
    #[arg(long, env = "DIBOAS_MAX_IN_FLIGHT", default_value_t = ServeConfig::default().max_in_flight)]
    max_in_flight: usize,
    /// The callers file: each calling service's token digest and scopes (see `token`).
    #[arg(long, env = "DIBOAS_AUTH_FILE")]
    auth_file: Option<std::path::PathBuf>,
    /// Development mode: no tokens, every caller has every scope. Loopback addresses only.
    #[arg(long, env = "DIBOAS_DEV_MODE", conflicts_with = "auth_file")]
    dev_mode: bool,
    /// Address of the Prometheus metrics endpoint (GET /metrics).
    #[arg(long, env = "DIBOAS_METRICS_LISTEN", default_value = "127.0.0.1:9464")]
    metrics_listen: SocketAddr,
    #[command(flatten)]
    keys: KeyArgs,
    #[command(flatten)]
    engine: EngineArgs,
    /// How often the summary views are refreshed (and audit retention applied), in milliseconds.
    #[arg(long, env = "DIBOAS_VIEW_REFRESH_INTERVAL_MS", default_value_t = 60_000)]
    view_refresh_interval_ms: u64,
    /// Statements slower than this are logged at WARN, in milliseconds.
    #[arg(long, env = "DIBOAS_SLOW_STATEMENT_MS", default_value_t = 500)]
    slow_statement_ms: u64,
    /// Most connections of the read side's pool (the Directory service and the view refresh).
    #[arg(long, env = "DIBOAS_READ_POOL_CONNECTIONS", default_value_t = 8)]
    read_pool_connections: u32,
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
    Auth(#[from] AuthConfigError),
    #[error("printing the callers entry: {0}")]
    Print(#[from] serde_json::Error),
    #[error("load: {0}")]
    Load(#[from] load::LoadError),
    #[error("load: {0}")]
    Workload(#[from] load::workload::WorkloadError),
    #[error("the encryption keyring: {0}")]
    Keyring(#[from] KeyringError),
    #[error("set both DIBOAS_ENCRYPTION_KEYS and DIBOAS_BLIND_INDEX_KEY, or neither (development keys)")]
    PartialKeys,
    #[error(transparent)]
    Directory(#[from] DirectoryError),
    #[error(transparent)]
    Outbox(#[from] OutboxError),
}

fn main() -> ExitCode {
    if let Some(missing) = missing_cpu_feature() {
        return refuse_cpu(missing);
    }
    let cli = Cli::parse();
    // Logs go to stderr: stdout is the commands' own output (`verify`'s report, `token`'s entry).
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    let logs = tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().with_current_span(true).init(),
    }
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

/// A CPU feature this binary was compiled to use that the CPU running it lacks: said plainly
/// here rather than as an illegal instruction somewhere later. The build targets x86-64-v3
/// (`.cargo/config.toml`). Asked of CPUID itself: `is_x86_feature_detected!` answers "yes"
/// without asking for any feature the build enabled.
#[cfg(target_arch = "x86_64")]
fn missing_cpu_feature() -> Option<&'static str> {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    let has = |register: u32, bit: u32| register & (1 << bit) != 0;
    let basic = __cpuid(1);
    let extended = __cpuid_count(7, 0);
    let amd_extended = __cpuid(0x8000_0001);
    [
        ("FMA", has(basic.ecx, 12)),
        ("MOVBE", has(basic.ecx, 22)),
        ("AVX", has(basic.ecx, 28)),
        ("F16C", has(basic.ecx, 29)),
        ("BMI1", has(extended.ebx, 3)),
        ("AVX2", has(extended.ebx, 5)),
        ("BMI2", has(extended.ebx, 8)),
        ("LZCNT", has(amd_extended.ecx, 5)),
    ]
    .into_iter()
    .find(|(_, present)| !present)
    .map(|(name, _)| name)
}

#[cfg(not(target_arch = "x86_64"))]
fn missing_cpu_feature() -> Option<&'static str> {
    None
}

/// Says which feature is missing and stops. Kept apart and small: it runs on a CPU that cannot
/// execute the rest of the binary.
#[cold]
#[inline(never)]
fn refuse_cpu(missing: &str) -> ExitCode {
    use std::io::Write;
    let mut stderr = std::io::stderr();
    let message = [
        "error: this build needs a CPU with ",
        missing,
        " (.cargo/config.toml targets x86-64-v3); rebuild with RUSTFLAGS=\"\" to run on this one\n",
    ];
    for part in message {
        let _ = stderr.write_all(part.as_bytes());
    }
    ExitCode::FAILURE
}

async fn run(cli: Cli) -> Result<ExitCode, CommandError> {
    let options = PgConnectOptions::from_str(&cli.database_url).map_err(store::StoreError::from)?;
    match cli.command {
        Command::Serve(args) => {
            let authenticator = authenticator(&args)?;
            store::create_database_if_missing(&cli.database_url).await?;
            store::prepare(&options).await?;
            let config = ServeConfig {
                max_message_bytes: args.max_message_bytes,
                max_batch_operations: args.max_batch_operations,
                request_timeout_ms: args.request_timeout_ms,
                sweep_interval_ms: args.sweep_interval_ms,
                max_in_flight: args.max_in_flight,
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
            let listener = bind(args.listen).await?;
            let metrics_listener = bind(args.metrics_listen).await?;
            let listening =
                listener.local_addr().map_err(|source| CommandError::Bind { address: args.listen, source })?;
            let metrics = Arc::new(Metrics::new());
            let mut ledger_config = LedgerConfig::new(options.clone());
            ledger_config.engine = args.engine.config();
            ledger_config.journal.metrics = metrics.journal.clone();
            tracing::info!(
                shards = ledger_config.engine.shard_count,
                idempotency_keys_per_shard = ledger_config.engine.idempotency_capacity_per_shard,
                idempotency_retention_ms = ledger_config.engine.retention_ms,
                sustained_new_keys_per_s = ledger_config
                    .engine
                    .sustained_keys_per_s(i64::try_from(config.sweep_interval_ms).unwrap_or(i64::MAX))
                    .round(),
                "engine sized: past the sustained rate of new keys, new requests are refused until keys age out"
            );
            let read_side = ReadSide {
                pool: readside::pool::connect(&options, args.read_pool_connections, args.slow_statement_ms),
                keyring: Arc::new(args.keys.keyring()?),
                refresh_interval_ms: args.view_refresh_interval_ms,
            };
            let ledger = Ledger::open(ledger_config).await?;
            tracing::info!(
                %listening,
                metrics = %args.metrics_listen,
                "serving diboas.ledger.v1.Ledger and diboas.ledger.v1.Directory"
            );
            let options = ServeOptions {
                config,
                authenticator,
                metrics_listener: Some(metrics_listener),
                metrics,
                read_side: Some(read_side),
            };
            serve(ledger, listener, options, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Load(args) => {
            let config = LoadConfig {
                target: args.target,
                token: args.token,
                connections: args.connections,
                in_flight: args.in_flight,
                mix: load::workload::Mix::parse(&args.mix)?,
                users: load::workload::Users::new(args.users, args.zipf)?,
                batch_size: args.batch_size,
                duration_s: args.duration_s,
                pacing: args.rate.map_or(Pacing::Closed, |requests_per_second| Pacing::Open { requests_per_second }),
                seed: args.seed,
                run_id: load::new_run_id(),
                baseline: args.baseline,
                baseline_database_url: args.baseline_database_url,
            };
            let reports = load::run(config).await?;
            for report in &reports {
                println!("{report}");
            }
            if let [ledger, baseline] = reports.as_slice() {
                let ratio = ledger.operations_per_second() / baseline.operations_per_second().max(f64::EPSILON);
                println!("ledger / baseline durable ops/s: {ratio:.1}x");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Token(args) => {
            let (token, entry) = auth::new_token(&args.service, args.operations, args.domains);
            // Check the entry is one the server would accept before handing it out.
            Authenticator::from_callers(&CallersFile { callers: vec![entry.clone()] })?;
            println!("token (give it to {}; it is not stored anywhere): {token}", args.service);
            println!("callers-file entry:\n{}", serde_json::to_string_pretty(&entry)?);
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
            println!(
                "re-sealed {} values under key version {}; re-indexed {} emails under blind-index key version {}",
                rotated.values,
                keyring.active_version(),
                rotated.email_indexes,
                keyring.index_active_version()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Retention => {
            let pool = readside::pool::connect(&options, 1, u64::MAX);
            let report = readside::maintenance::run_once(&pool).await.map_err(store::StoreError::from)?;
            println!("views refreshed; {} partitions archived, {} dropped", report.archived, report.dropped);
            Ok(ExitCode::SUCCESS)
        }
        Command::Outbox(OutboxCommand::Requeue) => {
            let mut conn = PgConnection::connect_with(&options).await.map_err(store::StoreError::from)?;
            let requeued = admin::requeue_failed(&mut conn).await?;
            conn.close().await.map_err(store::StoreError::from)?;
            println!("re-queued {requeued} failed events");
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify(args) => {
            let mut conn = PgConnection::connect_with(&options).await.map_err(store::StoreError::from)?;
            let config =
                EngineConfig { retention_ms: args.retention.idempotency_retention_ms, ..EngineConfig::default() };
            let report = store::verify(&mut conn, config).await?;
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

async fn bind(address: SocketAddr) -> Result<tokio::net::TcpListener, CommandError> {
    tokio::net::TcpListener::bind(address).await.map_err(|source| CommandError::Bind { address, source })
}

/// Tokens from the callers file, or development mode when asked for by name on a loopback
/// address; neither is a refusal to start, so the server never runs open by accident.
fn authenticator(args: &ServeArgs) -> Result<Authenticator, CommandError> {
    match (&args.auth_file, args.dev_mode) {
        (Some(path), _) => Ok(Authenticator::from_file(path)?),
        (None, true) if args.listen.ip().is_loopback() => Ok(Authenticator::development()),
        (None, true) => Err(AuthConfigError::DevModeNotLoopback(args.listen).into()),
        (None, false) => Err(AuthConfigError::NoCallers.into()),
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
