//! The admin API (`saga.admin.v1.SagaAdmin`) over real gRPC: the bearer
//! token, listing and reading instances with their history, retry / cancel
//! / resume recorded in the history, stuck instances, dead letters listed
//! and replayed, and messages the broker refuses found in the outbox and
//! given up — in embedded mode and on PostgreSQL + RabbitMQ.

use std::sync::Arc;
use std::time::Duration;

use order_service::Config;
use order_service::admin::proto::saga_admin_client::SagaAdminClient;
use order_service::admin::proto::{
    self as admin, DiscardUnsentMessageRequest, GetInstanceRequest, GetInstanceResponse, ListDeadLettersRequest,
    ListInstancesRequest, ListUnsentMessagesRequest, OperatorActionRequest, ReplayDeadLettersRequest, SagaStatus,
};
use order_service::config::{AdminToken, ListenAddr};
use order_service::domain::{IdempotencyKey, OrderId, UserId};
use order_service::proto::OrderStatus;
use order_service::saga::ORDER_SAGA;
use saga_core::{Cause, MessageId, QueryStore, SagaId, SagaStatus as CoreStatus};
use saga_postgres::PostgresStore;
use sqlx::postgres::PgPoolOptions;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use crate::helpers::{PATIENCE, TestApp, item, spawn_app, spawn_app_with};
use crate::platform::{Platform, START_BACKENDS, Stock, basket};

const TOKEN: &str = "test-admin-token-0123456789";

/// Long enough never to fire in these tests.
const NO_DEADLINE: Duration = Duration::from_secs(600);

/// The service in embedded mode with the admin API on.
async fn spawn_admin_app() -> TestApp {
    spawn_app_with(Config {
        grpc: ListenAddr::localhost(0),
        metrics: ListenAddr::localhost(0),
        admin_token: Some(AdminToken::new(TOKEN)),
        ..Config::default()
    })
    .await
}

/// The service on `platform`, admin API on, waited for until SERVING.
async fn spawn_admin_service(platform: &Platform) -> TestApp {
    let mut config = platform.config(NO_DEADLINE);
    config.admin_token = Some(AdminToken::new(TOKEN));
    let app = spawn_app_with(config).await;
    app.wait_until_serving(START_BACKENDS).await;
    app
}

/// An admin client presenting `token` (none: no authorization metadata).
#[derive(Clone)]
struct Admin {
    client: SagaAdminClient<Channel>,
    token: Option<String>,
}

impl Admin {
    fn new(app: &TestApp, token: Option<&str>) -> Self {
        Self {
            client: SagaAdminClient::new(app.channel.clone()),
            token: token.map(str::to_owned),
        }
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(token) = &self.token {
            let value = format!("Bearer {token}").parse().expect("ASCII");
            request.metadata_mut().insert("authorization", value);
        }
        request
    }

    async fn list(&self, request: ListInstancesRequest) -> Result<Vec<admin::SagaInstance>, Status> {
        let response = self.client.clone().list_instances(self.request(request)).await?;
        Ok(response.into_inner().instances)
    }

    async fn get(&self, id: &str) -> Result<GetInstanceResponse, Status> {
        let request = self.request(GetInstanceRequest { id: id.to_owned() });
        Ok(self.client.clone().get_instance(request).await?.into_inner())
    }

    async fn act(&self, action: &str, id: &str) -> Result<admin::SagaInstance, Status> {
        let request = self.request(OperatorActionRequest { id: id.to_owned() });
        let mut client = self.client.clone();
        let response = match action {
            "retry" => client.retry(request).await?,
            "cancel" => client.cancel(request).await?,
            "resume" => client.resume(request).await?,
            other => panic!("no action {other}"),
        };
        Ok(response.into_inner().instance.expect("the instance after the action"))
    }

    async fn discard(&self, saga_id: &str, outbox_id: i64, reason: &str) -> Result<admin::SagaInstance, Status> {
        let request = self.request(DiscardUnsentMessageRequest {
            saga_id: saga_id.to_owned(),
            outbox_id,
            reason: reason.to_owned(),
        });
        let response = self.client.clone().discard_unsent_message(request).await?;
        Ok(response.into_inner().instance.expect("the instance after the action"))
    }

    async fn dead_letters(&self) -> Result<Vec<admin::DeadLetterQueue>, Status> {
        let request = self.request(ListDeadLettersRequest::default());
        Ok(self
            .client
            .clone()
            .list_dead_letters(request)
            .await?
            .into_inner()
            .queues)
    }

    async fn unsent(&self, request: ListUnsentMessagesRequest) -> Result<Vec<admin::UnsentMessage>, Status> {
        let response = self.client.clone().list_unsent_messages(self.request(request)).await?;
        Ok(response.into_inner().messages)
    }

    async fn replay(&self, request: ReplayDeadLettersRequest) -> Result<admin::ReplayDeadLettersResponse, Status> {
        Ok(self
            .client
            .clone()
            .replay_dead_letters(self.request(request))
            .await?
            .into_inner())
    }

    /// Polls the listing with `request` until `found` says yes.
    async fn wait_for_listing(
        &self,
        request: ListInstancesRequest,
        what: &str,
        found: impl Fn(&[admin::SagaInstance]) -> bool,
    ) -> Vec<admin::SagaInstance> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let listed = self.list(request.clone()).await.expect("listed");
            if found(&listed) {
                return listed;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: not within {PATIENCE:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Waits until the test stock queue (which nobody consumes) holds `depth` messages.
async fn wait_for_depth(platform: &Platform, depth: u32, what: &str) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let found = platform.queue_depth(&platform.stock_queue).await;
        if found == depth {
            return;
        }
        assert!(
            found < depth && tokio::time::Instant::now() < deadline,
            "{what}: {found} messages in the stock queue, expected {depth}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn stuck_for(duration: Duration) -> ListInstancesRequest {
    ListInstancesRequest {
        stuck_for: Some(duration.try_into().expect("a duration")),
        ..ListInstancesRequest::default()
    }
}

fn ids(instances: &[admin::SagaInstance]) -> Vec<&str> {
    instances.iter().map(|i| i.id.as_str()).collect()
}

fn operator_actions(history: &[admin::Transition]) -> Vec<String> {
    history
        .iter()
        .filter_map(|t| match t.cause.as_ref().and_then(|c| c.kind.as_ref()) {
            Some(admin::cause::Kind::Operator(operator)) => Some(operator.action.clone()),
            _ => None,
        })
        .collect()
}

fn assert_code<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, what: &str) -> Status {
    match result {
        Err(status) if status.code() == code => status,
        other => panic!("{what}: expected {code:?}, got {other:?}"),
    }
}

#[tokio::test]
async fn without_admin_token_the_admin_api_is_not_served() {
    let app = spawn_app().await;
    let admin = Admin::new(&app, Some(TOKEN));
    assert_code(
        admin.list(ListInstancesRequest::default()).await,
        Code::Unimplemented,
        "no ADMIN_TOKEN, no admin API",
    );
}

#[tokio::test]
async fn the_admin_api_wants_the_bearer_token() {
    let app = spawn_admin_app().await;
    for token in [None, Some("wrong"), Some("test-admin-token-012345678")] {
        let status = assert_code(
            Admin::new(&app, token).list(ListInstancesRequest::default()).await,
            Code::Unauthenticated,
            &format!("token {token:?}"),
        );
        assert!(!status.message().contains(TOKEN), "never echoes the token");
    }
    assert_code(
        Admin::new(&app, None).act("cancel", &SagaId::new().to_string()).await,
        Code::Unauthenticated,
        "actions too",
    );
    Admin::new(&app, Some(TOKEN))
        .list(ListInstancesRequest::default())
        .await
        .expect("the right token is let in");
}

#[tokio::test]
async fn a_decided_order_is_listed_and_shown_with_its_history() {
    let app = spawn_admin_app().await;
    let admin = Admin::new(&app, Some(TOKEN));
    let order = app
        .place_order("alice", vec![item("apple", 2, 1.5)])
        .await
        .expect("placed");
    assert_eq!(
        app.wait_until_decided(&order.id, "alice").await.status(),
        OrderStatus::Confirmed
    );

    let completed = admin
        .list(ListInstancesRequest {
            definition: ORDER_SAGA.to_owned(),
            statuses: vec![SagaStatus::Completed as i32],
            ..ListInstancesRequest::default()
        })
        .await
        .expect("listed");
    assert_eq!(ids(&completed), [order.id.as_str()], "the saga id is the order id");
    assert!(
        admin
            .list(ListInstancesRequest {
                statuses: vec![SagaStatus::Running as i32],
                ..ListInstancesRequest::default()
            })
            .await
            .expect("listed")
            .is_empty()
    );
    assert!(
        admin.list(stuck_for(Duration::ZERO)).await.expect("listed").is_empty(),
        "a finished saga is never stuck"
    );
    assert!(
        admin
            .list(ListInstancesRequest {
                older_than: Some(Duration::from_secs(3600).try_into().expect("a duration")),
                ..ListInstancesRequest::default()
            })
            .await
            .expect("listed")
            .is_empty(),
        "not an hour old"
    );

    let shown = admin.get(&order.id).await.expect("shown");
    let instance = shown.instance.expect("the instance");
    assert_eq!(instance.status(), SagaStatus::Completed);
    assert_eq!(
        (instance.definition.as_str(), instance.definition_version),
        (ORDER_SAGA, 1)
    );
    assert_eq!(instance.key, order.id);
    assert_eq!(instance.current_step, "", "finished");
    assert!(instance.data_json.contains("apple"), "{}", instance.data_json);
    assert_eq!(shown.steps, ["create-order", "reserve-stock", "confirm-order"]);

    let history = &shown.history;
    assert_eq!(history.len(), 2, "{history:#?}");
    let kind = |t: &admin::Transition| t.cause.as_ref().and_then(|c| c.kind.clone()).expect("a cause");
    assert!(matches!(kind(&history[0]), admin::cause::Kind::Started(_)));
    assert_eq!(history[0].before, None, "the start has no before");
    let after_start = history[0].after.as_ref().expect("after");
    assert_eq!(
        (after_start.status(), after_start.step_name.as_str()),
        (SagaStatus::Running, "reserve-stock")
    );
    assert_eq!(history[0].emitted.len(), 1);
    assert_eq!(history[0].emitted[0].r#type, "OrderCreated");
    let admin::cause::Kind::Message(reply) = kind(&history[1]) else {
        panic!("the stock reply decided: {history:#?}");
    };
    assert_eq!(reply.r#type, "StockUpdateResult");
    assert!(!reply.message_id.is_empty(), "with its message id");
    assert_eq!(
        history[1].after.as_ref().map(|p| p.status()),
        Some(SagaStatus::Completed)
    );
    assert_eq!(history[1].emitted[0].r#type, "OrderConfirmed");
    assert!(history[1].at.is_some() && history[0].revision < history[1].revision);

    // Embedded mode reads the in-process dead-letter queues.
    let queues = admin.dead_letters().await.expect("dead letters listed");
    let names: Vec<&str> = queues.iter().map(|q| q.queue.as_str()).collect();
    assert_eq!(names, ["order_service_stock_update_queue", "demo_stock_service_queue"]);
    assert!(queues.iter().all(|q| q.total == 0 && q.messages.is_empty()));
}

#[tokio::test]
async fn bad_requests_name_the_field_and_actions_must_apply() {
    let app = spawn_admin_app().await;
    let admin = Admin::new(&app, Some(TOKEN));
    let order = app
        .place_order("alice", vec![item("apple", 1, 1.0)])
        .await
        .expect("placed");
    app.wait_until_decided(&order.id, "alice").await;

    fn invalid<T: std::fmt::Debug>(result: Result<T, Status>, field: &str) {
        let status = assert_code(result, Code::InvalidArgument, field);
        assert!(status.message().starts_with(&format!("{field}: ")), "{status:?}");
    }
    invalid(admin.get("not-a-uuid").await.map(drop), "id");
    invalid(admin.get("").await.map(drop), "id");
    invalid(admin.act("retry", "junk").await.map(drop), "id");
    let list = |request: ListInstancesRequest| admin.list(request);
    invalid(
        list(ListInstancesRequest {
            limit: 501,
            ..ListInstancesRequest::default()
        })
        .await,
        "limit",
    );
    invalid(
        list(ListInstancesRequest {
            statuses: vec![42],
            ..ListInstancesRequest::default()
        })
        .await,
        "statuses",
    );
    invalid(
        list(ListInstancesRequest {
            page_token: "junk".into(),
            ..ListInstancesRequest::default()
        })
        .await,
        "page_token",
    );
    invalid(
        list(ListInstancesRequest {
            stuck_for: Some(prost_types_duration(-1)),
            ..ListInstancesRequest::default()
        })
        .await,
        "stuck_for",
    );
    let unsent = |request: ListUnsentMessagesRequest| admin.unsent(request);
    invalid(
        unsent(ListUnsentMessagesRequest {
            saga_id: "not-a-uuid".into(),
            ..ListUnsentMessagesRequest::default()
        })
        .await,
        "saga_id",
    );
    invalid(
        unsent(ListUnsentMessagesRequest {
            limit: 501,
            ..ListUnsentMessagesRequest::default()
        })
        .await,
        "limit",
    );
    invalid(
        unsent(ListUnsentMessagesRequest {
            older_than: Some(prost_types_duration(-1)),
            ..ListUnsentMessagesRequest::default()
        })
        .await,
        "older_than",
    );
    invalid(admin.discard("not-a-uuid", 1, "why").await, "saga_id");
    invalid(admin.discard(&order.id, 0, "why").await, "outbox_id");
    invalid(admin.discard(&order.id, 1, " ").await, "reason");
    invalid(admin.discard(&order.id, 1, &"x".repeat(501)).await, "reason");
    invalid(admin.replay(ReplayDeadLettersRequest::default()).await, "message_ids");
    invalid(
        admin
            .replay(ReplayDeadLettersRequest {
                all: true,
                message_ids: vec!["m-1".into()],
                ..ReplayDeadLettersRequest::default()
            })
            .await,
        "message_ids",
    );
    invalid(
        admin
            .replay(ReplayDeadLettersRequest {
                queue: "someone_elses_queue".into(),
                all: true,
                ..ReplayDeadLettersRequest::default()
            })
            .await,
        "queue",
    );

    let unknown = SagaId::new().to_string();
    assert_code(admin.get(&unknown).await, Code::NotFound, "get an unknown saga");
    for action in ["retry", "cancel", "resume"] {
        assert_code(admin.act(action, &unknown).await, Code::NotFound, action);
        let refused = assert_code(
            admin.act(action, &order.id).await,
            Code::FailedPrecondition,
            &format!("{action} of a confirmed order"),
        );
        assert!(refused.message().contains("finished"), "says why: {refused:?}");
    }
    assert_code(
        admin.discard(&unknown, 1, "why").await,
        Code::NotFound,
        "discard for an unknown saga",
    );
    // No unsent message has this id (the confirmed order's are all sent).
    let refused = assert_code(
        admin.discard(&order.id, i64::MAX, "why").await,
        Code::FailedPrecondition,
        "discard of a message that is not unsent",
    );
    assert!(
        refused.message().contains("not an unsent message"),
        "says why: {refused:?}"
    );
    let history = admin.get(&order.id).await.expect("shown").history;
    assert!(operator_actions(&history).is_empty(), "refused actions leave no trace");
}

/// The service's `saga_outbox_refused_total` (the test process's count).
async fn refusals(app: &TestApp) -> u64 {
    let (_, metrics) = app.http_get("/metrics").await;
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("saga_outbox_refused_total "))
        .and_then(|count| count.trim().parse().ok())
        .unwrap_or_else(|| panic!("/metrics counts refusals:\n{metrics}"))
}

fn prost_types_duration(seconds: i64) -> prost_types::Duration {
    prost_types::Duration { seconds, nanos: 0 }
}

#[tokio::test]
async fn pages_list_every_instance_once() {
    let app = spawn_admin_app().await;
    let admin = Admin::new(&app, Some(TOKEN));
    let mut placed = Vec::new();
    for _ in 0..5 {
        let order = app
            .place_order("alice", vec![item("apple", 1, 1.0)])
            .await
            .expect("placed");
        placed.push(order.id);
    }
    for id in &placed {
        // Decided instances stop changing, so the pages see a still listing.
        app.wait_until_decided(id, "alice").await;
    }
    let mut seen = Vec::new();
    let mut page_token = String::new();
    for _ in 0..10 {
        let response = admin
            .client
            .clone()
            .list_instances(admin.request(ListInstancesRequest {
                limit: 2,
                page_token: page_token.clone(),
                ..ListInstancesRequest::default()
            }))
            .await
            .expect("a page")
            .into_inner();
        assert!(response.instances.len() <= 2);
        seen.extend(response.instances.into_iter().map(|i| i.id));
        if response.next_page_token.is_empty() {
            break;
        }
        page_token = response.next_page_token;
    }
    seen.sort();
    placed.sort();
    assert_eq!(seen, placed, "every instance once over the pages");
}

#[tokio::test]
async fn stuck_orders_are_found_retried_and_cancelled() {
    let mut platform = Platform::new().await;
    platform.start_stock(Stock::Silent);
    let app = spawn_admin_service(&platform).await;
    let admin = Admin::new(&app, Some(TOKEN));

    let waiting = app.place_order("alice", basket("apple")).await.expect("placed");
    let other = app.place_order("bob", basket("apple")).await.expect("placed");
    let running = admin
        .list(ListInstancesRequest {
            statuses: vec![SagaStatus::Running as i32],
            ..ListInstancesRequest::default()
        })
        .await
        .expect("listed");
    assert_eq!(running.len(), 2);
    assert!(
        admin
            .list(stuck_for(Duration::from_secs(3600)))
            .await
            .expect("listed")
            .is_empty(),
        "not stuck for an hour"
    );
    // Nobody answers: after a moment both count as stuck.
    let stuck = admin
        .wait_for_listing(stuck_for(Duration::from_millis(200)), "stuck orders", |found| {
            found.len() == 2
        })
        .await;
    let mut stuck_ids = ids(&stuck);
    stuck_ids.sort();
    let mut expected = vec![waiting.id.as_str(), other.id.as_str()];
    expected.sort();
    assert_eq!(stuck_ids, expected);
    let first = &stuck[0];
    assert_eq!(first.current_step, "reserve-stock", "waiting for the stock reply");
    assert!(!first.awaiting_message_id.is_empty());

    // Retry sends OrderCreated again (a new command id).
    let before = admin.get(&waiting.id).await.expect("shown").instance.expect("instance");
    wait_for_depth(&platform, 2, "one OrderCreated per order").await;
    let retried = admin.act("retry", &waiting.id).await.expect("retried");
    assert_eq!(retried.status(), SagaStatus::Running);
    assert_ne!(retried.awaiting_message_id, before.awaiting_message_id, "a new command");
    wait_for_depth(&platform, 3, "the retried OrderCreated").await;

    // Cancel compensates: the order is cancelled and OrderCancelled published.
    let cancelled = admin.act("cancel", &waiting.id).await.expect("cancelled");
    assert_eq!(cancelled.status(), SagaStatus::Compensated);
    assert!(
        cancelled.failure.contains("cancelled by an operator"),
        "{}",
        cancelled.failure
    );
    assert_eq!(
        app.get_order(&waiting.id, "alice").await.expect("readable").status(),
        OrderStatus::Cancelled
    );
    platform.cancelled.wait_for(&waiting.id).await;
    let published = platform.cancelled.bodies_for(&waiting.id)[0]["reason"].to_string();
    assert!(published.contains("cancelled by an operator"), "{published}");
    let refused = assert_code(
        admin.act("cancel", &waiting.id).await,
        Code::FailedPrecondition,
        "cancelling twice",
    );
    assert!(refused.message().contains("finished"), "{refused:?}");

    let history = admin.get(&waiting.id).await.expect("shown").history;
    assert_eq!(operator_actions(&history), ["retry", "cancel"], "both recorded");
    let retry = &history[history.len() - 2];
    assert_eq!(retry.emitted.len(), 1);
    assert_eq!(retry.emitted[0].r#type, "OrderCreated");
    assert_eq!(retry.note, "operator: retry");
    let cancel = history.last().expect("the cancel");
    assert_eq!(cancel.after.as_ref().map(|p| p.status()), Some(SagaStatus::Compensated));
    assert_eq!(cancel.emitted[0].r#type, "OrderCancelled");

    // The other order is still stuck; the cancelled one no longer.
    let stuck = admin.list(stuck_for(Duration::ZERO)).await.expect("listed");
    assert_eq!(ids(&stuck), [other.id.as_str()]);

    app.stop().await.expect("a clean stop");
    platform.clean_up().await;
}

#[tokio::test]
async fn a_saga_that_needs_attention_is_found_and_resumed() {
    let mut platform = Platform::new().await;
    platform.start_stock(Stock::Silent);
    let app = spawn_admin_service(&platform).await;
    let admin = Admin::new(&app, Some(TOKEN));
    let order = app.place_order("alice", basket("apple")).await.expect("placed");

    // The order saga's compensation cannot fail by itself: put the instance
    // where one that kept failing would be, through the saga store.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&platform.database_url)
        .await
        .expect("the test database is reachable");
    let store = Arc::new(PostgresStore::new(pool.clone()));
    let id: SagaId = order.id.parse().expect("the order id is the saga id");
    let reason = "compensation of `create-order` failed after 5 attempt(s): orders table locked";
    saga_core::testkit::strand(&*store, id, 1, &format!("cancelled by the test; then {reason}"))
        .await
        .expect("stranded")
        .expect("the order's saga exists");

    let stuck = admin.list(stuck_for(Duration::from_secs(3600))).await.expect("listed");
    assert_eq!(
        ids(&stuck),
        [order.id.as_str()],
        "needing attention counts as stuck at once"
    );
    assert_eq!(stuck[0].status(), SagaStatus::NeedsAttention);
    assert_eq!(stuck[0].current_step, "create-order", "the compensation that failed");
    assert!(stuck[0].failure.contains("orders table locked"));
    assert_code(admin.act("cancel", &order.id).await, Code::FailedPrecondition, "cancel");

    // The cause is fixed: resume.
    let resumed = admin.act("resume", &order.id).await.expect("resumed");
    assert_eq!(resumed.status(), SagaStatus::Compensated);
    assert_eq!(
        app.get_order(&order.id, "alice").await.expect("readable").status(),
        OrderStatus::Cancelled
    );
    platform.cancelled.wait_for(&order.id).await;
    let history = store.history(id).await.expect("history");
    let last = history.last().expect("the resume");
    assert_eq!(
        last.cause,
        Cause::Operator {
            action: "resume".into()
        },
        "saga-core recorded the operator action"
    );
    assert_eq!(last.after.status, CoreStatus::Compensated);
    assert!(admin.list(stuck_for(Duration::ZERO)).await.expect("listed").is_empty());

    pool.close().await;
    app.stop().await.expect("a clean stop");
    platform.clean_up().await;
}

#[tokio::test]
async fn dead_letters_are_listed_and_replayed_to_their_exchange() {
    let mut platform = Platform::new().await;
    platform.start_stock(Stock::Silent);
    let app = spawn_admin_service(&platform).await;
    let admin = Admin::new(&app, Some(TOKEN));

    // A reply that overtook its order (not committed yet when the reply
    // came): nothing to apply it to, so it is dead-lettered. Its order id is
    // known in advance from the idempotency key the client will use.
    let user = UserId::parse("alice").expect("a user");
    let key = IdempotencyKey::parse("early-reply-1").expect("a key");
    let order_id = OrderId::for_idempotency_key(&user, &key).to_string();
    let early = MessageId::from(format!("early-{order_id}"));
    platform.reply(&order_id, true, early.clone()).await;
    let poison = MessageId::from("poison-1");
    platform.publish_reply(b"not json at all", poison.clone()).await;

    let deadline = tokio::time::Instant::now() + PATIENCE;
    let queue = loop {
        let queues = admin.dead_letters().await.expect("dead letters listed");
        assert_eq!(queues.len(), 1, "production mode consumes one queue");
        if queues[0].total == 2 {
            break queues.into_iter().next().expect("one queue");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not dead-lettered in time: {queues:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(queue.queue, platform.names.stock_update_queue);
    assert_eq!(
        queue.dead_letter_queue,
        format!("{}.dlq", platform.names.stock_update_queue)
    );
    // The consumer handles replies concurrently: either may have come first.
    let by_id = |id: &MessageId| {
        queue
            .messages
            .iter()
            .find(|m| m.message_id == id.as_str())
            .unwrap_or_else(|| panic!("{id} is listed: {:?}", queue.messages))
    };
    let early_letter = by_id(&early);
    assert!(
        early_letter.reason.contains("does not belong to any saga"),
        "{}",
        early_letter.reason
    );
    assert_eq!(early_letter.original_exchange, platform.names.stock_update_exchange);
    assert_eq!(early_letter.original_routing_key, "");
    assert!(early_letter.replayable);
    assert!(
        early_letter.body_preview.contains(&order_id),
        "{}",
        early_letter.body_preview
    );
    assert_eq!(
        early_letter.r#type, "",
        "untyped, as the platform's product service sends it"
    );
    let poison_letter = by_id(&poison);
    assert_eq!(poison_letter.body_preview, "not json at all");
    assert_eq!(poison_letter.body_size, 15);
    assert_eq!(
        admin.dead_letters().await.expect("listed")[0].total,
        2,
        "looking removes nothing"
    );

    // The order arrives; replaying the early reply confirms it.
    let order = app
        .place_order_with_key("alice", "early-reply-1", basket("apple"))
        .await
        .expect("placed");
    assert_eq!(order.id, order_id);
    assert_eq!(order.status(), OrderStatus::Pending);
    let report = admin
        .replay(ReplayDeadLettersRequest {
            message_ids: vec![early.to_string(), "no-such-message".into()],
            ..ReplayDeadLettersRequest::default()
        })
        .await
        .expect("replayed");
    assert_eq!(report.replayed, [early.to_string()]);
    assert_eq!(report.not_found, ["no-such-message"]);
    assert!(report.failed.is_empty(), "{report:?}");
    assert_eq!(
        app.wait_until_decided(&order.id, "alice").await.status(),
        OrderStatus::Confirmed,
        "the replayed reply was applied"
    );
    let history = admin.get(&order.id).await.expect("shown").history;
    assert!(
        history.iter().any(|t| matches!(
            t.cause.as_ref().and_then(|c| c.kind.as_ref()),
            Some(admin::cause::Kind::Message(m)) if m.message_id == early.as_str()
        )),
        "the history names the replayed message: {history:#?}"
    );

    // The poison message is still there, and still poison.
    let queues = admin.dead_letters().await.expect("listed");
    let left: Vec<&str> = queues[0].messages.iter().map(|m| m.message_id.as_str()).collect();
    assert_eq!(left, [poison.as_str()]);

    app.stop().await.expect("a clean stop");
    platform.clean_up().await;
}

#[tokio::test]
async fn a_message_the_broker_refuses_is_found_in_the_outbox_and_leaves_once_it_can() {
    let mut platform = Platform::new().await;
    platform.start_stock(Stock::Silent);
    let app = spawn_admin_service(&platform).await;
    let admin = Admin::new(&app, Some(TOKEN));

    // With no queue bound to the orders exchange, the broker returns the
    // `mandatory` OrderCreated: the relay keeps it, leased, a lease at a time.
    platform.bind_stock_queue(false).await;
    let before = refusals(&app).await;
    let order = app
        .place_order("alice", vec![item("apple", 1, 2.0)])
        .await
        .expect("placed");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while refusals(&app).await <= before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the broker's refusal is not counted on /metrics"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let listed = admin
        .unsent(ListUnsentMessagesRequest::default())
        .await
        .expect("listed");
    let [refused] = &listed[..] else {
        panic!("the refused OrderCreated alone is unsent: {listed:?}");
    };
    assert!(
        refused.claimed_until.is_some(),
        "the refusal keeps its lease: {refused:?}"
    );
    assert_eq!(refused.saga_id, order.id, "the saga that sent it");
    assert_eq!(refused.r#type, "OrderCreated");
    assert_eq!(refused.destination, platform.names.orders_exchange);
    assert!(refused.body_preview.contains(&order.id), "{}", refused.body_preview);
    assert_eq!(
        refused.body_size,
        refused.body_preview.len() as u64,
        "a short body is shown whole"
    );
    assert!(refused.timestamp.is_some() && refused.outbox_id > 0);

    let shown = admin.get(&order.id).await.expect("shown");
    assert_eq!(
        shown.unsent.iter().map(|m| m.message_id.as_str()).collect::<Vec<_>>(),
        [refused.message_id.as_str()],
        "the instance shows what it sent and the broker has not taken"
    );
    assert!(!shown.more_unsent, "and all of it");
    // The dashboard's page of the saga lists it as well.
    let login = crate::dashboard::get(app.metrics_addr, &format!("/?token={TOKEN}"), &[]).await;
    let cookie = login.header("set-cookie").expect("a dashboard session");
    let session = cookie.split(';').next().expect("name=value");
    let page = crate::dashboard::get(
        app.metrics_addr,
        &format!("/sagas/{}", order.id),
        &[("Cookie", session)],
    )
    .await;
    assert_eq!(page.status, 200);
    assert!(
        page.body.contains("<table id=\"unsent\">") && page.body.contains(&refused.message_id),
        "the saga's page lists its unsent message: {}",
        page.body
    );
    let of_another = admin
        .unsent(ListUnsentMessagesRequest {
            saga_id: SagaId::new().to_string(),
            ..ListUnsentMessagesRequest::default()
        })
        .await
        .expect("listed");
    assert!(of_another.is_empty(), "only the saga asked for: {of_another:?}");
    let an_hour_old = admin
        .unsent(ListUnsentMessagesRequest {
            older_than: Some(prost_types_duration(3600)),
            ..ListUnsentMessagesRequest::default()
        })
        .await
        .expect("listed");
    assert!(an_hour_old.is_empty(), "not an hour old: {an_hour_old:?}");
    assert_eq!(
        platform.queue_depth(&platform.stock_queue).await,
        0,
        "nothing was routed"
    );

    // A second order's OrderCreated, claimed and refused like the first; the
    // operator gives it up (as a message the broker will never take) and it
    // never goes.
    let before = refusals(&app).await;
    let given_up = app
        .place_order("bob", vec![item("pear", 1, 3.0)])
        .await
        .expect("placed");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let second = loop {
        let shown = admin.get(&given_up.id).await.expect("shown");
        if let [second] = &shown.unsent[..]
            && second.claimed_until.is_some()
            && refusals(&app).await > before
        {
            break second.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the second order's OrderCreated is not claimed: {:?}",
            shown.unsent
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let another_sagas = assert_code(
        admin.discard(&order.id, second.outbox_id, "wrong saga").await,
        Code::FailedPrecondition,
        "discard naming another saga",
    );
    assert!(another_sagas.message().contains("another saga's"), "{another_sagas:?}");
    let instance = admin
        .discard(&given_up.id, second.outbox_id, "  headers too large for a frame ")
        .await
        .expect("given up");
    assert_eq!(
        instance.status(),
        SagaStatus::Running,
        "the saga stands where it stood, waiting for its reply"
    );
    let shown = admin.get(&given_up.id).await.expect("shown");
    assert!(shown.unsent.is_empty(), "given up: {:?}", shown.unsent);
    assert_eq!(operator_actions(&shown.history), ["discard"]);
    let note = &shown.history.last().expect("a history").note;
    assert!(
        note.starts_with("headers too large for a frame;") && note.contains(&second.message_id),
        "the history says what was given up and why: {note}"
    );
    assert_code(
        admin.discard(&given_up.id, second.outbox_id, "again").await,
        Code::FailedPrecondition,
        "a message given up is not unsent any more",
    );

    // Mended: the first goes when its lease ends (5 s), and leaves the
    // outbox; the one given up does not.
    platform.bind_stock_queue(true).await;
    let deadline = tokio::time::Instant::now() + 2 * PATIENCE;
    while !admin
        .unsent(ListUnsentMessagesRequest::default())
        .await
        .expect("listed")
        .is_empty()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the message did not leave the outbox once it could be routed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Past the lease the given-up message held (and a round more), a relay
    // would have taken it again had it not been given up. A wait, not a
    // poll: what is checked is that nothing happens.
    let lease_end = second.claimed_until.expect("a refused message holds a lease");
    let lease_end = std::time::UNIX_EPOCH + Duration::new(lease_end.seconds as u64, lease_end.nanos as u32);
    let left = lease_end
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    assert!(left <= Duration::from_secs(10), "a lease of seconds: {left:?}");
    tokio::time::sleep(left + Duration::from_secs(1)).await;
    assert!(
        admin
            .unsent(ListUnsentMessagesRequest::default())
            .await
            .expect("listed")
            .is_empty()
    );
    assert_eq!(
        platform.queue_depth(&platform.stock_queue).await,
        1,
        "only the first OrderCreated is routed, not the one given up"
    );
    assert!(admin.get(&order.id).await.expect("shown").unsent.is_empty());

    app.stop().await.expect("a clean stop");
    platform.clean_up().await;
}
