-- The operation summary was a materialized view over the whole journal, refreshed every 60 s by
-- `serve`: each refresh re-read and re-parsed every record, 52 s a refresh at a million records
-- (docs/BENCHMARKS.md, "Session 17"), so it soon ran back to back and would later never finish.
-- It is now a table of running totals: each refresh counts only the records committed since the
-- last one, a bounded step at a time (`ledger.count_operations`). `ledger.operation_summary`
-- keeps its name and columns, as a view over the totals.
DROP MATERIALIZED VIEW ledger.operation_summary;

-- Per user, domain, asset, operation and outcome: how many money requests the journal holds,
-- the amounts they asked for and the commissions they paid (minor units of the asset). Operations
-- that name a user but no account (commit, release, transaction transitions, set_compliance,
-- set_kyc) count with domain and asset ''. Linked batches and transfers from system accounts
-- name no single user account and are not counted.
CREATE TABLE ledger.operation_totals (
    user_id uuid NOT NULL,
    domain text NOT NULL,
    asset text NOT NULL,
    operation text NOT NULL,
    outcome text NOT NULL CHECK (outcome IN ('ok', 'refused')),
    operations bigint NOT NULL,
    amount_minor numeric NOT NULL,
    fees_minor numeric NOT NULL,
    PRIMARY KEY (user_id, domain, asset, operation, outcome)
);

-- The last journal sequence counted into ledger.operation_totals (one row).
CREATE TABLE ledger.operation_totals_cursor (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    counted_through bigint NOT NULL CHECK (counted_through >= 0)
);
INSERT INTO ledger.operation_totals_cursor (counted_through) VALUES (0);

-- Counts the next committed journal records, at most `max_records` of them, into the totals and
-- moves the cursor past them, in the caller's transaction; returns the sequence the totals now
-- count through (the checkpoint's, once caught up). The cursor row is locked first, so two callers take turns rather than count a
-- record twice. Only committed records are counted: the writer moves the checkpoint in the
-- transaction that appends the records, so every sequence up to it is visible here.
CREATE FUNCTION ledger.count_operations(max_records bigint) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    since bigint;
    through bigint;
BEGIN
    IF max_records IS NULL OR max_records < 1 THEN
        RAISE EXCEPTION 'max_records must be at least 1, not %', max_records;
    END IF;
    SELECT counted_through INTO since FROM ledger.operation_totals_cursor FOR UPDATE;
    -- The cursor never passes the checkpoint, so `committed_sequence - since` cannot be negative,
    -- and this sum cannot overflow whatever `max_records` is.
    SELECT since + LEAST(max_records, committed_sequence - since) INTO through FROM ledger.checkpoint;
    IF through <= since THEN
        RETURN since;
    END IF;
    INSERT INTO ledger.operation_totals AS totals
        (user_id, domain, asset, operation, outcome, operations, amount_minor, fees_minor)
    -- MATERIALIZED: converted once a record; inlined, every expression below converted the
    -- record to jsonb again (2.5 times slower at 20 000 records).
    WITH requests AS MATERIALIZED (
        SELECT record::jsonb -> 'origin' -> 'data' AS data
        FROM ledger.journal
        WHERE kind = 'request' AND sequence > since AND sequence <= through
    ), operations AS (
        SELECT data -> 'operation' ->> 'op' AS operation,
               COALESCE(data -> 'operation' -> 'data' -> 'account',
                        data -> 'operation' -> 'data' -> 'from' -> 'user',
                        data -> 'operation' -> 'data' -> 'from') AS account,
               (data -> 'operation' -> 'data' ->> 'user_id')::uuid AS reservation_user_id,
               (data -> 'operation' -> 'data' ->> 'amount')::numeric AS amount_minor,
               CASE WHEN data -> 'outcome' ? 'Ok' THEN 'ok' ELSE 'refused' END AS outcome,
               (data -> 'outcome' -> 'Ok' -> 'data' ->> 'commission_minor')::numeric AS fee_minor
        FROM requests
    )
    SELECT COALESCE((account ->> 'user_id')::uuid, reservation_user_id),
           COALESCE(account ->> 'domain', ''),
           COALESCE(account ->> 'asset', ''),
           operation,
           outcome,
           count(*),
           COALESCE(sum(amount_minor), 0),
           COALESCE(sum(fee_minor), 0)
    FROM operations
    WHERE COALESCE((account ->> 'user_id')::uuid, reservation_user_id) IS NOT NULL
    GROUP BY 1, 2, 3, 4, 5
    ON CONFLICT (user_id, domain, asset, operation, outcome) DO UPDATE SET
        operations = totals.operations + EXCLUDED.operations,
        amount_minor = totals.amount_minor + EXCLUDED.amount_minor,
        fees_minor = totals.fees_minor + EXCLUDED.fees_minor;
    UPDATE ledger.operation_totals_cursor SET counted_through = through;
    RETURN through;
END
$$;

CREATE VIEW ledger.operation_summary AS
    SELECT user_id, domain, asset, operation, outcome, operations, amount_minor, fees_minor
    FROM ledger.operation_totals;
