//! Errors of steps, definitions and the engine. Store and transport errors live
//! beside their traits.

use std::time::Duration;

use crate::id::SagaId;
use crate::store::StoreError;

/// A boxed error from a backend or user code, kept as a cause.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a step's action or compensation failed.
///
/// The split decides what the engine does: a retryable error is retried under
/// the step's [`RetryPolicy`](crate::RetryPolicy); a terminal one fails the step
/// at once (forward: compensation starts; compensation: the saga needs attention).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StepError {
    /// A passing failure (a resource busy, a timeout): retry with backoff.
    #[error("retryable: {reason}")]
    Retryable {
        /// What went wrong.
        reason: String,
    },
    /// The step cannot succeed: fail it (and compensate what came before).
    #[error("{reason}")]
    Terminal {
        /// What went wrong.
        reason: String,
    },
}

impl StepError {
    /// A retryable failure.
    pub fn retryable(reason: impl Into<String>) -> Self {
        Self::Retryable { reason: reason.into() }
    }

    /// A terminal failure.
    pub fn terminal(reason: impl Into<String>) -> Self {
        Self::Terminal { reason: reason.into() }
    }

    /// Whether retrying may help.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Retryable { .. })
    }

    /// The reason, for the instance's failure record.
    pub fn reason(&self) -> &str {
        match self {
            Self::Retryable { reason } | Self::Terminal { reason } => reason,
        }
    }
}

/// Encoding or decoding JSON inside a step fails the same way every time: terminal.
impl From<serde_json::Error> for StepError {
    fn from(error: serde_json::Error) -> Self {
        Self::terminal(format!("JSON: {error}"))
    }
}

/// A saga definition that is not well formed. Fix the definition; nothing was registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DefinitionError {
    /// The saga has no name.
    #[error("a saga definition needs a name")]
    MissingName,
    /// The saga has no steps.
    #[error("saga `{saga}` has no steps")]
    NoSteps {
        /// The saga.
        saga: String,
    },
    /// Two steps share a name.
    #[error("saga `{saga}` has two steps named `{step}`")]
    DuplicateStep {
        /// The saga.
        saga: String,
        /// The repeated name.
        step: String,
    },
    /// A step has an empty name.
    #[error("saga `{saga}` has a step without a name (step {index})")]
    UnnamedStep {
        /// The saga.
        saga: String,
        /// The step's position.
        index: usize,
    },
    /// A remote step cannot finish because nothing handles its reply.
    #[error("remote step `{step}` of saga `{saga}` has no reply handler")]
    NoReplyHandler {
        /// The saga.
        saga: String,
        /// The step.
        step: String,
    },
    /// Two remote steps wait for the same reply type with the same correlation,
    /// so a late reply to one could be taken for a reply to the other.
    #[error("reply type `{kind}` is handled by both `{first}` and `{second}` in saga `{saga}`")]
    AmbiguousReply {
        /// The saga.
        saga: String,
        /// The reply type.
        kind: String,
        /// The first step handling it.
        first: String,
        /// The second step handling it.
        second: String,
    },
    /// A reply handler was added to a local step, which sends nothing to reply to.
    #[error("local step `{step}` of saga `{saga}` cannot handle replies (`{kind}`)")]
    ReplyOnLocalStep {
        /// The saga.
        saga: String,
        /// The step.
        step: String,
        /// The reply type.
        kind: String,
    },
    /// A reply is correlated by a business key but the saga declares none.
    #[error("step `{step}` of saga `{saga}` correlates replies by key, but the saga has no key")]
    MissingKey {
        /// The saga.
        saga: String,
        /// The step.
        step: String,
    },
    /// A retry policy allows no attempt at all.
    #[error("step `{step}` of saga `{saga}` has a retry policy with zero attempts")]
    ZeroAttempts {
        /// The saga.
        saga: String,
        /// The step.
        step: String,
    },
    /// A local step was given a reply timeout: it sends nothing to wait for.
    #[error("local step `{step}` of saga `{saga}` cannot have a reply timeout")]
    TimeoutOnLocalStep {
        /// The saga.
        saga: String,
        /// The step.
        step: String,
    },
    /// A reply timeout under a millisecond: the step would fail as its
    /// command is sent.
    #[error("remote step `{step}` of saga `{saga}` has a reply timeout under a millisecond")]
    ZeroTimeout {
        /// The saga.
        saga: String,
        /// The step.
        step: String,
    },
    /// An upgrade moves instances waiting for a reply onto a step that does
    /// not handle it: their reply would be ignored.
    #[error(
        "the upgrade of saga `{saga}` from version {from} to {to} moves instances waiting in step `{step}` for \
         `{kind}` onto a step that does not handle it: keep handling `{kind}` there (or map the step to one that does)"
    )]
    UpgradeDropsReply {
        /// The saga.
        saga: String,
        /// The version instances are upgraded from.
        from: u32,
        /// The version they end at.
        to: u32,
        /// The step of `from` that waits for the reply.
        step: String,
        /// The reply type.
        kind: String,
    },
    /// Two upgrades from one version of a saga.
    #[error("saga `{saga}` has two upgrades from version {from}")]
    DuplicateUpgrade {
        /// The saga.
        saga: String,
        /// The version both upgrade from.
        from: u32,
    },
    /// An upgrade does not lead to a newer, registered version.
    #[error("the upgrade of saga `{saga}` from version {from} to {to} does not lead to a newer registered version")]
    BadUpgrade {
        /// The saga.
        saga: String,
        /// The version it upgrades from.
        from: u32,
        /// The version it upgrades to.
        to: u32,
    },
    /// The same name and version were registered twice.
    #[error("saga `{saga}` version {version} is registered twice")]
    DuplicateVersion {
        /// The saga.
        saga: String,
        /// The version.
        version: u32,
    },
}

/// What the engine could not do. Each variant says how a caller should react;
/// [`is_retryable`](Self::is_retryable) sums it up for message consumers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The store failed; retry when [`StoreError::is_retryable`] says so.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No registered saga handles this message type: dead-letter it.
    #[error("no saga handles messages of type `{kind}`")]
    UnhandledKind {
        /// The message type.
        kind: String,
    },
    /// The message does not name an existing saga instance: dead-letter it.
    #[error("message `{kind}` does not belong to any saga instance{}", key.as_ref().map(|k| format!(" (key `{k}`)")).unwrap_or_default())]
    UnknownSaga {
        /// The message type.
        kind: String,
        /// The correlation key or id that matched nothing.
        key: Option<String>,
    },
    /// The instance names a definition (or version) this process does not have:
    /// deploy it, then replay the message.
    #[error("saga {id} uses definition `{definition}` version {version}, which is not registered")]
    UnknownDefinition {
        /// The instance.
        id: SagaId,
        /// Its definition's name.
        definition: String,
        /// Its definition's version.
        version: u32,
    },
    /// The instance runs under a newer version of its definition than this
    /// process has: a deployment is under way, and a replica that has it
    /// will take the message. Retryable, so it goes back to its queue (and
    /// reaches the dead letters only if the version never arrives).
    #[error("saga {id} uses definition `{definition}` version {version}, newer than this process's {newest}")]
    NewerVersion {
        /// The instance.
        id: SagaId,
        /// Its definition's name.
        definition: String,
        /// Its definition's version.
        version: u32,
        /// The newest version registered here.
        newest: u32,
    },
    /// The message (or stored data) could not be decoded: dead-letter it / fix the row.
    #[error("cannot decode {what}: {source}")]
    Decode {
        /// What was being decoded.
        what: String,
        /// The decoder's complaint.
        #[source]
        source: serde_json::Error,
    },
    /// `start` was given data of another type than the definition's.
    #[error("saga `{definition}` expects data of type {expected}")]
    DataType {
        /// The definition.
        definition: String,
        /// The type it expects.
        expected: &'static str,
    },
    /// An instance with this id or key exists already.
    #[error("saga {id} exists already")]
    AlreadyStarted {
        /// The existing instance.
        id: SagaId,
    },
    /// A step failed while the saga was being started (nothing was stored).
    #[error("step failed while starting: {0}")]
    Step(#[source] StepError),
    /// Application effects failed to apply; the transition was rolled back.
    #[error("applying effects failed: {0}")]
    Effects(#[source] StepError),
    /// The instance kept changing under us; retry later.
    #[error("saga {id} changed {attempts} times while a transition was being committed")]
    Contended {
        /// The instance.
        id: SagaId,
        /// How many attempts were made.
        attempts: u32,
    },
    /// A stored instance cannot continue under the registered definitions:
    /// register its version beside the new one, or an upgrade.
    #[error("saga {id} cannot resume: {reason}")]
    NotResumable {
        /// The instance.
        id: SagaId,
        /// Why not.
        reason: String,
    },
    /// Handling panicked: a bug in application code (a step, a reply
    /// handler, an effect or command handler) or in this library. Retryable,
    /// so that a message which only shared a batch with the one at fault
    /// goes through alone; one that panics every time is dead-lettered when
    /// its retries run out, never redelivered forever.
    #[error("handling panicked: {0}")]
    Panicked(String),
    /// The operator action does not apply to the instance's current state.
    #[error("cannot {action} saga {id}: {reason}")]
    InvalidAction {
        /// The instance.
        id: SagaId,
        /// The action.
        action: &'static str,
        /// Why not.
        reason: String,
    },
}

impl EngineError {
    /// Whether trying the same thing again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Store(e) => e.is_retryable(),
            Self::Contended { .. } | Self::Panicked(_) | Self::NewerVersion { .. } => true,
            Self::Effects(e) | Self::Step(e) => e.is_retryable(),
            _ => false,
        }
    }

    /// `future`'s result, or [`Panicked`](Self::Panicked) if it panicked.
    pub(crate) async fn unless_panicked<T>(future: impl Future<Output = Result<T, Self>>) -> Result<T, Self> {
        use futures_util::FutureExt;
        std::panic::AssertUnwindSafe(future)
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic without a message".to_owned());
                Err(Self::Panicked(what))
            })
    }
}

/// Backoff between attempts of a failing action: exponential, capped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in total, the first included (at least 1).
    pub max_attempts: u32,
    /// Delay before the second attempt.
    pub initial_backoff: Duration,
    /// Upper bound of any delay.
    pub max_backoff: Duration,
    /// Growth factor between delays.
    pub multiplier: u32,
}

impl RetryPolicy {
    /// Try once, never retry.
    pub const NEVER: RetryPolicy = RetryPolicy {
        max_attempts: 1,
        initial_backoff: Duration::ZERO,
        max_backoff: Duration::ZERO,
        multiplier: 1,
    };

    /// Retries for about three minutes (26 attempts, 100 ms doubling up to
    /// 10 s): long enough to wait out a database or broker restart, so that
    /// a consumer whose store is briefly away keeps its messages instead of
    /// dead-lettering them.
    pub const THROUGH_A_RESTART: RetryPolicy = RetryPolicy {
        max_attempts: 26,
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(10),
        multiplier: 2,
    };

    /// `max_attempts` attempts with the default backoff.
    pub fn attempts(max_attempts: u32) -> Self {
        Self {
            max_attempts,
            ..Self::default()
        }
    }

    /// The delay after failed attempt number `attempt` (1-based).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = self.multiplier.max(1).saturating_pow(attempt.saturating_sub(1));
        self.initial_backoff.saturating_mul(factor).min(self.max_backoff)
    }

    /// Whether another attempt is allowed after `attempts_made` attempts.
    pub fn allows_another(&self, attempts_made: u32) -> bool {
        attempts_made < self.max_attempts
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            multiplier: 2,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let policy = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1_000),
            multiplier: 2,
        };
        assert_eq!(policy.backoff(1), Duration::from_millis(100));
        assert_eq!(policy.backoff(2), Duration::from_millis(200));
        assert_eq!(policy.backoff(4), Duration::from_millis(800));
        assert_eq!(policy.backoff(5), Duration::from_millis(1_000));
        assert_eq!(policy.backoff(60), Duration::from_millis(1_000));
        assert!(policy.allows_another(9));
        assert!(!policy.allows_another(10));
    }

    #[test]
    fn through_a_restart_waits_about_three_minutes_in_all() {
        let policy = RetryPolicy::THROUGH_A_RESTART;
        let waited: Duration = (1..policy.max_attempts).map(|attempt| policy.backoff(attempt)).sum();
        assert!(
            (Duration::from_secs(180)..=Duration::from_secs(200)).contains(&waited),
            "{waited:?} between its 26 attempts"
        );
        assert_eq!(policy.backoff(25), Duration::from_secs(10), "no wait above 10 s");
    }
}
