-- A reservation id reused after the retention window.
--
-- The engine accepts a reservation id again once it has forgotten the first reservation with
-- it (closed more than a retention window before, docs/ENGINE.md), but `ledger.write_batch`
-- inserted the new reservation under the same primary key as the old, closed row: the batch
-- failed, the writer stopped, every request in the batch was refused, and the retry failed the
-- same way (found in session 16; test `a_reservation_id_reused_after_retention_is_journaled`).
-- The projection now keeps the latest use of an id; the journal keeps every use.
--
-- The function is replaced whole (a migration cannot edit a function in place); only the
-- reservations' insert differs from 20261125000015_write_batch_function.sql.
CREATE OR REPLACE FUNCTION ledger.write_batch(
    from_sequence bigint,
    to_sequence bigint,
    -- journal rows
    j_sequence bigint[], j_at_ms bigint[], j_kind text[], j_key text[], j_record text[],
    -- accounts opened (each with a zero balance row)
    ao_user uuid[], ao_domain text[], ao_asset text[], ao_overdraft numeric[], ao_limit_per_transaction numeric[],
    ao_limit_daily numeric[], ao_limit_monthly numeric[], ao_frozen boolean[], ao_zero numeric[],
    ao_sequence bigint[],
    -- account settings changed (NULL: unchanged)
    au_user uuid[], au_domain text[], au_asset text[], au_frozen boolean[], au_usage_day bigint[],
    au_usage_day_used numeric[], au_usage_month bigint[], au_usage_month_used numeric[], au_sequence bigint[],
    -- reservations opened
    ro_user uuid[], ro_id uuid[], ro_domain text[], ro_asset text[], ro_amount numeric[], ro_created_at_ms bigint[],
    ro_expires_at_ms bigint[], ro_sequence bigint[],
    -- balance deltas, coalesced per account
    bd_user uuid[], bd_domain text[], bd_asset text[], bd_available numeric[], bd_reserved numeric[],
    bd_sequence bigint[],
    -- reservations closed
    rc_user uuid[], rc_id uuid[], rc_status text[], rc_closed_at_ms bigint[], rc_sequence bigint[],
    -- system account deltas, coalesced per account
    sd_kind text[], sd_asset text[], sd_delta numeric[], sd_sequence bigint[],
    -- idempotency keys
    k_key text[], k_sequence bigint[], k_recorded_at_ms bigint[],
    -- outbox events, in journal order
    e_id uuid[], e_sequence bigint[], e_ordinal integer[], e_aggregate_type text[], e_aggregate_id text[],
    e_event_type text[], e_version smallint, e_payload text[], e_metadata text[]
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    changed bigint;
BEGIN
    IF cardinality(j_sequence) > 0 THEN
        INSERT INTO ledger.journal (sequence, at_ms, kind, idempotency_key, record)
        SELECT s, a, k, i, r::json FROM UNNEST(j_sequence, j_at_ms, j_kind, j_key, j_record) AS t(s, a, k, i, r);
    END IF;

    IF cardinality(ao_user) > 0 THEN
        INSERT INTO ledger.accounts (user_id, domain, asset, overdraft, limit_per_transaction, limit_daily,
            limit_monthly, frozen, usage_day, usage_day_used, usage_month, usage_month_used, opened_sequence,
            updated_sequence)
        SELECT u, d, a, o, lp, ld, lm, f, 0, z, 0, z, s, s
        FROM UNNEST(ao_user, ao_domain, ao_asset, ao_overdraft, ao_limit_per_transaction, ao_limit_daily,
            ao_limit_monthly, ao_frozen, ao_zero, ao_sequence) AS t(u, d, a, o, lp, ld, lm, f, z, s);
        INSERT INTO ledger.balances (user_id, domain, asset, available, reserved, last_sequence)
        SELECT u, d, a, z, z, s FROM UNNEST(ao_user, ao_domain, ao_asset, ao_zero, ao_sequence) AS t(u, d, a, z, s);
    END IF;

    IF cardinality(au_user) > 0 THEN
        UPDATE ledger.accounts AS acc SET frozen = COALESCE(t.f, acc.frozen),
            usage_day = COALESCE(t.ud, acc.usage_day), usage_day_used = COALESCE(t.udu, acc.usage_day_used),
            usage_month = COALESCE(t.um, acc.usage_month),
            usage_month_used = COALESCE(t.umu, acc.usage_month_used), updated_sequence = t.s
        FROM UNNEST(au_user, au_domain, au_asset, au_frozen, au_usage_day, au_usage_day_used, au_usage_month,
            au_usage_month_used, au_sequence) AS t(u, d, a, f, ud, udu, um, umu, s)
        WHERE acc.user_id = t.u AND acc.domain = t.d AND acc.asset = t.a;
        GET DIAGNOSTICS changed = ROW_COUNT;
        PERFORM ledger.expect_rows('account settings', changed, cardinality(au_user));
    END IF;

    -- An id the engine forgot (closed more than a retention window ago) may be opened again:
    -- its row then describes the new reservation. An id whose row is still active is never
    -- opened again by the engine, so it changes no row and the count check refuses the batch.
    IF cardinality(ro_id) > 0 THEN
        INSERT INTO ledger.reservations AS res (user_id, reservation_id, domain, asset, amount, created_at_ms,
            expires_at_ms, status, opened_sequence)
        SELECT u, r, d, a, m, c, e, 'active', s
        FROM UNNEST(ro_user, ro_id, ro_domain, ro_asset, ro_amount, ro_created_at_ms, ro_expires_at_ms, ro_sequence)
            AS t(u, r, d, a, m, c, e, s)
        ON CONFLICT (user_id, reservation_id) DO UPDATE
            SET domain = EXCLUDED.domain, asset = EXCLUDED.asset, amount = EXCLUDED.amount,
                created_at_ms = EXCLUDED.created_at_ms, expires_at_ms = EXCLUDED.expires_at_ms, status = 'active',
                closed_at_ms = NULL, opened_sequence = EXCLUDED.opened_sequence, closed_sequence = NULL
            WHERE res.status <> 'active';
        GET DIAGNOSTICS changed = ROW_COUNT;
        PERFORM ledger.expect_rows('reservations opened', changed, cardinality(ro_id));
    END IF;

    IF cardinality(bd_user) > 0 THEN
        UPDATE ledger.balances AS b SET available = b.available + t.da, reserved = b.reserved + t.dr,
            last_sequence = t.s
        FROM UNNEST(bd_user, bd_domain, bd_asset, bd_available, bd_reserved, bd_sequence) AS t(u, d, a, da, dr, s)
        WHERE b.user_id = t.u AND b.domain = t.d AND b.asset = t.a;
        GET DIAGNOSTICS changed = ROW_COUNT;
        PERFORM ledger.expect_rows('balances', changed, cardinality(bd_user));
    END IF;

    -- After the deltas, so a reservation opened and closed in one batch never makes `reserved`
    -- negative, even for a moment.
    IF cardinality(rc_id) > 0 THEN
        WITH closed AS (
            UPDATE ledger.reservations AS res SET status = t.st, closed_at_ms = t.c, closed_sequence = t.s
            FROM UNNEST(rc_user, rc_id, rc_status, rc_closed_at_ms, rc_sequence) AS t(u, r, st, c, s)
            WHERE res.user_id = t.u AND res.reservation_id = t.r AND res.status = 'active'
            RETURNING res.user_id, res.domain, res.asset, res.amount, t.s
        ), per_account AS (
            SELECT user_id, domain, asset, sum(amount) AS amount, max(s) AS s, count(*) AS n
            FROM closed GROUP BY user_id, domain, asset
        ), shifted AS (
            UPDATE ledger.balances AS b SET available = b.available + p.amount, reserved = b.reserved - p.amount,
                last_sequence = GREATEST(b.last_sequence, p.s)
            FROM per_account p WHERE b.user_id = p.user_id AND b.domain = p.domain AND b.asset = p.asset
            RETURNING p.n
        )
        SELECT COALESCE(sum(n), 0) INTO changed FROM shifted;
        PERFORM ledger.expect_rows('reservation closes', changed, cardinality(rc_id));
    END IF;

    IF cardinality(sd_kind) > 0 THEN
        INSERT INTO ledger.system_balances (kind, asset, balance, last_sequence)
        SELECT k, a, d, s FROM UNNEST(sd_kind, sd_asset, sd_delta, sd_sequence) AS t(k, a, d, s)
        ON CONFLICT (kind, asset) DO UPDATE
            SET balance = ledger.system_balances.balance + EXCLUDED.balance, last_sequence = EXCLUDED.last_sequence;
    END IF;

    IF cardinality(k_key) > 0 THEN
        INSERT INTO ledger.idempotency_keys (key, sequence, recorded_at_ms)
        SELECT * FROM UNNEST(k_key, k_sequence, k_recorded_at_ms);
    END IF;

    -- Ordered by array index, so the identity `position` follows journal order.
    IF cardinality(e_id) > 0 THEN
        INSERT INTO ledger.outbox_events (event_id, sequence, ordinal, aggregate_type, aggregate_id, event_type,
            version, payload, metadata)
        SELECT e, s, o, at, ai, et, e_version, p::json, m::json
        FROM UNNEST(e_id, e_sequence, e_ordinal, e_aggregate_type, e_aggregate_id, e_event_type, e_payload,
            e_metadata) WITH ORDINALITY AS t(e, s, o, at, ai, et, p, m, n)
        ORDER BY n;
        GET DIAGNOSTICS changed = ROW_COUNT;
        PERFORM ledger.expect_rows('outbox', changed, cardinality(e_id));
    END IF;

    UPDATE ledger.checkpoint SET committed_sequence = to_sequence, committed_at = now()
    WHERE committed_sequence = from_sequence;
    GET DIAGNOSTICS changed = ROW_COUNT;
    IF changed <> 1 THEN
        RAISE EXCEPTION USING ERRCODE = 'DL001',
            MESSAGE = format('the checkpoint is no longer at %s: another writer appended to this database', from_sequence);
    END IF;
END
$$;
