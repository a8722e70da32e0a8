-- Attempt history (outrun-owned; see runtime/src/store/attempts.rs). Times
-- are INTEGER Unix milliseconds, as in outbox_events.
--
-- outrun_attempts: the failed, deferred and interrupted attempts of an
-- event, the last `[runtime] attempt_history` of each. A handled event's
-- rows are deleted by the cleaner, not by the ack.
CREATE TABLE outrun_attempts (
    id          INTEGER PRIMARY KEY,
    event_id    TEXT    NOT NULL,
    attempt     INTEGER NOT NULL,
    started_at  INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL,
    handler     TEXT,
    version     TEXT,
    instance    TEXT,
    outcome     TEXT    NOT NULL,
    error       TEXT
);

CREATE INDEX outrun_attempts_event ON outrun_attempts (event_id, id);
