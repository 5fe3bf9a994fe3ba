//! Reservations: funds set aside from `available` for one pending operation.
//!
//! A reservation is Active until it is committed, released or expires; then it is final.
//! An account's `reserved` is always the sum of its Active reservations. Closed reservations
//! are kept at least the retention window (at most about twice it, see `closed`) so a late
//! commit gets "Completed" or "Expired" rather than "not found", then forgotten.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::account::UserAccount;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReservationStatus {
    Active,
    Completed,
    Released,
    Expired,
}

impl ReservationStatus {
    /// The only legal moves: out of Active, to one of the three final states.
    pub fn can_become(self, next: ReservationStatus) -> bool {
        self == ReservationStatus::Active && next != ReservationStatus::Active
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub id: Uuid,
    pub account: UserAccount,
    pub amount_minor: i128,
    /// When it was made; outflow limits refund released amounts to the windows of this time.
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    pub status: ReservationStatus,
    /// When the reservation left Active; `None` while Active.
    pub closed_at_ms: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::ReservationStatus::*;

    #[test]
    fn only_active_moves_and_only_to_a_final_state() {
        for from in [Active, Completed, Released, Expired] {
            for to in [Active, Completed, Released, Expired] {
                assert_eq!(from.can_become(to), from == Active && to != Active, "{from:?} -> {to:?}");
            }
        }
    }
}
