//! The transaction projections of a journal batch: transactions, their status history, fee
//! lines and user compliance records, written inside the batch's PostgreSQL transaction.
//!
//! Called once per batch by `batch::write_batch`. Changes are coalesced per transaction (a
//! transaction created and moved three times in one batch is one INSERT plus one UPDATE row) and
//! written with UNNEST over bound arrays, so the statement count does not grow with the batch.
//! History rows are appended one per status change. Every UPDATE checks it touched the rows it
//! expected, so a projection mismatch aborts the batch.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use sqlx::PgConnection;
use uuid::Uuid;

use super::JournalError;
use crate::engine::account::FeeTier;
use crate::engine::effect::{Effect, StatusChange};
use crate::engine::record::JournalRecord;
use crate::engine::transaction::{AmlResult, ComplianceRecord, Fill, Transaction, TxStatus};
use crate::store::codec;

/// The latest state of one transaction within a batch.
struct StatusUpdate<'r> {
    status: TxStatus,
    updated_at_ms: i64,
    aml: Option<&'r AmlResult>,
    fill: Option<&'r Fill>,
    sequence: i64,
}

/// The transaction projection changes of a batch.
#[derive(Default)]
pub(super) struct Changes<'r> {
    created: Vec<(&'r Transaction, i64)>,
    updates: BTreeMap<Uuid, StatusUpdate<'r>>,
    history: Vec<(&'r StatusChange, i64)>,
    compliance: BTreeMap<Uuid, (ComplianceRecord, i64)>,
}

impl<'r> Changes<'r> {
    pub(super) fn of(records: &'r [JournalRecord]) -> Result<Changes<'r>, JournalError> {
        let mut changes = Changes::default();
        for record in records {
            let sequence = codec::to_bigint(record.sequence)?;
            for effect in &record.effects {
                match effect {
                    Effect::TransactionCreated { transaction } => changes.created.push((transaction, sequence)),
                    Effect::TransactionStatusChanged { change } => {
                        let update = changes.updates.entry(change.transaction_id).or_insert(StatusUpdate {
                            status: change.to,
                            updated_at_ms: change.at_ms,
                            aml: None,
                            fill: None,
                            sequence,
                        });
                        update.status = change.to;
                        update.updated_at_ms = change.at_ms;
                        update.sequence = sequence;
                        update.aml = change.aml.as_ref().or(update.aml);
                        update.fill = change.fill.as_ref().or(update.fill);
                        changes.history.push((change, sequence));
                    }
                    Effect::ComplianceSet { user_id, after, .. } => {
                        changes.compliance.insert(*user_id, (*after, sequence));
                    }
                    _ => {}
                }
            }
        }
        Ok(changes)
    }

    /// Whether the batch touches no transaction (most ledger operations do not).
    pub(super) fn is_empty(&self) -> bool {
        self.created.is_empty() && self.updates.is_empty() && self.history.is_empty() && self.compliance.is_empty()
    }
}

fn tier_name(tier: FeeTier) -> &'static str {
    match tier {
        FeeTier::Platform => "platform",
        FeeTier::Provider => "provider",
        FeeTier::Network => "network",
        FeeTier::Compliance => "compliance",
        FeeTier::Premium => "premium",
    }
}

/// The fee lines' status once a transaction reaches `status`, if it changes it.
fn fee_status(status: TxStatus) -> Option<&'static str> {
    match status {
        TxStatus::Completed => Some("posted"),
        TxStatus::Failed => Some("released"),
        TxStatus::Compensated => Some("reversed"),
        _ => None,
    }
}

fn mismatch(what: &str, affected: u64, expected: usize) -> Result<(), JournalError> {
    if affected as usize == expected {
        Ok(())
    } else {
        Err(JournalError::Inconsistent(format!("{what}: {affected} rows changed where {expected} were expected")))
    }
}

/// Writes the transaction projections of one batch inside `tx`.
pub(super) async fn write(tx: &mut PgConnection, changes: &Changes<'_>) -> Result<(), JournalError> {
    insert_created(tx, changes).await?;
    update_statuses(tx, changes).await?;
    insert_history(tx, changes).await?;
    upsert_compliance(tx, changes).await?;
    Ok(())
}

async fn insert_created(tx: &mut PgConnection, changes: &Changes<'_>) -> Result<(), JournalError> {
    if changes.created.is_empty() {
        return Ok(());
    }
    let count = changes.created.len();
    let mut ids = Vec::with_capacity(count);
    let mut users = Vec::with_capacity(count);
    let mut domains = Vec::with_capacity(count);
    let mut kinds = Vec::with_capacity(count);
    let mut assets = Vec::with_capacity(count);
    let mut principals = Vec::with_capacity(count);
    let mut fee_totals = Vec::with_capacity(count);
    let mut providers = Vec::with_capacity(count);
    let mut details = Vec::with_capacity(count);
    let mut specs = Vec::with_capacity(count);
    let mut at_ms = Vec::with_capacity(count);
    let mut sequences = Vec::with_capacity(count);
    let (mut fee_ids, mut fee_tiers, mut fee_categories, mut fee_methods) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut fee_assets, mut fee_amounts, mut fee_providers, mut fee_versions, mut fee_sequences) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (transaction, sequence) in &changes.created {
        let spec = &transaction.spec;
        let asset = spec.payer.asset();
        ids.push(spec.id);
        users.push(spec.user_id);
        domains.push(spec.domain.name());
        kinds.push(spec.kind.name());
        assets.push(asset.symbol());
        principals.push(codec::to_decimal(spec.principal_minor, asset)?);
        fee_totals.push(codec::to_decimal(spec.fees_total_minor(), asset)?);
        providers.push(spec.provider.clone());
        details.push(serde_json::to_string(&spec.details)?);
        specs.push(serde_json::to_string(spec)?);
        at_ms.push(transaction.created_at_ms);
        sequences.push(*sequence);
        for line in &spec.fees {
            fee_ids.push(spec.id);
            fee_tiers.push(tier_name(line.tier));
            fee_categories.push(line.category.as_str());
            fee_methods.push(line.method.name());
            fee_assets.push(asset.symbol());
            fee_amounts.push(codec::to_decimal(line.amount_minor, asset)?);
            fee_providers.push(line.provider.as_deref());
            fee_versions.push(line.schedule_version);
            fee_sequences.push(*sequence);
        }
    }
    sqlx::query(
        "INSERT INTO ledger.transactions (transaction_id, user_id, domain, type, status, asset, principal, fee_total,
             provider, details, spec, created_at_ms, updated_at_ms, created_sequence, updated_sequence)
         SELECT i, u, d, k, 'initiated', a, p, f, pr, de::jsonb, sp::json, t, t, s, s
         FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::numeric[], $7::numeric[],
             $8::text[], $9::text[], $10::text[], $11::int8[], $12::int8[]) AS x(i, u, d, k, a, p, f, pr, de, sp, t, s)",
    )
    .bind(&ids)
    .bind(&users)
    .bind(&domains)
    .bind(&kinds)
    .bind(&assets)
    .bind(&principals)
    .bind(&fee_totals)
    .bind(&providers)
    .bind(&details)
    .bind(&specs)
    .bind(&at_ms)
    .bind(&sequences)
    .execute(&mut *tx)
    .await?;
    if !fee_ids.is_empty() {
        sqlx::query(
            "INSERT INTO ledger.transaction_fees (transaction_id, tier, category, method, asset, amount, provider,
                 schedule_version, status, updated_sequence)
             SELECT i, t, c, m, a, x, p, v, 'pending', s
             FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::numeric[], $7::text[],
                 $8::int8[], $9::int8[]) AS f(i, t, c, m, a, x, p, v, s)",
        )
        .bind(&fee_ids)
        .bind(&fee_tiers)
        .bind(&fee_categories)
        .bind(&fee_methods)
        .bind(&fee_assets)
        .bind(&fee_amounts)
        .bind(&fee_providers)
        .bind(&fee_versions)
        .bind(&fee_sequences)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

async fn update_statuses(tx: &mut PgConnection, changes: &Changes<'_>) -> Result<(), JournalError> {
    if changes.updates.is_empty() {
        return Ok(());
    }
    let count = changes.updates.len();
    let mut ids = Vec::with_capacity(count);
    let mut statuses = Vec::with_capacity(count);
    let mut updated_at_ms = Vec::with_capacity(count);
    let mut aml_statuses = Vec::with_capacity(count);
    let mut aml_scores = Vec::with_capacity(count);
    let mut aml_flags = Vec::with_capacity(count);
    let mut fill_prices = Vec::with_capacity(count);
    let mut fill_quantities = Vec::with_capacity(count);
    let mut sequences = Vec::with_capacity(count);
    let (mut fee_ids, mut fee_statuses, mut fee_sequences) = (Vec::new(), Vec::new(), Vec::new());
    for (id, update) in &changes.updates {
        ids.push(*id);
        statuses.push(update.status.name());
        updated_at_ms.push(update.updated_at_ms);
        aml_statuses.push(update.aml.map(|aml| aml.status.name()));
        aml_scores.push(update.aml.map(|aml| i16::from(aml.risk_score)));
        // A text[] column bound per row: encoded as a JSON array and unpacked in SQL, since
        // UNNEST over a 2-D array would flatten it.
        aml_flags.push(update.aml.map(|aml| serde_json::to_string(&aml.flags)).transpose()?);
        fill_prices.push(update.fill.map(|fill| fill.price));
        fill_quantities.push(update.fill.map(|fill| Decimal::from_i128_with_scale(fill.quantity_minor, 0)));
        sequences.push(update.sequence);
        if let Some(status) = fee_status(update.status) {
            fee_ids.push(*id);
            fee_statuses.push(status);
            fee_sequences.push(update.sequence);
        }
    }
    let updated = sqlx::query(
        "UPDATE ledger.transactions t SET status = x.st, updated_at_ms = x.at, updated_sequence = x.s,
             aml_status = COALESCE(x.aml, t.aml_status), aml_risk_score = COALESCE(x.score, t.aml_risk_score),
             aml_flags = CASE WHEN x.flags IS NULL THEN t.aml_flags
                 ELSE ARRAY(SELECT json_array_elements_text(x.flags::json)) END,
             fill_price = COALESCE(x.price, t.fill_price),
             fill_quantity_minor = COALESCE(x.quantity, t.fill_quantity_minor)
         FROM UNNEST($1::uuid[], $2::text[], $3::int8[], $4::text[], $5::int2[], $6::text[], $7::numeric[],
             $8::numeric[], $9::int8[]) AS x(i, st, at, aml, score, flags, price, quantity, s)
         WHERE t.transaction_id = x.i",
    )
    .bind(&ids)
    .bind(&statuses)
    .bind(&updated_at_ms)
    .bind(&aml_statuses)
    .bind(&aml_scores)
    .bind(&aml_flags)
    .bind(&fill_prices)
    .bind(&fill_quantities)
    .bind(&sequences)
    .execute(&mut *tx)
    .await?;
    mismatch("transaction status updates", updated.rows_affected(), count)?;
    if !fee_ids.is_empty() {
        sqlx::query(
            "UPDATE ledger.transaction_fees f SET status = x.st, updated_sequence = x.s
             FROM UNNEST($1::uuid[], $2::text[], $3::int8[]) AS x(i, st, s) WHERE f.transaction_id = x.i",
        )
        .bind(&fee_ids)
        .bind(&fee_statuses)
        .bind(&fee_sequences)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

async fn insert_history(tx: &mut PgConnection, changes: &Changes<'_>) -> Result<(), JournalError> {
    if changes.history.is_empty() {
        return Ok(());
    }
    let count = changes.history.len();
    let mut ids = Vec::with_capacity(count);
    let mut sequences = Vec::with_capacity(count);
    let mut users = Vec::with_capacity(count);
    let mut domains = Vec::with_capacity(count);
    let mut froms = Vec::with_capacity(count);
    let mut tos = Vec::with_capacity(count);
    let mut reasons = Vec::with_capacity(count);
    let mut at_ms = Vec::with_capacity(count);
    let mut sources = Vec::with_capacity(count);
    let mut event_ids = Vec::with_capacity(count);
    let mut metadata = Vec::with_capacity(count);
    for (change, sequence) in &changes.history {
        ids.push(change.transaction_id);
        sequences.push(*sequence);
        users.push(change.user_id);
        domains.push(change.domain.name());
        froms.push(change.from.name());
        tos.push(change.to.name());
        reasons.push(change.reason.as_str());
        at_ms.push(change.at_ms);
        sources.push(change.provider_event.as_ref().map(|event| event.source.as_str()));
        event_ids.push(change.provider_event.as_ref().map(|event| event.event_id.as_str()));
        metadata.push(serde_json::to_string(&serde_json::json!({
            "type": change.kind.name(),
            "aml": change.aml,
            "fill": change.fill,
            "fees_posted": change.fees_posted,
        }))?);
    }
    sqlx::query(
        "INSERT INTO ledger.transaction_status_history (transaction_id, sequence, user_id, domain, from_status,
             to_status, reason, at_ms, provider_source, provider_event_id, metadata)
         SELECT i, s, u, d, f, t, r, a, ps, pe, m::jsonb
         FROM UNNEST($1::uuid[], $2::int8[], $3::uuid[], $4::text[], $5::text[], $6::text[], $7::text[], $8::int8[],
             $9::text[], $10::text[], $11::text[]) AS x(i, s, u, d, f, t, r, a, ps, pe, m)",
    )
    .bind(&ids)
    .bind(&sequences)
    .bind(&users)
    .bind(&domains)
    .bind(&froms)
    .bind(&tos)
    .bind(&reasons)
    .bind(&at_ms)
    .bind(&sources)
    .bind(&event_ids)
    .bind(&metadata)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

async fn upsert_compliance(tx: &mut PgConnection, changes: &Changes<'_>) -> Result<(), JournalError> {
    if changes.compliance.is_empty() {
        return Ok(());
    }
    let count = changes.compliance.len();
    let (mut users, mut kyc, mut risk, mut caps, mut sequences) = (
        Vec::with_capacity(count),
        Vec::with_capacity(count),
        Vec::with_capacity(count),
        Vec::with_capacity(count),
        Vec::with_capacity(count),
    );
    for (user_id, (record, sequence)) in &changes.compliance {
        users.push(*user_id);
        kyc.push(record.kyc.name());
        risk.push(record.risk.name());
        caps.push(record.max_transaction_minor.map(|minor| Decimal::from_i128_with_scale(minor, 0)));
        sequences.push(*sequence);
    }
    sqlx::query(
        "INSERT INTO ledger.user_compliance (user_id, kyc_status, risk_level, max_transaction_minor, updated_sequence)
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::numeric[], $5::int8[])
         ON CONFLICT (user_id) DO UPDATE SET kyc_status = EXCLUDED.kyc_status, risk_level = EXCLUDED.risk_level,
             max_transaction_minor = EXCLUDED.max_transaction_minor, updated_sequence = EXCLUDED.updated_sequence",
    )
    .bind(&users)
    .bind(&kyc)
    .bind(&risk)
    .bind(&caps)
    .bind(&sequences)
    .execute(&mut *tx)
    .await?;
    Ok(())
}
