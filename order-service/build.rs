//! Generates the gRPC code and the file descriptor sets (for reflection) from
//! `proto/order.proto` and `proto/saga_admin.proto`, with a vendored `protoc`
//! unless `PROTOC` names one.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time: `env!` would bake in the path the build script was
    // compiled at, which breaks when a target directory serves two checkouts.
    let proto_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../proto");
    let proto = proto_dir.join("order.proto");
    let admin_proto = proto_dir.join("saga_admin.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    println!("cargo:rerun-if-changed={}", admin_proto.display());
    println!("cargo:rerun-if-changed=migrations");
    println!("cargo:rerun-if-env-changed=PROTOC");

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let protoc = match std::env::var_os("PROTOC") {
        Some(explicit) => PathBuf::from(explicit),
        None => protoc_bin_vendored::protoc_bin_path()?,
    };
    let include = protoc_bin_vendored::include_path()?;

    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(&protoc);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("order_descriptor.bin"))
        .compile_with_config(config, &[proto], &[proto_dir.clone(), include.clone()])?;

    // The admin API on its own, so reflection lists it only where it is served.
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("saga_admin_descriptor.bin"))
        .compile_with_config(config, &[admin_proto], &[proto_dir, include])?;
    Ok(())
}
