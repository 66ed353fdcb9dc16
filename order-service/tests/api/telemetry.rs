//! OpenTelemetry export, tested on the built binary (the tracing subscriber is
//! process-wide): spans reach an OTLP collector with the configured service
//! name and continue the caller's `traceparent`; a collector that is not
//! there never breaks or slows the service.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use order_service::proto::order_service_client::OrderServiceClient;
use order_service::proto::{CreateOrderRequest, GetOrderRequest, OrderStatus};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::transport::Channel;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

use crate::helpers::{PATIENCE, item};

/// A service binary started in embedded mode.
struct Process {
    child: Child,
    client: OrderServiceClient<Channel>,
}

impl Process {
    /// Starts the binary with `otel_endpoint` and waits for its gRPC port.
    async fn start(otel_endpoint: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_order-service"))
            .env_remove("DATABASE_URL")
            .env_remove("RABBITMQ_URL")
            .env("GRPC_PORT", "127.0.0.1:0")
            .env("METRICS_PORT", "127.0.0.1:0")
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .env("OTEL_SERVICE_NAME", "order-service-e2e")
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", otel_endpoint)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("the order-service binary starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let port = tokio::time::timeout(PATIENCE, async {
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if let Some(port) = event["grpc_port"].as_u64() {
                    return port;
                }
            }
            panic!("the service exited before listening");
        })
        .await
        .expect("the service listens in time");
        // Keep draining its logs so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let channel = Channel::from_shared(format!("http://127.0.0.1:{port}"))
            .expect("a URI")
            .connect()
            .await
            .expect("gRPC connects");
        Self {
            child,
            client: OrderServiceClient::new(channel),
        }
    }

    /// SIGTERM, then the exit status and how long it took.
    async fn terminate(mut self) -> (std::process::ExitStatus, Duration) {
        let pid = self.child.id().expect("still running");
        let started = tokio::time::Instant::now();
        let killed = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(killed.success());
        let status = tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .expect("the service exits in time")
            .expect("an exit status");
        (status, started.elapsed())
    }
}

/// Places an order and waits until it is decided.
async fn place_and_decide(client: &mut OrderServiceClient<Channel>, request: Request<CreateOrderRequest>) -> Duration {
    let started = tokio::time::Instant::now();
    let order = client
        .create_order(request)
        .await
        .expect("placed")
        .into_inner()
        .order
        .expect("an order");
    let placed_in = started.elapsed();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let read = client
            .get_order(GetOrderRequest {
                order_id: order.id.clone(),
                user_id: "alice".to_owned(),
            })
            .await
            .expect("readable")
            .into_inner()
            .order
            .expect("an order");
        if read.status() != OrderStatus::Pending {
            assert_eq!(read.status(), OrderStatus::Confirmed);
            return placed_in;
        }
        assert!(tokio::time::Instant::now() < deadline, "still PENDING");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn an_order() -> Request<CreateOrderRequest> {
    Request::new(CreateOrderRequest {
        user_id: "alice".to_owned(),
        items: vec![item("apple", 1, 1.0)],
    })
}

#[tokio::test]
async fn an_unreachable_collector_never_breaks_or_slows_the_service() {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        listener.local_addr().expect("an address").port()
    };
    let mut service = Process::start(&format!("http://127.0.0.1:{closed}")).await;
    for _ in 0..5 {
        let placed_in = place_and_decide(&mut service.client, an_order()).await;
        assert!(placed_in < Duration::from_secs(1), "CreateOrder took {placed_in:?}");
    }
    let (status, took) = service.terminate().await;
    assert!(status.success(), "{status:?}");
    assert!(took < Duration::from_secs(6), "stopping took {took:?}");
}

/// An OTLP collector keeping what it receives.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        self.0.lock().expect("not poisoned").push(request.into_inner());
        Ok(Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

#[tokio::test]
async fn spans_reach_the_collector_and_continue_the_callers_trace() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a free port");
    let addr: SocketAddr = listener.local_addr().expect("an address");
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    let mut service = Process::start(&format!("http://{addr}")).await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_span = "00f067aa0ba902b7";
    let mut request = an_order();
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{parent_span}-01").parse().expect("ASCII"),
    );
    place_and_decide(&mut service.client, request).await;
    let (status, _) = service.terminate().await;
    assert!(status.success(), "{status:?}");

    // Flushed on shutdown.
    let received = collector.0.lock().expect("not poisoned").clone();
    server.abort();
    let mut services = Vec::new();
    let mut create_spans = Vec::new();
    for resource_spans in received.iter().flat_map(|r| &r.resource_spans) {
        if let Some(resource) = &resource_spans.resource {
            for attribute in &resource.attributes {
                if attribute.key == "service.name"
                    && let Some(AnyValue::StringValue(name)) = attribute.value.as_ref().and_then(|v| v.value.as_ref())
                {
                    services.push(name.clone());
                }
            }
        }
        for span in resource_spans.scope_spans.iter().flat_map(|s| &s.spans) {
            if span.name == "order.OrderService/CreateOrder" {
                create_spans.push(span.clone());
            }
        }
    }
    assert!(services.iter().any(|s| s == "order-service-e2e"), "{services:?}");
    let span = create_spans.first().expect("a CreateOrder span was exported");
    assert_eq!(hex(&span.trace_id), trace_id, "the caller's trace continues");
    assert_eq!(
        hex(&span.parent_span_id),
        parent_span,
        "the caller's span is the parent"
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
