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

/// What a store could not do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Another writer committed a newer revision first. Reload and decide again;
    /// never overwrite.
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

    /// Opens a transaction. Dropping it without [`Transaction::commit`] rolls back.
    async fn begin(&self) -> Result<Box<dyn Transaction>, StoreError>;
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

    /// Adds messages to the outbox, to be published in this order after commit.
    async fn enqueue(&mut self, saga: Option<SagaId>, messages: &[Message]) -> Result<(), StoreError>;

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

/// Which instances to list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InstanceFilter {
    /// Only this definition.
    pub definition: Option<String>,
    /// Only these statuses (any when empty).
    pub statuses: Vec<SagaStatus>,
    /// Only instances last changed at or before this time.
    pub updated_before: Option<Timestamp>,
    /// At most this many (newest first); 0 means the backend's default of 100.
    pub limit: usize,
}

/// Reading instances and their history, for operators.
#[async_trait]
pub trait QueryStore: Send + Sync {
    /// The history of an instance, oldest first.
    async fn history(&self, id: SagaId) -> Result<Vec<Transition>, StoreError>;

    /// Instances matching `filter`, most recently changed first.
    async fn list(&self, filter: &InstanceFilter) -> Result<Vec<SagaInstance>, StoreError>;
}

/// Everything the engine and relay need from a backend.
pub trait Store: SagaStore + OutboxStore + DeadlineStore + QueryStore {}

impl<T: SagaStore + OutboxStore + DeadlineStore + QueryStore> Store for T {}
