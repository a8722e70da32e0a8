-- Tables of the bonus-accrual handler (seed 001); see the PostgreSQL
-- migration for what each holds.

CREATE TABLE IF NOT EXISTS bonus_managers (
    manager_uid    TEXT    PRIMARY KEY,
    account_id     TEXT    NOT NULL,
    login          TEXT    NOT NULL,
    produced_at_ms INTEGER NOT NULL,
    event_id       TEXT    NOT NULL
);

CREATE TABLE IF NOT EXISTS bonus_accruals (
    event_id       TEXT    PRIMARY KEY,
    event_name     TEXT    NOT NULL,
    task_uid       TEXT    NOT NULL,
    manager_uid    TEXT    NOT NULL,
    account_id     TEXT    NOT NULL,
    rating         INTEGER NOT NULL,
    amount         INTEGER NOT NULL,
    produced_at_ms INTEGER NOT NULL,
    accrued_at     TEXT    NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE INDEX IF NOT EXISTS bonus_accruals_manager ON bonus_accruals (manager_uid);

CREATE TABLE IF NOT EXISTS bonus_candidates (
    candidate_uid  TEXT    PRIMARY KEY,
    name           TEXT    NOT NULL,
    surname        TEXT    NOT NULL,
    event_id       TEXT    NOT NULL,
    produced_at_ms INTEGER NOT NULL
);
