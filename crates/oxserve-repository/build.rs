//! Compiles `proto/inference/model_config.proto` with protox (pure Rust, no `protoc` needed):
//! prost types for the config, plus the encoded descriptor set for prost-reflect, which
//! parses text format and renders JSON.

use std::{env, error::Error, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn Error>> {
    let proto_root = "../../proto";
    println!("cargo:rerun-if-changed={proto_root}/inference/model_config.proto");

    let fds = protox::compile(["inference/model_config.proto"], [proto_root])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out_dir.join("model_config_descriptor.bin"), fds.encode_to_vec())?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
