//! The outbox relay against the real PostgreSQL and the real NATS JetStream: publishing in
//! order, a crash between publishing and recording (republished, deduplicated by id), refused
//! publishes (attempts, Failed with the reason, later events of the aggregate held, requeue), and
//! NATS unreachable for a while behind a TCP proxy (nothing lost).

mod grpc_common;
mod outage_proxy;
mod outbox_common;

use diboas_ledger::api::pb;
use diboas_ledger::api::server::ServeConfig;
use diboas_ledger::ledger::LedgerConfig;
use diboas_ledger::outbox::OutboxError;
use diboas_ledger::outbox::admin::{PrunePass, prune_pass, prune_published, requeue_failed};
use diboas_ledger::outbox::read::{EventFilter, events_after};
use diboas_ledger::outbox::relay::{Relay, RelayConfig};
use grpc_common::*;
use outbox_common::*;
use sqlx::PgPool;

/// Opens the accounts numbered `accounts` and deposits into each `deposits` times: 1 + deposits events each.
async fn make_events(server: &mut TestServer, accounts: std::ops::Range<u128>, deposits: usize) {
    for n in accounts {
        let account = usd(n);
        server.client.open_account(open(&format!("open-{n}"), &account)).await.expect("open");
        for index in 0..deposits {
            server.client.deposit(deposit(&format!("dep-{n}-{index}"), &account, "1.00")).await.expect("deposit");
        }
    }
}

async fn publish_all(relay: &Relay) {
    while !relay.run_once().await.expect("a relay round").is_empty() {}
}

#[sqlx::test]
async fn publishes_every_event_once_in_order(pool: PgPool) {
    let mut server = TestServer::start(prepared(&pool).await).await;
    make_events(&mut server, 0..3, 4).await;
    let config = relay_config(NATS_URL);
    let relay = Relay::connect(config.clone(), pool.clone()).await.expect("connect the relay");
    publish_all(&relay).await;
    let rows = outbox_rows(&pool).await;
    assert_eq!(rows.len(), 3 * 5);
    assert!(rows.iter().all(|row| row.6 == 1), "each published at the first attempt: {rows:?}");
    assert_published_exactly_once(&pool, &config).await;
    let subjects: Vec<String> = stream_messages(&config).await.into_iter().map(|message| message.1).collect();
    assert_eq!(subjects[0], format!("{}.account.opened", config.subject_prefix));
    assert_eq!(subjects[1], format!("{}.account.balance_changed", config.subject_prefix));
    delete_stream(&config).await;
    server.stop().await;
}

#[sqlx::test]
async fn a_crash_between_publish_and_record_republishes_and_jetstream_deduplicates(pool: PgPool) {
    let mut server = TestServer::start(prepared(&pool).await).await;
    make_events(&mut server, 0..2, 5).await;
    let config = relay_config(NATS_URL);
    let crashed = Relay::connect(config.clone(), pool.clone()).await.expect("connect the relay");
    // The fault point: published and acknowledged, then the relay dies before recording it.
    let attempt = crashed.publish_due().await.expect("publish");
    assert_eq!(attempt.acknowledged(), 12);
    drop(crashed);
    assert!(outbox_rows(&pool).await.iter().all(|row| row.5 == "pending" && row.6 == 0));

    let restarted = Relay::connect(config.clone(), pool.clone()).await.expect("reconnect the relay");
    let again = restarted.run_once().await.expect("republish");
    assert_eq!(again.len(), 12);
    assert_eq!(again.duplicates(), 12, "JetStream recognises every republished id");
    publish_all(&restarted).await;
    assert_published_exactly_once(&pool, &config).await;
    delete_stream(&config).await;
    server.stop().await;
}

#[sqlx::test]
async fn refused_publishes_fail_after_three_retries_hold_the_aggregate_and_requeue(pool: PgPool) {
    let mut server = TestServer::start(prepared(&pool).await).await;
    make_events(&mut server, 0..2, 2).await;
    let config = relay_config(NATS_URL);
    let relay = Relay::connect(config.clone(), pool.clone()).await.expect("connect the relay");
    // No stream: JetStream refuses every publish (no responders).
    delete_stream(&config).await;
    // The first try and the spec's three retries (until session 22: two retries).
    for round in 1..=4 {
        let rows = outbox_rows(&pool).await;
        assert!(rows.iter().all(|row| row.5 != "failed"), "failed before round {round}: {rows:?}");
        let attempt = relay.run_once().await.expect("a relay round");
        assert_eq!(attempt.len(), 6, "round {round} tries every event");
        assert_eq!(attempt.acknowledged(), 0);
    }
    let rows = outbox_rows(&pool).await;
    assert!(rows.iter().all(|row| row.5 == "failed" && row.6 == 4 && row.7.is_some()), "{rows:?}");
    assert!(relay.run_once().await.expect("a relay round").is_empty(), "Failed events are not retried");

    // A new event of an aggregate with Failed events is held behind them.
    server.client.deposit(deposit("late", &usd(0), "1.00")).await.expect("deposit");
    let recreated = Relay::connect(config.clone(), pool.clone()).await.expect("recreate the stream");
    assert!(recreated.run_once().await.expect("a relay round").is_empty(), "held behind Failed events");

    let mut conn = pool.acquire().await.expect("a connection");
    assert_eq!(requeue_failed(&mut conn).await.expect("requeue"), 6);
    publish_all(&recreated).await;
    assert_published_exactly_once(&pool, &config).await;
    delete_stream(&config).await;
    server.stop().await;
}

#[sqlx::test]
async fn nats_unreachable_for_a_while_loses_nothing(pool: PgPool) {
    let proxy = outage_proxy::Proxy::start("127.0.0.1:4222".to_owned());
    let config = relay_config(&format!("nats://127.0.0.1:{}", proxy.port));
    let serve = ServeConfig { relay: Some(config.clone()), ..ServeConfig::default() };
    let mut server = TestServer::start_with_ledger(LedgerConfig::new(prepared(&pool).await), serve).await;
    make_events(&mut server, 0..2, 3).await;
    wait_until_published(&pool).await;

    proxy.cut();
    make_events(&mut server, 2..4, 3).await;
    proxy.restore();
    wait_until_published(&pool).await;
    let rows = outbox_rows(&pool).await;
    assert_eq!(rows.len(), 4 * 4);
    assert!(rows.iter().all(|row| row.6 <= config.max_attempts), "{rows:?}");
    assert_published_exactly_once(&pool, &config).await;
    delete_stream(&config).await;
    server.stop().await;
}

#[sqlx::test]
async fn pruning_removes_a_published_prefix_and_keeps_the_cursor(pool: PgPool) {
    let mut server = TestServer::start(prepared(&pool).await).await;
    make_events(&mut server, 0..2, 2).await;
    let config = relay_config(NATS_URL);
    let relay = Relay::connect(config.clone(), pool.clone()).await.expect("connect the relay");
    let mut conn = pool.acquire().await.expect("a connection");
    assert_eq!(prune_published(&mut conn, 0, 100).await.expect("prune"), 0, "nothing published, nothing pruned");
    publish_all(&relay).await;
    let last = outbox_rows(&pool).await.last().expect("events").0;

    // Retention is counted from the round that published them: a day is not over yet.
    assert_eq!(prune_published(&mut conn, 86_400_000, 100).await.expect("prune"), 0);
    assert_eq!(prune_published(&mut conn, 0, 4).await.expect("prune"), 4, "bounded per call");
    assert_eq!(prune_published(&mut conn, 0, 4).await.expect("prune"), 2);
    assert!(outbox_rows(&pool).await.is_empty());
    let (pruned_through,): (i64,) =
        sqlx::query_as("SELECT pruned_through FROM ledger.outbox_pruned").fetch_one(&pool).await.expect("read");
    assert_eq!(pruned_through, last);
    match events_after(&mut conn, 0, &EventFilter::default(), 10).await {
        Err(OutboxError::Pruned { after_position: 0, pruned_through: through }) => assert_eq!(through, last),
        other => panic!("a read from before the pruned prefix must be refused, got {other:?}"),
    }

    // A stream from 0 ("from the oldest kept", as the proto says) starts after the pruned prefix
    // (until session 22 it was refused as pruned).
    let mut events = pb::events_client::EventsClient::new(server.channel.clone());
    let from_the_oldest = pb::StreamEventsRequest {
        start: Some(pb::stream_events_request::Start::AfterPosition(0)),
        ..Default::default()
    };
    let mut stream = events.stream_events(from_the_oldest).await.expect("a stream").into_inner();

    // The cursor survived: a later event is published, and only it.
    server.client.deposit(deposit("after-prune", &usd(0), "1.00")).await.expect("deposit");
    let first_kept = stream.message().await.expect("the stream stays open").expect("an event");
    assert_eq!(first_kept.position, last + 1);
    drop(stream);
    let round = relay.run_once().await.expect("a relay round");
    assert_eq!((round.len(), round.acknowledged()), (1, 1));
    assert!(relay.run_once().await.expect("a relay round").is_empty());
    assert_eq!(stream_messages(&config).await.len(), 2 * 3 + 1);
    delete_stream(&config).await;
    server.stop().await;
}

/// Found in session 16: the relay pruned one statement of 10,000 rows an hour, under 3 events a
/// second, so at any real rate the outbox grew without bound. A pass now deletes statement after
/// statement until nothing is due or its time is up, and says which.
#[sqlx::test]
async fn a_pruning_pass_deletes_until_it_catches_up_or_its_time_is_up(pool: PgPool) {
    let mut server = TestServer::start(prepared(&pool).await).await;
    make_events(&mut server, 0..2, 2).await;
    let config = relay_config(NATS_URL);
    let relay = Relay::connect(config.clone(), pool.clone()).await.expect("connect the relay");
    publish_all(&relay).await;
    let published = outbox_rows(&pool).await.len() as u64;
    assert_eq!(published, 6);
    let mut conn = pool.acquire().await.expect("a connection");

    let no_time = prune_pass(&mut conn, 0, 2, std::time::Duration::ZERO).await.expect("prune");
    assert_eq!(no_time, PrunePass { deleted: 2, caught_up: false }, "one statement, and it is behind");
    let enough_time = prune_pass(&mut conn, 0, 2, std::time::Duration::from_secs(60)).await.expect("prune");
    assert_eq!(enough_time, PrunePass { deleted: published - 2, caught_up: true });
    assert!(outbox_rows(&pool).await.is_empty());
    delete_stream(&config).await;
    server.stop().await;
}

#[sqlx::test]
async fn an_event_after_a_waiting_retry_is_held_until_the_retry_is_published(pool: PgPool) {
    let mut server = TestServer::start(prepared(&pool).await).await;
    make_events(&mut server, 0..1, 1).await;
    let config = RelayConfig { retry_backoff_ms: 60_000, ..relay_config(NATS_URL) };
    let relay = Relay::connect(config.clone(), pool.clone()).await.expect("connect the relay");
    delete_stream(&config).await;
    assert_eq!(relay.run_once().await.expect("a refused round").acknowledged(), 0);
    let recreated = Relay::connect(config.clone(), pool.clone()).await.expect("recreate the stream");

    // Both refused events wait a minute for their retry; a new event of the account waits too.
    server.client.deposit(deposit("later", &usd(0), "1.00")).await.expect("deposit");
    let round = recreated.run_once().await.expect("a relay round");
    assert_eq!((round.len(), round.held()), (0, 1));
    let rows = outbox_rows(&pool).await;
    assert_eq!(
        rows.iter().map(|row| (row.5.as_str(), row.6)).collect::<Vec<_>>(),
        [("pending", 1), ("pending", 1), ("pending", 0)]
    );

    sqlx::query("UPDATE ledger.outbox_retries SET next_attempt_at = now()").execute(&pool).await.expect("make due");
    publish_all(&recreated).await;
    assert_published_exactly_once(&pool, &config).await;
    let attempts: Vec<i32> = outbox_rows(&pool).await.iter().map(|row| row.6).collect();
    assert_eq!(attempts, [2, 2, 1]);
    delete_stream(&config).await;
    server.stop().await;
}

/// Waits until the serve-run relay has published every event (or one Failed, which fails here).
async fn wait_until_published(pool: &PgPool) {
    loop {
        let rows = outbox_rows(pool).await;
        assert!(rows.iter().all(|row| row.5 != "failed"), "an event failed: {rows:?}");
        if rows.iter().all(|row| row.5 == "published") {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The version before the delivery state moved out of the event rows.
const BEFORE_DELIVERY_STATE: i64 = 20261124000008;

/// A database that ran the earlier layout (status per event row) keeps every event's delivery
/// state through the migration: the cursor goes to the last event ever tried, and the events at
/// or below it that were not published at their first try keep their exact state as retries.
#[sqlx::test(migrations = false)]
async fn the_delivery_state_migration_carries_over_every_events_state(pool: PgPool) {
    diboas_ledger::store::MIGRATOR.run_to(BEFORE_DELIVERY_STATE, &pool).await.expect("migrate to the old layout");
    // (status, attempts, last_error) per position 1..=8, as the old relay left them. The last
    // event ever tried (7) was not published, so a cursor taken from the published ones alone
    // would be 6 and lose 7's Failed state.
    let old: [(&str, i32, Option<&str>); 8] = [
        ("published", 1, None),
        ("published", 2, Some("timed out")),
        ("failed", 3, Some("refused by the stream")),
        ("pending", 1, Some("no acknowledgement")),
        ("pending", 0, None),
        ("published", 1, None),
        ("failed", 3, Some("refused again")),
        ("pending", 0, None),
    ];
    for (index, (status, attempts, last_error)) in old.iter().enumerate() {
        sqlx::query(
            "INSERT INTO ledger.outbox (event_id, sequence, ordinal, aggregate_type, aggregate_id, event_type,
                 version, payload, metadata, status, attempts, last_error, published_at)
             VALUES (gen_random_uuid(), $1, 0, 'account', 'a', 'balance_changed', 1, '{}', '{}', $2, $3, $4,
                 CASE WHEN $2 = 'published' THEN now() END)",
        )
        .bind(index as i64 + 1)
        .bind(status)
        .bind(attempts)
        .bind(last_error)
        .execute(&pool)
        .await
        .expect("an old-layout row");
    }
    diboas_ledger::store::MIGRATOR.run(&pool).await.expect("migrate to the current layout");

    let rows = outbox_rows(&pool).await;
    let carried: Vec<(&str, i32, Option<&str>)> =
        rows.iter().map(|row| (row.5.as_str(), row.6, row.7.as_deref())).collect();
    assert_eq!(carried, old.to_vec());
    let cursor: i64 = sqlx::query_scalar("SELECT max(through_position) FROM ledger.outbox_deliveries")
        .fetch_one(&pool)
        .await
        .expect("the cursor");
    assert_eq!(cursor, 7, "the cursor is the last event ever tried");
    let published_at_set: Vec<bool> =
        sqlx::query_scalar("SELECT published_at IS NOT NULL FROM ledger.outbox ORDER BY position")
            .fetch_all(&pool)
            .await
            .expect("published_at");
    assert_eq!(published_at_set, old.iter().map(|row| row.0 == "published").collect::<Vec<_>>());
}

/// A server whose first account's events are all published, then a second account's, not yet;
/// with the relay's configuration (its stream to delete at the end).
async fn published_then_more(pool: &PgPool) -> (TestServer, RelayConfig) {
    let mut server = TestServer::start(prepared(pool).await).await;
    make_events(&mut server, 0..1, 5).await;
    let config = relay_config(NATS_URL);
    let relay = Relay::connect(config.clone(), pool.clone()).await.expect("connect the relay");
    publish_all(&relay).await;
    make_events(&mut server, 1..2, 0).await;
    (server, config)
}

/// A transaction holding `ledger.outbox_events` locked, as a pruner might, so a reader waits.
async fn holding_the_events(pool: &PgPool) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut pruner = pool.begin().await.expect("a transaction");
    sqlx::query("LOCK TABLE ledger.outbox_events IN ACCESS EXCLUSIVE MODE").execute(&mut *pruner).await.expect("lock");
    pruner
}

/// Returns once some session waits for a lock.
async fn until_a_lock_is_awaited(pool: &PgPool) {
    loop {
        let waiting: (i64,) =
            sqlx::query_as("SELECT count(*) FROM pg_locks WHERE NOT granted").fetch_one(pool).await.expect("locks");
        if waiting.0 > 0 {
            return;
        }
        tokio::task::yield_now().await;
    }
}

/// A prune that commits between a reader's check of the pruned prefix and its read of the events
/// must not leave the reader a silent gap: the read is refused as pruned (until session 22 it
/// returned the events after the gap as if nothing were missing).
#[sqlx::test]
async fn a_prune_racing_a_read_refuses_the_read_rather_than_leave_a_gap(pool: PgPool) {
    let (server, config) = published_then_more(&pool).await;
    let first = outbox_rows(&pool).await.first().expect("events").0;

    // The pruner holds the table while the reader, past its first check, waits to read it.
    let mut pruner = holding_the_events(&pool).await;
    let mut reader = pool.acquire().await.expect("a connection");
    let read = tokio::spawn(async move { events_after(&mut reader, first, &EventFilter::default(), 100).await });
    until_a_lock_is_awaited(&pool).await;
    assert!(prune_published(&mut pruner, 0, 100).await.expect("prune") > 0);
    pruner.commit().await.expect("commit");
    match read.await.expect("the reader") {
        Err(OutboxError::Pruned { after_position, .. }) => assert_eq!(after_position, first),
        other => panic!("the read must be refused as pruned, got {other:?}"),
    }
    delete_stream(&config).await;
    server.stop().await;
}

/// A stream from 0 ("from the oldest kept") that a prune overtakes before its first read starts
/// after the new pruned prefix: it had been owed nothing yet. Until session 23 it ended as
/// EVENTS_PRUNED, and resuming where that said failed the same way.
#[sqlx::test]
async fn a_stream_from_the_oldest_overtaken_by_a_prune_starts_after_it(pool: PgPool) {
    let (server, config) = published_then_more(&pool).await;

    // The pruner holds the table: the stream opens (it reads only the pruned prefix, 0 here) and
    // its follower's first read waits.
    let mut pruner = holding_the_events(&pool).await;
    let mut events = pb::events_client::EventsClient::new(server.channel.clone());
    let from_the_oldest = pb::StreamEventsRequest {
        start: Some(pb::stream_events_request::Start::AfterPosition(0)),
        ..Default::default()
    };
    let mut stream = events.stream_events(from_the_oldest).await.expect("a stream").into_inner();
    until_a_lock_is_awaited(&pool).await;
    assert!(prune_published(&mut pruner, 0, 100).await.expect("prune") > 0);
    pruner.commit().await.expect("commit");
    let (pruned_through,): (i64,) =
        sqlx::query_as("SELECT pruned_through FROM ledger.outbox_pruned").fetch_one(&pool).await.expect("read");
    let first_kept = stream.message().await.expect("the stream goes on").expect("an event");
    assert_eq!(first_kept.position, pruned_through + 1);
    drop(stream);
    delete_stream(&config).await;
    server.stop().await;
}

/// A JetStream that takes publishes and never answers costs a round about one acknowledgement
/// timeout, not one per event: the acknowledgements are awaited together (until session 22 one
/// after another, so a round of 5,000 events at the 5 s default could stall for about 7 hours).
/// Not a speed assertion: the bound is half of what one timeout per event would take (50 s),
/// some 25 times what one timeout takes, so only awaiting in turn can break it.
#[sqlx::test]
async fn a_round_whose_acknowledgements_never_come_ends_after_about_one_timeout(pool: PgPool) {
    let mut server = TestServer::start(prepared(&pool).await).await;
    make_events(&mut server, 0..5, 9).await;
    let config = RelayConfig { ack_timeout_ms: 1_000, ..relay_config(NATS_URL) };
    let relay = Relay::connect(config.clone(), pool.clone()).await.expect("connect the relay");
    delete_stream(&config).await;
    // A plain subscriber where the stream was: publishes reach it, and nothing ever answers.
    let listener = async_nats::connect(NATS_URL).await.expect("connect to NATS");
    let _silent = listener.subscribe(format!("{}.>", config.subject_prefix)).await.expect("subscribe");
    listener.flush().await.expect("flush");

    let started = std::time::Instant::now();
    let attempt = relay.publish_due().await.expect("a round");
    let took = started.elapsed();
    assert_eq!(attempt.len(), 50);
    let one_per_event = std::time::Duration::from_millis(config.ack_timeout_ms * 50);
    assert!(took < one_per_event / 2, "the round took {took:?}; one timeout per event would be {one_per_event:?}");
    server.stop().await;
}

/// A filtered read reports how far it looked, past the events it does not want, so a filtered
/// stream resumes from there: after pruning passes its last matching event, it carries on rather
/// than being refused as pruned though it missed nothing (until session 22 it was, and rescanned
/// everything since its last match on every commit).
#[sqlx::test]
async fn a_filtered_read_moves_past_the_events_it_does_not_want(pool: PgPool) {
    let mut server = TestServer::start(prepared(&pool).await).await;
    let account = usd(1);
    server.client.open_account(open("open", &account)).await.expect("open");
    let freeze = |key: &str, frozen: bool| pb::SetFrozenRequest {
        idempotency_key: key.into(),
        operation: Some(pb::SetFrozen { account: Some(account.clone()), frozen }),
    };
    server.client.set_frozen(freeze("freeze", true)).await.expect("freeze");
    server.client.set_frozen(freeze("unfreeze", false)).await.expect("unfreeze");
    make_events(&mut server, 2..3, 5).await;
    let last = outbox_rows(&pool).await.last().expect("events").0;

    let mut conn = pool.acquire().await.expect("a connection");
    let frozen_only = EventFilter { event_types: vec!["frozen".into()], ..EventFilter::default() };
    let page = events_after(&mut conn, 0, &frozen_only, 100).await.expect("a read");
    assert_eq!(page.events.len(), 1);
    assert_eq!(page.scanned_through, last, "the read looked through every event there is");
    // A page cut by its limit looks only as far as its last event.
    let everything = events_after(&mut conn, 0, &EventFilter::default(), 2).await.expect("a read");
    assert_eq!(page_positions(&everything), [1, 2]);
    assert_eq!(everything.scanned_through, 2);

    let config = relay_config(NATS_URL);
    let relay = Relay::connect(config.clone(), pool.clone()).await.expect("connect the relay");
    publish_all(&relay).await;
    assert!(prune_published(&mut conn, 0, 100).await.expect("prune") > 0);
    let resumed = events_after(&mut conn, page.scanned_through, &frozen_only, 100).await.expect("not pruned");
    assert!(resumed.events.is_empty());
    let from_the_match = events_after(&mut conn, page.events[0].position, &frozen_only, 100).await;
    assert!(matches!(from_the_match, Err(OutboxError::Pruned { .. })), "{from_the_match:?}");
    delete_stream(&config).await;
    server.stop().await;
}

fn page_positions(page: &diboas_ledger::outbox::read::Page) -> Vec<i64> {
    page.events.iter().map(|event| event.position).collect()
}
