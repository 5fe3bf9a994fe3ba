//! Wallet address and public-key validation per chain, and the refusal of anything that looks
//! like a private key (the ledger is non-custodial: it must never hold one).
//!
//! - Bitcoin: bech32/bech32m segwit (`bc1...`: lower or upper case, bech32 charset, 14 to 74
//!   characters) or base58check legacy / P2SH (`1...`/`3...`: base58, 25 bytes decoded, the
//!   double-SHA-256 checksum matching).
//! - Ethereum: `0x` and 40 hex digits; mixed case must carry a valid EIP-55 checksum.
//! - Solana: base58 of exactly 32 bytes.
//! - Sui: `0x` and 64 hex digits.

use sha2::{Digest, Sha256};
use sha3::Keccak256;
use thiserror::Error;

use crate::engine::asset::Chain;

/// Longest address or public key text accepted (a bech32 address is at most 90 characters).
pub const MAX_ADDRESS_LEN: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AddressError {
    #[error("is empty")]
    Empty,
    #[error("is longer than {MAX_ADDRESS_LEN} characters")]
    TooLong,
    #[error("is not a {chain} address: {why}")]
    Malformed { chain: &'static str, why: &'static str },
    #[error("fails its checksum")]
    Checksum,
    #[error("looks like a private key; wallets are non-custodial and private keys are never accepted")]
    PrivateKey,
}

/// Checks `address` for `chain`.
pub fn validate_address(chain: Chain, address: &str) -> Result<(), AddressError> {
    if address.is_empty() {
        return Err(AddressError::Empty);
    }
    if address.len() > MAX_ADDRESS_LEN {
        return Err(AddressError::TooLong);
    }
    refuse_private_key(address)?;
    match chain {
        Chain::Bitcoin => bitcoin(address),
        Chain::Ethereum => ethereum(address),
        Chain::Solana => solana(address),
        Chain::Sui => hex_prefixed(address, 64, "sui"),
    }
}

/// Checks a public key: bounded, hex or base58, and not something shaped like a private key.
pub fn validate_public_key(public_key: &str) -> Result<(), AddressError> {
    if public_key.len() > MAX_ADDRESS_LEN {
        return Err(AddressError::TooLong);
    }
    refuse_private_key(public_key)?;
    let hex = public_key.strip_prefix("0x").unwrap_or(public_key);
    let is_hex = !hex.is_empty() && hex.bytes().all(|byte| byte.is_ascii_hexdigit());
    if is_hex || bs58::decode(public_key).into_vec().is_ok() {
        Ok(())
    } else {
        Err(AddressError::Malformed { chain: "public key", why: "must be hex or base58" })
    }
}

/// Refuses the shapes private keys travel in: WIF (base58, 51-52 characters starting 5, K, L,
/// c, 9), extended private keys (xprv/tprv...), and 64-byte base58 Solana keypairs. A bare 32-byte
/// hex secret cannot be told from a Sui address or a hash by shape, so only its context (the
/// address field of a chain whose addresses are not that shape) catches it.
fn refuse_private_key(text: &str) -> Result<(), AddressError> {
    let extended = ["xprv", "yprv", "zprv", "tprv", "uprv", "vprv"].iter().any(|prefix| text.starts_with(prefix));
    let wif = matches!(text.len(), 51 | 52)
        && matches!(text.as_bytes().first(), Some(b'5' | b'K' | b'L' | b'c' | b'9'))
        && bs58::decode(text).into_vec().is_ok_and(|bytes| bytes.len() == 37 || bytes.len() == 38);
    let keypair = bs58::decode(text).into_vec().is_ok_and(|bytes| bytes.len() == 64);
    if extended || wif || keypair { Err(AddressError::PrivateKey) } else { Ok(()) }
}

const BECH32_CHARSET: &[u8] = b"qpzry9x8gf2tvdw0s3jn54khce6mua7l";

fn bitcoin(address: &str) -> Result<(), AddressError> {
    let malformed = |why| AddressError::Malformed { chain: "bitcoin", why };
    let lower = address.to_ascii_lowercase();
    if let Some(data) = lower.strip_prefix("bc1") {
        if address != lower && address != address.to_ascii_uppercase() {
            return Err(malformed("bech32 must not mix case"));
        }
        if !(14..=74).contains(&address.len()) {
            return Err(malformed("bech32 address of the wrong length"));
        }
        return if data.bytes().all(|byte| BECH32_CHARSET.contains(&byte)) {
            Ok(())
        } else {
            Err(malformed("bech32 address with a character outside its charset"))
        };
    }
    if !matches!(address.as_bytes().first(), Some(b'1' | b'3')) {
        return Err(malformed("must start with bc1, 1 or 3"));
    }
    let bytes = bs58::decode(address).into_vec().map_err(|_| malformed("not base58"))?;
    if bytes.len() != 25 {
        return Err(malformed("base58 address must decode to 25 bytes"));
    }
    let (payload, checksum) = bytes.split_at(21);
    let digest = Sha256::digest(Sha256::digest(payload));
    if &digest[..4] == checksum { Ok(()) } else { Err(AddressError::Checksum) }
}

fn ethereum(address: &str) -> Result<(), AddressError> {
    hex_prefixed(address, 40, "ethereum")?;
    let digits = &address[2..];
    let has_lower = digits.bytes().any(|byte| byte.is_ascii_lowercase());
    let has_upper = digits.bytes().any(|byte| byte.is_ascii_uppercase());
    if !(has_lower && has_upper) {
        return Ok(());
    }
    // EIP-55: a letter is upper case exactly when its nibble of keccak256(lower-case hex) is >= 8.
    let hash = Keccak256::digest(digits.to_ascii_lowercase().as_bytes());
    let valid = digits.bytes().enumerate().all(|(index, byte)| {
        let nibble = if index % 2 == 0 { hash[index / 2] >> 4 } else { hash[index / 2] & 0x0f };
        !byte.is_ascii_alphabetic() || byte.is_ascii_uppercase() == (nibble >= 8)
    });
    if valid { Ok(()) } else { Err(AddressError::Checksum) }
}

fn solana(address: &str) -> Result<(), AddressError> {
    let bytes =
        bs58::decode(address).into_vec().map_err(|_| AddressError::Malformed { chain: "solana", why: "not base58" })?;
    if bytes.len() == 32 {
        Ok(())
    } else {
        Err(AddressError::Malformed { chain: "solana", why: "must decode to 32 bytes" })
    }
}

fn hex_prefixed(address: &str, digits: usize, chain: &'static str) -> Result<(), AddressError> {
    let Some(hex) = address.strip_prefix("0x") else {
        return Err(AddressError::Malformed { chain, why: "must start with 0x" });
    };
    if hex.len() != digits || !hex.bytes().all(|byte| byte.is_ascii_hexdigit()) {
        return Err(AddressError::Malformed {
            chain,
            why: if digits == 40 { "must be 0x and 40 hex digits" } else { "must be 0x and 64 hex digits" },
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_good_addresses_pass() {
        assert_eq!(validate_address(Chain::Bitcoin, "bc1qar0srrr7xfkvy5l643lydnw9re59gtzzwf5mdq"), Ok(()));
        assert_eq!(validate_address(Chain::Bitcoin, "1BvBMSEYstWetqTFn5Au4m4GFg7xJaNVN2"), Ok(()));
        assert_eq!(validate_address(Chain::Bitcoin, "3J98t1WpEZ73CNmQviecrnyiWrnqRhWNLy"), Ok(()));
        assert_eq!(validate_address(Chain::Ethereum, "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"), Ok(()));
        assert_eq!(validate_address(Chain::Ethereum, "0x5aaeb6053f3e94c9b9a09f33669435e7ef1beaed"), Ok(()));
        assert_eq!(validate_address(Chain::Solana, "So11111111111111111111111111111111111111112"), Ok(()));
        assert_eq!(validate_address(Chain::Sui, &format!("0x{}", "a1".repeat(32))), Ok(()));
    }

    #[test]
    fn bad_addresses_are_refused() {
        assert_eq!(
            validate_address(Chain::Ethereum, "0x5AAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"),
            Err(AddressError::Checksum)
        );
        assert_eq!(validate_address(Chain::Bitcoin, "1BvBMSEYstWetqTFn5Au4m4GFg7xJaNVN3"), Err(AddressError::Checksum));
        assert!(validate_address(Chain::Bitcoin, "bc1qar0srrr7xfkvy5l643lydnw9re59gtzzwf5mdb").is_err());
        assert!(validate_address(Chain::Solana, "0x5aaeb6053f3e94c9b9a09f33669435e7ef1beaed").is_err());
        assert!(validate_address(Chain::Sui, "0x1234").is_err());
        assert_eq!(validate_address(Chain::Sui, ""), Err(AddressError::Empty));
    }

    #[test]
    fn private_key_shapes_are_refused() {
        // The well-known WIF example from the Bitcoin wiki (not anyone's key).
        let wif = "5HueCGU8rMjxEXxiPuD5BDku4MkFqeZyd4dZ1jvhTVqvbTLvyTJ";
        assert_eq!(validate_address(Chain::Bitcoin, wif), Err(AddressError::PrivateKey));
        assert_eq!(
            validate_public_key(
                "xprv9s21ZrQH143K3QTDL4LXw2F7HEK3wJUD2nW2nRk4stbPy6cq3jPPqjiChkVvvNKmPGJxWUtg6LnF5kejMRNNU3TGtRBeJgk33yuGBxrMPHi"
            ),
            Err(AddressError::PrivateKey)
        );
        let keypair = bs58::encode([7u8; 64]).into_string();
        assert_eq!(validate_address(Chain::Solana, &keypair), Err(AddressError::PrivateKey));
    }
}
