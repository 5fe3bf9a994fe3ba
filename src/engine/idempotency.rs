//! Idempotency keys and the per-shard store of first outcomes.
//!
//! Every mutating request carries a key chosen by the caller. The first request with a key
//! is executed and its outcome (success or refusal) is remembered with the operation; a
//! retry with the same key and the same operation gets that outcome back and changes
//! nothing; the same key with a different operation is refused. Keys live in the shard
//! chosen by hashing the key, locked together with the operation's own shards, so the
//! check and the operation are one atomic step.
//!
//! Limits: a key is 1..=64 printable ASCII bytes, stored inline (no allocation); each shard
//! holds at most a configured number of keys; keys are forgotten once older than the
//! retention window. A full store refuses new operations rather than forget a live key.

use std::collections::{HashMap, VecDeque};
use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::error::EngineError;
use super::operation::{Operation, Receipt};

/// The longest idempotency key accepted, in bytes.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum IdempotencyKeyError {
    #[error("idempotency key is empty")]
    Empty,
    #[error("idempotency key is longer than {MAX_IDEMPOTENCY_KEY_LEN} bytes")]
    TooLong,
    #[error("idempotency key may contain only printable ASCII characters")]
    NotPrintable,
}

/// A validated idempotency key, stored inline so copying it never allocates.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdempotencyKey {
    len: u8,
    bytes: [u8; MAX_IDEMPOTENCY_KEY_LEN],
}

impl IdempotencyKey {
    pub fn new(text: &str) -> Result<IdempotencyKey, IdempotencyKeyError> {
        if text.is_empty() {
            return Err(IdempotencyKeyError::Empty);
        }
        if text.len() > MAX_IDEMPOTENCY_KEY_LEN {
            return Err(IdempotencyKeyError::TooLong);
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(IdempotencyKeyError::NotPrintable);
        }
        let mut bytes = [0; MAX_IDEMPOTENCY_KEY_LEN];
        bytes[..text.len()].copy_from_slice(text.as_bytes());
        Ok(IdempotencyKey { len: text.len() as u8, bytes })
    }

    pub fn as_str(&self) -> &str {
        // Only printable ASCII is ever stored, which is valid UTF-8.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for IdempotencyKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for IdempotencyKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        IdempotencyKey::new(&text).map_err(serde::de::Error::custom)
    }
}

/// What the store remembers about a key: the operation, its first outcome, and where it sits
/// in the journal (a replayed answer must also wait for that sequence to be durable).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    pub operation: Operation,
    pub outcome: Result<Receipt, EngineError>,
    pub sequence: u64,
    pub recorded_at_ms: i64,
}

/// One shard's keys, with their insertion order for eviction by age.
#[derive(Debug, Default)]
pub(crate) struct IdempotencyStore {
    records: HashMap<IdempotencyKey, IdempotencyRecord, foldhash::fast::RandomState>,
    by_age: VecDeque<(i64, IdempotencyKey)>,
}

impl IdempotencyStore {
    pub(crate) fn get(&self, key: &IdempotencyKey) -> Option<&IdempotencyRecord> {
        self.records.get(key)
    }

    pub(crate) fn len(&self) -> usize {
        self.records.len()
    }

    pub(crate) fn insert(&mut self, key: IdempotencyKey, record: IdempotencyRecord) {
        self.by_age.push_back((record.recorded_at_ms, key));
        let previous = self.records.insert(key, record);
        debug_assert!(previous.is_none(), "an idempotency key is recorded once");
    }

    /// Forgets keys recorded at or before `cutoff_ms`; returns how many were forgotten.
    /// Callers pass times that only move forward in practice; a record that arrived slightly
    /// out of order is simply forgotten on a later sweep.
    pub(crate) fn forget_recorded_before(&mut self, cutoff_ms: i64) -> usize {
        let mut forgotten = 0;
        while let Some(&(recorded_at_ms, key)) = self.by_age.front() {
            if recorded_at_ms > cutoff_ms {
                break;
            }
            self.by_age.pop_front();
            if self.records.remove(&key).is_some() {
                forgotten += 1;
            }
        }
        forgotten
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&IdempotencyKey, &IdempotencyRecord)> {
        self.records.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_bounded_and_printable() {
        assert!(IdempotencyKey::new("order-42/attempt").is_ok());
        assert_eq!(IdempotencyKey::new(""), Err(IdempotencyKeyError::Empty));
        assert_eq!(IdempotencyKey::new(&"k".repeat(65)), Err(IdempotencyKeyError::TooLong));
        assert!(IdempotencyKey::new(&"k".repeat(64)).is_ok());
        assert_eq!(IdempotencyKey::new("has space"), Err(IdempotencyKeyError::NotPrintable));
        assert_eq!(IdempotencyKey::new("naïve"), Err(IdempotencyKeyError::NotPrintable));
        assert_eq!(IdempotencyKey::new("tab\t"), Err(IdempotencyKeyError::NotPrintable));
        assert_eq!(IdempotencyKey::new("abc").unwrap().as_str(), "abc");
    }
}
