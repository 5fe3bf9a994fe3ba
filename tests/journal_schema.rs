//! The schema's own guarantees: the journal is append-only, and its monthly partitions are
//! created ahead across year boundaries.

mod journal_common;

use journal_common::*;
use sqlx::PgPool;

#[sqlx::test]
async fn the_journal_refuses_updates_deletes_and_truncation(pool: PgPool) {
    let options = prepared(&pool).await;
    let ledger = diboas_ledger::ledger::Ledger::open(config(options)).await.unwrap();
    let alice = account(1, diboas_ledger::engine::account::Domain::Banking, diboas_ledger::engine::asset::Asset::USD);
    ledger.submit(request("open", now_ms(), open(alice))).await.unwrap();
    ledger.shutdown().await.unwrap();
    for statement in ["UPDATE ledger.journal SET at_ms = 0", "DELETE FROM ledger.journal", "TRUNCATE ledger.journal"] {
        let error = sqlx::raw_sql(statement).execute(&pool).await.unwrap_err();
        assert!(error.to_string().contains("append-only"), "{statement}: {error}");
    }
    let (rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM ledger.journal").fetch_one(&pool).await.unwrap();
    assert_eq!(rows, 1);
}

#[sqlx::test]
async fn partitions_are_created_ahead_across_a_year_boundary(pool: PgPool) {
    prepared(&pool).await;
    let (created,): (i32,) = sqlx::query_as("SELECT ledger.ensure_journal_partitions('2030-11-20 23:59:59+00', 3)")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(created, 4);
    let (again,): (i32,) = sqlx::query_as("SELECT ledger.ensure_journal_partitions('2030-11-01 00:00:00+00', 3)")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(again, 0, "existing partitions are left alone");
    let names: Vec<(String,)> = sqlx::query_as(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'ledger.journal'::regclass AND c.relname >= 'journal_2030' ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let names: Vec<&str> = names.iter().map(|(name,)| name.as_str()).collect();
    assert_eq!(names, ["journal_2030_11", "journal_2030_12", "journal_2031_01", "journal_2031_02"]);
    // A row at the very end of December lands in December's partition, whatever the session's time zone.
    sqlx::raw_sql(
        "SET TIME ZONE 'Pacific/Auckland';
         INSERT INTO ledger.journal (sequence, created_at, at_ms, kind, record)
         VALUES (1, '2030-12-31 23:59:59.999+00', 0, 'expiry_sweep', '{}')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let (partition,): (String,) =
        sqlx::query_as("SELECT tableoid::regclass::text FROM ledger.journal").fetch_one(&pool).await.unwrap();
    assert_eq!(partition, "ledger.journal_2030_12");
}

/// Idempotency keys live in daily partitions: maintenance creates the next days and drops the
/// days past the kept window whole (no DELETE load on the writer).
#[sqlx::test]
async fn idempotency_key_partitions_are_created_ahead_and_dropped_after_the_kept_days(pool: PgPool) {
    prepared(&pool).await;
    let partitions = || async {
        let names: Vec<(String,)> = sqlx::query_as(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'ledger.idempotency_keys'::regclass AND c.relname >= 'idempotency_keys_2030' ORDER BY 1",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        names.into_iter().map(|(name,)| name).collect::<Vec<_>>()
    };
    sqlx::query("SELECT ledger.ensure_idempotency_key_partitions('2030-12-30 12:00:00+00', 3, NULL)")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(
        partitions().await,
        [
            "idempotency_keys_2030_12_30",
            "idempotency_keys_2030_12_31",
            "idempotency_keys_2031_01_01",
            "idempotency_keys_2031_01_02"
        ]
    );
    sqlx::query(
        "INSERT INTO ledger.idempotency_keys (key, sequence, recorded_at_ms, created_at)
         VALUES ('old', 1, 0, '2030-12-30 08:00:00+00'), ('newer', 2, 0, '2031-01-02 08:00:00+00')",
    )
    .execute(&pool)
    .await
    .unwrap();
    // Keeping 2 days before 2031-01-03: the 30th and 31st of December are dropped with their keys.
    sqlx::query("SELECT ledger.ensure_idempotency_key_partitions('2031-01-03 12:00:00+00', 1, 2)")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(
        partitions().await,
        [
            "idempotency_keys_2031_01_01",
            "idempotency_keys_2031_01_02",
            "idempotency_keys_2031_01_03",
            "idempotency_keys_2031_01_04"
        ]
    );
    let keys: Vec<(String,)> = sqlx::query_as("SELECT key FROM ledger.idempotency_keys WHERE recorded_at_ms = 0")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(keys, [("newer".to_owned(),)]);
}

/// Partition maintenance never makes the writer wait on a long reader: when it cannot lock an
/// old partition quickly it changes nothing and says so, and succeeds once the reader is gone.
#[sqlx::test]
async fn partition_maintenance_gives_way_to_a_long_reader_and_succeeds_later(pool: PgPool) {
    prepared(&pool).await;
    sqlx::raw_sql(
        "CREATE TABLE ledger.idempotency_keys_2020_01_01 PARTITION OF ledger.idempotency_keys
         FOR VALUES FROM ('2020-01-01 00:00:00+00') TO ('2020-01-02 00:00:00+00')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let mut reader = pool.begin().await.unwrap();
    sqlx::query("SELECT count(*) FROM ledger.idempotency_keys").execute(&mut *reader).await.unwrap();

    let mut writer = pool.acquire().await.unwrap();
    assert!(!diboas_ledger::store::maintain_partitions(&mut writer, 3).await.unwrap(), "gave way to the reader");
    let exists = |pool: PgPool| async move {
        let (found,): (Option<String>,) =
            sqlx::query_as("SELECT to_regclass('ledger.idempotency_keys_2020_01_01')::text")
                .fetch_one(&pool)
                .await
                .unwrap();
        found.is_some()
    };
    assert!(exists(pool.clone()).await, "nothing changed");

    reader.commit().await.unwrap();
    assert!(diboas_ledger::store::maintain_partitions(&mut writer, 3).await.unwrap());
    assert!(!exists(pool.clone()).await, "the old day was dropped");
}

/// The writer updates balances by primary-key probes, not by reading the whole table: a batch's
/// cost must grow with the batch, not with the number of accounts. Three thousand accounts get a
/// deposit each, in batches of many records; afterwards PostgreSQL's own counters must show
/// about the start-up load's full reads of `ledger.balances`, not one per batch.
#[sqlx::test]
async fn the_writer_updates_balances_by_index_not_by_reading_the_whole_table(pool: PgPool) {
    use diboas_ledger::engine::account::Domain;
    use diboas_ledger::engine::asset::Asset;
    use futures_util::future::join_all;

    const ACCOUNTS: u128 = 3_000;
    let options = prepared(&pool).await;
    let mut config = config(options);
    // Batches of a size where PostgreSQL's cost model prefers a full scan plus a hash join.
    config.journal.max_batch_records = 100;
    let ledger = diboas_ledger::ledger::Ledger::open(config).await.unwrap();
    let now = now_ms();
    let opens = (0..ACCOUNTS)
        .map(|n| ledger.submit(request(&format!("open-{n}"), now, open(account(n, Domain::Banking, Asset::USD)))));
    for outcome in join_all(opens).await {
        outcome.unwrap().result.unwrap();
    }
    let deposits = (0..ACCOUNTS).map(|n| {
        ledger.submit(request(&format!("deposit-{n}"), now, deposit(account(n, Domain::Banking, Asset::USD), 100)))
    });
    for outcome in join_all(deposits).await {
        outcome.unwrap().result.unwrap();
    }
    let batches: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT created_at) FROM ledger.journal").fetch_one(&pool).await.unwrap();
    ledger.shutdown().await.unwrap();

    // A backend reports its table counters when it exits; wait for the writer's to arrive.
    let mut counters = (0_i64, 0_i64);
    for _ in 0..100 {
        sqlx::query("SELECT pg_stat_clear_snapshot()").execute(&pool).await.unwrap();
        counters = sqlx::query_as(
            "SELECT n_tup_upd, seq_tup_read FROM pg_stat_user_tables WHERE relid = 'ledger.balances'::regclass",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if counters.0 >= ACCOUNTS as i64 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (updated, read_by_scans) = counters;
    assert!(updated >= ACCOUNTS as i64, "the deposits' updates never showed in the counters: {counters:?}");
    assert!(batches > 3, "the deposits shared too few batches ({batches}) to tell scans apart");
    assert!(
        read_by_scans < 3 * ACCOUNTS as i64,
        "{read_by_scans} balance rows read by full scans for {batches} batches: the writer scans the table"
    );
}
