//! Fee math as properties: the parts sum to the total, rounding never creates or loses money
//! (each line is within half a minor unit of its exact value, before its min/max), limits are
//! respected, and schedule selection by time picks the latest schedule in force.

use diboas_ledger::engine::account::FeeTier;
use diboas_ledger::engine::money::MAX_AMOUNT_MINOR;
use diboas_ledger::engine::transaction::FeeMethod;
use diboas_ledger::fees::{BPS_PER_WHOLE, Bracket, FeeRule, FeeSchedule, Rate, compute, percentage_minor, select};
use proptest::prelude::*;

fn rate() -> impl Strategy<Value = Rate> {
    prop_oneof![
        (0..=BPS_PER_WHOLE).prop_map(|bps| Rate::Percentage { bps }),
        (0_i64..1_000_000).prop_map(|amount_minor| Rate::Flat { amount_minor }),
        prop::collection::btree_set(1_i64..10_000_000, 0..4).prop_flat_map(|starts| {
            let count = starts.len() + 1;
            prop::collection::vec(0..=BPS_PER_WHOLE, count).prop_map(move |rates| {
                let starts: Vec<i64> = std::iter::once(0).chain(starts.iter().copied()).collect();
                Rate::Tiered {
                    brackets: starts
                        .into_iter()
                        .zip(rates)
                        .map(|(from_minor, bps)| Bracket { from_minor, bps })
                        .collect(),
                }
            })
        }),
    ]
}

fn rule(tier: FeeTier) -> impl Strategy<Value = FeeRule> {
    (rate(), prop::option::of(0_i64..5_000), prop::option::of(0_i64..5_000)).prop_map(move |(rate, a, b)| {
        // Keep min <= max when both are present.
        let (min_minor, max_minor) = match (a, b) {
            (Some(a), Some(b)) => (Some(a.min(b)), Some(a.max(b))),
            other => other,
        };
        FeeRule { tier, category: format!("{tier:?}"), rate, min_minor, max_minor, provider: None }
    })
}

fn schedule() -> impl Strategy<Value = FeeSchedule> {
    prop::sample::subsequence(FeeTier::ALL.to_vec(), 0..=5)
        .prop_flat_map(|tiers| tiers.into_iter().map(rule).collect::<Vec<_>>())
        .prop_map(|rules| FeeSchedule { version: 1, effective_from_ms: 0, rules })
}

/// The exact fee of a rule before rounding and limits, times 10 000 (so it is an integer).
fn exact_times_whole(rule: &FeeRule, principal_minor: i128) -> i128 {
    let whole = i128::from(BPS_PER_WHOLE);
    match &rule.rate {
        Rate::Percentage { bps } => principal_minor * i128::from(*bps),
        Rate::Flat { amount_minor } => i128::from(*amount_minor) * whole,
        Rate::Tiered { brackets } => {
            let bps = brackets.iter().rev().find(|b| i128::from(b.from_minor) <= principal_minor).map_or(0, |b| b.bps);
            principal_minor * i128::from(bps)
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn lines_round_half_up_within_half_a_unit_respect_limits_and_sum_to_the_total(
        schedule in schedule(),
        principal_minor in 1_i128..1_000_000_000_000,
    ) {
        let lines = compute(&schedule, principal_minor).expect("valid schedule");
        prop_assert_eq!(lines.len(), schedule.rules.len());
        let whole = i128::from(BPS_PER_WHOLE);
        let mut total_minor = 0;
        for (line, rule) in lines.iter().zip(&schedule.rules) {
            prop_assert_eq!(line.tier, rule.tier);
            prop_assert!(line.amount_minor >= 0);
            let exact = exact_times_whole(rule, principal_minor);
            let rounded = (exact + whole / 2) / whole;
            // Half up: never more than half a minor unit away from the exact value, ties up.
            prop_assert!((rounded * whole - exact).abs() <= whole / 2);
            let clamped = rounded
                .max(rule.min_minor.map_or(0, i128::from))
                .min(rule.max_minor.map_or(MAX_AMOUNT_MINOR, i128::from));
            prop_assert_eq!(line.amount_minor, clamped);
            let method = match rule.rate {
                Rate::Percentage { .. } => FeeMethod::Percentage,
                Rate::Flat { .. } => FeeMethod::Flat,
                Rate::Tiered { .. } => FeeMethod::Tiered,
            };
            prop_assert_eq!(line.method, method);
            total_minor += clamped;
        }
        // The breakdown's total is the sum of the independently rounded parts: no unit created or lost.
        prop_assert_eq!(lines.iter().map(|line| line.amount_minor).sum::<i128>(), total_minor);
    }

    #[test]
    fn percentage_rounding_splits_no_money_across_amounts(a in 0_i128..1_000_000_000, b in 0_i128..1_000_000_000, bps in 0..=BPS_PER_WHOLE) {
        // Rounding a sum differs from the sum of roundings by at most one unit: each is within half.
        let separately = percentage_minor(a, bps) + percentage_minor(b, bps);
        let together = percentage_minor(a + b, bps);
        prop_assert!((separately - together).abs() <= 1);
    }

    #[test]
    fn selection_picks_the_latest_schedule_in_force(
        effective in prop::collection::vec(0_i64..1_000, 0..8),
        at_ms in 0_i64..1_000,
    ) {
        let schedules: Vec<FeeSchedule> = effective
            .iter()
            .enumerate()
            .map(|(index, from)| FeeSchedule { version: index as i64 + 1, effective_from_ms: *from, rules: Vec::new() })
            .collect();
        let chosen = select(&schedules, at_ms);
        let in_force: Vec<&FeeSchedule> = schedules.iter().filter(|s| s.effective_from_ms <= at_ms).collect();
        match chosen {
            None => prop_assert!(in_force.is_empty()),
            Some(chosen) => {
                prop_assert!(chosen.effective_from_ms <= at_ms);
                for other in in_force {
                    prop_assert!(
                        (other.effective_from_ms, other.version) <= (chosen.effective_from_ms, chosen.version),
                        "{:?} is later than the chosen {:?}", other, chosen
                    );
                }
            }
        }
    }
}
