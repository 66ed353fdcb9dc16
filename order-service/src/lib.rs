//! The reference order service.

pub mod proto {
    //! Generated protobuf and gRPC code for `proto/order.proto`.
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("order");

    /// The encoded file descriptor set, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("order_descriptor");
}

pub mod domain;
pub mod saga;
pub mod wire;
