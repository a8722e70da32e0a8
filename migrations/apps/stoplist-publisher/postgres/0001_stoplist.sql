-- Menu data the stoplist-publisher handler reads (seed 003). In the
-- monolith these are its own tables (or views over them): which products
-- contain which ingredient, which products are baked in the oven, and
-- which products are on each unit's (mobile) menu.

CREATE TABLE IF NOT EXISTS stoplist_product_ingredient (
    product_id    UUID NOT NULL,
    ingredient_id UUID NOT NULL,
    PRIMARY KEY (ingredient_id, product_id)
);

CREATE TABLE IF NOT EXISTS stoplist_baking_product (
    product_id UUID PRIMARY KEY
);

CREATE TABLE IF NOT EXISTS stoplist_unit_menu_product (
    unit_id    UUID NOT NULL,
    product_id UUID NOT NULL,
    PRIMARY KEY (unit_id, product_id)
);
