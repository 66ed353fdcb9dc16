//! The service on PostgreSQL + RabbitMQ, with a test stock service speaking
//! the platform's wire format (untyped AMQP messages, JSON bodies).

use std::sync::Arc;
use std::time::Duration;

use order_service::config::{Backend, ListenAddr, SecretUrl};
use order_service::proto::OrderStatus;
use order_service::proto::order_service_client::OrderServiceClient;
use order_service::wire::{OrderCreated, StockUpdateResult, WireNames};
use order_service::{Application, Config};
use saga_amqp::lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use saga_amqp::{AmqpConfig, AmqpTransport, ExchangeKind, Topology};
use saga_core::{CancellationToken, Message, Publisher, Settlement, Subscriber};
use sqlx::Connection;
use tonic::transport::Channel;

use crate::helpers::{PATIENCE, item};

fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

fn rabbitmq_url() -> String {
    std::env::var("RABBITMQ_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// Creates a fresh database and returns its URL.
async fn fresh_database(name: &str) -> String {
    let admin = database_url();
    let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap_or_else(|e| {
        panic!(
            "PostgreSQL is not reachable at DATABASE_URL ({e}); start it, e.g. \
             `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`"
        )
    });
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .expect("the test database is created");
    let base = admin
        .rsplit_once('/')
        .map_or(admin.as_str(), |(base, _)| base)
        .to_owned();
    format!("{base}/{name}")
}

async fn drop_database(name: &str) {
    if let Ok(mut conn) = sqlx::PgConnection::connect(&database_url()).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&mut conn)
        .await;
    }
}

async fn delete_topology(names: &WireNames, queues: &[String]) {
    let Ok(conn) =
        saga_amqp::lapin::Connection::connect(&rabbitmq_url(), saga_amqp::lapin::ConnectionProperties::default()).await
    else {
        return;
    };
    if let Ok(channel) = conn.create_channel().await {
        for queue in queues {
            for name in [queue.clone(), format!("{queue}.dlq")] {
                let _ = channel
                    .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
        }
        for exchange in [
            &names.orders_exchange,
            &names.stock_update_exchange,
            &names.order_confirmed_exchange,
            &names.order_cancelled_exchange,
        ] {
            let _ = channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
    }
    let _ = conn.close(0, "done".into()).await;
}

/// Answers every `OrderCreated` like the platform's product service: an
/// untyped message, success unless a product is called `unobtainium`.
async fn run_stock_service(transport: Arc<AmqpTransport>, queue: String, reply_to: String, stop: CancellationToken) {
    let mut deliveries = transport
        .subscribe(&queue)
        .await
        .expect("the test stock queue is consumable");
    loop {
        let next = tokio::select! {
            () = stop.cancelled() => return,
            next = deliveries.next() => next,
        };
        let Some(Ok(delivery)) = next else { continue };
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

#[tokio::test]
async fn orders_are_decided_through_postgres_and_rabbitmq() {
    let suffix = uuid::Uuid::now_v7().simple().to_string();
    let database = format!("order_service_test_{suffix}");
    let names = WireNames {
        orders_exchange: format!("orders_exchange_{suffix}"),
        stock_update_exchange: format!("stock_update_exchange_{suffix}"),
        stock_update_queue: format!("order_service_stock_update_queue_{suffix}"),
        order_confirmed_exchange: format!("order_confirmed_exchange_{suffix}"),
        order_cancelled_exchange: format!("order_cancelled_exchange_{suffix}"),
    };
    let stock_queue = format!("test_stock_{suffix}");
    let database_url = fresh_database(&database).await;

    let config = Config {
        grpc: ListenAddr::localhost(0),
        metrics: ListenAddr::localhost(0),
        backend: Backend::Production {
            database_url: SecretUrl::new(database_url),
            rabbitmq_url: SecretUrl::new(rabbitmq_url()),
        },
        names: names.clone(),
        stock_reply_timeout: Duration::from_secs(20),
        ..Config::default()
    };
    let app = Application::build(config).await.unwrap_or_else(|e| {
        panic!("the service starts on PostgreSQL + RabbitMQ ({e}); is RabbitMQ running (`rabbitmq-server -detached`)?")
    });
    let grpc = format!("http://127.0.0.1:{}", app.grpc_port());
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(app.run_until_stopped(shutdown.clone()));

    let topology = Topology::new()
        .exchange(&names.orders_exchange, ExchangeKind::Fanout)
        .exchange(&names.stock_update_exchange, ExchangeKind::Fanout)
        .queue(&stock_queue)
        .bind(&names.orders_exchange, &stock_queue, "");
    let transport = Arc::new(
        AmqpTransport::connect(AmqpConfig::new(rabbitmq_url(), topology))
            .await
            .expect("the test stock service connects"),
    );
    let stop_stock = CancellationToken::new();
    let stock = tokio::spawn(run_stock_service(
        transport.clone(),
        stock_queue.clone(),
        names.stock_update_exchange.clone(),
        stop_stock.clone(),
    ));

    let channel = Channel::from_shared(grpc)
        .expect("URI")
        .connect()
        .await
        .expect("gRPC connects");
    let client = OrderServiceClient::new(channel);
    let place = |user: &str, product: &str| {
        let mut client = client.clone();
        let request = order_service::proto::CreateOrderRequest {
            user_id: user.to_owned(),
            items: vec![item(product, 2, 10.25), item("pear", 1, 0.5)],
        };
        async move {
            client
                .create_order(request)
                .await
                .expect("placed")
                .into_inner()
                .order
                .expect("order")
        }
    };
    let decided = |id: String| {
        let mut client = client.clone();
        async move {
            let deadline = tokio::time::Instant::now() + PATIENCE;
            loop {
                let request = order_service::proto::GetOrderRequest {
                    order_id: id.clone(),
                    user_id: "alice".to_owned(),
                };
                let order = client
                    .get_order(request)
                    .await
                    .expect("readable")
                    .into_inner()
                    .order
                    .expect("order");
                if order.status() != OrderStatus::Pending {
                    return order;
                }
                assert!(tokio::time::Instant::now() < deadline, "order {id} still PENDING");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };

    let good = place("alice", "apple").await;
    assert_eq!(good.status(), OrderStatus::Pending);
    assert_eq!(good.total_price, 21.0);
    let bad = place("alice", "unobtainium").await;
    let good = decided(good.id).await;
    assert_eq!(good.status(), OrderStatus::Confirmed);
    assert_eq!(good.items.len(), 2);
    assert_eq!(good.items[0].price, 10.25);
    assert_eq!(decided(bad.id).await.status(), OrderStatus::Cancelled);

    // A poison message goes to the dead-letter queue and does not stop the consumer.
    transport
        .publish(&Message::new(
            "",
            names.stock_update_exchange.clone(),
            b"not json".to_vec(),
        ))
        .await
        .expect("published");
    let mut dead = transport
        .subscribe(&format!("{}.dlq", names.stock_update_queue))
        .await
        .expect("the DLQ is consumable");
    let dead_letter = tokio::time::timeout(PATIENCE, dead.next())
        .await
        .expect("dead-lettered in time")
        .expect("a delivery")
        .expect("a delivery");
    assert_eq!(dead_letter.message.payload, b"not json");
    let _ = dead_letter.settle.settle(Settlement::Ack).await;
    drop(dead);
    let after = place("alice", "apple").await;
    assert_eq!(decided(after.id).await.status(), OrderStatus::Confirmed);

    stop_stock.cancel();
    let _ = stock.await;
    shutdown.cancel();
    tokio::time::timeout(PATIENCE, running)
        .await
        .expect("stops in time")
        .expect("no panic")
        .expect("a clean stop");
    transport.close().await;
    delete_topology(&names, &[names.stock_update_queue.clone(), stock_queue]).await;
    drop_database(&database).await;
}
