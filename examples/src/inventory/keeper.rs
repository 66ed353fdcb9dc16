//! The command handler: reservations and releases in SQL, inside the
//! participant's saga transaction (inbox row + outbox reply + these writes
//! commit together, or none of them).

use std::collections::BTreeMap;

use async_trait::async_trait;
use order_service::wire::{
    ORDER_CANCELLED, ORDER_CONFIRMED, ORDER_CREATED, OrderCancelled, OrderCreated, STOCK_UPDATE_RESULT,
    StockUpdateResult,
};
use saga_core::{Command, CommandHandler, Message, StepError, StoreError, Transaction};
use sqlx::{PgConnection, PgPool, Row};

/// The reservation key of an order id: a UUID in canonical (lower-case,
/// hyphenated) form, so `ABC…` and `abc…` are one order; other text as is.
pub fn order_key(order_id: &str) -> String {
    uuid::Uuid::parse_str(order_id.trim()).map_or_else(|_| order_id.to_owned(), |id| id.to_string())
}

/// Reserves stock on `OrderCreated`, replying `StockUpdateResult` to the
/// stock update exchange; releases it on `OrderCancelled`; keeps it on
/// `OrderConfirmed`. Run it in a [`saga_core::Participant`] over a
/// [`saga_postgres::PostgresStore`] whose pool uses the inventory schema.
///
/// Concurrency: stock rows are locked (`FOR UPDATE`, in product order) for
/// the rest of the transaction, so handlers may run in parallel and on
/// several replicas; a deadlock or serialization failure is retried.
#[derive(Clone, Debug)]
pub struct StockKeeper {
    reply_to: String,
}

impl StockKeeper {
    /// A keeper replying to `reply_to` (the stock update exchange).
    pub fn new(reply_to: impl Into<String>) -> Self {
        Self {
            reply_to: reply_to.into(),
        }
    }

    async fn reserve(&self, conn: &mut PgConnection, order: &OrderCreated) -> Result<StockUpdateResult, sqlx::Error> {
        let key = order_key(&order.order_id);
        let answer = |success: bool, reason: Option<String>| StockUpdateResult {
            order_id: order.order_id.clone(),
            success,
            reason,
        };
        let mut wanted: BTreeMap<&str, i64> = BTreeMap::new();
        for item in order.items.iter().filter(|i| i.quantity > 0) {
            *wanted.entry(item.product_id.as_str()).or_default() += i64::from(item.quantity);
        }
        let products: Vec<&str> = wanted.keys().copied().collect();
        let quantities: Vec<i64> = wanted.values().copied().collect();
        // One statement (a round trip each costs more than the work). It
        // claims the order first: a second OrderCreated for it (another
        // message id, or a replica racing us) waits on the claim, then finds
        // it taken and gets the first decision again. A claimed order locks
        // its stock rows in product order, finds the first product short of
        // stock, and only if there is none takes the units and records them.
        let row = sqlx::query(
            "WITH claim AS (INSERT INTO reservations (order_id, status) VALUES ($1, 'reserved') \
                            ON CONFLICT (order_id) DO NOTHING RETURNING order_id), \
             wanted AS (SELECT * FROM UNNEST($2::text[], $3::bigint[]) AS w (product_id, quantity) \
                        WHERE EXISTS (SELECT 1 FROM claim)), \
             locked AS (SELECT s.product_id, s.available FROM stock s JOIN wanted w ON w.product_id = s.product_id \
                        ORDER BY s.product_id FOR UPDATE OF s), \
             short AS (SELECT w.product_id, l.available, w.quantity FROM wanted w \
                       LEFT JOIN locked l ON l.product_id = w.product_id \
                       WHERE l.available IS NULL OR l.available < w.quantity ORDER BY w.product_id LIMIT 1), \
             taken AS (UPDATE stock SET available = stock.available - w.quantity, \
                       reserved = stock.reserved + w.quantity FROM wanted w \
                       WHERE stock.product_id = w.product_id AND NOT EXISTS (SELECT 1 FROM short)), \
             items AS (INSERT INTO reservation_items (order_id, product_id, quantity) \
                       SELECT $1, product_id, quantity FROM wanted WHERE NOT EXISTS (SELECT 1 FROM short)) \
             SELECT EXISTS (SELECT 1 FROM claim) AS claimed, s.product_id, s.available, s.quantity \
             FROM (SELECT 1) one LEFT JOIN short s ON true",
        )
        .bind(&key)
        .bind(&products)
        .bind(&quantities)
        .fetch_one(&mut *conn)
        .await?;
        let claimed: bool = row.try_get("claimed")?;
        if !claimed {
            let row = sqlx::query("SELECT status, reason FROM reservations WHERE order_id = $1")
                .bind(&key)
                .fetch_one(&mut *conn)
                .await?;
            let status: String = row.try_get("status")?;
            let reason: Option<String> = row.try_get("reason")?;
            tracing::info!(order_id = %key, %status, "order seen before: same answer");
            return Ok(match status.as_str() {
                "reserved" => answer(true, None),
                "released" => answer(false, Some("the order was cancelled".to_owned())),
                _ => answer(false, reason),
            });
        }
        let short: Option<String> = row.try_get("product_id")?;
        if let Some(product) = short {
            let units: Option<i64> = row.try_get("available")?;
            let quantity: i64 = row.try_get("quantity")?;
            let reason = match units {
                None => format!("unknown product `{product}`"),
                Some(units) => {
                    format!("insufficient stock for `{product}`: {units} available, {quantity} wanted")
                }
            };
            sqlx::query("UPDATE reservations SET status = 'rejected', reason = $2 WHERE order_id = $1")
                .bind(&key)
                .bind(&reason)
                .execute(&mut *conn)
                .await?;
            tracing::info!(order_id = %key, %reason, "order refused");
            return Ok(answer(false, Some(reason)));
        }
        tracing::info!(order_id = %key, products = products.len(), "stock reserved");
        Ok(answer(true, None))
    }

    async fn release(&self, conn: &mut PgConnection, cancelled: &OrderCancelled) -> Result<(), sqlx::Error> {
        let key = order_key(&cancelled.order_id);
        // Never seen: remember the order is gone, so a late OrderCreated
        // for it is refused rather than holding stock forever.
        let tombstone = sqlx::query(
            "INSERT INTO reservations (order_id, status, reason) \
             VALUES ($1, 'released', 'cancelled before any reservation') ON CONFLICT (order_id) DO NOTHING",
        )
        .bind(&key)
        .execute(&mut *conn)
        .await?
        .rows_affected()
            == 1;
        if tombstone {
            tracing::info!(order_id = %key, "cancelled before any reservation: nothing to release");
            return Ok(());
        }
        let released = sqlx::query(
            "UPDATE reservations SET status = 'released', reason = $2, updated_at = now() \
             WHERE order_id = $1 AND status = 'reserved'",
        )
        .bind(&key)
        .bind(&cancelled.reason)
        .execute(&mut *conn)
        .await?
        .rows_affected()
            == 1;
        if !released {
            tracing::info!(order_id = %key, "nothing reserved for this order: nothing to release");
            return Ok(());
        }
        // Lock in product order, like reservations, then give the units back.
        sqlx::query(
            "SELECT s.product_id FROM stock s JOIN reservation_items i ON i.product_id = s.product_id \
             WHERE i.order_id = $1 ORDER BY s.product_id FOR UPDATE OF s",
        )
        .bind(&key)
        .fetch_all(&mut *conn)
        .await?;
        sqlx::query(
            "UPDATE stock SET available = stock.available + i.quantity, reserved = stock.reserved - i.quantity \
             FROM reservation_items i WHERE i.order_id = $1 AND stock.product_id = i.product_id",
        )
        .bind(&key)
        .execute(&mut *conn)
        .await?;
        tracing::info!(order_id = %key, "stock released");
        Ok(())
    }
}

fn database(error: sqlx::Error) -> StepError {
    // Every database failure here is worth another delivery (connection
    // loss, deadlock, serialization failure); a persistent one ends in the
    // dead-letter queue after the consumer's retry policy.
    StepError::retryable(format!("database: {error}"))
}

fn store(error: StoreError) -> StepError {
    if error.is_retryable() {
        StepError::retryable(error.to_string())
    } else {
        StepError::terminal(error.to_string())
    }
}

#[async_trait]
impl CommandHandler for StockKeeper {
    async fn handle(&self, tx: &mut dyn Transaction, command: &Message) -> Result<Vec<Command>, StepError> {
        match command.kind.as_str() {
            ORDER_CREATED => {
                let order: OrderCreated = command.decode()?;
                let conn = saga_postgres::connection(tx).await.map_err(store)?;
                let result = self.reserve(conn, &order).await.map_err(database)?;
                Ok(vec![Command::json(STOCK_UPDATE_RESULT, &self.reply_to, &result)?])
            }
            ORDER_CANCELLED => {
                let cancelled: OrderCancelled = command.decode()?;
                let conn = saga_postgres::connection(tx).await.map_err(store)?;
                self.release(conn, &cancelled).await.map_err(database)?;
                Ok(Vec::new())
            }
            // The reservation simply stands.
            ORDER_CONFIRMED => Ok(Vec::new()),
            other => Err(StepError::terminal(format!(
                "the inventory service does not handle messages of type `{other}`"
            ))),
        }
    }
}

/// One product's stock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StockLevel {
    /// The product.
    pub product_id: String,
    /// Units that can still be reserved.
    pub available: i64,
    /// Units held by orders.
    pub reserved: i64,
}

/// What was decided for an order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReservationStatus {
    /// Its items are held.
    Reserved,
    /// It could not be served; nothing is held.
    Rejected,
    /// It was cancelled; nothing is held (any stock was given back).
    Released,
}

/// An order's reservation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    /// The decision.
    pub status: ReservationStatus,
    /// Why, for refusals and releases.
    pub reason: Option<String>,
    /// What it holds or held: product and units.
    pub items: Vec<(String, i64)>,
}

/// Reads of the inventory tables (for operators and tests). The pool must
/// use the inventory schema.
#[derive(Clone, Debug)]
pub struct Inventory {
    pool: PgPool,
}

impl Inventory {
    /// Reads through `pool`.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// The pool (its `search_path` is the inventory schema).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// `product`'s stock, if it is in the catalogue.
    pub async fn level(&self, product: &str) -> Result<Option<StockLevel>, sqlx::Error> {
        let row = sqlx::query("SELECT product_id, available, reserved FROM stock WHERE product_id = $1")
            .bind(product)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| level(&row)).transpose()
    }

    /// Every product's stock, by product id.
    pub async fn levels(&self) -> Result<Vec<StockLevel>, sqlx::Error> {
        let rows = sqlx::query("SELECT product_id, available, reserved FROM stock ORDER BY product_id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(level).collect()
    }

    /// The reservation of `order_id`, if the order was seen.
    pub async fn reservation(&self, order_id: &str) -> Result<Option<Reservation>, sqlx::Error> {
        let key = order_key(order_id);
        let Some(row) = sqlx::query("SELECT status, reason FROM reservations WHERE order_id = $1")
            .bind(&key)
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        let status: String = row.try_get("status")?;
        let status = match status.as_str() {
            "reserved" => ReservationStatus::Reserved,
            "rejected" => ReservationStatus::Rejected,
            "released" => ReservationStatus::Released,
            other => {
                return Err(sqlx::Error::Decode(
                    format!("unknown reservation status `{other}`").into(),
                ));
            }
        };
        let items =
            sqlx::query("SELECT product_id, quantity FROM reservation_items WHERE order_id = $1 ORDER BY product_id")
                .bind(&key)
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(|row| Ok((row.try_get("product_id")?, row.try_get("quantity")?)))
                .collect::<Result<_, sqlx::Error>>()?;
        Ok(Some(Reservation {
            status,
            reason: row.try_get("reason")?,
            items,
        }))
    }
}

fn level(row: &sqlx::postgres::PgRow) -> Result<StockLevel, sqlx::Error> {
    Ok(StockLevel {
        product_id: row.try_get("product_id")?,
        available: row.try_get("available")?,
        reserved: row.try_get("reserved")?,
    })
}
