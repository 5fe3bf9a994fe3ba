//! One journal batch: the records the writer drained, and how they become durable together with
//! the projection changes they imply, in one PostgreSQL transaction.
//!
//! Projections are written as deltas coalesced per account (an account touched by a thousand
//! postings in a batch gets one UPDATE row) and passed as arrays to one call of the SQL function
//! `ledger.write_batch` (migrations 15 and 16), which writes everything with UNNEST: one statement and
//! one round trip per batch whatever its size. In large batches the plain appends (journal rows,
//! idempotency keys, outbox events) go first with binary COPY instead, which costs PostgreSQL
//! less per row. Reservation closes are applied in SQL, since only the reservation row knows the
//! amount that goes back to available. Every UPDATE checks it touched exactly the rows it
//! expected, and the checkpoint moves only from the sequence this writer expects, so a
//! projection or writer mismatch aborts the batch instead of committing it.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

use super::JournalError;
use super::copy_rows::CopyRows;
use crate::engine::account::{AccountConfig, SystemAccount, UserAccount};
use crate::engine::asset::Asset;
use crate::engine::effect::{Effect, Slot};
use crate::engine::limits::OutflowUsage;
use crate::engine::record::{JournalRecord, Origin};
use crate::engine::reservation::{Reservation, ReservationStatus};
use crate::outbox::write::EventRows;
use crate::store::codec;

/// Records drained from the channel, each already encoded as the JSON the journal stores, with
/// the projection changes and outbox rows they add up to. All of it is built as records are
/// pushed, so the writer's batcher does this work while the previous batch commits (see
/// `super`); the commit binds what is ready (or COPYs it) and sends it.
#[derive(Debug, Default)]
pub struct Batch {
    records: Vec<JournalRecord>,
    encoded: Vec<String>,
    bytes: usize,
    changes: Changes,
    events: EventRows,
}

impl Batch {
    pub fn push(&mut self, record: JournalRecord) -> Result<(), JournalError> {
        let encoded = serde_json::to_string(&record)?;
        self.events.add(&record)?;
        for effect in &record.effects {
            self.changes.add(effect, record.sequence);
        }
        self.bytes += encoded.len();
        self.records.push(record);
        self.encoded.push(encoded);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Encoded size, for bounding a batch.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn first_sequence(&self) -> Option<u64> {
        self.records.first().map(|record| record.sequence)
    }

    pub fn last_sequence(&self) -> Option<u64> {
        self.records.last().map(|record| record.sequence)
    }

    /// The records' sequences, in batch order.
    #[cfg(test)]
    pub(super) fn sequences(&self) -> Vec<u64> {
        self.records.iter().map(|record| record.sequence).collect()
    }
}

#[derive(Debug, Default)]
struct AccountUpdate {
    frozen: Option<bool>,
    usage: Option<OutflowUsage>,
    sequence: u64,
}

#[derive(Debug, Default)]
struct BalanceDelta {
    available_minor: i128,
    reserved_minor: i128,
    sequence: u64,
}

/// The projection changes of a batch, coalesced per account.
#[derive(Debug, Default)]
struct Changes {
    opened: Vec<(UserAccount, AccountConfig, u64)>,
    account_updates: BTreeMap<UserAccount, AccountUpdate>,
    balance_deltas: BTreeMap<UserAccount, BalanceDelta>,
    system_deltas: BTreeMap<SystemAccount, (i128, u64)>,
    reservations_opened: Vec<(Reservation, u64)>,
    reservations_closed: Vec<(Uuid, Uuid, ReservationStatus, i64, u64)>,
}

impl Changes {
    fn add(&mut self, effect: &Effect, sequence: u64) {
        match effect {
            Effect::AccountOpened { account, config } => self.opened.push((*account, *config, sequence)),
            Effect::FrozenChanged { account, frozen } => {
                let update = self.account_updates.entry(*account).or_default();
                update.frozen = Some(*frozen);
                update.sequence = sequence;
            }
            Effect::UsageChanged { account, after, .. } => {
                let update = self.account_updates.entry(*account).or_default();
                update.usage = Some(*after);
                update.sequence = sequence;
            }
            Effect::Posting { from, to, amount_minor } => {
                self.move_available(from, -amount_minor, sequence);
                self.move_available(to, *amount_minor, sequence);
            }
            Effect::ReservationOpened { reservation } => {
                let delta = self.balance_deltas.entry(reservation.account).or_default();
                delta.available_minor -= reservation.amount_minor;
                delta.reserved_minor += reservation.amount_minor;
                delta.sequence = sequence;
                self.reservations_opened.push((*reservation, sequence));
            }
            Effect::ReservationClosed { user_id, reservation_id, status, closed_at_ms } => {
                self.reservations_closed.push((*user_id, *reservation_id, *status, *closed_at_ms, sequence));
            }
            // Written by super::transactions.
            Effect::TransactionCreated { .. }
            | Effect::TransactionStatusChanged { .. }
            | Effect::ComplianceSet { .. } => {}
        }
    }

    fn move_available(&mut self, slot: &Slot, delta_minor: i128, sequence: u64) {
        match slot {
            Slot::User(account) => {
                let delta = self.balance_deltas.entry(*account).or_default();
                delta.available_minor += delta_minor;
                delta.sequence = sequence;
            }
            Slot::System { account, .. } => {
                let entry = self.system_deltas.entry(*account).or_default();
                entry.0 += delta_minor;
                entry.1 = sequence;
            }
        }
    }
}

fn seq(sequence: u64) -> Result<i64, JournalError> {
    Ok(codec::to_bigint(sequence)?)
}

fn decimal(amount_minor: i128, asset: Asset) -> Result<Decimal, JournalError> {
    Ok(codec::to_decimal(amount_minor, asset)?)
}

fn expect_rows(what: &str, affected: u64, expected: usize) -> Result<(), JournalError> {
    if affected as usize == expected {
        Ok(())
    } else {
        Err(JournalError::Inconsistent(format!("{what}: {affected} rows changed where {expected} were expected")))
    }
}

/// The call of `ledger.write_batch` (migrations 15 and 16) with its arguments bound so far.
pub(crate) type WriteBatchCall<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// The one statement of a batch. The arguments are bound in this order by [`write_batch`].
const WRITE_BATCH: &str = "SELECT ledger.write_batch(
    from_sequence => $1, to_sequence => $2,
    j_sequence => $3, j_at_ms => $4, j_kind => $5, j_key => $6, j_record => $7,
    ao_user => $8, ao_domain => $9, ao_asset => $10, ao_overdraft => $11, ao_limit_per_transaction => $12,
    ao_limit_daily => $13, ao_limit_monthly => $14, ao_frozen => $15, ao_zero => $16, ao_sequence => $17,
    au_user => $18, au_domain => $19, au_asset => $20, au_frozen => $21, au_usage_day => $22,
    au_usage_day_used => $23, au_usage_month => $24, au_usage_month_used => $25, au_sequence => $26,
    ro_user => $27, ro_id => $28, ro_domain => $29, ro_asset => $30, ro_amount => $31, ro_created_at_ms => $32,
    ro_expires_at_ms => $33, ro_sequence => $34,
    bd_user => $35, bd_domain => $36, bd_asset => $37, bd_available => $38, bd_reserved => $39, bd_sequence => $40,
    rc_user => $41, rc_id => $42, rc_status => $43, rc_closed_at_ms => $44, rc_sequence => $45,
    sd_kind => $46, sd_asset => $47, sd_delta => $48, sd_sequence => $49,
    k_key => $50, k_sequence => $51, k_recorded_at_ms => $52,
    e_id => $53, e_sequence => $54, e_ordinal => $55, e_aggregate_type => $56, e_aggregate_id => $57,
    e_event_type => $58, e_version => $59, e_payload => $60, e_metadata => $61)";

/// The SQLSTATE `ledger.write_batch` raises when the batch does not fit the database.
const INCONSISTENT_SQLSTATE: &str = "DL001";

/// Commits `batch` together with the projections and the checkpoint moving from
/// `committed_sequence` to the batch's last sequence.
///
/// Usually that is one `ledger.write_batch` call on its own, which is one round trip and its own
/// transaction. A batch of at least `copy_min_bytes` first appends its journal rows, keys and
/// events with binary COPY, and a batch that touches transactions first writes their
/// projections (`super::transactions`); both then run in an explicit transaction with the call.
pub async fn write_batch(
    conn: &mut PgConnection,
    batch: &Batch,
    committed_sequence: u64,
    copy_min_bytes: usize,
) -> Result<(), JournalError> {
    let (Some(first), Some(last)) = (batch.first_sequence(), batch.last_sequence()) else { return Ok(()) };
    if first != committed_sequence + 1 || last - first + 1 != batch.len() as u64 {
        return Err(JournalError::Inconsistent(format!(
            "batch {first}..={last} of {} records does not follow committed sequence {committed_sequence}",
            batch.len()
        )));
    }
    let transaction_changes = super::transactions::Changes::of(&batch.records)?;
    // Binary COPY needs two writes in a row (data, then end of data); sqlx 0.9.0 does not set
    // TCP_NODELAY, so for a small batch the second write waits out the server's delayed ACK
    // (about 40 ms). Small batches therefore pass their appends as arrays to the one call.
    let use_copy = batch.bytes() >= copy_min_bytes;
    // What the call appends itself: nothing of what COPY already appended.
    let copied = Batch::default();
    let appended = if use_copy { &copied } else { batch };
    let call = sqlx::query(WRITE_BATCH).bind(seq(committed_sequence)?).bind(seq(last)?);
    let call = batch.changes.bind(bind_journal(call, appended)?)?;
    let call = bind_idempotency_keys(call, appended)?;
    if !use_copy && transaction_changes.is_empty() {
        let call = appended.events.bind(call);
        return call.execute(&mut *conn).await.map(drop).map_err(inconsistent_or_database);
    }
    let mut tx = conn.begin().await?;
    if use_copy {
        copy_journal(&mut tx, batch).await?;
        copy_idempotency_keys(&mut tx, batch).await?;
        batch.events.copy(&mut tx).await?;
    }
    super::transactions::write(&mut tx, &transaction_changes).await?;
    appended.events.bind(call).execute(&mut *tx).await.map_err(inconsistent_or_database)?;
    tx.commit().await?;
    Ok(())
}

/// Reports `ledger.write_batch`'s own consistency checks as [`JournalError::Inconsistent`].
fn inconsistent_or_database(error: sqlx::Error) -> JournalError {
    match &error {
        sqlx::Error::Database(database) if database.code().as_deref() == Some(INCONSISTENT_SQLSTATE) => {
            JournalError::Inconsistent(database.message().to_owned())
        }
        _ => JournalError::Database(error),
    }
}

async fn copy_journal(tx: &mut PgConnection, batch: &Batch) -> Result<(), JournalError> {
    let mut rows = CopyRows::new(batch.bytes() + batch.len() * 64);
    for (record, encoded) in batch.records.iter().zip(&batch.encoded) {
        rows.row(5);
        rows.int8(seq(record.sequence)?);
        rows.int8(record.at_ms);
        match &record.origin {
            Origin::Request { key, .. } => {
                rows.text("request")?;
                rows.text(key.as_str())?;
            }
            Origin::ExpirySweep => {
                rows.text("expiry_sweep")?;
                rows.null();
            }
        }
        rows.text(encoded)?;
    }
    let copied = rows
        .copy_into(
            tx,
            "COPY ledger.journal (sequence, at_ms, kind, idempotency_key, record) FROM STDIN WITH (FORMAT binary)",
        )
        .await?;
    expect_rows("journal rows", copied, batch.len())
}

fn bind_journal<'q>(call: WriteBatchCall<'q>, batch: &Batch) -> Result<WriteBatchCall<'q>, JournalError> {
    let mut sequences = Vec::with_capacity(batch.len());
    let mut at_ms = Vec::with_capacity(batch.len());
    let mut kinds = Vec::with_capacity(batch.len());
    let mut keys = Vec::with_capacity(batch.len());
    for record in &batch.records {
        sequences.push(seq(record.sequence)?);
        at_ms.push(record.at_ms);
        match &record.origin {
            Origin::Request { key, .. } => {
                kinds.push("request");
                keys.push(Some(key.as_str()));
            }
            Origin::ExpirySweep => {
                kinds.push("expiry_sweep");
                keys.push(None);
            }
        }
    }
    Ok(call.bind(sequences).bind(at_ms).bind(kinds).bind(keys).bind(&batch.encoded))
}

impl Changes {
    /// Binds the projection arguments of `ledger.write_batch` (`ao_*` to `sd_*`), in its
    /// parameter order. A group with nothing to write is bound as empty arrays.
    fn bind<'q>(&self, call: WriteBatchCall<'q>) -> Result<WriteBatchCall<'q>, JournalError> {
        let call = self.bind_opened(call)?;
        let call = self.bind_account_updates(call)?;
        let call = self.bind_reservations_opened(call)?;
        let call = self.bind_balance_deltas(call)?;
        let call = self.bind_reservations_closed(call)?;
        self.bind_system_deltas(call)
    }

    fn bind_opened<'q>(&self, call: WriteBatchCall<'q>) -> Result<WriteBatchCall<'q>, JournalError> {
        let count = self.opened.len();
        let (mut users, mut domains, mut assets, mut overdrafts, mut per_transaction) = (
            Vec::with_capacity(count),
            Vec::with_capacity(count),
            Vec::with_capacity(count),
            Vec::with_capacity(count),
            Vec::with_capacity(count),
        );
        let (mut daily, mut monthly, mut frozen, mut zeros, mut sequences) = (
            Vec::with_capacity(count),
            Vec::with_capacity(count),
            Vec::with_capacity(count),
            Vec::with_capacity(count),
            Vec::with_capacity(count),
        );
        for (account, config, sequence) in &self.opened {
            let asset = account.asset;
            let optional = |limit: Option<i128>| limit.map(|minor| decimal(minor, asset)).transpose();
            users.push(account.user_id);
            domains.push(account.domain.name());
            assets.push(asset.symbol());
            overdrafts.push(decimal(config.overdraft_minor, asset)?);
            per_transaction.push(optional(config.limits.per_transaction_minor)?);
            daily.push(optional(config.limits.daily_minor)?);
            monthly.push(optional(config.limits.monthly_minor)?);
            frozen.push(config.frozen);
            zeros.push(decimal(0, asset)?);
            sequences.push(seq(*sequence)?);
        }
        Ok(call
            .bind(users)
            .bind(domains)
            .bind(assets)
            .bind(overdrafts)
            .bind(per_transaction)
            .bind(daily)
            .bind(monthly)
            .bind(frozen)
            .bind(zeros)
            .bind(sequences))
    }

    fn bind_account_updates<'q>(&self, call: WriteBatchCall<'q>) -> Result<WriteBatchCall<'q>, JournalError> {
        let count = self.account_updates.len();
        let (mut users, mut domains, mut assets, mut frozen, mut sequences) = (
            Vec::with_capacity(count),
            Vec::with_capacity(count),
            Vec::with_capacity(count),
            Vec::with_capacity(count),
            Vec::with_capacity(count),
        );
        let (mut days, mut day_used, mut months, mut month_used) = (
            Vec::with_capacity(count),
            Vec::with_capacity(count),
            Vec::with_capacity(count),
            Vec::with_capacity(count),
        );
        for (account, update) in &self.account_updates {
            users.push(account.user_id);
            domains.push(account.domain.name());
            assets.push(account.asset.symbol());
            frozen.push(update.frozen);
            days.push(update.usage.map(|usage| usage.day));
            day_used.push(update.usage.map(|usage| decimal(usage.day_used_minor, account.asset)).transpose()?);
            months.push(update.usage.map(|usage| usage.month));
            month_used.push(update.usage.map(|usage| decimal(usage.month_used_minor, account.asset)).transpose()?);
            sequences.push(seq(update.sequence)?);
        }
        Ok(call
            .bind(users)
            .bind(domains)
            .bind(assets)
            .bind(frozen)
            .bind(days)
            .bind(day_used)
            .bind(months)
            .bind(month_used)
            .bind(sequences))
    }

    fn bind_reservations_opened<'q>(&self, call: WriteBatchCall<'q>) -> Result<WriteBatchCall<'q>, JournalError> {
        let count = self.reservations_opened.len();
        let (mut users, mut ids, mut domains, mut assets) = (
            Vec::with_capacity(count),
            Vec::with_capacity(count),
            Vec::with_capacity(count),
            Vec::with_capacity(count),
        );
        let (mut amounts, mut created, mut expires, mut sequences) = (
            Vec::with_capacity(count),
            Vec::with_capacity(count),
            Vec::with_capacity(count),
            Vec::with_capacity(count),
        );
        for (reservation, sequence) in &self.reservations_opened {
            users.push(reservation.account.user_id);
            ids.push(reservation.id);
            domains.push(reservation.account.domain.name());
            assets.push(reservation.account.asset.symbol());
            amounts.push(decimal(reservation.amount_minor, reservation.account.asset)?);
            created.push(reservation.created_at_ms);
            expires.push(reservation.expires_at_ms);
            sequences.push(seq(*sequence)?);
        }
        Ok(call
            .bind(users)
            .bind(ids)
            .bind(domains)
            .bind(assets)
            .bind(amounts)
            .bind(created)
            .bind(expires)
            .bind(sequences))
    }

    fn bind_balance_deltas<'q>(&self, call: WriteBatchCall<'q>) -> Result<WriteBatchCall<'q>, JournalError> {
        let count = self.balance_deltas.len();
        let (mut users, mut domains, mut assets) =
            (Vec::with_capacity(count), Vec::with_capacity(count), Vec::with_capacity(count));
        let (mut available, mut reserved, mut sequences) =
            (Vec::with_capacity(count), Vec::with_capacity(count), Vec::with_capacity(count));
        for (account, delta) in &self.balance_deltas {
            users.push(account.user_id);
            domains.push(account.domain.name());
            assets.push(account.asset.symbol());
            available.push(decimal(delta.available_minor, account.asset)?);
            reserved.push(decimal(delta.reserved_minor, account.asset)?);
            sequences.push(seq(delta.sequence)?);
        }
        Ok(call.bind(users).bind(domains).bind(assets).bind(available).bind(reserved).bind(sequences))
    }

    fn bind_reservations_closed<'q>(&self, call: WriteBatchCall<'q>) -> Result<WriteBatchCall<'q>, JournalError> {
        let count = self.reservations_closed.len();
        let (mut users, mut ids, mut statuses) =
            (Vec::with_capacity(count), Vec::with_capacity(count), Vec::with_capacity(count));
        let (mut closed_at, mut sequences) = (Vec::with_capacity(count), Vec::with_capacity(count));
        for (user_id, reservation_id, status, closed_at_ms, sequence) in &self.reservations_closed {
            users.push(*user_id);
            ids.push(*reservation_id);
            statuses.push(codec::status_name(*status));
            closed_at.push(*closed_at_ms);
            sequences.push(seq(*sequence)?);
        }
        Ok(call.bind(users).bind(ids).bind(statuses).bind(closed_at).bind(sequences))
    }

    fn bind_system_deltas<'q>(&self, call: WriteBatchCall<'q>) -> Result<WriteBatchCall<'q>, JournalError> {
        let count = self.system_deltas.len();
        let (mut kinds, mut assets, mut deltas, mut sequences) = (
            Vec::with_capacity(count),
            Vec::with_capacity(count),
            Vec::with_capacity(count),
            Vec::with_capacity(count),
        );
        for (account, (delta_minor, sequence)) in &self.system_deltas {
            kinds.push(codec::system_kind_name(account.kind));
            assets.push(account.asset.symbol());
            deltas.push(decimal(*delta_minor, account.asset)?);
            sequences.push(seq(*sequence)?);
        }
        Ok(call.bind(kinds).bind(assets).bind(deltas).bind(sequences))
    }
}

async fn copy_idempotency_keys(tx: &mut PgConnection, batch: &Batch) -> Result<(), JournalError> {
    let mut rows = CopyRows::new(batch.len() * 64);
    let mut count = 0;
    for record in &batch.records {
        if let Origin::Request { key, .. } = &record.origin {
            rows.row(3);
            rows.text(key.as_str())?;
            rows.int8(seq(record.sequence)?);
            rows.int8(record.at_ms);
            count += 1;
        }
    }
    if count == 0 {
        return Ok(());
    }
    let copied = rows
        .copy_into(tx, "COPY ledger.idempotency_keys (key, sequence, recorded_at_ms) FROM STDIN WITH (FORMAT binary)")
        .await?;
    expect_rows("idempotency keys", copied, count)
}

fn bind_idempotency_keys<'q>(call: WriteBatchCall<'q>, batch: &Batch) -> Result<WriteBatchCall<'q>, JournalError> {
    let (mut keys, mut sequences, mut recorded) = (Vec::new(), Vec::new(), Vec::new());
    for record in &batch.records {
        if let Origin::Request { key, .. } = &record.origin {
            keys.push(key.as_str());
            sequences.push(seq(record.sequence)?);
            recorded.push(record.at_ms);
        }
    }
    Ok(call.bind(keys).bind(sequences).bind(recorded))
}
