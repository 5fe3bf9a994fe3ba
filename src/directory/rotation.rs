//! Key rotation without downtime: values sealed under an older key version are opened and
//! re-sealed under the keyring's active key, a small batch per transaction (rows locked with
//! SKIP LOCKED, so concurrent writes and other rotators are never blocked for long). Reads keep
//! working throughout, since every configured version opens its own rows. Once no row uses an
//! old version, that key can be dropped from the configuration.

use sqlx::PgPool;
use uuid::Uuid;

use super::DirectoryError;
use super::encryption::{Keyring, Sealed};

/// A stored value: owner, field, key version, nonce, ciphertext.
type SealedRow = (Uuid, String, i32, Vec<u8>, Vec<u8>);

/// The most values one rotation batch re-seals.
pub const MAX_ROTATION_BATCH: i64 = 10_000;

/// Re-seals up to `batch_size` values not under the active key; returns how many.
pub async fn rotate_batch(pool: &PgPool, keyring: &Keyring, batch_size: i64) -> Result<u64, DirectoryError> {
    let batch_size = batch_size.clamp(1, MAX_ROTATION_BATCH);
    let active = keyring.active_version();
    let mut tx = pool.begin().await?;
    let rows: Vec<SealedRow> = sqlx::query_as(
        "SELECT user_id, field, key_version, nonce, ciphertext FROM directory.personal_data
         WHERE key_version <> $1 ORDER BY user_id, field LIMIT $2 FOR UPDATE SKIP LOCKED",
    )
    .bind(active)
    .bind(batch_size)
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        return Ok(0);
    }
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

/// Rotates batch after batch until no value is left under an older key; returns how many.
pub async fn rotate_all(pool: &PgPool, keyring: &Keyring, batch_size: i64) -> Result<u64, DirectoryError> {
    let mut total = 0;
    loop {
        let rotated = rotate_batch(pool, keyring, batch_size).await?;
        if rotated == 0 {
            return Ok(total);
        }
        total += rotated;
        tracing::info!(rotated, total, "re-sealed personal data under the active key");
    }
}
