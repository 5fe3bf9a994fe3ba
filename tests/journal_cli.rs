//! The `diboas-ledger` command's database subcommands, run as the real binary: `migrate` on an
//! existing database is harmless, `verify` exits 0 when the journal and the projections agree
//! and 1, naming the account, when they do not; engine sizes out of range are usage errors.

mod journal_common;

use std::process::Command;

use diboas_ledger::engine::account::Domain;
use diboas_ledger::engine::asset::Asset;
use diboas_ledger::ledger::Ledger;
use journal_common::*;
use sqlx::PgPool;

fn run(url: &str, subcommand: &str) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_diboas-ledger"))
        .args(["--database-url", url, subcommand])
        .output()
        .expect("run diboas-ledger");
    (output.status.success(), String::from_utf8_lossy(&output.stdout).into_owned())
}

#[sqlx::test]
async fn migrate_then_verify_agrees_and_verify_names_a_drifted_balance(pool: PgPool) {
    let options = prepared(&pool).await;
    let url = url_of(&options);
    assert_eq!(run(&url, "migrate"), (true, "database ready\n".to_owned()));

    let ledger = Ledger::open(config(options)).await.unwrap();
    for request in mixed_workload(now_ms()) {
        ledger.submit(request).await.unwrap();
    }
    ledger.shutdown().await.unwrap();
    let (agrees, report) = run(&url, "verify");
    assert!(agrees, "{report}");
    assert!(report.contains("the journal and the projections agree"), "{report}");

    let carol = account(3, Domain::Defi, Asset::USDC_SOLANA);
    sqlx::query("UPDATE ledger.balances SET reserved = reserved + 1 WHERE user_id = $1")
        .bind(carol.user_id)
        .execute(&pool)
        .await
        .unwrap();
    let (agrees, report) = run(&url, "verify");
    assert!(!agrees, "{report}");
    assert!(
        report.lines().any(|line| line.starts_with("DIFFERENT account") && line.contains(&carol.user_id.to_string())),
        "{report}"
    );
}

/// The engine's sizes are checked before anything runs: a value out of range is a usage error
/// (exit 2) naming the flag, not a panic at start-up or a store that can hold nothing.
#[test]
fn engine_sizes_out_of_range_are_refused_naming_the_flag() {
    for (subcommand, flag, value) in [
        ("serve", "--idempotency-keys-per-shard", "0"),
        ("serve", "--idempotency-keys-per-shard", "16777217"),
        ("serve", "--idempotency-retention-ms", "599999"),
        ("verify", "--idempotency-retention-ms", "604800001"),
        ("serve", "--shards", "4097"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_diboas-ledger"))
            .args([subcommand, flag, value])
            .output()
            .expect("run diboas-ledger");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{subcommand} {flag} {value}: {stderr}");
        assert!(stderr.contains(flag), "{subcommand} {flag} {value}: {stderr}");
    }
}
