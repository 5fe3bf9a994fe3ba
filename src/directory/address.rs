//! Wallet address and public-key validation per chain, and the refusal of anything that looks
//! like a private key (the ledger is non-custodial: it must never hold one). A valid address is
//! returned in its one canonical form, so two spellings of one address cannot both be stored:
//! segwit and Sui lower case, Ethereum in its EIP-55 checksum case, base58 as given.
//!
//! - Bitcoin: bech32/bech32m segwit (`bc1...`, BIP-173/350: one case, the checksum of the
//!   right variant for the witness version, a valid program length) or base58check legacy /
//!   P2SH (`1...`/`3...`: base58, 25 bytes decoded, the double-SHA-256 checksum matching).
//! - Ethereum: `0x` and 40 hex digits; mixed case must carry a valid EIP-55 checksum.
//! - Solana: base58 of exactly 32 bytes.
//! - Sui: `0x` and 64 hex digits.

use bech32::primitives::decode::SegwitHrpstringError;
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

/// Checks `address` for `chain`; returns its canonical form.
pub fn validate_address(chain: Chain, address: &str) -> Result<String, AddressError> {
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
        Chain::Solana => solana(address).map(|()| address.to_owned()),
        Chain::Sui => hex_prefixed(address, 64, "sui").map(|()| address.to_ascii_lowercase()),
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

fn bitcoin(address: &str) -> Result<String, AddressError> {
    let malformed = |why| AddressError::Malformed { chain: "bitcoin", why };
    if address.get(..3).is_some_and(|prefix| prefix.eq_ignore_ascii_case("bc1")) {
        // BIP-173 / BIP-350 through the `bech32` crate: one case, the charset, the checksum
        // (bech32 for witness version 0, bech32m for 1 to 16) and the program's length.
        return match bech32::segwit::decode(address) {
            Ok((hrp, _, _)) if hrp == bech32::hrp::BC => Ok(address.to_ascii_lowercase()),
            Ok(_) => Err(malformed("a segwit address for another network")),
            Err(error) if matches!(error.0, SegwitHrpstringError::Checksum(_)) => Err(AddressError::Checksum),
            Err(_) => Err(malformed("not a valid bech32/bech32m segwit address")),
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
    if &digest[..4] == checksum { Ok(address.to_owned()) } else { Err(AddressError::Checksum) }
}

/// An all-lower or all-upper case address carries no checksum; a mixed-case one must carry
/// EIP-55's. Either way the canonical form is the EIP-55 one.
fn ethereum(address: &str) -> Result<String, AddressError> {
    hex_prefixed(address, 40, "ethereum")?;
    let digits = &address[2..];
    let checksummed = eip55(digits);
    let has_lower = digits.bytes().any(|byte| byte.is_ascii_lowercase());
    let has_upper = digits.bytes().any(|byte| byte.is_ascii_uppercase());
    if has_lower && has_upper && checksummed[2..] != *digits {
        return Err(AddressError::Checksum);
    }
    Ok(checksummed)
}

/// EIP-55: a letter is upper case exactly when its nibble of keccak256(lower-case hex) is >= 8.
fn eip55(digits: &str) -> String {
    let lower = digits.to_ascii_lowercase();
    let hash = Keccak256::digest(lower.as_bytes());
    let mut out = String::with_capacity(2 + lower.len());
    out.push_str("0x");
    for (index, character) in lower.chars().enumerate() {
        let nibble = if index % 2 == 0 { hash[index / 2] >> 4 } else { hash[index / 2] & 0x0f };
        out.push(if nibble >= 8 { character.to_ascii_uppercase() } else { character });
    }
    out
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
        let segwit = "bc1qar0srrr7xfkvy5l643lydnw9re59gtzzwf5mdq";
        assert_eq!(validate_address(Chain::Bitcoin, segwit).as_deref(), Ok(segwit));
        // Upper case is the same address: stored lower case.
        assert_eq!(validate_address(Chain::Bitcoin, &segwit.to_ascii_uppercase()).as_deref(), Ok(segwit));
        // BIP-350's taproot (v1, bech32m) example.
        let taproot = "bc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vqzk5jj0";
        assert_eq!(validate_address(Chain::Bitcoin, taproot).as_deref(), Ok(taproot));
        for base58 in ["1BvBMSEYstWetqTFn5Au4m4GFg7xJaNVN2", "3J98t1WpEZ73CNmQviecrnyiWrnqRhWNLy"] {
            assert_eq!(validate_address(Chain::Bitcoin, base58).as_deref(), Ok(base58));
        }
        // EIP-55's own example, given checksummed, lower case or upper case: one canonical form.
        let checksummed = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed";
        for spelling in [
            checksummed.to_owned(),
            checksummed.to_ascii_lowercase(),
            format!("0x{}", checksummed[2..].to_ascii_uppercase()),
        ] {
            assert_eq!(validate_address(Chain::Ethereum, &spelling).as_deref(), Ok(checksummed), "{spelling}");
        }
        let solana = "So11111111111111111111111111111111111111112";
        assert_eq!(validate_address(Chain::Solana, solana).as_deref(), Ok(solana));
        let sui = format!("0x{}", "a1".repeat(32));
        assert_eq!(validate_address(Chain::Sui, &sui.to_ascii_uppercase().replacen("0X", "0x", 1)), Ok(sui));
    }

    #[test]
    fn bad_addresses_are_refused() {
        assert_eq!(
            validate_address(Chain::Ethereum, "0x5AAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"),
            Err(AddressError::Checksum)
        );
        assert_eq!(validate_address(Chain::Bitcoin, "1BvBMSEYstWetqTFn5Au4m4GFg7xJaNVN3"), Err(AddressError::Checksum));
        assert!(validate_address(Chain::Bitcoin, "bc1qar0srrr7xfkvy5l643lydnw9re59gtzzwf5mdb").is_err());
        // The valid address above with its last character changed: right shape, wrong checksum.
        assert_eq!(
            validate_address(Chain::Bitcoin, "bc1qar0srrr7xfkvy5l643lydnw9re59gtzzwf5mdg"),
            Err(AddressError::Checksum)
        );
        // A v1 (taproot) program with a bech32 rather than a bech32m checksum (BIP-350's test vector).
        assert!(
            validate_address(Chain::Bitcoin, "bc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vqh2y7hd").is_err()
        );
        // Mixed case and a testnet address.
        assert!(validate_address(Chain::Bitcoin, "bc1qAr0srrr7xfkvy5l643lydnw9re59gtzzwf5mdq").is_err());
        assert!(validate_address(Chain::Bitcoin, "tb1qw508d6qejxtdg4y5r3zarvary0c5xw7kxpjzsx").is_err());
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
