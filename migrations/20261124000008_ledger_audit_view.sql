-- The ledger's money requests are audited by the journal itself.
--
-- Every request's journal record already holds what an audit row needs: the operation, its
-- outcome, the exact effects (the state change), the correlation id, the calling service, the
-- peer address and the user agent, in an append-only table partitioned by month and kept for good.
-- Writing a second copy into audit.audit_log with every journal batch cost several times the
-- journal rows themselves (docs/BENCHMARKS.md), so the money path's audit rows are a view over the
-- journal instead, and audit.trail is the one place to query both kinds.

-- `user_id/domain/asset` of a user account (as JSON from the journal).
CREATE FUNCTION audit.user_account_id(account json) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT (account ->> 'user_id') || '/' || (account ->> 'domain') || '/' || (account ->> 'asset')
$$;

-- A user account's id, or `system/kind[:of]/asset` for a system account.
CREATE FUNCTION audit.account_ref_id(account json) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN account -> 'user' IS NOT NULL THEN audit.user_account_id(account -> 'user')
        ELSE 'system/' || (account -> 'system' -> 'kind' ->> 'kind')
             || coalesce(':' || (account -> 'system' -> 'kind' ->> 'of'), '')
             || '/' || (account -> 'system' ->> 'asset')
    END
$$;

-- The entity an operation acts on: a linked batch is named by its first member.
CREATE FUNCTION audit.operation_entity_id(operation json) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE operation ->> 'op'
        WHEN 'commit' THEN (operation -> 'data' ->> 'user_id') || '/' || (operation -> 'data' ->> 'reservation_id')
        WHEN 'release' THEN (operation -> 'data' ->> 'user_id') || '/' || (operation -> 'data' ->> 'reservation_id')
        WHEN 'transfer' THEN audit.account_ref_id(operation -> 'data' -> 'from')
        WHEN 'convert' THEN audit.user_account_id(operation -> 'data' -> 'from')
        WHEN 'initiate_transaction' THEN
            (operation -> 'data' -> 'transaction' ->> 'user_id') || '/' || (operation -> 'data' -> 'transaction' ->> 'id')
        WHEN 'transition_transaction' THEN
            (operation -> 'data' ->> 'user_id') || '/' || (operation -> 'data' ->> 'transaction_id')
        WHEN 'set_compliance' THEN operation -> 'data' ->> 'user_id'
        WHEN 'linked_batch' THEN audit.operation_entity_id(operation -> 'data' -> 'operations' -> 0)
        ELSE audit.user_account_id(operation -> 'data' -> 'account')
    END
$$;

CREATE FUNCTION audit.operation_entity_type(operation json) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE operation ->> 'op'
        WHEN 'commit' THEN 'reservation'
        WHEN 'release' THEN 'reservation'
        WHEN 'initiate_transaction' THEN 'transaction'
        WHEN 'transition_transaction' THEN 'transaction'
        WHEN 'set_compliance' THEN 'user'
        WHEN 'linked_batch' THEN 'linked_batch'
        ELSE 'ledger_account'
    END
$$;

-- One row per request record of the journal, in the audit log's shape. The peer's port is
-- dropped (IPv6 brackets too) so ip_address compares with the directory's rows.
CREATE VIEW audit.ledger_requests AS
SELECT
    md5('journal:' || j.sequence)::uuid AS event_id,
    j.created_at,
    'ledger.' || (j.record -> 'origin' -> 'data' -> 'operation' ->> 'op') AS event_type,
    audit.operation_entity_type(j.record -> 'origin' -> 'data' -> 'operation') AS entity_type,
    audit.operation_entity_id(j.record -> 'origin' -> 'data' -> 'operation') AS entity_id,
    NULL::jsonb AS before_state,
    jsonb_build_object(
        'sequence', j.sequence,
        'outcome', (j.record -> 'origin' -> 'data' -> 'outcome')::jsonb,
        'effects', (j.record -> 'effects')::jsonb
    ) AS after_state,
    j.record -> 'origin' -> 'data' -> 'context' ->> 'caller' AS caller,
    regexp_replace(
        regexp_replace(j.record -> 'origin' -> 'data' -> 'context' ->> 'peer', ':[0-9]+$', ''),
        '^\[(.*)\]$', '\1'
    ) AS ip_address,
    j.record -> 'origin' -> 'data' -> 'context' ->> 'user_agent' AS user_agent,
    j.record -> 'origin' -> 'data' -> 'context' ->> 'correlation_id' AS correlation_id,
    j.sequence AS journal_sequence
FROM ledger.journal j
WHERE j.kind = 'request';

-- Every audited change: the directory's rows and the ledger's requests.
CREATE VIEW audit.trail AS
SELECT event_id, created_at, event_type, entity_type, entity_id, before_state, after_state,
       caller, ip_address, user_agent, correlation_id, journal_sequence
FROM audit.audit_log
UNION ALL
SELECT event_id, created_at, event_type, entity_type, entity_id, before_state, after_state,
       caller, ip_address, user_agent, correlation_id, journal_sequence
FROM audit.ledger_requests;
