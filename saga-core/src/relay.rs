//! The outbox relay: publishes committed messages and marks them sent only
//! after the broker confirmed them.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::id::SagaId;
use crate::store::{OutboxEntry, OutboxId, OutboxStore, StoreError};
use crate::telemetry;
use crate::transport::{Publisher, TransportError};

/// How a relay runs.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// Messages claimed per round (at least 1).
    pub batch_size: usize,
    /// How long a claim keeps other relays off the claimed messages. It is
    /// also how long the messages of a relay that dies mid-round (a killed
    /// process) wait before another relay, or the restarted one, takes
    /// them: keep it short. A round publishes for at most three quarters of
    /// it, then gives back what is still unconfirmed, so a live relay never
    /// publishes messages whose lease may have passed to another. A message
    /// the broker refuses keeps its lease, and is published again when it
    /// ends: the lease is also how often a refused message is tried. (An
    /// operator giving up a saga's message gives the leases of its later
    /// ones back: one a relay is publishing at that moment may go twice.)
    /// At least [`MIN_LEASE`].
    pub lease: Duration,
    /// The longest wait between rounds when no notification arrives. At
    /// least [`MIN_POLL_INTERVAL`].
    pub poll_interval: Duration,
    /// Rounds [`Relay::run`] keeps publishing at once: while one waits for
    /// confirms, the next claims and publishes what was committed
    /// meanwhile. A round marks its messages sent without holding its place
    /// (a store may wait to gather several rounds' marks). A claim never
    /// hands out a saga's message while an earlier one of it is held, so
    /// order per saga holds.
    pub rounds_in_flight: usize,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 256,
            lease: Duration::from_secs(5),
            poll_interval: Duration::from_millis(500),
            rounds_in_flight: 4,
        }
    }
}

/// The relay's first wait after trouble; it doubles, up to 5 s, while
/// rounds keep failing.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);

/// The shortest lease a relay takes: with none, every round would give its
/// batch back before publishing, and claims would not keep relays apart.
pub const MIN_LEASE: Duration = Duration::from_millis(100);

/// The shortest wait between an idle relay's polls, so one never polls its
/// store in a tight loop.
pub const MIN_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// How often a relay whose publisher is held back looks again.
const HELD_BACK_CHECK: Duration = Duration::from_millis(100);

/// A relay's hold by its publisher, logged and counted in
/// [`telemetry::RELAY_HELD_BACK`] once per hold; a relay that stops while held takes
/// its part of the count with it.
struct Hold {
    on: bool,
}

impl Default for Hold {
    fn default() -> Self {
        // Present from the start, so an alert on it needs no `absent()`.
        metrics::gauge!(telemetry::RELAY_HELD_BACK).increment(0.0);
        Self { on: false }
    }
}

impl Hold {
    fn set(&mut self, on: bool) {
        if std::mem::replace(&mut self.on, on) == on {
            return;
        }
        if on {
            tracing::warn!("the broker holds publishing back; the relay claims nothing until it lets go");
            metrics::gauge!(telemetry::RELAY_HELD_BACK).increment(1.0);
        } else {
            tracing::info!("the broker lets publishing go again; the relay claims again");
            metrics::gauge!(telemetry::RELAY_HELD_BACK).decrement(1.0);
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if self.on {
            metrics::gauge!(telemetry::RELAY_HELD_BACK).decrement(1.0);
        }
    }
}

/// A message the broker confirmed, and how long that took from the publish.
struct Confirmed {
    id: OutboxId,
    took: Duration,
}

/// What publishing a batch came to.
#[derive(Default)]
struct Published {
    sent: Vec<Confirmed>,
    /// Not sent for the transport's state (unavailable, closed), or behind
    /// such a message of their saga: given back at once, and the relay backs
    /// off.
    failed: Vec<OutboxId>,
    /// Refused by the broker (unroutable, negatively confirmed, too large,
    /// an unknown destination), or behind such a message of their saga: left
    /// leased, so they are tried again when the lease ends, one message's
    /// trouble and not the relay's. Given back at once, a message the broker
    /// will never take would be claimed again at once, and each round that
    /// met it would hold every other message back for the relay's back-off.
    refused: Vec<OutboxId>,
}

/// What one relay round did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayRound {
    /// Messages claimed.
    pub claimed: usize,
    /// Messages the broker confirmed and that are now marked sent.
    pub sent: usize,
    /// Messages that failed to publish for the transport's state (and the
    /// later ones of their sagas), given back at once.
    pub failed: usize,
    /// Messages the broker refused (and the later ones of their sagas),
    /// left leased: they are tried again when their lease ends.
    pub refused: usize,
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
    pub fn new(outbox: Arc<dyn OutboxStore>, publisher: Arc<dyn Publisher>, mut config: RelayConfig) -> Self {
        // A claim of none would find nothing ever, and the relay would spin.
        config.batch_size = config.batch_size.max(1);
        config.lease = config.lease.max(MIN_LEASE);
        config.poll_interval = config.poll_interval.max(MIN_POLL_INTERVAL);
        Self {
            outbox,
            publisher,
            config,
        }
    }

    /// Claims one batch, publishes it, and marks what was confirmed.
    pub async fn run_once(&self) -> Result<RelayRound, StoreError> {
        let entries = self.outbox.claim(self.config.batch_size, self.config.lease).await?;
        self.deliver(entries, None).await
    }

    /// Publishes a claimed batch, marks what was confirmed and gives back
    /// the rest. `slot` is let go once publishing is over: marking need not
    /// hold up the next round.
    async fn deliver(
        &self,
        entries: Vec<OutboxEntry>,
        slot: Option<OwnedSemaphorePermit>,
    ) -> Result<RelayRound, StoreError> {
        if entries.is_empty() {
            return Ok(RelayRound::default());
        }
        let claimed = entries.len();
        let ids: Vec<OutboxId> = entries.iter().map(|entry| entry.id).collect();
        let budget = self.config.lease.mul_f64(0.75);
        // Filled as answers come, so a round cut short keeps what it learnt.
        let answers = Arc::new(Mutex::new(Published::default()));
        let finished = tokio::time::timeout(budget, self.publish_all(entries, Arc::clone(&answers)))
            .await
            .is_ok();
        let mut published = std::mem::take(&mut *answers.lock().unwrap_or_else(PoisonError::into_inner));
        if !finished {
            // Confirms not back in time: what has no answer yet is given
            // back, and goes out again with the same id (it may have been
            // published meanwhile). What was confirmed is kept as sent, and
            // what the broker refused keeps its lease.
            let answered: HashSet<OutboxId> = published
                .sent
                .iter()
                .map(|confirmed| confirmed.id)
                .chain(published.refused.iter().copied())
                .chain(published.failed.iter().copied())
                .collect();
            let unanswered: Vec<OutboxId> = ids.into_iter().filter(|id| !answered.contains(id)).collect();
            tracing::warn!(
                claimed,
                unanswered = unanswered.len(),
                ?budget,
                "publishing outlasted the claim's budget; giving back what has no confirm"
            );
            published.failed.extend(unanswered);
        }
        let Published { sent, failed, refused } = published;
        drop(slot);
        let unsent = failed.len() + refused.len();
        if unsent > 0 {
            metrics::counter!(telemetry::OUTBOX_PUBLISH_FAILURES_TOTAL).increment(unsent as u64);
        }
        if !refused.is_empty() {
            metrics::counter!(telemetry::OUTBOX_REFUSED_TOTAL).increment(refused.len() as u64);
        }
        let sent_ids: Vec<OutboxId> = sent.iter().map(|confirmed| confirmed.id).collect();
        // Both, even if one fails: a failed message given back waits for no
        // lease, nor do the later messages of its saga.
        let marked = if sent_ids.is_empty() {
            Ok(())
        } else {
            self.outbox.mark_sent(&sent_ids).await
        };
        let released = if failed.is_empty() {
            Ok(())
        } else {
            self.outbox.release(&failed).await
        };
        // Counted once kept as sent: messages whose mark failed go out
        // again when their lease ends, and are counted then.
        if marked.is_ok() {
            metrics::counter!(telemetry::OUTBOX_PUBLISHED_TOTAL).increment(sent.len() as u64);
            for confirmed in &sent {
                metrics::histogram!(telemetry::OUTBOX_PUBLISH_SECONDS).record(confirmed.took.as_secs_f64());
            }
        }
        marked.and(released)?;
        Ok(RelayRound {
            claimed,
            sent: sent.len(),
            failed: failed.len(),
            refused: refused.len(),
        })
    }

    async fn publish_all(&self, entries: Vec<OutboxEntry>, answers: Arc<Mutex<Published>>) {
        let groups = group_by_saga(entries);
        if groups.len() == 1 {
            for group in groups {
                publish_in_order(self.publisher.as_ref(), group, &answers).await;
            }
            return;
        }
        let mut tasks = JoinSet::new();
        for group in groups {
            let (publisher, answers) = (Arc::clone(&self.publisher), Arc::clone(&answers));
            tasks.spawn(async move { publish_in_order(publisher.as_ref(), group, &answers).await });
        }
        while let Some(joined) = tasks.join_next().await {
            // A panicking publisher loses nothing: the claim's lease runs out.
            if let Err(e) = joined {
                tracing::error!(error = %e, "a publishing task failed");
            }
        }
    }

    /// Runs rounds until `shutdown` is cancelled (up to
    /// [`RelayConfig::rounds_in_flight`] at once), waking on outbox
    /// notifications and polling as the fallback. Rounds under way when
    /// `shutdown` comes are finished. While the publisher is
    /// [held back](Publisher::is_held_back) it claims nothing.
    pub async fn run(self, shutdown: CancellationToken) {
        // A round holds a slot while it publishes; marking sent goes on
        // without one (a store may wait to gather several rounds' marks).
        let slots = Arc::new(Semaphore::new(self.config.rounds_in_flight.max(1)));
        let mut rounds: JoinSet<Result<RelayRound, StoreError>> = JoinSet::new();
        let mut backoff = FIRST_BACKOFF;
        // A round that ended in trouble: back off before the next claim.
        let mut trouble = false;
        let mut hold = Hold::default();
        // Present from the start, so an alert on their increase sees the
        // first (the relay runs once a service has installed its recorder).
        metrics::counter!(telemetry::OUTBOX_REFUSED_TOTAL).increment(0);
        metrics::counter!(telemetry::OUTBOX_DISCARDED_TOTAL).increment(0);
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            while let Some(ended) = rounds.try_join_next() {
                trouble |= self.ended(ended, &mut backoff);
            }
            if std::mem::take(&mut trouble) {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
            let slot = tokio::select! {
                () = shutdown.cancelled() => break,
                // The semaphore is never closed.
                Ok(slot) = Arc::clone(&slots).acquire_owned() => slot,
                Some(ended) = rounds.join_next() => {
                    trouble = self.ended(ended, &mut backoff);
                    continue;
                }
            };
            // Looked at with a slot in hand: a round that gives its batch
            // back frees its slot, and the hold may have started meanwhile.
            hold.set(self.publisher.is_held_back());
            if hold.on {
                drop(slot);
                // Its publishes would wait for the broker past the claim's
                // budget, and be published again once given back: claim
                // nothing until the broker lets go.
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(HELD_BACK_CHECK) => {}
                    Some(ended) = rounds.join_next(), if !rounds.is_empty() => trouble = self.ended(ended, &mut backoff),
                }
                continue;
            }
            match self.outbox.claim(self.config.batch_size, self.config.lease).await {
                Ok(entries) if !entries.is_empty() => {
                    // The backoff is kept: what a failed round gave back is
                    // claimed again at once, and only a round that ends
                    // well shows that the broker is back.
                    let relay = self.clone();
                    rounds.spawn(async move { relay.deliver(entries, Some(slot)).await });
                    // Let the round start before claiming the next batch.
                    tokio::task::yield_now().await;
                }
                Ok(_) => {
                    // Nothing to claim: wait for news, or for a round to end
                    // (its failures may have given messages back).
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = self.outbox.wait_for_messages(self.config.poll_interval) => {}
                        Some(ended) = rounds.join_next(), if !rounds.is_empty() => trouble = self.ended(ended, &mut backoff),
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "outbox unavailable; backing off");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        while let Some(ended) = rounds.join_next().await {
            self.ended(ended, &mut backoff);
        }
    }

    /// Logs how a round ended; true if it had trouble (back off). A round
    /// without trouble sets `backoff` back to its first step.
    fn ended(
        &self,
        ended: Result<Result<RelayRound, StoreError>, tokio::task::JoinError>,
        backoff: &mut Duration,
    ) -> bool {
        match ended {
            Ok(Ok(round)) if round.failed > 0 => {
                tracing::warn!(failed = round.failed, ?backoff, "publishing failed; backing off");
                true
            }
            Ok(Ok(_)) => {
                *backoff = FIRST_BACKOFF;
                false
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "outbox unavailable; backing off");
                true
            }
            // A panicking round loses nothing: the claim's lease runs out.
            Err(e) => {
                tracing::error!(error = %e, "a relay round failed");
                true
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

/// Publishes a saga's messages in order into `answers`; after a failure
/// the rest wait with the failed one (given back or left leased alike), so
/// order is kept.
async fn publish_in_order(publisher: &dyn Publisher, group: Vec<OutboxEntry>, answers: &Mutex<Published>) {
    let answer = || answers.lock().unwrap_or_else(PoisonError::into_inner);
    let mut entries = group.into_iter();
    for entry in entries.by_ref() {
        let began = Instant::now();
        let Err(error) = publisher.publish(&entry.message).await else {
            let confirmed = Confirmed {
                id: entry.id,
                took: began.elapsed(),
            };
            answer().sent.push(confirmed);
            continue;
        };
        let refusal = refused(&error);
        if refusal {
            tracing::warn!(
                message_id = %entry.message.id,
                %error,
                "the broker refused a message; it is tried again when its lease ends"
            );
        } else {
            tracing::warn!(message_id = %entry.message.id, %error, "publish failed");
        }
        let held: Vec<OutboxId> = std::iter::once(entry.id).chain(entries.map(|rest| rest.id)).collect();
        let mut published = answer();
        if refusal {
            published.refused.extend(held);
        } else {
            published.failed.extend(held);
        }
        return;
    }
}

/// Whether a publish failed on the message rather than on the transport's
/// state: tried again at once, it would fail alike.
fn refused(error: &TransportError) -> bool {
    matches!(
        error,
        TransportError::Rejected { .. } | TransportError::UnknownAddress(_)
    )
}
