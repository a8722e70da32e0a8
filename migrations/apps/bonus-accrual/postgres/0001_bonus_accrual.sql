-- Tables of the bonus-accrual handler (seed 001). SQLite has the same tables
-- (migrations/apps/bonus-accrual/sqlite/); the handler's SQL runs on both.

-- Managers as the tasks service streams them (ManagerUpdated.v0). The row
-- keeps the produced_at of the update it holds, so an older update arriving
-- later is ignored.
CREATE TABLE IF NOT EXISTS bonus_managers (
    manager_uid    VARCHAR(100) PRIMARY KEY,
    account_id     VARCHAR(100) NOT NULL,
    login          VARCHAR(200) NOT NULL,
    produced_at_ms BIGINT       NOT NULL,
    event_id       VARCHAR(100) NOT NULL
);

-- One row per accrued TaskSolved event: event_id is the idempotency key, so
-- a duplicate delivery inserts nothing (ON CONFLICT DO NOTHING). amount is
-- rating × bonus_rate in minor currency units.
CREATE TABLE IF NOT EXISTS bonus_accruals (
    event_id       VARCHAR(100) PRIMARY KEY,
    event_name     VARCHAR(100) NOT NULL,
    task_uid       VARCHAR(100) NOT NULL,
    manager_uid    VARCHAR(100) NOT NULL,
    account_id     VARCHAR(100) NOT NULL,
    rating         BIGINT       NOT NULL,
    amount         BIGINT       NOT NULL,
    produced_at_ms BIGINT       NOT NULL,
    accrued_at     TIMESTAMPTZ  NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS bonus_accruals_manager ON bonus_accruals (manager_uid);

-- Candidates (NewCandidate.v0), one row per candidate.
CREATE TABLE IF NOT EXISTS bonus_candidates (
    candidate_uid  VARCHAR(100) PRIMARY KEY,
    name           VARCHAR(200) NOT NULL,
    surname        VARCHAR(200) NOT NULL,
    event_id       VARCHAR(100) NOT NULL,
    produced_at_ms BIGINT       NOT NULL
);
