//! Throughput against a real RabbitMQ, measured in one run:
//! 1. raw lapin: persistent publishes with confirms, pipelined (all confirms
//!    in flight, then `wait_for_confirms`) — the ceiling;
//! 2. this transport: publish (confirmed) + consume + ack of the same number
//!    of messages through one queue, with saga-core's `Consumer`.
//!
//! `cargo bench -p saga-amqp --bench throughput` (env: `RABBITMQ_URL`,
//! `BENCH_MESSAGES` (default 20000), `BENCH_ROUNDS` (default 3)).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use saga_amqp::{AcksSent, AmqpConfig, AmqpTransport, ExchangeKind, Topology};
use saga_core::{CancellationToken, Consumer, ConsumerConfig, EngineError, Message, MessageHandler, Publisher};
use tokio::sync::Notify;

/// Concurrent publishers in the transport round (the relay publishes
/// different sagas' messages concurrently).
const PUBLISHERS: usize = 256;

fn url() -> String {
    std::env::var("RABBITMQ_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn payload(n: usize) -> Vec<u8> {
    format!("{{\"order_id\":\"0190b5c2-0000-7000-8000-{n:012}\",\"customer\":\"c-42\",\"lines\":[{{\"sku\":\"A-1\",\"quantity\":2,\"price\":\"19.90\"}}],\"total\":\"39.80\"}}")
        .into_bytes()
}

async fn raw_lapin(messages: usize) -> Duration {
    let connection = Connection::connect(&url(), ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("RabbitMQ is not reachable: {e}. Start it with `rabbitmq-server -detached`."));
    let channel = connection.create_channel().await.expect("channel");
    let queue = format!("saga-bench-raw-{}", uuid::Uuid::new_v4().simple());
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(ShortString::from(queue.as_str()), durable, FieldTable::default())
        .await
        .expect("declare");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let bodies: Vec<Vec<u8>> = (0..messages).map(payload).collect();
    let started = Instant::now();
    for body in &bodies {
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type(ShortString::from("application/json"));
        // Dropping the confirm leaves it to `wait_for_confirms`.
        drop(
            channel
                .basic_publish(
                    ShortString::from(""),
                    ShortString::from(queue.as_str()),
                    BasicPublishOptions::default(),
                    body,
                    properties,
                )
                .await
                .expect("publish"),
        );
    }
    channel.wait_for_confirms().await.expect("confirmed");
    let elapsed = started.elapsed();
    channel
        .queue_delete(ShortString::from(queue.as_str()), QueueDeleteOptions::default())
        .await
        .expect("delete");
    let _ = connection.close(200, "done".into()).await;
    elapsed
}

struct Counter {
    handled: AtomicUsize,
    target: usize,
    done: Notify,
}

#[async_trait]
impl MessageHandler for Counter {
    async fn handle(&self, _message: &Message) -> Result<(), EngineError> {
        if self.handled.fetch_add(1, Ordering::AcqRel) + 1 == self.target {
            self.done.notify_one();
        }
        Ok(())
    }
}

/// The transport round: how long it took, and the consumer's acks.
async fn transport(messages: usize) -> (Duration, AcksSent) {
    let name = format!("saga-bench-{}", uuid::Uuid::new_v4().simple());
    let queue = format!("{name}.queue");
    let topology = Topology::new()
        .exchange(&name, ExchangeKind::Fanout)
        .queue(&queue)
        .bind(&name, &queue, "");
    let transport = Arc::new(
        AmqpTransport::connect(AmqpConfig::new(url(), topology))
            .await
            .unwrap_or_else(|e| panic!("{e}. Start RabbitMQ with `rabbitmq-server -detached`.")),
    );
    let counter = Arc::new(Counter {
        handled: AtomicUsize::new(0),
        target: messages,
        done: Notify::new(),
    });
    let shutdown = CancellationToken::new();
    let consumer = Consumer::new(counter.clone(), transport.clone(), ConsumerConfig::new(&queue));
    let consuming = tokio::spawn(consumer.run(shutdown.clone()));
    let batches: Vec<Vec<Message>> = (0..PUBLISHERS)
        .map(|p| {
            (p..messages)
                .step_by(PUBLISHERS)
                .map(|n| Message::new("OrderCreated", name.clone(), payload(n)).with_correlation_id(n.to_string()))
                .collect()
        })
        .collect();

    let started = Instant::now();
    let done = counter.done.notified();
    let publishers: Vec<_> = batches
        .into_iter()
        .map(|batch| {
            let transport = transport.clone();
            tokio::spawn(async move {
                for message in batch {
                    transport.publish(&message).await.expect("published");
                }
            })
        })
        .collect();
    for publisher in publishers {
        publisher.await.expect("publisher");
    }
    tokio::time::timeout(Duration::from_secs(120), done)
        .await
        .expect("every message consumed");
    let elapsed = started.elapsed();

    shutdown.cancel();
    let _ = consuming.await;
    let acks = transport.acks_sent();
    let _ = transport.delete_topology().await;
    transport.close().await;
    (elapsed, acks)
}

fn rate(messages: usize, elapsed: Duration) -> f64 {
    messages as f64 / elapsed.as_secs_f64()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let messages = env_number("BENCH_MESSAGES", 20_000);
    let rounds = env_number("BENCH_ROUNDS", 3).max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async {
        // Warm up the broker and the connection path.
        raw_lapin(messages / 10 + 1).await;
        transport(messages / 10 + 1).await;
        let mut raw = Vec::new();
        let mut ours = Vec::new();
        for round in 1..=rounds {
            let r = rate(messages, raw_lapin(messages).await);
            let (elapsed, acks) = transport(messages).await;
            let t = rate(messages, elapsed);
            let per_frame = acks.deliveries as f64 / acks.frames.max(1) as f64;
            println!(
                "round {round}: raw lapin publish+confirm {r:>9.0} msg/s | transport publish+consume+ack {t:>9.0} msg/s \
                 ({per_frame:.1} deliveries per ack frame)"
            );
            raw.push(r);
            ours.push(t);
        }
        let (raw, ours) = (median(raw), median(ours));
        println!("messages per round: {messages}, rounds: {rounds} (medians below)");
        println!("raw lapin persistent publish with confirms (pipelined): {raw:.0} msg/s");
        println!("saga-amqp publish + consume + ack:                      {ours:.0} msg/s");
        println!("ratio: {:.0} %", 100.0 * ours / raw);
    });
}
