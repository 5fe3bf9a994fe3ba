//! Outbox events: what other services hear about a journal record, derived from it by a pure
//! function ([`events_of`]), so the journal writer can store them in the record's own
//! transaction and a replayed batch yields the very same events (same ids, same order).
//!
//! One record gives zero or more events, numbered by `ordinal` in the order of its effects. A
//! recorded refusal has no effects and so no events. What is published:
//!
//! | effect | aggregate | event type |
//! | --- | --- | --- |
//! | `AccountOpened` | `account` | `opened` |
//! | `FrozenChanged` | `account` | `frozen` / `unfrozen` |
//! | `Posting` (per user side) | `account` | `balance_changed` |
//! | `ReservationOpened` | `reservation` | `created` |
//! | `ReservationClosed` | `reservation` | `completed` / `released` / `expired` |
//! | `UsageChanged` | none: an internal counter, not a business fact |
//!
//! `balance_changed` means the account's total moved (money in or out); moving money between
//! available and reserved is told by the reservation events. System accounts (clearing, fees,
//! liquidity) are the platform's own books and publish nothing.
//!
//! The transaction lifecycle (issue 5) will add "transaction status changed" and "fee posted":
//! each new `Effect` variant must get its arm in [`effect_events`] (the match is exhaustive, so
//! the compiler points there), with aggregate `transaction` and types such as
//! `status_changed` and `fee_posted`.

use serde_json::{Value, json};
use uuid::Uuid;

use crate::engine::account::{AccountConfig, UserAccount};
use crate::engine::effect::{Effect, Slot};
use crate::engine::operation::Operation;
use crate::engine::record::{JournalRecord, Origin};
use crate::engine::reservation::{Reservation, ReservationStatus};
use crate::store::codec;

/// The schema version of every payload below. Bump it (and document the change in
/// docs/OUTBOX.md) when a payload changes incompatibly.
pub const PAYLOAD_VERSION: i16 = 1;

/// The most events one record may produce; a record with more is a bug (a linked batch holds at
/// most `MAX_BATCH_OPERATIONS` operations, each with a handful of effects).
pub const MAX_EVENTS_PER_RECORD: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Aggregate {
    Account,
    Reservation,
    Transaction,
    User,
}

impl Aggregate {
    pub fn name(self) -> &'static str {
        match self {
            Aggregate::Account => "account",
            Aggregate::Reservation => "reservation",
            Aggregate::Transaction => "transaction",
            Aggregate::User => "user",
        }
    }
}

/// One event, as the outbox stores it (the position and the delivery state are the table's).
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxEvent {
    pub event_id: Uuid,
    /// The journal record that caused it, and its place among that record's events.
    pub sequence: u64,
    pub ordinal: u32,
    pub aggregate: Aggregate,
    pub aggregate_id: String,
    pub event_type: &'static str,
    pub payload: Value,
    pub metadata: Value,
}

/// The event id: a UUID (version 8, custom) made of the record's sequence and the event's
/// ordinal, so the same record always gives the same ids, which is what lets JetStream (and
/// consumers) deduplicate a republished event.
///
/// RFC 9562 gives version 8 three custom fields around the version and variant bits:
/// `custom_a` (48 bits), `custom_b` (12 bits), `custom_c` (62 bits). The sequence's 64 bits
/// fill `custom_a`, `custom_b` and the top 4 bits of `custom_c`; the ordinal's 32 bits follow,
/// then [`EVENT_ID_TAG`]. No bit of either number lands on a version or variant bit, so the
/// mapping is injective: two events never share an id.
pub fn event_id(sequence: u64, ordinal: u32) -> Uuid {
    let sequence = u128::from(sequence);
    let custom_a = sequence >> 16;
    let custom_b = (sequence >> 4) & 0xfff;
    let custom_c = ((sequence & 0xf) << 58) | (u128::from(ordinal) << 26) | EVENT_ID_TAG;
    Uuid::from_u128((custom_a << 80) | (0x8 << 76) | (custom_b << 64) | (0b10 << 62) | custom_c)
}

/// The low 26 bits of every event id. Ids of the first layout (which lost bits of the sequence
/// under the version and variant bits, so sequences 4096 apart collided) ended in the bytes
/// `dbLo`, whose low 26 bits differ from this: an id of this layout never equals one of that.
const EVENT_ID_TAG: u128 = 0x2b1_e0a5;

/// The events of `record`, in the order of its effects.
pub fn events_of(record: &JournalRecord) -> Vec<OutboxEvent> {
    let metadata = metadata_of(record);
    let mut events = Vec::new();
    for effect in &record.effects {
        for (aggregate, aggregate_id, event_type, payload) in effect_events(effect, record.at_ms) {
            let ordinal = u32::try_from(events.len()).unwrap_or(u32::MAX);
            debug_assert!(events.len() < MAX_EVENTS_PER_RECORD, "a record with too many events");
            events.push(OutboxEvent {
                event_id: event_id(record.sequence, ordinal),
                sequence: record.sequence,
                ordinal,
                aggregate,
                aggregate_id,
                event_type,
                payload,
                metadata: metadata.clone(),
            });
        }
    }
    events
}

/// What caused the record: the request's idempotency key, operation and context (correlation
/// id, calling service), or the expiry sweep. The peer address and user agent stay in the
/// journal: they are for audit, not for other services.
fn metadata_of(record: &JournalRecord) -> Value {
    match &record.origin {
        Origin::Request { key, operation, context, .. } => json!({
            "sequence": record.sequence,
            "at_ms": record.at_ms,
            "cause": "request",
            "idempotency_key": key.as_str(),
            "operation": operation_name(operation),
            "correlation_id": context.as_ref().map(|context| context.correlation_id.as_str()),
            "caller": context.as_ref().and_then(|context| context.caller.as_deref()),
        }),
        Origin::ExpirySweep => json!({
            "sequence": record.sequence,
            "at_ms": record.at_ms,
            "cause": "expiry_sweep",
        }),
    }
}

fn operation_name(operation: &Operation) -> &'static str {
    match operation {
        Operation::OpenAccount { .. } => "open_account",
        Operation::SetFrozen { .. } => "set_frozen",
        Operation::Deposit { .. } => "deposit",
        Operation::Withdraw { .. } => "withdraw",
        Operation::Reserve { .. } => "reserve",
        Operation::Commit { .. } => "commit",
        Operation::Release { .. } => "release",
        Operation::Transfer { .. } => "transfer",
        Operation::Convert { .. } => "convert",
        Operation::InitiateTransaction { .. } => "initiate_transaction",
        Operation::TransitionTransaction { .. } => "transition_transaction",
        Operation::SetCompliance { .. } => "set_compliance",
        Operation::SetKyc { .. } => "set_kyc",
        Operation::LinkedBatch { .. } => "linked_batch",
    }
}

/// The aggregate id of a user account: `user_id:domain:asset`.
pub fn account_id(account: &UserAccount) -> String {
    format!("{}:{}:{}", account.user_id, account.domain.name(), account.asset)
}

type Emitted = (Aggregate, String, &'static str, Value);

fn effect_events(effect: &Effect, at_ms: i64) -> Vec<Emitted> {
    match effect {
        Effect::AccountOpened { account, config } => {
            vec![(Aggregate::Account, account_id(account), "opened", opened_payload(account, config))]
        }
        Effect::FrozenChanged { account, frozen } => {
            let event_type = if *frozen { "frozen" } else { "unfrozen" };
            vec![(Aggregate::Account, account_id(account), event_type, json!({ "account": account_json(account) }))]
        }
        Effect::Posting { from, to, amount_minor } => [(from, -amount_minor), (to, *amount_minor)]
            .into_iter()
            .filter_map(|(slot, delta_minor)| match slot {
                Slot::User(account) => Some((
                    Aggregate::Account,
                    account_id(account),
                    "balance_changed",
                    json!({
                        "account": account_json(account),
                        "delta_minor": delta_minor.to_string(),
                        "delta": amount_text(delta_minor, account),
                    }),
                )),
                Slot::System { .. } => None,
            })
            .collect(),
        Effect::ReservationOpened { reservation } => {
            vec![(Aggregate::Reservation, reservation.id.to_string(), "created", reservation_payload(reservation))]
        }
        Effect::ReservationClosed { user_id, reservation_id, status, closed_at_ms } => {
            let event_type = match status {
                ReservationStatus::Completed => "completed",
                ReservationStatus::Released => "released",
                ReservationStatus::Expired => "expired",
                // Never emitted by the engine (a close is final); told as what it is if it were.
                ReservationStatus::Active => "reopened",
            };
            vec![(
                Aggregate::Reservation,
                reservation_id.to_string(),
                event_type,
                json!({
                    "user_id": user_id,
                    "reservation_id": reservation_id,
                    "status": codec::status_name(*status),
                    "closed_at_ms": closed_at_ms,
                    "recorded_at_ms": at_ms,
                }),
            )]
        }
        Effect::UsageChanged { .. } => Vec::new(),
        Effect::TransactionCreated { transaction } => vec![(
            Aggregate::Transaction,
            transaction.spec.id.to_string(),
            "initiated",
            json!({
                "transaction_id": transaction.spec.id,
                "user_id": transaction.spec.user_id,
                "domain": transaction.spec.domain.name(),
                "type": transaction.spec.kind,
                "principal_minor": transaction.spec.principal_minor.to_string(),
                "fees": transaction.spec.fees,
                "created_at_ms": transaction.created_at_ms,
            }),
        )],
        Effect::TransactionStatusChanged { change } => {
            // One event per status change; a completion or compensation that moved fees also
            // says so in its own event, one per fee line, in the same order as their postings.
            let mut events = vec![(
                Aggregate::Transaction,
                change.transaction_id.to_string(),
                "status_changed",
                json!({
                    "transaction_id": change.transaction_id,
                    "user_id": change.user_id,
                    "domain": change.domain.name(),
                    "type": change.kind,
                    "from": change.from,
                    "to": change.to,
                    "reason": change.reason,
                    "provider_event": change.provider_event,
                    "aml": change.aml,
                    "fill": change.fill,
                    "at_ms": change.at_ms,
                }),
            )];
            events.extend(change.fees_posted.iter().map(|fee| {
                (
                    Aggregate::Transaction,
                    change.transaction_id.to_string(),
                    "fee_posted",
                    json!({ "transaction_id": change.transaction_id, "to": change.to, "fee": fee }),
                )
            }));
            events
        }
        Effect::ComplianceSet { user_id, after, .. } => {
            vec![(
                Aggregate::User,
                user_id.to_string(),
                "compliance_set",
                json!({ "user_id": user_id, "record": after }),
            )]
        }
    }
}

fn account_json(account: &UserAccount) -> Value {
    json!({ "user_id": account.user_id, "domain": account.domain.name(), "asset": account.asset.to_string() })
}

/// The decimal text of an amount in the account's asset; `None` only if it cannot be a decimal
/// (beyond 28 digits), in which case `*_minor` alone carries it.
fn amount_text(amount_minor: i128, account: &UserAccount) -> Option<String> {
    codec::to_decimal(amount_minor, account.asset).ok().map(|amount| amount.to_string())
}

fn opened_payload(account: &UserAccount, config: &AccountConfig) -> Value {
    json!({
        "account": account_json(account),
        "overdraft_minor": config.overdraft_minor.to_string(),
        "frozen": config.frozen,
    })
}

fn reservation_payload(reservation: &Reservation) -> Value {
    json!({
        "reservation_id": reservation.id,
        "account": account_json(&reservation.account),
        "amount_minor": reservation.amount_minor.to_string(),
        "amount": amount_text(reservation.amount_minor, &reservation.account),
        "created_at_ms": reservation.created_at_ms,
        "expires_at_ms": reservation.expires_at_ms,
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::engine::account::{Domain, Provider, SystemAccount, SystemKind};
    use crate::engine::asset::Asset;
    use crate::engine::error::EngineError;
    use crate::engine::idempotency::IdempotencyKey;
    use crate::engine::money::Amount;
    use crate::engine::record::RequestContext;

    fn account() -> UserAccount {
        UserAccount { user_id: Uuid::from_u128(7), domain: Domain::Banking, asset: Asset::USD }
    }

    fn deposit_record(outcome_ok: bool, effects: Vec<Effect>) -> JournalRecord {
        let amount = Amount::from_minor(250).expect("an amount");
        JournalRecord {
            sequence: 42,
            at_ms: 1_000,
            origin: Origin::Request {
                key: IdempotencyKey::new("dep-1").expect("a key"),
                operation: Operation::Deposit { account: account(), amount, provider: Provider::Stripe },
                outcome: if outcome_ok {
                    Ok(crate::engine::operation::Receipt::Done)
                } else {
                    Err(EngineError::AccountFrozen { account: account() })
                },
                context: Some(Box::new(RequestContext {
                    correlation_id: "corr-1".to_owned(),
                    caller: Some("payments".to_owned()),
                    peer: Some("10.0.0.1:5000".to_owned()),
                    user_agent: None,
                })),
            },
            effects,
        }
    }

    #[test]
    fn a_posting_tells_the_user_side_only_with_the_request_as_cause() {
        let clearing = Slot::System {
            account: SystemAccount { kind: SystemKind::ProviderClearing(Provider::Stripe), asset: Asset::USD },
            shard: 3,
        };
        let record = deposit_record(
            true,
            vec![Effect::Posting { from: clearing, to: Slot::User(account()), amount_minor: 250 }],
        );
        let events = events_of(&record);
        assert_eq!(events.len(), 1);
        let event = &events[0];
        assert_eq!((event.aggregate, event.event_type), (Aggregate::Account, "balance_changed"));
        assert_eq!(event.aggregate_id, account_id(&account()));
        assert_eq!(event.payload["delta_minor"], "250");
        assert_eq!(event.payload["delta"], "2.50");
        assert_eq!(event.metadata["idempotency_key"], "dep-1");
        assert_eq!(event.metadata["correlation_id"], "corr-1");
        assert_eq!(event.metadata["caller"], "payments");
        assert!(event.metadata.get("peer").is_none(), "the peer address stays in the journal");
        assert_eq!(event.event_id, event_id(42, 0));
    }

    #[test]
    fn a_recorded_refusal_has_no_events() {
        assert!(events_of(&deposit_record(false, Vec::new())).is_empty());
    }

    #[test]
    fn the_sweep_expires_reservations_with_the_sweep_as_cause() {
        let record = JournalRecord {
            sequence: 9,
            at_ms: 5_000,
            origin: Origin::ExpirySweep,
            effects: vec![Effect::ReservationClosed {
                user_id: Uuid::from_u128(7),
                reservation_id: Uuid::from_u128(8),
                status: ReservationStatus::Expired,
                closed_at_ms: 5_000,
            }],
        };
        let events = events_of(&record);
        assert_eq!(events.len(), 1);
        assert_eq!((events[0].aggregate, events[0].event_type), (Aggregate::Reservation, "expired"));
        assert_eq!(events[0].metadata["cause"], "expiry_sweep");
    }

    proptest! {
        #[test]
        fn event_ids_are_stable_and_distinct(a in (1_u64.., any::<u32>()), b in (1_u64.., any::<u32>())) {
            prop_assert_eq!(event_id(a.0, a.1), event_id(a.0, a.1));
            prop_assert_eq!(event_id(a.0, a.1) == event_id(b.0, b.1), a == b);
        }

        /// Random pairs almost never differ in only the bits a bad layout drops; flipping one
        /// bit at a time does, for every bit of both numbers.
        #[test]
        fn every_bit_of_the_sequence_and_the_ordinal_changes_the_event_id(sequence in any::<u64>(), ordinal in any::<u32>()) {
            let id = event_id(sequence, ordinal);
            prop_assert_eq!(id.get_version_num(), 8);
            prop_assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
            prop_assert_eq!(id.as_u128() & 0x3ff_ffff, EVENT_ID_TAG);
            for bit in 0..64 {
                prop_assert_ne!(event_id(sequence ^ (1 << bit), ordinal), id, "sequence bit {}", bit);
            }
            for bit in 0..32 {
                prop_assert_ne!(event_id(sequence, ordinal ^ (1 << bit)), id, "ordinal bit {}", bit);
            }
        }

        #[test]
        fn events_of_a_record_are_numbered_in_order(amounts in proptest::collection::vec(1_i128..1_000_000, 0..20)) {
            let effects = amounts
                .iter()
                .map(|amount_minor| Effect::Posting {
                    from: Slot::User(account()),
                    to: Slot::User(UserAccount { user_id: Uuid::from_u128(9), ..account() }),
                    amount_minor: *amount_minor,
                })
                .collect();
            let events = events_of(&deposit_record(true, effects));
            prop_assert_eq!(events.len(), amounts.len() * 2);
            for (index, event) in events.iter().enumerate() {
                prop_assert_eq!(event.ordinal as usize, index);
                prop_assert_eq!(event.event_id, event_id(42, index as u32));
            }
        }
    }
}
