//! The asset registry: every asset the ledger can hold, its chain and its scale.
//!
//! The registry is a fixed table compiled into the binary. The engine refers to an
//! asset by its index (`Asset`), a one-byte copyable handle, so hot-path maps stay small;
//! the edge (gRPC, SQL) speaks in symbols such as `USD`, `BTC` or `USDC:solana`.
//! Stablecoins exist once per chain because the same token on two chains is two
//! different liabilities (and the per-chain summary must be able to tell them apart).

use std::fmt;

use serde::{Deserialize, Serialize};

/// A blockchain an asset lives on. Fiat has none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Chain {
    Bitcoin,
    Ethereum,
    Solana,
    Sui,
}

impl Chain {
    pub const ALL: [Chain; 4] = [Chain::Bitcoin, Chain::Ethereum, Chain::Solana, Chain::Sui];

    pub fn name(self) -> &'static str {
        match self {
            Chain::Bitcoin => "bitcoin",
            Chain::Ethereum => "ethereum",
            Chain::Solana => "solana",
            Chain::Sui => "sui",
        }
    }
}

/// One row of the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AssetSpec {
    /// The canonical symbol callers use: the code, plus `:chain` for tokens that exist on several chains.
    pub symbol: &'static str,
    /// The ticker without the chain (`USDC` for `USDC:solana`).
    pub code: &'static str,
    pub chain: Option<Chain>,
    /// Number of decimals an amount of this asset may carry; amounts are held as integer minor units.
    pub scale: u32,
}

const REGISTRY: [AssetSpec; 11] = [
    AssetSpec { symbol: "USD", code: "USD", chain: None, scale: 2 },
    AssetSpec { symbol: "BTC", code: "BTC", chain: Some(Chain::Bitcoin), scale: 8 },
    AssetSpec { symbol: "ETH", code: "ETH", chain: Some(Chain::Ethereum), scale: 18 },
    AssetSpec { symbol: "SOL", code: "SOL", chain: Some(Chain::Solana), scale: 9 },
    AssetSpec { symbol: "SUI", code: "SUI", chain: Some(Chain::Sui), scale: 9 },
    AssetSpec { symbol: "USDC:ethereum", code: "USDC", chain: Some(Chain::Ethereum), scale: 6 },
    AssetSpec { symbol: "USDC:solana", code: "USDC", chain: Some(Chain::Solana), scale: 6 },
    AssetSpec { symbol: "USDC:sui", code: "USDC", chain: Some(Chain::Sui), scale: 6 },
    AssetSpec { symbol: "USDT:ethereum", code: "USDT", chain: Some(Chain::Ethereum), scale: 6 },
    AssetSpec { symbol: "USDT:solana", code: "USDT", chain: Some(Chain::Solana), scale: 6 },
    AssetSpec { symbol: "USDT:sui", code: "USDT", chain: Some(Chain::Sui), scale: 6 },
];

/// A handle on a registry row. Only the registry can make one, so every `Asset` is known.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Asset(u8);

impl Asset {
    pub const COUNT: usize = REGISTRY.len();

    pub const USD: Asset = Asset(0);
    pub const BTC: Asset = Asset(1);
    pub const ETH: Asset = Asset(2);
    pub const SOL: Asset = Asset(3);
    pub const SUI: Asset = Asset(4);
    pub const USDC_ETHEREUM: Asset = Asset(5);
    pub const USDC_SOLANA: Asset = Asset(6);
    pub const USDC_SUI: Asset = Asset(7);
    pub const USDT_ETHEREUM: Asset = Asset(8);
    pub const USDT_SOLANA: Asset = Asset(9);
    pub const USDT_SUI: Asset = Asset(10);

    /// Every asset in registry order.
    pub fn all() -> impl Iterator<Item = Asset> {
        (0..REGISTRY.len()).map(|index| Asset(index as u8))
    }

    /// Looks an asset up by its canonical symbol (case-sensitive, as callers must send it).
    pub fn from_symbol(symbol: &str) -> Option<Asset> {
        REGISTRY.iter().position(|spec| spec.symbol == symbol).map(|index| Asset(index as u8))
    }

    pub fn from_index(index: usize) -> Option<Asset> {
        (index < REGISTRY.len()).then_some(Asset(index as u8))
    }

    pub fn index(self) -> usize {
        usize::from(self.0)
    }

    pub fn spec(self) -> &'static AssetSpec {
        &REGISTRY[self.index()]
    }

    pub fn symbol(self) -> &'static str {
        self.spec().symbol
    }

    pub fn scale(self) -> u32 {
        self.spec().scale
    }

    pub fn chain(self) -> Option<Chain> {
        self.spec().chain
    }
}

impl fmt::Debug for Asset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.symbol())
    }
}

impl fmt::Display for Asset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.symbol())
    }
}

impl Serialize for Asset {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.symbol())
    }
}

impl<'de> Deserialize<'de> for Asset {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let symbol = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Asset::from_symbol(&symbol).ok_or_else(|| serde::de::Error::custom(format!("unknown asset {symbol:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_scales_match_the_contract() {
        let expected = [
            ("USD", 2),
            ("BTC", 8),
            ("ETH", 18),
            ("SOL", 9),
            ("SUI", 9),
            ("USDC:ethereum", 6),
            ("USDC:solana", 6),
            ("USDC:sui", 6),
            ("USDT:ethereum", 6),
            ("USDT:solana", 6),
            ("USDT:sui", 6),
        ];
        for (symbol, scale) in expected {
            let asset = Asset::from_symbol(symbol).unwrap();
            assert_eq!(asset.scale(), scale, "{symbol}");
            assert_eq!(asset.symbol(), symbol);
        }
        assert_eq!(Asset::all().count(), expected.len());
    }

    #[test]
    fn unknown_and_miscased_symbols_are_not_assets() {
        for symbol in ["usd", "USDC", "DOGE", "", "USDC:bitcoin", " USD"] {
            assert_eq!(Asset::from_symbol(symbol), None, "{symbol:?}");
        }
    }

    #[test]
    fn symbols_round_trip_through_serde() {
        for asset in Asset::all() {
            let json = serde_json::to_string(&asset).unwrap();
            assert_eq!(serde_json::from_str::<Asset>(&json).unwrap(), asset);
        }
        assert!(serde_json::from_str::<Asset>("\"DOGE\"").is_err());
    }
}
