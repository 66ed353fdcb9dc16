//! [`AmqpTransport`]: saga-core's `Publisher` and `Subscriber` over RabbitMQ.

use std::sync::Arc;

use async_trait::async_trait;
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use saga_core::{Message, Publisher, Subscriber, Subscription, TransportError};

use crate::acks::AcksSent;
use crate::config::{AmqpConfig, RoutingKey};
use crate::error::{AmqpError, short, unavailable};
use crate::link::{Link, Purpose, Wait};
use crate::mapping;
use crate::subscription::{AmqpSubscription, Shared, consume};
use crate::topology;
use crate::trace;

/// A RabbitMQ [`Transport`](saga_core::Transport).
///
/// - **Publishing**: persistent, `mandatory`, with publisher confirms;
///   [`publish`](Publisher::publish) returns once the broker confirmed. A
///   negative confirm or an unroutable message is
///   [`TransportError::Rejected`]; an exchange that does not exist is
///   [`TransportError::UnknownAddress`]. Concurrent publishes pipeline their
///   confirms over a few channels.
/// - **Consuming**: manual acks, `prefetch` unacked deliveries per
///   subscription. Retries go through `<queue>.retry.<ms>` delay queues and
///   come back counting one more retry; dead letters go to `<queue>.dlq` with
///   the reason in [`saga_core::DEAD_LETTER_REASON`] and the exchange and
///   routing key it was first published with; a delivery dropped unsettled
///   is requeued. Acks settled together share one frame when no earlier
///   delivery of their channel is open ([`acks_sent`](Self::acks_sent)).
/// - **Dead letters**: browsed and replayed to where they were first
///   published through [`DeadLetterQueue`](saga_core::DeadLetterQueue).
/// - **Connections**: two, one publishing and one consuming. Under a
///   resource alarm the broker stops reading from connections that publish,
///   and consumers must go on acking for the queues (and the alarm) to drain.
///   The consuming one opens in [`connect`](Self::connect); the publishing
///   one on first use, so a transport that only consumes holds one.
/// - **Reconnects**: a dropped connection is re-opened with backoff and the
///   topology declared again; subscriptions report the error once and go on.
///
/// Cheap to clone; clones share the connections.
#[derive(Clone)]
pub struct AmqpTransport {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AmqpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpTransport")
            .field("url", &self.shared.config.redacted_url())
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

/// The longest `operation_timeout` (and reconnect wait): a day, far past
/// any broker operation, and safe to add to any instant.
const LONGEST_OPERATION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(86_400);

impl AmqpTransport {
    /// Connects to `config.url` and declares `config.topology` (on the
    /// consuming connection; the publishing one opens on first use).
    pub async fn connect(config: AmqpConfig) -> Result<Self, AmqpError> {
        if config.publisher_channels == 0 || config.mandatory_channels == 0 || config.max_confirms_in_flight == 0 {
            return Err(AmqpError::InvalidConfig(
                "publisher_channels, mandatory_channels and max_confirms_in_flight must be at least 1".to_owned(),
            ));
        }
        // 0 is AMQP's "no limit": the broker would push a whole backlog into
        // the client's memory.
        if config.prefetch == 0 {
            return Err(AmqpError::InvalidConfig("prefetch must be at least 1".to_owned()));
        }
        if config.operation_timeout.is_zero() || config.operation_timeout > LONGEST_OPERATION_TIMEOUT {
            return Err(AmqpError::InvalidConfig(format!(
                "operation_timeout must be more than zero and at most {LONGEST_OPERATION_TIMEOUT:?}"
            )));
        }
        // No wait would retry a refused connection back to back; a wait
        // past a day could overflow the instant it is added to.
        let reconnect = &config.reconnect;
        let waits = [
            reconnect.initial_backoff,
            reconnect.max_backoff,
            reconnect.connect_timeout,
        ];
        if waits
            .iter()
            .any(|wait| wait.is_zero() || *wait > LONGEST_OPERATION_TIMEOUT)
        {
            return Err(AmqpError::InvalidConfig(format!(
                "reconnect's initial_backoff, max_backoff and connect_timeout must be more than zero and at most \
                 {LONGEST_OPERATION_TIMEOUT:?}"
            )));
        }
        let config = Arc::new(config);
        // The consuming connection at once, so a bad URL, credentials or
        // topology show here; the publishing one on the first publish.
        let consuming = Arc::new(Link::start(Arc::clone(&config), Purpose::Consuming).await?);
        let publishing = Arc::new(Link::deferred(Arc::clone(&config), Purpose::Publishing));
        tracing::info!(url = %config.redacted_url(), "connected to the broker");
        Ok(Self {
            shared: Arc::new(Shared::new(config, consuming, publishing)),
        })
    }

    pub(crate) fn shared(&self) -> &Shared {
        &self.shared
    }

    /// The consumer acks sent so far. Deliveries settled together share a
    /// `basic.ack` frame (`multiple`) when no earlier delivery of their
    /// channel is still being handled, so `deliveries / frames` says how well
    /// acks coalesce. A delivery retried or dead-lettered is acked with a
    /// frame of its own once republished, and counted too.
    pub fn acks_sent(&self) -> AcksSent {
        self.shared.acks_sent.get()
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &AmqpConfig {
        &self.shared.config
    }

    /// Whether both connections are up right now (they reconnect on
    /// demand); the publishing one counts as up until it is first needed.
    pub fn is_connected(&self) -> bool {
        self.shared.publishing.link().is_connected() && self.shared.consuming.is_connected()
    }

    /// Graceful shutdown: subscriptions end (their `next` returns `None`),
    /// publishing fails with [`TransportError::Closed`], and the connections
    /// close. Unacked deliveries go back to their queues.
    pub async fn close(&self) {
        self.shared.publishing.close();
        tokio::join!(self.shared.consuming.close(), self.shared.publishing.link().close());
    }

    /// Deletes the configured exchanges and queues, their `.dlq` and every
    /// delay queue this transport declared. For tests and tools.
    pub async fn delete_topology(&self) -> Result<(), TransportError> {
        let link = self.shared.publishing.link();
        let channel = link.channel(Wait::No).await?;
        let topology = &self.shared.config.topology;
        let mut queues: Vec<String> = Vec::new();
        for queue in &topology.queues {
            queues.push(queue.name.clone());
            queues.push(topology::dlq(&queue.name));
        }
        queues.extend(
            self.shared
                .all_retry_queues
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .cloned(),
        );
        for queue in queues {
            let name = short(&queue, "queue name").map_err(|_| TransportError::UnknownAddress(queue.clone()))?;
            link.within_unless_blocked(
                "deleting a queue",
                channel.queue_delete(name, QueueDeleteOptions::default()),
            )
            .await?
            .map_err(unavailable)?;
        }
        for exchange in &topology.exchanges {
            let name = short(&exchange.name, "exchange name")
                .map_err(|_| TransportError::UnknownAddress(exchange.name.clone()))?;
            link.within_unless_blocked(
                "deleting an exchange",
                channel.exchange_delete(name, ExchangeDeleteOptions::default()),
            )
            .await?
            .map_err(unavailable)?;
        }
        Ok(())
    }

    /// Whether an unroutable message to `destination` is an error.
    fn require_route(&self, destination: &str) -> bool {
        self.shared
            .config
            .topology
            .exchange_config(destination)
            .is_none_or(|e| e.require_route)
    }

    fn routing_key<'a>(&'a self, message: &'a Message) -> &'a str {
        match self
            .shared
            .config
            .topology
            .exchange_config(&message.destination)
            .map(|e| &e.routing_key)
        {
            Some(RoutingKey::Kind) => &message.kind,
            Some(RoutingKey::Fixed(key)) => key,
            Some(RoutingKey::Empty) | None => "",
        }
    }
}

#[async_trait]
impl Publisher for AmqpTransport {
    async fn publish(&self, message: &Message) -> Result<(), TransportError> {
        let publishing = &self.shared.publishing;
        publishing.check_exchange(&message.destination).await?;
        let properties =
            mapping::properties(message, &trace::headers_for(message)).map_err(|reason| TransportError::Rejected {
                id: message.id.to_string(),
                reason,
            })?;
        publishing
            .publish(
                message.id.as_str(),
                &message.destination,
                self.routing_key(message),
                self.require_route(&message.destination),
                &message.payload,
                properties,
            )
            .await
    }

    /// The publishing connection is blocked by a broker resource alarm.
    fn is_held_back(&self) -> bool {
        self.shared.publishing.link().is_blocked()
    }
}

#[async_trait]
impl Subscriber for AmqpTransport {
    async fn subscribe(&self, queue: &str) -> Result<Box<dyn Subscription>, TransportError> {
        let current = consume(&self.shared, queue, Wait::No).await?;
        Ok(Box::new(AmqpSubscription {
            shared: Arc::clone(&self.shared),
            queue: Arc::from(queue),
            current: Some(current),
        }))
    }
}
