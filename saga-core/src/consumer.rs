//! The consuming loop: deliveries in, handler, settlement out. Whether a
//! failure is retried or dead-lettered is decided here, once, for every
//! transport.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::error::{EngineError, RetryPolicy};
use crate::message::Message;
use crate::telemetry;
use crate::transport::{Delivery, Settlement, Subscriber};

/// Something that handles a delivered message: the [`Engine`](crate::Engine)
/// or a [`Participant`](crate::Participant).
#[async_trait]
pub trait MessageHandler: Send + Sync + 'static {
    /// Handles `message`. Must be idempotent per message id (the inbox makes
    /// the engine and participants so): a message can be delivered again.
    async fn handle(&self, message: &Message) -> Result<(), EngineError>;
}

/// How a consumer runs.
#[derive(Clone, Debug)]
pub struct ConsumerConfig {
    /// The queue to consume.
    pub queue: String,
    /// Deliveries handled at once. Where handlers' commits are grouped
    /// (saga-postgres group commit, a participant's `CommandBatching`), the
    /// deliveries in flight together are what can share a commit, so a
    /// service near its machine's limit gains from more than the default.
    pub concurrency: usize,
    /// Redelivery of messages whose handling failed retryably; past
    /// `max_attempts` they are dead-lettered.
    pub retry: RetryPolicy,
    /// The type given to messages that arrive without one (publishers that
    /// set no AMQP `type`), for a queue that carries a single type.
    pub default_kind: Option<String>,
    /// How long [`Consumer::run`] lets the handlers in flight finish once
    /// shut down. Those still running then are cancelled, and their
    /// deliveries go back to the queue: a handler stuck on an outage (or on
    /// a broker that holds its publishes back) must not hold up shutdown.
    pub shutdown_grace: Duration,
}

impl ConsumerConfig {
    /// Defaults for `queue`: 16 at once, 8 attempts from 100 ms doubling up
    /// to 30 s, 30 s to finish at shutdown.
    pub fn new(queue: impl Into<String>) -> Self {
        Self {
            queue: queue.into(),
            concurrency: 16,
            retry: RetryPolicy {
                max_attempts: 8,
                initial_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(30),
                multiplier: 2,
            },
            default_kind: None,
            shutdown_grace: Duration::from_secs(30),
        }
    }

    /// Takes untyped messages on this queue for `kind`.
    pub fn with_default_kind(mut self, kind: impl Into<String>) -> Self {
        self.default_kind = Some(kind.into());
        self
    }
}

/// The longest dead-letter reason, in bytes. It travels as a header, and an
/// error can quote what a message carried (an unknown key of any length);
/// a transport's headers must fit in one frame.
pub const MAX_DEAD_LETTER_REASON_BYTES: usize = 1024;

/// `text` cut to at most `max_bytes` at a character boundary, ending in `…`
/// when cut (`max_bytes` of at least 3 bytes, the ellipsis's length).
pub fn shortened(mut text: String, max_bytes: usize) -> String {
    const CUT: &str = "…";
    if text.len() > max_bytes {
        let mut end = max_bytes.saturating_sub(CUT.len());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str(CUT);
    }
    text
}

/// What to do with a delivery after its handler returned `result`.
///
/// Success → ack. A retryable error with attempts left → retry after backoff.
/// Anything else (undecodable, unknown saga, out of attempts) → dead-letter
/// with the error as the reason (at most [`MAX_DEAD_LETTER_REASON_BYTES`]).
/// Nothing is dropped.
pub fn settlement_for(result: &Result<(), EngineError>, retries: u32, policy: &RetryPolicy) -> Settlement {
    match result {
        Ok(()) => Settlement::Ack,
        Err(error) => {
            let attempts_made = retries.saturating_add(1);
            if error.is_retryable() && policy.allows_another(attempts_made) {
                Settlement::Retry {
                    delay: policy.backoff(attempts_made),
                }
            } else if error.is_retryable() {
                Settlement::DeadLetter {
                    reason: shortened(
                        format!("gave up after {attempts_made} attempts: {error}"),
                        MAX_DEAD_LETTER_REASON_BYTES,
                    ),
                }
            } else {
                Settlement::DeadLetter {
                    reason: shortened(error.to_string(), MAX_DEAD_LETTER_REASON_BYTES),
                }
            }
        }
    }
}

/// Consumes a queue into a [`MessageHandler`] until shut down.
pub struct Consumer {
    handler: Arc<dyn MessageHandler>,
    subscriber: Arc<dyn Subscriber>,
    config: ConsumerConfig,
}

impl Consumer {
    /// A consumer of `config.queue`.
    pub fn new(handler: Arc<dyn MessageHandler>, subscriber: Arc<dyn Subscriber>, config: ConsumerConfig) -> Self {
        Self {
            handler,
            subscriber,
            config,
        }
    }

    /// Handles one delivery and settles it. A handler that panics counts
    /// as a retryable failure ([`EngineError::Panicked`]), so the delivery is
    /// settled like any other, never left to be redelivered forever.
    pub async fn process(handler: &dyn MessageHandler, delivery: Delivery, config: &ConsumerConfig) {
        let Delivery {
            mut message,
            retries,
            settle,
        } = delivery;
        if message.kind.is_empty()
            && let Some(kind) = &config.default_kind
        {
            message.kind.clone_from(kind);
        }
        let policy = &config.retry;
        let result = EngineError::unless_panicked(handler.handle(&message)).await;
        let settlement = settlement_for(&result, retries, policy);
        let outcome = match &settlement {
            Settlement::Ack => "ack",
            Settlement::Retry { .. } => "retry",
            Settlement::DeadLetter { .. } => "dead_letter",
        };
        match &settlement {
            Settlement::Ack => {}
            Settlement::Retry { delay } => {
                tracing::warn!(message_id = %message.id, kind = %message.kind, ?delay, error = ?result.err(), "handling failed; will retry");
            }
            Settlement::DeadLetter { reason } => {
                tracing::error!(message_id = %message.id, kind = %message.kind, reason, "message dead-lettered");
            }
        }
        // Counted once settled: a dead letter the broker would not take is
        // not in a dead-letter queue, and the message comes round again.
        let outcome = match settle.settle(settlement).await {
            Ok(()) => outcome,
            Err(e) => {
                // The broker will redeliver an unsettled message; the inbox makes that harmless.
                tracing::warn!(message_id = %message.id, error = %e, "settling a delivery failed");
                "settle_failed"
            }
        };
        metrics::counter!(telemetry::MESSAGES_TOTAL, "outcome" => outcome).increment(1);
    }

    /// Runs until `shutdown` is cancelled, then finishes the deliveries in
    /// flight, cancelling those still running after
    /// [`ConsumerConfig::shutdown_grace`].
    pub async fn run(self, shutdown: CancellationToken) {
        let queue = self.config.queue.clone();
        let span = tracing::info_span!("saga.consumer", queue = %queue);
        async move {
            let mut backoff = Duration::from_millis(100);
            let mut subscription = loop {
                match self.subscriber.subscribe(&queue).await {
                    Ok(subscription) => break subscription,
                    Err(e) => {
                        tracing::warn!(error = %e, "subscribing failed; retrying");
                        tokio::select! {
                            () = shutdown.cancelled() => return,
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            };
            let permits = Arc::new(Semaphore::new(self.config.concurrency.max(1)));
            let config = Arc::new(self.config);
            let mut in_flight = JoinSet::new();
            loop {
                while in_flight.try_join_next().is_some() {}
                // Shutdown is watched here too: with every handler stuck, no
                // permit comes back until the grace below cancels them.
                let permit = tokio::select! {
                    () = shutdown.cancelled() => break,
                    permit = Arc::clone(&permits).acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => break,
                    },
                };
                let next = tokio::select! {
                    () = shutdown.cancelled() => break,
                    next = subscription.next() => next,
                };
                match next {
                    None => break,
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "receiving failed; the transport reconnects");
                        tokio::select! {
                            () = shutdown.cancelled() => break,
                            () = tokio::time::sleep(Duration::from_millis(200)) => {}
                        }
                    }
                    Some(Ok(delivery)) => {
                        let handler = Arc::clone(&self.handler);
                        let config = Arc::clone(&config);
                        in_flight.spawn(async move {
                            Consumer::process(handler.as_ref(), delivery, &config).await;
                            drop(permit);
                        });
                    }
                }
            }
            // Stop deliveries first (the broker then sends no more), then let
            // the handlers in flight finish and settle.
            drop(subscription);
            let drained = async { while in_flight.join_next().await.is_some() {} };
            if tokio::time::timeout(config.shutdown_grace, drained).await.is_err() {
                tracing::warn!(
                    handlers = in_flight.len(),
                    grace = ?config.shutdown_grace,
                    "handlers still running after the shutdown grace; cancelled, their deliveries go back to the queue"
                );
                in_flight.shutdown().await;
            }
        }
        .instrument(span)
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreError;

    #[test]
    fn settlements_follow_the_error_kind_and_attempts() {
        let policy = RetryPolicy::attempts(3);
        assert_eq!(settlement_for(&Ok(()), 0, &policy), Settlement::Ack);
        let unavailable = || Err(EngineError::Store(StoreError::Unavailable("down".into())));
        assert!(matches!(
            settlement_for(&unavailable(), 0, &policy),
            Settlement::Retry { .. }
        ));
        assert!(matches!(
            settlement_for(&unavailable(), 1, &policy),
            Settlement::Retry { .. }
        ));
        assert!(
            matches!(settlement_for(&unavailable(), 2, &policy), Settlement::DeadLetter { reason } if reason.contains("gave up after 3"))
        );
        let unknown = Err(EngineError::UnhandledKind { kind: "X".into() });
        assert!(
            matches!(settlement_for(&unknown, 0, &policy), Settlement::DeadLetter { reason } if reason.contains("`X`"))
        );
    }

    #[test]
    fn a_dead_letter_reason_quoting_a_huge_value_is_cut() {
        // Multi-byte characters, so a cut by bytes alone would split one.
        let unknown = Err(EngineError::UnhandledKind {
            kind: "é".repeat(40_000),
        });
        let Settlement::DeadLetter { reason } = settlement_for(&unknown, 0, &RetryPolicy::attempts(3)) else {
            panic!("dead-lettered");
        };
        assert!(reason.len() <= MAX_DEAD_LETTER_REASON_BYTES, "{} bytes", reason.len());
        assert!(reason.contains("éé") && reason.ends_with('…'), "{reason}");
        assert_eq!(shortened("short".to_owned(), 10), "short", "short ones stay");
        assert_eq!(shortened("abcdef".to_owned(), 4), "a…");
    }
}
