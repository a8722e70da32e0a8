-- The claim orders by (available_at, seq). With an index on available_at
-- alone the planner had to sort every live row for each claim once the
-- table held ~100k events (a 50 ms external merge sort, plus JIT, per claim
-- instead of a 3 ms index walk); with seq in the index the claim reads the
-- first rows in order and stops at its LIMIT.
DROP INDEX outbox_events_claim;
CREATE INDEX outbox_events_claim ON outbox_events (available_at, seq) WHERE retry < max_retry;
