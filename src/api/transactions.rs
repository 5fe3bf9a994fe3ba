//! The RPC handlers of `diboas.ledger.v1.Transactions`: business transactions, their history,
//! user compliance records, and the provider inbox.
//!
//! Mutations go through the engine like every other change (`Ledger::submit_correlated`, answered
//! once durable); reads come from the projections in PostgreSQL, which hold every acknowledged
//! change. Fees are priced here, at the edge, with the schedule in force at initiation, and the
//! breakdown travels inside the journaled operation. Each handler names its operation and the
//! domain it touches (for the scope checks the auth layer adds).
//!
//! Provider inbox: an event is stored first (a duplicate (source, event id) is answered from the
//! stored row and changes nothing), then applied to its transaction with an idempotency key
//! derived from (source, event id), so processing it again, after a crash between the engine's
//! commit and the inbox update or through RetryProviderEvent, replays the same outcome instead of
//! applying it twice.

use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tonic::{Request as GrpcRequest, Response, Status};
use uuid::Uuid;

use super::convert;
use super::correlation;
use super::gate::Gate;
use super::pb;
use super::provider_events;
use super::service::{caller, now_ms};
use super::status::ApiError;
use super::transactions_convert as wire;
use crate::engine::account::{AccountRef, Domain};
use crate::engine::error::EngineError;
use crate::engine::idempotency::IdempotencyKey;
use crate::engine::lifecycle::is_legal;
use crate::engine::operation::{Operation, Receipt, Request};
use crate::engine::transaction::{Fill, NewTransaction, ProviderRef, TxStatus};
use crate::fees;
use crate::ledger::Ledger;
use crate::store::transaction_queries::{self as queries, ListFilter};

/// Connections the Transactions service keeps to PostgreSQL for its reads and the inbox.
pub const MAX_POOL_CONNECTIONS: u32 = 8;

/// Initiations of transaction ids that hash alike wait for each other (see `initiate`).
const INITIATION_STRIPES: usize = 64;

pub struct TransactionsService {
    ledger: Arc<Ledger>,
    gate: Arc<Gate>,
    pool: PgPool,
    /// Held by an initiation from its check that the id is new until it is durable, so that two
    /// initiations of one id (for two users) cannot both pass the check: the engine knows a
    /// transaction id per user only, and the projections hold one transaction per id.
    initiations: Box<[tokio::sync::Mutex<()>]>,
    /// Seeded per process, so a caller cannot choose ids that all wait on one stripe.
    stripe_hasher: RandomState,
}

/// The engine's answer to a mutation, and where it left the transaction (if it moved one).
struct Applied {
    status: Option<TxStatus>,
    replayed: bool,
    sequence: u64,
}

impl TransactionsService {
    pub fn new(ledger: Arc<Ledger>, gate: Arc<Gate>, pool: PgPool) -> TransactionsService {
        let initiations = (0..INITIATION_STRIPES).map(|_| tokio::sync::Mutex::new(())).collect();
        TransactionsService { ledger, gate, pool, initiations, stripe_hasher: RandomState::new() }
    }

    async fn submit(&self, key: IdempotencyKey, operation: Operation) -> Result<Applied, ApiError> {
        super::service::caller()?.require_engine_operation(&operation, self.ledger.as_ref())?;
        let outcome =
            self.ledger.submit_correlated(Request { key, now_ms: now_ms(), operation }, correlation::current()).await?;
        let receipt = outcome.result?;
        let status = match receipt {
            Receipt::Transaction { status } => Some(status),
            _ => None,
        };
        Ok(Applied { status, replayed: outcome.replayed, sequence: outcome.sequence.unwrap_or_default() })
    }

    async fn respond(&self, transaction_id: Uuid, applied: Applied) -> Result<pb::TransactionResponse, ApiError> {
        let row = queries::transaction(&self.pool, transaction_id)
            .await?
            .ok_or(ApiError::TransactionNotFound { transaction_id })?;
        Ok(pb::TransactionResponse {
            transaction: Some(wire::wire_transaction(&row)),
            replayed: applied.replayed,
            sequence: i64::try_from(applied.sequence).unwrap_or(i64::MAX),
            status: applied.status.map(|status| status.name().to_owned()).unwrap_or_default(),
        })
    }

    async fn initiate(&self, body: pb::InitiateTransactionRequest) -> Result<pb::TransactionResponse, ApiError> {
        let key = convert::idempotency_key(&body.idempotency_key, "idempotency_key")?;
        let mut spec = wire::new_transaction(&body)?;
        let transaction_id = spec.id;
        // A retry is priced as its first request was, from the operation journaled under its key
        // (whatever that request's outcome): priced again, a fee schedule that took effect in
        // between made it another operation under the same key (IDEMPOTENCY_KEY_REUSED where
        // promise 6 wants the first result; session 22).
        let first = if self.ledger.remembers_key(&key) {
            queries::operation_under_key(&self.pool, key.as_str()).await?
        } else {
            None
        };
        if let Some(Operation::InitiateTransaction { transaction: first }) = first {
            spec.fees = first.fees;
        } else {
            let priced_at_ms = now_ms();
            let schedules =
                queries::fee_schedules(&self.pool, spec.kind.name(), spec.payer.asset().symbol(), priced_at_ms).await?;
            if let Some(schedule) = fees::select(&schedules, priced_at_ms) {
                spec.fees = fees::compute(schedule, spec.principal_minor)?;
            }
        }
        let user_id = spec.user_id;
        let operation = Operation::InitiateTransaction { transaction: Box::new(spec) };
        // The caller's scopes before anything about the id is told: checked only on submitting,
        // a caller outside the transaction's domain learned that an id existed (found in review,
        // session 23).
        super::service::caller()?.require_engine_operation(&operation, self.ledger.as_ref())?;
        // Until this initiation is durable (or refused), no other of the same id gets past here:
        // two at once, for two users, each passed the checks below before either was in the
        // projections, and both ids then stopped the journal's writer on every later move of
        // either (found in review, session 23).
        let stripe = self.stripe_hasher.hash_one(transaction_id) as usize % INITIATION_STRIPES;
        let _initiating = self.initiations[stripe].lock().await;
        // A transaction id names one business transaction for good. The engine forgets finished
        // transactions after the retention window, so an id it no longer knows may still be in
        // the projections, which hold one transaction per id: refuse it here. Journaled again, it
        // stopped the writer for every request of its batch, retry after retry (session 16). An
        // id or a key the engine still knows goes through, so a retry is answered as before.
        if self.ledger.transaction_domain(user_id, transaction_id).is_none()
            && !self.ledger.remembers_key(&key)
            && queries::transaction_exists(&self.pool, transaction_id).await?
        {
            return Err(ApiError::Refused(EngineError::TransactionAlreadyExists { transaction_id }));
        }
        let applied = self.submit(key, operation).await?;
        self.respond(transaction_id, applied).await
    }

    /// A stored transaction in a domain the caller may see: reads are scoped as the Ledger
    /// service's are (until session 22 a caller scoped to one domain read every domain's).
    async fn visible_transaction(&self, transaction_id: Uuid) -> Result<queries::TransactionRow, ApiError> {
        let row = queries::transaction(&self.pool, transaction_id)
            .await?
            .ok_or(ApiError::TransactionNotFound { transaction_id })?;
        caller()?.require_domain(domain_of(&row)?)?;
        Ok(row)
    }

    /// Refuses a provider event that names a stored transaction outside the caller's domains,
    /// before anything of it is stored or answered: stored first, it stayed pending under a
    /// refusal, so the rightful sender's redelivery was answered as a duplicate and never
    /// applied; and an event the transaction had moved past was answered with the transaction's
    /// status (found in review, session 23). An event that moves nothing, does not parse or names
    /// no stored transaction reveals nothing and is stored as before, to be retried.
    async fn require_event_in_scope(&self, event_type: &str, raw_payload: &str) -> Result<(), ApiError> {
        if provider_events::target_status(event_type).is_none() {
            return Ok(());
        }
        let Ok(parsed) = provider_events::parse(raw_payload) else { return Ok(()) };
        if let Some(row) = queries::transaction(&self.pool, parsed.transaction_id).await? {
            caller()?.require_domain(domain_of(&row)?)?;
        }
        Ok(())
    }

    /// The journaled description of `user_id`'s transaction `transaction_id`.
    async fn spec_of(&self, user_id: Uuid, transaction_id: Uuid) -> Result<NewTransaction, ApiError> {
        queries::spec(&self.pool, transaction_id)
            .await?
            .filter(|spec| spec.user_id == user_id)
            .ok_or(ApiError::Refused(EngineError::TransactionNotFound { user_id, transaction_id }))
    }

    async fn transition(
        &self,
        key: IdempotencyKey,
        spec: &NewTransaction,
        to: TxStatus,
        reason: String,
        provider_event: Option<ProviderRef>,
        fill: Option<Fill>,
    ) -> Result<Applied, ApiError> {
        let payee_user_id = match spec.payee {
            AccountRef::User(payee) if payee.user_id != spec.user_id => Some(payee.user_id),
            _ => None,
        };
        let operation = Operation::TransitionTransaction {
            user_id: spec.user_id,
            transaction_id: spec.id,
            to,
            reason,
            provider_event,
            fill,
            payee_user_id,
        };
        self.submit(key, operation).await
    }

    async fn advance(&self, body: pb::AdvanceTransactionRequest) -> Result<pb::TransactionResponse, ApiError> {
        let key = convert::idempotency_key(&body.idempotency_key, "idempotency_key")?;
        let user_id = convert::uuid(&body.user_id, "user_id")?;
        let transaction_id = convert::uuid(&body.transaction_id, "transaction_id")?;
        let to = wire::tx_status(&body.to_status, "to_status")?;
        let reason = wire::bounded_text(&body.reason, "reason", crate::engine::transaction::MAX_TEXT_LEN)?;
        let spec = self.spec_of(user_id, transaction_id).await?;
        let fill = wire::fill(&body.fill_price, &body.fill_quantity, spec.receive.map(|(_, to)| to.asset))?;
        // Only a completion records a fill: elsewhere the engine would drop it unsaid.
        if fill.is_some() && to != TxStatus::Completed {
            return Err(wire::invalid("fill_price", "a fill belongs only to a move to completed").into());
        }
        let applied = self.transition(key, &spec, to, reason, None, fill).await?;
        self.respond(transaction_id, applied).await
    }

    async fn fail(&self, body: pb::FailTransactionRequest) -> Result<pb::TransactionResponse, ApiError> {
        let key = convert::idempotency_key(&body.idempotency_key, "idempotency_key")?;
        let user_id = convert::uuid(&body.user_id, "user_id")?;
        let transaction_id = convert::uuid(&body.transaction_id, "transaction_id")?;
        let reason = wire::required_text(&body.reason, "reason", crate::engine::transaction::MAX_TEXT_LEN)?;
        let spec = self.spec_of(user_id, transaction_id).await?;
        let applied = self.transition(key, &spec, TxStatus::Failed, reason, None, None).await?;
        self.respond(transaction_id, applied).await
    }

    async fn list(&self, body: pb::ListTransactionsRequest) -> Result<pb::ListTransactionsResponse, ApiError> {
        let user_id = convert::uuid(&body.user_id, "user_id")?;
        let page_size = wire::page_size(body.page_size)?;
        let domain = (body.domain != 0).then(|| convert::domain(body.domain, "domain")).transpose()?;
        let caller = caller()?;
        if let Some(domain) = domain {
            caller.require_domain(domain)?;
        }
        let visible: Vec<&'static str> =
            Domain::ALL.into_iter().filter(|domain| caller.may_touch(*domain)).map(Domain::name).collect();
        let filter = ListFilter {
            domain: domain.map(Domain::name),
            visible_domains: (visible.len() < Domain::ALL.len()).then_some(visible),
            kind: (!body.r#type.is_empty()).then(|| wire::tx_type(&body.r#type, "type")).transpose()?.map(|k| k.name()),
            status: (!body.status.is_empty())
                .then(|| wire::tx_status(&body.status, "status"))
                .transpose()?
                .map(|status| status.name()),
            from_ms: (body.from_ms != 0).then_some(body.from_ms),
            to_ms: (body.to_ms != 0).then_some(body.to_ms),
            after: wire::parse_page_token(&body.page_token)?,
        };
        // One more than the page tells whether another page follows.
        let mut rows = queries::list(&self.pool, user_id, &filter, page_size + 1).await?;
        let more = rows.len() > page_size as usize;
        rows.truncate(page_size as usize);
        let next_page_token = match rows.last() {
            Some(last) if more => wire::page_token(last),
            _ => String::new(),
        };
        Ok(pb::ListTransactionsResponse {
            transactions: rows.iter().map(wire::wire_transaction).collect(),
            next_page_token,
        })
    }

    /// Stores a provider event (or answers the stored one for a duplicate), then applies it.
    async fn submit_event(&self, body: pb::SubmitProviderEventRequest) -> Result<pb::ProviderEventResponse, ApiError> {
        let source = wire::required_text(&body.source, "source", wire::MAX_EVENT_FIELD_LEN)?;
        let event_id = wire::required_text(&body.event_id, "event_id", wire::MAX_EVENT_FIELD_LEN)?;
        let event_type = wire::required_text(&body.event_type, "event_type", wire::MAX_EVENT_FIELD_LEN)?;
        let raw_payload = wire::bounded_text(&body.raw_payload, "raw_payload", wire::MAX_RAW_PAYLOAD_BYTES)?;
        self.require_event_in_scope(&event_type, &raw_payload).await?;
        if !queries::insert_event(&self.pool, &source, &event_id, &event_type, &raw_payload).await? {
            let stored = queries::event(&self.pool, &source, &event_id)
                .await?
                .ok_or(ApiError::EventNotFound { event_source: source.clone(), event_id: event_id.clone() })?;
            return Ok(pb::ProviderEventResponse {
                status: stored.status,
                reason: stored.reason.unwrap_or_default(),
                duplicate: true,
                transaction_id: stored.transaction_id.map(|id| id.hyphenated().to_string()).unwrap_or_default(),
                transaction_status: String::new(),
            });
        }
        tracing::info!(%source, %event_type, "provider event stored");
        self.process_event(&source, &event_id, &event_type, &raw_payload).await
    }

    async fn retry_event(&self, body: pb::RetryProviderEventRequest) -> Result<pb::ProviderEventResponse, ApiError> {
        let source = wire::required_text(&body.source, "source", wire::MAX_EVENT_FIELD_LEN)?;
        let event_id = wire::required_text(&body.event_id, "event_id", wire::MAX_EVENT_FIELD_LEN)?;
        let stored = queries::event(&self.pool, &source, &event_id)
            .await?
            .ok_or(ApiError::EventNotFound { event_source: source.clone(), event_id: event_id.clone() })?;
        self.require_event_in_scope(&stored.event_type, &stored.raw_payload).await?;
        if !matches!(stored.status.as_str(), "failed" | "pending") {
            return Err(ApiError::EventNotRetryable { status: stored.status });
        }
        self.process_event(&source, &event_id, &stored.event_type, &stored.raw_payload).await
    }

    /// Applies a stored event to its transaction and records the outcome in the inbox.
    async fn process_event(
        &self,
        source: &str,
        event_id: &str,
        event_type: &str,
        raw_payload: &str,
    ) -> Result<pb::ProviderEventResponse, ApiError> {
        let settle = async |status: &str,
                            reason: Option<String>,
                            transaction_id: Option<Uuid>,
                            processed: Option<String>,
                            transaction_status: Option<TxStatus>| {
            queries::settle_event(
                &self.pool,
                source,
                event_id,
                status,
                reason.as_deref(),
                transaction_id,
                processed.as_deref(),
            )
            .await?;
            Ok::<_, ApiError>(pb::ProviderEventResponse {
                status: status.to_owned(),
                reason: reason.unwrap_or_default(),
                duplicate: false,
                transaction_id: transaction_id.map(|id| id.hyphenated().to_string()).unwrap_or_default(),
                transaction_status: transaction_status.map(|status| status.name().to_owned()).unwrap_or_default(),
            })
        };
        let Some(to) = provider_events::target_status(event_type) else {
            return settle(
                "ignored",
                Some(format!("event type {event_type:?} does not move a transaction")),
                None,
                None,
                None,
            )
            .await;
        };
        let parsed = match provider_events::parse(raw_payload) {
            Ok(parsed) => parsed,
            Err(reason) => return settle("failed", Some(reason.to_owned()), None, None, None).await,
        };
        let id = parsed.transaction_id;
        let processed = serde_json::to_string(&serde_json::json!({ "parsed": parsed, "target_status": to.name() }))
            .map_err(|error| ApiError::Internal(error.to_string()))?;
        let Some(row) = queries::transaction(&self.pool, id).await? else {
            // Kept, not dropped: a retry after the transaction exists applies it.
            return settle("failed", Some("unknown transaction".to_owned()), Some(id), Some(processed), None).await;
        };
        let current =
            TxStatus::from_name(&row.status).ok_or_else(|| ApiError::Internal(format!("status {}", row.status)))?;
        if !is_legal(current, to) {
            // Behind: the transaction has not reached the step this event follows (retry later).
            // Ahead or finished: the event is stale or out of order and changes nothing.
            let rank = |status: TxStatus| TxStatus::ALL.iter().position(|candidate| *candidate == status);
            let behind = !current.is_finished() && current != TxStatus::Compensating && rank(current) < rank(to);
            let (status, reason) = if behind {
                ("failed", format!("transaction is {}, not yet ready for {}", current.name(), to.name()))
            } else {
                ("ignored", format!("stale or out of order: transaction is already {}", current.name()))
            };
            return settle(status, Some(reason), Some(id), Some(processed), Some(current)).await;
        }
        let spec = self.spec_of(row.user_id, id).await?;
        let fill = match (to, spec.receive) {
            (TxStatus::Completed, Some((_, bought))) => {
                let price = parsed.price.as_deref().unwrap_or_default();
                let quantity = parsed.quantity.as_deref().unwrap_or_default();
                match wire::fill(price, quantity, Some(bought.asset)) {
                    Ok(fill) => fill,
                    Err(invalid) => {
                        return settle("failed", Some(invalid.to_string()), Some(id), Some(processed), Some(current))
                            .await;
                    }
                }
            }
            _ => None,
        };
        let provider_event = ProviderRef { source: source.to_owned(), event_id: event_id.to_owned() };
        let key = event_key(source, event_id);
        match self.transition(key, &spec, to, event_type.to_owned(), Some(provider_event), fill).await {
            Ok(applied) => settle("processed", None, Some(id), Some(processed), applied.status).await,
            Err(ApiError::Refused(refusal)) => {
                settle("failed", Some(refusal.to_string()), Some(id), Some(processed), Some(current)).await
            }
            // PostgreSQL or the journal is unavailable: the event stays as it was, to be retried.
            Err(other) => Err(other),
        }
    }
}

/// The domain of a stored transaction.
fn domain_of(row: &queries::TransactionRow) -> Result<Domain, ApiError> {
    Domain::ALL
        .into_iter()
        .find(|domain| domain.name() == row.domain)
        .ok_or_else(|| ApiError::Internal(format!("transaction {}: domain {}", row.transaction_id, row.domain)))
}

/// The idempotency key of applying provider event (source, event_id): the first 128 bits of their
/// SHA-256, so redelivery or retry of one event is recognised by the engine as the same request.
/// A cryptographic hash, not a fast one with fixed seeds: whoever sends provider events must not
/// be able to choose an event id whose key collides with another event's, which would then be
/// answered as that event's retry and never applied. The source is length-prefixed so no
/// (source, event_id) split of the same bytes shares a key.
fn event_key(source: &str, event_id: &str) -> IdempotencyKey {
    let mut hasher = Sha256::new();
    hasher.update((source.len() as u64).to_le_bytes());
    hasher.update(source.as_bytes());
    hasher.update(event_id.as_bytes());
    let digest = hasher.finalize();
    let text = format!("pe-{}", hex::encode(&digest[..16]));
    // 35 printable ASCII bytes: always a valid key.
    IdempotencyKey::new(&text).unwrap_or_else(|_| unreachable!("a 35-byte hex key is valid"))
}

#[tonic::async_trait]
impl pb::transactions_server::Transactions for TransactionsService {
    async fn initiate_transaction(
        &self,
        request: GrpcRequest<pb::InitiateTransactionRequest>,
    ) -> Result<Response<pb::TransactionResponse>, Status> {
        self.gate.handle("InitiateTransaction", request, |body| self.initiate(body)).await
    }

    async fn advance_transaction(
        &self,
        request: GrpcRequest<pb::AdvanceTransactionRequest>,
    ) -> Result<Response<pb::TransactionResponse>, Status> {
        self.gate.handle("AdvanceTransaction", request, |body| self.advance(body)).await
    }

    async fn fail_transaction(
        &self,
        request: GrpcRequest<pb::FailTransactionRequest>,
    ) -> Result<Response<pb::TransactionResponse>, Status> {
        self.gate.handle("FailTransaction", request, |body| self.fail(body)).await
    }

    async fn get_transaction(
        &self,
        request: GrpcRequest<pb::GetTransactionRequest>,
    ) -> Result<Response<pb::TransactionResponse>, Status> {
        self.gate
            .handle("GetTransaction", request, |body| async move {
                let transaction_id = convert::uuid(&body.transaction_id, "transaction_id")?;
                let row = self.visible_transaction(transaction_id).await?;
                Ok(pb::TransactionResponse {
                    transaction: Some(wire::wire_transaction(&row)),
                    replayed: false,
                    sequence: 0,
                    status: String::new(),
                })
            })
            .await
    }

    async fn list_transactions(
        &self,
        request: GrpcRequest<pb::ListTransactionsRequest>,
    ) -> Result<Response<pb::ListTransactionsResponse>, Status> {
        self.gate.handle("ListTransactions", request, |body| self.list(body)).await
    }

    async fn get_transaction_history(
        &self,
        request: GrpcRequest<pb::GetTransactionHistoryRequest>,
    ) -> Result<Response<pb::GetTransactionHistoryResponse>, Status> {
        self.gate
            .handle("GetTransactionHistory", request, |body| async move {
                let transaction_id = convert::uuid(&body.transaction_id, "transaction_id")?;
                self.visible_transaction(transaction_id).await?;
                let changes = queries::history(&self.pool, transaction_id).await?;
                Ok(pb::GetTransactionHistoryResponse { changes: changes.iter().map(wire::wire_change).collect() })
            })
            .await
    }

    async fn set_user_compliance(
        &self,
        request: GrpcRequest<pb::SetUserComplianceRequest>,
    ) -> Result<Response<pb::SetUserComplianceResponse>, Status> {
        self.gate
            .handle("SetUserCompliance", request, |body| async move {
                let key = convert::idempotency_key(&body.idempotency_key, "idempotency_key")?;
                let (user_id, record) = wire::compliance(&body)?;
                let applied = self.submit(key, Operation::SetCompliance { user_id, record }).await?;
                Ok(pb::SetUserComplianceResponse {
                    replayed: applied.replayed,
                    sequence: i64::try_from(applied.sequence).unwrap_or(i64::MAX),
                })
            })
            .await
    }

    async fn submit_provider_event(
        &self,
        request: GrpcRequest<pb::SubmitProviderEventRequest>,
    ) -> Result<Response<pb::ProviderEventResponse>, Status> {
        self.gate.handle("SubmitProviderEvent", request, |body| self.submit_event(body)).await
    }

    async fn retry_provider_event(
        &self,
        request: GrpcRequest<pb::RetryProviderEventRequest>,
    ) -> Result<Response<pb::ProviderEventResponse>, Status> {
        self.gate.handle("RetryProviderEvent", request, |body| self.retry_event(body)).await
    }
}

#[cfg(test)]
mod tests {
    use super::event_key;

    #[test]
    fn an_event_key_is_stable_and_names_one_source_and_event() {
        let key = event_key("stripe", "evt_1");
        assert_eq!(key, event_key("stripe", "evt_1"), "a redelivery is the same request");
        assert_eq!(key.as_str().len(), 35);
        assert!(key.as_str().starts_with("pe-"));
        assert_ne!(key, event_key("stripe", "evt_2"));
        assert_ne!(key, event_key("moonpay", "evt_1"));
        // The same bytes split differently between source and event id are another event.
        assert_ne!(event_key("ab", "c"), event_key("a", "bc"));
    }
}
