//! The PostgreSQL reads and writes of the Transactions API: transactions and their history as
//! projected by the journal, fee schedules, and the provider inbox.
//!
//! Everything here is outside the engine: reads of projections (durable, since the API answers
//! a mutation only after its batch committed) and the inbox, which is an input log of provider
//! webhooks rather than engine state. Every list is bounded by its caller's page size or a limit.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use sqlx::PgPool;
use uuid::Uuid;

use super::StoreError;
use crate::engine::operation::Operation;
use crate::engine::transaction::NewTransaction;
use crate::fees::{FeeRule, FeeSchedule, MAX_SCHEDULES_CONSIDERED};

/// One fee line as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeeRow {
    pub tier: String,
    pub category: String,
    pub method: String,
    pub amount: Decimal,
    pub provider: Option<String>,
    pub schedule_version: i64,
    pub status: String,
}

/// One transaction as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransactionRow {
    pub transaction_id: Uuid,
    pub user_id: Uuid,
    pub domain: String,
    pub kind: String,
    pub status: String,
    pub asset: String,
    pub principal: Decimal,
    pub fee_total: Decimal,
    pub provider: Option<String>,
    pub details: BTreeMap<String, String>,
    pub aml_status: Option<String>,
    pub aml_risk_score: Option<i16>,
    pub aml_flags: Vec<String>,
    pub fill_price: Option<Decimal>,
    pub fill_quantity_minor: Option<Decimal>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub fees: Vec<FeeRow>,
}

/// One status change as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryRow {
    pub sequence: i64,
    pub from_status: String,
    pub to_status: String,
    pub reason: String,
    pub at_ms: i64,
    pub provider_source: Option<String>,
    pub provider_event_id: Option<String>,
    pub metadata_json: String,
}

/// Filters of a transaction listing; `None` matches anything.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub domain: Option<&'static str>,
    /// The domains the caller may see; `None`: every domain.
    pub visible_domains: Option<Vec<&'static str>>,
    pub kind: Option<&'static str>,
    pub status: Option<&'static str>,
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    /// Strictly after this (created_at_ms, transaction_id) in newest-first order.
    pub after: Option<(i64, Uuid)>,
}

#[derive(sqlx::FromRow)]
struct Row {
    transaction_id: Uuid,
    user_id: Uuid,
    domain: String,
    kind: String,
    status: String,
    asset: String,
    principal: Decimal,
    fee_total: Decimal,
    provider: Option<String>,
    details_json: String,
    aml_status: Option<String>,
    aml_risk_score: Option<i16>,
    aml_flags: Option<Vec<String>>,
    fill_price: Option<Decimal>,
    fill_quantity_minor: Option<Decimal>,
    created_at_ms: i64,
    updated_at_ms: i64,
}

type FeeTuple = (Uuid, String, String, String, Decimal, Option<String>, i64, String);
type HistoryTuple = (i64, String, String, String, i64, Option<String>, Option<String>, String);
type EventTuple = (String, String, String, String, String, Option<String>, Option<Uuid>);

const COLUMNS: &str = "transaction_id, user_id, domain, type AS kind, status, asset, principal, fee_total, provider,
    details::text AS details_json, aml_status, aml_risk_score, aml_flags, fill_price, fill_quantity_minor,
    created_at_ms, updated_at_ms";

fn corrupt(what: String) -> StoreError {
    StoreError::Corrupt(what)
}

async fn with_fees(pool: &PgPool, rows: Vec<Row>) -> Result<Vec<TransactionRow>, StoreError> {
    let ids: Vec<Uuid> = rows.iter().map(|row| row.transaction_id).collect();
    let fee_rows: Vec<FeeTuple> = sqlx::query_as(
        "SELECT transaction_id, tier, category, method, amount, provider, schedule_version, status
         FROM ledger.transaction_fees WHERE transaction_id = ANY($1) ORDER BY transaction_id, tier",
    )
    .bind(&ids)
    .fetch_all(pool)
    .await?;
    let mut fees: BTreeMap<Uuid, Vec<FeeRow>> = BTreeMap::new();
    for (id, tier, category, method, amount, provider, schedule_version, status) in fee_rows {
        fees.entry(id).or_default().push(FeeRow { tier, category, method, amount, provider, schedule_version, status });
    }
    rows.into_iter()
        .map(|row| {
            let details: BTreeMap<String, String> = serde_json::from_str(&row.details_json)
                .map_err(|error| corrupt(format!("transaction {} details: {error}", row.transaction_id)))?;
            Ok(TransactionRow {
                transaction_id: row.transaction_id,
                user_id: row.user_id,
                domain: row.domain,
                kind: row.kind,
                status: row.status,
                asset: row.asset,
                principal: row.principal,
                fee_total: row.fee_total,
                provider: row.provider,
                details,
                aml_status: row.aml_status,
                aml_risk_score: row.aml_risk_score,
                aml_flags: row.aml_flags.unwrap_or_default(),
                fill_price: row.fill_price,
                fill_quantity_minor: row.fill_quantity_minor,
                created_at_ms: row.created_at_ms,
                updated_at_ms: row.updated_at_ms,
                fees: fees.remove(&row.transaction_id).unwrap_or_default(),
            })
        })
        .collect()
}

pub async fn transaction(pool: &PgPool, transaction_id: Uuid) -> Result<Option<TransactionRow>, StoreError> {
    let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM ledger.transactions WHERE transaction_id = $1"
    )))
    .bind(transaction_id)
    .fetch_all(pool)
    .await?;
    Ok(with_fees(pool, rows).await?.pop())
}

/// Whether the projections hold a transaction `transaction_id`, finished or not.
pub async fn transaction_exists(pool: &PgPool, transaction_id: Uuid) -> Result<bool, StoreError> {
    let (exists,): (bool,) =
        sqlx::query_as("SELECT EXISTS (SELECT 1 FROM ledger.transactions WHERE transaction_id = $1)")
            .bind(transaction_id)
            .fetch_one(pool)
            .await?;
    Ok(exists)
}

/// The journaled description of a transaction (who pays whom), for routing a status change.
/// The operation journaled under idempotency key `key` (its latest use, should the key have been
/// used again after the engine forgot it), once committed.
pub async fn operation_under_key(pool: &PgPool, key: &str) -> Result<Option<Operation>, StoreError> {
    let row: Option<(String,)> = sqlx::query_as(
        "SELECT operation::text FROM ledger.idempotency_outcomes WHERE key = $1 ORDER BY sequence DESC LIMIT 1",
    )
    .bind(key)
    .fetch_optional(pool)
    .await?;
    row.map(|(text,)| serde_json::from_str(&text).map_err(|error| corrupt(format!("operation under {key}: {error}"))))
        .transpose()
}

pub async fn spec(pool: &PgPool, transaction_id: Uuid) -> Result<Option<NewTransaction>, StoreError> {
    let row: Option<(String,)> = sqlx::query_as("SELECT spec::text FROM ledger.transactions WHERE transaction_id = $1")
        .bind(transaction_id)
        .fetch_optional(pool)
        .await?;
    row.map(|(text,)| {
        serde_json::from_str(&text).map_err(|error| corrupt(format!("transaction {transaction_id} spec: {error}")))
    })
    .transpose()
}

/// A page of `user_id`'s transactions, newest first.
///
/// Only the filters given become conditions. A single statement with `($n IS NULL OR col = $n)`
/// for every filter would be planned once for all of them (PostgreSQL's generic plan after a
/// few executions), and that plan cannot use the (user, status, time) index for a status filter.
pub async fn list(
    pool: &PgPool,
    user_id: Uuid,
    filter: &ListFilter,
    page_size: u32,
) -> Result<Vec<TransactionRow>, StoreError> {
    let mut query = sqlx::QueryBuilder::new(format!("SELECT {COLUMNS} FROM ledger.transactions WHERE user_id = "));
    query.push_bind(user_id);
    if let Some(domain) = filter.domain {
        query.push(" AND domain = ").push_bind(domain);
    }
    if let Some(visible) = &filter.visible_domains {
        query.push(" AND domain = ANY(").push_bind(visible.clone()).push(")");
    }
    if let Some(kind) = filter.kind {
        query.push(" AND type = ").push_bind(kind);
    }
    if let Some(status) = filter.status {
        query.push(" AND status = ").push_bind(status);
    }
    if let Some(from_ms) = filter.from_ms {
        query.push(" AND created_at_ms >= ").push_bind(from_ms);
    }
    if let Some(to_ms) = filter.to_ms {
        query.push(" AND created_at_ms < ").push_bind(to_ms);
    }
    if let Some((after_ms, after_id)) = filter.after {
        query.push(" AND (created_at_ms, transaction_id) < (").push_bind(after_ms);
        query.push(", ").push_bind(after_id).push(")");
    }
    query.push(" ORDER BY created_at_ms DESC, transaction_id DESC LIMIT ").push_bind(i64::from(page_size));
    let rows: Vec<Row> = query.build_query_as().fetch_all(pool).await?;
    with_fees(pool, rows).await
}

/// The most status changes one history answer returns (a lifecycle has at most nine).
pub const MAX_HISTORY_ROWS: i64 = 64;

pub async fn history(pool: &PgPool, transaction_id: Uuid) -> Result<Vec<HistoryRow>, StoreError> {
    let rows: Vec<HistoryTuple> = sqlx::query_as(
        "SELECT sequence, from_status, to_status, reason, at_ms, provider_source, provider_event_id, metadata::text
         FROM ledger.transaction_status_history WHERE transaction_id = $1 ORDER BY sequence LIMIT $2",
    )
    .bind(transaction_id)
    .bind(MAX_HISTORY_ROWS)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(sequence, from_status, to_status, reason, at_ms, provider_source, provider_event_id, metadata_json)| {
            HistoryRow {
                sequence,
                from_status,
                to_status,
                reason,
                at_ms,
                provider_source,
                provider_event_id,
                metadata_json,
            }
        })
        .collect())
}

/// The latest schedules of a transaction type and asset effective at or before `at_ms` (and
/// none after: selection by time is `fees::select`'s job, this bounds what it looks at).
pub async fn fee_schedules(pool: &PgPool, kind: &str, asset: &str, at_ms: i64) -> Result<Vec<FeeSchedule>, StoreError> {
    let rows: Vec<(i64, i64, String)> = sqlx::query_as(
        "SELECT version, (extract(epoch FROM effective_from) * 1000)::int8, rules::text FROM ledger.fee_schedules
         WHERE type = $1 AND asset = $2 AND effective_from <= to_timestamp($3::float8 / 1000)
         ORDER BY effective_from DESC, version DESC LIMIT $4",
    )
    .bind(kind)
    .bind(asset)
    .bind(at_ms)
    .bind(MAX_SCHEDULES_CONSIDERED)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|(version, effective_from_ms, rules)| {
            let rules: Vec<FeeRule> = serde_json::from_str(&rules)
                .map_err(|error| corrupt(format!("fee schedule {version} rules do not parse: {error}")))?;
            Ok(FeeSchedule { version, effective_from_ms, rules })
        })
        .collect()
}

/// A provider event as stored in the inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxEvent {
    pub source: String,
    pub event_id: String,
    pub event_type: String,
    pub raw_payload: String,
    pub status: String,
    pub reason: Option<String>,
    pub transaction_id: Option<Uuid>,
}

/// Stores a new event as Pending. `false` if (source, event_id) was already stored: nothing changed.
pub async fn insert_event(
    pool: &PgPool,
    source: &str,
    event_id: &str,
    event_type: &str,
    raw_payload: &str,
) -> Result<bool, StoreError> {
    let inserted = sqlx::query(
        "INSERT INTO ledger.provider_events (source, event_id, event_type, raw_payload, status)
         VALUES ($1, $2, $3, $4, 'pending') ON CONFLICT (source, event_id) DO NOTHING",
    )
    .bind(source)
    .bind(event_id)
    .bind(event_type)
    .bind(raw_payload)
    .execute(pool)
    .await?;
    Ok(inserted.rows_affected() == 1)
}

pub async fn event(pool: &PgPool, source: &str, event_id: &str) -> Result<Option<InboxEvent>, StoreError> {
    let row: Option<EventTuple> = sqlx::query_as(
        "SELECT source, event_id, event_type, raw_payload, status, reason, transaction_id
         FROM ledger.provider_events WHERE source = $1 AND event_id = $2",
    )
    .bind(source)
    .bind(event_id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(source, event_id, event_type, raw_payload, status, reason, transaction_id)| InboxEvent {
        source,
        event_id,
        event_type,
        raw_payload,
        status,
        reason,
        transaction_id,
    }))
}

/// Records the outcome of processing an event (one more attempt).
pub async fn settle_event(
    pool: &PgPool,
    source: &str,
    event_id: &str,
    status: &str,
    reason: Option<&str>,
    transaction_id: Option<Uuid>,
    processed_payload: Option<&str>,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE ledger.provider_events SET status = $3, reason = $4, transaction_id = $5,
             processed_payload = $6::jsonb, attempts = attempts + 1, processed_at = now()
         WHERE source = $1 AND event_id = $2",
    )
    .bind(source)
    .bind(event_id)
    .bind(status)
    .bind(reason)
    .bind(transaction_id)
    .bind(processed_payload)
    .execute(pool)
    .await?;
    Ok(())
}
