//! The relay: publishes outbox events, in position order, to NATS JetStream, then records what
//! it published. Runs as a task inside `serve`.
//!
//! Events are never updated: the relay's progress is a cursor (`ledger.outbox_deliveries`, one
//! row per round, the largest `through_position` wins) and the few events that need more than
//! one try live in `ledger.outbox_retries` (docs/OUTBOX.md). Each round takes the due retries,
//! then the events after the cursor, up to `batch_max_events` in all; sends them (pipelined, in
//! position order, each with its event id as `Nats-Msg-Id`), awaits every publish
//! acknowledgement, and records the round in one PostgreSQL transaction that also moves the
//! cursor. A crash between the publish and the record leaves the cursor where it was: the next
//! relay publishes the same events again with the same ids and JetStream drops the copies within
//! its duplicate window (at-least-once, deduplicated by id).
//!
//! A refused or unacknowledged publish counts an attempt and is retried after an exponential
//! backoff; after `max_attempts` the event is Failed with the reason. A later event of an
//! aggregate with an unpublished retry is held (stored as a retry with no attempt yet) and goes
//! out only after it, because order per aggregate is the promise. While the relay has no
//! connection to NATS it tries nothing, so an outage alone does not use up attempts. Published
//! events are pruned after `retention_ms`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::context::{Context, PublishAckFuture};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::value::RawValue;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::OutboxError;
use super::admin::{MAX_PRUNE_ROWS, PRUNE_PASS_BUDGET, PrunePass, prune_pass};
use crate::ledger::Ledger;

/// The most events one relay round may take (and so hold unacknowledged in flight).
pub const MAX_BATCH_EVENTS: i64 = 10_000;

/// The longest a stored error reason may be.
const MAX_ERROR_LEN: usize = 500;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayConfig {
    /// The NATS server, e.g. `nats://127.0.0.1:4222`.
    pub nats_url: String,
    /// The JetStream stream the relay creates (or updates) to hold the events.
    pub stream_name: String,
    /// Events go to `<subject_prefix>.<aggregate>.<type>`; the stream takes `<subject_prefix>.>`.
    pub subject_prefix: String,
    /// JetStream drops a message whose id it saw within this window.
    pub duplicate_window_ms: u64,
    /// The most events one round publishes (at most [`MAX_BATCH_EVENTS`]).
    pub batch_max_events: i64,
    /// Tries before an event is Failed: the first and the platform spec's "max 3 retries".
    pub max_attempts: i32,
    /// Wait after the first failed attempt; doubles after each further one.
    pub retry_backoff_ms: u64,
    /// How long a publish acknowledgement may take before the attempt counts as failed.
    pub ack_timeout_ms: u64,
    /// The longest the relay sleeps with nothing due (it also wakes on each journal commit).
    pub idle_poll_ms: u64,
    /// The shortest time between the starts of two rounds that were not full: under load the
    /// journal commits hundreds of times a second, and a round per commit would spend the
    /// writer's CPU on tiny rounds; waiting this long lets a round take many commits' events.
    pub min_round_interval_ms: u64,
    /// How long published events are kept before pruning.
    pub retention_ms: u64,
    /// How often pruning runs.
    pub prune_interval_ms: u64,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            nats_url: "nats://127.0.0.1:4222".to_owned(),
            stream_name: "DIBOAS_LEDGER".to_owned(),
            subject_prefix: "diboas.ledger".to_owned(),
            duplicate_window_ms: 10 * 60 * 1_000,
            batch_max_events: 5_000,
            max_attempts: 4,
            retry_backoff_ms: 1_000,
            ack_timeout_ms: 5_000,
            idle_poll_ms: 1_000,
            min_round_interval_ms: 20,
            retention_ms: 7 * 24 * 60 * 60 * 1_000,
            prune_interval_ms: 60 * 60 * 1_000,
        }
    }
}

/// A due event, as the relay publishes it.
#[derive(Debug, Clone, sqlx::FromRow)]
struct DueEvent {
    position: i64,
    event_id: Uuid,
    sequence: i64,
    aggregate_type: String,
    aggregate_id: String,
    event_type: String,
    version: i16,
    payload: String,
    metadata: String,
    created_at: DateTime<Utc>,
    attempts: i32,
    /// Whether it comes from `ledger.outbox_retries` (else it is after the cursor).
    retried: bool,
}

/// The message body on NATS: the event with its envelope.
#[derive(Serialize)]
struct Envelope<'a> {
    event_id: Uuid,
    position: i64,
    sequence: i64,
    aggregate_type: &'a str,
    aggregate_id: &'a str,
    event_type: &'a str,
    version: i16,
    created_at: DateTime<Utc>,
    payload: &'a RawValue,
    metadata: &'a RawValue,
}

/// One event a round tried: its position, attempts before this one, whether it was a retry, and
/// the outcome (whether JetStream already had it, or why it failed).
#[derive(Debug)]
struct Tried {
    position: i64,
    attempts: i32,
    retried: bool,
    outcome: Result<bool, String>,
}

/// What one round did: the events it tried, the events after the cursor it held back, and how
/// far it moves the cursor.
#[derive(Debug, Default)]
pub struct Attempt {
    /// The cursor the round started from, and the last position after it that the round covers.
    cursor: i64,
    through: Option<i64>,
    tried: Vec<Tried>,
    held: Vec<i64>,
}

impl Attempt {
    /// How many events were tried.
    pub fn len(&self) -> usize {
        self.tried.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tried.is_empty()
    }

    /// How many JetStream acknowledged.
    pub fn acknowledged(&self) -> usize {
        self.tried.iter().filter(|tried| tried.outcome.is_ok()).count()
    }

    /// How many JetStream acknowledged as duplicates (it had them already).
    pub fn duplicates(&self) -> usize {
        self.tried.iter().filter(|tried| matches!(tried.outcome, Ok(true))).count()
    }

    /// How many events after the cursor were held behind an unpublished event of their aggregate.
    pub fn held(&self) -> usize {
        self.held.len()
    }
}

pub struct Relay {
    config: RelayConfig,
    pool: PgPool,
    client: async_nats::Client,
    jetstream: Context,
}

impl Relay {
    /// Connects to NATS and creates (or updates) the stream.
    pub async fn connect(config: RelayConfig, pool: PgPool) -> Result<Relay, OutboxError> {
        let client = async_nats::ConnectOptions::new()
            .name("diboas-ledger-outbox")
            .connection_timeout(Duration::from_millis(config.ack_timeout_ms))
            .connect(config.nats_url.as_str())
            .await?;
        // A round sends every event before awaiting the acknowledgements, so the client must
        // allow a whole round in flight (its default of 5 000 would block the round forever).
        let jetstream = async_nats::jetstream::ContextBuilder::new()
            .timeout(Duration::from_millis(config.ack_timeout_ms))
            .max_ack_inflight(MAX_BATCH_EVENTS as usize)
            .build(client.clone());
        jetstream
            .create_or_update_stream(stream::Config {
                name: config.stream_name.clone(),
                subjects: vec![format!("{}.>", config.subject_prefix)],
                duplicate_window: Duration::from_millis(config.duplicate_window_ms),
                ..Default::default()
            })
            .await?;
        Ok(Relay { config, pool, client, jetstream })
    }

    pub fn config(&self) -> &RelayConfig {
        &self.config
    }

    /// The subject of an event.
    pub fn subject(&self, aggregate_type: &str, event_type: &str) -> String {
        format!("{}.{aggregate_type}.{event_type}", self.config.subject_prefix)
    }

    /// Whether the NATS connection is up (the relay tries nothing while it is not).
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Publishes the next due events and awaits their acknowledgements, WITHOUT recording the
    /// outcome: [`Relay::record`] does that. Split so a test can stop in between, as a crash would.
    pub async fn publish_due(&self) -> Result<Attempt, OutboxError> {
        let mut conn = self.pool.acquire().await?;
        let (cursor,): (i64,) =
            sqlx::query_as("SELECT COALESCE(max(through_position), 0) FROM ledger.outbox_deliveries")
                .fetch_one(&mut *conn)
                .await?;
        let limit = self.config.batch_max_events.clamp(1, MAX_BATCH_EVENTS);
        let mut due = due_retries(&mut conn, limit).await?;
        let mut attempt = Attempt { cursor, ..Attempt::default() };
        let room = limit - i64::try_from(due.len()).unwrap_or(limit);
        if room > 0 {
            let fresh = events_after_cursor(&mut conn, cursor, room).await?;
            attempt.through = fresh.last().map(|event| event.position);
            let waiting = aggregates_with_unpublished_retries(&mut conn).await?;
            for event in fresh {
                if !waiting.is_empty() && waiting.contains(&(event.aggregate_type.clone(), event.aggregate_id.clone()))
                {
                    attempt.held.push(event.position);
                } else {
                    due.push(event);
                }
            }
        }
        drop(conn);
        let mut pending: Vec<(&DueEvent, Result<PublishAckFuture, String>)> = Vec::with_capacity(due.len());
        let mut connection_lost = false;
        for event in &due {
            if connection_lost {
                // Sent nothing for the rest: retries stay due, and the cursor stops before the
                // first event after it that was not sent.
                break;
            }
            let sent = match self.message(event) {
                Ok(message) => self
                    .jetstream
                    .send_publish(self.subject(&event.aggregate_type, &event.event_type), message)
                    .await
                    .map_err(|error| error.to_string()),
                Err(error) => Err(error),
            };
            connection_lost = sent.is_err() && !self.is_connected();
            pending.push((event, sent));
        }
        if let Some(unsent) = due[pending.len()..].iter().find(|event| !event.retried) {
            let through = unsent.position - 1;
            attempt.through = (through > cursor).then_some(through);
            attempt.held.retain(|position| *position <= through);
        }
        // Awaited together: each acknowledgement's timeout starts when it is first awaited, so
        // awaited one after another, a JetStream that took publishes and never answered cost a
        // round one timeout per event (5,000 events at 5 s: about 7 hours; session 22).
        let tried = futures_util::future::join_all(pending.into_iter().map(|(event, sent)| async move {
            let outcome = match sent {
                Ok(ack) => ack.await.map(|ack| ack.duplicate).map_err(|error| error.to_string()),
                Err(error) => Err(error),
            };
            Tried { position: event.position, attempts: event.attempts, retried: event.retried, outcome }
        }))
        .await;
        attempt.tried.extend(tried);
        Ok(attempt)
    }

    fn message(&self, event: &DueEvent) -> Result<PublishMessage, String> {
        let payload = RawValue::from_string(event.payload.clone()).map_err(|error| error.to_string())?;
        let metadata = RawValue::from_string(event.metadata.clone()).map_err(|error| error.to_string())?;
        let body = serde_json::to_vec(&Envelope {
            event_id: event.event_id,
            position: event.position,
            sequence: event.sequence,
            aggregate_type: &event.aggregate_type,
            aggregate_id: &event.aggregate_id,
            event_type: &event.event_type,
            version: event.version,
            created_at: event.created_at,
            payload: &payload,
            metadata: &metadata,
        })
        .map_err(|error| error.to_string())?;
        Ok(PublishMessage::build()
            .payload(body.into())
            .message_id(event.event_id.to_string())
            .header("Diboas-Position", event.position.to_string().as_str()))
    }

    /// Records what a round achieved, in one transaction: acknowledged retries become Published;
    /// failed events count an attempt and wait for their retry, or become Failed; held events
    /// become retries with no attempt yet; and the cursor moves past the round. Fails with
    /// [`OutboxError::CursorMoved`], recording nothing, if another relay moved the cursor
    /// meanwhile (the events both sent are deduplicated by id).
    pub async fn record(&self, attempt: &Attempt) -> Result<(), OutboxError> {
        let mut published_retries = Vec::new();
        let mut retries = RetryRows::default();
        for tried in &attempt.tried {
            match &tried.outcome {
                Ok(_) if tried.retried => published_retries.push(tried.position),
                Ok(_) => {}
                Err(reason) => {
                    let attempts = tried.attempts.saturating_add(1);
                    let status = if attempts >= self.config.max_attempts { "failed" } else { "pending" };
                    let doubling = u32::try_from(attempts.saturating_sub(1)).unwrap_or(0).min(20);
                    let delay_ms = self.config.retry_backoff_ms.saturating_mul(1_u64 << doubling);
                    retries.push(tried.position, status, attempts, delay_ms, Some(truncated(reason)));
                }
            }
        }
        if let Some(Some(reason)) = retries.reasons.first() {
            tracing::warn!(failed = retries.positions.len(), first_reason = %reason, "outbox events not published");
        }
        for position in &attempt.held {
            retries.push(*position, "pending", 0, 0, None);
        }
        if published_retries.is_empty() && retries.positions.is_empty() && attempt.through.is_none() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        if !published_retries.is_empty() {
            sqlx::query(
                "UPDATE ledger.outbox_retries SET status = 'published', published_at = now(), attempts = attempts + 1
                 WHERE position = ANY($1) AND status = 'pending'",
            )
            .bind(&published_retries)
            .execute(&mut *tx)
            .await?;
        }
        if !retries.positions.is_empty() {
            // An event's first failure (or its hold) inserts its row; a later failure updates it.
            sqlx::query(
                "INSERT INTO ledger.outbox_retries AS r (position, status, attempts, next_attempt_at, last_error)
                 SELECT p, st, n, now() + make_interval(secs => d::float8 / 1000), e
                 FROM UNNEST($1::int8[], $2::text[], $3::int4[], $4::int8[], $5::text[]) AS t(p, st, n, d, e)
                 ON CONFLICT (position) DO UPDATE SET status = EXCLUDED.status, attempts = EXCLUDED.attempts,
                     next_attempt_at = EXCLUDED.next_attempt_at, last_error = EXCLUDED.last_error
                 WHERE r.status = 'pending'",
            )
            .bind(&retries.positions)
            .bind(&retries.statuses)
            .bind(&retries.attempts)
            .bind(&retries.delays_ms)
            .bind(&retries.reasons)
            .execute(&mut *tx)
            .await?;
        }
        if let Some(through) = attempt.through {
            let moved = sqlx::query(
                "INSERT INTO ledger.outbox_deliveries (through_position)
                 SELECT $2 WHERE (SELECT COALESCE(max(through_position), 0) FROM ledger.outbox_deliveries) = $1",
            )
            .bind(attempt.cursor)
            .bind(through)
            .execute(&mut *tx)
            .await?;
            if moved.rows_affected() != 1 {
                return Err(OutboxError::CursorMoved { from: attempt.cursor });
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// One round: publish what is due and record it. Returns what was tried.
    pub async fn run_once(&self) -> Result<Attempt, OutboxError> {
        let attempt = self.publish_due().await?;
        self.record(&attempt).await?;
        Ok(attempt)
    }

    /// Deletes published events past the retention, for at most [`PRUNE_PASS_BUDGET`].
    pub async fn prune(&self) -> Result<PrunePass, OutboxError> {
        let mut conn = self.pool.acquire().await?;
        prune_pass(&mut conn, self.config.retention_ms, MAX_PRUNE_ROWS, PRUNE_PASS_BUDGET).await
    }
}

fn truncated(reason: &str) -> String {
    let mut end = reason.len().min(MAX_ERROR_LEN);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_owned()
}

/// The relay task of `serve`: connects (retrying while NATS is unreachable), then publishes
/// forever, waking on each journal commit and at least every `idle_poll_ms`. Ends only when
/// aborted; an abort at any point is safe (see the module comment).
pub async fn run_forever(config: RelayConfig, pool: PgPool, ledger: Arc<Ledger>) {
    let idle = Duration::from_millis(config.idle_poll_ms.max(1));
    let relay = loop {
        match Relay::connect(config.clone(), pool.clone()).await {
            Ok(relay) => break relay,
            Err(error) => {
                tracing::warn!(%error, retry_in_ms = config.idle_poll_ms, "outbox relay cannot start yet");
                tokio::time::sleep(idle).await;
            }
        }
    };
    tracing::info!(stream = %config.stream_name, "outbox relay publishing to NATS JetStream");
    let mut next_prune = Instant::now();
    let min_round_interval = Duration::from_millis(config.min_round_interval_ms);
    let full_round = usize::try_from(config.batch_max_events.clamp(1, MAX_BATCH_EVENTS)).unwrap_or(usize::MAX);
    loop {
        let round_started = Instant::now();
        if Instant::now() >= next_prune {
            let behind = match relay.prune().await {
                Ok(pass) => !pass.caught_up,
                Err(error) => {
                    tracing::warn!(%error, "pruning the outbox failed; retrying later");
                    false
                }
            };
            // Behind: prune again after this round, not an interval later.
            let wait = if behind { Duration::ZERO } else { Duration::from_millis(config.prune_interval_ms) };
            next_prune = Instant::now() + wait;
        }
        let mut durability = ledger.durability();
        durability.borrow_and_update();
        let tried = if relay.is_connected() {
            match relay.run_once().await {
                Ok(attempt) => attempt.len() + attempt.held(),
                Err(error) => {
                    tracing::warn!(%error, "outbox relay round failed; retrying");
                    0
                }
            }
        } else {
            0
        };
        if tried == 0 {
            // Nothing due (or no connection): wait for a commit or the poll interval.
            if let Ok(Err(_)) = tokio::time::timeout(idle, durability.changed()).await {
                // The journal writer is gone (the ledger is reloading): no wake-ups until then.
                tokio::time::sleep(idle).await;
            }
        } else if tried < full_round {
            tokio::time::sleep_until((round_started + min_round_interval).into()).await;
        }
    }
}

/// Rows for `ledger.outbox_retries`, as bound arrays.
#[derive(Default)]
struct RetryRows {
    positions: Vec<i64>,
    statuses: Vec<&'static str>,
    attempts: Vec<i32>,
    delays_ms: Vec<i64>,
    reasons: Vec<Option<String>>,
}

impl RetryRows {
    fn push(&mut self, position: i64, status: &'static str, attempts: i32, delay_ms: u64, reason: Option<String>) {
        self.positions.push(position);
        self.statuses.push(status);
        self.attempts.push(attempts);
        self.delays_ms.push(i64::try_from(delay_ms).unwrap_or(i64::MAX));
        self.reasons.push(reason);
    }
}

/// Retries due now, in position order, except those with an earlier unpublished event of their
/// aggregate that is Failed or still waiting for its own retry (order per aggregate).
async fn due_retries(conn: &mut PgConnection, limit: i64) -> Result<Vec<DueEvent>, OutboxError> {
    let events = sqlx::query_as(
        "SELECT e.position, e.event_id, e.sequence, e.aggregate_type, e.aggregate_id, e.event_type, e.version,
             e.payload::text, e.metadata::text, e.created_at, r.attempts, true AS retried
         FROM ledger.outbox_retries r JOIN ledger.outbox_events e ON e.position = r.position
         WHERE r.status = 'pending' AND r.next_attempt_at <= now()
             AND NOT EXISTS (
                 SELECT 1 FROM ledger.outbox_retries er JOIN ledger.outbox_events ee ON ee.position = er.position
                 WHERE er.status <> 'published' AND er.position < r.position
                     AND ee.aggregate_type = e.aggregate_type AND ee.aggregate_id = e.aggregate_id
                     AND (er.status = 'failed' OR er.next_attempt_at > now()))
         ORDER BY r.position LIMIT $1",
    )
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    Ok(events)
}

/// Up to `limit` events after the cursor, in position order.
async fn events_after_cursor(conn: &mut PgConnection, cursor: i64, limit: i64) -> Result<Vec<DueEvent>, OutboxError> {
    let events = sqlx::query_as(
        "SELECT position, event_id, sequence, aggregate_type, aggregate_id, event_type, version, payload::text,
             metadata::text, created_at, 0 AS attempts, false AS retried
         FROM ledger.outbox_events WHERE position > $1 ORDER BY position LIMIT $2",
    )
    .bind(cursor)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    Ok(events)
}

/// The aggregates with an unpublished retry: their later events must wait behind it.
async fn aggregates_with_unpublished_retries(
    conn: &mut PgConnection,
) -> Result<HashSet<(String, String)>, OutboxError> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT DISTINCT e.aggregate_type, e.aggregate_id
         FROM ledger.outbox_retries r JOIN ledger.outbox_events e ON e.position = r.position
         WHERE r.status <> 'published'",
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().collect())
}
