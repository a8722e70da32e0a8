-- order-route-sharing tables used by the family-sharing handler (seed 002).
-- SQLite has no schemas: same tables without the `order_route_sharing.`
-- prefix (the handler's `table_prefix` config is "" on SQLite).

-- One key per shared ride (`order.rsk` of order-core).
CREATE TABLE IF NOT EXISTS sharing_keys (
    sharing_key TEXT PRIMARY KEY,
    order_id    TEXT NOT NULL,
    created_at  TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
);

-- Phones the ride is shared with.
CREATE TABLE IF NOT EXISTS phone_ids (
    sharing_key TEXT NOT NULL REFERENCES sharing_keys (sharing_key) ON DELETE CASCADE,
    phone_id    TEXT NOT NULL,
    PRIMARY KEY (sharing_key, phone_id)
);

-- The family a ride is shared with and whether sharing is on (keyed by ride;
-- see the PostgreSQL migration for why not by admin_uid as in the seed).
CREATE TABLE IF NOT EXISTS family_rides (
    sharing_key TEXT PRIMARY KEY REFERENCES sharing_keys (sharing_key) ON DELETE CASCADE,
    admin_uid   INTEGER NOT NULL,
    admin_name  TEXT    NOT NULL,
    sharing_on  BOOLEAN NOT NULL
);
