//! Tests of the examples against real PostgreSQL and RabbitMQ (each test in
//! a fresh database with exchange and queue names of its own) and an
//! in-process order service.

mod cli;
mod end_to_end;
mod helpers;
mod inventory;
#[path = "../common/metrics_port.rs"]
mod metrics_port;
mod sagactl;
