-- diBoaS Ledger: the read side and compliance data (issue 7).
--
-- The directory (users, their encrypted personal data, wallets, domain account records,
-- compliance checks), the append-only audit and data-access logs partitioned by month, the
-- archive schema old partitions move to, and the summary materialized views. None of this is
-- in the engine's journal: the directory is written by its own transactions (src/directory/),
-- the audit rows of money requests by the journal writer's batch transaction.
--
-- Personal data never reaches PostgreSQL in plaintext: directory.personal_data holds one
-- AES-256-GCM ciphertext per (user, field), with its nonce, sensitivity, algorithm and the
-- version of the key that sealed it. Keys come from the server's configuration, never from here.

CREATE SCHEMA IF NOT EXISTS directory;
CREATE SCHEMA IF NOT EXISTS audit;
CREATE SCHEMA IF NOT EXISTS archive;

-- One row per user: everything that is not personal data, plus the email's blind index
-- (HMAC-SHA256 of the normalised address under a configured key) for lookups by email.
CREATE TABLE directory.users (
    user_id uuid PRIMARY KEY,
    email_index bytea UNIQUE CHECK (length(email_index) = 32),
    two_factor_enabled boolean NOT NULL,
    kyc_status text NOT NULL DEFAULT 'not_started'
        CHECK (kyc_status IN ('not_started', 'pending', 'verified', 'rejected', 'expired')),
    risk_level text NOT NULL DEFAULT 'unassessed'
        CHECK (risk_level IN ('unassessed', 'low', 'medium', 'high', 'prohibited')),
    compliance_flags text[] NOT NULL DEFAULT '{}',
    timezone text NOT NULL,
    language text NOT NULL,
    currency text NOT NULL,
    mascot text NOT NULL CHECK (mascot IN ('acqua', 'mystic', 'coral')),
    experience_level text NOT NULL CHECK (experience_level IN ('beginner', 'intermediate', 'advanced')),
    points bigint NOT NULL DEFAULT 0 CHECK (points >= 0),
    streak_days integer NOT NULL DEFAULT 0 CHECK (streak_days >= 0),
    enabled_domains text[] NOT NULL DEFAULT '{banking}',
    last_active_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    -- Set by compliance-aware erasure: the personal data and the blind index are gone.
    erased_at timestamptz,
    CHECK (erased_at IS NULL OR email_index IS NULL)
);
CREATE INDEX users_created_at ON directory.users (created_at);
CREATE INDEX users_last_active_at ON directory.users (last_active_at);

-- Encrypted personal data, one value per (user, field).
CREATE TABLE directory.personal_data (
    user_id uuid NOT NULL REFERENCES directory.users,
    field text NOT NULL
        CHECK (field IN ('email', 'given_name', 'family_name', 'phone', 'date_of_birth', 'nationality', 'kyc_documents')),
    sensitivity text NOT NULL CHECK (sensitivity IN ('pii', 'financial', 'document')),
    algorithm text NOT NULL CHECK (algorithm = 'AES-256-GCM'),
    key_version integer NOT NULL CHECK (key_version > 0),
    nonce bytea NOT NULL CHECK (length(nonce) = 12),
    ciphertext bytea NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, field)
);
-- Key rotation looks for values sealed under an older key.
CREATE INDEX personal_data_key_version ON directory.personal_data (key_version);

-- Non-custodial wallets: public data only (address, public key), one per chain per user.
CREATE TABLE directory.wallets (
    user_id uuid NOT NULL REFERENCES directory.users,
    chain text NOT NULL CHECK (chain IN ('bitcoin', 'ethereum', 'solana', 'sui')),
    address text NOT NULL,
    public_key text,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, chain),
    UNIQUE (chain, address)
);

-- The domain account records the engine's balances belong to.
CREATE TABLE directory.domain_accounts (
    account_id uuid PRIMARY KEY,
    user_id uuid NOT NULL REFERENCES directory.users,
    domain text NOT NULL CHECK (domain IN ('banking', 'investing', 'defi')),
    kind text NOT NULL,
    -- Banking: verification status and limits; investing: trading/margin flags and risk
    -- tolerance; DeFi: chain, wallet type, auto-compound, risk tolerance.
    settings jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CHECK ((domain = 'banking' AND kind IN ('checking', 'savings', 'credit_card', 'wire'))
        OR (domain = 'investing' AND kind IN ('brokerage', 'retirement', 'margin'))
        OR (domain = 'defi' AND kind IN ('hot', 'hardware', 'multisig')))
);
CREATE INDEX domain_accounts_by_user ON directory.domain_accounts (user_id, domain, created_at);

-- KYC, AML and sanctions checks, as the providers reported them.
CREATE TABLE directory.compliance_checks (
    check_id uuid PRIMARY KEY,
    user_id uuid NOT NULL REFERENCES directory.users,
    check_type text NOT NULL CHECK (check_type IN ('kyc', 'aml', 'sanctions')),
    provider text NOT NULL,
    result text NOT NULL CHECK (result IN ('passed', 'failed', 'review')),
    risk_score smallint NOT NULL CHECK (risk_score BETWEEN 0 AND 100),
    flags text[] NOT NULL DEFAULT '{}',
    checked_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz
);
CREATE INDEX compliance_checks_by_user ON directory.compliance_checks (user_id, check_type, checked_at);
CREATE INDEX compliance_checks_expiring ON directory.compliance_checks (expires_at) WHERE expires_at IS NOT NULL;

-- Every mutating request: what changed (before and after, never personal data in plaintext) and
-- who asked. Append-only, one partition per UTC month of created_at.
CREATE TABLE audit.audit_log (
    event_id uuid NOT NULL DEFAULT gen_random_uuid(),
    created_at timestamptz NOT NULL DEFAULT now(),
    event_type text NOT NULL,
    entity_type text NOT NULL,
    entity_id text NOT NULL,
    before_state jsonb,
    after_state jsonb,
    caller text,
    ip_address text,
    user_agent text,
    correlation_id text,
    -- The journal entry of a money request; NULL for directory changes.
    journal_sequence bigint,
    PRIMARY KEY (event_id, created_at)
) PARTITION BY RANGE (created_at);
CREATE INDEX audit_log_by_entity ON audit.audit_log (entity_type, entity_id, created_at);
CREATE INDEX audit_log_by_correlation ON audit.audit_log (correlation_id);

-- Every read of personal data: who read whose data, which fields, and why.
CREATE TABLE audit.data_access_log (
    access_id uuid NOT NULL DEFAULT gen_random_uuid(),
    created_at timestamptz NOT NULL DEFAULT now(),
    subject_user_id uuid,
    entity_type text NOT NULL,
    fields text[] NOT NULL,
    reason text NOT NULL CHECK (reason <> ''),
    caller text,
    ip_address text,
    user_agent text,
    correlation_id text,
    PRIMARY KEY (access_id, created_at)
) PARTITION BY RANGE (created_at);
CREATE INDEX data_access_log_by_subject ON audit.data_access_log (subject_user_id, created_at);

-- The archive: the same tables, holding the partitions moved out of the hot ones. Queryable
-- like the hot tables; old partitions are dropped from here when their retention ends.
CREATE TABLE archive.audit_log (LIKE audit.audit_log INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
    PARTITION BY RANGE (created_at);
CREATE TABLE archive.data_access_log (LIKE audit.data_access_log INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
    PARTITION BY RANGE (created_at);

CREATE FUNCTION audit.refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '%.% is append-only', TG_TABLE_SCHEMA, TG_TABLE_NAME;
END
$$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit.audit_log
    FOR EACH ROW EXECUTE FUNCTION audit.refuse_change();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit.audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit.refuse_change();
CREATE TRIGGER data_access_log_append_only BEFORE UPDATE OR DELETE ON audit.data_access_log
    FOR EACH ROW EXECUTE FUNCTION audit.refuse_change();
CREATE TRIGGER data_access_log_no_truncate BEFORE TRUNCATE ON audit.data_access_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit.refuse_change();
CREATE TRIGGER archived_audit_log_append_only BEFORE UPDATE OR DELETE ON archive.audit_log
    FOR EACH ROW EXECUTE FUNCTION audit.refuse_change();
CREATE TRIGGER archived_data_access_log_append_only BEFORE UPDATE OR DELETE ON archive.data_access_log
    FOR EACH ROW EXECUTE FUNCTION audit.refuse_change();

-- Creates the monthly partitions of audit.<parent> for the month holding from_time and the
-- months_ahead after it, if missing (and not already archived). Returns how many it created.
CREATE FUNCTION audit.ensure_monthly_partitions(parent text, from_time timestamptz, months_ahead integer)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    month_start timestamp := date_trunc('month', from_time AT TIME ZONE 'UTC');
    partition_name text;
    created integer := 0;
BEGIN
    FOR step IN 0..months_ahead LOOP
        partition_name := parent || '_' || to_char(month_start, 'YYYY_MM');
        IF to_regclass('audit.' || partition_name) IS NULL AND to_regclass('archive.' || partition_name) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE audit.%I PARTITION OF audit.%I FOR VALUES FROM (%L) TO (%L)',
                partition_name,
                parent,
                month_start AT TIME ZONE 'UTC',
                (month_start + interval '1 month') AT TIME ZONE 'UTC');
            created := created + 1;
        END IF;
        month_start := month_start + interval '1 month';
    END LOOP;
    RETURN created;
END
$$;

-- Retention of audit.<parent>: partitions whose month ended before archive_before move to
-- archive.<parent> (detached, moved to the archive schema, attached there: still queryable), and
-- archived partitions whose month ended before drop_before are dropped. Returns the partitions
-- archived and dropped.
CREATE FUNCTION audit.apply_retention(parent text, archive_before timestamptz, drop_before timestamptz,
    OUT archived integer, OUT dropped integer)
LANGUAGE plpgsql AS $$
DECLARE
    partition_name text;
    month_start timestamp;
BEGIN
    archived := 0;
    dropped := 0;
    FOR partition_name IN
        SELECT child.relname
        FROM pg_inherits
        JOIN pg_class child ON child.oid = pg_inherits.inhrelid
        JOIN pg_class parent_table ON parent_table.oid = pg_inherits.inhparent
        JOIN pg_namespace ns ON ns.oid = parent_table.relnamespace
        WHERE ns.nspname = 'audit' AND parent_table.relname = parent
          AND child.relname ~ ('^' || parent || '_\d{4}_\d{2}$')
        ORDER BY child.relname
    LOOP
        month_start := to_date(right(partition_name, 7), 'YYYY_MM');
        IF (month_start + interval '1 month') AT TIME ZONE 'UTC' <= archive_before THEN
            EXECUTE format('ALTER TABLE audit.%I DETACH PARTITION audit.%I', parent, partition_name);
            EXECUTE format('ALTER TABLE audit.%I SET SCHEMA archive', partition_name);
            EXECUTE format('ALTER TABLE archive.%I ATTACH PARTITION archive.%I FOR VALUES FROM (%L) TO (%L)',
                parent, partition_name,
                month_start AT TIME ZONE 'UTC',
                (month_start + interval '1 month') AT TIME ZONE 'UTC');
            archived := archived + 1;
        END IF;
    END LOOP;
    FOR partition_name IN
        SELECT child.relname
        FROM pg_inherits
        JOIN pg_class child ON child.oid = pg_inherits.inhrelid
        JOIN pg_class parent_table ON parent_table.oid = pg_inherits.inhparent
        JOIN pg_namespace ns ON ns.oid = parent_table.relnamespace
        WHERE ns.nspname = 'archive' AND parent_table.relname = parent
          AND child.relname ~ ('^' || parent || '_\d{4}_\d{2}$')
        ORDER BY child.relname
    LOOP
        month_start := to_date(right(partition_name, 7), 'YYYY_MM');
        IF (month_start + interval '1 month') AT TIME ZONE 'UTC' <= drop_before THEN
            EXECUTE format('DROP TABLE archive.%I', partition_name);
            dropped := dropped + 1;
        END IF;
    END LOOP;
END
$$;

SELECT audit.ensure_monthly_partitions('audit_log', now(), 3);
SELECT audit.ensure_monthly_partitions('data_access_log', now(), 3);

-- Each user's balances per asset, summed over the domains. Refreshed CONCURRENTLY by the server.
CREATE MATERIALIZED VIEW ledger.user_balance_summary AS
    SELECT user_id, asset, count(*)::integer AS accounts, sum(available) AS available,
           sum(reserved) AS reserved, sum(total) AS total, max(last_sequence) AS last_sequence
    FROM ledger.balances
    GROUP BY user_id, asset;
CREATE UNIQUE INDEX user_balance_summary_key ON ledger.user_balance_summary (user_id, asset);

-- The money operations requested, from the journal: counts, amounts and fees (minor units of
-- the asset) by user, domain, asset, operation and outcome. This is the journal's view of the
-- transactions; a transaction-table summary can join it once that table exists. Operations
-- without an account (commit, release name a reservation) have domain and asset ''.
CREATE MATERIALIZED VIEW ledger.transaction_summary AS
    WITH requests AS (
        SELECT record::jsonb -> 'origin' -> 'data' AS data
        FROM ledger.journal
        WHERE kind = 'request'
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
    SELECT COALESCE((account ->> 'user_id')::uuid, reservation_user_id) AS user_id,
           COALESCE(account ->> 'domain', '') AS domain,
           COALESCE(account ->> 'asset', '') AS asset,
           operation,
           outcome,
           count(*)::bigint AS operations,
           COALESCE(sum(amount_minor), 0) AS amount_minor,
           COALESCE(sum(fee_minor), 0) AS fees_minor
    FROM operations
    WHERE COALESCE((account ->> 'user_id')::uuid, reservation_user_id) IS NOT NULL
    GROUP BY 1, 2, 3, 4, 5;
CREATE UNIQUE INDEX transaction_summary_key ON ledger.transaction_summary (user_id, domain, asset, operation, outcome);
