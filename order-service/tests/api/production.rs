//! The service on PostgreSQL + RabbitMQ, with a test stock service speaking
//! the platform's wire format (untyped AMQP messages, JSON bodies).

use std::collections::HashSet;
use std::time::Duration;

use order_service::config::{Backend, SecretUrl};
use order_service::proto::OrderStatus;
use saga_core::{MessageId, Settlement, Subscriber};
use sqlx::Connection;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::helpers::{PATIENCE, TestApp, spawn_app_with};
use crate::platform::{Platform, START_BACKENDS, Stock, basket, broker_addr, database_addr, rabbitmq_url, with_host};
use crate::proxy::Proxy;

/// Long enough never to fire in tests that do not wait for it.
const NO_DEADLINE: Duration = Duration::from_secs(60);

#[tokio::test]
async fn orders_are_decided_through_postgres_and_rabbitmq() {
    let mut platform = Platform::new().await;
    let app = platform.start_service(NO_DEADLINE).await;
    platform.start_stock(Stock::Platform);

    let good = app.place_order("alice", basket("apple")).await.expect("placed");
    assert_eq!(good.status(), OrderStatus::Pending);
    assert_eq!(good.total_price, 21.0);
    let bad = app.place_order("alice", basket("unobtainium")).await.expect("placed");
    let good = app.wait_until_decided(&good.id, "alice").await;
    assert_eq!(good.status(), OrderStatus::Confirmed);
    assert_eq!(good.items.len(), 2);
    assert_eq!(good.items[0].price, 10.25);
    assert_eq!(
        app.wait_until_decided(&bad.id, "alice").await.status(),
        OrderStatus::Cancelled
    );
    platform.confirmed.wait_for(&good.id).await;
    platform.cancelled.wait_for(&bad.id).await;
    assert_eq!(
        platform.cancelled.bodies_for(&bad.id)[0]["reason"],
        "unknown product unobtainium"
    );

    // Step latencies, the outbox backlog and saga-core's own counters.
    let (status, metrics) = app.http_get("/metrics").await;
    assert_eq!(status, 200);
    for expected in [
        r#"order_stock_reply_seconds_bucket{outcome="reserved""#,
        r#"order_stock_reply_seconds_bucket{outcome="refused""#,
        "order_stock_reply_seconds_count",
        "saga_outbox_backlog ",
        r#"saga_messages_total{outcome="ack"}"#,
        "saga_transitions_total{",
        "saga_outbox_published_total",
        // saga-core's metrics come with saga-core's help texts.
        "# HELP saga_outbox_refused_total Outbox messages the broker refused",
        "# HELP saga_relay_held_back Relays of this process held back by the broker",
        // The store's and the broker's latencies, as histograms with buckets.
        r#"saga_commit_seconds_bucket{saga="order",le="0.0005"}"#,
        r#"saga_outbox_publish_seconds_bucket{le="0.0005"}"#,
        r#"grpc_server_handled_total{method="CreateOrder",code="Ok"}"#,
    ] {
        assert!(metrics.contains(expected), "/metrics lacks `{expected}`:\n{metrics}");
    }
    // Present before any refusal, so an alert on its increase sees the
    // first. (Its count is the test process's: another test refuses.)
    assert!(
        metrics
            .lines()
            .any(|line| line.starts_with("saga_outbox_refused_total ")),
        "/metrics lacks a saga_outbox_refused_total sample:\n{metrics}"
    );

    app.stop().await.expect("a clean stop");
    platform.clean_up().await;
}

#[tokio::test]
async fn no_reply_before_the_deadline_cancels_and_a_late_reply_changes_nothing() {
    let platform = Platform::new().await;
    let app = platform.start_service(Duration::from_millis(700)).await;

    let order = app.place_order("alice", basket("apple")).await.expect("placed");
    let decided = app.wait_until_decided(&order.id, "alice").await;
    assert_eq!(decided.status(), OrderStatus::Cancelled);
    platform.cancelled.wait_for(&order.id).await;
    let reason = platform.cancelled.bodies_for(&order.id)[0]["reason"].to_string();
    assert!(reason.contains("no reply before its deadline"), "{reason}");

    // The product service answers after all: nothing changes, nothing is published.
    platform.reply(&order.id, true, MessageId::new()).await;
    platform.wait_until_replies_drained().await;
    app.assert_status_stays(&order.id, "alice", OrderStatus::Cancelled)
        .await;
    assert_eq!(platform.confirmed.distinct_for(&order.id), 0, "a late reply confirmed");
    assert_eq!(platform.cancelled.distinct_for(&order.id), 1, "cancelled twice");

    let (_, metrics) = app.http_get("/metrics").await;
    assert!(
        metrics.contains(r#"order_stock_reply_seconds_bucket{outcome="timeout""#),
        "{metrics}"
    );
    app.stop().await.expect("a clean stop");
    platform.clean_up().await;
}

#[tokio::test]
async fn duplicate_and_contradicting_replies_decide_once() {
    let platform = Platform::new().await;
    let app = platform.start_service(NO_DEADLINE).await;

    // The same reply twice (same message id), handled concurrently or not.
    let duplicated = app.place_order("alice", basket("apple")).await.expect("placed");
    let id = MessageId::new();
    platform.reply(&duplicated.id, true, id.clone()).await;
    platform.reply(&duplicated.id, true, id).await;
    // Success, then, once decided, a contradicting failure (another message id).
    let contradicted = app.place_order("alice", basket("apple")).await.expect("placed");
    platform.reply(&contradicted.id, true, MessageId::new()).await;
    let decided = app.wait_until_decided(&contradicted.id, "alice").await;
    assert_eq!(decided.status(), OrderStatus::Confirmed);
    platform.reply(&contradicted.id, false, MessageId::new()).await;
    // Success and failure racing (consumed concurrently): whichever commits first decides.
    let raced = app.place_order("alice", basket("apple")).await.expect("placed");
    platform.reply(&raced.id, true, MessageId::new()).await;
    platform.reply(&raced.id, false, MessageId::new()).await;

    for order in [&duplicated, &contradicted] {
        let decided = app.wait_until_decided(&order.id, "alice").await;
        assert_eq!(decided.status(), OrderStatus::Confirmed, "{}", order.id);
        platform.confirmed.wait_for(&order.id).await;
    }
    let raced_status = app.wait_until_decided(&raced.id, "alice").await.status();
    match raced_status {
        OrderStatus::Confirmed => platform.confirmed.wait_for(&raced.id).await,
        _ => platform.cancelled.wait_for(&raced.id).await,
    }
    platform.wait_until_replies_drained().await;
    let window = tokio::time::Instant::now() + Duration::from_millis(500);
    while tokio::time::Instant::now() < window {
        for (order, status) in [
            (&duplicated, OrderStatus::Confirmed),
            (&contradicted, OrderStatus::Confirmed),
            (&raced, raced_status),
        ] {
            let now = app.get_order(&order.id, "alice").await.expect("readable");
            assert_eq!(now.status(), status, "{}", order.id);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for order in [&duplicated, &contradicted] {
        assert_eq!(platform.confirmed.distinct_for(&order.id), 1, "{}", order.id);
        assert_eq!(platform.cancelled.distinct_for(&order.id), 0, "{}", order.id);
    }
    let (confirmed, cancelled) = match raced_status {
        OrderStatus::Confirmed => (1, 0),
        _ => (0, 1),
    };
    assert_eq!(platform.confirmed.distinct_for(&raced.id), confirmed);
    assert_eq!(platform.cancelled.distinct_for(&raced.id), cancelled);
    app.stop().await.expect("a clean stop");
    platform.clean_up().await;
}

#[tokio::test]
async fn messages_it_cannot_act_on_go_to_the_dead_letter_queue() {
    let mut platform = Platform::new().await;
    let app = platform.start_service(NO_DEADLINE).await;
    platform.start_stock(Stock::Platform);

    let unknown_order = format!(r#"{{"order_id":"{}","success":true}}"#, uuid::Uuid::new_v4());
    let poison: [&[u8]; 3] = [b"not json", br#"{"what":"wrong shape"}"#, unknown_order.as_bytes()];
    for body in poison {
        platform.publish_reply(body, MessageId::new()).await;
    }
    let mut dead = platform
        .transport
        .subscribe(&format!("{}.dlq", platform.names.stock_update_queue))
        .await
        .expect("the DLQ is consumable");
    let mut dead_bodies = HashSet::new();
    while dead_bodies.len() < poison.len() {
        let delivery = tokio::time::timeout(PATIENCE, dead.next())
            .await
            .expect("dead-lettered in time")
            .expect("a delivery")
            .expect("a delivery");
        dead_bodies.insert(delivery.message.payload.clone());
        let _ = delivery.settle.settle(Settlement::Ack).await;
    }
    let expected: HashSet<Vec<u8>> = poison.iter().map(|b| b.to_vec()).collect();
    assert_eq!(dead_bodies, expected);
    drop(dead);

    // The consumer carries on.
    let after = app.place_order("alice", basket("apple")).await.expect("placed");
    assert_eq!(
        app.wait_until_decided(&after.id, "alice").await.status(),
        OrderStatus::Confirmed
    );
    let (_, metrics) = app.http_get("/metrics").await;
    assert!(
        metrics.contains(r#"saga_messages_total{outcome="dead_letter"}"#),
        "{metrics}"
    );
    app.stop().await.expect("a clean stop");
    platform.clean_up().await;
}

#[tokio::test]
async fn two_replicas_decide_every_order_exactly_once() {
    const ORDERS: usize = 24;
    let mut platform = Platform::new().await;
    let replicas = [
        platform.start_service(NO_DEADLINE).await,
        platform.start_service(NO_DEADLINE).await,
    ];
    platform.start_stock(Stock::Platform);

    let mut placed = Vec::new();
    for n in 0..ORDERS {
        let product = if n % 4 == 3 { "unobtainium" } else { "apple" };
        let order = replicas[n % 2]
            .place_order("alice", basket(product))
            .await
            .expect("placed");
        placed.push((order.id, product == "apple"));
    }
    for (n, (id, reserved)) in placed.iter().enumerate() {
        // Read through the other replica.
        let decided = replicas[(n + 1) % 2].wait_until_decided(id, "alice").await;
        let expected = if *reserved {
            OrderStatus::Confirmed
        } else {
            OrderStatus::Cancelled
        };
        assert_eq!(decided.status(), expected, "order {id}");
        let events = if *reserved {
            &platform.confirmed
        } else {
            &platform.cancelled
        };
        events.wait_for(id).await;
    }
    let [first, second] = replicas;
    first.stop().await.expect("a clean stop");
    second.stop().await.expect("a clean stop");
    // Everything published is in; count by message id.
    let (confirmed, cancelled) = (platform.confirmed.per_order(), platform.cancelled.per_order());
    for (id, reserved) in &placed {
        let (wanted, unwanted) = if *reserved {
            (&confirmed, &cancelled)
        } else {
            (&cancelled, &confirmed)
        };
        assert_eq!(wanted.get(id).map_or(0, HashSet::len), 1, "order {id}");
        assert!(!unwanted.contains_key(id), "order {id} decided both ways");
    }
    assert_eq!(confirmed.len() + cancelled.len(), ORDERS);
    platform.clean_up().await;
}

#[tokio::test]
async fn it_waits_for_the_database_and_rides_out_its_outage() {
    let mut platform = Platform::new().await;
    let proxy = Proxy::start(database_addr(), false).await;
    let url = with_host(&platform.database_url, proxy.addr);
    let app: TestApp = spawn_app_with(platform.config_on(url, NO_DEADLINE)).await;
    platform.start_stock(Stock::Platform);

    // PostgreSQL is away at start-up: the service waits, not serving.
    assert_eq!(app.health().await, ServingStatus::NotServing);
    assert_eq!(app.http_get("/readyz").await.0, 503);
    let starting = app.place_order("alice", basket("apple")).await.expect_err("not ready");
    assert_eq!(starting.code(), Code::Unavailable, "{starting:?}");

    proxy.restore().await;
    app.wait_until_serving(START_BACKENDS).await;
    let before = app.place_order("alice", basket("apple")).await.expect("placed");
    assert_eq!(
        app.wait_until_decided(&before.id, "alice").await.status(),
        OrderStatus::Confirmed
    );

    // PostgreSQL goes away while serving: UNAVAILABLE with a clear message.
    proxy.cut();
    let create = app
        .place_order("alice", basket("apple"))
        .await
        .expect_err("database down");
    assert_eq!(create.code(), Code::Unavailable, "{create:?}");
    assert!(create.message().contains("database"), "{create:?}");
    let get = app.get_order(&before.id, "alice").await.expect_err("database down");
    assert_eq!(get.code(), Code::Unavailable, "{get:?}");
    // It says so: not ready after three missed checks, 2 s apart.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while app.http_get("/readyz").await.0 != 503 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still ready with the database away"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Health is set with /readyz, each a moment after the other.
    while app.health().await != ServingStatus::NotServing {
        assert!(tokio::time::Instant::now() < deadline, "/readyz 503 but health SERVING");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // ... and recovers by itself when it returns.
    proxy.restore().await;
    app.wait_until_serving("ready again once the database answers").await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while app.http_get("/readyz").await.0 != 200 {
        assert!(tokio::time::Instant::now() < deadline, "SERVING but /readyz not 200");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let after = loop {
        match app.place_order("alice", basket("apple")).await {
            Ok(order) => break order,
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                assert!(tokio::time::Instant::now() < deadline, "no recovery: {status:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(
        app.wait_until_decided(&after.id, "alice").await.status(),
        OrderStatus::Confirmed
    );
    assert_eq!(
        app.get_order(&before.id, "alice").await.expect("readable").status(),
        OrderStatus::Confirmed
    );
    app.stop().await.expect("a clean stop");
    drop(proxy);
    platform.clean_up().await;
}

#[tokio::test]
async fn a_table_locked_by_an_operator_gets_unavailable_not_a_hang_and_orders_resume() {
    let mut platform = Platform::new().await;
    let app = platform.start_service(NO_DEADLINE).await;
    platform.start_stock(Stock::Platform);
    let before = app.place_order("alice", basket("apple")).await.expect("placed");
    assert_eq!(
        app.wait_until_decided(&before.id, "alice").await.status(),
        OrderStatus::Confirmed
    );

    // An operator's `ALTER TABLE` or `VACUUM FULL`, held open.
    let mut operator = sqlx::PgConnection::connect(&platform.database_url)
        .await
        .expect("the database is reachable");
    sqlx::query("BEGIN").execute(&mut operator).await.expect("begin");
    sqlx::query("LOCK TABLE order_service.orders IN ACCESS EXCLUSIVE MODE")
        .execute(&mut operator)
        .await
        .expect("locked");
    // Bounded well past the service's own limits: a hang fails here.
    let bound = order_service::orders::ANSWER_WITHIN + Duration::from_secs(4);
    let create = tokio::time::timeout(bound, app.place_order("alice", basket("apple")))
        .await
        .expect("CreateOrder answered, not hung")
        .expect_err("the orders table is locked");
    assert_eq!(create.code(), Code::Unavailable, "{create:?}");
    let get = tokio::time::timeout(bound, app.get_order(&before.id, "alice"))
        .await
        .expect("GetOrder answered, not hung")
        .expect_err("the orders table is locked");
    assert_eq!(get.code(), Code::Unavailable, "{get:?}");

    sqlx::query("ROLLBACK").execute(&mut operator).await.expect("released");
    let _ = operator.close().await;
    let after = app
        .place_order("alice", basket("apple"))
        .await
        .expect("placed once released");
    assert_eq!(
        app.wait_until_decided(&after.id, "alice").await.status(),
        OrderStatus::Confirmed
    );
    app.stop().await.expect("a clean stop");
    platform.clean_up().await;
}

#[tokio::test]
async fn orders_are_accepted_while_rabbitmq_is_awaited_and_flow_once_it_is_there() {
    let mut platform = Platform::new().await;
    let proxy = Proxy::start(broker_addr(), false).await;
    let mut config = platform.config(NO_DEADLINE);
    if let Backend::Production { rabbitmq_url: url, .. } = &mut config.backend {
        *url = SecretUrl::new(with_host(&rabbitmq_url(), proxy.addr));
    }
    let app = spawn_app_with(config).await;
    platform.start_stock(Stock::Platform);

    // Once the database is migrated, orders are taken: the outbox holds their events.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let order = loop {
        match app.place_order("alice", basket("apple")).await {
            Ok(order) => break order,
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                assert!(tokio::time::Instant::now() < deadline, "never accepted: {status:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(order.status(), OrderStatus::Pending);
    assert_eq!(
        app.health().await,
        ServingStatus::NotServing,
        "SERVING without a broker"
    );

    proxy.restore().await;
    app.wait_until_serving(START_BACKENDS).await;
    assert_eq!(
        app.wait_until_decided(&order.id, "alice").await.status(),
        OrderStatus::Confirmed
    );
    app.stop().await.expect("a clean stop");
    drop(proxy);
    platform.clean_up().await;
}

/// Counts rows of the saga store on `database_url`.
async fn count(database_url: &str, sql: &'static str) -> i64 {
    let mut conn = sqlx::PgConnection::connect(database_url)
        .await
        .expect("the database is reachable");
    let n = sqlx::query_scalar::<_, i64>(sql)
        .fetch_one(&mut conn)
        .await
        .expect("countable");
    let _ = conn.close().await;
    n
}

#[tokio::test]
async fn the_saga_store_is_purged_as_configured_and_the_orders_stay() {
    let mut platform = Platform::new().await;
    let mut config = platform.config(NO_DEADLINE);
    // Sent messages deleted once sent; finished sagas at the next purge.
    config.retention.store.sent_messages = Duration::ZERO;
    config.retention.store.finished_instances = Some(Duration::from_millis(1));
    config.retention.interval = Duration::from_millis(100);
    let app = spawn_app_with(config).await;
    app.wait_until_serving(START_BACKENDS).await;
    platform.start_stock(Stock::Platform);

    let order = app
        .place_order_with_key("alice", "purged-1", basket("apple"))
        .await
        .expect("placed");
    assert_eq!(
        app.wait_until_decided(&order.id, "alice").await.status(),
        OrderStatus::Confirmed
    );
    platform.confirmed.wait_for(&order.id).await;

    let url = platform.database_url.clone();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let sagas = count(&url, "SELECT count(*) FROM saga_instances").await;
        let history = count(&url, "SELECT count(*) FROM saga_history").await;
        let outbox = count(&url, "SELECT count(*) FROM saga_outbox").await;
        if sagas == 0 && history == 0 && outbox == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "after {PATIENCE:?}: {sagas} saga(s), {history} history row(s), {outbox} outbox row(s) left"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A retry under the same idempotency key returns the order as it stands
    // and starts nothing, though its saga is gone.
    let retry = app
        .place_order_with_key("alice", "purged-1", basket("apple"))
        .await
        .expect("the retry is answered");
    assert_eq!(retry.id, order.id);
    assert_eq!(retry.status(), OrderStatus::Confirmed);
    // The order itself is never purged, and a reply for its purged saga
    // (a contradicting one, under a new id) changes nothing.
    platform.reply(&order.id, false, MessageId::new()).await;
    platform.wait_until_replies_drained().await;
    app.assert_status_stays(&order.id, "alice", OrderStatus::Confirmed)
        .await;
    assert_eq!(
        platform.cancelled.distinct_for(&order.id),
        0,
        "a purged saga was cancelled"
    );
    assert_eq!(
        count(&url, "SELECT count(*) FROM saga_instances").await,
        0,
        "no saga came back"
    );
    let (_, metrics) = app.http_get("/metrics").await;
    assert!(
        metrics.contains(r#"saga_retention_deleted_total{rows="sagas"} 1"#),
        "/metrics does not count the purged saga:\n{metrics}"
    );
    assert!(
        metrics.contains("saga_retention_seconds_count"),
        "/metrics does not time the purge:\n{metrics}"
    );

    app.stop().await.expect("a clean stop");
    platform.clean_up().await;
}

/// A login role for one test (created if missing, without a password: the
/// tests' server trusts loopback logins); [`drop`](Self::drop) it after
/// the platform's clean-up, which drops the database it may own.
struct TestRole {
    name: &'static str,
    admin: sqlx::PgConnection,
}

impl TestRole {
    async fn create(name: &'static str) -> Self {
        let mut admin = sqlx::PgConnection::connect(&crate::platform::database_url())
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL is not reachable ({e}); {START_BACKENDS}"));
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DO $$ BEGIN CREATE ROLE {name} LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$"
        )))
        .execute(&mut admin)
        .await
        .expect("the role is there");
        Self { name, admin }
    }

    /// The platform's database URL logging in as this role, made the
    /// database's owner first if `owner`.
    async fn url(&mut self, platform: &Platform, owner: bool) -> String {
        if owner {
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "ALTER DATABASE {} OWNER TO {}",
                platform.database, self.name
            )))
            .execute(&mut self.admin)
            .await
            .expect("the role owns the test database");
        }
        let (scheme, rest) = platform.database_url.split_once("://").expect("a URL");
        let host = rest.split_once('@').map_or(rest, |(_, host)| host);
        format!("{scheme}://{}@{host}", self.name)
    }

    async fn drop(mut self) {
        let drop = format!("DROP ROLE IF EXISTS {}", self.name);
        let _ = sqlx::query(sqlx::AssertSqlSafe(drop)).execute(&mut self.admin).await;
    }
}

/// The schema the saga tables were created in.
async fn saga_schema(database_url: &str) -> String {
    let mut conn = sqlx::PgConnection::connect(database_url)
        .await
        .expect("the database is reachable");
    let schema = sqlx::query_scalar("SELECT schemaname::text FROM pg_tables WHERE tablename = 'saga_instances'")
        .fetch_one(&mut conn)
        .await
        .expect("one saga_instances table");
    let _ = conn.close().await;
    schema
}

/// A login role named like the order tables' schema. Under the server's
/// default search path (`"$user", public`) the schema it finds first once
/// it exists, the second start's saga migrator read the order tables'
/// migration history as its own, refused it, and never became ready.
#[tokio::test]
async fn a_login_role_named_like_the_order_schema_starts_again() {
    const ROLE: &str = "order_service";
    let platform = Platform::new().await;
    let mut role = TestRole::create(ROLE).await;
    let as_role = role.url(&platform, true).await;
    for start in ["first", "second"] {
        let app = spawn_app_with(platform.config_on(as_role.clone(), NO_DEADLINE)).await;
        app.wait_until_serving(&format!("{start} start as role {ROLE}; {START_BACKENDS}"))
            .await;
        app.stop().await.expect("a clean stop");
    }
    assert_eq!(saga_schema(&platform.database_url).await, "public");
    platform.clean_up().await;
    role.drop().await;
}

/// Any other role with a schema of its own, under the stock search path,
/// keeps the saga tables there, where they were before the pin.
#[tokio::test]
async fn a_login_role_with_a_schema_of_its_own_keeps_the_saga_tables_there() {
    const ROLE: &str = "saga_keeper";
    let platform = Platform::new().await;
    let mut role = TestRole::create(ROLE).await;
    let as_role = role.url(&platform, true).await;
    let mut conn = sqlx::PgConnection::connect(&platform.database_url)
        .await
        .expect("the test database is reachable");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE SCHEMA {ROLE} AUTHORIZATION {ROLE}"
    )))
    .execute(&mut conn)
    .await
    .expect("the role's own schema");
    let _ = conn.close().await;
    let app = spawn_app_with(platform.config_on(as_role, NO_DEADLINE)).await;
    app.wait_until_serving(START_BACKENDS).await;
    app.stop().await.expect("a clean stop");
    assert_eq!(saga_schema(&platform.database_url).await, ROLE);
    platform.clean_up().await;
    role.drop().await;
}

/// A search path the database (or the role, or the URL) sets is kept: the
/// saga tables go where it says, as they did before the stock default was
/// pinned.
#[tokio::test]
async fn a_search_path_the_database_sets_is_where_the_saga_tables_go() {
    let platform = Platform::new().await;
    let mut conn = sqlx::PgConnection::connect(&platform.database_url)
        .await
        .expect("the test database is reachable");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE SCHEMA sagas; ALTER DATABASE {} SET search_path = sagas",
        platform.database
    )))
    .execute(&mut conn)
    .await
    .expect("the database sets its search path");
    let _ = conn.close().await;
    let app = platform.start_service(NO_DEADLINE).await;
    app.stop().await.expect("a clean stop");
    assert_eq!(
        saga_schema(&platform.database_url).await,
        "sagas",
        "the saga tables live in the schema the database names"
    );
    platform.clean_up().await;
}

/// A migration that cannot take its lock (a long transaction holds the
/// table) gives up after its lock timeout and is tried again, rather than
/// waiting on for as long as that transaction stays open, with every other
/// statement on the table queued behind its `ALTER TABLE`.
#[tokio::test]
async fn a_migration_blocked_by_a_long_transaction_gives_up_and_tries_again() {
    let platform = Platform::new().await;
    let app = platform.start_service(NO_DEADLINE).await;
    app.stop().await.expect("a clean stop");
    // The store as it was before its latest migration.
    let mut setup = sqlx::PgConnection::connect(&platform.database_url)
        .await
        .expect("the test database is reachable");
    sqlx::raw_sql("ALTER TABLE saga_outbox DROP COLUMN discarded_at; DELETE FROM _sqlx_migrations WHERE version = 7")
        .execute(&mut setup)
        .await
        .expect("the latest migration undone");
    let mut holder = sqlx::PgConnection::connect(&platform.database_url)
        .await
        .expect("the test database is reachable");
    sqlx::raw_sql("BEGIN; LOCK TABLE saga_outbox IN ACCESS SHARE MODE")
        .execute(&mut holder)
        .await
        .expect("the table is held");

    let app = spawn_app_with(platform.config(NO_DEADLINE)).await;
    let waited = "SELECT coalesce(max(extract(epoch FROM now() - query_start)), 0)::float8 FROM pg_stat_activity \
                  WHERE pid <> pg_backend_pid() AND wait_event_type = 'Lock' AND query ILIKE '%ADD COLUMN discarded_at%'";
    let mut longest = 0.0f64;
    let mut seen = false;
    for _ in 0..60 {
        let wait: f64 = sqlx::query_scalar(waited)
            .fetch_one(&mut setup)
            .await
            .expect("pg_stat_activity");
        seen |= wait > 0.0;
        longest = longest.max(wait);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(seen, "the migration never waited for the lock: the test proves nothing");
    assert!(longest < 7.0, "the migration waited {longest:.1} s for its lock");
    assert_eq!(app.health().await, ServingStatus::NotServing, "not migrated yet");

    sqlx::raw_sql("ROLLBACK").execute(&mut holder).await.expect("released");
    app.wait_until_serving("migrated once the table is free").await;
    app.stop().await.expect("a clean stop");
    let _ = holder.close().await;
    let _ = setup.close().await;
    platform.clean_up().await;
}

/// While production mode waits for its database (here a role that may not
/// create the store's tables, so the migration keeps failing), the
/// dashboard says so with a 503, as the admin API answers UNAVAILABLE,
/// rather than a 500 about a missing table.
#[tokio::test]
async fn the_dashboard_answers_503_until_the_database_is_migrated() {
    const ROLE: &str = "saga_onlooker";
    let platform = Platform::new().await;
    let mut role = TestRole::create(ROLE).await;
    // Not the owner: it may not create tables in `public`.
    let as_role = role.url(&platform, false).await;
    let app = spawn_app_with(platform.config_on(as_role, NO_DEADLINE)).await;
    // Long enough for a migration attempt to have failed.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(app.health().await, ServingStatus::NotServing);
    let (status, page) = app.http_get("/").await;
    assert_eq!(status, 503, "{page}");
    assert!(page.contains("waiting for its database"), "{page}");
    app.stop().await.expect("a clean stop");
    platform.clean_up().await;
    role.drop().await;
}
