-- diBoaS Ledger: the journal (system of record) and the projections recovery and SQL users read.
--
-- The engine keeps every balance in memory; PostgreSQL holds the ordered journal of every change
-- and, in the same transaction as each journal batch, the projections that change implies.
-- Amounts are NUMERIC holding exactly the asset's scale (see ledger.assets.scale); the journal
-- keeps each change's exact record as JSON. Every projection is keyed by user_id first so the
-- tables can later be distributed by user.

CREATE SCHEMA IF NOT EXISTS ledger;
CREATE SCHEMA IF NOT EXISTS banking;
CREATE SCHEMA IF NOT EXISTS investing;
CREATE SCHEMA IF NOT EXISTS defi;

-- The asset registry, seeded (and checked) from the binary's registry at start-up.
CREATE TABLE ledger.assets (
    symbol text PRIMARY KEY,
    code text NOT NULL,
    chain text,
    scale smallint NOT NULL CHECK (scale BETWEEN 0 AND 28),
    engine_index smallint NOT NULL UNIQUE
);

-- The last committed journal sequence. Each batch moves it from exactly the value its writer
-- expects, so two writers on one database cannot both append (the second one fails).
CREATE TABLE ledger.checkpoint (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    committed_sequence bigint NOT NULL CHECK (committed_sequence >= 0),
    committed_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO ledger.checkpoint (committed_sequence) VALUES (0);

-- The journal: every change in sequence order, append-only, one partition per UTC month of
-- created_at (the commit time; at_ms is the request's own clock and is not trusted for routing).
CREATE TABLE ledger.journal (
    sequence bigint NOT NULL CHECK (sequence > 0),
    -- The batch's transaction time: the writer leaves it to this default.
    created_at timestamptz NOT NULL DEFAULT now(),
    at_ms bigint NOT NULL,
    kind text NOT NULL CHECK (kind IN ('request', 'expiry_sweep')),
    idempotency_key text,
    record json NOT NULL,
    PRIMARY KEY (sequence, created_at)
) PARTITION BY RANGE (created_at);

CREATE FUNCTION ledger.refuse_journal_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger.journal is append-only';
END
$$;
CREATE TRIGGER journal_append_only BEFORE UPDATE OR DELETE ON ledger.journal
    FOR EACH ROW EXECUTE FUNCTION ledger.refuse_journal_change();
CREATE TRIGGER journal_no_truncate BEFORE TRUNCATE ON ledger.journal
    FOR EACH STATEMENT EXECUTE FUNCTION ledger.refuse_journal_change();

-- Creates the journal partitions of the month holding from_time and the months_ahead after it,
-- if missing. Called at start-up and periodically by the writer. Returns how many it created.
CREATE FUNCTION ledger.ensure_journal_partitions(from_time timestamptz, months_ahead integer)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    month_start timestamp := date_trunc('month', from_time AT TIME ZONE 'UTC');
    partition_name text;
    created integer := 0;
BEGIN
    FOR step IN 0..months_ahead LOOP
        partition_name := 'journal_' || to_char(month_start, 'YYYY_MM');
        IF to_regclass('ledger.' || partition_name) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE ledger.%I PARTITION OF ledger.journal FOR VALUES FROM (%L) TO (%L)',
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

-- One row per user account: its settings and outflow-limit counters.
CREATE TABLE ledger.accounts (
    user_id uuid NOT NULL,
    domain text NOT NULL CHECK (domain IN ('banking', 'investing', 'defi')),
    asset text NOT NULL REFERENCES ledger.assets (symbol),
    overdraft numeric NOT NULL CHECK (overdraft >= 0),
    limit_per_transaction numeric,
    limit_daily numeric,
    limit_monthly numeric,
    frozen boolean NOT NULL,
    -- The outflow windows being counted: UTC day number and year * 12 + month index.
    usage_day bigint NOT NULL,
    usage_day_used numeric NOT NULL,
    usage_month bigint NOT NULL,
    usage_month_used numeric NOT NULL,
    opened_sequence bigint NOT NULL,
    updated_sequence bigint NOT NULL,
    PRIMARY KEY (user_id, domain, asset)
);

CREATE TABLE ledger.balances (
    user_id uuid NOT NULL,
    domain text NOT NULL,
    asset text NOT NULL,
    available numeric NOT NULL,
    reserved numeric NOT NULL CHECK (reserved >= 0),
    total numeric GENERATED ALWAYS AS (available + reserved) STORED,
    last_sequence bigint NOT NULL,
    PRIMARY KEY (user_id, domain, asset),
    FOREIGN KEY (user_id, domain, asset) REFERENCES ledger.accounts
) WITH (fillfactor = 50);

-- Reservations of every status; closed ones stay for history, recovery loads the active ones
-- and the recently closed ones (the idempotency window).
CREATE TABLE ledger.reservations (
    user_id uuid NOT NULL,
    reservation_id uuid NOT NULL,
    domain text NOT NULL,
    asset text NOT NULL,
    amount numeric NOT NULL CHECK (amount > 0),
    created_at_ms bigint NOT NULL,
    expires_at_ms bigint NOT NULL,
    status text NOT NULL CHECK (status IN ('active', 'completed', 'released', 'expired')),
    closed_at_ms bigint,
    opened_sequence bigint NOT NULL,
    closed_sequence bigint,
    PRIMARY KEY (user_id, reservation_id),
    FOREIGN KEY (user_id, domain, asset) REFERENCES ledger.accounts,
    CHECK ((status = 'active') = (closed_at_ms IS NULL))
);
CREATE INDEX reservations_active_by_expiry ON ledger.reservations (expires_at_ms) WHERE status = 'active';
CREATE INDEX reservations_closed_at ON ledger.reservations (closed_at_ms) WHERE status <> 'active';

-- Every request's idempotency key and the journal record holding its first outcome (the record
-- keeps the operation and the outcome; storing them twice would double what each batch writes).
-- The key space is global, so this table is distributed by key, not by user.
CREATE TABLE ledger.idempotency_keys (
    key text PRIMARY KEY,
    sequence bigint NOT NULL,
    recorded_at_ms bigint NOT NULL
);

-- The keys with their stored operation and outcome, for SQL users.
CREATE VIEW ledger.idempotency_outcomes AS
    SELECT k.key, k.sequence, k.recorded_at_ms, j.created_at,
           j.record -> 'origin' -> 'data' -> 'operation' AS operation,
           j.record -> 'origin' -> 'data' -> 'outcome' AS outcome
    FROM ledger.idempotency_keys k JOIN ledger.journal j ON j.sequence = k.sequence;

-- Platform accounts, summed over the engine's shards. kind is e.g. 'provider_clearing:stripe'.
CREATE TABLE ledger.system_balances (
    kind text NOT NULL,
    asset text NOT NULL REFERENCES ledger.assets (symbol),
    balance numeric NOT NULL,
    last_sequence bigint NOT NULL,
    PRIMARY KEY (kind, asset)
);

-- The domain schemas: each domain's balances and reservations, as the platform's architecture
-- separates them. Views, so there is one source of truth and no extra write per change.
CREATE VIEW banking.balances AS
    SELECT b.user_id, b.asset, a.code, a.chain, b.available, b.reserved, b.total, b.last_sequence
    FROM ledger.balances b JOIN ledger.assets a ON a.symbol = b.asset WHERE b.domain = 'banking';
CREATE VIEW investing.balances AS
    SELECT b.user_id, b.asset, a.code, a.chain, b.available, b.reserved, b.total, b.last_sequence
    FROM ledger.balances b JOIN ledger.assets a ON a.symbol = b.asset WHERE b.domain = 'investing';
CREATE VIEW defi.balances AS
    SELECT b.user_id, b.asset, a.code, a.chain, b.available, b.reserved, b.total, b.last_sequence
    FROM ledger.balances b JOIN ledger.assets a ON a.symbol = b.asset WHERE b.domain = 'defi';
CREATE VIEW banking.reservations AS
    SELECT user_id, reservation_id, asset, amount, status, created_at_ms, expires_at_ms, closed_at_ms
    FROM ledger.reservations WHERE domain = 'banking';
CREATE VIEW investing.reservations AS
    SELECT user_id, reservation_id, asset, amount, status, created_at_ms, expires_at_ms, closed_at_ms
    FROM ledger.reservations WHERE domain = 'investing';
CREATE VIEW defi.reservations AS
    SELECT user_id, reservation_id, asset, amount, status, created_at_ms, expires_at_ms, closed_at_ms
    FROM ledger.reservations WHERE domain = 'defi';
