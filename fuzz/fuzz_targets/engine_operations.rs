//! Fuzz target: arbitrary bytes become a sequence of engine requests (including malformed
//! amount text, linked batches, expiry sweeps, retries of earlier keys, and business
//! transactions moved through arbitrary status changes) over a small set of
//! users and assets. After every request the engine's invariants must hold and a retry of an
//! earlier key must return its first outcome; at the end, replaying the journal must rebuild
//! the identical state. Any panic or failed assertion is a finding.
#![no_main]

use diboas_ledger::engine::account::{
    AccountConfig, AccountRef, Domain, FeeTier, OutflowLimits, Provider, SystemAccount, SystemKind, UserAccount,
};
use diboas_ledger::engine::asset::Asset;
use diboas_ledger::engine::error::EngineError;
use diboas_ledger::engine::idempotency::IdempotencyKey;
use diboas_ledger::engine::money::{Amount, MAX_AMOUNT_MINOR};
use diboas_ledger::engine::operation::{Operation, Receipt, Request};
use diboas_ledger::engine::record::MemoryJournal;
use diboas_ledger::engine::transaction::{
    ComplianceRecord, FeeLine, FeeMethod, Fill, KycStatus, NewTransaction, RiskLevel, TxStatus, TxType,
};
use diboas_ledger::engine::{Engine, EngineConfig};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use rust_decimal::Decimal;
use uuid::Uuid;

/// Few shards, so cross-shard requests and each shard's part of a system account are both common.
const SHARD_COUNT: usize = 3;
const MAX_REQUESTS: usize = 256;
const ASSETS: [Asset; 3] = [Asset::USD, Asset::BTC, Asset::ETH];

fn user_account(u: &mut Unstructured) -> Result<UserAccount> {
    let domain = *u.choose(&Domain::ALL)?;
    let asset = *u.choose(&ASSETS)?;
    Ok(UserAccount { user_id: Uuid::from_u128(u.int_in_range(0..=5)?), domain, asset })
}

fn account_ref(u: &mut Unstructured) -> Result<AccountRef> {
    Ok(if u.ratio(1, 5)? {
        let kind = *u.choose(&[
            SystemKind::ExchangeLiquidity,
            SystemKind::FeeRevenue(FeeTier::Platform),
            SystemKind::ProviderClearing(Provider::Ramp),
        ])?;
        AccountRef::System(SystemAccount { kind, asset: *u.choose(&ASSETS)? })
    } else {
        AccountRef::User(user_account(u)?)
    })
}

/// An amount, sometimes parsed from arbitrary text (which must never panic, only be refused).
fn amount(u: &mut Unstructured, asset: Asset) -> Result<Amount> {
    if u.ratio(1, 8)? {
        let text: &str = u.arbitrary()?;
        if let Ok(parsed) = Amount::parse(text, asset) {
            return Ok(parsed);
        }
    }
    let minor = if u.ratio(1, 16)? {
        // The bounds: the most one amount may be, and the most one shard's part of a system
        // account may hold (a deposit that large succeeds once; the next through the same
        // provider, in the same asset, to a user on the same shard meets the bound).
        let per_shard_minor = MAX_AMOUNT_MINOR / SHARD_COUNT as i128;
        *u.choose(&[MAX_AMOUNT_MINOR, MAX_AMOUNT_MINOR - 1_000_000, per_shard_minor, per_shard_minor - 1])?
    } else {
        i128::from(u.int_in_range(1..=1_000_000_u32)?)
    };
    Ok(Amount::from_minor(minor).unwrap_or_else(|_| unreachable!("in range")))
}

fn operation(u: &mut Unstructured, depth: u8) -> Result<Operation> {
    let user = user_account(u)?;
    let reservation_id = Uuid::from_u128(u.int_in_range(0..=3)?);
    Ok(match u.int_in_range(0..=14)? {
        0 => Operation::OpenAccount {
            account: user,
            config: AccountConfig {
                overdraft_minor: i128::from(u.int_in_range(-1..=1_000_i32)?),
                limits: OutflowLimits {
                    per_transaction_minor: u.arbitrary::<Option<u16>>()?.map(i128::from),
                    daily_minor: u.arbitrary::<Option<u16>>()?.map(i128::from),
                    monthly_minor: u.arbitrary::<Option<u32>>()?.map(i128::from),
                },
                frozen: u.ratio(1, 10)?,
            },
        },
        1 => Operation::SetFrozen { account: user, frozen: u.arbitrary()? },
        2 => Operation::Deposit { account: user, amount: amount(u, user.asset)?, provider: Provider::Stripe },
        3 => Operation::Withdraw { account: user, amount: amount(u, user.asset)?, provider: Provider::Moonpay },
        4 => Operation::Reserve {
            reservation_id,
            account: user,
            amount: amount(u, user.asset)?,
            ttl_ms: u.arbitrary::<Option<i32>>()?.map(i64::from),
        },
        5 => Operation::Commit {
            user_id: user.user_id,
            reservation_id,
            destination: account_ref(u)?,
            amount: if u.arbitrary()? { Some(amount(u, user.asset)?) } else { None },
        },
        6 => Operation::Release { user_id: user.user_id, reservation_id },
        7 | 8 => {
            let from = account_ref(u)?;
            let to = account_ref(u)?;
            Operation::Transfer { from, to, amount: amount(u, from.asset())? }
        }
        9 => Operation::Convert {
            from: user,
            to: user_account(u)?,
            amount: amount(u, user.asset)?,
            price: Decimal::new(u.int_in_range(-5..=i64::from(u32::MAX))?, u.int_in_range(0..=28)?),
            commission_bps: u.int_in_range(0..=10_001)?,
        },
        // Transactions share the reservation ids' small range, so plain reservation operations
        // collide with transactions' reservations (and must be refused).
        11 => {
            let kind = *u.choose(&TxType::ALL)?;
            let domain = *u.choose(&Domain::ALL)?;
            let fees = (0..u.int_in_range(0..=2)?)
                .map(|index| {
                    Ok(FeeLine {
                        tier: FeeTier::ALL[index],
                        category: "fuzz".into(),
                        method: FeeMethod::Flat,
                        amount_minor: i128::from(u.int_in_range(0..=1_000_u32)?),
                        provider: None,
                        schedule_version: 1,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            // Mostly the leg a trade needs, sometimes the wrong shape, to be refused.
            let receive = if kind.is_trade() != u.ratio(1, 8)? {
                Some((
                    SystemAccount { kind: SystemKind::ExchangeLiquidity, asset: *u.choose(&ASSETS)? },
                    user_account(u)?,
                ))
            } else {
                None
            };
            Operation::InitiateTransaction {
                transaction: Box::new(NewTransaction {
                    id: reservation_id,
                    user_id: user.user_id,
                    domain,
                    kind,
                    payer: if u.ratio(1, 4)? { account_ref(u)? } else { AccountRef::User(user) },
                    payee: account_ref(u)?,
                    principal_minor: amount(u, user.asset)?.minor(),
                    fees,
                    receive,
                    provider: None,
                    details: Default::default(),
                }),
            }
        }
        12 => Operation::TransitionTransaction {
            user_id: user.user_id,
            transaction_id: reservation_id,
            to: *u.choose(&TxStatus::ALL)?,
            reason: "fuzz".into(),
            provider_event: None,
            fill: if u.arbitrary()? {
                Some(Fill { price: Decimal::ONE, quantity_minor: i128::from(u.int_in_range(-1..=1_000_000_i32)?) })
            } else {
                None
            },
            payee_user_id: if u.arbitrary()? { Some(Uuid::from_u128(u.int_in_range(0..=5)?)) } else { None },
        },
        13 => Operation::SetCompliance {
            user_id: user.user_id,
            record: ComplianceRecord {
                kyc: *u.choose(&KycStatus::ALL)?,
                risk: *u.choose(&RiskLevel::ALL)?,
                max_transaction_minor: u.arbitrary::<Option<u16>>()?.map(i128::from),
            },
        },
        14 => Operation::SetKyc {
            user_id: user.user_id,
            kyc: *u.choose(&KycStatus::ALL)?,
            risk: *u.choose(&RiskLevel::ALL)?,
        },
        _ if depth == 0 => {
            let count = u.int_in_range(0..=6)?;
            let operations = (0..count).map(|_| operation(u, depth + 1)).collect::<Result<Vec<_>>>()?;
            Operation::LinkedBatch { operations }
        }
        _ => Operation::LinkedBatch { operations: Vec::new() },
    })
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let engine =
        Engine::new(EngineConfig { shard_count: SHARD_COUNT, ..EngineConfig::default() }, MemoryJournal::default());
    let mut now_ms: i64 = 1_790_000_000_000;
    // Callers' clocks disagree, so time may step back; the engine dates changes no earlier than
    // the latest time a shard has seen, which is at most `latest_ms`.
    let mut latest_ms = now_ms;
    // Every request sent, with its first answer (sequence and result).
    let mut sent: Vec<(Request, Option<u64>, std::result::Result<Receipt, EngineError>)> = Vec::new();
    for index in 0..MAX_REQUESTS {
        if u.is_empty() {
            break;
        }
        let Ok(choice) = u.int_in_range(0..=9_u8) else { break };
        match choice {
            0 => {
                now_ms += i64::from(u.int_in_range(0..=4_000_000_u32).unwrap_or(0));
                latest_ms = latest_ms.max(now_ms);
                engine.sweep(now_ms).unwrap_or_else(|error| panic!("sweep failed: {error}"));
            }
            2 => now_ms -= i64::from(u.int_in_range(0..=7_200_000_u32).unwrap_or(0)),
            1 if !sent.is_empty() => {
                let nth = u.choose_index(sent.len()).unwrap_or(0);
                let (request, first_sequence, first_result) = &sent[nth];
                let retry = engine.execute(Request { now_ms, ..request.clone() });
                // Within the retention window the first outcome must come back; after it the key
                // may have been forgotten and the request is then a new one.
                if latest_ms - request.now_ms < engine.config().retention_ms {
                    assert!(retry.replayed, "a retry within the retention window is answered from the store");
                    assert_eq!(
                        (&retry.sequence, &retry.result),
                        (first_sequence, first_result),
                        "a retry returns the first answer exactly"
                    );
                }
            }
            _ => {
                let Ok(operation) = operation(&mut u, 0) else { break };
                let key = IdempotencyKey::new(&format!("fuzz-{index}")).unwrap_or_else(|_| unreachable!("valid key"));
                let request = Request { key, now_ms, operation };
                let outcome = engine.execute(request.clone());
                sent.push((request, outcome.sequence, outcome.result));
            }
        }
        engine.state().check_invariants().unwrap_or_else(|violation| panic!("invariant broken: {violation}"));
        engine.check_indexes().unwrap_or_else(|violation| panic!("index broken: {violation}"));
    }
    let replayed = Engine::new(*engine.config(), MemoryJournal::default());
    let records = engine.sink().drain();
    for record in records {
        replayed.apply_record(&record).unwrap_or_else(|error| panic!("replay failed: {error}"));
    }
    let retention_ms = engine.config().retention_ms;
    assert_eq!(
        replayed.state().within_retention(latest_ms, retention_ms),
        engine.state().within_retention(latest_ms, retention_ms),
        "replay rebuilds the same state"
    );
    replayed.check_indexes().unwrap_or_else(|violation| panic!("replayed index broken: {violation}"));
});
