//! Start-up errors, and how lapin's errors map onto saga-core's
//! [`TransportError`].

use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use saga_core::TransportError;

/// Why an [`AmqpTransport`](crate::AmqpTransport) could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AmqpError {
    /// The configuration is unusable (a name longer than 255 bytes, zero
    /// channels, ...): fix it.
    #[error("invalid AMQP configuration: {0}")]
    InvalidConfig(String),
    /// The broker could not be reached or refused the login: retry later, or
    /// start it (`rabbitmq-server -detached`) and check the URL.
    #[error("cannot connect to the broker at {url}: {source}")]
    Unavailable {
        /// The URL, password masked.
        url: String,
        /// The cause.
        #[source]
        source: lapin::Error,
    },
    /// Connecting took longer than the configured timeout: retry later.
    #[error("connecting to the broker at {url} timed out")]
    Timeout {
        /// The URL, password masked.
        url: String,
    },
    /// Declaring the topology failed, e.g. an existing queue has other
    /// arguments than configured: fix the configuration or the broker.
    #[error("declaring {what} failed: {source}")]
    Topology {
        /// The exchange, queue or binding.
        what: String,
        /// The cause.
        #[source]
        source: lapin::Error,
    },
}

impl AmqpError {
    /// Whether starting again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable { .. } | Self::Timeout { .. })
    }
}

impl From<AmqpError> for TransportError {
    fn from(error: AmqpError) -> Self {
        TransportError::Unavailable(Box::new(error))
    }
}

/// The broker's soft error code, when `error` is one.
pub(crate) fn soft_error(error: &lapin::Error) -> Option<AMQPSoftError> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(e) => match e.kind() {
            AMQPErrorKind::Soft(soft) => Some(soft.clone()),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

/// `error` as a passing transport failure (the transport reconnects).
pub(crate) fn unavailable(error: lapin::Error) -> TransportError {
    TransportError::Unavailable(Box::new(error))
}

/// `operation`, failing as `Unavailable` when the broker does not answer
/// within `limit` (lapin leaves an operation pending forever when the
/// connection dies at the wrong moment).
pub(crate) async fn within<T>(
    limit: std::time::Duration,
    what: &str,
    operation: impl Future<Output = lapin::Result<T>>,
) -> Result<lapin::Result<T>, TransportError> {
    tokio::time::timeout(limit, operation)
        .await
        .map_err(|_| TransportError::Unavailable(format!("{what}: no answer from the broker within {limit:?}").into()))
}

/// A text value that must fit an AMQP short string (names, ids, header keys).
pub(crate) fn short(value: &str, what: &str) -> Result<lapin::types::ShortString, String> {
    lapin::types::ShortString::try_new(value).map_err(|e| format!("{what} `{}…`: {e}", truncated(value)))
}

fn truncated(value: &str) -> &str {
    let mut end = value.len().min(40);
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    &value[..end]
}
