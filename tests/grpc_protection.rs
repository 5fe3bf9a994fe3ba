//! The server protecting itself and telling operators about it: load shedding at the
//! concurrency limit (RESOURCE_EXHAUSTED, not a queue), request deadlines (DEADLINE_EXCEEDED,
//! and a retry with the same key learns the outcome), and the Prometheus endpoint.
//!
//! To hold requests in flight deterministically, a test takes an exclusive lock on the
//! journal's checkpoint row table: the writer's batch then waits, and so does every request
//! waiting for durability, until the test lets go.

mod grpc_common;

use std::sync::Arc;

use diboas_ledger::api::pb;
use diboas_ledger::api::server::{ServeConfig, ServeOptions};
use diboas_ledger::ledger::LedgerConfig;
use diboas_ledger::metrics::Metrics;
use grpc_common::*;
use sqlx::{PgPool, Postgres, Transaction};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

/// How many times a test polls (10 ms apart) for a condition before giving up.
const ATTEMPTS: usize = 2_000;

async fn hold_the_journal(pool: &PgPool) -> Transaction<'static, Postgres> {
    let mut lock = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE ledger.checkpoint IN ACCESS EXCLUSIVE MODE").execute(&mut *lock).await.unwrap();
    lock
}

async fn start(
    pool: &PgPool,
    config: ServeConfig,
    metrics_listener: Option<tokio::net::TcpListener>,
) -> (TestServer, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let mut ledger = LedgerConfig::new(prepared(pool).await);
    ledger.journal.metrics = metrics.journal.clone();
    let options = ServeOptions { metrics_listener, metrics: Arc::clone(&metrics), ..ServeOptions::development(config) };
    (TestServer::start_with_options(ledger, options).await, metrics)
}

#[sqlx::test]
async fn past_the_concurrency_limit_requests_are_shed_not_queued(pool: PgPool) {
    let config = ServeConfig { max_in_flight: 2, ..ServeConfig::default() };
    let (server, metrics) = start(&pool, config, None).await;
    let mut client = server.client.clone();
    let alice = usd(1);
    client.open_account(open("open", &alice)).await.unwrap();

    let lock = hold_the_journal(&pool).await;
    let waiting: Vec<_> = (0..2)
        .map(|n| {
            let mut client = server.client.clone();
            let alice = alice.clone();
            tokio::spawn(async move { client.deposit(deposit(&format!("held-{n}"), &alice, "1.00")).await })
        })
        .collect();
    // Once both deposits hold their permits, the next request is refused at once.
    let mut shed = None;
    for _ in 0..ATTEMPTS {
        match client.list_balances(pb::ListBalancesRequest { user_id: user(99) }).await {
            Err(status) => {
                shed = Some(status);
                break;
            }
            Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
        }
    }
    let shed = shed.expect("a request past the limit is shed");
    assert_refused(&shed, Code::ResourceExhausted, "OVERLOADED");
    assert!(tonic_types::StatusExt::get_details_retry_info(&shed).is_some(), "it suggests when to retry");
    assert!(metrics.rpc_shed.get() >= 1);

    lock.rollback().await.unwrap();
    for deposit in waiting {
        let response = deposit.await.unwrap().expect("held deposits complete once the journal moves");
        assert!(!response.into_inner().replayed);
    }
    assert_eq!(balance(&mut client, &alice).await.2, "2.00");
    server.stop().await;
}

#[sqlx::test]
async fn a_passed_deadline_is_deadline_exceeded_and_a_retry_learns_the_outcome(pool: PgPool) {
    // Long enough that nothing else in the test meets it on a loaded CI machine; the held journal
    // makes the deposit meet it for certain.
    let config = ServeConfig { request_timeout_ms: 1_000, ..ServeConfig::default() };
    let (server, _) = start(&pool, config, None).await;
    let mut client = server.client.clone();
    let alice = usd(1);
    client.open_account(open("open", &alice)).await.unwrap();

    let lock = hold_the_journal(&pool).await;
    let late = client.deposit(deposit("late", &alice, "3.00")).await.unwrap_err();
    assert_refused(&late, Code::DeadlineExceeded, "DEADLINE_EXCEEDED");
    assert!(late.message().contains("same idempotency key"), "{}", late.message());

    lock.rollback().await.unwrap();
    // The change was applied before the deadline passed and became durable after it: the retry
    // (repeated, as a client would, while the released journal catches up) replays it rather than
    // depositing twice.
    let mut retried = None;
    for _ in 0..ATTEMPTS {
        match client.deposit(deposit("late", &alice, "3.00")).await {
            Ok(response) => {
                retried = Some(response.into_inner());
                break;
            }
            Err(status) if status.code() == Code::DeadlineExceeded => continue,
            Err(status) => panic!("{status:?}"),
        }
    }
    assert!(retried.expect("the retry completes").replayed);
    assert_eq!(balance(&mut client, &alice).await.2, "3.00");
    server.stop().await;
}

#[sqlx::test]
async fn the_server_gives_up_at_the_callers_own_deadline(pool: PgPool) {
    let (server, metrics) = start(&pool, ServeConfig::default(), None).await;
    let mut client = server.client.clone();
    let alice = usd(1);
    client.open_account(open("open", &alice)).await.unwrap();

    let lock = hold_the_journal(&pool).await;
    let mut request = tonic::Request::new(deposit("late", &alice, "3.00"));
    request.set_timeout(std::time::Duration::from_millis(150));
    // The client's own timer fires too, so which of the two answers first is a race; what
    // matters here is that the server stopped waiting at the caller's deadline, not its own
    // 30 s limit, while the journal is still held.
    let late = client.deposit(request).await.unwrap_err();
    assert!(matches!(late.code(), Code::DeadlineExceeded | Code::Cancelled), "{late:?}");
    // Whichever timer fired first, the server counts the deposit as ended: DEADLINE_EXCEEDED if
    // its own, CANCELLED if the client's arrived first and dropped the handler.
    let exceeded = || {
        ["DEADLINE_EXCEEDED", "CANCELLED"]
            .into_iter()
            .map(|code| {
                metrics.rpc_requests.get_or_create(&diboas_ledger::metrics::RpcLabels { method: "Deposit", code }).get()
            })
            .sum::<u64>()
    };
    for _ in 0..ATTEMPTS {
        if exceeded() == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(exceeded(), 1, "the server stopped waiting while the journal was still held");
    lock.rollback().await.unwrap();
    server.stop().await;
}

async fn scrape(address: std::net::SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

#[sqlx::test]
async fn the_metrics_endpoint_reports_rpcs_batches_the_committed_sequence_and_the_key_store(pool: PgPool) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (server, _) = start(&pool, ServeConfig::default(), Some(listener)).await;
    let mut client = server.client.clone();
    let alice = usd(1);
    client.open_account(open("open", &alice)).await.unwrap();
    client.deposit(deposit("fund", &alice, "1.00")).await.unwrap();
    client.deposit(deposit("fund-again", &account(2, pb::Domain::Banking, "USD"), "1.00")).await.unwrap_err();

    let text = scrape(address).await;
    for expected in [
        r#"diboas_ledger_rpc_requests_total{method="Deposit",code="OK"} 1"#,
        r#"diboas_ledger_rpc_requests_total{method="Deposit",code="NOT_FOUND"} 1"#,
        r#"diboas_ledger_rpc_requests_total{method="OpenAccount",code="OK"} 1"#,
        r#"diboas_ledger_rpc_latency_seconds_count{method="Deposit"} 2"#,
        "diboas_ledger_journal_batch_records_count ",
        "diboas_ledger_journal_commit_seconds_bucket",
        "diboas_ledger_committed_sequence 3",
        "diboas_ledger_committed_sequence_lag 0",
        "diboas_ledger_rpc_shed_total 0",
        // Three keys, the refused deposit's included (its refusal is its remembered outcome).
        "diboas_ledger_idempotency_keys 3",
        "diboas_ledger_idempotency_fullest_shard_keys ",
        "diboas_ledger_idempotency_keys_per_shard_limit 1048576",
    ] {
        assert!(text.contains(expected), "missing `{expected}` in:\n{text}");
    }
    server.stop().await;
    assert!(tokio::net::TcpStream::connect(address).await.is_err(), "the endpoint stops with the server");
}
