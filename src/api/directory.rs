//! The `diboas.ledger.v1.Directory` service: users, wallets, domain account records, compliance
//! checks and database statistics, over the directory store (`crate::directory::store`).
//!
//! Each handler runs inside the ledger service's `handle` (correlation id, span, context,
//! error mapping), converts its request with `directory_convert`, and calls the store with the
//! request's context so the audit or data-access row says who asked. Each knows its operation
//! name (the `handle` label) and touches no ledger domain, so the scope check the auth layer
//! adds needs nothing more from here.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tonic::{Request as GrpcRequest, Response, Status};

use super::correlation;
use super::directory_convert as convert;
use super::gate::Gate;
use super::pb;
use super::pb::directory_server::DirectoryServer;
use crate::directory::encryption::Keyring;
use crate::directory::store;
use crate::readside::{maintenance, monitoring};

/// What the read side needs in `serve`: its pool (slow statements logged), the keyring, and how
/// often the summary views are refreshed and retention applied.
pub struct ReadSide {
    pub pool: PgPool,
    pub keyring: Arc<Keyring>,
    pub refresh_interval_ms: u64,
}

impl ReadSide {
    pub fn service(&self, gate: Arc<Gate>) -> DirectoryServer<DirectoryService> {
        DirectoryServer::new(DirectoryService { pool: self.pool.clone(), keyring: Arc::clone(&self.keyring), gate })
    }

    /// Starts the periodic view refresh and retention; abort the handle to stop it.
    pub fn spawn_maintenance(&self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(maintenance::run_forever(self.pool.clone(), Duration::from_millis(self.refresh_interval_ms)))
    }
}

pub struct DirectoryService {
    pool: PgPool,
    keyring: Arc<Keyring>,
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
                store::set_kyc(&self.pool, &self.keyring, user_id, &kyc, correlation::current().as_deref()).await?;
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
