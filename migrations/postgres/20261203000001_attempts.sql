-- Attempt history (outrun-owned; see runtime/src/store/attempts.rs).
--
-- outrun_attempts: the failed, deferred and interrupted attempts of an
-- event, the last `[runtime] attempt_history` of each (written by the
-- statement that records the failure, which also drops the oldest beyond
-- that). A handled event's rows are deleted by the cleaner, not by the
-- ack, so the success path stays one DELETE.
CREATE TABLE outrun_attempts (
    id          bigint       GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id    uuid         NOT NULL,
    attempt     integer      NOT NULL,
    started_at  timestamptz  NOT NULL,
    duration_ms bigint       NOT NULL,
    handler     text,
    -- blake3 of the handler's .wasm (hex) that ran the attempt.
    version     text,
    -- locked_by of the attempt: the instance that ran it.
    instance    text,
    -- failed, dead, deferred or interrupted.
    outcome     text         NOT NULL,
    error       text
);

CREATE INDEX outrun_attempts_event ON outrun_attempts (event_id, id);
