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
/// Header keeping the routing key a message was first published with, beside
/// [`DESTINATION_HEADER`]: with both, a dead letter can be replayed to where
/// it came from.
pub const ROUTING_KEY_HEADER: &str = "x-saga-routing-key";

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
    let ours = sent_round_again(exchange);
    if let Some(table) = properties.headers() {
        for (name, value) in table {
            match name.as_str() {
                RETRIES_HEADER => {
                    if ours {
                        retries = integer(value).and_then(|n| u32::try_from(n).ok()).unwrap_or(0);
                    }
                }
                DESTINATION_HEADER => {
                    if ours && let Some(text) = text(value) {
                        destination = text;
                    }
                }
                ROUTING_KEY_HEADER => {}
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
pub(crate) fn text(value: &AMQPValue) -> Option<String> {
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

/// Whether a delivery from `exchange` may be a round this transport sent
/// again (through a delay queue, which dead-letters to the default exchange,
/// or straight back to its queue): only then are its retry count and origin
/// headers its own. On a delivery from a named exchange they are whatever
/// its publisher wrote: trusted, a forged origin would have a replay of the
/// dead letter publish, with this service's credentials, wherever it named.
/// (A publisher to the default exchange reaches any queue by name anyway.)
fn sent_round_again(exchange: &str) -> bool {
    exchange.is_empty()
}

/// Where a delivery was first published: its exchange and routing key.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Published<'a> {
    pub(crate) exchange: &'a str,
    pub(crate) routing_key: &'a str,
}

/// The properties of a message settled for another round: `retries` counted,
/// where it was first published recorded (on its first round: later rounds
/// arrive from a delay queue and keep the record), `header` (e.g. the
/// dead-letter reason) set.
pub(crate) fn republished(
    original: &BasicProperties,
    message_id: &MessageId,
    published: Published<'_>,
    retries: u32,
    header: Option<(&str, &str)>,
) -> Result<BasicProperties, String> {
    let mut table = original.headers().clone().unwrap_or_default();
    table.insert(
        ShortString::from(RETRIES_HEADER),
        AMQPValue::LongLongInt(i64::from(retries)),
    );
    if !sent_round_again(published.exchange) || !table.contains_key(DESTINATION_HEADER) {
        table.insert(
            ShortString::from(DESTINATION_HEADER),
            AMQPValue::LongString(LongString::from(published.exchange.as_bytes())),
        );
        table.insert(
            ShortString::from(ROUTING_KEY_HEADER),
            AMQPValue::LongString(LongString::from(published.routing_key.as_bytes())),
        );
    }
    if let Some((name, value)) = header {
        table.insert(
            short(name, "header name")?,
            AMQPValue::LongString(LongString::from(value.as_bytes())),
        );
    }
    with_id(republishable(original).with_headers(table), original, message_id)
}

/// `original`'s properties republished as they came, with nothing added but
/// an id: for a message whose headers leave no room for the bookkeeping
/// (they came in one frame, so they fit again).
pub(crate) fn republished_as_is(original: &BasicProperties, message_id: &MessageId) -> Result<BasicProperties, String> {
    with_id(republishable(original), original, message_id)
}

/// `original`'s properties as they came, less what the broker refuses from
/// another publisher (a user id) or what would expire a dead letter (a
/// TTL): never larger than they came. `persistent` makes it persistent.
pub(crate) fn republishable_as_sent(original: &BasicProperties, persistent: bool) -> BasicProperties {
    let mode = if persistent {
        Some(PERSISTENT)
    } else {
        *original.delivery_mode()
    };
    match mode {
        Some(mode) => carried(original).with_delivery_mode(mode),
        None => carried(original),
    }
}

/// Keeps the id a message without one was given, so its redeliveries deduplicate.
fn with_id(
    properties: BasicProperties,
    original: &BasicProperties,
    message_id: &MessageId,
) -> Result<BasicProperties, String> {
    if original.message_id().is_some() {
        return Ok(properties);
    }
    Ok(properties.with_message_id(short(message_id.as_str(), "message id")?))
}

/// `original`'s properties, fit to publish again from here: persistent, and
/// without a per-message TTL (a copy in a dead-letter queue would expire out
/// of it) or a user id (the broker refuses another user's, and closes the
/// channel).
pub(crate) fn republishable(original: &BasicProperties) -> BasicProperties {
    carried(original).with_delivery_mode(PERSISTENT)
}

/// `original`'s properties but its delivery mode, TTL and user id.
fn carried(original: &BasicProperties) -> BasicProperties {
    let mut properties = BasicProperties::default();
    if let Some(value) = original.content_type() {
        properties = properties.with_content_type(value.clone());
    }
    if let Some(value) = original.content_encoding() {
        properties = properties.with_content_encoding(value.clone());
    }
    if let Some(value) = original.headers() {
        properties = properties.with_headers(value.clone());
    }
    if let Some(value) = original.priority() {
        properties = properties.with_priority(*value);
    }
    if let Some(value) = original.correlation_id() {
        properties = properties.with_correlation_id(value.clone());
    }
    if let Some(value) = original.reply_to() {
        properties = properties.with_reply_to(value.clone());
    }
    if let Some(value) = original.message_id() {
        properties = properties.with_message_id(value.clone());
    }
    if let Some(value) = original.timestamp() {
        properties = properties.with_timestamp(*value);
    }
    if let Some(value) = original.kind() {
        properties = properties.with_type(value.clone());
    }
    if let Some(value) = original.app_id() {
        properties = properties.with_app_id(value.clone());
    }
    if let Some(value) = original.cluster_id() {
        properties = properties.with_cluster_id(value.clone());
    }
    properties
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
        let first_round = Published {
            exchange: "orders",
            routing_key: "OrderCreated",
        };
        let again = republished(&first, &sent.id, first_round, 1, None).expect("valid");
        let from_delay_queue = Published {
            exchange: "",
            routing_key: "orders.retry.128",
        };
        let again = republished(
            &again,
            &sent.id,
            from_delay_queue,
            2,
            Some(("x-dead-letter-reason", "bad")),
        )
        .expect("valid");
        let headers = again.headers().clone().unwrap_or_default();
        assert_eq!(
            headers.inner().get(ROUTING_KEY_HEADER).and_then(text).as_deref(),
            Some("OrderCreated"),
            "the first routing key is kept"
        );
        let (got, retries) = message("", &again, b"{}".to_vec());
        assert_eq!(retries, 2);
        assert_eq!(got.destination, "orders");
        assert_eq!(got.header("x-dead-letter-reason"), Some("bad"));
        assert!(got.header(RETRIES_HEADER).is_none(), "internal headers stay internal");
        assert!(
            got.header(ROUTING_KEY_HEADER).is_none(),
            "internal headers stay internal"
        );
    }

    #[test]
    fn what_is_published_again_is_persistent_without_a_ttl_or_a_user() {
        let foreign = BasicProperties::default()
            .with_type("Paid".into())
            .with_message_id("m-1".into())
            .with_correlation_id("saga-1".into())
            .with_priority(3)
            .with_delivery_mode(1)
            .with_expiration("60000".into())
            .with_user_id("platform".into());
        let published = Published {
            exchange: "payments",
            routing_key: "Paid",
        };
        let again = republished(&foreign, &MessageId::from("m-1"), published, 1, None).expect("valid");
        assert_eq!(again.delivery_mode(), &Some(PERSISTENT));
        assert_eq!(
            again.expiration(),
            &None,
            "a dead letter must not expire out of its queue"
        );
        assert_eq!(again.user_id(), &None, "the broker refuses another user's id");
        assert_eq!(again.kind(), foreign.kind());
        assert_eq!(again.message_id(), foreign.message_id());
        assert_eq!(again.correlation_id(), foreign.correlation_id());
        assert_eq!(again.priority(), &Some(3));
    }

    #[test]
    fn a_message_without_id_gets_one_from_its_content() {
        let bare = BasicProperties::default().with_type("Paid".into());
        let (first, _) = message("payments", &bare, b"{\"order\":1}".to_vec());
        let (again, _) = message("payments", &bare, b"{\"order\":1}".to_vec());
        let (other, _) = message("payments", &bare, b"{\"order\":2}".to_vec());
        assert_eq!(first.id, again.id);
        assert_ne!(first.id, other.id);
        let published = Published {
            exchange: "payments",
            routing_key: "",
        };
        let republished = republished(&bare, &first.id, published, 1, None).expect("valid");
        let (retried, _) = message("", &republished, b"{\"order\":1}".to_vec());
        assert_eq!(retried.id, first.id);
    }

    #[test]
    fn overlong_names_are_errors_not_panics() {
        let sent = Message::new("K".repeat(300), "orders", Vec::new());
        assert!(properties(&sent, &[]).is_err());
    }
}

/// Deliveries are external input: whatever properties and headers a
/// publisher sets, reading them never panics, and what this crate publishes
/// reads back as it was sent.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    fn short_text() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            "[a-zA-Z0-9._-]{1,40}",
            any::<String>().prop_filter("fits a short string", |s| s.len() <= 255),
        ]
    }

    fn header_name() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(RETRIES_HEADER.to_owned()),
            Just(DESTINATION_HEADER.to_owned()),
            Just(ROUTING_KEY_HEADER.to_owned()),
            Just("traceparent".to_owned()),
            short_text(),
        ]
    }

    fn scalar() -> impl Strategy<Value = AMQPValue> {
        prop_oneof![
            any::<bool>().prop_map(AMQPValue::Boolean),
            any::<i8>().prop_map(AMQPValue::ShortShortInt),
            any::<u8>().prop_map(AMQPValue::ShortShortUInt),
            any::<i16>().prop_map(AMQPValue::ShortInt),
            any::<u16>().prop_map(AMQPValue::ShortUInt),
            any::<i32>().prop_map(AMQPValue::LongInt),
            any::<u32>().prop_map(AMQPValue::LongUInt),
            any::<i64>().prop_map(AMQPValue::LongLongInt),
            any::<f32>().prop_map(AMQPValue::Float),
            any::<f64>().prop_map(AMQPValue::Double),
            any::<u64>().prop_map(AMQPValue::Timestamp),
            short_text().prop_map(|s| AMQPValue::ShortString(ShortString::from(s))),
            prop::collection::vec(any::<u8>(), 0..64).prop_map(|b| AMQPValue::LongString(LongString::from(b))),
            "-?[0-9]{1,25}".prop_map(|s| AMQPValue::LongString(LongString::from(s))),
            prop::collection::vec(any::<u8>(), 0..16).prop_map(|b| AMQPValue::ByteArray(b.into())),
            Just(AMQPValue::Void),
        ]
    }

    fn value() -> impl Strategy<Value = AMQPValue> {
        scalar().prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(|v| AMQPValue::FieldArray(v.into())),
                prop::collection::btree_map("[a-z]{1,8}", inner, 0..4).prop_map(|m| {
                    let table: BTreeMap<ShortString, AMQPValue> =
                        m.into_iter().map(|(k, v)| (ShortString::from(k), v)).collect();
                    AMQPValue::FieldTable(FieldTable::from(table))
                }),
            ]
        })
    }

    fn delivered() -> impl Strategy<Value = BasicProperties> {
        (
            proptest::option::of(short_text()),
            proptest::option::of(short_text()),
            proptest::option::of(short_text()),
            proptest::option::of(any::<u64>()),
            proptest::option::of(prop::collection::btree_map(header_name(), value(), 0..6)),
        )
            .prop_map(|(id, kind, correlation, timestamp, headers)| {
                let mut properties = BasicProperties::default();
                if let Some(id) = id {
                    properties = properties.with_message_id(ShortString::from(id));
                }
                if let Some(kind) = kind {
                    properties = properties.with_type(ShortString::from(kind));
                }
                if let Some(correlation) = correlation {
                    properties = properties.with_correlation_id(ShortString::from(correlation));
                }
                if let Some(timestamp) = timestamp {
                    properties = properties.with_timestamp(timestamp);
                }
                if let Some(headers) = headers {
                    let table: BTreeMap<ShortString, AMQPValue> =
                        headers.into_iter().map(|(k, v)| (ShortString::from(k), v)).collect();
                    properties = properties.with_headers(FieldTable::from(table));
                }
                properties
            })
    }

    proptest! {
        #[test]
        fn any_delivery_reads_without_panicking(
            properties in delivered(),
            exchange in short_text(),
            body in prop::collection::vec(any::<u8>(), 0..256),
        ) {
            let (message, retries) = message(&exchange, &properties, body.clone());
            prop_assert!(!message.id.as_str().is_empty(), "every delivery has an id");
            prop_assert_eq!(&message.payload, &body);
            prop_assert!(message.header(RETRIES_HEADER).is_none(), "internal headers stay internal");
            if let Some(AMQPValue::LongLongInt(n)) = properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get(RETRIES_HEADER))
            {
                prop_assert_eq!(retries, u32::try_from(*n).unwrap_or(0));
            }
            // Republishing it (a retry, a dead letter) never panics either.
            let published = Published { exchange: &exchange, routing_key: "" };
            let _ = republished(&properties, &message.id, published, retries.saturating_add(1), Some(("x-dead-letter-reason", "test")));
        }

        #[test]
        fn what_is_published_reads_back_as_sent(
            kind in short_text(),
            correlation in proptest::option::of(short_text()),
            headers in prop::collection::btree_map("[a-z][a-z0-9-]{0,20}", any::<String>(), 0..5),
            body in prop::collection::vec(any::<u8>(), 0..256),
        ) {
            let mut sent = Message::new(kind, "orders", body);
            sent.correlation_id = correlation;
            sent.headers = headers
                .into_iter()
                .filter(|(name, _)| !name.starts_with("x-saga-"))
                .collect();
            let properties = properties(&sent, &[]).expect("names fit");
            let (got, retries) = message("orders", &properties, sent.payload.clone());
            prop_assert_eq!(retries, 0);
            prop_assert_eq!(got.id, sent.id);
            prop_assert_eq!(got.kind, sent.kind);
            prop_assert_eq!(got.correlation_id, sent.correlation_id);
            prop_assert_eq!(got.headers, sent.headers);
            prop_assert_eq!(got.payload, sent.payload);
        }
    }
}
