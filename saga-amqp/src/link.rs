//! A connection to the broker: opened on demand, re-opened with backoff
//! after it drops, the topology re-declared each time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use lapin::uri::AMQPUri;
use lapin::{Channel, Connection, ConnectionProperties, ConnectionStatus};
use saga_core::{CancellationToken, TransportError};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::config::AmqpConfig;
use crate::error::{AmqpError, unavailable};
use crate::topology;

/// How often an operation waiting for the broker looks whether the broker
/// blocks its connection (a shorter operation timeout looks at its end).
const BLOCKED_CHECK: Duration = Duration::from_secs(1);

/// Whether a caller waits out the backoff before the next connection attempt
/// (a subscription, which has nothing else to do) or fails at once (a
/// publisher, whose relay backs off by itself while the outbox accumulates).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Wait {
    Yes,
    No,
}

#[derive(Default)]
struct State {
    connection: Option<Arc<Connection>>,
    /// A connection attempt under way. It belongs to the link, not to the
    /// caller that started it: a caller given up on (a relay round past its
    /// budget) leaves it running for the next, so a broker slower to accept
    /// than callers wait is still reached.
    attempt: Option<tokio::task::JoinHandle<Result<Connection, AmqpError>>>,
    failures: u32,
    retry_at: Option<Instant>,
}

/// What a connection is for: publishing and consuming never share one.
/// Under a resource alarm the broker stops reading from every connection
/// that publishes, and consumers must go on acking, for queues (and with
/// them the alarm) to drain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Purpose {
    Publishing,
    Consuming,
}

impl Purpose {
    fn as_str(self) -> &'static str {
        match self {
            Self::Publishing => "publishing",
            Self::Consuming => "consuming",
        }
    }
}

pub(crate) struct Link {
    config: Arc<AmqpConfig>,
    purpose: Purpose,
    state: Mutex<State>,
    /// Bumped on every new connection, so caches of what was declared on the
    /// previous one are dropped.
    generation: AtomicU64,
    /// The live connection's status, readable without `state`'s lock.
    status: std::sync::Mutex<ConnectionStatus>,
    /// Whether the last look found the connection blocked (its start logged,
    /// its end not yet).
    seen_blocked: AtomicBool,
    closed: CancellationToken,
}

impl Link {
    /// Connects and declares the topology once, reporting why it could not.
    pub(crate) async fn start(config: Arc<AmqpConfig>, purpose: Purpose) -> Result<Self, AmqpError> {
        let connection = connect(&config, purpose).await?;
        Ok(Self::with(config, purpose, Some(connection)))
    }

    /// Connects on first use: the publishing side of a transport that may
    /// only ever consume (an observer) then costs no connection, I/O thread
    /// or frame buffers.
    pub(crate) fn deferred(config: Arc<AmqpConfig>, purpose: Purpose) -> Self {
        Self::with(config, purpose, None)
    }

    fn with(config: Arc<AmqpConfig>, purpose: Purpose, connection: Option<Connection>) -> Self {
        let status = connection
            .as_ref()
            .map_or_else(ConnectionStatus::default, |c| c.status().clone());
        Self {
            config,
            purpose,
            generation: AtomicU64::new(u64::from(connection.is_some())),
            state: Mutex::new(State {
                connection: connection.map(Arc::new),
                ..State::default()
            }),
            status: std::sync::Mutex::new(status),
            seen_blocked: AtomicBool::new(false),
            closed: CancellationToken::new(),
        }
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub(crate) fn closed(&self) -> &CancellationToken {
        &self.closed
    }

    /// Whether the connection is up right now, or not needed yet: a
    /// [`deferred`](Self::deferred) link never used (nor tried) has nothing
    /// to be down.
    pub(crate) fn is_connected(&self) -> bool {
        self.state
            .try_lock()
            .map(|state| match &state.connection {
                Some(connection) => connection.status().connected(),
                None => state.failures == 0 && self.generation() == 0,
            })
            .unwrap_or(false)
    }

    /// Whether the newest connection is open, without waiting for the
    /// link's lock (a connection under way counts as not up).
    pub(crate) fn is_up(&self) -> bool {
        self.status.lock().unwrap_or_else(PoisonError::into_inner).connected()
    }

    /// Whether the broker blocks the live connection: it stopped reading
    /// from it under a memory or disk alarm, and lapin holds back what is
    /// sent on it until the alarm clears. The hold's start and end are
    /// logged when first seen here.
    pub(crate) fn is_blocked(&self) -> bool {
        let blocked = {
            let status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
            status.connected() && status.blocked()
        };
        if self.seen_blocked.swap(blocked, Ordering::AcqRel) != blocked {
            let purpose = self.purpose.as_str();
            if blocked {
                tracing::warn!(
                    purpose,
                    "the broker blocks the connection (a memory or disk alarm); what is sent on it waits for the alarm to clear"
                );
            } else {
                tracing::info!(purpose, "the broker no longer blocks the connection");
            }
        }
        blocked
    }

    /// Awaits a broker operation on this connection for at most the
    /// operation timeout, the guard against a connection that died under it,
    /// except while the broker blocks the connection: lapin sends what
    /// waited when the alarm clears, so giving up and sending again would
    /// send it twice. The full timeout runs again from the first look that
    /// finds the hold over. Closing the transport ends the wait.
    pub(crate) async fn within_unless_blocked<T>(
        &self,
        what: &str,
        operation: impl Future<Output = T>,
    ) -> Result<T, TransportError> {
        let limit = self.config.operation_timeout;
        let mut operation = std::pin::pin!(operation);
        let mut deadline = Instant::now() + limit;
        let mut blocked = false;
        loop {
            let next_look = Instant::now() + BLOCKED_CHECK;
            let look = if blocked { next_look } else { deadline.min(next_look) };
            tokio::select! {
                biased;
                done = operation.as_mut() => return Ok(done),
                () = self.closed.cancelled(), if blocked => return Err(TransportError::Closed),
                () = tokio::time::sleep_until(look) => {}
            }
            let was_blocked = std::mem::replace(&mut blocked, self.is_blocked());
            let now = Instant::now();
            if blocked || was_blocked {
                deadline = now + limit;
            } else if now >= deadline {
                return Err(TransportError::Unavailable(
                    format!("{what}: no answer from the broker within {limit:?}").into(),
                ));
            }
        }
    }

    /// The live connection, reconnecting (and re-declaring the topology) when
    /// it dropped.
    pub(crate) async fn connection(&self, wait: Wait) -> Result<Arc<Connection>, TransportError> {
        loop {
            if self.closed.is_cancelled() {
                return Err(TransportError::Closed);
            }
            let mut state = self.state.lock().await;
            // Again under the lock: `close` may have run while this waited.
            if self.closed.is_cancelled() {
                return Err(TransportError::Closed);
            }
            if let Some(connection) = &state.connection {
                if connection.status().connected() {
                    return Ok(Arc::clone(connection));
                }
                tracing::warn!(
                    url = %self.config.redacted_url(),
                    purpose = self.purpose.as_str(),
                    "connection to the broker lost; reconnecting"
                );
                state.connection = None;
            }
            if let Some(at) = state.retry_at.filter(|at| *at > Instant::now()) {
                if wait == Wait::No {
                    return Err(TransportError::Unavailable(
                        format!("the broker is unreachable; next attempt in {:?}", at - Instant::now()).into(),
                    ));
                }
                drop(state);
                tokio::select! {
                    () = self.closed.cancelled() => return Err(TransportError::Closed),
                    () = tokio::time::sleep_until(at) => continue,
                }
            }
            let attempt = state.attempt.get_or_insert_with(|| {
                let (config, purpose) = (Arc::clone(&self.config), self.purpose);
                tokio::spawn(async move { connect(&config, purpose).await })
            });
            let joined = attempt.await;
            state.attempt = None;
            let Ok(outcome) = joined else {
                // Aborted by `close`, or it panicked.
                if self.closed.is_cancelled() {
                    return Err(TransportError::Closed);
                }
                return Err(TransportError::Unavailable(
                    "the connection attempt ended abnormally".into(),
                ));
            };
            match outcome {
                Ok(connection) => {
                    let connection = Arc::new(connection);
                    if state.failures > 0 {
                        tracing::info!(
                            url = %self.config.redacted_url(),
                            purpose = self.purpose.as_str(),
                            "reconnected to the broker"
                        );
                    }
                    state.failures = 0;
                    state.retry_at = None;
                    state.connection = Some(Arc::clone(&connection));
                    *self.status.lock().unwrap_or_else(PoisonError::into_inner) = connection.status().clone();
                    self.generation.fetch_add(1, Ordering::AcqRel);
                    return Ok(connection);
                }
                Err(error) => {
                    state.failures = state.failures.saturating_add(1);
                    let backoff = self.config.reconnect.backoff(state.failures);
                    state.retry_at = Some(Instant::now() + backoff);
                    tracing::warn!(
                        error = %error,
                        ?backoff,
                        purpose = self.purpose.as_str(),
                        "reconnecting to the broker failed"
                    );
                    if wait == Wait::No {
                        return Err(error.into());
                    }
                }
            }
        }
    }

    /// A new channel on the live connection.
    pub(crate) async fn channel(&self, wait: Wait) -> Result<Channel, TransportError> {
        self.channel_and_frame_max(wait).await.map(|(channel, _)| channel)
    }

    /// A new channel, and the largest frame its connection negotiated.
    pub(crate) async fn channel_and_frame_max(&self, wait: Wait) -> Result<(Channel, u32), TransportError> {
        let connection = self.connection(wait).await?;
        let frame_max = connection.configuration().frame_max();
        match self
            .within_unless_blocked("opening a channel", connection.create_channel())
            .await
        {
            Ok(channel) => channel.map(|channel| (channel, frame_max)).map_err(unavailable),
            Err(timed_out) => {
                // The connection died under the request: do not hand it out again.
                let mut state = self.state.lock().await;
                if state.connection.as_ref().is_some_and(|c| Arc::ptr_eq(c, &connection)) {
                    state.connection = None;
                }
                Err(timed_out)
            }
        }
    }

    /// Closes the connection; later calls fail with [`TransportError::Closed`].
    pub(crate) async fn close(&self) {
        self.closed.cancel();
        // Bounded: a broker that never answers the close (or a connection
        // that died meanwhile) must not hold up shutdown.
        let closing = async {
            let mut state = self.state.lock().await;
            if let Some(attempt) = state.attempt.take() {
                attempt.abort();
            }
            let connection = state.connection.take();
            drop(state);
            if let Some(connection) = connection.filter(|c| c.status().connected())
                && let Err(error) = connection.close(200, "closing".into()).await
            {
                tracing::debug!(%error, "closing the connection failed");
            }
        };
        if tokio::time::timeout(self.config.operation_timeout, closing)
            .await
            .is_err()
        {
            tracing::debug!(timeout = ?self.config.operation_timeout, "closing the connection took too long; left to drop");
        }
    }
}

/// Opens a connection and declares the topology on it.
async fn connect(config: &AmqpConfig, purpose: Purpose) -> Result<Connection, AmqpError> {
    let attempt = async {
        let name = format!("{} ({})", config.connection_name, purpose.as_str());
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        // Parsed here so that a parse error, which quotes the URL, is never shown.
        let mut uri = config.url.parse::<AMQPUri>().map_err(|_| {
            AmqpError::InvalidConfig(format!(
                "the broker URL {} does not parse (percent-encode special characters in the user name and password)",
                config.redacted_url()
            ))
        })?;
        if let Some(frame_max) = config.frame_max {
            uri.query.frame_max.get_or_insert(frame_max);
        }
        let connection = Connection::connect_uri(uri, properties)
            .await
            .map_err(|source| AmqpError::Unavailable {
                url: config.redacted_url().to_string(),
                source,
            })?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|source| AmqpError::Unavailable {
                url: config.redacted_url().to_string(),
                source,
            })?;
        topology::declare(&channel, config).await?;
        // Dropping the last handle closes the channel.
        drop(channel);
        Ok(connection)
    };
    tokio::time::timeout(config.reconnect.connect_timeout, attempt)
        .await
        .map_err(|_| AmqpError::Timeout {
            url: config.redacted_url().to_string(),
        })?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Topology;

    #[tokio::test]
    async fn a_url_that_does_not_parse_is_refused_without_showing_its_password() {
        // The unescaped `/` ends the authority early: the URL does not parse,
        // and the parser's own message would quote it whole.
        let config = AmqpConfig::new("amqp://app:se/cret@127.0.0.1:5672/%2f", Topology::new());
        let error = connect(&config, Purpose::Publishing)
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(error.contains("does not parse"), "{error}");
        assert!(!error.contains("cret"), "the password shows: {error}");
    }
}
