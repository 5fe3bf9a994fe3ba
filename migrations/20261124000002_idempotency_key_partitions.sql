-- Idempotency keys partitioned by UTC day of insertion, so keys past the retention window are
-- dropped a whole day at a time (no DELETE load on the writer), and a key the engine forgot and
-- then saw again is a new row (its key and insertion time differ) rather than a conflict that
-- would fail the batch.
DROP VIEW ledger.idempotency_outcomes;
ALTER TABLE ledger.idempotency_keys RENAME TO idempotency_keys_unpartitioned;

CREATE TABLE ledger.idempotency_keys (
    key text NOT NULL,
    sequence bigint NOT NULL,
    recorded_at_ms bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (key, created_at)
) PARTITION BY RANGE (created_at);

-- Creates the daily partitions from `from_time`'s UTC day to `days_ahead` days later, and, with
-- `keep_days`, drops the partitions of days before the `keep_days` days that precede it.
CREATE FUNCTION ledger.ensure_idempotency_key_partitions(from_time timestamptz, days_ahead integer, keep_days integer)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    today date := (from_time AT TIME ZONE 'UTC')::date;
    day date;
    partition_name text;
    changed integer := 0;
BEGIN
    FOR step IN 0..days_ahead LOOP
        day := today + step;
        partition_name := 'idempotency_keys_' || to_char(day, 'YYYY_MM_DD');
        IF to_regclass('ledger.' || partition_name) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE ledger.%I PARTITION OF ledger.idempotency_keys FOR VALUES FROM (%L) TO (%L)',
                partition_name,
                day::timestamp AT TIME ZONE 'UTC',
                (day + 1)::timestamp AT TIME ZONE 'UTC');
            changed := changed + 1;
        END IF;
    END LOOP;
    IF keep_days IS NOT NULL THEN
        FOR partition_name IN
            SELECT child.relname
            FROM pg_inherits
            JOIN pg_class child ON child.oid = pg_inherits.inhrelid
            JOIN pg_class parent ON parent.oid = pg_inherits.inhparent
            JOIN pg_namespace ns ON ns.oid = parent.relnamespace
            WHERE ns.nspname = 'ledger' AND parent.relname = 'idempotency_keys'
              AND child.relname ~ '^idempotency_keys_\d{4}_\d{2}_\d{2}$'
              AND to_date(substring(child.relname FROM 18), 'YYYY_MM_DD') < today - keep_days
        LOOP
            EXECUTE format('DROP TABLE ledger.%I', partition_name);
            changed := changed + 1;
        END LOOP;
    END IF;
    RETURN changed;
END
$$;

SELECT ledger.ensure_idempotency_key_partitions(now(), 3, NULL);

INSERT INTO ledger.idempotency_keys (key, sequence, recorded_at_ms)
    SELECT key, sequence, recorded_at_ms FROM ledger.idempotency_keys_unpartitioned;
DROP TABLE ledger.idempotency_keys_unpartitioned;

-- The keys with their stored operation and outcome, for SQL users.
CREATE VIEW ledger.idempotency_outcomes AS
    SELECT k.key, k.sequence, k.recorded_at_ms, j.created_at,
           j.record -> 'origin' -> 'data' -> 'operation' AS operation,
           j.record -> 'origin' -> 'data' -> 'outcome' AS outcome
    FROM ledger.idempotency_keys k JOIN ledger.journal j ON j.sequence = k.sequence;
