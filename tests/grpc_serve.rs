//! The `diboas-ledger serve` binary: it serves over a real socket, and on SIGTERM it stops
//! gracefully, flushes the journal and exits 0; what it acknowledged is in PostgreSQL after.
//! It never runs without authentication by accident, and a token made by `diboas-ledger token`
//! admits its caller.

mod grpc_common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use diboas_ledger::api::pb::ledger_client::LedgerClient;
use diboas_ledger::engine::account::{Domain, UserAccount};
use diboas_ledger::engine::asset::Asset;
use diboas_ledger::ledger::{Ledger, LedgerConfig};
use grpc_common::*;
use sqlx::PgPool;
use tonic::transport::Channel;
use uuid::Uuid;

/// How long the child may take to start listening: 200 attempts, 50 ms apart.
const CONNECT_ATTEMPTS: usize = 200;

fn free_address() -> String {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    probe.local_addr().unwrap().to_string()
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
    let address = free_address();
    let child = Command::new(env!("CARGO_BIN_EXE_diboas-ledger"))
        .args(["serve", "--dev-mode", "--listen", &address, "--metrics-listen", "127.0.0.1:0"])
        .args(["--log-format", "json", "--database-url", &url_of(&options)])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut server = ServerProcess(Some(child));
    let mut client = connect(&address).await;
    let alice = usd(1);
    client.open_account(open("open", &alice)).await.unwrap();
    client.deposit(deposit("pay", &alice, "12.34")).await.unwrap();
    let mut refused = tonic::Request::new(deposit("pay-unknown", &usd(2), "1.00"));
    refused.metadata_mut().insert("x-correlation-id", "trace-me-7".parse().unwrap());
    client.deposit(refused).await.unwrap_err();
    drop(client);

    let killed = Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    assert!(killed.success());
    // Wait off the runtime: its tasks must keep running (the dropped client's connection closes
    // on this runtime, and the server's graceful shutdown waits for it).
    let child = server.0.take().unwrap();
    let output = tokio::task::spawn_blocking(move || child.wait_with_output()).await.unwrap().unwrap();
    assert!(output.status.success(), "{:?}", output.status);

    // Logs are one JSON object per line; the refusal's line carries its request's correlation id.
    let logs = String::from_utf8(output.stderr).unwrap();
    let lines: Vec<serde_json::Value> =
        logs.lines().map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}"))).collect();
    let refusal = lines
        .iter()
        .find(|line| line["fields"]["message"] == "refused")
        .unwrap_or_else(|| panic!("no refusal logged in {logs}"));
    assert_eq!(refusal["span"]["correlation_id"], "trace-me-7", "{refusal}");
    assert_eq!(refusal["span"]["method"], "Deposit");
    assert!(
        lines.iter().any(|line| line["fields"]["message"].as_str().is_some_and(|m| m.contains("DEVELOPMENT MODE")))
    );

    let ledger = Ledger::open(LedgerConfig::new(options)).await.unwrap();
    let user_id = Uuid::parse_str(&alice.user_id).unwrap();
    let views = ledger.accounts_of(user_id).await.unwrap();
    let account = UserAccount { user_id, domain: Domain::Banking, asset: Asset::USD };
    assert_eq!(views.len(), 1);
    assert_eq!(views[0].account, account);
    assert_eq!(views[0].balance.available_minor, 1_234);
    ledger.shutdown().await.unwrap();
}

#[test]
fn serve_refuses_to_run_without_authentication_unless_asked_on_loopback() {
    let serve = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_diboas-ledger"))
            .args(["serve", "--metrics-listen", "127.0.0.1:0", "--database-url", "postgres://nobody@127.0.0.1:1/none"])
            .args(args)
            .output()
            .unwrap();
        assert!(!output.status.success(), "{args:?} must not start");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    assert!(serve(&["--listen", "127.0.0.1:0"]).contains("no callers are configured"));
    assert!(serve(&["--dev-mode", "--listen", "0.0.0.0:0"]).contains("loopback"));
}

#[sqlx::test]
async fn a_token_made_by_the_token_command_admits_its_caller(pool: PgPool) {
    let options = prepared(&pool).await;
    let made = Command::new(env!("CARGO_BIN_EXE_diboas-ledger"))
        .args(["token", "--service", "payments", "--operations", "OpenAccount,GetBalance", "--domains", "banking"])
        .output()
        .unwrap();
    assert!(made.status.success());
    let printed = String::from_utf8(made.stdout).unwrap();
    let token = printed.lines().next().unwrap().rsplit(' ').next().unwrap().to_owned();
    let entry = &printed[printed.find('{').unwrap()..];
    assert!(!entry.contains(&token), "the entry holds the digest, never the token");
    let callers = std::env::temp_dir().join(format!("diboas-callers-{}.json", Uuid::new_v4()));
    std::fs::write(&callers, format!("{{\"callers\": [{entry}]}}")).unwrap();

    let address = free_address();
    let child = Command::new(env!("CARGO_BIN_EXE_diboas-ledger"))
        .args(["serve", "--listen", &address, "--metrics-listen", "127.0.0.1:0"])
        .args(["--auth-file", callers.to_str().unwrap(), "--database-url", &url_of(&options)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _server = ServerProcess(Some(child));
    let mut client = connect(&address).await;
    let alice = usd(1);
    let refused = client.open_account(open("open", &alice)).await.unwrap_err();
    assert_refused(&refused, tonic::Code::Unauthenticated, "MISSING_TOKEN");
    let mut request = tonic::Request::new(open("open", &alice));
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    client.open_account(request).await.unwrap();
    std::fs::remove_file(&callers).unwrap();
}

/// The line an internal failure logs while becoming its status carries the request's correlation
/// id, as every other line of the request does (until session 22 it was logged outside the
/// request's span, so the failures that matter most could not be traced), and the caller gets
/// no cause, only the id to quote.
#[tokio::test]
async fn an_internal_failure_is_logged_with_its_correlation_id() {
    use diboas_ledger::api::auth::Authenticator;
    use diboas_ledger::api::gate::Gate;
    use diboas_ledger::api::status::{ApiError, INTERNAL_MESSAGE};
    use diboas_ledger::metrics::Metrics;

    let logs = CapturedLogs::installed();
    let gate = Gate::new(Authenticator::development(), 4, 1_000, std::sync::Arc::new(Metrics::new()));
    let mut request = tonic::Request::new(());
    request.metadata_mut().insert("x-correlation-id", "trace-internal-1".parse().expect("a header value"));
    let answer: Result<tonic::Response<()>, tonic::Status> =
        gate.handle("Deposit", request, |()| async { Err(ApiError::Internal("a broken invariant".into())) }).await;
    let refused = answer.map(|_| ()).expect_err("an internal failure");
    assert_eq!(refused.code(), tonic::Code::Internal);
    assert_eq!(refused.message(), INTERNAL_MESSAGE);

    let failure = logs.line("internal failure", "trace-internal-1");
    assert_eq!(failure["span"]["method"], "Deposit");
    assert!(failure["fields"]["error"].as_str().is_some_and(|error| error.contains("a broken invariant")));
}
