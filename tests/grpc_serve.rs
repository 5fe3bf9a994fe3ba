//! The `diboas-ledger serve` binary: it serves over a real socket, and on SIGTERM it stops
//! gracefully, flushes the journal and exits 0; what it acknowledged is in PostgreSQL after.

mod grpc_common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use diboas_ledger::api::pb::ledger_client::LedgerClient;
use diboas_ledger::engine::account::{Domain, UserAccount};
use diboas_ledger::engine::asset::Asset;
use diboas_ledger::ledger::{Ledger, LedgerConfig};
use grpc_common::*;
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use tonic::transport::Channel;
use uuid::Uuid;

/// How long the child may take to start listening: 200 attempts, 50 ms apart.
const CONNECT_ATTEMPTS: usize = 200;

fn url_of(options: &PgConnectOptions) -> String {
    format!(
        "postgres://{}@{}:{}/{}",
        options.get_username(),
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("postgres")
    )
}

/// Kills the server if the test fails before it stops the server itself.
struct ServerProcess(Option<Child>);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn connect(address: &str) -> LedgerClient<Channel> {
    for _ in 0..CONNECT_ATTEMPTS {
        if let Ok(channel) = Channel::from_shared(format!("http://{address}")).unwrap().connect().await {
            return LedgerClient::new(channel);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the server never started listening on {address}");
}

#[sqlx::test]
async fn sigterm_shuts_down_gracefully_and_keeps_what_was_acknowledged(pool: PgPool) {
    let options = prepared(&pool).await;
    let address = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().to_string()
    };
    let child = Command::new(env!("CARGO_BIN_EXE_diboas-ledger"))
        .args(["serve", "--listen", &address, "--database-url", &url_of(&options)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut server = ServerProcess(Some(child));
    let mut client = connect(&address).await;
    let alice = usd(1);
    client.open_account(open("open", &alice)).await.unwrap();
    client.deposit(deposit("pay", &alice, "12.34")).await.unwrap();
    drop(client);

    let killed = Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    assert!(killed.success());
    // Wait off the runtime: its tasks must keep running (the dropped client's connection closes
    // on this runtime, and the server's graceful shutdown waits for it).
    let mut child = server.0.take().unwrap();
    let exit = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert!(exit.success(), "{exit:?}");

    let ledger = Ledger::open(LedgerConfig::new(options)).await.unwrap();
    let user_id = Uuid::parse_str(&alice.user_id).unwrap();
    let views = ledger.accounts_of(user_id).await.unwrap();
    let account = UserAccount { user_id, domain: Domain::Banking, asset: Asset::USD };
    assert_eq!(views.len(), 1);
    assert_eq!(views[0].account, account);
    assert_eq!(views[0].balance.available_minor, 1_234);
    ledger.shutdown().await.unwrap();
}
