-- Grants of rate tokens (runtime/src/store/postgres/limits.rs): an
-- instance takes a few claims' worth of tokens from a bucket in one UPDATE,
-- which records how many it granted here so RETURNING can report it (SET
-- computes it from the old balance, which RETURNING cannot see).
ALTER TABLE outrun_limits ADD COLUMN granted double precision NOT NULL DEFAULT 0;
