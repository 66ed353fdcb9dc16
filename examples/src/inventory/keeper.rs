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
///
/// The `OrderCreated` of a shared transaction are decided together, in one
/// round trip (the schema's `reserve_orders` function), exactly as one
/// after another; a single command takes the same path.
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

    /// `StockUpdateResult` replies to `orders`, decided in `tx`.
    async fn reserve_all(&self, tx: &mut dyn Transaction, orders: &[OrderCreated]) -> Result<Vec<Command>, StepError> {
        let conn = saga_postgres::connection(tx).await.map_err(store)?;
        let answers = self.reserve(conn, orders).await.map_err(database)?;
        answers
            .iter()
            .map(|answer| Command::json(STOCK_UPDATE_RESULT, &self.reply_to, answer).map_err(StepError::from))
            .collect()
    }

    /// Decides `orders` as if one after another, in one round trip (the
    /// `reserve_orders` function: see the schema), each seeing what the
    /// ones before it took, and answers each.
    async fn reserve(
        &self,
        conn: &mut PgConnection,
        orders: &[OrderCreated],
    ) -> Result<Vec<StockUpdateResult>, sqlx::Error> {
        let keys: Vec<String> = orders.iter().map(|order| order_key(&order.order_id)).collect();
        let (mut item_orders, mut products, mut quantities) = (Vec::new(), Vec::new(), Vec::new());
        for (position, order) in (1_i32..).zip(orders) {
            let mut wanted: BTreeMap<&str, i64> = BTreeMap::new();
            for item in order.items.iter().filter(|i| i.quantity > 0) {
                *wanted.entry(item.product_id.as_str()).or_default() += i64::from(item.quantity);
            }
            for (product, quantity) in wanted {
                item_orders.push(position);
                products.push(product);
                quantities.push(quantity);
            }
        }
        let rows = sqlx::query("SELECT granted, refusal, repeated FROM reserve_orders($1, $2, $3, $4)")
            .bind(&keys)
            .bind(&item_orders)
            .bind(&products)
            .bind(&quantities)
            .fetch_all(&mut *conn)
            .await?;
        if rows.len() != orders.len() {
            return Err(sqlx::Error::Protocol(format!(
                "reserve_orders answered {} of {} orders",
                rows.len(),
                orders.len()
            )));
        }
        let mut answers = Vec::with_capacity(orders.len());
        for ((order, key), row) in orders.iter().zip(&keys).zip(rows) {
            let success: bool = row.try_get("granted")?;
            let reason: Option<String> = row.try_get("refusal")?;
            let repeated: bool = row.try_get("repeated")?;
            match (repeated, success) {
                (true, _) => tracing::info!(order_id = %key, success, "order seen before: same answer"),
                (false, true) => tracing::info!(order_id = %key, products = order.items.len(), "stock reserved"),
                (false, false) => tracing::info!(order_id = %key, reason = reason.as_deref(), "order refused"),
            }
            answers.push(StockUpdateResult {
                order_id: order.order_id.clone(),
                success,
                reason,
            });
        }
        Ok(answers)
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
        // Only informational, and PostgreSQL refuses a NUL in a text: were
        // it kept, the cancellation could never be applied and the stock
        // would stay reserved.
        .bind(cancelled.reason.replace('\0', ""))
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
    // Connection loss, a deadlock, a server restarting: another delivery
    // may succeed. A value the server refuses (a NUL in a text) fails
    // every time: dead-lettered at once rather than after minutes of retries.
    if saga_postgres::is_transient(&error) {
        StepError::retryable(format!("database: {error}"))
    } else {
        StepError::terminal(format!("database: {error}"))
    }
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
                let mut replies = self.reserve_all(tx, &[order]).await?;
                Ok(vec![replies.pop().ok_or_else(|| StepError::terminal("no answer"))?])
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

    /// Each run of consecutive `OrderCreated` in one round trip; the other
    /// commands one by one, in order.
    async fn handle_batch(
        &self,
        tx: &mut dyn Transaction,
        commands: &[&Message],
    ) -> Result<Vec<Vec<Command>>, StepError> {
        let mut replies = Vec::with_capacity(commands.len());
        let mut rest = commands;
        while let Some(first) = rest.first() {
            let run = rest.iter().take_while(|c| c.kind == ORDER_CREATED).count();
            if run == 0 {
                replies.push(self.handle(tx, first).await?);
                rest = &rest[1..];
                continue;
            }
            let orders = rest[..run]
                .iter()
                .map(|command| command.decode::<OrderCreated>())
                .collect::<Result<Vec<_>, _>>()?;
            replies.extend(
                self.reserve_all(tx, &orders)
                    .await?
                    .into_iter()
                    .map(|reply| vec![reply]),
            );
            rest = &rest[run..];
        }
        Ok(replies)
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
