//! End to end through gRPC and PostgreSQL: Add Money, Send Money with fees, Buy Crypto and Start
//! Strategy driven by provider events; duplicate, out-of-order and early provider events;
//! illegal transitions and bad input refused with nothing changed; a restart keeps transactions;
//! and after every scenario money is conserved (fee revenue included) and the journal replays
//! to exactly the projections (`store::verify`).

mod grpc_common;

use diboas_ledger::api::pb;
use diboas_ledger::api::pb::transactions_client::TransactionsClient;
use diboas_ledger::store;
use grpc_common::*;
use rust_decimal::Decimal;
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use tonic::Code;
use tonic::transport::Channel;

async fn fee_schedule(pool: &PgPool, kind: &str, asset: &str, effective_from: &str, rules: &str) {
    sqlx::query(
        "INSERT INTO ledger.fee_schedules (type, asset, effective_from, rules) VALUES ($1, $2, $3::timestamptz, $4::jsonb)",
    )
    .bind(kind)
    .bind(asset)
    .bind(effective_from)
    .bind(rules)
    .execute(pool)
    .await
    .expect("insert a fee schedule");
}

/// A server whose Add Money fees are `fee_rules` (a fee schedule's JSON), with a banking USD
/// account opened and KYC-verified for each of `users`; its connection options and a
/// Transactions client.
async fn serving_add_money(
    pool: &PgPool,
    fee_rules: &str,
    users: &[u128],
) -> (PgConnectOptions, TestServer, TransactionsClient<Channel>) {
    let options = prepared(pool).await;
    fee_schedule(pool, "add_money", "USD", "2020-01-01T00:00:00Z", fee_rules).await;
    let mut server = TestServer::start(options.clone()).await;
    let mut client = TransactionsClient::new(server.channel.clone());
    for &n in users {
        server.client.open_account(open(&format!("open-{n}"), &usd(n))).await.expect("open");
        verified(&mut client, n).await;
    }
    (options, server, client)
}

async fn verified(client: &mut TransactionsClient<Channel>, user_n: u128) {
    client
        .set_user_compliance(pb::SetUserComplianceRequest {
            idempotency_key: format!("kyc-{user_n}"),
            user_id: user(user_n),
            kyc_status: "verified".into(),
            risk_level: "low".into(),
            max_transaction_minor: String::new(),
        })
        .await
        .expect("set compliance");
}

fn initiate(
    n: u128,
    user_n: u128,
    domain: pb::Domain,
    kind: &str,
    amount: &str,
    asset: &str,
) -> pb::InitiateTransactionRequest {
    pb::InitiateTransactionRequest {
        idempotency_key: format!("init-{n}"),
        transaction_id: tx_id(n),
        user_id: user(user_n),
        domain: domain.into(),
        r#type: kind.into(),
        amount: amount.into(),
        asset: asset.into(),
        ..Default::default()
    }
}

async fn advance(client: &mut TransactionsClient<Channel>, n: u128, user_n: u128, to: &str) -> pb::Transaction {
    client
        .advance_transaction(pb::AdvanceTransactionRequest {
            idempotency_key: format!("adv-{n}-{to}"),
            user_id: user(user_n),
            transaction_id: tx_id(n),
            to_status: to.into(),
            reason: format!("step to {to}"),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|status| panic!("advance {n} to {to}: {status:?}"))
        .into_inner()
        .transaction
        .expect("a transaction")
}

async fn to_provider(client: &mut TransactionsClient<Channel>, n: u128, user_n: u128) {
    for status in ["validating", "balance_reserved", "sent_to_provider"] {
        assert_eq!(advance(client, n, user_n, status).await.status, status);
    }
}

async fn event(
    client: &mut TransactionsClient<Channel>,
    source: &str,
    event_id: &str,
    event_type: &str,
    payload: String,
) -> pb::ProviderEventResponse {
    client
        .submit_provider_event(pb::SubmitProviderEventRequest {
            source: source.into(),
            event_id: event_id.into(),
            event_type: event_type.into(),
            raw_payload: payload,
        })
        .await
        .expect("submit a provider event")
        .into_inner()
}

async fn get(client: &mut TransactionsClient<Channel>, n: u128) -> pb::Transaction {
    client
        .get_transaction(pb::GetTransactionRequest { transaction_id: tx_id(n) })
        .await
        .expect("get")
        .into_inner()
        .transaction
        .expect("a transaction")
}

/// Every asset's balances (users and system accounts, fee revenue included) sum to zero, and
/// the journal replays to exactly what the projections hold.
async fn assert_conserved_and_verified(options: &PgConnectOptions, pool: &PgPool) {
    let unbalanced: Vec<(String, Decimal)> = sqlx::query_as(
        "SELECT asset, sum(amount) FROM (
             SELECT asset, total AS amount FROM ledger.balances
             UNION ALL SELECT asset, balance FROM ledger.system_balances) t
         GROUP BY asset HAVING sum(amount) <> 0",
    )
    .fetch_all(pool)
    .await
    .expect("sum balances");
    assert!(unbalanced.is_empty(), "{unbalanced:?}");
    let mut conn = sqlx::PgConnection::connect_with(options).await.expect("connect");
    let report = store::verify(&mut conn, diboas_ledger::engine::EngineConfig::default()).await.expect("verify");
    assert!(report.agrees(), "{:?}", report.differences);
}

async fn system_balance(pool: &PgPool, kind: &str, asset: &str) -> Decimal {
    sqlx::query_as::<_, (Decimal,)>("SELECT balance FROM ledger.system_balances WHERE kind = $1 AND asset = $2")
        .bind(kind)
        .bind(asset)
        .fetch_optional(pool)
        .await
        .expect("system balance")
        .map_or(Decimal::ZERO, |(balance,)| balance)
}

use sqlx::Connection;

#[sqlx::test]
async fn add_money_completes_on_the_stripe_event_and_duplicates_and_late_events_change_nothing(pool: PgPool) {
    let options = prepared(&pool).await;
    // Provider fee 2.9% and a flat 0.30 platform fee.
    fee_schedule(
        &pool,
        "add_money",
        "USD",
        "2020-01-01T00:00:00Z",
        r#"[{"tier":"provider","category":"card_processing","method":"percentage","bps":290,"provider":"stripe"},
            {"tier":"platform","category":"service","method":"flat","amount_minor":30}]"#,
    )
    .await;
    let mut server = TestServer::start(options.clone()).await;
    let mut client = TransactionsClient::new(server.channel.clone());
    server.client.open_account(open("open-1", &usd(1))).await.expect("open");
    verified(&mut client, 1).await;

    let mut request = initiate(1, 1, pb::Domain::Banking, "add_money", "100.00", "USD");
    request.provider = pb::Provider::Stripe.into();
    let initiated = client.initiate_transaction(request.clone()).await.expect("initiate").into_inner();
    assert_eq!(initiated.status, "initiated");
    let transaction = initiated.transaction.expect("a transaction");
    assert_eq!((transaction.status.as_str(), transaction.fee_total.as_str()), ("initiated", "3.20"));
    assert_eq!(transaction.fees.len(), 2);
    assert!(transaction.fees.iter().all(|fee| fee.status == "pending" && fee.schedule_version == 1));
    // The same key again is a replay, not a second transaction; also once another fee schedule
    // is in force (until session 22 the retry was priced again and refused as a reused key).
    assert!(client.initiate_transaction(request.clone()).await.expect("replay").into_inner().replayed);
    fee_schedule(
        &pool,
        "add_money",
        "USD",
        "2025-01-01T00:00:00Z",
        r#"[{"tier":"platform","category":"service","method":"flat","amount_minor":99}]"#,
    )
    .await;
    let repriced = client.initiate_transaction(request.clone()).await.expect("replay").into_inner();
    assert!(repriced.replayed);
    assert_eq!(repriced.transaction.expect("a transaction").fee_total, "3.20");
    // The same transaction under another key is refused, priced by the new schedule; retried, that
    // key gets its own first result again, not a conflict with the transaction's first fees.
    let mut duplicate = request.clone();
    duplicate.idempotency_key = "init-1-again".into();
    for attempt in ["first", "retry"] {
        let refused = client.initiate_transaction(duplicate.clone()).await.expect_err(attempt);
        assert_refused(&refused, Code::AlreadyExists, "TRANSACTION_ALREADY_EXISTS");
    }

    to_provider(&mut client, 1, 1).await;
    // A replay once the transaction moved on: the first result again, beside the transaction as it
    // is now (until session 22 only the latter, so a retry could not tell what its request did).
    let late_replay = client.initiate_transaction(request).await.expect("replay").into_inner();
    assert!(late_replay.replayed);
    assert_eq!(late_replay.status, "initiated");
    assert_eq!(late_replay.transaction.expect("a transaction").status, "sent_to_provider");
    assert_eq!(balance(&mut server.client, &usd(1)).await.2, "0.00", "nothing arrives before the provider confirms");
    let payload = format!(r#"{{"id":"pi_1","metadata":{{"transaction_id":"{}"}}}}"#, tx_id(1));
    let processed = event(&mut client, "stripe", "evt_1", "payment_intent.succeeded", payload.clone()).await;
    assert_eq!((processed.status.as_str(), processed.transaction_status.as_str()), ("processed", "completed"));
    assert_eq!(balance(&mut server.client, &usd(1)).await.2, "96.80");
    assert_eq!(system_balance(&pool, "fee_revenue:provider", "USD").await, Decimal::new(290, 2));
    assert_eq!(system_balance(&pool, "fee_revenue:platform", "USD").await, Decimal::new(30, 2));

    // Redelivery: recognised, nothing changes.
    let duplicate = event(&mut client, "stripe", "evt_1", "payment_intent.succeeded", payload).await;
    assert!(duplicate.duplicate);
    assert_eq!(duplicate.status, "processed");
    // A late "processing" after completion is stale: stored, ignored.
    let late = format!(r#"{{"metadata":{{"transaction_id":"{}"}}}}"#, tx_id(1));
    let stale = event(&mut client, "stripe", "evt_0", "payment_intent.processing", late).await;
    assert_eq!(stale.status, "ignored");
    assert_eq!(balance(&mut server.client, &usd(1)).await.2, "96.80");

    let completed = get(&mut client, 1).await;
    assert_eq!(completed.status, "completed");
    assert!(completed.fees.iter().all(|fee| fee.status == "posted"));
    let history = client
        .get_transaction_history(pb::GetTransactionHistoryRequest { transaction_id: tx_id(1) })
        .await
        .expect("history")
        .into_inner()
        .changes;
    let steps: Vec<(&str, &str)> =
        history.iter().map(|change| (change.from_status.as_str(), change.to_status.as_str())).collect();
    assert_eq!(
        steps,
        [
            ("initiated", "validating"),
            ("validating", "balance_reserved"),
            ("balance_reserved", "sent_to_provider"),
            ("sent_to_provider", "completed")
        ]
    );
    assert_eq!((history[3].provider_source.as_str(), history[3].provider_event_id.as_str()), ("stripe", "evt_1"));
    let stored: Vec<(String, String)> =
        sqlx::query_as("SELECT event_id, status FROM ledger.provider_events ORDER BY event_id")
            .fetch_all(&pool)
            .await
            .expect("inbox");
    assert_eq!(stored, [("evt_0".to_owned(), "ignored".to_owned()), ("evt_1".to_owned(), "processed".to_owned())]);
    server.stop().await;
    assert_conserved_and_verified(&options, &pool).await;
}

#[sqlx::test]
async fn send_money_with_fees_reserves_then_posts_fees_and_pays_the_recipient(pool: PgPool) {
    let options = prepared(&pool).await;
    // An old schedule and the one in force: the newer applies.
    fee_schedule(
        &pool,
        "send_money",
        "USD",
        "2020-01-01T00:00:00Z",
        r#"[{"tier":"platform","category":"old","method":"flat","amount_minor":999}]"#,
    )
    .await;
    fee_schedule(
        &pool,
        "send_money",
        "USD",
        "2021-01-01T00:00:00Z",
        r#"[{"tier":"platform","category":"service","method":"percentage","bps":100,"min_minor":50},
            {"tier":"network","category":"rails","method":"flat","amount_minor":10}]"#,
    )
    .await;
    // A schedule in the future does not apply yet.
    fee_schedule(
        &pool,
        "send_money",
        "USD",
        "2999-01-01T00:00:00Z",
        r#"[{"tier":"premium","category":"future","method":"flat","amount_minor":1}]"#,
    )
    .await;
    let mut server = TestServer::start(options.clone()).await;
    let mut client = TransactionsClient::new(server.channel.clone());
    funded(&mut server.client, &usd(1), "1000.00").await;
    server.client.open_account(open("open-bob", &usd(2))).await.expect("open");
    verified(&mut client, 1).await;

    let mut request = initiate(1, 1, pb::Domain::Banking, "send_money", "250.00", "USD");
    request.counterparty_user_id = user(2);
    let transaction = client.initiate_transaction(request).await.expect("initiate").into_inner().transaction.unwrap();
    assert_eq!(transaction.fee_total, "2.60");
    assert!(transaction.fees.iter().all(|fee| fee.schedule_version == 2));
    to_provider(&mut client, 1, 1).await;
    assert_eq!(balance(&mut server.client, &usd(1)).await, ("747.40".into(), "252.60".into(), "1000.00".into()));
    let payload = format!(r#"{{"transaction_id":"{}"}}"#, tx_id(1));
    assert_eq!(event(&mut client, "rails", "r-1", "provider.processing", payload.clone()).await.status, "processed");
    assert_eq!(event(&mut client, "rails", "r-2", "provider.succeeded", payload).await.status, "processed");
    assert_eq!(balance(&mut server.client, &usd(1)).await, ("747.40".into(), "0.00".into(), "747.40".into()));
    assert_eq!(balance(&mut server.client, &usd(2)).await.2, "250.00");
    assert_eq!(system_balance(&pool, "fee_revenue:platform", "USD").await, Decimal::new(250, 2));
    assert_eq!(system_balance(&pool, "fee_revenue:network", "USD").await, Decimal::new(10, 2));

    // A second, failed transfer releases its reservation.
    let mut second = initiate(2, 1, pb::Domain::Banking, "send_money", "10.00", "USD");
    second.counterparty_user_id = user(2);
    client.initiate_transaction(second).await.expect("initiate");
    advance(&mut client, 2, 1, "validating").await;
    advance(&mut client, 2, 1, "balance_reserved").await;
    let failed = client
        .fail_transaction(pb::FailTransactionRequest {
            idempotency_key: "fail-2".into(),
            user_id: user(1),
            transaction_id: tx_id(2),
            reason: "user cancelled".into(),
        })
        .await
        .expect("fail")
        .into_inner()
        .transaction
        .unwrap();
    assert_eq!(failed.status, "failed");
    assert!(failed.fees.iter().all(|fee| fee.status == "released"));
    assert_eq!(balance(&mut server.client, &usd(1)).await.1, "0.00");

    // Listing: filters and a cursor.
    let list = |status: &str, page_size: u32, page_token: String| pb::ListTransactionsRequest {
        user_id: user(1),
        domain: pb::Domain::Banking.into(),
        r#type: "send_money".into(),
        status: status.into(),
        page_size,
        page_token,
        ..Default::default()
    };
    let completed = client.list_transactions(list("completed", 0, String::new())).await.unwrap().into_inner();
    assert_eq!(completed.transactions.iter().map(|t| t.transaction_id.clone()).collect::<Vec<_>>(), [tx_id(1)]);
    let first = client.list_transactions(list("", 1, String::new())).await.unwrap().into_inner();
    assert_eq!(first.transactions.len(), 1);
    assert!(!first.next_page_token.is_empty());
    let second_page = client.list_transactions(list("", 1, first.next_page_token)).await.unwrap().into_inner();
    assert_eq!(second_page.transactions.len(), 1);
    assert_ne!(second_page.transactions[0].transaction_id, first.transactions[0].transaction_id);
    assert!(second_page.next_page_token.is_empty());
    // A time window: both were created after 1 ms past the epoch, neither before it.
    let window =
        |from_ms: i64, to_ms: i64| pb::ListTransactionsRequest { from_ms, to_ms, ..list("", 0, String::new()) };
    let after_epoch = client.list_transactions(window(1, 0)).await.unwrap().into_inner();
    assert_eq!(after_epoch.transactions.len(), 2);
    let before_epoch = client.list_transactions(window(0, 1)).await.unwrap().into_inner();
    assert!(before_epoch.transactions.is_empty());
    let failed_only = client.list_transactions(pb::ListTransactionsRequest { status: "failed".into(), ..window(1, 0) });
    let failed_only = failed_only.await.unwrap().into_inner();
    assert_eq!(failed_only.transactions.iter().map(|t| t.transaction_id.clone()).collect::<Vec<_>>(), [tx_id(2)]);
    server.stop().await;
    assert_conserved_and_verified(&options, &pool).await;
}

#[sqlx::test]
async fn buy_crypto_and_start_strategy_complete_on_provider_events_with_their_execution(pool: PgPool) {
    let options = prepared(&pool).await;
    fee_schedule(&pool, "buy_crypto", "USD", "2020-01-01T00:00:00Z", r#"[{"tier":"platform","category":"trading","method":"tiered","brackets":[{"from_minor":0,"bps":150},{"from_minor":100000,"bps":100}]}]"#).await;
    fee_schedule(
        &pool,
        "start_strategy",
        "USDC:ethereum",
        "2020-01-01T00:00:00Z",
        r#"[{"tier":"network","category":"gas","method":"flat","amount_minor":1500000,"provider":"ethereum"}]"#,
    )
    .await;
    let mut server = TestServer::start(options.clone()).await;
    let mut client = TransactionsClient::new(server.channel.clone());
    let investing_usd = account(1, pb::Domain::Investing, "USD");
    let investing_btc = account(1, pb::Domain::Investing, "BTC");
    let defi_usdc = account(1, pb::Domain::Defi, "USDC:ethereum");
    funded(&mut server.client, &investing_usd, "5000.00").await;
    server.client.open_account(open("open-btc", &investing_btc)).await.expect("open");
    funded(&mut server.client, &defi_usdc, "500").await;
    verified(&mut client, 1).await;

    let mut buy = initiate(1, 1, pb::Domain::Investing, "buy_crypto", "100.00", "USD");
    buy.target_asset = "BTC".into();
    buy.details.insert("order_type".into(), "market".into());
    let bought = client.initiate_transaction(buy).await.expect("buy").into_inner().transaction.unwrap();
    assert_eq!(bought.fee_total, "1.50");
    to_provider(&mut client, 1, 1).await;
    // A fill on a move that records none is refused, not dropped unsaid.
    let early_fill = pb::AdvanceTransactionRequest {
        idempotency_key: "early-fill".into(),
        user_id: user(1),
        transaction_id: tx_id(1),
        to_status: "provider_processing".into(),
        fill_price: "60000.00".into(),
        fill_quantity: "0.00166666".into(),
        ..Default::default()
    };
    assert_invalid_field(&client.advance_transaction(early_fill).await.expect_err("early fill"), "fill_price");
    // A fill without quantity cannot complete: kept as failed, retryable.
    let no_quantity = format!(r#"{{"transaction_id":"{}","price":"60000.00"}}"#, tx_id(1));
    assert_eq!(event(&mut client, "exchange", "fill-0", "provider.succeeded", no_quantity).await.status, "failed");
    let fill = format!(r#"{{"transaction_id":"{}","price":"60000.00","quantity":"0.00166666"}}"#, tx_id(1));
    let filled = event(&mut client, "exchange", "fill-1", "provider.succeeded", fill).await;
    assert_eq!(filled.transaction_status, "completed");
    assert_eq!(balance(&mut server.client, &investing_btc).await.2, "0.00166666");
    assert_eq!(balance(&mut server.client, &investing_usd).await.2, "4898.50");
    let trade = get(&mut client, 1).await;
    assert_eq!((trade.fill_price.as_str(), trade.fill_quantity_minor.as_str()), ("60000", "166666"));
    assert_eq!(trade.details.get("order_type").map(String::as_str), Some("market"));

    let mut stake = initiate(2, 1, pb::Domain::Defi, "start_strategy", "100", "USDC:ethereum");
    stake.protocol = "aave".into();
    stake.details.insert("chain_tx_hash".into(), "0xabc".into());
    client.initiate_transaction(stake).await.expect("stake");
    to_provider(&mut client, 2, 1).await;
    let payload = format!(r#"{{"transaction_id":"{}","block":"19000000"}}"#, tx_id(2));
    assert_eq!(event(&mut client, "chain", "0xabc", "provider.confirming", payload.clone()).await.status, "processed");
    assert_eq!(event(&mut client, "chain", "0xabc-final", "provider.succeeded", payload).await.status, "processed");
    assert_eq!(balance(&mut server.client, &defi_usdc).await.2, "398.500000");
    assert_eq!(system_balance(&pool, "protocol_position:aave", "USDC:ethereum").await, Decimal::new(100, 0));
    assert_eq!(system_balance(&pool, "fee_revenue:network", "USDC:ethereum").await, Decimal::new(15, 1));
    server.stop().await;
    assert_conserved_and_verified(&options, &pool).await;
}

#[sqlx::test]
async fn an_event_for_an_unknown_or_unready_transaction_is_kept_and_a_retry_applies_it(pool: PgPool) {
    let options = prepared(&pool).await;
    let mut server = TestServer::start(options.clone()).await;
    let mut client = TransactionsClient::new(server.channel.clone());
    server.client.open_account(open("open-1", &usd(1))).await.expect("open");
    verified(&mut client, 1).await;
    let payload = format!(r#"{{"metadata":{{"transaction_id":"{}"}}}}"#, tx_id(5));
    let early = event(&mut client, "stripe", "evt_early", "payment_intent.succeeded", payload).await;
    assert_eq!((early.status.as_str(), early.reason.as_str()), ("failed", "unknown transaction"));

    let mut request = initiate(5, 1, pb::Domain::Banking, "add_money", "20.00", "USD");
    request.provider = pb::Provider::Stripe.into();
    client.initiate_transaction(request).await.expect("initiate");
    let retry = pb::RetryProviderEventRequest { source: "stripe".into(), event_id: "evt_early".into() };
    // Known now, but not yet with the provider: still failed, still retryable.
    let unready = client.retry_provider_event(retry.clone()).await.expect("retry").into_inner();
    assert_eq!(unready.status, "failed");
    assert_eq!(get(&mut client, 5).await.status, "initiated");
    to_provider(&mut client, 5, 1).await;
    let applied = client.retry_provider_event(retry.clone()).await.expect("retry").into_inner();
    assert_eq!((applied.status.as_str(), applied.transaction_status.as_str()), ("processed", "completed"));
    assert_eq!(balance(&mut server.client, &usd(1)).await.2, "20.00");
    // A processed event is not retried.
    let again = client.retry_provider_event(retry).await.expect_err("not retryable");
    assert_refused(&again, Code::FailedPrecondition, "PROVIDER_EVENT_NOT_RETRYABLE");
    let missing = client
        .retry_provider_event(pb::RetryProviderEventRequest { source: "stripe".into(), event_id: "nope".into() })
        .await
        .expect_err("missing");
    assert_refused(&missing, Code::NotFound, "PROVIDER_EVENT_NOT_FOUND");
    server.stop().await;
    assert_conserved_and_verified(&options, &pool).await;
}

/// Funds user 1 with 100.00, opens user 2, and initiates transaction 1: user 1 sends 10.00 to
/// user 2. Returns the request, for retries and variants.
async fn send_ten_from_one_to_two(
    server: &mut TestServer,
    client: &mut TransactionsClient<Channel>,
) -> pb::InitiateTransactionRequest {
    funded(&mut server.client, &usd(1), "100.00").await;
    server.client.open_account(open("open-2", &usd(2))).await.expect("open");
    let mut request = initiate(1, 1, pb::Domain::Banking, "send_money", "10.00", "USD");
    request.counterparty_user_id = user(2);
    client.initiate_transaction(request.clone()).await.expect("initiate");
    request
}

#[sqlx::test]
async fn illegal_transitions_and_bad_input_are_refused_and_change_nothing(pool: PgPool) {
    let options = prepared(&pool).await;
    let mut server = TestServer::start(options.clone()).await;
    let mut client = TransactionsClient::new(server.channel.clone());
    let request = send_ten_from_one_to_two(&mut server, &mut client).await;

    let skip = client
        .advance_transaction(pb::AdvanceTransactionRequest {
            idempotency_key: "skip".into(),
            user_id: user(1),
            transaction_id: tx_id(1),
            to_status: "completed".into(),
            ..Default::default()
        })
        .await
        .expect_err("illegal");
    assert_refused(&skip, Code::FailedPrecondition, "ILLEGAL_TRANSITION");
    assert_eq!(get(&mut client, 1).await.status, "initiated");

    // No KYC record: the gate fails the transaction, with its verdict recorded, and reserves nothing.
    advance(&mut client, 1, 1, "validating").await;
    let gated = advance(&mut client, 1, 1, "balance_reserved").await;
    assert_eq!((gated.status.as_str(), gated.aml_status.as_str()), ("failed", "rejected"));
    assert_eq!(balance(&mut server.client, &usd(1)).await, ("100.00".into(), "0.00".into(), "100.00".into()));

    let mut bad_type = request.clone();
    bad_type.idempotency_key = "bad-type".into();
    bad_type.r#type = "teleport".into();
    assert_invalid_field(&client.initiate_transaction(bad_type).await.expect_err("bad type"), "type");
    let mut wrong_domain = request.clone();
    wrong_domain.idempotency_key = "wrong-domain".into();
    wrong_domain.domain = pb::Domain::Defi.into();
    assert_invalid_field(&client.initiate_transaction(wrong_domain).await.expect_err("domain"), "type");
    let mut too_precise = request.clone();
    too_precise.idempotency_key = "precise".into();
    too_precise.amount = "1.001".into();
    assert_invalid_field(&client.initiate_transaction(too_precise).await.expect_err("amount"), "amount");
    let mut duplicate_id = request.clone();
    duplicate_id.idempotency_key = "dup-id".into();
    let status = client.initiate_transaction(duplicate_id).await.expect_err("same id");
    assert_refused(&status, Code::AlreadyExists, "TRANSACTION_ALREADY_EXISTS");
    let status =
        client.get_transaction(pb::GetTransactionRequest { transaction_id: tx_id(99) }).await.expect_err("missing");
    assert_refused(&status, Code::NotFound, "TRANSACTION_NOT_FOUND");
    let oversized = pb::SubmitProviderEventRequest {
        source: "stripe".into(),
        event_id: "big".into(),
        event_type: "payment_intent.succeeded".into(),
        raw_payload: "x".repeat(64 * 1024 + 1),
    };
    assert_invalid_field(&client.submit_provider_event(oversized).await.expect_err("too big"), "raw_payload");
    let page = pb::ListTransactionsRequest { user_id: user(1), page_size: 201, ..Default::default() };
    assert_invalid_field(&client.list_transactions(page).await.expect_err("page"), "page_size");

    // A NUL character, which PostgreSQL stores nowhere, is refused at the edge with its field.
    // Until session 22 it reached the journal, failed the writer's batch and stopped the ledger.
    let mut nul_detail = request.clone();
    nul_detail.idempotency_key = "nul-detail".into();
    nul_detail.transaction_id = tx_id(5);
    nul_detail.details.insert("note".into(), "a\0b".into());
    assert_invalid_field(&client.initiate_transaction(nul_detail).await.expect_err("nul detail"), "details");
    let nul_reason = pb::FailTransactionRequest {
        idempotency_key: "nul-reason".into(),
        user_id: user(1),
        transaction_id: tx_id(1),
        reason: "\0".into(),
    };
    assert_invalid_field(&client.fail_transaction(nul_reason).await.expect_err("nul reason"), "reason");
    let nul_event = pb::SubmitProviderEventRequest {
        source: "stripe".into(),
        event_id: "evt\0".into(),
        event_type: "payment_intent.succeeded".into(),
        raw_payload: "{}".into(),
    };
    assert_invalid_field(&client.submit_provider_event(nul_event).await.expect_err("nul event"), "event_id");
    // A protocol on a transaction that is no DeFi strategy was stored as its provider unchecked.
    let mut protocol_on_send = request.clone();
    protocol_on_send.idempotency_key = "protocol-on-send".into();
    protocol_on_send.transaction_id = tx_id(6);
    protocol_on_send.protocol = "Stripe".into();
    assert_invalid_field(&client.initiate_transaction(protocol_on_send).await.expect_err("protocol"), "protocol");
    // So were the other fields a type has no use for (until session 22).
    let mut provider_on_send = request.clone();
    provider_on_send.idempotency_key = "provider-on-send".into();
    provider_on_send.transaction_id = tx_id(7);
    provider_on_send.provider = pb::Provider::Stripe.into();
    assert_invalid_field(&client.initiate_transaction(provider_on_send).await.expect_err("provider"), "provider");
    let mut target_on_send = request.clone();
    target_on_send.idempotency_key = "target-on-send".into();
    target_on_send.transaction_id = tx_id(8);
    target_on_send.target_asset = "BTC".into();
    assert_invalid_field(&client.initiate_transaction(target_on_send).await.expect_err("target"), "target_asset");
    server.client.deposit(deposit("after-bad-input", &usd(1), "1.00")).await.expect("the ledger carries on");
    server.stop().await;
    assert_conserved_and_verified(&options, &pool).await;
}

/// Found in session 16: the engine forgets a finished transaction after the retention window,
/// and it then took the same transaction id again; the projections hold one transaction per id,
/// so the journal batch failed, the writer stopped, and every request in the batch (and every
/// retry) was refused as UNAVAILABLE. The id is now refused as already existing, and the ledger
/// carries on.
#[sqlx::test]
async fn a_transaction_id_the_engine_forgot_is_refused_as_existing(pool: PgPool) {
    let options = prepared(&pool).await;
    let mut ledger = diboas_ledger::ledger::LedgerConfig::new(options.clone());
    ledger.engine.retention_ms = 1_000;
    let serve = diboas_ledger::api::server::ServeConfig {
        sweep_interval_ms: 50,
        ..diboas_ledger::api::server::ServeConfig::default()
    };
    let mut server = TestServer::start_with_ledger(ledger, serve).await;
    let mut client = TransactionsClient::new(server.channel.clone());
    let request = send_ten_from_one_to_two(&mut server, &mut client).await;
    // No KYC record: the gate fails it, and a failed transaction is finished.
    advance(&mut client, 1, 1, "validating").await;
    assert_eq!(advance(&mut client, 1, 1, "balance_reserved").await.status, "failed");

    // The server sweeps every 50 ms: past the 1 s window the engine has forgotten the
    // transaction and the request's key.
    tokio::time::sleep(std::time::Duration::from_millis(2_500)).await;
    let mut again = request.clone();
    again.idempotency_key = "init-1-again".into();
    let status = client.initiate_transaction(again).await.expect_err("an id used before");
    assert_refused(&status, Code::AlreadyExists, "TRANSACTION_ALREADY_EXISTS");
    let mut next = initiate(2, 1, pb::Domain::Banking, "send_money", "10.00", "USD");
    next.counterparty_user_id = user(2);
    assert_eq!(
        client.initiate_transaction(next).await.expect("a new id").into_inner().transaction.expect("tx").status,
        "initiated"
    );
    assert_eq!(get(&mut client, 1).await.status, "failed");
    server.stop().await;
    assert_conserved_and_verified(&options, &pool).await;
}

#[sqlx::test]
async fn a_restart_keeps_transactions_and_their_reservations(pool: PgPool) {
    let options = prepared(&pool).await;
    let mut server = TestServer::start(options.clone()).await;
    let mut client = TransactionsClient::new(server.channel.clone());
    funded(&mut server.client, &usd(1), "100.00").await;
    server.client.open_account(open("open-2", &usd(2))).await.expect("open");
    verified(&mut client, 1).await;
    let mut request = initiate(1, 1, pb::Domain::Banking, "send_money", "40.00", "USD");
    request.counterparty_user_id = user(2);
    client.initiate_transaction(request).await.expect("initiate");
    to_provider(&mut client, 1, 1).await;
    server.stop().await;

    let mut server = TestServer::start(options.clone()).await;
    let mut client = TransactionsClient::new(server.channel.clone());
    assert_eq!(get(&mut client, 1).await.status, "sent_to_provider");
    assert_eq!(balance(&mut server.client, &usd(1)).await.1, "40.00");
    // The recovered engine knows the transaction: it completes.
    assert_eq!(advance(&mut client, 1, 1, "completed").await.status, "completed");
    assert_eq!(balance(&mut server.client, &usd(2)).await.2, "40.00");
    server.stop().await;
    assert_conserved_and_verified(&options, &pool).await;
}

#[sqlx::test]
async fn a_dispute_after_completion_is_undone_by_reverse_postings(pool: PgPool) {
    let (options, mut server, mut client) = serving_add_money(
        &pool,
        r#"[{"tier":"provider","category":"card_processing","method":"flat","amount_minor":100}]"#,
        &[1],
    )
    .await;
    let mut request = initiate(1, 1, pb::Domain::Banking, "add_money", "50.00", "USD");
    request.provider = pb::Provider::Stripe.into();
    client.initiate_transaction(request).await.expect("initiate");
    to_provider(&mut client, 1, 1).await;
    let payload = format!(r#"{{"metadata":{{"transaction_id":"{}"}}}}"#, tx_id(1));
    event(&mut client, "stripe", "evt_ok", "payment_intent.succeeded", payload.clone()).await;
    assert_eq!(balance(&mut server.client, &usd(1)).await.2, "49.00");

    let dispute = event(&mut client, "stripe", "evt_dispute", "charge.dispute.created", payload).await;
    assert_eq!(dispute.transaction_status, "compensating");
    assert_eq!(advance(&mut client, 1, 1, "compensated").await.status, "compensated");
    assert_eq!(balance(&mut server.client, &usd(1)).await.2, "0.00");
    assert_eq!(system_balance(&pool, "fee_revenue:provider", "USD").await, Decimal::ZERO);
    assert!(get(&mut client, 1).await.fees.iter().all(|fee| fee.status == "reversed"));
    // The completion postings are still in the journal: history was added to, not edited.
    let postings: (i64,) = sqlx::query_as(
        "SELECT count(*) FROM ledger.journal, json_array_elements(record->'effects') e WHERE e->>'effect' = 'posting'",
    )
    .fetch_one(&pool)
    .await
    .expect("postings");
    assert_eq!(postings.0, 4, "two completion postings and their two reverses");
    server.stop().await;
    assert_conserved_and_verified(&options, &pool).await;
}

/// A new transaction while the user has `MAX_UNFINISHED_TRANSACTIONS_PER_USER` unfinished ones is
/// refused with FAILED_PRECONDITION `TOO_MANY_UNFINISHED_TRANSACTIONS`, naming the user and the
/// maximum.
#[sqlx::test]
async fn too_many_unfinished_transactions_are_refused_with_their_reason(pool: PgPool) {
    use diboas_ledger::engine::operation::MAX_UNFINISHED_TRANSACTIONS_PER_USER;
    use futures_util::future::join_all;

    let options = prepared(&pool).await;
    fee_schedule(
        &pool,
        "add_money",
        "USD",
        "2020-01-01T00:00:00Z",
        r#"[{"tier":"platform","category":"service","method":"flat","amount_minor":1}]"#,
    )
    .await;
    let server = TestServer::start(options).await;
    let mut client = TransactionsClient::new(server.channel.clone());
    server.client.clone().open_account(open("open-1", &usd(1))).await.expect("open");
    verified(&mut client, 1).await;
    let add_money = |n: usize| {
        let mut request = initiate(n as u128, 1, pb::Domain::Banking, "add_money", "10.00", "USD");
        request.provider = pb::Provider::Stripe.into();
        request
    };
    // 64 calls at a time: each waits for its journal batch, so one at a time would take long.
    for chunk in (0..MAX_UNFINISHED_TRANSACTIONS_PER_USER).collect::<Vec<_>>().chunks(64) {
        let calls = chunk.iter().map(|&n| {
            let mut client = client.clone();
            async move { client.initiate_transaction(add_money(n)).await }
        });
        for outcome in join_all(calls).await {
            outcome.expect("initiate under the cap");
        }
    }
    let refused = client.initiate_transaction(add_money(MAX_UNFINISHED_TRANSACTIONS_PER_USER)).await.unwrap_err();
    assert_refused(&refused, Code::FailedPrecondition, "TOO_MANY_UNFINISHED_TRANSACTIONS");
    let info = tonic_types::StatusExt::get_details_error_info(&refused).expect("ErrorInfo");
    assert_eq!(info.metadata["max"], MAX_UNFINISHED_TRANSACTIONS_PER_USER.to_string());
    assert_eq!(info.metadata["user_id"], user(1));
}

/// One transaction id initiated for two users at once: one initiation goes through, the other is
/// refused as a duplicate id, and the journal goes on. Until session 23 both passed the id check
/// (neither was durable yet), and the two users' transactions under one id then failed the
/// journal's batch on every later move of either, the ledger reloading each time.
#[sqlx::test]
async fn one_transaction_id_initiated_for_two_users_at_once_is_taken_once(pool: PgPool) {
    let (options, server, mut client) = serving_add_money(
        &pool,
        r#"[{"tier":"platform","category":"service","method":"flat","amount_minor":30}]"#,
        &[1, 2],
    )
    .await;
    for round in 0..5 {
        let n = 10 + round;
        let request = |user_n: u128| pb::InitiateTransactionRequest {
            idempotency_key: format!("init-{n}-user-{user_n}"),
            provider: pb::Provider::Stripe.into(),
            ..initiate(n, user_n, pb::Domain::Banking, "add_money", "100.00", "USD")
        };
        let (mut first, mut second) = (client.clone(), client.clone());
        let (one, two) = tokio::join!(first.initiate_transaction(request(1)), second.initiate_transaction(request(2)));
        let (winner, refused) = match (one, two) {
            (Ok(_), Err(refused)) => (1, refused),
            (Err(refused), Ok(_)) => (2, refused),
            other => panic!("round {round}: exactly one initiation takes the id: {other:?}"),
        };
        assert_refused(&refused, Code::AlreadyExists, "TRANSACTION_ALREADY_EXISTS");
        assert_eq!(advance(&mut client, n, winner, "validating").await.status, "validating");
    }
    server.stop().await;
    assert_conserved_and_verified(&options, &pool).await;
}
