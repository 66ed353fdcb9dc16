//! Durable state: instances, the outbox, the inbox, deadlines and history.
//!
//! The traits are small and object safe; [`Store`] is the umbrella every
//! backend gets for free by implementing the parts. Semantics (what to write,
//! when a duplicate is a duplicate, what a deadline means) are decided by the
//! engine; a backend only persists rows.

use std::any::Any;
use std::time::Duration;

use async_trait::async_trait;

use crate::clock::Timestamp;
use crate::error::BoxError;
use crate::id::{MessageId, SagaId};
use crate::instance::{SagaInstance, SagaStatus, Transition};
use crate::message::Message;
use crate::summary::{Summary, SummaryQuery};

/// What a store could not do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Another writer committed a newer revision first, or (a backend may say
    /// so with `actual` equal to `expected`) changed what the decision read
    /// without a new revision, such as a message written for the saga by
    /// another transaction. Reload and decide again; never overwrite.
    #[error("saga {id} is at revision {actual:?}, expected {expected}")]
    Conflict {
        /// The instance.
        id: SagaId,
        /// The revision the writer read.
        expected: u64,
        /// The revision found (`None`: the instance is gone).
        actual: Option<u64>,
    },
    /// An instance with this id, or this key under the same definition, exists.
    /// Do not retry; the caller decides whether that is a success.
    #[error("saga {id} (or its key) exists already")]
    AlreadyExists {
        /// The id that was being inserted.
        id: SagaId,
    },
    /// The message was consumed by a concurrent transaction that committed first.
    /// Reload: the message will then be recognised as a duplicate.
    #[error("message {id} was consumed concurrently")]
    ConsumedConcurrently {
        /// The message.
        id: MessageId,
    },
    /// The backend is unreachable or failed transiently (connection lost,
    /// restarting, serialization failure): retry with backoff.
    #[error("store unavailable: {0}")]
    Unavailable(#[source] BoxError),
    /// A stored row cannot be read back: an operator must look at it.
    #[error("corrupt row ({what}): {source}")]
    Corrupt {
        /// Which row.
        what: String,
        /// Why it cannot be read.
        #[source]
        source: BoxError,
    },
    /// Any other backend failure: not retryable as is.
    #[error("store failed: {0}")]
    Backend(#[source] BoxError),
}

impl StoreError {
    /// Whether the same operation may succeed if tried again.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Conflict { .. } | Self::ConsumedConcurrently { .. } | Self::Unavailable(_)
        )
    }

    /// Whether this is an optimistic-concurrency conflict (reload and retry at once).
    pub fn is_conflict(&self) -> bool {
        matches!(self, Self::Conflict { .. } | Self::ConsumedConcurrently { .. })
    }
}

/// Reads of instances, and the door to atomic writes.
#[async_trait]
pub trait SagaStore: Send + Sync {
    /// The instance with this id.
    async fn load(&self, id: SagaId) -> Result<Option<SagaInstance>, StoreError>;

    /// The id of the instance of `definition` whose business key is `key`.
    async fn find_by_key(&self, definition: &str, key: &str) -> Result<Option<SagaId>, StoreError>;

    /// The instance of `definition` whose business key is `key`. The default
    /// finds its id, then loads it; backends that can read it at once
    /// override this (one round trip instead of two per keyed reply).
    async fn load_by_key(&self, definition: &str, key: &str) -> Result<Option<SagaInstance>, StoreError> {
        match self.find_by_key(definition, key).await? {
            Some(id) => self.load(id).await,
            None => Ok(None),
        }
    }

    /// Opens a transaction. Dropping it without [`Transaction::commit`] rolls back.
    async fn begin(&self) -> Result<Box<dyn Transaction>, StoreError>;

    /// Whether reading an instance costs no more than copying one (the store
    /// keeps its instances in this process's memory). An engine then keeps
    /// no copies of instances of its own unless its configuration asks for
    /// them ([`EngineConfig::cached_instances`](crate::EngineConfig::cached_instances)).
    fn reads_are_cheap(&self) -> bool {
        false
    }
}

/// One atomic write: everything in it commits together or not at all.
///
/// Writes of one transaction are not visible to others before commit.
/// Conflicts may be reported by the write or by `commit`, whichever the backend
/// can detect first.
#[async_trait]
pub trait Transaction: Send {
    /// Records that `consumer` consumed `message`. Returns `false`, and records
    /// nothing, when it already had: the caller must then treat the message as
    /// a duplicate and drop this transaction.
    async fn consume(&mut self, consumer: &str, message: &MessageId) -> Result<bool, StoreError>;

    /// Records that `consumer` consumes `message`, checked no later than at
    /// commit: if it was consumed already, this call or [`commit`](Self::commit)
    /// fails with [`StoreError::ConsumedConcurrently`] and nothing of the
    /// transaction is written. Backends that can check at commit override it
    /// to save the read [`consume`](Self::consume) needs; the engine uses it
    /// first and falls back to `consume` after such a failure.
    async fn consume_at_commit(&mut self, consumer: &str, message: &MessageId) -> Result<(), StoreError> {
        if self.consume(consumer, message).await? {
            Ok(())
        } else {
            Err(StoreError::ConsumedConcurrently { id: message.clone() })
        }
    }

    /// Inserts a new instance (revision as given). [`StoreError::AlreadyExists`]
    /// when its id, or its key under the same definition, is taken.
    async fn insert(&mut self, instance: &SagaInstance) -> Result<(), StoreError>;

    /// Replaces an instance if its stored revision is `expected_revision`,
    /// else [`StoreError::Conflict`]. The deadline index follows `instance.deadline`.
    async fn update(&mut self, instance: &SagaInstance, expected_revision: u64) -> Result<(), StoreError>;

    /// Appends to the instance's history.
    async fn record(&mut self, transition: &Transition) -> Result<(), StoreError>;

    /// Adds messages to the outbox, to be published after commit: a saga's
    /// messages (`saga` given) in this order, each after the ones before it
    /// are confirmed; messages without a saga (a participant's replies) with
    /// no order among them.
    async fn enqueue(&mut self, saga: Option<SagaId>, messages: &[Message]) -> Result<(), StoreError>;

    /// Gives up the unsent outbox message `id`: once this transaction
    /// commits it is never published, and its saga's later messages no
    /// longer wait behind it (their leases are given back, so a relay takes
    /// them at once). For an operator, when the broker will never take the
    /// message (see [`Engine::discard_unsent`](crate::Engine::discard_unsent),
    /// which records why in the saga's history).
    ///
    /// Only a saga's *oldest* unsent message can be given up: a later one
    /// would let the saga's messages out of order. Returns the message, or
    /// `None`, giving up nothing, when it is not unsent (marked sent, given
    /// up before, never written) or an earlier message of its saga is. A
    /// backend may lock the message until the transaction ends (PostgreSQL
    /// does) or check it again at commit and give up nothing that was sent
    /// meanwhile (the in-memory store). A relay publishing the message at
    /// that moment may still get it out.
    async fn discard_unsent(&mut self, id: OutboxId) -> Result<Option<OutboxEntry>, StoreError>;

    /// Makes every write of this transaction durable and visible.
    async fn commit(self: Box<Self>) -> Result<(), StoreError>;

    /// The backend's own handle, for application writes in the same
    /// transaction (downcast to the backend's type, e.g. a SQL transaction).
    fn backend(&mut self) -> &mut (dyn Any + Send);
}

/// Position of a message in the outbox; increases in commit order per store.
pub type OutboxId = i64;

/// A message waiting in the outbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxEntry {
    /// Its position.
    pub id: OutboxId,
    /// The saga that emitted it, if any.
    pub saga: Option<SagaId>,
    /// The message.
    pub message: Message,
}

/// The relay's side of the outbox.
#[async_trait]
pub trait OutboxStore: Send + Sync {
    /// Claims up to `limit` unsent messages, oldest first, for `lease`: other
    /// relays do not get them until the lease runs out (a relay that dies
    /// leaves them to the next). Messages of one saga come in outbox order.
    async fn claim(&self, limit: usize, lease: Duration) -> Result<Vec<OutboxEntry>, StoreError>;

    /// Marks messages as published (the broker confirmed them).
    async fn mark_sent(&self, ids: &[OutboxId]) -> Result<(), StoreError>;

    /// Gives claimed messages back at once (publishing failed).
    async fn release(&self, ids: &[OutboxId]) -> Result<(), StoreError>;

    /// Waits until new messages may be in the outbox, or `timeout` passes.
    /// Relays call it between polls; backends without notification just sleep.
    async fn wait_for_messages(&self, timeout: Duration) {
        tokio::time::sleep(timeout).await;
    }
}

/// An instance whose deadline has come.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DueDeadline {
    /// The instance.
    pub saga: SagaId,
    /// Its deadline.
    pub due: Timestamp,
}

/// Finding deadlines that have come.
#[async_trait]
pub trait DeadlineStore: Send + Sync {
    /// Up to `limit` instances whose deadline is at or before `now`, earliest first.
    async fn due(&self, now: Timestamp, limit: usize) -> Result<Vec<DueDeadline>, StoreError>;
}

/// A listing's `limit`, or the backends' default of 100 when it is 0.
fn limit_or_default(limit: usize) -> usize {
    if limit == 0 { 100 } else { limit }
}

/// Which instances to list. Conditions combine with AND.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InstanceFilter {
    /// Only this definition.
    pub definition: Option<String>,
    /// Only these statuses (any when empty).
    pub statuses: Vec<SagaStatus>,
    /// Only instances last changed at or before this time.
    pub updated_before: Option<Timestamp>,
    /// Only instances started at or before this time.
    pub created_before: Option<Timestamp>,
    /// Only stuck instances: those that need attention, and those not
    /// finished whose last change was at or before this time (see
    /// [`InstanceFilter::is_stuck`]).
    pub stuck_since: Option<Timestamp>,
    /// Only instances after this one in the listing order: pass the
    /// [`InstanceCursor::of`] the last instance of a page to get the next.
    pub after: Option<InstanceCursor>,
    /// At most this many (newest first); 0 means the backend's default of 100.
    pub limit: usize,
}

impl InstanceFilter {
    /// The limit a backend applies: `limit`, or 100 when it is 0.
    pub fn effective_limit(&self) -> usize {
        limit_or_default(self.limit)
    }

    /// Whether `instance` counts as stuck for a threshold time `since`: it
    /// needs attention, or it is running or compensating and has not changed
    /// since then. Backends filter by this rule.
    pub fn is_stuck(instance: &SagaInstance, since: Timestamp) -> bool {
        match instance.status {
            SagaStatus::NeedsAttention => true,
            SagaStatus::Running | SagaStatus::Compensating => instance.updated_at <= since,
            SagaStatus::Completed | SagaStatus::Compensated => false,
        }
    }

    /// Whether `instance` passes every condition (a reference for backends
    /// and the in-memory store's implementation).
    pub fn matches(&self, instance: &SagaInstance) -> bool {
        self.definition.as_ref().is_none_or(|d| &instance.definition == d)
            && (self.statuses.is_empty() || self.statuses.contains(&instance.status))
            && self.updated_before.is_none_or(|t| instance.updated_at <= t)
            && self.created_before.is_none_or(|t| instance.created_at <= t)
            && self.stuck_since.is_none_or(|t| Self::is_stuck(instance, t))
            && self.after.is_none_or(|cursor| InstanceCursor::of(instance) < cursor)
    }
}

/// A position in an instance listing (most recently changed first, then by
/// id, descending): listings continue after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InstanceCursor {
    /// The instance's last change.
    pub updated_at: Timestamp,
    /// The instance.
    pub id: SagaId,
}

impl InstanceCursor {
    /// The position of `instance`.
    pub fn of(instance: &SagaInstance) -> Self {
        Self {
            updated_at: instance.updated_at,
            id: instance.id,
        }
    }
}

/// Which unsent outbox messages to list. Conditions combine with AND.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnsentFilter {
    /// Only this saga's messages.
    pub saga: Option<SagaId>,
    /// Only messages created at or before this time (a message's
    /// [`Message::timestamp`]): the ones that should have left by now.
    pub created_before: Option<Timestamp>,
    /// At most this many (oldest first); 0 means the backend's default of 100.
    pub limit: usize,
}

impl UnsentFilter {
    /// The limit a backend applies: `limit`, or 100 when it is 0.
    pub fn effective_limit(&self) -> usize {
        limit_or_default(self.limit)
    }

    /// Whether `message`, of the saga `saga` (if any), passes every
    /// condition (a reference for backends).
    pub fn matches(&self, saga: Option<SagaId>, message: &Message) -> bool {
        self.saga.is_none_or(|wanted| saga == Some(wanted))
            && self.created_before.is_none_or(|t| message.timestamp <= t)
    }
}

/// A message the outbox still holds: committed, not yet confirmed by the
/// broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnsentMessage {
    /// The message and its position.
    pub entry: OutboxEntry,
    /// Until when a relay holds it (`None`: never claimed, or given back).
    /// A time in the past means the relay that held it let it go without
    /// a confirm; a message the broker refuses is held a lease at a time.
    pub claimed_until: Option<Timestamp>,
}

/// Reading instances and their history, for operators.
#[async_trait]
pub trait QueryStore: Send + Sync {
    /// The history of an instance, oldest first.
    async fn history(&self, id: SagaId) -> Result<Vec<Transition>, StoreError>;

    /// Instances matching `filter`, most recently changed first.
    async fn list(&self, filter: &InstanceFilter) -> Result<Vec<SagaInstance>, StoreError>;

    /// An overview for operators: unfinished instances per status, outcomes
    /// per minute since `query.since`, and the most recent and the stuck
    /// instances, by the rules of [`Summary::compute`]. Dashboards call it on
    /// every page load, so backends answer from indexes, with every part
    /// bounded by `query`'s limit or time window. Backends may find recently
    /// finished instances through their history, as the engine writes it: an
    /// instance finishes with the transition that recorded its final status.
    async fn summary(&self, query: &SummaryQuery) -> Result<Summary, StoreError>;

    /// Messages matching `filter` that are not yet marked sent, oldest
    /// (lowest [`OutboxId`]) first: what an operator looks at when the
    /// outbox does not drain. Looking claims nothing.
    async fn unsent_messages(&self, filter: &UnsentFilter) -> Result<Vec<UnsentMessage>, StoreError>;
}

/// Everything the engine and relay need from a backend.
pub trait Store: SagaStore + OutboxStore + DeadlineStore + QueryStore {}

impl<T: SagaStore + OutboxStore + DeadlineStore + QueryStore> Store for T {}
