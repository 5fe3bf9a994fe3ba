//! The relay under `kill -9`: the real `diboas-ledger serve` (ledger and relay in one process)
//! runs under deposit load and is SIGKILLed again and again, preferably while JetStream already
//! holds events the relay has not yet recorded as published (the crash between publish and
//! mark). Each restart's relay republishes from its recorded cursor. At the end, once the last
//! server has published everything, JetStream must hold every outbox event exactly once (the
//! republished copies deduplicated by event id) in position order per aggregate, and every
//! deposit the server acknowledged must have its balance event there.

mod grpc_common;
mod outbox_common;

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use diboas_ledger::api::pb::ledger_client::LedgerClient;
use diboas_ledger::outbox::relay::RelayConfig;
use grpc_common::*;
use outbox_common::*;
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use tonic::transport::Channel;

const ACCOUNTS: u128 = 8;
const LOAD_TASKS: usize = 4;
/// Kill cycles stop once this many kills landed between a publish and its record...
const WANTED_GAP_KILLS: usize = 3;
/// ...or after this many cycles, whichever comes first.
const MAX_CYCLES: usize = 12;
/// A cycle runs its load at least this long, times the cycle's number plus one, before it
/// watches for the gap: kills land after varying amounts of work.
const LOAD_BEFORE_WATCH: Duration = Duration::from_millis(150);
/// How long a cycle watches for the publish-before-record gap before killing anyway.
const GAP_WATCH: Duration = Duration::from_secs(3);
/// Between two looks for the gap: short, since a round's gap lasts a few milliseconds.
const GAP_POLL: Duration = Duration::from_millis(1);
/// Small rounds, so a round's publish and its record alternate often.
const RELAY_ROUND_EVENTS: &str = "64";
/// How long the last server may take to publish the backlog.
const DRAIN_DEADLINE: Duration = Duration::from_secs(60);

/// Kills the server if the test fails while it runs.
struct ServerProcess(Option<Child>);

impl ServerProcess {
    fn start(options: &PgConnectOptions, relay: &RelayConfig, address: &str) -> ServerProcess {
        let child = Command::new(env!("CARGO_BIN_EXE_diboas-ledger"))
            .args(["serve", "--dev-mode", "--listen", address, "--metrics-listen", "127.0.0.1:0"])
            .args(["--database-url", &url_of(options), "--nats-url", NATS_URL])
            .args(["--nats-stream", &relay.stream_name, "--nats-subject-prefix", &relay.subject_prefix])
            .args(["--outbox-batch-events", RELAY_ROUND_EVENTS])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start diboas-ledger serve");
        ServerProcess(Some(child))
    }

    /// SIGKILL (what `Child::kill` sends on Unix), then reap.
    fn kill(&mut self) {
        if let Some(mut child) = self.0.take() {
            child.kill().expect("SIGKILL the server");
            child.wait().expect("reap the server");
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_address() -> String {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    probe.local_addr().expect("its address").to_string()
}

async fn connect(address: &str) -> LedgerClient<Channel> {
    for _ in 0..400 {
        if let Ok(channel) = Channel::from_shared(format!("http://{address}")).expect("a URI").connect().await {
            return LedgerClient::new(channel);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the server never started listening on {address}");
}

/// The relay's recorded cursor: every event at or below it is recorded as handled.
async fn recorded_cursor(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT COALESCE(max(through_position), 0) FROM ledger.outbox_deliveries")
        .fetch_one(pool)
        .await
        .expect("read the cursor")
}

/// The position of the newest event JetStream holds (0 before the relay made the stream).
async fn newest_in_jetstream(jetstream: &async_nats::jetstream::Context, relay: &RelayConfig) -> i64 {
    let Ok(mut stream) = jetstream.get_stream(&relay.stream_name).await else { return 0 };
    let Ok(info) = stream.info().await else { return 0 };
    let last = info.state.last_sequence;
    if last == 0 {
        return 0;
    }
    match stream.get_raw_message(last).await {
        Ok(message) => message
            .headers
            .get("Diboas-Position")
            .and_then(|position| position.as_str().parse().ok())
            .expect("every message carries its position"),
        Err(_) => 0,
    }
}

/// True when JetStream holds an event the relay has not recorded: a kill now is a kill between
/// publish and mark.
async fn in_publish_gap(pool: &PgPool, jetstream: &async_nats::jetstream::Context, relay: &RelayConfig) -> bool {
    newest_in_jetstream(jetstream, relay).await > recorded_cursor(pool).await
}

/// Deposits until the server goes away; records the key of every acknowledged deposit.
fn start_load(
    address: &str,
    cycle: usize,
    acknowledged: Arc<Mutex<BTreeSet<String>>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..LOAD_TASKS)
        .map(|task| {
            let (address, acknowledged) = (address.to_owned(), acknowledged.clone());
            tokio::spawn(async move {
                let mut client = connect(&address).await;
                for index in 0.. {
                    let key = format!("c{cycle}-t{task}-{index}");
                    let account = usd(index as u128 % ACCOUNTS);
                    match client.deposit(deposit(&key, &account, "0.01")).await {
                        Ok(_) => {
                            acknowledged.lock().expect("not poisoned").insert(key);
                        }
                        Err(_) => return,
                    }
                }
            })
        })
        .collect()
}

#[sqlx::test]
async fn sigkill_between_publish_and_record_loses_and_duplicates_nothing(pool: PgPool) {
    let options = prepared(&pool).await;
    let relay = relay_config(NATS_URL);
    let nats = async_nats::connect(NATS_URL).await.expect("connect to NATS");
    let jetstream = async_nats::jetstream::new(nats);
    let acknowledged = Arc::new(Mutex::new(BTreeSet::new()));

    let mut gap_kills = 0;
    let mut cycles = 0;
    while gap_kills < WANTED_GAP_KILLS && cycles < MAX_CYCLES {
        let address = free_address();
        let mut server = ServerProcess::start(&options, &relay, &address);
        let mut client = connect(&address).await;
        for n in 0..ACCOUNTS {
            // The same key every cycle: opening replays idempotently after the first.
            client.open_account(open(&format!("open-{n}"), &usd(n))).await.expect("open");
        }
        let load = start_load(&address, cycles, acknowledged.clone());
        tokio::time::sleep(LOAD_BEFORE_WATCH * (cycles as u32 + 1)).await;
        let watch_until = Instant::now() + GAP_WATCH;
        while Instant::now() < watch_until && !in_publish_gap(&pool, &jetstream, &relay).await {
            tokio::time::sleep(GAP_POLL).await;
        }
        server.kill();
        for task in load {
            task.await.expect("a load task");
        }
        if in_publish_gap(&pool, &jetstream, &relay).await {
            gap_kills += 1;
        }
        cycles += 1;
    }
    eprintln!("{cycles} kill cycles, {gap_kills} between a publish and its record");
    assert!(gap_kills >= 1, "no kill in {cycles} cycles landed between a publish and its record");

    // The last server publishes the backlog, the republished events among it.
    let address = free_address();
    let mut server = ServerProcess::start(&options, &relay, &address);
    let _client = connect(&address).await;
    let deadline = Instant::now() + DRAIN_DEADLINE;
    loop {
        let unpublished: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger.outbox WHERE status <> 'published'")
            .fetch_one(&pool)
            .await
            .expect("count unpublished");
        if unpublished == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{unpublished} events still unpublished");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.kill();

    assert_published_exactly_once(&pool, &relay).await;
    let published_keys: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT j.idempotency_key FROM ledger.outbox_events e
         JOIN ledger.journal j ON j.sequence = e.sequence
         WHERE e.event_type = 'balance_changed'",
    )
    .fetch_all(&pool)
    .await
    .expect("the keys behind the published balance events");
    let published_keys: BTreeSet<String> = published_keys.into_iter().collect();
    // Every outbox event is in JetStream (checked above), so an acknowledged deposit with its
    // balance event in the outbox has it in JetStream too.
    let acknowledged = acknowledged.lock().expect("not poisoned").clone();
    let missing: Vec<&String> = acknowledged.difference(&published_keys).collect();
    eprintln!("{} deposits acknowledged, {} events published", acknowledged.len(), outbox_rows(&pool).await.len());
    assert!(missing.is_empty(), "acknowledged deposits with no published event: {missing:?}");
    assert!(acknowledged.len() > LOAD_TASKS, "the load made too few deposits to test anything");
    delete_stream(&relay).await;
}
