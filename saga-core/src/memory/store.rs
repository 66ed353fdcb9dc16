use std::any::Any;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;

use crate::clock::{Clock, SystemClock, Timestamp};
use crate::id::{MessageId, SagaId};
use crate::instance::{Cause, SagaInstance, Transition};
use crate::message::Message;
use crate::store::{
    DeadlineStore, DueDeadline, InstanceFilter, OutboxEntry, OutboxId, OutboxStore, QueryStore, SagaStore, StoreError,
    Transaction, UnsentFilter, UnsentMessage,
};
use crate::summary::{Summary, SummaryQuery};

#[derive(Default)]
struct State {
    instances: HashMap<SagaId, SagaInstance>,
    keys: HashMap<(String, String), SagaId>,
    /// Consumed messages, and when they were consumed.
    inbox: HashMap<(String, MessageId), Timestamp>,
    outbox: BTreeMap<OutboxId, Queued>,
    next_outbox: OutboxId,
    deadlines: BTreeSet<(Timestamp, SagaId)>,
    history: HashMap<SagaId, Vec<Transition>>,
}

struct Queued {
    saga: Option<SagaId>,
    message: Message,
    claimed_until: Option<Timestamp>,
}

impl State {
    fn set_deadline(&mut self, id: SagaId, old: Option<Timestamp>, new: Option<Timestamp>) {
        if old == new {
            return;
        }
        if let Some(old) = old {
            self.deadlines.remove(&(old, id));
        }
        if let Some(new) = new {
            self.deadlines.insert((new, id));
        }
    }
}

/// A [`Store`](crate::Store) in memory: one lock, transactions buffered and
/// checked at commit (optimistic, like the SQL backends).
#[derive(Clone)]
pub struct InMemoryStore {
    state: Arc<Mutex<State>>,
    notify: Arc<Notify>,
    clock: Arc<dyn Clock>,
}

impl Default for InMemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl InMemoryStore {
    /// An empty store on the system clock (used for outbox leases).
    pub fn new() -> Self {
        Self::with_clock(SystemClock)
    }

    /// An empty store whose outbox leases follow `clock`.
    pub fn with_clock(clock: impl Clock) -> Self {
        Self {
            state: Arc::new(Mutex::new(State::default())),
            notify: Arc::new(Notify::new()),
            clock: Arc::new(clock),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave a half-applied commit
        // (commits validate before they write), so the data is still consistent.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether a claim would find a message: one not held, and not behind
    /// a held one of its saga (such a message waits for that one, so it
    /// must not make a relay poll in a loop).
    fn claimable(&self) -> bool {
        let now = self.clock.now();
        let state = self.lock();
        let mut blocked: HashSet<SagaId> = HashSet::new();
        for queued in state.outbox.values() {
            let held = queued.claimed_until.is_some_and(|until| until > now);
            if held || queued.saga.is_some_and(|s| blocked.contains(&s)) {
                if let Some(saga) = queued.saga {
                    blocked.insert(saga);
                }
                continue;
            }
            return true;
        }
        false
    }

    /// Messages in the outbox not yet marked sent.
    pub fn unsent(&self) -> usize {
        self.lock().outbox.len()
    }

    /// How many instances the store holds.
    pub fn len(&self) -> usize {
        self.lock().instances.len()
    }

    /// Whether the store holds no instance.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets what is no longer needed, as saga-postgres's retention does
    /// for its tables: when `finished_instances` is set, completed or
    /// compensated instances last changed longer ago than that, with their
    /// key and history; then consumed-message ids older than `inbox` (it
    /// must exceed the longest time a message can be redelivered, or a late
    /// duplicate would be applied again), except those that moved a saga
    /// still held, which stay known with it. Without it a long-running
    /// embedded service grows with every message and saga.
    pub fn purge(&self, inbox: Duration, finished_instances: Option<Duration>) -> Purged {
        let now = self.clock.now();
        let mut state = self.lock();
        let mut purged = Purged::default();
        if let Some(finished_instances) = finished_instances {
            let changed_before = now - finished_instances;
            let finished: Vec<SagaId> = state
                .instances
                .values()
                .filter(|i| i.status.is_terminal() && i.updated_at < changed_before)
                .map(|i| i.id)
                .collect();
            for id in finished {
                let Some(instance) = state.instances.remove(&id) else {
                    continue;
                };
                if let Some(key) = instance.key {
                    let entry = (instance.definition, key);
                    if state.keys.get(&entry) == Some(&id) {
                        state.keys.remove(&entry);
                    }
                }
                state.set_deadline(id, instance.deadline, None);
                state.history.remove(&id);
                purged.instances += 1;
            }
        }
        let State {
            inbox: consumed,
            history,
            ..
        } = &mut *state;
        let moved_a_saga: HashSet<&MessageId> = history
            .values()
            .flatten()
            .filter_map(|transition| match &transition.cause {
                Cause::Message { id, .. } => Some(id),
                _ => None,
            })
            .collect();
        let consumed_before = now - inbox;
        let held = consumed.len();
        consumed.retain(|(_, id), consumed_at| *consumed_at >= consumed_before || moved_a_saga.contains(id));
        purged.inbox = held - consumed.len();
        purged
    }
}

/// What one [`InMemoryStore::purge`] forgot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Purged {
    /// Consumed-message ids.
    pub inbox: usize,
    /// Finished instances (with their key and history).
    pub instances: usize,
}

#[async_trait]
impl SagaStore for InMemoryStore {
    fn reads_are_cheap(&self) -> bool {
        true
    }

    async fn load(&self, id: SagaId) -> Result<Option<SagaInstance>, StoreError> {
        Ok(self.lock().instances.get(&id).cloned())
    }

    async fn find_by_key(&self, definition: &str, key: &str) -> Result<Option<SagaId>, StoreError> {
        Ok(self.lock().keys.get(&(definition.to_owned(), key.to_owned())).copied())
    }

    async fn begin(&self) -> Result<Box<dyn Transaction>, StoreError> {
        Ok(Box::new(InMemoryTransaction {
            store: self.clone(),
            consumed: Vec::new(),
            inserts: Vec::new(),
            updates: Vec::new(),
            history: Vec::new(),
            outbox: Vec::new(),
            discarded: Vec::new(),
            on_commit: Vec::new(),
        }))
    }
}

type Hook = Box<dyn FnOnce() + Send>;

/// A buffered in-memory transaction. Application code reaches it through
/// [`Transaction::backend`] and can register work to run at commit, under
/// the store's lock, with [`on_commit`](Self::on_commit).
pub struct InMemoryTransaction {
    store: InMemoryStore,
    consumed: Vec<(String, MessageId)>,
    inserts: Vec<SagaInstance>,
    updates: Vec<(SagaInstance, u64)>,
    history: Vec<Transition>,
    outbox: Vec<(Option<SagaId>, Message)>,
    discarded: Vec<OutboxId>,
    on_commit: Vec<Hook>,
}

impl InMemoryTransaction {
    /// The store this transaction commits to (for reads alongside it).
    pub fn store(&self) -> &InMemoryStore {
        &self.store
    }

    /// Runs `hook` if and when this transaction commits, atomically with it
    /// (under the store's lock: a hook must not call the store). A hook that
    /// panics does not keep the others from running; the commit stands, and
    /// the panic goes on to the caller of `commit` once it is done.
    pub fn on_commit(&mut self, hook: impl FnOnce() + Send + 'static) {
        self.on_commit.push(Box::new(hook));
    }
}

#[async_trait]
impl Transaction for InMemoryTransaction {
    async fn consume(&mut self, consumer: &str, message: &MessageId) -> Result<bool, StoreError> {
        let entry = (consumer.to_owned(), message.clone());
        if self.consumed.contains(&entry) || self.store.lock().inbox.contains_key(&entry) {
            return Ok(false);
        }
        self.consumed.push(entry);
        Ok(true)
    }

    async fn insert(&mut self, instance: &SagaInstance) -> Result<(), StoreError> {
        self.inserts.push(instance.clone());
        Ok(())
    }

    async fn update(&mut self, instance: &SagaInstance, expected_revision: u64) -> Result<(), StoreError> {
        self.updates.push((instance.clone(), expected_revision));
        Ok(())
    }

    async fn record(&mut self, transition: &Transition) -> Result<(), StoreError> {
        self.history.push(transition.clone());
        Ok(())
    }

    async fn enqueue(&mut self, saga: Option<SagaId>, messages: &[Message]) -> Result<(), StoreError> {
        self.outbox.extend(messages.iter().cloned().map(|m| (saga, m)));
        Ok(())
    }

    async fn discard_unsent(&mut self, id: OutboxId) -> Result<Option<OutboxEntry>, StoreError> {
        if self.discarded.contains(&id) {
            return Ok(None);
        }
        let state = self.store.lock();
        let Some(queued) = state.outbox.get(&id) else {
            return Ok(None);
        };
        // Sent messages leave the map: any earlier one of the saga is unsent,
        // unless this transaction gives it up too.
        let behind_earlier = queued.saga.is_some()
            && state
                .outbox
                .range(..id)
                .any(|(earlier_id, earlier)| earlier.saga == queued.saga && !self.discarded.contains(earlier_id));
        if behind_earlier {
            return Ok(None);
        }
        let entry = OutboxEntry {
            id,
            saga: queued.saga,
            message: queued.message.clone(),
        };
        drop(state);
        self.discarded.push(id);
        Ok(Some(entry))
    }

    async fn commit(self: Box<Self>) -> Result<(), StoreError> {
        let this = *self;
        // A given-up message may free its saga's later ones for a claim.
        let has_messages = !this.outbox.is_empty() || !this.discarded.is_empty();
        let mut panicked = None;
        {
            let mut state = this.store.lock();
            // Validate everything first, so a failed commit writes nothing.
            for entry in &this.consumed {
                if state.inbox.contains_key(entry) {
                    return Err(StoreError::ConsumedConcurrently { id: entry.1.clone() });
                }
            }
            for instance in &this.inserts {
                let key_taken = instance
                    .key
                    .as_ref()
                    .is_some_and(|k| state.keys.contains_key(&(instance.definition.clone(), k.clone())));
                if key_taken || state.instances.contains_key(&instance.id) {
                    return Err(StoreError::AlreadyExists { id: instance.id });
                }
            }
            for (instance, expected) in &this.updates {
                let actual = state.instances.get(&instance.id).map(|i| i.revision);
                if actual != Some(*expected) {
                    return Err(StoreError::Conflict {
                        id: instance.id,
                        expected: *expected,
                        actual,
                    });
                }
            }
            let now = this.store.clock.now();
            state.inbox.extend(this.consumed.into_iter().map(|entry| (entry, now)));
            for instance in this.inserts {
                if let Some(key) = &instance.key {
                    state
                        .keys
                        .insert((instance.definition.clone(), key.clone()), instance.id);
                }
                state.set_deadline(instance.id, None, instance.deadline);
                state.instances.insert(instance.id, instance);
            }
            for (instance, _) in this.updates {
                let old = state.instances.get(&instance.id).and_then(|i| i.deadline);
                state.set_deadline(instance.id, old, instance.deadline);
                state.instances.insert(instance.id, instance);
            }
            for transition in this.history {
                state.history.entry(transition.saga_id).or_default().push(transition);
            }
            for (saga, message) in this.outbox {
                state.next_outbox += 1;
                let id = state.next_outbox;
                state.outbox.insert(
                    id,
                    Queued {
                        saga,
                        message,
                        claimed_until: None,
                    },
                );
            }
            // Sent meanwhile, a message is gone already: nothing to give up.
            // The saga's later messages, held behind it, may go at once.
            for id in this.discarded {
                if let Some(Queued { saga: Some(saga), .. }) = state.outbox.remove(&id) {
                    state
                        .outbox
                        .range_mut(id..)
                        .filter(|(_, later)| later.saga == Some(saga))
                        .for_each(|(_, later)| later.claimed_until = None);
                }
            }
            for hook in this.on_commit {
                // One hook's panic must not skip the others: the commit
                // stands, and a redelivery would find it done.
                if let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(hook)) {
                    panicked.get_or_insert(payload);
                }
            }
        }
        if has_messages {
            this.store.notify.notify_waiters();
        }
        // Told once the store is consistent and the relay woken.
        if let Some(payload) = panicked {
            std::panic::resume_unwind(payload);
        }
        Ok(())
    }

    fn backend(&mut self) -> &mut (dyn Any + Send) {
        self
    }
}

#[async_trait]
impl OutboxStore for InMemoryStore {
    async fn claim(&self, limit: usize, lease: Duration) -> Result<Vec<OutboxEntry>, StoreError> {
        let now = self.clock.now();
        let mut state = self.lock();
        let mut claimed = Vec::new();
        // A saga whose earlier message is claimed by someone else must wait,
        // so its messages are never published out of order.
        let mut blocked: HashSet<SagaId> = HashSet::new();
        for (id, queued) in state.outbox.iter_mut() {
            if claimed.len() >= limit {
                break;
            }
            let held = queued.claimed_until.is_some_and(|until| until > now);
            if held || queued.saga.is_some_and(|s| blocked.contains(&s)) {
                if let Some(saga) = queued.saga {
                    blocked.insert(saga);
                }
                continue;
            }
            queued.claimed_until = Some(now + lease);
            claimed.push(OutboxEntry {
                id: *id,
                saga: queued.saga,
                message: queued.message.clone(),
            });
        }
        Ok(claimed)
    }

    async fn mark_sent(&self, ids: &[OutboxId]) -> Result<(), StoreError> {
        let mut state = self.lock();
        for id in ids {
            state.outbox.remove(id);
        }
        Ok(())
    }

    async fn release(&self, ids: &[OutboxId]) -> Result<(), StoreError> {
        let mut state = self.lock();
        for id in ids {
            if let Some(queued) = state.outbox.get_mut(id) {
                queued.claimed_until = None;
            }
        }
        Ok(())
    }

    async fn wait_for_messages(&self, timeout: Duration) {
        let notified = self.notify.notified();
        if self.claimable() {
            return;
        }
        let _ = tokio::time::timeout(timeout, notified).await;
    }
}

#[async_trait]
impl DeadlineStore for InMemoryStore {
    async fn due(&self, now: Timestamp, limit: usize) -> Result<Vec<DueDeadline>, StoreError> {
        Ok(self
            .lock()
            .deadlines
            .iter()
            .take_while(|(due, _)| *due <= now)
            .take(limit)
            .map(|&(due, saga)| DueDeadline { saga, due })
            .collect())
    }
}

#[async_trait]
impl QueryStore for InMemoryStore {
    async fn history(&self, id: SagaId) -> Result<Vec<Transition>, StoreError> {
        Ok(self.lock().history.get(&id).cloned().unwrap_or_default())
    }

    async fn list(&self, filter: &InstanceFilter) -> Result<Vec<SagaInstance>, StoreError> {
        let state = self.lock();
        let mut found: Vec<SagaInstance> = state
            .instances
            .values()
            .filter(|i| filter.matches(i))
            .cloned()
            .collect();
        found.sort_by(|a, b| b.updated_at.cmp(&a.updated_at).then(b.id.cmp(&a.id)));
        found.truncate(filter.effective_limit());
        Ok(found)
    }
    async fn summary(&self, query: &SummaryQuery) -> Result<Summary, StoreError> {
        let state = self.lock();
        let history = state.history.values().flatten();
        Ok(Summary::compute(state.instances.values(), history, query))
    }

    async fn unsent_messages(&self, filter: &UnsentFilter) -> Result<Vec<UnsentMessage>, StoreError> {
        // Sent messages leave the map, so every queued one is unsent.
        let state = self.lock();
        Ok(state
            .outbox
            .iter()
            .filter(|(_, queued)| filter.matches(queued.saga, &queued.message))
            .take(filter.effective_limit())
            .map(|(id, queued)| UnsentMessage {
                entry: OutboxEntry {
                    id: *id,
                    saga: queued.saga,
                    message: queued.message.clone(),
                },
                claimed_until: queued.claimed_until,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    #[tokio::test]
    async fn a_panicking_commit_hook_keeps_neither_the_others_nor_the_relay_waiting() {
        let store = InMemoryStore::new();
        let ran = Arc::new(AtomicBool::new(false));
        let waiting = tokio::spawn({
            let store = store.clone();
            async move { store.wait_for_messages(Duration::from_secs(30)).await }
        });
        tokio::task::yield_now().await;
        let committing = tokio::spawn({
            let (store, ran) = (store.clone(), Arc::clone(&ran));
            async move {
                let mut tx = store.begin().await.expect("begin");
                tx.enqueue(None, &[Message::new("M", "d", b"{}".to_vec())])
                    .await
                    .expect("enqueue");
                let memory = tx.backend().downcast_mut::<InMemoryTransaction>().expect("in memory");
                memory.on_commit(|| panic!("a hook's own bug"));
                memory.on_commit(move || ran.store(true, Ordering::SeqCst));
                tx.commit().await
            }
        });
        let panicked = committing.await.expect_err("the hook's panic reaches the caller");
        assert!(panicked.is_panic());
        assert!(ran.load(Ordering::SeqCst), "the second hook ran");
        assert_eq!(store.unsent(), 1, "the commit stands");
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the relay's wait is woken")
            .expect("did not panic");
        assert!(store.state.try_lock().is_ok(), "the lock is neither held nor poisoned");
    }
}
