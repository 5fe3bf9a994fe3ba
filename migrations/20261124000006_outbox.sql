-- The outbox (issue 6): the events other services hear about, written by the journal writer in
-- the same transaction as the journal batch that causes them, so an event exists if and only if
-- its change is committed. A relay publishes them to NATS JetStream; the Events gRPC stream
-- reads them by position. See docs/OUTBOX.md.
CREATE TABLE ledger.outbox (
    -- The global order: assigned at insert by the single journal writer, batch after batch, so
    -- positions grow in commit order (gaps are possible after a rolled-back batch, never a
    -- smaller position committed after a larger one). Consumers resume from it.
    position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Derived from (sequence, ordinal): the NATS message id JetStream deduplicates on.
    event_id uuid NOT NULL,
    sequence bigint NOT NULL,
    ordinal integer NOT NULL CHECK (ordinal >= 0),
    aggregate_type text NOT NULL,
    aggregate_id text NOT NULL,
    event_type text NOT NULL,
    version smallint NOT NULL,
    payload json NOT NULL,
    metadata json NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    status text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'published', 'failed')),
    attempts integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error text,
    published_at timestamptz,
    CHECK ((status = 'published') = (published_at IS NOT NULL))
);

-- The relay's queue, in position order.
CREATE INDEX outbox_pending ON ledger.outbox (position) WHERE status = 'pending';
-- Per-aggregate order: an event waits while an earlier one of its aggregate is unpublished.
CREATE INDEX outbox_unpublished_by_aggregate ON ledger.outbox (aggregate_type, aggregate_id, position)
    WHERE status <> 'published';
-- Pruning published events past their retention.
CREATE INDEX outbox_published_at ON ledger.outbox (published_at) WHERE status = 'published';

-- Positions at or below this were pruned: a stream asked to resume from before it is refused
-- rather than silently skipping events.
CREATE TABLE ledger.outbox_pruned (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    pruned_through bigint NOT NULL CHECK (pruned_through >= 0)
);
INSERT INTO ledger.outbox_pruned (pruned_through) VALUES (0);
