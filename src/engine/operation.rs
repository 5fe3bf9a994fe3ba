//! What callers ask the engine to do, and what it answers when it succeeds.
//!
//! An `Operation` is the whole business intent, already validated at the edge into domain
//! types (amounts are positive and within range, assets exist). It is compared for equality
//! by the idempotency store, so it carries no clock: the time of a request travels beside it
//! in `Request::now_ms`.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::account::{AccountConfig, AccountRef, Provider, UserAccount};
use super::idempotency::IdempotencyKey;
use super::money::Amount;
use super::transaction::{ComplianceRecord, Fill, KycStatus, NewTransaction, ProviderRef, RiskLevel, TxStatus};

/// The most operations a linked batch may hold.
pub const MAX_BATCH_OPERATIONS: usize = 8_192;

/// Reservation lifetime when the caller does not choose one: 30 minutes.
pub const DEFAULT_RESERVATION_TTL_MS: i64 = 30 * 60 * 1_000;

/// The longest a reservation may live: 7 days.
pub const MAX_RESERVATION_TTL_MS: i64 = 7 * 24 * 60 * 60 * 1_000;

/// The most Active reservations one user may hold at once (transactions' included). Reservations
/// live up to `MAX_RESERVATION_TTL_MS`, far longer than the idempotency keys that bound how fast
/// they arrive, so without this one caller could pile up reservations without end; and a user's
/// active reservations sit in one map the user's every request touches.
pub const MAX_ACTIVE_RESERVATIONS_PER_USER: usize = 4_096;

/// The most unfinished transactions one user may have at once. A transaction waits on its
/// provider for as long as it takes, so nothing else bounds how many stay in memory; a
/// finished one is forgotten after the retention window.
pub const MAX_UNFINISHED_TRANSACTIONS_PER_USER: usize = 4_096;

/// Commission on a conversion is given in basis points, at most 100% (10 000).
pub const MAX_COMMISSION_BPS: u32 = 10_000;

/// One request to the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub key: IdempotencyKey,
    /// The caller's clock, UTC milliseconds since the Unix epoch. The engine never reads a clock.
    pub now_ms: i64,
    pub operation: Operation,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "op", content = "data", rename_all = "snake_case")]
pub enum Operation {
    /// Creates a user account with its settings; every other operation needs the account to exist.
    OpenAccount { account: UserAccount, config: AccountConfig },
    /// Freezes (no money may leave) or unfreezes an account.
    SetFrozen { account: UserAccount, frozen: bool },
    /// Money arrives from outside through a provider: provider clearing -> user.
    Deposit { account: UserAccount, amount: Amount, provider: Provider },
    /// Money leaves to the outside through a provider: user -> provider clearing.
    Withdraw { account: UserAccount, amount: Amount, provider: Provider },
    /// Moves `amount` from available to reserved under a caller-chosen id, unique per user.
    /// `ttl_ms` of `None` means [`DEFAULT_RESERVATION_TTL_MS`].
    Reserve { reservation_id: Uuid, account: UserAccount, amount: Amount, ttl_ms: Option<i64> },
    /// Completes a reservation: `amount` (the whole reservation if `None`) goes to `destination`,
    /// the rest returns to available.
    Commit { user_id: Uuid, reservation_id: Uuid, destination: AccountRef, amount: Option<Amount> },
    /// Returns a reservation's whole amount to available.
    Release { user_id: Uuid, reservation_id: Uuid },
    /// Moves money between two accounts of the same asset.
    Transfer { from: AccountRef, to: AccountRef, amount: Amount },
    /// Sells `amount` of `from`'s asset for `to`'s asset at `price` (units of `to`'s asset per unit
    /// of `from`'s), through exchange liquidity; `commission_bps` of the proceeds go to platform fees.
    Convert { from: UserAccount, to: UserAccount, amount: Amount, price: Decimal, commission_bps: u32 },
    /// Records a new business transaction in status Initiated (see `lifecycle`).
    InitiateTransaction { transaction: Box<NewTransaction> },
    /// Moves a transaction to `to` if the lifecycle table allows it, with the money movement that
    /// status implies. `payee_user_id` names the other user a completion pays (so the engine can
    /// lock that user's shard); it must match the transaction's payee.
    TransitionTransaction {
        user_id: Uuid,
        transaction_id: Uuid,
        to: TxStatus,
        reason: String,
        provider_event: Option<ProviderRef>,
        fill: Option<Fill>,
        payee_user_id: Option<Uuid>,
    },
    /// Sets the KYC status and risk level the compliance gate reads for a user.
    SetCompliance { user_id: Uuid, record: ComplianceRecord },
    /// Sets the KYC status and risk level and keeps the user's per-transaction limit (none for a
    /// user without a record): what the Directory's KYC updates feed the gate.
    SetKyc { user_id: Uuid, kyc: KycStatus, risk: RiskLevel },
    /// Applies every operation in order, each seeing the effects of the ones before, or none.
    LinkedBatch { operations: Vec<Operation> },
}

/// What a successful operation reports back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "receipt", content = "data", rename_all = "snake_case")]
pub enum Receipt {
    Done,
    Reserved {
        expires_at_ms: i64,
    },
    Committed {
        committed_minor: i128,
        released_minor: i128,
    },
    Released {
        released_minor: i128,
    },
    Converted {
        sold_minor: i128,
        bought_minor: i128,
        commission_minor: i128,
    },
    Batch {
        receipts: Vec<Receipt>,
    },
    /// A transaction's status after the operation (a failed compliance gate ends in Failed).
    Transaction {
        status: TxStatus,
    },
}
