//! Configuration: where the broker is, how to talk to it, and the topology to
//! declare. Every exchange and queue name comes from here.

use std::fmt;
use std::time::Duration;

use lapin::types::FieldTable;

/// How an [`AmqpTransport`](crate::AmqpTransport) connects and behaves.
/// Its `Debug` output shows the URL with its password masked.
#[derive(Clone)]
pub struct AmqpConfig {
    /// `amqp://` or `amqps://` URL, with credentials and an escaped vhost
    /// (`%2f` for `/`). Never logged as is: see [`AmqpConfig::redacted_url`].
    pub url: String,
    /// The connections' name shown by the broker (`rabbitmqctl list_connections`),
    /// followed by ` (publishing)` or ` (consuming)`.
    pub connection_name: String,
    /// Unacknowledged deliveries each subscription may hold (`basic.qos`),
    /// at least 1.
    pub prefetch: u16,
    /// Channels publishes the broker may drop are spread over (to exchanges
    /// that allow unrouted messages). Each carries many confirms at once.
    pub publisher_channels: usize,
    /// Channels for `mandatory` publishes (to exchanges that require a
    /// route, retries and dead letters on their way to a queue, replays),
    /// opened as needed: each carries one publish at a time, so a message
    /// the broker returns is refused and only it (a return names no
    /// publish, and lapin hands it to whichever confirm of the channel comes
    /// next). More such publishes at once wait for one.
    pub mandatory_channels: usize,
    /// Publishes waiting for their broker confirm at once, over all channels;
    /// further publishes wait for a slot.
    pub max_confirms_in_flight: usize,
    /// The queue type of configured queues that do not name one.
    pub queue_type: QueueType,
    /// A largest frame to propose to the broker, in bytes; `None` (the
    /// default) takes the broker's (RabbitMQ: 128 KiB). A `frame_max` in the
    /// URL's query wins. lapin keeps 32 frames of buffer each way per
    /// connection, so this sets the transport's memory: 8 MiB a connection
    /// at 128 KiB, 2 MiB at 32 KiB. Bodies of any size go in more frames,
    /// but a message's properties and headers must fit in one: lower it only
    /// when every publisher to the consumed queues keeps its headers below
    /// it, or a delivery with larger ones closes the connection each time
    /// it comes.
    pub frame_max: Option<u32>,
    /// Backoff between reconnection attempts.
    pub reconnect: ReconnectConfig,
    /// How long one broker operation (opening a channel, a declaration, a
    /// publish until its confirm, an ack) may take before it fails as
    /// `Unavailable`: a guard against a connection that dies mid-operation.
    /// It does not run while the broker blocks the connection under a memory
    /// or disk alarm: what waits then is sent when the alarm clears, so
    /// failing it would have it sent twice. More than zero, at most a day.
    pub operation_timeout: Duration,
    /// Exchanges, queues and bindings declared at start-up and after every reconnect.
    pub topology: Topology,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned(),
            connection_name: "saga-amqp".to_owned(),
            prefetch: 64,
            publisher_channels: 4,
            mandatory_channels: 64,
            max_confirms_in_flight: 4096,
            queue_type: QueueType::Classic,
            frame_max: None,
            reconnect: ReconnectConfig::default(),
            operation_timeout: Duration::from_secs(30),
            topology: Topology::default(),
        }
    }
}

impl fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Every field, so a new one is not forgotten here silently.
        let Self {
            url: _,
            connection_name,
            prefetch,
            publisher_channels,
            mandatory_channels,
            max_confirms_in_flight,
            queue_type,
            frame_max,
            reconnect,
            operation_timeout,
            topology,
        } = self;
        f.debug_struct("AmqpConfig")
            .field("url", &self.redacted_url())
            .field("connection_name", connection_name)
            .field("prefetch", prefetch)
            .field("publisher_channels", publisher_channels)
            .field("mandatory_channels", mandatory_channels)
            .field("max_confirms_in_flight", max_confirms_in_flight)
            .field("queue_type", queue_type)
            .field("frame_max", frame_max)
            .field("reconnect", reconnect)
            .field("operation_timeout", operation_timeout)
            .field("topology", topology)
            .finish()
    }
}

impl AmqpConfig {
    /// Defaults with `url` and `topology`.
    pub fn new(url: impl Into<String>, topology: Topology) -> Self {
        Self {
            url: url.into(),
            topology,
            ..Self::default()
        }
    }

    /// The URL with its password masked, for logs and errors.
    pub fn redacted_url(&self) -> RedactedUrl<'_> {
        RedactedUrl(&self.url)
    }
}

/// A URL displayed with its password replaced by `***`.
#[derive(Clone, Copy)]
pub struct RedactedUrl<'a>(pub &'a str);

impl fmt::Display for RedactedUrl<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let url = self.0;
        let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
            // Not a URL we understand: show nothing that could be a secret.
            return f.write_str("<url>");
        };
        let rest = &url[scheme_end..];
        // Up to the last `@` anywhere, not just in the authority: a password
        // with an unescaped `/`, `?` or `#` must not end the part masked.
        // A vhost with an `@` is masked too, which is the safe mistake.
        match rest.rfind('@') {
            Some(at) => {
                let user_info = &rest[..at];
                let user = user_info.split(':').next().unwrap_or_default();
                let masked = if user_info.contains(':') { ":***" } else { "" };
                write!(f, "{}{user}{masked}{}", &url[..scheme_end], &url[scheme_end + at..])
            }
            None => f.write_str(url),
        }
    }
}

impl fmt::Debug for RedactedUrl<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Backoff between reconnection attempts: exponential, capped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReconnectConfig {
    /// Wait after the first failed attempt.
    pub initial_backoff: Duration,
    /// Longest wait between attempts.
    pub max_backoff: Duration,
    /// How long one attempt (TCP, TLS, handshake, topology) may take.
    pub connect_timeout: Duration,
}

impl Default for ReconnectConfig {
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

impl ReconnectConfig {
    /// The wait after `failures` consecutive failed attempts (1-based).
    pub fn backoff(&self, failures: u32) -> Duration {
        let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(20));
        self.initial_backoff.saturating_mul(factor).min(self.max_backoff)
    }
}

/// The type of a queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum QueueType {
    /// A classic queue, declared without arguments, so queues the platform
    /// already has keep theirs.
    #[default]
    Classic,
    /// A quorum queue (replicated; what RabbitMQ recommends for clusters).
    /// Declared with `x-queue-type: quorum` and a dead-letter route to
    /// `<queue>.dlq`, so what the broker itself dead-letters is kept too.
    Quorum,
}

/// The type of an exchange.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ExchangeKind {
    /// Every bound queue gets a copy; routing keys are ignored.
    #[default]
    Fanout,
    /// Routed to queues bound with exactly the routing key.
    Direct,
    /// Routed by pattern (`order.*`, `#`).
    Topic,
}

/// The routing key a message published to an exchange carries.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum RoutingKey {
    /// The empty routing key (what fanout exchanges ignore anyway).
    #[default]
    Empty,
    /// The message type (`Message::kind`), e.g. `OrderCreated`.
    Kind,
    /// This fixed key.
    Fixed(String),
}

/// An exchange to declare.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExchangeConfig {
    /// Its name: the `destination` messages are published to.
    pub name: String,
    /// Its type.
    pub kind: ExchangeKind,
    /// Whether it survives a broker restart.
    pub durable: bool,
    /// The routing key of messages published to it.
    pub routing_key: RoutingKey,
    /// Whether a message no queue is bound for is an error (the default:
    /// published `mandatory`, a returned message is `Rejected` and the relay
    /// retries it). Set it to `false` for event exchanges whose consumers may
    /// not exist yet — the broker then drops such a message, as a plain
    /// fanout publish would.
    pub require_route: bool,
}

impl ExchangeConfig {
    /// A durable exchange. Messages to a fanout exchange carry the empty
    /// routing key, to a direct or topic exchange their type.
    pub fn new(name: impl Into<String>, kind: ExchangeKind) -> Self {
        let routing_key = match kind {
            ExchangeKind::Fanout => RoutingKey::Empty,
            ExchangeKind::Direct | ExchangeKind::Topic => RoutingKey::Kind,
        };
        Self {
            name: name.into(),
            kind,
            durable: true,
            routing_key,
            require_route: true,
        }
    }

    /// Lets the broker drop messages no queue is bound for (see [`require_route`](Self::require_route)).
    pub fn allow_unrouted(mut self) -> Self {
        self.require_route = false;
        self
    }
}

/// A queue to declare, with its `<queue>.dlq` and delay queues.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueConfig {
    /// Its name.
    pub name: String,
    /// Whether it survives a broker restart (quorum queues always do).
    pub durable: bool,
    /// Its type; `None` takes [`AmqpConfig::queue_type`].
    pub queue_type: Option<QueueType>,
    /// Extra declaration arguments, e.g. to match those of a queue the
    /// platform already declared (the broker refuses a declaration whose
    /// arguments differ).
    pub arguments: FieldTable,
}

impl QueueConfig {
    /// A durable queue of the configured default type.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            durable: true,
            queue_type: None,
            arguments: FieldTable::default(),
        }
    }

    /// The same queue with type `queue_type`.
    pub fn with_type(mut self, queue_type: QueueType) -> Self {
        self.queue_type = Some(queue_type);
        self
    }
}

/// A binding from an exchange to a queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindingConfig {
    /// The exchange.
    pub exchange: String,
    /// The queue.
    pub queue: String,
    /// The binding key (ignored by fanout exchanges; a pattern for topic ones).
    pub routing_key: String,
}

/// What to declare: exchanges, queues (each with `<queue>.dlq`) and bindings.
///
/// Declaration is idempotent; it runs at start-up and after every reconnect.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Topology {
    /// Exchanges.
    pub exchanges: Vec<ExchangeConfig>,
    /// Queues.
    pub queues: Vec<QueueConfig>,
    /// Bindings.
    pub bindings: Vec<BindingConfig>,
}

impl Topology {
    /// Nothing declared.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a durable exchange (see [`ExchangeConfig::new`] for its routing key).
    pub fn exchange(mut self, name: impl Into<String>, kind: ExchangeKind) -> Self {
        self.exchanges.push(ExchangeConfig::new(name, kind));
        self
    }

    /// Adds an exchange as configured.
    pub fn with_exchange(mut self, exchange: ExchangeConfig) -> Self {
        self.exchanges.push(exchange);
        self
    }

    /// Adds a durable queue of the default type.
    pub fn queue(mut self, name: impl Into<String>) -> Self {
        self.queues.push(QueueConfig::new(name));
        self
    }

    /// Adds a queue as configured.
    pub fn with_queue(mut self, queue: QueueConfig) -> Self {
        self.queues.push(queue);
        self
    }

    /// Binds `queue` to `exchange` with `routing_key`.
    pub fn bind(
        mut self,
        exchange: impl Into<String>,
        queue: impl Into<String>,
        routing_key: impl Into<String>,
    ) -> Self {
        self.bindings.push(BindingConfig {
            exchange: exchange.into(),
            queue: queue.into(),
            routing_key: routing_key.into(),
        });
        self
    }

    pub(crate) fn exchange_config(&self, name: &str) -> Option<&ExchangeConfig> {
        self.exchanges.iter().find(|e| e.name == name)
    }

    pub(crate) fn queue_config(&self, name: &str) -> Option<&QueueConfig> {
        self.queues.iter().find(|q| q.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_s_debug_output_masks_the_password() {
        let config = AmqpConfig::new("amqp://orders:hunter2@mq:5672/%2f", Topology::default());
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("amqp://orders:***@mq:5672/%2f"), "{shown}");
    }

    #[test]
    fn passwords_never_show() {
        let shown = |url: &str| RedactedUrl(url).to_string();
        assert_eq!(
            shown("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(
            shown("amqps://user:p%40ss@host/vhost?heartbeat=10"),
            "amqps://user:***@host/vhost?heartbeat=10"
        );
        assert_eq!(shown("amqp://user@host"), "amqp://user@host");
        assert_eq!(shown("amqp://host:5672"), "amqp://host:5672");
        assert_eq!(shown("not a url with secret"), "<url>");
        // Unescaped characters that would end the authority early.
        for password in ["ab/cd", "ab?cd", "ab#cd", "a@b/c"] {
            let url = format!("amqp://app:{password}@rabbit:5672/%2f");
            let masked = shown(&url);
            assert!(
                !masked.contains("cd") && !masked.contains("b/c"),
                "{password}: {masked}"
            );
            assert_eq!(masked, "amqp://app:***@rabbit:5672/%2f");
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let config = ReconnectConfig {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
        };
        assert_eq!(config.backoff(1), Duration::from_millis(100));
        assert_eq!(config.backoff(2), Duration::from_millis(200));
        assert_eq!(config.backoff(5), Duration::from_secs(1));
        assert_eq!(config.backoff(u32::MAX), Duration::from_secs(1));
    }
}
