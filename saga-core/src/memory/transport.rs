use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use async_trait::async_trait;
use tokio::sync::Notify;

use crate::dead_letter::{
    DeadLetter, DeadLetterPage, DeadLetterQueue, Origin, ReplayFailure, ReplayReport, ReplaySelection,
};
use crate::message::Message;
use crate::transport::{
    DEAD_LETTER_REASON, Delivery, Publisher, Settle, Settlement, Subscriber, Subscription, TransportError,
};

struct Queued {
    message: Message,
    retries: u32,
}

#[derive(Default)]
struct Queue {
    items: Mutex<VecDeque<Queued>>,
    notify: Notify,
}

impl Queue {
    fn items(&self) -> MutexGuard<'_, VecDeque<Queued>> {
        self.items.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push_back(&self, queued: Queued) {
        self.items().push_back(queued);
        self.notify.notify_one();
    }

    fn push_front(&self, queued: Queued) {
        self.items().push_front(queued);
        self.notify.notify_one();
    }
}

#[derive(Default)]
struct Topology {
    /// Destination → queues bound to it (fanout).
    bindings: HashMap<String, Vec<Arc<Queue>>>,
    queues: HashMap<String, Arc<Queue>>,
}

/// Counts for one queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Messages waiting to be delivered.
    pub ready: usize,
    /// Messages in its dead-letter queue.
    pub dead_lettered: usize,
}

/// How long a message dead-lettered from a queue without a dead-letter
/// queue (a `.dlq` itself) waits before it is back in that queue.
const DEAD_LETTER_OF_A_DEAD_LETTER_HOLD: std::time::Duration = std::time::Duration::from_secs(1);

/// An in-process [`Transport`](crate::Transport) with fanout destinations,
/// competing consumers, delayed retries and a `<queue>.dlq` per queue, whose
/// messages it can browse and replay ([`DeadLetterQueue`]). A message
/// dead-lettered from a `.dlq` (which has none of its own) goes back to it
/// after a second.
///
/// Like a broker with publisher confirms and `mandatory`, publishing to an
/// unknown destination, or one with no queue bound, is an error. A delivery
/// dropped without being settled goes back to the front of its queue.
#[derive(Clone, Default)]
pub struct InMemoryTransport {
    topology: Arc<RwLock<Topology>>,
}

impl InMemoryTransport {
    /// An empty transport; declare queues and bindings before use.
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares `queue` (and its `<queue>.dlq`); idempotent.
    pub fn declare_queue(&self, queue: &str) -> &Self {
        let mut topology = self.topology.write().unwrap_or_else(|p| p.into_inner());
        for name in [queue.to_owned(), format!("{queue}.dlq")] {
            topology.queues.entry(name).or_default();
        }
        self
    }

    /// Declares `destination` and binds `queue` to it (declaring the queue);
    /// idempotent. Each bound queue gets a copy of every message.
    pub fn bind(&self, destination: &str, queue: &str) -> &Self {
        self.declare_queue(queue);
        let mut topology = self.topology.write().unwrap_or_else(|p| p.into_inner());
        let Some(target) = topology.queues.get(queue).cloned() else {
            return self;
        };
        let bound = topology.bindings.entry(destination.to_owned()).or_default();
        if !bound.iter().any(|q| Arc::ptr_eq(q, &target)) {
            bound.push(target);
        }
        self
    }

    /// Declares a destination with no queue bound yet.
    pub fn declare_destination(&self, destination: &str) -> &Self {
        let mut topology = self.topology.write().unwrap_or_else(|p| p.into_inner());
        topology.bindings.entry(destination.to_owned()).or_default();
        self
    }

    fn queue(&self, name: &str) -> Option<Arc<Queue>> {
        let topology = self.topology.read().unwrap_or_else(|p| p.into_inner());
        topology.queues.get(name).cloned()
    }

    /// Removes and returns every message waiting in `queue` (for tests and tools).
    pub fn take(&self, queue: &str) -> Vec<Message> {
        self.queue(queue)
            .map(|q| q.items().drain(..).map(|queued| queued.message).collect())
            .unwrap_or_default()
    }

    /// Counts for `queue`.
    pub fn stats(&self, queue: &str) -> QueueStats {
        let count = |name: &str| self.queue(name).map_or(0, |q| q.items().len());
        QueueStats {
            ready: count(queue),
            dead_lettered: count(&format!("{queue}.dlq")),
        }
    }
}

#[async_trait]
impl Publisher for InMemoryTransport {
    async fn publish(&self, message: &Message) -> Result<(), TransportError> {
        let queues = {
            let topology = self.topology.read().unwrap_or_else(|p| p.into_inner());
            topology
                .bindings
                .get(&message.destination)
                .cloned()
                .ok_or_else(|| TransportError::UnknownAddress(message.destination.clone()))?
        };
        if queues.is_empty() {
            return Err(TransportError::Rejected {
                id: message.id.to_string(),
                reason: format!("no queue is bound to `{}`", message.destination),
            });
        }
        for queue in queues {
            queue.push_back(Queued {
                message: message.clone(),
                retries: 0,
            });
        }
        Ok(())
    }
}

#[async_trait]
impl Subscriber for InMemoryTransport {
    async fn subscribe(&self, queue: &str) -> Result<Box<dyn Subscription>, TransportError> {
        let target = self
            .queue(queue)
            .ok_or_else(|| TransportError::UnknownAddress(queue.to_owned()))?;
        // A dead-letter queue has no dead-letter queue of its own.
        let dead_letters = self.queue(&format!("{queue}.dlq"));
        Ok(Box::new(InMemorySubscription {
            queue: target,
            dead_letters,
        }))
    }
}

struct InMemorySubscription {
    queue: Arc<Queue>,
    dead_letters: Option<Arc<Queue>>,
}

#[async_trait]
impl Subscription for InMemorySubscription {
    async fn next(&mut self) -> Option<Result<Delivery, TransportError>> {
        loop {
            let notified = self.queue.notify.notified();
            if let Some(queued) = self.queue.items().pop_front() {
                let retries = queued.retries;
                let message = queued.message.clone();
                return Some(Ok(Delivery {
                    message,
                    retries,
                    settle: Box::new(InMemorySettle {
                        queued: Some(queued),
                        queue: Arc::clone(&self.queue),
                        dead_letters: self.dead_letters.clone(),
                    }),
                }));
            }
            notified.await;
        }
    }
}

struct InMemorySettle {
    queued: Option<Queued>,
    queue: Arc<Queue>,
    dead_letters: Option<Arc<Queue>>,
}

#[async_trait]
impl Settle for InMemorySettle {
    async fn settle(mut self: Box<Self>, settlement: Settlement) -> Result<(), TransportError> {
        let Some(mut queued) = self.queued.take() else {
            return Ok(());
        };
        match settlement {
            Settlement::Ack => {}
            Settlement::Retry { delay } => {
                queued.retries += 1;
                let queue = Arc::clone(&self.queue);
                if delay.is_zero() {
                    queue.push_back(queued);
                } else {
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        queue.push_back(queued);
                    });
                }
            }
            Settlement::DeadLetter { reason } => {
                queued.message.headers.insert(DEAD_LETTER_REASON.to_owned(), reason);
                match &self.dead_letters {
                    Some(dead_letters) => dead_letters.push_back(queued),
                    // Dead-lettering a dead letter: kept rather than lost,
                    // back in its queue after a hold; at once, a consumer of
                    // that queue would meet it again at full speed.
                    None => {
                        let queue = Arc::clone(&self.queue);
                        tokio::spawn(async move {
                            tokio::time::sleep(DEAD_LETTER_OF_A_DEAD_LETTER_HOLD).await;
                            queue.push_back(queued);
                        });
                    }
                }
            }
        }
        Ok(())
    }
}

impl Drop for InMemorySettle {
    fn drop(&mut self) {
        // Never settled (the consumer died): back to the front, as a broker
        // requeues the unacked deliveries of a closed channel.
        if let Some(queued) = self.queued.take() {
            self.queue.push_front(queued);
        }
    }
}

#[async_trait]
impl DeadLetterQueue for InMemoryTransport {
    async fn dead_letters(&self, queue: &str, limit: usize) -> Result<DeadLetterPage, TransportError> {
        let dlq = format!("{queue}.dlq");
        let dead_letters = self.queue(&dlq).ok_or(TransportError::UnknownAddress(dlq))?;
        let items = dead_letters.items();
        Ok(DeadLetterPage {
            total: items.len(),
            letters: items
                .iter()
                .take(limit)
                .map(|queued| DeadLetter {
                    reason: queued.message.header(DEAD_LETTER_REASON).map(str::to_owned),
                    retries: queued.retries,
                    origin: Some(Origin {
                        destination: queued.message.destination.clone(),
                        routing_key: None,
                    }),
                    message: queued.message.clone(),
                })
                .collect(),
        })
    }

    async fn replay(&self, queue: &str, selection: &ReplaySelection) -> Result<ReplayReport, TransportError> {
        let dlq = format!("{queue}.dlq");
        let dead_letters = self.queue(&dlq).ok_or(TransportError::UnknownAddress(dlq))?;
        let chosen: VecDeque<Queued> = {
            let mut items = dead_letters.items();
            let (chosen, kept) = items.drain(..).partition(|q| selection.selects(&q.message.id));
            *items = kept;
            chosen
        };
        let mut report = ReplayReport::default();
        for queued in chosen {
            let id = queued.message.id.clone();
            let mut message = queued.message.clone();
            message.headers.remove(DEAD_LETTER_REASON);
            match self.publish(&message).await {
                Ok(()) => report.replayed.push(id),
                Err(error) => {
                    report.failed.push(ReplayFailure {
                        id,
                        reason: error.to_string(),
                    });
                    // Not published: back in the dead-letter queue, so nothing is lost.
                    dead_letters.push_back(queued);
                }
            }
        }
        report.not_found = selection.missing(&report);
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_dead_letter_dead_lettered_again_comes_back_after_a_hold_not_at_once() {
        let transport = InMemoryTransport::new();
        transport.bind("d", "q");
        let message = Message::new("M", "d", b"{}".to_vec());
        transport.publish(&message).await.expect("published");
        let mut from_q = transport.subscribe("q").await.expect("q");
        let delivery = from_q.next().await.expect("one").expect("delivered");
        let reason = "undecodable".to_owned();
        delivery
            .settle
            .settle(Settlement::DeadLetter { reason })
            .await
            .expect("dead-lettered");

        let mut from_dlq = transport.subscribe("q.dlq").await.expect("q.dlq");
        let again = from_dlq.next().await.expect("one").expect("delivered");
        let reason = "still undecodable".to_owned();
        again
            .settle
            .settle(Settlement::DeadLetter { reason })
            .await
            .expect("kept");
        let at_once = tokio::time::timeout(Duration::from_millis(500), from_dlq.next()).await;
        assert!(
            at_once.is_err(),
            "back at once: a consumer of the .dlq would spin on it"
        );
        let back = tokio::time::timeout(Duration::from_secs(2), from_dlq.next())
            .await
            .expect("back after the hold")
            .expect("one")
            .expect("delivered");
        assert_eq!(back.message.id, message.id, "kept, not lost");
    }
}
