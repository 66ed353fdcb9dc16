//! Identifiers: newtypes so a saga id is never confused with a message id.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Identifies one saga instance. New ids are UUIDv7, so they sort by creation time
/// (which keeps B-tree inserts cheap in SQL backends).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SagaId(Uuid);

impl SagaId {
    /// A fresh, time-ordered id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// Wraps an existing UUID (for example an order id that doubles as the saga id).
    pub const fn from_uuid(uuid: Uuid) -> Self {
        Self(uuid)
    }

    /// The underlying UUID.
    pub const fn as_uuid(&self) -> &Uuid {
        &self.0
    }
}

impl Default for SagaId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for SagaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for SagaId {
    type Err = uuid::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(Self)
    }
}

/// Namespace for ids derived from other ids (UUIDv5), so that deciding the same
/// transition twice (after a crash) produces the same message ids.
const DERIVED_NAMESPACE: Uuid = Uuid::from_u128(0x6a0c_7f1e_5b1d_4c3a_9e55_2b8f_0d4a_c001);

/// Identifies one message; the inbox deduplicates on it.
///
/// Ids the engine emits are derived deterministically from the transition that
/// emitted them, so a re-published message always carries the id it had.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MessageId(String);

impl MessageId {
    /// A fresh random id (UUIDv7 text).
    pub fn new() -> Self {
        Self(Uuid::now_v7().to_string())
    }

    /// The id of the `index`-th message emitted by transition `revision` of `saga`.
    pub fn derived(saga: SagaId, revision: u64, index: usize) -> Self {
        let mut name = [0u8; 32];
        name[..16].copy_from_slice(saga.0.as_bytes());
        name[16..24].copy_from_slice(&revision.to_be_bytes());
        name[24..].copy_from_slice(&(index as u64).to_be_bytes());
        Self(Uuid::new_v5(&DERIVED_NAMESPACE, &name).to_string())
    }

    /// The id of the `index`-th message consumer `by` emitted while handling
    /// message `cause`. Participants use it so a retried handler replies with
    /// the same ids; `by` keeps apart the replies of several participants
    /// that one command fans out to, which meet in the same inbox.
    pub fn derived_from(by: &str, cause: &MessageId, index: usize) -> Self {
        let name = format!("{by}\0{}#{index}", cause.0);
        Self(Uuid::new_v5(&DERIVED_NAMESPACE, name.as_bytes()).to_string())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for MessageId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<String> for MessageId {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl From<&str> for MessageId {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        let saga = SagaId::new();
        assert_eq!(MessageId::derived(saga, 3, 0), MessageId::derived(saga, 3, 0));
        assert_ne!(MessageId::derived(saga, 3, 0), MessageId::derived(saga, 3, 1));
        assert_ne!(MessageId::derived(saga, 3, 0), MessageId::derived(saga, 4, 0));
        let cause = MessageId::new();
        let stock = |index| MessageId::derived_from("stock", &cause, index);
        assert_eq!(stock(0), stock(0));
        assert_ne!(stock(0), stock(1));
        assert_ne!(stock(0), MessageId::derived_from("payment", &cause, 0));
    }

    #[test]
    fn saga_id_round_trips_through_text() {
        let id = SagaId::new();
        assert_eq!(id.to_string().parse::<SagaId>().ok(), Some(id));
        assert!("not-a-uuid".parse::<SagaId>().is_err());
    }
}
