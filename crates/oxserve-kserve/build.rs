//! Compiles `proto/inference/grpc_service.proto` with protox (pure Rust, no `protoc` needed) into
//! prost messages plus the tonic server and client for `inference.GRPCInferenceService`.

use std::error::Error;

const PROTO_ROOT: &str = "../../proto";
const SERVICE_PROTO: &str = "inference/grpc_service.proto";
const CONFIG_PROTO: &str = "inference/model_config.proto";

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed={PROTO_ROOT}/{SERVICE_PROTO}");
    println!("cargo:rerun-if-changed={PROTO_ROOT}/{CONFIG_PROTO}");

    // The descriptor set includes the imported model_config.proto: prost-build needs its
    // messages to decide what the gRPC messages can derive.
    let fds = protox::compile([SERVICE_PROTO], [PROTO_ROOT])?;

    let mut builder = tonic_prost_build::configure()
        // Raw tensor contents stay `Bytes` slices of the received buffer instead of copies.
        .bytes(".inference.ModelInferRequest.raw_input_contents")
        .bytes(".inference.ModelInferResponse.raw_output_contents")
        // BYTES elements sent as typed contents, likewise.
        .bytes(".inference.InferTensorContents.bytes_contents")
        .build_server(true)
        .build_client(true);

    // Every top-level type of model_config.proto (ModelConfig, ModelInput, DataType, ...) is the
    // one oxserve-repository generates, so there is a single `ModelConfig` family and the
    // engine's `Arc<pb::ModelConfig>` goes straight into `ModelConfigResponse`. prost matches
    // extern paths on whole segments, so `.inference.ModelConfig` does not capture
    // `.inference.ModelConfigRequest`/`Response` (the generated code is checked by a test).
    for file in fds.file.iter().filter(|f| f.name() == CONFIG_PROTO) {
        let names = file
            .message_type
            .iter()
            .map(|m| m.name())
            .chain(file.enum_type.iter().map(|e| e.name()));
        for name in names {
            builder = builder.extern_path(
                format!(".inference.{name}"),
                format!("::oxserve_repository::pb::{name}"),
            );
        }
    }

    builder.compile_fds(fds)?;
    Ok(())
}
