//! Under a broker resource alarm, RabbitMQ stops reading from every
//! connection that publishes. Consumers must still ack: the queues drain only
//! through them, and with them the alarm. So publishing and consuming go
//! over connections of their own.
//!
//! A binary of its own: the alarm is the whole broker's, and cargo runs test
//! binaries one after another, so no other test sees it.

#[path = "support/broker.rs"]
mod broker;

use std::time::Duration;

use saga_amqp::QueueType;
use saga_core::{Message, Publisher, Settlement, Subscriber};
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(15);

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
    let deadline = Instant::now() + WAIT;
    while !broker::connections(&name, "state")
        .iter()
        .any(|state| state == "blocked")
    {
        assert!(
            Instant::now() < deadline,
            "no connection of the transport was blocked: {:?}",
            broker::connections(&name, "state")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    for n in 0..QUEUED {
        let delivery = tokio::time::timeout(WAIT, subscription.next())
            .await
            .unwrap_or_else(|_| panic!("delivery {n} came within {WAIT:?}"))
            .expect("the subscription is open")
            .expect("a delivery");
        delivery.settle.settle(Settlement::Ack).await.expect("acked");
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let now = counts(&queue);
        if now == Some((0, 0)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the acks did not reach the broker while publishing was blocked: (messages, unacked) = {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    drop(alarm);
    let published = tokio::time::timeout(WAIT, publishing)
        .await
        .expect("the blocked publish ends once the alarm clears")
        .expect("no panic");
    // Confirmed once unblocked, or failed by the operation timeout first:
    // either way, the transport publishes again.
    if let Err(e) = published {
        assert!(e.is_retryable(), "{e}");
    }
    let after = Message::new("After", name.clone(), b"{}".to_vec());
    let deadline = Instant::now() + WAIT;
    while let Err(e) = transport.publish(&after).await {
        assert!(Instant::now() < deadline, "publishing did not resume: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    broker::clean_up(&transport).await;
}
