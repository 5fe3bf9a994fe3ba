//! The relay: publishes pending outbox events, in position order, to NATS JetStream, then marks
//! them Published. Runs as a task inside `serve`.
//!
//! Each round takes up to `batch_max_events` due events, sends them all (pipelined, in position
//! order, each with its event id as `Nats-Msg-Id`), awaits every publish acknowledgement, and
//! records the outcome of each in one PostgreSQL transaction. A crash between the publish and the
//! record leaves the events Pending: the next relay publishes them again with the same ids and
//! JetStream drops the copies within its duplicate window (at-least-once, deduplicated by id).
//!
//! A refused or unacknowledged publish counts an attempt and is retried after an exponential
//! backoff; after `max_attempts` the event is Failed with the reason, and later events of the
//! same aggregate are held (not published) until it is re-queued and published, because order
//! per aggregate is the promise. While the relay has no connection to NATS it tries nothing, so an
//! outage alone does not use up attempts. Published events are pruned after `retention_ms`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::context::{Context, PublishAckFuture};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::value::RawValue;
use sqlx::PgPool;
use uuid::Uuid;

use super::OutboxError;
use super::admin::{MAX_PRUNE_ROWS, prune_published};
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
    /// Tries before an event is Failed.
    pub max_attempts: i32,
    /// Wait after the first failed attempt; doubles after each further one.
    pub retry_backoff_ms: u64,
    /// How long a publish acknowledgement may take before the attempt counts as failed.
    pub ack_timeout_ms: u64,
    /// The longest the relay sleeps with nothing due (it also wakes on each journal commit).
    pub idle_poll_ms: u64,
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
            max_attempts: 3,
            retry_backoff_ms: 1_000,
            ack_timeout_ms: 5_000,
            idle_poll_ms: 1_000,
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

/// What one round tried: each event's position and its outcome (the error reason if it failed).
#[derive(Debug, Default)]
pub struct Attempt {
    outcomes: Vec<(i64, i32, Result<bool, String>)>,
}

impl Attempt {
    /// How many events were tried.
    pub fn len(&self) -> usize {
        self.outcomes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.outcomes.is_empty()
    }

    /// How many JetStream acknowledged.
    pub fn acknowledged(&self) -> usize {
        self.outcomes.iter().filter(|(_, _, outcome)| outcome.is_ok()).count()
    }

    /// How many JetStream acknowledged as duplicates (it had them already).
    pub fn duplicates(&self) -> usize {
        self.outcomes.iter().filter(|(_, _, outcome)| matches!(outcome, Ok(true))).count()
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
        let due = self.due_events().await?;
        let mut pending: Vec<(i64, i32, Result<PublishAckFuture, String>)> = Vec::with_capacity(due.len());
        let mut connection_lost = false;
        for event in &due {
            if connection_lost {
                // Sent nothing for the rest: they stay due, untouched, for the next round.
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
            pending.push((event.position, event.attempts, sent));
        }
        let mut attempt = Attempt { outcomes: Vec::with_capacity(pending.len()) };
        for (position, attempts, sent) in pending {
            let outcome = match sent {
                Ok(ack) => ack.await.map(|ack| ack.duplicate).map_err(|error| error.to_string()),
                Err(error) => Err(error),
            };
            attempt.outcomes.push((position, attempts, outcome));
        }
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

    /// The next due events in position order: Pending, due now, and with no earlier event of
    /// their aggregate Failed or waiting for a retry (order per aggregate).
    async fn due_events(&self) -> Result<Vec<DueEvent>, OutboxError> {
        let events: Vec<DueEvent> = sqlx::query_as(
            "SELECT o.position, o.event_id, o.sequence, o.aggregate_type, o.aggregate_id, o.event_type, o.version,
                 o.payload::text, o.metadata::text, o.created_at, o.attempts
             FROM ledger.outbox o
             WHERE o.status = 'pending' AND o.next_attempt_at <= now()
                 AND NOT EXISTS (
                     SELECT 1 FROM ledger.outbox e
                     WHERE e.aggregate_type = o.aggregate_type AND e.aggregate_id = o.aggregate_id
                         AND e.status <> 'published' AND e.position < o.position
                         AND (e.status = 'failed' OR e.next_attempt_at > now()))
             ORDER BY o.position LIMIT $1",
        )
        .bind(self.config.batch_max_events.clamp(1, MAX_BATCH_EVENTS))
        .fetch_all(&self.pool)
        .await?;
        Ok(events)
    }

    /// Records what a round's attempt achieved, in one transaction: acknowledged events become
    /// Published; failed ones count an attempt and wait for their retry, or become Failed.
    pub async fn record(&self, attempt: &Attempt) -> Result<(), OutboxError> {
        if attempt.is_empty() {
            return Ok(());
        }
        let mut published = Vec::new();
        let (mut failed, mut reasons, mut statuses, mut delays_ms) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (position, attempts, outcome) in &attempt.outcomes {
            match outcome {
                Ok(_) => published.push(*position),
                Err(reason) => {
                    let tried = attempts.saturating_add(1);
                    failed.push(*position);
                    reasons.push(truncated(reason));
                    statuses.push(if tried >= self.config.max_attempts { "failed" } else { "pending" });
                    let doubling = u32::try_from(tried.saturating_sub(1)).unwrap_or(0).min(20);
                    let delay_ms = self.config.retry_backoff_ms.saturating_mul(1_u64 << doubling);
                    delays_ms.push(i64::try_from(delay_ms).unwrap_or(i64::MAX));
                }
            }
        }
        let mut tx = self.pool.begin().await?;
        if !published.is_empty() {
            sqlx::query(
                "UPDATE ledger.outbox SET status = 'published', published_at = now(), attempts = attempts + 1
                 WHERE position = ANY($1) AND status = 'pending'",
            )
            .bind(&published)
            .execute(&mut *tx)
            .await?;
        }
        if !failed.is_empty() {
            tracing::warn!(failed = failed.len(), first_reason = %reasons[0], "outbox events not published");
            sqlx::query(
                "UPDATE ledger.outbox AS o SET attempts = o.attempts + 1, last_error = t.r, status = t.st,
                     next_attempt_at = now() + make_interval(secs => t.d::float8 / 1000)
                 FROM UNNEST($1::int8[], $2::text[], $3::text[], $4::int8[]) AS t(p, r, st, d)
                 WHERE o.position = t.p AND o.status = 'pending'",
            )
            .bind(&failed)
            .bind(&reasons)
            .bind(&statuses)
            .bind(&delays_ms)
            .execute(&mut *tx)
            .await?;
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

    /// Deletes published events past the retention (bounded per call).
    pub async fn prune(&self) -> Result<u64, OutboxError> {
        let mut conn = self.pool.acquire().await?;
        prune_published(&mut conn, self.config.retention_ms, MAX_PRUNE_ROWS).await
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
    loop {
        if Instant::now() >= next_prune {
            if let Err(error) = relay.prune().await {
                tracing::warn!(%error, "pruning the outbox failed; retrying later");
            }
            next_prune = Instant::now() + Duration::from_millis(config.prune_interval_ms);
        }
        let mut durability = ledger.durability();
        durability.borrow_and_update();
        let tried = if relay.is_connected() {
            match relay.run_once().await {
                Ok(attempt) => attempt.len(),
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
        }
    }
}
