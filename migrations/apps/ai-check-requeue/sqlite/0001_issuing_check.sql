-- Work items of the AI-check service, one per (trigger, application).
-- `work_status` is 'NEW' while the check runs; the AI-check service moves it on.
CREATE TABLE IF NOT EXISTS issuing_check (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    application_id TEXT NOT NULL,
    trigger_id     TEXT NOT NULL,
    work_status    TEXT NOT NULL,
    created_at     TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,
    -- A redelivered event must not record the same check twice.
    UNIQUE (trigger_id, application_id)
);

-- The handler counts NEW rows on every event.
CREATE INDEX IF NOT EXISTS issuing_check_work_status_idx ON issuing_check (work_status);
