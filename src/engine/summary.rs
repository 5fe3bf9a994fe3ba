//! A user's balances aggregated per domain, per asset and per chain, for summary reads.
//!
//! Built from the account views of one user; pure arithmetic on the engine's numbers. The
//! per-chain view groups assets by the chain they live on (Ethereum: USDC, USDT, ETH; ...);
//! fiat has no chain and appears only in the per-asset and per-domain views.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::account::{Balance, Domain};
use super::asset::{Asset, Chain};
use super::state::AccountView;

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct UserSummary {
    pub by_domain: BTreeMap<Domain, BTreeMap<Asset, Balance>>,
    pub by_asset: BTreeMap<Asset, Balance>,
    pub by_chain: BTreeMap<Chain, BTreeMap<Asset, Balance>>,
}

fn add(into: &mut Balance, balance: Balance) {
    into.available_minor += balance.available_minor;
    into.reserved_minor += balance.reserved_minor;
}

impl UserSummary {
    pub fn from_accounts<'a>(accounts: impl IntoIterator<Item = &'a AccountView>) -> UserSummary {
        let mut summary = UserSummary::default();
        for view in accounts {
            let asset = view.account.asset;
            add(summary.by_domain.entry(view.account.domain).or_default().entry(asset).or_default(), view.balance);
            add(summary.by_asset.entry(asset).or_default(), view.balance);
            if let Some(chain) = asset.chain() {
                add(summary.by_chain.entry(chain).or_default().entry(asset).or_default(), view.balance);
            }
        }
        summary
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::account::{AccountConfig, UserAccount};
    use uuid::Uuid;

    fn view(domain: Domain, asset: Asset, available_minor: i128, reserved_minor: i128) -> AccountView {
        AccountView {
            account: UserAccount { user_id: Uuid::nil(), domain, asset },
            config: AccountConfig::default(),
            balance: Balance { available_minor, reserved_minor },
            usage: Default::default(),
        }
    }

    #[test]
    fn groups_by_domain_asset_and_chain() {
        let views = [
            view(Domain::Banking, Asset::USD, 100, 5),
            view(Domain::Banking, Asset::USDC_SOLANA, 7, 0),
            view(Domain::Defi, Asset::USDC_SOLANA, 3, 1),
            view(Domain::Investing, Asset::ETH, 9, 0),
        ];
        let summary = UserSummary::from_accounts(&views);
        assert_eq!(summary.by_asset[&Asset::USDC_SOLANA], Balance { available_minor: 10, reserved_minor: 1 });
        assert_eq!(summary.by_domain[&Domain::Banking].len(), 2);
        assert_eq!(summary.by_chain[&Chain::Solana][&Asset::USDC_SOLANA].total_minor(), 11);
        assert_eq!(summary.by_chain[&Chain::Ethereum][&Asset::ETH].total_minor(), 9);
        assert!(!summary.by_chain.contains_key(&Chain::Bitcoin));
        assert_eq!(summary.by_asset[&Asset::USD].total_minor(), 105);
    }
}
