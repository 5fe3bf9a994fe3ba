//! Lifecycle benchmark (criterion): one whole Send Money transaction through the engine, without
//! the database: initiate, then validating, balance_reserved (compliance gate + reservation of
//! principal and fees), sent_to_provider, provider_processing, completed (principal and two fee
//! postings). Seven journaled operations per iteration; the sink discards records, so this is the
//! engine's own cost (the journal's is measured by the journal benchmark). The engine is swept
//! regularly so idempotency keys and finished transactions stay bounded, as in production.
//!
//! Run: `cargo bench --bench lifecycle` (under a minute).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use diboas_ledger::engine::account::{AccountConfig, AccountRef, Domain, FeeTier, Provider, UserAccount};
use diboas_ledger::engine::asset::Asset;
use diboas_ledger::engine::idempotency::IdempotencyKey;
use diboas_ledger::engine::money::Amount;
use diboas_ledger::engine::operation::{Operation, Request};
use diboas_ledger::engine::record::{JournalClosed, JournalRecord, JournalSink};
use diboas_ledger::engine::transaction::{
    ComplianceRecord, FeeLine, FeeMethod, KycStatus, NewTransaction, RiskLevel, TxStatus, TxType,
};
use diboas_ledger::engine::{Engine, EngineConfig};
use uuid::Uuid;

/// Keys and finished transactions are forgotten after this long (benchmark clock).
const RETENTION_MS: i64 = 1_000;
const SWEEP_EVERY: u64 = 1 << 14;
const USERS: u128 = 1_000;

struct DiscardJournal;

impl JournalSink for DiscardJournal {
    fn append(&mut self, record: JournalRecord) -> Result<(), JournalClosed> {
        black_box(record);
        Ok(())
    }
}

fn account(user: u128) -> UserAccount {
    UserAccount { user_id: Uuid::from_u128(user), domain: Domain::Banking, asset: Asset::USD }
}

struct Bench {
    engine: Engine<DiscardJournal>,
    next: u64,
    now_ms: i64,
}

impl Bench {
    fn run(&mut self, operation: Operation) {
        self.next += 1;
        let key = IdempotencyKey::new(&format!("b{}", self.next)).expect("valid key");
        let outcome = self.engine.execute(Request { key, now_ms: self.now_ms, operation });
        assert!(outcome.result.is_ok(), "{:?}", outcome.result);
    }
}

fn setup() -> Bench {
    let config = EngineConfig { retention_ms: RETENTION_MS, ..EngineConfig::default() };
    let mut bench = Bench { engine: Engine::new(config, DiscardJournal), next: 0, now_ms: 1_790_000_000_000 };
    for user in 0..USERS {
        bench.run(Operation::OpenAccount { account: account(user), config: AccountConfig::default() });
        let amount = Amount::from_minor(1_000_000_000_000).expect("valid amount");
        bench.run(Operation::Deposit { account: account(user), amount, provider: Provider::Stripe });
        let record = ComplianceRecord { kyc: KycStatus::Verified, risk: RiskLevel::Low, max_transaction_minor: None };
        bench.run(Operation::SetCompliance { user_id: Uuid::from_u128(user), record });
    }
    bench
}

fn lifecycle(c: &mut Criterion) {
    let mut bench = setup();
    let mut transaction: u128 = 0;
    let mut group = c.benchmark_group("lifecycle");
    group.throughput(Throughput::Elements(7));
    group.bench_function("send_money_initiate_to_completed", |b| {
        b.iter(|| {
            transaction += 1;
            let payer = transaction % USERS;
            let payee = (payer + 1) % USERS;
            let id = Uuid::from_u128(1 << 64 | transaction);
            let fee = |tier, amount_minor| FeeLine {
                tier,
                category: "bench".into(),
                method: FeeMethod::Flat,
                amount_minor,
                provider: None,
                schedule_version: 1,
            };
            bench.run(Operation::InitiateTransaction {
                transaction: Box::new(NewTransaction {
                    id,
                    user_id: Uuid::from_u128(payer),
                    domain: Domain::Banking,
                    kind: TxType::SendMoney,
                    payer: AccountRef::User(account(payer)),
                    payee: AccountRef::User(account(payee)),
                    principal_minor: 1_000,
                    fees: vec![fee(FeeTier::Platform, 10), fee(FeeTier::Network, 1)],
                    receive: None,
                    provider: None,
                    details: BTreeMap::new(),
                }),
            });
            for to in [
                TxStatus::Validating,
                TxStatus::BalanceReserved,
                TxStatus::SentToProvider,
                TxStatus::ProviderProcessing,
                TxStatus::Completed,
            ] {
                bench.run(Operation::TransitionTransaction {
                    user_id: Uuid::from_u128(payer),
                    transaction_id: id,
                    to,
                    reason: String::new(),
                    provider_event: None,
                    fill: None,
                    payee_user_id: Some(Uuid::from_u128(payee)),
                });
            }
            if bench.next.is_multiple_of(SWEEP_EVERY) {
                bench.now_ms += RETENTION_MS + 1;
                bench.engine.sweep(bench.now_ms).expect("sweep");
            }
        });
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1));
    targets = lifecycle
}
criterion_main!(benches);
