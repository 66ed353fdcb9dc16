//! The order service in production mode (PostgreSQL + RabbitMQ) and the
//! inventory service, sharing one fresh database (each in schemas of its
//! own) and this test's exchanges.

use std::time::Duration;

use order_service::config::{Backend, ListenAddr, SecretUrl};
use order_service::proto::order_service_client::OrderServiceClient;
use order_service::proto::{CreateOrderRequest, GetOrderRequest, Order, OrderItem, OrderStatus};
use order_service::{Application, Config};
use saga_core::CancellationToken;
use saga_examples::inventory::ReservationStatus;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::helpers::{PATIENCE, TestEnv, eventually};

fn rabbitmq_url() -> String {
    std::env::var("RABBITMQ_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

async fn place_order(client: &OrderServiceClient<Channel>, items: &[(&str, i32)]) -> Order {
    let request = CreateOrderRequest {
        user_id: "alice".to_owned(),
        items: items
            .iter()
            .map(|(product, quantity)| OrderItem {
                product_id: (*product).to_owned(),
                quantity: *quantity,
                price: 10.25,
            })
            .collect(),
    };
    client
        .clone()
        .create_order(request)
        .await
        .expect("the order is placed")
        .into_inner()
        .order
        .expect("an order")
}

/// Waits until the service reports SERVING (its database and broker are ready).
async fn wait_until_serving(channel: &Channel) {
    eventually("the order service SERVING", || async {
        let request = HealthCheckRequest { service: String::new() };
        let status = HealthClient::new(channel.clone())
            .check(request)
            .await
            .map(|response| response.into_inner().status())
            .ok()?;
        (status == ServingStatus::Serving).then_some(())
    })
    .await;
}

async fn wait_until_decided(client: &OrderServiceClient<Channel>, id: &str) -> Order {
    eventually(&format!("order {id} decided"), || async {
        let request = GetOrderRequest {
            order_id: id.to_owned(),
            user_id: "alice".to_owned(),
        };
        let order = client
            .clone()
            .get_order(request)
            .await
            .expect("the order is readable")
            .into_inner()
            .order
            .expect("an order");
        (order.status() != OrderStatus::Pending).then_some(order)
    })
    .await
}

#[tokio::test]
async fn orders_are_confirmed_or_cancelled_by_the_inventory_service() {
    let env = TestEnv::new().await;
    // The inventory first: its queues must exist before orders are published.
    let inventory = env.spawn_inventory("p1=100,p2=5").await;

    let config = Config {
        grpc: ListenAddr::localhost(0),
        metrics: ListenAddr::localhost(0),
        backend: Backend::Production {
            database_url: SecretUrl::new(env.database_url.clone()),
            rabbitmq_url: SecretUrl::new(rabbitmq_url()),
        },
        names: env.wire.clone(),
        stock_reply_timeout: Duration::from_secs(20),
        ..Config::default()
    };
    let app = Application::build(config)
        .await
        .unwrap_or_else(|e| panic!("the order service starts on PostgreSQL + RabbitMQ: {e}"));
    let addr = format!("http://127.0.0.1:{}", app.grpc_port());
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(app.run_until_stopped(shutdown.clone()));
    let channel = Channel::from_shared(addr)
        .expect("a valid URI")
        .connect_timeout(PATIENCE)
        .connect()
        .await
        .expect("the gRPC port accepts connections");
    wait_until_serving(&channel).await;
    let client = OrderServiceClient::new(channel);

    let good = place_order(&client, &[("p1", 2), ("p2", 1)]).await;
    assert_eq!(good.status(), OrderStatus::Pending);
    let good = wait_until_decided(&client, &good.id).await;
    assert_eq!(good.status(), OrderStatus::Confirmed);
    assert_eq!(inventory.units("p1").await, (98, 2));
    assert_eq!(inventory.units("p2").await, (4, 1));

    let too_many = place_order(&client, &[("p1", 1), ("p2", 5)]).await;
    let too_many = wait_until_decided(&client, &too_many.id).await;
    assert_eq!(too_many.status(), OrderStatus::Cancelled);
    assert_eq!(inventory.units("p1").await, (98, 2));
    assert_eq!(inventory.units("p2").await, (4, 1));
    // The order service's OrderCancelled reaches the inventory and releases nothing.
    let reservation = eventually("the refused order's reservation", || async {
        inventory.inventory.reservation(&too_many.id).await.expect("readable")
    })
    .await;
    assert_eq!(reservation.status, ReservationStatus::Rejected);

    shutdown.cancel();
    tokio::time::timeout(PATIENCE, running)
        .await
        .expect("the order service stops in time")
        .expect("no panic")
        .expect("a clean stop");
    inventory.stop().await;
}
