-- The outbox table on SQLite. Its names are a public contract: other
-- languages INSERT into it directly, so every column an application does not
-- care about has a default and the minimal enqueue is
--   INSERT INTO outbox_events (name, payload) VALUES ('order.created', '{"id":1}');
--
-- Timestamps are INTEGER milliseconds since the Unix epoch. The defaults use
-- julianday() rather than unixepoch('subsec') so they work on SQLite older
-- than 3.42 (writers in other languages may link an old library); ROUND
-- guards against the double landing a hair below the integer millisecond.
-- Insertion order (the per-group FIFO) is the rowid, so this table must keep
-- its rowid (no WITHOUT ROWID).

CREATE TABLE outbox_events (
    -- UUIDv7 as lowercase hyphenated text: 48-bit millisecond timestamp,
    -- version 7, RFC 4122 variant, random rest. The CHECK keeps ids canonical
    -- because the runtime matches them as text (an upper-case id would never
    -- be acknowledged).
    id              TEXT    NOT NULL PRIMARY KEY
                    DEFAULT (lower(
                        substr(printf('%012x', CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER)), 1, 8)
                        || '-' || substr(printf('%012x', CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER)), 9, 4)
                        || '-7' || substr(hex(randomblob(2)), 2, 3)
                        || '-' || substr('89ab', 1 + (abs(random()) % 4), 1) || substr(hex(randomblob(2)), 2, 3)
                        || '-' || hex(randomblob(6))))
                    CHECK (length(id) = 36 AND id = lower(id)),
    create_date     INTEGER NOT NULL
                    DEFAULT (CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER))
                    CHECK (typeof(create_date) = 'integer'),
    name            TEXT    NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    -- Handed to handlers byte for byte as written; must be JSON.
    payload         TEXT    NOT NULL CHECK (json_valid(payload)),
    group_id        TEXT    CHECK (group_id IS NULL OR length(group_id) <= 100),
    -- Failed attempts so far; the event is dead exactly when retry >= max_retry.
    retry           INTEGER NOT NULL DEFAULT 0 CHECK (retry >= 0),
    max_retry       INTEGER NOT NULL DEFAULT 5 CHECK (max_retry >= 1),
    available_at    INTEGER NOT NULL
                    DEFAULT (CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER))
                    CHECK (typeof(available_at) = 'integer'),
    expires_at      INTEGER CHECK (expires_at IS NULL OR typeof(expires_at) = 'integer'),
    locked_by       TEXT,
    locked_until    INTEGER CHECK (locked_until IS NULL OR typeof(locked_until) = 'integer'),
    -- Fencing token of the current lease (lowercase UUID text): ack/fail/extend
    -- only act when the caller presents it.
    lock_token      TEXT,
    last_error      TEXT,
    idempotency_key TEXT    UNIQUE
);

-- Serves claim: live rows in available_at order (the WHERE matches the
-- claim's `retry < max_retry`, so dead rows stay out of this index).
CREATE INDEX outbox_events_claim ON outbox_events (available_at) WHERE retry < max_retry;

-- Serves the group-head check of claim: every SQLite index ends with the
-- rowid, so this is (group_id, rowid) and "an earlier live event of this
-- group" is one index probe.
CREATE INDEX outbox_events_group_head ON outbox_events (group_id)
    WHERE group_id IS NOT NULL AND retry < max_retry;

-- Serves expire_due: live rows that carry an expiry, soonest first.
CREATE INDEX outbox_events_expiry ON outbox_events (expires_at)
    WHERE expires_at IS NOT NULL AND retry < max_retry;

-- Serves cleanup_dead / purge_dead / `events list --dead`: dead rows by age.
CREATE INDEX outbox_events_dead ON outbox_events (create_date) WHERE retry >= max_retry;
