-- Limits (outrun-owned; see runtime/src/limits.rs). Times are INTEGER Unix
-- milliseconds, as in outbox_events.

-- outrun_limits: one row per [[limit]]: a rate limit's token bucket
-- (`tokens` left as of `refilled_at`).
CREATE TABLE outrun_limits (
    name        TEXT PRIMARY KEY,
    tokens      REAL NOT NULL DEFAULT 0,
    refilled_at INTEGER NOT NULL
);
