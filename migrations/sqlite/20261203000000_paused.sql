-- Paused event names (outrun-owned; see runtime/src/pause.rs). Times are
-- INTEGER Unix milliseconds, as in outbox_events.
--
-- outrun_paused: one row per paused event name; no instance claims its
-- events. Resuming deletes the row. `via`: `handler:NAME` for a pause
-- asked for by handler.
CREATE TABLE outrun_paused (
    name      TEXT PRIMARY KEY,
    paused_at INTEGER NOT NULL,
    via       TEXT
);
