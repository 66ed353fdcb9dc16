//! The read side of orders. Writes never go through here: they are
//! [`OrderEffect`](crate::saga::OrderEffect)s the saga engine applies in the
//! same transaction as the saga transition (see [`InMemoryOrders`]), so an
//! order and its saga never disagree.

mod memory;
mod postgres;

use async_trait::async_trait;
use saga_core::BoxError;

use crate::domain::{Order, OrderId, UserId};

pub use memory::InMemoryOrders;
pub use postgres::PostgresOrders;

/// Why orders could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RepositoryError {
    /// The database is unreachable or failed transiently: retry later
    /// (gRPC `UNAVAILABLE`).
    #[error("the order store is unavailable: {0}")]
    Unavailable(#[source] BoxError),
    /// A stored order cannot be read back: an operator must look at the row.
    #[error("order {id} cannot be read: {source}")]
    Corrupt {
        /// The order.
        id: OrderId,
        /// Why.
        #[source]
        source: BoxError,
    },
}

/// Reads orders.
///
/// Reads see every committed saga transition: an order whose saga start
/// committed is found, with the status of the last committed transition.
#[async_trait]
pub trait OrderRepository: Send + Sync + 'static {
    /// The order with this id, with its items and current status, if
    /// `owner` placed it. `None` for another user's order as for a missing
    /// one, at the same cost: an order is shown only to its owner, and
    /// whether someone else's id exists must not show either.
    async fn get(&self, id: OrderId, owner: &UserId) -> Result<Option<Order>, RepositoryError>;
}
