//! The entries of one idempotency generation: each key with its first outcome, encoded back to
//! back into fixed-size chunks of bytes.
//!
//! Why bytes: an entry is written once, by the request that brings its key, and read again only
//! if that key comes back. What costs is its size: every new key writes fresh memory, and that
//! stream is what pushes the index and the accounts out of the cache. Encoded, a transfer's
//! entry under a 36-character key takes 71 bytes, where the inline `(key, record)` pair took 160.
//!
//! Layout of one entry, integers little-endian:
//! `key length (1) | key | fingerprint (8) | sequence (8) | recorded_at_ms (8) | outcome tag (1) | outcome`.
//! Common receipts are inline (`Done` takes nothing, `Committed` its two amounts); any other
//! outcome (refusals, conversions, batches, transactions) is kept whole beside the chunks and the
//! entry holds its index.
//!
//! An outcome kept whole may be large: a linked batch's receipts, one per operation, up to
//! `MAX_BATCH_OPERATIONS`. So the store's capacity counts it as one key more for every
//! [`HELD_BYTES_PER_KEY`] bytes it holds ([`EntryArena::extra_keys`]): the key capacity then
//! bounds memory, whatever the outcomes' sizes.
//!
//! Chunks are allocated at their full size and never move, so growing a generation never copies
//! entries while the shard is locked. After each append the memory of the next entry is
//! prefetched, so the shard's next new key finds those lines in cache.

use crate::engine::error::EngineError;
use crate::engine::operation::Receipt;
use crate::engine::prefetch::prefetch_bytes_for_write;

use super::{FirstOutcome, IdempotencyKey, MAX_IDEMPOTENCY_KEY_LEN, OperationFingerprint};

/// Bytes per chunk: large enough that the rare new chunk costs little, small enough that an
/// idle generation holds little memory.
const CHUNK_BYTES: usize = 1 << 16;

/// The longest outcome encoding: a tag and two 16-byte amounts.
const MAX_OUTCOME_BYTES: usize = 1 + 32;

/// The longest entry: a 64-byte key and the longest outcome.
pub(crate) const MAX_ENTRY_BYTES: usize = 1 + MAX_IDEMPOTENCY_KEY_LEN + 3 * 8 + MAX_OUTCOME_BYTES;

/// What an outcome kept whole (`others`) may hold before it counts as a further key against the
/// store's capacity: about what an inline entry and its index slot take.
pub(crate) const HELD_BYTES_PER_KEY: usize = 96;

/// Positions are 32-bit byte offsets with `u32::MAX` kept free (the index stores `position + 1`).
/// A generation stops short of that; `MAX_IDEMPOTENCY_CAPACITY_PER_SHARD` keeps a full
/// generation well inside it.
pub(crate) const MAX_BYTES: usize = u32::MAX as usize - CHUNK_BYTES;

const TAG_DONE: u8 = 0;
const TAG_RESERVED: u8 = 1;
const TAG_COMMITTED: u8 = 2;
const TAG_RELEASED: u8 = 3;
const TAG_OTHER: u8 = 4;

/// A first outcome as stored, borrowed from its generation.
#[derive(Debug, Clone, Copy)]
pub(crate) enum StoredOutcome<'g> {
    Done,
    Reserved { expires_at_ms: i64 },
    Committed { committed_minor: i128, released_minor: i128 },
    Released { released_minor: i128 },
    Other(&'g Result<Receipt, EngineError>),
}

impl StoredOutcome<'_> {
    pub fn to_owned(self) -> Result<Receipt, EngineError> {
        match self {
            StoredOutcome::Done => Ok(Receipt::Done),
            StoredOutcome::Reserved { expires_at_ms } => Ok(Receipt::Reserved { expires_at_ms }),
            StoredOutcome::Committed { committed_minor, released_minor } => {
                Ok(Receipt::Committed { committed_minor, released_minor })
            }
            StoredOutcome::Released { released_minor } => Ok(Receipt::Released { released_minor }),
            StoredOutcome::Other(outcome) => outcome.clone(),
        }
    }
}

/// One decoded entry.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StoredRecord<'g> {
    pub fingerprint: OperationFingerprint,
    pub sequence: u64,
    pub recorded_at_ms: i64,
    pub outcome: StoredOutcome<'g>,
}

#[derive(Debug, Default)]
pub(super) struct EntryArena {
    chunks: Vec<Vec<u8>>,
    /// Outcomes without an inline encoding, by the index their entries hold.
    others: Vec<Result<Receipt, EngineError>>,
    /// Bytes taken, counting the unused tail each full chunk was left with.
    bytes: usize,
    /// What `others` holds, in keys beyond one per entry (see [`HELD_BYTES_PER_KEY`]).
    extra_keys: usize,
}

impl EntryArena {
    /// Whether one more entry of any size fits below [`MAX_BYTES`].
    pub fn has_room(&self) -> bool {
        self.bytes + CHUNK_BYTES <= MAX_BYTES
    }

    /// The keys the outcomes kept whole count for beyond their own entries: their bytes over
    /// [`HELD_BYTES_PER_KEY`]. Entries no longer indexed (a key moved on in a replay) still
    /// count, as their outcomes are still held.
    pub fn extra_keys(&self) -> usize {
        self.extra_keys
    }

    /// Chunks allocated so far.
    #[cfg(test)]
    pub fn chunks(&self) -> usize {
        self.chunks.len()
    }

    /// Appends `key`'s entry and returns its position. The caller checks `has_room` first.
    pub fn append(&mut self, key: &IdempotencyKey, first: FirstOutcome<'_>) -> u32 {
        assert!(self.has_room(), "an idempotency generation outgrew its 32-bit positions");
        // Encoded on the stack at fixed offsets (the whole inline key buffer is copied, then
        // overwritten past the key's end), then copied into the chunk at once: one capacity
        // check and one copy instead of one per field.
        let mut entry = Encoder { bytes: [0; MAX_ENTRY_BYTES + MAX_IDEMPOTENCY_KEY_LEN], len: 0 };
        entry.put([key.len]);
        entry.bytes[1..1 + MAX_IDEMPOTENCY_KEY_LEN].copy_from_slice(&key.bytes);
        entry.len += usize::from(key.len);
        entry.put(first.fingerprint.0.to_le_bytes());
        entry.put(first.sequence.to_le_bytes());
        entry.put(first.recorded_at_ms.to_le_bytes());
        match first.outcome {
            Ok(Receipt::Done) => entry.put([TAG_DONE]),
            Ok(Receipt::Reserved { expires_at_ms }) => {
                entry.put([TAG_RESERVED]);
                entry.put(expires_at_ms.to_le_bytes());
            }
            Ok(Receipt::Committed { committed_minor, released_minor }) => {
                entry.put([TAG_COMMITTED]);
                entry.put(committed_minor.to_le_bytes());
                entry.put(released_minor.to_le_bytes());
            }
            Ok(Receipt::Released { released_minor }) => {
                entry.put([TAG_RELEASED]);
                entry.put(released_minor.to_le_bytes());
            }
            other => {
                entry.put([TAG_OTHER]);
                entry.put((self.others.len() as u32).to_le_bytes());
                self.extra_keys += held_bytes(other) / HELD_BYTES_PER_KEY;
                self.others.push(other.clone());
            }
        }
        let len = entry.len;
        debug_assert!(len <= MAX_ENTRY_BYTES);
        let fits = self.chunks.last().is_some_and(|chunk| chunk.len() + len <= CHUNK_BYTES);
        if !fits {
            if let Some(full) = self.chunks.last() {
                self.bytes += CHUNK_BYTES - full.len();
            }
            self.chunks.push(Vec::with_capacity(CHUNK_BYTES));
        }
        let chunk_index = self.chunks.len() - 1;
        let chunk = &mut self.chunks[chunk_index];
        let position = chunk_index * CHUNK_BYTES + chunk.len();
        chunk.extend_from_slice(&entry.bytes[..len]);
        self.bytes += len;
        debug_assert!(chunk.capacity() == CHUNK_BYTES, "chunks never reallocate");
        if chunk.len() + MAX_ENTRY_BYTES <= CHUNK_BYTES {
            prefetch_bytes_for_write(chunk.as_ptr_range().end, MAX_ENTRY_BYTES);
        }
        position as u32
    }

    fn bytes_at(&self, position: u32) -> &[u8] {
        let position = position as usize;
        &self.chunks[position / CHUNK_BYTES][position % CHUNK_BYTES..]
    }

    /// The key of the entry at `position`.
    pub fn key(&self, position: u32) -> &[u8] {
        let bytes = self.bytes_at(position);
        &bytes[1..1 + usize::from(bytes[0])]
    }

    /// The record of the entry at `position`.
    pub fn record(&self, position: u32) -> StoredRecord<'_> {
        let bytes = self.bytes_at(position);
        let mut reader = Reader { bytes, at: 1 + usize::from(bytes[0]) };
        let fingerprint = OperationFingerprint(u64::from_le_bytes(reader.take()));
        let sequence = u64::from_le_bytes(reader.take());
        let recorded_at_ms = i64::from_le_bytes(reader.take());
        let [tag] = reader.take();
        let outcome = match tag {
            TAG_DONE => StoredOutcome::Done,
            TAG_RESERVED => StoredOutcome::Reserved { expires_at_ms: i64::from_le_bytes(reader.take()) },
            TAG_COMMITTED => StoredOutcome::Committed {
                committed_minor: i128::from_le_bytes(reader.take()),
                released_minor: i128::from_le_bytes(reader.take()),
            },
            TAG_RELEASED => StoredOutcome::Released { released_minor: i128::from_le_bytes(reader.take()) },
            TAG_OTHER => StoredOutcome::Other(&self.others[u32::from_le_bytes(reader.take()) as usize]),
            unknown => unreachable!("idempotency entry with outcome tag {unknown}: the arena only writes known tags"),
        };
        StoredRecord { fingerprint, sequence, recorded_at_ms, outcome }
    }
}

/// The memory an outcome kept whole takes: its slot in `others` and what it owns on the heap.
fn held_bytes(outcome: &Result<Receipt, EngineError>) -> usize {
    std::mem::size_of::<Result<Receipt, EngineError>>()
        + match outcome {
            Ok(receipt) => receipt_heap_bytes(receipt),
            Err(error) => error_heap_bytes(error),
        }
}

fn receipt_heap_bytes(receipt: &Receipt) -> usize {
    match receipt {
        Receipt::Batch { receipts } => {
            receipts.len() * std::mem::size_of::<Receipt>() + receipts.iter().map(receipt_heap_bytes).sum::<usize>()
        }
        _ => 0,
    }
}

fn error_heap_bytes(error: &EngineError) -> usize {
    match error {
        EngineError::BatchOperationFailed { cause, .. } => std::mem::size_of::<EngineError>() + error_heap_bytes(cause),
        EngineError::IdempotencyConflict { key: text }
        | EngineError::InvalidAccountConfig { reason: text }
        | EngineError::InvalidTransaction { reason: text } => text.len(),
        _ => 0,
    }
}

/// An entry being encoded. The buffer has room for a whole inline key buffer past the longest
/// entry's start, so the key can be copied at its fixed size.
struct Encoder {
    bytes: [u8; MAX_ENTRY_BYTES + MAX_IDEMPOTENCY_KEY_LEN],
    len: usize,
}

impl Encoder {
    fn put<const N: usize>(&mut self, field: [u8; N]) {
        self.bytes[self.len..self.len + N].copy_from_slice(&field);
        self.len += N;
    }
}

struct Reader<'b> {
    bytes: &'b [u8],
    at: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        out.copy_from_slice(&self.bytes[self.at..self.at + N]);
        self.at += N;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(text: &str) -> IdempotencyKey {
        IdempotencyKey::new(text).unwrap()
    }

    /// Every kind of outcome, at the largest amounts, under keys of every length; across chunk
    /// boundaries, so an entry that does not fit starts the next chunk.
    #[test]
    fn entries_read_back_as_written_across_chunks() {
        let outcomes = [
            Ok(Receipt::Done),
            Ok(Receipt::Reserved { expires_at_ms: i64::MIN }),
            Ok(Receipt::Committed { committed_minor: i128::MAX, released_minor: i128::MIN }),
            Ok(Receipt::Released { released_minor: -1 }),
            Ok(Receipt::Batch { receipts: vec![Receipt::Done] }),
            Err(EngineError::SameAccount),
        ];
        let mut arena = EntryArena::default();
        let mut written = Vec::new();
        for n in 0..3 * CHUNK_BYTES / 40 {
            let text = "k".repeat(1 + n % MAX_IDEMPOTENCY_KEY_LEN);
            let outcome = outcomes[n % outcomes.len()].clone();
            let fingerprint = OperationFingerprint(n as u64 ^ u64::MAX);
            let first =
                FirstOutcome { fingerprint, sequence: n as u64, recorded_at_ms: -(n as i64), outcome: &outcome };
            let position = arena.append(&key(&text), first);
            written.push((position, text, fingerprint, n, outcome));
        }
        assert!(arena.chunks.len() >= 3);
        assert!(arena.chunks.iter().all(|chunk| chunk.capacity() == CHUNK_BYTES));
        for (position, text, fingerprint, n, outcome) in written {
            assert_eq!(arena.key(position), text.as_bytes());
            let record = arena.record(position);
            assert_eq!(record.fingerprint, fingerprint);
            assert_eq!(record.sequence, n as u64);
            assert_eq!(record.recorded_at_ms, -(n as i64));
            assert_eq!(record.outcome.to_owned(), outcome);
        }
    }

    /// A batch's receipts count against the capacity by their size; an inline receipt, or a
    /// small outcome kept whole, counts as its own key only.
    #[test]
    fn outcomes_kept_whole_count_as_keys_by_their_size() {
        let append = |arena: &mut EntryArena, text: &str, outcome: Result<Receipt, EngineError>| {
            let first = FirstOutcome {
                fingerprint: OperationFingerprint(1),
                sequence: 2,
                recorded_at_ms: 3,
                outcome: &outcome,
            };
            arena.append(&key(text), first);
        };
        let mut arena = EntryArena::default();
        append(&mut arena, "inline", Ok(Receipt::Done));
        append(&mut arena, "small", Err(EngineError::SameAccount));
        assert_eq!(arena.extra_keys(), 0);
        let receipts = vec![Receipt::Committed { committed_minor: 1, released_minor: 0 }; 8_192];
        let batch_bytes = held_bytes(&Ok(Receipt::Batch { receipts: receipts.clone() }));
        assert!(batch_bytes >= 8_192 * std::mem::size_of::<Receipt>());
        append(&mut arena, "batch", Ok(Receipt::Batch { receipts }));
        assert_eq!(arena.extra_keys(), batch_bytes / HELD_BYTES_PER_KEY);
        let nested = Ok(Receipt::Batch { receipts: vec![Receipt::Batch { receipts: vec![Receipt::Done; 1_000] }] });
        assert!(held_bytes(&nested) >= 1_000 * std::mem::size_of::<Receipt>());
    }

    #[test]
    fn the_longest_entry_fits_its_bound() {
        let mut arena = EntryArena::default();
        let long = "x".repeat(MAX_IDEMPOTENCY_KEY_LEN);
        let outcome = Ok(Receipt::Committed { committed_minor: 1, released_minor: 2 });
        arena.append(
            &key(&long),
            FirstOutcome { fingerprint: OperationFingerprint(1), sequence: 2, recorded_at_ms: 3, outcome: &outcome },
        );
        assert_eq!(arena.chunks[0].len(), MAX_ENTRY_BYTES);
    }
}
