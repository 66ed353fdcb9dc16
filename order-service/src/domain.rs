//! The order domain: pure types, made by parsing. Nothing here knows about
//! protobuf, JSON wire formats, storage or the saga engine.

mod error;
mod id;
mod money;
mod order;

pub use error::InvalidInput;
pub use id::{IdempotencyKey, OrderId, ProductId, UserId};
pub use money::Money;
pub use order::{MAX_ITEMS, MAX_QUANTITY, Order, OrderItem, OrderStatus, Quantity, UnknownStatus};
