//! Outflow limits: per transaction, per UTC calendar day and per UTC calendar month.
//!
//! Money "flows out" of an account when it is withdrawn, transferred, converted or reserved.
//! A reservation counts when it is made (that is when the spend is authorised); whatever of it
//! is later released or expires is given back to the windows it was counted in, if those
//! windows are still current. Only windows that have a limit are counted.

use chrono::{DateTime, Datelike};
use serde::{Deserialize, Serialize};

use super::account::OutflowLimits;
use super::error::LimitKind;

const MS_PER_DAY: i64 = 24 * 60 * 60 * 1_000;

/// The UTC day number (days since 1970-01-01) of a time.
fn day_of(at_ms: i64) -> i64 {
    at_ms.div_euclid(MS_PER_DAY)
}

/// The UTC month number (year * 12 + month index) of a time.
fn month_of(at_ms: i64) -> i64 {
    match DateTime::from_timestamp_millis(at_ms) {
        Some(at) => i64::from(at.year()) * 12 + i64::from(at.month0()),
        // Outside chrono's range (hundreds of thousands of years away): one window for all of it.
        None => i64::MIN,
    }
}

/// How much has flowed out in the current windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct OutflowUsage {
    pub day: i64,
    pub day_used_minor: i128,
    pub month: i64,
    pub month_used_minor: i128,
}

/// A limit that would be broken, with what had been used in its window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Breach {
    pub limit: LimitKind,
    pub limit_minor: i128,
    pub used_minor: i128,
}

impl OutflowUsage {
    /// The usage after `amount_minor` more flows out at `now_ms`, or the first limit it breaks.
    pub fn after_outflow(
        self,
        limits: &OutflowLimits,
        now_ms: i64,
        amount_minor: i128,
    ) -> Result<OutflowUsage, Breach> {
        debug_assert!(amount_minor > 0);
        if let Some(limit_minor) = limits.per_transaction_minor
            && amount_minor > limit_minor
        {
            return Err(Breach { limit: LimitKind::PerTransaction, limit_minor, used_minor: 0 });
        }
        let mut next = self;
        if let Some(limit_minor) = limits.daily_minor {
            let day = day_of(now_ms);
            let used_minor = if self.day == day { self.day_used_minor } else { 0 };
            if used_minor + amount_minor > limit_minor {
                return Err(Breach { limit: LimitKind::Daily, limit_minor, used_minor });
            }
            next.day = day;
            next.day_used_minor = used_minor + amount_minor;
        }
        if let Some(limit_minor) = limits.monthly_minor {
            let month = month_of(now_ms);
            let used_minor = if self.month == month { self.month_used_minor } else { 0 };
            if used_minor + amount_minor > limit_minor {
                return Err(Breach { limit: LimitKind::Monthly, limit_minor, used_minor });
            }
            next.month = month;
            next.month_used_minor = used_minor + amount_minor;
        }
        Ok(next)
    }

    /// The usage after `amount_minor` that was counted at `counted_at_ms` is given back.
    pub fn after_refund(self, limits: &OutflowLimits, counted_at_ms: i64, amount_minor: i128) -> OutflowUsage {
        let mut next = self;
        if limits.daily_minor.is_some() && self.day == day_of(counted_at_ms) {
            next.day_used_minor = (self.day_used_minor - amount_minor).max(0);
        }
        if limits.monthly_minor.is_some() && self.month == month_of(counted_at_ms) {
            next.month_used_minor = (self.month_used_minor - amount_minor).max(0);
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(year: i32, month: u32, day: u32, hour: u32) -> i64 {
        chrono::Utc.with_ymd_and_hms(year, month, day, hour, 0, 0).unwrap().timestamp_millis()
    }

    #[test]
    fn daily_window_resets_at_utc_midnight() {
        let limits = OutflowLimits { daily_minor: Some(100), ..Default::default() };
        let usage = OutflowUsage::default().after_outflow(&limits, at(2026, 1, 31, 23), 80).unwrap();
        let breach = usage.after_outflow(&limits, at(2026, 1, 31, 23), 21).unwrap_err();
        assert_eq!(breach, Breach { limit: LimitKind::Daily, limit_minor: 100, used_minor: 80 });
        let next_day = usage.after_outflow(&limits, at(2026, 2, 1, 0), 100).unwrap();
        assert_eq!(next_day.day_used_minor, 100);
    }

    #[test]
    fn monthly_window_follows_the_calendar() {
        let limits = OutflowLimits { monthly_minor: Some(1_000), ..Default::default() };
        let usage = OutflowUsage::default().after_outflow(&limits, at(2026, 2, 1, 0), 600).unwrap();
        let usage = usage.after_outflow(&limits, at(2026, 2, 28, 23), 400).unwrap();
        assert_eq!(usage.after_outflow(&limits, at(2026, 2, 28, 23), 1).unwrap_err().limit, LimitKind::Monthly);
        assert!(usage.after_outflow(&limits, at(2026, 3, 1, 0), 1_000).is_ok());
    }

    #[test]
    fn per_transaction_limit_is_checked_first() {
        let limits = OutflowLimits { per_transaction_minor: Some(50), daily_minor: Some(10), ..Default::default() };
        let breach = OutflowUsage::default().after_outflow(&limits, 0, 51).unwrap_err();
        assert_eq!(breach.limit, LimitKind::PerTransaction);
    }

    #[test]
    fn refunds_only_reach_the_window_they_were_counted_in() {
        let limits = OutflowLimits { daily_minor: Some(100), monthly_minor: Some(1_000), ..Default::default() };
        let counted_at = at(2026, 5, 10, 12);
        let usage = OutflowUsage::default().after_outflow(&limits, counted_at, 70).unwrap();
        let same_day = usage.after_refund(&limits, counted_at, 30);
        assert_eq!((same_day.day_used_minor, same_day.month_used_minor), (40, 40));
        let later = usage.after_outflow(&limits, at(2026, 5, 11, 1), 10).unwrap();
        let refunded = later.after_refund(&limits, counted_at, 70);
        assert_eq!((refunded.day_used_minor, refunded.month_used_minor), (10, 10));
    }
}
