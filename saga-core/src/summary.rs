//! An operator's overview of a store: what is in flight, what finished per
//! minute, what changed last and what is stuck ([`QueryStore::summary`]).
//!
//! It is computed by the store, not by the process asking, so every replica
//! sharing one database shows the same figures. The rules are written once
//! here ([`Summary::compute`]); backends answer the same with their own
//! queries, and the contract suite checks that they do.
//!
//! [`QueryStore::summary`]: crate::QueryStore::summary

use std::time::Duration;

use crate::clock::Timestamp;
use crate::instance::{SagaInstance, SagaStatus, Transition};
use crate::store::InstanceFilter;

/// The length of one bucket of [`Summary::per_minute`].
pub const MINUTE: Duration = Duration::from_secs(60);

const MINUTE_MILLIS: i64 = 60_000;

/// The statuses an instance can still leave, in the order [`Summary::unfinished`] lists them.
pub const UNFINISHED: [SagaStatus; 3] = [
    SagaStatus::Running,
    SagaStatus::Compensating,
    SagaStatus::NeedsAttention,
];

/// What a summary covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SummaryQuery {
    /// Outcomes are counted from this time on (transitions at or after it).
    pub since: Timestamp,
    /// Running or compensating instances whose last change was at or before
    /// this time are stuck; instances that need attention always are (the
    /// rule of [`InstanceFilter::is_stuck`]).
    pub stuck_since: Timestamp,
    /// At most this many recent, and this many stuck, instances; 0 means 20.
    pub limit: usize,
}

impl SummaryQuery {
    /// The limit a backend applies: `limit`, or 20 when it is 0.
    pub fn effective_limit(&self) -> usize {
        if self.limit == 0 { 20 } else { self.limit }
    }
}

/// How many instances reached each outcome during one minute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MinuteOutcomes {
    /// The minute's first millisecond (a whole minute since the epoch, UTC).
    pub minute: Timestamp,
    /// Instances that completed.
    pub completed: u64,
    /// Instances that finished compensating (the saga failed cleanly).
    pub compensated: u64,
    /// Instances that came to need attention (a compensation kept failing).
    pub needs_attention: u64,
}

impl MinuteOutcomes {
    /// No outcome yet during `minute`.
    pub fn none(minute: Timestamp) -> Self {
        Self {
            minute,
            completed: 0,
            compensated: 0,
            needs_attention: 0,
        }
    }

    /// The first millisecond of the minute `at` falls in.
    pub fn minute_of(at: Timestamp) -> Timestamp {
        let millis = at.as_millis();
        Timestamp::from_millis(millis - millis.rem_euclid(MINUTE_MILLIS))
    }

    /// Failures: compensated plus needing attention.
    pub fn failed(&self) -> u64 {
        self.compensated + self.needs_attention
    }
}

/// An operator's overview of a store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// How many instances are unfinished now, per status: one entry for each
    /// of [`UNFINISHED`], in that order, zeros included.
    pub unfinished: Vec<(SagaStatus, u64)>,
    /// Outcomes per minute, oldest first; minutes without any are left out.
    /// An outcome is a transition into completed, compensated or needs
    /// attention from another status (or a start that ends there at once).
    pub per_minute: Vec<MinuteOutcomes>,
    /// The most recently changed instances, newest first (ties: larger id first).
    pub recent: Vec<SagaInstance>,
    /// Stuck instances (see [`SummaryQuery::stuck_since`]), longest
    /// unchanged first (ties: smaller id first).
    pub stuck: Vec<SagaInstance>,
}

impl Summary {
    /// How many instances are unfinished with `status` (0 for finished statuses).
    pub fn unfinished(&self, status: SagaStatus) -> u64 {
        self.unfinished
            .iter()
            .find(|(s, _)| *s == status)
            .map_or(0, |(_, n)| *n)
    }

    /// The summary of `instances` and their `history`, by the rules every
    /// backend follows: the reference for backends, and the in-memory store's
    /// implementation. It reads everything, so it is for small stores only.
    pub fn compute<'a>(
        instances: impl IntoIterator<Item = &'a SagaInstance>,
        history: impl IntoIterator<Item = &'a Transition>,
        query: &SummaryQuery,
    ) -> Self {
        let limit = query.effective_limit();
        let mut unfinished = UNFINISHED.map(|status| (status, 0));
        let mut recent = Vec::new();
        let mut stuck = Vec::new();
        for instance in instances {
            if let Some((_, count)) = unfinished.iter_mut().find(|(s, _)| *s == instance.status) {
                *count += 1;
            }
            if InstanceFilter::is_stuck(instance, query.stuck_since) {
                stuck.push(instance);
            }
            recent.push(instance);
        }
        recent.sort_by(|a, b| b.updated_at.cmp(&a.updated_at).then(b.id.cmp(&a.id)));
        stuck.sort_by(|a, b| a.updated_at.cmp(&b.updated_at).then(a.id.cmp(&b.id)));

        let mut per_minute: Vec<MinuteOutcomes> = Vec::new();
        for transition in history.into_iter().filter(|t| t.at >= query.since) {
            if let Some(outcome) = outcome(transition) {
                let minute = MinuteOutcomes::minute_of(transition.at);
                let index = per_minute.iter().position(|m| m.minute == minute).unwrap_or_else(|| {
                    per_minute.push(MinuteOutcomes::none(minute));
                    per_minute.len() - 1
                });
                per_minute[index].add(outcome, 1);
            }
        }
        per_minute.sort_by_key(|m| m.minute);

        Self {
            unfinished: unfinished.to_vec(),
            per_minute,
            recent: recent.into_iter().take(limit).cloned().collect(),
            stuck: stuck.into_iter().take(limit).cloned().collect(),
        }
    }
}

impl MinuteOutcomes {
    /// Adds `count` outcomes of `status` (other statuses are not outcomes and are ignored).
    pub fn add(&mut self, status: SagaStatus, count: u64) {
        match status {
            SagaStatus::Completed => self.completed += count,
            SagaStatus::Compensated => self.compensated += count,
            SagaStatus::NeedsAttention => self.needs_attention += count,
            SagaStatus::Running | SagaStatus::Compensating => {}
        }
    }
}

/// The outcome `transition` reached, if it entered completed, compensated or
/// needs attention (staying in needs attention is not a new outcome).
fn outcome(transition: &Transition) -> Option<SagaStatus> {
    let after = transition.after.status;
    let entered = transition.before.as_ref().is_none_or(|before| before.status != after);
    let is_outcome = matches!(
        after,
        SagaStatus::Completed | SagaStatus::Compensated | SagaStatus::NeedsAttention
    );
    (entered && is_outcome).then_some(after)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::SagaId;
    use crate::instance::{Cause, Position};

    fn transition(at: i64, before: Option<SagaStatus>, after: SagaStatus) -> Transition {
        Transition {
            saga_id: SagaId::new(),
            revision: 1,
            at: Timestamp::from_millis(at),
            cause: Cause::Started,
            before: before.map(|status| Position { status, step: 0 }),
            after: Position { status: after, step: 0 },
            emitted: Vec::new(),
            note: None,
        }
    }

    #[test]
    fn outcomes_are_entries_into_a_final_or_attention_status() {
        use SagaStatus::*;
        assert_eq!(outcome(&transition(0, Some(Running), Completed)), Some(Completed));
        assert_eq!(outcome(&transition(0, None, Compensated)), Some(Compensated));
        assert_eq!(
            outcome(&transition(0, Some(Compensating), NeedsAttention)),
            Some(NeedsAttention)
        );
        assert_eq!(outcome(&transition(0, Some(NeedsAttention), NeedsAttention)), None);
        assert_eq!(outcome(&transition(0, Some(Running), Compensating)), None);
        assert_eq!(outcome(&transition(0, None, Running)), None);
    }

    #[test]
    fn minutes_are_whole_and_floor_before_the_epoch_too() {
        assert_eq!(
            MinuteOutcomes::minute_of(Timestamp::from_millis(119_999)),
            Timestamp::from_millis(60_000)
        );
        assert_eq!(
            MinuteOutcomes::minute_of(Timestamp::from_millis(120_000)),
            Timestamp::from_millis(120_000)
        );
        assert_eq!(
            MinuteOutcomes::minute_of(Timestamp::from_millis(-1)),
            Timestamp::from_millis(-60_000)
        );
    }

    #[test]
    fn outcomes_before_since_are_not_counted() {
        use SagaStatus::*;
        let history = [
            transition(59_999, Some(Running), Completed),
            transition(60_000, Some(Running), Completed),
            transition(61_000, Some(Compensating), Compensated),
            transition(185_000, Some(Running), Completed),
        ];
        let query = SummaryQuery {
            since: Timestamp::from_millis(60_000),
            stuck_since: Timestamp::EPOCH,
            limit: 0,
        };
        let summary = Summary::compute([], &history, &query);
        assert_eq!(
            summary.per_minute,
            vec![
                MinuteOutcomes {
                    minute: Timestamp::from_millis(60_000),
                    completed: 1,
                    compensated: 1,
                    needs_attention: 0
                },
                MinuteOutcomes {
                    completed: 1,
                    ..MinuteOutcomes::none(Timestamp::from_millis(180_000))
                },
            ]
        );
        assert_eq!(summary.unfinished, UNFINISHED.map(|s| (s, 0)).to_vec());
    }
}
