//! Application-side encryption of personal data, and the blind index for lookups by email.
//!
//! Every personal value is sealed with AES-256-GCM under the keyring's active key before it
//! reaches PostgreSQL, with a fresh random 96-bit nonce, and with the owner and field as
//! associated data (so a ciphertext copied to another user's row or field does not open). The
//! row keeps the key version, so values sealed under older keys stay readable while the
//! rotation (`super::rotation`) re-seals them. Keys come only from configuration
//! ([`Keyring::parse`]); the database never sees them.
//!
//! The email's blind index is HMAC-SHA256 of the normalised address under a separate key: equal
//! emails give equal indexes (a unique lookup) without the address being stored anywhere. The
//! index keys are versioned like the data keys: a new email index is made under the active index
//! key, lookups try every configured version, and the rotation re-indexes the old rows.

use std::collections::BTreeMap;

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use thiserror::Error;
use uuid::Uuid;

/// The algorithm name stored with every value.
pub const ALGORITHM: &str = "AES-256-GCM";

/// AES-256 keys and HMAC keys are 32 bytes.
const KEY_BYTES: usize = 32;

/// A GCM nonce is 96 bits.
pub const NONCE_BYTES: usize = 12;

/// The most keys a keyring holds (old versions stay until rotation has re-sealed their rows).
const MAX_KEYS: usize = 64;

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum KeyringError {
    #[error("a key entry must be `version:base64-key` with a positive version")]
    Malformed,
    #[error("key version {0} must decode to exactly 32 bytes of base64")]
    BadKey(i32),
    #[error("key version {0} is listed twice")]
    Duplicate(i32),
    #[error("the active key version {0} is not in the keyring")]
    MissingActive(i32),
    #[error("a keyring holds at most {MAX_KEYS} keys")]
    TooMany,
    #[error("the blind-index keys must be one base64 key or `version:base64-key` entries with positive versions")]
    MalformedIndex,
    #[error("blind-index key version {0} must decode to exactly 32 bytes of base64")]
    BadIndexKey(i32),
    #[error("blind-index key version {0} is listed twice")]
    DuplicateIndex(i32),
    #[error("the active blind-index key version {0} is not configured")]
    MissingActiveIndex(i32),
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error("no key of version {0} is configured; the value cannot be opened")]
    UnknownKeyVersion(i32),
    #[error("a stored value does not open (wrong key, tampered, or moved to another row)")]
    Unsealable,
    #[error("encryption failed")]
    Seal,
    #[error("a stored value uses algorithm {0:?}, not {ALGORITHM}")]
    UnknownAlgorithm(String),
}

/// What kind of data a value is; stored with it so retention and access rules can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sensitivity {
    Pii,
    Financial,
    Document,
}

impl Sensitivity {
    pub fn name(self) -> &'static str {
        match self {
            Sensitivity::Pii => "pii",
            Sensitivity::Financial => "financial",
            Sensitivity::Document => "document",
        }
    }
}

/// One sealed value as stored: ciphertext (with the GCM tag), nonce, and the key that sealed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub key_version: i32,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

/// The data keys by version and the active version new values are sealed under; the blind-index
/// keys by version and the active version new email indexes are made under.
pub struct Keyring {
    keys: BTreeMap<i32, Aes256Gcm>,
    active: i32,
    index_keys: BTreeMap<i32, [u8; KEY_BYTES]>,
    index_active: i32,
    /// The key of `index_active` (also in `index_keys`).
    active_index_key: [u8; KEY_BYTES],
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys themselves.
        formatter
            .debug_struct("Keyring")
            .field("versions", &self.keys.keys().collect::<Vec<_>>())
            .field("active", &self.active)
            .field("index_versions", &self.index_keys.keys().collect::<Vec<_>>())
            .field("index_active", &self.index_active)
            .finish()
    }
}

impl Keyring {
    /// Parses the data keys (`version:base64key` entries separated by commas) and their active
    /// version, and the blind-index keys in the same form and their active version. A blind-index
    /// entry without a version is version 1 (a keyring configured before index keys had versions).
    pub fn parse(entries: &str, active: i32, index_entries: &str, index_active: i32) -> Result<Keyring, KeyringError> {
        let keys: BTreeMap<i32, Aes256Gcm> = versioned_keys(entries, &DATA_KEY_ERRORS)?
            .into_iter()
            .map(|(version, key)| (version, cipher(&key)))
            .collect();
        if !keys.contains_key(&active) {
            return Err(KeyringError::MissingActive(active));
        }
        let index_keys = match decode_key(index_entries) {
            Some(key) => BTreeMap::from([(1, key)]),
            None => versioned_keys(index_entries, &INDEX_KEY_ERRORS)?,
        };
        let active_index_key = *index_keys.get(&index_active).ok_or(KeyringError::MissingActiveIndex(index_active))?;
        Ok(Keyring { keys, active, index_keys, index_active, active_index_key })
    }

    /// A keyring for development and tests only: version 1 is a key derived from a public
    /// string, so anything sealed under it is as good as plaintext. The server logs a warning
    /// whenever it runs with it.
    pub fn development() -> Keyring {
        let data_key: [u8; KEY_BYTES] =
            Sha256::digest(b"diboas-ledger development data key; never use in production").into();
        let index_key: [u8; KEY_BYTES] =
            Sha256::digest(b"diboas-ledger development index key; never use in production").into();
        Keyring {
            keys: BTreeMap::from([(1, cipher(&data_key))]),
            active: 1,
            index_keys: BTreeMap::from([(1, index_key)]),
            index_active: 1,
            active_index_key: index_key,
        }
    }

    /// The version new values are sealed under.
    pub fn active_version(&self) -> i32 {
        self.active
    }

    /// Seals `plaintext` as `field` of `owner` under the active key.
    pub fn seal(&self, owner: Uuid, field: &str, plaintext: &[u8]) -> Result<Sealed, CryptoError> {
        let cipher = self.keys.get(&self.active).ok_or(CryptoError::UnknownKeyVersion(self.active))?;
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let aad = associated_data(owner, field);
        let ciphertext =
            cipher.encrypt(&nonce, Payload { msg: plaintext, aad: &aad }).map_err(|_| CryptoError::Seal)?;
        Ok(Sealed { key_version: self.active, nonce: nonce.to_vec(), ciphertext })
    }

    /// Opens a value sealed as `field` of `owner`, under whichever configured key sealed it.
    pub fn open(&self, owner: Uuid, field: &str, sealed: &Sealed) -> Result<Vec<u8>, CryptoError> {
        let cipher = self.keys.get(&sealed.key_version).ok_or(CryptoError::UnknownKeyVersion(sealed.key_version))?;
        let nonce: [u8; NONCE_BYTES] = sealed.nonce.as_slice().try_into().map_err(|_| CryptoError::Unsealable)?;
        let aad = associated_data(owner, field);
        cipher
            .decrypt(&Nonce::from(nonce), Payload { msg: &sealed.ciphertext, aad: &aad })
            .map_err(|_| CryptoError::Unsealable)
    }

    /// The version new email indexes are made under.
    pub fn index_active_version(&self) -> i32 {
        self.index_active
    }

    /// The blind index of an email under the active index key: HMAC-SHA256 of the trimmed,
    /// lower-cased address.
    pub fn email_index(&self, email: &str) -> Vec<u8> {
        index_under(&self.active_index_key, email)
    }

    /// The email's blind index under every configured index key, for lookups and the
    /// one-user-per-email check while rows under an older key remain.
    pub fn email_indexes(&self, email: &str) -> Vec<Vec<u8>> {
        self.index_keys.values().map(|key| index_under(key, email)).collect()
    }
}

fn index_under(key: &[u8; KEY_BYTES], email: &str) -> Vec<u8> {
    let normalised = email.trim().to_lowercase();
    // HMAC accepts keys of any length, so this cannot fail for a 32-byte key.
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(normalised.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

/// The errors a list of keys reports, so each names the setting it is about.
struct KeyListErrors {
    malformed: KeyringError,
    bad_key: fn(i32) -> KeyringError,
    duplicate: fn(i32) -> KeyringError,
}

const DATA_KEY_ERRORS: KeyListErrors = KeyListErrors {
    malformed: KeyringError::Malformed,
    bad_key: KeyringError::BadKey,
    duplicate: KeyringError::Duplicate,
};

const INDEX_KEY_ERRORS: KeyListErrors = KeyListErrors {
    malformed: KeyringError::MalformedIndex,
    bad_key: KeyringError::BadIndexKey,
    duplicate: KeyringError::DuplicateIndex,
};

/// Parses `version:base64key` entries separated by commas: positive, distinct versions, 32-byte
/// keys, at most [`MAX_KEYS`].
fn versioned_keys(entries: &str, errors: &KeyListErrors) -> Result<BTreeMap<i32, [u8; KEY_BYTES]>, KeyringError> {
    let mut keys = BTreeMap::new();
    for entry in entries.split(',').map(str::trim).filter(|entry| !entry.is_empty()) {
        let (version, key) = entry.split_once(':').ok_or(errors.malformed.clone())?;
        let version: i32 = version.trim().parse().map_err(|_| errors.malformed.clone())?;
        if version <= 0 {
            return Err(errors.malformed.clone());
        }
        let bytes = decode_key(key).ok_or_else(|| (errors.bad_key)(version))?;
        if keys.insert(version, bytes).is_some() {
            return Err((errors.duplicate)(version));
        }
        if keys.len() > MAX_KEYS {
            return Err(KeyringError::TooMany);
        }
    }
    Ok(keys)
}

fn decode_key(text: &str) -> Option<[u8; KEY_BYTES]> {
    BASE64.decode(text.trim()).ok()?.try_into().ok()
}

fn cipher(key: &[u8; KEY_BYTES]) -> Aes256Gcm {
    Aes256Gcm::new(&Key::<Aes256Gcm>::from(*key))
}

/// Binds a ciphertext to its row: the owner's id and the field name.
fn associated_data(owner: Uuid, field: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(16 + field.len());
    aad.extend_from_slice(owner.as_bytes());
    aad.extend_from_slice(field.as_bytes());
    aad
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> String {
        BASE64.encode([byte; KEY_BYTES])
    }

    #[test]
    fn round_trip_and_binding_to_the_row() {
        let keyring = Keyring::parse(&format!("1:{}", key(1)), 1, &key(9), 1).expect("keyring");
        let owner = Uuid::from_u128(7);
        let sealed = keyring.seal(owner, "email", b"ana@example.com").expect("seal");
        assert_ne!(sealed.ciphertext, b"ana@example.com");
        assert_eq!(keyring.open(owner, "email", &sealed).expect("open"), b"ana@example.com");
        assert_eq!(keyring.open(Uuid::from_u128(8), "email", &sealed), Err(CryptoError::Unsealable));
        assert_eq!(keyring.open(owner, "phone", &sealed), Err(CryptoError::Unsealable));
    }

    #[test]
    fn bad_keyrings_are_refused() {
        let one = format!("1:{}", key(1));
        assert_eq!(Keyring::parse("1:short", 1, &key(9), 1).err(), Some(KeyringError::BadKey(1)));
        assert_eq!(Keyring::parse(&one, 2, &key(9), 1).err(), Some(KeyringError::MissingActive(2)));
        assert_eq!(
            Keyring::parse(&format!("1:{},1:{}", key(1), key(2)), 1, &key(9), 1).err(),
            Some(KeyringError::Duplicate(1))
        );
        assert_eq!(Keyring::parse(&format!("0:{}", key(1)), 0, &key(9), 1).err(), Some(KeyringError::Malformed));
        assert_eq!(Keyring::parse(&one, 1, "x", 1).err(), Some(KeyringError::MalformedIndex));
        assert_eq!(Keyring::parse(&one, 1, "1:x", 1).err(), Some(KeyringError::BadIndexKey(1)));
        assert_eq!(Keyring::parse(&one, 1, &key(9), 2).err(), Some(KeyringError::MissingActiveIndex(2)));
        assert_eq!(
            Keyring::parse(&one, 1, &format!("1:{},1:{}", key(8), key(9)), 1).err(),
            Some(KeyringError::DuplicateIndex(1))
        );
    }

    #[test]
    fn email_indexes_follow_the_active_index_key_and_cover_every_version() {
        let single = Keyring::parse(&format!("1:{}", key(1)), 1, &key(8), 1).expect("a bare index key is version 1");
        let both = format!("1:{},2:{}", key(8), key(9));
        let old_active = Keyring::parse(&format!("1:{}", key(1)), 1, &both, 1).expect("keyring");
        let new_active = Keyring::parse(&format!("1:{}", key(1)), 1, &both, 2).expect("keyring");
        let email = "ana@example.com";
        assert_eq!(single.email_index(email), old_active.email_index(email));
        assert_ne!(old_active.email_index(email), new_active.email_index(email));
        assert_eq!(new_active.email_indexes(email), vec![old_active.email_index(email), new_active.email_index(email)]);
        assert_eq!(new_active.index_active_version(), 2);
    }

    #[test]
    fn email_index_ignores_case_and_spaces_only() {
        let keyring = Keyring::development();
        assert_eq!(keyring.email_index(" Ana@Example.com "), keyring.email_index("ana@example.com"));
        assert_ne!(keyring.email_index("ana@example.com"), keyring.email_index("ana@example.org"));
    }
}
