//! The load generator end to end, briefly: against a real server (unary and batch, closed and
//! open loop, uniform and Zipf) and against the PostgreSQL baseline; every operation it reports
//! is acknowledged, nothing errs, and the ledger's journal and projections still agree after.
//! (Throughput itself is measured by running `diboas-ledger load`, see docs/BENCHMARKS.md, not
//! asserted here.)

mod grpc_common;

use diboas_ledger::api::auth::{self, Authenticator, CallersFile};
use diboas_ledger::api::server::{ServeConfig, ServeOptions};
use diboas_ledger::ledger::LedgerConfig;
use diboas_ledger::load::workload::{Mix, Users};
use diboas_ledger::load::{self, LoadConfig, Pacing};
use diboas_ledger::store;
use grpc_common::*;
use sqlx::PgPool;

fn config(address: std::net::SocketAddr, database_url: String) -> LoadConfig {
    LoadConfig {
        target: format!("http://{address}"),
        token: None,
        connections: 2,
        in_flight: 8,
        mix: Mix::parse("transfer=60,deposit=20,withdraw=10,reserve-commit=10").unwrap(),
        users: Users::new(50, None).unwrap(),
        batch_size: 0,
        duration_s: 1,
        pacing: Pacing::Closed,
        seed: 7,
        run_id: load::new_run_id(),
        baseline: false,
        baseline_database_url: database_url,
    }
}

#[sqlx::test]
async fn every_mode_runs_clean_and_the_ledger_still_verifies(pool: PgPool) {
    let options = prepared(&pool).await;
    let server = TestServer::start(options.clone()).await;
    let base = config(server.address, url_of(&options));
    let runs = [
        LoadConfig { baseline: true, ..base.clone() },
        LoadConfig { batch_size: 16, ..base.clone() },
        LoadConfig { users: Users::new(50, Some(1.1)).unwrap(), ..base.clone() },
        LoadConfig { pacing: Pacing::Open { requests_per_second: 200.0 }, ..base.clone() },
    ];
    for run in runs {
        // Each run its own idempotency keys, as each `diboas-ledger load` invocation has.
        let run = LoadConfig { run_id: load::new_run_id(), ..run };
        let with_baseline = run.baseline;
        let reports = load::run(run).await.expect("the run completes");
        assert_eq!(reports.len(), if with_baseline { 2 } else { 1 });
        for report in &reports {
            assert!(report.tally.operations > 0, "{report}");
            assert!(report.tally.errors.is_empty(), "{report}");
        }
    }
    server.stop().await;
    let mut conn = pool.acquire().await.unwrap();
    let verified = store::verify(&mut conn, diboas_ledger::engine::EngineConfig::default()).await.unwrap();
    assert!(verified.agrees(), "{verified:?}");
}

#[sqlx::test]
async fn a_reservation_whose_commit_fails_is_released_and_expires_within_a_minute(pool: PgPool) {
    // Before, a unary commit that failed (shed under overload, say) left its reservation active
    // for the default 30 minutes, and a hot user's could pile up to the reservation cap. Here
    // every commit fails, deterministically: the caller may do everything but commit.
    let operations = ["OpenAccount", "Deposit", "SubmitBatch", "Reserve", "Release"];
    let (token, entry) =
        auth::new_token("no-commits", operations.iter().map(|name| (*name).to_owned()).collect(), vec!["*".to_owned()]);
    let authenticator =
        Authenticator::from_callers(&CallersFile { callers: vec![entry] }).expect("a valid callers file");
    let options = ServeOptions { authenticator, ..ServeOptions::development(ServeConfig::default()) };
    let server = TestServer::start_with_options(LedgerConfig::new(prepared(&pool).await), options).await;
    let run = LoadConfig {
        token: Some(token),
        mix: Mix::parse("reserve-commit=1").unwrap(),
        ..config(server.address, String::new())
    };
    let reports = load::run(run).await.expect("the run completes");
    let tally = &reports[0].tally;
    assert_eq!(
        tally.operations,
        tally.errors.values().sum::<u64>(),
        "each reserve worked, each commit failed: {tally:?}"
    );
    assert!(tally.errors.keys().all(|code| code == "PermissionDenied"), "{tally:?}");
    server.stop().await;

    let (made, active, other_ttl): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE status = 'active'), \
                count(*) FILTER (WHERE expires_at_ms - created_at_ms <> 60000) \
         FROM ledger.reservations",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(made > 0);
    assert_eq!((active, other_ttl), (0, 0), "of {made} reservations");
}
