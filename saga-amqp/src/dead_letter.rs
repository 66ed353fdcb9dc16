//! Browsing and replaying `<queue>.dlq`: saga-core's [`DeadLetterQueue`] over
//! RabbitMQ.
//!
//! Both read the dead-letter queue with `basic.get` on a channel of their
//! own, without auto-ack: what is looked at but not replayed stays unacked
//! until the channel closes, and the broker then puts it back where it was.
//! A replay publishes a message with a publisher confirm and only then acks
//! it off the dead-letter queue.
//!
//! Where a message goes back to comes from the headers this crate sets when
//! it dead-letters ([`DESTINATION_HEADER`], [`ROUTING_KEY_HEADER`]); for
//! messages the broker dead-lettered by itself (a quorum queue's delivery
//! limit) from its `x-death` record.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::protocol::AMQPSoftError;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel};
use saga_core::{
    DEAD_LETTER_REASON, DeadLetter, DeadLetterPage, DeadLetterQueue, MessageId, Origin, ReplayFailure, ReplayReport,
    ReplaySelection, TransportError,
};

use crate::config::RoutingKey;
use crate::error::{short, soft_error, unavailable, within};
use crate::link::Wait;
use crate::mapping::{self, DESTINATION_HEADER, RETRIES_HEADER, ROUTING_KEY_HEADER};
use crate::subscription::Shared;
use crate::topology;
use crate::transport::AmqpTransport;

/// Headers that describe a message's stay in a dead-letter or delay queue,
/// not the message: a replay drops them.
const BOOKKEEPING: &[&str] = &[
    RETRIES_HEADER,
    DESTINATION_HEADER,
    ROUTING_KEY_HEADER,
    DEAD_LETTER_REASON,
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-delivery-count",
];

/// How long closing a browse waits at most for its messages to be back.
const RETURN_WAIT: Duration = Duration::from_secs(2);
/// Time between counts while waiting for them.
const RETURN_POLL: Duration = Duration::from_millis(10);

/// Why a dead letter without a recorded origin cannot be replayed.
const NO_ORIGIN: &str = "it does not record where it was first published (dead-lettered before saga-amqp \
     recorded that, by another client, or with headers that left no room for it): publish it again by hand";

#[async_trait]
impl DeadLetterQueue for AmqpTransport {
    async fn dead_letters(&self, queue: &str, limit: usize) -> Result<DeadLetterPage, TransportError> {
        let shared = self.shared();
        let browse = DlqChannel::open(shared, queue).await?;
        let mut letters = Vec::new();
        while letters.len() < limit {
            let Some(delivery) = browse.get().await? else { break };
            letters.push(dead_letter(shared, queue, &delivery).0);
        }
        // A message dead-lettered between the count and the reads is read
        // too: the count is at least what was read.
        let total = browse.total.max(letters.len());
        browse.close(total).await;
        Ok(DeadLetterPage { total, letters })
    }

    async fn replay(&self, queue: &str, selection: &ReplaySelection) -> Result<ReplayReport, TransportError> {
        let shared = self.shared();
        let scan = DlqChannel::open(shared, queue).await?;
        let mut report = ReplayReport::default();
        // Only what was there at the start: a replayed message that fails
        // again and comes back while this runs is not replayed twice.
        for _ in 0..scan.total {
            let Some(delivery) = scan.get().await? else { break };
            let (letter, properties) = dead_letter(shared, queue, &delivery);
            let id = letter.message.id.clone();
            if !selection.selects(&id) {
                continue;
            }
            let Some(origin) = letter.origin else {
                report.failed.push(ReplayFailure {
                    id,
                    reason: NO_ORIGIN.to_owned(),
                });
                continue;
            };
            match republish(shared, &id, &origin, properties, &delivery.data).await {
                Ok(()) => {}
                Err(error) => {
                    report.failed.push(ReplayFailure {
                        id,
                        reason: error.to_string(),
                    });
                    continue;
                }
            }
            let acked = within(
                shared.config.operation_timeout,
                "acking a replayed dead letter",
                delivery.acker.ack(BasicAckOptions::default()),
            )
            .await?;
            if !matches!(acked, Ok(true)) {
                // The channel is gone and with it every unacked message: they
                // are back in the dead-letter queue, this one too although it
                // was published (replaying it again is harmless: same id).
                return Err(TransportError::Unavailable(
                    format!(
                        "message {id} was replayed but the channel to `{}` closed before it was removed; \
                         it is still there, with the rest (replayed so far: {})",
                        topology::dlq(queue),
                        report.replayed.len() + 1
                    )
                    .into(),
                ));
            }
            report.replayed.push(id);
        }
        scan.close(scan.total.saturating_sub(report.replayed.len())).await;
        report.not_found = selection.missing(&report);
        Ok(report)
    }
}

/// A channel reading one dead-letter queue: what it gets and does not ack
/// goes back to the queue when it closes.
struct DlqChannel<'a> {
    shared: &'a Shared,
    channel: Channel,
    name: ShortString,
    /// Messages ready in the queue when it was opened.
    total: usize,
}

impl<'a> DlqChannel<'a> {
    async fn open(shared: &'a Shared, queue: &str) -> Result<Self, TransportError> {
        let dlq = topology::dlq(queue);
        let name = short(&dlq, "queue name").map_err(|_| TransportError::UnknownAddress(dlq.clone()))?;
        let channel = shared.consuming.channel(Wait::No).await?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let declared = within(
            shared.config.operation_timeout,
            "counting dead letters",
            channel.queue_declare(name.clone(), passive, FieldTable::default()),
        )
        .await?
        .map_err(|e| match soft_error(&e) {
            Some(AMQPSoftError::NOTFOUND) => TransportError::UnknownAddress(dlq.clone()),
            _ => unavailable(e),
        })?;
        Ok(Self {
            shared,
            channel,
            name,
            total: usize::try_from(declared.message_count()).unwrap_or(usize::MAX),
        })
    }

    /// The next message, unacked; `None` when the queue has no more ready.
    async fn get(&self) -> Result<Option<lapin::message::Delivery>, TransportError> {
        let options = BasicGetOptions { no_ack: false };
        let got = within(
            self.shared.config.operation_timeout,
            "reading a dead letter",
            self.channel.basic_get(self.name.clone(), options),
        )
        .await?
        .map_err(unavailable)?;
        Ok(got.map(|got| got.delivery))
    }

    /// Closes the channel, so the broker requeues what was not acked, and
    /// waits (briefly) until the queue holds `expected` ready messages again:
    /// quorum queues take the messages back asynchronously, and a caller
    /// looking again at once should not find them missing.
    async fn close(&self, expected: usize) {
        let limit = self.shared.config.operation_timeout;
        let closing = self.channel.close(200, "done with the dead letters".into());
        match within(limit, "closing a channel", closing).await {
            Ok(Ok(())) => {}
            // Closed already, or the connection is gone: the broker requeues either way.
            Ok(Err(error)) => tracing::debug!(%error, "closing a dead-letter channel failed"),
            Err(error) => tracing::debug!(%error, "closing a dead-letter channel timed out"),
        }
        let deadline = tokio::time::Instant::now() + limit.min(RETURN_WAIT);
        while tokio::time::Instant::now() < deadline {
            match self.ready().await {
                Ok(ready) if ready < expected => tokio::time::sleep(RETURN_POLL).await,
                // Back (or more arrived), or the count is unavailable: nothing to wait for.
                _ => return,
            }
        }
        tracing::debug!(queue = %self.name, expected, "dead letters not all back in the queue yet");
    }

    /// Ready messages in the queue now, counted on a channel of its own.
    async fn ready(&self) -> Result<usize, TransportError> {
        let channel = self.shared.consuming.channel(Wait::No).await?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let declared = within(
            self.shared.config.operation_timeout,
            "counting dead letters",
            channel.queue_declare(self.name.clone(), passive, FieldTable::default()),
        )
        .await?
        .map_err(unavailable)?;
        Ok(usize::try_from(declared.message_count()).unwrap_or(usize::MAX))
    }
}

/// A delivery from `queue`'s dead-letter queue as a [`DeadLetter`], and the
/// properties a replay publishes it with.
fn dead_letter(shared: &Shared, queue: &str, delivery: &lapin::message::Delivery) -> (DeadLetter, BasicProperties) {
    let (mut message, retries) =
        mapping::message(delivery.exchange.as_str(), &delivery.properties, delivery.data.clone());
    let origin = origin(shared, queue, &delivery.properties, &message.kind);
    message.destination = origin.as_ref().map(|o| o.destination.clone()).unwrap_or_default();
    let letter = DeadLetter {
        reason: message.header(DEAD_LETTER_REASON).map(str::to_owned),
        retries,
        origin,
        message,
    };
    let properties = replay_properties(&delivery.properties, &letter.message.id);
    (letter, properties)
}

/// Where a dead letter of `queue` was first published, if that is known.
fn origin(shared: &Shared, queue: &str, properties: &BasicProperties, kind: &str) -> Option<Origin> {
    let headers = properties.headers().as_ref()?.inner();
    let header = |name: &str| headers.get(name).and_then(mapping::text);
    if let Some(destination) = header(DESTINATION_HEADER) {
        let routing_key = header(ROUTING_KEY_HEADER).or_else(|| {
            // Dead-lettered before the routing key was recorded: the
            // configured exchange's routing rule tells, if it is configured.
            let exchange = shared.config.topology.exchange_config(&destination)?;
            Some(match &exchange.routing_key {
                RoutingKey::Empty => String::new(),
                RoutingKey::Kind => kind.to_owned(),
                RoutingKey::Fixed(key) => key.clone(),
            })
        })?;
        return Some(Origin {
            destination,
            routing_key: Some(routing_key),
        });
    }
    // Dead-lettered by the broker itself: its record of leaving `queue`.
    let AMQPValue::FieldArray(deaths) = headers.get("x-death")? else {
        return None;
    };
    deaths.as_slice().iter().find_map(|death| {
        let AMQPValue::FieldTable(death) = death else {
            return None;
        };
        let death = death.inner();
        if death.get("queue").and_then(mapping::text).as_deref() != Some(queue) {
            return None;
        }
        let exchange = death.get("exchange").and_then(mapping::text)?;
        let AMQPValue::FieldArray(keys) = death.get("routing-keys")? else {
            return None;
        };
        let routing_key = keys.as_slice().first().and_then(mapping::text)?;
        Some(Origin {
            destination: exchange,
            routing_key: Some(routing_key),
        })
    })
}

/// The properties of a replayed message: its own, without the dead-letter
/// bookkeeping, with the id it is known by.
fn replay_properties(original: &BasicProperties, id: &MessageId) -> BasicProperties {
    let kept: BTreeMap<ShortString, AMQPValue> = original
        .headers()
        .as_ref()
        .map(|table| {
            table
                .inner()
                .iter()
                .filter(|(name, _)| !BOOKKEEPING.contains(&name.as_str()))
                .map(|(name, value)| (name.clone(), value.clone()))
                .collect()
        })
        .unwrap_or_default();
    let mut properties = mapping::republishable(original).with_headers(FieldTable::from(kept));
    if original.message_id().is_none()
        && let Ok(id) = short(id.as_str(), "message id")
    {
        // The id it was listed under (derived from its content): keep it.
        properties = properties.with_message_id(id);
    }
    properties
}

/// Publishes a dead letter to its origin and waits for the broker's confirm.
async fn republish(
    shared: &Shared,
    id: &MessageId,
    origin: &Origin,
    properties: BasicProperties,
    body: &[u8],
) -> Result<(), TransportError> {
    let publishing = &shared.publishing;
    publishing.check_exchange(&origin.destination).await?;
    // Mandatory even where the exchange allows unrouted messages: a replay
    // nothing would receive is refused and stays a dead letter, rather than
    // confirmed, taken off the dead-letter queue and gone.
    publishing
        .publish(
            id.as_str(),
            &origin.destination,
            origin.routing_key.as_deref().unwrap_or_default(),
            true,
            body,
            properties,
        )
        .await
}
