//! Writes a journal batch's outbox events inside the batch's own transaction (called once from
//! `journal::batch::write_batch`), so the events commit, or roll back, with their changes.
//!
//! Events are derived with the pure [`events_of`]; rows go in with one INSERT ... SELECT FROM
//! UNNEST over bound arrays, ordered by the array index so the identity `position` follows the
//! journal order (sequence, then ordinal).

use sqlx::PgConnection;

use super::event::{PAYLOAD_VERSION, events_of};
use crate::engine::record::JournalRecord;
use crate::journal::JournalError;
use crate::store::codec;

/// Appends the events of `records` (in order) to `ledger.outbox` on `tx`, returning how many.
pub async fn append_events(tx: &mut PgConnection, records: &[JournalRecord]) -> Result<usize, JournalError> {
    let mut event_ids = Vec::new();
    let mut sequences = Vec::new();
    let mut ordinals = Vec::new();
    let mut aggregate_types = Vec::new();
    let mut aggregate_ids = Vec::new();
    let mut event_types = Vec::new();
    let mut payloads = Vec::new();
    let mut metadata = Vec::new();
    for record in records {
        for event in events_of(record) {
            event_ids.push(event.event_id);
            sequences.push(codec::to_bigint(event.sequence)?);
            ordinals.push(i32::try_from(event.ordinal).map_err(|_| {
                JournalError::Inconsistent(format!("record {} has more events than fit an integer", event.sequence))
            })?);
            aggregate_types.push(event.aggregate.name());
            aggregate_ids.push(event.aggregate_id);
            event_types.push(event.event_type);
            payloads.push(serde_json::to_string(&event.payload)?);
            metadata.push(serde_json::to_string(&event.metadata)?);
        }
    }
    if event_ids.is_empty() {
        return Ok(0);
    }
    let count = event_ids.len();
    let inserted = sqlx::query(
        "INSERT INTO ledger.outbox (event_id, sequence, ordinal, aggregate_type, aggregate_id, event_type, version,
             payload, metadata)
         SELECT e, s, o, at, ai, et, $9, p::json, m::json
         FROM UNNEST($1::uuid[], $2::int8[], $3::int4[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[])
             WITH ORDINALITY AS t(e, s, o, at, ai, et, p, m, n)
         ORDER BY n",
    )
    .bind(event_ids)
    .bind(sequences)
    .bind(ordinals)
    .bind(aggregate_types)
    .bind(aggregate_ids)
    .bind(event_types)
    .bind(payloads)
    .bind(metadata)
    .bind(PAYLOAD_VERSION)
    .execute(&mut *tx)
    .await?;
    if inserted.rows_affected() as usize != count {
        return Err(JournalError::Inconsistent(format!(
            "outbox: {} rows inserted where {count} were expected",
            inserted.rows_affected()
        )));
    }
    Ok(count)
}
