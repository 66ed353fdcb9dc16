//! The [`Transport`] contract. A backend runs [`run_all`] with a factory of
//! fresh fixtures: a destination bound to an empty queue (with its
//! `<queue>.dlq`), under names no other test uses.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::within;
use crate::message::Message;
use crate::transport::{Delivery, Settlement, Subscription, Transport, TransportError};

/// The header a dead-lettered message carries its reason in.
pub use crate::transport::DEAD_LETTER_REASON;

/// A transport with `destination` bound to `queue`.
pub struct Fixture {
    /// The transport.
    pub transport: Arc<dyn Transport>,
    /// Where to publish.
    pub destination: String,
    /// The queue bound to it.
    pub queue: String,
}

const WAIT: Duration = Duration::from_secs(10);

/// Runs every case, each on a fresh fixture.
pub async fn run_all<F, Fut>(fresh: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Fixture>,
{
    published_message_arrives_whole(fresh().await).await;
    retry_redelivers_with_a_count(fresh().await).await;
    dead_letter_moves_to_dlq_with_reason(fresh().await).await;
    unsettled_delivery_is_redelivered(fresh().await).await;
    competing_subscriptions_share_messages(fresh().await).await;
    unknown_destination_is_an_error(fresh().await).await;
}

async fn next(subscription: &mut Box<dyn Subscription>, what: &str) -> Delivery {
    match tokio::time::timeout(WAIT, subscription.next()).await {
        Ok(Some(Ok(delivery))) => delivery,
        Ok(Some(Err(e))) => panic!("{what}: receiving failed: {e}"),
        Ok(None) => panic!("{what}: the subscription closed"),
        Err(_) => panic!("{what}: nothing arrived within {WAIT:?}"),
    }
}

async fn subscribe(fixture: &Fixture, queue: &str) -> Box<dyn Subscription> {
    within(&format!("subscribing to `{queue}`"), fixture.transport.subscribe(queue))
        .await
        .unwrap_or_else(|e| panic!("subscribing to `{queue}` failed: {e}"))
}

async fn publish(fixture: &Fixture, message: &Message) {
    within("publishing", fixture.transport.publish(message))
        .await
        .unwrap_or_else(|e| panic!("publishing failed: {e}"));
}

fn sample(fixture: &Fixture, n: u32) -> Message {
    Message::new(
        "ContractTest",
        fixture.destination.clone(),
        format!("{{\"n\":{n}}}").into_bytes(),
    )
    .with_correlation_id("0190b5c2-0000-7000-8000-000000000001")
    .with_header("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    .with_header("x-custom", "value")
}

/// What is published arrives with id, type, correlation, headers and body intact.
pub async fn published_message_arrives_whole(fixture: Fixture) {
    let mut subscription = subscribe(&fixture, &fixture.queue).await;
    let sent = sample(&fixture, 1);
    publish(&fixture, &sent).await;
    let delivery = next(&mut subscription, "round trip").await;
    let got = &delivery.message;
    assert_eq!(got.id, sent.id, "message id");
    assert_eq!(got.kind, sent.kind, "type");
    assert_eq!(got.correlation_id, sent.correlation_id, "correlation id");
    assert_eq!(got.payload, sent.payload, "payload");
    assert_eq!(
        got.header("traceparent"),
        sent.header("traceparent"),
        "traceparent header"
    );
    assert_eq!(got.header("x-custom"), Some("value"), "custom header");
    assert_eq!(delivery.retries, 0, "a first delivery has no retries");
    settle(delivery, Settlement::Ack).await;
}

async fn settle(delivery: Delivery, settlement: Settlement) {
    within("settling", delivery.settle.settle(settlement))
        .await
        .unwrap_or_else(|e| panic!("settling failed: {e}"));
}

/// A retry settlement delivers the message again, counting the retry.
pub async fn retry_redelivers_with_a_count(fixture: Fixture) {
    let mut subscription = subscribe(&fixture, &fixture.queue).await;
    let sent = sample(&fixture, 2);
    publish(&fixture, &sent).await;
    let first = next(&mut subscription, "first delivery").await;
    settle(
        first,
        Settlement::Retry {
            delay: Duration::from_millis(50),
        },
    )
    .await;
    let second = next(&mut subscription, "redelivery after retry").await;
    assert_eq!(second.message.id, sent.id, "the same message comes back");
    assert_eq!(second.message.payload, sent.payload, "with the same body");
    assert_eq!(second.retries, 1, "counting one retry");
    settle(second, Settlement::Retry { delay: Duration::ZERO }).await;
    let third = next(&mut subscription, "second redelivery").await;
    assert_eq!(third.retries, 2, "counting two retries");
    settle(third, Settlement::Ack).await;
}

/// A dead-letter settlement moves the message to `<queue>.dlq` with its reason.
pub async fn dead_letter_moves_to_dlq_with_reason(fixture: Fixture) {
    let mut subscription = subscribe(&fixture, &fixture.queue).await;
    let mut dead = subscribe(&fixture, &format!("{}.dlq", fixture.queue)).await;
    let sent = sample(&fixture, 3);
    publish(&fixture, &sent).await;
    let delivery = next(&mut subscription, "delivery").await;
    settle(
        delivery,
        Settlement::DeadLetter {
            reason: "cannot decode: expected value at line 1".into(),
        },
    )
    .await;
    let dead_letter = next(&mut dead, "dead letter").await;
    assert_eq!(dead_letter.message.id, sent.id, "the dead letter is the message");
    assert_eq!(dead_letter.message.payload, sent.payload);
    assert_eq!(
        dead_letter.message.header(DEAD_LETTER_REASON),
        Some("cannot decode: expected value at line 1"),
        "the reason travels with it"
    );
    settle(dead_letter, Settlement::Ack).await;
    let follow_up = sample(&fixture, 4);
    publish(&fixture, &follow_up).await;
    let delivery = next(&mut subscription, "delivery after a dead letter").await;
    assert_eq!(
        delivery.message.id, follow_up.id,
        "the queue keeps working after a dead letter"
    );
    settle(delivery, Settlement::Ack).await;
}

/// A delivery whose subscription goes away unsettled is delivered again.
pub async fn unsettled_delivery_is_redelivered(fixture: Fixture) {
    let sent = sample(&fixture, 5);
    {
        let mut subscription = subscribe(&fixture, &fixture.queue).await;
        publish(&fixture, &sent).await;
        let delivery = next(&mut subscription, "delivery").await;
        assert_eq!(delivery.message.id, sent.id);
        drop(delivery);
    }
    let mut subscription = subscribe(&fixture, &fixture.queue).await;
    let again = next(&mut subscription, "redelivery of an unsettled message").await;
    assert_eq!(again.message.id, sent.id, "an unsettled message is not lost");
    settle(again, Settlement::Ack).await;
}

/// Two subscriptions on one queue get every message exactly once between them.
pub async fn competing_subscriptions_share_messages(fixture: Fixture) {
    let fixture = Arc::new(fixture);
    let total = 20u32;
    let mut consumers = Vec::new();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..2 {
        let mut subscription = subscribe(&fixture, &fixture.queue).await;
        let tx = tx.clone();
        consumers.push(tokio::spawn(async move {
            while let Some(Ok(delivery)) = subscription.next().await {
                let id = delivery.message.id.clone();
                if delivery.settle.settle(Settlement::Ack).await.is_err() || tx.send(id).is_err() {
                    return;
                }
            }
        }));
    }
    let mut sent = Vec::new();
    for n in 0..total {
        let message = sample(&fixture, 100 + n);
        publish(&fixture, &message).await;
        sent.push(message.id);
    }
    let mut received = Vec::new();
    while received.len() < total as usize {
        match tokio::time::timeout(WAIT, rx.recv()).await {
            Ok(Some(id)) => received.push(id),
            _ => panic!("only {} of {total} messages arrived", received.len()),
        }
    }
    // Nothing more may arrive: each message went to exactly one subscription.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err(),
        "a message was delivered twice"
    );
    for consumer in consumers {
        consumer.abort();
    }
    received.sort();
    sent.sort();
    assert_eq!(received, sent, "every message exactly once");
}

/// Publishing to a destination that does not exist fails instead of dropping.
pub async fn unknown_destination_is_an_error(fixture: Fixture) {
    let message = Message::new(
        "ContractTest",
        format!("{}.does-not-exist", fixture.destination),
        b"{}".to_vec(),
    );
    match within(
        "publishing to an unknown destination",
        fixture.transport.publish(&message),
    )
    .await
    {
        Err(TransportError::UnknownAddress(_) | TransportError::Rejected { .. } | TransportError::Unavailable(_)) => {}
        Err(other) => panic!("unexpected error for an unknown destination: {other}"),
        Ok(()) => panic!("publishing to an unknown destination must fail, not drop the message"),
    }
}
