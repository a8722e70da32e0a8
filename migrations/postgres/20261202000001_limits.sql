-- Limits (outrun-owned; see runtime/src/limits.rs).

-- outrun_limits: one row per [[limit]]. A rate limit's token bucket
-- (`tokens` left as of `refilled_at`); for every limit, the row lock
-- that makes its claims take turns across instances, so a budget or a
-- per-key count is never read by two claims at once.
CREATE TABLE outrun_limits (
    name        text PRIMARY KEY,
    tokens      double precision NOT NULL DEFAULT 0,
    refilled_at timestamptz NOT NULL DEFAULT now()
);
