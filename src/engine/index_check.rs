//! The engine's derived indexes checked against what they index, for tests and fuzzing.
//!
//! `EngineState::check_invariants` sees what a snapshot holds; it cannot see the indexes the
//! engine keeps beside it and rebuilds from it, so a state comparison (live against replayed)
//! does not see them either. The one that matters most is the expiry index: an Active
//! reservation missing from it would never expire and its funds would stay reserved for good
//! (promise 5), while every balance still added up. Each shard is checked under its lock.

use std::collections::BTreeSet;

use uuid::Uuid;

use super::Engine;
use super::reservation::ReservationStatus;
use super::state::InvariantViolation;

impl<S> Engine<S> {
    /// Checks, shard by shard, that the expiry index holds exactly the Active reservations that
    /// can expire (all but those of transactions with their provider), that the map of active
    /// reservations holds only Active ones, and that each user's count of unfinished
    /// transactions matches its transactions.
    pub fn check_indexes(&self) -> Result<(), InvariantViolation> {
        for cell in self.shards.iter() {
            let shard = cell.read();
            let mut expiring: BTreeSet<(i64, Uuid, Uuid)> = BTreeSet::new();
            for (user_id, user) in &shard.users {
                for (reservation_id, reservation) in &user.reservations {
                    if reservation.status != ReservationStatus::Active || reservation.id != *reservation_id {
                        return Err(InvariantViolation::MalformedReservation {
                            reservation_id: *reservation_id,
                            reason: "the map of active reservations holds one that is not Active, or not under its id",
                        });
                    }
                    let held = user
                        .transactions
                        .get(reservation_id)
                        .is_some_and(|transaction| transaction.status.is_with_provider());
                    if !held {
                        expiring.insert((reservation.expires_at_ms, *user_id, *reservation_id));
                    }
                }
                if user.recount_unfinished() != user.unfinished_transactions {
                    return Err(InvariantViolation::UnfinishedCountDrift { user_id: *user_id });
                }
            }
            let indexed: BTreeSet<(i64, Uuid, Uuid)> = shard.expiry.due(i64::MAX).collect();
            if let Some((_, user_id, reservation_id)) = indexed.symmetric_difference(&expiring).next() {
                return Err(InvariantViolation::ExpiryIndexMismatch {
                    user_id: *user_id,
                    reservation_id: *reservation_id,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::operation::DEFAULT_RESERVATION_TTL_MS;
    use crate::engine::shard::LockedShards;
    use crate::engine::test_engine::{NOW_MS, TestEngine};

    /// The check must see an index that lost an entry (the reservation would never expire) and
    /// one that holds an entry too many, though balances and the state agree either way.
    #[test]
    fn a_reservation_missing_from_the_expiry_index_or_one_too_many_is_seen() {
        let TestEngine { engine, account, reservation_id } = TestEngine::with_a_reservation();
        assert_eq!(engine.check_indexes(), Ok(()));
        let shard_index = engine.map.of_user(account.user_id);
        let expires_at_ms = NOW_MS + DEFAULT_RESERVATION_TTL_MS;
        {
            let mut shards = LockedShards::lock(&engine.shards, [shard_index].into_iter().collect());
            assert!(shards.get(shard_index).expiry.remove(expires_at_ms, account.user_id, reservation_id));
        }
        let missing = InvariantViolation::ExpiryIndexMismatch { user_id: account.user_id, reservation_id };
        assert_eq!(engine.check_indexes(), Err(missing));
        assert_eq!(engine.state().check_invariants(), Ok(()), "the state alone cannot tell");
        let stranger = Uuid::from_u128(8);
        {
            let mut shards = LockedShards::lock(&engine.shards, [shard_index].into_iter().collect());
            let expiry = &mut shards.get(shard_index).expiry;
            expiry.insert(expires_at_ms, account.user_id, reservation_id);
            expiry.insert(expires_at_ms, account.user_id, stranger);
        }
        let extra = InvariantViolation::ExpiryIndexMismatch { user_id: account.user_id, reservation_id: stranger };
        assert_eq!(engine.check_indexes(), Err(extra));
    }

    #[test]
    fn a_drifted_count_of_unfinished_transactions_is_seen() {
        let TestEngine { engine, account, .. } = TestEngine::with_a_reservation();
        let shard_index = engine.map.of_user(account.user_id);
        {
            let mut shards = LockedShards::lock(&engine.shards, [shard_index].into_iter().collect());
            if let Some(user) = shards.get(shard_index).users.get_mut(&account.user_id) {
                user.unfinished_transactions += 1;
            }
        }
        assert_eq!(engine.check_indexes(), Err(InvariantViolation::UnfinishedCountDrift { user_id: account.user_id }));
    }
}
