//! Who owns a balance: user accounts, the platform's system accounts, and their settings.
//!
//! A user account is `(user_id, domain, asset)`. A system account is `(kind, asset)` and is
//! the other side of every deposit, withdrawal, fee and conversion. Because system accounts
//! take part in almost every operation, the engine keeps one sub-account of each per shard and
//! sums them when read, so a deposit to a user locks only that user's shard.

use std::fmt;
use std::hash::{Hash, Hasher};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::asset::Asset;

/// The three business domains; each user balance belongs to exactly one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Domain {
    Banking,
    Investing,
    Defi,
}

impl Domain {
    pub const ALL: [Domain; 3] = [Domain::Banking, Domain::Investing, Domain::Defi];

    pub fn name(self) -> &'static str {
        match self {
            Domain::Banking => "banking",
            Domain::Investing => "investing",
            Domain::Defi => "defi",
        }
    }

    /// The domain named by [`Domain::name`].
    pub fn parse(name: &str) -> Option<Domain> {
        Domain::ALL.into_iter().find(|domain| domain.name() == name)
    }
}

/// Payment providers money enters and leaves through; each has a clearing account per asset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Stripe,
    Moonpay,
    Ramp,
}

impl Provider {
    pub const ALL: [Provider; 3] = [Provider::Stripe, Provider::Moonpay, Provider::Ramp];
}

/// The five fee tiers; fee revenue is kept per tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FeeTier {
    Platform,
    Provider,
    Network,
    Compliance,
    Premium,
}

impl FeeTier {
    pub const ALL: [FeeTier; 5] =
        [FeeTier::Platform, FeeTier::Provider, FeeTier::Network, FeeTier::Compliance, FeeTier::Premium];
}

/// DeFi protocols the platform holds positions in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Uniswap,
    Aave,
    Compound,
    Lido,
}

impl Protocol {
    pub const ALL: [Protocol; 4] = [Protocol::Uniswap, Protocol::Aave, Protocol::Compound, Protocol::Lido];
}

/// What a system account is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", content = "of", rename_all = "snake_case")]
pub enum SystemKind {
    /// Money in transit with a payment provider: debited by deposits, credited by withdrawals.
    ProviderClearing(Provider),
    /// Fees the platform has earned, per tier.
    FeeRevenue(FeeTier),
    /// The platform's inventory that conversions swap against.
    ExchangeLiquidity,
    /// Funds deployed into a DeFi protocol.
    ProtocolPosition(Protocol),
}

impl SystemKind {
    /// Every system kind, in a fixed order (the index of a kind into per-shard tables).
    pub fn all() -> impl Iterator<Item = SystemKind> {
        Provider::ALL
            .into_iter()
            .map(SystemKind::ProviderClearing)
            .chain(FeeTier::ALL.into_iter().map(SystemKind::FeeRevenue))
            .chain(std::iter::once(SystemKind::ExchangeLiquidity))
            .chain(Protocol::ALL.into_iter().map(SystemKind::ProtocolPosition))
    }

    pub const COUNT: usize = Provider::ALL.len() + FeeTier::ALL.len() + 1 + Protocol::ALL.len();

    pub fn index(self) -> usize {
        match self {
            SystemKind::ProviderClearing(provider) => provider as usize,
            SystemKind::FeeRevenue(tier) => Provider::ALL.len() + tier as usize,
            SystemKind::ExchangeLiquidity => Provider::ALL.len() + FeeTier::ALL.len(),
            SystemKind::ProtocolPosition(protocol) => Provider::ALL.len() + FeeTier::ALL.len() + 1 + protocol as usize,
        }
    }
}

/// A user's balance in one domain and asset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct UserAccount {
    pub user_id: Uuid,
    pub domain: Domain,
    pub asset: Asset,
}

/// Two words for the hasher instead of one per field: every request's idempotency fingerprint
/// hashes the accounts it names. Hashes the same fields the derived equality compares.
impl Hash for UserAccount {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u128(self.user_id.as_u128());
        state.write_u16(u16::from(self.domain as u8) << 8 | u16::from(self.asset.index() as u8));
    }
}

/// A platform account in one asset. System accounts have no floor: clearing accounts go
/// negative as money enters the platform, which is what keeps every asset summing to zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SystemAccount {
    pub kind: SystemKind,
    pub asset: Asset,
}

/// Either side of a posting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountRef {
    User(UserAccount),
    System(SystemAccount),
}

impl AccountRef {
    pub fn asset(self) -> Asset {
        match self {
            AccountRef::User(account) => account.asset,
            AccountRef::System(account) => account.asset,
        }
    }
}

impl fmt::Display for AccountRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AccountRef::User(account) => {
                write!(f, "user {} {} {}", account.user_id, account.domain.name(), account.asset)
            }
            AccountRef::System(account) => write!(f, "system {:?} {}", account.kind, account.asset),
        }
    }
}

/// Caps on what may leave an account. Each is optional; windows are UTC calendar days and months.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct OutflowLimits {
    pub per_transaction_minor: Option<i128>,
    pub daily_minor: Option<i128>,
    pub monthly_minor: Option<i128>,
}

/// Settings chosen when an account is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct AccountConfig {
    /// How far `available` may go below zero; zero means no overdraft.
    pub overdraft_minor: i128,
    pub limits: OutflowLimits,
    pub frozen: bool,
}

/// The three numbers every account reports. `total = available + reserved` always.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Balance {
    pub available_minor: i128,
    pub reserved_minor: i128,
}

impl Balance {
    pub fn total_minor(self) -> i128 {
        self.available_minor + self.reserved_minor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_kind_indexes_are_dense_and_unique() {
        let indexes: Vec<usize> = SystemKind::all().map(SystemKind::index).collect();
        assert_eq!(indexes, (0..SystemKind::COUNT).collect::<Vec<_>>());
    }
}
