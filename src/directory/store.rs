//! The directory's reads and writes. Every change runs in one transaction together with its
//! audit row (before and after state: the user's non-personal columns, and the names of the
//! encrypted fields written, never their values); every read of personal data writes a
//! data-access row in the same transaction as the read. Personal values are sealed with the
//! keyring's active key before they are bound to a query.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::DirectoryError;
use super::encryption::{ALGORITHM, CryptoError, Keyring, Sealed};
use super::model::{
    CheckResult, CheckType, ComplianceCheckRecord, ExperienceLevel, KycStatus, KycUpdate, Mascot, NewComplianceCheck,
    NewDomainAccount, NewUser, NewWallet, PersonalField, Preferences, RiskLevel, UserRecord, UserUpdate,
};
use crate::audit::{self, AuditEvent, DataAccess};
use crate::engine::asset::Chain;
use crate::engine::record::RequestContext;

/// The user's audited state: every column but the blind index and its key version (which only
/// identify an email, and change with key rotation rather than with the user).
const USER_STATE: &str = "to_jsonb(u) - 'email_index' - 'email_index_version'";

/// Most rows of each kind one GetUser returns (wallets are at most one per chain).
const MAX_RECORDS_PER_USER: i64 = 100;

/// Seals `values` of `user_id` and writes them, replacing the stored ones.
async fn write_personal(
    tx: &mut PgConnection,
    keyring: &Keyring,
    user_id: Uuid,
    values: &[(PersonalField, String)],
) -> Result<(), DirectoryError> {
    if values.is_empty() {
        return Ok(());
    }
    let (mut fields, mut sensitivities, mut versions, mut nonces, mut ciphertexts) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (field, value) in values {
        let sealed = keyring.seal(user_id, field.name(), value.as_bytes())?;
        fields.push(field.name());
        sensitivities.push(field.sensitivity().name());
        versions.push(sealed.key_version);
        nonces.push(sealed.nonce);
        ciphertexts.push(sealed.ciphertext);
    }
    sqlx::query(
        "INSERT INTO directory.personal_data (user_id, field, sensitivity, algorithm, key_version, nonce, ciphertext)
         SELECT $1, f, s, $2, v, n, c FROM UNNEST($3::text[], $4::text[], $5::int4[], $6::bytea[], $7::bytea[])
             AS t(f, s, v, n, c)
         ON CONFLICT (user_id, field) DO UPDATE SET sensitivity = EXCLUDED.sensitivity,
             algorithm = EXCLUDED.algorithm, key_version = EXCLUDED.key_version, nonce = EXCLUDED.nonce,
             ciphertext = EXCLUDED.ciphertext, updated_at = now()",
    )
    .bind(user_id)
    .bind(ALGORITHM)
    .bind(fields)
    .bind(sensitivities)
    .bind(versions)
    .bind(nonces)
    .bind(ciphertexts)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

fn field_names(values: &[(PersonalField, String)]) -> Vec<&'static str> {
    values.iter().map(|(field, _)| field.name()).collect()
}

/// The after state of a user change: the row, and which encrypted fields were written.
fn with_fields(state: Value, fields: Vec<&'static str>) -> Value {
    json!({ "user": state, "personal_fields_written": fields })
}

/// Locks the user's row and returns its audited state; refuses an unknown or erased user.
async fn lock_user(tx: &mut PgConnection, user_id: Uuid) -> Result<Value, DirectoryError> {
    let row: Option<(Value, bool)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {USER_STATE}, erased_at IS NOT NULL FROM directory.users u WHERE user_id = $1 FOR UPDATE"
    )))
    .bind(user_id)
    .fetch_optional(&mut *tx)
    .await?;
    match row {
        None => Err(DirectoryError::UserNotFound(user_id)),
        Some((_, true)) => Err(DirectoryError::UserErased(user_id)),
        Some((state, false)) => Ok(state),
    }
}

pub async fn register_user(
    pool: &PgPool,
    keyring: &Keyring,
    user: &NewUser,
    context: Option<&RequestContext>,
) -> Result<(), DirectoryError> {
    let mut tx = pool.begin().await?;
    claim_email(&mut tx, keyring, &user.email, user.user_id).await?;
    let inserted: Option<Value> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "INSERT INTO directory.users AS u (user_id, email_index, email_index_version, two_factor_enabled, timezone,
             language, currency, mascot, experience_level)
         VALUES ($1, $2, $9, $3, $4, $5, $6, $7, $8)
         ON CONFLICT DO NOTHING
         RETURNING {USER_STATE}"
    )))
    .bind(user.user_id)
    .bind(keyring.email_index(&user.email))
    .bind(user.two_factor_enabled)
    .bind(&user.preferences.timezone)
    .bind(&user.preferences.language)
    .bind(&user.preferences.currency)
    .bind(user.mascot.name())
    .bind(user.experience_level.name())
    .bind(keyring.index_active_version())
    .fetch_optional(&mut *tx)
    .await?;
    let Some(after) = inserted else {
        let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM directory.users WHERE user_id = $1)")
            .bind(user.user_id)
            .fetch_one(&mut *tx)
            .await?;
        return Err(if exists {
            DirectoryError::UserAlreadyExists(user.user_id)
        } else {
            DirectoryError::EmailAlreadyRegistered
        });
    };
    let mut personal = user.profile.clone();
    personal.push((PersonalField::Email, user.email.clone()));
    write_personal(&mut tx, keyring, user.user_id, &personal).await?;
    let event = AuditEvent {
        event_type: "user.registered",
        entity_type: "user",
        entity_id: user.user_id.to_string(),
        before: None,
        after: Some(with_fields(after, field_names(&personal))),
    };
    audit::record(&mut tx, &event, context).await?;
    tx.commit().await?;
    Ok(())
}

/// Refuses `email` if another user holds it under any configured blind-index key. While a
/// rotation is under way one email has a different index per key, so the table's unique index
/// alone cannot see a duplicate; the transaction-scoped advisory locks on every one of the
/// email's indexes (taken in one order) make two registrations of one email wait for each other,
/// whichever key each server has active.
async fn claim_email(
    tx: &mut PgConnection,
    keyring: &Keyring,
    email: &str,
    user_id: Uuid,
) -> Result<(), DirectoryError> {
    let indexes = keyring.email_indexes(email);
    let mut lock_keys: Vec<i64> = indexes
        .iter()
        .map(|index| {
            let mut prefix = [0u8; 8];
            prefix.copy_from_slice(&index[..8]);
            i64::from_be_bytes(prefix)
        })
        .collect();
    lock_keys.sort_unstable();
    lock_keys.dedup();
    sqlx::query("SELECT pg_advisory_xact_lock(k) FROM UNNEST($1::int8[]) AS t(k) ORDER BY k")
        .bind(&lock_keys)
        .execute(&mut *tx)
        .await?;
    let taken: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM directory.users WHERE email_index = ANY($1) AND user_id <> $2)",
    )
    .bind(&indexes)
    .bind(user_id)
    .fetch_one(&mut *tx)
    .await?;
    if taken { Err(DirectoryError::EmailAlreadyRegistered) } else { Ok(()) }
}

fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(database) if database.is_unique_violation())
}

pub async fn update_user(
    pool: &PgPool,
    keyring: &Keyring,
    user_id: Uuid,
    update: &UserUpdate,
    context: Option<&RequestContext>,
) -> Result<(), DirectoryError> {
    let mut tx = pool.begin().await?;
    let before = lock_user(&mut tx, user_id).await?;
    if let Some(email) = &update.email {
        claim_email(&mut tx, keyring, email, user_id).await?;
    }
    let domains =
        update.enabled_domains.as_ref().map(|domains| domains.iter().map(|domain| domain.name()).collect::<Vec<_>>());
    let updated = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "UPDATE directory.users AS u SET email_index = COALESCE($2, email_index),
             email_index_version = CASE WHEN $2 IS NULL THEN email_index_version ELSE $13 END,
             two_factor_enabled = COALESCE($3, two_factor_enabled), timezone = COALESCE($4, timezone),
             language = COALESCE($5, language), currency = COALESCE($6, currency), mascot = COALESCE($7, mascot),
             experience_level = COALESCE($8, experience_level), points = COALESCE($9, points),
             streak_days = COALESCE($10, streak_days), enabled_domains = COALESCE($11, enabled_domains),
             last_active_at = CASE WHEN $12 THEN now() ELSE last_active_at END, updated_at = now()
         WHERE user_id = $1
         RETURNING {USER_STATE}"
    )))
    .bind(user_id)
    .bind(update.email.as_deref().map(|email| keyring.email_index(email)))
    .bind(update.two_factor_enabled)
    .bind(&update.timezone)
    .bind(&update.language)
    .bind(&update.currency)
    .bind(update.mascot.map(Mascot::name))
    .bind(update.experience_level.map(ExperienceLevel::name))
    .bind(update.points)
    .bind(update.streak_days)
    .bind(domains)
    .bind(update.touch_last_active)
    .bind(keyring.index_active_version())
    .fetch_one(&mut *tx)
    .await;
    let after: Value = match updated {
        Ok(after) => after,
        Err(error) if is_unique_violation(&error) => return Err(DirectoryError::EmailAlreadyRegistered),
        Err(error) => return Err(error.into()),
    };
    let mut personal = update.profile.clone();
    if let Some(email) = &update.email {
        personal.push((PersonalField::Email, email.clone()));
    }
    write_personal(&mut tx, keyring, user_id, &personal).await?;
    let event = AuditEvent {
        event_type: "user.updated",
        entity_type: "user",
        entity_id: user_id.to_string(),
        before: Some(before),
        after: Some(with_fields(after, field_names(&personal))),
    };
    audit::record(&mut tx, &event, context).await?;
    tx.commit().await?;
    Ok(())
}

/// A KYC change written but not yet committed: the user's row stays locked until
/// [`PendingKyc::commit`], and dropping it rolls the change back. What must follow a KYC change
/// (the ledger's compliance gate) is done while it is pending, so two changes of one user reach
/// the directory and whatever follows in the same order.
pub struct PendingKyc {
    tx: sqlx::Transaction<'static, sqlx::Postgres>,
}

impl PendingKyc {
    pub async fn commit(self) -> Result<(), DirectoryError> {
        self.tx.commit().await?;
        Ok(())
    }
}

/// Sets a user's KYC status, risk level, compliance flags and (sealed) document references,
/// with its audit row; the caller commits.
pub async fn set_kyc(
    pool: &PgPool,
    keyring: &Keyring,
    user_id: Uuid,
    kyc: &KycUpdate,
    context: Option<&RequestContext>,
) -> Result<PendingKyc, DirectoryError> {
    let mut tx = pool.begin().await?;
    let before = lock_user(&mut tx, user_id).await?;
    let after: Value = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "UPDATE directory.users AS u SET kyc_status = $2, risk_level = $3, compliance_flags = $4, updated_at = now()
         WHERE user_id = $1 RETURNING {USER_STATE}"
    )))
    .bind(user_id)
    .bind(kyc.status.name())
    .bind(kyc.risk_level.name())
    .bind(&kyc.compliance_flags)
    .fetch_one(&mut *tx)
    .await?;
    let documents: Vec<(PersonalField, String)> =
        kyc.document_references.iter().map(|references| (PersonalField::KycDocuments, references.join("\n"))).collect();
    write_personal(&mut tx, keyring, user_id, &documents).await?;
    let event = AuditEvent {
        event_type: "user.kyc_set",
        entity_type: "user",
        entity_id: user_id.to_string(),
        before: Some(before),
        after: Some(with_fields(after, field_names(&documents))),
    };
    audit::record(&mut tx, &event, context).await?;
    Ok(PendingKyc { tx })
}

pub async fn record_compliance_check(
    pool: &PgPool,
    user_id: Uuid,
    check: &NewComplianceCheck,
    context: Option<&RequestContext>,
) -> Result<Uuid, DirectoryError> {
    let mut tx = pool.begin().await?;
    lock_user(&mut tx, user_id).await?;
    let check_id = Uuid::new_v4();
    let after: Value = sqlx::query_scalar(
        "INSERT INTO directory.compliance_checks AS c (check_id, user_id, check_type, provider, result, risk_score,
             flags, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING to_jsonb(c)",
    )
    .bind(check_id)
    .bind(user_id)
    .bind(check.check_type.name())
    .bind(&check.provider)
    .bind(check.result.name())
    .bind(check.risk_score)
    .bind(&check.flags)
    .bind(check.expires_at)
    .fetch_one(&mut *tx)
    .await?;
    let event = AuditEvent {
        event_type: "compliance_check.recorded",
        entity_type: "compliance_check",
        entity_id: check_id.to_string(),
        before: None,
        after: Some(after),
    };
    audit::record(&mut tx, &event, context).await?;
    tx.commit().await?;
    Ok(check_id)
}

pub async fn register_wallet(
    pool: &PgPool,
    user_id: Uuid,
    wallet: &NewWallet,
    context: Option<&RequestContext>,
) -> Result<(), DirectoryError> {
    let mut tx = pool.begin().await?;
    lock_user(&mut tx, user_id).await?;
    let after: Option<Value> = sqlx::query_scalar(
        "INSERT INTO directory.wallets AS w (user_id, chain, address, public_key) VALUES ($1, $2, $3, $4)
         ON CONFLICT DO NOTHING RETURNING to_jsonb(w)",
    )
    .bind(user_id)
    .bind(wallet.chain.name())
    .bind(&wallet.address)
    .bind(&wallet.public_key)
    .fetch_optional(&mut *tx)
    .await?;
    let after = after.ok_or(DirectoryError::WalletAlreadyRegistered { user_id, chain: wallet.chain.name() })?;
    let event = AuditEvent {
        event_type: "wallet.registered",
        entity_type: "wallet",
        entity_id: format!("{user_id}/{}", wallet.chain.name()),
        before: None,
        after: Some(after),
    };
    audit::record(&mut tx, &event, context).await?;
    tx.commit().await?;
    Ok(())
}

pub async fn open_domain_account(
    pool: &PgPool,
    user_id: Uuid,
    account: &NewDomainAccount,
    context: Option<&RequestContext>,
) -> Result<(), DirectoryError> {
    let mut tx = pool.begin().await?;
    lock_user(&mut tx, user_id).await?;
    let after: Option<Value> = sqlx::query_scalar(
        "INSERT INTO directory.domain_accounts AS a (account_id, user_id, domain, kind, settings)
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING RETURNING to_jsonb(a)",
    )
    .bind(account.account_id)
    .bind(user_id)
    .bind(account.domain.name())
    .bind(account.kind)
    .bind(&account.settings)
    .fetch_optional(&mut *tx)
    .await?;
    let after = after.ok_or(DirectoryError::DomainAccountAlreadyExists(account.account_id))?;
    let event = AuditEvent {
        event_type: "domain_account.opened",
        entity_type: "domain_account",
        entity_id: account.account_id.to_string(),
        before: None,
        after: Some(after),
    };
    audit::record(&mut tx, &event, context).await?;
    tx.commit().await?;
    Ok(())
}

/// Erases a user's personal data (the sealed values and the email's blind index), keeping the
/// user row (non-personal), wallets, domain accounts, compliance checks and every ledger record.
/// Returns the fields erased.
pub async fn erase_user(
    pool: &PgPool,
    user_id: Uuid,
    reason: &str,
    context: Option<&RequestContext>,
) -> Result<Vec<String>, DirectoryError> {
    let mut tx = pool.begin().await?;
    let before = lock_user(&mut tx, user_id).await?;
    let erased: Vec<String> =
        sqlx::query_scalar("DELETE FROM directory.personal_data WHERE user_id = $1 RETURNING field")
            .bind(user_id)
            .fetch_all(&mut *tx)
            .await?;
    let after: Value = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "UPDATE directory.users AS u SET email_index = NULL, erased_at = now(), updated_at = now()
         WHERE user_id = $1 RETURNING {USER_STATE}"
    )))
    .bind(user_id)
    .fetch_one(&mut *tx)
    .await?;
    let event = AuditEvent {
        event_type: "user.erased",
        entity_type: "user",
        entity_id: user_id.to_string(),
        before: Some(before),
        after: Some(json!({ "user": after, "personal_fields_erased": erased, "reason": reason })),
    };
    audit::record(&mut tx, &event, context).await?;
    tx.commit().await?;
    Ok(erased)
}

/// The user registered with `email`, if any; the lookup is logged with its reason.
pub async fn find_user_by_email(
    pool: &PgPool,
    keyring: &Keyring,
    email: &str,
    reason: &str,
    context: Option<&RequestContext>,
) -> Result<Option<Uuid>, DirectoryError> {
    let mut tx = pool.begin().await?;
    // Under every configured key: rows not yet re-indexed by a rotation are still found.
    let found: Option<Uuid> = sqlx::query_scalar("SELECT user_id FROM directory.users WHERE email_index = ANY($1)")
        .bind(keyring.email_indexes(email))
        .fetch_optional(&mut *tx)
        .await?;
    let access = DataAccess { subject_user_id: found, entity_type: "user", fields: vec!["email"], reason };
    audit::record_access(&mut tx, &access, context).await?;
    tx.commit().await?;
    Ok(found)
}

type UserRow = (
    bool,
    String,
    String,
    String,
    String,
    String,
    String,
    String,
    Vec<String>,
    i64,
    i32,
    Vec<String>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
);

/// A stored value: field, algorithm, key version, nonce, ciphertext.
type SealedRow = (String, String, i32, Vec<u8>, Vec<u8>);

type CheckRow = (Uuid, String, String, String, i16, Vec<String>, DateTime<Utc>, Option<DateTime<Utc>>);

fn stored<T>(value: Option<T>, what: &str, text: &str) -> Result<T, DirectoryError> {
    value.ok_or_else(|| DirectoryError::Corrupt(format!("{what} {text:?}")))
}

/// A user with everything the directory holds on them, personal data opened; the read is logged
/// with its reason, in the same transaction.
pub async fn get_user(
    pool: &PgPool,
    keyring: &Keyring,
    user_id: Uuid,
    reason: &str,
    context: Option<&RequestContext>,
) -> Result<UserRecord, DirectoryError> {
    let mut tx = pool.begin().await?;
    let row: Option<UserRow> = sqlx::query_as(
        "SELECT two_factor_enabled, timezone, language, currency, mascot, experience_level, kyc_status, risk_level,
             compliance_flags, points, streak_days, enabled_domains, last_active_at, erased_at
         FROM directory.users WHERE user_id = $1",
    )
    .bind(user_id)
    .fetch_optional(&mut *tx)
    .await?;
    let row = row.ok_or(DirectoryError::UserNotFound(user_id))?;
    let sealed: Vec<SealedRow> = sqlx::query_as(
        "SELECT field, algorithm, key_version, nonce, ciphertext FROM directory.personal_data WHERE user_id = $1
         ORDER BY field",
    )
    .bind(user_id)
    .fetch_all(&mut *tx)
    .await?;
    let wallets: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT chain, address, public_key FROM directory.wallets WHERE user_id = $1 ORDER BY chain LIMIT $2",
    )
    .bind(user_id)
    .bind(MAX_RECORDS_PER_USER)
    .fetch_all(&mut *tx)
    .await?;
    let domain_accounts: Vec<(Uuid, String, String, Value)> = sqlx::query_as(
        "SELECT account_id, domain, kind, settings FROM directory.domain_accounts WHERE user_id = $1
         ORDER BY created_at, account_id LIMIT $2",
    )
    .bind(user_id)
    .bind(MAX_RECORDS_PER_USER)
    .fetch_all(&mut *tx)
    .await?;
    let checks: Vec<CheckRow> = sqlx::query_as(
        "SELECT check_id, check_type, provider, result, risk_score, flags, checked_at, expires_at
         FROM directory.compliance_checks WHERE user_id = $1 ORDER BY checked_at DESC, check_id LIMIT $2",
    )
    .bind(user_id)
    .bind(MAX_RECORDS_PER_USER)
    .fetch_all(&mut *tx)
    .await?;
    let fields: Vec<&str> = sealed.iter().map(|(field, ..)| field.as_str()).collect();
    let access = DataAccess { subject_user_id: Some(user_id), entity_type: "user", fields, reason };
    audit::record_access(&mut tx, &access, context).await?;
    tx.commit().await?;

    let mut personal = Vec::with_capacity(sealed.len());
    for (field, algorithm, key_version, nonce, ciphertext) in sealed {
        if algorithm != ALGORITHM {
            return Err(CryptoError::UnknownAlgorithm(algorithm).into());
        }
        let plaintext = keyring.open(user_id, &field, &Sealed { key_version, nonce, ciphertext })?;
        let value = String::from_utf8(plaintext).map_err(|_| CryptoError::Unsealable)?;
        personal.push((stored(PersonalField::from_name(&field), "personal field", &field)?, value));
    }
    let (
        two_factor_enabled,
        timezone,
        language,
        currency,
        mascot,
        experience,
        kyc,
        risk,
        flags,
        points,
        streak,
        domains,
        last_active_at,
        erased_at,
    ) = row;
    Ok(UserRecord {
        user_id,
        two_factor_enabled,
        personal,
        preferences: Preferences { timezone, language, currency },
        mascot: stored(Mascot::from_name(&mascot), "mascot", &mascot)?,
        experience_level: stored(ExperienceLevel::from_name(&experience), "experience level", &experience)?,
        kyc_status: stored(KycStatus::from_name(&kyc), "KYC status", &kyc)?,
        risk_level: stored(RiskLevel::from_name(&risk), "risk level", &risk)?,
        compliance_flags: flags,
        points,
        streak_days: streak,
        enabled_domains: domains,
        last_active_at,
        erased: erased_at.is_some(),
        wallets: wallets
            .into_iter()
            .map(|(chain, address, public_key)| {
                let parsed = Chain::ALL.into_iter().find(|known| known.name() == chain);
                Ok((stored(parsed, "chain", &chain)?, address, public_key))
            })
            .collect::<Result<_, DirectoryError>>()?,
        domain_accounts,
        compliance_checks: checks
            .into_iter()
            .map(|(check_id, check_type, provider, result, risk_score, flags, checked_at, expires_at)| {
                Ok(ComplianceCheckRecord {
                    check_id,
                    check: NewComplianceCheck {
                        check_type: stored(CheckType::from_name(&check_type), "check type", &check_type)?,
                        provider,
                        result: stored(CheckResult::from_name(&result), "check result", &result)?,
                        risk_score,
                        flags,
                        expires_at,
                    },
                    checked_at,
                })
            })
            .collect::<Result<_, DirectoryError>>()?,
    })
}
