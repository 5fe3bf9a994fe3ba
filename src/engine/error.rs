//! Every way the engine can refuse an operation, as data a caller can act on.
//!
//! Refusals are recorded with their idempotency key like successes (a retry gets the same
//! refusal back), so they are serializable and comparable. Three refusals are not recorded,
//! because they are not an outcome of the key's operation: `IdempotencyConflict` and
//! `IdempotencyCapacityExhausted`, nor `JournalUnavailable` (see [`EngineError::is_recorded`]).

use serde::{Deserialize, Serialize};
use thiserror::Error;
use uuid::Uuid;

use super::account::{AccountRef, UserAccount};
use super::asset::Asset;
use super::reservation::ReservationStatus;
use super::transaction::TxStatus;

/// Which outflow limit an operation would have broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitKind {
    PerTransaction,
    Daily,
    Monthly,
}

impl LimitKind {
    pub fn name(self) -> &'static str {
        match self {
            LimitKind::PerTransaction => "per_transaction",
            LimitKind::Daily => "daily",
            LimitKind::Monthly => "monthly",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize, Deserialize)]
#[serde(tag = "error", content = "data", rename_all = "snake_case")]
pub enum EngineError {
    #[error("account does not exist: {account}")]
    UnknownAccount { account: AccountRef },
    #[error("account already exists: {}", AccountRef::User(*account))]
    AccountAlreadyExists { account: UserAccount },
    #[error("account is frozen: {}", AccountRef::User(*account))]
    AccountFrozen { account: UserAccount },
    #[error(
        "insufficient funds in {account}: available {available_minor}, overdraft {overdraft_minor}, requested {requested_minor} (minor units)"
    )]
    InsufficientFunds { account: AccountRef, available_minor: i128, overdraft_minor: i128, requested_minor: i128 },
    #[error("{} outflow limit of {limit_minor} exceeded on {}: already used {used_minor}, requested {requested_minor} (minor units)", limit.name(), AccountRef::User(*account))]
    LimitExceeded { account: UserAccount, limit: LimitKind, limit_minor: i128, used_minor: i128, requested_minor: i128 },
    #[error("the posting would take a balance of {account} past the maximum magnitude")]
    BalanceOverflow { account: AccountRef },
    #[error("accounts hold different assets: {left} and {right}")]
    AssetMismatch { left: Asset, right: Asset },
    #[error("source and destination are the same account")]
    SameAccount,
    #[error("a conversion needs two different assets")]
    SameAsset,
    #[error("reservation {reservation_id} of user {user_id} does not exist")]
    ReservationNotFound { user_id: Uuid, reservation_id: Uuid },
    #[error("reservation {reservation_id} of user {user_id} already exists")]
    ReservationAlreadyExists { user_id: Uuid, reservation_id: Uuid },
    #[error("user {user_id} already holds the most active reservations allowed ({max})")]
    TooManyActiveReservations { user_id: Uuid, max: usize },
    #[error("user {user_id} already has the most unfinished transactions allowed ({max})")]
    TooManyUnfinishedTransactions { user_id: Uuid, max: usize },
    #[error("reservation {reservation_id} is {status:?}, not active")]
    ReservationNotActive { reservation_id: Uuid, status: ReservationStatus },
    #[error("reservation {reservation_id} expired at {expires_at_ms} ms and is being released")]
    ReservationExpired { reservation_id: Uuid, expires_at_ms: i64 },
    #[error("commit of {requested_minor} exceeds the reservation's {reserved_minor} (minor units)")]
    CommitExceedsReservation { reserved_minor: i128, requested_minor: i128 },
    #[error("reservation lifetime must be between 1 ms and {max_ttl_ms} ms")]
    ReservationTtlOutOfRange { max_ttl_ms: i64 },
    #[error("conversion price must be positive")]
    InvalidPrice,
    #[error("commission must be at most {max_bps} basis points")]
    CommissionOutOfRange { max_bps: u32 },
    #[error("conversion proceeds round to nothing after commission")]
    ConversionTooSmall,
    #[error("conversion proceeds exceed the maximum amount")]
    ConversionOverflow,
    #[error("a linked batch must hold between 1 and {max} operations")]
    BatchSize { max: usize },
    #[error("a linked batch cannot contain another linked batch")]
    NestedBatch,
    #[error("operation {index} of the linked batch failed: {cause}")]
    BatchOperationFailed { index: usize, cause: Box<EngineError> },
    #[error("idempotency key {key} was already used for a different operation")]
    IdempotencyConflict { key: String },
    #[error("the idempotency store is full; retry later")]
    IdempotencyCapacityExhausted,
    #[error("account settings are invalid: {reason}")]
    InvalidAccountConfig { reason: String },
    #[error("transaction {transaction_id} of user {user_id} does not exist (or finished and was forgotten)")]
    TransactionNotFound { user_id: Uuid, transaction_id: Uuid },
    #[error("reservation {reservation_id} belongs to a transaction; it moves only with the transaction's status")]
    ReservationHeldByTransaction { reservation_id: Uuid },
    #[error("transaction {transaction_id} already exists")]
    TransactionAlreadyExists { transaction_id: Uuid },
    #[error("transaction {transaction_id} cannot go from {} to {}", from.name(), to.name())]
    IllegalTransition { transaction_id: Uuid, from: TxStatus, to: TxStatus },
    #[error("transaction is invalid: {reason}")]
    InvalidTransaction { reason: String },
    #[error("completing this trade needs its fill (price and quantity)")]
    FillRequired,
    #[error("the payee user given does not match the transaction's payee")]
    PayeeMismatch,
    #[error("the journal is not accepting changes; nothing was applied")]
    JournalUnavailable,
}

impl EngineError {
    /// Whether this refusal is remembered under the request's idempotency key (and journaled).
    pub fn is_recorded(&self) -> bool {
        !matches!(
            self,
            EngineError::IdempotencyConflict { .. }
                | EngineError::IdempotencyCapacityExhausted
                | EngineError::JournalUnavailable
        )
    }
}
