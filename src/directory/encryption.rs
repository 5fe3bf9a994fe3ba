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
//! emails give equal indexes (a unique lookup) without the address being stored anywhere.

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

#[derive(Debug, Error, PartialEq, Eq)]
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
    #[error("the blind-index key must decode to exactly 32 bytes of base64")]
    BadIndexKey,
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

/// The data keys by version, the active version new values are sealed under, and the blind-index key.
pub struct Keyring {
    keys: BTreeMap<i32, Aes256Gcm>,
    active: i32,
    index_key: [u8; KEY_BYTES],
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys themselves.
        formatter
            .debug_struct("Keyring")
            .field("versions", &self.keys.keys().collect::<Vec<_>>())
            .field("active", &self.active)
            .finish()
    }
}

impl Keyring {
    /// Parses `version:base64key` entries separated by commas, the active version, and the
    /// base64 blind-index key.
    pub fn parse(entries: &str, active: i32, index_key: &str) -> Result<Keyring, KeyringError> {
        let mut keys = BTreeMap::new();
        for entry in entries.split(',').map(str::trim).filter(|entry| !entry.is_empty()) {
            let (version, key) = entry.split_once(':').ok_or(KeyringError::Malformed)?;
            let version: i32 = version.trim().parse().map_err(|_| KeyringError::Malformed)?;
            if version <= 0 {
                return Err(KeyringError::Malformed);
            }
            let bytes = decode_key(key).ok_or(KeyringError::BadKey(version))?;
            if keys.insert(version, cipher(&bytes)).is_some() {
                return Err(KeyringError::Duplicate(version));
            }
            if keys.len() > MAX_KEYS {
                return Err(KeyringError::TooMany);
            }
        }
        if !keys.contains_key(&active) {
            return Err(KeyringError::MissingActive(active));
        }
        let index_key = decode_key(index_key).ok_or(KeyringError::BadIndexKey)?;
        Ok(Keyring { keys, active, index_key })
    }

    /// A keyring for development and tests only: version 1 is a key derived from a public
    /// string, so anything sealed under it is as good as plaintext. The server logs a warning
    /// whenever it runs with it.
    pub fn development() -> Keyring {
        let data_key: [u8; KEY_BYTES] =
            Sha256::digest(b"diboas-ledger development data key; never use in production").into();
        let index_key: [u8; KEY_BYTES] =
            Sha256::digest(b"diboas-ledger development index key; never use in production").into();
        Keyring { keys: BTreeMap::from([(1, cipher(&data_key))]), active: 1, index_key }
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

    /// The blind index of an email: HMAC-SHA256 of the trimmed, lower-cased address.
    pub fn email_index(&self, email: &str) -> Vec<u8> {
        let normalised = email.trim().to_lowercase();
        // HMAC accepts keys of any length, so this cannot fail for a 32-byte key.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.index_key)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(normalised.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }
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
        let keyring = Keyring::parse(&format!("1:{}", key(1)), 1, &key(9)).expect("keyring");
        let owner = Uuid::from_u128(7);
        let sealed = keyring.seal(owner, "email", b"ana@example.com").expect("seal");
        assert_ne!(sealed.ciphertext, b"ana@example.com");
        assert_eq!(keyring.open(owner, "email", &sealed).expect("open"), b"ana@example.com");
        assert_eq!(keyring.open(Uuid::from_u128(8), "email", &sealed), Err(CryptoError::Unsealable));
        assert_eq!(keyring.open(owner, "phone", &sealed), Err(CryptoError::Unsealable));
    }

    #[test]
    fn bad_keyrings_are_refused() {
        assert_eq!(Keyring::parse("1:short", 1, &key(9)).err(), Some(KeyringError::BadKey(1)));
        assert_eq!(Keyring::parse(&format!("1:{}", key(1)), 2, &key(9)).err(), Some(KeyringError::MissingActive(2)));
        assert_eq!(
            Keyring::parse(&format!("1:{},1:{}", key(1), key(2)), 1, &key(9)).err(),
            Some(KeyringError::Duplicate(1))
        );
        assert_eq!(Keyring::parse(&format!("0:{}", key(1)), 0, &key(9)).err(), Some(KeyringError::Malformed));
        assert_eq!(Keyring::parse(&format!("1:{}", key(1)), 1, "x").err(), Some(KeyringError::BadIndexKey));
    }

    #[test]
    fn email_index_ignores_case_and_spaces_only() {
        let keyring = Keyring::development();
        assert_eq!(keyring.email_index(" Ana@Example.com "), keyring.email_index("ana@example.com"));
        assert_ne!(keyring.email_index("ana@example.com"), keyring.email_index("ana@example.org"));
    }
}
