//! Promise 1 under `kill -9`: a child process runs the ledger under concurrent load and prints
//! every operation the ledger acknowledged; the test SIGKILLs it at varied moments, restarts it
//! on the same database each time, and finally checks that every acknowledged operation is in
//! the journal exactly once, the invariants hold, and `verify` agrees.
//!
//! The child is this test binary itself, re-run with `CRASH_CHILD_DATABASE_URL` set, which
//! turns `crash_child` from a no-op into the workload.

mod journal_common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use diboas_ledger::engine::account::{AccountRef, Domain};
use diboas_ledger::engine::asset::Asset;
use diboas_ledger::engine::operation::Operation;
use diboas_ledger::ledger::{Ledger, LedgerError};
use diboas_ledger::store;
use journal_common::*;
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use uuid::Uuid;

const CHILD_URL_VAR: &str = "CRASH_CHILD_DATABASE_URL";
const CHILD_RUN_VAR: &str = "CRASH_CHILD_RUN";
const USERS: u128 = 16;
const TASKS: usize = 8;
/// Each child stops on its own after this many operations per task, so it never runs forever.
const OPERATIONS_PER_TASK: usize = 20_000;

/// Kill after this many acknowledgements were seen (then after a further short, varying pause).
const KILL_AFTER_ACKS: [usize; 5] = [1, 40, 300, 1_000, 2_500];

/// The children's PostgreSQL sessions carry this name, so the test can tell when they are gone.
const CHILD_APPLICATION_NAME: &str = "diboas_crash_child";

/// How long a killed child's sessions may take to end (they finish the statement they were
/// running when the client died, then notice it is gone).
const CHILD_SESSIONS_END_WITHIN_MS: u64 = 30_000;

#[test]
fn crash_child() {
    let Ok(url) = std::env::var(CHILD_URL_VAR) else { return };
    let run: usize = std::env::var(CHILD_RUN_VAR).ok().and_then(|run| run.parse().ok()).unwrap_or(0);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async move {
        let options: PgConnectOptions = url.parse().unwrap();
        let ledger = Arc::new(Ledger::open(config(options)).await.unwrap());
        let at_ms = now_ms();
        for n in 0..USERS {
            // Replayed after the first run: the key makes opening idempotent.
            ledger
                .submit(request(&format!("open-{n}"), at_ms, open(account(n, Domain::Banking, Asset::USD))))
                .await
                .unwrap();
        }
        let counter = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for task in 0..TASKS {
            let (ledger, counter) = (ledger.clone(), counter.clone());
            tasks.push(tokio::spawn(async move {
                for index in 0..OPERATIONS_PER_TASK {
                    let n = counter.fetch_add(1, Ordering::Relaxed) as u128;
                    let key = format!("r{run}-t{task}-{index}");
                    let from = account(n % USERS, Domain::Banking, Asset::USD);
                    let to = account((n + 7) % USERS, Domain::Banking, Asset::USD);
                    // Deposits, transfers across shards, and reservations committed in part (two
                    // requests, so a kill can land between them).
                    let steps = match index % 4 {
                        0 | 1 => vec![(key, deposit(from, 100))],
                        2 => vec![(key, transfer(from, to, 1))],
                        _ => {
                            let reservation_id = Uuid::from_u128(((run * TASKS + task) as u128) << 64 | index as u128);
                            vec![
                                (
                                    format!("{key}-reserve"),
                                    Operation::Reserve {
                                        reservation_id,
                                        account: from,
                                        amount: amount(10),
                                        ttl_ms: None,
                                    },
                                ),
                                (
                                    format!("{key}-commit"),
                                    Operation::Commit {
                                        user_id: from.user_id,
                                        reservation_id,
                                        destination: AccountRef::User(to),
                                        amount: Some(amount(4)),
                                    },
                                ),
                            ]
                        }
                    };
                    for (key, operation) in steps {
                        match ledger.submit(request(&key, now_ms(), operation)).await {
                            Ok(_) => {
                                let mut stdout = std::io::stdout().lock();
                                writeln!(stdout, "ACK {key}").unwrap();
                                stdout.flush().unwrap();
                            }
                            Err(LedgerError::Unavailable) => {}
                            Err(other) => panic!("{other}"),
                        }
                    }
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
    });
}

/// Polls until no session of a child is left on this test's database.
async fn wait_until_child_sessions_end(pool: &PgPool) {
    for _ in 0..CHILD_SESSIONS_END_WITHIN_MS {
        let (sessions,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = $1",
        )
        .bind(CHILD_APPLICATION_NAME)
        .fetch_one(pool)
        .await
        .unwrap();
        if sessions == 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    panic!("a killed child's sessions were still open after {CHILD_SESSIONS_END_WITHIN_MS} ms");
}

/// A small deterministic generator for the pauses before each kill.
fn pause_us(run: usize) -> u64 {
    let mut x = (run as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 29;
    x % 20_000
}

#[sqlx::test]
async fn acknowledged_operations_survive_sigkill(pool: PgPool) {
    let options = prepared(&pool).await;
    let url = format!("{}?application_name={CHILD_APPLICATION_NAME}", url_of(&options));
    let exe = std::env::current_exe().unwrap();
    let mut acknowledged = BTreeSet::new();
    for (run, kill_after) in KILL_AFTER_ACKS.into_iter().enumerate() {
        let mut child = Command::new(&exe)
            .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_URL_VAR, &url)
            .env(CHILD_RUN_VAR, run.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let keys = Arc::new(Mutex::new(Vec::new()));
        let reader = std::thread::spawn({
            let keys = keys.clone();
            move || {
                // Everything the child printed before it died was acknowledged, so read to the end.
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if let Some(key) = line.strip_prefix("ACK ") {
                        keys.lock().unwrap().push(key.to_owned());
                    }
                }
            }
        });
        // Poll (not a timing assertion: the child is killed, whatever the speed, once it has
        // acknowledged enough), then let a varying pause move the kill point within the load.
        while keys.lock().unwrap().len() < kill_after && !reader.is_finished() {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        std::thread::sleep(std::time::Duration::from_micros(pause_us(run)));
        child.kill().unwrap();
        child.wait().unwrap();
        reader.join().unwrap();
        // A killed process's PostgreSQL session still finishes the batch it had sent (it may
        // commit after the kill). The next child must start after that, as an operator restarts
        // a server once the old one is gone: otherwise its writer rightly refuses to append
        // behind a journal that moved under it, and the child stops with nothing acknowledged.
        wait_until_child_sessions_end(&pool).await;
        let keys = std::mem::take(&mut *keys.lock().unwrap());
        assert!(keys.len() >= kill_after, "run {run}: the child stopped after {} acknowledgements", keys.len());
        eprintln!("run {run}: killed after {} acknowledged operations", keys.len());
        acknowledged.extend(keys);
    }

    let ledger = Ledger::open(config(options.clone())).await.unwrap();
    let state = ledger.state().await.unwrap();
    state.check_invariants().unwrap();
    ledger.shutdown().await.unwrap();
    let keys: Vec<&str> = acknowledged.iter().map(String::as_str).collect();
    let counts: Vec<(String, i64)> = sqlx::query_as(
        "SELECT idempotency_key, count(*) FROM ledger.journal WHERE idempotency_key = ANY($1) GROUP BY idempotency_key",
    )
    .bind(&keys)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(counts.len(), acknowledged.len(), "some acknowledged operations are missing from the journal");
    assert!(counts.iter().all(|(_, count)| *count == 1), "an operation was journaled twice");
    let report = store::verify(&mut pool.acquire().await.unwrap(), diboas_ledger::engine::EngineConfig::default())
        .await
        .unwrap();
    assert!(report.agrees(), "{report:#?}");
}
