//! The durable record of one saga instance and its history.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;
use crate::id::{MessageId, SagaId};

/// Where an instance stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SagaStatus {
    /// Forward steps are running.
    Running,
    /// A step failed; compensations are running in reverse order.
    Compensating,
    /// Every step succeeded. Terminal.
    Completed,
    /// A step failed and every needed compensation ran. Terminal.
    Compensated,
    /// A compensation kept failing past its retry limit: an operator must look,
    /// fix the cause and resume the instance.
    NeedsAttention,
}

impl SagaStatus {
    /// Completed or compensated: nothing will happen to the instance any more.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Compensated)
    }

    /// The stable lower-case name used in storage and APIs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Compensating => "compensating",
            Self::Completed => "completed",
            Self::Compensated => "compensated",
            Self::NeedsAttention => "needs_attention",
        }
    }
}

impl fmt::Display for SagaStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A status name that is not one of [`SagaStatus`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown saga status `{0}`")]
pub struct UnknownStatus(pub String);

impl FromStr for SagaStatus {
    type Err = UnknownStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "running" => Self::Running,
            "compensating" => Self::Compensating,
            "completed" => Self::Completed,
            "compensated" => Self::Compensated,
            "needs_attention" => Self::NeedsAttention,
            other => return Err(UnknownStatus(other.to_owned())),
        })
    }
}

/// One saga instance as stored: which definition runs it, where it stands,
/// and its data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaInstance {
    /// The instance id.
    pub id: SagaId,
    /// The name of the definition that started it.
    pub definition: String,
    /// The version of that definition; the instance continues under it.
    pub definition_version: u32,
    /// The business key replies may be correlated by (e.g. an order id).
    pub key: Option<String>,
    /// Where it stands.
    pub status: SagaStatus,
    /// Running: the forward step being executed. Compensating / needs attention:
    /// how many steps remain to be compensated (the next is `step - 1`).
    pub step: u32,
    /// Attempts already made of the current action (for retries).
    pub attempt: u32,
    /// The command whose reply the current remote step waits for.
    pub awaiting: Option<MessageId>,
    /// When the engine must act next without a message: a reply deadline or a retry.
    pub deadline: Option<Timestamp>,
    /// Why the saga is compensating or needs attention.
    pub failure: Option<String>,
    /// The saga data as JSON.
    pub data: String,
    /// The schema version of `data`.
    pub data_version: u32,
    /// Optimistic-concurrency revision: bumped by every committed transition.
    pub revision: u64,
    /// When the instance was started.
    pub created_at: Timestamp,
    /// When it last changed.
    pub updated_at: Timestamp,
}

/// What made a transition happen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Cause {
    /// The saga was started.
    Started,
    /// A message arrived.
    Message {
        /// Its id.
        id: MessageId,
        /// Its type.
        kind: String,
    },
    /// A deadline or retry time was reached.
    Deadline {
        /// The time that was due.
        due: Timestamp,
    },
    /// An operator acted.
    Operator {
        /// What they did (`retry`, `cancel`, `resume`, `discard`).
        action: String,
    },
}

/// Where an instance stood before or after a transition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// Its status.
    pub status: SagaStatus,
    /// Its step counter (see [`SagaInstance::step`]).
    pub step: u32,
}

impl Position {
    /// Where `instance` stands.
    pub fn of(instance: &SagaInstance) -> Self {
        Self {
            status: instance.status,
            step: instance.step,
        }
    }
}

/// One entry of an instance's history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    /// The instance.
    pub saga_id: SagaId,
    /// The revision this transition produced.
    pub revision: u64,
    /// When it was committed.
    pub at: Timestamp,
    /// What caused it.
    pub cause: Cause,
    /// Where the instance stood before (`None` for the start).
    pub before: Option<Position>,
    /// Where it stands after.
    pub after: Position,
    /// Messages it emitted, as `(id, type)`.
    pub emitted: Vec<(MessageId, String)>,
    /// A note (a failure reason, a retry), if any.
    pub note: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_round_trip() {
        for status in [
            SagaStatus::Running,
            SagaStatus::Compensating,
            SagaStatus::Completed,
            SagaStatus::Compensated,
            SagaStatus::NeedsAttention,
        ] {
            assert_eq!(status.as_str().parse::<SagaStatus>(), Ok(status));
        }
        assert!("paused".parse::<SagaStatus>().is_err());
    }
}
