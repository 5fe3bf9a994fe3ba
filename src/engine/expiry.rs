//! A shard's active reservations in the order they expire, for the sweep.
//!
//! An ordered set of (expires_at_ms, user_id, reservation_id): a reservation enters when it
//! opens and leaves when it closes, however it closes (and the undoing of either reverses it);
//! the sweep reads the front.

use std::collections::BTreeSet;

use uuid::Uuid;

/// One shard's (expires_at_ms, user_id, reservation_id) of every Active reservation.
#[derive(Debug, Default)]
pub(crate) struct ExpiryIndex {
    entries: BTreeSet<(i64, Uuid, Uuid)>,
}

impl ExpiryIndex {
    /// A reservation became Active (opened, or its close undone).
    pub fn insert(&mut self, expires_at_ms: i64, user_id: Uuid, reservation_id: Uuid) {
        let inserted = self.entries.insert((expires_at_ms, user_id, reservation_id));
        debug_assert!(inserted, "a reservation entered the expiry index twice");
    }

    /// A reservation stopped being Active (closed, or its opening undone), or stopped expiring
    /// (held at a provider). Returns whether it was in the index: a held one no longer is.
    pub fn remove(&mut self, expires_at_ms: i64, user_id: Uuid, reservation_id: Uuid) -> bool {
        self.entries.remove(&(expires_at_ms, user_id, reservation_id))
    }

    /// Every (expires_at_ms, user_id, reservation_id) due at `now_ms`, earliest first.
    pub fn due(&self, now_ms: i64) -> impl Iterator<Item = (i64, Uuid, Uuid)> + '_ {
        self.entries.iter().copied().take_while(move |(expires_at_ms, _, _)| *expires_at_ms <= now_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_entries_come_earliest_first_and_leave_when_removed() {
        let mut index = ExpiryIndex::default();
        let user = Uuid::from_u128(1);
        let (a, b, c) = (Uuid::from_u128(10), Uuid::from_u128(11), Uuid::from_u128(12));
        index.insert(300, user, a);
        index.insert(200, user, c);
        index.insert(200, user, b);
        assert_eq!(index.due(199).count(), 0);
        assert_eq!(index.due(200).collect::<Vec<_>>(), vec![(200, user, b), (200, user, c)]);
        index.remove(200, user, b);
        assert_eq!(index.due(i64::MAX).collect::<Vec<_>>(), vec![(200, user, c), (300, user, a)]);
        index.remove(200, user, c);
        index.remove(300, user, a);
        assert_eq!(index.due(i64::MAX).count(), 0);
    }
}
