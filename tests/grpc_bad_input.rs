//! Bad input over the wire (promise 8): malformed ids, empty and oversized fields, amounts with
//! too many decimals, signs or exponents, unknown assets and enums, missing fields, oversized
//! batches and messages. Each gets INVALID_ARGUMENT with a BadRequest naming the field (or, for
//! an oversized message, tonic's own refusal), and the balances are unchanged afterwards.

mod grpc_common;

use diboas_ledger::api::pb;
use diboas_ledger::api::server::ServeConfig;
use grpc_common::*;
use sqlx::PgPool;
use tonic::{Code, Status};
use tonic_types::{RpcStatusExt, StatusExt};

const GOOD_RESERVATION: &str = "0b0b0b0b-0000-4000-8000-000000000001";

fn deposit_with(account: pb::UserAccount, amount: &str, provider: pb::Provider) -> pb::DepositRequest {
    pb::DepositRequest {
        idempotency_key: "bad-input".into(),
        operation: Some(pb::Deposit { account: Some(account), amount: amount.into(), provider: provider.into() }),
    }
}

#[sqlx::test]
async fn bad_input_is_refused_with_the_field_and_changes_nothing(pool: PgPool) {
    let config = ServeConfig { max_batch_operations: 8, ..ServeConfig::default() };
    let server = TestServer::start_with(prepared(&pool).await, config).await;
    let mut client = server.client.clone();
    let alice = usd(1);
    let bob = usd(2);
    funded(&mut client, &alice, "100.00").await;
    funded(&mut client, &bob, "1.00").await;
    let list = |account: &pb::UserAccount| pb::ListBalancesRequest { user_id: account.user_id.clone() };
    let before = (
        client.list_balances(list(&alice)).await.unwrap().into_inner(),
        client.list_balances(list(&bob)).await.unwrap().into_inner(),
    );

    let stripe = pb::Provider::Stripe;
    let with_user = |user_id: &str| pb::UserAccount { user_id: user_id.into(), ..alice.clone() };
    let with_asset = |asset: &str| pb::UserAccount { asset: asset.into(), ..alice.clone() };
    let with_domain = |domain: i32| pb::UserAccount { domain, ..alice.clone() };
    let huge = "9".repeat(10_000);
    let mut cases: Vec<(&str, &str, Status)> = Vec::new();

    for (name, key) in [("empty key", ""), ("long key", &"k".repeat(65)[..]), ("key with a space", "a b")] {
        let request = pb::DepositRequest { idempotency_key: key.into(), ..deposit("x", &alice, "1.00") };
        cases.push((name, "idempotency_key", client.deposit(request).await.unwrap_err()));
    }
    let missing = pb::DepositRequest { idempotency_key: "k".into(), operation: None };
    cases.push(("missing operation", "operation", client.deposit(missing).await.unwrap_err()));
    let no_account = pb::DepositRequest {
        idempotency_key: "k".into(),
        operation: Some(pb::Deposit { account: None, amount: "1.00".into(), provider: stripe.into() }),
    };
    cases.push(("missing account", "operation.account", client.deposit(no_account).await.unwrap_err()));
    for (name, user_id) in [
        ("malformed uuid", "not-a-uuid"),
        ("empty uuid", ""),
        ("braced uuid", "{6f1c0000-0000-4000-8000-000000000001}"),
        ("uuid without hyphens", "6f1c0000000040008000000000000001"),
        ("uuid with a bad digit", "6f1c0000-0000-4000-8000-00000000000g"),
        ("oversized uuid", &huge[..]),
    ] {
        let request = deposit_with(with_user(user_id), "1.00", stripe);
        cases.push((name, "operation.account.user_id", client.deposit(request).await.unwrap_err()));
    }
    for (name, domain) in [("unspecified domain", 0), ("unknown domain", 42), ("negative domain", -1)] {
        let request = deposit_with(with_domain(domain), "1.00", stripe);
        cases.push((name, "operation.account.domain", client.deposit(request).await.unwrap_err()));
    }
    for (name, asset) in [
        ("empty asset", ""),
        ("lower-case asset", "usd"),
        ("unknown asset", "DOGE"),
        ("stablecoin without chain", "USDC"),
        ("oversized asset", &huge[..]),
    ] {
        let request = deposit_with(with_asset(asset), "1.00", stripe);
        cases.push((name, "operation.account.asset", client.deposit(request).await.unwrap_err()));
    }
    for (name, amount) in [
        ("too many decimals", "1.001"),
        ("negative", "-1.00"),
        ("plus sign", "+1.00"),
        ("exponent", "1e3"),
        ("zero", "0"),
        ("zero with decimals", "0.00"),
        ("empty amount", ""),
        ("leading space", " 1.00"),
        ("digit separator", "1,000.00"),
        ("trailing dot", "1."),
        ("leading dot", ".5"),
        ("not a number", "NaN"),
        ("non-ASCII digit", "１"),
        ("past the maximum", "100000000000000000000000000"),
        ("oversized amount", &huge[..]),
    ] {
        let request = deposit_with(alice.clone(), amount, stripe);
        cases.push((name, "operation.amount", client.deposit(request).await.unwrap_err()));
    }
    for (name, provider) in [("unspecified provider", 0), ("unknown provider", 9)] {
        let request = pb::DepositRequest {
            idempotency_key: "k".into(),
            operation: Some(pb::Deposit { account: Some(alice.clone()), amount: "1.00".into(), provider }),
        };
        cases.push((name, "operation.provider", client.deposit(request).await.unwrap_err()));
    }

    let reserve = |reservation_id: &str, ttl_ms: Option<i64>| pb::ReserveRequest {
        idempotency_key: "k".into(),
        operation: Some(pb::Reserve {
            reservation_id: reservation_id.into(),
            account: Some(alice.clone()),
            amount: "1.00".into(),
            ttl_ms,
        }),
    };
    cases.push((
        "malformed reservation id",
        "operation.reservation_id",
        client.reserve(reserve("res-1", None)).await.unwrap_err(),
    ));
    for (name, ttl_ms) in [("zero ttl", 0), ("negative ttl", -5), ("ttl past 7 days", 7 * 24 * 3_600_000 + 1)] {
        let status = client.reserve(reserve(GOOD_RESERVATION, Some(ttl_ms))).await.unwrap_err();
        cases.push((name, "operation.ttl_ms", status));
    }

    let commit = |destination: Option<pb::AccountRef>| pb::CommitRequest {
        idempotency_key: "k".into(),
        operation: Some(pb::Commit {
            user_id: alice.user_id.clone(),
            reservation_id: GOOD_RESERVATION.into(),
            destination,
            amount: None,
        }),
    };
    cases.push(("missing destination", "operation.destination", client.commit(commit(None)).await.unwrap_err()));
    let empty_ref = pb::AccountRef { account: None };
    cases.push((
        "empty destination",
        "operation.destination",
        client.commit(commit(Some(empty_ref))).await.unwrap_err(),
    ));
    let unspecified_system = pb::AccountRef {
        account: Some(pb::account_ref::Account::System(pb::SystemAccount { kind: 0, asset: "USD".into() })),
    };
    cases.push((
        "unspecified system account",
        "operation.destination.system.kind",
        client.commit(commit(Some(unspecified_system))).await.unwrap_err(),
    ));

    let convert = |price: &str, commission_bps: u32| pb::ConvertRequest {
        idempotency_key: "k".into(),
        operation: Some(pb::Convert {
            from: Some(alice.clone()),
            to: Some(account(1, pb::Domain::Banking, "BTC")),
            amount: "1.00".into(),
            price: price.into(),
            commission_bps,
        }),
    };
    for (name, price) in [("negative price", "-1"), ("zero price", "0"), ("price exponent", "1e2"), ("empty price", "")]
    {
        cases.push((name, "operation.price", client.convert(convert(price, 0)).await.unwrap_err()));
    }
    cases.push((
        "commission past 100%",
        "operation.commission_bps",
        client.convert(convert("1", 10_001)).await.unwrap_err(),
    ));

    let open_with = |overdraft: &str, daily: Option<&str>| pb::OpenAccountRequest {
        idempotency_key: "k".into(),
        operation: Some(pb::OpenAccount {
            account: Some(usd(7)),
            overdraft: overdraft.into(),
            limits: Some(pb::OutflowLimits { daily: daily.map(str::to_string), ..Default::default() }),
            frozen: false,
        }),
    };
    cases.push((
        "negative overdraft",
        "operation.overdraft",
        client.open_account(open_with("-5", None)).await.unwrap_err(),
    ));
    cases.push((
        "zero limit",
        "operation.limits.daily",
        client.open_account(open_with("", Some("0"))).await.unwrap_err(),
    ));

    cases.push((
        "balance without account",
        "account",
        client.get_balance(pb::GetBalanceRequest { account: None }).await.unwrap_err(),
    ));
    cases.push((
        "list with a bad user",
        "user_id",
        client.list_balances(pb::ListBalancesRequest { user_id: "x".into() }).await.unwrap_err(),
    ));
    cases.push((
        "summary with a bad user",
        "user_id",
        client.get_user_summary(pb::GetUserSummaryRequest { user_id: String::new() }).await.unwrap_err(),
    ));

    let deposit_entry = |key: &str| pb::BatchEntry {
        idempotency_key: key.into(),
        kind: Some(pb::batch_entry::Kind::Single(pb::Operation {
            kind: Some(pb::operation::Kind::Deposit(deposit_body(&alice, "1.00"))),
        })),
    };
    let empty = pb::SubmitBatchRequest { entries: Vec::new() };
    cases.push(("empty batch", "entries", client.submit_batch(empty).await.unwrap_err()));
    let oversized = pb::SubmitBatchRequest { entries: (0..9).map(|n| deposit_entry(&format!("big-{n}"))).collect() };
    cases.push(("batch past the maximum", "entries", client.submit_batch(oversized).await.unwrap_err()));
    let linked_too_big = pb::SubmitBatchRequest {
        entries: vec![pb::BatchEntry {
            idempotency_key: "big-linked".into(),
            kind: Some(pb::batch_entry::Kind::Linked(pb::LinkedGroup {
                operations: (0..9)
                    .map(|_| pb::Operation { kind: Some(pb::operation::Kind::Deposit(deposit_body(&alice, "1.00"))) })
                    .collect(),
            })),
        }],
    };
    cases.push(("linked group past the maximum", "entries", client.submit_batch(linked_too_big).await.unwrap_err()));

    for (name, field, status) in &cases {
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        assert_invalid_field(status, field);
    }

    // Entries of a batch are refused one by one, each in its own result.
    let batch = pb::SubmitBatchRequest {
        entries: vec![
            pb::BatchEntry { idempotency_key: "e0".into(), kind: None },
            pb::BatchEntry {
                idempotency_key: "e1".into(),
                kind: Some(pb::batch_entry::Kind::Linked(pb::LinkedGroup { operations: Vec::new() })),
            },
            pb::BatchEntry { idempotency_key: String::new(), ..deposit_entry("") },
            pb::BatchEntry {
                idempotency_key: "e3".into(),
                kind: Some(pb::batch_entry::Kind::Single(pb::Operation { kind: None })),
            },
            pb::BatchEntry {
                idempotency_key: "e4".into(),
                kind: Some(pb::batch_entry::Kind::Linked(pb::LinkedGroup {
                    operations: vec![
                        pb::Operation { kind: Some(pb::operation::Kind::Deposit(deposit_body(&alice, "1.00"))) },
                        pb::Operation { kind: Some(pb::operation::Kind::Deposit(deposit_body(&alice, "1.000"))) },
                    ],
                })),
            },
        ],
    };
    let results = client.submit_batch(batch).await.unwrap().into_inner().results;
    let expected = [
        "entries[0]",
        "entries[1].linked.operations",
        "entries[2].idempotency_key",
        "entries[3].single",
        "entries[4].linked.operations[1].deposit.amount",
    ];
    for (result, field) in results.iter().zip(expected) {
        let Some(pb::batch_result::Result::Error(status)) = &result.result else { panic!("{field}: {result:?}") };
        assert_eq!(status.code, Code::InvalidArgument as i32, "{field}");
        let violations = status.get_details_bad_request().expect("a BadRequest").field_violations;
        assert_eq!(violations[0].field, field);
    }

    // A message past the decoding limit is refused by tonic before any handler runs; the refusal
    // still carries the ErrorInfo every other refusal has.
    let oversized_message = deposit(&"k".repeat(5 * 1024 * 1024), &alice, "1.00");
    let refused = client.deposit(oversized_message).await.unwrap_err();
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
    let info = refused.get_details_error_info().expect("ErrorInfo on an oversized message");
    assert_eq!(info.reason, "MESSAGE_TOO_LARGE");
    assert_eq!(info.metadata["limit_bytes"], ServeConfig::default().max_message_bytes.to_string());
    assert!(info.metadata["found_bytes"].parse::<usize>().expect("a size") > 5 * 1024 * 1024);

    let after = (
        client.list_balances(list(&alice)).await.unwrap().into_inner(),
        client.list_balances(list(&bob)).await.unwrap().into_inner(),
    );
    assert_eq!(after, before);
    server.stop().await;
}

/// Field 1 of `DepositRequest`, its idempotency key (a string), as raw bytes: a message with
/// this shape can carry a key that is not UTF-8, which no well-typed client can send.
#[derive(Clone, PartialEq, prost::Message)]
struct DepositWithRawKey {
    #[prost(bytes = "vec", tag = "1")]
    idempotency_key: Vec<u8>,
}

/// Bytes that are not a valid message of the method's type are refused before any handler runs.
/// tonic calls that INTERNAL, which tells a client the server is at fault; the server says
/// INVALID_ARGUMENT `MALFORMED_MESSAGE`, naming the field, and changes nothing (found in review,
/// session 23).
#[sqlx::test]
async fn a_request_that_does_not_decode_is_refused_as_malformed(pool: PgPool) {
    let options = prepared(&pool).await;
    let server = TestServer::start(options).await;
    let mut grpc = tonic::client::Grpc::new(server.channel.clone());
    grpc.ready().await.expect("the channel is ready");
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/diboas.ledger.v1.Ledger/Deposit");
    let codec = tonic_prost::ProstCodec::<DepositWithRawKey, pb::MutationResponse>::default();
    let not_utf8 = DepositWithRawKey { idempotency_key: vec![b'k', 0xff] };
    let refused = grpc.unary(tonic::Request::new(not_utf8), path, codec).await.unwrap_err();
    assert_refused(&refused, Code::InvalidArgument, "MALFORMED_MESSAGE");
    assert!(refused.message().contains("idempotency_key"), "{refused:?}");
    let (journaled,): (i64,) = sqlx::query_as("SELECT count(*) FROM ledger.journal").fetch_one(&pool).await.unwrap();
    assert_eq!(journaled, 0);
    server.stop().await;
}
