//! The gRPC server end to end, against a real PostgreSQL: every RPC, the error codes and their
//! reasons, idempotent retries, batch semantics, restart persistence, health, reflection and
//! correlation ids.

mod grpc_common;

use diboas_ledger::api::correlation::HEADER;
use diboas_ledger::api::pb;
use diboas_ledger::api::server::ServeConfig;
use grpc_common::*;
use sqlx::PgPool;
use tonic::Code;
use tonic_types::{RpcStatusExt, StatusExt};

fn receipt_kind(response: &pb::MutationResponse) -> &pb::receipt::Kind {
    response.receipt.as_ref().and_then(|receipt| receipt.kind.as_ref()).expect("a receipt")
}

#[sqlx::test]
async fn every_rpc_succeeds(pool: PgPool) {
    let server = TestServer::start(prepared(&pool).await).await;
    let mut client = server.client.clone();
    let alice = usd(1);
    let bob = usd(2);
    let alice_btc = account(1, pb::Domain::Investing, "BTC");
    let alice_usd_investing = account(1, pb::Domain::Investing, "USD");

    let opened = client
        .open_account(pb::OpenAccountRequest {
            idempotency_key: "open-alice".into(),
            operation: Some(pb::OpenAccount {
                account: Some(alice.clone()),
                overdraft: "5.00".into(),
                limits: Some(pb::OutflowLimits { daily: Some("1000.00".into()), ..Default::default() }),
                frozen: false,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(receipt_kind(&opened), pb::receipt::Kind::Done(_)));
    assert!(!opened.replayed && opened.sequence > 0);
    for (key, account) in [("open-bob", &bob), ("open-alice-btc", &alice_btc), ("open-alice-inv", &alice_usd_investing)]
    {
        client.open_account(open(key, account)).await.unwrap();
    }
    client.deposit(deposit("dep-1", &alice, "100.00")).await.unwrap();
    client.deposit(deposit("dep-2", &alice_usd_investing, "200.00")).await.unwrap();
    client
        .withdraw(pb::WithdrawRequest {
            idempotency_key: "wd-1".into(),
            operation: Some(pb::Withdraw {
                account: Some(alice.clone()),
                amount: "10.50".into(),
                provider: pb::Provider::Ramp.into(),
            }),
        })
        .await
        .unwrap();
    client.transfer(transfer("tr-1", &alice, &bob, "20.00")).await.unwrap();
    assert_eq!(balance(&mut client, &alice).await, ("69.50".into(), "0.00".into(), "69.50".into()));
    assert_eq!(balance(&mut client, &bob).await, ("20.00".into(), "0.00".into(), "20.00".into()));

    let reservation = "0b0b0b0b-0000-4000-8000-000000000001";
    let reserved = client
        .reserve(pb::ReserveRequest {
            idempotency_key: "res-1".into(),
            operation: Some(pb::Reserve {
                reservation_id: reservation.into(),
                account: Some(alice.clone()),
                amount: "30.00".into(),
                ttl_ms: Some(60_000),
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(receipt_kind(&reserved), pb::receipt::Kind::Reserved(r) if r.expires_at_ms > 0));
    assert_eq!(balance(&mut client, &alice).await, ("39.50".into(), "30.00".into(), "69.50".into()));
    let committed = client
        .commit(pb::CommitRequest {
            idempotency_key: "com-1".into(),
            operation: Some(pb::Commit {
                user_id: alice.user_id.clone(),
                reservation_id: reservation.into(),
                destination: Some(user_ref(&bob)),
                amount: Some("12.00".into()),
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        receipt_kind(&committed),
        &pb::receipt::Kind::Committed(pb::receipt::Committed {
            committed_minor: "1200".into(),
            released_minor: "1800".into()
        })
    );
    let second = "0b0b0b0b-0000-4000-8000-000000000002";
    client
        .reserve(pb::ReserveRequest {
            idempotency_key: "res-2".into(),
            operation: Some(pb::Reserve {
                reservation_id: second.into(),
                account: Some(alice.clone()),
                amount: "5.00".into(),
                ttl_ms: None,
            }),
        })
        .await
        .unwrap();
    let released = client
        .release(pb::ReleaseRequest {
            idempotency_key: "rel-2".into(),
            operation: Some(pb::Release { user_id: alice.user_id.clone(), reservation_id: second.into() }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        receipt_kind(&released),
        &pb::receipt::Kind::Released(pb::receipt::Released { released_minor: "500".into() })
    );
    assert_eq!(balance(&mut client, &alice).await, ("57.50".into(), "0.00".into(), "57.50".into()));
    assert_eq!(balance(&mut client, &bob).await, ("32.00".into(), "0.00".into(), "32.00".into()));

    // 100 USD at 0.00001 BTC per USD is 0.001 BTC (100 000 satoshis), 1% of it commission.
    let converted = client
        .convert(pb::ConvertRequest {
            idempotency_key: "conv-1".into(),
            operation: Some(pb::Convert {
                from: Some(alice_usd_investing.clone()),
                to: Some(alice_btc.clone()),
                amount: "100.00".into(),
                price: "0.00001".into(),
                commission_bps: 100,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let pb::receipt::Kind::Converted(conversion) = receipt_kind(&converted) else { panic!("{converted:?}") };
    assert_eq!(conversion.sold_minor, "10000");
    assert_eq!(conversion.bought_minor, "99000");
    assert_eq!(conversion.commission_minor, "1000");
    assert_eq!(balance(&mut client, &alice_btc).await, ("0.00099000".into(), "0.00000000".into(), "0.00099000".into()));

    client
        .set_frozen(pb::SetFrozenRequest {
            idempotency_key: "freeze-bob".into(),
            operation: Some(pb::SetFrozen { account: Some(bob.clone()), frozen: true }),
        })
        .await
        .unwrap();
    let bob_balance = client
        .get_balance(pb::GetBalanceRequest { account: Some(bob.clone()) })
        .await
        .unwrap()
        .into_inner()
        .balance
        .unwrap();
    assert!(bob_balance.frozen);

    let listed = client.list_balances(pb::ListBalancesRequest { user_id: alice.user_id.clone() }).await.unwrap();
    let mut listed: Vec<(String, String)> = listed
        .into_inner()
        .balances
        .into_iter()
        .map(|balance| (balance.account.unwrap().asset, balance.total))
        .collect();
    listed.sort();
    assert_eq!(
        listed,
        [("BTC".into(), "0.00099000".into()), ("USD".into(), "100.00".into()), ("USD".into(), "57.50".into())]
    );

    let summary = client.get_user_summary(pb::GetUserSummaryRequest { user_id: alice.user_id.clone() }).await.unwrap();
    let summary = summary.into_inner();
    let usd_total = summary.by_asset.iter().find(|totals| totals.asset == "USD").unwrap();
    assert_eq!(usd_total.total, "157.50");
    assert_eq!(summary.by_domain.len(), 2);
    assert_eq!(summary.by_chain.len(), 1);
    assert_eq!(summary.by_chain[0].chain, i32::from(pb::Chain::Bitcoin));
    assert_eq!(summary.by_chain[0].assets[0].total, "0.00099000");

    let batch = client
        .submit_batch(pb::SubmitBatchRequest {
            entries: vec![pb::BatchEntry {
                idempotency_key: "batch-1".into(),
                kind: Some(pb::batch_entry::Kind::Single(pb::Operation {
                    kind: Some(pb::operation::Kind::Deposit(deposit_body(&alice, "0.50"))),
                })),
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(batch.results[0].result, Some(pb::batch_result::Result::Receipt(_))));
    assert_eq!(balance(&mut client, &alice).await.0, "58.00");
    server.stop().await;
}

#[sqlx::test]
async fn refusals_carry_their_code_and_reason(pool: PgPool) {
    // The sweep's first tick runs at start; an hour-long interval keeps it away from the expiry case.
    let config = ServeConfig { sweep_interval_ms: 3_600_000, ..ServeConfig::default() };
    let server = TestServer::start_with(prepared(&pool).await, config).await;
    let mut client = server.client.clone();
    let alice = usd(1);
    let bob = usd(2);
    let alice_btc = account(1, pb::Domain::Investing, "BTC");
    funded(&mut client, &alice, "100.00").await;
    funded(&mut client, &bob, "1.00").await;
    client.open_account(open("open-alice-btc", &alice_btc)).await.unwrap();

    let unknown = client.get_balance(pb::GetBalanceRequest { account: Some(usd(9)) }).await.unwrap_err();
    assert_refused(&unknown, Code::NotFound, "ACCOUNT_NOT_FOUND");
    let again = client.open_account(open("open-alice-again", &alice)).await.unwrap_err();
    assert_refused(&again, Code::AlreadyExists, "ACCOUNT_ALREADY_EXISTS");

    let too_much = client.transfer(transfer("too-much", &alice, &bob, "150.00")).await.unwrap_err();
    assert_refused(&too_much, Code::FailedPrecondition, "INSUFFICIENT_FUNDS");
    let info = too_much.get_details_error_info().unwrap();
    assert_eq!(info.metadata["available_minor"], "10000");
    assert_eq!(info.metadata["requested_minor"], "15000");
    assert!(info.metadata["account"].contains(&alice.user_id));

    let mismatch = client.transfer(transfer("mismatch", &alice, &alice_btc, "1.00")).await.unwrap_err();
    assert_refused(&mismatch, Code::InvalidArgument, "ASSET_MISMATCH");
    let same = client.transfer(transfer("same", &alice, &alice, "1.00")).await.unwrap_err();
    assert_refused(&same, Code::InvalidArgument, "SAME_ACCOUNT");
    let reused = client.transfer(transfer("same", &alice, &bob, "1.00")).await.unwrap_err();
    assert_refused(&reused, Code::AlreadyExists, "IDEMPOTENCY_KEY_REUSED");

    let limited = usd(3);
    client
        .open_account(pb::OpenAccountRequest {
            idempotency_key: "open-limited".into(),
            operation: Some(pb::OpenAccount {
                account: Some(limited.clone()),
                limits: Some(pb::OutflowLimits { per_transaction: Some("10.00".into()), ..Default::default() }),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    client.deposit(deposit("fund-limited", &limited, "50.00")).await.unwrap();
    let over_limit = client.transfer(transfer("over-limit", &limited, &bob, "20.00")).await.unwrap_err();
    assert_refused(&over_limit, Code::FailedPrecondition, "OUTFLOW_LIMIT_EXCEEDED");
    assert_eq!(over_limit.get_details_error_info().unwrap().metadata["limit"], "per_transaction");

    client
        .set_frozen(pb::SetFrozenRequest {
            idempotency_key: "freeze-bob".into(),
            operation: Some(pb::SetFrozen { account: Some(bob.clone()), frozen: true }),
        })
        .await
        .unwrap();
    let frozen = client.transfer(transfer("from-frozen", &bob, &alice, "1.00")).await.unwrap_err();
    assert_refused(&frozen, Code::FailedPrecondition, "ACCOUNT_FROZEN");

    let reserve = |key: &str, id: &str, amount: &str, ttl_ms: Option<i64>| pb::ReserveRequest {
        idempotency_key: key.into(),
        operation: Some(pb::Reserve {
            reservation_id: id.into(),
            account: Some(alice.clone()),
            amount: amount.into(),
            ttl_ms,
        }),
    };
    let commit = |key: &str, id: &str, amount: Option<&str>| pb::CommitRequest {
        idempotency_key: key.into(),
        operation: Some(pb::Commit {
            user_id: alice.user_id.clone(),
            reservation_id: id.into(),
            destination: Some(user_ref(&bob)),
            amount: amount.map(str::to_string),
        }),
    };
    let release = |key: &str, id: &str| pb::ReleaseRequest {
        idempotency_key: key.into(),
        operation: Some(pb::Release { user_id: alice.user_id.clone(), reservation_id: id.into() }),
    };
    let first = "0b0b0b0b-0000-4000-8000-000000000001";
    let missing = client.commit(commit("commit-missing", first, None)).await.unwrap_err();
    assert_refused(&missing, Code::NotFound, "RESERVATION_NOT_FOUND");
    client.reserve(reserve("res-1", first, "10.00", None)).await.unwrap();
    let duplicate = client.reserve(reserve("res-1-again", first, "10.00", None)).await.unwrap_err();
    assert_refused(&duplicate, Code::AlreadyExists, "RESERVATION_ALREADY_EXISTS");
    let exceeds = client.commit(commit("commit-exceeds", first, Some("10.01"))).await.unwrap_err();
    assert_refused(&exceeds, Code::FailedPrecondition, "COMMIT_EXCEEDS_RESERVATION");
    client.release(release("rel-1", first)).await.unwrap();
    let not_active = client.release(release("rel-1-again", first)).await.unwrap_err();
    assert_refused(&not_active, Code::FailedPrecondition, "RESERVATION_NOT_ACTIVE");

    let short = "0b0b0b0b-0000-4000-8000-000000000002";
    client.reserve(reserve("res-short", short, "1.00", Some(1))).await.unwrap();
    // Wait past the 1 ms lifetime (not a timing assertion: any longer wait gives the same answer).
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let expired = client.commit(commit("commit-expired", short, None)).await.unwrap_err();
    assert_refused(&expired, Code::FailedPrecondition, "RESERVATION_EXPIRED");

    let tiny = client
        .convert(pb::ConvertRequest {
            idempotency_key: "tiny".into(),
            operation: Some(pb::Convert {
                from: Some(account(1, pb::Domain::Investing, "BTC")),
                to: Some(account(1, pb::Domain::Investing, "USD")),
                amount: "0.00000001".into(),
                price: "0.0001".into(),
                commission_bps: 0,
            }),
        })
        .await
        .unwrap_err();
    // One satoshi at 0.0001 USD per BTC is far below a cent.
    assert_refused(&tiny, Code::InvalidArgument, "CONVERSION_TOO_SMALL");
    server.stop().await;
}

#[sqlx::test]
async fn a_full_idempotency_store_refuses_with_resource_exhausted(pool: PgPool) {
    let options = prepared(&pool).await;
    let mut config = diboas_ledger::ledger::LedgerConfig::new(options);
    config.engine.shard_count = 1;
    config.engine.idempotency_capacity_per_shard = 2;
    let server = TestServer::start_with_ledger(config, ServeConfig::default()).await;
    let mut client = server.client.clone();
    let alice = usd(1);
    funded(&mut client, &alice, "1.00").await;
    let full = client.deposit(deposit("third-key", &alice, "1.00")).await.unwrap_err();
    assert_refused(&full, Code::ResourceExhausted, "IDEMPOTENCY_STORE_FULL");
    server.stop().await;
}

#[sqlx::test]
async fn an_idempotent_retry_returns_the_first_outcome(pool: PgPool) {
    let server = TestServer::start(prepared(&pool).await).await;
    let mut client = server.client.clone();
    let alice = usd(1);
    let bob = usd(2);
    funded(&mut client, &alice, "10.00").await;
    client.open_account(open("open-bob", &bob)).await.unwrap();

    let first = client.transfer(transfer("pay-1", &alice, &bob, "4.00")).await.unwrap().into_inner();
    let retry = client.transfer(transfer("pay-1", &alice, &bob, "4.00")).await.unwrap().into_inner();
    assert_eq!(retry.receipt, first.receipt);
    assert_eq!(retry.sequence, first.sequence);
    assert!(!first.replayed && retry.replayed);
    assert_eq!(balance(&mut client, &bob).await.0, "4.00");

    // A refusal is an outcome too: the retry gets it back even once the transfer could succeed.
    let refused = client.transfer(transfer("pay-2", &bob, &alice, "5.00")).await.unwrap_err();
    assert_refused(&refused, Code::FailedPrecondition, "INSUFFICIENT_FUNDS");
    client.deposit(deposit("top-up", &bob, "10.00")).await.unwrap();
    let refused_again = client.transfer(transfer("pay-2", &bob, &alice, "5.00")).await.unwrap_err();
    assert_refused(&refused_again, Code::FailedPrecondition, "INSUFFICIENT_FUNDS");
    assert_eq!(refused_again.message(), refused.message());
    assert_eq!(balance(&mut client, &bob).await.0, "14.00");
    server.stop().await;
}

fn single(operation: pb::operation::Kind) -> Option<pb::batch_entry::Kind> {
    Some(pb::batch_entry::Kind::Single(pb::Operation { kind: Some(operation) }))
}

fn linked(operations: Vec<pb::operation::Kind>) -> Option<pb::batch_entry::Kind> {
    Some(pb::batch_entry::Kind::Linked(pb::LinkedGroup {
        operations: operations.into_iter().map(|kind| pb::Operation { kind: Some(kind) }).collect(),
    }))
}

fn entry(key: &str, kind: Option<pb::batch_entry::Kind>) -> pb::BatchEntry {
    pb::BatchEntry { idempotency_key: key.into(), kind }
}

#[sqlx::test]
async fn batch_entries_are_independent_and_linked_groups_all_or_nothing(pool: PgPool) {
    let server = TestServer::start(prepared(&pool).await).await;
    let mut client = server.client.clone();
    let alice = usd(1);
    let bob = usd(2);
    funded(&mut client, &alice, "100.00").await;
    client.open_account(open("open-bob", &bob)).await.unwrap();

    let request = pb::SubmitBatchRequest {
        entries: vec![
            entry("b-deposit", single(pb::operation::Kind::Deposit(deposit_body(&alice, "1.00")))),
            entry("b-too-much", single(pb::operation::Kind::Transfer(transfer_body(&alice, &bob, "500.00")))),
            entry(
                "b-linked-fails",
                linked(vec![
                    pb::operation::Kind::Transfer(transfer_body(&alice, &bob, "10.00")),
                    pb::operation::Kind::Transfer(transfer_body(&bob, &alice, "50.00")),
                ]),
            ),
            entry("b-bad-amount", single(pb::operation::Kind::Deposit(deposit_body(&alice, "1.001")))),
            entry(
                "b-linked-ok",
                linked(vec![
                    pb::operation::Kind::Transfer(transfer_body(&alice, &bob, "30.00")),
                    pb::operation::Kind::Transfer(transfer_body(&bob, &alice, "5.00")),
                ]),
            ),
        ],
    };
    let response = client.submit_batch(request.clone()).await.unwrap().into_inner();
    assert_eq!(response.results.len(), 5);
    let error = |index: usize| match &response.results[index].result {
        Some(pb::batch_result::Result::Error(status)) => status.clone(),
        other => panic!("entry {index}: {other:?}"),
    };
    assert!(matches!(response.results[0].result, Some(pb::batch_result::Result::Receipt(_))));
    let too_much = error(1);
    assert_eq!(too_much.code, Code::FailedPrecondition as i32);
    assert_eq!(too_much.get_details_error_info().unwrap().reason, "INSUFFICIENT_FUNDS");
    let linked_failure = error(2);
    let info = linked_failure.get_details_error_info().unwrap();
    assert_eq!(info.reason, "INSUFFICIENT_FUNDS");
    assert_eq!(info.metadata["operation_index"], "1");
    let bad_amount = error(3);
    assert_eq!(bad_amount.code, Code::InvalidArgument as i32);
    let violations = bad_amount.get_details_bad_request().unwrap().field_violations;
    assert_eq!(violations[0].field, "entries[3].single.deposit.amount");
    let Some(pb::batch_result::Result::Receipt(linked_receipt)) = &response.results[4].result else {
        panic!("{:?}", response.results[4])
    };
    assert!(matches!(&linked_receipt.kind, Some(pb::receipt::Kind::Linked(group)) if group.receipts.len() == 2));
    // 100 + 1 - 30 + 5: the failed group moved nothing.
    assert_eq!(balance(&mut client, &alice).await.0, "76.00");
    assert_eq!(balance(&mut client, &bob).await.0, "25.00");

    // The whole batch again: every entry answers as before and nothing moves twice.
    let replay = client.submit_batch(request).await.unwrap().into_inner();
    assert_eq!(replay.results[0].result, response.results[0].result);
    assert!(replay.results[0].replayed);
    // ErrorInfo metadata is a map, encoded in no fixed order: compare refusals decoded.
    let replayed_refusal = match &replay.results[1].result {
        Some(pb::batch_result::Result::Error(status)) => status.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!((replayed_refusal.code, &replayed_refusal.message), (too_much.code, &too_much.message));
    let (replayed_info, first_info) =
        (replayed_refusal.get_details_error_info().unwrap(), too_much.get_details_error_info().unwrap());
    assert_eq!((replayed_info.reason, replayed_info.metadata), (first_info.reason, first_info.metadata));
    assert_eq!(replay.results[4].result, response.results[4].result);
    assert_eq!(balance(&mut client, &alice).await.0, "76.00");
    server.stop().await;
}

/// Past `MAX_ACTIVE_RESERVATIONS_PER_USER` active reservations a reserve is refused with
/// FAILED_PRECONDITION `TOO_MANY_ACTIVE_RESERVATIONS`, naming the user and the maximum.
#[sqlx::test]
async fn too_many_active_reservations_are_refused_with_their_reason(pool: PgPool) {
    use diboas_ledger::engine::operation::MAX_ACTIVE_RESERVATIONS_PER_USER;

    let server = TestServer::start(prepared(&pool).await).await;
    let mut client = server.client.clone();
    let alice = usd(1);
    funded(&mut client, &alice, "100.00").await;
    let reserve = |id: usize| pb::Reserve {
        reservation_id: uuid::Uuid::from_u128(0x0c0c_0000_0000_4000_8000_0000_0000_0000 | id as u128).to_string(),
        account: Some(alice.clone()),
        amount: "0.01".into(),
        ttl_ms: None,
    };
    let entries = (0..MAX_ACTIVE_RESERVATIONS_PER_USER)
        .map(|id| entry(&format!("many-{id}"), single(pb::operation::Kind::Reserve(reserve(id)))))
        .collect();
    let response = client.submit_batch(pb::SubmitBatchRequest { entries }).await.unwrap().into_inner();
    assert!(response.results.iter().all(|result| matches!(result.result, Some(pb::batch_result::Result::Receipt(_)))));
    let request = pb::ReserveRequest {
        idempotency_key: "one-too-many".into(),
        operation: Some(reserve(MAX_ACTIVE_RESERVATIONS_PER_USER)),
    };
    let refused = client.reserve(request).await.unwrap_err();
    assert_refused(&refused, Code::FailedPrecondition, "TOO_MANY_ACTIVE_RESERVATIONS");
    let info = refused.get_details_error_info().unwrap();
    assert_eq!(info.metadata["max"], MAX_ACTIVE_RESERVATIONS_PER_USER.to_string());
    assert_eq!(info.metadata["user_id"], alice.user_id);
}

#[sqlx::test]
async fn balances_survive_a_restart(pool: PgPool) {
    let options = prepared(&pool).await;
    let server = TestServer::start(options.clone()).await;
    let mut client = server.client.clone();
    let alice = usd(1);
    let bob = usd(2);
    funded(&mut client, &alice, "100.00").await;
    client.open_account(open("open-bob", &bob)).await.unwrap();
    client.transfer(transfer("pay", &alice, &bob, "12.34")).await.unwrap();
    client
        .reserve(pb::ReserveRequest {
            idempotency_key: "hold".into(),
            operation: Some(pb::Reserve {
                reservation_id: "0b0b0b0b-0000-4000-8000-000000000001".into(),
                account: Some(alice.clone()),
                amount: "7.00".into(),
                ttl_ms: None,
            }),
        })
        .await
        .unwrap();
    let list = |user_id: String| pb::ListBalancesRequest { user_id };
    let before_alice = client.list_balances(list(alice.user_id.clone())).await.unwrap().into_inner();
    let before_bob = client.list_balances(list(bob.user_id.clone())).await.unwrap().into_inner();
    server.stop().await;

    let server = TestServer::start(options).await;
    let mut client = server.client.clone();
    assert_eq!(client.list_balances(list(alice.user_id.clone())).await.unwrap().into_inner(), before_alice);
    assert_eq!(client.list_balances(list(bob.user_id.clone())).await.unwrap().into_inner(), before_bob);
    assert_eq!(balance(&mut client, &alice).await, ("80.66".into(), "7.00".into(), "87.66".into()));
    // The idempotency keys survived too.
    let retry = client.transfer(transfer("pay", &alice, &bob, "12.34")).await.unwrap().into_inner();
    assert!(retry.replayed);
    server.stop().await;
}

#[sqlx::test]
async fn health_is_serving_and_reflection_lists_the_service(pool: PgPool) {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let server = TestServer::start(prepared(&pool).await).await;
    let mut health = HealthClient::new(server.channel.clone());
    for service in ["", "diboas.ledger.v1.Ledger", "diboas.ledger.v1.Transactions", "diboas.ledger.v1.Events"] {
        let response = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(response.status, ServingStatus::Serving as i32, "{service:?}");
    }

    let mut reflection = ServerReflectionClient::new(server.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
    let response = stream.message().await.unwrap().expect("a reflection response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else { panic!("{response:?}") };
    assert!(list.service.iter().any(|service| service.name == "diboas.ledger.v1.Ledger"), "{list:?}");
    drop((health, stream, reflection));
    server.stop().await;
}

#[sqlx::test]
async fn the_correlation_id_is_echoed_or_generated(pool: PgPool) {
    let server = TestServer::start(prepared(&pool).await).await;
    let mut client = server.client.clone();
    let alice = usd(1);

    let mut request = tonic::Request::new(open("open", &alice));
    request.metadata_mut().insert(HEADER, "order-42".parse().unwrap());
    let response = client.open_account(request).await.unwrap();
    assert_eq!(response.metadata().get(HEADER).unwrap(), "order-42");

    let mut request = tonic::Request::new(open("open-again", &alice));
    request.metadata_mut().insert(HEADER, "order-43".parse().unwrap());
    let refused = client.open_account(request).await.unwrap_err();
    assert_eq!(refused.metadata().get(HEADER).unwrap(), "order-43");

    let response = client.get_balance(pb::GetBalanceRequest { account: Some(alice) }).await.unwrap();
    let generated = response.metadata().get(HEADER).unwrap().to_str().unwrap();
    assert!(uuid::Uuid::try_parse(generated).is_ok(), "{generated}");

    // The change's journal entry carries the id too, so an audit can follow a request from the
    // caller's logs into PostgreSQL.
    let mut request = tonic::Request::new(deposit("fund", &usd(1), "5.00"));
    request.metadata_mut().insert(HEADER, "order-44".parse().unwrap());
    client.deposit(request).await.unwrap();
    server.stop().await;
    let journaled: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT record -> 'origin' -> 'data' ->> 'key', record -> 'origin' -> 'data' -> 'context' ->> 'correlation_id'
         FROM ledger.journal ORDER BY sequence",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        journaled,
        [
            ("open".to_owned(), Some("order-42".to_owned())),
            ("open-again".to_owned(), Some("order-43".to_owned())),
            ("fund".to_owned(), Some("order-44".to_owned())),
        ]
    );
    // With the peer address and the client's user agent, for the audit trail.
    let (peer, user_agent): (Option<String>, Option<String>) = sqlx::query_as(
        "SELECT record -> 'origin' -> 'data' -> 'context' ->> 'peer',
                record -> 'origin' -> 'data' -> 'context' ->> 'user_agent'
         FROM ledger.journal WHERE sequence = 3",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(peer.is_some_and(|peer| peer.starts_with("127.0.0.1:")));
    assert!(user_agent.is_some_and(|agent| agent.contains("tonic")), "tonic clients say who they are");
}
