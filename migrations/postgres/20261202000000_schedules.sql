-- Schedules (outrun-owned; see runtime/src/schedule.rs).
--
-- outrun_schedules: one row per [[schedule]] name. `last_tick` is the tick
-- the schedule has reached (its event enqueued, or skipped as missed); an
-- instance takes the row's lock, enqueues the ticks after it and moves it
-- on in one transaction, so a tick is enqueued once however many
-- instances run, and also after its event was handled and deleted (its
-- idempotency key alone would then be free again). `spec` is the
-- definition the tick belongs to: a changed cron starts afresh.
CREATE TABLE outrun_schedules (
    name        varchar(100) PRIMARY KEY,
    spec        text,
    last_tick   timestamptz,
    -- When this schedule last enqueued an event, and which.
    fired_at    timestamptz,
    last_event  uuid
);
