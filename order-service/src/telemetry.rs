//! Logs and metrics: the subscriber set-up, the Prometheus recorder, and the
//! service's metric names in one place.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogFormat;
use crate::domain::OrderStatus;

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
/// Order sagas started by this process and not yet finished.
pub const SAGAS_IN_FLIGHT: &str = "order_sagas_in_flight";
/// Messages committed to the outbox and not yet published.
pub const OUTBOX_BACKLOG: &str = "saga_outbox_backlog";
/// Messages waiting in the stock reply dead-letter queue.
pub const DEAD_LETTERS: &str = "saga_dead_letters";

/// Installs the global `tracing` subscriber: `RUST_LOG` filters (default
/// `info`), `format` picks human-readable lines or JSON lines. Does nothing if
/// a subscriber is installed already (as in tests).
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match format {
        LogFormat::Human => registry.with(tracing_subscriber::fmt::layer()).try_init(),
        LogFormat::Json => registry
            .with(tracing_subscriber::fmt::layer().json().flatten_event(true))
            .try_init(),
    };
}

/// The process-wide Prometheus recorder, installed on first use (several
/// applications in one test process share it).
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(GRPC_LATENCY.to_owned()), &buckets)
                .unwrap_or_else(|_| PrometheusBuilder::new());
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
        "Order sagas started by this process and not yet finished"
    );
    metrics::describe_gauge!(OUTBOX_BACKLOG, "Messages committed to the outbox, not yet published");
    metrics::describe_gauge!(DEAD_LETTERS, "Messages in the stock reply dead-letter queue");
}

/// Records one handled gRPC request.
pub fn grpc_request(method: &'static str, code: tonic::Code, elapsed: Duration) {
    let code = format!("{code:?}");
    metrics::counter!(GRPC_REQUESTS, "method" => method, "code" => code.clone()).increment(1);
    metrics::histogram!(GRPC_LATENCY, "method" => method, "code" => code).record(elapsed.as_secs_f64());
}

/// Records a started order saga.
pub fn saga_started() {
    metrics::counter!(SAGAS_STARTED).increment(1);
    metrics::gauge!(SAGAS_IN_FLIGHT).increment(1.0);
}

/// Records a committed order status change (the end of its saga).
pub fn order_status_changed(status: OrderStatus) {
    let finished = match status {
        OrderStatus::Confirmed => SAGAS_COMPLETED,
        OrderStatus::Cancelled => SAGAS_COMPENSATED,
        OrderStatus::Pending => return,
    };
    metrics::counter!(finished).increment(1);
    metrics::gauge!(SAGAS_IN_FLIGHT).decrement(1.0);
}
