//! Engine benchmarks (criterion): the hot path alone, without the database.
//!
//! Each operation is measured on the sharded engine and, in the same run, on a baseline: the
//! same logical work (idempotency check, funds check, postings, reservations, an appended
//! journal entry) behind one global `Mutex<HashMap>`, which is what a first implementation
//! would write. The engine's journal sinks here keep records in memory (single thread) or drop
//! them (several threads), so the figures are the engine itself; the journal's cost is measured
//! by the journal benchmark. One group (`reserve_commit_journal_channel`) hands records to the
//! production sink, the journal's bounded channel, to show what the engine costs in front of it.
//!
//! The single-thread cases build their requests (keys included) before the clock starts, for
//! both sides (`iter_batched`): building and validating a request is the API layer's work, not
//! the engine's. The multi-thread cases build them inside the timed loop, on both sides alike.
//!
//! Run: `cargo bench --bench engine`. Figures and their reading live in docs/BENCHMARKS.md.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use crossbeam_utils::CachePadded;
use diboas_ledger::engine::account::{AccountConfig, AccountRef, Domain, Provider, UserAccount};
use diboas_ledger::engine::asset::Asset;
use diboas_ledger::engine::idempotency::IdempotencyKey;
use diboas_ledger::engine::money::Amount;
use diboas_ledger::engine::operation::{Operation, Request};
use diboas_ledger::engine::record::{JournalClosed, JournalRecord, JournalSink};
use diboas_ledger::engine::{Engine, EngineConfig};
use parking_lot::Mutex;
use uuid::Uuid;

/// The allocator the server ships with (src/main.rs), so the engine is measured as it runs there.
#[global_allocator]
static ALLOCATOR: diboas_ledger::allocator::LedgerAllocator = diboas_ledger::allocator::LedgerAllocator;

/// Keys are forgotten after this long; the benchmark clock advances past it regularly so the
/// idempotency store stays bounded, as it does in production.
const RETENTION_MS: i64 = 1_000;
const SWEEP_EVERY: u64 = 1 << 16;
const UNIFORM_USERS: u128 = 10_000;
/// Requests built ahead per timed batch: enough to hide the timer, few enough to stay in cache.
const PREPARED_PER_BATCH: BatchSize = BatchSize::NumIterations(1_024);
const HOT_USERS: u128 = 4;

/// The multi-thread cases' sink: drops each record on the spot, in the timed loop.
struct DiscardJournal;

impl JournalSink for DiscardJournal {
    fn append(&mut self, record: JournalRecord) -> Result<(), JournalClosed> {
        black_box(record);
        Ok(())
    }
}

/// The single-thread cases' sink: keeps each record until the untimed setup of the next batch
/// drops it, as the production channel hands it to the writer thread, which drops it there. It
/// takes no lock of its own: the engine calls it under its sequencer lock. The production
/// channel's send still pays its own atomics and a boxed record's allocation; this sink is the
/// lower bound (`journal_channel` measures the real one).
#[derive(Default)]
struct HeldJournal {
    records: Vec<JournalRecord>,
}

impl HeldJournal {
    /// Drops the records held so far, keeping the buffer.
    fn release(&mut self) {
        self.records.clear();
    }
}

impl JournalSink for HeldJournal {
    fn append(&mut self, record: JournalRecord) -> Result<(), JournalClosed> {
        self.records.push(record);
        Ok(())
    }
}

fn usd(user: u128) -> UserAccount {
    UserAccount { user_id: Uuid::from_u128(user), domain: Domain::Banking, asset: Asset::USD }
}

fn amount(minor: i128) -> Amount {
    Amount::from_minor(minor).unwrap_or_else(|error| panic!("{error}"))
}

/// Reserves 5 minor units of `from` under `reservation_id`, then commits all of it to `to`.
fn reserve_and_commit(reservation_id: Uuid, from: u128, to: u128) -> (Operation, Operation) {
    let reserve = Operation::Reserve { reservation_id, account: usd(from), amount: amount(5), ttl_ms: None };
    let commit = Operation::Commit {
        user_id: usd(from).user_id,
        reservation_id,
        destination: AccountRef::User(usd(to)),
        amount: None,
    };
    (reserve, commit)
}

/// A unique key per request without formatting: the counter's hex digits.
fn key_for(counter: u64) -> IdempotencyKey {
    let mut text = [b'0'; 17];
    text[0] = b'k';
    for (index, slot) in text[1..].iter_mut().enumerate() {
        let nibble = ((counter >> (60 - 4 * index)) & 0xf) as u8;
        *slot = if nibble < 10 { b'0' + nibble } else { b'a' + nibble - 10 };
    }
    IdempotencyKey::new(std::str::from_utf8(&text).unwrap_or_default()).unwrap_or_else(|error| panic!("{error}"))
}

/// One thread's requests: unique keys (the thread index in the high bits, so threads share no
/// counter) and a clock that jumps past the retention window every `SWEEP_EVERY` requests,
/// when the sweeping caller sweeps, as production would, so the idempotency store stays bounded.
struct Caller {
    thread_index: u64,
    sweeper: bool,
    requests: u64,
}

impl Caller {
    fn new(thread_index: u64, sweeper: bool) -> Caller {
        Caller { thread_index, sweeper, requests: 0 }
    }

    /// The next request's (key counter, now_ms, whether this caller sweeps first).
    fn next(&mut self) -> (u64, i64, bool) {
        let requests = self.requests;
        self.requests += 1;
        let now_ms = (requests / SWEEP_EVERY) as i64 * 2 * RETENTION_MS;
        let sweeps = self.sweeper && requests.is_multiple_of(SWEEP_EVERY);
        ((self.thread_index << 48) | requests, now_ms, sweeps)
    }
}

/// The sharded engine and its sink.
struct Sharded<S> {
    engine: Engine<S>,
}

impl<S: JournalSink> Sharded<S> {
    fn new(users: u128, sink: S) -> Sharded<S> {
        let config = EngineConfig { retention_ms: RETENTION_MS, ..EngineConfig::default() };
        let sharded = Sharded { engine: Engine::new(config, sink) };
        let mut setup = Caller::new(0xffff, false);
        for user in 0..users {
            sharded.run(&mut setup, Operation::OpenAccount { account: usd(user), config: AccountConfig::default() });
            let deposit =
                Operation::Deposit { account: usd(user), amount: amount(1 << 60), provider: Provider::Stripe };
            sharded.run(&mut setup, deposit);
        }
        sharded
    }

    /// Executes a prepared request, sweeping first when its caller would.
    fn execute(&self, prepared: Prepared) {
        if let Some(now_ms) = prepared.sweep_at_ms {
            self.engine.sweep(now_ms).unwrap_or_else(|error| panic!("{error}"));
        }
        let outcome = self.engine.execute(prepared.request);
        assert!(outcome.result.is_ok(), "{:?}", outcome.result);
    }

    fn run(&self, caller: &mut Caller, operation: Operation) {
        self.execute(prepare(caller, operation));
    }
}

/// Builds the caller's next request for `operation`, outside any timing.
fn prepare(caller: &mut Caller, operation: Operation) -> Prepared {
    let (counter, now_ms, sweeps) = caller.next();
    Prepared { sweep_at_ms: sweeps.then_some(now_ms), request: Request { key: key_for(counter), now_ms, operation } }
}

/// A request built before the clock starts.
struct Prepared {
    request: Request,
    /// The caller sweeps at this time before the request (see `Caller`).
    sweep_at_ms: Option<i64>,
}

/// The baseline: one lock over plain maps doing the same logical work.
#[derive(Default)]
struct GlobalInner {
    balances: HashMap<UserAccount, (i128, i128)>,
    reservations: HashMap<Uuid, (UserAccount, i128)>,
    keys: HashMap<IdempotencyKey, u64>,
    journal: Vec<(u64, UserAccount, UserAccount, i128)>,
}

#[derive(Default)]
struct Global {
    inner: Mutex<GlobalInner>,
}

impl Global {
    fn new(users: u128) -> Global {
        let global = Global::default();
        let mut inner = global.inner.lock();
        for user in 0..users {
            inner.balances.insert(usd(user), (1 << 60, 0));
        }
        drop(inner);
        global
    }

    /// Builds the caller's next key, outside any timing: (key, counter, whether to sweep first).
    fn prepare(caller: &mut Caller) -> PreparedKey {
        let (counter, _, sweeps) = caller.next();
        PreparedKey { key: key_for(counter), counter, sweeps }
    }

    fn with_key(&self, prepared: PreparedKey, work: impl FnOnce(&mut GlobalInner, u64)) {
        let mut inner = self.inner.lock();
        if prepared.sweeps {
            inner.keys.clear();
            inner.journal.clear();
        }
        let first = inner.keys.insert(prepared.key, prepared.counter).is_none();
        assert!(first, "every benchmark request has a new key");
        work(&mut inner, prepared.counter);
    }

    fn transfer(&self, prepared: PreparedKey, from: UserAccount, to: UserAccount, minor: i128) {
        self.with_key(prepared, |inner, sequence| {
            let source = inner.balances.get_mut(&from).map(|balance| &mut balance.0);
            match source {
                Some(available) if *available >= minor => *available -= minor,
                _ => return,
            }
            if let Some(balance) = inner.balances.get_mut(&to) {
                balance.0 += minor;
            }
            inner.journal.push((sequence, from, to, minor));
        });
    }

    fn reserve(&self, prepared: PreparedKey, id: Uuid, account: UserAccount, minor: i128) {
        self.with_key(prepared, |inner, sequence| {
            if let Some(balance) = inner.balances.get_mut(&account)
                && balance.0 >= minor
            {
                balance.0 -= minor;
                balance.1 += minor;
                inner.reservations.insert(id, (account, minor));
                inner.journal.push((sequence, account, account, minor));
            }
        });
    }

    fn commit(&self, prepared: PreparedKey, id: Uuid, to: UserAccount) {
        self.with_key(prepared, |inner, sequence| {
            if let Some((account, minor)) = inner.reservations.remove(&id) {
                if let Some(balance) = inner.balances.get_mut(&account) {
                    balance.1 -= minor;
                }
                if let Some(balance) = inner.balances.get_mut(&to) {
                    balance.0 += minor;
                }
                inner.journal.push((sequence, account, to, minor));
            }
        });
    }
}

/// A baseline key built before the clock starts.
struct PreparedKey {
    key: IdempotencyKey,
    counter: u64,
    sweeps: bool,
}

/// Two users on the same shard, and two on different shards.
fn shard_pairs<S: JournalSink>(engine: &Engine<S>) -> ((u128, u128), (u128, u128)) {
    let same = (1..UNIFORM_USERS)
        .find(|user| engine.shard_of(usd(*user).user_id) == engine.shard_of(usd(0).user_id))
        .unwrap_or(1);
    let cross = (1..UNIFORM_USERS)
        .find(|user| engine.shard_of(usd(*user).user_id) != engine.shard_of(usd(0).user_id))
        .unwrap_or(1);
    ((0, same), (0, cross))
}

fn single_thread(c: &mut Criterion) {
    let sharded = Sharded::new(UNIFORM_USERS, HeldJournal::default());
    // Every batch's untimed setup first drops the records the last batch journaled.
    let held = |caller: &mut Caller, operation| {
        sharded.engine.sink().release();
        prepare(caller, operation)
    };
    let global = Global::new(UNIFORM_USERS);
    let ((same_a, same_b), (cross_a, cross_b)) = shard_pairs(&sharded.engine);
    let transfer = |from, to| Operation::Transfer {
        from: AccountRef::User(usd(from)),
        to: AccountRef::User(usd(to)),
        amount: amount(1),
    };
    let mut caller = Caller::new(0, true);

    let mut group = c.benchmark_group("transfer");
    group.throughput(Throughput::Elements(1));
    group.bench_function("sharded/same_shard", |b| {
        b.iter_batched(
            || held(&mut caller, transfer(same_a, same_b)),
            |prepared| sharded.execute(prepared),
            PREPARED_PER_BATCH,
        )
    });
    group.bench_function("sharded/cross_shard", |b| {
        b.iter_batched(
            || held(&mut caller, transfer(cross_a, cross_b)),
            |prepared| sharded.execute(prepared),
            PREPARED_PER_BATCH,
        )
    });
    group.bench_function("global_mutex", |b| {
        b.iter_batched(
            || Global::prepare(&mut caller),
            |prepared| global.transfer(prepared, usd(cross_a), usd(cross_b), 1),
            PREPARED_PER_BATCH,
        )
    });
    group.finish();

    // A request that changes nothing (an account set to the frozen state it already has): what
    // every request pays besides its own work (key, locks, idempotency, journal record), plus the
    // one account lookup that finds nothing to change.
    let mut group = c.benchmark_group("no_change");
    group.throughput(Throughput::Elements(1));
    let unchanged = || Operation::SetFrozen { account: usd(same_a), frozen: false };
    group.bench_function("sharded", |b| {
        b.iter_batched(|| held(&mut caller, unchanged()), |prepared| sharded.execute(prepared), PREPARED_PER_BATCH)
    });
    group.bench_function("global_mutex", |b| {
        b.iter_batched(
            || Global::prepare(&mut caller),
            |prepared| {
                global.with_key(prepared, |inner, sequence| {
                    assert!(inner.balances.contains_key(&usd(same_a)), "the account exists");
                    inner.journal.push((sequence, usd(same_a), usd(same_a), 0));
                })
            },
            PREPARED_PER_BATCH,
        )
    });
    group.finish();

    let mut group = c.benchmark_group("reserve_commit");
    group.throughput(Throughput::Elements(1));
    let mut next_id = 0_u64;
    group.bench_function("sharded", |b| {
        b.iter_batched(
            || {
                next_id += 1;
                let (reserve, commit) = reserve_and_commit(Uuid::from_u64_pair(0, next_id), cross_a, cross_b);
                (held(&mut caller, reserve), prepare(&mut caller, commit))
            },
            |(reserve, commit)| {
                sharded.execute(reserve);
                sharded.execute(commit);
            },
            PREPARED_PER_BATCH,
        )
    });
    group.bench_function("global_mutex", |b| {
        b.iter_batched(
            || {
                next_id += 1;
                (Uuid::from_u64_pair(0, next_id), Global::prepare(&mut caller), Global::prepare(&mut caller))
            },
            |(reservation_id, reserve, commit)| {
                global.reserve(reserve, reservation_id, usd(cross_a), 5);
                global.commit(commit, reservation_id, usd(cross_b));
            },
            PREPARED_PER_BATCH,
        )
    });
    group.finish();

    let mut group = c.benchmark_group("linked_batch_10");
    group.throughput(Throughput::Elements(10));
    let mut next_user = 0_u128;
    let mut next_pairs = move || {
        [(); 10].map(|()| {
            next_user = (next_user + 1) % (UNIFORM_USERS - 1);
            (next_user, next_user + 1)
        })
    };
    group.bench_function("sharded", |b| {
        b.iter_batched(
            || {
                let operations = next_pairs().into_iter().map(|(from, to)| transfer(from, to)).collect();
                held(&mut caller, Operation::LinkedBatch { operations })
            },
            |prepared| sharded.execute(prepared),
            PREPARED_PER_BATCH,
        )
    });
    group.bench_function("global_mutex", |b| {
        b.iter_batched(
            || (Global::prepare(&mut caller), next_pairs()),
            |(prepared, pairs)| {
                global.with_key(prepared, |inner, sequence| {
                    for (from, to) in pairs {
                        let (from, to) = (usd(from), usd(to));
                        if let Some(balance) = inner.balances.get_mut(&from) {
                            balance.0 -= 1;
                        }
                        if let Some(balance) = inner.balances.get_mut(&to) {
                            balance.0 += 1;
                        }
                        inner.journal.push((sequence, from, to, 1));
                    }
                })
            },
            PREPARED_PER_BATCH,
        )
    });
    group.finish();
}

type TransferFn = Arc<dyn Fn(&mut Caller, u128, u128) + Send + Sync>;

/// Runs `operations` uniform random transfers over `users` accounts, split over one thread per
/// caller (callers persist across calls so keys stay unique and clocks move forward); returns
/// the wall time.
fn parallel_transfers(
    callers: &[CachePadded<Mutex<Caller>>],
    operations: u64,
    transfer: &TransferFn,
    users: u128,
) -> Duration {
    let per_thread = operations / callers.len() as u64;
    let start = Instant::now();
    std::thread::scope(|scope| {
        for (thread_index, caller) in callers.iter().enumerate() {
            let transfer = Arc::clone(transfer);
            scope.spawn(move || {
                let mut caller = caller.lock();
                let mut state = 0x9E37_79B9_7F4A_7C15_u64 ^ thread_index as u64;
                for _ in 0..per_thread {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let from = u128::from(state) % users;
                    let to = (from + 1 + u128::from(state >> 32) % (users - 1)) % users;
                    transfer(&mut caller, from, to);
                }
            });
        }
    });
    start.elapsed()
}

fn multi_thread(c: &mut Criterion) {
    for (label, users) in [("uniform", UNIFORM_USERS), ("hot", HOT_USERS)] {
        let mut group = c.benchmark_group(format!("transfers_{label}"));
        group.throughput(Throughput::Elements(1));
        for threads in [1_u64, 2] {
            // A fresh engine and baseline per thread count, so every caller's clock starts with its engine's.
            // Each caller on cache lines of its own: every request writes its caller's counter, and
            // two callers sharing a line made the threads stall each other (seen as runs of two
            // threads taking twice as long as others, depending on where the vector landed).
            let callers = || -> Vec<CachePadded<Mutex<Caller>>> {
                (0..threads).map(|index| CachePadded::new(Mutex::new(Caller::new(index, index == 0)))).collect()
            };
            let engine = Arc::new(Sharded::new(users, DiscardJournal));
            let sharded_transfer: TransferFn = Arc::new(move |caller, from, to| {
                let transfer = Operation::Transfer {
                    from: AccountRef::User(usd(from)),
                    to: AccountRef::User(usd(to)),
                    amount: amount(1),
                };
                engine.run(caller, transfer)
            });
            group.bench_with_input(BenchmarkId::new("sharded", threads), &callers(), |b, callers| {
                b.iter_custom(|iterations| parallel_transfers(callers, iterations, &sharded_transfer, users))
            });
            let baseline = Arc::new(Global::new(users));
            let global_transfer: TransferFn =
                Arc::new(move |caller, from, to| baseline.transfer(Global::prepare(caller), usd(from), usd(to), 1));
            group.bench_with_input(BenchmarkId::new("global_mutex", threads), &callers(), |b, callers| {
                b.iter_custom(|iterations| parallel_transfers(callers, iterations, &global_transfer, users))
            });
        }
        group.finish();
    }
}

/// Not the engine but the host: how long one cache line takes to move from one core to the other,
/// one way. Two threads take turns writing one atomic; each turn is a move. On the 2-vCPU hosts
/// these figures come from, it was either about 50 ns or about 180 ns, depending on where the
/// hypervisor had put the vCPUs at the time, and that decided whether two threads beat one in
/// the cases above (docs/BENCHMARKS.md, "Session 23"). The mode can change within minutes, so
/// this tells the mode around the run, not during each case. It needs two CPUs to run on: pinned
/// to one (`taskset -c 1`), every turn would wait for the scheduler, so it is skipped.
fn host_line_between_cores(c: &mut Criterion) {
    if std::thread::available_parallelism().map_or(1, usize::from) < 2 {
        return;
    }
    let mut group = c.benchmark_group("host");
    group.bench_function("line_between_cores_one_way", |b| {
        b.iter_custom(|round_trips| {
            // The timing thread writes odd values, the spawned one even; each waits for the
            // other's. Trip 0 is untimed: it waits until the spawned thread is running.
            let turn = CachePadded::new(AtomicU64::new(0));
            std::thread::scope(|scope| {
                scope.spawn(|| {
                    for trip in 0..=round_trips {
                        while turn.load(Ordering::Acquire) != 2 * trip + 1 {}
                        turn.store(2 * trip + 2, Ordering::Release);
                    }
                });
                turn.store(1, Ordering::Release);
                while turn.load(Ordering::Acquire) != 2 {}
                let start = Instant::now();
                for trip in 1..=round_trips {
                    turn.store(2 * trip + 1, Ordering::Release);
                    while turn.load(Ordering::Acquire) != 2 * trip + 2 {}
                }
                start.elapsed() / 2
            })
        })
    });
    group.finish();
}

/// The journal channel as it was before session 18, for comparison: records inline in its
/// slots instead of boxed (see the production sink in `engine::record`).
struct InlineChannel(crossbeam_channel::Sender<JournalRecord>);

impl JournalSink for InlineChannel {
    fn append(&mut self, record: JournalRecord) -> Result<(), JournalClosed> {
        self.0.send(record).map_err(|refused| JournalClosed { record: Box::new(refused.0) })
    }
}

/// Reserve + commit into the production sink, a bounded channel at the journal's default
/// capacity, beside the same channel carrying records inline. The untimed setup drains the
/// channel and drops the records on another thread, as the journal's batcher does, so their
/// memory comes back to the engine's thread the way it does in production (freed elsewhere,
/// last touched by another core). The `HeldJournal` cases above are the engine's lower bound;
/// this is what the engine costs in front of the journal.
fn journal_channel(c: &mut Criterion) {
    let capacity = diboas_ledger::journal::JournalConfig::default().channel_capacity;
    let (boxed_sender, boxed_records) = crossbeam_channel::bounded::<Box<JournalRecord>>(capacity);
    let (inline_sender, inline_records) = crossbeam_channel::bounded::<JournalRecord>(capacity);
    let mut caller = Caller::new(1, true);
    let mut group = c.benchmark_group("reserve_commit_journal_channel");
    group.throughput(Throughput::Elements(1));
    let mut next_id = 1_u64 << 40;
    bench_into_channel(
        &mut group,
        "boxed",
        Sharded::new(UNIFORM_USERS, boxed_sender),
        &boxed_records,
        &mut caller,
        &mut next_id,
    );
    let inline = Sharded::new(UNIFORM_USERS, InlineChannel(inline_sender));
    bench_into_channel(&mut group, "inline", inline, &inline_records, &mut caller, &mut next_id);
    group.finish();
}

/// One case of `journal_channel`: reserve + commit across shards into `sharded`, whose sink
/// feeds `records`.
fn bench_into_channel<S: JournalSink, T: Send>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    sharded: Sharded<S>,
    records: &crossbeam_channel::Receiver<T>,
    caller: &mut Caller,
    next_id: &mut u64,
) {
    let (_, (from, to)) = shard_pairs(&sharded.engine);
    group.bench_function(name, |b| {
        b.iter_batched(
            || {
                drop_on_another_thread(records.try_iter().collect());
                *next_id += 1;
                let (reserve, commit) = reserve_and_commit(Uuid::from_u64_pair(0, *next_id), from, to);
                (prepare(caller, reserve), prepare(caller, commit))
            },
            |(reserve, commit)| {
                sharded.execute(reserve);
                sharded.execute(commit);
            },
            PREPARED_PER_BATCH,
        )
    });
}

/// Drops `records` on a thread of their own and waits for it: the journal's batcher frees the
/// records the engine allocated.
fn drop_on_another_thread<T: Send>(records: Vec<T>) {
    if !records.is_empty() {
        std::thread::scope(|scope| {
            scope.spawn(move || drop(records));
        });
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = single_thread, multi_thread, host_line_between_cores, journal_channel
}
criterion_main!(benches);
