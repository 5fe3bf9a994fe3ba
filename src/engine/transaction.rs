//! Business transactions: the record of one Banking, Investing or DeFi operation as it moves
//! through its lifecycle, and the user compliance record its gate reads.
//!
//! A transaction lives in its user's shard beside the user's accounts, so every status change
//! locks the same shard as the postings it causes and is journaled in the same record. The
//! transaction says where its principal comes from (`payer`) and goes (`payee`), its fees
//! (computed at the edge by `fees`, frozen here so replay never recomputes them) and, for trades,
//! the account the bought asset lands in. The legal moves between statuses are in `lifecycle`.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::account::{AccountRef, Domain, FeeTier, SystemAccount, UserAccount};

/// The longest free-text reason or detail value kept on a transaction, in bytes.
pub const MAX_TEXT_LEN: usize = 512;

/// The most detail entries (order type, protocol, chain data...) one transaction carries.
pub const MAX_DETAILS: usize = 32;

/// The most fee lines one transaction carries (one per tier).
pub const MAX_FEE_LINES: usize = FeeTier::ALL.len();

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TxStatus {
    Initiated,
    Validating,
    BalanceReserved,
    SentToProvider,
    ProviderProcessing,
    ProviderConfirming,
    Completed,
    Failed,
    Compensating,
    Compensated,
}

impl TxStatus {
    pub const ALL: [TxStatus; 10] = [
        TxStatus::Initiated,
        TxStatus::Validating,
        TxStatus::BalanceReserved,
        TxStatus::SentToProvider,
        TxStatus::ProviderProcessing,
        TxStatus::ProviderConfirming,
        TxStatus::Completed,
        TxStatus::Failed,
        TxStatus::Compensating,
        TxStatus::Compensated,
    ];

    pub fn name(self) -> &'static str {
        match self {
            TxStatus::Initiated => "initiated",
            TxStatus::Validating => "validating",
            TxStatus::BalanceReserved => "balance_reserved",
            TxStatus::SentToProvider => "sent_to_provider",
            TxStatus::ProviderProcessing => "provider_processing",
            TxStatus::ProviderConfirming => "provider_confirming",
            TxStatus::Completed => "completed",
            TxStatus::Failed => "failed",
            TxStatus::Compensating => "compensating",
            TxStatus::Compensated => "compensated",
        }
    }

    pub fn from_name(name: &str) -> Option<TxStatus> {
        TxStatus::ALL.into_iter().find(|status| status.name() == name)
    }

    /// Whether the engine keeps the transaction only for the retention window from here on.
    /// Completed is finished too: it can still be compensated while it is remembered.
    pub fn is_finished(self) -> bool {
        matches!(self, TxStatus::Completed | TxStatus::Failed | TxStatus::Compensated)
    }

    /// Whether the transaction has been handed to its provider and not yet completed or failed.
    /// Its reservation then no longer expires: the provider may be paying the money out, so the
    /// funds must stay held until completion posts them or a failure releases them.
    pub fn is_with_provider(self) -> bool {
        matches!(self, TxStatus::SentToProvider | TxStatus::ProviderProcessing | TxStatus::ProviderConfirming)
    }
}

/// What the user asked for. The domain is implied by the type (Transfer exists in two).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TxType {
    AddMoney,
    SendMoney,
    Withdraw,
    Transfer,
    BuyCrypto,
    SellCrypto,
    Convert,
    StartStrategy,
    StopStrategy,
    HarvestYield,
}

impl TxType {
    pub const ALL: [TxType; 10] = [
        TxType::AddMoney,
        TxType::SendMoney,
        TxType::Withdraw,
        TxType::Transfer,
        TxType::BuyCrypto,
        TxType::SellCrypto,
        TxType::Convert,
        TxType::StartStrategy,
        TxType::StopStrategy,
        TxType::HarvestYield,
    ];

    pub fn name(self) -> &'static str {
        match self {
            TxType::AddMoney => "add_money",
            TxType::SendMoney => "send_money",
            TxType::Withdraw => "withdraw",
            TxType::Transfer => "transfer",
            TxType::BuyCrypto => "buy_crypto",
            TxType::SellCrypto => "sell_crypto",
            TxType::Convert => "convert",
            TxType::StartStrategy => "start_strategy",
            TxType::StopStrategy => "stop_strategy",
            TxType::HarvestYield => "harvest_yield",
        }
    }

    pub fn from_name(name: &str) -> Option<TxType> {
        TxType::ALL.into_iter().find(|kind| kind.name() == name)
    }

    /// Whether this type buys one asset with another: it alone has a leg for the bought asset.
    pub fn is_trade(self) -> bool {
        matches!(self, TxType::BuyCrypto | TxType::SellCrypto | TxType::Convert)
    }

    /// Whether a transaction of this type may belong to `domain`.
    pub fn allowed_in(self, domain: Domain) -> bool {
        match self {
            TxType::AddMoney | TxType::SendMoney | TxType::Withdraw => domain == Domain::Banking,
            TxType::Transfer => matches!(domain, Domain::Banking | Domain::Investing),
            TxType::BuyCrypto | TxType::SellCrypto | TxType::Convert => domain == Domain::Investing,
            TxType::StartStrategy | TxType::StopStrategy | TxType::HarvestYield => domain == Domain::Defi,
        }
    }
}

/// How a fee line was computed (for the record; the amount is what counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeeMethod {
    Percentage,
    Flat,
    Tiered,
}

impl FeeMethod {
    pub fn name(self) -> &'static str {
        match self {
            FeeMethod::Percentage => "percentage",
            FeeMethod::Flat => "flat",
            FeeMethod::Tiered => "tiered",
        }
    }
}

/// One fee of a transaction, in minor units of the principal's asset.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FeeLine {
    pub tier: FeeTier,
    /// What the fee is for, as the schedule names it (e.g. "card_processing", "gas").
    pub category: String,
    pub method: FeeMethod,
    pub amount_minor: i128,
    /// The provider the fee is paid for (provider and network tiers), if any.
    pub provider: Option<String>,
    /// The fee schedule version the fee was priced with.
    pub schedule_version: i64,
}

/// A provider update that caused a status change.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ProviderRef {
    pub source: String,
    pub event_id: String,
}

/// The execution of a trade, reported when it fills: how much of the bought asset arrives.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Fill {
    pub price: Decimal,
    pub quantity_minor: i128,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KycStatus {
    NotStarted,
    Pending,
    Verified,
    Rejected,
}

impl KycStatus {
    pub const ALL: [KycStatus; 4] =
        [KycStatus::NotStarted, KycStatus::Pending, KycStatus::Verified, KycStatus::Rejected];

    pub fn name(self) -> &'static str {
        match self {
            KycStatus::NotStarted => "not_started",
            KycStatus::Pending => "pending",
            KycStatus::Verified => "verified",
            KycStatus::Rejected => "rejected",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RiskLevel {
    Low,
    Medium,
    High,
}

impl RiskLevel {
    pub const ALL: [RiskLevel; 3] = [RiskLevel::Low, RiskLevel::Medium, RiskLevel::High];

    pub fn name(self) -> &'static str {
        match self {
            RiskLevel::Low => "low",
            RiskLevel::Medium => "medium",
            RiskLevel::High => "high",
        }
    }
}

/// What the ledger knows of a user's compliance: set whole by `SetCompliance`, its KYC status
/// and risk level by the Directory's KYC updates (`SetKyc`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ComplianceRecord {
    pub kyc: KycStatus,
    pub risk: RiskLevel,
    /// The most one transaction of this user may move, in minor units of its asset; `None`: no cap.
    pub max_transaction_minor: Option<i128>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AmlStatus {
    Cleared,
    Review,
    Rejected,
}

impl AmlStatus {
    pub fn name(self) -> &'static str {
        match self {
            AmlStatus::Cleared => "cleared",
            AmlStatus::Review => "review",
            AmlStatus::Rejected => "rejected",
        }
    }
}

/// The compliance gate's verdict, recorded on the transaction when it leaves Validating.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AmlResult {
    pub status: AmlStatus,
    /// 0..=100.
    pub risk_score: u8,
    pub flags: Vec<String>,
}

/// A transaction as the caller describes it at initiation (already validated at the edge).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NewTransaction {
    pub id: Uuid,
    pub user_id: Uuid,
    pub domain: Domain,
    pub kind: TxType,
    /// Where the principal comes from: the user's account (reserved at BalanceReserved), or a
    /// system account for money arriving from outside (nothing to reserve).
    pub payer: AccountRef,
    /// Where the principal goes at completion.
    pub payee: AccountRef,
    pub principal_minor: i128,
    pub fees: Vec<FeeLine>,
    /// For trades: the system account the bought asset comes from and the user account it lands in.
    pub receive: Option<(SystemAccount, UserAccount)>,
    pub provider: Option<String>,
    pub details: BTreeMap<String, String>,
}

/// A transaction as the engine holds it. Its reservation, if the payer is a user account, has
/// the transaction's id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transaction {
    pub spec: NewTransaction,
    pub status: TxStatus,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub aml: Option<AmlResult>,
    pub fill: Option<Fill>,
}

impl NewTransaction {
    /// The fee lines summed, saturating: lines come from the caller, and a sum that wrapped
    /// could pass the engine's `principal + fees <= MAX_AMOUNT_MINOR` check.
    pub fn fees_total_minor(&self) -> i128 {
        self.fees.iter().fold(0, |total_minor, line| total_minor.saturating_add(line.amount_minor))
    }

    /// The user account debited and reserved, if the principal leaves one.
    pub fn paying_account(&self) -> Option<UserAccount> {
        match self.payer {
            AccountRef::User(account) => Some(account),
            AccountRef::System(_) => None,
        }
    }

    /// What the user account on the paying side is reserved for: principal plus fees.
    pub fn reserve_minor(&self) -> i128 {
        self.principal_minor.saturating_add(self.fees_total_minor())
    }
}
