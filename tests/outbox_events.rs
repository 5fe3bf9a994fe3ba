//! Outbox events and the Events gRPC stream against the real PostgreSQL: every kind of change
//! writes its events in the change's own transaction (none for a refusal), the stream resumes
//! after a disconnect with no gap and no duplicate, follows new commits live, and cuts a slow
//! consumer with RESOURCE_EXHAUSTED and the position to resume after.

mod grpc_common;
mod outbox_common;

use diboas_ledger::api::events::EventsConfig;
use diboas_ledger::api::pb;
use diboas_ledger::api::pb::events_client::EventsClient;
use diboas_ledger::api::server::ServeConfig;
use diboas_ledger::engine::record::JournalRecord;
use diboas_ledger::ledger::LedgerConfig;
use diboas_ledger::outbox::event::{OutboxEvent, PAYLOAD_VERSION, events_of};
use grpc_common::*;
use outbox_common::*;
use sqlx::PgPool;
use tonic::Code;
use tonic_types::StatusExt;

const RESERVATION_A: &str = "0b6f1c2a-0000-4000-8000-00000000000a";
const RESERVATION_B: &str = "0b6f1c2a-0000-4000-8000-00000000000b";
const RESERVATION_C: &str = "0b6f1c2a-0000-4000-8000-00000000000c";

fn reserve(key: &str, account: &pb::UserAccount, id: &str, amount: &str, ttl_ms: Option<i64>) -> pb::ReserveRequest {
    pb::ReserveRequest {
        idempotency_key: key.to_owned(),
        operation: Some(pb::Reserve {
            reservation_id: id.to_owned(),
            account: Some(account.clone()),
            amount: amount.to_owned(),
            ttl_ms,
        }),
    }
}

fn event_types(rows: &[OutboxRow]) -> Vec<String> {
    rows.iter().map(|row| format!("{}.{}", row.2, row.4)).collect()
}

#[sqlx::test]
async fn every_change_writes_its_events_and_a_refusal_none(pool: PgPool) {
    let mut server = TestServer::start(prepared(&pool).await).await;
    let (alice, bob) = (usd(1), usd(2));
    server.client.open_account(open("open-a", &alice)).await.expect("open");
    server.client.open_account(open("open-b", &bob)).await.expect("open");
    server.client.deposit(deposit("dep", &alice, "10.00")).await.expect("deposit");
    server.client.transfer(transfer("tr", &alice, &bob, "1.00")).await.expect("transfer");
    let before_refusal = outbox_rows(&pool).await.len();
    let refused = server
        .client
        .withdraw(pb::WithdrawRequest {
            idempotency_key: "too-much".to_owned(),
            operation: Some(pb::Withdraw {
                account: Some(alice.clone()),
                amount: "1000.00".to_owned(),
                provider: pb::Provider::Stripe.into(),
            }),
        })
        .await
        .expect_err("insufficient funds");
    assert_refused(&refused, Code::FailedPrecondition, "INSUFFICIENT_FUNDS");
    assert_eq!(outbox_rows(&pool).await.len(), before_refusal, "a refusal publishes nothing");
    server.client.reserve(reserve("res-a", &alice, RESERVATION_A, "2.00", None)).await.expect("reserve");
    server
        .client
        .commit(pb::CommitRequest {
            idempotency_key: "commit-a".to_owned(),
            operation: Some(pb::Commit {
                user_id: alice.user_id.clone(),
                reservation_id: RESERVATION_A.to_owned(),
                destination: Some(user_ref(&bob)),
                amount: None,
            }),
        })
        .await
        .expect("commit");
    server.client.reserve(reserve("res-b", &alice, RESERVATION_B, "1.00", None)).await.expect("reserve");
    server
        .client
        .release(pb::ReleaseRequest {
            idempotency_key: "release-b".to_owned(),
            operation: Some(pb::Release { user_id: alice.user_id.clone(), reservation_id: RESERVATION_B.to_owned() }),
        })
        .await
        .expect("release");
    for (key, frozen) in [("freeze", true), ("unfreeze", false)] {
        server
            .client
            .set_frozen(pb::SetFrozenRequest {
                idempotency_key: key.to_owned(),
                operation: Some(pb::SetFrozen { account: Some(bob.clone()), frozen }),
            })
            .await
            .expect("set frozen");
    }
    // Expires at once; the server's sweep releases it.
    server.client.reserve(reserve("res-c", &alice, RESERVATION_C, "1.00", Some(1))).await.expect("reserve");
    let rows = loop {
        let rows = outbox_rows(&pool).await;
        if rows.last().is_some_and(|row| row.4 == "expired") {
            break rows;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(
        event_types(&rows),
        [
            "account.opened",
            "account.opened",
            "account.balance_changed",
            "account.balance_changed",
            "account.balance_changed",
            "reservation.created",
            "reservation.completed",
            "account.balance_changed",
            "account.balance_changed",
            "reservation.created",
            "reservation.released",
            "account.frozen",
            "account.unfrozen",
            "reservation.created",
            "reservation.expired",
        ]
    );
    let (metadata,): (String,) =
        sqlx::query_as("SELECT metadata::text FROM ledger.outbox WHERE event_type = 'released'")
            .fetch_one(&pool)
            .await
            .expect("metadata");
    let metadata: serde_json::Value = serde_json::from_str(&metadata).expect("json");
    assert_eq!(metadata["idempotency_key"], "release-b");
    assert_eq!(metadata["operation"], "release");
    assert!(metadata["correlation_id"].as_str().is_some_and(|id| !id.is_empty()), "{metadata}");
    server.stop().await;
}

async fn deposits(server: &mut TestServer, account: &pb::UserAccount, prefix: &str, count: usize) {
    for index in 0..count {
        server.client.deposit(deposit(&format!("{prefix}-{index}"), account, "1.00")).await.expect("deposit");
    }
}

fn after(position: i64) -> pb::StreamEventsRequest {
    pb::StreamEventsRequest {
        start: Some(pb::stream_events_request::Start::AfterPosition(position)),
        ..Default::default()
    }
}

#[sqlx::test]
async fn the_stream_resumes_with_no_gap_and_no_duplicate_then_follows_live(pool: PgPool) {
    let mut server = TestServer::start(prepared(&pool).await).await;
    let account = usd(7);
    server.client.open_account(open("open", &account)).await.expect("open");
    deposits(&mut server, &account, "first", 20).await;
    let all_positions: Vec<i64> = outbox_rows(&pool).await.iter().map(|row| row.0).collect();
    assert_eq!(all_positions.len(), 21);

    let mut client = EventsClient::new(server.channel.clone());
    let mut received = Vec::new();
    let mut stream = client.stream_events(after(0)).await.expect("stream").into_inner();
    for _ in 0..8 {
        received.push(stream.message().await.expect("an event").expect("not ended"));
    }
    drop(stream); // the consumer disconnects
    let resume_after = received.last().expect("events").position;
    let mut stream = client.stream_events(after(resume_after)).await.expect("resume").into_inner();
    while received.len() < 21 {
        received.push(stream.message().await.expect("an event").expect("not ended"));
    }
    // Live: events committed after the stream caught up arrive on it.
    deposits(&mut server, &account, "live", 3).await;
    while received.len() < 24 {
        received.push(stream.message().await.expect("an event").expect("not ended"));
    }
    let positions: Vec<i64> = received.iter().map(|event| event.position).collect();
    let stored: Vec<i64> = outbox_rows(&pool).await.iter().map(|row| row.0).collect();
    assert_eq!(positions, stored, "every stored event once, in position order");
    let ids: std::collections::BTreeSet<&str> = received.iter().map(|event| event.event_id.as_str()).collect();
    assert_eq!(ids.len(), 24);
    assert_eq!(received[0].event_type, "opened");
    assert!(received[1..].iter().all(|event| event.event_type == "balance_changed"));

    // Filtered and from now.
    let from_now = pb::StreamEventsRequest {
        start: Some(pb::stream_events_request::Start::FromNow(true)),
        aggregate_types: vec!["account".to_owned()],
        event_types: vec!["frozen".to_owned()],
    };
    let mut frozen_only = client.stream_events(from_now).await.expect("stream").into_inner();
    deposits(&mut server, &account, "ignored", 2).await;
    server
        .client
        .set_frozen(pb::SetFrozenRequest {
            idempotency_key: "freeze".to_owned(),
            operation: Some(pb::SetFrozen { account: Some(account.clone()), frozen: true }),
        })
        .await
        .expect("freeze");
    let frozen = frozen_only.message().await.expect("an event").expect("not ended");
    assert_eq!(frozen.event_type, "frozen");

    let bad = client
        .stream_events(pb::StreamEventsRequest { event_types: vec!["Not Valid".to_owned()], ..after(0) })
        .await
        .expect_err("a bad filter");
    assert_invalid_field(&bad, "event_types[0]");
    drop((client, stream, frozen_only));
    server.stop().await;
}

#[sqlx::test]
async fn a_slow_consumer_is_cut_with_the_position_to_resume_after(pool: PgPool) {
    let events =
        EventsConfig { buffer_events: 4, slow_consumer_grace_ms: 20, page_events: 50, ..EventsConfig::default() };
    let config = ServeConfig { events, ..ServeConfig::default() };
    let mut server = TestServer::start_with(prepared(&pool).await, config).await;
    let account = usd(9);
    server.client.open_account(open("open", &account)).await.expect("open");
    // Far more events than the buffer plus the consumer's HTTP/2 windows hold.
    deposits(&mut server, &account, "dep", 400).await;
    // A consumer with small HTTP/2 windows, so what is in flight is a few events, not megabytes.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.address))
        .expect("uri")
        .initial_stream_window_size(Some(8 * 1024))
        .initial_connection_window_size(Some(8 * 1024))
        .connect()
        .await
        .expect("connect");
    let mut client = EventsClient::new(channel);
    let mut stream = client.stream_events(after(0)).await.expect("stream").into_inner();
    // The consumer does not read for a while (a stalled consumer), then drains what it was sent.
    tokio::time::sleep(std::time::Duration::from_millis(1_000)).await;
    let mut received = Vec::new();
    let status = loop {
        match stream.message().await {
            Ok(Some(event)) => {
                received.push(event);
                assert!(received.len() < 401, "a stalled consumer was never cut");
            }
            Ok(None) => panic!("the stream ended without a status after {} events", received.len()),
            Err(status) => break status,
        }
    };
    assert_refused(&status, Code::ResourceExhausted, "CONSUMER_TOO_SLOW");
    let info = status.get_details_error_info().expect("ErrorInfo");
    let resume_after: i64 = info.metadata["resume_after_position"].parse().expect("a position");
    assert!(received.len() < 401, "cut before the end");
    assert_eq!(resume_after, received.last().map_or(0, |event| event.position), "resume right after the last sent");

    // A consumer that keeps up from here, resuming after each cut (at this small grace, the
    // small windows can make it fall behind again): no gap, no duplicate across the cuts.
    let mut resume_after = resume_after;
    while received.len() < 401 {
        let mut resumed = client.stream_events(after(resume_after)).await.expect("resume").into_inner();
        while received.len() < 401 {
            match resumed.message().await {
                Ok(Some(event)) => received.push(event),
                Ok(None) => panic!("the stream ended without a status"),
                Err(status) => {
                    assert_refused(&status, Code::ResourceExhausted, "CONSUMER_TOO_SLOW");
                    let info = status.get_details_error_info().expect("ErrorInfo");
                    resume_after = info.metadata["resume_after_position"].parse().expect("a position");
                    assert_eq!(resume_after, received.last().map_or(0, |event| event.position));
                    break;
                }
            }
        }
    }
    let positions: Vec<i64> = received.iter().map(|event| event.position).collect();
    let stored: Vec<i64> = outbox_rows(&pool).await.iter().map(|row| row.0).collect();
    assert_eq!(positions, stored);
    drop((client, stream));
    server.stop().await;
}

#[sqlx::test]
async fn a_graceful_shutdown_ends_open_streams_with_their_resume_position(pool: PgPool) {
    let mut server = TestServer::start(prepared(&pool).await).await;
    let account = usd(9);
    server.client.open_account(open("open", &account)).await.expect("open");
    deposits(&mut server, &account, "before", 4).await;
    let mut client = EventsClient::new(server.channel.clone());
    let mut stream = client.stream_events(after(0)).await.expect("stream").into_inner();
    let mut received = Vec::new();
    while received.len() < 5 {
        received.push(stream.message().await.expect("an event").expect("not ended"));
    }

    // The stream is caught up and following live; a graceful shutdown waits for every open call,
    // so the stream must end by itself rather than hold the server up.
    let stopping = tokio::spawn(server.stop());
    // Bounds (here and below) so a regression fails instead of hanging the suite.
    let bound = std::time::Duration::from_secs(60);
    let status = match tokio::time::timeout(bound, stream.message()).await.expect("the stream ended") {
        Err(status) => status,
        Ok(other) => panic!("the stream must end with a status, got {other:?}"),
    };
    assert_refused(&status, Code::Unavailable, "SHUTTING_DOWN");
    let info = status.get_details_error_info().expect("ErrorInfo");
    let resume_after: i64 = info.metadata["resume_after_position"].parse().expect("a position");
    assert_eq!(resume_after, received.last().expect("events").position);
    drop((stream, client));
    tokio::time::timeout(bound, stopping)
        .await
        .expect("the server shut down with a stream open")
        .expect("the stop task");
}

/// The same requests through the UNNEST path (small batches) and the binary COPY path (every
/// batch, `copy_min_bytes` = 0): the stored events must be exactly what `events_of` derives from
/// the stored journal records, in journal order.
async fn stored_events_match_the_journal(pool: PgPool, copy_min_bytes: usize) {
    let mut ledger = LedgerConfig::new(prepared(&pool).await);
    ledger.journal.copy_min_bytes = copy_min_bytes;
    let mut server = TestServer::start_with_ledger(ledger, ServeConfig::default()).await;
    let (alice, bob) = (usd(11), usd(12));
    server.client.open_account(open("open-a", &alice)).await.expect("open");
    server.client.open_account(open("open-b", &bob)).await.expect("open");
    server.client.deposit(deposit("dep", &alice, "10.00")).await.expect("deposit");
    server.client.transfer(transfer("tr", &alice, &bob, "1.25")).await.expect("transfer");
    server.client.reserve(reserve("res", &alice, RESERVATION_A, "2.00", None)).await.expect("reserve");

    let records: Vec<(String,)> = sqlx::query_as("SELECT record::text FROM ledger.journal ORDER BY sequence")
        .fetch_all(&pool)
        .await
        .expect("journal");
    let expected: Vec<OutboxEvent> = records
        .iter()
        .flat_map(|(text,)| events_of(&serde_json::from_str::<JournalRecord>(text).expect("a journal record")))
        .collect();
    type Stored = (i64, uuid::Uuid, i64, i32, String, String, String, i16, String, String);
    let stored: Vec<Stored> = sqlx::query_as(
        "SELECT position, event_id, sequence, ordinal, aggregate_type, aggregate_id, event_type, version,
             payload::text, metadata::text
         FROM ledger.outbox_events ORDER BY position",
    )
    .fetch_all(&pool)
    .await
    .expect("events");
    assert_eq!(stored.len(), expected.len());
    assert!(expected.len() >= 6, "the workload makes events: {expected:?}");
    for (row, event) in stored.iter().zip(&expected) {
        assert_eq!(row.1, event.event_id);
        assert_eq!((row.2, row.3), (event.sequence as i64, event.ordinal as i32));
        assert_eq!(
            (row.4.as_str(), row.5.as_str(), row.6.as_str()),
            (event.aggregate.name(), event.aggregate_id.as_str(), event.event_type)
        );
        assert_eq!(row.7, PAYLOAD_VERSION);
        assert_eq!(serde_json::from_str::<serde_json::Value>(&row.8).expect("payload json"), event.payload);
        assert_eq!(serde_json::from_str::<serde_json::Value>(&row.9).expect("metadata json"), event.metadata);
    }
    server.stop().await;
}

#[sqlx::test]
async fn inserted_events_match_the_journal(pool: PgPool) {
    stored_events_match_the_journal(pool, usize::MAX).await;
}

#[sqlx::test]
async fn copied_events_match_the_journal(pool: PgPool) {
    stored_events_match_the_journal(pool, 0).await;
}

/// The Events service takes the server's message limit like every other service (until session 22
/// it kept tonic's 4 MiB default whatever `--max-message-bytes` said).
#[sqlx::test]
async fn a_stream_request_past_the_message_limit_is_refused(pool: PgPool) {
    let config = ServeConfig { max_message_bytes: 4 * 1024, ..ServeConfig::default() };
    let mut server = TestServer::start_with(prepared(&pool).await, config).await;
    let mut client = EventsClient::new(server.channel.clone());
    let oversized = pb::StreamEventsRequest { event_types: vec!["x".repeat(8 * 1024)], ..after(0) };
    let refused = client.stream_events(oversized).await.expect_err("too large");
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
    assert_eq!(refused.get_details_error_info().expect("ErrorInfo").reason, "MESSAGE_TOO_LARGE");
    // A request within the limit is served.
    client.stream_events(after(0)).await.expect("stream");
    server.client.open_account(open("open", &usd(3))).await.expect("the ledger carries on");
    server.stop().await;
}

/// A stream's own log lines (here its end at shutdown) carry the correlation id of the call that
/// opened it: the follower runs in the request's span (until session 22 it ran in none, so an
/// internal failure on a stream could not be traced).
#[sqlx::test]
async fn a_streams_log_lines_carry_the_correlation_id_of_its_call(pool: PgPool) {
    let logs = CapturedLogs::installed();
    let server = TestServer::start(prepared(&pool).await).await;
    let mut client = EventsClient::new(server.channel.clone());
    let mut request = tonic::Request::new(after(0));
    request.metadata_mut().insert("x-correlation-id", "trace-stream-1".parse().expect("a header value"));
    let mut stream = client.stream_events(request).await.expect("stream").into_inner();
    let stopping = tokio::spawn(server.stop());
    let bound = std::time::Duration::from_secs(60);
    let ended = tokio::time::timeout(bound, stream.message()).await.expect("the stream ended");
    assert_refused(&ended.expect_err("a status"), Code::Unavailable, "SHUTTING_DOWN");
    drop((stream, client));
    tokio::time::timeout(bound, stopping).await.expect("the server shut down").expect("the stop task");

    let end = logs.line("event stream ended: the server is shutting down", "trace-stream-1");
    assert_eq!(end["span"]["method"], "StreamEvents");
}
