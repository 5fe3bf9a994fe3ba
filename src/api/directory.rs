//! The `diboas.ledger.v1.Directory` service: users, wallets, domain account records, compliance
//! checks and database statistics, over the directory store (`crate::directory::store`).
//!
//! Each handler runs inside the ledger service's `handle` (correlation id, span, context,
//! error mapping), converts its request with `directory_convert`, and calls the store with the
//! request's context so the audit or data-access row says who asked. Each knows its operation
//! name (the `handle` label) and touches no ledger account, so the scope check the auth layer
//! adds needs nothing more from here.
//!
//! SetKyc also feeds the ledger's compliance gate (see `set_kyc_and_feed_the_gate`): it submits
//! `Operation::SetKyc` (the gate's record, see `KycUpdate::gate_record`) under a fresh
//! idempotency key while the directory's change is pending. If that fails the call fails
//! (UNAVAILABLE when PostgreSQL is away; RESOURCE_EXHAUSTED if the ledger's idempotency store is
//! full) and the directory is unchanged; calling SetKyc again with the same values is safe. So a
//! caller with the SetKyc scope changes the gate's KYC status and risk level too (not its
//! per-transaction limit, which stays with SetUserCompliance).

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tonic::{Request as GrpcRequest, Response, Status};
use tracing::Instrument;
use uuid::Uuid;

use super::correlation;
use super::directory_convert as convert;
use super::gate::Gate;
use super::pb;
use super::pb::directory_server::DirectoryServer;
use super::service::now_ms;
use super::status::ApiError;
use crate::directory::encryption::Keyring;
use crate::directory::model::KycUpdate;
use crate::directory::store;
use crate::engine::idempotency::IdempotencyKey;
use crate::engine::operation::{Operation, Request};
use crate::engine::record::RequestContext;
use crate::ledger::Ledger;
use crate::readside::{maintenance, monitoring};

/// What the read side needs in `serve`: its pool (slow statements logged), the keyring, and how
/// often the summary views are refreshed and retention applied.
pub struct ReadSide {
    pub pool: PgPool,
    pub keyring: Arc<Keyring>,
    pub refresh_interval_ms: u64,
}

impl ReadSide {
    /// The service; `ledger` is the one whose compliance gate SetKyc feeds.
    pub fn service(&self, gate: Arc<Gate>, ledger: Arc<Ledger>) -> DirectoryServer<DirectoryService> {
        DirectoryServer::new(DirectoryService {
            pool: self.pool.clone(),
            keyring: Arc::clone(&self.keyring),
            ledger,
            gate,
        })
    }

    /// Starts the periodic view refresh and retention; abort the handle to stop it.
    pub fn spawn_maintenance(&self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(maintenance::run_forever(self.pool.clone(), Duration::from_millis(self.refresh_interval_ms)))
    }
}

pub struct DirectoryService {
    pool: PgPool,
    keyring: Arc<Keyring>,
    ledger: Arc<Ledger>,
    gate: Arc<Gate>,
}

/// Rows listed by GetDatabaseStats when the request says 0.
const DEFAULT_STATS_ROWS: i64 = 20;

fn today() -> chrono::NaiveDate {
    chrono::Utc::now().date_naive()
}

fn changed(user_id: uuid::Uuid) -> pb::UserChangeResponse {
    pb::UserChangeResponse { user_id: user_id.to_string() }
}

/// Writes the KYC change in the directory and, while its row is still locked, feeds the ledger's
/// compliance gate (durable before this returns); then commits the directory's change. Two
/// changes of one user thus reach both in the same order. If feeding the gate fails, the
/// directory's change rolls back; if the directory's commit fails after the gate took the change,
/// the caller sees the error and a retry with the same values brings both in line.
async fn set_kyc_and_feed_the_gate(
    pool: PgPool,
    keyring: Arc<Keyring>,
    ledger: Arc<Ledger>,
    user_id: Uuid,
    kyc: KycUpdate,
    context: Option<Box<RequestContext>>,
) -> Result<(), ApiError> {
    let pending = store::set_kyc(&pool, &keyring, user_id, &kyc, context.as_deref()).await?;
    let (kyc, risk) = kyc.gate_record();
    let key = IdempotencyKey::new(&format!("directory-set-kyc-{}", Uuid::new_v4()))
        .map_err(|error| ApiError::Internal(error.to_string()))?;
    let request = Request { key, now_ms: now_ms(), operation: Operation::SetKyc { user_id, kyc, risk } };
    ledger.submit_correlated(request, context).await?.result?;
    pending.commit().await?;
    Ok(())
}

#[tonic::async_trait]
impl pb::directory_server::Directory for DirectoryService {
    async fn register_user(
        &self,
        request: GrpcRequest<pb::RegisterUserRequest>,
    ) -> Result<Response<pb::UserChangeResponse>, Status> {
        self.gate
            .handle("RegisterUser", request, |body| async move {
                let user = convert::register_user(&body, today())?;
                store::register_user(&self.pool, &self.keyring, &user, correlation::current().as_deref()).await?;
                Ok(changed(user.user_id))
            })
            .await
    }

    async fn update_user(
        &self,
        request: GrpcRequest<pb::UpdateUserRequest>,
    ) -> Result<Response<pb::UserChangeResponse>, Status> {
        self.gate
            .handle("UpdateUser", request, |body| async move {
                let (user_id, update) = convert::update_user(&body, today())?;
                store::update_user(&self.pool, &self.keyring, user_id, &update, correlation::current().as_deref())
                    .await?;
                Ok(changed(user_id))
            })
            .await
    }

    async fn set_kyc(
        &self,
        request: GrpcRequest<pb::SetKycRequest>,
    ) -> Result<Response<pb::UserChangeResponse>, Status> {
        self.gate
            .handle("SetKyc", request, |body| async move {
                let (user_id, kyc) = convert::set_kyc(&body)?;
                // Its own task: a caller that disconnects, or a deadline that fires, must not
                // stop it between the ledger's change and the directory's commit.
                let change = set_kyc_and_feed_the_gate(
                    self.pool.clone(),
                    Arc::clone(&self.keyring),
                    Arc::clone(&self.ledger),
                    user_id,
                    kyc,
                    correlation::current(),
                );
                tokio::spawn(change.instrument(tracing::Span::current()))
                    .await
                    .map_err(|error| ApiError::Internal(format!("the KYC change's task failed: {error}")))??;
                Ok(changed(user_id))
            })
            .await
    }

    async fn record_compliance_check(
        &self,
        request: GrpcRequest<pb::RecordComplianceCheckRequest>,
    ) -> Result<Response<pb::RecordComplianceCheckResponse>, Status> {
        self.gate
            .handle("RecordComplianceCheck", request, |body| async move {
                let (user_id, check) = convert::compliance_check(&body)?;
                let check_id =
                    store::record_compliance_check(&self.pool, user_id, &check, correlation::current().as_deref())
                        .await?;
                Ok(pb::RecordComplianceCheckResponse { check_id: check_id.to_string() })
            })
            .await
    }

    async fn register_wallet(
        &self,
        request: GrpcRequest<pb::RegisterWalletRequest>,
    ) -> Result<Response<pb::UserChangeResponse>, Status> {
        self.gate
            .handle("RegisterWallet", request, |body| async move {
                let (user_id, wallet) = convert::register_wallet(&body)?;
                store::register_wallet(&self.pool, user_id, &wallet, correlation::current().as_deref()).await?;
                Ok(changed(user_id))
            })
            .await
    }

    async fn open_domain_account(
        &self,
        request: GrpcRequest<pb::OpenDomainAccountRequest>,
    ) -> Result<Response<pb::UserChangeResponse>, Status> {
        self.gate
            .handle("OpenDomainAccount", request, |body| async move {
                let (user_id, account) = convert::domain_account(&body)?;
                store::open_domain_account(&self.pool, user_id, &account, correlation::current().as_deref()).await?;
                Ok(changed(user_id))
            })
            .await
    }

    async fn get_user(
        &self,
        request: GrpcRequest<pb::GetUserRequest>,
    ) -> Result<Response<pb::GetUserResponse>, Status> {
        self.gate
            .handle("GetUser", request, |body| async move {
                let user_id = convert::user_id(&body.user_id, "user_id")?;
                let reason = convert::reason(&body.reason)?;
                let record =
                    store::get_user(&self.pool, &self.keyring, user_id, &reason, correlation::current().as_deref())
                        .await?;
                Ok(pb::GetUserResponse { user: Some(convert::user(&record)) })
            })
            .await
    }

    async fn find_user_by_email(
        &self,
        request: GrpcRequest<pb::FindUserByEmailRequest>,
    ) -> Result<Response<pb::FindUserByEmailResponse>, Status> {
        self.gate
            .handle("FindUserByEmail", request, |body| async move {
                let email = convert::email(&body.email, "email")?;
                let reason = convert::reason(&body.reason)?;
                let context = correlation::current();
                let found =
                    store::find_user_by_email(&self.pool, &self.keyring, &email, &reason, context.as_deref()).await?;
                Ok(pb::FindUserByEmailResponse {
                    user_id: found.map(|user_id| user_id.to_string()).unwrap_or_default(),
                })
            })
            .await
    }

    async fn erase_user(
        &self,
        request: GrpcRequest<pb::EraseUserRequest>,
    ) -> Result<Response<pb::UserChangeResponse>, Status> {
        self.gate
            .handle("EraseUser", request, |body| async move {
                let user_id = convert::user_id(&body.user_id, "user_id")?;
                let reason = convert::reason(&body.reason)?;
                let erased = store::erase_user(&self.pool, user_id, &reason, correlation::current().as_deref()).await?;
                tracing::info!(fields = erased.len(), "erased a user's personal data");
                Ok(changed(user_id))
            })
            .await
    }

    async fn get_database_stats(
        &self,
        request: GrpcRequest<pb::GetDatabaseStatsRequest>,
    ) -> Result<Response<pb::GetDatabaseStatsResponse>, Status> {
        self.gate
            .handle("GetDatabaseStats", request, |body| async move {
                let limit = if body.limit == 0 { DEFAULT_STATS_ROWS } else { i64::from(body.limit) };
                let stats =
                    monitoring::collect(&self.pool, limit).await.map_err(crate::directory::DirectoryError::from)?;
                Ok(pb::GetDatabaseStatsResponse {
                    pool_size: stats.pool_size,
                    pool_idle: stats.pool_idle,
                    pool_max: stats.pool_max,
                    server_connections: stats.server_connections,
                    server_active_connections: stats.server_active_connections,
                    tables: stats
                        .tables
                        .into_iter()
                        .map(|table| pb::TableUsage {
                            name: table.name,
                            sequential_scans: table.sequential_scans,
                            index_scans: table.index_scans,
                            live_rows: table.live_rows,
                            dead_rows: table.dead_rows,
                        })
                        .collect(),
                    indexes: stats
                        .indexes
                        .into_iter()
                        .map(|index| pb::IndexUsage {
                            table_name: index.table_name,
                            index_name: index.index_name,
                            scans: index.scans,
                            size_bytes: index.size_bytes,
                        })
                        .collect(),
                })
            })
            .await
    }
}
