//! Promise 9: when PostgreSQL cannot be reached, callers get `Unavailable`, nothing acknowledged
//! is lost, and service resumes by itself once PostgreSQL is back.
//!
//! The shared PostgreSQL server is not stopped (other tests use it): a small TCP proxy sits
//! between the ledger and PostgreSQL, and the test cuts every connection through it (and refuses
//! new ones) under load, then restores it.

mod journal_common;
mod outage_proxy;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use diboas_ledger::engine::account::{AccountRef, Domain};
use diboas_ledger::engine::asset::Asset;
use diboas_ledger::ledger::{Ledger, LedgerError};
use diboas_ledger::store;
use journal_common::*;
use outage_proxy::Proxy;
use sqlx::PgPool;

const USERS: u128 = 8;
const TASKS: usize = 8;
/// The longest the test waits for the ledger to make progress before declaring it stuck.
const PROGRESS_DEADLINE_MS: u64 = 60_000;

#[derive(Default)]
struct Log {
    acknowledged: Vec<String>,
    unavailable: usize,
}

async fn wait_until(what: &str, condition: impl Fn() -> bool) {
    for _ in 0..PROGRESS_DEADLINE_MS {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("gave up waiting: {what}");
}

#[sqlx::test]
async fn nothing_acknowledged_is_lost_and_service_resumes_after_postgresql_is_cut_off(pool: PgPool) {
    let options = prepared(&pool).await;
    let proxy = Proxy::start(format!("{}:{}", options.get_host(), options.get_port()));
    let mut ledger_config = config(options.clone().host("127.0.0.1").port(proxy.port));
    ledger_config.reconnect_max_backoff_ms = 200;
    let ledger = Arc::new(Ledger::open(ledger_config).await.unwrap());
    let at_ms = now_ms();
    for n in 0..USERS {
        ledger
            .submit(request(&format!("open-{n}"), at_ms, open(account(n, Domain::Banking, Asset::USD))))
            .await
            .unwrap();
    }

    let log = Arc::new(Mutex::new(Log::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let (ledger, log, stop) = (ledger.clone(), log.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut index = 0_u128;
            while !stop.load(Ordering::SeqCst) {
                let key = format!("t{task}-{index}");
                let target = account((index + task as u128) % USERS, Domain::Banking, Asset::USD);
                match ledger.submit(request(&key, at_ms, deposit(target, 100))).await {
                    Ok(outcome) => {
                        assert!(outcome.result.is_ok());
                        log.lock().unwrap().acknowledged.push(key);
                    }
                    Err(error) if error.is_unavailable() => {
                        assert!(matches!(error, LedgerError::Unavailable), "{error}");
                        log.lock().unwrap().unavailable += 1;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    Err(other) => panic!("unexpected error: {other}"),
                }
                index += 1;
            }
        }));
    }

    wait_until("acknowledgements before the cut", || log.lock().unwrap().acknowledged.len() >= 300).await;
    proxy.cut();
    wait_until("callers told the ledger is unavailable", || log.lock().unwrap().unavailable >= 50).await;
    let acknowledged_during_cut = log.lock().unwrap().acknowledged.len();
    proxy.restore();
    wait_until("acknowledgements after PostgreSQL is back", || {
        log.lock().unwrap().acknowledged.len() >= acknowledged_during_cut + 300
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        task.await.unwrap();
    }

    let log = std::mem::take(&mut *log.lock().unwrap());
    let state = ledger.state().await.unwrap();
    state.check_invariants().unwrap();
    let mut total_minor = 0;
    for n in 0..USERS {
        total_minor +=
            ledger.balance(&AccountRef::User(account(n, Domain::Banking, Asset::USD))).await.unwrap().available_minor;
    }
    Arc::into_inner(ledger).unwrap().shutdown().await.unwrap();

    let keys: Vec<&str> = log.acknowledged.iter().map(String::as_str).collect();
    let counts: Vec<(String, i64)> = sqlx::query_as(
        "SELECT idempotency_key, count(*) FROM ledger.journal WHERE idempotency_key = ANY($1) GROUP BY idempotency_key",
    )
    .bind(&keys)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(counts.len(), log.acknowledged.len(), "an acknowledged deposit is missing from the journal");
    assert!(counts.iter().all(|(_, count)| *count == 1));
    // Every committed deposit (acknowledged, or unknown to its caller but committed) is counted
    // exactly once in the balances, and nothing else is.
    let (deposits,): (i64,) = sqlx::query_as("SELECT count(*) FROM ledger.journal WHERE idempotency_key LIKE 't%'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(total_minor, 100 * i128::from(deposits));
    assert!(deposits as usize >= log.acknowledged.len());
    let report = store::verify(&mut pool.acquire().await.unwrap(), diboas_ledger::engine::EngineConfig::default())
        .await
        .unwrap();
    assert!(report.agrees(), "{report:#?}");
    eprintln!(
        "acknowledged {}, unavailable answers {}, committed deposits {deposits}",
        log.acknowledged.len(),
        log.unavailable
    );
}

/// Promise 9 when PostgreSQL goes silent mid-reload instead of refusing: after a cut, the first
/// connection of the reload answers its handshake and then nothing more, as one does whose
/// server vanished in a failover (sqlx sets no TCP keepalive, so nothing ends it). The ledger
/// abandons that reload at `reload_timeout_ms` and tries again. Until session 23 it waited on the
/// silent connection for good, unavailable until restarted.
#[sqlx::test]
async fn service_resumes_when_a_reload_meets_a_connection_gone_silent(pool: PgPool) {
    let options = prepared(&pool).await;
    let proxy = Proxy::start(format!("{}:{}", options.get_host(), options.get_port()));
    let mut ledger_config = config(options.clone().host("127.0.0.1").port(proxy.port));
    ledger_config.reconnect_max_backoff_ms = 200;
    ledger_config.reload_timeout_ms = 2_000;
    let ledger = Ledger::open(ledger_config).await.unwrap();
    let at_ms = now_ms();
    let alice = account(0, Domain::Banking, Asset::USD);
    ledger.submit(request("open", at_ms, open(alice))).await.unwrap().result.unwrap();

    proxy.cut();
    let refused = ledger.submit(request("during-cut", at_ms, deposit(alice, 100))).await.unwrap_err();
    assert!(refused.is_unavailable(), "{refused}");
    // The startup handshake is a few hundred bytes; a reload reads far more than this.
    proxy.silence_next_after(1_024);
    proxy.restore();

    let mut attempt = 0;
    let resumed = loop {
        attempt += 1;
        match ledger.submit(request(&format!("after-{attempt}"), at_ms, deposit(alice, 100))).await {
            Ok(outcome) => break outcome,
            Err(error) if error.is_unavailable() && attempt < PROGRESS_DEADLINE_MS / 10 => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(error) => panic!("the ledger did not resume: {error}"),
        }
    };
    resumed.result.unwrap();
    let balance = ledger.balance(&AccountRef::User(alice)).await.unwrap();
    assert!(balance.available_minor >= 100, "{balance:?}");
    ledger.shutdown().await.unwrap();
}

/// A batch the writer gave up on (its commit deadline passed while it waited on a lock) does
/// not commit behind the reload's back: the reload ends the old writer's backend before reading
/// the state, so the batch rolls back and the new engine and PostgreSQL agree. Until session 23
/// the abandoned batch committed once the lock was released, after the reload had read the
/// state: the engine showed the balance without it and refused nothing, while PostgreSQL had it.
#[sqlx::test]
async fn a_batch_abandoned_at_its_deadline_does_not_commit_after_the_reload(pool: PgPool) {
    let options = prepared(&pool).await;
    let mut ledger_config = config(options);
    ledger_config.journal.max_commit_ms = 500;
    let ledger = Ledger::open(ledger_config).await.unwrap();
    let at_ms = now_ms();
    let alice = account(0, Domain::Banking, Asset::USD);
    ledger.submit(request("open", at_ms, open(alice))).await.unwrap().result.unwrap();
    ledger.submit(request("fund", at_ms, deposit(alice, 100))).await.unwrap().result.unwrap();

    // Another session holds the checkpoint's row: the next batch waits for it past its deadline.
    let mut holder = pool.acquire().await.unwrap();
    sqlx::raw_sql("BEGIN; SELECT committed_sequence FROM ledger.checkpoint FOR UPDATE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let abandoned = ledger.submit(request("abandoned", at_ms, deposit(alice, 5))).await.unwrap_err();
    assert!(abandoned.is_unavailable(), "{abandoned}");
    // The reload has happened once a read is answered again.
    let mut reloaded = None;
    for _ in 0..PROGRESS_DEADLINE_MS / 10 {
        if let Ok(balance) = ledger.balance(&AccountRef::User(alice)).await {
            reloaded = Some(balance);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let reloaded = reloaded.expect("the ledger reloaded");
    assert_eq!(reloaded.available_minor, 100);

    sqlx::raw_sql("COMMIT").execute(&mut *holder).await.unwrap();
    // Whatever the abandoned batch's backend was doing is over once no other session of this
    // database is active (the new writer's waits idle for its next batch).
    let (database,): (String,) = sqlx::query_as("SELECT current_database()").fetch_one(&mut *holder).await.unwrap();
    loop {
        let (active,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND state = 'active' AND pid <> pg_backend_pid()",
        )
        .bind(&database)
        .fetch_one(&mut *holder)
        .await
        .unwrap();
        if active == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let journaled = |key: &'static str| {
        let pool = pool.clone();
        async move {
            let (count,): (i64,) = sqlx::query_as("SELECT count(*) FROM ledger.journal WHERE idempotency_key = $1")
                .bind(key)
                .fetch_one(&pool)
                .await
                .unwrap();
            count
        }
    };
    assert_eq!(journaled("abandoned").await, 0, "the abandoned batch committed after the reload read the state");

    // The caller's retry is then applied, once.
    ledger.submit(request("abandoned", at_ms, deposit(alice, 5))).await.unwrap().result.unwrap();
    assert_eq!(ledger.balance(&AccountRef::User(alice)).await.unwrap().available_minor, 105);
    assert_eq!(journaled("abandoned").await, 1);
    ledger.shutdown().await.unwrap();
}
