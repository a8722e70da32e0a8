-- The outbox table on PostgreSQL. Its names are a public contract: other
-- languages INSERT into it directly, so every column an application does not
-- care about has a default and the minimal enqueue is
--   INSERT INTO outbox_events (name, payload) VALUES ('order.created', '{"id":1}');

-- PostgreSQL 15 has no uuidv7(). This one follows RFC 9562: a 48-bit Unix
-- timestamp in milliseconds, then the version (7), then random bits taken from
-- gen_random_uuid() (whose variant bits are already RFC 4122). Ids therefore
-- sort roughly by creation time, which keeps the primary key index compact.
CREATE OR REPLACE FUNCTION outrun_uuid_v7() RETURNS uuid
LANGUAGE sql VOLATILE PARALLEL SAFE AS $$
  SELECT encode(
    set_bit(
      set_bit(
        overlay(uuid_send(gen_random_uuid())
                placing substring(int8send(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
                FROM 1 FOR 6),
        52, 1),
      53, 1),
    'hex')::uuid
$$;

CREATE TABLE outbox_events (
    id              uuid         PRIMARY KEY DEFAULT outrun_uuid_v7(),
    -- Insertion order: the per-group FIFO follows it (ids from other writers
    -- need not be monotonic, and available_at changes with backoff).
    seq             bigint       GENERATED ALWAYS AS IDENTITY,
    create_date     timestamptz  NOT NULL DEFAULT now(),
    name            varchar(100) NOT NULL CHECK (name <> ''),
    -- TEXT, not jsonb: the payload is handed to handlers byte for byte as
    -- written. The cast rejects rows that are not JSON at INSERT time.
    payload         text         NOT NULL CHECK (payload::json IS NOT NULL),
    group_id        varchar(100),
    -- Failed attempts so far; the event is dead exactly when retry >= max_retry.
    retry           smallint     NOT NULL DEFAULT 0 CHECK (retry >= 0),
    max_retry       smallint     NOT NULL DEFAULT 5 CHECK (max_retry >= 1),
    available_at    timestamptz  NOT NULL DEFAULT now(),
    expires_at      timestamptz,
    locked_by       text,
    locked_until    timestamptz,
    -- Fencing token of the current lease: ack/fail/extend only act when the
    -- caller presents it, so a worker whose lease lapsed cannot touch the row.
    lock_token      uuid,
    last_error      text,
    idempotency_key text         UNIQUE
);

-- Serves claim: live rows in available_at order (the WHERE matches the
-- claim's `retry < max_retry`, so dead rows never bloat this index).
CREATE INDEX outbox_events_claim ON outbox_events (available_at) WHERE retry < max_retry;

-- Serves the group-head check of claim: "is there an earlier live event of
-- this group?" is one index probe on (group_id, seq < mine).
CREATE INDEX outbox_events_group_head ON outbox_events (group_id, seq)
    WHERE group_id IS NOT NULL AND retry < max_retry;

-- Serves expire_due: live rows that carry an expiry, soonest first.
CREATE INDEX outbox_events_expiry ON outbox_events (expires_at)
    WHERE expires_at IS NOT NULL AND retry < max_retry;

-- Serves cleanup_dead / purge_dead / `events list --dead`: dead rows by age.
CREATE INDEX outbox_events_dead ON outbox_events (create_date) WHERE retry >= max_retry;

-- Wake-up hint for LISTEN 'outrun_events'. Statement-level, so a batch insert
-- sends one notification; PostgreSQL also folds identical notifications of
-- one transaction into one and delivers them at commit.
CREATE OR REPLACE FUNCTION outrun_notify_events() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outrun_events', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER outbox_events_notify
    AFTER INSERT ON outbox_events
    FOR EACH STATEMENT EXECUTE FUNCTION outrun_notify_events();
