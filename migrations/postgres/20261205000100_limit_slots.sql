-- Per-key claims that cannot bind run side by side
-- (runtime/src/store/postgres/limits.rs).
--
-- Until now every per-key claim of a limit took the limit's row lock, so
-- the claims of one limit ran one at a time, even the two an instance
-- keeps in flight, and a per-key limit that never binds cost ~20% of the
-- drain. Now a limit has 4 slot rows. A claim that takes at most 1024
-- events tries to lock one slot (SKIP LOCKED); holding it, it counts the
-- events leased now with a fresh snapshot, and if those plus 4 claims of
-- 1024 cannot exceed per_key, it claims without keys next to the claims
-- holding the other slots. Every other claim locks all 4 slots, in slot
-- order, and counts as before (per key when the limit can bind).
--
-- Why that cannot overshoot: at most 4 claims hold slots at once, each
-- takes at most 1024 events, and each was let in only when the leases
-- committed before it plus 4 x 1024 fit; a claim holding all slots runs
-- alone and counts every committed lease. So leased events never exceed
-- per_key.

CREATE TABLE outrun_limit_slots (
    name text NOT NULL,
    slot int NOT NULL,
    PRIMARY KEY (name, slot)
);

-- Lock every slot of `limit_name`, making them (and the limit's row) on
-- the limit's first claim anywhere. Replaces the version that locked the
-- limit's row: a binary of the previous version calls this too, so it
-- takes turns with the new shared claims.
CREATE OR REPLACE FUNCTION outrun_limit_lock(limit_name text) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    got int;
BEGIN
    PERFORM 1 FROM outrun_limit_slots WHERE name = limit_name ORDER BY slot FOR UPDATE;
    GET DIAGNOSTICS got = ROW_COUNT;
    IF got < 4 THEN
        INSERT INTO outrun_limits (name) VALUES (limit_name) ON CONFLICT (name) DO NOTHING;
        INSERT INTO outrun_limit_slots (name, slot)
            SELECT limit_name, s FROM generate_series(0, 3) s
            ON CONFLICT (name, slot) DO NOTHING;
        PERFORM 1 FROM outrun_limit_slots WHERE name = limit_name ORDER BY slot FOR UPDATE;
    END IF;
END
$$;

-- Whether a claim of up to `budget` events of `names` may take them
-- without computing keys (per_key `per_key`). Tries the shared way first
-- (one slot); a claim that gets no slot, or whose slot's count is too
-- close to per_key, gives its slot back (the block's subtransaction rolls
-- back, releasing the row lock, so two such claims cannot deadlock
-- waiting for each other's slot) and locks every slot.
CREATE FUNCTION outrun_limit_gate(limit_name text, names text[], budget bigint, per_key bigint)
RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    n bigint;
BEGIN
    IF budget <= 1024 THEN
        BEGIN
            PERFORM 1 FROM outrun_limit_slots WHERE name = limit_name
                ORDER BY slot LIMIT 1 FOR UPDATE SKIP LOCKED;
            IF FOUND THEN
                SELECT count(*) INTO n FROM outbox_events e
                 WHERE e.retry < e.max_retry AND e.available_at > now()
                   AND e.lock_token IS NOT NULL AND e.locked_until > now()
                   AND e.name = ANY(names);
                IF n + 4 * 1024 <= per_key THEN
                    RETURN true;
                END IF;
                RAISE EXCEPTION USING ERRCODE = 'OR001';
            END IF;
        EXCEPTION WHEN SQLSTATE 'OR001' THEN
            NULL;
        END;
    END IF;
    RETURN outrun_limit_leased(limit_name, names) + budget <= per_key;
END
$$;
