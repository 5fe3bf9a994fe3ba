//! The read side's subcommands as the real binary: `rotate-keys` re-seals every value under the
//! configured active key (keys from the environment, never the database), a half-configured
//! keyring is refused, and `retention` refreshes the views and applies retention.

mod journal_common;
mod readside_common;

use std::process::Command;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use diboas_ledger::directory::encryption::Keyring;
use diboas_ledger::directory::model::{ExperienceLevel, Mascot, NewUser, PersonalField, Preferences};
use diboas_ledger::directory::store;
use journal_common::{prepared, url_of};
use readside_common::{count, user_id};
use sqlx::PgPool;

fn run(url: &str, args: &[&str], env: &[(&str, String)]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_diboas-ledger"))
        .args(["--database-url", url])
        .args(args)
        .env_remove("DIBOAS_ENCRYPTION_KEYS")
        .env_remove("DIBOAS_BLIND_INDEX_KEY")
        .env_remove("DIBOAS_ENCRYPTION_ACTIVE_KEY")
        .envs(env.iter().map(|(name, value)| (*name, value.as_str())))
        .output()
        .expect("run diboas-ledger");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[sqlx::test]
async fn rotate_keys_reseals_everything_under_the_active_key(pool: PgPool) {
    let options = prepared(&pool).await;
    let url = url_of(&options);
    let (key_1, key_2, index_key) = (BASE64.encode([1u8; 32]), BASE64.encode([2u8; 32]), BASE64.encode([3u8; 32]));
    let index_key_2 = BASE64.encode([4u8; 32]);
    let old = Keyring::parse(&format!("1:{key_1}"), 1, &index_key, 1).expect("keyring");
    for n in 0..7 {
        let user = NewUser {
            user_id: user_id(n),
            email: format!("cli{n}@example.org"),
            two_factor_enabled: false,
            profile: vec![(PersonalField::FamilyName, format!("Family{n}"))],
            preferences: Preferences { timezone: "UTC".into(), language: "en".into(), currency: "USD".into() },
            mascot: Mascot::Mystic,
            experience_level: ExperienceLevel::Intermediate,
        };
        store::register_user(&pool, &old, &user, None).await.expect("register");
    }

    let partial = run(&url, &["rotate-keys"], &[("DIBOAS_ENCRYPTION_KEYS", format!("1:{key_1}"))]);
    assert!(!partial.0, "{partial:?}");
    assert!(partial.2.contains("DIBOAS_BLIND_INDEX_KEY"), "{partial:?}");

    let env = [
        ("DIBOAS_ENCRYPTION_KEYS", format!("1:{key_1},2:{key_2}")),
        ("DIBOAS_ENCRYPTION_ACTIVE_KEY", "2".to_string()),
        ("DIBOAS_BLIND_INDEX_KEY", format!("1:{index_key},2:{index_key_2}")),
        ("DIBOAS_BLIND_INDEX_ACTIVE_KEY", "2".to_string()),
    ];
    let (ok, stdout, stderr) = run(&url, &["rotate-keys", "--batch-size", "3"], &env);
    assert!(ok, "{stdout}{stderr}");
    assert_eq!(
        stdout,
        "re-sealed 14 values under key version 2; re-indexed 7 emails under blind-index key version 2\n"
    );
    assert_eq!(count(&pool, "SELECT count(*) FROM directory.personal_data WHERE key_version = 2").await, 14);
    assert_eq!(count(&pool, "SELECT count(*) FROM directory.users WHERE email_index_version = 2").await, 7);
    let new_only = Keyring::parse(&format!("2:{key_2}"), 2, &format!("2:{index_key_2}"), 2).expect("keyring");
    let user = store::get_user(&pool, &new_only, user_id(4), "cli test", None).await.expect("opens under v2");
    assert!(user.personal.contains(&(PersonalField::FamilyName, "Family4".to_string())));
    let found = store::find_user_by_email(&pool, &new_only, "cli5@example.org", "cli test", None).await;
    assert_eq!(found.expect("lookup"), Some(user_id(5)), "found under the new blind-index key alone");

    let (ok, stdout, stderr) = run(&url, &["retention"], &[]);
    assert!(ok, "{stdout}{stderr}");
    assert_eq!(stdout, "views refreshed; 0 partitions archived, 0 dropped\n");
}
