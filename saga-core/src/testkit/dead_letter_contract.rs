//! The [`DeadLetterQueue`] contract. A backend that implements it runs
//! [`run_all`] with a factory of fresh fixtures: a destination bound to an
//! empty queue (with its `<queue>.dlq`), under names no other test uses.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::within;
use crate::dead_letter::{DeadLetterPage, DeadLetterQueue, ReplaySelection};
use crate::id::MessageId;
use crate::message::Message;
use crate::transport::{DEAD_LETTER_REASON, Delivery, Settlement, Subscription, Transport, TransportError};

/// A transport with `destination` bound to `queue`, and its dead-letter side
/// (usually the same object twice).
pub struct Fixture {
    /// Publishing and consuming.
    pub transport: Arc<dyn Transport>,
    /// Browsing and replaying dead letters.
    pub dead_letters: Arc<dyn DeadLetterQueue>,
    /// Where to publish.
    pub destination: String,
    /// The queue bound to it.
    pub queue: String,
}

const WAIT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(20);

/// Runs every case, each on a fresh fixture.
pub async fn run_all<F, Fut>(fresh: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Fixture>,
{
    browsing_leaves_dead_letters_in_place(fresh().await).await;
    replay_sends_chosen_messages_back_to_their_origin(fresh().await).await;
    replay_all_empties_the_dead_letter_queue(fresh().await).await;
    a_queue_that_does_not_exist_is_an_error(fresh().await).await;
}

async fn next(subscription: &mut Box<dyn Subscription>, what: &str) -> Delivery {
    match tokio::time::timeout(WAIT, subscription.next()).await {
        Ok(Some(Ok(delivery))) => delivery,
        Ok(Some(Err(e))) => panic!("{what}: receiving failed: {e}"),
        Ok(None) => panic!("{what}: the subscription closed"),
        Err(_) => panic!("{what}: nothing arrived within {WAIT:?}"),
    }
}

async fn settle(delivery: Delivery, settlement: Settlement) {
    within("settling", delivery.settle.settle(settlement))
        .await
        .unwrap_or_else(|e| panic!("settling failed: {e}"));
}

fn sample(fixture: &Fixture, n: u32) -> Message {
    Message::new(
        "DeadLetterTest",
        fixture.destination.clone(),
        format!("{{\"n\":{n}}}").into_bytes(),
    )
    .with_correlation_id("0190b5c2-0000-7000-8000-000000000002")
    .with_header("x-custom", "value")
}

async fn subscribe(fixture: &Fixture) -> Box<dyn Subscription> {
    within(
        &format!("subscribing to `{}`", fixture.queue),
        fixture.transport.subscribe(&fixture.queue),
    )
    .await
    .unwrap_or_else(|e| panic!("subscribing to `{}` failed: {e}", fixture.queue))
}

/// Publishes `count` messages and dead-letters each (the first after one
/// retry) with reason `reason <n>`; returns them in order.
async fn dead_letter(fixture: &Fixture, subscription: &mut Box<dyn Subscription>, count: u32) -> Vec<Message> {
    let mut sent = Vec::new();
    for n in 0..count {
        let message = sample(fixture, n);
        within("publishing", fixture.transport.publish(&message))
            .await
            .unwrap_or_else(|e| panic!("publishing failed: {e}"));
        let mut delivery = next(subscription, "a message to dead-letter").await;
        if n == 0 {
            settle(delivery, Settlement::Retry { delay: Duration::ZERO }).await;
            delivery = next(subscription, "the retried message").await;
        }
        assert_eq!(delivery.message.id, message.id, "messages arrive in order");
        settle(
            delivery,
            Settlement::DeadLetter {
                reason: format!("reason {n}"),
            },
        )
        .await;
        sent.push(message);
    }
    wait_for_total(fixture, count as usize, "the dead letters").await;
    sent
}

async fn page(fixture: &Fixture, limit: usize) -> DeadLetterPage {
    within(
        "browsing the dead letters",
        fixture.dead_letters.dead_letters(&fixture.queue, limit),
    )
    .await
    .unwrap_or_else(|e| panic!("browsing the dead letters of `{}` failed: {e}", fixture.queue))
}

async fn wait_for_total(fixture: &Fixture, total: usize, what: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let found = page(fixture, 0).await.total;
        if found == total {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: the dead-letter queue holds {found} messages, expected {total}, after {WAIT:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Browsing shows the oldest dead letters with reason, retries and origin,
/// and removes nothing, however often it is done.
pub async fn browsing_leaves_dead_letters_in_place(fixture: Fixture) {
    let mut subscription = subscribe(&fixture).await;
    let sent = dead_letter(&fixture, &mut subscription, 3).await;
    for _ in 0..3 {
        let first_two = page(&fixture, 2).await;
        assert_eq!(first_two.total, 3, "the total counts every dead letter");
        let ids: Vec<&MessageId> = first_two.letters.iter().map(|l| &l.message.id).collect();
        assert_eq!(ids, [&sent[0].id, &sent[1].id], "the oldest first, at most the limit");
    }
    let all = page(&fixture, 10).await;
    assert_eq!(all.letters.len(), 3, "browsing removed nothing");
    let first = &all.letters[0];
    assert_eq!(first.reason.as_deref(), Some("reason 0"), "the reason");
    assert_eq!(first.retries, 1, "the retries it went through");
    assert_eq!(first.message.kind, sent[0].kind, "the type");
    assert_eq!(first.message.payload, sent[0].payload, "the body");
    assert_eq!(
        first.message.correlation_id, sent[0].correlation_id,
        "the correlation id"
    );
    assert_eq!(
        first.origin.as_ref().map(|o| o.destination.as_str()),
        Some(fixture.destination.as_str()),
        "the destination it was first published to"
    );
    assert_eq!(all.letters[2].reason.as_deref(), Some("reason 2"));
    assert_eq!(all.letters[2].retries, 0);
}

/// Replaying chosen ids publishes those messages to their origin, whole but
/// without the dead-letter bookkeeping, and leaves the rest; unknown ids are
/// reported.
pub async fn replay_sends_chosen_messages_back_to_their_origin(fixture: Fixture) {
    let mut subscription = subscribe(&fixture).await;
    let sent = dead_letter(&fixture, &mut subscription, 3).await;
    let unknown = MessageId::from("no-such-message");
    let selection = ReplaySelection::Ids(vec![sent[0].id.clone(), unknown.clone()]);
    let report = within("replaying", fixture.dead_letters.replay(&fixture.queue, &selection))
        .await
        .unwrap_or_else(|e| panic!("replay failed: {e}"));
    assert_eq!(report.replayed, [sent[0].id.clone()], "the chosen message is replayed");
    assert_eq!(report.not_found, [unknown], "an unknown id is reported");
    assert!(report.failed.is_empty(), "nothing failed: {:?}", report.failed);

    let replayed = next(&mut subscription, "the replayed message").await;
    let got = &replayed.message;
    assert_eq!(got.id, sent[0].id, "the same id, so inboxes recognise it");
    assert_eq!(got.kind, sent[0].kind);
    assert_eq!(got.payload, sent[0].payload);
    assert_eq!(got.correlation_id, sent[0].correlation_id);
    assert_eq!(got.header("x-custom"), Some("value"), "its own headers travel");
    assert_eq!(got.header(DEAD_LETTER_REASON), None, "the dead-letter reason does not");
    assert_eq!(replayed.retries, 0, "a replay starts with a fresh retry budget");
    settle(replayed, Settlement::Ack).await;

    let left = page(&fixture, 10).await;
    assert_eq!(left.total, 2, "the others stay");
    let ids: Vec<&MessageId> = left.letters.iter().map(|l| &l.message.id).collect();
    assert_eq!(ids, [&sent[1].id, &sent[2].id], "in their order");
}

/// Replaying everything empties the dead-letter queue, each message once.
pub async fn replay_all_empties_the_dead_letter_queue(fixture: Fixture) {
    let mut subscription = subscribe(&fixture).await;
    let sent = dead_letter(&fixture, &mut subscription, 3).await;
    let report = within(
        "replaying",
        fixture.dead_letters.replay(&fixture.queue, &ReplaySelection::All),
    )
    .await
    .unwrap_or_else(|e| panic!("replay failed: {e}"));
    let mut replayed = report.replayed.clone();
    replayed.sort();
    let mut expected: Vec<MessageId> = sent.iter().map(|m| m.id.clone()).collect();
    expected.sort();
    assert_eq!(replayed, expected, "every dead letter is replayed once");
    assert!(report.not_found.is_empty() && report.failed.is_empty(), "{report:?}");
    let mut arrived = Vec::new();
    for _ in 0..sent.len() {
        let delivery = next(&mut subscription, "a replayed message").await;
        arrived.push(delivery.message.id.clone());
        settle(delivery, Settlement::Ack).await;
    }
    arrived.sort();
    assert_eq!(arrived, expected, "each replayed message arrives");
    assert_eq!(page(&fixture, 10).await.total, 0, "the dead-letter queue is empty");
}

/// Browsing or replaying the dead letters of a queue that does not exist
/// fails with [`TransportError::UnknownAddress`].
pub async fn a_queue_that_does_not_exist_is_an_error(fixture: Fixture) {
    let missing = format!("{}-missing", fixture.queue);
    let browsed = within(
        "browsing a missing queue",
        fixture.dead_letters.dead_letters(&missing, 10),
    )
    .await;
    assert!(
        matches!(browsed, Err(TransportError::UnknownAddress(_))),
        "browsing: {browsed:?}"
    );
    let replayed = within(
        "replaying a missing queue",
        fixture.dead_letters.replay(&missing, &ReplaySelection::All),
    )
    .await;
    assert!(
        matches!(replayed, Err(TransportError::UnknownAddress(_))),
        "replaying: {replayed:?}"
    );
}
