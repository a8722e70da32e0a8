-- The application table the example handler writes (SQLite and PostgreSQL).
CREATE TABLE IF NOT EXISTS order_tiers (
    order_id BIGINT PRIMARY KEY,
    tier TEXT NOT NULL
);
