-- `[runtime] keep_done` (runtime/src/store/attempts.rs): a handled
-- event's last attempt is recorded with outcome 'done' and kept for that
-- long. The cleaner finds expired records by time, and the other rows of
-- gone events without scanning the (possibly many) done records.
CREATE INDEX outrun_attempts_done ON outrun_attempts (started_at) WHERE outcome = 'done';
CREATE INDEX outrun_attempts_failed ON outrun_attempts (id) WHERE outcome <> 'done';
