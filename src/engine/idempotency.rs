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
//! holds at most a configured number of keys; a full store refuses new operations rather than
//! forget a live key. Keys are kept in two generations: new keys go into the current one, and
//! once per retention window the sweep retires the previous generation whole and the current
//! one becomes previous. Dropping a whole map is far cheaper than evicting keys one by one, at
//! the price of a looser window: a key is remembered for at least the retention window and at
//! most twice it (plus the sweep interval).
//!
//! Layout, for speed: every request writes a new key, and a store to memory that is not in cache
//! stalls the shard's unlock until it lands. A generation therefore appends its (key, record)
//! entries in order into fixed-size chunks, where consecutive writes share cache lines, and finds
//! them through a hash table of 4-byte positions, small enough to stay in cache. Chunks never
//! move, so a growing generation never copies its records while the shard is locked.

use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher};

use hashbrown::HashTable;
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
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
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

/// Hashes only the key's own bytes, not the unused rest of the inline buffer (which is zeroed,
/// so the derived equality stays consistent with this hash).
impl Hash for IdempotencyKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.bytes[..usize::from(self.len)].hash(state);
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

/// A 64-bit digest of an operation. The store keeps it instead of the operation to tell "the
/// same request again" from "a different request under the same key" at a fraction of the
/// memory. Computed in-process and never persisted (recovery recomputes it from the stored
/// operation), so it may change between builds. Only operations under one key are ever
/// compared, so a false "same" needs a 2^-64 coincidence for that key, and would answer with
/// the first outcome instead of a conflict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct OperationFingerprint(u64);

impl OperationFingerprint {
    pub fn of(operation: &Operation) -> OperationFingerprint {
        OperationFingerprint(foldhash::fast::FixedState::with_seed(0x6964_656d_706f_7431).hash_one(operation))
    }
}

/// What the store remembers about a key: which operation it was, its first outcome, and where
/// it sits in the journal (a replayed answer must also wait for that sequence to be durable).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    pub fingerprint: OperationFingerprint,
    pub outcome: Result<Receipt, EngineError>,
    pub sequence: u64,
    pub recorded_at_ms: i64,
}

impl IdempotencyRecord {
    pub fn new(
        operation: &Operation,
        outcome: Result<Receipt, EngineError>,
        sequence: u64,
        recorded_at_ms: i64,
    ) -> IdempotencyRecord {
        IdempotencyRecord { fingerprint: OperationFingerprint::of(operation), outcome, sequence, recorded_at_ms }
    }
}

/// The outcome as stored: the common receipts inline, anything else (refusals, conversions,
/// batches) boxed, so most requests allocate nothing here.
#[derive(Debug)]
enum StoredOutcome {
    Done,
    Reserved { expires_at_ms: i64 },
    Committed { committed_minor: i128, released_minor: i128 },
    Released { released_minor: i128 },
    Other(Box<Result<Receipt, EngineError>>),
}

#[derive(Debug)]
pub(crate) struct StoredRecord {
    pub fingerprint: OperationFingerprint,
    pub sequence: u64,
    recorded_at_ms: i64,
    outcome: StoredOutcome,
}

impl StoredRecord {
    fn new(record: IdempotencyRecord) -> StoredRecord {
        let outcome = match record.outcome {
            Ok(Receipt::Done) => StoredOutcome::Done,
            Ok(Receipt::Reserved { expires_at_ms }) => StoredOutcome::Reserved { expires_at_ms },
            Ok(Receipt::Committed { committed_minor, released_minor }) => {
                StoredOutcome::Committed { committed_minor, released_minor }
            }
            Ok(Receipt::Released { released_minor }) => StoredOutcome::Released { released_minor },
            other => StoredOutcome::Other(Box::new(other)),
        };
        StoredRecord {
            fingerprint: record.fingerprint,
            sequence: record.sequence,
            recorded_at_ms: record.recorded_at_ms,
            outcome,
        }
    }

    pub fn outcome(&self) -> Result<Receipt, EngineError> {
        match &self.outcome {
            StoredOutcome::Done => Ok(Receipt::Done),
            StoredOutcome::Reserved { expires_at_ms } => Ok(Receipt::Reserved { expires_at_ms: *expires_at_ms }),
            StoredOutcome::Committed { committed_minor, released_minor } => {
                Ok(Receipt::Committed { committed_minor: *committed_minor, released_minor: *released_minor })
            }
            StoredOutcome::Released { released_minor } => Ok(Receipt::Released { released_minor: *released_minor }),
            StoredOutcome::Other(outcome) => outcome.as_ref().clone(),
        }
    }

    pub fn recorded_at_ms(&self) -> i64 {
        self.recorded_at_ms
    }

    fn to_record(&self) -> IdempotencyRecord {
        IdempotencyRecord {
            fingerprint: self.fingerprint,
            outcome: self.outcome(),
            sequence: self.sequence,
            recorded_at_ms: self.recorded_at_ms,
        }
    }
}

/// Entries per chunk of a generation: 256 entries of about 160 bytes, 40 KiB, allocated whole.
const CHUNK_ENTRIES: usize = 256;

/// The keys one generation took, with their records. See the module comment for the layout.
#[derive(Debug, Default)]
pub(crate) struct Generation {
    /// Positions in `chunks` of the live keys, found by the key's hash.
    index: HashTable<u32>,
    /// The entries in the order they were recorded. An entry whose key was moved to a newer
    /// generation (journal replay) stays here, unindexed, until this generation is retired.
    chunks: Vec<Vec<(IdempotencyKey, StoredRecord)>>,
    /// Seeded per generation, so clients cannot choose keys that collide in every process.
    hasher: foldhash::fast::RandomState,
}

impl Generation {
    fn with_capacity(keys: usize) -> Generation {
        Generation { index: HashTable::with_capacity(keys), ..Generation::default() }
    }

    fn len(&self) -> usize {
        self.index.len()
    }

    fn entry(chunks: &[Vec<(IdempotencyKey, StoredRecord)>], position: u32) -> &(IdempotencyKey, StoredRecord) {
        let position = position as usize;
        &chunks[position / CHUNK_ENTRIES][position % CHUNK_ENTRIES]
    }

    fn get(&self, key: &IdempotencyKey) -> Option<&StoredRecord> {
        let hash = self.hasher.hash_one(key);
        self.index
            .find(hash, |&position| Generation::entry(&self.chunks, position).0 == *key)
            .map(|&position| &Generation::entry(&self.chunks, position).1)
    }

    /// Records `key`, which this generation does not hold.
    fn insert(&mut self, key: IdempotencyKey, record: StoredRecord) {
        let full = self.chunks.last().is_none_or(|chunk| chunk.len() == CHUNK_ENTRIES);
        if full {
            self.chunks.push(Vec::with_capacity(CHUNK_ENTRIES));
        }
        let appended = (self.chunks.len() - 1) * CHUNK_ENTRIES + self.chunks.last().map_or(0, Vec::len);
        // A generation holds at most the shard's configured key capacity (checked before every
        // request), far below 2^32 entries of 160 bytes.
        assert!(appended < u32::MAX as usize, "an idempotency generation outgrew 32-bit positions");
        let hash = self.hasher.hash_one(key);
        let Generation { index, chunks, hasher } = self;
        if let Some(chunk) = chunks.last_mut() {
            chunk.push((key, record));
        }
        index.insert_unique(hash, appended as u32, |&position| hasher.hash_one(Generation::entry(chunks, position).0));
    }

    fn remove(&mut self, key: &IdempotencyKey) {
        let hash = self.hasher.hash_one(key);
        let Generation { index, chunks, .. } = self;
        if let Ok(found) = index.find_entry(hash, |&position| Generation::entry(chunks, position).0 == *key) {
            found.remove();
        }
    }

    fn iter(&self) -> impl Iterator<Item = &(IdempotencyKey, StoredRecord)> {
        self.index.iter().map(|&position| Generation::entry(&self.chunks, position))
    }
}

/// One shard's keys in two generations (see the module comment).
#[derive(Debug, Default)]
pub(crate) struct IdempotencyStore {
    current: Generation,
    previous: Generation,
    /// When the current generation started taking keys.
    current_since_ms: i64,
}

impl IdempotencyStore {
    pub(crate) fn get(&self, key: &IdempotencyKey) -> Option<&StoredRecord> {
        self.current.get(key).or_else(|| self.previous.get(key))
    }

    pub(crate) fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    pub(crate) fn insert(&mut self, key: IdempotencyKey, record: IdempotencyRecord) {
        debug_assert!(self.get(&key).is_none(), "an idempotency key is recorded once");
        self.current.insert(key, StoredRecord::new(record));
    }

    /// Records `key`, replacing a forgotten-in-the-live-engine earlier record (journal replay).
    pub(crate) fn replace(&mut self, key: IdempotencyKey, record: IdempotencyRecord) {
        self.previous.remove(&key);
        self.current.remove(&key);
        self.current.insert(key, StoredRecord::new(record));
    }

    /// Starts a new generation if the current one is at least `retention_ms` old at `now_ms`.
    /// Returns the retired generation, for the caller to drop after releasing the shard lock.
    pub(crate) fn rotate(&mut self, now_ms: i64, retention_ms: i64) -> Option<Generation> {
        if now_ms.saturating_sub(self.current_since_ms) < retention_ms {
            return None;
        }
        self.current_since_ms = now_ms;
        // The next generation will likely see as many keys as this one: size its index up front
        // so it does not rehash while requests wait on the shard lock.
        let next = Generation::with_capacity(self.current.len());
        let retired = std::mem::replace(&mut self.previous, std::mem::replace(&mut self.current, next));
        Some(retired)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&IdempotencyKey, IdempotencyRecord)> {
        self.current.iter().chain(self.previous.iter()).map(|(key, record)| (key, record.to_record()))
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

    fn record(sequence: u64) -> IdempotencyRecord {
        IdempotencyRecord {
            fingerprint: OperationFingerprint(sequence.wrapping_mul(31)),
            outcome: Ok(Receipt::Committed { committed_minor: i128::from(sequence), released_minor: 1 }),
            sequence,
            recorded_at_ms: 7,
        }
    }

    fn key(n: u64) -> IdempotencyKey {
        IdempotencyKey::new(&format!("key-{n}")).unwrap()
    }

    /// Several chunks and index growths in each generation; replace moves keys between them;
    /// rotation retires the oldest generation whole.
    #[test]
    fn the_store_finds_every_live_key_across_chunks_generations_and_replacements() {
        let keys = 3 * CHUNK_ENTRIES as u64 + 17;
        let mut store = IdempotencyStore::default();
        for n in 0..keys {
            store.insert(key(n), record(n));
        }
        assert!(store.rotate(1_000, 1_000).is_some_and(|retired| retired.len() == 0));
        for n in keys..2 * keys {
            store.insert(key(n), record(n));
        }
        // Replayed records of old keys move to the current generation, with their new outcome.
        for n in (0..2 * keys).step_by(5) {
            store.replace(key(n), record(n + 1_000_000));
        }
        assert_eq!(store.len() as u64, 2 * keys);
        let expected = |n: u64| if n.is_multiple_of(5) { record(n + 1_000_000) } else { record(n) };
        for n in 0..2 * keys {
            assert_eq!(store.get(&key(n)).map(StoredRecord::to_record), Some(expected(n)), "key {n}");
        }
        assert!(store.get(&key(2 * keys)).is_none());
        let listed: std::collections::BTreeMap<String, IdempotencyRecord> =
            store.iter().map(|(key, record)| (key.as_str().to_owned(), record)).collect();
        assert_eq!(listed.len() as u64, 2 * keys, "each live key listed once");
        assert!(listed.iter().all(|(text, record)| *record == expected(text[4..].parse().unwrap())));

        // The next rotation retires the generation of keys..2*keys, keeping its replaced keys'
        // newer records, which live in the current generation.
        let retired = store.rotate(2_000, 1_000).expect("a generation is due");
        let survivors: Vec<u64> = (0..2 * keys).filter(|n| store.get(&key(*n)).is_some()).collect();
        let replaced_or_new: Vec<u64> = (0..2 * keys).filter(|n| n.is_multiple_of(5) || *n >= keys).collect();
        assert_eq!(survivors, replaced_or_new);
        assert_eq!(retired.len() as u64, keys - keys.div_ceil(5));
    }
}

#[cfg(test)]
mod fingerprint_tests {
    use super::*;
    use crate::engine::account::{Domain, UserAccount};
    use crate::engine::asset::Asset;
    use crate::engine::money::Amount;
    use rust_decimal::Decimal;
    use uuid::Uuid;

    fn convert(price: Decimal, amount_minor: i128) -> Operation {
        let account = |asset| UserAccount { user_id: Uuid::nil(), domain: Domain::Investing, asset };
        Operation::Convert {
            from: account(Asset::USD),
            to: account(Asset::BTC),
            amount: Amount::from_minor(amount_minor).unwrap(),
            price,
            commission_bps: 10,
        }
    }

    #[test]
    fn equal_operations_share_a_fingerprint_and_different_ones_do_not() {
        // 1.0 and 1.00 are the same price: the operations are equal, so must their fingerprints be.
        assert_eq!(convert(Decimal::new(10, 1), 5), convert(Decimal::new(100, 2), 5));
        assert_eq!(
            OperationFingerprint::of(&convert(Decimal::new(10, 1), 5)),
            OperationFingerprint::of(&convert(Decimal::new(100, 2), 5))
        );
        assert_ne!(
            OperationFingerprint::of(&convert(Decimal::ONE, 5)),
            OperationFingerprint::of(&convert(Decimal::ONE, 6))
        );
    }
}
