//! The platform slice around the service in production mode: a fresh
//! PostgreSQL database and unique RabbitMQ names per test, a stock service
//! that answers like the platform's (untyped messages, JSON bodies), and
//! observers counting what the service publishes. Everything is removed by
//! [`Platform::clean_up`].

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use order_service::config::{Backend, ListenAddr, SecretUrl};
use order_service::wire::{OrderCreated, StockUpdateResult, WireNames};
use order_service::{Config, proto};
use saga_amqp::lapin::options::{ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions};
use saga_amqp::{AmqpConfig, AmqpTransport, ExchangeKind, Topology};
use saga_core::{CancellationToken, Message, MessageId, Publisher, Settlement, Subscriber};
use serde_json::Value;
use sqlx::Connection;
use tokio::task::JoinHandle;

use crate::helpers::{PATIENCE, TestApp, spawn_app_with};

/// What to start when the broker or database is missing.
pub const START_BACKENDS: &str = "is PostgreSQL running (`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) \
     main start`) and RabbitMQ (`rabbitmq-server -detached`)? DATABASE_URL / RABBITMQ_URL choose them";

/// The admin database URL (trust auth on loopback by default).
pub fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// The broker URL.
pub fn rabbitmq_url() -> String {
    std::env::var("RABBITMQ_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// `url` with its database replaced by `database`.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = url.split_once('?').map_or((url, None), |(b, q)| (b, Some(q)));
    let base = base.rsplit_once('/').map_or(base, |(base, _)| base);
    match query {
        Some(query) => format!("{base}/{database}?{query}"),
        None => format!("{base}/{database}"),
    }
}

/// `url` with its `host:port` replaced by `addr`.
pub fn with_host(url: &str, addr: SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL with a scheme");
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    let credentials = authority
        .rsplit_once('@')
        .map(|(c, _)| format!("{c}@"))
        .unwrap_or_default();
    format!("{scheme}://{credentials}{addr}{path}")
}

/// The `host:port` PostgreSQL listens on, from `DATABASE_URL`.
pub fn database_addr() -> SocketAddr {
    addr_of(&database_url(), 5432)
}

/// The `host:port` RabbitMQ listens on, from `RABBITMQ_URL`.
pub fn broker_addr() -> SocketAddr {
    addr_of(&rabbitmq_url(), 5672)
}

fn addr_of(url: &str, default_port: u16) -> SocketAddr {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host_port = if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:{default_port}")
    };
    let host_port = host_port.replace("localhost", "127.0.0.1");
    host_port.parse().expect("the URL names its host as an IP address")
}

/// How the test stock service answers `OrderCreated`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stock {
    /// Success, unless a product is called `unobtainium`.
    Platform,
    /// Never answers (the test publishes replies itself).
    Silent,
}

/// A test's database, names, broker connection and observers.
pub struct Platform {
    pub database: String,
    pub database_url: String,
    pub names: WireNames,
    pub transport: Arc<AmqpTransport>,
    /// The queue the test stock service consumes `OrderCreated` from.
    pub stock_queue: String,
    confirmed_queue: String,
    cancelled_queue: String,
    /// Every `OrderConfirmed` / `OrderCancelled` seen: (message id, order id).
    pub confirmed: Events,
    pub cancelled: Events,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

/// Messages observed on one exchange.
#[derive(Clone, Default)]
pub struct Events(Arc<Mutex<Vec<(MessageId, String, Value)>>>);

impl Events {
    /// Distinct message ids seen for `order_id`.
    pub fn distinct_for(&self, order_id: &str) -> usize {
        let seen = self.0.lock().expect("not poisoned");
        seen.iter()
            .filter(|(_, order, _)| order == order_id)
            .map(|(id, _, _)| id.to_string())
            .collect::<HashSet<_>>()
            .len()
    }

    /// The bodies seen for `order_id`.
    pub fn bodies_for(&self, order_id: &str) -> Vec<Value> {
        let seen = self.0.lock().expect("not poisoned");
        seen.iter()
            .filter(|(_, order, _)| order == order_id)
            .map(|(_, _, body)| body.clone())
            .collect()
    }

    /// Distinct message ids per order.
    pub fn per_order(&self) -> HashMap<String, HashSet<String>> {
        let seen = self.0.lock().expect("not poisoned");
        let mut per_order: HashMap<String, HashSet<String>> = HashMap::new();
        for (id, order, _) in seen.iter() {
            per_order.entry(order.clone()).or_default().insert(id.to_string());
        }
        per_order
    }

    /// Waits until a message for `order_id` has been seen.
    pub async fn wait_for(&self, order_id: &str) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while self.distinct_for(order_id) == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no message for order {order_id} within {PATIENCE:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Platform {
    /// A fresh database and unique exchange and queue names, declared, with
    /// observers on the confirmed and cancelled exchanges.
    pub async fn new() -> Self {
        let suffix = uuid::Uuid::now_v7().simple().to_string();
        let database = format!("order_service_test_{suffix}");
        let admin = database_url();
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL is not reachable at DATABASE_URL ({e}); {START_BACKENDS}"));
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {database}")))
            .execute(&mut conn)
            .await
            .expect("the test database is created");
        let _ = conn.close().await;
        let names = WireNames {
            orders_exchange: format!("orders_exchange_{suffix}"),
            stock_update_exchange: format!("stock_update_exchange_{suffix}"),
            stock_update_queue: format!("order_service_stock_update_queue_{suffix}"),
            order_confirmed_exchange: format!("order_confirmed_exchange_{suffix}"),
            order_cancelled_exchange: format!("order_cancelled_exchange_{suffix}"),
        };
        let stock_queue = format!("test_stock_{suffix}");
        let confirmed_queue = format!("test_confirmed_{suffix}");
        let cancelled_queue = format!("test_cancelled_{suffix}");
        let topology = Topology::new()
            .exchange(&names.orders_exchange, ExchangeKind::Fanout)
            .exchange(&names.stock_update_exchange, ExchangeKind::Fanout)
            .exchange(&names.order_confirmed_exchange, ExchangeKind::Fanout)
            .exchange(&names.order_cancelled_exchange, ExchangeKind::Fanout)
            .queue(&stock_queue)
            .queue(&confirmed_queue)
            .queue(&cancelled_queue)
            .bind(&names.orders_exchange, &stock_queue, "")
            .bind(&names.order_confirmed_exchange, &confirmed_queue, "")
            .bind(&names.order_cancelled_exchange, &cancelled_queue, "");
        let transport = AmqpTransport::connect(AmqpConfig::new(rabbitmq_url(), topology))
            .await
            .unwrap_or_else(|e| panic!("RabbitMQ is not reachable at RABBITMQ_URL ({e}); {START_BACKENDS}"));
        let mut platform = Self {
            database_url: with_database(&admin, &database),
            database,
            names,
            transport: Arc::new(transport),
            stock_queue,
            confirmed_queue,
            cancelled_queue,
            confirmed: Events::default(),
            cancelled: Events::default(),
            stop: CancellationToken::new(),
            tasks: Vec::new(),
        };
        let (confirmed, cancelled) = (platform.confirmed.clone(), platform.cancelled.clone());
        let observers = [
            (platform.confirmed_queue.clone(), confirmed),
            (platform.cancelled_queue.clone(), cancelled),
        ];
        for (queue, events) in observers {
            let task = tokio::spawn(observe(
                platform.transport.clone(),
                queue,
                events,
                platform.stop.clone(),
            ));
            platform.tasks.push(task);
        }
        platform
    }

    /// The service's configuration for this platform, on `database_url`.
    pub fn config_on(&self, database_url: String, stock_reply_timeout: Duration) -> Config {
        Config {
            grpc: ListenAddr::localhost(0),
            metrics: ListenAddr::localhost(0),
            backend: Backend::Production {
                database_url: SecretUrl::new(database_url),
                rabbitmq_url: SecretUrl::new(rabbitmq_url()),
            },
            names: self.names.clone(),
            stock_reply_timeout,
            ..Config::default()
        }
    }

    /// The service's configuration for this platform.
    pub fn config(&self, stock_reply_timeout: Duration) -> Config {
        self.config_on(self.database_url.clone(), stock_reply_timeout)
    }

    /// Starts a replica of the service and waits until it is SERVING.
    pub async fn start_service(&self, stock_reply_timeout: Duration) -> TestApp {
        let app = spawn_app_with(self.config(stock_reply_timeout)).await;
        app.wait_until_serving(START_BACKENDS).await;
        app
    }

    /// Starts the test stock service.
    pub fn start_stock(&mut self, stock: Stock) {
        if stock == Stock::Silent {
            return;
        }
        let task = tokio::spawn(answer_like_the_platform(
            self.transport.clone(),
            self.stock_queue.clone(),
            self.names.stock_update_exchange.clone(),
            self.stop.clone(),
        ));
        self.tasks.push(task);
    }

    /// Publishes a raw reply body to the stock update exchange, untyped like
    /// the platform's, with message id `id`.
    pub async fn publish_reply(&self, body: &[u8], id: MessageId) {
        let message = Message::new("", self.names.stock_update_exchange.clone(), body.to_vec()).with_id(id);
        self.transport.publish(&message).await.expect("the reply is published");
    }

    /// Publishes a `StockUpdateResult` for `order_id` with message id `id`.
    pub async fn reply(&self, order_id: &str, success: bool, id: MessageId) {
        let result = StockUpdateResult {
            order_id: order_id.to_owned(),
            success,
            reason: (!success).then(|| "test said no".to_owned()),
        };
        self.publish_reply(&serde_json::to_vec(&result).expect("JSON"), id)
            .await;
    }

    /// Binds the test stock queue to the orders exchange (`bound`), or
    /// unbinds it: then no queue takes an OrderCreated.
    pub async fn bind_stock_queue(&self, bound: bool) {
        let conn = saga_amqp::lapin::Connection::connect(&rabbitmq_url(), Default::default())
            .await
            .expect("RabbitMQ connects");
        let channel = conn.create_channel().await.expect("a channel");
        let (queue, exchange) = (self.stock_queue.as_str(), self.names.orders_exchange.as_str());
        if bound {
            channel
                .queue_bind(
                    queue.into(),
                    exchange.into(),
                    "".into(),
                    Default::default(),
                    Default::default(),
                )
                .await
                .expect("the stock queue is bound");
        } else {
            channel
                .queue_unbind(queue.into(), exchange.into(), "".into(), Default::default())
                .await
                .expect("the stock queue is unbound");
        }
        let _ = conn.close(0, "done".into()).await;
    }

    /// Ready messages in `queue` (0 if it does not exist).
    pub async fn queue_depth(&self, queue: &str) -> u32 {
        let conn = saga_amqp::lapin::Connection::connect(&rabbitmq_url(), Default::default())
            .await
            .expect("RabbitMQ connects");
        let channel = conn.create_channel().await.expect("a channel");
        let options = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let depth = channel
            .queue_declare(queue.into(), options, Default::default())
            .await
            .map_or(0, |q| q.message_count());
        let _ = conn.close(0, "done".into()).await;
        depth
    }

    /// Waits until the service's reply queue has no ready message.
    pub async fn wait_until_replies_drained(&self) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while self.queue_depth(&self.names.stock_update_queue).await > 0 {
            assert!(tokio::time::Instant::now() < deadline, "replies not consumed in time");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Drops the database and deletes every exchange and queue of the test.
    pub async fn clean_up(self) {
        self.stop.cancel();
        for task in self.tasks {
            let _ = tokio::time::timeout(PATIENCE, task).await;
        }
        self.transport.close().await;
        if let Ok(mut conn) = sqlx::PgConnection::connect(&database_url()).await {
            let drop = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.database);
            let _ = sqlx::query(sqlx::AssertSqlSafe(drop)).execute(&mut conn).await;
        }
        let Ok(conn) = saga_amqp::lapin::Connection::connect(&rabbitmq_url(), Default::default()).await else {
            return;
        };
        if let Ok(channel) = conn.create_channel().await {
            for queue in [
                &self.names.stock_update_queue,
                &self.stock_queue,
                &self.confirmed_queue,
                &self.cancelled_queue,
            ] {
                for name in [queue.clone(), format!("{queue}.dlq")] {
                    let _ = channel
                        .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                        .await;
                }
            }
            for exchange in [
                &self.names.orders_exchange,
                &self.names.stock_update_exchange,
                &self.names.order_confirmed_exchange,
                &self.names.order_cancelled_exchange,
            ] {
                let _ = channel
                    .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                    .await;
            }
        }
        let _ = conn.close(0, "done".into()).await;
    }
}

/// Records every message on `queue` as (message id, order id, body).
async fn observe(transport: Arc<AmqpTransport>, queue: String, events: Events, stop: CancellationToken) {
    let mut deliveries = transport
        .subscribe(&queue)
        .await
        .expect("the observer queue is consumable");
    loop {
        let next = tokio::select! {
            () = stop.cancelled() => return,
            next = deliveries.next() => next,
        };
        match next {
            None => return,
            Some(Err(_)) => continue,
            Some(Ok(delivery)) => {
                let body: Value = delivery.message.decode().unwrap_or(Value::Null);
                let order = body["order_id"].as_str().unwrap_or_default().to_owned();
                events
                    .0
                    .lock()
                    .expect("not poisoned")
                    .push((delivery.message.id.clone(), order, body));
                let _ = delivery.settle.settle(Settlement::Ack).await;
            }
        }
    }
}

/// Answers every `OrderCreated` like the platform's product service: an
/// untyped message, success unless a product is called `unobtainium`.
async fn answer_like_the_platform(
    transport: Arc<AmqpTransport>,
    queue: String,
    reply_to: String,
    stop: CancellationToken,
) {
    let mut deliveries = transport
        .subscribe(&queue)
        .await
        .expect("the test stock queue is consumable");
    loop {
        let next = tokio::select! {
            () = stop.cancelled() => return,
            next = deliveries.next() => next,
        };
        let delivery = match next {
            None => return,
            Some(Err(_)) => continue,
            Some(Ok(delivery)) => delivery,
        };
        if let Ok(order) = delivery.message.decode::<OrderCreated>() {
            let refused = order.items.iter().any(|i| i.product_id == "unobtainium");
            let result = StockUpdateResult {
                order_id: order.order_id,
                success: !refused,
                reason: refused.then(|| "unknown product unobtainium".to_owned()),
            };
            let body = serde_json::to_vec(&result).expect("JSON");
            transport
                .publish(&Message::new("", reply_to.clone(), body))
                .await
                .expect("the reply is published");
        }
        let _ = delivery.settle.settle(Settlement::Ack).await;
    }
}

/// Two items, one of them `product`.
pub fn basket(product: &str) -> Vec<proto::OrderItem> {
    vec![
        crate::helpers::item(product, 2, 10.25),
        crate::helpers::item("pear", 1, 0.5),
    ]
}
