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
use diboas_ledger::readside::views;
use diboas_ledger::store;
use futures_util::future::join_all;
use journal_common::*;
use rust_decimal::Decimal;
use sqlx::{Connection, PgConnection, PgPool};

const TRANSACTIONS: u128 = 40;
/// The per-transaction cap of user 1: above every transaction here.
const CAP_MINOR: i128 = 1_000_000;

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

/// The status each transaction `id` ends in.
fn end_of(id: u128) -> TxStatus {
    [TxStatus::Completed, TxStatus::Failed, TxStatus::ProviderConfirming, TxStatus::Compensated][(id % 4) as usize]
}

/// Opens and funds the accounts, then runs every transaction through its lifecycle to
/// [`end_of`] its id. All requests are handed to the engine before any is awaited, so the writer
/// packs many changes of one transaction into a batch.
async fn run_lifecycles(ledger: &Ledger) {
    let now = now_ms();
    let setup = [
        open(account(1, Domain::Banking, Asset::USD)),
        open(account(2, Domain::Banking, Asset::USD)),
        deposit(account(1, Domain::Banking, Asset::USD), 10_000_000),
        Operation::SetCompliance {
            user_id: user(1),
            record: ComplianceRecord {
                kyc: KycStatus::Pending,
                risk: RiskLevel::High,
                max_transaction_minor: Some(CAP_MINOR),
            },
        },
        // The Directory's KYC update: status and risk change, the cap stays.
        Operation::SetKyc { user_id: user(1), kyc: KycStatus::Verified, risk: RiskLevel::Medium },
    ];
    for (index, operation) in setup.into_iter().enumerate() {
        ledger.submit(request(&format!("setup-{index}"), now, operation)).await.expect("setup").result.expect("ok");
    }
    use TxStatus::*;
    let mut requests = Vec::new();
    for id in 0..TRANSACTIONS {
        requests.push(request(
            &format!("init-{id}"),
            now,
            Operation::InitiateTransaction { transaction: Box::new(send(id)) },
        ));
        let path: &[TxStatus] = match end_of(id) {
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
}

#[sqlx::test]
async fn lifecycles_within_shared_batches_project_exactly_and_recover(pool: PgPool) {
    let options = prepared(&pool).await;
    let ledger = Ledger::open(config(options.clone())).await.expect("open");
    run_lifecycles(&ledger).await;
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
    let report = store::verify(&mut conn, diboas_ledger::engine::EngineConfig::default()).await.expect("verify");
    assert!(report.agrees(), "{:?}", report.differences);
    let loaded = store::load_state(&mut conn, Some(config(options.clone()).engine.retention_ms)).await.expect("load");
    assert_eq!(loaded.transactions, engine_state.transactions);
    assert_eq!(loaded.compliance, engine_state.compliance);
    let record =
        ComplianceRecord { kyc: KycStatus::Verified, risk: RiskLevel::Medium, max_transaction_minor: Some(CAP_MINOR) };
    assert_eq!(engine_state.compliance.get(&user(1)), Some(&record), "SetKyc kept the cap");
}

/// The architecture's transaction summary: counts, principal and fees by user, domain, type
/// and status, over `ledger.transactions`, equal to the base table after a concurrent refresh.
#[sqlx::test]
async fn the_transaction_summary_counts_amounts_and_fees_by_user_domain_type_and_status(pool: PgPool) {
    let options = prepared(&pool).await;
    let ledger = Ledger::open(config(options.clone())).await.expect("open");
    run_lifecycles(&ledger).await;
    ledger.shutdown().await.expect("shutdown");
    let mut conn = PgConnection::connect_with(&options).await.expect("connect");
    views::refresh(&mut conn).await.expect("refresh the views");

    let rows: Vec<(String, i64, Decimal, Decimal)> = sqlx::query_as(
        "SELECT status, transactions, principal, fees FROM ledger.transaction_summary
         WHERE user_id = $1 AND domain = 'banking' AND type = 'send_money' AND asset = 'USD' ORDER BY status",
    )
    .bind(user(1))
    .fetch_all(&pool)
    .await
    .expect("the summary");
    let mut expected: BTreeMap<String, (i64, Decimal, Decimal)> = BTreeMap::new();
    for id in 0..TRANSACTIONS {
        let row = expected.entry(end_of(id).name().to_owned()).or_default();
        row.0 += 1;
        row.1 += Decimal::new(send(id).principal_minor as i64, 2);
        row.2 += Decimal::new(25, 2);
    }
    let expected: Vec<(String, i64, Decimal, Decimal)> =
        expected.into_iter().map(|(status, (count, principal, fees))| (status, count, principal, fees)).collect();
    assert_eq!(rows, expected);

    let differences: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (
             (SELECT user_id, domain, type, status, asset, transactions, principal, fees FROM ledger.transaction_summary
              EXCEPT SELECT user_id, domain, type, status, asset, count(*), sum(principal), sum(fee_total)
                     FROM ledger.transactions GROUP BY 1, 2, 3, 4, 5)
             UNION ALL
             (SELECT user_id, domain, type, status, asset, count(*), sum(principal), sum(fee_total)
                     FROM ledger.transactions GROUP BY 1, 2, 3, 4, 5
              EXCEPT SELECT user_id, domain, type, status, asset, transactions, principal, fees
                     FROM ledger.transaction_summary)
         ) AS d",
    )
    .fetch_one(&pool)
    .await
    .expect("compare with the base table");
    assert_eq!(differences, 0);
}

/// The architecture's transaction indexes: composite (user_id, status, created_at), provider, and
/// the partial index of active transactions; each partition carries them.
#[sqlx::test]
async fn transactions_have_the_architectures_indexes_on_every_partition(pool: PgPool) {
    prepared(&pool).await;
    let definitions: Vec<String> = sqlx::query_scalar(
        "SELECT indexdef FROM pg_indexes WHERE schemaname = 'ledger' AND tablename = 'transactions'",
    )
    .fetch_all(&pool)
    .await
    .expect("the indexes");
    for wanted in [
        "(user_id, status, created_at_ms DESC, transaction_id DESC)",
        "(provider, created_at) WHERE (provider IS NOT NULL)",
        "(user_id, updated_at_ms) WHERE (status <> ALL (ARRAY['completed'::text, 'failed'::text, 'compensated'::text]))",
    ] {
        assert!(definitions.iter().any(|definition| definition.ends_with(wanted)), "{wanted} not in {definitions:#?}");
    }
    let partitions_missing_one: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_inherits i
         WHERE i.inhparent = 'ledger.transactions'::regclass
           AND (SELECT count(*) FROM pg_index x WHERE x.indrelid = i.inhrelid)
             <> (SELECT count(*) FROM pg_index x WHERE x.indrelid = 'ledger.transactions'::regclass)",
    )
    .fetch_one(&pool)
    .await
    .expect("partition indexes");
    assert_eq!(partitions_missing_one, 0);
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
