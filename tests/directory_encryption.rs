//! Encryption against the real PostgreSQL: values round-trip through the store sealed, the
//! stored rows carry algorithm, sensitivity and key version, and key rotation keeps old rows
//! readable and then re-seals every one under the new key, so the old key can be dropped.

mod readside_common;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use diboas_ledger::directory::encryption::{CryptoError, Keyring};
use diboas_ledger::directory::model::{
    ExperienceLevel, KycStatus, KycUpdate, Mascot, NewUser, PersonalField, Preferences, RiskLevel,
};
use diboas_ledger::directory::{DirectoryError, rotation, store};
use readside_common::*;
use sqlx::PgPool;

fn key(byte: u8) -> String {
    BASE64.encode([byte; 32])
}

fn keyring(versions: &[(i32, u8)], active: i32) -> Keyring {
    let entries: Vec<String> = versions.iter().map(|(version, byte)| format!("{version}:{}", key(*byte))).collect();
    Keyring::parse(&entries.join(","), active, &key(0xAB)).expect("keyring")
}

fn new_user(n: u128) -> NewUser {
    NewUser {
        user_id: user_id(n),
        email: format!("user{n}@example.org"),
        two_factor_enabled: false,
        profile: vec![(PersonalField::GivenName, format!("Name{n}")), (PersonalField::Phone, "+15550001111".into())],
        preferences: Preferences { timezone: "UTC".into(), language: "en".into(), currency: "USD".into() },
        mascot: Mascot::Acqua,
        experience_level: ExperienceLevel::Advanced,
    }
}

async fn versions(pool: &PgPool) -> Vec<(i32, i64)> {
    sqlx::query_as("SELECT key_version, count(*) FROM directory.personal_data GROUP BY 1 ORDER BY 1")
        .fetch_all(pool)
        .await
        .expect("versions")
}

#[sqlx::test]
async fn rotation_keeps_old_rows_readable_then_reseals_them(pool: PgPool) {
    let old = keyring(&[(1, 1)], 1);
    for n in 0..25 {
        store::register_user(&pool, &old, &new_user(n), None).await.expect("register");
    }
    let kyc = KycUpdate {
        status: KycStatus::Verified,
        risk_level: RiskLevel::Low,
        compliance_flags: vec![],
        document_references: Some(vec!["doc-1".into(), "doc-2".into()]),
    };
    store::set_kyc(&pool, &old, user_id(0), &kyc, None).await.expect("kyc");
    assert_eq!(versions(&pool).await, [(1, 76)]);
    let (algorithm, sensitivity, nonce_bytes): (String, String, i32) = sqlx::query_as(
        "SELECT algorithm, sensitivity, length(nonce) FROM directory.personal_data WHERE field = 'kyc_documents'",
    )
    .fetch_one(&pool)
    .await
    .expect("the document row");
    assert_eq!((algorithm.as_str(), sensitivity.as_str(), nonce_bytes), ("AES-256-GCM", "document", 12));

    // Version 2 becomes active; version 1 stays configured while the rotation runs.
    let both = keyring(&[(1, 1), (2, 2)], 2);
    let before = store::get_user(&pool, &both, user_id(3), "rotation check", None).await.expect("old rows open");
    assert!(before.personal.contains(&(PersonalField::GivenName, "Name3".to_string())));
    // A write during the rotation is sealed under the new key at once.
    store::register_user(&pool, &both, &new_user(100), None).await.expect("register under v2");
    assert_eq!(versions(&pool).await, [(1, 76), (2, 3)]);

    let first = rotation::rotate_batch(&pool, &both, 10).await.expect("one batch");
    assert_eq!(first, 10);
    assert_eq!(versions(&pool).await, [(1, 66), (2, 13)]);
    let rest = rotation::rotate_all(&pool, &both, 10).await.expect("the rest");
    assert_eq!(rest, 66);
    assert_eq!(versions(&pool).await, [(2, 79)]);

    // The old key can go: every value opens under version 2 alone, and equals what was written.
    let new_only = keyring(&[(2, 2)], 2);
    for n in (0..25).chain([100]) {
        let user = store::get_user(&pool, &new_only, user_id(n), "after rotation", None).await.expect("opens");
        assert!(user.personal.contains(&(PersonalField::Email, format!("user{n}@example.org"))), "{user:?}");
        assert!(user.personal.contains(&(PersonalField::GivenName, format!("Name{n}"))));
    }
    let documents = store::get_user(&pool, &new_only, user_id(0), "after rotation", None).await.expect("opens");
    assert!(documents.personal.contains(&(PersonalField::KycDocuments, "doc-1\ndoc-2".to_string())));
    // Nothing is left to rotate.
    assert_eq!(rotation::rotate_all(&pool, &new_only, 10).await.expect("idempotent"), 0);
}

#[sqlx::test]
async fn a_missing_key_or_a_moved_ciphertext_does_not_open(pool: PgPool) {
    let first = keyring(&[(1, 1)], 1);
    store::register_user(&pool, &first, &new_user(1), None).await.expect("register");
    store::register_user(&pool, &first, &new_user(2), None).await.expect("register");
    let other = keyring(&[(2, 2)], 2);
    let error = store::get_user(&pool, &other, user_id(1), "wrong key", None).await.unwrap_err();
    assert!(matches!(error, DirectoryError::Crypto(CryptoError::UnknownKeyVersion(1))), "{error:?}");
    // Copying user 1's sealed name onto user 2's row does not give user 2 that name.
    sqlx::query(
        "UPDATE directory.personal_data AS target SET nonce = source.nonce, ciphertext = source.ciphertext
         FROM directory.personal_data AS source
         WHERE source.user_id = $1 AND source.field = 'given_name' AND target.user_id = $2 AND target.field = 'given_name'",
    )
    .bind(user_id(1))
    .bind(user_id(2))
    .execute(&pool)
    .await
    .expect("tamper");
    let error = store::get_user(&pool, &first, user_id(2), "tampered", None).await.unwrap_err();
    assert!(matches!(error, DirectoryError::Crypto(CryptoError::Unsealable)), "{error:?}");
    // The email's blind index depends on the index key, not on the data key version.
    assert_eq!(
        store::find_user_by_email(&pool, &other, "USER1@example.org", "lookup", None).await.expect("find"),
        Some(user_id(1))
    );
}
