//! Concurrency: several threads hammer a few hot accounts spread over shards with transfers,
//! reserve/commit/release and linked batches, plus deposits, withdrawals and fees (system
//! sub-accounts) and short reservations that a sweeper thread expires at the same time.
//! Afterwards money is conserved, the journal's sequence is gap-free and in order, every
//! acknowledged sequence is in it exactly once, and replaying it into a fresh engine gives an
//! identical state (order-sensitive: the accounts' usage counters are journaled as values).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::thread;

use diboas_ledger::engine::account::{
    AccountConfig, AccountRef, FeeTier, OutflowLimits, Provider, SystemAccount, SystemKind,
};
use diboas_ledger::engine::asset::Asset;
use diboas_ledger::engine::money::MAX_AMOUNT_MINOR;
use diboas_ledger::engine::operation::{Operation, Request};
use diboas_ledger::engine::record::MemoryJournal;
use diboas_ledger::engine::{Engine, EngineConfig};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use support::{START_MS, amount, key, usd};
use uuid::Uuid;

const THREADS: usize = 4;
const OPERATIONS_PER_THREAD: usize = 20_000;
const HOT_USERS: u128 = 6;

#[test]
fn hot_accounts_under_concurrent_load_stay_consistent_and_replayable() {
    let engine =
        Arc::new(Engine::new(EngineConfig { shard_count: 4, ..EngineConfig::default() }, MemoryJournal::default()));
    // Limits that are never reached, so every outflow journals the account's usage counters as
    // absolute values: replaying records in another order than they were applied then ends with
    // other counters, and the replay comparison below catches a journal that is gap-free and in
    // sequence order but not the order the changes were made in.
    let never_reached = OutflowLimits {
        per_transaction_minor: None,
        daily_minor: Some(MAX_AMOUNT_MINOR),
        monthly_minor: Some(MAX_AMOUNT_MINOR),
    };
    let config = AccountConfig { limits: never_reached, ..AccountConfig::default() };
    for user in 0..HOT_USERS {
        let open = Operation::OpenAccount { account: usd(user), config };
        engine
            .execute(Request { key: key(&format!("open-{user}")), now_ms: START_MS, operation: open })
            .result
            .unwrap();
        let deposit = Operation::Deposit { account: usd(user), amount: amount(1_000_000), provider: Provider::Stripe };
        engine
            .execute(Request { key: key(&format!("fund-{user}")), now_ms: START_MS, operation: deposit })
            .result
            .unwrap();
    }

    // The clock moves on while the workers run; a sweeper expires short reservations meanwhile.
    let clock_ms = Arc::new(AtomicI64::new(START_MS));
    let done = Arc::new(AtomicBool::new(false));
    let sweeper = {
        let (engine, clock_ms, done) = (Arc::clone(&engine), Arc::clone(&clock_ms), Arc::clone(&done));
        thread::spawn(move || {
            let mut expired = 0;
            while !done.load(Ordering::Relaxed) {
                expired += engine.sweep(clock_ms.load(Ordering::Relaxed)).unwrap().expired;
                thread::yield_now();
            }
            expired
        })
    };
    let fees = AccountRef::System(SystemAccount { kind: SystemKind::FeeRevenue(FeeTier::Network), asset: Asset::USD });

    let workers: Vec<_> = (0..THREADS)
        .map(|thread_index| {
            let (engine, clock_ms) = (Arc::clone(&engine), Arc::clone(&clock_ms));
            thread::spawn(move || {
                let mut rng = SmallRng::seed_from_u64(thread_index as u64);
                let mut acknowledged = Vec::with_capacity(OPERATIONS_PER_THREAD);
                for n in 0..OPERATIONS_PER_THREAD {
                    let from = rng.random_range(0..HOT_USERS);
                    let to = (from + rng.random_range(1..HOT_USERS)) % HOT_USERS;
                    let minor = rng.random_range(1..5_000);
                    let transfer = Operation::Transfer {
                        from: AccountRef::User(usd(from)),
                        to: AccountRef::User(usd(to)),
                        amount: amount(minor),
                    };
                    let reservation_id = Uuid::from_u128(((thread_index as u128) << 64) | n as u128);
                    let reserve =
                        Operation::Reserve { reservation_id, account: usd(from), amount: amount(minor), ttl_ms: None };
                    let short_reserve = Operation::Reserve {
                        reservation_id,
                        account: usd(from),
                        amount: amount(minor),
                        ttl_ms: Some(rng.random_range(1..50)),
                    };
                    let operation = match rng.random_range(0..8) {
                        0 => transfer,
                        1 => Operation::LinkedBatch {
                            operations: vec![
                                reserve,
                                Operation::Commit {
                                    user_id: usd(from).user_id,
                                    reservation_id,
                                    destination: AccountRef::User(usd(to)),
                                    amount: Some(amount((minor + 1) / 2)),
                                },
                            ],
                        },
                        2 => Operation::LinkedBatch {
                            operations: vec![
                                reserve,
                                Operation::Release { user_id: usd(from).user_id, reservation_id },
                            ],
                        },
                        3 => Operation::LinkedBatch { operations: vec![transfer.clone(), transfer] },
                        4 => short_reserve,
                        5 => {
                            Operation::Deposit { account: usd(to), amount: amount(minor), provider: Provider::Moonpay }
                        }
                        6 => {
                            Operation::Withdraw { account: usd(from), amount: amount(minor), provider: Provider::Ramp }
                        }
                        _ => Operation::Transfer { from: AccountRef::User(usd(from)), to: fees, amount: amount(minor) },
                    };
                    let now_ms = clock_ms.fetch_add(1, Ordering::Relaxed);
                    let request = Request { key: key(&format!("t{thread_index}-{n}")), now_ms, operation };
                    if let Some(sequence) = engine.execute(request).sequence {
                        acknowledged.push(sequence);
                    }
                }
                acknowledged
            })
        })
        .collect();
    let mut acknowledged: Vec<u64> = workers.into_iter().flat_map(|worker| worker.join().unwrap()).collect();
    done.store(true, Ordering::Relaxed);
    let expired = sweeper.join().unwrap();
    assert!(expired > 0, "the sweeper expired reservations while requests ran");

    let state = engine.state();
    state.check_invariants().unwrap();

    let records = engine.sink().drain();
    let sequences: Vec<u64> = records.iter().map(|record| record.sequence).collect();
    let expected: Vec<u64> = (1..=engine.last_sequence()).collect();
    assert_eq!(sequences, expected, "the journal is gap-free and in sequence order");
    acknowledged.sort_unstable();
    let request_sequences: Vec<u64> = records
        .iter()
        .skip((HOT_USERS * 2) as usize)
        .filter(|record| matches!(record.origin, diboas_ledger::engine::record::Origin::Request { .. }))
        .map(|record| record.sequence)
        .collect();
    assert_eq!(acknowledged, request_sequences, "every acknowledged change is journaled exactly once");

    let replayed = Engine::new(*engine.config(), MemoryJournal::default());
    for record in &records {
        replayed.apply_record(record).unwrap();
    }
    assert_eq!(replayed.state(), state, "replaying the journal rebuilds the same state");
}
