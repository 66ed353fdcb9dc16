//! Runnable examples of the saga library.
//!
//! - `trip-booking` (`src/bin/trip_booking.rs`): one saga with compensations
//!   over the in-memory backends.
//! - `inventory-service` ([`inventory`]): the platform's stock service as a
//!   saga *participant* on PostgreSQL + RabbitMQ.
//! - `order-cli` ([`cli`]): a command-line client of the order service.
//! - `load-test` ([`load`]): the end-to-end load benchmark of the order
//!   service and the inventory service on PostgreSQL + RabbitMQ.
//! - `sagactl` ([`sagactl`]): the operator's command line for the admin API
//!   (list, show, retry, cancel, resume sagas; list and replay dead letters;
//!   list the outbox and give up a message the broker will never take).
//!
//! The binaries are thin: their logic lives here so tests can drive it.

pub mod broker;
pub mod cli;
pub mod inventory;
pub mod load;
pub mod sagactl;
