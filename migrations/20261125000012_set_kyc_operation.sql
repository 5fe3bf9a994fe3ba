-- The Directory's SetKyc feeds the ledger's compliance gate through a new engine operation,
-- `set_kyc` (KYC status and risk level, keeping the user's per-transaction limit). Its journal
-- records are audited like `set_compliance`: entity type `user`, entity id the user.
CREATE OR REPLACE FUNCTION audit.operation_entity_id(operation json) RETURNS text
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
        WHEN 'set_kyc' THEN operation -> 'data' ->> 'user_id'
        WHEN 'linked_batch' THEN audit.operation_entity_id(operation -> 'data' -> 'operations' -> 0)
        ELSE audit.user_account_id(operation -> 'data' -> 'account')
    END
$$;

CREATE OR REPLACE FUNCTION audit.operation_entity_type(operation json) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE operation ->> 'op'
        WHEN 'commit' THEN 'reservation'
        WHEN 'release' THEN 'reservation'
        WHEN 'initiate_transaction' THEN 'transaction'
        WHEN 'transition_transaction' THEN 'transaction'
        WHEN 'set_compliance' THEN 'user'
        WHEN 'set_kyc' THEN 'user'
        WHEN 'linked_batch' THEN 'linked_batch'
        ELSE 'ledger_account'
    END
$$;
