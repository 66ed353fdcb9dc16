//! Logs and metrics: the subscriber set-up, the Prometheus recorder, and the
//! service's metric names in one place.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::{BatchConfigBuilder, SdkTracerProvider};
use saga_core::{Cause, Message, Publisher, SagaInstance, TransportError};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogFormat, OtelConfig};
use crate::domain::OrderStatus;
use crate::saga::OrderSagaData;

/// gRPC requests handled, by `method` and `code`.
pub const GRPC_REQUESTS: &str = "grpc_server_handled_total";
/// gRPC handling latency in seconds, by `method` and `code`.
pub const GRPC_LATENCY: &str = "grpc_server_handling_seconds";
/// Order sagas started.
pub const SAGAS_STARTED: &str = "order_sagas_started_total";
/// Order sagas completed (orders confirmed).
pub const SAGAS_COMPLETED: &str = "order_sagas_completed_total";
/// Order sagas compensated (orders cancelled).
pub const SAGAS_COMPENSATED: &str = "order_sagas_compensated_total";
/// Order sagas not yet finished: in production mode counted in the store
/// (every replica reports the same figure; refreshed every 5 s), in
/// embedded mode counted by the process (its store lives and dies with it).
pub const SAGAS_IN_FLIGHT: &str = "order_sagas_in_flight";

/// Whether [`SAGAS_IN_FLIGHT`] comes from the store ([`sagas_in_flight`]):
/// then starts and ends in this process do not move it (a count kept by
/// one process of several, or across a restart, drifts).
static IN_FLIGHT_FROM_STORE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Sets [`SAGAS_IN_FLIGHT`] to the store's count of unfinished order sagas.
pub fn sagas_in_flight(unfinished: u64) {
    IN_FLIGHT_FROM_STORE.store(true, std::sync::atomic::Ordering::Relaxed);
    metrics::gauge!(SAGAS_IN_FLIGHT).set(unfinished as f64);
}

fn counts_in_flight() -> bool {
    !IN_FLIGHT_FROM_STORE.load(std::sync::atomic::Ordering::Relaxed)
}
/// Messages committed to the outbox and not yet published.
pub const OUTBOX_BACKLOG: &str = "saga_outbox_backlog";
/// Messages waiting in the stock reply dead-letter queue.
pub const DEAD_LETTERS: &str = "saga_dead_letters";
/// Counter, label `rows` (`inbox`, `sent_messages`, `sagas`): saga store
/// rows deleted by retention.
pub const RETENTION_DELETED: &str = "saga_retention_deleted_total";
/// Seconds one retention round took (every round, also when it deleted nothing).
pub const RETENTION_DURATION: &str = "saga_retention_seconds";
/// Seconds from `OrderCreated` committed to the stock reply (or deadline)
/// that decided the order, by `outcome` (`reserved`, `refused`, `timeout`).
/// Measured from the saga's timestamps when the deciding transition is applied.
pub const STOCK_REPLY_LATENCY: &str = "order_stock_reply_seconds";
/// The installed logging and tracing: keep it until the process ends and call
/// [`shutdown`](Self::shutdown) to flush the spans not yet exported.
#[must_use = "dropping it without shutdown() loses the spans not yet exported"]
pub struct Telemetry {
    provider: SdkTracerProvider,
    /// Whether spans are exported (and so need flushing).
    exporting: bool,
}

/// How long shutdown waits for the last spans to reach the collector.
const FLUSH_LIMIT: Duration = Duration::from_secs(3);

/// The log filter from `RUST_LOG`'s `directives` (`info` if unset), with
/// lapin's log of returned messages off unless the directives name its
/// target ([`saga_amqp::RETURNED_MESSAGES_LOG_TARGET`]): lapin logs such a
/// message whole, and order bodies carry customers' data.
pub fn log_filter(directives: Option<&str>) -> Result<EnvFilter, tracing_subscriber::filter::ParseError> {
    let directives = directives.unwrap_or("info");
    let filter = EnvFilter::builder().parse(directives)?;
    let target = saga_amqp::RETURNED_MESSAGES_LOG_TARGET;
    if directives.contains(target) {
        return Ok(filter);
    }
    Ok(filter.add_directive(format!("{target}=off").parse()?))
}

impl Telemetry {
    /// Installs the global `tracing` subscriber: `RUST_LOG` filters (default
    /// `info`), `format` picks human-readable lines or JSON lines.
    ///
    /// Spans always carry OpenTelemetry trace context, so `traceparent` is
    /// continued from callers and passed on with every message published; they
    /// are exported only when `otel.endpoint` is set: over OTLP/gRPC, batched
    /// on the tokio runtime, with `otel.service_name` as `service.name`.
    ///
    /// Must run inside a tokio runtime. An unreachable collector never breaks
    /// or slows the service: exports are bounded in time and spans beyond
    /// the queue are dropped. Does nothing if a subscriber is installed
    /// already (as in tests).
    pub fn init(format: LogFormat, log_directives: Option<&str>, otel: &OtelConfig) -> Self {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let exporter = otel
            .endpoint
            .as_deref()
            .and_then(|endpoint| match batch_exporter(endpoint) {
                Ok(processor) => Some(processor),
                Err(error) => {
                    // Logging is not installed yet.
                    eprintln!("order-service: OTLP trace export disabled: {error}");
                    None
                }
            });
        let exporting = exporter.is_some();
        let resource = Resource::builder().with_service_name(otel.service_name.clone()).build();
        let mut provider = SdkTracerProvider::builder().with_resource(resource);
        if let Some(processor) = exporter {
            provider = provider.with_span_processor(processor);
        }
        let provider = provider.build();
        let otel_layer = tracing_opentelemetry::layer().with_tracer(provider.tracer(otel.service_name.clone()));
        // Checked with the rest of the configuration; `info` if that was skipped.
        let filter = log_filter(log_directives).unwrap_or_else(|_| EnvFilter::new("info"));
        let registry = tracing_subscriber::registry().with(filter).with(otel_layer);
        let _ = match format {
            LogFormat::Human => registry.with(tracing_subscriber::fmt::layer()).try_init(),
            LogFormat::Json => registry
                .with(tracing_subscriber::fmt::layer().json().flatten_event(true))
                .try_init(),
        };
        if let (Some(endpoint), true) = (&otel.endpoint, exporting) {
            tracing::info!(endpoint, service_name = %otel.service_name, "exporting traces over OTLP/gRPC");
        }
        Self { provider, exporting }
    }

    /// Exports the spans still queued (waiting at most a few seconds for the
    /// collector) and stops the exporter.
    pub async fn shutdown(self) {
        if !self.exporting {
            return;
        }
        let provider = self.provider;
        // The SDK blocks the calling thread until its batch task (on this
        // runtime) answers: never block a runtime thread with it.
        let flushing = tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(FLUSH_LIMIT));
        match tokio::time::timeout(FLUSH_LIMIT + Duration::from_secs(1), flushing).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => tracing::warn!(%error, "flushing traces failed"),
            Ok(Err(error)) => tracing::warn!(%error, "flushing traces failed"),
            Err(_) => tracing::warn!("the trace collector did not answer in time; spans dropped"),
        }
    }
}

/// The OTLP/gRPC exporter behind a batch processor on the tokio runtime.
fn batch_exporter(endpoint: &str) -> Result<BatchSpanProcessor<opentelemetry_sdk::runtime::Tokio>, String> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(Duration::from_secs(3))
        .build()
        .map_err(|e| e.to_string())?;
    let batch = BatchConfigBuilder::default()
        .with_max_queue_size(4096)
        .with_scheduled_delay(Duration::from_secs(1))
        .with_max_export_timeout(Duration::from_secs(3))
        .build();
    Ok(BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio)
        .with_batch_config(batch)
        .build())
}

/// Reads the W3C trace context from gRPC request metadata.
struct MetadataExtractor<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|key| match key {
                tonic::metadata::KeyRef::Ascii(key) => Some(key.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// A server span for one gRPC call of `method`, continuing the caller's trace
/// when its metadata carries a `traceparent`.
pub fn grpc_span(method: &'static str, metadata: &tonic::metadata::MetadataMap) -> tracing::Span {
    let span = tracing::info_span!(
        "grpc.request",
        otel.name = %format_args!("order.OrderService/{method}"),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = "order.OrderService",
        rpc.method = method,
        rpc.grpc.status_code = tracing::field::Empty,
    );
    let parent = TraceContextPropagator::new().extract(&MetadataExtractor(metadata));
    if parent.span().span_context().is_valid() {
        // Fails only when no OpenTelemetry layer is installed: nothing to continue then.
        let _ = span.set_parent(parent);
    }
    span
}

/// Publishes each message in a `saga.publish` producer span, so every message
/// the relay sends carries a `traceparent` (the AMQP transport injects the
/// current span's context) and its publication shows in the trace.
pub struct TracedPublisher {
    inner: Arc<dyn Publisher>,
}

impl TracedPublisher {
    /// Traces `inner`.
    pub fn new(inner: Arc<dyn Publisher>) -> Self {
        Self { inner }
    }
}

#[async_trait]
impl Publisher for TracedPublisher {
    async fn publish(&self, message: &Message) -> Result<(), TransportError> {
        let span = tracing::info_span!(
            "saga.publish",
            otel.kind = "producer",
            messaging.system = "rabbitmq",
            messaging.destination.name = %message.destination,
            message_id = %message.id,
            kind = %message.kind,
        );
        self.inner.publish(message).instrument(span).await
    }

    fn is_held_back(&self) -> bool {
        self.inner.is_held_back()
    }
}

/// The process-wide Prometheus recorder, installed on first use (several
/// applications in one test process share it).
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = bucketed().unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was installed already; /metrics will be empty");
            }
            describe();
            handle
        })
        .clone()
}

/// The exporter with buckets for the latencies: histograms, which add up
/// across replicas, rather than summaries.
fn bucketed() -> Result<PrometheusBuilder, metrics_exporter_prometheus::BuildError> {
    let buckets = [
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];
    let mut builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(GRPC_LATENCY.to_owned()), &buckets)?
        .set_buckets_for_metric(Matcher::Full(STOCK_REPLY_LATENCY.to_owned()), &REPLY_BUCKETS)?;
    for name in saga_core::telemetry::LATENCY_HISTOGRAMS {
        builder = builder.set_buckets_for_metric(Matcher::Full(name.to_owned()), &STORE_BUCKETS)?;
    }
    Ok(builder)
}

/// The text `/metrics` serves: `handle`'s metrics after its upkeep (which
/// drains the histograms' pending samples).
pub fn render(handle: &PrometheusHandle) -> String {
    handle.run_upkeep();
    handle.render()
}

fn describe() {
    metrics::describe_counter!(GRPC_REQUESTS, "gRPC requests handled, by method and status code");
    metrics::describe_histogram!(
        GRPC_LATENCY,
        metrics::Unit::Seconds,
        "gRPC handling latency, by method and status code"
    );
    metrics::describe_counter!(SAGAS_STARTED, "Order sagas started");
    metrics::describe_counter!(SAGAS_COMPLETED, "Order sagas completed: orders confirmed");
    metrics::describe_counter!(SAGAS_COMPENSATED, "Order sagas compensated: orders cancelled");
    metrics::describe_gauge!(
        SAGAS_IN_FLIGHT,
        "Unfinished order sagas: the store's count in production mode (every replica shows the whole; take max), \
         this process's in embedded mode"
    );
    metrics::describe_gauge!(OUTBOX_BACKLOG, "Messages committed to the outbox, not yet published");
    metrics::describe_gauge!(DEAD_LETTERS, "Messages in the stock reply dead-letter queue");
    metrics::describe_counter!(
        RETENTION_DELETED,
        "Saga store rows deleted by retention: consumed-message ids, sent messages, finished sagas"
    );
    metrics::describe_histogram!(
        RETENTION_DURATION,
        metrics::Unit::Seconds,
        "Time one retention round took, also when it deleted nothing"
    );
    metrics::describe_histogram!(
        STOCK_REPLY_LATENCY,
        metrics::Unit::Seconds,
        "Time from OrderCreated committed to the stock reply or deadline that decided the order, by outcome"
    );
    saga_core::telemetry::describe_metrics();
}

/// Buckets of the stock reply latency: from milliseconds to the longest deadlines.
const REPLY_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Buckets of the store's and the broker's latencies: a commit or a
/// confirm takes a fraction of a millisecond on an idle machine, and whole
/// seconds only in trouble.
const STORE_BUCKETS: [f64; 12] = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// Records one handled gRPC request.
pub fn grpc_request(method: &'static str, code: tonic::Code, elapsed: Duration) {
    let code = format!("{code:?}");
    metrics::counter!(GRPC_REQUESTS, "method" => method, "code" => code.clone()).increment(1);
    metrics::histogram!(GRPC_LATENCY, "method" => method, "code" => code).record(elapsed.as_secs_f64());
}

/// Records a started order saga.
pub fn saga_started() {
    metrics::counter!(SAGAS_STARTED).increment(1);
    if counts_in_flight() {
        metrics::gauge!(SAGAS_IN_FLIGHT).increment(1.0);
    }
}

/// What decided an order, for [`order_decided`]: the saga's start and decision
/// times and why it was cancelled.
#[derive(Clone, Debug)]
pub struct Decision {
    started: saga_core::Timestamp,
    decided: saga_core::Timestamp,
    cancelled_by: &'static str,
}

impl Decision {
    /// Read from the saga instance of the transition that decided the order
    /// and what caused that transition.
    pub fn of(saga: &SagaInstance, cause: &Cause) -> Self {
        // An operator's cancel is not the product service's latency; the
        // saga records a reason only when the product service refused.
        let cancelled_by = match (cause, serde_json::from_str::<OrderSagaData>(&saga.data)) {
            (Cause::Operator { action }, _) if action == "cancel" => "cancelled",
            (
                _,
                Ok(OrderSagaData {
                    cancel_reason: None, ..
                }),
            ) => "timeout",
            (_, Ok(_)) => "refused",
            (_, Err(_)) => "cancelled",
        };
        Self {
            started: saga.created_at,
            decided: saga.updated_at,
            cancelled_by,
        }
    }
}

/// Records a committed order status change (the end of its saga) and how long
/// the stock reply took.
pub fn order_decided(status: OrderStatus, decision: &Decision) {
    let (finished, outcome) = match status {
        OrderStatus::Confirmed => (SAGAS_COMPLETED, "reserved"),
        OrderStatus::Cancelled => (SAGAS_COMPENSATED, decision.cancelled_by),
        OrderStatus::Pending => return,
    };
    metrics::counter!(finished).increment(1);
    if counts_in_flight() {
        metrics::gauge!(SAGAS_IN_FLIGHT).decrement(1.0);
    }
    metrics::histogram!(STOCK_REPLY_LATENCY, "outcome" => outcome)
        .record(decision.decided.since(decision.started).as_secs_f64());
}

/// Records the end of an order saga, once, after the transition that ended it
/// committed (give it to `EngineBuilder::on_committed`).
pub fn saga_committed(saga: &SagaInstance, transition: &saga_core::Transition) {
    let before = transition.before.as_ref().map(|p| p.status);
    if before == Some(saga.status) {
        return;
    }
    let status = match saga.status {
        saga_core::SagaStatus::Completed => OrderStatus::Confirmed,
        saga_core::SagaStatus::Compensated => OrderStatus::Cancelled,
        _ => return,
    };
    order_decided(status, &Decision::of(saga, &transition.cause));
}

/// Sets the outbox backlog gauge.
pub fn outbox_backlog(unsent: u64) {
    metrics::gauge!(OUTBOX_BACKLOG).set(unsent as f64);
}

/// Counts what one retention round deleted, and records how long it took.
pub fn retention_purged(purged: &saga_postgres::Purged, took: Duration) {
    retention_counted(purged.inbox, purged.sent_messages, purged.instances, took);
}

/// Counts what one round of embedded mode's retention forgot (sent
/// messages are gone once sent there), and records how long it took.
pub fn memory_retention_purged(purged: &saga_core::memory::Purged, took: Duration) {
    retention_counted(purged.inbox as u64, 0, purged.instances as u64, took);
}

fn retention_counted(inbox: u64, sent_messages: u64, sagas: u64, took: Duration) {
    metrics::histogram!(RETENTION_DURATION).record(took.as_secs_f64());
    for (rows, count) in [("inbox", inbox), ("sent_messages", sent_messages), ("sagas", sagas)] {
        metrics::counter!(RETENTION_DELETED, "rows" => rows).increment(count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines written by a subscriber with `log_filter(directives)`.
    fn logged(directives: Option<&str>, emit: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Lines(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Lines {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::registry()
            .with(log_filter(directives).expect("valid directives"))
            .with(tracing_subscriber::fmt::layer().with_writer(move || writer.clone()));
        tracing::subscriber::with_default(subscriber, emit);
        let bytes = lines
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[test]
    fn a_returned_messages_body_is_not_logged_unless_asked_for_by_name() {
        let emit = || {
            tracing::warn!(target: "lapin::returned_messages", message = "card 4111", "Server returned us a message");
            tracing::warn!(target: "lapin::channel", "channel closed");
        };
        for directives in [
            None,
            Some("info"),
            Some("debug,order_service=trace"),
            Some("info,lapin=warn"),
        ] {
            let logged = logged(directives, emit);
            assert!(!logged.contains("card 4111"), "{directives:?} logged a body: {logged}");
            assert!(
                logged.contains("channel closed"),
                "{directives:?} hid lapin's other warnings: {logged}"
            );
        }
        assert!(
            logged(Some("info,lapin::returned_messages=warn"), emit).contains("card 4111"),
            "asked for by name"
        );
    }

    /// Accepts everything, but its broker holds publishing back.
    struct HeldBack;

    #[async_trait]
    impl Publisher for HeldBack {
        async fn publish(&self, _message: &Message) -> Result<(), TransportError> {
            Ok(())
        }

        fn is_held_back(&self) -> bool {
            true
        }
    }

    #[test]
    fn tracing_keeps_the_brokers_hold_visible_to_the_relay() {
        assert!(TracedPublisher::new(Arc::new(HeldBack)).is_held_back());
    }

    fn cancelled_saga(cancel_reason: Option<&str>) -> SagaInstance {
        use crate::domain::{Order, OrderId, OrderItem, UserId};
        let items = vec![OrderItem::parse("apple".to_owned(), 1, 2.5).expect("valid item")];
        let order =
            Order::place(OrderId::new(), UserId::parse("alice").expect("valid user"), items).expect("valid order");
        let data = OrderSagaData {
            cancel_reason: cancel_reason.map(str::to_owned),
            ..OrderSagaData::new(order)
        };
        SagaInstance {
            id: saga_core::SagaId::new(),
            definition: crate::saga::ORDER_SAGA.to_owned(),
            definition_version: 1,
            key: None,
            status: saga_core::SagaStatus::Compensated,
            step: 0,
            attempt: 0,
            awaiting: None,
            deadline: None,
            failure: None,
            data: serde_json::to_string(&data).expect("order saga data serializes"),
            data_version: 1,
            revision: 3,
            created_at: saga_core::Timestamp::from_millis(1_000),
            updated_at: saga_core::Timestamp::from_millis(4_000),
        }
    }

    #[test]
    fn a_cancelled_order_is_labelled_by_what_cancelled_it() {
        let operator = |action: &str| Cause::Operator {
            action: action.to_owned(),
        };
        let deadline = Cause::Deadline {
            due: saga_core::Timestamp::from_millis(4_000),
        };
        let reply = Cause::Message {
            id: saga_core::MessageId::new(),
            kind: crate::wire::STOCK_UPDATE_RESULT.to_owned(),
        };
        let cases = [
            (cancelled_saga(None), deadline, "timeout"),
            (cancelled_saga(Some("out of stock")), reply, "refused"),
            // Not the product service's latency, whatever the saga holds.
            (cancelled_saga(None), operator("cancel"), "cancelled"),
            // A retried compensation keeps the first cause's label.
            (cancelled_saga(Some("out of stock")), operator("retry"), "refused"),
        ];
        for (saga, cause, expected) in cases {
            let decision = Decision::of(&saga, &cause);
            assert_eq!(decision.cancelled_by, expected, "{cause:?}");
            assert_eq!(decision.decided.since(decision.started), Duration::from_secs(3));
        }
    }
}
