//! The outbox events of a journal batch, written inside the batch's own transaction (by
//! `journal::batch::write_batch`), so the events commit, or roll back, with their changes.
//!
//! Events are derived with the pure [`events_of`]; rows go to `ledger.outbox_events` in journal
//! order (sequence, then ordinal), so the identity `position` follows it: with binary COPY when
//! the batch is large (the journal's own threshold), else as arrays bound to the batch's one
//! `ledger.write_batch` call, which inserts them ordered by array index. The rows are never
//! updated afterwards: the relay keeps its progress elsewhere (see `relay`).

use sqlx::PgConnection;
use uuid::Uuid;

use super::event::{PAYLOAD_VERSION, events_of};
use crate::engine::record::JournalRecord;
use crate::journal::JournalError;
use crate::journal::batch::WriteBatchCall;
use crate::journal::copy_rows::CopyRows;
use crate::store::codec;

/// The events of a batch, as columns.
#[derive(Debug, Default)]
pub(crate) struct EventRows {
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
    /// Adds the events of `record`, the batch's next record.
    pub(crate) fn add(&mut self, record: &JournalRecord) -> Result<(), JournalError> {
        let events = events_of(record);
        let Some(first) = events.first() else { return Ok(()) };
        self.metadata.push(serde_json::to_string(&first.metadata)?);
        let metadata_index = self.metadata.len() - 1;
        for event in events {
            debug_assert_eq!(event.sequence, record.sequence);
            self.event_ids.push(event.event_id);
            self.sequences.push(codec::to_bigint(event.sequence)?);
            self.ordinals.push(i32::try_from(event.ordinal).map_err(|_| {
                JournalError::Inconsistent(format!("record {} has more events than fit an integer", event.sequence))
            })?);
            self.aggregate_types.push(event.aggregate.name());
            self.aggregate_ids.push(event.aggregate_id);
            self.event_types.push(event.event_type);
            self.payloads.push(serde_json::to_string(&event.payload)?);
            self.metadata_of.push(metadata_index);
        }
        Ok(())
    }

    fn len(&self) -> usize {
        self.event_ids.len()
    }

    fn is_empty(&self) -> bool {
        self.event_ids.is_empty()
    }

    /// Binds the rows as the `e_*` arguments of `ledger.write_batch`, in its parameter order.
    pub(crate) fn bind<'q>(&'q self, call: WriteBatchCall<'q>) -> WriteBatchCall<'q> {
        let metadata: Vec<&str> = self.metadata_of.iter().map(|index| self.metadata[*index].as_str()).collect();
        call.bind(&self.event_ids)
            .bind(&self.sequences)
            .bind(&self.ordinals)
            .bind(&self.aggregate_types)
            .bind(&self.aggregate_ids)
            .bind(&self.event_types)
            .bind(PAYLOAD_VERSION)
            .bind(&self.payloads)
            .bind(metadata)
    }

    /// Appends the rows to `ledger.outbox_events` with binary COPY on `tx`.
    pub(crate) async fn copy(&self, tx: &mut PgConnection) -> Result<(), JournalError> {
        if self.is_empty() {
            return Ok(());
        }
        let written = copy_events(tx, self).await?;
        if written as usize != self.len() {
            return Err(JournalError::Inconsistent(format!(
                "outbox: {written} rows written where {} were expected",
                self.len()
            )));
        }
        Ok(())
    }
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
