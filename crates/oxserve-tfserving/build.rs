//! Compiles TensorFlow Serving's API protos (`proto/tensorflow_serving`, `proto/tensorflow`,
//! written from the published definitions) with protox: prost messages, the tonic server and
//! client of `tensorflow.serving.PredictionService` and `ModelService`, and the descriptor set
//! prost-reflect needs to read `--model_config_file` and `--batching_parameters_file` (text
//! protos).

use std::{env, error::Error, fs, path::PathBuf};

use prost::Message;

const PROTO_ROOT: &str = "../../proto";
const PROTOS: [&str; 5] = [
    "tensorflow_serving/apis/prediction_service.proto",
    "tensorflow_serving/apis/model_service.proto",
    "tensorflow_serving/config/model_server_config.proto",
    "tensorflow_serving/servables/tensorflow/session_bundle_config.proto",
    "tensorflow_serving/config/monitoring_config.proto",
];

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed={PROTO_ROOT}/tensorflow_serving");
    println!("cargo:rerun-if-changed={PROTO_ROOT}/tensorflow");
    let fds = protox::compile(PROTOS, [PROTO_ROOT])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out_dir.join("tfserving_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        // Tensor bytes stay slices of the received buffer instead of copies.
        .bytes(".tensorflow.TensorProto.tensor_content")
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
