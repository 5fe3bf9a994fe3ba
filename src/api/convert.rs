//! Wire <-> domain conversion: the only place a protobuf message becomes an engine `Operation`.
//!
//! Everything a client sends is checked here before the engine sees it: ids must be canonical
//! UUIDs, assets must be registry symbols, amounts must parse exactly at the asset's scale
//! (`Amount::parse` never rounds), enums must be known and not UNSPECIFIED, required messages
//! must be present, and every string is bounded. A refusal is an [`InvalidField`] naming the
//! field by its path in the request (e.g. `operation.account.user_id`), which `status` turns
//! into INVALID_ARGUMENT with a google.rpc.BadRequest. Nothing here touches the ledger, so a
//! refused request changes nothing.

use rust_decimal::Decimal;
use thiserror::Error;
use uuid::Uuid;

use super::pb;
use crate::engine::account::{
    AccountConfig, AccountRef, Balance, Domain, FeeTier, OutflowLimits, Protocol, Provider, SystemAccount, SystemKind,
    UserAccount,
};
use crate::engine::asset::{Asset, Chain};
use crate::engine::idempotency::IdempotencyKey;
use crate::engine::money::{Amount, format_minor, parse_minor};
use crate::engine::operation::{MAX_COMMISSION_BPS, MAX_RESERVATION_TTL_MS, Operation, Receipt};
use crate::engine::state::AccountView;
use crate::engine::summary::UserSummary;

/// The length of a canonical hyphenated UUID; other spellings are refused so ids compare as text.
const UUID_TEXT_LEN: usize = 36;

/// The longest asset symbol in the registry is 13 bytes; anything past this is refused unread.
const MAX_ASSET_SYMBOL_LEN: usize = 32;

/// The longest price text accepted (a `Decimal` has at most 28 significant digits).
const MAX_PRICE_TEXT_LEN: usize = 64;

/// A field of the request that cannot be accepted, and why.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{field}: {description}")]
pub struct InvalidField {
    /// The field's path in the request, e.g. `entries[2].single.deposit.amount`.
    pub field: String,
    pub description: String,
}

fn invalid(field: &str, description: impl Into<String>) -> InvalidField {
    InvalidField { field: field.to_string(), description: description.into() }
}

fn path(prefix: &str, name: &str) -> String {
    if prefix.is_empty() { name.to_string() } else { format!("{prefix}.{name}") }
}

fn required<'a, T>(value: Option<&'a T>, field: &str) -> Result<&'a T, InvalidField> {
    value.ok_or_else(|| invalid(field, "is required"))
}

pub fn idempotency_key(text: &str, field: &str) -> Result<IdempotencyKey, InvalidField> {
    IdempotencyKey::new(text).map_err(|error| invalid(field, error.to_string()))
}

pub fn uuid(text: &str, field: &str) -> Result<Uuid, InvalidField> {
    if text.is_empty() {
        return Err(invalid(field, "is required"));
    }
    if text.len() != UUID_TEXT_LEN {
        return Err(invalid(field, "must be a UUID in canonical hyphenated form"));
    }
    Uuid::try_parse(text).map_err(|_| invalid(field, "must be a UUID in canonical hyphenated form"))
}

pub fn asset(symbol: &str, field: &str) -> Result<Asset, InvalidField> {
    if symbol.is_empty() {
        return Err(invalid(field, "is required"));
    }
    if symbol.len() > MAX_ASSET_SYMBOL_LEN {
        return Err(invalid(field, format!("is longer than {MAX_ASSET_SYMBOL_LEN} bytes")));
    }
    Asset::from_symbol(symbol).ok_or_else(|| invalid(field, "is not a known asset symbol"))
}

fn amount(text: &str, asset: Asset, field: &str) -> Result<Amount, InvalidField> {
    Amount::parse(text, asset).map_err(|error| invalid(field, error.to_string()))
}

/// An enum value: unknown numbers and UNSPECIFIED (`None` from `from_wire`) are both refused.
fn known<W: TryFrom<i32>, D>(
    value: i32,
    field: &str,
    from_wire: impl FnOnce(W) -> Option<D>,
) -> Result<D, InvalidField> {
    W::try_from(value).ok().and_then(from_wire).ok_or_else(|| invalid(field, "must be a known, specified value"))
}

pub(super) fn domain(value: i32, field: &str) -> Result<Domain, InvalidField> {
    known(value, field, |wire: pb::Domain| match wire {
        pb::Domain::Unspecified => None,
        pb::Domain::Banking => Some(Domain::Banking),
        pb::Domain::Investing => Some(Domain::Investing),
        pb::Domain::Defi => Some(Domain::Defi),
    })
}

pub(super) fn provider(value: i32, field: &str) -> Result<Provider, InvalidField> {
    known(value, field, |wire: pb::Provider| match wire {
        pb::Provider::Unspecified => None,
        pb::Provider::Stripe => Some(Provider::Stripe),
        pb::Provider::Moonpay => Some(Provider::Moonpay),
        pb::Provider::Ramp => Some(Provider::Ramp),
    })
}

fn system_kind(value: i32, field: &str) -> Result<SystemKind, InvalidField> {
    use pb::SystemAccountKind as Wire;
    known(value, field, |wire: Wire| match wire {
        Wire::Unspecified => None,
        Wire::ClearingStripe => Some(SystemKind::ProviderClearing(Provider::Stripe)),
        Wire::ClearingMoonpay => Some(SystemKind::ProviderClearing(Provider::Moonpay)),
        Wire::ClearingRamp => Some(SystemKind::ProviderClearing(Provider::Ramp)),
        Wire::FeesPlatform => Some(SystemKind::FeeRevenue(FeeTier::Platform)),
        Wire::FeesProvider => Some(SystemKind::FeeRevenue(FeeTier::Provider)),
        Wire::FeesNetwork => Some(SystemKind::FeeRevenue(FeeTier::Network)),
        Wire::FeesCompliance => Some(SystemKind::FeeRevenue(FeeTier::Compliance)),
        Wire::FeesPremium => Some(SystemKind::FeeRevenue(FeeTier::Premium)),
        Wire::ExchangeLiquidity => Some(SystemKind::ExchangeLiquidity),
        Wire::ProtocolUniswap => Some(SystemKind::ProtocolPosition(Protocol::Uniswap)),
        Wire::ProtocolAave => Some(SystemKind::ProtocolPosition(Protocol::Aave)),
        Wire::ProtocolCompound => Some(SystemKind::ProtocolPosition(Protocol::Compound)),
        Wire::ProtocolLido => Some(SystemKind::ProtocolPosition(Protocol::Lido)),
    })
}

pub fn user_account(wire: Option<&pb::UserAccount>, field: &str) -> Result<UserAccount, InvalidField> {
    let wire = required(wire, field)?;
    Ok(UserAccount {
        user_id: uuid(&wire.user_id, &path(field, "user_id"))?,
        domain: domain(wire.domain, &path(field, "domain"))?,
        asset: asset(&wire.asset, &path(field, "asset"))?,
    })
}

fn account_ref(wire: Option<&pb::AccountRef>, field: &str) -> Result<AccountRef, InvalidField> {
    match &required(wire, field)?.account {
        Some(pb::account_ref::Account::User(user)) => {
            Ok(AccountRef::User(user_account(Some(user), &path(field, "user"))?))
        }
        Some(pb::account_ref::Account::System(system)) => Ok(AccountRef::System(SystemAccount {
            kind: system_kind(system.kind, &path(field, "system.kind"))?,
            asset: asset(&system.asset, &path(field, "system.asset"))?,
        })),
        None => Err(invalid(field, "must name a user or a system account")),
    }
}

fn optional_limit(text: Option<&String>, asset: Asset, field: &str) -> Result<Option<i128>, InvalidField> {
    text.map(|text| amount(text, asset, field).map(Amount::minor)).transpose()
}

fn open_account(wire: &pb::OpenAccount, field: &str) -> Result<Operation, InvalidField> {
    let account = user_account(wire.account.as_ref(), &path(field, "account"))?;
    let overdraft_minor = if wire.overdraft.is_empty() {
        0
    } else {
        parse_minor(&wire.overdraft, account.asset)
            .map_err(|error| invalid(&path(field, "overdraft"), error.to_string()))?
    };
    let limits = match &wire.limits {
        None => OutflowLimits::default(),
        Some(limits) => OutflowLimits {
            per_transaction_minor: optional_limit(
                limits.per_transaction.as_ref(),
                account.asset,
                &path(field, "limits.per_transaction"),
            )?,
            daily_minor: optional_limit(limits.daily.as_ref(), account.asset, &path(field, "limits.daily"))?,
            monthly_minor: optional_limit(limits.monthly.as_ref(), account.asset, &path(field, "limits.monthly"))?,
        },
    };
    Ok(Operation::OpenAccount { account, config: AccountConfig { overdraft_minor, limits, frozen: wire.frozen } })
}

fn set_frozen(wire: &pb::SetFrozen, field: &str) -> Result<Operation, InvalidField> {
    Ok(Operation::SetFrozen {
        account: user_account(wire.account.as_ref(), &path(field, "account"))?,
        frozen: wire.frozen,
    })
}

fn deposit(wire: &pb::Deposit, field: &str) -> Result<Operation, InvalidField> {
    let account = user_account(wire.account.as_ref(), &path(field, "account"))?;
    Ok(Operation::Deposit {
        account,
        amount: amount(&wire.amount, account.asset, &path(field, "amount"))?,
        provider: provider(wire.provider, &path(field, "provider"))?,
    })
}

fn withdraw(wire: &pb::Withdraw, field: &str) -> Result<Operation, InvalidField> {
    let account = user_account(wire.account.as_ref(), &path(field, "account"))?;
    Ok(Operation::Withdraw {
        account,
        amount: amount(&wire.amount, account.asset, &path(field, "amount"))?,
        provider: provider(wire.provider, &path(field, "provider"))?,
    })
}

fn reserve(wire: &pb::Reserve, field: &str) -> Result<Operation, InvalidField> {
    let reservation_id = uuid(&wire.reservation_id, &path(field, "reservation_id"))?;
    let account = user_account(wire.account.as_ref(), &path(field, "account"))?;
    let ttl_ms = wire.ttl_ms;
    if ttl_ms.is_some_and(|ttl_ms| !(1..=MAX_RESERVATION_TTL_MS).contains(&ttl_ms)) {
        return Err(invalid(&path(field, "ttl_ms"), format!("must be between 1 and {MAX_RESERVATION_TTL_MS} ms")));
    }
    Ok(Operation::Reserve {
        reservation_id,
        account,
        amount: amount(&wire.amount, account.asset, &path(field, "amount"))?,
        ttl_ms,
    })
}

fn commit(wire: &pb::Commit, field: &str) -> Result<Operation, InvalidField> {
    let user_id = uuid(&wire.user_id, &path(field, "user_id"))?;
    let reservation_id = uuid(&wire.reservation_id, &path(field, "reservation_id"))?;
    let destination = account_ref(wire.destination.as_ref(), &path(field, "destination"))?;
    // The destination must hold the reservation's asset (the engine checks), so its scale is the amount's.
    let amount =
        wire.amount.as_ref().map(|text| amount(text, destination.asset(), &path(field, "amount"))).transpose()?;
    Ok(Operation::Commit { user_id, reservation_id, destination, amount })
}

fn release(wire: &pb::Release, field: &str) -> Result<Operation, InvalidField> {
    Ok(Operation::Release {
        user_id: uuid(&wire.user_id, &path(field, "user_id"))?,
        reservation_id: uuid(&wire.reservation_id, &path(field, "reservation_id"))?,
    })
}

fn transfer(wire: &pb::Transfer, field: &str) -> Result<Operation, InvalidField> {
    let from = account_ref(wire.from.as_ref(), &path(field, "from"))?;
    let to = account_ref(wire.to.as_ref(), &path(field, "to"))?;
    Ok(Operation::Transfer { from, to, amount: amount(&wire.amount, from.asset(), &path(field, "amount"))? })
}

/// A price: plain positive decimal digits, like an amount but with `Decimal`'s own precision.
pub(super) fn price(text: &str, field: &str) -> Result<Decimal, InvalidField> {
    if text.is_empty() {
        return Err(invalid(field, "is required"));
    }
    if text.len() > MAX_PRICE_TEXT_LEN {
        return Err(invalid(field, format!("is longer than {MAX_PRICE_TEXT_LEN} bytes")));
    }
    let (whole, fraction) = text.split_once('.').unwrap_or((text, "0"));
    let all_digits = |part: &str| !part.is_empty() && part.bytes().all(|byte| byte.is_ascii_digit());
    if !all_digits(whole) || !all_digits(fraction) {
        return Err(invalid(field, "must be plain decimal digits (no sign, exponent, spaces or separators)"));
    }
    let price = Decimal::from_str_exact(text).map_err(|_| invalid(field, "has more precision than 28 digits"))?;
    if price <= Decimal::ZERO {
        return Err(invalid(field, "must be greater than zero"));
    }
    Ok(price)
}

fn convert(wire: &pb::Convert, field: &str) -> Result<Operation, InvalidField> {
    let from = user_account(wire.from.as_ref(), &path(field, "from"))?;
    let to = user_account(wire.to.as_ref(), &path(field, "to"))?;
    if wire.commission_bps > MAX_COMMISSION_BPS {
        return Err(invalid(&path(field, "commission_bps"), format!("must be at most {MAX_COMMISSION_BPS}")));
    }
    Ok(Operation::Convert {
        from,
        to,
        amount: amount(&wire.amount, from.asset, &path(field, "amount"))?,
        price: price(&wire.price, &path(field, "price"))?,
        commission_bps: wire.commission_bps,
    })
}

/// The operation inside a unary request (`operation`, required).
pub fn open_account_request(wire: &pb::OpenAccountRequest) -> Result<Operation, InvalidField> {
    open_account(required(wire.operation.as_ref(), "operation")?, "operation")
}
pub fn set_frozen_request(wire: &pb::SetFrozenRequest) -> Result<Operation, InvalidField> {
    set_frozen(required(wire.operation.as_ref(), "operation")?, "operation")
}
pub fn deposit_request(wire: &pb::DepositRequest) -> Result<Operation, InvalidField> {
    deposit(required(wire.operation.as_ref(), "operation")?, "operation")
}
pub fn withdraw_request(wire: &pb::WithdrawRequest) -> Result<Operation, InvalidField> {
    withdraw(required(wire.operation.as_ref(), "operation")?, "operation")
}
pub fn reserve_request(wire: &pb::ReserveRequest) -> Result<Operation, InvalidField> {
    reserve(required(wire.operation.as_ref(), "operation")?, "operation")
}
pub fn commit_request(wire: &pb::CommitRequest) -> Result<Operation, InvalidField> {
    commit(required(wire.operation.as_ref(), "operation")?, "operation")
}
pub fn release_request(wire: &pb::ReleaseRequest) -> Result<Operation, InvalidField> {
    release(required(wire.operation.as_ref(), "operation")?, "operation")
}
pub fn transfer_request(wire: &pb::TransferRequest) -> Result<Operation, InvalidField> {
    transfer(required(wire.operation.as_ref(), "operation")?, "operation")
}
pub fn convert_request(wire: &pb::ConvertRequest) -> Result<Operation, InvalidField> {
    convert(required(wire.operation.as_ref(), "operation")?, "operation")
}

fn operation(wire: &pb::Operation, field: &str) -> Result<Operation, InvalidField> {
    use pb::operation::Kind;
    match &wire.kind {
        Some(Kind::OpenAccount(body)) => open_account(body, &path(field, "open_account")),
        Some(Kind::SetFrozen(body)) => set_frozen(body, &path(field, "set_frozen")),
        Some(Kind::Deposit(body)) => deposit(body, &path(field, "deposit")),
        Some(Kind::Withdraw(body)) => withdraw(body, &path(field, "withdraw")),
        Some(Kind::Reserve(body)) => reserve(body, &path(field, "reserve")),
        Some(Kind::Commit(body)) => commit(body, &path(field, "commit")),
        Some(Kind::Release(body)) => release(body, &path(field, "release")),
        Some(Kind::Transfer(body)) => transfer(body, &path(field, "transfer")),
        Some(Kind::Convert(body)) => convert(body, &path(field, "convert")),
        None => Err(invalid(field, "must hold one operation")),
    }
}

/// How many engine operations a batch entry holds (one, or the size of its linked group).
pub fn entry_operation_count(entry: &pb::BatchEntry) -> usize {
    match &entry.kind {
        Some(pb::batch_entry::Kind::Linked(group)) => group.operations.len(),
        _ => 1,
    }
}

/// One batch entry: its key, and its operation (a linked group becomes one `LinkedBatch`).
pub fn batch_entry(entry: &pb::BatchEntry, index: usize) -> Result<(IdempotencyKey, Operation), InvalidField> {
    let field = format!("entries[{index}]");
    let key = idempotency_key(&entry.idempotency_key, &path(&field, "idempotency_key"))?;
    let operation = match &entry.kind {
        Some(pb::batch_entry::Kind::Single(single)) => operation(single, &path(&field, "single"))?,
        Some(pb::batch_entry::Kind::Linked(group)) => {
            if group.operations.is_empty() {
                return Err(invalid(&path(&field, "linked.operations"), "must hold at least one operation"));
            }
            let operations = group
                .operations
                .iter()
                .enumerate()
                .map(|(position, wire)| operation(wire, &format!("{field}.linked.operations[{position}]")))
                .collect::<Result<Vec<_>, _>>()?;
            Operation::LinkedBatch { operations }
        }
        None => return Err(invalid(&field, "must hold a single operation or a linked group")),
    };
    Ok((key, operation))
}

pub fn receipt(receipt: &Receipt) -> pb::Receipt {
    use pb::receipt::{self, Kind};
    let kind = match receipt {
        Receipt::Done => Kind::Done(receipt::Done {}),
        Receipt::Reserved { expires_at_ms } => Kind::Reserved(receipt::Reserved { expires_at_ms: *expires_at_ms }),
        Receipt::Committed { committed_minor, released_minor } => Kind::Committed(receipt::Committed {
            committed_minor: committed_minor.to_string(),
            released_minor: released_minor.to_string(),
        }),
        Receipt::Released { released_minor } => {
            Kind::Released(receipt::Released { released_minor: released_minor.to_string() })
        }
        Receipt::Converted { sold_minor, bought_minor, commission_minor } => Kind::Converted(receipt::Converted {
            sold_minor: sold_minor.to_string(),
            bought_minor: bought_minor.to_string(),
            commission_minor: commission_minor.to_string(),
        }),
        Receipt::Batch { receipts } => {
            Kind::Linked(receipt::Linked { receipts: receipts.iter().map(self::receipt).collect() })
        }
        // Transaction operations are served by the Transactions service (api::transactions),
        // which reports the status itself; the Ledger service never issues them.
        Receipt::Transaction { .. } => Kind::Done(receipt::Done {}),
    };
    pb::Receipt { kind: Some(kind) }
}

fn wire_domain(domain: Domain) -> pb::Domain {
    match domain {
        Domain::Banking => pb::Domain::Banking,
        Domain::Investing => pb::Domain::Investing,
        Domain::Defi => pb::Domain::Defi,
    }
}

fn wire_chain(chain: Chain) -> pb::Chain {
    match chain {
        Chain::Bitcoin => pb::Chain::Bitcoin,
        Chain::Ethereum => pb::Chain::Ethereum,
        Chain::Solana => pb::Chain::Solana,
        Chain::Sui => pb::Chain::Sui,
    }
}

pub fn wire_user_account(account: &UserAccount) -> pb::UserAccount {
    pb::UserAccount {
        user_id: account.user_id.hyphenated().to_string(),
        domain: wire_domain(account.domain).into(),
        asset: account.asset.symbol().to_string(),
    }
}

pub fn balance(view: &AccountView) -> pb::Balance {
    let asset = view.account.asset;
    pb::Balance {
        account: Some(wire_user_account(&view.account)),
        available: format_minor(view.balance.available_minor, asset),
        reserved: format_minor(view.balance.reserved_minor, asset),
        total: format_minor(view.balance.total_minor(), asset),
        frozen: view.config.frozen,
    }
}

fn asset_totals(asset: Asset, balance: Balance) -> pb::AssetTotals {
    pb::AssetTotals {
        asset: asset.symbol().to_string(),
        available: format_minor(balance.available_minor, asset),
        reserved: format_minor(balance.reserved_minor, asset),
        total: format_minor(balance.total_minor(), asset),
    }
}

pub fn summary(summary: &UserSummary) -> pb::GetUserSummaryResponse {
    pb::GetUserSummaryResponse {
        by_domain: summary
            .by_domain
            .iter()
            .map(|(domain, assets)| pb::DomainTotals {
                domain: wire_domain(*domain).into(),
                assets: assets.iter().map(|(asset, balance)| asset_totals(*asset, *balance)).collect(),
            })
            .collect(),
        by_asset: summary.by_asset.iter().map(|(asset, balance)| asset_totals(*asset, *balance)).collect(),
        by_chain: summary
            .by_chain
            .iter()
            .map(|(chain, assets)| pb::ChainTotals {
                chain: wire_chain(*chain).into(),
                assets: assets.iter().map(|(asset, balance)| asset_totals(*asset, *balance)).collect(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_must_be_canonical() {
        assert!(uuid("6f1c2a9e-0b7d-4c1e-9a53-2d2f3b8e4a10", "id").is_ok());
        for bad in [
            "",
            "6f1c2a9e0b7d4c1e9a532d2f3b8e4a10",
            "{6f1c2a9e-0b7d-4c1e-9a53-2d2f3b8e4a10}",
            "zz1c2a9e-0b7d-4c1e-9a53-2d2f3b8e4a10",
        ] {
            assert_eq!(uuid(bad, "id").unwrap_err().field, "id", "{bad}");
        }
    }

    #[test]
    fn prices_are_plain_positive_decimals() {
        assert_eq!(price("1.5", "p").unwrap(), Decimal::new(15, 1));
        assert_eq!(price("20", "p").unwrap(), Decimal::new(20, 0));
        for bad in ["", "0", "0.0", "-1", "+1", "1e3", "1.", ".5", " 1", "1,5", "1.2.3"] {
            assert!(price(bad, "p").is_err(), "{bad}");
        }
    }

    #[test]
    fn unspecified_and_unknown_enums_are_refused() {
        assert!(domain(0, "d").is_err());
        assert!(domain(99, "d").is_err());
        assert_eq!(domain(1, "d").unwrap(), Domain::Banking);
        assert!(system_kind(0, "k").is_err());
        assert_eq!(system_kind(9, "k").unwrap(), SystemKind::ExchangeLiquidity);
    }
}
