//! A property of the money path's audit: for random workloads of deposits, transfers,
//! withdrawals and reservations (many refused), submitted concurrently so batches of many records
//! form, and with the ledger restarted between workloads, every request in the journal has exactly
//! one audit row, and that row's outcome and effects are the journal record's own.

mod journal_common;

use diboas_ledger::engine::account::{Domain, Provider};
use diboas_ledger::engine::asset::Asset;
use diboas_ledger::engine::operation::Operation;
use diboas_ledger::ledger::Ledger;
use futures_util::future::join_all;
use journal_common::*;
use proptest::collection::vec;
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::TestRunner;
use sqlx::PgPool;

/// Workloads, each run by a freshly opened ledger (a restart between them).
const ROUNDS: u128 = 4;
/// Accounts per workload.
const ACCOUNTS: u128 = 4;

#[sqlx::test]
async fn every_request_has_one_audit_row_matching_its_journal_record(pool: PgPool) {
    let options = prepared(&pool).await;
    let mut runner = TestRunner::deterministic();
    // (kind, account, other account, amount in cents)
    let strategy = vec((0u8..4, 0..ACCOUNTS, 0..ACCOUNTS, 1i128..40_000), 1..80);
    for round in 0..ROUNDS {
        let ledger = Ledger::open(config(options.clone())).await.expect("open the ledger");
        let accounts: Vec<_> = (0..ACCOUNTS).map(|n| account(round * 100 + n, Domain::Banking, Asset::USD)).collect();
        for (index, account) in accounts.iter().enumerate() {
            let key = format!("open-{round}-{index}");
            ledger.submit(request(&key, now_ms(), open(*account))).await.expect("open");
            let key = format!("fund-{round}-{index}");
            ledger.submit(request(&key, now_ms(), deposit(*account, 20_000))).await.expect("fund");
        }
        let workload = strategy.new_tree(&mut runner).expect("a workload").current();
        let requests: Vec<_> = workload
            .iter()
            .enumerate()
            .map(|(index, (kind, from, to, minor))| {
                let (from, to) = (accounts[*from as usize], accounts[*to as usize]);
                let operation = match kind {
                    0 => deposit(from, *minor),
                    1 => transfer(from, to, *minor),
                    2 => Operation::Withdraw { account: from, amount: amount(*minor), provider: Provider::Ramp },
                    _ => Operation::Reserve {
                        reservation_id: user(10_000 + round * 1_000 + index as u128),
                        account: from,
                        amount: amount(*minor),
                        ttl_ms: None,
                    },
                };
                request(&format!("op-{round}-{index}"), now_ms(), operation)
            })
            .collect();
        // Submitted together: the engine applies them in order and they become durable in shared batches.
        let outcomes = join_all(requests.into_iter().map(|request| ledger.submit(request))).await;
        for outcome in outcomes {
            outcome.expect("durable (a refusal is an outcome, not an error)");
        }
        ledger.shutdown().await.expect("shut down");

        let (requests, audited, mismatched): (i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM ledger.journal WHERE kind = 'request'),
                    (SELECT count(*) FROM audit.trail WHERE journal_sequence IS NOT NULL),
                    (SELECT count(*) FROM ledger.journal j WHERE j.kind = 'request' AND NOT EXISTS (
                         SELECT 1 FROM audit.trail a
                         WHERE a.journal_sequence = j.sequence
                           AND a.after_state -> 'effects' = (j.record -> 'effects')::jsonb
                           AND a.after_state -> 'outcome' = (j.record -> 'origin' -> 'data' -> 'outcome')::jsonb
                           AND a.event_type = 'ledger.' || (j.record -> 'origin' -> 'data' -> 'operation' ->> 'op')))",
        )
        .fetch_one(&pool)
        .await
        .expect("compare");
        assert_eq!(audited, requests, "round {round}: one audit row per request");
        assert_eq!(mismatched, 0, "round {round}: every audit row carries its record's outcome and effects");
    }
    let refused: i64 = sqlx::query_scalar("SELECT count(*) FROM audit.trail WHERE after_state -> 'outcome' ? 'Err'")
        .fetch_one(&pool)
        .await
        .expect("refusals");
    assert!(refused > 0, "the workloads include refusals");
}
