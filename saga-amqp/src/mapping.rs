//! `saga_core::Message` ⇄ AMQP properties and headers. Bodies pass through
//! as bytes: decoding is the consumer's job.

use std::collections::BTreeMap;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use saga_core::{Message, MessageId, Timestamp};
use uuid::Uuid;

use crate::error::short;

/// Header counting how often a message was settled with a retry.
pub const RETRIES_HEADER: &str = "x-saga-retries";
/// Header keeping a message's original destination while it goes through a
/// delay or dead-letter queue.
pub const DESTINATION_HEADER: &str = "x-saga-destination";

/// Namespace of ids given to delivered messages that carry no `message_id`.
const CONTENT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x1f6e_2c4d_9a0b_4e51_8c3d_7b2a_5e90_a001);

/// AMQP delivery mode of persistent messages.
const PERSISTENT: u8 = 2;

/// The id a delivered message without a `message_id` gets: a UUIDv5 of its
/// type and body, so the same message delivered twice gets the same id and
/// the inbox still deduplicates it. (Two distinct messages with the same type
/// and body are then treated as one.)
pub fn content_id(kind: &str, body: &[u8]) -> MessageId {
    let mut name = Vec::with_capacity(kind.len() + 1 + body.len());
    name.extend_from_slice(kind.as_bytes());
    name.push(0);
    name.extend_from_slice(body);
    MessageId::from(Uuid::new_v5(&CONTENT_ID_NAMESPACE, &name).to_string())
}

/// The properties `message` is published with; `extra` headers (e.g. an
/// injected trace context) are added to its own.
pub(crate) fn properties(message: &Message, extra: &[(String, String)]) -> Result<BasicProperties, String> {
    let mut headers = BTreeMap::new();
    for (name, value) in message.headers.iter().chain(extra.iter().map(|(n, v)| (n, v))) {
        headers.insert(
            short(name, "header name")?,
            AMQPValue::LongString(LongString::from(value.as_bytes())),
        );
    }
    let seconds = u64::try_from(message.timestamp.as_millis() / 1000).unwrap_or(0);
    let mut properties = BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_content_type(ShortString::from("application/json"))
        .with_message_id(short(message.id.as_str(), "message id")?)
        .with_type(short(&message.kind, "message type")?)
        .with_timestamp(seconds)
        .with_headers(FieldTable::from(headers));
    if let Some(correlation_id) = &message.correlation_id {
        properties = properties.with_correlation_id(short(correlation_id, "correlation id")?);
    }
    Ok(properties)
}

/// A delivered message and how often it was retried.
pub(crate) fn message(exchange: &str, properties: &BasicProperties, body: Vec<u8>) -> (Message, u32) {
    let kind = properties
        .kind()
        .as_ref()
        .map(|k| k.as_str().to_owned())
        .unwrap_or_default();
    let id = match properties.message_id() {
        Some(id) if !id.as_str().is_empty() => MessageId::from(id.as_str()),
        _ => content_id(&kind, &body),
    };
    let timestamp = properties
        .timestamp()
        .and_then(|seconds| i64::try_from(seconds).ok())
        .map_or_else(Timestamp::now, |seconds| {
            Timestamp::from_millis(seconds.saturating_mul(1000))
        });
    let mut headers = BTreeMap::new();
    let mut retries = 0;
    let mut destination = exchange.to_owned();
    if let Some(table) = properties.headers() {
        for (name, value) in table {
            match name.as_str() {
                RETRIES_HEADER => retries = integer(value).and_then(|n| u32::try_from(n).ok()).unwrap_or(0),
                DESTINATION_HEADER => {
                    if let Some(text) = text(value) {
                        destination = text;
                    }
                }
                _ => {
                    // Nested values (e.g. the broker's `x-death`) have no string form.
                    if let Some(text) = text(value) {
                        headers.insert(name.as_str().to_owned(), text);
                    }
                }
            }
        }
    }
    let message = Message {
        id,
        kind,
        destination,
        correlation_id: properties.correlation_id().as_ref().map(|c| c.as_str().to_owned()),
        timestamp,
        headers,
        payload: body,
    };
    (message, retries)
}

/// `value` as a string, if it is a scalar.
fn text(value: &AMQPValue) -> Option<String> {
    Some(match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::Float(f) => f.to_string(),
        AMQPValue::Double(f) => f.to_string(),
        AMQPValue::Timestamp(t) => t.to_string(),
        other => integer(other)?.to_string(),
    })
}

fn integer(value: &AMQPValue) -> Option<i64> {
    Some(match value {
        AMQPValue::ShortShortInt(n) => i64::from(*n),
        AMQPValue::ShortShortUInt(n) => i64::from(*n),
        AMQPValue::ShortInt(n) => i64::from(*n),
        AMQPValue::ShortUInt(n) => i64::from(*n),
        AMQPValue::LongInt(n) => i64::from(*n),
        AMQPValue::LongUInt(n) => i64::from(*n),
        AMQPValue::LongLongInt(n) => *n,
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.parse().ok()?,
        _ => return None,
    })
}

/// The properties of a message settled for another round: `retries` counted,
/// its original destination kept, `header` (e.g. the dead-letter reason) set.
pub(crate) fn republished(
    original: &BasicProperties,
    message_id: &MessageId,
    destination: &str,
    retries: u32,
    header: Option<(&str, &str)>,
) -> Result<BasicProperties, String> {
    let mut table = original.headers().clone().unwrap_or_default();
    table.insert(
        ShortString::from(RETRIES_HEADER),
        AMQPValue::LongLongInt(i64::from(retries)),
    );
    if !table.contains_key(DESTINATION_HEADER) {
        table.insert(
            ShortString::from(DESTINATION_HEADER),
            AMQPValue::LongString(LongString::from(destination.as_bytes())),
        );
    }
    if let Some((name, value)) = header {
        table.insert(
            short(name, "header name")?,
            AMQPValue::LongString(LongString::from(value.as_bytes())),
        );
    }
    let mut properties = original.clone().with_headers(table);
    // Keep the id a message without one was given, so its redeliveries deduplicate.
    if original.message_id().is_none() {
        properties = properties.with_message_id(short(message_id.as_str(), "message id")?);
    }
    if original.delivery_mode().is_none() {
        properties = properties.with_delivery_mode(PERSISTENT);
    }
    Ok(properties)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_round_trips_through_properties() {
        let sent = Message::new("OrderCreated", "orders", b"{\"n\":1}".to_vec())
            .with_correlation_id("saga-1")
            .with_header("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
            .with_header("in-reply-to", "m-0");
        let properties = properties(&sent, &[("tracestate".into(), "a=b".into())]).expect("valid message");
        assert_eq!(properties.delivery_mode(), &Some(2));
        assert_eq!(
            properties.content_type().as_ref().map(ShortString::as_str),
            Some("application/json")
        );
        let (got, retries) = message("orders", &properties, sent.payload.clone());
        assert_eq!(retries, 0);
        assert_eq!(got.id, sent.id);
        assert_eq!(got.kind, sent.kind);
        assert_eq!(got.destination, "orders");
        assert_eq!(got.correlation_id, sent.correlation_id);
        assert_eq!(got.timestamp.as_millis() / 1000, sent.timestamp.as_millis() / 1000);
        assert_eq!(got.header("traceparent"), sent.header("traceparent"));
        assert_eq!(got.header("in-reply-to"), Some("m-0"));
        assert_eq!(got.header("tracestate"), Some("a=b"));
    }

    #[test]
    fn republishing_counts_retries_and_keeps_the_destination() {
        let sent = Message::new("OrderCreated", "orders", b"{}".to_vec());
        let first = properties(&sent, &[]).expect("valid message");
        let again = republished(&first, &sent.id, "orders", 1, None).expect("valid");
        let again = republished(&again, &sent.id, "", 2, Some(("x-dead-letter-reason", "bad"))).expect("valid");
        let (got, retries) = message("", &again, b"{}".to_vec());
        assert_eq!(retries, 2);
        assert_eq!(got.destination, "orders");
        assert_eq!(got.header("x-dead-letter-reason"), Some("bad"));
        assert!(got.header(RETRIES_HEADER).is_none(), "internal headers stay internal");
    }

    #[test]
    fn a_message_without_id_gets_one_from_its_content() {
        let bare = BasicProperties::default().with_type("Paid".into());
        let (first, _) = message("payments", &bare, b"{\"order\":1}".to_vec());
        let (again, _) = message("payments", &bare, b"{\"order\":1}".to_vec());
        let (other, _) = message("payments", &bare, b"{\"order\":2}".to_vec());
        assert_eq!(first.id, again.id);
        assert_ne!(first.id, other.id);
        let republished = republished(&bare, &first.id, "payments", 1, None).expect("valid");
        let (retried, _) = message("", &republished, b"{\"order\":1}".to_vec());
        assert_eq!(retried.id, first.id);
    }

    #[test]
    fn overlong_names_are_errors_not_panics() {
        let sent = Message::new("K".repeat(300), "orders", Vec::new());
        assert!(properties(&sent, &[]).is_err());
    }
}
