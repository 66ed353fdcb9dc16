//! Consuming a queue with manual acks, and executing the consumer's
//! settlements: ack, retry through a delay queue, or dead-letter to
//! `<queue>.dlq`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_core::Stream;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::protocol::AMQPSoftError;
use lapin::types::DeliveryTag;
use lapin::types::FieldTable;
use lapin::{Acker, BasicProperties, Channel, Consumer};
use saga_core::{DEAD_LETTER_REASON, Delivery, MessageId, Settle, Settlement, Subscription, TransportError};

use crate::acks::{AckTally, AckWindow};
use crate::config::AmqpConfig;
use crate::error::{short, soft_error, unavailable, within};
use crate::link::{Link, Wait};
use crate::mapping;
use crate::publisher::{Publishing, header_frame_size};
use crate::topology::{self, DLQ_SUFFIX};

/// What subscriptions and settlements share with the transport.
pub(crate) struct Shared {
    pub(crate) config: Arc<AmqpConfig>,
    /// The connection that consumes (and browses dead letters).
    pub(crate) consuming: Arc<Link>,
    /// Publishing, on a connection of its own ([`Publishing::link`]).
    pub(crate) publishing: Publishing,
    /// Queues declared on demand on the current connection (generation,
    /// names): delay queues, and the dead-letter queues of queues the
    /// topology does not list.
    declared: Mutex<(u64, HashSet<String>)>,
    /// Every delay queue ever declared, for [`AmqpTransport::delete_topology`](crate::AmqpTransport::delete_topology).
    pub(crate) all_retry_queues: Mutex<HashSet<String>>,
    /// The acks sent on every subscription's channel.
    pub(crate) acks_sent: Arc<AckTally>,
}

impl Shared {
    pub(crate) fn new(config: Arc<AmqpConfig>, consuming: Arc<Link>, publishing_link: Arc<Link>) -> Self {
        let declared: Vec<String> = config.topology.exchanges.iter().map(|e| e.name.clone()).collect();
        let publishing = Publishing::new(
            publishing_link,
            config.publisher_channels,
            config.mandatory_channels,
            config.max_confirms_in_flight,
            &declared,
        );
        Self {
            config,
            consuming,
            publishing,
            declared: Mutex::new((0, HashSet::new())),
            all_retry_queues: Mutex::new(HashSet::new()),
            acks_sent: Arc::default(),
        }
    }

    /// Declares the delay queue `name` of `queue` once per connection.
    async fn ensure_retry_queue(&self, queue: &str, name: &str, ttl_ms: u64) -> Result<(), TransportError> {
        let arguments = topology::retry_arguments(topology::queue_type(&self.config, queue), queue, ttl_ms);
        self.ensure_declared(name, arguments).await?;
        self.all_retry_queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned());
        Ok(())
    }

    /// Declares the dead-letter queue of `queue` once per connection, if the
    /// topology does not list `queue` (its own are declared with it): a
    /// dead letter of a queue consumed from elsewhere has somewhere to go,
    /// rather than coming back to be handled, and refused, again and again.
    async fn ensure_dead_letter_queue(&self, queue: &str) -> Result<(), TransportError> {
        if self.config.topology.queue_config(queue).is_some() {
            return Ok(());
        }
        let arguments = topology::dlq_arguments(topology::queue_type(&self.config, queue));
        self.ensure_declared(&topology::dlq(queue), arguments).await
    }

    /// Forgets that `name` was declared, so the next retry or dead letter to
    /// it declares it again (it may have been deleted meanwhile).
    fn forget_declared(&self, name: &str) {
        self.declared.lock().unwrap_or_else(|p| p.into_inner()).1.remove(name);
    }

    /// Declares the durable queue `name` once per connection.
    async fn ensure_declared(&self, name: &str, arguments: FieldTable) -> Result<(), TransportError> {
        let generation = self.publishing.link().generation();
        {
            let declared = self.declared.lock().unwrap_or_else(|p| p.into_inner());
            if declared.0 == generation && declared.1.contains(name) {
                return Ok(());
            }
        }
        let link = self.publishing.link();
        let channel = link.channel(Wait::No).await?;
        link.within_unless_blocked(
            &format!("declaring `{name}`"),
            topology::declare_queue(&channel, name, true, arguments),
        )
        .await??;
        let mut declared = self.declared.lock().unwrap_or_else(|p| p.into_inner());
        if declared.0 != generation {
            *declared = (generation, HashSet::new());
        }
        declared.1.insert(name.to_owned());
        Ok(())
    }
}

/// A queue being consumed on a channel of its own.
pub(crate) struct Consuming {
    channel: Channel,
    consumer: Consumer,
    acks: Arc<AckWindow>,
}

/// Starts consuming `queue` on a channel of its own (its prefetch is this
/// subscription's; closing it requeues what was not acked).
pub(crate) async fn consume(shared: &Shared, queue: &str, wait: Wait) -> Result<Consuming, TransportError> {
    let name = short(queue, "queue name").map_err(|_| TransportError::UnknownAddress(queue.to_owned()))?;
    let channel = shared.consuming.channel(wait).await?;
    let limit = shared.config.operation_timeout;
    within(
        limit,
        "setting the prefetch",
        channel.basic_qos(shared.config.prefetch, BasicQosOptions::default()),
    )
    .await?
    .map_err(unavailable)?;
    let consume = channel.basic_consume(name, "".into(), BasicConsumeOptions::default(), FieldTable::default());
    let consumer = within(limit, "starting to consume", consume)
        .await?
        .map_err(|e| match soft_error(&e) {
            Some(AMQPSoftError::NOTFOUND) => TransportError::UnknownAddress(queue.to_owned()),
            _ => unavailable(e),
        })?;
    Ok(Consuming {
        channel,
        consumer,
        acks: Arc::new(AckWindow::new(Arc::clone(&shared.acks_sent))),
    })
}

/// A subscription that survives reconnects: after its channel or connection
/// drops it reports the error once and consumes again on the next call.
pub(crate) struct AmqpSubscription {
    pub(crate) shared: Arc<Shared>,
    pub(crate) queue: Arc<str>,
    pub(crate) current: Option<Consuming>,
}

#[async_trait]
impl Subscription for AmqpSubscription {
    async fn next(&mut self) -> Option<Result<Delivery, TransportError>> {
        let closed = self.shared.consuming.closed().clone();
        let current = match &mut self.current {
            Some(current) => current,
            None => {
                let opened = tokio::select! {
                    () = closed.cancelled() => return None,
                    opened = consume(&self.shared, &self.queue, Wait::Yes) => opened,
                };
                match opened {
                    Ok(current) => self.current.insert(current),
                    Err(TransportError::Closed) => return None,
                    Err(e) => return Some(Err(e)),
                }
            }
        };
        let item = tokio::select! {
            () = closed.cancelled() => return None,
            item = std::future::poll_fn(|cx| std::pin::Pin::new(&mut current.consumer).poll_next(cx)) => item,
        };
        match item {
            Some(Ok(delivery)) => {
                let (channel, acks) = (current.channel.clone(), Arc::clone(&current.acks));
                Some(Ok(self.delivery(channel, acks, delivery)))
            }
            Some(Err(e)) => {
                self.current = None;
                Some(Err(unavailable(e)))
            }
            None => {
                self.current = None;
                if closed.is_cancelled() {
                    return None;
                }
                Some(Err(TransportError::Unavailable(
                    format!("the broker cancelled the consumer of `{}`; consuming again", self.queue).into(),
                )))
            }
        }
    }
}

impl AmqpSubscription {
    fn delivery(&self, channel: Channel, acks: Arc<AckWindow>, delivery: lapin::message::Delivery) -> Delivery {
        let lapin::message::Delivery {
            delivery_tag,
            exchange,
            routing_key,
            properties,
            data,
            acker,
            ..
        } = delivery;
        let (message, retries) = mapping::message(exchange.as_str(), &properties, data.clone());
        acks.opened(delivery_tag);
        let settle = AmqpSettle {
            shared: Arc::clone(&self.shared),
            queue: Arc::clone(&self.queue),
            channel,
            acks,
            tag: delivery_tag,
            acker: Some(acker),
            message_id: message.id.clone(),
            exchange: exchange.as_str().to_owned(),
            routing_key: routing_key.as_str().to_owned(),
            properties,
            body: data,
            retries,
        };
        Delivery {
            message,
            retries,
            settle: Box::new(settle),
        }
    }
}

struct AmqpSettle {
    shared: Arc<Shared>,
    queue: Arc<str>,
    /// Keeps the channel open until the delivery is settled.
    channel: Channel,
    /// The channel's acks, which this delivery's joins.
    acks: Arc<AckWindow>,
    tag: DeliveryTag,
    acker: Option<Acker>,
    message_id: MessageId,
    /// The exchange and routing key it arrived by (recorded on its first round).
    exchange: String,
    routing_key: String,
    properties: BasicProperties,
    body: Vec<u8>,
    retries: u32,
}

/// What RabbitMQ adds to a message's headers when it dead-letters it from
/// the delay queue `retry_queue` back to `queue`, at most: the `x-death`
/// entry (count, reason, queue, time, exchange, routing keys) and the
/// `x-first-death-*` and `x-last-death-*` headers, each naming a queue,
/// with room to spare for the broker's own changes between versions.
fn death_headroom(queue: &str, retry_queue: &str) -> usize {
    512 + 4 * retry_queue.len() + 2 * queue.len()
}

/// Whether `properties`, and `headroom` bytes the broker adds on the way
/// (see [`death_headroom`]), fit in a frame of `frame_max` (unbuildable
/// ones count as fitting: `forward` reports them).
fn fits(properties: &Result<BasicProperties, String>, headroom: usize, frame_max: usize) -> bool {
    properties
        .as_ref()
        .map_or(true, |p| header_frame_size(p).saturating_add(headroom) <= frame_max)
}

/// How long a delivery whose retry or dead letter failed is held before it
/// goes back to its queue (see `hold_then_requeue`).
const FORWARD_FAILED_HOLD: Duration = Duration::from_secs(1);

/// The reason a message that could not be retried is dead-lettered with.
const NO_ROOM_TO_RETRY: &str = "its headers leave no room in a frame for a retry's headers, so it was not retried";

impl AmqpSettle {
    fn limit(&self) -> Duration {
        self.shared.config.operation_timeout
    }

    /// Gives the delivery back to its queue (see [`AckWindow::give_back`]).
    async fn requeue(&self, acker: &Acker) {
        self.acks.give_back(self.tag, acker, self.limit()).await;
    }

    /// Gives the delivery back after [`FORWARD_FAILED_HOLD`]: its retry or
    /// dead letter could not be sent (a delay or dead-letter queue the
    /// broker will not declare or take, say). Given back at once, it would
    /// be handled and fail again at network speed for as long as that lasts,
    /// its retry count never growing.
    async fn hold_then_requeue(&self, acker: &Acker) {
        tokio::time::sleep(FORWARD_FAILED_HOLD).await;
        self.requeue(acker).await;
    }

    fn published(&self) -> mapping::Published<'_> {
        mapping::Published {
            exchange: &self.exchange,
            routing_key: &self.routing_key,
        }
    }

    /// Waits, at most `operation_timeout`, for the publishing connection a
    /// retry or dead letter goes out on. Failing at once while it reconnects
    /// would give the delivery back, to be handled and fail again at once,
    /// for as long as the reconnect backs off.
    async fn publishing_ready(&self, acker: &Acker) -> Result<(), TransportError> {
        let link = self.shared.publishing.link();
        if link.is_up() {
            return Ok(());
        }
        let limit = self.limit();
        let ready = match tokio::time::timeout(limit, link.connection(Wait::Yes)).await {
            Ok(ready) => ready.map(drop),
            Err(_) => Err(TransportError::Unavailable(
                format!("the publishing connection was not back within {limit:?}").into(),
            )),
        };
        if ready.is_err() {
            self.requeue(acker).await;
        }
        ready
    }

    /// The largest frame the publishing connection takes (connecting if
    /// needed); when it cannot tell, the delivery goes back to its queue.
    async fn frame_max(&self, acker: &Acker) -> Result<usize, TransportError> {
        match self.shared.publishing.frame_max().await {
            Ok(frame_max) => Ok(frame_max),
            Err(e) => {
                self.requeue(acker).await;
                Err(e)
            }
        }
    }

    /// Sends the message round again through the delay queue of `delay`.
    /// One whose headers leave no room in a frame for the retry count (and,
    /// through a delay queue, for the broker's `x-death` record on its way
    /// back) is dead-lettered instead: a retry it cannot count could not be
    /// bounded, and a frame too large closes the connection that gets it.
    async fn retry(&self, acker: &Acker, delay: Duration) -> Result<(), TransportError> {
        self.publishing_ready(acker).await?;
        let properties = mapping::republished(
            &self.properties,
            &self.message_id,
            self.published(),
            self.retries.saturating_add(1),
            None,
        );
        let delayed = (!delay.is_zero()).then(|| topology::retry_queue(&self.queue, delay));
        let headroom = delayed
            .as_ref()
            .map_or(0, |(name, _)| death_headroom(&self.queue, name));
        if !fits(&properties, headroom, self.frame_max(acker).await?) {
            tracing::warn!(
                message_id = %self.message_id,
                queue = %self.queue,
                "its headers leave no room in a frame for a retry's headers: dead-lettered instead of retried"
            );
            return self.dead_letter(acker, NO_ROOM_TO_RETRY).await;
        }
        let target = if let Some((name, ttl)) = delayed {
            if let Err(e) = self.shared.ensure_retry_queue(&self.queue, &name, ttl).await {
                self.hold_then_requeue(acker).await;
                return Err(e);
            }
            name
        } else {
            self.queue.to_string()
        };
        self.forward(acker, &target, properties).await
    }

    /// Sends the message to the dead-letter queue with `reason`.
    async fn dead_letter(&self, acker: &Acker, reason: &str) -> Result<(), TransportError> {
        self.publishing_ready(acker).await?;
        // A dead letter of a dead-letter queue stays where it is, at the back.
        let target = if self.queue.ends_with(DLQ_SUFFIX) {
            self.queue.to_string()
        } else {
            if let Err(e) = self.shared.ensure_dead_letter_queue(&self.queue).await {
                self.hold_then_requeue(acker).await;
                return Err(e);
            }
            topology::dlq(&self.queue)
        };
        let mut properties = mapping::republished(
            &self.properties,
            &self.message_id,
            self.published(),
            self.retries,
            Some((DEAD_LETTER_REASON, reason)),
        );
        let frame_max = self.frame_max(acker).await?;
        if !fits(&properties, 0, frame_max) {
            // Kept, without the reason and origin: they are logged instead.
            tracing::error!(
                message_id = %self.message_id,
                queue = %self.queue,
                exchange = %self.exchange,
                routing_key = %self.routing_key,
                reason,
                "its headers leave no room in a frame for the dead-letter reason and origin: dead-lettered without them"
            );
            // As it came (which reached this client in one frame), with
            // what it lacked of an id and persistence while there is room.
            properties = [
                mapping::republished_as_is(&self.properties, &self.message_id),
                Ok(mapping::republishable_as_sent(&self.properties, true)),
            ]
            .into_iter()
            .find(|candidate| fits(candidate, 0, frame_max))
            .unwrap_or_else(|| Ok(mapping::republishable_as_sent(&self.properties, false)));
        }
        self.forward(acker, &target, properties).await
    }

    /// Publishes the message to `queue` (through the default exchange) with
    /// `properties`, then acks the original: at least once, never lost.
    async fn forward(
        &self,
        acker: &Acker,
        queue: &str,
        properties: Result<BasicProperties, String>,
    ) -> Result<(), TransportError> {
        let properties = match properties {
            Ok(properties) => properties,
            Err(reason) => {
                self.hold_then_requeue(acker).await;
                return Err(TransportError::Rejected {
                    id: self.message_id.to_string(),
                    reason,
                });
            }
        };
        // The delivery's channel closed while this waited (a broker
        // restart): the broker has it back, and a copy sent now would be a
        // second one, with a retry count of its own.
        if !self.channel.status().connected() {
            return Err(TransportError::Unavailable(
                "the delivery's channel closed before it was forwarded; the broker redelivers it".into(),
            ));
        }
        let published = self
            .shared
            .publishing
            .publish(self.message_id.as_str(), "", queue, true, &self.body, properties)
            .await;
        match published {
            Ok(()) => self.acks.ack_forwarded(self.tag, acker, self.limit()).await,
            Err(e) => {
                if matches!(e, TransportError::Rejected { .. }) {
                    self.shared.forget_declared(queue);
                }
                self.hold_then_requeue(acker).await;
                Err(e)
            }
        }
    }
}

#[async_trait]
impl Settle for AmqpSettle {
    async fn settle(mut self: Box<Self>, settlement: Settlement) -> Result<(), TransportError> {
        let limit = self.limit();
        // The acker stays in `self` until the delivery is acked or given back:
        // if this future is dropped half-way, `drop` gives it back (a second
        // ack or nack of one acker sends nothing).
        let settled = match settlement {
            Settlement::Ack => {
                let Some(acker) = self.acker.take() else {
                    return Ok(());
                };
                return self.acks.ack(self.tag, acker, limit).await;
            }
            Settlement::Retry { delay } => match &self.acker {
                Some(acker) => self.retry(acker, delay).await,
                None => return Ok(()),
            },
            Settlement::DeadLetter { reason } => match &self.acker {
                Some(acker) => self.dead_letter(acker, &reason).await,
                None => return Ok(()),
            },
        };
        // Acked or given back by now (the window closed its tag once the
        // frame was sent).
        self.acker = None;
        settled
    }
}

impl Drop for AmqpSettle {
    fn drop(&mut self) {
        // Dropped unsettled (the handler panicked or was cancelled, or its
        // settling was): give it back now rather than when the channel
        // closes. Without a runtime it stays open in the ack window, and
        // later acks of the channel go alone: slower, still right.
        if let Some(acker) = self.acker.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let channel = self.channel.clone();
            let (acks, tag) = (Arc::clone(&self.acks), self.tag);
            let limit = self.limit();
            runtime.spawn(async move {
                // If an ack or nack of it was under way when it was dropped,
                // this sends nothing and the tag stays open.
                acks.give_back(tag, &acker, limit).await;
                drop(channel);
            });
        }
    }
}
