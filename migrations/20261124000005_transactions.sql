-- Business transactions (issue 5): the transaction projection, its status history and fee lines,
-- the user compliance records the gate reads, fee schedules, and the provider inbox.
--
-- The engine holds unfinished transactions in memory; the journal writer writes these tables in
-- the same PostgreSQL transaction as the journal batch that changed them (src/journal/transactions.rs).
-- Fee schedules and the provider inbox are written by the Transactions API directly: they are
-- inputs to the engine, not engine state.

-- One row per transaction, partitioned by UTC month of the commit that created it (like the
-- journal: the request's own clock is not trusted for routing). The full description the engine
-- needs for recovery is kept in `spec` (the journaled NewTransaction).
CREATE TABLE ledger.transactions (
    transaction_id uuid NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    user_id uuid NOT NULL,
    domain text NOT NULL CHECK (domain IN ('banking', 'investing', 'defi')),
    type text NOT NULL CHECK (type IN ('add_money', 'send_money', 'withdraw', 'transfer', 'buy_crypto',
        'sell_crypto', 'convert', 'start_strategy', 'stop_strategy', 'harvest_yield')),
    status text NOT NULL CHECK (status IN ('initiated', 'validating', 'balance_reserved', 'sent_to_provider',
        'provider_processing', 'provider_confirming', 'completed', 'failed', 'compensating', 'compensated')),
    asset text NOT NULL REFERENCES ledger.assets (symbol),
    principal numeric NOT NULL CHECK (principal > 0),
    fee_total numeric NOT NULL CHECK (fee_total >= 0),
    provider text,
    details jsonb NOT NULL,
    spec json NOT NULL,
    aml_status text CHECK (aml_status IN ('cleared', 'review', 'rejected')),
    aml_risk_score smallint CHECK (aml_risk_score BETWEEN 0 AND 100),
    aml_flags text[],
    -- A trade's execution: price and quantity of the bought asset (minor units), when filled.
    fill_price numeric,
    fill_quantity_minor numeric,
    created_at_ms bigint NOT NULL,
    updated_at_ms bigint NOT NULL,
    created_sequence bigint NOT NULL,
    updated_sequence bigint NOT NULL,
    PRIMARY KEY (transaction_id, created_at)
) PARTITION BY RANGE (created_at);
CREATE INDEX transactions_by_user ON ledger.transactions (user_id, created_at_ms DESC, transaction_id DESC);
CREATE INDEX transactions_by_status ON ledger.transactions (status);
CREATE INDEX transactions_by_created_at ON ledger.transactions (created_at);
CREATE INDEX transactions_active ON ledger.transactions (user_id, updated_at_ms)
    WHERE status NOT IN ('completed', 'failed', 'compensated');

-- Creates the transaction partitions of the month holding from_time and the months_ahead after
-- it, if missing (called beside ledger.ensure_journal_partitions). Returns how many it created.
CREATE FUNCTION ledger.ensure_transaction_partitions(from_time timestamptz, months_ahead integer)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    month_start timestamp := date_trunc('month', from_time AT TIME ZONE 'UTC');
    partition_name text;
    created integer := 0;
BEGIN
    FOR step IN 0..months_ahead LOOP
        partition_name := 'transactions_' || to_char(month_start, 'YYYY_MM');
        IF to_regclass('ledger.' || partition_name) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE ledger.%I PARTITION OF ledger.transactions FOR VALUES FROM (%L) TO (%L)',
                partition_name,
                month_start AT TIME ZONE 'UTC',
                (month_start + interval '1 month') AT TIME ZONE 'UTC');
            created := created + 1;
        END IF;
        month_start := month_start + interval '1 month';
    END LOOP;
    RETURN created;
END
$$;
SELECT ledger.ensure_transaction_partitions(now(), 3);

-- Every status change, append-only. Polymorphic over the three domains: the domain and type
-- are columns, the domain-specific data (order, chain, yield) is in `metadata`.
CREATE TABLE ledger.transaction_status_history (
    transaction_id uuid NOT NULL,
    sequence bigint NOT NULL,
    user_id uuid NOT NULL,
    domain text NOT NULL,
    from_status text NOT NULL,
    to_status text NOT NULL,
    reason text NOT NULL,
    at_ms bigint NOT NULL,
    provider_source text,
    provider_event_id text,
    metadata jsonb NOT NULL,
    PRIMARY KEY (transaction_id, sequence)
);
CREATE INDEX transaction_status_history_by_provider_event
    ON ledger.transaction_status_history (provider_source, provider_event_id) WHERE provider_event_id IS NOT NULL;

-- A transaction's fee lines: priced at initiation (pending), posted to fee revenue at completion,
-- released on failure, reversed on compensation.
CREATE TABLE ledger.transaction_fees (
    transaction_id uuid NOT NULL,
    tier text NOT NULL CHECK (tier IN ('platform', 'provider', 'network', 'compliance', 'premium')),
    category text NOT NULL,
    method text NOT NULL CHECK (method IN ('percentage', 'flat', 'tiered')),
    asset text NOT NULL REFERENCES ledger.assets (symbol),
    amount numeric NOT NULL CHECK (amount >= 0),
    provider text,
    schedule_version bigint NOT NULL,
    status text NOT NULL CHECK (status IN ('pending', 'posted', 'released', 'reversed')),
    updated_sequence bigint NOT NULL,
    PRIMARY KEY (transaction_id, tier)
);

-- The KYC status and risk level the compliance gate reads, set through the Transactions API
-- until a user service feeds them.
CREATE TABLE ledger.user_compliance (
    user_id uuid PRIMARY KEY,
    kyc_status text NOT NULL CHECK (kyc_status IN ('not_started', 'pending', 'verified', 'rejected')),
    risk_level text NOT NULL CHECK (risk_level IN ('low', 'medium', 'high')),
    -- In minor units of whatever asset a transaction moves; NULL: no cap.
    max_transaction_minor numeric,
    updated_sequence bigint NOT NULL
);

-- Fee schedules: one row per (transaction type, asset, effective time). A transaction is priced
-- with the latest schedule whose effective_from is not after its initiation; `rules` is the JSON
-- form of fees::FeeRule[] (see docs/LIFECYCLE.md).
CREATE TABLE ledger.fee_schedules (
    version bigserial PRIMARY KEY,
    type text NOT NULL,
    asset text NOT NULL REFERENCES ledger.assets (symbol),
    effective_from timestamptz NOT NULL,
    rules jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (type, asset, effective_from)
);

-- The provider inbox: webhook events forwarded by the edge, one row per (source, event id).
CREATE TABLE ledger.provider_events (
    source text NOT NULL,
    event_id text NOT NULL,
    event_type text NOT NULL,
    transaction_id uuid,
    raw_payload text NOT NULL,
    processed_payload jsonb,
    status text NOT NULL CHECK (status IN ('pending', 'processed', 'failed', 'ignored')),
    reason text,
    attempts integer NOT NULL DEFAULT 0,
    received_at timestamptz NOT NULL DEFAULT now(),
    processed_at timestamptz,
    PRIMARY KEY (source, event_id)
);
CREATE INDEX provider_events_failed ON ledger.provider_events (received_at) WHERE status = 'failed';
