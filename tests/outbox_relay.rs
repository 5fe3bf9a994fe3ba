//! The outbox relay against the real PostgreSQL and the real NATS JetStream: publishing in
//! order, a crash between publishing and recording (republished, deduplicated by id), refused
//! publishes (attempts, Failed with the reason, later events of the aggregate held, requeue), and
//! NATS unreachable for a while behind a TCP proxy (nothing lost).

mod grpc_common;
mod outage_proxy;
mod outbox_common;

use diboas_ledger::api::server::ServeConfig;
use diboas_ledger::ledger::LedgerConfig;
use diboas_ledger::outbox::admin::requeue_failed;
use diboas_ledger::outbox::relay::Relay;
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
async fn refused_publishes_fail_after_three_attempts_hold_the_aggregate_and_requeue(pool: PgPool) {
    let mut server = TestServer::start(prepared(&pool).await).await;
    make_events(&mut server, 0..2, 2).await;
    let config = relay_config(NATS_URL);
    let relay = Relay::connect(config.clone(), pool.clone()).await.expect("connect the relay");
    // No stream: JetStream refuses every publish (no responders).
    delete_stream(&config).await;
    for round in 1..=3 {
        let attempt = relay.run_once().await.expect("a relay round");
        assert_eq!(attempt.len(), 6, "round {round} tries every event");
        assert_eq!(attempt.acknowledged(), 0);
    }
    let rows = outbox_rows(&pool).await;
    assert!(rows.iter().all(|row| row.5 == "failed" && row.6 == 3 && row.7.is_some()), "{rows:?}");
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
