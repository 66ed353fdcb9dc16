//! The instances this engine committed last, so that the reply that moves
//! one on needs no read.
//!
//! A cached instance may be stale: another engine (a replica) or an
//! operator moved it since. That is safe because the engine only trusts a
//! cached instance to propose a transition: the commit checks the revision
//! and a stale one conflicts, after which the instance is read again. A
//! decision to ignore the event is never taken on a cached instance alone:
//! it is re-decided on a fresh read, since the stored instance may be
//! waiting for exactly this event.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use crate::id::SagaId;
use crate::instance::SagaInstance;

/// Unfinished instances by id and by (definition, key), evicted oldest
/// first beyond a capacity.
pub(crate) struct InstanceCache {
    capacity: usize,
    entries: Mutex<Entries>,
}

#[derive(Default)]
struct Entries {
    /// Each instance with the number of the put that stored it.
    by_id: HashMap<SagaId, (SagaInstance, u64)>,
    by_key: HashMap<(String, String), SagaId>,
    /// Puts, oldest first; one whose number is no longer its instance's was
    /// superseded by a later put of it.
    order: VecDeque<(SagaId, u64)>,
    puts: u64,
}

impl Entries {
    fn remove(&mut self, id: SagaId) {
        if let Some((instance, _)) = self.by_id.remove(&id)
            && let Some(key) = instance.key
        {
            self.by_key.remove(&(instance.definition, key));
        }
    }

    /// Drops the oldest put; evicts its instance unless put again since.
    fn pop_oldest(&mut self) {
        if let Some((id, put)) = self.order.pop_front()
            && self.by_id.get(&id).is_some_and(|(_, latest)| *latest == put)
        {
            self.remove(id);
        }
    }
}

impl InstanceCache {
    /// A cache of at most `capacity` instances; 0 keeps none.
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: Mutex::default(),
        }
    }

    fn entries(&self) -> MutexGuard<'_, Entries> {
        // Plain data behind the lock: a panic elsewhere leaves it usable.
        self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Remembers `instance` as committed; a finished one is forgotten, as
    /// nothing moves it on any more.
    pub(crate) fn put(&self, instance: &SagaInstance) {
        if self.capacity == 0 {
            return;
        }
        let mut entries = self.entries();
        if instance.status.is_terminal() {
            entries.remove(instance.id);
            return;
        }
        if let Some(key) = &instance.key {
            entries
                .by_key
                .insert((instance.definition.clone(), key.clone()), instance.id);
        }
        entries.puts += 1;
        let put = entries.puts;
        entries.by_id.insert(instance.id, (instance.clone(), put));
        entries.order.push_back((instance.id, put));
        while entries.by_id.len() > self.capacity || entries.order.len() > 2 * self.capacity {
            entries.pop_oldest();
        }
    }

    /// The instance of `definition` with `key`, if cached.
    pub(crate) fn by_key(&self, definition: &str, key: &str) -> Option<SagaInstance> {
        if self.capacity == 0 {
            return None;
        }
        let entries = self.entries();
        let id = entries.by_key.get(&(definition.to_owned(), key.to_owned()))?;
        entries.by_id.get(id).map(|(instance, _)| instance.clone())
    }

    /// The instance `id`, if cached.
    pub(crate) fn by_id(&self, id: SagaId) -> Option<SagaInstance> {
        if self.capacity == 0 {
            return None;
        }
        self.entries().by_id.get(&id).map(|(instance, _)| instance.clone())
    }

    /// Forgets `id` (its cached copy turned out stale).
    pub(crate) fn forget(&self, id: SagaId) {
        if self.capacity > 0 {
            self.entries().remove(id);
        }
    }
}

#[cfg(all(test, feature = "testkit"))]
mod tests {
    use super::*;
    use crate::instance::SagaStatus;

    fn instance(key: &str) -> SagaInstance {
        crate::testkit::store_contract::sample_instance("orders", Some(key))
    }

    #[test]
    fn keeps_unfinished_instances_by_id_and_key_and_evicts_the_oldest() {
        let cache = InstanceCache::new(2);
        let (a, b, c) = (instance("a"), instance("b"), instance("c"));
        cache.put(&a);
        cache.put(&b);
        cache.put(&a);
        cache.put(&c);
        assert!(cache.by_id(b.id).is_none(), "b was the oldest put");
        assert_eq!(cache.by_key("orders", "a").map(|i| i.id), Some(a.id), "a was put again");
        assert_eq!(cache.by_key("orders", "c").map(|i| i.id), Some(c.id));
        assert!(cache.by_key("orders", "b").is_none());

        let mut done = a.clone();
        done.status = SagaStatus::Completed;
        cache.put(&done);
        assert!(cache.by_id(a.id).is_none() && cache.by_key("orders", "a").is_none());
        cache.forget(c.id);
        assert!(cache.by_key("orders", "c").is_none());
    }

    #[test]
    fn a_cache_of_no_capacity_keeps_nothing() {
        let cache = InstanceCache::new(0);
        let a = instance("a");
        cache.put(&a);
        assert!(cache.by_id(a.id).is_none());
    }
}
