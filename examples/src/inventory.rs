//! The inventory service: a stand-in for the platform's product service,
//! built on saga-core + saga-postgres + saga-amqp as a saga *participant*.
//!
//! It keeps a `stock` table (`product_id`, `available`, `reserved`) and one
//! reservation row per order in a schema of its own. For every
//! `OrderCreated` it reserves all items or none, in the same transaction as
//! its inbox row and its `StockUpdateResult` reply (outbox); for every
//! `OrderCancelled` it releases what that order holds. Both are idempotent
//! per message (the participant's inbox) and per order (the reservation row):
//! a second `OrderCreated` for an order gets the first answer again, a second
//! release releases nothing, and a release for an order that never reserved
//! only records that the order is gone (a late `OrderCreated` for it is then
//! refused instead of holding stock forever).
//!
//! Layers: [`InventoryConfig`] (from the environment) → [`InventoryService`]
//! (start-up wiring) → [`StockKeeper`] (the command handler, SQL inside the
//! saga transaction) and [`Inventory`] (reads, for operators and tests).

mod config;
mod keeper;
mod schema;
mod service;

pub use config::{Catalogue, ConfigError, InventoryConfig, InventoryNames, SchemaName};
pub use keeper::{Inventory, Reservation, ReservationStatus, StockKeeper, StockLevel, order_key};
pub use schema::{MigrateError, migrate};
pub(crate) use service::PARTICIPANT;
pub use service::{InventoryError, InventoryService};
