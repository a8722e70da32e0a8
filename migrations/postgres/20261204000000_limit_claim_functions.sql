-- Per-key claims in one round trip (runtime/src/store/postgres/limits.rs).
--
-- A per-key claim must count the events leased per key *after* it holds
-- its limit's row lock, so that it sees the leases of the claim that held
-- the lock before it. One SQL statement cannot: its snapshot is taken when
-- it starts, before it waits for the lock. A volatile PL/pgSQL function
-- takes a fresh snapshot for each statement inside it, so these two lock
-- the row and then count; the claim statement calls one of them and takes
-- its rows (rows changed by other claims since its own snapshot are
-- re-checked by FOR UPDATE SKIP LOCKED, as in every claim).

-- Take the lock of `limit_name`'s row, making the row on the limit's
-- first claim anywhere.
CREATE FUNCTION outrun_limit_lock(limit_name text) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM 1 FROM outrun_limits WHERE name = limit_name FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO outrun_limits (name) VALUES (limit_name) ON CONFLICT (name) DO NOTHING;
        PERFORM 1 FROM outrun_limits WHERE name = limit_name FOR UPDATE;
    END IF;
END
$$;

-- Events of `names` leased now, anywhere, counted after taking the lock
-- of `limit_name`'s row. Leased rows sort at their lease's end in the
-- claim index.
CREATE FUNCTION outrun_limit_leased(limit_name text, names text[]) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    n bigint;
BEGIN
    PERFORM outrun_limit_lock(limit_name);
    SELECT count(*) INTO n FROM outbox_events e
     WHERE e.retry < e.max_retry AND e.available_at > now()
       AND e.lock_token IS NOT NULL AND e.locked_until > now()
       AND e.name = ANY(names);
    RETURN n;
END
$$;

-- The same events counted per key: the payload's value at `pointer` (a
-- path of segments) or, with `by_group`, the group id; `fallback` for
-- events without one.
CREATE FUNCTION outrun_limit_running(
    limit_name text, names text[], pointer text[], by_group boolean, fallback text
) RETURNS TABLE (k text, n bigint)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM outrun_limit_lock(limit_name);
    RETURN QUERY
    SELECT CASE WHEN by_group THEN COALESCE(e.group_id, fallback)
                ELSE COALESCE(e.payload::jsonb #>> pointer, fallback) END,
           count(*)
      FROM outbox_events e
     WHERE e.retry < e.max_retry AND e.available_at > now()
       AND e.lock_token IS NOT NULL AND e.locked_until > now()
       AND e.name = ANY(names)
     GROUP BY 1;
END
$$;
