use std::net::SocketAddr;
use std::time::Duration;

use order_service::config::ListenAddr;
use order_service::proto::order_service_client::OrderServiceClient;
use order_service::proto::{self, CreateOrderRequest, GetOrderRequest, OrderStatus};
use order_service::{Application, Config};
use saga_core::CancellationToken;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Request, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// How long anything asynchronous may take before a test gives up.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// A running service in embedded mode, and a client to it.
pub struct TestApp {
    pub metrics_addr: SocketAddr,
    pub channel: Channel,
    pub client: OrderServiceClient<Channel>,
    shutdown: CancellationToken,
    running: Option<JoinHandle<Result<(), order_service::StartError>>>,
}

/// Starts the service in embedded mode on free loopback ports.
pub async fn spawn_app() -> TestApp {
    let config = Config {
        grpc: ListenAddr::localhost(0),
        metrics: ListenAddr::localhost(0),
        ..Config::default()
    };
    spawn_app_with(config).await
}

/// Starts the service with `config` (its ports should be loopback, 0), without
/// waiting for it to be ready.
pub async fn spawn_app_with(config: Config) -> TestApp {
    let app = Application::build(config).await.expect("the application builds");
    let grpc_addr = SocketAddr::from(([127, 0, 0, 1], app.grpc_port()));
    let metrics_addr = SocketAddr::from(([127, 0, 0, 1], app.metrics_port()));
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(app.run_until_stopped(shutdown.clone()));
    let channel = Channel::from_shared(format!("http://{grpc_addr}"))
        .expect("a valid URI")
        .connect_timeout(PATIENCE)
        .connect()
        .await
        .expect("the gRPC port accepts connections");
    TestApp {
        metrics_addr,
        client: OrderServiceClient::new(channel.clone()),
        channel,
        shutdown,
        running: Some(running),
    }
}

/// One item: product, quantity, unit price.
pub fn item(product_id: &str, quantity: i32, price: f64) -> proto::OrderItem {
    proto::OrderItem {
        product_id: product_id.to_owned(),
        quantity,
        price,
    }
}

impl TestApp {
    /// Places an order for `user`.
    pub async fn place_order(&self, user: &str, items: Vec<proto::OrderItem>) -> Result<proto::Order, Status> {
        self.send_create(Request::new(CreateOrderRequest {
            user_id: user.to_owned(),
            items,
        }))
        .await
    }

    /// Places an order for `user` under an idempotency key.
    pub async fn place_order_with_key(
        &self,
        user: &str,
        key: &str,
        items: Vec<proto::OrderItem>,
    ) -> Result<proto::Order, Status> {
        let mut request = Request::new(CreateOrderRequest {
            user_id: user.to_owned(),
            items,
        });
        request
            .metadata_mut()
            .insert("idempotency-key", key.parse().expect("an ASCII key"));
        self.send_create(request).await
    }

    /// Sends a raw `CreateOrder` request.
    pub async fn send_create(&self, request: Request<CreateOrderRequest>) -> Result<proto::Order, Status> {
        let response = self.client.clone().create_order(request).await?;
        Ok(response.into_inner().order.expect("a created order in the response"))
    }

    /// Reads an order as `user`.
    pub async fn get_order(&self, order_id: &str, user: &str) -> Result<proto::Order, Status> {
        let request = GetOrderRequest {
            order_id: order_id.to_owned(),
            user_id: user.to_owned(),
        };
        let response = self.client.clone().get_order(request).await?;
        Ok(response.into_inner().order.expect("an order in the response"))
    }

    /// Asserts that the order keeps `status` for half a second (a late or
    /// duplicate message must change nothing).
    pub async fn assert_status_stays(&self, order_id: &str, user: &str, status: OrderStatus) {
        let window = tokio::time::Instant::now() + Duration::from_millis(500);
        while tokio::time::Instant::now() < window {
            let order = self.get_order(order_id, user).await.expect("the order is readable");
            assert_eq!(order.status(), status, "order {order_id}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls the order until it has left `PENDING`, and returns it.
    pub async fn wait_until_decided(&self, order_id: &str, user: &str) -> proto::Order {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let order = self.get_order(order_id, user).await.expect("the order is readable");
            if order.status() != OrderStatus::Pending {
                return order;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "order {order_id} still PENDING after {PATIENCE:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// gRPC health of the whole server.
    pub async fn health(&self) -> ServingStatus {
        let request = HealthCheckRequest { service: String::new() };
        match HealthClient::new(self.channel.clone()).check(request).await {
            Ok(response) => response.into_inner().status(),
            Err(status) => panic!("health check failed: {status}"),
        }
    }

    /// Waits until health says SERVING; `what` names what to start if it never does.
    pub async fn wait_until_serving(&self, what: &str) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while self.health().await != ServingStatus::Serving {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the service is not SERVING after {PATIENCE:?}: {what}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `GET path` on the operations port: status code and body.
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        let exchange = async {
            let mut stream = tokio::net::TcpStream::connect(self.metrics_addr).await?;
            let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).await?;
            let mut response = String::new();
            stream.read_to_string(&mut response).await?;
            Ok::<_, std::io::Error>(response)
        };
        let response = tokio::time::timeout(PATIENCE, exchange)
            .await
            .expect("the operations port answers in time")
            .expect("the operations port speaks HTTP");
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

    /// Stops the service as SIGTERM would and waits for it to finish.
    pub async fn stop(mut self) -> Result<(), order_service::StartError> {
        self.shutdown.cancel();
        let running = self.running.take().expect("running");
        tokio::time::timeout(PATIENCE, running)
            .await
            .expect("the service stops in time")
            .expect("the service task did not panic")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
