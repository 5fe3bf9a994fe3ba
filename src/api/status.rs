//! The one mapping from every refusal the API can give to a gRPC status (promise 8).
//!
//! Each refusal gets a status code a client can branch on, a human message, and a
//! google.rpc.ErrorInfo whose `reason` is a stable machine-readable name (e.g.
//! `INSUFFICIENT_FUNDS`) in the domain [`ERROR_DOMAIN`], with metadata (the account, the limit, the
//! reservation...). Bad input also carries a google.rpc.BadRequest naming the field. Codes:
//!
//! - INVALID_ARGUMENT: a value that can never be right (malformed input, asset mismatch, ...)
//! - NOT_FOUND: an unknown account or reservation
//! - ALREADY_EXISTS: the account or reservation exists; an idempotency key reused for another body
//! - FAILED_PRECONDITION: right request, wrong moment (funds, frozen, limits, reservation state)
//! - RESOURCE_EXHAUSTED: the idempotency store is full, or the server is at its concurrency
//!   limit (OVERLOADED: nothing was done; retry later with backoff)
//! - RESOURCE_EXHAUSTED: the idempotency store is full; retry later. For an event stream: the
//!   consumer is too slow, or too many streams are open (resume / retry later)
//! - OUT_OF_RANGE: an event stream asked for positions that were pruned
//! - UNAVAILABLE: PostgreSQL cannot be written; the outcome is unknown, retry with the same key
//! - DEADLINE_EXCEEDED: the request's deadline passed; a change may still become durable, so
//!   retry with the same idempotency key
//! - UNAUTHENTICATED: no bearer token, or not one the server knows
//! - PERMISSION_DENIED: the caller's scopes do not cover the operation or the domain
//! - INTERNAL: a failure of the server itself

use std::collections::HashMap;

use thiserror::Error;
use tonic::codegen::http::Response;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use super::auth::AuthError;
use super::convert::InvalidField;
use crate::directory::DirectoryError;
use crate::directory::address::AddressError;
use crate::engine::account::AccountRef;
use crate::engine::error::EngineError;
use crate::fees::FeeError;
use crate::ledger::LedgerError;
use crate::outbox::OutboxError;
use crate::store::StoreError;

/// The ErrorInfo domain of every refusal this service gives.
pub const ERROR_DOMAIN: &str = "ledger.diboas";

/// What a client is told of an internal failure. The cause (a database error, a broken
/// invariant) is logged with the request's correlation id, and stays there: it can name tables,
/// constraints and values, which a caller has no use for (until session 22 it was sent).
pub const INTERNAL_MESSAGE: &str = "internal error: its cause is logged under this request's correlation id";

/// The delay an OVERLOADED refusal suggests before a retry (google.rpc.RetryInfo).
pub const OVERLOADED_RETRY_DELAY_MS: u64 = 50;

/// Every way an RPC of the ledger service can fail.
#[derive(Debug, Error)]
pub enum ApiError {
    #[error(transparent)]
    Invalid(#[from] InvalidField),
    #[error("a batch holds {found} operations, more than the {max} allowed")]
    BatchTooLarge { found: usize, max: usize },
    #[error("a batch must hold at least one entry")]
    EmptyBatch,
    #[error(transparent)]
    Refused(#[from] EngineError),
    #[error(transparent)]
    Ledger(LedgerError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("the server is at its limit of {max_in_flight} requests in flight; retry later")]
    Overloaded { max_in_flight: usize },
    #[error(
        "the request did not finish within its deadline of {deadline_ms} ms; a change it asked for may still \
         become durable: retry with the same idempotency key to learn its outcome"
    )]
    DeadlineExceeded { deadline_ms: u64 },
    #[error("{field}: {error}")]
    InvalidWallet { field: String, error: AddressError },
    #[error(transparent)]
    Directory(#[from] DirectoryError),
    #[error("transaction {transaction_id} does not exist")]
    TransactionNotFound { transaction_id: uuid::Uuid },
    #[error("provider event {event_id:?} from {event_source:?} does not exist")]
    EventNotFound { event_source: String, event_id: String },
    #[error("the provider event is {status}; only failed or pending events are retried")]
    EventNotRetryable { status: String },
    #[error(transparent)]
    Fees(#[from] FeeError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("internal error: {0}")]
    Internal(String),
    /// An event stream's consumer fell a whole buffer behind (see `api::events`).
    #[error("the consumer fell more than {buffer_events} events behind; resume after position {resume_after_position}")]
    ConsumerTooSlow { resume_after_position: i64, buffer_events: usize },
    #[error("too many event streams are open (at most {max})")]
    TooManyStreams { max: usize },
    #[error("reading events: {source}; resume after position {resume_after_position}")]
    Events { source: OutboxError, resume_after_position: i64 },
    /// The server began a graceful shutdown while an event stream was open.
    #[error("the server is shutting down; resume after position {resume_after_position} on another instance or later")]
    ShuttingDown { resume_after_position: i64 },
}

impl From<LedgerError> for ApiError {
    fn from(error: LedgerError) -> ApiError {
        match error {
            LedgerError::Refused(refusal) => ApiError::Refused(refusal),
            other => ApiError::Ledger(other),
        }
    }
}

type Metadata = Vec<(&'static str, String)>;

/// Code, reason and metadata of an engine refusal.
fn classify(error: &EngineError) -> (Code, &'static str, Metadata) {
    use EngineError as E;
    match error {
        E::UnknownAccount { account } => (Code::NotFound, "ACCOUNT_NOT_FOUND", vec![("account", account.to_string())]),
        E::AccountAlreadyExists { account } => {
            (Code::AlreadyExists, "ACCOUNT_ALREADY_EXISTS", vec![("account", AccountRef::User(*account).to_string())])
        }
        E::AccountFrozen { account } => {
            (Code::FailedPrecondition, "ACCOUNT_FROZEN", vec![("account", AccountRef::User(*account).to_string())])
        }
        E::InsufficientFunds { account, available_minor, overdraft_minor, requested_minor } => (
            Code::FailedPrecondition,
            "INSUFFICIENT_FUNDS",
            vec![
                ("account", account.to_string()),
                ("available_minor", available_minor.to_string()),
                ("overdraft_minor", overdraft_minor.to_string()),
                ("requested_minor", requested_minor.to_string()),
            ],
        ),
        E::LimitExceeded { account, limit, limit_minor, used_minor, requested_minor } => (
            Code::FailedPrecondition,
            "OUTFLOW_LIMIT_EXCEEDED",
            vec![
                ("account", AccountRef::User(*account).to_string()),
                ("limit", limit.name().to_string()),
                ("limit_minor", limit_minor.to_string()),
                ("used_minor", used_minor.to_string()),
                ("requested_minor", requested_minor.to_string()),
            ],
        ),
        E::BalanceOverflow { account } => {
            (Code::FailedPrecondition, "BALANCE_OVERFLOW", vec![("account", account.to_string())])
        }
        E::AssetMismatch { left, right } => (
            Code::InvalidArgument,
            "ASSET_MISMATCH",
            vec![("left", left.symbol().to_string()), ("right", right.symbol().to_string())],
        ),
        E::SameAccount => (Code::InvalidArgument, "SAME_ACCOUNT", vec![]),
        E::SameAsset => (Code::InvalidArgument, "SAME_ASSET", vec![]),
        E::ReservationNotFound { user_id, reservation_id } => (
            Code::NotFound,
            "RESERVATION_NOT_FOUND",
            vec![("user_id", user_id.to_string()), ("reservation_id", reservation_id.to_string())],
        ),
        E::ReservationAlreadyExists { user_id, reservation_id } => (
            Code::AlreadyExists,
            "RESERVATION_ALREADY_EXISTS",
            vec![("user_id", user_id.to_string()), ("reservation_id", reservation_id.to_string())],
        ),
        E::TooManyActiveReservations { user_id, max } => (
            Code::FailedPrecondition,
            "TOO_MANY_ACTIVE_RESERVATIONS",
            vec![("user_id", user_id.to_string()), ("max", max.to_string())],
        ),
        E::TooManyUnfinishedTransactions { user_id, max } => (
            Code::FailedPrecondition,
            "TOO_MANY_UNFINISHED_TRANSACTIONS",
            vec![("user_id", user_id.to_string()), ("max", max.to_string())],
        ),
        E::ReservationNotActive { reservation_id, status } => (
            Code::FailedPrecondition,
            "RESERVATION_NOT_ACTIVE",
            vec![("reservation_id", reservation_id.to_string()), ("status", format!("{status:?}").to_uppercase())],
        ),
        E::ReservationExpired { reservation_id, expires_at_ms } => (
            Code::FailedPrecondition,
            "RESERVATION_EXPIRED",
            vec![("reservation_id", reservation_id.to_string()), ("expires_at_ms", expires_at_ms.to_string())],
        ),
        E::CommitExceedsReservation { reserved_minor, requested_minor } => (
            Code::FailedPrecondition,
            "COMMIT_EXCEEDS_RESERVATION",
            vec![("reserved_minor", reserved_minor.to_string()), ("requested_minor", requested_minor.to_string())],
        ),
        E::ReservationTtlOutOfRange { max_ttl_ms } => {
            (Code::InvalidArgument, "RESERVATION_TTL_OUT_OF_RANGE", vec![("max_ttl_ms", max_ttl_ms.to_string())])
        }
        E::InvalidPrice => (Code::InvalidArgument, "INVALID_PRICE", vec![]),
        E::CommissionOutOfRange { max_bps } => {
            (Code::InvalidArgument, "COMMISSION_OUT_OF_RANGE", vec![("max_bps", max_bps.to_string())])
        }
        E::ConversionTooSmall => (Code::InvalidArgument, "CONVERSION_TOO_SMALL", vec![]),
        E::ConversionOverflow => (Code::InvalidArgument, "CONVERSION_OVERFLOW", vec![]),
        E::BatchSize { max } => (Code::InvalidArgument, "BATCH_SIZE", vec![("max", max.to_string())]),
        E::NestedBatch => (Code::InvalidArgument, "NESTED_BATCH", vec![]),
        E::BatchOperationFailed { index, cause } => {
            // The group failed because of one operation: report that operation's code and reason.
            let (code, reason, mut metadata) = classify(cause);
            metadata.push(("operation_index", index.to_string()));
            (code, reason, metadata)
        }
        E::IdempotencyConflict { key } => {
            (Code::AlreadyExists, "IDEMPOTENCY_KEY_REUSED", vec![("idempotency_key", key.clone())])
        }
        E::IdempotencyCapacityExhausted => (Code::ResourceExhausted, "IDEMPOTENCY_STORE_FULL", vec![]),
        E::InvalidAccountConfig { reason } => {
            (Code::InvalidArgument, "INVALID_ACCOUNT_CONFIG", vec![("reason", reason.clone())])
        }
        E::JournalUnavailable => (Code::Unavailable, "JOURNAL_UNAVAILABLE", vec![]),
        E::TransactionNotFound { user_id, transaction_id } => (
            Code::NotFound,
            "TRANSACTION_NOT_FOUND",
            vec![("user_id", user_id.to_string()), ("transaction_id", transaction_id.to_string())],
        ),
        E::TransactionAlreadyExists { transaction_id } => {
            (Code::AlreadyExists, "TRANSACTION_ALREADY_EXISTS", vec![("transaction_id", transaction_id.to_string())])
        }
        E::IllegalTransition { transaction_id, from, to } => (
            Code::FailedPrecondition,
            "ILLEGAL_TRANSITION",
            vec![
                ("transaction_id", transaction_id.to_string()),
                ("from", from.name().to_string()),
                ("to", to.name().to_string()),
            ],
        ),
        E::InvalidTransaction { reason } => {
            (Code::InvalidArgument, "INVALID_TRANSACTION", vec![("reason", reason.clone())])
        }
        E::FillRequired => (Code::InvalidArgument, "FILL_REQUIRED", vec![]),
        E::ReservationHeldByTransaction { reservation_id } => (
            Code::FailedPrecondition,
            "RESERVATION_HELD_BY_TRANSACTION",
            vec![("reservation_id", reservation_id.to_string())],
        ),
        E::PayeeMismatch => (Code::InvalidArgument, "PAYEE_MISMATCH", vec![]),
    }
}

/// Code, reason and metadata of a directory refusal.
fn classify_directory(error: &DirectoryError) -> (Code, &'static str, Metadata) {
    use DirectoryError as D;
    match error {
        D::UserNotFound(user_id) => (Code::NotFound, "USER_NOT_FOUND", vec![("user_id", user_id.to_string())]),
        D::UserAlreadyExists(user_id) => {
            (Code::AlreadyExists, "USER_ALREADY_EXISTS", vec![("user_id", user_id.to_string())])
        }
        D::EmailAlreadyRegistered => (Code::AlreadyExists, "EMAIL_ALREADY_REGISTERED", vec![]),
        D::WalletAlreadyRegistered { user_id, chain } => (
            Code::AlreadyExists,
            "WALLET_ALREADY_REGISTERED",
            vec![("user_id", user_id.to_string()), ("chain", (*chain).to_string())],
        ),
        D::DomainAccountAlreadyExists(account_id) => {
            (Code::AlreadyExists, "DOMAIN_ACCOUNT_ALREADY_EXISTS", vec![("account_id", account_id.to_string())])
        }
        D::UserErased(user_id) => (Code::FailedPrecondition, "USER_ERASED", vec![("user_id", user_id.to_string())]),
        D::Database(_) if error.is_unavailable() => (Code::Unavailable, "DATABASE_UNAVAILABLE", vec![]),
        D::Crypto(_) | D::Corrupt(_) | D::Database(_) => (Code::Internal, "INTERNAL", vec![]),
    }
}

fn with_info(code: Code, message: String, reason: &str, metadata: Metadata, mut details: ErrorDetails) -> Status {
    let metadata: HashMap<String, String> = metadata.into_iter().map(|(key, value)| (key.to_string(), value)).collect();
    details.set_error_info(reason, ERROR_DOMAIN, metadata);
    Status::with_error_details(code, message, details)
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Status {
        let message = error.to_string();
        match error {
            ApiError::Invalid(InvalidField { field, description }) => with_info(
                Code::InvalidArgument,
                message,
                "INVALID_FIELD",
                vec![("field", field.clone())],
                ErrorDetails::with_bad_request_violation(field, description),
            ),
            ApiError::BatchTooLarge { max, .. } => with_info(
                Code::InvalidArgument,
                message.clone(),
                "BATCH_TOO_LARGE",
                vec![("max_operations", max.to_string())],
                ErrorDetails::with_bad_request_violation("entries", message),
            ),
            ApiError::EmptyBatch => with_info(
                Code::InvalidArgument,
                message.clone(),
                "INVALID_FIELD",
                vec![("field", "entries".to_string())],
                ErrorDetails::with_bad_request_violation("entries", message),
            ),
            ApiError::Refused(refusal) => {
                let (code, reason, metadata) = classify(&refusal);
                with_info(code, message, reason, metadata, ErrorDetails::new())
            }
            ApiError::Ledger(LedgerError::Unavailable) => {
                with_info(Code::Unavailable, message, "JOURNAL_UNAVAILABLE", vec![], ErrorDetails::new())
            }
            ApiError::ConsumerTooSlow { resume_after_position, buffer_events } => with_info(
                Code::ResourceExhausted,
                message,
                "CONSUMER_TOO_SLOW",
                vec![
                    ("resume_after_position", resume_after_position.to_string()),
                    ("buffer_events", buffer_events.to_string()),
                ],
                ErrorDetails::new(),
            ),
            ApiError::ShuttingDown { resume_after_position } => with_info(
                Code::Unavailable,
                message,
                "SHUTTING_DOWN",
                vec![("resume_after_position", resume_after_position.to_string())],
                ErrorDetails::new(),
            ),
            ApiError::TooManyStreams { max } => with_info(
                Code::ResourceExhausted,
                message,
                "TOO_MANY_STREAMS",
                vec![("max_streams", max.to_string())],
                ErrorDetails::new(),
            ),
            ApiError::Events { source: OutboxError::Pruned { pruned_through, .. }, resume_after_position } => {
                with_info(
                    Code::OutOfRange,
                    message,
                    "EVENTS_PRUNED",
                    vec![
                        ("pruned_through", pruned_through.to_string()),
                        ("resume_after_position", resume_after_position.to_string()),
                    ],
                    ErrorDetails::new(),
                )
            }
            ApiError::Events { source, resume_after_position } if source.is_unavailable() => with_info(
                Code::Unavailable,
                message,
                "EVENTS_UNAVAILABLE",
                vec![("resume_after_position", resume_after_position.to_string())],
                ErrorDetails::new(),
            ),
            ApiError::Events { source, resume_after_position } => {
                tracing::error!(error = %source, resume_after_position, "reading events failed");
                with_info(
                    Code::Internal,
                    INTERNAL_MESSAGE.to_owned(),
                    "INTERNAL",
                    vec![("resume_after_position", resume_after_position.to_string())],
                    ErrorDetails::new(),
                )
            }
            ApiError::Ledger(other) => {
                tracing::error!(error = %other, "internal ledger failure");
                with_info(Code::Internal, INTERNAL_MESSAGE.to_owned(), "INTERNAL", vec![], ErrorDetails::new())
            }
            ApiError::Auth(refusal) => {
                let (code, reason, metadata) = match &refusal {
                    AuthError::MissingToken => (Code::Unauthenticated, "MISSING_TOKEN", vec![]),
                    AuthError::MalformedToken => (Code::Unauthenticated, "MALFORMED_TOKEN", vec![]),
                    AuthError::UnknownToken => (Code::Unauthenticated, "UNKNOWN_TOKEN", vec![]),
                    AuthError::OperationNotAllowed { service, operation } => (
                        Code::PermissionDenied,
                        "OPERATION_NOT_ALLOWED",
                        vec![("service", service.clone()), ("operation", operation.clone())],
                    ),
                    AuthError::DomainNotAllowed { service, domain } => (
                        Code::PermissionDenied,
                        "DOMAIN_NOT_ALLOWED",
                        vec![("service", service.clone()), ("domain", (*domain).to_owned())],
                    ),
                };
                with_info(code, message, reason, metadata, ErrorDetails::new())
            }
            ApiError::DeadlineExceeded { deadline_ms } => with_info(
                Code::DeadlineExceeded,
                message,
                "DEADLINE_EXCEEDED",
                vec![("deadline_ms", deadline_ms.to_string())],
                ErrorDetails::new(),
            ),
            ApiError::Overloaded { max_in_flight } => {
                let mut details = ErrorDetails::new();
                details.set_retry_info(Some(std::time::Duration::from_millis(OVERLOADED_RETRY_DELAY_MS)));
                with_info(
                    Code::ResourceExhausted,
                    message,
                    "OVERLOADED",
                    vec![("max_in_flight", max_in_flight.to_string())],
                    details,
                )
            }
            ApiError::InvalidWallet { field, error } => {
                let reason =
                    if error == AddressError::PrivateKey { "PRIVATE_KEY_REFUSED" } else { "INVALID_WALLET_ADDRESS" };
                let details = ErrorDetails::with_bad_request_violation(field.clone(), error.to_string());
                with_info(Code::InvalidArgument, message, reason, vec![("field", field)], details)
            }
            ApiError::Directory(error) => {
                let (code, reason, metadata) = classify_directory(&error);
                let message = if code == Code::Internal {
                    tracing::error!(%error, "internal directory failure");
                    INTERNAL_MESSAGE.to_owned()
                } else {
                    message
                };
                with_info(code, message, reason, metadata, ErrorDetails::new())
            }
            ApiError::TransactionNotFound { transaction_id } => with_info(
                Code::NotFound,
                message,
                "TRANSACTION_NOT_FOUND",
                vec![("transaction_id", transaction_id.to_string())],
                ErrorDetails::new(),
            ),
            ApiError::EventNotFound { event_source, event_id } => with_info(
                Code::NotFound,
                message,
                "PROVIDER_EVENT_NOT_FOUND",
                vec![("source", event_source), ("event_id", event_id)],
                ErrorDetails::new(),
            ),
            ApiError::EventNotRetryable { status } => with_info(
                Code::FailedPrecondition,
                message,
                "PROVIDER_EVENT_NOT_RETRYABLE",
                vec![("status", status)],
                ErrorDetails::new(),
            ),
            ApiError::Fees(FeeError::InvalidSchedule { version, .. }) => with_info(
                Code::FailedPrecondition,
                message,
                "FEE_SCHEDULE_INVALID",
                vec![("schedule_version", version.to_string())],
                ErrorDetails::new(),
            ),
            ApiError::Fees(FeeError::Overflow { .. }) => {
                with_info(Code::InvalidArgument, message, "FEES_OVERFLOW", vec![], ErrorDetails::new())
            }
            ApiError::Store(error) if error.is_unavailable() => {
                with_info(Code::Unavailable, message, "STORE_UNAVAILABLE", vec![], ErrorDetails::new())
            }
            ApiError::Store(_) | ApiError::Internal(_) => {
                tracing::error!(error = %message, "internal failure");
                with_info(Code::Internal, INTERNAL_MESSAGE.to_owned(), "INTERNAL", vec![], ErrorDetails::new())
            }
        }
    }
}

/// The google.rpc.Status form of a status, for a batch entry's result: the same code, message
/// and details a unary call would have carried.
pub fn to_rpc_status(status: &Status) -> tonic_types::pb::Status {
    use prost::Message;
    tonic_types::pb::Status::decode(status.details()).unwrap_or_else(|_| tonic_types::pb::Status {
        code: status.code() as i32,
        message: status.message().to_string(),
        details: Vec::new(),
    })
}

/// Gives tonic's own refusals of a request it cannot decode, raised before any handler or the
/// gate runs, the ErrorInfo every other refusal has:
/// - past the decoding limit (OUT_OF_RANGE): reason `MESSAGE_TOO_LARGE`, with the limit and the
///   size found;
/// - not a valid message of the method's type (a string that is not UTF-8, a wrong wire type, a
///   truncated field): tonic says INTERNAL, as gRPC's own libraries do, which tells a client the
///   fault is the server's and a retry may help. It is the client's bytes, so INVALID_ARGUMENT
///   with reason `MALFORMED_MESSAGE` and the decoder's description (field path and fault, never
///   the bytes themselves). Found in review, session 23.
///
/// Every other response passes through. Installed around the whole server (`api::server`) as a
/// `tower` response map.
pub fn explain_decoding_refusal<B: Default>(response: Response<B>) -> Response<B> {
    const TONIC_PREFIX: &str = "Error, decoded message length too large: found ";
    const PROST_PREFIX: &str = "failed to decode Protobuf message: ";
    let Some(status) = Status::from_header_map(response.headers()) else { return response };
    let explained = match status.code() {
        Code::OutOfRange => status.message().strip_prefix(TONIC_PREFIX).and_then(explain_oversized),
        Code::Internal => status.message().strip_prefix(PROST_PREFIX).map(|fault| {
            let message = format!("the request is not a valid protobuf message for this method: {fault}");
            with_info(Code::InvalidArgument, message, "MALFORMED_MESSAGE", Vec::new(), ErrorDetails::new())
        }),
        _ => None,
    };
    let Some(explained) = explained else { return response };
    let mut rewritten = explained.into_http::<B>();
    *rewritten.version_mut() = response.version();
    rewritten
}

/// The refusal of a message past the decoding limit, from tonic's "<found> bytes, the limit is:
/// <limit> bytes"; `None` if the text is not in that form.
fn explain_oversized(sizes: &str) -> Option<Status> {
    // "<found> bytes, the limit is: <limit> bytes"
    let numbers: Vec<&str> = sizes.split(|c: char| !c.is_ascii_digit()).filter(|part| !part.is_empty()).collect();
    let (found_bytes, limit_bytes) = match numbers.as_slice() {
        [found, limit] => (found.to_string(), limit.to_string()),
        _ => return None,
    };
    let message = format!("the request is {found_bytes} bytes, larger than this server accepts ({limit_bytes} bytes)");
    let metadata = vec![("limit_bytes", limit_bytes), ("found_bytes", found_bytes)];
    Some(with_info(Code::OutOfRange, message, "MESSAGE_TOO_LARGE", metadata, ErrorDetails::new()))
}
