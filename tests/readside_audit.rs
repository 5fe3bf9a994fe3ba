//! Audit rows for the ledger's money RPCs (written by the journal writer in the batch's own
//! transaction), with who asked, and the audit trail's append-only guarantee.

mod grpc_common;
mod readside_common;

use diboas_ledger::api::pb;
use grpc_common::{TestServer, account, deposit, funded, open, prepared, transfer, usd, user};
use readside_common::{audit_rows, correlated};
use sqlx::PgPool;

#[sqlx::test]
async fn every_money_rpc_writes_an_audit_row_with_who_asked(pool: PgPool) {
    let server = TestServer::start(prepared(&pool).await).await;
    let mut client = server.client.clone();
    let alice = usd(1);
    let bob = usd(2);
    let alice_btc = account(1, pb::Domain::Banking, "BTC");
    client.open_account(correlated(open("open-a", &alice), "m-open")).await.expect("open");
    funded(&mut client, &bob, "5.00").await;
    funded(&mut client, &alice_btc, "0.001").await;
    client.deposit(correlated(deposit("dep-a", &alice, "100.00"), "m-deposit")).await.expect("deposit");
    client
        .withdraw(correlated(
            pb::WithdrawRequest {
                idempotency_key: "wd-a".into(),
                operation: Some(pb::Withdraw {
                    account: Some(alice.clone()),
                    amount: "10.00".into(),
                    provider: pb::Provider::Stripe.into(),
                }),
            },
            "m-withdraw",
        ))
        .await
        .expect("withdraw");
    let reservation = user(50);
    client
        .reserve(correlated(
            pb::ReserveRequest {
                idempotency_key: "res-a".into(),
                operation: Some(pb::Reserve {
                    reservation_id: reservation.clone(),
                    account: Some(alice.clone()),
                    amount: "20.00".into(),
                    ttl_ms: None,
                }),
            },
            "m-reserve",
        ))
        .await
        .expect("reserve");
    client
        .commit(correlated(
            pb::CommitRequest {
                idempotency_key: "com-a".into(),
                operation: Some(pb::Commit {
                    user_id: alice.user_id.clone(),
                    reservation_id: reservation.clone(),
                    destination: Some(grpc_common::user_ref(&bob)),
                    amount: Some("5.00".into()),
                }),
            },
            "m-commit",
        ))
        .await
        .expect("commit");
    let second = user(51);
    client
        .reserve(pb::ReserveRequest {
            idempotency_key: "res-b".into(),
            operation: Some(pb::Reserve {
                reservation_id: second.clone(),
                account: Some(alice.clone()),
                amount: "1.00".into(),
                ttl_ms: None,
            }),
        })
        .await
        .expect("reserve");
    client
        .release(correlated(
            pb::ReleaseRequest {
                idempotency_key: "rel-b".into(),
                operation: Some(pb::Release { user_id: alice.user_id.clone(), reservation_id: second }),
            },
            "m-release",
        ))
        .await
        .expect("release");
    client.transfer(correlated(transfer("tr-a", &alice, &bob, "3.00"), "m-transfer")).await.expect("transfer");
    client
        .convert(correlated(
            pb::ConvertRequest {
                idempotency_key: "cv-a".into(),
                operation: Some(pb::Convert {
                    from: Some(alice.clone()),
                    to: Some(alice_btc.clone()),
                    amount: "10.00".into(),
                    price: "0.00001".into(),
                    commission_bps: 100,
                }),
            },
            "m-convert",
        ))
        .await
        .expect("convert");
    client
        .set_frozen(correlated(
            pb::SetFrozenRequest {
                idempotency_key: "fr-b".into(),
                operation: Some(pb::SetFrozen { account: Some(bob.clone()), frozen: true }),
            },
            "m-freeze",
        ))
        .await
        .expect("freeze");
    let refused = client
        .transfer(correlated(transfer("tr-big", &alice, &bob, "100000.00"), "m-refused"))
        .await
        .expect_err("insufficient funds");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    let entry = |key: &str, operation: pb::operation::Kind| pb::BatchEntry {
        idempotency_key: key.into(),
        kind: Some(pb::batch_entry::Kind::Single(pb::Operation { kind: Some(operation) })),
    };
    client
        .submit_batch(correlated(
            pb::SubmitBatchRequest {
                entries: vec![
                    entry("b-1", pb::operation::Kind::Deposit(grpc_common::deposit_body(&alice, "1.00"))),
                    entry("b-2", pb::operation::Kind::Deposit(grpc_common::deposit_body(&alice, "2.00"))),
                ],
            },
            "m-batch",
        ))
        .await
        .expect("batch");
    server.stop().await;

    let expected = [
        ("m-open", "ledger.open_account", "ledger_account"),
        ("m-deposit", "ledger.deposit", "ledger_account"),
        ("m-withdraw", "ledger.withdraw", "ledger_account"),
        ("m-reserve", "ledger.reserve", "ledger_account"),
        ("m-commit", "ledger.commit", "reservation"),
        ("m-release", "ledger.release", "reservation"),
        ("m-transfer", "ledger.transfer", "ledger_account"),
        ("m-convert", "ledger.convert", "ledger_account"),
        ("m-freeze", "ledger.set_frozen", "ledger_account"),
        ("m-refused", "ledger.transfer", "ledger_account"),
    ];
    for (correlation, event_type, entity_type) in expected {
        let rows = audit_rows(&pool, correlation).await;
        assert_eq!(rows.len(), 1, "{correlation}: {rows:?}");
        let row = &rows[0];
        assert_eq!((row.event_type.as_str(), row.entity_type.as_str()), (event_type, entity_type), "{row:?}");
        assert_eq!(row.ip_address.as_deref(), Some("127.0.0.1"));
        assert!(row.user_agent.as_deref().is_some_and(|agent| agent.contains("tonic")));
        let sequence = row.journal_sequence.expect("a journal sequence");
        let after = row.after_state.as_ref().expect("after state");
        assert_eq!(after["sequence"], sequence);
        let journal_correlation: String = sqlx::query_scalar(
            "SELECT record->'origin'->'data'->'context'->>'correlation_id' FROM ledger.journal WHERE sequence = $1",
        )
        .bind(sequence)
        .fetch_one(&pool)
        .await
        .expect("the journal entry");
        assert_eq!(journal_correlation, correlation);
    }
    let deposit_row = &audit_rows(&pool, "m-deposit").await[0];
    assert_eq!(deposit_row.entity_id, format!("{}/banking/USD", alice.user_id));
    let effects = &deposit_row.after_state.as_ref().expect("after")["effects"];
    assert_eq!(effects.as_array().map(Vec::len), Some(1), "{effects}");
    assert!(deposit_row.after_state.as_ref().expect("after")["outcome"].get("Ok").is_some());
    let refused_row = &audit_rows(&pool, "m-refused").await[0];
    let refused_after = refused_row.after_state.as_ref().expect("after");
    assert!(refused_after["outcome"].get("Err").is_some(), "{refused_after}");
    assert_eq!(refused_after["effects"].as_array().map(Vec::len), Some(0));
    let batch = audit_rows(&pool, "m-batch").await;
    assert_eq!(batch.len(), 2, "one row per batch entry: {batch:?}");
    assert!(batch.iter().all(|row| row.event_type == "ledger.deposit"));

    // Every request record of the journal has exactly one audit row.
    let (requests, audited): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM ledger.journal WHERE kind = 'request'),
                (SELECT count(DISTINCT journal_sequence) FROM audit.trail WHERE journal_sequence IS NOT NULL)",
    )
    .fetch_one(&pool)
    .await
    .expect("counts");
    assert_eq!(requests, audited);
}

#[sqlx::test]
async fn the_audit_trail_is_append_only(pool: PgPool) {
    prepared(&pool).await;
    sqlx::query("INSERT INTO audit.audit_log (event_type, entity_type, entity_id) VALUES ('test.event', 'test', '1')")
        .execute(&pool)
        .await
        .expect("appending works");
    sqlx::query("INSERT INTO audit.data_access_log (entity_type, fields, reason) VALUES ('user', '{email}', 'test')")
        .execute(&pool)
        .await
        .expect("appending works");
    for statement in [
        "UPDATE audit.audit_log SET entity_id = '2'",
        "DELETE FROM audit.audit_log",
        "TRUNCATE audit.audit_log",
        "UPDATE audit.data_access_log SET reason = 'changed'",
        "DELETE FROM audit.data_access_log",
        "TRUNCATE audit.data_access_log",
    ] {
        let error = sqlx::query(statement).execute(&pool).await.expect_err(statement);
        assert!(error.to_string().contains("append-only"), "{statement}: {error}");
    }
    let rows: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM audit.audit_log WHERE entity_id = '1') + (SELECT count(*) FROM audit.data_access_log WHERE reason = 'test')",
    )
    .fetch_one(&pool)
    .await
    .expect("count");
    assert_eq!(rows, 2);
}
