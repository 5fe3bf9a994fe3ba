//! Key rotation without downtime: values sealed under an older key version are opened and
//! re-sealed under the keyring's active key, a small batch per transaction (rows locked with
//! SKIP LOCKED, so concurrent writes and other rotators are never blocked for long). Reads keep
//! working throughout, since every configured version opens its own rows. Once no row uses an
//! old version, that key can be dropped from the configuration.
//!
//! The email blind index rotates the same way: rows indexed under an older blind-index key get
//! their email opened and indexed under the active one. Lookups try every configured index key
//! meanwhile (`Keyring::email_indexes`), so no email goes unfound during the rotation.
//!
//! A rotation walks each table in key order, one pass at a time: every batch starts after the
//! last row of the one before (a keyset cursor), so a pass reads each row once however large the
//! table. Restarting each batch from the table's start would re-read every row already done,
//! quadratic in the table's size. Rows another transaction held locked are skipped by a pass;
//! the next pass, from the start again, takes them, and the rotation ends after a pass that
//! found nothing to do.

use sqlx::PgPool;
use uuid::Uuid;

use super::DirectoryError;
use super::encryption::{CryptoError, Keyring, Sealed};
use super::model::PersonalField;

/// A stored value: owner, field, key version, nonce, ciphertext.
type SealedRow = (Uuid, String, i32, Vec<u8>, Vec<u8>);

/// The most values one rotation batch re-seals.
pub const MAX_ROTATION_BATCH: i64 = 10_000;

/// How far a pass over `directory.personal_data` has got: the last (user, field) it took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueCursor {
    user_id: Uuid,
    field: String,
}

impl ValueCursor {
    /// Before every row: the nil user with an empty field name sorts first (no field is empty).
    pub fn start() -> ValueCursor {
        ValueCursor { user_id: Uuid::nil(), field: String::new() }
    }
}

/// How far a pass over `directory.users` has got: the last user it took, `None` before the
/// first. (Not the nil UUID: it is a valid user id, and `> nil` would skip that user.)
pub type UserCursor = Option<Uuid>;

/// Re-seals up to `batch_size` values after `cursor` not under the active key, moves the cursor
/// to the last one, and returns how many. 0 ends the pass.
pub async fn rotate_batch(
    pool: &PgPool,
    keyring: &Keyring,
    cursor: &mut ValueCursor,
    batch_size: i64,
) -> Result<u64, DirectoryError> {
    let batch_size = batch_size.clamp(1, MAX_ROTATION_BATCH);
    let active = keyring.active_version();
    let mut tx = pool.begin().await?;
    let rows: Vec<SealedRow> = sqlx::query_as(
        "SELECT user_id, field, key_version, nonce, ciphertext FROM directory.personal_data
         WHERE (user_id, field) > ($3, $4) AND key_version <> $1
         ORDER BY user_id, field LIMIT $2 FOR UPDATE SKIP LOCKED",
    )
    .bind(active)
    .bind(batch_size)
    .bind(cursor.user_id)
    .bind(&cursor.field)
    .fetch_all(&mut *tx)
    .await?;
    let Some((last_user, last_field, ..)) = rows.last() else {
        return Ok(0);
    };
    *cursor = ValueCursor { user_id: *last_user, field: last_field.clone() };
    let count = rows.len();
    let (mut users, mut fields, mut versions, mut nonces, mut ciphertexts) = (
        Vec::with_capacity(count),
        Vec::with_capacity(count),
        Vec::with_capacity(count),
        Vec::with_capacity(count),
        Vec::with_capacity(count),
    );
    for (user_id, field, key_version, nonce, ciphertext) in rows {
        let plaintext = keyring.open(user_id, &field, &Sealed { key_version, nonce, ciphertext })?;
        let resealed = keyring.seal(user_id, &field, &plaintext)?;
        users.push(user_id);
        fields.push(field);
        versions.push(resealed.key_version);
        nonces.push(resealed.nonce);
        ciphertexts.push(resealed.ciphertext);
    }
    let updated = sqlx::query(
        "UPDATE directory.personal_data AS p SET key_version = t.v, nonce = t.n, ciphertext = t.c, updated_at = now()
         FROM UNNEST($1::uuid[], $2::text[], $3::int4[], $4::bytea[], $5::bytea[]) AS t(u, f, v, n, c)
         WHERE p.user_id = t.u AND p.field = t.f",
    )
    .bind(users)
    .bind(fields)
    .bind(versions)
    .bind(nonces)
    .bind(ciphertexts)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(updated.rows_affected())
}

/// Re-indexes up to `batch_size` emails of users after `cursor` not under the active blind-index
/// key, moves the cursor to the last one, and returns how many. 0 ends the pass.
pub async fn reindex_batch(
    pool: &PgPool,
    keyring: &Keyring,
    cursor: &mut UserCursor,
    batch_size: i64,
) -> Result<u64, DirectoryError> {
    let batch_size = batch_size.clamp(1, MAX_ROTATION_BATCH);
    let mut tx = pool.begin().await?;
    // Two statements rather than `($4 IS NULL OR u.user_id > $4)`: a generic plan of that could
    // not start its index scan at the cursor, and every batch would re-read the pass so far.
    let after = if cursor.is_some() { "u.user_id > $4" } else { "u.user_id >= $4" };
    let rows: Vec<(Uuid, i32, Vec<u8>, Vec<u8>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT u.user_id, p.key_version, p.nonce, p.ciphertext
         FROM directory.users u JOIN directory.personal_data p ON p.user_id = u.user_id AND p.field = $3
         WHERE {after} AND u.email_index IS NOT NULL AND u.email_index_version <> $1
         ORDER BY u.user_id LIMIT $2 FOR UPDATE OF u SKIP LOCKED"
    )))
    .bind(keyring.index_active_version())
    .bind(batch_size)
    .bind(PersonalField::Email.name())
    .bind(cursor.unwrap_or(Uuid::nil()))
    .fetch_all(&mut *tx)
    .await?;
    let Some((last_user, ..)) = rows.last() else {
        return Ok(0);
    };
    *cursor = Some(*last_user);
    let (mut users, mut indexes) = (Vec::with_capacity(rows.len()), Vec::with_capacity(rows.len()));
    for (user_id, key_version, nonce, ciphertext) in rows {
        let email = keyring.open(user_id, PersonalField::Email.name(), &Sealed { key_version, nonce, ciphertext })?;
        let email = String::from_utf8(email).map_err(|_| CryptoError::Unsealable)?;
        users.push(user_id);
        indexes.push(keyring.email_index(&email));
    }
    let updated = sqlx::query(
        "UPDATE directory.users AS u SET email_index = t.i, email_index_version = $3
         FROM UNNEST($1::uuid[], $2::bytea[]) AS t(u, i) WHERE u.user_id = t.u",
    )
    .bind(users)
    .bind(indexes)
    .bind(keyring.index_active_version())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(updated.rows_affected())
}

/// What a whole rotation did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rotated {
    /// Personal values re-sealed under the active data key.
    pub values: u64,
    /// Emails re-indexed under the active blind-index key.
    pub email_indexes: u64,
}

/// Rotates pass after pass until a pass finds no value left under an older data key, then the
/// same for emails under an older blind-index key. Rows that stay locked by other transactions
/// through a whole pass are left for the next run (the command reports what it did).
pub async fn rotate_all(pool: &PgPool, keyring: &Keyring, batch_size: i64) -> Result<Rotated, DirectoryError> {
    let values = in_passes(ValueCursor::start(), "re-sealed personal data under the active key", async |cursor| {
        rotate_batch(pool, keyring, cursor, batch_size).await
    })
    .await?;
    let email_indexes = in_passes(None, "re-indexed emails under the active blind-index key", async |cursor| {
        reindex_batch(pool, keyring, cursor, batch_size).await
    })
    .await?;
    Ok(Rotated { values, email_indexes })
}

/// Runs `batch` from `start` until it returns 0 (one pass), and passes again until a pass did
/// nothing; returns the rows done in all.
async fn in_passes<C: Clone>(
    start: C,
    what: &'static str,
    mut batch: impl AsyncFnMut(&mut C) -> Result<u64, DirectoryError>,
) -> Result<u64, DirectoryError> {
    let mut total = 0;
    loop {
        let mut cursor = start.clone();
        let mut pass = 0;
        loop {
            let done = batch(&mut cursor).await?;
            if done == 0 {
                break;
            }
            pass += done;
            total += done;
            tracing::info!(done, total, "{what}");
        }
        if pass == 0 {
            return Ok(total);
        }
    }
}
