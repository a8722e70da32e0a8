-- Schedules (outrun-owned; see runtime/src/schedule.rs). Times are INTEGER
-- Unix milliseconds, as in outbox_events.
--
-- outrun_schedules: one row per [[schedule]] name. `last_tick` is the tick
-- the schedule has reached (its event enqueued, or skipped as missed); the
-- writer enqueues the ticks after it and moves it on in one transaction,
-- so a tick is enqueued once, also after its event was handled and
-- deleted (its idempotency key alone would then be free again). `spec` is
-- the definition the tick belongs to: a changed cron starts afresh.
CREATE TABLE outrun_schedules (
    name        TEXT PRIMARY KEY,
    spec        TEXT,
    last_tick   INTEGER,
    fired_at    INTEGER,
    last_event  TEXT
);
