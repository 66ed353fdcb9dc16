//! Declaring the configured topology, and the names and arguments of the
//! queues derived from each consumed queue: `<queue>.dlq` for dead letters and
//! `<queue>.retry.<ms>` delay queues whose messages expire back into
//! `<queue>`.

use std::time::Duration;

use lapin::Channel;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use crate::config::{AmqpConfig, ExchangeKind, QueueConfig, QueueType};
use crate::error::{AmqpError, short};

/// Suffix of a queue's dead-letter queue.
pub(crate) const DLQ_SUFFIX: &str = ".dlq";

/// The longest delay a retry waits (about 18 hours); longer ones are capped.
const MAX_DELAY_MS: u64 = 1 << 26;

/// The dead-letter queue of `queue`.
pub(crate) fn dlq(queue: &str) -> String {
    format!("{queue}{DLQ_SUFFIX}")
}

/// The delay queue for retrying a message of `queue` after `delay`, and its
/// TTL in milliseconds. Delays are rounded up to a power of two milliseconds,
/// so a queue has few delay queues, each with one TTL (messages expire in
/// order: no head-of-line blocking by a longer delay).
pub(crate) fn retry_queue(queue: &str, delay: Duration) -> (String, u64) {
    let millis = u64::try_from(delay.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(1, MAX_DELAY_MS);
    let ttl = millis.next_power_of_two();
    (format!("{queue}.retry.{ttl}"), ttl)
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.as_bytes()))
}

fn dead_letter_to(arguments: &mut FieldTable, queue: &str) {
    // The default exchange routes by queue name.
    arguments.insert(ShortString::from("x-dead-letter-exchange"), text(""));
    arguments.insert(ShortString::from("x-dead-letter-routing-key"), text(queue));
}

fn quorum(arguments: &mut FieldTable) {
    arguments.insert(ShortString::from("x-queue-type"), text("quorum"));
}

/// The type of `queue`, which may be a configured queue or one derived from it.
pub(crate) fn queue_type(config: &AmqpConfig, queue: &str) -> QueueType {
    let base = queue.strip_suffix(DLQ_SUFFIX).unwrap_or(queue);
    config
        .topology
        .queue_config(base)
        .and_then(|q| q.queue_type)
        .unwrap_or(config.queue_type)
}

fn main_arguments(config: &AmqpConfig, queue: &QueueConfig) -> FieldTable {
    let mut arguments = queue.arguments.clone();
    if queue.queue_type.unwrap_or(config.queue_type) == QueueType::Quorum {
        quorum(&mut arguments);
        // What the broker dead-letters by itself (e.g. past a delivery limit) is kept, not dropped.
        if !arguments.contains_key("x-dead-letter-exchange") {
            dead_letter_to(&mut arguments, &dlq(&queue.name));
        }
    }
    arguments
}

pub(crate) fn dlq_arguments(queue_type: QueueType) -> FieldTable {
    let mut arguments = FieldTable::default();
    if queue_type == QueueType::Quorum {
        quorum(&mut arguments);
    }
    arguments
}

/// Arguments of a delay queue: a TTL, then back to `queue`.
pub(crate) fn retry_arguments(queue_type: QueueType, queue: &str, ttl_ms: u64) -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert(
        ShortString::from("x-message-ttl"),
        AMQPValue::LongLongInt(i64::try_from(ttl_ms).unwrap_or(i64::MAX)),
    );
    dead_letter_to(&mut arguments, queue);
    if queue_type == QueueType::Quorum {
        quorum(&mut arguments);
        // Quorum queues dead-letter at most once unless told otherwise.
        arguments.insert(ShortString::from("x-dead-letter-strategy"), text("at-least-once"));
        arguments.insert(ShortString::from("x-overflow"), text("reject-publish"));
    }
    arguments
}

fn queue_options(durable: bool) -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable,
        ..QueueDeclareOptions::default()
    }
}

/// Declares `queue` with `arguments`.
pub(crate) async fn declare_queue(
    channel: &Channel,
    queue: &str,
    durable: bool,
    arguments: FieldTable,
) -> Result<(), AmqpError> {
    let name = short(queue, "queue name").map_err(AmqpError::InvalidConfig)?;
    channel
        .queue_declare(name, queue_options(durable), arguments)
        .await
        .map(drop)
        .map_err(|source| AmqpError::Topology {
            what: format!("queue `{queue}`"),
            source,
        })
}

/// Declares every configured exchange, queue (with its `<queue>.dlq`) and
/// binding. Idempotent.
pub(crate) async fn declare(channel: &Channel, config: &AmqpConfig) -> Result<(), AmqpError> {
    let topology = &config.topology;
    for exchange in &topology.exchanges {
        let name = short(&exchange.name, "exchange name").map_err(AmqpError::InvalidConfig)?;
        let kind = match exchange.kind {
            ExchangeKind::Fanout => lapin::ExchangeKind::Fanout,
            ExchangeKind::Direct => lapin::ExchangeKind::Direct,
            ExchangeKind::Topic => lapin::ExchangeKind::Topic,
        };
        let options = ExchangeDeclareOptions {
            durable: exchange.durable,
            ..ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(name, kind, options, FieldTable::default())
            .await
            .map_err(|source| AmqpError::Topology {
                what: format!("exchange `{}`", exchange.name),
                source,
            })?;
    }
    for queue in &topology.queues {
        let queue_type = queue.queue_type.unwrap_or(config.queue_type);
        // Quorum queues are always durable.
        let durable = queue.durable || queue_type == QueueType::Quorum;
        declare_queue(channel, &queue.name, durable, main_arguments(config, queue)).await?;
        declare_queue(channel, &dlq(&queue.name), true, dlq_arguments(queue_type)).await?;
    }
    for binding in &topology.bindings {
        let what = || format!("binding `{}` → `{}`", binding.exchange, binding.queue);
        let invalid = |e: String| AmqpError::InvalidConfig(format!("{}: {e}", what()));
        channel
            .queue_bind(
                short(&binding.queue, "queue name").map_err(invalid)?,
                short(&binding.exchange, "exchange name").map_err(invalid)?,
                short(&binding.routing_key, "routing key").map_err(invalid)?,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|source| AmqpError::Topology { what: what(), source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_round_up_to_a_power_of_two_milliseconds() {
        assert_eq!(retry_queue("q", Duration::ZERO), ("q.retry.1".to_owned(), 1));
        assert_eq!(
            retry_queue("q", Duration::from_millis(100)),
            ("q.retry.128".to_owned(), 128)
        );
        assert_eq!(
            retry_queue("q", Duration::from_millis(128)),
            ("q.retry.128".to_owned(), 128)
        );
        assert_eq!(retry_queue("q", Duration::from_secs(30)).1, 32_768);
        assert_eq!(retry_queue("q", Duration::from_secs(u64::MAX)).1, MAX_DELAY_MS);
    }

    #[test]
    fn derived_queues_take_their_queue_s_type() {
        let config = AmqpConfig {
            topology: crate::Topology::new()
                .with_queue(QueueConfig::new("q").with_type(QueueType::Quorum))
                .queue("c"),
            ..AmqpConfig::default()
        };
        assert_eq!(queue_type(&config, "q"), QueueType::Quorum);
        assert_eq!(queue_type(&config, "q.dlq"), QueueType::Quorum);
        assert_eq!(queue_type(&config, "c.dlq"), QueueType::Classic);
        assert_eq!(queue_type(&config, "unknown"), QueueType::Classic);
    }
}
