//! Operation fingerprints: the 64-bit digest the idempotency store keeps instead of the
//! operation, to tell "the same request again" from "a different request under the same key".
//!
//! Every request computes one, so the operations nearly every request carries (transfers,
//! deposits, withdrawals, reserve, commit, release) are folded a 128-bit word at a time, their
//! small fields packed beside: two multiplications a word (five to nine in all) instead of one
//! hasher call per field. Every other operation goes through its derived `Hash`. Each path
//! starts from its own tag, so operations of different kinds never share an input.
//!
//! The fold's keys, and the derived `Hash`'s seeds, are drawn at random once per process: with
//! fixed ones a caller could choose an id whose word cancels one and erases what came before it,
//! making two different operations share a fingerprint on purpose. Fingerprints are never
//! persisted (recovery recomputes them), so they need not agree between processes.

use std::hash::BuildHasher;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::engine::account::{AccountRef, UserAccount};
use crate::engine::id_hash::folded_multiply;
use crate::engine::money::Amount;
use crate::engine::operation::Operation;

/// A 64-bit digest of an operation. Computed in-process and never persisted (recovery
/// recomputes it from the stored operation), so it may change between builds and processes.
/// Only operations under one key are ever compared, so a false "same" needs a 2^-64
/// coincidence for that key, and would answer with the first outcome instead of a conflict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct OperationFingerprint(pub(super) u64);

/// The fold's keys, drawn once per process (see the module comment).
fn keys() -> [u64; 3] {
    static KEYS: OnceLock<[u64; 3]> = OnceLock::new();
    *KEYS.get_or_init(|| {
        let random = foldhash::fast::RandomState::default();
        [random.hash_one(1_u8), random.hash_one(2_u8), random.hash_one(3_u8)]
    })
}

/// The hasher of the operations outside the fold, drawn once per process. A `RandomState`, not a
/// `FixedState` with a secret seed: the latter keeps foldhash's public shared seeds, and an id
/// equal to one of them zeroes a multiplication and erases the secret with everything hashed
/// before it (see the module comment).
fn derived_hasher() -> &'static foldhash::fast::RandomState {
    static HASHER: OnceLock<foldhash::fast::RandomState> = OnceLock::new();
    HASHER.get_or_init(foldhash::fast::RandomState::default)
}

impl OperationFingerprint {
    pub fn of(operation: &Operation) -> OperationFingerprint {
        let keys = keys();
        let mut fold = Fold { keys, accumulator: 0 };
        match operation {
            Operation::Transfer { from, to, amount } => {
                let (from_id, from_small) = account_ref_words(from);
                let (to_id, to_small) = account_ref_words(to);
                fold.word(1, from_id);
                fold.word(0, to_id);
                fold.word(from_small << 32 | to_small, amount_word(*amount));
            }
            Operation::Deposit { account, amount, provider } | Operation::Withdraw { account, amount, provider } => {
                let tag = if matches!(operation, Operation::Deposit { .. }) { 2 } else { 3 };
                fold.word(tag, account.user_id.as_u128());
                fold.word(user_small(account) << 8 | *provider as u64, amount_word(*amount));
            }
            Operation::Reserve { reservation_id, account, amount, ttl_ms } => {
                fold.word(4, reservation_id.as_u128());
                fold.word(user_small(account), account.user_id.as_u128());
                fold.word(u64::from(ttl_ms.is_some()), amount_word(*amount));
                fold.word(0, u128::from(ttl_ms.unwrap_or(0) as u64));
            }
            Operation::Commit { user_id, reservation_id, destination, amount } => {
                let (destination_id, destination_small) = account_ref_words(destination);
                fold.word(5, user_id.as_u128());
                fold.word(0, reservation_id.as_u128());
                fold.word(destination_small << 1 | u64::from(amount.is_some()), destination_id);
                fold.word(0, amount.map_or(0, amount_word));
            }
            Operation::Release { user_id, reservation_id } => {
                fold.word(6, user_id.as_u128());
                fold.word(0, reservation_id.as_u128());
            }
            other => {
                let derived = derived_hasher().hash_one(other);
                fold.word(7, u128::from(derived));
            }
        }
        OperationFingerprint(fold.finish())
    }
}

fn amount_word(amount: Amount) -> u128 {
    amount.minor() as u128
}

/// A user account's fields besides its id, in 16 bits.
fn user_small(account: &UserAccount) -> u64 {
    (account.domain as u64) << 8 | account.asset.index() as u64
}

/// An account reference as (id word, fields in 24 bits, the low 8 bits saying which kind).
fn account_ref_words(account: &AccountRef) -> (u128, u64) {
    match account {
        AccountRef::User(user) => (user.user_id.as_u128(), user_small(user) << 8),
        AccountRef::System(system) => (0, ((system.kind.index() as u64) << 8 | system.asset.index() as u64) << 8 | 1),
    }
}

/// Folds (small word, 128-bit word) pairs into 64 bits, as `foldhash` does: each step is a
/// 64x64 -> 128-bit multiplication of the accumulator-mixed input halves, folded back to 64 bits.
/// The accumulator is also carried past each step, so that even a factor that happens to be zero
/// cannot erase the words before it.
struct Fold {
    keys: [u64; 3],
    accumulator: u64,
}

impl Fold {
    fn word(&mut self, small: u64, wide: u128) {
        let [left_key, right_key, out_key] = self.keys;
        let mixed = folded_multiply(small ^ self.accumulator ^ left_key, (wide >> 64) as u64 ^ right_key);
        self.accumulator = folded_multiply(mixed ^ wide as u64, out_key) ^ self.accumulator.rotate_left(23);
    }

    fn finish(self) -> u64 {
        folded_multiply(self.accumulator ^ self.keys[1], self.keys[0])
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;
    use rust_decimal::Decimal;

    use uuid::Uuid;

    use super::*;
    use crate::engine::account::{Domain, Provider, SystemAccount, SystemKind};
    use crate::engine::asset::Asset;

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

    /// Operations of the folded kinds over a small space of values, so that equal ones are drawn
    /// often and different ones differ in a single field just as often.
    fn hot_operation() -> impl Strategy<Value = Operation> {
        let id = (0_u128..3).prop_map(|n| Uuid::from_u128(n << 64 | n));
        let amount = (1_i128..4).prop_map(|minor| Amount::from_minor(minor).unwrap());
        let domain = prop::sample::select(vec![Domain::Banking, Domain::Investing]);
        let asset = prop::sample::select(vec![Asset::USD, Asset::BTC]);
        let user = (id.clone(), domain, asset.clone()).prop_map(|(user_id, domain, asset)| UserAccount {
            user_id,
            domain,
            asset,
        });
        let kind =
            prop::sample::select(vec![SystemKind::ProviderClearing(Provider::Stripe), SystemKind::ExchangeLiquidity]);
        let system = (kind, asset).prop_map(|(kind, asset)| SystemAccount { kind, asset });
        let account_ref = prop_oneof![user.clone().prop_map(AccountRef::User), system.prop_map(AccountRef::System)];
        let provider = prop::sample::select(vec![Provider::Stripe, Provider::Ramp]);
        prop_oneof![
            (account_ref.clone(), account_ref.clone(), amount.clone())
                .prop_map(|(from, to, amount)| Operation::Transfer { from, to, amount }),
            (user.clone(), amount.clone(), provider.clone())
                .prop_map(|(account, amount, provider)| Operation::Deposit { account, amount, provider }),
            (user.clone(), amount.clone(), provider).prop_map(|(account, amount, provider)| Operation::Withdraw {
                account,
                amount,
                provider
            }),
            (id.clone(), user, amount.clone(), prop::option::of(-1_i64..2)).prop_map(
                |(reservation_id, account, amount, ttl_ms)| Operation::Reserve {
                    reservation_id,
                    account,
                    amount,
                    ttl_ms
                }
            ),
            (id.clone(), id.clone(), account_ref, prop::option::of(amount)).prop_map(
                |(user_id, reservation_id, destination, amount)| Operation::Commit {
                    user_id,
                    reservation_id,
                    destination,
                    amount
                }
            ),
            (id.clone(), id).prop_map(|(user_id, reservation_id)| Operation::Release { user_id, reservation_id }),
            Just(convert(Decimal::ONE, 1)),
        ]
    }

    /// Ids chosen to cancel a key of the fold (their high half equal to it) still leave every
    /// other field counted: two releases differing only in the user stay apart.
    #[test]
    fn an_id_equal_to_a_key_erases_nothing() {
        for key in keys() {
            let chosen = Uuid::from_u128(u128::from(key) << 64 | 7);
            let release = |user: u128| Operation::Release { user_id: Uuid::from_u128(user), reservation_id: chosen };
            assert_ne!(OperationFingerprint::of(&release(1)), OperationFingerprint::of(&release(2)));
            let reserve = Operation::Reserve {
                reservation_id: Uuid::from_u128(9),
                account: UserAccount { user_id: chosen, domain: Domain::Banking, asset: Asset::USD },
                amount: Amount::from_minor(5).unwrap(),
                ttl_ms: Some(3),
            };
            let commit = Operation::Commit {
                user_id: Uuid::from_u128(9),
                reservation_id: chosen,
                destination: AccountRef::User(UserAccount {
                    user_id: Uuid::from_u128(5),
                    domain: Domain::Banking,
                    asset: Asset::USD,
                }),
                amount: Some(Amount::from_minor(3).unwrap()),
            };
            assert_ne!(OperationFingerprint::of(&reserve), OperationFingerprint::of(&commit));
        }
    }

    /// Found in review: the operations outside the fold went through `foldhash`'s `FixedState`,
    /// whose shared seeds are public constants; only the starting value was secret. A reservation
    /// id whose second half cancels the seed a 16-byte write multiplies by wiped everything
    /// hashed before it, the secret included, so a caller could make two different linked
    /// batches under one key share a fingerprint, and the second would be answered as a retry
    /// of the first instead of refused.
    #[test]
    fn an_id_chosen_against_public_seeds_erases_nothing() {
        // Bytes 8..16, read as a little-endian u64, equal foldhash 0.2's fixed `seeds[1]`.
        let chosen = Uuid::from_u128(0x1709_47b5_b5d5_843f);
        let user = UserAccount { user_id: Uuid::from_u128(1), domain: Domain::Banking, asset: Asset::USD };
        let batch = |withdrawn_minor: i128| Operation::LinkedBatch {
            operations: vec![
                Operation::Withdraw {
                    account: user,
                    amount: Amount::from_minor(withdrawn_minor).unwrap(),
                    provider: Provider::Ramp,
                },
                Operation::Reserve {
                    reservation_id: chosen,
                    account: user,
                    amount: Amount::from_minor(100).unwrap(),
                    ttl_ms: None,
                },
            ],
        };
        assert_ne!(OperationFingerprint::of(&batch(100)), OperationFingerprint::of(&batch(900_000)));
    }

    proptest! {
        /// Equal operations have equal fingerprints, and in a few hundred draws from a small space
        /// no two different operations share one.
        #[test]
        fn fingerprints_follow_equality(operations in prop::collection::vec(hot_operation(), 300)) {
            let mut seen: HashMap<OperationFingerprint, &Operation> = HashMap::new();
            for operation in &operations {
                let fingerprint = OperationFingerprint::of(operation);
                if let Some(earlier) = seen.insert(fingerprint, operation) {
                    prop_assert_eq!(earlier, operation, "two different operations share a fingerprint");
                }
            }
        }
    }
}
