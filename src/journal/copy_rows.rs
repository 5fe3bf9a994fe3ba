//! Rows in PostgreSQL's binary COPY format, for the plain appends of a large journal batch
//! (journal rows, idempotency keys, outbox events): COPY costs PostgreSQL less per row than
//! INSERT ... SELECT FROM UNNEST, which builds and unpacks arrays. Public so that
//! `benches/journal.rs` can time PostgreSQL's own ceiling with the writer's own encoding.

use sqlx::PgConnection;
use uuid::Uuid;

use super::JournalError;

/// A COPY payload being built: the header, then rows, then the trailer `copy_into` adds.
pub struct CopyRows {
    buffer: Vec<u8>,
}

impl CopyRows {
    const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

    /// An empty payload with room for `capacity_bytes` of rows (the header comes on top).
    pub fn new(capacity_bytes: usize) -> CopyRows {
        let mut buffer = Vec::with_capacity(capacity_bytes + 32);
        buffer.extend_from_slice(Self::SIGNATURE);
        buffer.extend_from_slice(&0_i32.to_be_bytes()); // flags
        buffer.extend_from_slice(&0_i32.to_be_bytes()); // header extension length
        CopyRows { buffer }
    }

    /// Starts a row: exactly `columns` values must follow, in the order and types of the COPY
    /// statement's column list.
    pub fn row(&mut self, columns: i16) {
        self.buffer.extend_from_slice(&columns.to_be_bytes());
    }

    pub fn int8(&mut self, value: i64) {
        self.buffer.extend_from_slice(&8_i32.to_be_bytes());
        self.buffer.extend_from_slice(&value.to_be_bytes());
    }

    /// text and json share their binary format: the UTF-8 bytes.
    pub fn text(&mut self, value: &str) -> Result<(), JournalError> {
        let length = i32::try_from(value.len()).map_err(|_| {
            JournalError::Inconsistent(format!("a {} byte value is too large for PostgreSQL", value.len()))
        })?;
        self.buffer.extend_from_slice(&length.to_be_bytes());
        self.buffer.extend_from_slice(value.as_bytes());
        Ok(())
    }

    pub fn int4(&mut self, value: i32) {
        self.buffer.extend_from_slice(&4_i32.to_be_bytes());
        self.buffer.extend_from_slice(&value.to_be_bytes());
    }

    pub fn int2(&mut self, value: i16) {
        self.buffer.extend_from_slice(&2_i32.to_be_bytes());
        self.buffer.extend_from_slice(&value.to_be_bytes());
    }

    pub fn uuid(&mut self, value: Uuid) {
        self.buffer.extend_from_slice(&16_i32.to_be_bytes());
        self.buffer.extend_from_slice(value.as_bytes());
    }

    pub fn null(&mut self) {
        self.buffer.extend_from_slice(&(-1_i32).to_be_bytes());
    }

    /// Sends the payload with `statement` (a `COPY ... FROM STDIN WITH (FORMAT binary)`) and
    /// returns the rows PostgreSQL reports copied.
    pub async fn copy_into(mut self, tx: &mut PgConnection, statement: &str) -> Result<u64, JournalError> {
        self.buffer.extend_from_slice(&(-1_i16).to_be_bytes());
        let mut copy = tx.copy_in_raw(statement).await?;
        // On an error the caller must abandon the transaction: the connection's state is unknown.
        copy.send(self.buffer).await?;
        Ok(copy.finish().await?)
    }
}
