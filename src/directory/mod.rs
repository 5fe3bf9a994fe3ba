//! The directory: users, their encrypted personal data, wallets, domain account records and
//! compliance checks, in PostgreSQL's `directory` schema. Data the ledger owns but the in-memory
//! engine does not need, so it is written directly with sqlx in its own transactions (each with
//! its audit row), not through the engine's journal.
//!
//! - [`model`]: the validated values the store takes and gives.
//! - [`address`]: wallet address validation per chain; private keys refused.
//! - [`encryption`]: AES-256-GCM sealing of personal data, the keyring, the email blind index.
//! - [`store`]: the reads and writes, each in one transaction with its audit or access row.
//! - [`rotation`]: re-sealing values under the active key, in small batches, while serving.

pub mod address;
pub mod encryption;
pub mod model;
pub mod rotation;
pub mod store;

use thiserror::Error;
use uuid::Uuid;

use self::encryption::CryptoError;

#[derive(Debug, Error)]
pub enum DirectoryError {
    #[error("user {0} does not exist")]
    UserNotFound(Uuid),
    #[error("user {0} already exists")]
    UserAlreadyExists(Uuid),
    #[error("another user is registered with this email")]
    EmailAlreadyRegistered,
    #[error("user {user_id} already has a {chain} wallet, or the address belongs to another user")]
    WalletAlreadyRegistered { user_id: Uuid, chain: &'static str },
    #[error("domain account {0} already exists")]
    DomainAccountAlreadyExists(Uuid),
    #[error("user {0}'s personal data was erased")]
    UserErased(Uuid),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// A stored value the directory could not have written (a CHECK this binary does not know).
    #[error("the directory holds an unexpected value: {0}")]
    Corrupt(String),
    #[error("PostgreSQL: {0}")]
    Database(#[from] sqlx::Error),
}

impl DirectoryError {
    /// Whether PostgreSQL could not be reached (retry later) rather than a refusal or a bug.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, DirectoryError::Database(error) if crate::store::is_unavailable(error))
    }
}
