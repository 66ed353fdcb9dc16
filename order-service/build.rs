//! Generates the gRPC code and the file descriptor sets (for reflection) from
//! `proto/order.proto` and `proto/saga_admin.proto`, with a vendored `protoc`
//! unless `PROTOC` names one.
//!
//! Each file is compiled twice: messages and server with the servers' codec
//! (`grpc::RequestCodec`: an undecodable request is `INVALID_ARGUMENT`),
//! then the client alone, into `clients/`, with tonic-prost's codec and the
//! messages of the first pass.

use std::path::{Path, PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time: `env!` would bake in the path the build script was
    // compiled at, which breaks when a target directory serves two checkouts.
    let proto_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../proto");
    println!("cargo:rerun-if-changed=migrations");
    println!("cargo:rerun-if-env-changed=PROTOC");

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let clients_dir = out_dir.join("clients");
    std::fs::create_dir_all(&clients_dir)?;
    let protoc = match std::env::var_os("PROTOC") {
        Some(explicit) => PathBuf::from(explicit),
        None => protoc_bin_vendored::protoc_bin_path()?,
    };
    let include = protoc_bin_vendored::include_path()?;
    let includes = [proto_dir.clone(), include];

    // The admin API on its own, so reflection lists it only where it is served.
    for (file, package, rust_path, descriptor) in [
        ("order.proto", ".order", "crate::proto", "order_descriptor.bin"),
        (
            "saga_admin.proto",
            ".saga.admin.v1",
            "crate::admin::proto",
            "saga_admin_descriptor.bin",
        ),
    ] {
        let proto = proto_dir.join(file);
        println!("cargo:rerun-if-changed={}", proto.display());
        tonic_prost_build::configure()
            .build_client(false)
            .codec_path("crate::grpc::RequestCodec")
            .file_descriptor_set_path(out_dir.join(descriptor))
            .compile_with_config(config(&protoc), std::slice::from_ref(&proto), &includes)?;
        tonic_prost_build::configure()
            .build_server(false)
            .extern_path(package, rust_path)
            .out_dir(&clients_dir)
            .compile_with_config(config(&protoc), &[proto], &includes)?;
    }
    Ok(())
}

fn config(protoc: &Path) -> tonic_prost_build::Config {
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    config
}
