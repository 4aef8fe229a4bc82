//! A `LoadSpec` for the unit tests of the configuration readers.

use std::path::PathBuf;

use oxserve_backend::LoadSpec;

/// One CPU instance of an unbatched `model.onnx` with these parameters; tests change the rest.
pub(crate) fn spec_with(params: &[(&str, &str)]) -> LoadSpec {
    LoadSpec {
        model_name: "m".into(),
        version: 1,
        model_path: PathBuf::from("model.onnx"),
        inputs: vec![],
        outputs: vec![],
        max_batch_size: 0,
        instance_count: 1,
        devices: vec![],
        graph_optimization_level: 0,
        parameters: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        gpu_accelerators: vec![],
    }
}
