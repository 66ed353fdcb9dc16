#![doc = include_str!("../README.md")]

pub mod admin;
pub mod app;
pub mod config;
pub mod dashboard;
pub mod demo_stock;
pub mod domain;
pub mod grpc;
pub mod orders;
pub mod repository;
pub mod saga;
pub mod telemetry;
pub mod wire;

pub use app::{Application, StartError};
pub use config::{Config, ConfigError};

pub mod proto {
    //! Generated protobuf and gRPC code for `proto/order.proto` (clients
    //! included, for tests and tools).
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("order");
    include!(concat!(env!("OUT_DIR"), "/clients/order.rs"));

    /// The encoded file descriptor set, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("order_descriptor");
}
