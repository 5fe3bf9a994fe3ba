//! Writes a journal batch's outbox events inside the batch's own transaction (called once from
//! `journal::batch::write_batch`), so the events commit, or roll back, with their changes.
//!
//! Events are derived with the pure [`events_of`]; rows go to `ledger.outbox_events` in journal
//! order (sequence, then ordinal), so the identity `position` follows it: with binary COPY when
//! the batch is large (the journal's own threshold), else with one INSERT ... SELECT FROM UNNEST
//! over bound arrays, ordered by the array index. The rows are never updated afterwards: the
//! relay keeps its progress elsewhere (see `relay`).

use sqlx::PgConnection;
use uuid::Uuid;

use super::event::{PAYLOAD_VERSION, events_of};
use crate::engine::record::JournalRecord;
use crate::journal::JournalError;
use crate::journal::copy_rows::CopyRows;
use crate::store::codec;

/// The events of a batch, as columns.
#[derive(Default)]
struct EventRows {
    event_ids: Vec<Uuid>,
    sequences: Vec<i64>,
    ordinals: Vec<i32>,
    aggregate_types: Vec<&'static str>,
    aggregate_ids: Vec<String>,
    event_types: Vec<&'static str>,
    payloads: Vec<String>,
    /// Index into `metadata` (one per record: every event of a record shares it).
    metadata_of: Vec<usize>,
    metadata: Vec<String>,
}

impl EventRows {
    fn of(records: &[JournalRecord]) -> Result<EventRows, JournalError> {
        let mut rows = EventRows::default();
        for record in records {
            let events = events_of(record);
            let Some(first) = events.first() else { continue };
            rows.metadata.push(serde_json::to_string(&first.metadata)?);
            let metadata_index = rows.metadata.len() - 1;
            for event in events {
                debug_assert_eq!(event.sequence, record.sequence);
                rows.event_ids.push(event.event_id);
                rows.sequences.push(codec::to_bigint(event.sequence)?);
                rows.ordinals.push(i32::try_from(event.ordinal).map_err(|_| {
                    JournalError::Inconsistent(format!("record {} has more events than fit an integer", event.sequence))
                })?);
                rows.aggregate_types.push(event.aggregate.name());
                rows.aggregate_ids.push(event.aggregate_id);
                rows.event_types.push(event.event_type);
                rows.payloads.push(serde_json::to_string(&event.payload)?);
                rows.metadata_of.push(metadata_index);
            }
        }
        Ok(rows)
    }

    fn len(&self) -> usize {
        self.event_ids.len()
    }
}

/// Appends the events of `records` (in order) to `ledger.outbox_events` on `tx`, with COPY when
/// `use_copy`, returning how many.
pub async fn append_events(
    tx: &mut PgConnection,
    records: &[JournalRecord],
    use_copy: bool,
) -> Result<usize, JournalError> {
    let rows = EventRows::of(records)?;
    let count = rows.len();
    if count == 0 {
        return Ok(0);
    }
    let written = if use_copy { copy_events(tx, &rows).await? } else { insert_events(tx, rows).await? };
    if written as usize != count {
        return Err(JournalError::Inconsistent(format!("outbox: {written} rows written where {count} were expected")));
    }
    Ok(count)
}

async fn copy_events(tx: &mut PgConnection, rows: &EventRows) -> Result<u64, JournalError> {
    let payload_bytes: usize = rows.payloads.iter().map(String::len).sum();
    let mut copy = CopyRows::new(payload_bytes + rows.len() * 160);
    for index in 0..rows.len() {
        copy.row(9);
        copy.uuid(rows.event_ids[index]);
        copy.int8(rows.sequences[index]);
        copy.int4(rows.ordinals[index]);
        copy.text(rows.aggregate_types[index])?;
        copy.text(&rows.aggregate_ids[index])?;
        copy.text(rows.event_types[index])?;
        copy.int2(PAYLOAD_VERSION);
        copy.text(&rows.payloads[index])?;
        copy.text(&rows.metadata[rows.metadata_of[index]])?;
    }
    copy.copy_into(
        tx,
        "COPY ledger.outbox_events (event_id, sequence, ordinal, aggregate_type, aggregate_id, event_type, version,
             payload, metadata) FROM STDIN WITH (FORMAT binary)",
    )
    .await
}

async fn insert_events(tx: &mut PgConnection, rows: EventRows) -> Result<u64, JournalError> {
    let metadata: Vec<&str> = rows.metadata_of.iter().map(|index| rows.metadata[*index].as_str()).collect();
    let inserted = sqlx::query(
        "INSERT INTO ledger.outbox_events (event_id, sequence, ordinal, aggregate_type, aggregate_id, event_type,
             version, payload, metadata)
         SELECT e, s, o, at, ai, et, $9, p::json, m::json
         FROM UNNEST($1::uuid[], $2::int8[], $3::int4[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[])
             WITH ORDINALITY AS t(e, s, o, at, ai, et, p, m, n)
         ORDER BY n",
    )
    .bind(&rows.event_ids)
    .bind(&rows.sequences)
    .bind(&rows.ordinals)
    .bind(&rows.aggregate_types)
    .bind(&rows.aggregate_ids)
    .bind(&rows.event_types)
    .bind(&rows.payloads)
    .bind(metadata)
    .bind(PAYLOAD_VERSION)
    .execute(&mut *tx)
    .await?;
    Ok(inserted.rows_affected())
}
