//! Authentication and scopes end to end: bearer tokens, operations and domains, for unary RPCs,
//! batches (independent and linked) and reads; every refusal has the right code and reason and
//! changes nothing; the journal records which service asked.

mod grpc_common;

use diboas_ledger::api::auth::{self, AUTHORIZATION, Authenticator, CallerEntry, CallersFile};
use diboas_ledger::api::pb;
use diboas_ledger::api::pb::transactions_client::TransactionsClient;
use diboas_ledger::api::server::{ServeConfig, ServeOptions};
use diboas_ledger::ledger::LedgerConfig;
use grpc_common::*;
use sqlx::PgPool;
use tonic::Code;
use tonic::transport::Channel;

struct Tokens {
    /// Everything, every domain: sets the scene.
    admin: String,
    /// Banking money-in only.
    payments: String,
    /// Every operation, investing only.
    trading: String,
}

fn entry(service: &str, operations: &[&str], domains: &[&str]) -> (String, CallerEntry) {
    auth::new_token(
        service,
        operations.iter().map(|name| (*name).to_owned()).collect(),
        domains.iter().map(|name| (*name).to_owned()).collect(),
    )
}

async fn server_with_tokens(pool: &PgPool) -> (TestServer, Tokens) {
    let (admin, admin_entry) = entry("admin", &["*"], &["*"]);
    let (payments, payments_entry) = entry(
        "payments",
        &[
            "OpenAccount",
            "Deposit",
            "GetBalance",
            "ListBalances",
            "GetUserSummary",
            "SubmitBatch",
            "SubmitProviderEvent",
        ],
        &["banking"],
    );
    let (trading, trading_entry) = entry("trading", &["*"], &["investing"]);
    let authenticator =
        Authenticator::from_callers(&CallersFile { callers: vec![admin_entry, payments_entry, trading_entry] })
            .expect("a valid callers file");
    let options = ServeOptions { authenticator, ..ServeOptions::development(ServeConfig::default()) };
    let server = TestServer::start_with_options(LedgerConfig::new(prepared(pool).await), options).await;
    (server, Tokens { admin, payments, trading })
}

fn with_token<T>(body: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(body);
    request.metadata_mut().insert(AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
    request
}

async fn balance_as(server: &TestServer, token: &str, account: &pb::UserAccount) -> String {
    let mut client = server.client.clone();
    let response = client
        .get_balance(with_token(pb::GetBalanceRequest { account: Some(account.clone()) }, token))
        .await
        .expect("balance");
    response.into_inner().balance.expect("a balance").total
}

#[sqlx::test]
async fn missing_malformed_and_unknown_tokens_are_unauthenticated(pool: PgPool) {
    let (server, tokens) = server_with_tokens(&pool).await;
    let mut client = server.client.clone();
    let alice = usd(1);

    let missing = client.open_account(open("open", &alice)).await.unwrap_err();
    assert_refused(&missing, Code::Unauthenticated, "MISSING_TOKEN");
    let unknown = client.open_account(with_token(open("open", &alice), "not-a-token")).await.unwrap_err();
    assert_refused(&unknown, Code::Unauthenticated, "UNKNOWN_TOKEN");
    let mut basic = tonic::Request::new(open("open", &alice));
    basic.metadata_mut().insert(AUTHORIZATION, "Basic dXNlcjpwYXNz".parse().unwrap());
    assert_refused(&client.open_account(basic).await.unwrap_err(), Code::Unauthenticated, "MALFORMED_TOKEN");
    // Reads are guarded too.
    let read = client.get_balance(pb::GetBalanceRequest { account: Some(alice.clone()) }).await.unwrap_err();
    assert_refused(&read, Code::Unauthenticated, "MISSING_TOKEN");

    // Nothing was opened: the same key now opens the account for the first time.
    let opened = client.open_account(with_token(open("open", &alice), &tokens.admin)).await.unwrap().into_inner();
    assert!(!opened.replayed);
    server.stop().await;
}

#[sqlx::test]
async fn operations_and_domains_outside_the_scopes_are_permission_denied(pool: PgPool) {
    let (server, tokens) = server_with_tokens(&pool).await;
    let mut client = server.client.clone();
    let alice = usd(1);
    let alice_btc = account(1, pb::Domain::Investing, "BTC");
    client.open_account(with_token(open("open-alice", &alice), &tokens.payments)).await.unwrap();
    client.deposit(with_token(deposit("fund-alice", &alice, "100.00"), &tokens.payments)).await.unwrap();
    client.open_account(with_token(open("open-btc", &alice_btc), &tokens.trading)).await.unwrap();

    // payments may not withdraw at all...
    let withdraw = pb::WithdrawRequest {
        idempotency_key: "wd".into(),
        operation: Some(pb::Withdraw {
            account: Some(alice.clone()),
            amount: "1.00".into(),
            provider: pb::Provider::Stripe.into(),
        }),
    };
    let denied = client.withdraw(with_token(withdraw, &tokens.payments)).await.unwrap_err();
    assert_refused(&denied, Code::PermissionDenied, "OPERATION_NOT_ALLOWED");
    // ...nor touch the investing domain, even with an operation it may use...
    let denied =
        client.deposit(with_token(deposit("fund-btc", &alice_btc, "1.0"), &tokens.payments)).await.unwrap_err();
    assert_refused(&denied, Code::PermissionDenied, "DOMAIN_NOT_ALLOWED");
    // ...and trading may not reach into banking.
    let denied = client.deposit(with_token(deposit("fund-usd", &alice, "1.00"), &tokens.trading)).await.unwrap_err();
    assert_refused(&denied, Code::PermissionDenied, "DOMAIN_NOT_ALLOWED");
    let denied = client
        .get_balance(with_token(pb::GetBalanceRequest { account: Some(alice.clone()) }, &tokens.trading))
        .await
        .unwrap_err();
    assert_refused(&denied, Code::PermissionDenied, "DOMAIN_NOT_ALLOWED");

    // Commit and release name only a reservation: its account's domain is checked.
    client
        .reserve(with_token(
            pb::ReserveRequest {
                idempotency_key: "hold".into(),
                operation: Some(pb::Reserve {
                    reservation_id: uuid::Uuid::from_u128(7).to_string(),
                    account: Some(alice.clone()),
                    amount: "10.00".into(),
                    ttl_ms: None,
                }),
            },
            &tokens.admin,
        ))
        .await
        .unwrap();
    let release = pb::ReleaseRequest {
        idempotency_key: "release".into(),
        operation: Some(pb::Release {
            user_id: alice.user_id.clone(),
            reservation_id: uuid::Uuid::from_u128(7).to_string(),
        }),
    };
    let denied = client.release(with_token(release.clone(), &tokens.trading)).await.unwrap_err();
    assert_refused(&denied, Code::PermissionDenied, "DOMAIN_NOT_ALLOWED");

    // Nothing the refusals asked for happened.
    assert_eq!(balance_as(&server, &tokens.admin, &alice).await, "100.00");
    assert_eq!(balance_as(&server, &tokens.admin, &alice_btc).await, "0.00000000");
    let listed = client
        .list_balances(with_token(pb::ListBalancesRequest { user_id: alice.user_id.clone() }, &tokens.admin))
        .await
        .unwrap()
        .into_inner();
    let reserved: Vec<&str> = listed.balances.iter().map(|balance| balance.reserved.as_str()).collect();
    assert!(reserved.contains(&"10.00"), "the reservation is still held: {reserved:?}");
    // The key the refused release used is still free.
    let released = client.release(with_token(release, &tokens.admin)).await.unwrap().into_inner();
    assert!(!released.replayed);
    server.stop().await;
}

#[sqlx::test]
async fn reads_show_only_the_domains_in_scope(pool: PgPool) {
    let (server, tokens) = server_with_tokens(&pool).await;
    let mut client = server.client.clone();
    let alice = usd(1);
    let alice_btc = account(1, pb::Domain::Investing, "BTC");
    client.open_account(with_token(open("open-usd", &alice), &tokens.admin)).await.unwrap();
    client.open_account(with_token(open("open-btc", &alice_btc), &tokens.admin)).await.unwrap();

    let list = |token: &str| with_token(pb::ListBalancesRequest { user_id: alice.user_id.clone() }, token);
    let all = client.list_balances(list(&tokens.admin)).await.unwrap().into_inner().balances;
    let banking = client.list_balances(list(&tokens.payments)).await.unwrap().into_inner().balances;
    let investing = client.list_balances(list(&tokens.trading)).await.unwrap().into_inner().balances;
    assert_eq!(all.len(), 2);
    assert_eq!(banking.len(), 1);
    assert_eq!(banking[0].account.as_ref().unwrap().asset, "USD");
    assert_eq!(investing.len(), 1);
    assert_eq!(investing[0].account.as_ref().unwrap().asset, "BTC");
    server.stop().await;
}

#[sqlx::test]
async fn batches_are_checked_entry_by_entry_and_linked_groups_as_a_whole(pool: PgPool) {
    let (server, tokens) = server_with_tokens(&pool).await;
    let mut client = server.client.clone();
    let alice = usd(1);
    let bob = usd(2);
    let alice_btc = account(1, pb::Domain::Investing, "BTC");
    for (key, account) in [("open-a", &alice), ("open-b", &bob), ("open-btc", &alice_btc)] {
        client.open_account(with_token(open(key, account), &tokens.admin)).await.unwrap();
    }
    let single = |key: &str, kind: pb::operation::Kind| pb::BatchEntry {
        idempotency_key: key.into(),
        kind: Some(pb::batch_entry::Kind::Single(pb::Operation { kind: Some(kind) })),
    };
    let batch = pb::SubmitBatchRequest {
        entries: vec![
            single("ok", pb::operation::Kind::Deposit(deposit_body(&alice, "5.00"))),
            single("wrong-domain", pb::operation::Kind::Deposit(deposit_body(&alice_btc, "1.0"))),
            single("wrong-operation", pb::operation::Kind::Transfer(transfer_body(&alice, &bob, "1.00"))),
            pb::BatchEntry {
                idempotency_key: "linked".into(),
                kind: Some(pb::batch_entry::Kind::Linked(pb::LinkedGroup {
                    operations: vec![
                        pb::Operation { kind: Some(pb::operation::Kind::Deposit(deposit_body(&bob, "3.00"))) },
                        pb::Operation {
                            kind: Some(pb::operation::Kind::Transfer(transfer_body(&bob, &alice, "1.00"))),
                        },
                    ],
                })),
            },
        ],
    };
    let results = client.submit_batch(with_token(batch, &tokens.payments)).await.unwrap().into_inner().results;
    assert!(matches!(results[0].result, Some(pb::batch_result::Result::Receipt(_))));
    let reason = |index: usize| match &results[index].result {
        Some(pb::batch_result::Result::Error(status)) => {
            assert_eq!(status.code, Code::PermissionDenied as i32);
            tonic_types::RpcStatusExt::get_details_error_info(status).expect("ErrorInfo").reason
        }
        other => panic!("entry {index}: expected a refusal, got {other:?}"),
    };
    assert_eq!(reason(1), "DOMAIN_NOT_ALLOWED");
    assert_eq!(reason(2), "OPERATION_NOT_ALLOWED");
    assert_eq!(reason(3), "OPERATION_NOT_ALLOWED", "one forbidden member refuses the whole linked group");
    assert_eq!(balance_as(&server, &tokens.admin, &alice).await, "5.00");
    assert_eq!(balance_as(&server, &tokens.admin, &bob).await, "0.00", "the linked deposit did not happen");
    assert_eq!(balance_as(&server, &tokens.admin, &alice_btc).await, "0.00000000");
    server.stop().await;
}

#[sqlx::test]
async fn the_journal_records_which_service_asked(pool: PgPool) {
    let (server, tokens) = server_with_tokens(&pool).await;
    let mut client = server.client.clone();
    client.open_account(with_token(open("open", &usd(1)), &tokens.payments)).await.unwrap();
    client
        .open_account(with_token(open("open-btc", &account(1, pb::Domain::Investing, "BTC")), &tokens.trading))
        .await
        .unwrap();
    server.stop().await;
    let callers: Vec<Option<String>> = sqlx::query_scalar(
        "SELECT record -> 'origin' -> 'data' -> 'context' ->> 'caller' FROM ledger.journal ORDER BY sequence",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(callers, [Some("payments".to_owned()), Some("trading".to_owned())]);
}

/// User 1's investing USD and BTC accounts, and a buy of BTC, transaction 2, initiated by the
/// admin; with a Transactions client.
async fn investing_buy(server: &TestServer, tokens: &Tokens) -> TransactionsClient<Channel> {
    let mut ledger = server.client.clone();
    for (key, asset) in [("open-inv-usd", "USD"), ("open-inv-btc", "BTC")] {
        let account = account(1, pb::Domain::Investing, asset);
        ledger.open_account(with_token(open(key, &account), &tokens.admin)).await.unwrap();
    }
    let buy = pb::InitiateTransactionRequest {
        idempotency_key: "init-2".into(),
        transaction_id: tx_id(2),
        domain: pb::Domain::Investing.into(),
        r#type: "buy_crypto".into(),
        target_asset: "BTC".into(),
        provider: pb::Provider::Unspecified.into(),
        ..add_money(1, 1)
    };
    let mut transactions = TransactionsClient::new(server.channel.clone());
    transactions.initiate_transaction(with_token(buy, &tokens.admin)).await.unwrap();
    transactions
}

/// The Transactions service's reads are scoped like the Ledger's: a caller sees, lists and reads
/// the history of transactions in its domains only (until session 22 it read every domain's).
#[sqlx::test]
async fn transaction_reads_show_only_the_domains_in_scope(pool: PgPool) {
    let (server, tokens) = server_with_tokens(&pool).await;
    let mut transactions = investing_buy(&server, &tokens).await;
    let mut ledger = server.client.clone();
    ledger.open_account(with_token(open("open-usd", &usd(1)), &tokens.admin)).await.unwrap();
    transactions.initiate_transaction(with_token(add_money(1, 1), &tokens.admin)).await.unwrap();

    let get = |n: u128, token: &str| with_token(pb::GetTransactionRequest { transaction_id: tx_id(n) }, token);
    let denied = transactions.get_transaction(get(1, &tokens.trading)).await.unwrap_err();
    assert_refused(&denied, Code::PermissionDenied, "DOMAIN_NOT_ALLOWED");
    let seen = transactions.get_transaction(get(2, &tokens.trading)).await.unwrap().into_inner();
    assert_eq!(seen.transaction.unwrap().domain, i32::from(pb::Domain::Investing));

    let history = with_token(pb::GetTransactionHistoryRequest { transaction_id: tx_id(1) }, &tokens.trading);
    let denied = transactions.get_transaction_history(history).await.unwrap_err();
    assert_refused(&denied, Code::PermissionDenied, "DOMAIN_NOT_ALLOWED");

    let list = |domain: pb::Domain, token: &str| {
        with_token(pb::ListTransactionsRequest { user_id: user(1), domain: domain.into(), ..Default::default() }, token)
    };
    let ids = |response: pb::ListTransactionsResponse| {
        response.transactions.into_iter().map(|transaction| transaction.transaction_id).collect::<Vec<_>>()
    };
    let everything = transactions.list_transactions(list(pb::Domain::Unspecified, &tokens.admin)).await.unwrap();
    assert_eq!(ids(everything.into_inner()).len(), 2);
    let visible = transactions.list_transactions(list(pb::Domain::Unspecified, &tokens.trading)).await.unwrap();
    assert_eq!(ids(visible.into_inner()), [tx_id(2)]);
    let denied = transactions.list_transactions(list(pb::Domain::Banking, &tokens.trading)).await.unwrap_err();
    assert_refused(&denied, Code::PermissionDenied, "DOMAIN_NOT_ALLOWED");

    // Initiating in a domain outside the scopes is refused as that, before the id is looked
    // at: until session 23 an id already taken (here by user 1, asked for user 2) answered
    // TRANSACTION_ALREADY_EXISTS first.
    let taken_id = pb::InitiateTransactionRequest { idempotency_key: "init-1-again".into(), ..add_money(1, 2) };
    let denied = transactions.initiate_transaction(with_token(taken_id, &tokens.trading)).await.unwrap_err();
    assert_refused(&denied, Code::PermissionDenied, "DOMAIN_NOT_ALLOWED");
    server.stop().await;
}

/// A provider event naming a transaction outside the caller's domains is refused before it is
/// stored or answered. Stored first (until session 23), it stayed pending under the refusal, so
/// the rightful sender's redelivery was answered as a duplicate and never applied; and an event
/// the transaction had moved past was answered with the transaction's status.
#[sqlx::test]
async fn provider_events_for_another_domain_are_refused_before_they_are_stored(pool: PgPool) {
    let (server, tokens) = server_with_tokens(&pool).await;
    let mut transactions = investing_buy(&server, &tokens).await;

    let event = |event_id: &str, event_type: &str| pb::SubmitProviderEventRequest {
        source: "rails".into(),
        event_id: event_id.into(),
        event_type: event_type.into(),
        raw_payload: format!(r#"{{"transaction_id":"{}"}}"#, tx_id(2)),
    };
    for (event_id, event_type) in [("e-1", "provider.processing"), ("e-2", "transaction_updated.completed")] {
        let denied = transactions
            .submit_provider_event(with_token(event(event_id, event_type), &tokens.payments))
            .await
            .unwrap_err();
        assert_refused(&denied, Code::PermissionDenied, "DOMAIN_NOT_ALLOWED");
    }
    let (stored,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM ledger.provider_events").fetch_one(&pool).await.unwrap();
    assert_eq!(stored, 0, "a refused event is not stored");
    let applied = transactions
        .submit_provider_event(with_token(event("e-1", "provider.processing"), &tokens.trading))
        .await
        .unwrap()
        .into_inner();
    // The rightful sender's event is new, not a duplicate of the refused one (the transaction is
    // not yet with its provider, so the event waits as failed, to be retried).
    assert_eq!((applied.duplicate, applied.transaction_id.as_str()), (false, tx_id(2).as_str()));
    server.stop().await;
}
