//! The transaction projections under batching: many transactions, each created and moved
//! several times within the same journal batches, project to exactly what the journal replays to
//! (`store::verify`), with one history row per change and fee rows in their final status; and
//! recovery loads the same transactions and compliance records the engine held.

mod journal_common;

use std::collections::BTreeMap;

use diboas_ledger::engine::account::{AccountRef, Domain, FeeTier};
use diboas_ledger::engine::asset::Asset;
use diboas_ledger::engine::operation::Operation;
use diboas_ledger::engine::transaction::{
    ComplianceRecord, FeeLine, FeeMethod, KycStatus, NewTransaction, RiskLevel, TxStatus, TxType,
};
use diboas_ledger::ledger::Ledger;
use diboas_ledger::store;
use futures_util::future::join_all;
use journal_common::*;
use sqlx::{Connection, PgConnection, PgPool};

const TRANSACTIONS: u128 = 40;

fn send(id: u128) -> NewTransaction {
    NewTransaction {
        id: uuid::Uuid::from_u128(0xabc0_0000 + id),
        user_id: user(1),
        domain: Domain::Banking,
        kind: TxType::SendMoney,
        payer: AccountRef::User(account(1, Domain::Banking, Asset::USD)),
        payee: AccountRef::User(account(2, Domain::Banking, Asset::USD)),
        principal_minor: 1_000 + id as i128,
        fees: vec![FeeLine {
            tier: FeeTier::Platform,
            category: "service".into(),
            method: FeeMethod::Flat,
            amount_minor: 25,
            provider: None,
            schedule_version: 1,
        }],
        receive: None,
        provider: None,
        details: BTreeMap::new(),
    }
}

fn step(id: u128, to: TxStatus) -> Operation {
    Operation::TransitionTransaction {
        user_id: user(1),
        transaction_id: send(id).id,
        to,
        reason: to.name().into(),
        provider_event: None,
        fill: None,
        payee_user_id: Some(user(2)),
    }
}

#[sqlx::test]
async fn lifecycles_within_shared_batches_project_exactly_and_recover(pool: PgPool) {
    let options = prepared(&pool).await;
    let ledger = Ledger::open(config(options.clone())).await.expect("open");
    let now = now_ms();
    let setup = [
        open(account(1, Domain::Banking, Asset::USD)),
        open(account(2, Domain::Banking, Asset::USD)),
        deposit(account(1, Domain::Banking, Asset::USD), 10_000_000),
        Operation::SetCompliance {
            user_id: user(1),
            record: ComplianceRecord { kyc: KycStatus::Verified, risk: RiskLevel::Medium, max_transaction_minor: None },
        },
    ];
    for (index, operation) in setup.into_iter().enumerate() {
        ledger.submit(request(&format!("setup-{index}"), now, operation)).await.expect("setup").result.expect("ok");
    }
    // Every transaction goes through its whole lifecycle; all requests are handed to the engine
    // before any is awaited, so the writer packs many changes of one transaction into a batch.
    use TxStatus::*;
    let ends = [Completed, Failed, ProviderConfirming, Compensated];
    let mut requests = Vec::new();
    for id in 0..TRANSACTIONS {
        requests.push(request(
            &format!("init-{id}"),
            now,
            Operation::InitiateTransaction { transaction: Box::new(send(id)) },
        ));
        let path: &[TxStatus] = match ends[(id % 4) as usize] {
            Completed => &[Validating, BalanceReserved, SentToProvider, ProviderProcessing, Completed],
            Failed => &[Validating, BalanceReserved, SentToProvider, Failed],
            Compensated => &[Validating, BalanceReserved, SentToProvider, Completed, Compensating, Compensated],
            _ => &[Validating, BalanceReserved, SentToProvider, ProviderConfirming],
        };
        for (index, status) in path.iter().enumerate() {
            requests.push(request(&format!("step-{id}-{index}"), now, step(id, *status)));
        }
    }
    let outcomes = join_all(requests.into_iter().map(|request| ledger.submit(request))).await;
    for outcome in outcomes {
        outcome.expect("durable").result.expect("accepted");
    }
    let engine_state = ledger.state().await.expect("state");
    engine_state.check_invariants().expect("invariants");
    let batches: (i64,) = sqlx::query_as("SELECT count(DISTINCT created_at) FROM ledger.journal")
        .fetch_one(&pool)
        .await
        .expect("batches");
    let journal_rows: (i64,) =
        sqlx::query_as("SELECT count(*) FROM ledger.journal").fetch_one(&pool).await.expect("rows");
    assert!(batches.0 < journal_rows.0, "several records shared a batch ({batches:?} of {journal_rows:?})");
    ledger.shutdown().await.expect("shutdown");

    let history: Vec<(String, i64)> = sqlx::query_as(
        "SELECT to_status, count(*) FROM ledger.transaction_status_history GROUP BY to_status ORDER BY to_status",
    )
    .fetch_all(&pool)
    .await
    .expect("history");
    let count = |status: &str| history.iter().find(|(name, _)| name == status).map_or(0, |(_, n)| *n);
    assert_eq!(count("validating"), TRANSACTIONS as i64);
    assert_eq!(count("compensated"), (TRANSACTIONS / 4) as i64);
    let fee_statuses: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM ledger.transaction_fees GROUP BY status ORDER BY status")
            .fetch_all(&pool)
            .await
            .expect("fees");
    let per_end = (TRANSACTIONS / 4) as i64;
    assert_eq!(
        fee_statuses,
        [
            ("pending".to_owned(), per_end),
            ("posted".to_owned(), per_end),
            ("released".to_owned(), per_end),
            ("reversed".to_owned(), per_end)
        ]
    );

    let mut conn = PgConnection::connect_with(&options).await.expect("connect");
    let report = store::verify(&mut conn).await.expect("verify");
    assert!(report.agrees(), "{:?}", report.differences);
    let loaded = store::load_state(&mut conn, Some(config(options.clone()).engine.retention_ms)).await.expect("load");
    assert_eq!(loaded.transactions, engine_state.transactions);
    assert_eq!(loaded.compliance, engine_state.compliance);
}

#[sqlx::test]
async fn transaction_partitions_are_created_ahead_once(pool: PgPool) {
    prepared(&pool).await;
    let (created,): (i32,) = sqlx::query_as("SELECT ledger.ensure_transaction_partitions('2031-03-20 12:00:00+00', 2)")
        .fetch_one(&pool)
        .await
        .expect("create");
    assert_eq!(created, 3);
    let (again,): (i32,) = sqlx::query_as("SELECT ledger.ensure_transaction_partitions('2031-04-01 00:00:00+00', 1)")
        .fetch_one(&pool)
        .await
        .expect("again");
    assert_eq!(again, 0);
    let names: Vec<(String,)> = sqlx::query_as(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'ledger.transactions'::regclass AND c.relname LIKE 'transactions_2031_%' ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .expect("partitions");
    let names: Vec<&str> = names.iter().map(|(name,)| name.as_str()).collect();
    assert_eq!(names, ["transactions_2031_03", "transactions_2031_04", "transactions_2031_05"]);
}
