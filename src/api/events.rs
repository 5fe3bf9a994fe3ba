//! The `diboas.ledger.v1.Events` service: a resumable, server-streaming feed of outbox events.
//!
//! A stream reads committed events from `ledger.outbox_events` page by page in position order (so an
//! event shows only once its change is durable, and a consumer resuming after its last position
//! gets no gap and no duplicate), then follows live: it sleeps until the journal commits again
//! (the ledger's durability watch), with a poll interval as a fallback.
//!
//! Each stream has a bounded buffer of `buffer_events`. A consumer that leaves it full for
//! `slow_consumer_grace_ms` is cut: the stream ends with RESOURCE_EXHAUSTED (CONSUMER_TOO_SLOW)
//! carrying the position to resume after, which is the last event it was sent; the buffered
//! events arrive before that status. At most `max_streams` streams run at once. When the server
//! begins a graceful shutdown every open stream ends with UNAVAILABLE (SHUTTING_DOWN) and its
//! resume position, since the shutdown waits for every open call.
//!
//! Authorisation (for the lead's scope check): operation `StreamEvents`, reads events of every
//! domain (banking, investing, defi).

use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::Stream;
use sqlx::PgPool;
use tokio::sync::mpsc::error::SendTimeoutError;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::event_convert::{self, Start};
use super::gate::Gate;
use super::pb;
use super::status::ApiError;
use crate::ledger::Ledger;
use crate::outbox::read::{EventFilter, MAX_PAGE_EVENTS, events_after, last_position, pruned_through};

/// The operation name of the one RPC, for authorisation and logs.
pub const OPERATION: &str = "StreamEvents";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventsConfig {
    /// Events a stream holds for its consumer before it counts as slow.
    pub buffer_events: usize,
    /// How long a full buffer may stay full before the stream is cut.
    pub slow_consumer_grace_ms: u64,
    /// Streams open at once; more are refused (RESOURCE_EXHAUSTED, TOO_MANY_STREAMS).
    pub max_streams: usize,
    /// Events read from PostgreSQL per query (at most `MAX_PAGE_EVENTS`).
    pub page_events: i64,
    /// The longest a caught-up stream waits before looking again without a commit wake-up.
    pub idle_poll_ms: u64,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            buffer_events: 1_024,
            slow_consumer_grace_ms: 5_000,
            max_streams: 256,
            page_events: 500,
            idle_poll_ms: 1_000,
        }
    }
}

pub struct EventsService {
    ledger: Arc<Ledger>,
    gate: Arc<Gate>,
    pool: PgPool,
    config: EventsConfig,
    streams: Arc<Semaphore>,
    closing: watch::Receiver<bool>,
}

impl EventsService {
    /// `closing` turns true when the server begins to shut down: every open stream then ends
    /// with UNAVAILABLE `SHUTTING_DOWN` and its resume position, because a graceful shutdown
    /// waits for every open call and a stream would otherwise never end.
    pub fn new(
        ledger: Arc<Ledger>,
        gate: Arc<Gate>,
        pool: PgPool,
        config: EventsConfig,
        closing: watch::Receiver<bool>,
    ) -> EventsService {
        let streams = Arc::new(Semaphore::new(config.max_streams));
        EventsService { ledger, gate, pool, config, streams, closing }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

#[tonic::async_trait]
impl pb::events_server::Events for EventsService {
    type StreamEventsStream = EventStream;

    async fn stream_events(&self, request: Request<pb::StreamEventsRequest>) -> Result<Response<EventStream>, Status> {
        self.gate.handle(OPERATION, request, |body| self.open_stream(body)).await
    }
}

impl EventsService {
    /// Opens a stream: checks the request, takes a stream slot, finds the start position and
    /// starts the follower. The gate's deadline covers only this; the stream itself runs on.
    async fn open_stream(&self, body: pb::StreamEventsRequest) -> Result<EventStream, ApiError> {
        let (start, filter) = event_convert::stream_request(&body)?;
        let permit = Arc::clone(&self.streams)
            .try_acquire_owned()
            .map_err(|_| ApiError::TooManyStreams { max: self.config.max_streams })?;
        let after_position = match start {
            // 0 is "from the oldest kept", as the proto says: after the pruned prefix (until
            // session 22 it was refused as pruned once anything had been).
            Start::AfterPosition(0) => {
                let read = async { pruned_through(&mut *self.pool.acquire().await?).await };
                read.await.map_err(|source| ApiError::Events { source, resume_after_position: 0 })?
            }
            Start::AfterPosition(position) => position,
            Start::Now => {
                let read = async { last_position(&mut *self.pool.acquire().await?).await };
                read.await.map_err(|source| ApiError::Events { source, resume_after_position: 0 })?
            }
        };
        tracing::debug!(after_position, "event stream opened");
        let (sender, events) = mpsc::channel(self.config.buffer_events.max(1));
        let (end_sender, end) = oneshot::channel();
        let follower = Follower {
            ledger: Arc::downgrade(&self.ledger),
            pool: self.pool.clone(),
            config: self.config,
            filter,
            last_position: after_position,
            from_oldest: matches!(start, Start::AfterPosition(0)),
            sender,
            closing: self.closing.clone(),
            _permit: permit,
        };
        // In the request's span, so the follower's log lines (a failed read, a slow consumer cut,
        // the shutdown) carry the correlation id of the call that opened the stream; spawned
        // without it, an internal failure on a stream could not be traced (session 22).
        let follow = async move {
            if let Some(status) = follower.run().await {
                // The consumer may be gone already; then nobody needs the status.
                let _ = end_sender.send(status);
            }
        };
        tokio::spawn(follow.instrument(tracing::Span::current()));
        Ok(Box::pin(ending_with(events, end)) as EventStream)
    }
}

/// The buffered events, then the stream's final status if it ended on one.
fn ending_with(
    events: mpsc::Receiver<pb::Event>,
    end: oneshot::Receiver<Status>,
) -> impl Stream<Item = Result<pb::Event, Status>> + Send {
    futures_util::stream::unfold(Some((events, end)), |state| async move {
        let (mut events, end) = state?;
        match events.recv().await {
            Some(event) => Some((Ok(event), Some((events, end)))),
            None => end.await.ok().map(|status| (Err(status), None)),
        }
    })
}

/// One stream's reader: pages through the outbox after `last_position`, then follows commits.
struct Follower {
    /// Weak, so an open stream never keeps the ledger from shutting down.
    ledger: Weak<Ledger>,
    pool: PgPool,
    config: EventsConfig,
    filter: EventFilter,
    /// The position through which every event the consumer asked for is in its buffer (where
    /// it resumes if cut).
    last_position: i64,
    /// A stream from 0 ("from the oldest kept") that has not read a page yet: a prune that
    /// overtakes it before then took nothing it was owed, so it starts after the new prefix
    /// instead of ending as pruned (found in review, session 23).
    from_oldest: bool,
    sender: mpsc::Sender<pb::Event>,
    closing: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
}

impl Follower {
    /// Runs until the consumer leaves (None) or the stream must end with a status.
    async fn run(mut self) -> Option<Status> {
        let page_events = self.config.page_events.clamp(1, MAX_PAGE_EVENTS);
        let grace = Duration::from_millis(self.config.slow_consumer_grace_ms);
        let idle = Duration::from_millis(self.config.idle_poll_ms.max(1));
        loop {
            let closing_now = *self.closing.borrow();
            if closing_now {
                return Some(self.shutting_down());
            }
            // Taken before the read, so a commit landing during the read still wakes us.
            let mut durability = self.ledger.upgrade()?.durability();
            durability.borrow_and_update();
            let page = match self.read(page_events).await {
                Ok(page) => page,
                Err(crate::outbox::OutboxError::Pruned { pruned_through, .. }) if self.from_oldest => {
                    self.last_position = pruned_through;
                    continue;
                }
                Err(source) => {
                    return Some(Status::from(ApiError::Events { source, resume_after_position: self.last_position }));
                }
            };
            self.from_oldest = false;
            let caught_up = (page.events.len() as i64) < page_events;
            for stored in page.events {
                let position = stored.position;
                debug_assert!(position > self.last_position, "events must come in position order");
                match self.sender.send_timeout(event_convert::event(stored), grace).await {
                    Ok(()) => self.last_position = position,
                    Err(SendTimeoutError::Timeout(_)) => {
                        tracing::info!(resume_after_position = self.last_position, "event consumer too slow: cut");
                        return Some(Status::from(ApiError::ConsumerTooSlow {
                            resume_after_position: self.last_position,
                            buffer_events: self.config.buffer_events,
                        }));
                    }
                    Err(SendTimeoutError::Closed(_)) => return None,
                }
            }
            // Everything the consumer asked for up to here is in its buffer: a filtered stream
            // moves on past the events it does not want (see `Page::scanned_through`).
            self.last_position = self.last_position.max(page.scanned_through);
            if caught_up {
                let mut closing = self.closing.clone();
                tokio::select! {
                    changed = durability.changed() => {
                        if changed.is_err() {
                            // The journal writer is being replaced: poll until the new one runs.
                            tokio::time::sleep(idle).await;
                        }
                    }
                    () = tokio::time::sleep(idle) => {}
                    () = self.sender.closed() => return None,
                    () = async { let _ = closing.wait_for(|closing| *closing).await; } => return Some(self.shutting_down()),
                }
            }
        }
    }

    fn shutting_down(&self) -> Status {
        tracing::debug!(resume_after_position = self.last_position, "event stream ended: the server is shutting down");
        Status::from(ApiError::ShuttingDown { resume_after_position: self.last_position })
    }

    async fn read(&self, page_events: i64) -> Result<crate::outbox::read::Page, crate::outbox::OutboxError> {
        let mut conn = self.pool.acquire().await?;
        events_after(&mut conn, self.last_position, &self.filter, page_events).await
    }
}
