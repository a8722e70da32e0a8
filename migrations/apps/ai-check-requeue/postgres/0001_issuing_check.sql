-- Work items of the AI-check service, one per (trigger, application).
-- `work_status` is 'NEW' while the check runs; the AI-check service moves it on.
CREATE TABLE IF NOT EXISTS issuing_check (
    id             BIGSERIAL PRIMARY KEY,
    application_id VARCHAR(100) NOT NULL,
    trigger_id     VARCHAR(100) NOT NULL,
    work_status    VARCHAR(32)  NOT NULL,
    created_at     TIMESTAMPTZ  NOT NULL DEFAULT now(),
    -- A redelivered event must not record the same check twice.
    UNIQUE (trigger_id, application_id)
);

-- The handler counts NEW rows on every event.
CREATE INDEX IF NOT EXISTS issuing_check_work_status_idx ON issuing_check (work_status);
