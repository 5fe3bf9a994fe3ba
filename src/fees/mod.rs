//! Fees: the five tiers (platform, provider, network, compliance, premium), each priced by a
//! method (percentage, flat, tiered by amount) with an optional minimum and maximum.
//!
//! Pure: no I/O. The Transactions API loads the schedules of a transaction's type and asset
//! from `ledger.fee_schedules`, [`select`]s the one in force at initiation and [`compute`]s the
//! breakdown, which then travels inside the journaled `InitiateTransaction` operation: replay and
//! recovery never price a transaction again, so a later schedule never changes an old one.
//!
//! Rounding, the one rule: amounts are integer minor units of the principal's asset (its scale),
//! and a percentage fee is rounded half up (a remainder of exactly half a minor unit rounds up)
//! to a whole minor unit, once per line, before the minimum and maximum apply. The total is the
//! sum of the rounded lines, so the user is charged exactly what the fee-revenue accounts receive.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::engine::account::FeeTier;
use crate::engine::money::MAX_AMOUNT_MINOR;
use crate::engine::transaction::{FeeLine, FeeMethod, MAX_TEXT_LEN};

/// 100% in basis points.
pub const BPS_PER_WHOLE: u32 = 10_000;

/// The most brackets a tiered rule may have.
pub const MAX_BRACKETS: usize = 16;

/// The most schedules of one type and asset the API considers when selecting by time.
pub const MAX_SCHEDULES_CONSIDERED: i64 = 64;

/// One bracket of a tiered rule: amounts from `from_minor` (inclusive) up to the next bracket's
/// start pay `bps` of the whole amount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bracket {
    pub from_minor: i64,
    pub bps: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum Rate {
    Percentage { bps: u32 },
    Flat { amount_minor: i64 },
    Tiered { brackets: Vec<Bracket> },
}

/// How one tier is priced in a schedule. Schedule amounts are `i64` minor units (up to ~9.2e18,
/// far above any fee): the flattened JSON form cannot carry `i128`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeeRule {
    pub tier: FeeTier,
    pub category: String,
    #[serde(flatten)]
    pub rate: Rate,
    #[serde(default)]
    pub min_minor: Option<i64>,
    #[serde(default)]
    pub max_minor: Option<i64>,
    #[serde(default)]
    pub provider: Option<String>,
}

/// A schedule as stored: its version, when it takes effect, and its rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeeSchedule {
    pub version: i64,
    pub effective_from_ms: i64,
    pub rules: Vec<FeeRule>,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FeeError {
    #[error("fee schedule {version} is invalid: {reason}")]
    InvalidSchedule { version: i64, reason: &'static str },
    #[error("the fees of {principal_minor} minor units pass the maximum amount")]
    Overflow { principal_minor: i128 },
}

/// The schedule in force at `at_ms`: the latest whose `effective_from_ms` is not after it (the
/// higher version on a tie). `None` if none is in force yet.
pub fn select(schedules: &[FeeSchedule], at_ms: i64) -> Option<&FeeSchedule> {
    schedules
        .iter()
        .filter(|schedule| schedule.effective_from_ms <= at_ms)
        .max_by_key(|schedule| (schedule.effective_from_ms, schedule.version))
}

/// Checks a schedule's rules: one per tier, rates within 0..=100%, amounts within range,
/// minimum <= maximum, brackets ascending from zero, text bounded.
pub fn validate(schedule: &FeeSchedule) -> Result<(), FeeError> {
    let invalid = |reason| Err(FeeError::InvalidSchedule { version: schedule.version, reason });
    let in_range = |value: i64| value >= 0;
    for (index, rule) in schedule.rules.iter().enumerate() {
        if schedule.rules[..index].iter().any(|earlier| earlier.tier == rule.tier) {
            return invalid("two rules for one tier");
        }
        if rule.category.is_empty() || rule.category.len() > MAX_TEXT_LEN {
            return invalid("a category must be 1..=512 bytes");
        }
        if rule.provider.as_deref().is_some_and(|provider| provider.len() > MAX_TEXT_LEN) {
            return invalid("a provider name is too long");
        }
        if rule.min_minor.is_some_and(|min| !in_range(min)) || rule.max_minor.is_some_and(|max| !in_range(max)) {
            return invalid("a minimum or maximum is out of range");
        }
        if let (Some(min), Some(max)) = (rule.min_minor, rule.max_minor)
            && min > max
        {
            return invalid("a minimum is above its maximum");
        }
        match &rule.rate {
            Rate::Percentage { bps } if *bps > BPS_PER_WHOLE => return invalid("a rate is above 100%"),
            Rate::Flat { amount_minor } if !in_range(*amount_minor) => return invalid("a flat fee is out of range"),
            Rate::Tiered { brackets } => {
                if brackets.is_empty() || brackets.len() > MAX_BRACKETS || brackets[0].from_minor != 0 {
                    return invalid("brackets must be 1..=16 and start at zero");
                }
                if brackets.windows(2).any(|pair| pair[0].from_minor >= pair[1].from_minor) {
                    return invalid("brackets must ascend");
                }
                if brackets.iter().any(|bracket| bracket.bps > BPS_PER_WHOLE || !in_range(bracket.from_minor)) {
                    return invalid("a bracket's rate or start is out of range");
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// `principal_minor * bps / 10 000`, rounded half up to a whole minor unit.
pub fn percentage_minor(principal_minor: i128, bps: u32) -> i128 {
    debug_assert!((0..=MAX_AMOUNT_MINOR).contains(&principal_minor) && bps <= BPS_PER_WHOLE);
    // At most 10^28 * 10^4: far inside i128.
    let whole = i128::from(BPS_PER_WHOLE);
    (principal_minor * i128::from(bps) + whole / 2) / whole
}

/// The fee breakdown of `principal_minor` under `schedule`, in the schedule's tier order.
pub fn compute(schedule: &FeeSchedule, principal_minor: i128) -> Result<Vec<FeeLine>, FeeError> {
    validate(schedule)?;
    let mut lines = Vec::with_capacity(schedule.rules.len());
    let mut total_minor: i128 = 0;
    for rule in &schedule.rules {
        let (method, raw_minor) = match &rule.rate {
            Rate::Percentage { bps } => (FeeMethod::Percentage, percentage_minor(principal_minor, *bps)),
            Rate::Flat { amount_minor } => (FeeMethod::Flat, i128::from(*amount_minor)),
            Rate::Tiered { brackets } => {
                let bps = brackets
                    .iter()
                    .rev()
                    .find(|bracket| i128::from(bracket.from_minor) <= principal_minor)
                    .map_or(0, |bracket| bracket.bps);
                (FeeMethod::Tiered, percentage_minor(principal_minor, bps))
            }
        };
        let amount_minor = raw_minor
            .max(rule.min_minor.map_or(0, i128::from))
            .min(rule.max_minor.map_or(MAX_AMOUNT_MINOR, i128::from));
        total_minor += amount_minor;
        if principal_minor + total_minor > MAX_AMOUNT_MINOR {
            return Err(FeeError::Overflow { principal_minor });
        }
        lines.push(FeeLine {
            tier: rule.tier,
            category: rule.category.clone(),
            method,
            amount_minor,
            provider: rule.provider.clone(),
            schedule_version: schedule.version,
        });
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_a_minor_unit_rounds_up_and_less_rounds_down() {
        // 1.50 USD at 1% = 1.5 cents -> 2 cents; 1.49 USD at 1% = 1.49 cents -> 1 cent.
        assert_eq!(percentage_minor(150, 100), 2);
        assert_eq!(percentage_minor(149, 100), 1);
        assert_eq!(percentage_minor(0, 100), 0);
        assert_eq!(percentage_minor(MAX_AMOUNT_MINOR, BPS_PER_WHOLE), MAX_AMOUNT_MINOR);
    }

    #[test]
    fn tiered_uses_the_bracket_holding_the_amount_and_limits_clamp() {
        let schedule = FeeSchedule {
            version: 3,
            effective_from_ms: 0,
            rules: vec![
                FeeRule {
                    tier: FeeTier::Platform,
                    category: "platform".into(),
                    rate: Rate::Tiered {
                        brackets: vec![Bracket { from_minor: 0, bps: 100 }, Bracket { from_minor: 100_000, bps: 50 }],
                    },
                    min_minor: Some(25),
                    max_minor: None,
                    provider: None,
                },
                FeeRule {
                    tier: FeeTier::Network,
                    category: "gas".into(),
                    rate: Rate::Flat { amount_minor: 300 },
                    min_minor: None,
                    max_minor: Some(200),
                    provider: Some("ethereum".into()),
                },
            ],
        };
        let small = compute(&schedule, 1_000).unwrap();
        assert_eq!(small.iter().map(|line| line.amount_minor).collect::<Vec<_>>(), vec![25, 200]);
        let large = compute(&schedule, 200_000).unwrap();
        assert_eq!(large.iter().map(|line| line.amount_minor).collect::<Vec<_>>(), vec![1_000, 200]);
        assert!(large.iter().all(|line| line.schedule_version == 3));
    }

    #[test]
    fn invalid_schedules_are_refused() {
        let rule = |tier, bps| FeeRule {
            tier,
            category: "c".into(),
            rate: Rate::Percentage { bps },
            min_minor: None,
            max_minor: None,
            provider: None,
        };
        let schedule = |rules| FeeSchedule { version: 1, effective_from_ms: 0, rules };
        assert!(validate(&schedule(vec![rule(FeeTier::Platform, 10_001)])).is_err());
        assert!(validate(&schedule(vec![rule(FeeTier::Platform, 1), rule(FeeTier::Platform, 2)])).is_err());
        assert!(validate(&schedule(vec![rule(FeeTier::Platform, 1), rule(FeeTier::Premium, 2)])).is_ok());
    }

    #[test]
    fn rules_parse_from_the_stored_json() {
        let rules: Vec<FeeRule> = serde_json::from_str(
            r#"[{"tier":"platform","category":"service","method":"percentage","bps":50,"min_minor":10},
                {"tier":"network","category":"gas","method":"flat","amount_minor":120,"provider":"ethereum"},
                {"tier":"premium","category":"priority","method":"tiered","brackets":[{"from_minor":0,"bps":10}]}]"#,
        )
        .unwrap();
        assert_eq!(rules.len(), 3);
        assert_eq!(rules[0].rate, Rate::Percentage { bps: 50 });
        assert_eq!(rules[1].provider.as_deref(), Some("ethereum"));
    }
}
