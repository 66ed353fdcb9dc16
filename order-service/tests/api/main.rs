//! End-to-end tests of the service in embedded mode, over real gRPC and HTTP.

mod helpers;
mod operations;
mod orders;
mod production;
mod validation;
