//! The load generator end to end, briefly: against a real server (unary and batch, closed and
//! open loop, uniform and Zipf) and against the PostgreSQL baseline; every operation it reports
//! is acknowledged, nothing errs, and the ledger's journal and projections still agree after.
//! (Throughput itself is measured by running `diboas-ledger load`, see docs/BENCHMARKS.md, not
//! asserted here.)

mod grpc_common;

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
