-- Paused event names (outrun-owned; see runtime/src/pause.rs).
--
-- outrun_paused: one row per paused event name. No instance claims events
-- of a paused name; each instance re-reads this table at least once a
-- second, so a pause made anywhere holds everywhere within that. Resuming
-- deletes the row: the events were never touched and run where they
-- stopped. `via` records how the pause was asked for (`handler:NAME`),
-- so a handler's resume frees the names its pause took.
CREATE TABLE outrun_paused (
    name      varchar(100) PRIMARY KEY,
    paused_at timestamptz  NOT NULL DEFAULT now(),
    via       text
);
