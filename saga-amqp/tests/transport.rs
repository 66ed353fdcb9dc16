//! The RabbitMQ transport against a real broker: properties and trace context
//! on the wire, redelivery and dead letters through saga-core's `Consumer`,
//! unroutable messages, and resuming after the connection is killed.

#[path = "support/broker.rs"]
mod broker;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use async_trait::async_trait;
use opentelemetry::trace::{TraceContextExt, TracerProvider};
use saga_amqp::lapin::options::{BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};
use saga_amqp::lapin::types::{AMQPValue, FieldTable, ShortString};
use saga_amqp::lapin::{BasicProperties, Connection, ConnectionProperties};
use saga_amqp::{AcksSent, AmqpConfig, AmqpTransport, ExchangeKind, QueueType, ReconnectConfig, Topology};
use saga_core::{
    CancellationToken, Consumer, ConsumerConfig, DEAD_LETTER_REASON, DeadLetterQueue, Delivery, EngineError, Message,
    MessageHandler, Publisher, RetryPolicy, Settlement, StoreError, Subscriber, Subscription, TransportError,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

const WAIT: Duration = Duration::from_secs(15);

async fn next(subscription: &mut Box<dyn Subscription>, what: &str) -> Delivery {
    match tokio::time::timeout(WAIT, subscription.next()).await {
        Ok(Some(Ok(delivery))) => delivery,
        Ok(Some(Err(e))) => panic!("{what}: receiving failed: {e}"),
        Ok(None) => panic!("{what}: the subscription closed"),
        Err(_) => panic!("{what}: nothing arrived within {WAIT:?}"),
    }
}

async fn raw_connection() -> Connection {
    Connection::connect(&broker::url(), ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("RabbitMQ is not reachable: {e}. Start it with `rabbitmq-server -detached`."))
}

fn header<'a>(properties: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    properties.headers().as_ref().and_then(|h| h.inner().get(name))
}

fn text(value: Option<&AMQPValue>) -> Option<String> {
    match value {
        Some(AMQPValue::LongString(s)) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        _ => None,
    }
}

#[tokio::test]
async fn properties_headers_and_trace_context_cross_the_broker() {
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber =
        tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    let _tracing = tracing::subscriber::set_default(subscriber);

    let name = broker::unique("props");
    let queue = format!("{name}.queue");
    let transport = broker::connect(broker::config(&name, QueueType::Classic)).await;

    // Published inside a span and without a traceparent: the span's context is injected.
    let span = tracing::info_span!("test.publish");
    let trace_id = span.context().span().span_context().trace_id();
    let sent = Message::new("OrderCreated", name.clone(), b"{\"order\":1}".to_vec())
        .with_correlation_id("0190b5c2-0000-7000-8000-000000000001")
        .with_header("in-reply-to", "m-0");
    transport.publish(&sent).instrument(span).await.expect("published");

    // On the wire, as the platform's other services see it.
    let raw = raw_connection().await;
    let channel = raw.create_channel().await.expect("a channel");
    let got = channel
        .basic_get(ShortString::from(queue.as_str()), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
        .expect("the message is in the queue");
    let properties = &got.delivery.properties;
    assert_eq!(properties.delivery_mode(), &Some(2), "persistent");
    assert_eq!(
        properties.content_type().as_ref().map(ShortString::as_str),
        Some("application/json")
    );
    assert_eq!(
        properties.message_id().as_ref().map(ShortString::as_str),
        Some(sent.id.as_str())
    );
    assert_eq!(
        properties.correlation_id().as_ref().map(ShortString::as_str),
        sent.correlation_id.as_deref()
    );
    assert_eq!(
        properties.kind().as_ref().map(ShortString::as_str),
        Some("OrderCreated")
    );
    let seconds = u64::try_from(sent.timestamp.as_millis() / 1000).expect("after 1970");
    assert_eq!(properties.timestamp(), &Some(seconds), "timestamp in seconds");
    assert_eq!(text(header(properties, "in-reply-to")).as_deref(), Some("m-0"));
    let traceparent = text(header(properties, "traceparent")).expect("a traceparent header");
    assert!(
        traceparent.contains(&trace_id.to_string()),
        "{traceparent} continues trace {trace_id}"
    );
    assert_eq!(got.delivery.data, sent.payload);

    // Consumed: the handling span continues the trace.
    let mut subscription = transport.subscribe(&queue).await.expect("subscribed");
    transport
        .publish(&sent.clone().with_header("traceparent", traceparent.clone()))
        .await
        .expect("published");
    let delivery = next(&mut subscription, "traced delivery").await;
    let handling = tracing::info_span!("test.handle");
    saga_amqp::set_parent(&handling, &delivery.message);
    assert_eq!(
        handling.context().span().span_context().trace_id(),
        trace_id,
        "the consumer continues the trace"
    );
    delivery.settle.settle(Settlement::Ack).await.expect("acked");

    // A platform publisher that sets no message id: the id derives from the content, and stays.
    let body = b"{\"order\":2}".to_vec();
    channel
        .basic_publish(
            ShortString::from(name.as_str()),
            ShortString::from(""),
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default().with_type(ShortString::from("OrderPaid")),
        )
        .await
        .expect("raw publish");
    let delivery = next(&mut subscription, "message without id").await;
    let expected = saga_amqp::content_id("OrderPaid", &body);
    assert_eq!(delivery.message.id, expected);
    assert_eq!(delivery.message.destination, name);
    delivery
        .settle
        .settle(Settlement::Retry {
            delay: Duration::from_millis(20),
        })
        .await
        .expect("retried");
    let again = next(&mut subscription, "retried message without id").await;
    assert_eq!(again.message.id, expected, "a retried message keeps its derived id");
    assert_eq!(again.message.destination, name, "and its destination");
    assert_eq!(again.retries, 1);
    again.settle.settle(Settlement::Ack).await.expect("acked");

    drop(subscription);
    let _ = raw.close(200, "done".into()).await;
    broker::clean_up(&transport).await;
}

/// Fails `Flaky` messages twice (retryably), `Broken` ones always
/// (retryably), and `Poison` ones terminally; records what it handled.
struct Handler {
    attempts: Mutex<HashMap<String, u32>>,
    handled: mpsc::UnboundedSender<Message>,
}

#[async_trait]
impl MessageHandler for Handler {
    async fn handle(&self, message: &Message) -> Result<(), EngineError> {
        let attempt = {
            let mut attempts = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
            let n = attempts.entry(message.id.to_string()).or_default();
            *n += 1;
            *n
        };
        let unavailable = || EngineError::Store(StoreError::Unavailable("the store is down".into()));
        match message.kind.as_str() {
            "Flaky" if attempt <= 2 => Err(unavailable()),
            "Broken" => Err(unavailable()),
            "Poison" => Err(EngineError::UnhandledKind { kind: "Poison".into() }),
            _ => {
                let _ = self.handled.send(message.clone());
                Ok(())
            }
        }
    }
}

async fn redelivery_and_dead_letters(queue_type: QueueType) {
    let name = broker::unique("consumer");
    let queue = format!("{name}.queue");
    let transport = Arc::new(broker::connect(broker::config(&name, queue_type)).await);
    let (tx, mut handled) = mpsc::unbounded_channel();
    let handler = Arc::new(Handler {
        attempts: Mutex::default(),
        handled: tx,
    });
    let mut config = ConsumerConfig::new(&queue);
    config.retry = RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(100),
        multiplier: 2,
    };
    let shutdown = CancellationToken::new();
    let consumer = Consumer::new(handler.clone(), transport.clone(), config);
    let running = tokio::spawn(consumer.run(shutdown.clone()));
    let mut dead = transport
        .subscribe(&format!("{queue}.dlq"))
        .await
        .expect("subscribed to the dlq");

    let publish = |kind: &str| {
        let message = Message::new(kind, name.clone(), b"{}".to_vec());
        let transport = transport.clone();
        async move {
            transport.publish(&message).await.expect("published");
            message
        }
    };

    // Redelivered after failing twice.
    let flaky = publish("Flaky").await;
    let got = tokio::time::timeout(WAIT, handled.recv())
        .await
        .expect("handled in time")
        .expect("handled");
    assert_eq!(got.id, flaky.id);
    assert_eq!(
        handler.attempts.lock().unwrap_or_else(|p| p.into_inner())[flaky.id.as_str()],
        3
    );

    // A poison message is dead-lettered at once, with its reason.
    let poison = publish("Poison").await;
    let dead_letter = next(&mut dead, "poison message in the dlq").await;
    assert_eq!(dead_letter.message.id, poison.id);
    let reason = dead_letter
        .message
        .header(DEAD_LETTER_REASON)
        .expect("a reason")
        .to_owned();
    assert!(reason.contains("Poison"), "reason: {reason}");
    dead_letter.settle.settle(Settlement::Ack).await.expect("acked");

    // Out of retries: dead-lettered after the last attempt.
    let broken = publish("Broken").await;
    let dead_letter = next(&mut dead, "exhausted message in the dlq").await;
    assert_eq!(dead_letter.message.id, broken.id);
    let reason = dead_letter
        .message
        .header(DEAD_LETTER_REASON)
        .unwrap_or_default()
        .to_owned();
    assert!(reason.contains("gave up after 3 attempts"), "reason: {reason}");
    assert_eq!(dead_letter.retries, 2, "two retries before giving up");
    dead_letter.settle.settle(Settlement::Ack).await.expect("acked");

    // And the consumer keeps working.
    let good = publish("Good").await;
    let got = tokio::time::timeout(WAIT, handled.recv())
        .await
        .expect("handled in time")
        .expect("handled");
    assert_eq!(got.id, good.id);

    shutdown.cancel();
    tokio::time::timeout(WAIT, running)
        .await
        .expect("the consumer stops")
        .expect("no panic");
    drop(dead);
    broker::clean_up(&transport).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_messages_are_retried_then_dead_lettered_on_classic_queues() {
    redelivery_and_dead_letters(QueueType::Classic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_messages_are_retried_then_dead_lettered_on_quorum_queues() {
    redelivery_and_dead_letters(QueueType::Quorum).await;
}

#[tokio::test]
async fn unroutable_and_unknown_destinations_are_errors_and_publishing_goes_on() {
    let name = broker::unique("routing");
    let lonely = format!("{name}.unbound");
    let mut config = broker::config(&name, QueueType::Classic);
    config.topology = config.topology.exchange(&lonely, ExchangeKind::Direct);
    let transport = broker::connect(config).await;

    let unroutable = Message::new("Nobody", lonely.clone(), b"{}".to_vec());
    match transport.publish(&unroutable).await {
        Err(TransportError::Rejected { id, reason }) => {
            assert_eq!(id, unroutable.id.to_string());
            assert!(reason.contains("unroutable"), "reason: {reason}");
        }
        other => panic!("an unroutable message must be rejected, got {other:?}"),
    }
    // An event exchange whose consumers may not exist yet: the broker drops
    // the message and publishing succeeds.
    let optional = format!("{name}.optional");
    let mut config = broker::config(&format!("{name}-opt"), QueueType::Classic);
    config.topology = config
        .topology
        .with_exchange(saga_amqp::ExchangeConfig::new(&optional, ExchangeKind::Fanout).allow_unrouted());
    let lenient = broker::connect(config).await;
    lenient
        .publish(&Message::new("Nobody", optional.clone(), b"{}".to_vec()))
        .await
        .expect("an unrouted message to an exchange that allows it is accepted");
    lenient.delete_topology().await.expect("cleanup");
    lenient.close().await;
    let missing = Message::new("Nobody", format!("{name}.missing"), b"{}".to_vec());
    assert!(
        matches!(
            transport.publish(&missing).await,
            Err(TransportError::UnknownAddress(_))
        ),
        "a missing exchange is an unknown address"
    );
    // An exchange deleted while in use: its publish fails, the channel it
    // closed is replaced.
    let raw = raw_connection().await;
    let channel = raw.create_channel().await.expect("a channel");
    let fleeting = format!("{name}.fleeting");
    let exchange = || ShortString::from(fleeting.as_str());
    let declare = || async {
        channel
            .exchange_declare(
                exchange(),
                saga_amqp::lapin::ExchangeKind::Fanout,
                Default::default(),
                Default::default(),
            )
            .await
            .expect("declared");
        channel
            .queue_bind(
                ShortString::from(format!("{name}.queue").as_str()),
                exchange(),
                ShortString::from(""),
                Default::default(),
                Default::default(),
            )
            .await
            .expect("bound");
    };
    declare().await;
    let message = Message::new("Fleeting", fleeting.clone(), b"{}".to_vec());
    transport.publish(&message).await.expect("published while it exists");
    channel
        .exchange_delete(exchange(), Default::default())
        .await
        .expect("deleted");
    let mut outcomes = Vec::new();
    for _ in 0..4 {
        outcomes.push(transport.publish(&message).await);
    }
    // The first may go on a channel, which the broker closes (as it would
    // any other publish waiting there: unavailable, not refused); the
    // exchange is then checked again and found gone.
    assert!(
        outcomes.iter().all(|outcome| matches!(
            outcome,
            Err(TransportError::Unavailable(_) | TransportError::UnknownAddress(_))
        )),
        "publishing to a deleted exchange must fail: {outcomes:?}"
    );
    assert!(
        matches!(outcomes.last(), Some(Err(TransportError::UnknownAddress(_)))),
        "found gone by the check: {outcomes:?}"
    );
    declare().await;
    transport
        .publish(&message)
        .await
        .expect("published once it exists again");
    channel
        .exchange_delete(exchange(), Default::default())
        .await
        .expect("deleted");
    let _ = raw.close(200, "done".into()).await;

    // None of it broke publishing.
    let concurrent: Vec<_> = (0..50)
        .map(|n| {
            let transport = transport.clone();
            let message = Message::new("Fine", name.clone(), format!("{{\"n\":{n}}}").into_bytes());
            tokio::spawn(async move { transport.publish(&message).await })
        })
        .collect();
    for publish in concurrent {
        publish.await.expect("no panic").expect("published");
    }
    broker::clean_up(&transport).await;
}

#[tokio::test]
async fn an_unreachable_broker_is_a_retryable_error_without_credentials() {
    let mut config = AmqpConfig::new("amqp://guest:hunter2@127.0.0.1:1/%2f", Topology::new());
    config.reconnect.connect_timeout = Duration::from_secs(5);
    let error = AmqpTransport::connect(config)
        .await
        .expect_err("nothing listens on port 1");
    assert!(error.is_retryable());
    let shown = format!("{error} {error:?}");
    assert!(!shown.contains("hunter2"), "the password leaked: {shown}");
}

/// Closes this test's connections from the broker side, as an operator or a
/// broker restart would.
async fn kill_connections(connection_name: &str) {
    let pids = broker::connections(connection_name, "pid");
    assert!(!pids.is_empty(), "no connection named {connection_name}");
    for pid in pids {
        broker::rabbitmqctl(&["close_connection", &pid, "killed by the reconnect test"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_and_consuming_resume_after_the_connection_is_killed() {
    let name = broker::unique("reconnect");
    let queue = format!("{name}.queue");
    let transport = broker::connect(broker::config(&name, QueueType::Classic)).await;
    let mut subscription = transport.subscribe(&queue).await.expect("subscribed");
    let before = Message::new("Before", name.clone(), b"{}".to_vec());
    transport.publish(&before).await.expect("published");
    let delivery = next(&mut subscription, "before the kill").await;
    assert_eq!(delivery.message.id, before.id);
    delivery.settle.settle(Settlement::Ack).await.expect("acked");

    kill_connections(&name).await;

    // Publishing fails while the connection is down, then succeeds again.
    let after = Message::new("After", name.clone(), b"{}".to_vec());
    let deadline = Instant::now() + WAIT;
    let mut failures = 0;
    loop {
        match transport.publish(&after).await {
            Ok(()) => break,
            Err(e) => {
                assert!(e.is_retryable(), "a passing error: {e}");
                failures += 1;
                assert!(
                    Instant::now() < deadline,
                    "publishing did not resume ({failures} failures, last: {e})"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    // The subscription reports the drop at most a few times, then delivers again.
    let mut errors = 0;
    let delivery = loop {
        match tokio::time::timeout_at(deadline, subscription.next()).await {
            Ok(Some(Ok(delivery))) => break delivery,
            Ok(Some(Err(e))) => {
                errors += 1;
                assert!(errors < 20, "the subscription keeps failing: {e}");
            }
            Ok(None) => panic!("the subscription ended"),
            Err(_) => panic!("nothing arrived after the reconnect ({errors} errors)"),
        }
    };
    assert_eq!(
        delivery.message.id, after.id,
        "the message published after the reconnect arrives"
    );
    delivery.settle.settle(Settlement::Ack).await.expect("acked");
    assert!(transport.is_connected());

    drop(subscription);
    broker::clean_up(&transport).await;
}

/// Acks `deliveries` from futures polled together in this task, so they are
/// settled at one moment, as the transitions of one group commit are.
async fn ack_together(deliveries: Vec<Delivery>) {
    let mut settling: Vec<_> = deliveries
        .into_iter()
        .map(|delivery| Some(delivery.settle.settle(Settlement::Ack)))
        .collect();
    let all = std::future::poll_fn(|cx| {
        let mut pending = false;
        for slot in &mut settling {
            if let Some(future) = slot {
                match future.as_mut().poll(cx) {
                    Poll::Ready(result) => {
                        result.expect("acked");
                        *slot = None;
                    }
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending { Poll::Pending } else { Poll::Ready(()) }
    });
    tokio::time::timeout(WAIT, all).await.expect("acked in time");
}

fn acks_since(transport: &AmqpTransport, before: AcksSent) -> (u64, u64) {
    let now = transport.acks_sent();
    (now.frames - before.frames, now.deliveries - before.deliveries)
}

// One thread: the task that sends the acks runs only once this test's task
// waits, so "settled together" is exact and the frame count deterministic.
#[tokio::test]
async fn acks_settled_together_share_a_frame_but_never_cover_an_open_delivery() {
    let name = broker::unique("acks");
    let queue = format!("{name}.queue");
    let transport = broker::connect(broker::config(&name, QueueType::Classic)).await;
    let mut subscription = transport.subscribe(&queue).await.expect("subscribed");
    let publish = |n: usize| {
        let transport = transport.clone();
        let name = name.clone();
        async move {
            let mut ids = Vec::new();
            for _ in 0..n {
                let message = Message::new("Tick", name.clone(), b"{}".to_vec());
                transport.publish(&message).await.expect("published");
                ids.push(message.id);
            }
            ids
        }
    };

    // Eight handled at once and settled together: one frame.
    publish(8).await;
    let mut deliveries = Vec::new();
    for _ in 0..8 {
        deliveries.push(next(&mut subscription, "a tick").await);
    }
    let before = transport.acks_sent();
    ack_together(deliveries).await;
    assert_eq!(acks_since(&transport, before), (1, 8), "(frames, deliveries)");

    // The first of three still open: the other two are acked alone, and the
    // first, dropped unsettled, comes back (a `multiple` ack would have
    // taken it too).
    let ids = publish(3).await;
    let first = next(&mut subscription, "the first of three").await;
    let second = next(&mut subscription, "the second of three").await;
    let third = next(&mut subscription, "the third of three").await;
    assert_eq!(first.message.id, ids[0]);
    let before = transport.acks_sent();
    ack_together(vec![second, third]).await;
    assert_eq!(acks_since(&transport, before), (2, 2), "(frames, deliveries)");
    drop(first);
    let again = next(&mut subscription, "the first, given back").await;
    assert_eq!(again.message.id, ids[0], "only the open delivery comes back");

    // Forwarded (here retried at once): acked alone once republished, and counted.
    let before = transport.acks_sent();
    again
        .settle
        .settle(Settlement::Retry { delay: Duration::ZERO })
        .await
        .expect("retried");
    assert_eq!(acks_since(&transport, before), (1, 1), "(frames, deliveries)");
    let retried = next(&mut subscription, "the first, retried").await;
    assert_eq!(retried.message.id, ids[0]);
    retried.settle.settle(Settlement::Ack).await.expect("acked");

    // Closing the connection gives back whatever was not acked: nothing.
    drop(subscription);
    transport.close().await;
    let connection = raw_connection().await;
    let channel = connection.create_channel().await.expect("a channel");
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        let declared = channel
            .queue_declare(queue.as_str().into(), passive, FieldTable::default())
            .await
            .expect("the queue is there");
        assert_eq!(declared.message_count(), 0, "every delivery was acked");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = connection.close(0, "done".into()).await;
    // The closed transport cannot delete what it declared; another one can.
    broker::clean_up(&broker::connect(broker::config(&name, QueueType::Classic)).await).await;
}

/// Publishes a message of a foreign producer straight to `queue`.
async fn publish_foreign(channel: &saga_amqp::lapin::Channel, queue: &str) {
    channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default()
                .with_message_id("foreign-1".into())
                .with_type("Foreign".into()),
        )
        .await
        .expect("published");
}

/// A transport of `name`'s subscribed to `foreign`, and the first delivery there.
async fn first_foreign_delivery(name: &str, foreign: &str) -> (AmqpTransport, Box<dyn Subscription>, Delivery) {
    let transport = broker::connect(broker::config(name, QueueType::Classic)).await;
    let mut subscription = transport.subscribe(foreign).await.expect("subscribed");
    let delivery = next(&mut subscription, "the foreign message").await;
    (transport, subscription, delivery)
}

/// A queue the service consumes but does not declare (the platform's, say):
/// its dead letters get a dead-letter queue too, instead of coming back.
#[tokio::test]
async fn dead_letters_of_a_queue_outside_the_topology_reach_its_dead_letter_queue() {
    let name = broker::unique("foreign");
    let foreign = format!("{name}.foreign");
    let connection = raw_connection().await;
    let channel = connection.create_channel().await.expect("a channel");
    channel
        .queue_declare(
            foreign.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declared");
    publish_foreign(&channel, &foreign).await;

    let (transport, subscription, delivery) = first_foreign_delivery(&name, &foreign).await;
    let settled = delivery
        .settle
        .settle(Settlement::DeadLetter {
            reason: "cannot handle it".into(),
        })
        .await;
    let page = transport.dead_letters(&foreign, 10).await;
    drop(subscription);
    for queue in [foreign.clone(), format!("{foreign}.dlq")] {
        let _ = channel.queue_delete(queue.as_str().into(), Default::default()).await;
    }
    broker::clean_up(&transport).await;
    let _ = connection.close(200, "done".into()).await;
    settled.expect("dead-lettered");
    let page = page.expect("browsed");
    assert_eq!(page.total, 1);
    assert_eq!(page.letters[0].reason.as_deref(), Some("cannot handle it"));
}

/// A caller that gives up on settling (a timeout around it) leaves the
/// delivery to be given back, not held until the channel closes.
#[tokio::test]
async fn a_delivery_whose_settling_is_cancelled_comes_back() {
    let name = broker::unique("cancelled-settle");
    let queue = format!("{name}.queue");
    let transport = broker::connect(broker::config(&name, QueueType::Classic)).await;
    let mut subscription = transport.subscribe(&queue).await.expect("subscribed");
    let message = Message::new("Cancelled", name.clone(), b"{}".to_vec());
    transport.publish(&message).await.expect("published");
    let delivery = next(&mut subscription, "the message").await;
    let mut settling = delivery.settle.settle(Settlement::DeadLetter {
        reason: "refused".into(),
    });
    // One step: the dead letter's publish is out, its confirm not yet in.
    let first = std::future::poll_fn(|cx| Poll::Ready(settling.as_mut().poll(cx))).await;
    assert!(first.is_pending(), "settling waits for the broker");
    drop(settling);
    let again = next(&mut subscription, "the delivery given back").await;
    assert_eq!(again.message.id, message.id);
    again.settle.settle(Settlement::Ack).await.expect("acked");
    drop(subscription);
    broker::clean_up(&transport).await;
}

#[tokio::test]
async fn settings_that_would_flood_memory_or_overflow_a_deadline_are_refused_before_connecting() {
    let name = broker::unique("settings");
    for (what, config) in [
        (
            "prefetch",
            AmqpConfig {
                prefetch: 0,
                ..broker::config(&name, QueueType::Classic)
            },
        ),
        (
            "operation_timeout",
            AmqpConfig {
                operation_timeout: Duration::MAX,
                ..broker::config(&name, QueueType::Classic)
            },
        ),
        (
            "operation_timeout",
            AmqpConfig {
                operation_timeout: Duration::ZERO,
                ..broker::config(&name, QueueType::Classic)
            },
        ),
        (
            "initial_backoff",
            AmqpConfig {
                reconnect: ReconnectConfig {
                    initial_backoff: Duration::ZERO,
                    ..ReconnectConfig::default()
                },
                ..broker::config(&name, QueueType::Classic)
            },
        ),
        (
            "max_backoff",
            AmqpConfig {
                reconnect: ReconnectConfig {
                    max_backoff: Duration::MAX,
                    ..ReconnectConfig::default()
                },
                ..broker::config(&name, QueueType::Classic)
            },
        ),
    ] {
        let refused = AmqpTransport::connect(config).await;
        assert!(
            matches!(&refused, Err(saga_amqp::AmqpError::InvalidConfig(reason)) if reason.contains(what)),
            "{what}: {:?}",
            refused.err()
        );
    }
}

/// A dead letter the broker will not take (its queue exists with other
/// arguments): the delivery goes back after a hold, not at once, so it does
/// not come round again at network speed.
#[tokio::test]
async fn a_dead_letter_the_broker_refuses_goes_back_after_a_hold_not_at_once() {
    let name = broker::unique("refused-dlq");
    let foreign = format!("{name}.foreign");
    let connection = raw_connection().await;
    let channel = connection.create_channel().await.expect("a channel");
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(foreign.as_str().into(), durable, FieldTable::default())
        .await
        .expect("declared");
    let mut other_arguments = FieldTable::default();
    other_arguments.insert("x-max-length".into(), AMQPValue::LongInt(1));
    channel
        .queue_declare(format!("{foreign}.dlq").as_str().into(), durable, other_arguments)
        .await
        .expect("declared");
    publish_foreign(&channel, &foreign).await;

    let (transport, mut subscription, delivery) = first_foreign_delivery(&name, &foreign).await;
    let began = Instant::now();
    let settled = delivery
        .settle
        .settle(Settlement::DeadLetter {
            reason: "cannot handle it".into(),
        })
        .await;
    let held = began.elapsed();
    let again = next(&mut subscription, "the message back in its queue").await;
    drop(again);
    drop(subscription);
    for queue in [foreign.clone(), format!("{foreign}.dlq")] {
        let _ = channel.queue_delete(queue.as_str().into(), Default::default()).await;
    }
    broker::clean_up(&transport).await;
    let _ = connection.close(200, "done".into()).await;
    assert!(settled.is_err(), "the dead letter was refused: {settled:?}");
    assert!(held >= Duration::from_millis(900), "given back after {held:?}");
}

#[tokio::test]
async fn close_ends_subscriptions_and_publishing() {
    let name = broker::unique("close");
    let queue = format!("{name}.queue");
    let transport = broker::connect(broker::config(&name, QueueType::Classic)).await;
    let mut subscription = transport.subscribe(&queue).await.expect("subscribed");
    transport.delete_topology().await.expect("deleted");
    transport.close().await;
    assert!(
        tokio::time::timeout(WAIT, subscription.next())
            .await
            .expect("returns at once")
            .is_none(),
        "a closed transport's subscriptions end"
    );
    let message = Message::new("Late", name, b"{}".to_vec());
    assert!(matches!(transport.publish(&message).await, Err(TransportError::Closed)));
}

/// A TCP proxy in front of the broker that can play "broker down": it cuts
/// every connection and refuses new ones until it is up again. It can also
/// play a slow broker, reaching it only a while after accepting.
struct Outage {
    port: u16,
    up: tokio::sync::watch::Sender<bool>,
    slowness: Arc<std::sync::Mutex<Duration>>,
}

impl Outage {
    async fn start(broker: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a free port");
        let port = listener.local_addr().expect("bound").port();
        let (up, _) = tokio::sync::watch::channel(true);
        let state = up.clone();
        let slowness = Arc::new(std::sync::Mutex::new(Duration::ZERO));
        let delay = Arc::clone(&slowness);
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !*state.borrow() {
                    continue; // dropped: refused
                }
                let broker = broker.clone();
                let mut down = state.subscribe();
                let delay = *delay.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&broker).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = down.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Self { port, up, slowness }
    }

    /// A proxy to the broker, and the config of a fresh topology named
    /// after `prefix` that connects through it.
    async fn in_front(prefix: &str, queue_type: QueueType) -> (Self, String, AmqpConfig) {
        let url = broker::url();
        let (_, broker_address) = through_port(&url, 0);
        let proxy = Self::start(broker_address).await;
        let name = broker::unique(prefix);
        let mut config = broker::config(&name, queue_type);
        config.url = through_port(&url, proxy.port).0;
        (proxy, name, config)
    }

    fn set(&self, up: bool) {
        self.up.send_replace(up);
    }

    /// New connections reach the broker `delay` after they are accepted.
    fn slow_down(&self, delay: Duration) {
        *self.slowness.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = delay;
    }
}

/// `url` with its host and port replaced by 127.0.0.1:`port`, and the broker's `host:port`.
fn through_port(url: &str, port: u16) -> (String, String) {
    let scheme_end = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[scheme_end..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let (credentials, host) = match authority.rfind('@') {
        Some(at) => (&authority[..=at], &authority[at + 1..]),
        None => ("", authority),
    };
    let broker = if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:5672")
    };
    let proxied = format!(
        "{}{credentials}127.0.0.1:{port}{}",
        &url[..scheme_end],
        &rest[authority_end..]
    );
    (proxied, broker)
}

/// `url` with the user `user` and password `password` instead of its own.
fn as_user(url: &str, user: &str, password: &str) -> String {
    let scheme_end = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[scheme_end..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let host = rest[..authority_end].rsplit('@').next().unwrap_or_default();
    format!(
        "{}{user}:{password}@{host}{}",
        &url[..scheme_end],
        &rest[authority_end..]
    )
}

/// A broker user allowed one connection at a time, deleted on drop.
struct LimitedUser(String);

impl LimitedUser {
    fn new(password: &str) -> Self {
        let user = Self(broker::unique("limited"));
        broker::rabbitmqctl(&["add_user", &user.0, password]);
        broker::rabbitmqctl(&["set_permissions", "-p", "/", &user.0, ".*", ".*", ".*"]);
        broker::rabbitmqctl(&["set_user_limits", &user.0, r#"{"max-connections": 1}"#]);
        user
    }

    fn lift_limit(&self) {
        broker::rabbitmqctl(&["clear_user_limits", &self.0, "max-connections"]);
    }
}

impl Drop for LimitedUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["delete_user", &self.0])
            .output();
    }
}

/// A retry needs the publishing connection. While that cannot open (here
/// the user may hold only the consuming one) the retry waits for it,
/// rather than giving the delivery back at once to be handled, and fail,
/// again and again; once it opens, the retry goes out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_waits_for_the_publishing_connection_instead_of_coming_back_at_once() {
    let name = broker::unique("waiting-retry");
    let queue = format!("{name}.queue");
    let user = LimitedUser::new("limited-password");
    let mut config = broker::config(&name, QueueType::Classic);
    config.url = as_user(&broker::url(), &user.0, "limited-password");
    // Lifting the limit below takes a `rabbitmqctl` start: plenty of time.
    config.operation_timeout = Duration::from_secs(30);
    let transport = broker::connect(config).await;
    let mut subscription = transport.subscribe(&queue).await.expect("subscribed");
    let publisher = broker::connect(broker::config(&name, QueueType::Classic)).await;
    let message = Message::new("Flaky", name.clone(), b"{}".to_vec());
    publisher.publish(&message).await.expect("published");

    let delivery = next(&mut subscription, "the message").await;
    let retried = tokio::spawn(delivery.settle.settle(Settlement::Retry { delay: Duration::ZERO }));
    if let Ok(again) = tokio::time::timeout(Duration::from_millis(1_500), subscription.next()).await {
        panic!(
            "the retry waits for its connection; the delivery came back at once: {:?}",
            again.map(|d| d.map(|d| (d.message.id, d.retries)))
        );
    }
    assert!(!retried.is_finished(), "still waiting for the publishing connection");

    user.lift_limit();
    retried
        .await
        .expect("joined")
        .expect("retried once the connection opened");
    let again = next(&mut subscription, "the retried message").await;
    assert_eq!((again.message.id, again.retries), (message.id, 1));
    again.settle.settle(Settlement::Ack).await.expect("acked");

    drop(subscription);
    transport.close().await;
    broker::clean_up(&publisher).await;
}

/// A retry that waited out an outage for its publishing connection sends
/// nothing once the connection is back if the delivery's own channel went
/// with the outage: the broker has put the delivery back, and a copy would
/// be a second one, with a retry chain of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_whose_delivery_was_lost_with_its_channel_sends_no_copy() {
    let (outage, name, mut config) = Outage::in_front("lost-delivery", QueueType::Classic).await;
    let queue = format!("{name}.queue");
    config.operation_timeout = Duration::from_secs(20);
    let transport = broker::connect(config).await;
    let mut subscription = transport.subscribe(&queue).await.expect("subscribed");
    let message = Message::new("Flaky", name.clone(), b"{}".to_vec());
    transport.publish(&message).await.expect("published");
    let delivery = next(&mut subscription, "the message").await;

    outage.set(false);
    let deadline = Instant::now() + WAIT;
    while transport.is_connected() {
        assert!(Instant::now() < deadline, "the outage was not noticed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // It waits for the publishing connection, or, if that one has not
    // noticed the outage yet, finds the delivery's channel closed: either
    // way no copy may be sent.
    let retried = tokio::spawn(delivery.settle.settle(Settlement::Retry { delay: Duration::ZERO }));
    tokio::time::sleep(Duration::from_millis(500)).await;
    outage.set(true);
    let settled = retried.await.expect("joined");
    assert!(settled.is_err(), "the delivery was gone: {settled:?}");

    let mut arrived = Vec::new();
    let quiet_until = Instant::now() + Duration::from_secs(3);
    while let Ok(next) = tokio::time::timeout_at(quiet_until, subscription.next()).await {
        match next {
            Some(Ok(delivery)) => {
                arrived.push((delivery.message.id.clone(), delivery.retries));
                delivery.settle.settle(Settlement::Ack).await.expect("acked");
            }
            // The subscription reports the drop once, then consumes again.
            Some(Err(_)) => {}
            None => panic!("the subscription ended"),
        }
    }
    assert_eq!(arrived, [(message.id, 0)], "the broker's redelivery, and no copy");

    drop(subscription);
    broker::clean_up(&transport).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_broker_is_away_publishing_fails_fast_then_everything_resumes() {
    let (outage, name, mut config) = Outage::in_front("outage", QueueType::Quorum).await;
    let queue = format!("{name}.queue");
    // A connection that dies mid-operation can leave one hanging: bounded.
    config.operation_timeout = Duration::from_secs(1);
    let transport = broker::connect(config).await;
    let mut subscription = transport.subscribe(&queue).await.expect("subscribed");
    // Both connections open when the broker goes away (the publishing one
    // opens on first use).
    let before = Message::new("Before", name.clone(), b"{}".to_vec());
    transport.publish(&before).await.expect("published before the outage");
    let delivery = next(&mut subscription, "before the outage").await;
    assert_eq!(delivery.message.id, before.id);
    delivery.settle.settle(Settlement::Ack).await.expect("acked");

    outage.set(false);
    let down_since = Instant::now();
    let mut failures = 0;
    while down_since.elapsed() < Duration::from_secs(1) {
        let message = Message::new("Lost", name.clone(), b"{}".to_vec());
        let started = Instant::now();
        match transport.publish(&message).await {
            Err(e) => {
                assert!(e.is_retryable(), "a passing error: {e}");
                assert!(
                    started.elapsed() < Duration::from_secs(2),
                    "publishing fails fast while the broker is away"
                );
                failures += 1;
            }
            Ok(()) => panic!("published while the broker was away"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(failures > 0);
    assert!(!transport.is_connected());

    outage.set(true);
    let after = Message::new("After", name.clone(), b"{}".to_vec());
    let deadline = Instant::now() + WAIT;
    while let Err(e) = transport.publish(&after).await {
        assert!(Instant::now() < deadline, "publishing did not resume: {e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    loop {
        match tokio::time::timeout_at(deadline, subscription.next()).await {
            Ok(Some(Ok(delivery))) => {
                let id = delivery.message.id.clone();
                // A publish reported failed as the broker went away may have
                // reached it all the same (at least once): such a copy may
                // arrive first.
                assert!(id == after.id || delivery.message.kind == "Lost", "{id}");
                delivery.settle.settle(Settlement::Ack).await.expect("acked");
                if id == after.id {
                    break;
                }
            }
            Ok(Some(Err(_))) => {}
            Ok(None) => panic!("the subscription ended"),
            Err(_) => panic!("nothing arrived after the broker came back"),
        }
    }

    drop(subscription);
    broker::clean_up(&transport).await;
}

#[tokio::test]
async fn amqps_urls_speak_tls() {
    // The plain-text port does not speak TLS: the handshake fails, which shows
    // a TLS client was built (rather than the scheme being unsupported).
    let url = through_port(&broker::url(), 5672).0.replacen("amqp://", "amqps://", 1);
    let mut config = AmqpConfig::new(url, Topology::new());
    config.reconnect.connect_timeout = Duration::from_secs(5);
    let error = AmqpTransport::connect(config)
        .await
        .expect_err("no TLS on the plain port");
    let shown = format!("{error:?}").to_lowercase();
    // rustls reports the plain-text reply as an invalid TLS record.
    assert!(
        shown.contains("invalidcontenttype") || shown.contains("invaliddata"),
        "{shown}"
    );
}

/// Both connections propose a configured `frame_max` (lapin's buffers are
/// 32 frames each way), and a body many frames long still crosses whole.
#[tokio::test]
async fn connections_use_the_configured_frame_size_and_large_messages_cross_whole() {
    let name = broker::unique("frames");
    let mut config = broker::config(&name, QueueType::Classic);
    config.frame_max = Some(8 * 1024);
    let transport = broker::connect(config).await;
    let mut subscription = transport.subscribe(&format!("{name}.queue")).await.expect("subscribed");

    let payload: Vec<u8> = (0..200 * 1024).map(|i| (i % 251) as u8).collect();
    transport
        .publish(&Message::new("Large", name.clone(), payload.clone()))
        .await
        .expect("published in 26 frames");
    let frames = broker::connections(&name, "frame_max");
    assert_eq!(frames, ["8192", "8192"], "publishing and consuming");
    let delivery = next(&mut subscription, "the large message").await;
    assert!(delivery.message.payload == payload, "the body crossed whole");
    delivery.settle.settle(Settlement::Ack).await.expect("acked");
    broker::clean_up(&transport).await;
}

/// A message's properties and headers travel in one frame. One too large
/// for the connection's `frame_max` is refused before it is sent: the
/// broker would close the publishing connection for it, failing every
/// confirm in flight there, and the relay would send it again and again.
/// Every size up to the limit still goes out and arrives.
#[tokio::test]
async fn a_message_whose_headers_do_not_fit_a_frame_is_refused_before_it_is_sent() {
    let name = broker::unique("oversize");
    let mut config = broker::config(&name, QueueType::Classic);
    config.frame_max = Some(8 * 1024);
    let transport = broker::connect(config).await;
    let mut subscription = transport.subscribe(&format!("{name}.queue")).await.expect("subscribed");
    transport
        .publish(&Message::new("Small", name.clone(), b"{}".to_vec()))
        .await
        .expect("published");
    let first = next(&mut subscription, "the first message").await;
    first.settle.settle(Settlement::Ack).await.expect("acked");
    let pids = || {
        let mut pids = broker::connections(&name, "pid");
        pids.sort();
        pids
    };
    let connections = pids();

    // Header values from well below the limit to past it, one byte at a time.
    let mut outcomes = Vec::new();
    let mut first_refusal = None;
    for length in 7_600..=8_200 {
        let message = Message::new("Padded", name.clone(), b"{}".to_vec()).with_header("pad", "x".repeat(length));
        match transport.publish(&message).await {
            Ok(()) => outcomes.push((length, true)),
            Err(TransportError::Rejected { reason, .. }) if reason.contains("frame_max of 8192") => {
                first_refusal.get_or_insert(reason);
                outcomes.push((length, false));
            }
            Err(e) => panic!("a {length}-byte header: expected sent or refused for its size, got {e}"),
        }
    }
    let first_refusal = first_refusal.unwrap_or_default();
    assert!(
        first_refusal.contains("a header frame of 8193 bytes"),
        "the first size refused is one byte past the limit: {first_refusal}"
    );
    let sent = outcomes.iter().take_while(|(_, sent)| *sent).count();
    assert!(
        sent > 0 && sent < outcomes.len(),
        "some sizes fit and some do not: {sent} of {} sent",
        outcomes.len()
    );
    assert!(
        outcomes[sent..].iter().all(|(_, sent)| !sent),
        "every size past the first refused one is refused too"
    );
    for (length, _) in &outcomes[..sent] {
        let delivery = next(&mut subscription, "a padded message").await;
        assert_eq!(delivery.message.header("pad").map(str::len), Some(*length));
        delivery.settle.settle(Settlement::Ack).await.expect("acked");
    }
    assert_eq!(
        pids(),
        connections,
        "the same two connections throughout: none was closed by the broker"
    );
    broker::clean_up(&transport).await;
}

/// A transport that only consumes never opens its publishing connection:
/// an observer costs the broker one connection, and its process one I/O
/// thread and one set of frame buffers.
#[tokio::test]
async fn the_publishing_connection_opens_on_the_first_publish() {
    let name = broker::unique("deferred");
    let transport = broker::connect(broker::config(&name, QueueType::Classic)).await;
    let mut subscription = transport.subscribe(&format!("{name}.queue")).await.expect("subscribed");
    assert_eq!(
        broker::connections(&name, "state"),
        ["running"],
        "only the consuming one"
    );
    assert!(
        transport.is_connected(),
        "a publishing connection not needed yet is not down"
    );

    let message = Message::new("First", name.clone(), b"{}".to_vec());
    transport.publish(&message).await.expect("published, connecting first");
    assert_eq!(broker::connections(&name, "state"), ["running", "running"]);
    assert!(transport.is_connected());
    let delivery = next(&mut subscription, "the first message").await;
    assert_eq!(delivery.message.id, message.id);
    delivery.settle.settle(Settlement::Ack).await.expect("acked");
    broker::clean_up(&transport).await;
}

/// A connection attempt belongs to the transport, not to the caller that
/// started it: callers that give up sooner than the broker answers (a relay
/// round past its budget) do not start it over each time, and one of them
/// finds it done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_slower_than_its_callers_wait_is_still_made() {
    let (proxy, name, config) = Outage::in_front("slow-connect", QueueType::Classic).await;
    let transport = broker::connect(config).await;
    // The publishing connection opens on the first publish: slowly.
    proxy.slow_down(Duration::from_millis(1_500));
    let message = Message::new("Patient", name.clone(), b"{}".to_vec());
    let deadline = Instant::now() + WAIT;
    let mut given_up = 0;
    loop {
        match tokio::time::timeout(Duration::from_millis(400), transport.publish(&message)).await {
            Ok(published) => {
                published.expect("published once connected");
                break;
            }
            Err(_) => {
                given_up += 1;
                assert!(
                    Instant::now() < deadline,
                    "no publish got through in {WAIT:?} ({given_up} given up after 400 ms each)"
                );
            }
        }
    }
    assert!(
        given_up >= 2,
        "the connection took less than the callers waited ({given_up} given up)"
    );
    proxy.slow_down(Duration::ZERO);
    broker::clean_up(&transport).await;
}

/// Publishes sharing one channel from two threads each get their own
/// confirm: half go to a queue that refuses everything (full, with
/// `reject-publish`: a negative confirm at once), half to one that takes
/// everything (a confirm after the broker's disk sync). A publish told
/// another's confirm shows as an accepted message refused, or a refused
/// one accepted (which a relay would mark sent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishes_on_one_channel_each_get_their_own_confirm() {
    const ROUNDS: usize = 20;
    const PER_ROUND: usize = 200;
    let name = broker::unique("confirms");
    let full = format!("{name}.full");
    let mut full_queue = saga_amqp::QueueConfig::new(format!("{full}.queue")).with_type(QueueType::Classic);
    full_queue
        .arguments
        .insert(ShortString::from("x-max-length"), AMQPValue::LongLongInt(0));
    full_queue.arguments.insert(
        ShortString::from("x-overflow"),
        AMQPValue::LongString("reject-publish".into()),
    );
    let full_queue_name = full_queue.name.clone();
    let open_queue = format!("{name}.queue");
    let mut config = broker::config(&name, QueueType::Classic);
    // Exchanges that allow unrouted messages: their publishes share channels
    // (mandatory ones each have their own).
    config.topology = Topology::new()
        .with_exchange(saga_amqp::ExchangeConfig::new(&name, ExchangeKind::Fanout).allow_unrouted())
        .with_exchange(saga_amqp::ExchangeConfig::new(&full, ExchangeKind::Fanout).allow_unrouted())
        .with_queue(saga_amqp::QueueConfig::new(&open_queue).with_type(QueueType::Classic))
        .with_queue(full_queue)
        .bind(&name, &open_queue, "")
        .bind(&full, &full_queue_name, "");
    config.publisher_channels = 1;
    let transport = Arc::new(broker::connect(config).await);

    // Half refused (a negative confirm).
    let wrong = publishes_told_wrong(&transport, ROUNDS, PER_ROUND, (&name, &full), |i| i % 2 == 1, "").await;
    transport.delete_topology().await.expect("cleanup");
    transport.close().await;
    assert!(
        wrong.is_empty(),
        "{} of {} publishes were told another's confirm, e.g. {:?}",
        wrong.len(),
        ROUNDS * PER_ROUND,
        &wrong[..wrong.len().min(4)]
    );
}

/// Publishes `rounds` rounds of `per_round` messages at once, the i-th of
/// each round to `to.1` if `refused(i)` (the broker refuses those) and to
/// `to.0` otherwise, and lists those told another's outcome: accepted ones
/// must be `Ok`, refused ones `Rejected` with `refusal` in the reason.
async fn publishes_told_wrong(
    transport: &Arc<AmqpTransport>,
    rounds: usize,
    per_round: usize,
    to: (&str, &str),
    refused: fn(usize) -> bool,
    refusal: &str,
) -> Vec<String> {
    let mut wrong = Vec::new();
    for round in 0..rounds {
        let mut publishes = tokio::task::JoinSet::new();
        for i in 0..per_round {
            let refused = refused(i);
            let destination = if refused { to.1 } else { to.0 }.to_owned();
            let transport = Arc::clone(transport);
            publishes.spawn(async move {
                let outcome = transport
                    .publish(&Message::new("Probe", destination, b"{}".to_vec()))
                    .await;
                (refused, outcome)
            });
        }
        while let Some(joined) = publishes.join_next().await {
            let (refused, outcome) = joined.expect("a publish task");
            match (refused, &outcome) {
                (false, Ok(())) => {}
                (true, Err(TransportError::Rejected { reason, .. })) if reason.contains(refusal) => {}
                (true, _) => wrong.push(format!("round {round}: refused by the broker, told {outcome:?}")),
                (false, _) => wrong.push(format!("round {round}: accepted by the broker, told {outcome:?}")),
            }
        }
    }
    wrong
}

/// A message the broker returns (no queue bound) is refused, and only it,
/// while others on the same connection are routed at the same time: the
/// broker's return names no publish, and lapin hands it to whichever
/// confirm it resolves next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returned_message_is_refused_and_only_it_among_concurrent_publishes() {
    const ROUNDS: usize = 50;
    const PER_ROUND: usize = 200;
    let name = broker::unique("returns");
    let unbound = format!("{name}.unbound");
    let mut config = broker::config(&name, QueueType::Classic);
    config.topology = config.topology.exchange(&unbound, ExchangeKind::Fanout);
    config.publisher_channels = 1;
    let transport = Arc::new(broker::connect(config).await);

    // One in eight comes back; most confirms around it are of routed messages.
    let refused = |i| i % 8 == 7;
    let wrong = publishes_told_wrong(&transport, ROUNDS, PER_ROUND, (&name, &unbound), refused, "unroutable").await;
    transport.delete_topology().await.expect("cleanup");
    transport.close().await;
    assert!(
        wrong.is_empty(),
        "{} of {} publishes were told another's return, e.g. {:?}",
        wrong.len(),
        ROUNDS * PER_ROUND,
        &wrong[..wrong.len().min(4)]
    );
}
