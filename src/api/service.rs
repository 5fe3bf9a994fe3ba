//! The RPC handlers of `diboas.ledger.v1.Ledger`.
//!
//! Every handler runs behind the [`Gate`] (correlation id, load shedding, authentication,
//! metrics, status mapping) and does the same three things: convert the request (refusing bad
//! input before the ledger sees it), check the caller's scopes cover every operation and domain
//! it touches, and call the ledger with the server's clock. Mutations answer only once durable
//! (`Ledger::submit` waits for the journal).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::future::join_all;
use tonic::{Request as GrpcRequest, Response, Status};

use super::auth::{self, AuthError, Caller};
use super::convert;
use super::correlation;
use super::gate::Gate;
use super::pb;
use super::status::{ApiError, to_rpc_status};
use crate::engine::account::AccountRef;
use crate::engine::error::EngineError;
use crate::engine::idempotency::IdempotencyKey;
use crate::engine::operation::{Operation, Request};
use crate::engine::state::AccountView;
use crate::engine::summary::UserSummary;
use crate::ledger::Ledger;

pub struct LedgerService {
    ledger: Arc<Ledger>,
    gate: Arc<Gate>,
    /// The most engine operations one SubmitBatch may carry (entries plus linked members).
    max_batch_operations: usize,
}

/// The caller of the request being handled; the gate always sets one, so its absence refuses
/// (fail closed) rather than allows.
pub(super) fn caller() -> Result<Arc<Caller>, ApiError> {
    auth::current().ok_or(ApiError::Auth(AuthError::MissingToken))
}

impl LedgerService {
    pub fn new(ledger: Arc<Ledger>, gate: Arc<Gate>, max_batch_operations: usize) -> LedgerService {
        LedgerService { ledger, gate, max_batch_operations }
    }

    /// Submits one validated request at the server's clock and waits until it is durable.
    async fn execute(&self, key: IdempotencyKey, operation: Operation) -> Result<pb::MutationResponse, ApiError> {
        caller()?.require_engine_operation(&operation, self.ledger.as_ref())?;
        let request = Request { key, now_ms: now_ms(), operation };
        let outcome = self.ledger.submit_correlated(request, correlation::current()).await?;
        let receipt = outcome.result?;
        Ok(pb::MutationResponse {
            receipt: Some(convert::receipt(&receipt)),
            replayed: outcome.replayed,
            sequence: outcome.sequence.unwrap_or_default(),
        })
    }

    /// A user's accounts in the domains the caller may see.
    async fn visible_accounts(&self, user_id: uuid::Uuid) -> Result<Vec<AccountView>, ApiError> {
        let caller = caller()?;
        let mut views = self.ledger.accounts_of(user_id).await?;
        views.retain(|view| caller.may_touch(view.account.domain));
        Ok(views)
    }

    async fn mutate(
        &self,
        idempotency_key: &str,
        operation: Result<Operation, convert::InvalidField>,
    ) -> Result<pb::MutationResponse, ApiError> {
        let key = convert::idempotency_key(idempotency_key, "idempotency_key")?;
        self.execute(key, operation?).await
    }

    async fn submit_batch_entries(&self, request: pb::SubmitBatchRequest) -> Result<pb::SubmitBatchResponse, ApiError> {
        if request.entries.is_empty() {
            return Err(ApiError::EmptyBatch);
        }
        let operation_count: usize = request.entries.iter().map(convert::entry_operation_count).sum();
        if operation_count > self.max_batch_operations {
            return Err(ApiError::BatchTooLarge { found: operation_count, max: self.max_batch_operations });
        }
        // Each future executes its entry in the engine at its first poll, and `join_all` polls
        // them in order: entries apply in request order, then all wait for durability together.
        let results = join_all(request.entries.iter().enumerate().map(|(index, entry)| async move {
            let (key, operation) = convert::batch_entry(entry, index)?;
            self.execute(key, operation).await
        }))
        .await;
        let results = results
            .into_iter()
            .map(|result| match result {
                Ok(response) => pb::BatchResult {
                    result: response.receipt.map(pb::batch_result::Result::Receipt),
                    replayed: response.replayed,
                    sequence: response.sequence,
                },
                Err(error) => pb::BatchResult {
                    result: Some(pb::batch_result::Result::Error(to_rpc_status(&Status::from(error)))),
                    replayed: false,
                    sequence: 0,
                },
            })
            .collect();
        Ok(pb::SubmitBatchResponse { results })
    }
}

#[tonic::async_trait]
impl pb::ledger_server::Ledger for LedgerService {
    async fn open_account(
        &self,
        request: GrpcRequest<pb::OpenAccountRequest>,
    ) -> Result<Response<pb::MutationResponse>, Status> {
        self.gate
            .handle("OpenAccount", request, |body| async move {
                self.mutate(&body.idempotency_key, convert::open_account_request(&body)).await
            })
            .await
    }

    async fn set_frozen(
        &self,
        request: GrpcRequest<pb::SetFrozenRequest>,
    ) -> Result<Response<pb::MutationResponse>, Status> {
        self.gate
            .handle("SetFrozen", request, |body| async move {
                self.mutate(&body.idempotency_key, convert::set_frozen_request(&body)).await
            })
            .await
    }

    async fn get_balance(
        &self,
        request: GrpcRequest<pb::GetBalanceRequest>,
    ) -> Result<Response<pb::GetBalanceResponse>, Status> {
        self.gate
            .handle("GetBalance", request, |body| async move {
                let account = convert::user_account(body.account.as_ref(), "account")?;
                caller()?.require_domain(account.domain)?;
                let views = self.ledger.accounts_of(account.user_id).await?;
                let view = views
                    .iter()
                    .find(|view| view.account == account)
                    .ok_or(EngineError::UnknownAccount { account: AccountRef::User(account) })?;
                Ok(pb::GetBalanceResponse { balance: Some(convert::balance(view)) })
            })
            .await
    }

    async fn list_balances(
        &self,
        request: GrpcRequest<pb::ListBalancesRequest>,
    ) -> Result<Response<pb::ListBalancesResponse>, Status> {
        self.gate
            .handle("ListBalances", request, |body| async move {
                let user_id = convert::uuid(&body.user_id, "user_id")?;
                let views = self.visible_accounts(user_id).await?;
                Ok(pb::ListBalancesResponse { balances: views.iter().map(convert::balance).collect() })
            })
            .await
    }

    async fn get_user_summary(
        &self,
        request: GrpcRequest<pb::GetUserSummaryRequest>,
    ) -> Result<Response<pb::GetUserSummaryResponse>, Status> {
        self.gate
            .handle("GetUserSummary", request, |body| async move {
                let user_id = convert::uuid(&body.user_id, "user_id")?;
                let views = self.visible_accounts(user_id).await?;
                Ok(convert::summary(&UserSummary::from_accounts(&views)))
            })
            .await
    }

    async fn deposit(
        &self,
        request: GrpcRequest<pb::DepositRequest>,
    ) -> Result<Response<pb::MutationResponse>, Status> {
        self.gate
            .handle("Deposit", request, |body| async move {
                self.mutate(&body.idempotency_key, convert::deposit_request(&body)).await
            })
            .await
    }

    async fn withdraw(
        &self,
        request: GrpcRequest<pb::WithdrawRequest>,
    ) -> Result<Response<pb::MutationResponse>, Status> {
        self.gate
            .handle("Withdraw", request, |body| async move {
                self.mutate(&body.idempotency_key, convert::withdraw_request(&body)).await
            })
            .await
    }

    async fn reserve(
        &self,
        request: GrpcRequest<pb::ReserveRequest>,
    ) -> Result<Response<pb::MutationResponse>, Status> {
        self.gate
            .handle("Reserve", request, |body| async move {
                self.mutate(&body.idempotency_key, convert::reserve_request(&body)).await
            })
            .await
    }

    async fn commit(&self, request: GrpcRequest<pb::CommitRequest>) -> Result<Response<pb::MutationResponse>, Status> {
        self.gate
            .handle("Commit", request, |body| async move {
                self.mutate(&body.idempotency_key, convert::commit_request(&body)).await
            })
            .await
    }

    async fn release(
        &self,
        request: GrpcRequest<pb::ReleaseRequest>,
    ) -> Result<Response<pb::MutationResponse>, Status> {
        self.gate
            .handle("Release", request, |body| async move {
                self.mutate(&body.idempotency_key, convert::release_request(&body)).await
            })
            .await
    }

    async fn transfer(
        &self,
        request: GrpcRequest<pb::TransferRequest>,
    ) -> Result<Response<pb::MutationResponse>, Status> {
        self.gate
            .handle("Transfer", request, |body| async move {
                self.mutate(&body.idempotency_key, convert::transfer_request(&body)).await
            })
            .await
    }

    async fn convert(
        &self,
        request: GrpcRequest<pb::ConvertRequest>,
    ) -> Result<Response<pb::MutationResponse>, Status> {
        self.gate
            .handle("Convert", request, |body| async move {
                self.mutate(&body.idempotency_key, convert::convert_request(&body)).await
            })
            .await
    }

    async fn submit_batch(
        &self,
        request: GrpcRequest<pb::SubmitBatchRequest>,
    ) -> Result<Response<pb::SubmitBatchResponse>, Status> {
        self.gate.handle("SubmitBatch", request, |body| self.submit_batch_entries(body)).await
    }
}

/// The server's clock in UTC milliseconds: the time of every request, read here at the edge.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
}
