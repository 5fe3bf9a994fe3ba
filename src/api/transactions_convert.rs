//! Wire <-> domain for the Transactions service: validates each request field once, names a bad
//! field by its path, and maps a transaction type to who pays whom (`payer`, `payee`, the bought
//! asset's leg). The engine re-checks the business shape; this is about well-formed input.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use uuid::Uuid;

use super::convert::{self, InvalidField};
use super::pb;
use crate::engine::account::{AccountRef, Domain, Protocol, SystemAccount, SystemKind, UserAccount};
use crate::engine::asset::Asset;
use crate::engine::money::Amount;
use crate::engine::transaction::{
    ComplianceRecord, KycStatus, MAX_DETAILS, MAX_TEXT_LEN, NewTransaction, RiskLevel, TxStatus, TxType,
};
use crate::store::transaction_queries::{HistoryRow, TransactionRow};

/// Page size when the caller gives none, and the most a page may hold.
pub const DEFAULT_PAGE_SIZE: u32 = 50;
pub const MAX_PAGE_SIZE: u32 = 200;

/// The largest raw provider payload accepted, in bytes.
pub const MAX_RAW_PAYLOAD_BYTES: usize = 64 * 1024;

/// The longest provider source or event id / type accepted, in bytes.
pub const MAX_EVENT_FIELD_LEN: usize = 128;

pub fn invalid(field: &str, description: impl Into<String>) -> InvalidField {
    InvalidField { field: field.to_owned(), description: description.into() }
}

pub fn tx_type(text: &str, field: &str) -> Result<TxType, InvalidField> {
    TxType::from_name(text).ok_or_else(|| invalid(field, "must be a known transaction type"))
}

pub fn tx_status(text: &str, field: &str) -> Result<TxStatus, InvalidField> {
    TxStatus::from_name(text).ok_or_else(|| invalid(field, "must be a known transaction status"))
}

/// Text of at most `max_len` bytes, without NUL characters (PostgreSQL stores none).
pub fn bounded_text(text: &str, field: &str, max_len: usize) -> Result<String, InvalidField> {
    if text.len() > max_len {
        return Err(invalid(field, format!("is longer than {max_len} bytes")));
    }
    if text.contains('\0') {
        return Err(invalid(field, "holds a NUL character"));
    }
    Ok(text.to_owned())
}

pub fn required_text(text: &str, field: &str, max_len: usize) -> Result<String, InvalidField> {
    if text.is_empty() {
        return Err(invalid(field, "is required"));
    }
    bounded_text(text, field, max_len)
}

fn protocol(text: &str, field: &str) -> Result<Protocol, InvalidField> {
    Protocol::ALL
        .into_iter()
        .find(|protocol| format!("{protocol:?}").eq_ignore_ascii_case(text))
        .ok_or_else(|| invalid(field, "must be uniswap, aave, compound or lido"))
}

fn user(user_id: Uuid, domain: Domain, asset: Asset) -> UserAccount {
    UserAccount { user_id, domain, asset }
}

fn system(kind: SystemKind, asset: Asset) -> AccountRef {
    AccountRef::System(SystemAccount { kind, asset })
}

/// A field set on a type that has no use for it is refused, not dropped unsaid: the caller meant
/// something by it (until session 22 it was ignored). `protocol` is checked with the provider.
fn refuse_fields_the_type_ignores(wire: &pb::InitiateTransactionRequest, kind: TxType) -> Result<(), InvalidField> {
    let takes_provider = matches!(kind, TxType::AddMoney | TxType::Withdraw);
    if !takes_provider && wire.provider != 0 {
        return Err(invalid("provider", "applies only to add_money and withdraw"));
    }
    if kind != TxType::Transfer && wire.target_domain != 0 {
        return Err(invalid("target_domain", "applies only to transfer"));
    }
    if !kind.is_trade() && !wire.target_asset.is_empty() {
        return Err(invalid("target_asset", "applies only to trades"));
    }
    if kind != TxType::SendMoney && !wire.counterparty_user_id.is_empty() {
        return Err(invalid("counterparty_user_id", "applies only to send_money"));
    }
    Ok(())
}

/// The transaction an initiate request describes, without its fees (priced by the caller).
pub fn new_transaction(wire: &pb::InitiateTransactionRequest) -> Result<NewTransaction, InvalidField> {
    let id = convert::uuid(&wire.transaction_id, "transaction_id")?;
    let user_id = convert::uuid(&wire.user_id, "user_id")?;
    let domain = convert::domain(wire.domain, "domain")?;
    let kind = tx_type(&wire.r#type, "type")?;
    if !kind.allowed_in(domain) {
        return Err(invalid("type", format!("{} is not a {} transaction", kind.name(), domain.name())));
    }
    let asset = convert::asset(&wire.asset, "asset")?;
    let principal = Amount::parse(&wire.amount, asset).map_err(|error| invalid("amount", error.to_string()))?;
    refuse_fields_the_type_ignores(wire, kind)?;
    let own = AccountRef::User(user(user_id, domain, asset));
    let mut receive = None;
    let (payer, payee) = match kind {
        TxType::AddMoney => {
            (system(SystemKind::ProviderClearing(convert::provider(wire.provider, "provider")?), asset), own)
        }
        TxType::Withdraw => {
            (own, system(SystemKind::ProviderClearing(convert::provider(wire.provider, "provider")?), asset))
        }
        TxType::SendMoney => {
            let counterparty = convert::uuid(&wire.counterparty_user_id, "counterparty_user_id")?;
            (own, AccountRef::User(user(counterparty, Domain::Banking, asset)))
        }
        TxType::Transfer => {
            let target = convert::domain(wire.target_domain, "target_domain")?;
            (own, AccountRef::User(user(user_id, target, asset)))
        }
        TxType::BuyCrypto | TxType::SellCrypto | TxType::Convert => {
            let target = convert::asset(&wire.target_asset, "target_asset")?;
            if target == asset {
                return Err(invalid("target_asset", "must differ from asset"));
            }
            receive = Some((
                SystemAccount { kind: SystemKind::ExchangeLiquidity, asset: target },
                user(user_id, Domain::Investing, target),
            ));
            (own, system(SystemKind::ExchangeLiquidity, asset))
        }
        TxType::StartStrategy => {
            (own, system(SystemKind::ProtocolPosition(protocol(&wire.protocol, "protocol")?), asset))
        }
        TxType::StopStrategy | TxType::HarvestYield => {
            (system(SystemKind::ProtocolPosition(protocol(&wire.protocol, "protocol")?), asset), own)
        }
    };
    if wire.details.len() > MAX_DETAILS {
        return Err(invalid("details", format!("holds more than {MAX_DETAILS} entries")));
    }
    let mut details = BTreeMap::new();
    for (key, value) in &wire.details {
        details.insert(bounded_text(key, "details", MAX_TEXT_LEN)?, bounded_text(value, "details", MAX_TEXT_LEN)?);
    }
    let provider = match kind {
        TxType::AddMoney | TxType::Withdraw => {
            Some(format!("{:?}", convert::provider(wire.provider, "provider")?).to_lowercase())
        }
        TxType::StartStrategy | TxType::StopStrategy | TxType::HarvestYield => {
            Some(format!("{:?}", protocol(&wire.protocol, "protocol")?).to_lowercase())
        }
        _ if !wire.protocol.is_empty() => return Err(invalid("protocol", "applies only to DeFi strategies")),
        _ => None,
    };
    Ok(NewTransaction {
        id,
        user_id,
        domain,
        kind,
        payer,
        payee,
        principal_minor: principal.minor(),
        fees: Vec::new(),
        receive,
        provider,
        details,
    })
}

/// A fill given as price and quantity text; both or neither.
pub fn fill(
    price: &str,
    quantity: &str,
    bought: Option<Asset>,
) -> Result<Option<crate::engine::transaction::Fill>, InvalidField> {
    match (price.is_empty(), quantity.is_empty(), bought) {
        (true, true, _) => Ok(None),
        (false, false, Some(asset)) => {
            let price: Decimal = convert::price(price, "fill_price")?;
            let quantity =
                Amount::parse(quantity, asset).map_err(|error| invalid("fill_quantity", error.to_string()))?;
            Ok(Some(crate::engine::transaction::Fill { price, quantity_minor: quantity.minor() }))
        }
        (false, false, None) => Err(invalid("fill_price", "only a trade has a fill")),
        _ => Err(invalid("fill_quantity", "a fill needs both price and quantity")),
    }
}

pub fn compliance(wire: &pb::SetUserComplianceRequest) -> Result<(Uuid, ComplianceRecord), InvalidField> {
    let user_id = convert::uuid(&wire.user_id, "user_id")?;
    let kyc = KycStatus::ALL
        .into_iter()
        .find(|status| status.name() == wire.kyc_status)
        .ok_or_else(|| invalid("kyc_status", "must be not_started, pending, verified or rejected"))?;
    let risk = RiskLevel::ALL
        .into_iter()
        .find(|level| level.name() == wire.risk_level)
        .ok_or_else(|| invalid("risk_level", "must be low, medium or high"))?;
    let max_transaction_minor = if wire.max_transaction_minor.is_empty() {
        None
    } else {
        let digits = &wire.max_transaction_minor;
        if digits.len() > 29 || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
            return Err(invalid("max_transaction_minor", "must be plain digits, at most the maximum amount"));
        }
        Some(
            digits
                .parse::<i128>()
                .ok()
                .filter(|value| *value <= crate::engine::money::MAX_AMOUNT_MINOR)
                .ok_or_else(|| invalid("max_transaction_minor", "must be at most the maximum amount"))?,
        )
    };
    Ok((user_id, ComplianceRecord { kyc, risk, max_transaction_minor }))
}

fn wire_domain(name: &str) -> i32 {
    match name {
        "banking" => pb::Domain::Banking,
        "investing" => pb::Domain::Investing,
        "defi" => pb::Domain::Defi,
        _ => pb::Domain::Unspecified,
    }
    .into()
}

fn decimal_text(value: Decimal) -> String {
    value.normalize().to_string()
}

pub fn wire_transaction(row: &TransactionRow) -> pb::Transaction {
    pb::Transaction {
        transaction_id: row.transaction_id.hyphenated().to_string(),
        user_id: row.user_id.hyphenated().to_string(),
        domain: wire_domain(&row.domain),
        r#type: row.kind.clone(),
        status: row.status.clone(),
        asset: row.asset.clone(),
        amount: row.principal.to_string(),
        fee_total: row.fee_total.to_string(),
        fees: row
            .fees
            .iter()
            .map(|fee| pb::FeeLine {
                tier: fee.tier.clone(),
                category: fee.category.clone(),
                method: fee.method.clone(),
                amount: fee.amount.to_string(),
                provider: fee.provider.clone().unwrap_or_default(),
                schedule_version: fee.schedule_version,
                status: fee.status.clone(),
            })
            .collect(),
        provider: row.provider.clone().unwrap_or_default(),
        details: row.details.clone().into_iter().collect(),
        aml_status: row.aml_status.clone().unwrap_or_default(),
        aml_risk_score: row.aml_risk_score.map_or(0, i32::from),
        aml_flags: row.aml_flags.clone(),
        fill_price: row.fill_price.map(decimal_text).unwrap_or_default(),
        fill_quantity_minor: row.fill_quantity_minor.map(decimal_text).unwrap_or_default(),
        created_at_ms: row.created_at_ms,
        updated_at_ms: row.updated_at_ms,
    }
}

pub fn wire_change(row: &HistoryRow) -> pb::StatusChange {
    pb::StatusChange {
        from_status: row.from_status.clone(),
        to_status: row.to_status.clone(),
        reason: row.reason.clone(),
        at_ms: row.at_ms,
        sequence: row.sequence,
        provider_source: row.provider_source.clone().unwrap_or_default(),
        provider_event_id: row.provider_event_id.clone().unwrap_or_default(),
        metadata_json: row.metadata_json.clone(),
    }
}

/// The page token of the row after which the next page starts: "<created_at_ms>.<uuid>".
pub fn page_token(row: &TransactionRow) -> String {
    format!("{}.{}", row.created_at_ms, row.transaction_id.hyphenated())
}

pub fn parse_page_token(token: &str) -> Result<Option<(i64, Uuid)>, InvalidField> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || invalid("page_token", "is not a token this server issued");
    let (at_ms, id) = token.split_once('.').ok_or_else(bad)?;
    let at_ms = at_ms.parse::<i64>().map_err(|_| bad())?;
    let id = Uuid::try_parse(id).map_err(|_| bad())?;
    Ok(Some((at_ms, id)))
}

pub fn page_size(requested: u32) -> Result<u32, InvalidField> {
    match requested {
        0 => Ok(DEFAULT_PAGE_SIZE),
        size if size <= MAX_PAGE_SIZE => Ok(size),
        _ => Err(invalid("page_size", format!("must be at most {MAX_PAGE_SIZE}"))),
    }
}
