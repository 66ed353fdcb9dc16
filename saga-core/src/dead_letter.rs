//! Dead letters: what a consumer could not act on waits in `<queue>.dlq`
//! (see [`Settlement::DeadLetter`](crate::Settlement::DeadLetter)). Operators
//! browse it and, once the cause is fixed, replay chosen messages to where
//! they were first published.
//!
//! A capability of some transports, apart from [`Transport`](crate::Transport):
//! a backend that cannot browse without consuming does not implement it.

use async_trait::async_trait;

use crate::id::MessageId;
use crate::message::Message;
use crate::transport::TransportError;

/// Where a dead-lettered message was first published: where a replay sends it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    /// The destination (an exchange, for AMQP).
    pub destination: String,
    /// The routing key it was published with, for transports that route by
    /// key (`None` where there is no such thing).
    pub routing_key: Option<String>,
}

/// One message in a dead-letter queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    /// The message as it sits in the dead-letter queue: id, type, headers
    /// (the reason included) and body.
    pub message: Message,
    /// Why it was dead-lettered (the [`DEAD_LETTER_REASON`](crate::DEAD_LETTER_REASON)
    /// header), if recorded.
    pub reason: Option<String>,
    /// How many retry settlements it went through before.
    pub retries: u32,
    /// Where a replay would publish it; `None` when that was not recorded
    /// (e.g. dead-lettered by an older version), in which case it cannot be
    /// replayed and must be re-published by hand.
    pub origin: Option<Origin>,
}

/// A look at a dead-letter queue.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeadLetterPage {
    /// How many messages the dead-letter queue holds in all.
    pub total: usize,
    /// The first of them, oldest first.
    pub letters: Vec<DeadLetter>,
}

/// Which dead letters to replay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplaySelection {
    /// Every message in the dead-letter queue when the replay starts
    /// (messages dead-lettered again while it runs are not replayed twice).
    All,
    /// The messages with these ids (every copy of each).
    Ids(Vec<MessageId>),
}

/// A message a replay left in the dead-letter queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplayFailure {
    /// The message.
    pub id: MessageId,
    /// Why it was not replayed.
    pub reason: String,
}

/// What a replay did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Re-published (confirmed) and removed from the dead-letter queue.
    pub replayed: Vec<MessageId>,
    /// Asked for by id but not in the dead-letter queue.
    pub not_found: Vec<MessageId>,
    /// Left in the dead-letter queue, each with the reason.
    pub failed: Vec<ReplayFailure>,
}

/// Browsing and replaying a queue's dead letters.
///
/// Contract (see `testkit::dead_letter_contract`):
/// - [`dead_letters`](Self::dead_letters) leaves every message where it was.
/// - [`replay`](Self::replay) publishes each selected message to its
///   [`Origin`] with its id, type, correlation id, body and headers, minus
///   the dead-letter bookkeeping (reason, retry count): consumers see it as
///   a fresh delivery, and their inbox recognises it if it had been applied
///   after all. It is removed from the dead-letter queue only once the
///   publish is confirmed, so a crash in between leaves it in both places
///   (at least once), never in neither.
/// - A replayed message goes to every queue bound to its origin, not only
///   to the one that dead-lettered it.
#[async_trait]
pub trait DeadLetterQueue: Send + Sync {
    /// Up to `limit` messages of `queue`'s dead-letter queue (`<queue>.dlq`),
    /// oldest first, and how many it holds. Nothing is removed.
    async fn dead_letters(&self, queue: &str, limit: usize) -> Result<DeadLetterPage, TransportError>;

    /// Re-publishes the `selection` of `queue`'s dead letters to their origin
    /// and removes each from the dead-letter queue once that is confirmed.
    /// Messages that cannot be replayed stay, listed in the report.
    async fn replay(&self, queue: &str, selection: &ReplaySelection) -> Result<ReplayReport, TransportError>;
}

impl ReplaySelection {
    /// Whether a message with `id` is selected.
    pub fn selects(&self, id: &MessageId) -> bool {
        match self {
            Self::All => true,
            Self::Ids(ids) => ids.contains(id),
        }
    }

    /// The ids asked for that are not in `replayed` or `failed`: for
    /// [`ReplayReport::not_found`].
    pub fn missing(&self, report: &ReplayReport) -> Vec<MessageId> {
        let Self::Ids(ids) = self else {
            return Vec::new();
        };
        let mut missing: Vec<MessageId> = ids
            .iter()
            .filter(|id| !report.replayed.contains(id) && !report.failed.iter().any(|f| &f.id == *id))
            .cloned()
            .collect();
        missing.sort();
        missing.dedup();
        missing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_ids_are_those_neither_replayed_nor_failed() {
        let [a, b, c] = [MessageId::from("a"), MessageId::from("b"), MessageId::from("c")];
        let selection = ReplaySelection::Ids(vec![c.clone(), a.clone(), b.clone(), c.clone()]);
        let report = ReplayReport {
            replayed: vec![a.clone()],
            not_found: Vec::new(),
            failed: vec![ReplayFailure {
                id: b.clone(),
                reason: "no origin".into(),
            }],
        };
        assert_eq!(selection.missing(&report), vec![c.clone()]);
        assert!(selection.selects(&a) && !selection.selects(&MessageId::from("z")));
        assert!(ReplaySelection::All.selects(&c));
        assert!(ReplaySelection::All.missing(&report).is_empty());
    }
}
