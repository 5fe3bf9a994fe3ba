//! Shared by the read-side tests: the real server with the read side (Directory service and
//! the ledger) over a fresh database, clients for both services, a sample user, and helpers to
//! read the audit trail.

#![allow(dead_code, reason = "each test binary uses a different subset of these helpers")]

use std::sync::Arc;

use diboas_ledger::api::directory::ReadSide;
use diboas_ledger::api::pb;
use diboas_ledger::api::pb::directory_client::DirectoryClient;
use diboas_ledger::api::pb::ledger_client::LedgerClient;
use diboas_ledger::api::server::{ServeConfig, ServeError, ServeOptions, serve};
use diboas_ledger::directory::encryption::Keyring;
use diboas_ledger::ledger::{Ledger, LedgerConfig};
use diboas_ledger::store;
use sqlx::PgPool;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use uuid::Uuid;

/// The test's plaintext personal data: nothing of it may appear in any column.
pub const EMAIL: &str = "Marisol.Quintanilha@example.org";
pub const GIVEN_NAME: &str = "Marisol";
pub const FAMILY_NAME: &str = "Quintanilha-Zebedeu";
pub const PHONE: &str = "+351912345678";
pub const DATE_OF_BIRTH: &str = "1987-03-14";
pub const NATIONALITY: &str = "PT";
pub const DOCUMENT: &str = "passport-PT-X9Q7K2L4";

pub struct ReadSideServer {
    pub ledger: LedgerClient<Channel>,
    pub directory: DirectoryClient<Channel>,
    /// The clients' connection, for the other services (health).
    pub channel: Channel,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<Result<(), ServeError>>,
}

impl ReadSideServer {
    pub async fn start(pool: &PgPool) -> ReadSideServer {
        ReadSideServer::start_with(pool, Keyring::development()).await
    }

    pub async fn start_with(pool: &PgPool, keyring: Keyring) -> ReadSideServer {
        let options = (*pool.connect_options()).clone();
        store::prepare(&options).await.expect("prepare the test database");
        // The maintenance task is left to its first tick only; tests refresh explicitly.
        let read_side = ReadSide { pool: pool.clone(), keyring: Arc::new(keyring), refresh_interval_ms: 3_600_000 };
        let ledger = Ledger::open(LedgerConfig::new(options)).await.expect("open the ledger");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind a free port");
        let address = listener.local_addr().expect("local address");
        let (shutdown, signal) = oneshot::channel::<()>();
        let options = ServeOptions { read_side: Some(read_side), ..ServeOptions::development(ServeConfig::default()) };
        let task = tokio::spawn(serve(ledger, listener, options, async {
            let _ = signal.await;
        }));
        let channel = Channel::from_shared(format!("http://{address}")).expect("uri").connect().await.expect("connect");
        ReadSideServer {
            ledger: LedgerClient::new(channel.clone()),
            directory: DirectoryClient::new(channel.clone()),
            channel,
            shutdown,
            task,
        }
    }

    pub async fn stop(self) {
        let ReadSideServer { ledger, directory, channel, shutdown, task } = self;
        drop((ledger, directory, channel));
        shutdown.send(()).expect("server still running");
        task.await.expect("server task").expect("server stopped cleanly");
    }
}

pub fn user_id(n: u128) -> Uuid {
    Uuid::from_u128(0x7a2d_0000_0000_4000_8000_0000_0000_0000 + n)
}

/// A registration carrying every personal field.
pub fn registration(user: Uuid, email: &str) -> pb::RegisterUserRequest {
    pb::RegisterUserRequest {
        user_id: user.to_string(),
        email: email.to_string(),
        two_factor_enabled: true,
        profile: Some(pb::Profile {
            given_name: GIVEN_NAME.into(),
            family_name: FAMILY_NAME.into(),
            phone: PHONE.into(),
            date_of_birth: DATE_OF_BIRTH.into(),
            nationality: NATIONALITY.into(),
        }),
        preferences: Some(pb::Preferences {
            timezone: "Europe/Lisbon".into(),
            language: "pt-PT".into(),
            currency: "EUR".into(),
        }),
        mascot: pb::Mascot::Coral.into(),
        experience_level: pb::ExperienceLevel::Beginner.into(),
    }
}

/// A request carrying a correlation id, so its audit row can be found.
pub fn correlated<T>(body: T, correlation_id: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(body);
    request.metadata_mut().insert("x-correlation-id", correlation_id.parse().expect("ascii"));
    request
}

/// An audit row as the tests read it.
#[derive(Debug, sqlx::FromRow)]
pub struct AuditRow {
    pub event_type: String,
    pub entity_type: String,
    pub entity_id: String,
    pub before_state: Option<serde_json::Value>,
    pub after_state: Option<serde_json::Value>,
    pub caller: Option<String>,
    pub ip_address: Option<String>,
    pub user_agent: Option<String>,
    pub correlation_id: Option<String>,
    pub journal_sequence: Option<i64>,
}

pub async fn audit_rows(pool: &PgPool, correlation_id: &str) -> Vec<AuditRow> {
    sqlx::query_as(
        "SELECT event_type, entity_type, entity_id, before_state, after_state, caller, ip_address, user_agent,
             correlation_id, journal_sequence
         FROM audit.trail WHERE correlation_id = $1 ORDER BY created_at, journal_sequence",
    )
    .bind(correlation_id)
    .fetch_all(pool)
    .await
    .expect("read the audit log")
}

pub async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string())).fetch_one(pool).await.expect("count")
}
