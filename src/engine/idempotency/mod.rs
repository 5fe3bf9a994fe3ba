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
//! holds at most a configured number of keys, a large outcome counting as several (see `load`);
//! a full store refuses new operations rather than forget a live key. Keys are kept in two
//! generations: new keys go into the current one, and once per retention window the sweep
//! retires the previous generation whole and the current one becomes previous. Dropping a whole map is far cheaper than evicting keys one by one, at
//! the price of a looser window: a key is remembered for at least the retention window and at
//! most twice it (plus the sweep interval).
//!
//! Layout, for speed: every request writes a new key, and a store to memory that is not in cache
//! stalls the shard's unlock until it lands. A generation therefore appends its (key, record)
//! entries in order into fixed-size chunks, where consecutive writes share cache lines, and finds
//! them through a hash table of 8-byte slots (position and hash bits), far smaller than the
//! entries. Chunks never move, so a growing generation never copies its records while the shard
//! is locked. Each append prefetches the memory of the chunk's next entry, so that the next new
//! key of the shard finds those lines in cache. A new key's entry is written once its request is
//! recorded; a request that fails to record (or panics) leaves no trace of its key.

use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::error::EngineError;
use super::operation::{Operation, Receipt};

mod entries;
mod fingerprint;

use self::entries::EntryArena;
pub(crate) use self::entries::StoredRecord;
pub(crate) use self::entries::{MAX_BYTES as MAX_GENERATION_BYTES, MAX_ENTRY_BYTES};
pub use self::fingerprint::OperationFingerprint;
use super::generations::{self, Generation as _, Generations};
use super::position_index::PositionIndex;

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

    /// The key's bytes: what the store compares and keeps.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
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
        self.as_bytes().hash(state);
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

/// What the store remembers about a key: which operation it was, its first outcome, and where
/// it sits in the journal (a replayed answer must also wait for that sequence to be durable).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    pub fingerprint: OperationFingerprint,
    pub outcome: Result<Receipt, EngineError>,
    pub sequence: u64,
    pub recorded_at_ms: i64,
}

/// A first outcome on its way into the store, borrowed from the request that produced it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FirstOutcome<'o> {
    pub fingerprint: OperationFingerprint,
    pub sequence: u64,
    pub recorded_at_ms: i64,
    pub outcome: &'o Result<Receipt, EngineError>,
}

impl IdempotencyRecord {
    pub(crate) fn borrowed(&self) -> FirstOutcome<'_> {
        FirstOutcome {
            fingerprint: self.fingerprint,
            sequence: self.sequence,
            recorded_at_ms: self.recorded_at_ms,
            outcome: &self.outcome,
        }
    }

    pub fn new(
        operation: &Operation,
        outcome: Result<Receipt, EngineError>,
        sequence: u64,
        recorded_at_ms: i64,
    ) -> IdempotencyRecord {
        IdempotencyRecord { fingerprint: OperationFingerprint::of(operation), outcome, sequence, recorded_at_ms }
    }
}

/// Hashes keys for the engine: one hash per request picks the key's shard (`ShardMap::of_key`)
/// and finds the key in that shard's store. Seeded at random once per engine, so clients cannot
/// choose keys that collide in every process; a replay within the engine places keys the same way.
#[derive(Debug, Clone, Default)]
pub(crate) struct KeyHasher(foldhash::fast::RandomState);

impl KeyHasher {
    pub fn hash(&self, key: &IdempotencyKey) -> KeyHash {
        KeyHash(self.0.hash_one(key))
    }
}

/// A key's hash by the engine's [`KeyHasher`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KeyHash(pub u64);

/// The keys one generation took, with their first outcomes. See the module comment.
#[derive(Debug, Default)]
pub(crate) struct Generation {
    /// Where the live keys' entries are, found by the key's hash.
    index: PositionIndex,
    /// The entries in the order they were recorded. An entry whose key was moved to a newer
    /// generation (journal replay) stays here, unindexed, until this generation is retired.
    entries: EntryArena,
}

impl generations::Generation for Generation {
    fn with_capacity(keys: usize) -> Generation {
        Generation { index: PositionIndex::with_capacity(keys), entries: EntryArena::default() }
    }

    fn len(&self) -> usize {
        self.index.len()
    }
}

impl Generation {
    /// The keys this generation counts for against the store's capacity: its live keys, and as
    /// many more as its large outcomes take (see `entries::HELD_BYTES_PER_KEY`).
    fn load(&self) -> usize {
        self.index.len() + self.entries.extra_keys()
    }

    fn position(&self, key: &IdempotencyKey, hash: KeyHash) -> Option<u32> {
        let key = key.as_bytes();
        self.index.find(hash.0, |position| self.entries.key(position) == key)
    }

    fn get(&self, key: &IdempotencyKey, hash: KeyHash) -> Option<StoredRecord<'_>> {
        self.position(key, hash).map(|position| self.entries.record(position))
    }

    /// Records `key`, which this generation does not hold.
    fn insert(&mut self, key: &IdempotencyKey, hash: KeyHash, first: FirstOutcome<'_>) {
        let position = self.entries.append(key, first);
        self.index.insert(hash.0, position);
    }

    fn remove(&mut self, key: &IdempotencyKey, hash: KeyHash) {
        let Generation { index, entries } = self;
        let key = key.as_bytes();
        index.remove(hash.0, |position| entries.key(position) == key);
    }

    fn iter(&self) -> impl Iterator<Item = (IdempotencyKey, IdempotencyRecord)> + '_ {
        self.index.positions().map(|position| {
            let key = std::str::from_utf8(self.entries.key(position))
                .ok()
                .and_then(|text| IdempotencyKey::new(text).ok())
                .unwrap_or_else(|| unreachable!("only validated keys are stored"));
            (key, self.entries.record(position).to_record())
        })
    }
}

/// One shard's keys in two generations (see the module comment).
#[derive(Debug, Default)]
pub(crate) struct IdempotencyStore {
    generations: Generations<Generation>,
}

impl IdempotencyStore {
    /// Asks for the index lines a lookup of `hash` will read, in both generations, so that the
    /// two cache misses overlap each other and the work done before the lookup.
    pub(crate) fn prefetch(&self, hash: KeyHash) {
        self.generations.current.index.address().prefetch(hash.0);
        self.generations.previous.index.address().prefetch(hash.0);
    }

    pub(crate) fn get(&self, key: &IdempotencyKey, hash: KeyHash) -> Option<StoredRecord<'_>> {
        self.generations.current.get(key, hash).or_else(|| self.generations.previous.get(key, hash))
    }

    pub(crate) fn len(&self) -> usize {
        self.generations.current.len() + self.generations.previous.len()
    }

    /// What the store counts against its capacity: its keys, plus one for every
    /// `HELD_BYTES_PER_KEY` bytes of outcomes kept whole (a linked batch's receipts), so that
    /// the capacity bounds the store's memory and not only its number of keys.
    pub(crate) fn load(&self) -> usize {
        self.generations.current.load() + self.generations.previous.load()
    }

    /// Whether one more key can be recorded. The engine's capacity check keeps a generation far
    /// below the entries' position space; this is the last guard, checked before a request runs,
    /// because a key's entry is written after its record is journaled, when nothing may fail.
    pub(crate) fn has_room(&self) -> bool {
        self.generations.current.entries.has_room()
    }

    pub(crate) fn insert(&mut self, key: &IdempotencyKey, hash: KeyHash, first: FirstOutcome<'_>) {
        debug_assert!(self.get(key, hash).is_none(), "an idempotency key is recorded once");
        self.generations.current.insert(key, hash, first);
    }

    /// Records `key`, replacing a forgotten-in-the-live-engine earlier record (journal replay).
    pub(crate) fn replace(&mut self, key: &IdempotencyKey, hash: KeyHash, first: FirstOutcome<'_>) {
        self.generations.previous.remove(key, hash);
        self.generations.current.remove(key, hash);
        self.generations.current.insert(key, hash, first);
    }

    /// See [`Generations::rotate`].
    pub(crate) fn rotate(&mut self, now_ms: i64, retention_ms: i64) -> Option<Generation> {
        self.generations.rotate(now_ms, retention_ms)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (IdempotencyKey, IdempotencyRecord)> + '_ {
        self.generations.current.iter().chain(self.generations.previous.iter())
    }
}

impl StoredRecord<'_> {
    pub fn outcome(&self) -> Result<Receipt, EngineError> {
        self.outcome.to_owned()
    }

    fn to_record(self) -> IdempotencyRecord {
        IdempotencyRecord {
            fingerprint: self.fingerprint,
            outcome: self.outcome.to_owned(),
            sequence: self.sequence,
            recorded_at_ms: self.recorded_at_ms,
        }
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
        // Entries of this test take about 60 bytes: 3,000 of them fill more than two chunks.
        let keys = 3_000;
        let hasher = KeyHasher::default();
        let hash = |n: u64| hasher.hash(&key(n));
        let mut store = IdempotencyStore::default();
        for n in 0..keys {
            store.insert(&key(n), hash(n), record(n).borrowed());
        }
        assert!(store.generations.current.entries.chunks() > 2);
        assert!(store.rotate(1_000, 1_000).is_some_and(|retired| retired.len() == 0));
        for n in keys..2 * keys {
            store.insert(&key(n), hash(n), record(n).borrowed());
        }
        // Replayed records of old keys move to the current generation, with their new outcome.
        for n in (0..2 * keys).step_by(5) {
            store.replace(&key(n), hash(n), record(n + 1_000_000).borrowed());
        }
        assert_eq!(store.len() as u64, 2 * keys);
        let expected = |n: u64| if n.is_multiple_of(5) { record(n + 1_000_000) } else { record(n) };
        for n in 0..2 * keys {
            assert_eq!(store.get(&key(n), hash(n)).map(StoredRecord::to_record), Some(expected(n)), "key {n}");
        }
        assert!(store.get(&key(2 * keys), hash(2 * keys)).is_none());
        let listed: std::collections::BTreeMap<String, IdempotencyRecord> =
            store.iter().map(|(key, record)| (key.as_str().to_owned(), record)).collect();
        assert_eq!(listed.len() as u64, 2 * keys, "each live key listed once");
        assert!(listed.iter().all(|(text, record)| *record == expected(text[4..].parse().unwrap())));

        // The next rotation retires the generation of keys..2*keys, keeping its replaced keys'
        // newer records, which live in the current generation.
        let retired = store.rotate(2_000, 1_000).expect("a generation is due");
        let survivors: Vec<u64> = (0..2 * keys).filter(|n| store.get(&key(*n), hash(*n)).is_some()).collect();
        let replaced_or_new: Vec<u64> = (0..2 * keys).filter(|n| n.is_multiple_of(5) || *n >= keys).collect();
        assert_eq!(survivors, replaced_or_new);
        assert_eq!(retired.len() as u64, keys - keys.div_ceil(5));
    }

    /// Keys are told apart by their bytes even when their hashes are equal, and a slot's tag
    /// is consulted: a probe that reaches a key's home slot with another tag must not find it.
    #[test]
    fn keys_under_one_hash_are_told_apart_by_their_bytes_and_slots_by_their_tags() {
        let hasher = KeyHasher::default();
        let mut store = IdempotencyStore::default();
        let shared = hasher.hash(&key(1));
        store.insert(&key(1), shared, record(1).borrowed());
        assert!(store.get(&key(2), shared).is_none());
        store.replace(&key(2), shared, record(2).borrowed());
        assert_eq!(store.get(&key(1), shared).map(StoredRecord::to_record), Some(record(1)), "replace kept key 1");
        assert_eq!(store.get(&key(2), shared).map(StoredRecord::to_record), Some(record(2)));
        // Bit 20 is not a home-slot bit (the table is tiny) but is a tag bit.
        assert!(store.get(&key(1), KeyHash(shared.0 ^ (1 << 20))).is_none());
    }
}
