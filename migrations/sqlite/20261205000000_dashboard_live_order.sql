-- The dashboard's events browser (GET /v1/events, live states) lists live
-- events oldest first (create_date, then rowid), a page at a time; every
-- SQLite index ends in the rowid, so this one serves that order whole.
CREATE INDEX outbox_events_live_created ON outbox_events (create_date)
    WHERE retry < max_retry;
