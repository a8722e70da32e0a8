-- Menu data the stoplist-publisher handler reads (seed 003); see the
-- PostgreSQL migration. UUIDs are lowercase hyphenated text here.

CREATE TABLE IF NOT EXISTS stoplist_product_ingredient (
    product_id    TEXT NOT NULL,
    ingredient_id TEXT NOT NULL,
    PRIMARY KEY (ingredient_id, product_id)
);

CREATE TABLE IF NOT EXISTS stoplist_baking_product (
    product_id TEXT PRIMARY KEY
);

CREATE TABLE IF NOT EXISTS stoplist_unit_menu_product (
    unit_id    TEXT NOT NULL,
    product_id TEXT NOT NULL,
    PRIMARY KEY (unit_id, product_id)
);
