//! Shared by the integration tests: the broker URL, unique names, and a
//! connection that fails loudly when RabbitMQ is not running.

#![allow(dead_code)]

use std::time::Duration;

use saga_amqp::{AmqpConfig, AmqpTransport, ExchangeKind, QueueConfig, QueueType, RedactedUrl, Topology};

/// `RABBITMQ_URL`, or the local broker.
pub fn url() -> String {
    std::env::var("RABBITMQ_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// A name no other test uses.
pub fn unique(prefix: &str) -> String {
    format!("saga-test-{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// A fanout exchange `name` bound to the queue `<name>.queue` of `queue_type`.
pub fn config(name: &str, queue_type: QueueType) -> AmqpConfig {
    let queue = format!("{name}.queue");
    let topology = Topology::new()
        .exchange(name, ExchangeKind::Fanout)
        .with_queue(QueueConfig::new(&queue).with_type(queue_type))
        .bind(name, &queue, "");
    let mut config = AmqpConfig::new(url(), topology);
    config.connection_name = name.to_owned();
    config.reconnect.initial_backoff = Duration::from_millis(50);
    config.reconnect.max_backoff = Duration::from_millis(500);
    config.reconnect.connect_timeout = Duration::from_secs(5);
    config.operation_timeout = Duration::from_secs(5);
    config
}

/// Connects, or fails the test saying what to start.
pub async fn connect(config: AmqpConfig) -> AmqpTransport {
    let url = RedactedUrl(&config.url).to_string();
    match AmqpTransport::connect(config).await {
        Ok(transport) => transport,
        Err(e) if e.is_retryable() => panic!(
            "RabbitMQ is not reachable at {url}: {e}. Start it (`rabbitmq-server -detached`, as root) or point RABBITMQ_URL at one."
        ),
        Err(e) => panic!("setting up the AMQP topology failed: {e}"),
    }
}

/// `rabbitmqctl` with `args`, its output; fails the test saying what is needed.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let output = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("`rabbitmqctl` did not run ({e}): these tests need it on PATH, as root"));
    assert!(
        output.status.success(),
        "`rabbitmqctl {}` failed (run the tests as root, with the local broker): {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `column` of every connection whose client-given name contains `name`
/// (`rabbitmqctl list_connections`; a column without spaces, such as `pid`,
/// `state` or `frame_max`).
pub fn connections(name: &str, column: &str) -> Vec<String> {
    rabbitmqctl(&[
        "list_connections",
        "-q",
        "--no-table-headers",
        column,
        "client_properties",
    ])
    .lines()
    .filter(|line| line.contains(name))
    .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
    .collect()
}

/// Deletes what `transport` declared and closes it.
pub async fn clean_up(transport: &AmqpTransport) {
    if let Err(e) = transport.delete_topology().await {
        eprintln!("cleaning up failed (names are unique, so nothing else is affected): {e}");
    }
    transport.close().await;
}
