//! The acks of one consumer channel, coalesced.
//!
//! RabbitMQ spends about a third of a message's CPU on its ack when every
//! delivery is acked with a frame of its own (docs/performance.md). Deliveries
//! are often settled together (a group commit finishes many transitions at
//! once), so their acks share one `basic.ack` with `multiple`, which acks every
//! outstanding delivery of the channel up to its tag. That is right only if
//! no earlier delivery is still being handled: the window knows which are
//! open, sends the acks below the oldest open one as one frame, and the acks
//! above it each alone, at once, so a slow delivery holds no other back.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use lapin::Acker;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::DeliveryTag;
use saga_core::TransportError;
use tokio::sync::oneshot;

use crate::error::{unavailable, within};

/// Acks a transport has sent: how many `basic.ack` frames, for how many
/// deliveries (see [`AmqpTransport::acks_sent`](crate::AmqpTransport::acks_sent)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AcksSent {
    /// `basic.ack` frames.
    pub frames: u64,
    /// Deliveries acked by them.
    pub deliveries: u64,
}

/// The running count behind [`AcksSent`], shared by a transport's channels.
#[derive(Debug, Default)]
pub(crate) struct AckTally {
    frames: AtomicU64,
    deliveries: AtomicU64,
}

impl AckTally {
    pub(crate) fn get(&self) -> AcksSent {
        AcksSent {
            frames: self.frames.load(Ordering::Relaxed),
            deliveries: self.deliveries.load(Ordering::Relaxed),
        }
    }
}

/// The deliveries of one channel: which are open, which wait for their ack.
#[derive(Debug)]
pub(crate) struct AckWindow {
    state: Mutex<State>,
    tally: Arc<AckTally>,
}

#[derive(Debug, Default)]
struct State {
    /// Delivered and neither acked nor given back (nor forwarded) yet.
    open: BTreeSet<DeliveryTag>,
    /// Settled with an ack that is not sent yet.
    waiting: BTreeMap<DeliveryTag, Waiting>,
    /// Whether a task is sending the waiting acks.
    sending: bool,
}

#[derive(Debug)]
struct Waiting {
    acker: Acker,
    sent: oneshot::Sender<Result<(), String>>,
}

impl AckWindow {
    pub(crate) fn new(tally: Arc<AckTally>) -> Self {
        Self {
            state: Mutex::default(),
            tally,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a delivery handed to the consumer.
    pub(crate) fn opened(&self, tag: DeliveryTag) {
        self.state().open.insert(tag);
    }

    /// Records a delivery settled without [`ack`](Self::ack), once its frame
    /// is sent: later acks with `multiple` may cover its tag from then on.
    /// A tag whose frame is not known sent stays open: that frame could
    /// still reach the broker after a `multiple` ack covered the tag (acking
    /// a message meant to go back, then failing the channel), so later acks
    /// of the channel go alone: slower, still right.
    fn closed(&self, tag: DeliveryTag) {
        self.state().open.remove(&tag);
    }

    /// Gives the delivery `tag` back to its queue, and closes its tag if
    /// the nack was sent: not when its acker was used already (an ack or
    /// nack of it may still be on its way), the channel is gone (and with it
    /// the delivery: the broker requeues it) or the nack took longer than
    /// `limit` (it may still go).
    pub(crate) async fn give_back(&self, tag: DeliveryTag, acker: &Acker, limit: Duration) {
        let requeue = BasicNackOptions {
            multiple: false,
            requeue: true,
        };
        match within(limit, "requeueing", acker.nack(requeue))
            .await
            .and_then(|r| r.map_err(unavailable))
        {
            Ok(true) => self.closed(tag),
            Ok(false) => {}
            Err(error) => tracing::debug!(%error, "requeueing a delivery failed"),
        }
    }

    /// Acks the delivery `tag`, with the acks settled alongside it, and
    /// returns once its frame is sent (as [`Acker::ack`] does).
    pub(crate) async fn ack(
        self: &Arc<Self>,
        tag: DeliveryTag,
        acker: Acker,
        limit: Duration,
    ) -> Result<(), TransportError> {
        let (sent, outcome) = oneshot::channel();
        let lead = {
            let mut state = self.state();
            state.open.remove(&tag);
            state.waiting.insert(tag, Waiting { acker, sent });
            !std::mem::replace(&mut state.sending, true)
        };
        if lead {
            // A task of its own sends, until none wait: no handler is kept
            // sending for others, and a cancelled one strands no acks. The
            // settlements woken with this one join while it is scheduled.
            let window = Arc::clone(self);
            tokio::spawn(async move { while window.send_round(limit).await {} });
        }
        match outcome.await {
            Ok(result) => result.map_err(|reason| TransportError::Unavailable(reason.into())),
            Err(_) => Err(TransportError::Unavailable(
                "the ack was not sent; the broker delivers the message again".into(),
            )),
        }
    }

    /// Acks the delivery `tag`, settled by forwarding it (retried or
    /// dead-lettered: published anew first), with a frame of its own,
    /// counted with the others; closes its tag once the frame is sent.
    pub(crate) async fn ack_forwarded(
        &self,
        tag: DeliveryTag,
        acker: &Acker,
        limit: Duration,
    ) -> Result<(), TransportError> {
        self.tally.frames.fetch_add(1, Ordering::Relaxed);
        self.tally.deliveries.fetch_add(1, Ordering::Relaxed);
        send_ack(acker, false, limit).await?;
        self.closed(tag);
        Ok(())
    }

    /// Sends the acks waiting now; returns whether more wait (and the
    /// caller must go on sending).
    async fn send_round(&self, limit: Duration) -> bool {
        let (together, alone) = {
            let mut state = self.state();
            let mut together = std::mem::take(&mut state.waiting);
            let alone = match state.open.first() {
                Some(&oldest_open) => together.split_off(&oldest_open),
                None => BTreeMap::new(),
            };
            (together, alone)
        };
        let frames = u64::from(!together.is_empty()) + alone.len() as u64;
        self.tally.frames.fetch_add(frames, Ordering::Relaxed);
        let deliveries = (together.len() + alone.len()) as u64;
        self.tally.deliveries.fetch_add(deliveries, Ordering::Relaxed);
        let mut together = together.into_values();
        if let Some(last) = together.next_back() {
            let result = send_ack(&last.acker, true, limit).await.map_err(|e| e.to_string());
            for waiting in together {
                let _ = waiting.sent.send(result.clone());
            }
            let _ = last.sent.send(result);
        }
        for waiting in alone.into_values() {
            let result = send_ack(&waiting.acker, false, limit).await.map_err(|e| e.to_string());
            let _ = waiting.sent.send(result);
        }
        let mut state = self.state();
        state.sending = !state.waiting.is_empty();
        state.sending
    }
}

/// Acks `acker`'s delivery (and with `multiple`, every earlier one of its
/// channel) and returns once the frame is sent.
async fn send_ack(acker: &Acker, multiple: bool, limit: Duration) -> Result<(), TransportError> {
    match within(limit, "acking", acker.ack(BasicAckOptions { multiple })).await? {
        Ok(true) => Ok(()),
        Ok(false) => Err(TransportError::Unavailable(
            "the channel closed before the ack; the broker delivers the message again".into(),
        )),
        Err(e) => Err(unavailable(e)),
    }
}
