//! PostgreSQL cut off under the server: callers get UNAVAILABLE with reason
//! `JOURNAL_UNAVAILABLE`, and once PostgreSQL is back a retry with the same idempotency key
//! completes the operation exactly once.
//!
//! As in journal_outage.rs, the shared PostgreSQL server is not stopped (other tests use it): a
//! small TCP proxy sits between the ledger and PostgreSQL and the test cuts it.

mod grpc_common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use diboas_ledger::api::server::ServeConfig;
use diboas_ledger::ledger::LedgerConfig;
use grpc_common::*;
use sqlx::PgPool;
use tokio::net::{TcpListener, TcpStream};
use tonic::Code;

/// How many times the test retries (20 ms apart) before declaring the server stuck.
const ATTEMPTS: usize = 3_000;

/// A TCP proxy on its own thread and runtime, so it keeps forwarding whatever the test does.
struct Proxy {
    port: u16,
    cut: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Proxy {
    fn start(upstream: String) -> Proxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let (cut_flag, registry) = (cut.clone(), connections.clone());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                let listener = TcpListener::from_std(listener).unwrap();
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if cut_flag.load(Ordering::SeqCst) {
                        continue; // dropped: the connection is refused while cut
                    }
                    let upstream = upstream.clone();
                    let task = tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    registry.lock().unwrap().push(task.abort_handle());
                }
            });
        });
        Proxy { port, cut, connections }
    }

    /// Drops every open connection and refuses new ones, as a dead server or network would.
    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }

    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

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
