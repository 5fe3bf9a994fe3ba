-- The indexes the architecture lists for transactions that issue 5's table did not have yet, for
-- the queries compliance and reconciliation staff run in SQL:
-- - composite (user_id, status, created_at): a user's transactions in one status, newest first
--   (created_at_ms, transaction_id: the order ListTransactions pages in);
-- - provider: a provider's transactions over time (reconciliation with a provider's reports).
-- A plain CREATE INDEX holds writes to the table while it builds. Migrations run before the
-- server serves, so that is only a pause at start-up; on a large table, build the indexes
-- CONCURRENTLY per partition by hand before deploying.
CREATE INDEX transactions_by_user_status ON ledger.transactions (user_id, status, created_at_ms DESC, transaction_id DESC);
CREATE INDEX transactions_by_provider ON ledger.transactions (provider, created_at) WHERE provider IS NOT NULL;
