//! The message envelope that crosses the transport and sits in the outbox.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;
use crate::id::MessageId;

/// Header naming the message this one answers (set on participant replies).
pub const IN_REPLY_TO: &str = "in-reply-to";

/// A message: an id for deduplication, a type, a destination and a JSON payload.
///
/// `destination` is the logical address a message is published to (an exchange,
/// for AMQP); it always comes from configuration, never from a Rust type name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Unique id; the inbox deduplicates on it.
    pub id: MessageId,
    /// What the message is, e.g. `OrderCreated` (AMQP `type`).
    pub kind: String,
    /// Where it is published to.
    pub destination: String,
    /// The saga it belongs to, when the sender knows it (AMQP `correlation_id`).
    pub correlation_id: Option<String>,
    /// When it was created.
    pub timestamp: Timestamp,
    /// Extra headers (trace context, `in-reply-to`, ...).
    pub headers: BTreeMap<String, String>,
    /// The body, JSON by convention.
    pub payload: Vec<u8>,
}

impl Message {
    /// A message with a fresh id and a raw payload.
    pub fn new(kind: impl Into<String>, destination: impl Into<String>, payload: Vec<u8>) -> Self {
        Self {
            id: MessageId::new(),
            kind: kind.into(),
            destination: destination.into(),
            correlation_id: None,
            timestamp: Timestamp::now(),
            headers: BTreeMap::new(),
            payload,
        }
    }

    /// A message whose payload is `body` as JSON.
    pub fn json<T: Serialize + ?Sized>(
        kind: impl Into<String>,
        destination: impl Into<String>,
        body: &T,
    ) -> Result<Self, serde_json::Error> {
        Ok(Self::new(kind, destination, serde_json::to_vec(body)?))
    }

    /// Decodes the JSON payload.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.payload)
    }

    /// Sets a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Sets the id.
    pub fn with_id(mut self, id: MessageId) -> Self {
        self.id = id;
        self
    }

    /// Sets the correlation id.
    pub fn with_correlation_id(mut self, correlation_id: impl Into<String>) -> Self {
        self.correlation_id = Some(correlation_id.into());
        self
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// A message a step wants sent; the engine gives it its id, correlation and time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    /// The message type.
    pub kind: String,
    /// Where to publish it.
    pub destination: String,
    /// The JSON body.
    pub payload: Vec<u8>,
}

impl Command {
    /// A command whose body is `body` as JSON.
    pub fn json<T: Serialize + ?Sized>(
        kind: impl Into<String>,
        destination: impl Into<String>,
        body: &T,
    ) -> Result<Self, serde_json::Error> {
        Ok(Self {
            kind: kind.into(),
            destination: destination.into(),
            payload: serde_json::to_vec(body)?,
        })
    }
}
