//! Moving messages between services: publish with confirmation, consume with
//! ack / retry / dead-letter.
//!
//! The transport executes settlements; whether a failure is retried or
//! dead-lettered is decided once, in [`Consumer`](crate::Consumer).

use std::time::Duration;

use async_trait::async_trait;

use crate::error::BoxError;
use crate::message::Message;

/// The header a dead-lettered message carries the reason in.
pub const DEAD_LETTER_REASON: &str = "x-dead-letter-reason";

/// What a transport could not do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The broker is unreachable or the connection dropped: retry with backoff
    /// (backends reconnect on their own).
    #[error("transport unavailable: {0}")]
    Unavailable(#[source] BoxError),
    /// The broker refused the message (negative confirm, or unroutable). Retry
    /// later; check the topology if it persists.
    #[error("message {id} was not accepted: {reason}")]
    Rejected {
        /// The message id.
        id: String,
        /// Why.
        reason: String,
    },
    /// The destination or source does not exist in the configured topology:
    /// fix the configuration.
    #[error("unknown destination or queue `{0}`")]
    UnknownAddress(String),
    /// The subscription or transport has been closed.
    #[error("transport closed")]
    Closed,
}

impl TransportError {
    /// Whether the same operation may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::Rejected { .. })
    }
}

/// Publishing.
#[async_trait]
pub trait Publisher: Send + Sync {
    /// Publishes `message` to `message.destination` and returns once the broker
    /// has taken responsibility for it (durably, where the broker persists).
    /// Concurrent calls may be in flight at once.
    async fn publish(&self, message: &Message) -> Result<(), TransportError>;

    /// Whether the broker holds publishing back right now (RabbitMQ blocks
    /// a connection under a memory or disk alarm): a publish would wait for
    /// it, not fail. A [`Relay`](crate::Relay) claims nothing meanwhile, so
    /// that no claim's lease runs out under publishes that still go out
    /// later, with a second copy of each on top. Backends without such flow
    /// control keep the default: never.
    fn is_held_back(&self) -> bool {
        false
    }
}

/// Consuming.
#[async_trait]
pub trait Subscriber: Send + Sync {
    /// Starts consuming `queue`. Several subscriptions to one queue compete
    /// for its messages.
    async fn subscribe(&self, queue: &str) -> Result<Box<dyn Subscription>, TransportError>;
}

/// Both halves; every backend gets it by implementing them.
pub trait Transport: Publisher + Subscriber {}

impl<T: Publisher + Subscriber> Transport for T {}

/// A stream of deliveries from one queue.
#[async_trait]
pub trait Subscription: Send {
    /// The next delivery; `None` once the subscription is closed. Errors are
    /// passing (the backend reconnects): call again.
    async fn next(&mut self) -> Option<Result<Delivery, TransportError>>;
}

/// What to do with a delivered message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Settlement {
    /// Done with it: remove it from the queue.
    Ack,
    /// Deliver it again after `delay` (counting one more attempt).
    Retry {
        /// How long to wait first.
        delay: Duration,
    },
    /// Move it to the queue's dead-letter queue (`<queue>.dlq`) with `reason`.
    DeadLetter {
        /// Why, recorded with the message.
        reason: String,
    },
}

/// Settles one delivery with the broker.
#[async_trait]
pub trait Settle: Send {
    /// Applies the settlement. Each delivery is settled once.
    async fn settle(self: Box<Self>, settlement: Settlement) -> Result<(), TransportError>;
}

/// One delivered message.
pub struct Delivery {
    /// The message. A body the consumer cannot decode is still delivered here:
    /// decoding is the consumer's job (and a failure dead-letters it).
    pub message: Message,
    /// How many times it has been delivered with a retry settlement before (0 first).
    pub retries: u32,
    /// Settles it.
    pub settle: Box<dyn Settle>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("message", &self.message)
            .field("retries", &self.retries)
            .finish_non_exhaustive()
    }
}
