-- Per-key claims that cannot bind no longer count the leased events
-- (runtime/src/store/postgres/limits.rs).
--
-- A shared claim (20261205000100) counted the limit's leased events on
-- every claim: ~0.6 ms per 1,000 leased events, which kept a per-key limit
-- that never binds at ~0.85-0.89 of the plain drain. Now the slots carry
-- an upper bound of the leased events instead, kept by the claims
-- themselves:
--
-- * a claim that locks every slot counts the leased events (as before)
--   and sets the bound to that count plus its own budget (slot 0 holds
--   it, the other slots 0);
-- * a shared claim (one slot) reads the sum of the slots' bounds and, if
--   it plus 4 claims of 1024 fits per_key, adds its budget to its slot's
--   bound and claims without keys; otherwise it locks every slot and
--   counts, which resets the bound.
--
-- Why the sum stays an upper bound: every lease of the limit's names is
-- taken by a claim that holds a slot. A claim holding every slot runs
-- alone, so its count sees every committed lease and no claim is half
-- done; each claim after it adds its whole budget (not what it got) to a
-- bound in its own transaction, so a committed lease is always covered by
-- a committed bound. Claims still in flight hold slots (at most 4, at most
-- 1024 events each): the 4 x 1024 of headroom covers them, as before.
-- Acks and releases only lower the true count; the bound falls back to it
-- at the next count.
--
-- Paths that lock every slot without knowing a budget (outrun_limit_lock,
-- which a binary of an earlier version calls for every per-key claim)
-- poison the bound, so the next shared claim counts. The keyed count
-- after the gate's own count (same claim, same transaction) does not: the
-- gate's bound already holds that claim's budget.

ALTER TABLE outrun_limit_slots
    ADD COLUMN bound bigint NOT NULL DEFAULT 1152921504606846976;

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
    -- The caller's claim is not counted in any bound, unless this
    -- transaction set the bound itself (outrun_limit_gate, before the
    -- keyed count of the same claim: its budget is in the bound).
    UPDATE outrun_limit_slots SET bound = 1152921504606846976
     WHERE name = limit_name AND slot = 0 AND xmin <> xid(pg_current_xact_id());
END
$$;

CREATE OR REPLACE FUNCTION outrun_limit_gate(limit_name text, names text[], budget bigint, per_key bigint)
RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    n bigint;
    s int;
BEGIN
    IF budget <= 1024 THEN
        BEGIN
            SELECT slot INTO s FROM outrun_limit_slots WHERE name = limit_name
                ORDER BY slot LIMIT 1 FOR UPDATE SKIP LOCKED;
            IF FOUND THEN
                SELECT sum(bound) INTO n FROM outrun_limit_slots WHERE name = limit_name;
                IF n + 4 * 1024 <= per_key THEN
                    UPDATE outrun_limit_slots SET bound = bound + budget
                     WHERE name = limit_name AND slot = s;
                    RETURN true;
                END IF;
                RAISE EXCEPTION USING ERRCODE = 'OR001';
            END IF;
        EXCEPTION WHEN SQLSTATE 'OR001' THEN
            NULL;
        END;
    END IF;
    n := outrun_limit_leased(limit_name, names);
    UPDATE outrun_limit_slots SET bound = CASE WHEN slot = 0 THEN n + budget ELSE 0 END
     WHERE name = limit_name;
    RETURN n + budget <= per_key;
END
$$;
