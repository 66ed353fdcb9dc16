use std::time::Duration;

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

use crate::helpers::{PATIENCE, item, spawn_app};

#[tokio::test]
async fn health_is_serving_once_ready() {
    let app = spawn_app().await;
    let mut health = HealthClient::new(app.channel.clone());
    for service in ["", "order.OrderService"] {
        let response = health
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .expect("health answers");
        assert_eq!(response.into_inner().status(), ServingStatus::Serving, "`{service}`");
    }
    assert_eq!(app.http_get("/healthz").await.0, 200);
    assert_eq!(app.http_get("/readyz").await.0, 200);
}

#[tokio::test]
async fn health_turns_not_serving_when_shutdown_begins() {
    let app = spawn_app().await;
    let mut watch = HealthClient::new(app.channel.clone())
        .watch(HealthCheckRequest { service: String::new() })
        .await
        .expect("watch starts")
        .into_inner();
    let first = watch.message().await.expect("a status").expect("a status");
    assert_eq!(first.status(), ServingStatus::Serving);
    let stopped = tokio::spawn(app.stop());
    let next = tokio::time::timeout(PATIENCE, watch.message()).await.expect("in time");
    // Either the NOT_SERVING update arrives or the stream ends with the server.
    if let Ok(Some(update)) = next {
        assert_eq!(update.status(), ServingStatus::NotServing);
    }
    stopped.await.expect("no panic").expect("a clean stop");
}

#[tokio::test]
async fn stopping_finishes_cleanly_and_quickly() {
    let app = spawn_app().await;
    app.place_order("alice", vec![item("apple", 1, 1.0)])
        .await
        .expect("placed");
    let started = tokio::time::Instant::now();
    app.stop().await.expect("a clean stop");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn metrics_count_requests_and_sagas() {
    let app = spawn_app().await;
    let placed = app
        .place_order("alice", vec![item("apple", 1, 1.0)])
        .await
        .expect("placed");
    app.wait_until_decided(&placed.id, "alice").await;
    let (status, body) = app.http_get("/metrics").await;
    assert_eq!(status, 200);
    for expected in [
        r#"grpc_server_handled_total{method="CreateOrder",code="Ok"}"#,
        r#"grpc_server_handled_total{method="GetOrder",code="Ok"}"#,
        "grpc_server_handling_seconds_bucket{",
        "order_sagas_started_total",
        "order_sagas_completed_total",
        "saga_outbox_backlog",
        "saga_dead_letters",
    ] {
        assert!(body.contains(expected), "/metrics lacks `{expected}`:\n{body}");
    }
}

#[tokio::test]
async fn reflection_lists_the_services() {
    let app = spawn_app().await;
    let mut reflection = ServerReflectionClient::new(app.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .expect("reflection answers")
        .into_inner();
    let response = responses.message().await.expect("a response").expect("a response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("expected a service list, got {response:?}");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"order.OrderService"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
}
