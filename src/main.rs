//! The `diboas-ledger` command: database administration now, the gRPC server later.
//!
//! - `migrate`: creates the database if it is missing, applies the embedded migrations, seeds
//!   the asset registry and creates the journal partitions ahead.
//! - `verify`: replays the whole journal into a fresh engine and compares it with the
//!   projections; exits non-zero and lists the differences if they disagree.

use std::process::ExitCode;
use std::str::FromStr;

use clap::{Parser, Subcommand};
use diboas_ledger::store;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};

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
    /// Create the database if missing and apply the migrations.
    Migrate,
    /// Replay the journal and compare it with the projections.
    Verify,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
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

async fn run(cli: Cli) -> Result<ExitCode, store::StoreError> {
    let options = PgConnectOptions::from_str(&cli.database_url)?;
    match cli.command {
        Command::Migrate => {
            store::create_database_if_missing(&cli.database_url).await?;
            store::prepare(&options).await?;
            println!("database ready");
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify => {
            let mut conn = PgConnection::connect_with(&options).await?;
            let report = store::verify(&mut conn).await?;
            conn.close().await?;
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
