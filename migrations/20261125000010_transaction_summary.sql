-- The transaction summary the architecture names ("counts, amounts, fees by user, category, type,
-- status") now reads issue 5's business transactions. The earlier journal-based summary keeps
-- its contents under the name that says what it counts: ledger operations (deposit, transfer,
-- ...) by outcome.
ALTER MATERIALIZED VIEW ledger.transaction_summary RENAME TO operation_summary;
ALTER INDEX ledger.transaction_summary_key RENAME TO operation_summary_key;

-- Per user, domain, type, status and asset: how many transactions, their principal and their
-- fees, in the transaction's asset (decimal units, as in ledger.transactions). The fees are the
-- priced fee total; the status says what became of them (posted when completed, released when
-- failed, reversed when compensated; see ledger.transaction_fees for the lines).
CREATE MATERIALIZED VIEW ledger.transaction_summary AS
    SELECT user_id, domain, type, status, asset,
           count(*)::bigint AS transactions,
           sum(principal) AS principal,
           sum(fee_total) AS fees,
           max(updated_at_ms) AS last_updated_at_ms
    FROM ledger.transactions
    GROUP BY user_id, domain, type, status, asset;
CREATE UNIQUE INDEX transaction_summary_key ON ledger.transaction_summary (user_id, domain, type, status, asset);
