//! A shard's active reservations in the order they expire, for the sweep.
//!
//! An ordered set of (expires_at_ms, user_id, reservation_id): a reservation enters when it
//! opens and leaves when it closes, however it closes; the sweep reads the front.
//!
//! The ids are kept as `u128`, not `Uuid`: every reserve and every commit walks the tree, and a
//! `Uuid` compares as a byte array while a `u128` compares in two machine words. `Uuid::as_u128`
//! reads the bytes big-endian, so both orders are the same.

use std::collections::BTreeSet;

use uuid::Uuid;

#[derive(Debug, Default)]
pub(crate) struct ExpiryIndex {
    entries: BTreeSet<(i64, u128, u128)>,
}

impl ExpiryIndex {
    pub fn insert(&mut self, expires_at_ms: i64, user_id: Uuid, reservation_id: Uuid) {
        self.entries.insert((expires_at_ms, user_id.as_u128(), reservation_id.as_u128()));
    }

    pub fn remove(&mut self, expires_at_ms: i64, user_id: Uuid, reservation_id: Uuid) {
        self.entries.remove(&(expires_at_ms, user_id.as_u128(), reservation_id.as_u128()));
    }

    /// Every (expires_at_ms, user_id, reservation_id) due at `now_ms`, earliest first.
    pub fn due(&self, now_ms: i64) -> impl Iterator<Item = (i64, Uuid, Uuid)> + '_ {
        self.entries.iter().take_while(move |(expires_at_ms, _, _)| *expires_at_ms <= now_ms).map(
            |&(expires_at_ms, user_id, reservation_id)| {
                (expires_at_ms, Uuid::from_u128(user_id), Uuid::from_u128(reservation_id))
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_entries_come_earliest_first_then_by_ids_in_uuid_order() {
        let mut index = ExpiryIndex::default();
        let user = Uuid::from_u128(1);
        // Ids whose byte order and little-endian word order disagree.
        let (low, high) = (Uuid::from_bytes([0, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]), Uuid::max());
        assert!(low < high);
        index.insert(300, user, low);
        index.insert(200, user, high);
        index.insert(200, user, low);
        assert_eq!(index.due(199).count(), 0);
        assert_eq!(index.due(200).collect::<Vec<_>>(), vec![(200, user, low), (200, user, high)]);
        index.remove(200, user, low);
        assert_eq!(index.due(i64::MAX).collect::<Vec<_>>(), vec![(200, user, high), (300, user, low)]);
        index.remove(200, user, high);
        index.remove(300, user, low);
        assert_eq!(index.due(i64::MAX).count(), 0);
    }
}
