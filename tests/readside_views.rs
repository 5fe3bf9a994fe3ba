//! The summary materialized views agree with their base tables after a refresh, and the
//! refresh is CONCURRENTLY (readers are never locked out; it needs the views' unique indexes).

mod grpc_common;
mod readside_common;

use diboas_ledger::api::pb;
use diboas_ledger::api::pb::transactions_client::TransactionsClient;
use diboas_ledger::readside::views;
use grpc_common::{TestServer, account, add_money, deposit, funded, open, prepared, transfer, usd};
use readside_common::count;
use rust_decimal::Decimal;
use sqlx::PgPool;

#[sqlx::test]
async fn views_agree_with_the_base_tables_after_refresh(pool: PgPool) {
    let server = TestServer::start(prepared(&pool).await).await;
    let mut client = server.client.clone();
    let alice = usd(1);
    let alice_investing = account(1, pb::Domain::Investing, "USD");
    let alice_btc = account(1, pb::Domain::Banking, "BTC");
    let bob = usd(2);
    client.open_account(open("open-a", &alice)).await.expect("open");
    client.deposit(deposit("dep-1", &alice, "100.00")).await.expect("deposit");
    client.deposit(deposit("dep-2", &alice, "50.50")).await.expect("deposit");
    funded(&mut client, &alice_investing, "7.00").await;
    funded(&mut client, &alice_btc, "0.001").await;
    funded(&mut client, &bob, "1.00").await;
    client.transfer(transfer("tr-1", &alice, &bob, "20.00")).await.expect("transfer");
    client.transfer(transfer("tr-big", &alice, &bob, "1000000.00")).await.expect_err("refused");
    let converted = client
        .convert(pb::ConvertRequest {
            idempotency_key: "cv-1".into(),
            operation: Some(pb::Convert {
                from: Some(alice.clone()),
                to: Some(alice_btc.clone()),
                amount: "10.00".into(),
                price: "0.00001".into(),
                commission_bps: 100,
            }),
        })
        .await
        .expect("convert")
        .into_inner();
    let commission_minor: Decimal = match converted.receipt.and_then(|receipt| receipt.kind) {
        Some(pb::receipt::Kind::Converted(converted)) => converted.commission_minor.parse().expect("minor units"),
        other => panic!("not a conversion receipt: {other:?}"),
    };
    server.stop().await;

    let mut conn = pool.acquire().await.expect("connection");
    // Empty until refreshed: the materialized views were made over an empty ledger, and no
    // journal record has been counted into the operation totals yet.
    assert_eq!(count(&pool, "SELECT count(*) FROM ledger.operation_summary").await, 0);
    assert_eq!(count(&pool, "SELECT count(*) FROM ledger.user_balance_summary").await, 0);
    views::refresh(&mut conn).await.expect("refresh");

    // user_balance_summary is exactly the balances summed over domains per user and asset.
    let differences = count(
        &pool,
        "SELECT count(*) FROM (
             (SELECT user_id, asset, accounts, available, reserved, total FROM ledger.user_balance_summary
              EXCEPT SELECT user_id, asset, count(*)::int, sum(available), sum(reserved), sum(total)
                     FROM ledger.balances GROUP BY user_id, asset)
             UNION ALL
             (SELECT user_id, asset, count(*)::int, sum(available), sum(reserved), sum(total)
                     FROM ledger.balances GROUP BY user_id, asset
              EXCEPT SELECT user_id, asset, accounts, available, reserved, total FROM ledger.user_balance_summary)
         ) AS d",
    )
    .await;
    assert_eq!(differences, 0);
    let (accounts, total): (i32, Decimal) = sqlx::query_as(
        "SELECT accounts, total FROM ledger.user_balance_summary WHERE user_id = $1::uuid AND asset = 'USD'",
    )
    .bind(&alice.user_id)
    .fetch_one(&pool)
    .await
    .expect("alice's USD");
    assert_eq!((accounts, total), (2, Decimal::new(12_750, 2)), "150.50 - 20 - 10 in banking, 7 in investing");

    // operation_summary, for alice's banking USD account, by operation and outcome.
    let rows: Vec<(String, String, i64, Decimal, Decimal)> = sqlx::query_as(
        "SELECT operation, outcome, operations, amount_minor, fees_minor FROM ledger.operation_summary
         WHERE user_id = $1::uuid AND domain = 'banking' AND asset = 'USD' ORDER BY operation, outcome",
    )
    .bind(&alice.user_id)
    .fetch_all(&pool)
    .await
    .expect("summary");
    let expected = vec![
        ("convert".to_string(), "ok".to_string(), 1, Decimal::from(1_000), commission_minor),
        ("deposit".to_string(), "ok".to_string(), 2, Decimal::from(15_050), Decimal::ZERO),
        ("open_account".to_string(), "ok".to_string(), 1, Decimal::ZERO, Decimal::ZERO),
        ("transfer".to_string(), "ok".to_string(), 1, Decimal::from(2_000), Decimal::ZERO),
        ("transfer".to_string(), "refused".to_string(), 1, Decimal::from(100_000_000), Decimal::ZERO),
    ];
    assert_eq!(rows, expected);
    assert!(commission_minor > Decimal::ZERO);
    // Every request in the journal is counted once.
    let counted = count(&pool, "SELECT sum(operations)::int8 FROM ledger.operation_summary").await;
    let requests = count(&pool, "SELECT count(*) FROM ledger.journal WHERE kind = 'request'").await;
    assert_eq!(counted, requests);

    // Refreshing again with nothing new changes nothing.
    views::refresh(&mut conn).await.expect("refresh again");
    assert_eq!(count(&pool, "SELECT sum(operations)::int8 FROM ledger.operation_summary").await, requests);
}

/// The operation totals grow by the records committed since the last refresh and never count a
/// record twice, however the counting is cut into steps (it used to re-read the whole journal
/// at every refresh: 52 s at a million records).
#[sqlx::test]
async fn operation_totals_count_each_committed_record_once_in_steps_of_any_size(pool: PgPool) {
    let server = TestServer::start(prepared(&pool).await).await;
    let mut client = server.client.clone();
    let (alice, bob) = (usd(1), usd(2));
    client.open_account(open("open-a", &alice)).await.expect("open");
    client.open_account(open("open-b", &bob)).await.expect("open");
    for n in 0..3 {
        client.deposit(deposit(&format!("dep-{n}"), &alice, "1.00")).await.expect("deposit");
    }
    let mut conn = pool.acquire().await.expect("connection");
    views::refresh(&mut conn).await.expect("refresh");
    let counted_through = "SELECT counted_through FROM ledger.operation_totals_cursor";
    let committed = "SELECT committed_sequence FROM ledger.checkpoint";
    assert_eq!(count(&pool, counted_through).await, count(&pool, committed).await);

    for n in 3..5 {
        client.deposit(deposit(&format!("dep-{n}"), &alice, "2.00")).await.expect("deposit");
    }
    client.transfer(transfer("tr-1", &alice, &bob, "3.00")).await.expect("transfer");
    client.transfer(transfer("tr-big", &alice, &bob, "1000.00")).await.expect_err("refused");
    server.stop().await;
    // One record a step: the same totals as one step for all. Each step returns where the
    // totals now count through, one further, until the checkpoint; then it stays there.
    let target = count(&pool, committed).await;
    let mut through = count(&pool, counted_through).await;
    while through < target {
        let next: i64 =
            sqlx::query_scalar("SELECT ledger.count_operations(1)").fetch_one(&pool).await.expect("count a record");
        assert_eq!(next, through + 1);
        through = next;
    }
    let huge: i64 = sqlx::query_scalar("SELECT ledger.count_operations(9223372036854775807)")
        .fetch_one(&pool)
        .await
        .expect("a step larger than anything left");
    assert_eq!(huge, target, "caught up, and no overflow");
    assert_eq!(views::refresh(&mut conn).await.expect("refresh with nothing new"), 0);

    let rows: Vec<(String, String, i64, Decimal)> = sqlx::query_as(
        "SELECT operation, outcome, operations, amount_minor FROM ledger.operation_summary
         WHERE user_id = $1::uuid ORDER BY operation, outcome",
    )
    .bind(&alice.user_id)
    .fetch_all(&pool)
    .await
    .expect("summary");
    let expected = vec![
        ("deposit".to_string(), "ok".to_string(), 5, Decimal::from(700)),
        ("open_account".to_string(), "ok".to_string(), 1, Decimal::ZERO),
        ("transfer".to_string(), "ok".to_string(), 1, Decimal::from(300)),
        ("transfer".to_string(), "refused".to_string(), 1, Decimal::from(100_000)),
    ];
    assert_eq!(rows, expected);
    let requests = count(&pool, "SELECT count(*) FROM ledger.journal WHERE kind = 'request'").await;
    assert_eq!(count(&pool, "SELECT sum(operations)::int8 FROM ledger.operation_summary").await, requests);
    let refused = sqlx::query("SELECT ledger.count_operations(0)").execute(&pool).await;
    assert!(refused.is_err(), "a step of no records is a caller's mistake");
}

/// An initiated transaction counts in the operation summary under its user, domain and the asset
/// its principal is paid in (until session 22 its operation named no account at its top level,
/// and it was left out, so the summary no longer counted every request).
#[sqlx::test]
async fn initiated_transactions_count_in_the_operation_summary(pool: PgPool) {
    let server = TestServer::start(prepared(&pool).await).await;
    let mut client = server.client.clone();
    let alice = usd(1);
    client.open_account(open("open-a", &alice)).await.expect("open");
    let mut transactions = TransactionsClient::new(server.channel.clone());
    transactions.initiate_transaction(add_money(1, 1)).await.expect("initiate");
    let mut conn = pool.acquire().await.expect("connection");
    views::refresh(&mut conn).await.expect("refresh");
    let rows: Vec<(String, String, String, i64, Decimal)> = sqlx::query_as(
        "SELECT domain, asset, outcome, operations, amount_minor FROM ledger.operation_summary
         WHERE user_id = $1::uuid AND operation = 'initiate_transaction'",
    )
    .bind(&alice.user_id)
    .fetch_all(&pool)
    .await
    .expect("summary");
    assert_eq!(rows, [("banking".to_string(), "USD".to_string(), "ok".to_string(), 1, Decimal::from(1_000))]);
    let counted = count(&pool, "SELECT sum(operations)::int8 FROM ledger.operation_summary").await;
    let requests = count(&pool, "SELECT count(*) FROM ledger.journal WHERE kind = 'request'").await;
    assert_eq!(counted, requests);
    server.stop().await;
}
