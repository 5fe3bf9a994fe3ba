//! Helpers shared by the gRPC tests: a server on a free port over a fresh database, a client,
//! and builders for wire requests.
//!
//! Each test gets a fresh database from `#[sqlx::test]` (DATABASE_URL must name a PostgreSQL
//! role that can create databases, e.g. postgres://postgres@127.0.0.1:5432/postgres).

#![allow(dead_code, reason = "each test binary uses a different subset of these helpers")]

use std::net::SocketAddr;

use diboas_ledger::api::pb;
use diboas_ledger::api::pb::ledger_client::LedgerClient;
use diboas_ledger::api::server::{ServeConfig, ServeError, ServeOptions, serve};
use diboas_ledger::api::status::ERROR_DOMAIN;
use diboas_ledger::ledger::{Ledger, LedgerConfig};
use diboas_ledger::store;
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt;
use uuid::Uuid;

/// The URL of a test database, for the binary's `--database-url`.
pub fn url_of(options: &PgConnectOptions) -> String {
    format!(
        "postgres://{}@{}:{}/{}",
        options.get_username(),
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("postgres")
    )
}

/// Migrates (already done by `#[sqlx::test]`, harmless again), seeds assets, creates partitions.
pub async fn prepared(pool: &PgPool) -> PgConnectOptions {
    let options = (*pool.connect_options()).clone();
    store::prepare(&options).await.expect("prepare the test database");
    options
}

pub struct TestServer {
    pub address: SocketAddr,
    pub client: LedgerClient<Channel>,
    /// The client's connection, for the other services (health, reflection).
    pub channel: Channel,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<Result<(), ServeError>>,
}

impl TestServer {
    pub async fn start(options: PgConnectOptions) -> TestServer {
        TestServer::start_with(options, ServeConfig::default()).await
    }

    pub async fn start_with(options: PgConnectOptions, config: ServeConfig) -> TestServer {
        TestServer::start_with_ledger(LedgerConfig::new(options), config).await
    }

    pub async fn start_with_ledger(ledger: LedgerConfig, config: ServeConfig) -> TestServer {
        TestServer::start_with_options(ledger, ServeOptions::development(config)).await
    }

    pub async fn start_with_options(ledger: LedgerConfig, options: ServeOptions) -> TestServer {
        let ledger = Ledger::open(ledger).await.expect("open the ledger");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind a free port");
        let address = listener.local_addr().expect("local address");
        let (shutdown, signal) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(ledger, listener, options, async {
            // A dropped sender also means stop.
            let _ = signal.await;
        }));
        let channel = Channel::from_shared(format!("http://{address}")).expect("uri").connect().await.expect("connect");
        TestServer { address, client: LedgerClient::new(channel.clone()), channel, shutdown, task }
    }

    /// Graceful shutdown: the server stops, the ledger flushes its journal, `serve` returns Ok.
    pub async fn stop(self) {
        let TestServer { client, channel, shutdown, task, .. } = self;
        drop((client, channel));
        shutdown.send(()).expect("server still running");
        task.await.expect("server task").expect("server stopped cleanly");
    }
}

pub fn user(n: u128) -> String {
    Uuid::from_u128(0x6f1c_0000_0000_4000_8000_0000_0000_0000 + n).to_string()
}

pub fn account(n: u128, domain: pb::Domain, asset: &str) -> pb::UserAccount {
    pb::UserAccount { user_id: user(n), domain: domain.into(), asset: asset.to_string() }
}

/// The id of transaction `n` in the tests.
pub fn tx_id(n: u128) -> String {
    Uuid::from_u128(0x7a00_0000_0000_4000_8000_0000_0000_0000 + n).to_string()
}

/// An InitiateTransaction of 10.00 USD added from Stripe to user `user_n`'s banking account,
/// as transaction `n` under the key `init-<n>`.
pub fn add_money(n: u128, user_n: u128) -> pb::InitiateTransactionRequest {
    pb::InitiateTransactionRequest {
        idempotency_key: format!("init-{n}"),
        transaction_id: tx_id(n),
        user_id: user(user_n),
        domain: pb::Domain::Banking.into(),
        r#type: "add_money".into(),
        amount: "10.00".into(),
        asset: "USD".into(),
        provider: pb::Provider::Stripe.into(),
        ..Default::default()
    }
}

pub fn usd(n: u128) -> pb::UserAccount {
    account(n, pb::Domain::Banking, "USD")
}

pub fn user_ref(account: &pb::UserAccount) -> pb::AccountRef {
    pb::AccountRef { account: Some(pb::account_ref::Account::User(account.clone())) }
}

pub fn open(key: &str, account: &pb::UserAccount) -> pb::OpenAccountRequest {
    pb::OpenAccountRequest {
        idempotency_key: key.to_string(),
        operation: Some(pb::OpenAccount { account: Some(account.clone()), ..Default::default() }),
    }
}

pub fn deposit_body(account: &pb::UserAccount, amount: &str) -> pb::Deposit {
    pb::Deposit { account: Some(account.clone()), amount: amount.to_string(), provider: pb::Provider::Stripe.into() }
}

pub fn deposit(key: &str, account: &pb::UserAccount, amount: &str) -> pb::DepositRequest {
    pb::DepositRequest { idempotency_key: key.to_string(), operation: Some(deposit_body(account, amount)) }
}

pub fn transfer_body(from: &pb::UserAccount, to: &pb::UserAccount, amount: &str) -> pb::Transfer {
    pb::Transfer { from: Some(user_ref(from)), to: Some(user_ref(to)), amount: amount.to_string() }
}

pub fn transfer(key: &str, from: &pb::UserAccount, to: &pb::UserAccount, amount: &str) -> pb::TransferRequest {
    pb::TransferRequest { idempotency_key: key.to_string(), operation: Some(transfer_body(from, to, amount)) }
}

/// Opens an account and deposits `amount` into it.
pub async fn funded(client: &mut LedgerClient<Channel>, account: &pb::UserAccount, amount: &str) {
    let tag = format!("{}-{}-{}", account.user_id, account.domain, account.asset);
    client.open_account(open(&format!("open-{tag}"), account)).await.expect("open");
    client.deposit(deposit(&format!("fund-{tag}"), account, amount)).await.expect("fund");
}

/// (available, reserved, total) of an account.
pub async fn balance(client: &mut LedgerClient<Channel>, account: &pb::UserAccount) -> (String, String, String) {
    let response = client
        .get_balance(pb::GetBalanceRequest { account: Some(account.clone()) })
        .await
        .expect("balance")
        .into_inner();
    let balance = response.balance.expect("a balance");
    (balance.available, balance.reserved, balance.total)
}

/// Asserts the status's code and its ErrorInfo reason (in the ledger's domain).
pub fn assert_refused(status: &Status, code: Code, reason: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    let info = status.get_details_error_info().unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.reason, reason, "{status:?}");
    assert_eq!(info.domain, ERROR_DOMAIN);
}

/// Asserts INVALID_ARGUMENT with a BadRequest naming exactly `field`.
pub fn assert_invalid_field(status: &Status, field: &str) {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let bad_request = status.get_details_bad_request().unwrap_or_else(|| panic!("no BadRequest in {status:?}"));
    let fields: Vec<&str> = bad_request.field_violations.iter().map(|violation| violation.field.as_str()).collect();
    assert_eq!(fields, [field], "{status:?}");
}

/// Every log line of this test process, debug and up, one JSON object a line with the span it was
/// written in. The subscriber is the process's global default, installed on first use: the
/// server's tasks may run on any thread, and a span made under another subscriber is not seen.
/// Tests running beside each other write here too, so a test looks for its own correlation id.
#[derive(Clone, Default)]
pub struct CapturedLogs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLogs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().map_err(|_| std::io::Error::other("poisoned"))?.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl CapturedLogs {
    /// The process's captured logs, capturing from the first call on.
    pub fn installed() -> &'static CapturedLogs {
        static LOGS: std::sync::OnceLock<CapturedLogs> = std::sync::OnceLock::new();
        LOGS.get_or_init(|| {
            let logs = CapturedLogs::default();
            let writer = logs.clone();
            let subscriber = tracing_subscriber::fmt()
                .json()
                .with_current_span(true)
                .with_max_level(tracing::Level::DEBUG)
                .with_writer(move || writer.clone())
                .finish();
            tracing::subscriber::set_global_default(subscriber).expect("no other global subscriber in tests");
            logs
        })
    }

    /// The first line whose message is `message`, written in a span with `correlation_id`.
    pub fn line(&self, message: &str, correlation_id: &str) -> serde_json::Value {
        let text = String::from_utf8(self.0.lock().map(|bytes| bytes.clone()).unwrap_or_default()).unwrap_or_default();
        text.lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .find(|line| line["fields"]["message"] == message && line["span"]["correlation_id"] == correlation_id)
            .unwrap_or_else(|| panic!("no line {message:?} in the span of {correlation_id:?} in {text}"))
    }
}
