//! The machine's latency floor, measured in the same run: how long one
//! single-row INSERT commit, and one broker hop (a persistent message
//! published with confirm, until it is delivered), take one at a time.
//!
//! A saga's way from `CreateOrder` to `OrderConfirmed` holds three commits
//! and three hops, each waiting for the one before, so three of each is the
//! least any saga can take on this machine: the latency figures'
//! counterpart of the throughput ceiling. The raw ceilings hide the disk's
//! flush latency behind group commit; the floor does not, so a slow disk
//! shows here.

use std::time::Duration;

use saga_core::{Message, Publisher, Settlement, Subscriber, Subscription};
use serde::Serialize;
use tokio::time::Instant;

use super::error::LoadError;
use super::raw;
use super::report::{COMMITS_PER_SAGA, MESSAGES_PER_SAGA, Percentiles};
use super::stage::Stage;

/// The longest the floor is measured each time, whatever `--raw-duration`:
/// a few thousand operations are plenty for a median and a 99th percentile.
pub(crate) const MOST: Duration = Duration::from_secs(2);

/// How long one hop may take before the measurement gives up.
const HOP_PATIENCE: Duration = Duration::from_secs(10);

/// Operations timed one at a time.
#[derive(Clone, Debug, Serialize)]
pub struct OneAtATime {
    /// Operations timed.
    pub operations: u64,
    /// Their latencies.
    pub ms: Percentiles,
    /// The latencies in microseconds, sorted, for pooling.
    #[serde(skip)]
    sorted_us: Vec<u64>,
}

impl OneAtATime {
    fn new(mut us: Vec<u64>) -> Self {
        us.sort_unstable();
        Self {
            operations: us.len() as u64,
            ms: Percentiles::of_sorted_micros(&us),
            sorted_us: us,
        }
    }

    /// `self` and `later` as one figure: all their operations' latencies.
    fn pooled(self, later: Self) -> Self {
        let mut us = self.sorted_us;
        us.extend(later.sorted_us);
        Self::new(us)
    }
}

/// The least a saga can take here: its commits and hops one after another,
/// each at its median measured one at a time.
#[derive(Clone, Debug, Serialize)]
pub struct LatencyFloor {
    /// A single-row INSERT committed (autocommit) on one connection.
    pub postgres_commit: OneAtATime,
    /// A persistent message published with confirm (saga-amqp's transport,
    /// the services' own) until a consumer has it.
    pub rabbitmq_hop: OneAtATime,
    /// Commits one after another on a saga's way (see [`COMMITS_PER_SAGA`]).
    pub commits_per_saga: u32,
    /// Hops one after another on a saga's way (see [`MESSAGES_PER_SAGA`]).
    pub hops_per_saga: u32,
    /// `commits × the commit's median + hops × the hop's median`, ms.
    pub saga_ms: f64,
}

impl LatencyFloor {
    fn new(postgres_commit: OneAtATime, rabbitmq_hop: OneAtATime) -> Self {
        let saga_ms =
            f64::from(COMMITS_PER_SAGA) * postgres_commit.ms.p50 + f64::from(MESSAGES_PER_SAGA) * rabbitmq_hop.ms.p50;
        Self {
            postgres_commit,
            rabbitmq_hop,
            commits_per_saga: COMMITS_PER_SAGA,
            hops_per_saga: MESSAGES_PER_SAGA,
            saga_ms,
        }
    }

    /// `self` and `later` as one floor: both measurements' latencies.
    pub(crate) fn pooled(self, later: Self) -> Self {
        Self::new(
            self.postgres_commit.pooled(later.postgres_commit),
            self.rabbitmq_hop.pooled(later.rabbitmq_hop),
        )
    }

    /// `latency_ms` over the floor, if the floor was measured at all.
    pub(crate) fn multiple(&self, latency_ms: f64) -> Option<f64> {
        (self.saga_ms > 0.0).then(|| latency_ms / self.saga_ms)
    }

    /// One line of the text summary.
    pub(crate) fn render(&self) -> String {
        let (c, h) = (&self.postgres_commit, &self.rabbitmq_hop);
        format!(
            "latency floor: {} commits and {} broker hops in turn = {:.2} ms (one at a time: commit p50 {:.2} / p99 \
             {:.2} ms over {}, publish -> delivered p50 {:.2} / p99 {:.2} ms over {})",
            self.commits_per_saga,
            self.hops_per_saga,
            self.saga_ms,
            c.ms.p50,
            c.ms.p99,
            c.operations,
            h.ms.p50,
            h.ms.p99,
            h.operations
        )
    }
}

/// Measures the floor for `duration` each (commits, then hops).
pub(crate) async fn measure(stage: &Stage, duration: Duration) -> Result<LatencyFloor, LoadError> {
    let commits = commits(stage, duration).await?;
    let hops = hops(stage, duration).await?;
    Ok(LatencyFloor::new(commits, hops))
}

/// The raw commits' single-row INSERTs, committed one after another on one
/// connection.
async fn commits(stage: &Stage, duration: Duration) -> Result<OneAtATime, LoadError> {
    stage
        .on_database("timing single commits", async |conn| {
            sqlx::query(raw::SCRATCH_TABLE).execute(&mut *conn).await?;
            let mut us = Vec::new();
            let end = Instant::now() + duration;
            while Instant::now() < end {
                let started = Instant::now();
                sqlx::query(raw::SCRATCH_INSERT).bind(0).execute(&mut *conn).await?;
                us.push(micros(started.elapsed()));
            }
            Ok(OneAtATime::new(us))
        })
        .await
}

/// Persistent messages published with confirm to a scratch queue one after
/// another, each timed until it is delivered. Each carries its number, so a
/// message left over from the raw ceiling's measurement is acked and passed
/// over, not timed.
async fn hops(stage: &Stage, duration: Duration) -> Result<OneAtATime, LoadError> {
    let failed = |what: &str| stage.broker_failed(what);
    let transport = stage.scratch_transport("load-test-floor").await?;
    let result = async {
        let mut subscription = transport
            .subscribe(&stage.raw_queue)
            .await
            .map_err(|e| failed("consuming the scratch queue")(Box::new(e)))?;
        let mut us = Vec::new();
        let end = Instant::now() + duration;
        let mut number = 0u64;
        while Instant::now() < end {
            number += 1;
            let tag = number.to_be_bytes().to_vec();
            let message = Message::new("RawHop", stage.raw_exchange.as_str(), tag.clone());
            let started = Instant::now();
            let (published, delivered) = tokio::join!(
                transport.publish(&message),
                tokio::time::timeout(HOP_PATIENCE, delivery_of(&mut *subscription, &tag))
            );
            published.map_err(|e| failed("publishing")(Box::new(e)))?;
            let at = delivered
                .map_err(|_| failed("waiting for a delivery")(format!("none within {HOP_PATIENCE:?}").into()))?
                .map_err(failed("consuming"))?;
            us.push(micros(at.saturating_duration_since(started)));
        }
        Ok(OneAtATime::new(us))
    }
    .await;
    transport.close().await;
    result
}

/// Waits for the delivery whose payload is `tag`; returns when it arrived.
/// Every delivery is acked, the awaited one after its time is taken.
async fn delivery_of(subscription: &mut dyn Subscription, tag: &[u8]) -> Result<Instant, saga_core::BoxError> {
    loop {
        let delivery = match subscription.next().await {
            Some(Ok(delivery)) => delivery,
            Some(Err(error)) => return Err(Box::new(error)),
            None => return Err("the subscription ended".into()),
        };
        let arrived = Instant::now();
        delivery
            .settle
            .settle(Settlement::Ack)
            .await
            .map_err(|e| Box::new(e) as saga_core::BoxError)?;
        if delivery.message.payload == tag {
            return Ok(arrived);
        }
    }
}

fn micros(elapsed: Duration) -> u64 {
    u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timed(us: &[u64]) -> OneAtATime {
        OneAtATime::new(us.to_vec())
    }

    #[test]
    fn the_floor_is_three_commits_and_three_hops_at_their_medians() {
        // Medians 1.0 ms and 0.5 ms; the slow outliers move only the p99.
        let floor = LatencyFloor::new(timed(&[900, 1_000, 1_100, 9_000]), timed(&[400, 500, 600, 7_000]));
        assert_eq!((floor.commits_per_saga, floor.hops_per_saga), (3, 3));
        assert!((floor.saga_ms - 4.5).abs() < 1e-9, "{floor:?}");
        assert_eq!(floor.postgres_commit.ms.p99, 9.0);
        assert_eq!(floor.multiple(9.0), Some(2.0));
    }

    #[test]
    fn pooled_floors_take_every_latency_of_both() {
        let before = LatencyFloor::new(timed(&[3_000, 1_000]), timed(&[500]));
        let after = LatencyFloor::new(timed(&[2_000]), timed(&[700, 900]));
        let pooled = before.pooled(after);
        assert_eq!(pooled.postgres_commit.operations, 3);
        assert_eq!(pooled.postgres_commit.ms.p50, 2.0, "the median of all three");
        assert_eq!(pooled.rabbitmq_hop.ms.p50, 0.7);
        assert!((pooled.saga_ms - (6.0 + 2.1)).abs() < 1e-9, "{pooled:?}");
    }

    #[test]
    fn nothing_measured_is_no_floor_to_compare_with() {
        let floor = LatencyFloor::new(timed(&[]), timed(&[]));
        assert_eq!(floor.saga_ms, 0.0);
        assert_eq!(floor.multiple(10.0), None);
    }

    #[test]
    fn the_summary_line_names_both_parts() {
        let line = LatencyFloor::new(timed(&[1_000]), timed(&[500])).render();
        assert!(line.contains("= 4.50 ms"), "{line}");
        assert!(line.contains("commit p50 1.00"), "{line}");
        assert!(line.contains("publish -> delivered p50 0.50"), "{line}");
    }
}
