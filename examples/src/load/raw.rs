//! The machine's own limits, measured in the same run with the same
//! concurrency: single-row INSERT commits in PostgreSQL, and persistent,
//! confirmed, consumed and acked messages through one RabbitMQ queue. Each
//! is measured before the runs and again after them, and the two pooled.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use saga_core::{Message, Publisher, Settlement, Subscriber};
use serde::Serialize;
use sqlx::postgres::PgPoolOptions;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::error::LoadError;
use super::stage::Stage;

/// One raw figure: one measurement, or several pooled.
#[derive(Clone, Debug, Serialize)]
pub struct RawFigure {
    /// Operations completed (commits, or messages consumed and acked).
    pub operations: u64,
    /// Over how long.
    pub seconds: f64,
    /// Operations per second.
    pub per_second: f64,
    /// Each measurement's operations per second, in the order taken.
    pub measured_per_second: Vec<f64>,
    /// Connections (PostgreSQL) or publishers (RabbitMQ) that ran it: the
    /// clients, or fewer where the server would not take that many
    /// connections (the fewest of pooled measurements).
    pub concurrency: usize,
}

impl RawFigure {
    fn new(operations: u64, elapsed: Duration, concurrency: usize) -> Self {
        let seconds = elapsed.as_secs_f64();
        let per_second = rate(operations, seconds);
        Self {
            operations,
            seconds,
            per_second,
            measured_per_second: vec![per_second],
            concurrency,
        }
    }

    /// `self` and `later` as one figure: all their operations over all their
    /// time, so a machine that sped up or slowed down between them is
    /// measured at its average.
    pub fn pooled(self, later: Self) -> Self {
        let operations = self.operations.saturating_add(later.operations);
        let seconds = self.seconds + later.seconds;
        let mut measured_per_second = self.measured_per_second;
        measured_per_second.extend(later.measured_per_second);
        Self {
            operations,
            seconds,
            per_second: rate(operations, seconds),
            measured_per_second,
            concurrency: self.concurrency.min(later.concurrency),
        }
    }
}

fn rate(operations: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        operations as f64 / seconds
    } else {
        0.0
    }
}

/// PostgreSQL's settings that decide durability, as the server reports them.
#[derive(Clone, Debug, Serialize)]
pub struct Durability {
    /// `synchronous_commit`.
    pub synchronous_commit: String,
    /// `fsync`.
    pub fsync: String,
}

impl Durability {
    /// Why a commit acknowledged under these settings may not survive a
    /// crash of the server or the machine, if so: the figures then do not
    /// measure what the benchmark promises. Unread settings (empty) are not
    /// counted as relaxed.
    pub fn relaxed(&self) -> Option<String> {
        let mut why = Vec::new();
        if matches!(self.synchronous_commit.as_str(), "off" | "local") {
            why.push(format!("synchronous_commit={}", self.synchronous_commit));
        }
        if self.fsync == "off" {
            why.push("fsync=off".to_owned());
        }
        (!why.is_empty()).then(|| why.join(", "))
    }
}

/// The scratch table the raw commits and the latency floor's insert into.
pub(crate) const SCRATCH_TABLE: &str = "CREATE TABLE IF NOT EXISTS load_raw_insert \
     (id bigserial PRIMARY KEY, client integer NOT NULL, at timestamptz NOT NULL DEFAULT now())";

/// One single-row INSERT into [`SCRATCH_TABLE`], its client's number bound.
pub(crate) const SCRATCH_INSERT: &str = "INSERT INTO load_raw_insert (client) VALUES ($1)";

/// Connections the server leaves to others while the raw commits run: the
/// services' pools may open more, and the cost sampler needs one.
const CONNECTIONS_LEFT_TO_OTHERS: usize = 8;

/// How many connections the raw commits use: one per client, unless the
/// server has fewer free (`free` counts the measuring connection's own),
/// less [`CONNECTIONS_LEFT_TO_OTHERS`]. Single-row commits stop gaining
/// from more connections long before `max_connections` (group commit).
fn raw_connections(clients: usize, free: usize) -> usize {
    clients.min(free.saturating_sub(CONNECTIONS_LEFT_TO_OTHERS)).max(1)
}

/// Connections each committing single-row INSERTs (autocommit) into a
/// scratch table for `duration`: one per client (see [`raw_connections`]).
pub(crate) async fn postgres_commits(
    stage: &Stage,
    clients: usize,
    duration: Duration,
) -> Result<RawFigure, LoadError> {
    let url = stage.database_url.to_string();
    let failed = |what: &str| {
        let url = url.clone();
        let what = what.to_owned();
        move |source| LoadError::Database { url, what, source }
    };
    let max = u32::try_from(clients).unwrap_or(u32::MAX);
    let pool = PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(30))
        .connect(stage.database_url.expose())
        .await
        .map_err(failed("connecting"))?;
    let result = async {
        // Superuser-reserved slots are not counted as free: they are the
        // operator's.
        let free: i64 = sqlx::query_scalar(
            "SELECT current_setting('max_connections')::int8 \
             - current_setting('superuser_reserved_connections')::int8 \
             - (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend') + 1",
        )
        .fetch_one(&pool)
        .await
        .map_err(failed("counting free connections"))?;
        let connections = raw_connections(clients, usize::try_from(free).unwrap_or(0));
        if connections < clients {
            tracing::info!(
                clients,
                connections,
                "the raw commits use fewer connections: the server has no more free"
            );
        }
        sqlx::query(SCRATCH_TABLE)
            .execute(&pool)
            .await
            .map_err(failed("creating the scratch table"))?;
        // Every connection open before the clock starts: opening them is
        // not committing.
        let mut opened = Vec::with_capacity(connections);
        for _ in 0..connections {
            opened.push(pool.acquire().await.map_err(failed("connecting"))?);
        }
        let commits = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let end = started + duration;
        let mut tasks = JoinSet::new();
        for (client, mut conn) in opened.into_iter().enumerate() {
            let commits = commits.clone();
            let client = i32::try_from(client).unwrap_or(i32::MAX);
            tasks.spawn(async move {
                while Instant::now() < end {
                    sqlx::query(SCRATCH_INSERT).bind(client).execute(&mut *conn).await?;
                    commits.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<(), sqlx::Error>(())
            });
        }
        let mut first_error = None;
        while let Some(joined) = tasks.join_next().await {
            if let Ok(Err(error)) = joined {
                first_error.get_or_insert(error);
            }
        }
        if let Some(error) = first_error {
            return Err(failed("inserting")(error));
        }
        Ok(RawFigure::new(
            commits.load(Ordering::Relaxed),
            started.elapsed(),
            connections,
        ))
    }
    .await;
    pool.close().await;
    result
}

/// `clients` publishers sending persistent messages with publisher confirms
/// (saga-amqp's transport, the one the services use) for `duration` to one
/// durable queue, and one subscriber consuming and acking each. The figure
/// is messages consumed and acked per second, up to the last one.
pub(crate) async fn amqp_messages(
    stage: &Stage,
    clients: usize,
    duration: Duration,
    drain: Duration,
) -> Result<RawFigure, LoadError> {
    let failed = |what: &str| stage.broker_failed(what);
    let transport = Arc::new(stage.scratch_transport("load-test-raw").await?);
    let result = async {
        let mut subscription = transport
            .subscribe(&stage.raw_queue)
            .await
            .map_err(|e| failed("consuming the scratch queue")(Box::new(e)))?;
        // One message through before the clock starts: the publishing
        // connection opens on first use, and opening it is not publishing.
        let first = Message::new("Raw", stage.raw_exchange.as_str(), vec![b'x'; 128]);
        transport
            .publish(&first)
            .await
            .map_err(|e| failed("publishing to the scratch queue")(Box::new(e)))?;
        match tokio::time::timeout(drain, subscription.next()).await {
            Ok(Some(Ok(delivery))) => delivery
                .settle
                .settle(Settlement::Ack)
                .await
                .map_err(|e| failed("acking")(Box::new(e)))?,
            Ok(Some(Err(error))) => return Err(failed("consuming")(Box::new(error))),
            Ok(None) | Err(_) => {
                return Err(failed("consuming")(Box::new(saga_core::TransportError::Unavailable(
                    "the first message did not come back".into(),
                ))));
            }
        }
        let published = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let end = started + duration;
        let mut publishers = JoinSet::new();
        for _ in 0..clients {
            let (transport, published) = (transport.clone(), published.clone());
            let exchange = stage.raw_exchange.clone();
            publishers.spawn(async move {
                while Instant::now() < end {
                    let message = Message::new("Raw", exchange.as_str(), vec![b'x'; 128]);
                    transport.publish(&message).await?;
                    published.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<(), saga_core::TransportError>(())
            });
        }
        let consume = async {
            let mut consumed = 0u64;
            let mut last = started;
            let give_up = end + drain;
            while Instant::now() < give_up {
                let publishing = Instant::now() < end || !publishers.is_empty();
                if !publishing && consumed >= published.load(Ordering::Relaxed) {
                    break;
                }
                while publishers.try_join_next().is_some() {}
                match tokio::time::timeout(Duration::from_millis(200), subscription.next()).await {
                    Ok(Some(Ok(delivery))) => {
                        delivery
                            .settle
                            .settle(Settlement::Ack)
                            .await
                            .map_err(|e| failed("acking")(Box::new(e)))?;
                        consumed += 1;
                        last = Instant::now();
                    }
                    Ok(Some(Err(error))) => return Err(failed("consuming")(Box::new(error))),
                    Ok(None) => break,
                    Err(_) => {}
                }
            }
            Ok(RawFigure::new(
                consumed,
                last.saturating_duration_since(started),
                clients,
            ))
        };
        let figure = consume.await;
        publishers.abort_all();
        figure
    }
    .await;
    transport.close().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durability_is_relaxed_by_asynchronous_commits_or_no_fsync() {
        let settings = |synchronous_commit: &str, fsync: &str| Durability {
            synchronous_commit: synchronous_commit.to_owned(),
            fsync: fsync.to_owned(),
        };
        assert_eq!(settings("on", "on").relaxed(), None);
        assert_eq!(settings("remote_apply", "on").relaxed(), None);
        assert_eq!(settings("", "").relaxed(), None, "not read");
        assert_eq!(
            settings("off", "on").relaxed().as_deref(),
            Some("synchronous_commit=off")
        );
        assert_eq!(
            settings("local", "off").relaxed().as_deref(),
            Some("synchronous_commit=local, fsync=off")
        );
    }

    #[test]
    fn pooled_figures_are_all_operations_over_all_time() {
        let before = RawFigure::new(3_000, Duration::from_secs(1), 64);
        let after = RawFigure::new(1_000, Duration::from_secs(1), 56);
        let pooled = before.pooled(after);
        assert_eq!((pooled.operations, pooled.seconds), (4_000, 2.0));
        assert!((pooled.per_second - 2_000.0).abs() < 1e-9);
        assert_eq!(pooled.measured_per_second, vec![3_000.0, 1_000.0]);
        assert_eq!(pooled.concurrency, 56, "the fewer connections of the two");
        // Rates weigh by time: a longer measurement counts for more.
        let long =
            RawFigure::new(9_000, Duration::from_secs(3), 1).pooled(RawFigure::new(1_000, Duration::from_secs(1), 1));
        assert!((long.per_second - 2_500.0).abs() < 1e-9);
    }

    #[test]
    fn raw_commits_use_a_connection_per_client_while_the_server_has_them() {
        assert_eq!(raw_connections(32, 97), 32);
        assert_eq!(raw_connections(89, 97), 89);
        // 128 clients, 57 free: 8 are left to the services and the sampler.
        assert_eq!(raw_connections(128, 57), 49);
        assert_eq!(raw_connections(128, 3), 1, "at least one");
    }
}
