//! Audit rows for the ledger's money requests, written by the journal writer in the same
//! PostgreSQL transaction as the batch that makes them durable (one bulk INSERT over UNNEST'd
//! arrays per batch, so auditing adds one statement per batch, not one per request).
//!
//! One row per request record (expiry sweeps are the system's own, not a request): the event
//! type is `ledger.<operation>`, the entity the account (or reservation) it acts on, and who asked
//! comes from the record's [`RequestContext`]. The before state is `NULL` and the after state is
//! `{"sequence", "outcome", "effects"}`: the record's effects are the exact deltas the request
//! made (postings, reservation changes, account settings), and the balances before and after
//! any sequence can be rebuilt from the journal; repeating the balances here would cost a read
//! per account per batch on the ledger's hottest path.

use sqlx::PgConnection;

use super::ip_of;
use crate::engine::account::{AccountRef, UserAccount};
use crate::engine::operation::Operation;
use crate::engine::record::{JournalRecord, Origin, RequestContext};
use crate::journal::JournalError;
use crate::store::codec;

/// An account's entity id: `user_id/domain/asset`, or `system/kind/asset`.
fn account_id(account: &AccountRef) -> String {
    match account {
        AccountRef::User(user) => format!("{}/{}/{}", user.user_id, user.domain.name(), user.asset.symbol()),
        AccountRef::System(system) => {
            format!("system/{}/{}", codec::system_kind_name(system.kind), system.asset.symbol())
        }
    }
}

/// The event type and the entity an operation acts on.
fn subject(operation: &Operation) -> (&'static str, &'static str, String) {
    let account = |account: &UserAccount| account_id(&AccountRef::User(*account));
    match operation {
        Operation::OpenAccount { account: acted, .. } => ("ledger.open_account", "ledger_account", account(acted)),
        Operation::SetFrozen { account: acted, .. } => ("ledger.set_frozen", "ledger_account", account(acted)),
        Operation::Deposit { account: acted, .. } => ("ledger.deposit", "ledger_account", account(acted)),
        Operation::Withdraw { account: acted, .. } => ("ledger.withdraw", "ledger_account", account(acted)),
        Operation::Reserve { account: acted, .. } => ("ledger.reserve", "ledger_account", account(acted)),
        Operation::Commit { user_id, reservation_id, .. } => {
            ("ledger.commit", "reservation", format!("{user_id}/{reservation_id}"))
        }
        Operation::Release { user_id, reservation_id } => {
            ("ledger.release", "reservation", format!("{user_id}/{reservation_id}"))
        }
        Operation::Transfer { from, .. } => ("ledger.transfer", "ledger_account", account_id(from)),
        Operation::Convert { from, .. } => ("ledger.convert", "ledger_account", account(from)),
        Operation::InitiateTransaction { transaction } => {
            ("ledger.initiate_transaction", "transaction", format!("{}/{}", transaction.user_id, transaction.id))
        }
        Operation::TransitionTransaction { user_id, transaction_id, .. } => {
            ("ledger.transition_transaction", "transaction", format!("{user_id}/{transaction_id}"))
        }
        Operation::SetCompliance { user_id, .. } => ("ledger.set_compliance", "user", user_id.to_string()),
        Operation::LinkedBatch { operations } => (
            "ledger.linked_batch",
            "linked_batch",
            operations.first().map_or_else(String::new, |first| subject(first).2),
        ),
    }
}

/// Writes the audit rows of the batch's request records.
pub async fn write(tx: &mut PgConnection, records: &[JournalRecord]) -> Result<(), JournalError> {
    let count = records.len();
    let (mut event_types, mut entity_types, mut entity_ids, mut after_states) =
        (Vec::with_capacity(count), Vec::with_capacity(count), Vec::with_capacity(count), Vec::with_capacity(count));
    let (mut callers, mut ips, mut user_agents, mut correlation_ids, mut sequences) = (
        Vec::with_capacity(count),
        Vec::with_capacity(count),
        Vec::with_capacity(count),
        Vec::with_capacity(count),
        Vec::with_capacity(count),
    );
    for record in records {
        let Origin::Request { operation, outcome, context, .. } = &record.origin else { continue };
        let (event_type, entity_type, entity_id) = subject(operation);
        let context: Option<&RequestContext> = context.as_deref();
        event_types.push(event_type);
        entity_types.push(entity_type);
        entity_ids.push(entity_id);
        after_states.push(serde_json::to_string(&serde_json::json!({
            "sequence": record.sequence,
            "outcome": outcome,
            "effects": record.effects,
        }))?);
        callers.push(context.and_then(|context| context.caller.clone()));
        ips.push(ip_of(context.and_then(|context| context.peer.as_deref())));
        user_agents.push(context.and_then(|context| context.user_agent.clone()));
        correlation_ids.push(context.map(|context| context.correlation_id.clone()));
        sequences.push(
            i64::try_from(record.sequence).map_err(|_| {
                JournalError::Inconsistent(format!("sequence {} does not fit a bigint", record.sequence))
            })?,
        );
    }
    if event_types.is_empty() {
        return Ok(());
    }
    debug_assert!(
        [entity_types.len(), entity_ids.len(), after_states.len(), callers.len(), correlation_ids.len()]
            .iter()
            .chain([ips.len(), user_agents.len(), sequences.len()].iter())
            .all(|length| *length == event_types.len()),
        "one value per row in every column"
    );
    sqlx::query(
        "INSERT INTO audit.audit_log (event_type, entity_type, entity_id, after_state, caller, ip_address, user_agent,
             correlation_id, journal_sequence)
         SELECT e, t, i, a::jsonb, c, ip, ua, co, s
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[],
             $9::int8[]) AS u(e, t, i, a, c, ip, ua, co, s)",
    )
    .bind(event_types)
    .bind(entity_types)
    .bind(entity_ids)
    .bind(after_states)
    .bind(callers)
    .bind(ips)
    .bind(user_agents)
    .bind(correlation_ids)
    .bind(sequences)
    .execute(&mut *tx)
    .await?;
    Ok(())
}
