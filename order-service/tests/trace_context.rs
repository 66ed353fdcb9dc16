//! Trace context across the service in production mode, with an OpenTelemetry
//! layer installed as the process's global subscriber: that is why this test
//! has a test binary of its own (a thread-local subscriber does not reliably
//! reach every task while other tests run).

// The helpers are shared with `tests/api`; this binary uses only some of them.
#![allow(dead_code)]

#[path = "api/helpers.rs"]
mod helpers;
#[path = "api/platform.rs"]
mod platform;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use order_service::proto::{CreateOrderRequest, OrderStatus};
use saga_core::{Message, Publisher, Settlement, Subscriber};
use tracing_subscriber::layer::SubscriberExt;

use crate::helpers::PATIENCE;
use crate::platform::{Platform, basket};

/// Long enough never to fire.
const NO_DEADLINE: Duration = Duration::from_secs(60);

/// Keeps the spans the service ends.
#[derive(Clone, Debug, Default)]
struct Spans(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for Spans {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.0.lock().expect("not poisoned").extend(batch);
        Ok(())
    }
}

impl Spans {
    fn count(&self, name: &str) -> usize {
        self.0
            .lock()
            .expect("not poisoned")
            .iter()
            .filter(|span| span.name == name)
            .count()
    }

    fn trace_ids_of(&self, name: &str) -> Vec<String> {
        let spans = self.0.lock().expect("not poisoned");
        spans
            .iter()
            .filter(|span| span.name == name)
            .map(|span| span.span_context.trace_id().to_string())
            .collect()
    }
}

#[tokio::test]
async fn trace_context_flows_from_the_caller_through_rabbitmq_and_back() {
    let spans = Spans::default();
    let provider = SdkTracerProvider::builder().with_simple_exporter(spans.clone()).build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_subscriber::filter::LevelFilter::INFO)
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    tracing::subscriber::set_global_default(subscriber).expect("the only subscriber of this test binary");

    let platform = Platform::new().await;
    let app = platform.start_service(NO_DEADLINE).await;
    let mut stock = platform
        .transport
        .subscribe(&platform.stock_queue)
        .await
        .expect("the stock queue is consumable");

    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut request = tonic::Request::new(CreateOrderRequest {
        user_id: "alice".to_owned(),
        items: basket("apple"),
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{caller_trace}-00f067aa0ba902b7-01").parse().expect("ASCII"),
    );
    let order = app.send_create(request).await.expect("placed");

    // OrderCreated continues the trace of the CreateOrder call that caused it
    // (the engine records the trace context as the message enters the outbox).
    let created = tokio::time::timeout(PATIENCE, stock.next())
        .await
        .expect("OrderCreated in time")
        .expect("a delivery")
        .expect("a delivery");
    let traceparent = created
        .message
        .header("traceparent")
        .unwrap_or_else(|| panic!("no traceparent header: {:?}", created.message.headers));
    assert!(
        traceparent.starts_with(&format!("00-{caller_trace}-")) && traceparent.len() == 55,
        "OrderCreated must continue the caller's trace {caller_trace}: {traceparent}"
    );
    let _ = created.settle.settle(Settlement::Ack).await;

    // The reply's trace is continued by the consumer.
    let reply_trace = "0af7651916cd43dd8448eb211c80319c";
    let body = format!(r#"{{"order_id":"{}","success":true}}"#, order.id);
    let reply = Message::new("", platform.names.stock_update_exchange.clone(), body.into_bytes())
        .with_header("traceparent", format!("00-{reply_trace}-b7ad6b7169203331-01"));
    platform.transport.publish(&reply).await.expect("published");
    assert_eq!(
        app.wait_until_decided(&order.id, "alice").await.status(),
        OrderStatus::Confirmed
    );
    // OrderCreated and then OrderConfirmed were published, each in its span.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while spans.count("saga.publish") < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "OrderConfirmed not published in a span"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(stock);
    app.stop().await.expect("a clean stop");
    let _ = provider.force_flush();

    assert!(
        spans
            .trace_ids_of("order.OrderService/CreateOrder")
            .contains(&caller_trace.to_owned()),
        "the gRPC span continues the caller's trace"
    );
    assert!(
        spans.trace_ids_of("saga.handle").contains(&reply_trace.to_owned()),
        "the consumer continues the reply's trace: {:?}",
        spans.trace_ids_of("saga.handle")
    );
    platform.clean_up().await;
}
