//! Encryption against the real PostgreSQL: values round-trip through the store sealed, the
//! stored rows carry algorithm, sensitivity and key version, and key rotation keeps old rows
//! readable and then re-seals every one under the new key, so the old key can be dropped; the
//! email blind index rotates the same way, with every email findable and registered once
//! throughout.

mod readside_common;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use diboas_ledger::directory::encryption::{CryptoError, Keyring};
use diboas_ledger::directory::model::{
    ExperienceLevel, KycStatus, KycUpdate, Mascot, NewUser, NewWallet, PersonalField, Preferences, RiskLevel,
};
use diboas_ledger::directory::{DirectoryError, rotation, store};
use diboas_ledger::engine::asset::Chain;
use readside_common::*;
use sqlx::PgPool;

fn key(byte: u8) -> String {
    BASE64.encode([byte; 32])
}

fn keyring(versions: &[(i32, u8)], active: i32) -> Keyring {
    let entries: Vec<String> = versions.iter().map(|(version, byte)| format!("{version}:{}", key(*byte))).collect();
    Keyring::parse(&entries.join(","), active, &key(0xAB), 1).expect("keyring")
}

/// Data key version 1, blind-index keys `index_versions` (version, key byte) with `index_active`.
fn index_keyring(index_versions: &[(i32, u8)], index_active: i32) -> Keyring {
    let entries: Vec<String> =
        index_versions.iter().map(|(version, byte)| format!("{version}:{}", key(*byte))).collect();
    Keyring::parse(&format!("1:{}", key(1)), 1, &entries.join(","), index_active).expect("keyring")
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
    store::set_kyc(&pool, &old, user_id(0), &kyc, None).await.expect("kyc").commit().await.expect("commit");
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

    let first = rotation::rotate_batch(&pool, &both, &mut rotation::ValueCursor::start(), 10).await.expect("one batch");
    assert_eq!(first, 10);
    assert_eq!(versions(&pool).await, [(1, 66), (2, 13)]);
    let rest = rotation::rotate_all(&pool, &both, 10).await.expect("the rest");
    assert_eq!(rest.values, 66);
    assert_eq!(rest.email_indexes, 0, "the blind-index key did not change");
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
    assert_eq!(rotation::rotate_all(&pool, &new_only, 10).await.expect("idempotent"), rotation::Rotated::default());
}

/// A pass reads the table once, after its cursor: a batch never re-reads what an earlier batch
/// of the pass passed over. A row another transaction held locked is skipped by its pass and
/// taken by a later pass of `rotate_all`.
#[sqlx::test]
async fn a_rotation_pass_moves_forward_and_a_later_pass_takes_rows_that_were_locked(pool: PgPool) {
    let old = keyring(&[(1, 1)], 1);
    for n in 0..6 {
        store::register_user(&pool, &old, &new_user(n), None).await.expect("register");
    }
    let [(1, values)] = versions(&pool).await[..] else { panic!("all under version 1") };
    let locked: i64 = sqlx::query_scalar("SELECT count(*) FROM directory.personal_data WHERE user_id = $1")
        .bind(user_id(1))
        .fetch_one(&pool)
        .await
        .expect("count");
    let both = keyring(&[(1, 1), (2, 2)], 2);

    let mut holder = pool.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM directory.personal_data WHERE user_id = $1 FOR UPDATE")
        .bind(user_id(1))
        .execute(&mut *holder)
        .await
        .expect("hold user 1's rows");
    let mut cursor = rotation::ValueCursor::start();
    let mut pass = 0;
    loop {
        let rotated = rotation::rotate_batch(&pool, &both, &mut cursor, 4).await.expect("a batch");
        if rotated == 0 {
            break;
        }
        assert!(rotated <= 4);
        pass += rotated as i64;
    }
    assert_eq!(pass, values - locked, "the pass skipped exactly the locked rows");
    assert_eq!(versions(&pool).await, [(1, locked), (2, values - locked)]);
    holder.rollback().await.expect("release user 1");
    // The pass is over: its cursor is past user 1, so it does not go back for the freed rows.
    assert_eq!(rotation::rotate_batch(&pool, &both, &mut cursor, 4).await.expect("a batch"), 0);
    assert_eq!(versions(&pool).await, [(1, locked), (2, values - locked)]);

    // A whole rotation starts a new pass and takes them.
    let rest = rotation::rotate_all(&pool, &both, 4).await.expect("the rest");
    assert_eq!(rest.values, locked as u64);
    assert_eq!(versions(&pool).await, [(2, values)]);
}

/// Addresses stored before canonical forms existed: the migration lower-cases segwit and Sui,
/// and an Ethereum address stored in lower case blocks its EIP-55 spelling for anyone else.
#[sqlx::test(migrations = false)]
async fn wallet_addresses_stored_before_canonical_forms_stay_unique(pool: PgPool) {
    const BEFORE_CASE_MIGRATION: i64 = 20261125000013;
    diboas_ledger::store::MIGRATOR.run_to(BEFORE_CASE_MIGRATION, &pool).await.expect("migrate to the old layout");
    let old = keyring(&[(1, 1)], 1);
    for n in 0..3 {
        store::register_user(&pool, &old, &new_user(n), None).await.expect("register");
    }
    let legacy = [
        (0, "bitcoin", "BC1QW508D6QEJXTDG4Y5R3ZARVARY0C5XW7KV8F3T4"),
        (0, "sui", "0xABCDEF0123456789abcdef0123456789ABCDEF0123456789abcdef0123456789"),
        (0, "ethereum", "0x5aaeb6053f3e94c9b9a09f33669435e7ef1beaed"),
        (1, "bitcoin", "1BvBMSEYstWetqTFn5Au4m4GFg7xJaNVN2"),
    ];
    for (n, chain, address) in legacy {
        sqlx::query("INSERT INTO directory.wallets (user_id, chain, address) VALUES ($1, $2, $3)")
            .bind(user_id(n))
            .bind(chain)
            .bind(address)
            .execute(&pool)
            .await
            .expect("a wallet as stored before canonical forms");
    }
    diboas_ledger::store::MIGRATOR.run(&pool).await.expect("migrate to the current layout");

    let stored: Vec<(String, String)> =
        sqlx::query_as("SELECT chain, address FROM directory.wallets WHERE user_id = $1 ORDER BY chain")
            .bind(user_id(0))
            .fetch_all(&pool)
            .await
            .expect("wallets");
    assert_eq!(
        stored,
        [
            ("bitcoin".to_owned(), "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4".to_owned()),
            ("ethereum".to_owned(), "0x5aaeb6053f3e94c9b9a09f33669435e7ef1beaed".to_owned()),
            ("sui".to_owned(), "0xabcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789".to_owned()),
        ]
    );
    let base58: String = sqlx::query_scalar("SELECT address FROM directory.wallets WHERE user_id = $1")
        .bind(user_id(1))
        .fetch_one(&pool)
        .await
        .expect("the base58 wallet");
    assert_eq!(base58, "1BvBMSEYstWetqTFn5Au4m4GFg7xJaNVN2", "base58 is case-sensitive and kept as stored");

    // The canonical spellings of the same addresses, for another user, are refused.
    for (chain, address) in [
        (Chain::Ethereum, "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"),
        (Chain::Bitcoin, "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4"),
    ] {
        let wallet = NewWallet { chain, address: address.to_owned(), public_key: None };
        let refused = store::register_wallet(&pool, user_id(2), &wallet, None).await;
        assert!(matches!(refused, Err(DirectoryError::WalletAlreadyRegistered { .. })), "{chain:?}: {refused:?}");
    }
    let count: i64 =
        sqlx::query_scalar("SELECT count(*) FROM directory.wallets").fetch_one(&pool).await.expect("count");
    assert_eq!(count, 4);
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

async fn index_versions(pool: &PgPool) -> Vec<(i32, i64)> {
    sqlx::query_as("SELECT email_index_version, count(*) FROM directory.users GROUP BY 1 ORDER BY 1")
        .fetch_all(pool)
        .await
        .expect("index versions")
}

async fn find(pool: &PgPool, keyring: &Keyring, email: &str) -> Option<uuid::Uuid> {
    store::find_user_by_email(pool, keyring, email, "blind-index rotation test", None).await.expect("lookup")
}

#[sqlx::test]
async fn blind_index_rotation_keeps_every_email_findable_and_registered_once(pool: PgPool) {
    let old = index_keyring(&[(1, 0x11)], 1);
    for n in 0..5 {
        store::register_user(&pool, &old, &new_user(n), None).await.expect("register");
    }
    // The nil UUID is a valid user id, and sorts before every other: a cursor must not skip it.
    let nil_user = NewUser { user_id: uuid::Uuid::nil(), email: "nil@example.org".into(), ..new_user(60) };
    store::register_user(&pool, &old, &nil_user, None).await.expect("register the nil user");
    // Index key 2 becomes active; key 1 stays configured while the rotation runs.
    let both = index_keyring(&[(1, 0x11), (2, 0x22)], 2);
    assert_eq!(find(&pool, &both, "USER3@example.org").await, Some(user_id(3)), "found under the old key");
    let mut taken = new_user(50);
    taken.email = "user0@example.org".into();
    let refused = store::register_user(&pool, &both, &taken, None).await;
    assert!(matches!(refused, Err(DirectoryError::EmailAlreadyRegistered)), "{refused:?}");
    store::register_user(&pool, &both, &new_user(100), None).await.expect("register under index key 2");
    // A server still making indexes under key 1 sees the email indexed under key 2.
    let lagging = index_keyring(&[(1, 0x11), (2, 0x22)], 1);
    let mut taken = new_user(51);
    taken.email = "user100@example.org".into();
    let refused = store::register_user(&pool, &lagging, &taken, None).await;
    assert!(matches!(refused, Err(DirectoryError::EmailAlreadyRegistered)), "{refused:?}");
    assert_eq!(index_versions(&pool).await, [(1, 6), (2, 1)]);

    let first = rotation::reindex_batch(&pool, &both, &mut None, 2).await.expect("one batch");
    assert_eq!(first, 2);
    assert_eq!(index_versions(&pool).await, [(1, 4), (2, 3)]);
    let rest = rotation::rotate_all(&pool, &both, 2).await.expect("the rest");
    assert_eq!(rest, rotation::Rotated { values: 0, email_indexes: 4 });
    assert_eq!(index_versions(&pool).await, [(2, 7)]);

    // Key 1 can go: every email is found under key 2 alone, and no longer under key 1 alone.
    let new_only = index_keyring(&[(2, 0x22)], 2);
    for n in (0..5).chain([100]) {
        assert_eq!(find(&pool, &new_only, &format!("user{n}@example.org")).await, Some(user_id(n)));
    }
    assert_eq!(find(&pool, &new_only, "nil@example.org").await, Some(uuid::Uuid::nil()));
    assert_eq!(find(&pool, &old, "user3@example.org").await, None);
    let mut taken = new_user(52);
    taken.email = "user4@example.org".into();
    let refused = store::register_user(&pool, &new_only, &taken, None).await;
    assert!(matches!(refused, Err(DirectoryError::EmailAlreadyRegistered)), "{refused:?}");
    assert_eq!(rotation::rotate_all(&pool, &new_only, 2).await.expect("idempotent"), rotation::Rotated::default());
}

/// During a rotation one email has an index per key, so the unique index alone would let two
/// servers with different active keys register it twice; the advisory locks make the second wait
/// and see the first.
#[sqlx::test]
async fn concurrent_registrations_of_one_email_under_different_index_keys_admit_one(pool: PgPool) {
    let lagging = index_keyring(&[(1, 0x11), (2, 0x22)], 1);
    let ahead = index_keyring(&[(1, 0x11), (2, 0x22)], 2);
    for round in 0..10_u128 {
        let email = format!("race{round}@example.org");
        let mut first = new_user(1_000 + 2 * round);
        first.email = email.clone();
        let mut second = new_user(1_001 + 2 * round);
        second.email = email;
        let (a, b) = tokio::join!(
            store::register_user(&pool, &lagging, &first, None),
            store::register_user(&pool, &ahead, &second, None)
        );
        let admitted = [&a, &b].iter().filter(|outcome| outcome.is_ok()).count();
        assert_eq!(admitted, 1, "round {round}: {a:?} / {b:?}");
        let refused = if a.is_ok() { b } else { a };
        assert!(matches!(refused, Err(DirectoryError::EmailAlreadyRegistered)), "round {round}: {refused:?}");
    }
}
