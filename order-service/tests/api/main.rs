//! End-to-end tests of the service over real gRPC and HTTP: embedded mode,
//! production mode on PostgreSQL + RabbitMQ, and the built binary's tracing.

mod admin;
mod config;
mod dashboard;
mod helpers;
mod operations;
mod orders;
mod platform;
mod production;
mod proxy;
mod telemetry;
mod validation;
mod versioning;
