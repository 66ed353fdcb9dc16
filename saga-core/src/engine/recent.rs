//! Instances this engine committed lately, so the message that follows a
//! transition (typically the reply to the command it sent) is decided
//! without reading the instance back: one store read fewer per reply.
//!
//! A cached instance may be stale: another replica, or an operator's tool,
//! may have moved the saga on since. The engine therefore trusts it only for
//! what the store checks again anyway: a transition decided on it commits
//! only if the instance's revision is still the cached one (otherwise the
//! commit conflicts and the engine re-decides on what the store holds), and
//! any other outcome (ignored, an error) is decided again on a fresh read
//! before it is reported.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use crate::id::SagaId;
use crate::instance::SagaInstance;

/// A bounded map of live instances by id and by business key. The oldest
/// entries go first once it is full; finished instances are not kept (no
/// reply is expected for them).
pub(crate) struct RecentInstances {
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    by_id: HashMap<SagaId, SagaInstance>,
    /// `(definition, key)` → id, for replies correlated by business key.
    by_key: HashMap<(String, String), SagaId>,
    /// Ids in the order they were first kept; an id forgotten since may
    /// still be here, which only makes the cache evict it early.
    order: VecDeque<SagaId>,
}

impl Inner {
    fn remove(&mut self, id: SagaId) {
        if let Some(SagaInstance {
            definition,
            key: Some(key),
            ..
        }) = self.by_id.remove(&id)
        {
            let key = (definition, key);
            if self.by_key.get(&key) == Some(&id) {
                self.by_key.remove(&key);
            }
        }
    }
}

impl RecentInstances {
    /// Keeps at most `capacity` instances; `0` keeps none.
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            inner: Mutex::default(),
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        // Plain maps behind the lock: a panic elsewhere leaves them usable.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The instance `id` as this engine last committed it.
    pub(crate) fn get(&self, id: SagaId) -> Option<SagaInstance> {
        if self.capacity == 0 {
            return None;
        }
        self.inner().by_id.get(&id).cloned()
    }

    /// The instance of `definition` with business key `key`, as this engine
    /// last committed it.
    pub(crate) fn get_by_key(&self, definition: &str, key: &str) -> Option<SagaInstance> {
        if self.capacity == 0 {
            return None;
        }
        let inner = self.inner();
        let id = inner.by_key.get(&(definition.to_owned(), key.to_owned()))?;
        inner.by_id.get(id).cloned()
    }

    /// Keeps `instance` as just committed, unless a newer revision of it is
    /// kept already (commits of one saga may finish out of order here) or it
    /// has finished.
    pub(crate) fn committed(&self, instance: &SagaInstance) {
        if self.capacity == 0 {
            return;
        }
        let mut inner = self.inner();
        if instance.status.is_terminal() {
            inner.remove(instance.id);
            return;
        }
        match inner.by_id.get(&instance.id) {
            Some(kept) if kept.revision >= instance.revision => return,
            Some(_) => {}
            None => inner.order.push_back(instance.id),
        }
        if let Some(key) = &instance.key {
            inner
                .by_key
                .insert((instance.definition.clone(), key.clone()), instance.id);
        }
        inner.by_id.insert(instance.id, instance.clone());
        while inner.order.len() > self.capacity {
            if let Some(oldest) = inner.order.pop_front() {
                inner.remove(oldest);
            }
        }
    }

    /// Drops `id`: what is kept may not be what the store holds.
    pub(crate) fn forget(&self, id: SagaId) {
        if self.capacity == 0 {
            return;
        }
        self.inner().remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Timestamp;
    use crate::instance::SagaStatus;

    fn instance(key: &str, revision: u64, status: SagaStatus) -> SagaInstance {
        SagaInstance {
            id: SagaId::new(),
            definition: "order".to_owned(),
            definition_version: 1,
            key: Some(key.to_owned()),
            status,
            step: 1,
            attempt: 0,
            awaiting: None,
            deadline: None,
            failure: None,
            data: "{}".to_owned(),
            data_version: 1,
            revision,
            created_at: Timestamp::from_millis(0),
            updated_at: Timestamp::from_millis(0),
        }
    }

    #[test]
    fn keeps_the_newest_revision_by_id_and_key() {
        let recent = RecentInstances::new(8);
        let mut saga = instance("o-1", 2, SagaStatus::Running);
        recent.committed(&saga);
        saga.revision = 1;
        saga.step = 0;
        recent.committed(&saga);
        let kept = recent.get(saga.id).map(|i| (i.revision, i.step));
        assert_eq!(kept, Some((2, 1)), "an older commit finishing late must not win");
        assert_eq!(recent.get_by_key("order", "o-1").map(|i| i.id), Some(saga.id));
        assert!(recent.get_by_key("payment", "o-1").is_none(), "keys are per definition");
    }

    #[test]
    fn finished_and_forgotten_instances_are_not_kept() {
        let recent = RecentInstances::new(8);
        let mut saga = instance("o-1", 1, SagaStatus::Running);
        recent.committed(&saga);
        saga.revision = 2;
        saga.status = SagaStatus::Completed;
        recent.committed(&saga);
        assert!(recent.get(saga.id).is_none());
        assert!(recent.get_by_key("order", "o-1").is_none());

        let other = instance("o-2", 1, SagaStatus::Compensating);
        recent.committed(&other);
        recent.forget(other.id);
        assert!(recent.get(other.id).is_none());
        assert!(recent.get_by_key("order", "o-2").is_none());
    }

    #[test]
    fn the_oldest_go_first_once_full() {
        let recent = RecentInstances::new(2);
        let sagas: Vec<SagaInstance> = (0..3)
            .map(|i| instance(&format!("o-{i}"), 1, SagaStatus::Running))
            .collect();
        for saga in &sagas {
            recent.committed(saga);
        }
        assert!(recent.get(sagas[0].id).is_none());
        assert!(recent.get_by_key("order", "o-0").is_none());
        assert!(recent.get(sagas[1].id).is_some() && recent.get(sagas[2].id).is_some());

        let none = RecentInstances::new(0);
        none.committed(&sagas[0]);
        assert!(none.get(sagas[0].id).is_none(), "capacity 0 keeps nothing");
    }
}
