//! The inventory's own tables, and where they live.
//!
//! Everything of this service — `stock`, `reservations`,
//! `reservation_items` and saga-postgres's store tables with their
//! `_sqlx_migrations` — lives in one schema of its own (`INVENTORY_SCHEMA`),
//! reached through the pool's `search_path`. So the service can share a
//! database with the order service without either one seeing the other's
//! inbox, outbox or migration history.

use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use std::time::Duration;

use sqlx::{Connection, Executor, PgConnection, PgPool};

use super::config::{Catalogue, SchemaName};

/// The inventory tables and its reservation function. Idempotent (`IF NOT
/// EXISTS`, `OR REPLACE`), run under an advisory lock so replicas starting
/// together do not race on the catalog.
const TABLES: &str = r"
CREATE TABLE IF NOT EXISTS stock (
    product_id text   PRIMARY KEY,
    available  bigint NOT NULL CHECK (available >= 0),
    reserved   bigint NOT NULL DEFAULT 0 CHECK (reserved >= 0)
);

-- One row per order seen: what was decided for it. It makes reservations and
-- releases idempotent per order, whatever the message ids.
CREATE TABLE IF NOT EXISTS reservations (
    order_id   text        PRIMARY KEY,
    status     text        NOT NULL CHECK (status IN ('reserved', 'rejected', 'released')),
    reason     text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS reservation_items (
    order_id   text   NOT NULL REFERENCES reservations (order_id),
    product_id text   NOT NULL REFERENCES stock (product_id),
    quantity   bigint NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (order_id, product_id)
);

-- Decides the orders `order_ids` as if one after another, each seeing what
-- the ones before it took: a whole batch of OrderCreated in one round trip.
-- Items come flattened: item k belongs to order `item_orders[k]` (1-based).
--
-- The orders are claimed first, all at once and in order-id order: an order
-- seen before (another message id, earlier in this batch, or a replica
-- racing us, which then waits on the claim) gets the first decision again.
-- Then the stock rows of the freshly claimed orders' products are locked,
-- in product order. If each holds those orders' whole demand, every one of
-- them is granted at once: one statement takes the units and records them.
-- Otherwise they are decided one after another: each finds the first
-- product short of stock and, only if there is none, takes the units and
-- records them; if there is, it is recorded as rejected, with the reason it
-- is answered with. Every order is then answered with what is recorded,
-- unless all were new and granted: then there is nothing to look up (a
-- fifth of the function's own time for a lone order).
CREATE OR REPLACE FUNCTION reserve_orders(
    order_ids text[], item_orders int[], item_products text[], item_quantities bigint[]
) RETURNS TABLE (granted boolean, refusal text, repeated boolean)
LANGUAGE plpgsql AS $fn$
DECLARE
    fresh boolean[];
    fits boolean;
    short_product text;
    short_available bigint;
    short_quantity bigint;
BEGIN
    WITH claim AS (INSERT INTO reservations (order_id, status)
                   SELECT DISTINCT o.id, 'reserved' FROM unnest(order_ids) AS o (id) ORDER BY 1
                   ON CONFLICT (order_id) DO NOTHING RETURNING order_id),
         marked AS (SELECT o.i, o.i = min(o.i) OVER (PARTITION BY o.id) AND c.order_id IS NOT NULL AS fresh
                    FROM unnest(order_ids) WITH ORDINALITY AS o (id, i) LEFT JOIN claim c ON c.order_id = o.id),
         demand AS (SELECT w.product_id, sum(w.quantity) AS quantity
                    FROM unnest(item_orders, item_products, item_quantities) AS w (o, product_id, quantity)
                    JOIN marked m ON m.i = w.o AND m.fresh GROUP BY w.product_id),
         locked AS (SELECT s.product_id, s.available FROM stock s
                    WHERE s.product_id IN (SELECT product_id FROM demand)
                    ORDER BY s.product_id FOR UPDATE OF s)
    SELECT (SELECT coalesce(array_agg(m.fresh ORDER BY m.i), '{}') FROM marked m),
           (SELECT bool_and(l.available IS NOT NULL AND l.available >= d.quantity) IS NOT FALSE
            FROM demand d LEFT JOIN locked l ON l.product_id = d.product_id)
    INTO fresh, fits;

    IF fits THEN
        WITH wanted AS (SELECT order_ids[w.o] AS order_id, w.product_id, w.quantity
                        FROM unnest(item_orders, item_products, item_quantities) AS w (o, product_id, quantity)
                        WHERE fresh[w.o]),
             taken AS (UPDATE stock SET available = stock.available - d.quantity,
                       reserved = stock.reserved + d.quantity
                       FROM (SELECT product_id, sum(quantity) AS quantity FROM wanted GROUP BY product_id) d
                       WHERE stock.product_id = d.product_id)
        INSERT INTO reservation_items (order_id, product_id, quantity)
        SELECT order_id, product_id, quantity FROM wanted;
    ELSE
        FOR i IN 1 .. coalesce(array_length(order_ids, 1), 0) LOOP
            CONTINUE WHEN NOT fresh[i];
            WITH wanted AS (SELECT w.product_id, w.quantity
                            FROM unnest(item_orders, item_products, item_quantities) AS w (o, product_id, quantity)
                            WHERE w.o = i),
                 locked AS (SELECT s.product_id, s.available FROM stock s JOIN wanted w ON w.product_id = s.product_id
                            ORDER BY s.product_id FOR UPDATE OF s),
                 short AS (SELECT w.product_id, l.available, w.quantity FROM wanted w
                           LEFT JOIN locked l ON l.product_id = w.product_id
                           WHERE l.available IS NULL OR l.available < w.quantity ORDER BY w.product_id LIMIT 1),
                 taken AS (UPDATE stock SET available = stock.available - w.quantity,
                           reserved = stock.reserved + w.quantity FROM wanted w
                           WHERE stock.product_id = w.product_id AND NOT EXISTS (SELECT 1 FROM short)),
                 items AS (INSERT INTO reservation_items (order_id, product_id, quantity)
                           SELECT order_ids[i], w.product_id, w.quantity FROM wanted w
                           WHERE NOT EXISTS (SELECT 1 FROM short))
            SELECT s.product_id, s.available, s.quantity
            INTO short_product, short_available, short_quantity
            FROM (SELECT 1) one LEFT JOIN short s ON true;

            IF short_product IS NOT NULL THEN
                UPDATE reservations SET status = 'rejected',
                       reason = CASE WHEN short_available IS NULL
                                     THEN format('unknown product `%s`', short_product)
                                     ELSE format('insufficient stock for `%s`: %s available, %s wanted',
                                                 short_product, short_available, short_quantity) END
                WHERE order_id = order_ids[i];
            END IF;
        END LOOP;
    END IF;

    IF fits AND NOT (false = ANY (fresh)) THEN
        -- Every order new and granted (the usual case): nothing to look up.
        FOR i IN 1 .. cardinality(order_ids) LOOP
            granted := true;
            refusal := NULL;
            repeated := false;
            RETURN NEXT;
        END LOOP;
        RETURN;
    END IF;

    RETURN QUERY
        SELECT r.status = 'reserved',
               CASE r.status WHEN 'reserved' THEN NULL
                             WHEN 'released' THEN 'the order was cancelled'
                             ELSE r.reason END,
               NOT fresh[o.i]
        FROM unnest(order_ids) WITH ORDINALITY AS o (id, i)
        -- One index probe per order: a join may be planned as a hash of
        -- the whole table.
        CROSS JOIN LATERAL (SELECT r.status, r.reason FROM reservations r
                            WHERE r.order_id = o.id LIMIT 1) r
        ORDER BY o.i;
END
$fn$;
";

/// An arbitrary constant: the advisory lock serializing inventory migrations.
const MIGRATION_LOCK: i64 = 0x696e_7665_6e74_6f72;

/// How long the first connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A pool whose connections use `schema` (only) as their `search_path`.
/// One connection is opened first, so an unreachable server or a wrong
/// password is reported as such (a pool would only say it timed out).
pub(crate) async fn pool(url: &str, schema: &SchemaName) -> Result<PgPool, sqlx::Error> {
    let options = PgConnectOptions::from_str(url)?
        .options([("search_path", schema.as_str())])
        .options(saga_postgres::SESSION_SETTINGS);
    let first = tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&options))
        .await
        .map_err(|_| {
            sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {CONNECT_TIMEOUT:?}"),
            ))
        })??;
    let _ = first.close().await;
    Ok(PgPoolOptions::new()
        .max_connections(10)
        .acquire_timeout(Duration::from_secs(5))
        // No ping per acquire, as in the order service: a dropped
        // connection fails its first statement, which is retried.
        .test_before_acquire(false)
        .connect_lazy_with(options))
}

/// Creates `schema`, saga-postgres's store tables and the inventory tables in
/// it (on `pool`, whose `search_path` must be `schema`), then adds the
/// products of `seed` that are missing. Safe to run again and from several
/// replicas at once.
pub async fn migrate(pool: &PgPool, schema: &SchemaName, seed: &Catalogue) -> Result<(), MigrateError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *tx)
        .await?;
    // `schema` is a parsed identifier (lower-case letters, digits, `_`): safe to splice.
    let create_schema = format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"");
    tx.execute(sqlx::raw_sql(sqlx::AssertSqlSafe(create_schema))).await?;
    tx.execute(sqlx::raw_sql(TABLES)).await?;
    tx.commit().await?;

    saga_postgres::migrate(pool).await?;

    let (products, units): (Vec<&str>, Vec<i64>) = seed
        .entries()
        .iter()
        .map(|(product, units)| (product.as_str(), i64::from(*units)))
        .unzip();
    sqlx::query(
        "INSERT INTO stock (product_id, available) SELECT * FROM UNNEST($1::text[], $2::bigint[]) \
         ON CONFLICT (product_id) DO NOTHING",
    )
    .bind(products)
    .bind(units)
    .execute(pool)
    .await?;
    Ok(())
}

/// Why the inventory tables could not be created or seeded. Usually the
/// database is down (start it) or the role may not create schemas.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrateError {
    /// A statement failed.
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
    /// saga-postgres's store migrations failed.
    #[error("saga store migrations: {0}")]
    Store(#[from] sqlx::migrate::MigrateError),
}
