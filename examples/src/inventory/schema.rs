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

/// The inventory tables. Idempotent (`IF NOT EXISTS`), run under an advisory
/// lock so replicas starting together do not race on the catalog.
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
