//! Monthly partitions of the audit trail created ahead, rows landing in their month's
//! partition, and retention: old partitions move to the queryable archive, and those past 7
//! years are dropped, exactly.

mod readside_common;

use diboas_ledger::audit::retention::{self, RetentionReport};
use diboas_ledger::store;
use readside_common::count;
use sqlx::PgPool;

async fn partitions(pool: &PgPool, schema: &str, parent: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT child.relname::text FROM pg_inherits
         JOIN pg_class child ON child.oid = pg_inherits.inhrelid
         JOIN pg_class parent ON parent.oid = pg_inherits.inhparent
         JOIN pg_namespace ns ON ns.oid = parent.relnamespace
         WHERE ns.nspname = $1 AND parent.relname = $2 ORDER BY 1",
    )
    .bind(schema)
    .bind(parent)
    .fetch_all(pool)
    .await
    .expect("partitions")
}

/// The partition name of the month `months_ago` before the current UTC month.
async fn month_name(pool: &PgPool, parent: &str, months_ago: i32) -> String {
    sqlx::query_scalar(
        "SELECT $1 || '_' || to_char(date_trunc('month', now() AT TIME ZONE 'UTC') - make_interval(months => $2), 'YYYY_MM')",
    )
    .bind(parent)
    .bind(months_ago)
    .fetch_one(pool)
    .await
    .expect("name")
}

/// Inserts an audit row on the second day of the month `months_ago` before the current one.
async fn audit_row_in(pool: &PgPool, months_ago: i32) {
    sqlx::query(
        "INSERT INTO audit.audit_log (created_at, event_type, entity_type, entity_id)
         VALUES ((date_trunc('month', now() AT TIME ZONE 'UTC') - make_interval(months => $1) + interval '1 day')
                     AT TIME ZONE 'UTC',
                 'test.old', 'test', $1::text)",
    )
    .bind(months_ago)
    .execute(pool)
    .await
    .expect("insert an old row");
}

#[sqlx::test]
async fn partitions_exist_ahead_and_rows_land_in_their_month(pool: PgPool) {
    let options = (*pool.connect_options()).clone();
    store::prepare(&options).await.expect("prepare");
    for parent in ["audit_log", "data_access_log"] {
        let existing = partitions(&pool, "audit", parent).await;
        for months_ahead in 0..=3 {
            let name = month_name(&pool, parent, -months_ahead).await;
            assert!(existing.contains(&name), "{name} missing from {existing:?}");
        }
    }
    // Maintenance again creates nothing new.
    let before = partitions(&pool, "audit", "audit_log").await;
    store::prepare(&options).await.expect("prepare again");
    assert_eq!(partitions(&pool, "audit", "audit_log").await, before);

    for months_ahead in [0, 1, 3] {
        audit_row_in(&pool, -months_ahead).await;
        let landed: String =
            sqlx::query_scalar("SELECT tableoid::regclass::text FROM audit.audit_log WHERE entity_id = $1::text")
                .bind(-months_ahead)
                .fetch_one(&pool)
                .await
                .expect("the row");
        assert_eq!(landed, format!("audit.{}", month_name(&pool, "audit_log", -months_ahead).await));
    }
    sqlx::query("INSERT INTO audit.data_access_log (entity_type, fields, reason) VALUES ('user', '{email}', 'test')")
        .execute(&pool)
        .await
        .expect("insert");
    let landed: String = sqlx::query_scalar("SELECT tableoid::regclass::text FROM audit.data_access_log")
        .fetch_one(&pool)
        .await
        .expect("the row");
    assert_eq!(landed, format!("audit.{}", month_name(&pool, "data_access_log", 0).await));
}

#[sqlx::test]
async fn retention_archives_and_drops_exactly_the_old_months(pool: PgPool) {
    let options = (*pool.connect_options()).clone();
    store::prepare(&options).await.expect("prepare");
    // Partitions for the last 100 months, as if the ledger had run that long.
    sqlx::query("SELECT audit.ensure_monthly_partitions('audit_log', now() - interval '100 months', 100)")
        .execute(&pool)
        .await
        .expect("old partitions");
    for months_ago in [100, 86, 85, 84, 20, 14, 13, 1, 0] {
        audit_row_in(&pool, months_ago).await;
    }

    let mut conn = pool.acquire().await.expect("connection");
    let report = retention::apply(&mut conn, chrono::Utc::now()).await.expect("retention");
    // Months 14..=100 ago end more than 13 months ago: archived (87); of those, 85..=100 ago end
    // more than 84 months (7 years) ago: dropped (16).
    assert_eq!(report, RetentionReport { archived: 87, dropped: 16 });

    let hot = partitions(&pool, "audit", "audit_log").await;
    assert_eq!(hot.len(), 14 + 3, "months 0..=13 ago and 3 ahead stay hot: {hot:?}");
    assert!(hot.contains(&month_name(&pool, "audit_log", 13).await));
    assert!(!hot.contains(&month_name(&pool, "audit_log", 14).await));
    let archived = partitions(&pool, "archive", "audit_log").await;
    assert_eq!(archived.len(), 71, "months 14..=84 ago are archived");
    assert!(archived.contains(&month_name(&pool, "audit_log", 84).await));
    assert!(!archived.contains(&month_name(&pool, "audit_log", 85).await));

    let hot_rows: Vec<String> = sqlx::query_scalar("SELECT entity_id FROM audit.audit_log ORDER BY entity_id::int")
        .fetch_all(&pool)
        .await
        .expect("hot");
    assert_eq!(hot_rows, ["0", "1", "13"]);
    let archived_rows: Vec<String> =
        sqlx::query_scalar("SELECT entity_id FROM archive.audit_log ORDER BY entity_id::int")
            .fetch_all(&pool)
            .await
            .expect("the archive stays queryable");
    assert_eq!(archived_rows, ["14", "20", "84"]);
    // The trail compliance queries reads the archive too (until session 22 archived rows vanished
    // from it after 13 months).
    let trail_rows: Vec<String> =
        sqlx::query_scalar("SELECT entity_id FROM audit.trail WHERE event_type = 'test.old' ORDER BY entity_id::int")
            .fetch_all(&pool)
            .await
            .expect("the trail");
    assert_eq!(trail_rows, ["0", "1", "13", "14", "20", "84"]);
    assert_eq!(
        count(&pool, "SELECT count(*) FROM pg_class WHERE relname LIKE 'audit_log_%' AND relkind = 'r'").await,
        17 + 71
    );

    // The archive is append-only too, and archived months are not recreated in the hot table.
    let error = sqlx::query("DELETE FROM archive.audit_log").execute(&pool).await.expect_err("append-only");
    assert!(error.to_string().contains("append-only"), "{error}");
    let recreated: i32 =
        sqlx::query_scalar("SELECT audit.ensure_monthly_partitions('audit_log', now() - interval '20 months', 3)")
            .fetch_one(&pool)
            .await
            .expect("ensure");
    assert_eq!(recreated, 0);
    // A second run has nothing left to do.
    assert_eq!(retention::apply(&mut conn, chrono::Utc::now()).await.expect("again"), RetentionReport::default());
}
