//! Compiles TorchServe's gRPC API protos (`proto/torchserve`, written from the published
//! definitions) with protox: prost messages and the tonic servers (and clients, for tests) of
//! `InferenceAPIsService` and `ManagementAPIsService`.

use std::error::Error;

const PROTO_ROOT: &str = "../../proto";

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed={PROTO_ROOT}/torchserve");
    println!("cargo:rerun-if-changed={PROTO_ROOT}/google");
    let fds = protox::compile(
        ["torchserve/inference.proto", "torchserve/management.proto"],
        [PROTO_ROOT],
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
