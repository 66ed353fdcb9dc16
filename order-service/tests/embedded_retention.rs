//! Embedded mode forgets finished sagas as production deletes them, and a
//! retried `CreateOrder` after that returns the order rather than placing
//! it again. A binary of its own: the metrics recorder is the process's,
//! and the API tests count production's purges exactly.

#[allow(dead_code)]
#[path = "api/helpers.rs"]
mod helpers;

use std::time::Duration;

use order_service::Config;
use order_service::admin::proto::saga_admin_client::SagaAdminClient;
use order_service::admin::proto::{GetInstanceRequest, ListInstancesRequest};
use order_service::config::{AdminToken, ListenAddr};
use order_service::proto::OrderStatus;
use tonic::{Code, Request};

use helpers::{PATIENCE, item, spawn_app_with};

const TOKEN: &str = "test-admin-token-0123456789";

fn authorized<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    let value = format!("Bearer {TOKEN}").parse().expect("ASCII");
    request.metadata_mut().insert("authorization", value);
    request
}

#[tokio::test]
async fn finished_sagas_are_forgotten_as_configured_and_a_retry_returns_the_order() {
    let mut config = Config {
        grpc: ListenAddr::localhost(0),
        metrics: ListenAddr::localhost(0),
        admin_token: Some(AdminToken::new(TOKEN)),
        ..Config::default()
    };
    // Finished sagas are forgotten at the next purge, every 100 ms.
    config.retention.store.finished_instances = Some(Duration::from_millis(1));
    config.retention.interval = Duration::from_millis(100);
    let app = spawn_app_with(config).await;
    let mut admin = SagaAdminClient::new(app.channel.clone());
    let basket = || vec![item("apple", 1, 1.0)];
    let order = app
        .place_order_with_key("alice", "forgotten-1", basket())
        .await
        .expect("placed");
    assert_eq!(
        app.wait_until_decided(&order.id, "alice").await.status(),
        OrderStatus::Confirmed
    );

    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let listed = admin
            .list_instances(authorized(ListInstancesRequest::default()))
            .await
            .expect("listed")
            .into_inner()
            .instances;
        if listed.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the finished saga is forgotten: still listed after {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let gone = admin
        .get_instance(authorized(GetInstanceRequest { id: order.id.clone() }))
        .await
        .expect_err("no such saga any more");
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");

    // A retry under the same key returns the order as it stands and starts
    // nothing, though its saga is gone.
    let retry = app
        .place_order_with_key("alice", "forgotten-1", basket())
        .await
        .expect("the retry is answered");
    assert_eq!(
        (retry.id.as_str(), retry.status()),
        (order.id.as_str(), OrderStatus::Confirmed)
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        app.get_order(&order.id, "alice")
            .await
            .expect("the order stays")
            .status(),
        OrderStatus::Confirmed
    );
    let (_, metrics) = app.http_get("/metrics").await;
    assert!(
        metrics.contains("order_sagas_started_total 1"),
        "one saga started, not two:\n{metrics}"
    );
    assert!(
        metrics.contains(r#"saga_retention_deleted_total{rows="sagas"} 1"#),
        "/metrics counts the forgotten saga:\n{metrics}"
    );
}
