//! `sagactl` against the order service running in this process: embedded
//! mode (listing, showing, refusals, JSON, the built binary), and production
//! mode on PostgreSQL + RabbitMQ (a stuck order retried and cancelled, dead
//! letters listed and replayed, a message the broker refuses found in the
//! outbox, another given up).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use order_service::config::{AdminToken, Backend, ListenAddr, SecretUrl};
use order_service::proto::order_service_client::OrderServiceClient;
use order_service::proto::{CreateOrderRequest, GetOrderRequest, Order, OrderItem, OrderStatus};
use order_service::{Application, Config};
use saga_amqp::{AmqpConfig, AmqpTransport, ExchangeKind, Topology};
use saga_core::{CancellationToken, Message, MessageId, Publisher, SagaId};
use saga_examples::sagactl::{Sagactl, SagactlError, run};
use saga_postgres::PostgresStore;
use serde_json::Value;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::helpers::{PATIENCE, TestEnv, eventually};

const TOKEN: &str = "sagactl-test-token";

fn rabbitmq_url() -> String {
    std::env::var("RABBITMQ_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// The order service running in this process with the admin API on.
struct Service {
    addr: String,
    orders: OrderServiceClient<Channel>,
    shutdown: CancellationToken,
    running: JoinHandle<Result<(), order_service::StartError>>,
}

impl Service {
    async fn start(config: Config) -> Self {
        let config = Config {
            grpc: ListenAddr::localhost(0),
            metrics: ListenAddr::localhost(0),
            admin_token: Some(AdminToken::new(TOKEN)),
            ..config
        };
        let app = Application::build(config)
            .await
            .unwrap_or_else(|e| panic!("the order service starts: {e}"));
        let addr = format!("http://{}", SocketAddr::from(([127, 0, 0, 1], app.grpc_port())));
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(app.run_until_stopped(shutdown.clone()));
        let channel = Channel::from_shared(addr.clone())
            .expect("a valid URI")
            .connect_timeout(PATIENCE)
            .connect()
            .await
            .expect("the gRPC port accepts connections");
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
        Self {
            addr,
            orders: OrderServiceClient::new(channel),
            shutdown,
            running,
        }
    }

    async fn place_order(&self, product: &str) -> Order {
        let request = CreateOrderRequest {
            user_id: "alice".to_owned(),
            items: vec![OrderItem {
                product_id: product.to_owned(),
                quantity: 1,
                price: 2.5,
            }],
        };
        let response = self.orders.clone().create_order(request).await.expect("placed");
        response.into_inner().order.expect("an order")
    }

    async fn order_status(&self, id: &str) -> OrderStatus {
        let request = GetOrderRequest {
            order_id: id.to_owned(),
            user_id: "alice".to_owned(),
        };
        let response = self.orders.clone().get_order(request).await.expect("readable");
        response.into_inner().order.expect("an order").status()
    }

    /// Runs `sagactl <args>` against this service with the right token.
    async fn sagactl(&self, args: &[&str]) -> Result<String, SagactlError> {
        sagactl(&self.addr, Some(TOKEN), args).await
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(PATIENCE, self.running)
            .await
            .expect("the service stops in time")
            .expect("no panic")
            .expect("a clean stop");
    }
}

/// Runs `sagactl` in this process, returning what it printed.
async fn sagactl(addr: &str, token: Option<&str>, args: &[&str]) -> Result<String, SagactlError> {
    let mut all = vec!["sagactl", "--addr", addr];
    if let Some(token) = token {
        all.extend(["--token", token]);
    }
    all.extend_from_slice(args);
    let cli = Sagactl::try_parse_from(all).expect("valid arguments");
    let mut out = Vec::new();
    run(cli, &mut out).await?;
    Ok(String::from_utf8(out).expect("UTF-8 output"))
}

/// Puts a running order saga where one whose compensation kept failing
/// would be: needing attention while compensating its first step.
async fn strand(database_url: &str, order_id: &str) {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(database_url)
        .await
        .expect("the test database is reachable");
    let id: SagaId = order_id.parse().expect("the order id is the saga id");
    let failure = "compensation of `create-order` failed: orders table locked";
    saga_core::testkit::strand(&PostgresStore::new(pool.clone()), id, 1, failure)
        .await
        .expect("stranded")
        .expect("the order's saga exists");
    pool.close().await;
}

/// Binds the inventory's queue to the orders exchange (`bound`), or unbinds it.
async fn bind_orders_queue(env: &TestEnv, bound: bool) {
    let conn = saga_amqp::lapin::Connection::connect(&rabbitmq_url(), Default::default())
        .await
        .expect("RabbitMQ connects");
    let channel = conn.create_channel().await.expect("a channel");
    let (queue, exchange) = (env.names.orders_queue.as_str(), env.wire.orders_exchange.as_str());
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
            .expect("bound");
    } else {
        channel
            .queue_unbind(queue.into(), exchange.into(), "".into(), Default::default())
            .await
            .expect("unbound");
    }
    let _ = conn.close(0, "done".into()).await;
}

fn refused_with(error: &SagactlError, expected: tonic::Code) -> bool {
    matches!(error, SagactlError::Refused { code, .. } if *code == expected)
}

#[tokio::test]
async fn list_show_and_refusals_against_an_embedded_service() {
    let service = Service::start(Config::default()).await;
    let order = service.place_order("apple").await;
    eventually("the order confirmed", || async {
        (service.order_status(&order.id).await == OrderStatus::Confirmed).then_some(())
    })
    .await;

    let listed = service
        .sagactl(&["list", "--definition", "order", "--status", "completed"])
        .await
        .expect("list");
    let header = listed.lines().next().expect("a header");
    assert!(header.starts_with("ID") && header.contains("STATUS"), "{listed}");
    let row = listed
        .lines()
        .find(|line| line.starts_with(&order.id))
        .unwrap_or_else(|| panic!("the order is listed:\n{listed}"));
    assert!(row.contains("order v1") && row.contains("completed"), "{row}");
    assert!(listed.contains("1 instance(s)"), "{listed}");
    let stuck = service.sagactl(&["list", "--stuck-for", "0s"]).await.expect("list");
    assert!(stuck.contains("0 instance(s)"), "nothing is stuck:\n{stuck}");

    let shown = service.sagactl(&["show", &order.id]).await.expect("show");
    for expected in [
        format!("saga       {}", order.id),
        "status     completed".to_owned(),
        "create-order → reserve-stock → confirm-order".to_owned(),
        "timeline".to_owned(),
        "started".to_owned(),
        "message StockUpdateResult".to_owned(),
        "running reserve-stock → completed".to_owned(),
        "OrderConfirmed".to_owned(),
    ] {
        assert!(shown.contains(&expected), "`{expected}` in:\n{shown}");
    }

    let json: Value = serde_json::from_str(&service.sagactl(&["--json", "show", &order.id]).await.expect("show"))
        .expect("JSON output");
    assert_eq!(json["instance"]["status"], "completed");
    assert_eq!(
        json["instance"]["data"]["order"]["id"],
        order.id.as_str(),
        "data as JSON"
    );
    assert_eq!(json["history"][0]["cause"]["type"], "started");
    assert_eq!(json["history"][1]["cause"]["message_type"], "StockUpdateResult");
    let json: Value =
        serde_json::from_str(&service.sagactl(&["--json", "list"]).await.expect("list")).expect("JSON output");
    assert_eq!(json["instances"][0]["id"], order.id.as_str());

    let refused = service.sagactl(&["cancel", &order.id]).await.expect_err("finished");
    assert!(refused_with(&refused, tonic::Code::FailedPrecondition), "{refused}");
    assert!(refused.to_string().contains("finished"), "{refused}");
    let unknown = service
        .sagactl(&["retry", "0190b5c2-0000-7000-8000-000000000009"])
        .await
        .expect_err("unknown");
    assert!(refused_with(&unknown, tonic::Code::NotFound), "{unknown}");
    let invalid = service.sagactl(&["show", "nope"]).await.expect_err("not an id");
    assert!(refused_with(&invalid, tonic::Code::InvalidArgument), "{invalid}");

    let dead = service.sagactl(&["dlq", "list"]).await.expect("dlq list");
    assert!(
        dead.contains("order_service_stock_update_queue.dlq: 0 message(s)"),
        "embedded mode reads its in-process queues:\n{dead}"
    );
    eventually("the outbox drained", || async {
        let unsent = service.sagactl(&["outbox"]).await.expect("outbox");
        unsent.contains("the outbox holds no unsent message").then_some(())
    })
    .await;

    let wrong = sagactl(&service.addr, Some("wrong"), &["list"])
        .await
        .expect_err("wrong token");
    assert!(refused_with(&wrong, tonic::Code::Unauthenticated), "{wrong}");
    assert!(wrong.to_string().contains("ADMIN_TOKEN"), "with a hint: {wrong}");
    let missing = sagactl(&service.addr, None, &["list"]).await.expect_err("no token");
    assert!(matches!(missing, SagactlError::MissingToken), "{missing}");

    service.stop().await;
}

#[tokio::test]
async fn the_binary_reads_its_address_and_token_from_the_environment() {
    let service = Service::start(Config::default()).await;
    let order = service.place_order("apple").await;
    let run_binary = |token: &'static str| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_sagactl"))
            .args(["--json", "list"])
            .env("SAGA_ADMIN_ADDR", &service.addr)
            .env("ADMIN_TOKEN", token)
            .kill_on_drop(true)
            .output()
    };
    let output = tokio::time::timeout(PATIENCE, run_binary(TOKEN))
        .await
        .expect("sagactl finishes in time")
        .expect("sagactl runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let json: Value = serde_json::from_slice(&output.stdout).expect("JSON on stdout");
    assert_eq!(json["instances"][0]["id"], order.id.as_str());

    let output = tokio::time::timeout(PATIENCE, run_binary("not-the-token-x7"))
        .await
        .expect("sagactl finishes in time")
        .expect("sagactl runs");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.starts_with("sagactl: Unauthenticated"), "{stderr}");
    assert!(
        !stderr.contains("not-the-token-x7"),
        "the token is not echoed: {stderr}"
    );
    service.stop().await;
}

#[tokio::test]
async fn a_stuck_order_is_retried_and_cancelled_and_dead_letters_replayed() {
    let env = TestEnv::new().await;
    // The broker side of the test: a queue taking OrderCreated (nobody
    // answers it, so orders stay stuck waiting for stock), and a publisher
    // of replies. The queue is the inventory's, which the environment
    // removes at the end.
    let topology = Topology::new()
        .exchange(&env.wire.orders_exchange, ExchangeKind::Fanout)
        .exchange(&env.wire.stock_update_exchange, ExchangeKind::Fanout)
        .queue(&env.names.orders_queue)
        .bind(&env.wire.orders_exchange, &env.names.orders_queue, "");
    let broker = Arc::new(
        AmqpTransport::connect(AmqpConfig::new(rabbitmq_url(), topology))
            .await
            .unwrap_or_else(|e| panic!("RabbitMQ is reachable: {e}")),
    );
    let service = Service::start(Config {
        backend: Backend::Production {
            database_url: SecretUrl::new(env.database_url.clone()),
            rabbitmq_url: SecretUrl::new(rabbitmq_url()),
        },
        names: env.wire.clone(),
        stock_reply_timeout: Duration::from_secs(600),
        ..Config::default()
    })
    .await;

    let order = service.place_order("p1").await;
    let stuck = eventually("the order listed as stuck", || async {
        let listed = service.sagactl(&["list", "--stuck-for", "100ms"]).await.expect("list");
        listed.contains(&order.id).then_some(listed)
    })
    .await;
    assert!(
        stuck.contains("running") && stuck.contains("reserve-stock (1)"),
        "{stuck}"
    );

    let retried = service.sagactl(&["retry", &order.id]).await.expect("retry");
    assert!(
        retried.starts_with(&format!("retried saga {}: now running at reserve-stock", order.id)),
        "{retried}"
    );
    let cancelled = service.sagactl(&["cancel", &order.id]).await.expect("cancel");
    assert!(cancelled.contains("now compensated"), "{cancelled}");
    assert!(cancelled.contains("cancelled by an operator"), "{cancelled}");
    assert_eq!(service.order_status(&order.id).await, OrderStatus::Cancelled);
    let shown = service.sagactl(&["show", &order.id]).await.expect("show");
    assert!(
        shown.contains("operator retry") && shown.contains("operator cancel"),
        "{shown}"
    );
    assert!(shown.contains("OrderCancelled"), "{shown}");
    let refused = service
        .sagactl(&["resume", &order.id])
        .await
        .expect_err("not needing attention");
    assert!(refused_with(&refused, tonic::Code::FailedPrecondition), "{refused}");

    // A compensation that kept failing leaves an order needing attention;
    // once its cause is fixed, an operator resumes it.
    let stranded = service.place_order("p2").await;
    strand(&env.database_url, &stranded.id).await;
    let listed = service
        .sagactl(&["list", "--status", "needs-attention"])
        .await
        .expect("list");
    assert!(listed.contains(&stranded.id), "{listed}");
    let resumed = service.sagactl(&["resume", &stranded.id]).await.expect("resume");
    assert!(
        resumed.starts_with(&format!("resumed saga {}: now compensated", stranded.id)),
        "{resumed}"
    );
    assert_eq!(service.order_status(&stranded.id).await, OrderStatus::Cancelled);
    let shown = service.sagactl(&["show", &stranded.id]).await.expect("show");
    assert!(shown.contains("operator resume"), "{shown}");

    // A reply the service cannot read is dead-lettered.
    let poison = MessageId::from("sagactl-poison");
    broker
        .publish(&Message::new("", env.wire.stock_update_exchange.clone(), b"{oops".to_vec()).with_id(poison.clone()))
        .await
        .expect("published");
    let dead = eventually("the poison reply dead-lettered", || async {
        let listed = service.sagactl(&["dlq", "list"]).await.expect("dlq list");
        listed.contains(poison.as_str()).then_some(listed)
    })
    .await;
    assert!(
        dead.contains(&format!("{}.dlq: 1 message(s)", env.wire.stock_update_queue)),
        "{dead}"
    );
    assert!(dead.contains(&env.wire.stock_update_exchange), "the origin: {dead}");
    assert!(dead.contains("{oops"), "the body: {dead}");
    let json: Value = serde_json::from_str(&service.sagactl(&["--json", "dlq", "list"]).await.expect("dlq list"))
        .expect("JSON output");
    assert_eq!(json["queues"][0]["messages"][0]["message_id"], poison.as_str());
    assert_eq!(json["queues"][0]["messages"][0]["replayable"], true);

    let replayed = service
        .sagactl(&["dlq", "replay", poison.as_str()])
        .await
        .expect("replay");
    assert!(
        replayed.contains("replayed 1 message(s)") && replayed.contains(poison.as_str()),
        "{replayed}"
    );
    // Still poison: it comes back to the dead-letter queue.
    eventually("the replayed poison dead-lettered again", || async {
        let listed = service.sagactl(&["dlq", "list"]).await.expect("dlq list");
        listed.contains(poison.as_str()).then_some(())
    })
    .await;
    let missing = service
        .sagactl(&["dlq", "replay", "no-such-message"])
        .await
        .expect_err("nothing to replay");
    assert!(matches!(missing, SagactlError::NotReplayed(1)), "{missing}");

    // With no queue bound to take it, the broker returns an OrderCreated:
    // it waits in the outbox, and `outbox` and `show` say so.
    bind_orders_queue(&env, false).await;
    let unroutable = service.place_order("p3").await;
    let unsent = eventually("the refused OrderCreated in the outbox", || async {
        let listed = service
            .sagactl(&["outbox", "--saga", &unroutable.id])
            .await
            .expect("outbox");
        listed.contains("OrderCreated").then_some(listed)
    })
    .await;
    let header = unsent.lines().next().expect("a header");
    assert!(
        header.starts_with("OUTBOX ID") && header.contains("CLAIMED UNTIL"),
        "{unsent}"
    );
    assert!(
        unsent.contains(&env.wire.orders_exchange) && unsent.contains(&unroutable.id),
        "its destination and saga: {unsent}"
    );
    let shown = service.sagactl(&["show", &unroutable.id]).await.expect("show");
    assert!(
        shown.contains("not yet confirmed by the broker") && shown.contains("OrderCreated"),
        "{shown}"
    );
    let listed = service
        .sagactl(&["--json", "outbox", "--saga", &unroutable.id])
        .await
        .expect("outbox");
    let json: Value = serde_json::from_str(&listed).expect("JSON output");
    assert_eq!(json["messages"][0]["saga_id"], unroutable.id.as_str(), "{json}");
    assert_eq!(json["messages"][0]["type"], "OrderCreated");
    let old = service
        .sagactl(&["outbox", "--older-than", "1h"])
        .await
        .expect("outbox");
    assert!(old.contains("holds no unsent message"), "none an hour old: {old}");
    // A second one the operator gives up: it never goes, and `show` says why.
    let given_up = service.place_order("p4").await;
    let listed = eventually("the second OrderCreated in the outbox", || async {
        let listed = service
            .sagactl(&["--json", "outbox", "--saga", &given_up.id])
            .await
            .expect("outbox");
        let json: Value = serde_json::from_str(&listed).expect("JSON output");
        json["messages"][0]["outbox_id"].as_i64().map(|id| id.to_string())
    })
    .await;
    let done = service
        .sagactl(&["discard", &given_up.id, &listed, "--reason", "never routable"])
        .await
        .expect("discard");
    assert!(
        done.starts_with(&format!("gave up outbox message {listed} of saga {}", given_up.id)),
        "{done}"
    );
    let again = service
        .sagactl(&["discard", &given_up.id, &listed, "--reason", "again"])
        .await
        .expect_err("given up already");
    assert!(refused_with(&again, tonic::Code::FailedPrecondition), "{again}");
    let shown = service.sagactl(&["show", &given_up.id]).await.expect("show");
    assert!(
        shown.contains("discard") && shown.contains("never routable") && !shown.contains("not yet confirmed"),
        "{shown}"
    );
    bind_orders_queue(&env, true).await;
    eventually("the OrderCreated gone once routable", || async {
        let listed = service.sagactl(&["outbox"]).await.expect("outbox");
        listed.contains("holds no unsent message").then_some(())
    })
    .await;

    service.stop().await;
    broker.close().await;
}
