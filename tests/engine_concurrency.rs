//! Concurrency: several threads hammer a few hot accounts spread over shards with transfers,
//! reserve/commit/release and linked batches, plus deposits, withdrawals and fees (system
//! sub-accounts), short reservations that a sweeper thread expires at the same time while their
//! own thread commits or releases them in requests of their own, and every 50th request sent by
//! all threads at once under one shared key. Afterwards each shared key ran exactly once (one
//! first answer, every other thread given it back as a replay), money is conserved, the
//! journal's sequence is gap-free and in order, every acknowledged sequence is in it exactly
//! once, and replaying it into a fresh engine gives an identical state (order-sensitive: the
//! accounts' usage counters are journaled as values).
//!
//! Beside it: outflow limits under threads racing to spend the same limited accounts, and linked
//! batches locking many shards at once (the heap lock path), some failing, from several threads.

mod support;

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;

use diboas_ledger::engine::account::{
    AccountConfig, AccountRef, FeeTier, OutflowLimits, Provider, SystemAccount, SystemKind,
};
use diboas_ledger::engine::asset::Asset;
use diboas_ledger::engine::error::{EngineError, LimitKind};
use diboas_ledger::engine::money::MAX_AMOUNT_MINOR;
use diboas_ledger::engine::operation::{Operation, Receipt, Request};
use diboas_ledger::engine::record::MemoryJournal;
use diboas_ledger::engine::{Engine, EngineConfig, Outcome};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use support::{START_MS, amount, key, usd};
use uuid::Uuid;

const THREADS: usize = 4;
const OPERATIONS_PER_THREAD: usize = 20_000;
const HOT_USERS: u128 = 6;
/// Every this many requests, each thread sends the same request under the same key.
const SHARED_KEY_EVERY: usize = 50;

/// The request all threads send as their `n`th, under the key `shared-{n}`.
fn shared_request(n: usize) -> Operation {
    let from = n as u128 % HOT_USERS;
    Operation::Transfer {
        from: AccountRef::User(usd(from)),
        to: AccountRef::User(usd((from + 1) % HOT_USERS)),
        amount: amount(1 + (n as i128 % 100)),
    }
}

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
        // Enough that the accounts stay funded to the end: the workers' mix takes out about 300
        // more than it puts in per request (fees and withdrawals against deposits).
        let deposit =
            Operation::Deposit { account: usd(user), amount: amount(100_000_000), provider: Provider::Stripe };
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
    let shared_key_barrier = Arc::new(Barrier::new(THREADS));
    let workers: Vec<_> = (0..THREADS)
        .map(|thread_index| {
            let (engine, clock_ms, barrier) =
                (Arc::clone(&engine), Arc::clone(&clock_ms), Arc::clone(&shared_key_barrier));
            thread::spawn(move || run_worker(&engine, &clock_ms, &barrier, thread_index))
        })
        .collect();
    let mut acknowledged = Vec::new();
    let mut shared_answers: BTreeMap<usize, Vec<Outcome>> = BTreeMap::new();
    let (mut closes_done, mut closes_refused) = (0, 0);
    for worker in workers {
        let report = worker.join().unwrap();
        acknowledged.extend(report.acknowledged);
        closes_done += report.closes_done;
        closes_refused += report.closes_refused;
        for (n, outcome) in report.shared_answers {
            shared_answers.entry(n).or_default().push(outcome);
        }
    }
    assert!(closes_done > 0, "some short reservations were committed or released by their thread");
    assert!(closes_refused > 0, "some short reservations were found expired or already swept");
    for (n, answers) in &shared_answers {
        assert_eq!(answers.len(), THREADS);
        let first: Vec<_> = answers.iter().filter(|outcome| !outcome.replayed).collect();
        assert_eq!(first.len(), 1, "shared-{n} ran exactly once: {answers:?}");
        for outcome in answers {
            assert_eq!((&outcome.sequence, &outcome.result), (&first[0].sequence, &first[0].result), "shared-{n}");
        }
    }
    done.store(true, Ordering::Relaxed);
    let expired = sweeper.join().unwrap();
    assert!(expired > 0, "the sweeper expired reservations while requests ran");

    let state = engine.state();
    state.check_invariants().unwrap();
    engine.check_indexes().unwrap();

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
    replayed.check_indexes().unwrap();
}

/// What one worker thread of the load test saw.
struct WorkerReport {
    /// The sequences of the changes it was first to make (retries answered from the store excluded).
    acknowledged: Vec<u64>,
    /// Its answer to each request sent under a key all threads share, by request number.
    shared_answers: Vec<(usize, Outcome)>,
    /// Its commits and releases of its own short reservations that went through, and those that
    /// found the reservation already expired or swept.
    closes_done: usize,
    closes_refused: usize,
}

/// One worker of the load test: `OPERATIONS_PER_THREAD` requests of random kinds, every
/// `SHARED_KEY_EVERY`th one under the key all threads share (sent when every thread has reached
/// it, at `barrier`, so they race for the key), and now and then a request of its own closing
/// one of its short reservations, racing the sweeper.
fn run_worker(
    engine: &Engine<MemoryJournal>,
    clock_ms: &AtomicI64,
    barrier: &Barrier,
    thread_index: usize,
) -> WorkerReport {
    let mut rng = SmallRng::seed_from_u64(thread_index as u64);
    let mut report = WorkerReport {
        acknowledged: Vec::with_capacity(OPERATIONS_PER_THREAD),
        shared_answers: Vec::new(),
        closes_done: 0,
        closes_refused: 0,
    };
    let mut short_reservations: VecDeque<(u128, Uuid)> = VecDeque::new();
    let execute = |text: String, operation: Operation| {
        let now_ms = clock_ms.fetch_add(1, Ordering::Relaxed);
        engine.execute(Request { key: key(&text), now_ms, operation })
    };
    for n in 0..OPERATIONS_PER_THREAD {
        if n % SHARED_KEY_EVERY == 0 {
            barrier.wait();
            let outcome = execute(format!("shared-{n}"), shared_request(n));
            if !outcome.replayed {
                report.acknowledged.extend(outcome.sequence);
            }
            report.shared_answers.push((n, outcome));
            continue;
        }
        if rng.random_range(0..8) == 0
            && let Some((user, reservation_id)) = short_reservations.pop_front()
        {
            let outcome = execute(format!("t{thread_index}-close-{n}"), close_short(&mut rng, user, reservation_id));
            match &outcome.result {
                Ok(Receipt::Committed { committed_minor: 1, .. } | Receipt::Released { .. }) => report.closes_done += 1,
                Err(EngineError::ReservationNotActive { .. } | EngineError::ReservationExpired { .. }) => {
                    report.closes_refused += 1
                }
                other => panic!("closing a short reservation answered {other:?}"),
            }
            report.acknowledged.extend(outcome.sequence);
        }
        let reservation_id = Uuid::from_u128(((thread_index as u128) << 64) | n as u128);
        let (operation, short_reservation) = random_operation(&mut rng, reservation_id);
        let outcome = execute(format!("t{thread_index}-{n}"), operation);
        if outcome.result.is_ok()
            && let Some(user) = short_reservation
        {
            short_reservations.push_back((user, reservation_id));
        }
        report.acknowledged.extend(outcome.sequence);
    }
    report
}

/// A commit of one unit of a short reservation, or its release.
fn close_short(rng: &mut SmallRng, user: u128, reservation_id: Uuid) -> Operation {
    if rng.random_bool(0.5) {
        Operation::Commit {
            user_id: usd(user).user_id,
            reservation_id,
            destination: AccountRef::User(usd((user + 1) % HOT_USERS)),
            amount: Some(amount(1)),
        }
    } else {
        Operation::Release { user_id: usd(user).user_id, reservation_id }
    }
}

/// A random operation among the hot users; reservations it makes are named `reservation_id`.
/// With it, the user of the short reservation it makes, if it is one.
fn random_operation(rng: &mut SmallRng, reservation_id: Uuid) -> (Operation, Option<u128>) {
    let from = rng.random_range(0..HOT_USERS);
    let to = (from + rng.random_range(1..HOT_USERS)) % HOT_USERS;
    let minor = rng.random_range(1..5_000);
    let transfer =
        Operation::Transfer { from: AccountRef::User(usd(from)), to: AccountRef::User(usd(to)), amount: amount(minor) };
    let reserve = Operation::Reserve { reservation_id, account: usd(from), amount: amount(minor), ttl_ms: None };
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
            operations: vec![reserve, Operation::Release { user_id: usd(from).user_id, reservation_id }],
        },
        3 => Operation::LinkedBatch { operations: vec![transfer.clone(), transfer] },
        4 => {
            let ttl_ms = Some(rng.random_range(1..50));
            let short = Operation::Reserve { reservation_id, account: usd(from), amount: amount(minor), ttl_ms };
            return (short, Some(from));
        }
        5 => Operation::Deposit { account: usd(to), amount: amount(minor), provider: Provider::Moonpay },
        6 => Operation::Withdraw { account: usd(from), amount: amount(minor), provider: Provider::Ramp },
        _ => {
            let fees = SystemAccount { kind: SystemKind::FeeRevenue(FeeTier::Network), asset: Asset::USD };
            Operation::Transfer {
                from: AccountRef::User(usd(from)),
                to: AccountRef::System(fees),
                amount: amount(minor),
            }
        }
    };
    (operation, None)
}

/// Opens `account` with `config` and deposits `minor` into it, under keys of its own.
fn open_funded(engine: &Engine<MemoryJournal>, user: u128, config: AccountConfig, minor: i128) {
    let open = Operation::OpenAccount { account: usd(user), config };
    engine.execute(Request { key: key(&format!("open-{user}")), now_ms: START_MS, operation: open }).result.unwrap();
    let deposit = Operation::Deposit { account: usd(user), amount: amount(minor), provider: Provider::Stripe };
    engine.execute(Request { key: key(&format!("fund-{user}")), now_ms: START_MS, operation: deposit }).result.unwrap();
}

/// Outflow limits are checked and counted atomically with the outflow: threads racing to spend
/// two limited accounts (one held by a daily limit, one by a monthly and a per-transaction
/// limit) through withdrawals, transfers and reservations never get more through than the
/// limit, and every refusal names the limit that a request of its size would still break at
/// the end.
#[test]
fn outflow_limits_hold_under_concurrent_spending() {
    const DAILY: u128 = 0;
    const MONTHLY: u128 = 1;
    const PAYEE: u128 = 2;
    let (daily_minor, monthly_minor, per_transaction_minor) = (200_000, 150_000, 4_000);
    let engine =
        Arc::new(Engine::new(EngineConfig { shard_count: 8, ..EngineConfig::default() }, MemoryJournal::default()));
    let daily = OutflowLimits { daily_minor: Some(daily_minor), ..OutflowLimits::default() };
    let monthly = OutflowLimits {
        per_transaction_minor: Some(per_transaction_minor),
        daily_minor: Some(MAX_AMOUNT_MINOR),
        monthly_minor: Some(monthly_minor),
    };
    open_funded(&engine, DAILY, AccountConfig { limits: daily, ..AccountConfig::default() }, 10_000_000);
    open_funded(&engine, MONTHLY, AccountConfig { limits: monthly, ..AccountConfig::default() }, 10_000_000);
    open_funded(&engine, PAYEE, AccountConfig::default(), 1);

    let workers: Vec<_> = (0..THREADS)
        .map(|thread_index| {
            let engine = Arc::clone(&engine);
            thread::spawn(move || {
                let mut rng = SmallRng::seed_from_u64(100 + thread_index as u64);
                // (user, amount, refusal) of every outflow tried.
                let mut tried = Vec::new();
                for n in 0..2_000 {
                    let user = if rng.random_bool(0.5) { DAILY } else { MONTHLY };
                    let minor = rng.random_range(1..5_000);
                    let operation = match n % 3 {
                        0 => {
                            Operation::Withdraw { account: usd(user), amount: amount(minor), provider: Provider::Ramp }
                        }
                        1 => Operation::Transfer {
                            from: AccountRef::User(usd(user)),
                            to: AccountRef::User(usd(PAYEE)),
                            amount: amount(minor),
                        },
                        _ => Operation::Reserve {
                            reservation_id: Uuid::from_u128(((thread_index as u128) << 64) | n as u128),
                            account: usd(user),
                            amount: amount(minor),
                            ttl_ms: None,
                        },
                    };
                    let request = Request { key: key(&format!("t{thread_index}-{n}")), now_ms: START_MS, operation };
                    tried.push((user, minor, engine.execute(request).result.err()));
                }
                tried
            })
        })
        .collect();
    let tried: Vec<(u128, i128, Option<EngineError>)> =
        workers.into_iter().flat_map(|worker| worker.join().unwrap()).collect();

    let state = engine.state();
    state.check_invariants().unwrap();
    engine.check_indexes().unwrap();
    let usage = |user| state.accounts.values().find(|view| view.account == usd(user)).unwrap().usage;
    let spent = |user| tried.iter().filter(|(who, _, refusal)| *who == user && refusal.is_none()).map(|t| t.1).sum();
    let (daily_spent, monthly_spent): (i128, i128) = (spent(DAILY), spent(MONTHLY));
    assert_eq!(usage(DAILY).day_used_minor, daily_spent);
    assert_eq!(usage(MONTHLY).month_used_minor, monthly_spent);
    assert!(daily_spent <= daily_minor, "{daily_spent} went out under a daily limit of {daily_minor}");
    assert!(monthly_spent <= monthly_minor, "{monthly_spent} went out under a monthly limit of {monthly_minor}");
    let mut refusals = 0;
    for (user, minor, refusal) in &tried {
        let Some(refusal) = refusal else { continue };
        refusals += 1;
        let (expected, headroom) = match (*user, *minor > per_transaction_minor) {
            (DAILY, _) => (LimitKind::Daily, daily_minor - daily_spent),
            (_, true) => (LimitKind::PerTransaction, per_transaction_minor),
            (_, false) => (LimitKind::Monthly, monthly_minor - monthly_spent),
        };
        assert!(
            matches!(refusal, EngineError::LimitExceeded { limit, .. } if *limit == expected),
            "{minor} from user {user}: {refusal:?}, expected {expected:?}"
        );
        assert!(*minor > headroom, "{minor} refused with {headroom} left under the {expected:?} limit");
    }
    assert!(refusals > 0 && daily_spent > daily_minor / 2 && monthly_spent > monthly_minor / 2);
}

/// Linked batches that each lock more shards than the inline lock set holds (the heap path),
/// run from several threads at once, some failing at their last transfer: nothing deadlocks,
/// and the balances end exactly where the successful batches alone would take them.
#[test]
fn batches_across_many_shards_are_atomic_under_concurrency() {
    const USERS: u128 = 48;
    const START_MINOR: i128 = 1_000_000;
    let engine =
        Arc::new(Engine::new(EngineConfig { shard_count: 64, ..EngineConfig::default() }, MemoryJournal::default()));
    for user in 0..USERS {
        open_funded(&engine, user, AccountConfig::default(), START_MINOR);
    }
    let workers: Vec<_> = (0..THREADS)
        .map(|thread_index| {
            let engine = Arc::clone(&engine);
            thread::spawn(move || {
                let mut rng = SmallRng::seed_from_u64(200 + thread_index as u64);
                let mut deltas = vec![0_i128; USERS as usize];
                let (mut applied, mut failed, mut wide) = (0, 0, 0);
                for n in 0..1_500 {
                    let mut transfers = Vec::new();
                    for _ in 0..rng.random_range(6..12) {
                        let from = rng.random_range(0..USERS);
                        let to = (from + rng.random_range(1..USERS)) % USERS;
                        transfers.push((from, to, rng.random_range(1..100)));
                    }
                    // One batch in four ends with a transfer no account can fund.
                    let fails = rng.random_range(0..4) == 0;
                    if fails {
                        transfers.push((0, 1, 100 * START_MINOR));
                    }
                    let mut shards: Vec<u32> = transfers
                        .iter()
                        .flat_map(|&(from, to, _)| {
                            [engine.shard_of(usd(from).user_id), engine.shard_of(usd(to).user_id)]
                        })
                        .collect();
                    shards.sort_unstable();
                    shards.dedup();
                    wide += usize::from(shards.len() > 4);
                    let operations = transfers
                        .iter()
                        .map(|&(from, to, minor)| Operation::Transfer {
                            from: AccountRef::User(usd(from)),
                            to: AccountRef::User(usd(to)),
                            amount: amount(minor),
                        })
                        .collect();
                    let operation = Operation::LinkedBatch { operations };
                    let request = Request { key: key(&format!("b{thread_index}-{n}")), now_ms: START_MS, operation };
                    match engine.execute(request).result {
                        Ok(_) => {
                            assert!(!fails, "a batch with an unfundable transfer went through");
                            applied += 1;
                            for (from, to, minor) in transfers {
                                deltas[from as usize] -= minor;
                                deltas[to as usize] += minor;
                            }
                        }
                        Err(EngineError::BatchOperationFailed { index, .. }) if fails => {
                            assert_eq!(index, transfers.len() - 1, "the failing transfer is the last");
                            failed += 1;
                        }
                        Err(error) => panic!("batch {n} of thread {thread_index}: {error:?}"),
                    }
                }
                assert!(applied > 0 && failed > 0);
                assert!(wide > 1_000, "only {wide} batches locked more than four shards");
                deltas
            })
        })
        .collect();
    let mut expected = vec![START_MINOR; USERS as usize];
    for deltas in workers.into_iter().map(|worker| worker.join().unwrap()) {
        for (balance, delta) in expected.iter_mut().zip(deltas) {
            *balance += delta;
        }
    }
    let state = engine.state();
    state.check_invariants().unwrap();
    engine.check_indexes().unwrap();
    for user in 0..USERS {
        let view = state.accounts.values().find(|view| view.account == usd(user)).unwrap();
        assert_eq!(view.balance.available_minor, expected[user as usize], "user {user}");
    }
    let records = engine.sink().drain();
    let replayed = Engine::new(*engine.config(), MemoryJournal::default());
    for record in &records {
        replayed.apply_record(record).unwrap();
    }
    assert_eq!(replayed.state(), state, "replaying the journal rebuilds the same state");
    replayed.check_indexes().unwrap();
}

/// A system account's balance is read as one snapshot across shards: while one thread moves
/// money through a provider's clearing account in linked batches that leave it where it was (a
/// deposit to a user on one shard, a withdrawal from a user on another), a reader never sees
/// the clearing account at a value it never had between requests.
#[test]
fn a_system_balance_is_read_whole_while_batches_change_its_parts() {
    const BATCHES: usize = 20_000;
    const MINOR: i128 = 100;
    let engine =
        Arc::new(Engine::new(EngineConfig { shard_count: 8, ..EngineConfig::default() }, MemoryJournal::default()));
    let payee = 0;
    let payer = (1..).find(|user| engine.shard_of(usd(*user).user_id) != engine.shard_of(usd(payee).user_id)).unwrap();
    open_funded(&engine, payee, AccountConfig::default(), 1);
    open_funded(&engine, payer, AccountConfig::default(), MINOR * BATCHES as i128);
    let clearing =
        AccountRef::System(SystemAccount { kind: SystemKind::ProviderClearing(Provider::Stripe), asset: Asset::USD });
    let settled = engine.balance(&clearing).unwrap();
    let (reading, done) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let reader = {
        let (engine, reading, done) = (Arc::clone(&engine), Arc::clone(&reading), Arc::clone(&done));
        thread::spawn(move || {
            let mut reads = 0_u64;
            while !done.load(Ordering::Relaxed) {
                assert_eq!(engine.balance(&clearing).unwrap(), settled, "read {reads} saw part of a batch");
                reading.store(true, Ordering::Relaxed);
                reads += 1;
            }
            reads
        })
    };
    // The batches start once the reader reads, so the two overlap however the threads are scheduled.
    while !reading.load(Ordering::Relaxed) {
        thread::yield_now();
    }
    for n in 0..BATCHES {
        let operation = Operation::LinkedBatch {
            operations: vec![
                Operation::Deposit { account: usd(payee), amount: amount(MINOR), provider: Provider::Stripe },
                Operation::Withdraw { account: usd(payer), amount: amount(MINOR), provider: Provider::Stripe },
            ],
        };
        engine.execute(Request { key: key(&format!("batch-{n}")), now_ms: START_MS, operation }).result.unwrap();
    }
    done.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    assert_eq!(engine.balance(&clearing).unwrap(), settled);
}
