-- The order service's own tables, in schema `order_service` (which also
-- holds this migrator's bookkeeping, apart from saga-postgres's).
-- Rows are written by the order saga's effects, in the saga's transaction.
CREATE TABLE orders (
    id          UUID PRIMARY KEY,
    user_id     TEXT NOT NULL,
    total_price NUMERIC NOT NULL CHECK (total_price >= 0),
    status      TEXT NOT NULL CHECK (status IN ('PENDING', 'CONFIRMED', 'CANCELLED')),
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX orders_user_id ON orders (user_id);

CREATE TABLE order_items (
    order_id   UUID NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    position   INTEGER NOT NULL,
    product_id TEXT NOT NULL,
    quantity   INTEGER NOT NULL CHECK (quantity >= 1),
    price      NUMERIC NOT NULL CHECK (price >= 0),
    PRIMARY KEY (order_id, position)
);
