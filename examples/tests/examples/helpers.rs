//! A fresh database and unique broker names per test, the inventory service
//! running in-process, and a broker client speaking the platform's wire
//! format.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use order_service::config::SecretUrl;
use order_service::wire::{
    ORDER_CANCELLED, ORDER_CREATED, OrderCancelled, OrderCreated, OrderCreatedItem, StockUpdateResult, WireNames,
};
use saga_amqp::{AmqpConfig, AmqpTransport, ExchangeKind, Topology};
use saga_core::{CancellationToken, Message, Publisher, Settlement, Subscriber, Subscription};
use saga_examples::inventory::{Inventory, InventoryConfig, InventoryNames, InventoryService, StockLevel};
use sqlx::Connection;
use tokio::task::JoinHandle;

/// How long anything asynchronous may take before a test gives up.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Time between polls.
const POLL: Duration = Duration::from_millis(25);

fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

fn rabbitmq_url() -> String {
    std::env::var("RABBITMQ_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// Polls `probe` until it returns `Some`, at most [`PATIENCE`] long.
pub async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let max_polls = PATIENCE.as_millis() / POLL.as_millis() + 1;
    for _ in 0..max_polls {
        if let Some(value) = probe().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    panic!("{what}: not within {PATIENCE:?}");
}

/// A fresh database and broker names of this test's own; dropped (database,
/// exchanges, queues and their dead-letter queues) when it goes out of scope.
pub struct TestEnv {
    database: String,
    /// The fresh database's URL.
    pub database_url: String,
    /// The inventory's names (the exchanges are the order service's too).
    pub names: InventoryNames,
    /// The order service's names.
    pub wire: WireNames,
    /// A queue bound to the stock update exchange, read by [`Broker`].
    pub replies_queue: String,
}

impl TestEnv {
    /// Creates the database; fails the test, saying what to start, when
    /// PostgreSQL or RabbitMQ cannot be reached.
    pub async fn new() -> Self {
        let suffix = uuid::Uuid::now_v7().simple().to_string();
        let admin = database_url();
        let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap_or_else(|e| {
            panic!(
                "PostgreSQL is not reachable at DATABASE_URL ({e}); start it, e.g. \
                 `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`"
            )
        });
        let database = format!("saga_examples_{suffix}");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {database}")))
            .execute(&mut conn)
            .await
            .expect("the test database is created");
        let _ = conn.close().await;
        let base = admin.rsplit_once('/').map_or(admin.as_str(), |(base, _)| base);
        let probe = saga_amqp::lapin::Connection::connect(&rabbitmq_url(), Default::default())
            .await
            .unwrap_or_else(|e| {
                panic!("RabbitMQ is not reachable at RABBITMQ_URL ({e}); start it: `rabbitmq-server -detached`")
            });
        let _ = probe.close(0, "probe".into()).await;
        let wire = WireNames {
            orders_exchange: format!("orders_exchange_{suffix}"),
            stock_update_exchange: format!("stock_update_exchange_{suffix}"),
            stock_update_queue: format!("order_service_stock_update_queue_{suffix}"),
            order_confirmed_exchange: format!("order_confirmed_exchange_{suffix}"),
            order_cancelled_exchange: format!("order_cancelled_exchange_{suffix}"),
        };
        Self {
            database_url: format!("{base}/{database}"),
            database,
            names: InventoryNames::beside(
                &wire,
                format!("inventory_orders_{suffix}"),
                format!("inventory_cancelled_{suffix}"),
            ),
            wire,
            replies_queue: format!("test_replies_{suffix}"),
        }
    }

    /// The inventory's configuration for this test, with `seed` (`p1=100,p2=5`).
    pub fn inventory_config(&self, seed: &str) -> InventoryConfig {
        InventoryConfig {
            database_url: SecretUrl::new(self.database_url.clone()),
            rabbitmq_url: SecretUrl::new(rabbitmq_url()),
            seed: seed.parse().expect("a valid seed"),
            names: self.names.clone(),
            // One at a time: a queue is then handled in publishing order, so
            // a later message being handled proves the earlier ones were.
            concurrency: 1,
            ..InventoryConfig::default()
        }
    }

    /// Starts the inventory service with `seed`.
    pub async fn spawn_inventory(&self, seed: &str) -> RunningInventory {
        self.spawn_inventory_with(self.inventory_config(seed)).await
    }

    /// Starts the inventory service with `config`.
    pub async fn spawn_inventory_with(&self, config: InventoryConfig) -> RunningInventory {
        let service = InventoryService::build(config)
            .await
            .unwrap_or_else(|e| panic!("the inventory service starts: {e}"));
        let inventory = service.inventory();
        let metrics_port = service.metrics_port();
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(service.run_until_stopped(shutdown.clone()));
        RunningInventory {
            inventory,
            metrics_port,
            shutdown,
            running: Some(running),
        }
    }

    /// A broker client: publishes like the order service, reads replies.
    pub async fn broker(&self) -> Broker {
        let topology = Topology::new()
            .exchange(&self.names.orders_exchange, ExchangeKind::Fanout)
            .exchange(&self.names.order_cancelled_exchange, ExchangeKind::Fanout)
            .exchange(&self.names.stock_update_exchange, ExchangeKind::Fanout)
            .queue(&self.replies_queue)
            .bind(&self.names.stock_update_exchange, &self.replies_queue, "");
        let transport = Arc::new(
            AmqpTransport::connect(AmqpConfig::new(rabbitmq_url(), topology))
                .await
                .expect("the test broker client connects"),
        );
        let replies = transport
            .subscribe(&self.replies_queue)
            .await
            .expect("the replies queue is consumable");
        Broker {
            transport,
            replies,
            names: self.names.clone(),
        }
    }

    async fn clean_up(database: String, queues: Vec<String>, exchanges: Vec<String>) {
        saga_examples::broker::delete_topology(&rabbitmq_url(), &queues, &exchanges).await;
        if let Ok(mut conn) = sqlx::PgConnection::connect(&database_url()).await {
            let drop = format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)");
            let _ = sqlx::query(sqlx::AssertSqlSafe(drop)).execute(&mut conn).await;
        }
    }
}

impl Drop for TestEnv {
    /// Cleans up on a thread of its own (this one may be inside the test's runtime).
    fn drop(&mut self) {
        let database = self.database.clone();
        let queues = vec![
            self.names.orders_queue.clone(),
            self.names.cancelled_queue.clone(),
            self.replies_queue.clone(),
            self.wire.stock_update_queue.clone(),
        ];
        let exchanges = vec![
            self.wire.orders_exchange.clone(),
            self.wire.stock_update_exchange.clone(),
            self.wire.order_confirmed_exchange.clone(),
            self.wire.order_cancelled_exchange.clone(),
        ];
        let cleaning = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            runtime.block_on(async move {
                let _ = tokio::time::timeout(PATIENCE, Self::clean_up(database, queues, exchanges)).await;
            });
        });
        let _ = cleaning.join();
    }
}

/// The inventory service running in this process.
pub struct RunningInventory {
    /// Reads of its tables.
    pub inventory: Inventory,
    /// Its `/metrics` port, if it serves one.
    pub metrics_port: Option<u16>,
    shutdown: CancellationToken,
    running: Option<JoinHandle<()>>,
}

impl RunningInventory {
    /// `GET /metrics`: the status code and the body.
    pub async fn metrics(&self) -> (u16, String) {
        let port = self.metrics_port.expect("started with INVENTORY_METRICS_PORT");
        let response = crate::metrics_port::get_metrics(port, Duration::from_secs(10))
            .await
            .expect("the metrics port answers in time, in HTTP");
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .expect("an HTTP status line");
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    /// `product`'s stock (the product must be in the catalogue).
    pub async fn level(&self, product: &str) -> StockLevel {
        self.inventory
            .level(product)
            .await
            .expect("the stock table is readable")
            .unwrap_or_else(|| panic!("`{product}` is in the catalogue"))
    }

    /// `(available, reserved)` of `product`.
    pub async fn units(&self, product: &str) -> (i64, i64) {
        let level = self.level(product).await;
        (level.available, level.reserved)
    }

    /// Whether the participant has handled (and committed) message `id`.
    pub async fn has_handled(&self, id: &str) -> bool {
        sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM saga_inbox WHERE message_id = $1)")
            .bind(id)
            .fetch_one(self.inventory.pool())
            .await
            .expect("the inbox is readable")
    }

    /// Waits until message `id` has been handled.
    pub async fn wait_until_handled(&self, id: &str) {
        eventually(&format!("message {id} handled"), || async {
            self.has_handled(id).await.then_some(())
        })
        .await;
    }

    /// How many `StockUpdateResult` replies for `order_id` are in the outbox
    /// (each is published at least once, with the same id).
    pub async fn replies_for(&self, order_id: &str) -> i64 {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM saga_outbox WHERE kind = 'StockUpdateResult' \
             AND convert_from(payload, 'UTF8')::jsonb ->> 'order_id' = $1",
        )
        .bind(order_id)
        .fetch_one(self.inventory.pool())
        .await
        .expect("the outbox is readable")
    }

    /// Stops it as SIGTERM would and waits until it has.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(running) = self.running.take() {
            tokio::time::timeout(PATIENCE, running)
                .await
                .expect("the inventory service stops in time")
                .expect("the inventory service did not panic");
        }
    }
}

impl Drop for RunningInventory {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A broker client standing in for the order service.
pub struct Broker {
    transport: Arc<AmqpTransport>,
    replies: Box<dyn Subscription>,
    names: InventoryNames,
}

/// An `OrderCreated` message for `order_id` with `items` (product, units),
/// with a fresh message id.
pub fn order_created(names: &InventoryNames, order_id: &str, items: &[(&str, u32)]) -> Message {
    let body = OrderCreated {
        order_id: order_id.to_owned(),
        user_id: "alice".to_owned(),
        total_price: 0.0,
        items: items
            .iter()
            .map(|(product, quantity)| OrderCreatedItem {
                product_id: (*product).to_owned(),
                quantity: *quantity,
                price: 1.0,
            })
            .collect(),
    };
    Message::json(ORDER_CREATED, names.orders_exchange.clone(), &body).expect("JSON")
}

/// An `OrderCancelled` message for `order_id`, with a fresh message id.
pub fn order_cancelled(names: &InventoryNames, order_id: &str) -> Message {
    let body = OrderCancelled {
        order_id: order_id.to_owned(),
        user_id: "alice".to_owned(),
        reason: "stock reply timed out".to_owned(),
    };
    Message::json(ORDER_CANCELLED, names.order_cancelled_exchange.clone(), &body).expect("JSON")
}

/// A fresh order id.
pub fn new_order_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

impl Broker {
    /// The names in use.
    pub fn names(&self) -> &InventoryNames {
        &self.names
    }

    /// Publishes `message` (confirmed by the broker).
    pub async fn publish(&self, message: &Message) {
        self.transport.publish(message).await.expect("the message is published");
    }

    /// Places order `order_id` for `items`: publishes its `OrderCreated`
    /// and returns the message.
    pub async fn place_order(&self, order_id: &str, items: &[(&str, u32)]) -> Message {
        let message = order_created(&self.names, order_id, items);
        self.publish(&message).await;
        message
    }

    /// Cancels order `order_id`: publishes its `OrderCancelled` and returns the message.
    pub async fn cancel_order(&self, order_id: &str) -> Message {
        let message = order_cancelled(&self.names, order_id);
        self.publish(&message).await;
        message
    }

    /// The next `StockUpdateResult` on the replies queue.
    pub async fn next_reply(&mut self) -> (Message, StockUpdateResult) {
        let delivery = tokio::time::timeout(PATIENCE, self.replies.next())
            .await
            .expect("a reply within the patience")
            .expect("the replies subscription is open")
            .expect("a delivery");
        let _ = delivery.settle.settle(Settlement::Ack).await;
        let result = delivery.message.decode().expect("a StockUpdateResult");
        (delivery.message, result)
    }

    /// The next reply for `order_id`, skipping replies for other orders.
    pub async fn reply_for(&mut self, order_id: &str) -> StockUpdateResult {
        for _ in 0..100 {
            let (_, reply) = self.next_reply().await;
            if reply.order_id == order_id {
                return reply;
            }
        }
        panic!("no reply for order {order_id} among the next 100");
    }

    /// How many messages wait in `queue`'s dead-letter queue.
    pub async fn dead_letters(&self, queue: &str) -> usize {
        saga_core::DeadLetterQueue::dead_letters(&*self.transport, queue, 1)
            .await
            .expect("the dead-letter queue is browsable")
            .total
    }

    /// Closes the connection.
    pub async fn close(self) {
        drop(self.replies);
        self.transport.close().await;
    }
}
