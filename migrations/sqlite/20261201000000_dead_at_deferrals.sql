-- When an event died, and how often it deferred itself.
--
-- dead_at (Unix milliseconds): set by every transition to dead (retries
-- exhausted, rejected, no handler, expired, cancelled), cleared by replay.
-- Retention and `events purge --older-than` count from it, so an event
-- created long ago that dies now is kept for the whole retention. Rows that
-- died before this migration (or were marked dead by hand) have none and
-- count from create_date.
--
-- deferrals: how many times a handler answered `retry-after` (which spends
-- no retry); an event that keeps deferring shows here.
ALTER TABLE outbox_events ADD COLUMN dead_at INTEGER
    CHECK (dead_at IS NULL OR typeof(dead_at) = 'integer');
ALTER TABLE outbox_events ADD COLUMN deferrals INTEGER NOT NULL DEFAULT 0
    CHECK (deferrals >= 0);

-- Serves cleanup_dead / purge_dead: dead rows by the moment they died. The
-- expression is the one those statements use.
DROP INDEX outbox_events_dead;
CREATE INDEX outbox_events_dead ON outbox_events (COALESCE(dead_at, create_date))
    WHERE retry >= max_retry;
