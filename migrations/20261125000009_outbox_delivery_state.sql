-- The outbox's delivery state moves out of the event rows (issue 6, measured under issue 3/4).
--
-- Before: every event row carried its own status, and the relay UPDATEd each row it published.
-- That made each event cost three index entries at insert (the pending queue, the per-aggregate
-- order, the published-at index) and a second non-HOT tuple plus two index entries when marked
-- published; with a backlog, the relay's per-aggregate NOT EXISTS over the unpublished rows grew
-- with the backlog and starved the journal writer of CPU.
--
-- After:
-- - ledger.outbox_events: the events, written once by the journal writer, never updated. One
--   index (the position).
-- - ledger.outbox_deliveries: one row per relay round: every event at or below through_position
--   was either published in that round (or an earlier one), or has a row in outbox_retries.
--   The relay's cursor is the largest through_position.
-- - ledger.outbox_retries: the few events that did not publish at their first try, or that were
--   held behind such an event of their own aggregate (order per aggregate is the promise). Small,
--   so the per-aggregate hold is cheap to check.
-- - ledger.outbox: a view with the columns the issue and docs/OUTBOX.md name (status, attempts,
--   next_attempt_at, last_error, published_at), for operators and compliance queries.
ALTER TABLE ledger.outbox RENAME TO outbox_events;
DROP INDEX ledger.outbox_pending;
DROP INDEX ledger.outbox_unpublished_by_aggregate;
DROP INDEX ledger.outbox_published_at;

CREATE TABLE ledger.outbox_deliveries (
    through_position bigint PRIMARY KEY CHECK (through_position > 0),
    published_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE ledger.outbox_retries (
    position bigint PRIMARY KEY REFERENCES ledger.outbox_events (position) ON DELETE CASCADE,
    status text NOT NULL CHECK (status IN ('pending', 'published', 'failed')),
    attempts integer NOT NULL CHECK (attempts >= 0),
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error text,
    published_at timestamptz,
    CHECK ((status = 'published') = (published_at IS NOT NULL))
);
CREATE INDEX outbox_retries_unpublished ON ledger.outbox_retries (position) WHERE status <> 'published';

-- Carry over the state of a database that ran the earlier layout: the cursor goes to the last
-- event that was ever tried; events at or below it that were not published at their first try
-- keep their exact state as retries.
WITH tried AS (
    SELECT max(position) AS through, max(published_at) AS published_at
    FROM ledger.outbox_events WHERE status <> 'pending' OR attempts > 0
)
INSERT INTO ledger.outbox_deliveries (through_position, published_at)
SELECT through, COALESCE(published_at, now()) FROM tried WHERE through IS NOT NULL;

INSERT INTO ledger.outbox_retries (position, status, attempts, next_attempt_at, last_error, published_at)
SELECT position, status, attempts, next_attempt_at, last_error, published_at
FROM ledger.outbox_events
WHERE position <= COALESCE((SELECT max(through_position) FROM ledger.outbox_deliveries), 0)
    AND NOT (status = 'published' AND attempts = 1);

ALTER TABLE ledger.outbox_events
    DROP COLUMN status,
    DROP COLUMN attempts,
    DROP COLUMN next_attempt_at,
    DROP COLUMN last_error,
    DROP COLUMN published_at;

CREATE VIEW ledger.outbox AS
SELECT e.position, e.event_id, e.sequence, e.ordinal, e.aggregate_type, e.aggregate_id, e.event_type, e.version,
    e.payload, e.metadata, e.created_at,
    CASE
        WHEN r.position IS NOT NULL THEN r.status
        WHEN d.through_position IS NOT NULL THEN 'published'
        ELSE 'pending'
    END AS status,
    CASE
        WHEN r.position IS NOT NULL THEN r.attempts
        WHEN d.through_position IS NOT NULL THEN 1
        ELSE 0
    END AS attempts,
    COALESCE(r.next_attempt_at, e.created_at) AS next_attempt_at,
    r.last_error,
    CASE WHEN r.position IS NOT NULL THEN r.published_at ELSE d.published_at END AS published_at
FROM ledger.outbox_events e
LEFT JOIN ledger.outbox_retries r ON r.position = e.position
LEFT JOIN LATERAL (
    SELECT through_position, published_at FROM ledger.outbox_deliveries
    WHERE through_position >= e.position ORDER BY through_position LIMIT 1
) d ON true;
