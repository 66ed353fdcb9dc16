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
//!
//! A stale copy costs more than the read it was to save: a failed commit
//! (with group commit, the other transitions of its statement are written
//! again one by one), a read and a second commit. Copies go stale when
//! replicas take turns on one saga's messages (a saga of several steps whose
//! replies any replica may consume). So the engine checks how often the
//! copies it finds are stale, and stops using them while more than one in
//! eight are; meanwhile each copy found is compared with the instance read
//! instead, which tells when they are worth using again.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::id::SagaId;
use crate::instance::SagaInstance;
use crate::telemetry;

/// A bounded map of live instances by id and by business key. The oldest
/// entries go first once it is full; finished instances are not kept (no
/// reply is expected for them).
pub(crate) struct RecentInstances {
    capacity: usize,
    inner: Mutex<Inner>,
    /// Copies checked in the current window, and how many were stale.
    checked: AtomicU32,
    stale: AtomicU32,
    /// Whether copies are used, as the last full window found them.
    trusted: AtomicBool,
}

/// Copies are judged in windows of this many.
const WINDOW: u32 = 256;

/// More stale copies than this in a window: the next one reads instead.
const STALE_AT_MOST: u32 = WINDOW / 8;

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
            checked: AtomicU32::new(0),
            stale: AtomicU32::new(0),
            trusted: AtomicBool::new(true),
        }
    }

    /// Whether copies found are used (rather than only compared with a read).
    pub(crate) fn trusted(&self) -> bool {
        self.trusted.load(Ordering::Relaxed)
    }

    /// Records whether a copy was found stale, by a commit that conflicted,
    /// a decision taken again, or a read compared with it.
    pub(crate) fn checked(&self, stale: bool) {
        metrics::counter!(telemetry::INSTANCE_COPIES_TOTAL, "found" => if stale { "stale" } else { "current" })
            .increment(1);
        if stale {
            self.stale.fetch_add(1, Ordering::Relaxed);
        }
        // Whoever completes a window judges it; concurrent checks carry over.
        if self.checked.fetch_add(1, Ordering::Relaxed) + 1 != WINDOW {
            return;
        }
        self.checked.fetch_sub(WINDOW, Ordering::Relaxed);
        let stale = self.stale.swap(0, Ordering::Relaxed);
        let trusted = stale <= STALE_AT_MOST;
        if self.trusted.swap(trusted, Ordering::Relaxed) != trusted {
            tracing::info!(
                stale,
                of = WINDOW,
                "{} kept instance copies",
                if trusted { "using" } else { "too many stale: not using" }
            );
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
    pub(crate) fn committed(&self, instance: SagaInstance) {
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
            // Its key, if any, is kept already: a key never changes.
            Some(_) => {}
            None => {
                inner.order.push_back(instance.id);
                if let Some(key) = &instance.key {
                    inner
                        .by_key
                        .insert((instance.definition.clone(), key.clone()), instance.id);
                }
            }
        }
        inner.by_id.insert(instance.id, instance);
        while inner.order.len() > self.capacity {
            if let Some(oldest) = inner.order.pop_front() {
                inner.remove(oldest);
            }
        }
    }

    /// Records whether a copy at `copy_revision`, if there was one, is what
    /// the store holds.
    pub(crate) fn compare(&self, copy_revision: Option<u64>, stored: &SagaInstance) {
        if let Some(revision) = copy_revision {
            self.checked(revision != stored.revision);
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
        recent.committed(saga.clone());
        saga.revision = 1;
        saga.step = 0;
        recent.committed(saga.clone());
        let kept = recent.get(saga.id).map(|i| (i.revision, i.step));
        assert_eq!(kept, Some((2, 1)), "an older commit finishing late must not win");
        assert_eq!(recent.get_by_key("order", "o-1").map(|i| i.id), Some(saga.id));
        assert!(recent.get_by_key("payment", "o-1").is_none(), "keys are per definition");
    }

    #[test]
    fn finished_and_forgotten_instances_are_not_kept() {
        let recent = RecentInstances::new(8);
        let mut saga = instance("o-1", 1, SagaStatus::Running);
        recent.committed(saga.clone());
        saga.revision = 2;
        saga.status = SagaStatus::Completed;
        recent.committed(saga.clone());
        assert!(recent.get(saga.id).is_none());
        assert!(recent.get_by_key("order", "o-1").is_none());

        let other = instance("o-2", 1, SagaStatus::Compensating);
        recent.committed(other.clone());
        recent.forget(other.id);
        assert!(recent.get(other.id).is_none());
        assert!(recent.get_by_key("order", "o-2").is_none());
    }

    #[test]
    fn copies_are_used_while_at_most_one_in_eight_is_stale() {
        let recent = RecentInstances::new(8);
        assert!(recent.trusted());
        let window = |stale: u32| {
            for i in 0..WINDOW {
                recent.checked(i < stale);
            }
            recent.trusted()
        };
        assert!(window(STALE_AT_MOST), "one in eight is still worth it");
        assert!(!window(STALE_AT_MOST + 1));
        assert!(!window(STALE_AT_MOST + 1), "stays off while copies go stale");
        assert!(window(0), "back on once they are current");
    }

    #[test]
    fn the_oldest_go_first_once_full() {
        let recent = RecentInstances::new(2);
        let sagas: Vec<SagaInstance> = (0..3)
            .map(|i| instance(&format!("o-{i}"), 1, SagaStatus::Running))
            .collect();
        for saga in &sagas {
            recent.committed(saga.clone());
        }
        assert!(recent.get(sagas[0].id).is_none());
        assert!(recent.get_by_key("order", "o-0").is_none());
        assert!(recent.get(sagas[1].id).is_some() && recent.get(sagas[2].id).is_some());

        let none = RecentInstances::new(0);
        none.committed(sagas[0].clone());
        assert!(none.get(sagas[0].id).is_none(), "capacity 0 keeps nothing");
    }
}
