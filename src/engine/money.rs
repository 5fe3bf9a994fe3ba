//! Exact money: amounts as integer minor units of an asset, strict parsing, exact formatting.
//!
//! An amount of an asset is a decimal with at most the asset's scale of fractional digits.
//! We hold it as an integer count of minor units (`amount_minor`, e.g. cents, satoshis, wei),
//! which is exact and makes every posting an integer add. `rust_decimal::Decimal` is the
//! exchange type with the outside world (prices, PostgreSQL `NUMERIC`); any minor amount within
//! [`MAX_AMOUNT_MINOR`] fits its 96-bit mantissa at the asset's scale.
//!
//! Parsing never rounds: more decimals than the asset allows, a sign, an exponent, white
//! space, digit separators, zero, or a value past the maximum are all refused.

use std::fmt;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::asset::Asset;

/// The largest amount, and the largest magnitude of any balance component, in minor units:
/// 28 nines. It keeps every amount representable as a `rust_decimal::Decimal` and as a
/// PostgreSQL `NUMERIC(38, scale)`, and keeps sums of two values far from `i128` overflow.
/// In whole units that is 10^26 USD, 10^20 BTC or 10^10 ETH.
pub const MAX_AMOUNT_MINOR: i128 = 9_999_999_999_999_999_999_999_999_999;

/// The longest decimal string we look at, a bound on the work an amount can ask for: the
/// maximum's 28 digits, a point and 18 decimals fit with room, so only zeros written ahead of
/// the digits can reach it with a valid amount.
pub const MAX_AMOUNT_TEXT_LEN: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error, Serialize, Deserialize)]
pub enum AmountError {
    #[error("amount is empty")]
    Empty,
    #[error(
        "amount must be plain decimal digits with an optional fractional part (no sign, exponent, spaces or separators)"
    )]
    Malformed,
    #[error("amount has {found} decimals but {asset} allows at most {allowed}")]
    TooManyDecimals { asset: Asset, allowed: u32, found: u32 },
    #[error("amount must be greater than zero")]
    NotPositive,
    #[error("amount exceeds the maximum of {MAX_AMOUNT_MINOR} minor units")]
    TooLarge,
    #[error("amount is longer than {MAX_AMOUNT_TEXT_LEN} characters")]
    TooLong,
}

/// A strictly positive amount of some asset, in minor units, at most [`MAX_AMOUNT_MINOR`].
/// The asset travels beside it (on the account), so an `Amount` is just the checked number.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "i128", into = "i128")]
pub struct Amount(i128);

impl Amount {
    pub fn from_minor(amount_minor: i128) -> Result<Amount, AmountError> {
        if amount_minor <= 0 {
            return Err(AmountError::NotPositive);
        }
        if amount_minor > MAX_AMOUNT_MINOR {
            return Err(AmountError::TooLarge);
        }
        Ok(Amount(amount_minor))
    }

    /// Parses a decimal string such as `"12.34"` for `asset`, refusing anything it would have to round.
    pub fn parse(text: &str, asset: Asset) -> Result<Amount, AmountError> {
        let amount_minor = parse_minor(text, asset)?;
        Amount::from_minor(amount_minor)
    }

    pub fn minor(self) -> i128 {
        self.0
    }
}

impl TryFrom<i128> for Amount {
    type Error = AmountError;
    fn try_from(amount_minor: i128) -> Result<Self, Self::Error> {
        Amount::from_minor(amount_minor)
    }
}

impl From<Amount> for i128 {
    fn from(amount: Amount) -> i128 {
        amount.0
    }
}

impl fmt::Debug for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Parses a non-negative decimal string into minor units of `asset` (zero allowed here;
/// `Amount::parse` adds the positivity rule).
pub fn parse_minor(text: &str, asset: Asset) -> Result<i128, AmountError> {
    if text.is_empty() {
        return Err(AmountError::Empty);
    }
    if text.len() > MAX_AMOUNT_TEXT_LEN {
        return Err(AmountError::TooLong);
    }
    let (whole, fraction) = match text.split_once('.') {
        Some((whole, fraction)) => (whole, Some(fraction)),
        None => (text, None),
    };
    let all_digits = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(whole) || fraction.is_some_and(|fraction| !all_digits(fraction)) {
        return Err(AmountError::Malformed);
    }
    let fraction = fraction.unwrap_or("");
    let scale = asset.scale();
    let found = fraction.len() as u32;
    if found > scale {
        return Err(AmountError::TooManyDecimals { asset, allowed: scale, found });
    }
    let mut amount_minor: i128 = 0;
    for digit in whole.bytes().chain(fraction.bytes()) {
        amount_minor = amount_minor
            .checked_mul(10)
            .and_then(|value| value.checked_add(i128::from(digit - b'0')))
            .filter(|value| *value <= MAX_AMOUNT_MINOR)
            .ok_or(AmountError::TooLarge)?;
    }
    let padding = 10_i128.pow(scale - found);
    amount_minor.checked_mul(padding).filter(|value| *value <= MAX_AMOUNT_MINOR).ok_or(AmountError::TooLarge)
}

/// Formats a (possibly negative) minor-unit value of `asset` with exactly the asset's scale:
/// `format_minor(-1234, USD) == "-12.34"`.
pub fn format_minor(amount_minor: i128, asset: Asset) -> String {
    let scale = asset.scale() as usize;
    let sign = if amount_minor < 0 { "-" } else { "" };
    let digits = amount_minor.unsigned_abs().to_string();
    if scale == 0 {
        return format!("{sign}{digits}");
    }
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (whole, fraction) = padded.split_at(padded.len() - scale);
    format!("{sign}{whole}.{fraction}")
}

/// The exact `Decimal` for a minor-unit value of `asset`; `None` only past `Decimal`'s range,
/// which values within [`MAX_AMOUNT_MINOR`] never reach.
pub fn minor_to_decimal(amount_minor: i128, asset: Asset) -> Option<Decimal> {
    Decimal::try_from_i128_with_scale(amount_minor, asset.scale()).ok()
}

/// The minor units of an exact `Decimal`, refusing one with more decimals than `asset` allows.
pub fn decimal_to_minor(value: Decimal, asset: Asset) -> Result<i128, AmountError> {
    let found = value.scale();
    let allowed = asset.scale();
    if found > allowed {
        let normalized = value.normalize();
        if normalized.scale() > allowed {
            return Err(AmountError::TooManyDecimals { asset, allowed, found: normalized.scale() });
        }
        return decimal_to_minor(normalized, asset);
    }
    let mantissa = value.mantissa();
    let widened = mantissa.checked_mul(10_i128.pow(allowed - found)).ok_or(AmountError::TooLarge)?;
    if widened.abs() > MAX_AMOUNT_MINOR {
        return Err(AmountError::TooLarge);
    }
    Ok(widened)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_exact_amounts_at_the_asset_scale() {
        assert_eq!(Amount::parse("12.34", Asset::USD).unwrap().minor(), 1234);
        assert_eq!(Amount::parse("12.3", Asset::USD).unwrap().minor(), 1230);
        assert_eq!(Amount::parse("12", Asset::USD).unwrap().minor(), 1200);
        assert_eq!(Amount::parse("0.00000001", Asset::BTC).unwrap().minor(), 1);
        assert_eq!(Amount::parse("1.000000000000000001", Asset::ETH).unwrap().minor(), 1_000_000_000_000_000_001);
        assert_eq!(Amount::parse("007.10", Asset::USD).unwrap().minor(), 710);
    }

    #[test]
    fn refuses_what_it_would_have_to_round_or_guess() {
        let usd = Asset::USD;
        assert_eq!(Amount::parse("1.001", usd), Err(AmountError::TooManyDecimals { asset: usd, allowed: 2, found: 3 }));
        for malformed in ["-1", "+1", "1e3", "1E3", " 1", "1 ", "1,00", "1_000", ".5", "5.", "1.2.3", "0x10", "١"] {
            assert_eq!(Amount::parse(malformed, usd), Err(AmountError::Malformed), "{malformed:?}");
        }
        assert_eq!(Amount::parse("", usd), Err(AmountError::Empty));
        assert_eq!(Amount::parse("0", usd), Err(AmountError::NotPositive));
        assert_eq!(Amount::parse("0.00", usd), Err(AmountError::NotPositive));
        assert_eq!(Amount::parse("100000000000000000000000000", usd), Err(AmountError::TooLarge));
        // Past the length bound the value is not looked at: zeros ahead of a 1 are still refused.
        assert_eq!(Amount::parse(&"9".repeat(65), usd), Err(AmountError::TooLong));
        assert_eq!(Amount::parse(&format!("{}1", "0".repeat(64)), usd), Err(AmountError::TooLong));
        assert_eq!(Amount::parse(&format!("{}1", "0".repeat(63)), usd).map(Amount::minor), Ok(100));
        // Decimals are counted as written: zeros behind the asset's scale are refused, not dropped.
        for written in ["1.230", "1.2300"] {
            assert!(
                matches!(Amount::parse(written, usd), Err(AmountError::TooManyDecimals { allowed: 2, .. })),
                "{written:?}"
            );
        }
        assert_eq!(Amount::from_minor(MAX_AMOUNT_MINOR + 1), Err(AmountError::TooLarge));
        assert!(Amount::from_minor(MAX_AMOUNT_MINOR).is_ok());
    }

    #[test]
    fn formats_with_the_asset_scale() {
        assert_eq!(format_minor(1234, Asset::USD), "12.34");
        assert_eq!(format_minor(-5, Asset::USD), "-0.05");
        assert_eq!(format_minor(0, Asset::BTC), "0.00000000");
        assert_eq!(format_minor(1, Asset::ETH), "0.000000000000000001");
    }

    #[test]
    fn decimal_conversion_is_exact_and_strict() {
        let value = minor_to_decimal(MAX_AMOUNT_MINOR, Asset::ETH).unwrap();
        assert_eq!(decimal_to_minor(value, Asset::ETH), Ok(MAX_AMOUNT_MINOR));
        let three_decimals = Decimal::new(1001, 3);
        assert!(matches!(decimal_to_minor(three_decimals, Asset::USD), Err(AmountError::TooManyDecimals { .. })));
        // Trailing zeros beyond the scale are not extra precision.
        assert_eq!(decimal_to_minor(Decimal::new(1000, 3), Asset::USD), Ok(100));
    }

    proptest! {
        #[test]
        fn format_then_parse_is_identity(amount_minor in 1..=MAX_AMOUNT_MINOR, asset_index in 0..Asset::COUNT) {
            let asset = Asset::from_index(asset_index).unwrap();
            let text = format_minor(amount_minor, asset);
            prop_assert_eq!(Amount::parse(&text, asset).map(Amount::minor), Ok(amount_minor));
            let decimal = minor_to_decimal(amount_minor, asset).unwrap();
            prop_assert_eq!(decimal.to_string(), text);
        }

        #[test]
        fn parsing_never_panics(text in "\\PC{0,80}", asset_index in 0..Asset::COUNT) {
            let asset = Asset::from_index(asset_index).unwrap();
            if let Ok(amount) = Amount::parse(&text, asset) {
                prop_assert!(amount.minor() > 0 && amount.minor() <= MAX_AMOUNT_MINOR);
            }
        }
    }
}
