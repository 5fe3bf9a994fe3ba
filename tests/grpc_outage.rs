//! PostgreSQL cut off under the server: callers get UNAVAILABLE with reason
//! `JOURNAL_UNAVAILABLE`, and once PostgreSQL is back a retry with the same idempotency key
//! completes the operation exactly once.
//!
//! As in journal_outage.rs, the shared PostgreSQL server is not stopped (other tests use it): a
//! small TCP proxy sits between the ledger and PostgreSQL and the test cuts it.

mod grpc_common;
mod outage_proxy;

use std::time::Duration;

use diboas_ledger::api::server::ServeConfig;
use diboas_ledger::ledger::LedgerConfig;
use grpc_common::*;
use outage_proxy::Proxy;
use sqlx::PgPool;
use tonic::Code;

/// How many times the test retries (20 ms apart) before declaring the server stuck.
const ATTEMPTS: usize = 3_000;

#[sqlx::test]
async fn an_outage_is_unavailable_and_a_retry_with_the_same_key_completes_once(pool: PgPool) {
    let options = prepared(&pool).await;
    let proxy = Proxy::start(format!("{}:{}", options.get_host(), options.get_port()));
    let mut config = LedgerConfig::new(options.clone().host("127.0.0.1").port(proxy.port));
    config.reconnect_max_backoff_ms = 200;
    let server = TestServer::start_with_ledger(config, ServeConfig::default()).await;
    let mut client = server.client.clone();
    let alice = usd(1);
    funded(&mut client, &alice, "10.00").await;

    proxy.cut();
    // A request racing the cut may still commit; each attempt uses its own key, so every
    // acknowledged one is counted once, until the first UNAVAILABLE.
    let mut acknowledged = 0;
    let mut refused = None;
    for attempt in 0..ATTEMPTS {
        let key = format!("outage-{attempt}");
        match client.deposit(deposit(&key, &alice, "1.00")).await {
            Err(status) if status.code() == Code::Unavailable => {
                refused = Some((key, status));
                break;
            }
            Ok(_) => acknowledged += 1,
            Err(other) => panic!("unexpected refusal: {other:?}"),
        }
    }
    let (key, refused) = refused.expect("the server never reported UNAVAILABLE");
    assert_refused(&refused, Code::Unavailable, "JOURNAL_UNAVAILABLE");
    assert!(refused.message().contains("retrying with the same idempotency key is safe"), "{refused:?}");

    proxy.restore();
    let mut completed = false;
    for _ in 0..ATTEMPTS {
        match client.deposit(deposit(&key, &alice, "1.00")).await {
            Ok(_) => {
                completed = true;
                break;
            }
            Err(status) if status.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(other) => panic!("unexpected refusal: {other:?}"),
        }
    }
    assert!(completed, "the server never resumed after PostgreSQL came back");
    let again = client.deposit(deposit(&key, &alice, "1.00")).await.unwrap().into_inner();
    assert!(again.replayed);
    let expected_minor = 1_000 + 100 * (acknowledged + 1);
    assert_eq!(balance(&mut client, &alice).await.0, format!("{}.{:02}", expected_minor / 100, expected_minor % 100));
    server.stop().await;
}
