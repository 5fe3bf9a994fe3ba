//! One journal batch: the records the writer drained, and the single PostgreSQL transaction that
//! makes them durable together with the projection changes they imply.
//!
//! Projections are written as deltas coalesced per account (an account touched by a thousand
//! postings in a batch gets one UPDATE row), using UNNEST over bound arrays: a handful of
//! statements per batch whatever its size. In large batches the plain appends (journal rows,
//! idempotency keys) use binary COPY instead, which costs PostgreSQL less per row. Reservation
//! closes are applied in SQL, since only the reservation row knows the amount that goes back to
//! available. Every UPDATE checks it touched exactly the rows it expected, and the checkpoint
//! moves only from the sequence this writer expects, so a projection or writer mismatch aborts
//! the batch instead of committing it.

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
use crate::store::codec;

/// Records drained from the channel, each already encoded as the JSON the journal stores.
#[derive(Debug, Default)]
pub struct Batch {
    records: Vec<JournalRecord>,
    encoded: Vec<String>,
    bytes: usize,
}

impl Batch {
    pub fn push(&mut self, record: JournalRecord) -> Result<(), JournalError> {
        let encoded = serde_json::to_string(&record)?;
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

    pub fn clear(&mut self) {
        self.records.clear();
        self.encoded.clear();
        self.bytes = 0;
    }
}

#[derive(Default)]
struct AccountUpdate {
    frozen: Option<bool>,
    usage: Option<OutflowUsage>,
    sequence: u64,
}

#[derive(Default)]
struct BalanceDelta {
    available_minor: i128,
    reserved_minor: i128,
    sequence: u64,
}

/// The projection changes of a batch, coalesced per account.
#[derive(Default)]
struct Changes {
    opened: Vec<(UserAccount, AccountConfig, u64)>,
    account_updates: BTreeMap<UserAccount, AccountUpdate>,
    balance_deltas: BTreeMap<UserAccount, BalanceDelta>,
    system_deltas: BTreeMap<SystemAccount, (i128, u64)>,
    reservations_opened: Vec<(Reservation, u64)>,
    reservations_closed: Vec<(Uuid, Uuid, ReservationStatus, i64, u64)>,
}

impl Changes {
    fn of(records: &[JournalRecord]) -> Changes {
        let mut changes = Changes::default();
        for record in records {
            let sequence = record.sequence;
            for effect in &record.effects {
                changes.add(effect, sequence);
            }
        }
        changes
    }

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

/// Commits `batch` in one transaction: the journal rows, the projections, and the checkpoint
/// moving from `committed_sequence` to the batch's last sequence. A batch of at
/// least `copy_min_bytes` appends its journal rows and keys with binary COPY.
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
    let changes = Changes::of(&batch.records);
    let mut tx = conn.begin().await?;
    // Binary COPY needs two writes in a row (data, then end of data); sqlx 0.9.0 does not set
    // TCP_NODELAY, so for a small batch the second write waits out the server's delayed ACK
    // (about 40 ms). Small batches therefore use UNNEST, which is one write per statement.
    let use_copy = batch.bytes() >= copy_min_bytes;
    if use_copy {
        copy_journal(&mut tx, batch).await?;
    } else {
        insert_journal(&mut tx, batch).await?;
    }
    insert_accounts(&mut tx, &changes).await?;
    update_accounts(&mut tx, &changes).await?;
    insert_reservations(&mut tx, &changes).await?;
    apply_balance_deltas(&mut tx, &changes).await?;
    close_reservations(&mut tx, &changes).await?;
    apply_system_deltas(&mut tx, &changes).await?;
    super::transactions::write(&mut tx, &batch.records).await?;
    if use_copy {
        copy_idempotency_keys(&mut tx, batch).await?;
    } else {
        insert_idempotency_keys(&mut tx, batch).await?;
    }
    crate::outbox::write::append_events(&mut tx, &batch.records, use_copy).await?;
    let moved = sqlx::query(
        "UPDATE ledger.checkpoint SET committed_sequence = $2, committed_at = now() WHERE committed_sequence = $1",
    )
    .bind(seq(committed_sequence)?)
    .bind(seq(last)?)
    .execute(&mut *tx)
    .await?;
    if moved.rows_affected() != 1 {
        return Err(JournalError::Inconsistent(format!(
            "the checkpoint is no longer at {committed_sequence}: another writer appended to this database"
        )));
    }
    tx.commit().await?;
    Ok(())
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

async fn insert_journal(tx: &mut PgConnection, batch: &Batch) -> Result<(), JournalError> {
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
    sqlx::query(
        "INSERT INTO ledger.journal (sequence, at_ms, kind, idempotency_key, record)
         SELECT s, a, k, i, r::json FROM UNNEST($1::int8[], $2::int8[], $3::text[], $4::text[], $5::text[])
             AS t(s, a, k, i, r)",
    )
    .bind(sequences)
    .bind(at_ms)
    .bind(kinds)
    .bind(keys)
    .bind(&batch.encoded)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

async fn insert_accounts(tx: &mut PgConnection, changes: &Changes) -> Result<(), JournalError> {
    if changes.opened.is_empty() {
        return Ok(());
    }
    let count = changes.opened.len();
    let (mut users, mut domains, mut assets, mut zeros, mut overdrafts) = (
        Vec::with_capacity(count),
        Vec::with_capacity(count),
        Vec::with_capacity(count),
        Vec::with_capacity(count),
        Vec::with_capacity(count),
    );
    let (mut per_transaction, mut daily, mut monthly, mut frozen, mut sequences) = (
        Vec::with_capacity(count),
        Vec::with_capacity(count),
        Vec::with_capacity(count),
        Vec::with_capacity(count),
        Vec::with_capacity(count),
    );
    for (account, config, sequence) in &changes.opened {
        let asset = account.asset;
        let optional = |limit: Option<i128>| limit.map(|minor| decimal(minor, asset)).transpose();
        users.push(account.user_id);
        domains.push(account.domain.name());
        assets.push(asset.symbol());
        zeros.push(decimal(0, asset)?);
        overdrafts.push(decimal(config.overdraft_minor, asset)?);
        per_transaction.push(optional(config.limits.per_transaction_minor)?);
        daily.push(optional(config.limits.daily_minor)?);
        monthly.push(optional(config.limits.monthly_minor)?);
        frozen.push(config.frozen);
        sequences.push(seq(*sequence)?);
    }
    sqlx::query(
        "INSERT INTO ledger.accounts (user_id, domain, asset, overdraft, limit_per_transaction, limit_daily,
             limit_monthly, frozen, usage_day, usage_day_used, usage_month, usage_month_used, opened_sequence,
             updated_sequence)
         SELECT u, d, a, o, lp, ld, lm, f, 0, z, 0, z, s, s
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::numeric[], $5::numeric[], $6::numeric[],
             $7::numeric[], $8::bool[], $9::numeric[], $10::int8[]) AS t(u, d, a, o, lp, ld, lm, f, z, s)",
    )
    .bind(&users)
    .bind(&domains)
    .bind(&assets)
    .bind(overdrafts)
    .bind(per_transaction)
    .bind(daily)
    .bind(monthly)
    .bind(frozen)
    .bind(&zeros)
    .bind(&sequences)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO ledger.balances (user_id, domain, asset, available, reserved, last_sequence)
         SELECT u, d, a, z, z, s FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::numeric[], $5::int8[])
             AS t(u, d, a, z, s)",
    )
    .bind(&users)
    .bind(&domains)
    .bind(&assets)
    .bind(&zeros)
    .bind(&sequences)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

async fn update_accounts(tx: &mut PgConnection, changes: &Changes) -> Result<(), JournalError> {
    if changes.account_updates.is_empty() {
        return Ok(());
    }
    let count = changes.account_updates.len();
    let (mut users, mut domains, mut assets, mut frozen, mut sequences) = (
        Vec::with_capacity(count),
        Vec::with_capacity(count),
        Vec::with_capacity(count),
        Vec::with_capacity(count),
        Vec::with_capacity(count),
    );
    let (mut days, mut day_used, mut months, mut month_used) =
        (Vec::with_capacity(count), Vec::with_capacity(count), Vec::with_capacity(count), Vec::with_capacity(count));
    for (account, update) in &changes.account_updates {
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
    let updated = sqlx::query(
        "UPDATE ledger.accounts AS acc SET frozen = COALESCE(t.f, acc.frozen),
             usage_day = COALESCE(t.ud, acc.usage_day), usage_day_used = COALESCE(t.udu, acc.usage_day_used),
             usage_month = COALESCE(t.um, acc.usage_month), usage_month_used = COALESCE(t.umu, acc.usage_month_used),
             updated_sequence = t.s
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::bool[], $5::int8[], $6::numeric[], $7::int8[],
             $8::numeric[], $9::int8[]) AS t(u, d, a, f, ud, udu, um, umu, s)
         WHERE acc.user_id = t.u AND acc.domain = t.d AND acc.asset = t.a",
    )
    .bind(users)
    .bind(domains)
    .bind(assets)
    .bind(frozen)
    .bind(days)
    .bind(day_used)
    .bind(months)
    .bind(month_used)
    .bind(sequences)
    .execute(&mut *tx)
    .await?;
    expect_rows("account settings", updated.rows_affected(), count)
}

async fn insert_reservations(tx: &mut PgConnection, changes: &Changes) -> Result<(), JournalError> {
    if changes.reservations_opened.is_empty() {
        return Ok(());
    }
    let count = changes.reservations_opened.len();
    let (mut users, mut ids, mut domains, mut assets, mut amounts) = (
        Vec::with_capacity(count),
        Vec::with_capacity(count),
        Vec::with_capacity(count),
        Vec::with_capacity(count),
        Vec::with_capacity(count),
    );
    let (mut created, mut expires, mut sequences) =
        (Vec::with_capacity(count), Vec::with_capacity(count), Vec::with_capacity(count));
    for (reservation, sequence) in &changes.reservations_opened {
        users.push(reservation.account.user_id);
        ids.push(reservation.id);
        domains.push(reservation.account.domain.name());
        assets.push(reservation.account.asset.symbol());
        amounts.push(decimal(reservation.amount_minor, reservation.account.asset)?);
        created.push(reservation.created_at_ms);
        expires.push(reservation.expires_at_ms);
        sequences.push(seq(*sequence)?);
    }
    sqlx::query(
        "INSERT INTO ledger.reservations (user_id, reservation_id, domain, asset, amount, created_at_ms,
             expires_at_ms, status, opened_sequence)
         SELECT u, r, d, a, m, c, e, 'active', s FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[],
             $5::numeric[], $6::int8[], $7::int8[], $8::int8[]) AS t(u, r, d, a, m, c, e, s)",
    )
    .bind(users)
    .bind(ids)
    .bind(domains)
    .bind(assets)
    .bind(amounts)
    .bind(created)
    .bind(expires)
    .bind(sequences)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

async fn apply_balance_deltas(tx: &mut PgConnection, changes: &Changes) -> Result<(), JournalError> {
    if changes.balance_deltas.is_empty() {
        return Ok(());
    }
    let count = changes.balance_deltas.len();
    let (mut users, mut domains, mut assets) =
        (Vec::with_capacity(count), Vec::with_capacity(count), Vec::with_capacity(count));
    let (mut available, mut reserved, mut sequences) =
        (Vec::with_capacity(count), Vec::with_capacity(count), Vec::with_capacity(count));
    for (account, delta) in &changes.balance_deltas {
        users.push(account.user_id);
        domains.push(account.domain.name());
        assets.push(account.asset.symbol());
        available.push(decimal(delta.available_minor, account.asset)?);
        reserved.push(decimal(delta.reserved_minor, account.asset)?);
        sequences.push(seq(delta.sequence)?);
    }
    let updated = sqlx::query(
        "UPDATE ledger.balances AS b SET available = b.available + t.da, reserved = b.reserved + t.dr, last_sequence = t.s
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::numeric[], $5::numeric[], $6::int8[])
             AS t(u, d, a, da, dr, s)
         WHERE b.user_id = t.u AND b.domain = t.d AND b.asset = t.a",
    )
    .bind(users)
    .bind(domains)
    .bind(assets)
    .bind(available)
    .bind(reserved)
    .bind(sequences)
    .execute(&mut *tx)
    .await?;
    expect_rows("balances", updated.rows_affected(), count)
}

/// Closes reservations and moves their amounts from reserved back to available, per account.
/// Runs after the deltas so a reservation opened and closed in the same batch never makes
/// `reserved` negative, even for a moment.
async fn close_reservations(tx: &mut PgConnection, changes: &Changes) -> Result<(), JournalError> {
    if changes.reservations_closed.is_empty() {
        return Ok(());
    }
    let count = changes.reservations_closed.len();
    let (mut users, mut ids, mut statuses) =
        (Vec::with_capacity(count), Vec::with_capacity(count), Vec::with_capacity(count));
    let (mut closed_at, mut sequences) = (Vec::with_capacity(count), Vec::with_capacity(count));
    for (user_id, reservation_id, status, closed_at_ms, sequence) in &changes.reservations_closed {
        users.push(*user_id);
        ids.push(*reservation_id);
        statuses.push(codec::status_name(*status));
        closed_at.push(*closed_at_ms);
        sequences.push(seq(*sequence)?);
    }
    let (shifted,): (i64,) = sqlx::query_as(
        "WITH closed AS (
             UPDATE ledger.reservations AS res SET status = t.st, closed_at_ms = t.c, closed_sequence = t.s
             FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::int8[], $5::int8[]) AS t(u, r, st, c, s)
             WHERE res.user_id = t.u AND res.reservation_id = t.r AND res.status = 'active'
             RETURNING res.user_id, res.domain, res.asset, res.amount, t.s
         ), per_account AS (
             SELECT user_id, domain, asset, sum(amount) AS amount, max(s) AS s, count(*) AS n
             FROM closed GROUP BY user_id, domain, asset
         ), shifted AS (
             UPDATE ledger.balances AS b SET available = b.available + p.amount, reserved = b.reserved - p.amount,
                 last_sequence = GREATEST(b.last_sequence, p.s)
             FROM per_account p WHERE b.user_id = p.user_id AND b.domain = p.domain AND b.asset = p.asset
             RETURNING p.n
         )
         SELECT COALESCE(sum(n), 0)::int8 FROM shifted",
    )
    .bind(users)
    .bind(ids)
    .bind(statuses)
    .bind(closed_at)
    .bind(sequences)
    .fetch_one(&mut *tx)
    .await?;
    expect_rows("reservation closes", shifted.max(0) as u64, count)
}

async fn apply_system_deltas(tx: &mut PgConnection, changes: &Changes) -> Result<(), JournalError> {
    if changes.system_deltas.is_empty() {
        return Ok(());
    }
    let count = changes.system_deltas.len();
    let (mut kinds, mut assets, mut deltas, mut sequences) =
        (Vec::with_capacity(count), Vec::with_capacity(count), Vec::with_capacity(count), Vec::with_capacity(count));
    for (account, (delta_minor, sequence)) in &changes.system_deltas {
        kinds.push(codec::system_kind_name(account.kind));
        assets.push(account.asset.symbol());
        deltas.push(decimal(*delta_minor, account.asset)?);
        sequences.push(seq(*sequence)?);
    }
    sqlx::query(
        "INSERT INTO ledger.system_balances (kind, asset, balance, last_sequence)
         SELECT k, a, d, s FROM UNNEST($1::text[], $2::text[], $3::numeric[], $4::int8[]) AS t(k, a, d, s)
         ON CONFLICT (kind, asset) DO UPDATE
             SET balance = ledger.system_balances.balance + EXCLUDED.balance, last_sequence = EXCLUDED.last_sequence",
    )
    .bind(kinds)
    .bind(assets)
    .bind(deltas)
    .bind(sequences)
    .execute(&mut *tx)
    .await?;
    Ok(())
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

async fn insert_idempotency_keys(tx: &mut PgConnection, batch: &Batch) -> Result<(), JournalError> {
    let (mut keys, mut sequences, mut recorded) = (Vec::new(), Vec::new(), Vec::new());
    for record in &batch.records {
        if let Origin::Request { key, .. } = &record.origin {
            keys.push(key.as_str());
            sequences.push(seq(record.sequence)?);
            recorded.push(record.at_ms);
        }
    }
    if keys.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO ledger.idempotency_keys (key, sequence, recorded_at_ms)
         SELECT * FROM UNNEST($1::text[], $2::int8[], $3::int8[])",
    )
    .bind(keys)
    .bind(sequences)
    .bind(recorded)
    .execute(&mut *tx)
    .await?;
    Ok(())
}
