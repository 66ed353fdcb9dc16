//! Under a broker resource alarm, RabbitMQ stops reading from every
//! connection that publishes. Consumers must still ack: the queues drain only
//! through them, and with them the alarm. So publishing and consuming go
//! over connections of their own.
//!
//! While blocked, what a transport publishes waits for the alarm to clear
//! instead of timing out: lapin sends it then anyway, so a publish tried
//! again (or a delivery given back to be retried again) would arrive twice.
//!
//! A binary of its own: the alarm is the whole broker's, and cargo runs test
//! binaries one after another, so no other test sees it. Its tests take
//! turns (`ONE_ALARM_AT_A_TIME`).

#[path = "support/broker.rs"]
mod broker;

use std::time::Duration;

use saga_amqp::{AmqpTransport, QueueType};
use saga_core::{Delivery, Message, Publisher, Settlement, Subscriber, Subscription};
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(15);

/// The tests of this binary raise and clear the one broker's alarm: one at a time.
static ONE_ALARM_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A memory alarm for as long as it lives: a high watermark of 0 sets it at
/// once. Dropping it (also when the test panics) puts the watermark back.
struct MemoryAlarm {
    watermark: String,
}

impl MemoryAlarm {
    /// Clears an alarm left by a run of this test killed before it put the
    /// watermark back (no broker runs with 0), with RabbitMQ's default.
    fn clear_leftover() {
        let current = broker::rabbitmqctl(&["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."]);
        if current.trim().parse::<f64>().is_ok_and(|w| w == 0.0) {
            eprintln!("the memory watermark was 0, left by an interrupted run; setting RabbitMQ's default, 0.4");
            broker::rabbitmqctl(&["set_vm_memory_high_watermark", "0.4"]);
        }
    }

    fn raise() -> Self {
        let current = broker::rabbitmqctl(&["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."]);
        let watermark = current.trim().to_owned();
        assert!(
            watermark.parse::<f64>().is_ok_and(|w| w > 0.0),
            "the broker's relative memory watermark is `{watermark}`; this test restores only a relative one"
        );
        broker::rabbitmqctl(&["set_vm_memory_high_watermark", "0"]);
        Self { watermark }
    }
}

impl Drop for MemoryAlarm {
    fn drop(&mut self) {
        let restored = std::process::Command::new("rabbitmqctl")
            .args(["set_vm_memory_high_watermark", &self.watermark])
            .status();
        if !restored.is_ok_and(|s| s.success()) {
            eprintln!(
                "restoring the memory watermark failed: run `rabbitmqctl set_vm_memory_high_watermark {}`",
                self.watermark
            );
        }
    }
}

/// Waits until the broker blocks a connection of the transport `name`.
async fn wait_until_blocked(name: &str) {
    let deadline = Instant::now() + WAIT;
    while !broker::connections(name, "state")
        .iter()
        .any(|state| state == "blocked")
    {
        assert!(
            Instant::now() < deadline,
            "no connection of the transport was blocked: {:?}",
            broker::connections(name, "state")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The next delivery of `subscription`, within [`WAIT`].
async fn next_delivery(subscription: &mut Box<dyn Subscription>) -> Delivery {
    tokio::time::timeout(WAIT, subscription.next())
        .await
        .unwrap_or_else(|_| panic!("a delivery came within {WAIT:?}"))
        .expect("the subscription is open")
        .expect("a delivery")
}

/// Waits until the broker counts no message and no unacked delivery in
/// `queue`, failing with `failure` after [`WAIT`].
async fn wait_until_empty(queue: &str, failure: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = counts(queue);
        if now == Some((0, 0)) {
            return;
        }
        assert!(Instant::now() < deadline, "{failure}: (messages, unacked) = {now:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Messages and unacknowledged deliveries of `queue`, as the broker counts them.
fn counts(queue: &str) -> Option<(u64, u64)> {
    let listed = broker::rabbitmqctl(&[
        "list_queues",
        "-q",
        "--no-table-headers",
        "name",
        "messages",
        "messages_unacknowledged",
    ]);
    listed.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        (fields.next() == Some(queue)).then(|| {
            let mut number = || fields.next().and_then(|n| n.parse().ok()).unwrap_or(u64::MAX);
            (number(), number())
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_ack_while_a_memory_alarm_blocks_publishing() {
    const QUEUED: usize = 5;
    let _turn = ONE_ALARM_AT_A_TIME.lock().await;
    MemoryAlarm::clear_leftover();
    let name = broker::unique("alarm");
    let queue = format!("{name}.queue");
    let transport = broker::connect(broker::config(&name, QueueType::Classic)).await;
    for n in 0..QUEUED {
        let message = Message::new("Queued", name.clone(), format!("{{\"n\":{n}}}").into_bytes());
        transport.publish(&message).await.expect("published before the alarm");
    }
    let mut subscription = transport.subscribe(&queue).await.expect("subscribed");

    let alarm = MemoryAlarm::raise();
    // A publish under the alarm: the broker blocks the connection it came on.
    let publishing = {
        let (transport, message) = (transport.clone(), Message::new("Blocked", name.clone(), b"{}".to_vec()));
        tokio::spawn(async move { transport.publish(&message).await })
    };
    wait_until_blocked(&name).await;

    for _ in 0..QUEUED {
        let delivery = next_delivery(&mut subscription).await;
        delivery.settle.settle(Settlement::Ack).await.expect("acked");
    }
    wait_until_empty(&queue, "the acks did not reach the broker while publishing was blocked").await;

    drop(alarm);
    let published = tokio::time::timeout(WAIT, publishing)
        .await
        .expect("the blocked publish ends once the alarm clears")
        .expect("no panic");
    published.expect("the blocked publish is confirmed once the alarm clears");
    let after = Message::new("After", name.clone(), b"{}".to_vec());
    transport.publish(&after).await.expect("publishing resumed");
    broker::clean_up(&transport).await;
}

/// A transport whose operations time out after `BROKER_TIMEOUT`, well
/// inside the alarm the test holds.
async fn impatient_transport(name: &str) -> AmqpTransport {
    let mut config = broker::config(name, QueueType::Classic);
    config.operation_timeout = BROKER_TIMEOUT;
    broker::connect(config).await
}

const BROKER_TIMEOUT: Duration = Duration::from_secs(1);

/// Longer than three operation timeouts: before waiting for the alarm, each
/// timeout gave the publish up (and a retried delivery back to its queue)
/// while lapin kept the publish to send when the alarm cleared.
const ALARM: Duration = Duration::from_millis(3_500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_and_a_retry_under_an_alarm_wait_for_it_and_arrive_once() {
    let _turn = ONE_ALARM_AT_A_TIME.lock().await;
    MemoryAlarm::clear_leftover();
    let name = broker::unique("alarm-wait");
    let queue = format!("{name}.queue");
    let transport = impatient_transport(&name).await;
    let retried = Message::new("Retried", name.clone(), b"{}".to_vec());
    transport.publish(&retried).await.expect("published before the alarm");
    let mut subscription = transport.subscribe(&queue).await.expect("subscribed");
    let delivery = next_delivery(&mut subscription).await;
    assert_eq!(delivery.message.id, retried.id);

    let alarm = MemoryAlarm::raise();
    let blocked = Message::new("Blocked", name.clone(), b"{}".to_vec());
    let publishing = {
        let (transport, message) = (transport.clone(), blocked.clone());
        tokio::spawn(async move { transport.publish(&message).await })
    };
    wait_until_blocked(&name).await;
    // The relay claims nothing while this holds.
    let deadline = Instant::now() + WAIT;
    while !transport.is_held_back() {
        assert!(Instant::now() < deadline, "the transport never said it was held back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Back through its own queue at once: no delay queue to declare.
    let retrying = tokio::spawn(delivery.settle.settle(Settlement::Retry { delay: Duration::ZERO }));
    tokio::time::sleep(ALARM).await;
    assert!(
        !publishing.is_finished() && !retrying.is_finished(),
        "a publish under the alarm ended before it cleared: publish {:?}, retry {:?}",
        publishing.is_finished(),
        retrying.is_finished()
    );

    drop(alarm);
    let published = tokio::time::timeout(WAIT, publishing).await;
    published
        .expect("the publish ended once the alarm cleared")
        .expect("no panic")
        .expect("the publish is confirmed once the alarm clears");
    assert!(!transport.is_held_back(), "still held back after the alarm cleared");
    let settled = tokio::time::timeout(WAIT, retrying).await;
    settled
        .expect("the retry ended once the alarm cleared")
        .expect("no panic")
        .expect("the retry is forwarded, the delivery acked");

    // Each message once: the blocked publish, and the retried one with its round counted.
    let mut seen = Vec::new();
    for _ in 0..2 {
        let delivery = next_delivery(&mut subscription).await;
        seen.push((delivery.message.kind.clone(), delivery.retries));
        delivery.settle.settle(Settlement::Ack).await.expect("acked");
    }
    seen.sort();
    assert_eq!(seen, [("Blocked".to_owned(), 0), ("Retried".to_owned(), 1)]);
    wait_until_empty(&queue, "copies were left in the queue").await;
    broker::clean_up(&transport).await;
}
