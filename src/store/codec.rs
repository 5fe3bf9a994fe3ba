//! How engine values are spelled in PostgreSQL: names for enums, NUMERIC for amounts.
//!
//! Shared by the journal writer (engine -> rows) and recovery (rows -> engine), so the two
//! directions cannot drift apart. Every conversion that reads a row is fallible: a row the
//! engine could not have written is reported, never guessed at.

use rust_decimal::Decimal;

use super::StoreError;
use crate::engine::account::{Domain, SystemKind};
use crate::engine::asset::Asset;
use crate::engine::money::{decimal_to_minor, minor_to_decimal};
use crate::engine::reservation::ReservationStatus;

/// An amount in minor units as the exact NUMERIC of its asset's scale.
pub fn to_decimal(amount_minor: i128, asset: Asset) -> Result<Decimal, StoreError> {
    minor_to_decimal(amount_minor, asset)
        .ok_or_else(|| StoreError::Corrupt(format!("{amount_minor} minor units of {asset} do not fit a NUMERIC")))
}

/// A NUMERIC read back as minor units; more decimals than the asset's scale is corruption.
pub fn to_minor(value: Decimal, asset: Asset) -> Result<i128, StoreError> {
    decimal_to_minor(value, asset)
        .map_err(|error| StoreError::Corrupt(format!("amount {value} of {asset} is not valid: {error}")))
}

pub fn asset(symbol: &str) -> Result<Asset, StoreError> {
    Asset::from_symbol(symbol).ok_or_else(|| StoreError::Corrupt(format!("unknown asset {symbol:?}")))
}

pub fn domain(name: &str) -> Result<Domain, StoreError> {
    Domain::ALL
        .into_iter()
        .find(|domain| domain.name() == name)
        .ok_or_else(|| StoreError::Corrupt(format!("unknown domain {name:?}")))
}

/// `provider_clearing:stripe`, `fee_revenue:network`, `exchange_liquidity`, `protocol_position:aave`.
pub fn system_kind_name(kind: SystemKind) -> String {
    fn lower(value: impl std::fmt::Debug) -> String {
        format!("{value:?}").to_lowercase()
    }
    match kind {
        SystemKind::ProviderClearing(provider) => format!("provider_clearing:{}", lower(provider)),
        SystemKind::FeeRevenue(tier) => format!("fee_revenue:{}", lower(tier)),
        SystemKind::ExchangeLiquidity => "exchange_liquidity".to_owned(),
        SystemKind::ProtocolPosition(protocol) => format!("protocol_position:{}", lower(protocol)),
    }
}

pub fn system_kind(name: &str) -> Result<SystemKind, StoreError> {
    SystemKind::all()
        .find(|kind| system_kind_name(*kind) == name)
        .ok_or_else(|| StoreError::Corrupt(format!("unknown system account kind {name:?}")))
}

pub fn status_name(status: ReservationStatus) -> &'static str {
    match status {
        ReservationStatus::Active => "active",
        ReservationStatus::Completed => "completed",
        ReservationStatus::Released => "released",
        ReservationStatus::Expired => "expired",
    }
}

pub fn status(name: &str) -> Result<ReservationStatus, StoreError> {
    [ReservationStatus::Active, ReservationStatus::Completed, ReservationStatus::Released, ReservationStatus::Expired]
        .into_iter()
        .find(|status| status_name(*status) == name)
        .ok_or_else(|| StoreError::Corrupt(format!("unknown reservation status {name:?}")))
}

/// A sequence number as PostgreSQL's bigint.
pub fn to_bigint(sequence: u64) -> Result<i64, StoreError> {
    i64::try_from(sequence).map_err(|_| StoreError::Corrupt(format!("sequence {sequence} exceeds bigint")))
}

pub fn from_bigint(sequence: i64) -> Result<u64, StoreError> {
    u64::try_from(sequence).map_err(|_| StoreError::Corrupt(format!("negative sequence {sequence}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for kind in SystemKind::all() {
            assert_eq!(system_kind(&system_kind_name(kind)).unwrap(), kind);
        }
        for domain_value in Domain::ALL {
            assert_eq!(domain(domain_value.name()).unwrap(), domain_value);
        }
        for asset_value in Asset::all() {
            assert_eq!(asset(asset_value.symbol()).unwrap(), asset_value);
            let minor = 123_456_789_i128;
            assert_eq!(to_minor(to_decimal(minor, asset_value).unwrap(), asset_value).unwrap(), minor);
        }
        assert!(system_kind("fee_revenue:nope").is_err());
    }
}
