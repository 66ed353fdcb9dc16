#![doc = include_str!("../README.md")]

mod acks;
mod config;
mod dead_letter;
mod error;
mod link;
mod mapping;
mod publisher;
mod subscription;
mod topology;
mod trace;
mod transport;

pub use acks::AcksSent;
pub use config::{
    AmqpConfig, BindingConfig, ExchangeConfig, ExchangeKind, QueueConfig, QueueType, ReconnectConfig, RedactedUrl,
    RoutingKey, Topology,
};
pub use error::AmqpError;
pub use mapping::{DESTINATION_HEADER, RETRIES_HEADER, ROUTING_KEY_HEADER, content_id};
pub use trace::{TRACEPARENT, TracedHandler, context_of, inject_current, set_parent};
pub use transport::AmqpTransport;

/// The log target under which lapin logs a message the broker returned
/// (unroutable, with `require_route`): the whole message, body and headers,
/// at WARN, each time the relay tries it again (every lease). Turn it off
/// (`lapin::returned_messages=off` in a `tracing_subscriber::EnvFilter`)
/// when bodies carry personal data; the relay logs the refusal by message
/// id.
pub const RETURNED_MESSAGES_LOG_TARGET: &str = "lapin::returned_messages";

/// The AMQP client this crate uses, for declaration arguments
/// ([`lapin::types::FieldTable`]) and the like.
pub use lapin;
