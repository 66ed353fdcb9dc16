use std::str::FromStr;

use async_trait::async_trait;
use rust_decimal::Decimal;
use saga_core::{EffectHandler, SagaInstance, StepError, StoreError, Transaction};
use saga_postgres::StagedWrite;
use sqlx::{PgPool, Row};

use super::{OrderRepository, RepositoryError};
use crate::domain::{Order, OrderId, OrderItem, OrderStatus, UserId};
use crate::saga::OrderEffect;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// The `orders` and `order_items` tables in PostgreSQL, written by the order
/// saga's effects inside the saga's own transaction: staged in its commit
/// statement (see [`saga_postgres::stage`]).
#[derive(Clone)]
pub struct PostgresOrders {
    pool: PgPool,
}

impl PostgresOrders {
    /// The tables reached through `pool`; run [`migrate`](Self::migrate) first.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Creates or upgrades the tables in schema `order_service`, with their own
    /// migration history (so they never collide with saga-postgres's). Safe
    /// when replicas start together.
    pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
        let mut conn = pool.acquire().await?;
        sqlx::query("CREATE SCHEMA IF NOT EXISTS order_service")
            .execute(&mut *conn)
            .await?;
        sqlx::query("SET search_path TO order_service")
            .execute(&mut *conn)
            .await?;
        let migrated = MIGRATOR.run(&mut *conn).await;
        // Never hand a connection with a changed search path back to the pool.
        conn.detach();
        migrated
    }
}

fn store_error(error: StoreError) -> StepError {
    if error.is_retryable() {
        StepError::retryable(error.to_string())
    } else {
        StepError::terminal(error.to_string())
    }
}

#[async_trait]
impl EffectHandler<OrderEffect> for PostgresOrders {
    async fn apply(
        &self,
        tx: &mut dyn Transaction,
        _saga: &SagaInstance,
        effects: Vec<OrderEffect>,
    ) -> Result<(), StepError> {
        // Staged: the writes travel in the transition's own statement (one
        // round trip, no BEGIN/COMMIT) and commit or roll back with it. Row-wise,
        // so that concurrent transitions' writes merge into one per kind.
        for effect in effects {
            let write = match effect {
                OrderEffect::Insert(order) => {
                    let id = *order.id.as_uuid();
                    saga_postgres::stage(
                        tx,
                        StagedWrite::rows(
                            "INSERT INTO order_service.orders (id, user_id, total_price, status) \
                             SELECT u.id, u.user_id, u.total::numeric, u.status \
                             FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[]) AS u(id, user_id, total, status)",
                        )
                        .column(vec![id])
                        .column(vec![order.user_id.as_str().to_owned()])
                        .column(vec![order.total.to_string()])
                        .column(vec![order.status.as_str()]),
                    )
                    .map_err(store_error)?;
                    let items = &order.items;
                    StagedWrite::rows(
                        "INSERT INTO order_service.order_items (order_id, position, product_id, quantity, price) \
                         SELECT i.order_id, i.position, i.product_id, i.quantity, i.price::numeric \
                         FROM UNNEST($1::uuid[], $2::int4[], $3::text[], $4::int4[], $5::text[]) \
                         AS i(order_id, position, product_id, quantity, price)",
                    )
                    .column(vec![id; items.len()])
                    .column(
                        (0..items.len())
                            .map(|n| i32::try_from(n).unwrap_or(i32::MAX))
                            .collect::<Vec<_>>(),
                    )
                    .column(
                        items
                            .iter()
                            .map(|i| i.product_id.as_str().to_owned())
                            .collect::<Vec<_>>(),
                    )
                    .column(
                        items
                            .iter()
                            .map(|i| i32::try_from(i.quantity.get()).unwrap_or(i32::MAX))
                            .collect::<Vec<_>>(),
                    )
                    .column(items.iter().map(|i| i.price.to_string()).collect::<Vec<_>>())
                }
                // Looked up by `id = ANY`, not joined to the arrays: an index
                // scan in any plan, however small the table was when planned.
                OrderEffect::SetStatus(id, status) => StagedWrite::rows(
                    "UPDATE order_service.orders \
                     SET status = ($2::text[])[array_position($1::uuid[], id)], updated_at = now() \
                     WHERE id = ANY($1::uuid[])",
                )
                .column(vec![*id.as_uuid()])
                .column(vec![status.as_str()])
                // Only this order's row: such writes may share a statement.
                .touching(format!("order_service.orders/{id}")),
            };
            saga_postgres::stage(tx, write).map_err(store_error)?;
        }
        Ok(())
    }
}

fn read_error(id: OrderId) -> impl Fn(sqlx::Error) -> RepositoryError {
    move |error| match error {
        // The store's classification (an outage, a failover, a timeout),
        // and any other connection (08) or operator (57) trouble.
        error if saga_postgres::is_transient(&error) || matches!(error, sqlx::Error::PoolClosed) => {
            RepositoryError::Unavailable(Box::new(error))
        }
        sqlx::Error::Database(db) if db.code().is_some_and(|c| c.starts_with("57") || c.starts_with("08")) => {
            RepositoryError::Unavailable(db.into())
        }
        other => RepositoryError::Corrupt {
            id,
            source: Box::new(other),
        },
    }
}

fn corrupt(id: OrderId, what: impl std::fmt::Display) -> RepositoryError {
    RepositoryError::Corrupt {
        id,
        source: what.to_string().into(),
    }
}

#[async_trait]
impl OrderRepository for PostgresOrders {
    #[tracing::instrument(
        name = "db.get_order",
        skip(self),
        fields(otel.kind = "client", db.system = "postgresql", order_id = %id)
    )]
    async fn get(&self, id: OrderId, owner: &UserId) -> Result<Option<Order>, RepositoryError> {
        // One statement, filtered by owner: another user's order costs what
        // a missing one does, so the answer's timing tells nothing either.
        let rows = sqlx::query(
            "SELECT o.status, i.product_id, i.quantity, i.price::text AS price \
             FROM order_service.orders o \
             LEFT JOIN order_service.order_items i ON i.order_id = o.id \
             WHERE o.id = $1 AND o.user_id = $2 ORDER BY i.position",
        )
        .bind(id.as_uuid())
        .bind(owner.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(read_error(id))?;
        let Some(first) = rows.first() else {
            return Ok(None);
        };

        let text = |row: &sqlx::postgres::PgRow, column: &str| -> Result<String, RepositoryError> {
            row.try_get::<String, _>(column).map_err(|e| corrupt(id, e))
        };
        let decimal = |value: String| -> Result<f64, RepositoryError> {
            let exact = Decimal::from_str(&value).map_err(|e| corrupt(id, e))?;
            f64::from_str(&exact.to_string()).map_err(|e| corrupt(id, e))
        };
        let mut items = Vec::with_capacity(rows.len());
        for row in &rows {
            // No item: the join found none (a corrupt order; `place` says so).
            let Some(product) = row
                .try_get::<Option<String>, _>("product_id")
                .map_err(|e| corrupt(id, e))?
            else {
                continue;
            };
            let quantity: i32 = row.try_get("quantity").map_err(|e| corrupt(id, e))?;
            let price = decimal(text(row, "price")?)?;
            items.push(OrderItem::parse(product, quantity, price).map_err(|e| corrupt(id, e))?);
        }
        let status: OrderStatus = text(first, "status")?.parse().map_err(|e| corrupt(id, e))?;
        let mut order = Order::place(id, owner.clone(), items).map_err(|e| corrupt(id, e))?;
        order.status = status;
        Ok(Some(order))
    }
}
