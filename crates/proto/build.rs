//! Compiles `proto/` with protox (a pure-Rust protobuf compiler, so no system `protoc` is needed) and
//! generates prost messages and tonic clients and servers. The encoded descriptor set is kept so every
//! service can serve gRPC reflection.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        "chipgate/licensing/v1/licensing.proto",
        "chipgate/licensing/v1/events.proto",
        "chipgate/inventory/v1/inventory.proto",
        "chipgate/inventory/v1/events.proto",
        "chipgate/orders/v1/orders.proto",
        "chipgate/bench/v1/echo.proto",
    ];
    let fds = protox::compile(files, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("chipgate_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    println!("cargo:rerun-if-changed={}", root.display());
    Ok(())
}
