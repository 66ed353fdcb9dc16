//! The outbox relay: publishes committed messages and marks them sent only
//! after the broker confirmed them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::id::SagaId;
use crate::store::{OutboxEntry, OutboxId, OutboxStore, StoreError};
use crate::transport::Publisher;

/// How a relay runs.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// Messages claimed per round.
    pub batch_size: usize,
    /// How long a claim keeps other relays off the claimed messages.
    pub lease: Duration,
    /// The longest wait between rounds when no notification arrives.
    pub poll_interval: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 256,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_millis(500),
        }
    }
}

/// What one relay round did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayRound {
    /// Messages claimed.
    pub claimed: usize,
    /// Messages the broker confirmed and that are now marked sent.
    pub sent: usize,
    /// Messages that failed to publish and were given back.
    pub failed: usize,
}

/// Moves messages from the outbox to the transport.
///
/// Delivery is at least once: a relay that dies after publishing but before
/// marking leaves the message to be published again, with the same id.
/// Messages of one saga are published in outbox order; different sagas'
/// messages are published concurrently (confirms pipelined).
#[derive(Clone)]
pub struct Relay {
    outbox: Arc<dyn OutboxStore>,
    publisher: Arc<dyn Publisher>,
    config: RelayConfig,
}

impl Relay {
    /// A relay from `outbox` to `publisher`.
    pub fn new(outbox: Arc<dyn OutboxStore>, publisher: Arc<dyn Publisher>, config: RelayConfig) -> Self {
        Self {
            outbox,
            publisher,
            config,
        }
    }

    /// Claims one batch, publishes it, and marks what was confirmed.
    pub async fn run_once(&self) -> Result<RelayRound, StoreError> {
        let entries = self.outbox.claim(self.config.batch_size, self.config.lease).await?;
        if entries.is_empty() {
            return Ok(RelayRound::default());
        }
        let claimed = entries.len();
        let (sent, failed) = self.publish_all(entries).await;
        metrics::counter!("saga_outbox_published_total").increment(sent.len() as u64);
        if !failed.is_empty() {
            metrics::counter!("saga_outbox_publish_failures_total").increment(failed.len() as u64);
        }
        if !sent.is_empty() {
            self.outbox.mark_sent(&sent).await?;
        }
        if !failed.is_empty() {
            self.outbox.release(&failed).await?;
        }
        Ok(RelayRound {
            claimed,
            sent: sent.len(),
            failed: failed.len(),
        })
    }

    async fn publish_all(&self, entries: Vec<OutboxEntry>) -> (Vec<OutboxId>, Vec<OutboxId>) {
        let groups = group_by_saga(entries);
        let mut sent = Vec::new();
        let mut failed = Vec::new();
        if groups.len() == 1 {
            for group in groups {
                let (s, f) = publish_in_order(self.publisher.as_ref(), group).await;
                sent.extend(s);
                failed.extend(f);
            }
            return (sent, failed);
        }
        let mut tasks = JoinSet::new();
        for group in groups {
            let publisher = Arc::clone(&self.publisher);
            tasks.spawn(async move { publish_in_order(publisher.as_ref(), group).await });
        }
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((s, f)) => {
                    sent.extend(s);
                    failed.extend(f);
                }
                // A panicking publisher loses nothing: the claim's lease runs out.
                Err(e) => tracing::error!(error = %e, "a publishing task failed"),
            }
        }
        (sent, failed)
    }

    /// Runs rounds until `shutdown` is cancelled, waking on outbox
    /// notifications and polling as the fallback.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(50);
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            match self.run_once().await {
                Ok(round) if round.failed > 0 => {
                    tracing::warn!(failed = round.failed, "publishing failed; backing off");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Ok(round) if round.claimed > 0 => backoff = Duration::from_millis(50),
                Ok(_) => {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = self.outbox.wait_for_messages(self.config.poll_interval) => {}
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "outbox unavailable; backing off");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// Splits a batch into per-saga runs, keeping outbox order inside each.
fn group_by_saga(entries: Vec<OutboxEntry>) -> Vec<Vec<OutboxEntry>> {
    let mut index: HashMap<SagaId, usize> = HashMap::new();
    let mut groups: Vec<Vec<OutboxEntry>> = Vec::new();
    for entry in entries {
        match entry.saga {
            Some(saga) => {
                let slot = *index.entry(saga).or_insert_with(|| {
                    groups.push(Vec::new());
                    groups.len() - 1
                });
                groups[slot].push(entry);
            }
            None => groups.push(vec![entry]),
        }
    }
    groups
}

/// Publishes a saga's messages in order; after a failure the rest wait, so
/// order is kept.
async fn publish_in_order(publisher: &dyn Publisher, group: Vec<OutboxEntry>) -> (Vec<OutboxId>, Vec<OutboxId>) {
    let mut sent = Vec::with_capacity(group.len());
    let mut failed = Vec::new();
    let mut broken = false;
    for entry in group {
        if broken {
            failed.push(entry.id);
            continue;
        }
        match publisher.publish(&entry.message).await {
            Ok(()) => sent.push(entry.id),
            Err(e) => {
                tracing::warn!(message_id = %entry.message.id, error = %e, "publish failed");
                broken = true;
                failed.push(entry.id);
            }
        }
    }
    (sent, failed)
}
