//! In-memory backends: a real [`Store`](crate::Store) and
//! [`Transport`](crate::Transport) honouring the same contracts as the
//! durable ones, for tests, examples and embedded mode. Nothing survives
//! the process.

mod store;
mod transport;

pub use store::{InMemoryStore, InMemoryTransaction, Purged};
pub use transport::{InMemoryTransport, QueueStats};
