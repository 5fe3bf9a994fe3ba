//! Helpers shared by the outbox tests: a relay configuration with a stream and subject prefix of
//! its own (tests run in parallel against the one local NATS server), reading back what JetStream
//! holds, and reading the outbox table.

#![allow(dead_code, reason = "each test binary uses a different subset of these helpers")]

use std::collections::BTreeMap;

use diboas_ledger::outbox::relay::RelayConfig;
use sqlx::PgPool;
use uuid::Uuid;

/// A relay configuration on its own JetStream stream and subjects.
pub fn relay_config(nats_url: &str) -> RelayConfig {
    let tag = Uuid::new_v4().simple().to_string();
    RelayConfig {
        nats_url: nats_url.to_owned(),
        stream_name: format!("TEST_{tag}"),
        subject_prefix: format!("test{tag}.diboas.ledger"),
        retry_backoff_ms: 0,
        idle_poll_ms: 50,
        ..RelayConfig::default()
    }
}

pub const NATS_URL: &str = "nats://127.0.0.1:4222";

/// (position, event_id, aggregate_type, aggregate_id, event_type, status, attempts, last_error)
pub type OutboxRow = (i64, Uuid, String, String, String, String, i32, Option<String>);

pub async fn outbox_rows(pool: &PgPool) -> Vec<OutboxRow> {
    sqlx::query_as(
        "SELECT position, event_id, aggregate_type, aggregate_id, event_type, status, attempts, last_error
         FROM ledger.outbox ORDER BY position",
    )
    .fetch_all(pool)
    .await
    .expect("read the outbox")
}

/// Every message of the stream, in stream order: (Nats-Msg-Id, subject, Diboas-Position).
pub async fn stream_messages(config: &RelayConfig) -> Vec<(Uuid, String, i64)> {
    let client = async_nats::connect(NATS_URL).await.expect("connect to NATS");
    let jetstream = async_nats::jetstream::new(client);
    let mut stream = jetstream.get_stream(&config.stream_name).await.expect("the stream exists");
    let last = stream.info().await.expect("stream info").state.last_sequence;
    let mut messages = Vec::new();
    for sequence in 1..=last {
        let message = stream.get_raw_message(sequence).await.expect("a stored message");
        let id = message.headers.get("Nats-Msg-Id").expect("a message id").as_str().parse().expect("a uuid");
        let position = message.headers.get("Diboas-Position").expect("a position").as_str().parse().expect("a number");
        messages.push((id, message.subject.to_string(), position));
    }
    messages
}

/// Deletes the stream (end of test, or to make publishes fail).
pub async fn delete_stream(config: &RelayConfig) {
    let client = async_nats::connect(NATS_URL).await.expect("connect to NATS");
    let jetstream = async_nats::jetstream::new(client);
    let _ = jetstream.delete_stream(&config.stream_name).await;
}

/// Asserts JetStream holds each outbox event exactly once, and in position order per aggregate.
pub async fn assert_published_exactly_once(pool: &PgPool, config: &RelayConfig) {
    let rows = outbox_rows(pool).await;
    assert!(rows.iter().all(|row| row.5 == "published"), "not all published: {rows:?}");
    let messages = stream_messages(config).await;
    let ids: Vec<Uuid> = messages.iter().map(|message| message.0).collect();
    let mut expected: Vec<Uuid> = rows.iter().map(|row| row.1).collect();
    let mut seen = ids.clone();
    seen.sort();
    expected.sort();
    assert_eq!(seen, expected, "JetStream must hold every event exactly once");
    let aggregate_of: BTreeMap<Uuid, (String, String)> =
        rows.iter().map(|row| (row.1, (row.2.clone(), row.3.clone()))).collect();
    let mut last_per_aggregate: BTreeMap<(String, String), i64> = BTreeMap::new();
    for (id, subject, position) in &messages {
        let aggregate = aggregate_of[id].clone();
        assert!(subject.starts_with(&config.subject_prefix), "{subject}");
        let last = last_per_aggregate.entry(aggregate.clone()).or_insert(0);
        assert!(*position > *last, "{aggregate:?}: position {position} after {last}");
        *last = *position;
    }
}
