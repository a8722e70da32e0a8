-- order-route-sharing tables used by the family-sharing handler (seed 002).
CREATE SCHEMA IF NOT EXISTS order_route_sharing;

-- One key per shared ride (`order.rsk` of order-core).
CREATE TABLE IF NOT EXISTS order_route_sharing.sharing_keys (
    sharing_key VARCHAR(64)  PRIMARY KEY,
    order_id    VARCHAR(64)  NOT NULL,
    created_at  TIMESTAMPTZ  NOT NULL DEFAULT now()
);

-- Phones the ride is shared with.
CREATE TABLE IF NOT EXISTS order_route_sharing.phone_ids (
    sharing_key VARCHAR(64) NOT NULL
        REFERENCES order_route_sharing.sharing_keys (sharing_key) ON DELETE CASCADE,
    phone_id    VARCHAR(64) NOT NULL,
    PRIMARY KEY (sharing_key, phone_id)
);

-- The family a ride is shared with and whether sharing is on. The seed's DDL
-- makes admin_uid UNIQUE; that would allow one shared ride per family at a
-- time, so the ride (sharing_key) is the key here instead.
CREATE TABLE IF NOT EXISTS order_route_sharing.family_rides (
    sharing_key VARCHAR(64) PRIMARY KEY
        REFERENCES order_route_sharing.sharing_keys (sharing_key) ON DELETE CASCADE,
    admin_uid   BIGINT      NOT NULL,
    admin_name  VARCHAR     NOT NULL,
    sharing_on  BOOLEAN     NOT NULL
);
