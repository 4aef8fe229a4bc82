//! Options of the CUDA execution provider for `KIND_GPU` instances, from the model
//! configuration in Triton's two spellings:
//!
//! - `optimization { execution_accelerators { gpu_execution_accelerator [ { name: "cuda"
//!   parameters { key: "use_tf32" value: "0" } } ] } }`: any CUDA execution provider option,
//!   passed to ONNX Runtime as written;
//! - the older top-level `parameters` Triton still reads: `cudnn_conv_algo_search` (`0`
//!   exhaustive, `1` heuristic, `2` default), `gpu_mem_limit` (bytes), `arena_extend_strategy`
//!   (`0` next power of two, `1` same as requested), `do_copy_in_default_stream` (`0`/`1`).
//!
//! An accelerator's parameters win over the top-level ones. ONNX Runtime checks option names
//! and values when the session is created, so a misspelled option fails the load with its name.

use std::collections::BTreeMap;

use oxserve_backend::{BackendError, LoadSpec};

use crate::error::{invalid_model, unsupported};

/// The only GPU accelerator this engine has: ONNX Runtime's CUDA execution provider.
const CUDA: &str = "cuda";

/// CUDA execution provider options (ONNX Runtime's names and string values).
pub(crate) fn cuda_options(spec: &LoadSpec) -> Result<BTreeMap<String, String>, BackendError> {
    let mut options = BTreeMap::new();
    for (key, value) in &spec.parameters {
        if let Some(value) = legacy_option(key, value)? {
            options.insert(key.clone(), value);
        }
    }
    for accelerator in &spec.gpu_accelerators {
        if accelerator.name != CUDA {
            return Err(unsupported(format!(
                "gpu_execution_accelerator '{}' is not available: ONNX Runtime runs KIND_GPU on its \
                 CUDA execution provider; use name: \"cuda\" to set its options",
                accelerator.name
            )));
        }
        for (key, value) in &accelerator.parameters {
            if key == "device_id" {
                return Err(invalid_model(
                    "gpu_execution_accelerator 'cuda': device_id comes from instance_group's gpus, \
                     not from a parameter",
                ));
            }
            options.insert(key.clone(), value.clone());
        }
    }
    Ok(options)
}

/// The CUDA option value for one of Triton's top-level CUDA parameters (which carry the
/// option's own name); `None` for other parameters.
fn legacy_option(key: &str, value: &str) -> Result<Option<String>, BackendError> {
    let v = value.trim();
    let bad = |expected: &str| invalid_model(format!("parameter '{key}' must be {expected}, got '{value}'"));
    let option = match key {
        "cudnn_conv_algo_search" => match v {
            "0" => "EXHAUSTIVE",
            "1" => "HEURISTIC",
            "2" => "DEFAULT",
            _ => return Err(bad("0 (exhaustive), 1 (heuristic) or 2 (default)")),
        },
        "gpu_mem_limit" => {
            let bytes: u64 = v.parse().map_err(|_| bad("a number of bytes"))?;
            return Ok(Some(bytes.to_string()));
        }
        "arena_extend_strategy" => match v {
            "0" => "kNextPowerOfTwo",
            "1" => "kSameAsRequested",
            _ => return Err(bad("0 (next power of two) or 1 (same as requested)")),
        },
        "do_copy_in_default_stream" => match v {
            "0" | "1" => v,
            _ => return Err(bad("0 or 1")),
        },
        _ => return Ok(None),
    };
    Ok(Some(option.to_string()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use oxserve_backend::Accelerator;

    use super::*;
    use crate::test_spec::spec_with;

    fn spec(params: &[(&str, &str)], accelerators: Vec<Accelerator>) -> LoadSpec {
        let mut s = spec_with(params);
        s.gpu_accelerators = accelerators;
        s
    }

    fn accelerator(name: &str, params: &[(&str, &str)]) -> Accelerator {
        Accelerator {
            name: name.into(),
            parameters: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn pairs(options: &BTreeMap<String, String>) -> Vec<(&str, &str)> {
        options.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
    }

    #[test]
    fn tritons_top_level_parameters_become_cuda_options() {
        let options = cuda_options(&spec(
            &[
                ("cudnn_conv_algo_search", "1"),
                ("gpu_mem_limit", " 4294967296 "),
                ("arena_extend_strategy", "1"),
                ("do_copy_in_default_stream", "0"),
                ("intra_op_thread_count", "2"),
            ],
            vec![],
        ))
        .unwrap();
        assert_eq!(
            pairs(&options),
            [
                ("arena_extend_strategy", "kSameAsRequested"),
                ("cudnn_conv_algo_search", "HEURISTIC"),
                ("do_copy_in_default_stream", "0"),
                ("gpu_mem_limit", "4294967296"),
            ]
        );
        assert!(cuda_options(&spec(&[], vec![])).unwrap().is_empty());
    }

    #[test]
    fn the_cuda_accelerator_passes_its_parameters_and_wins() {
        let options = cuda_options(&spec(
            &[("cudnn_conv_algo_search", "0")],
            vec![accelerator(
                "cuda",
                &[("use_tf32", "0"), ("cudnn_conv_algo_search", "DEFAULT")],
            )],
        ))
        .unwrap();
        assert_eq!(
            pairs(&options),
            [("cudnn_conv_algo_search", "DEFAULT"), ("use_tf32", "0")]
        );
    }

    #[test]
    fn other_accelerators_and_bad_values_are_load_errors() {
        let err = |s: LoadSpec| cuda_options(&s).unwrap_err().message().to_string();
        let e = err(spec(&[], vec![accelerator("tensorrt", &[])]));
        assert!(e.contains("'tensorrt' is not available"), "{e}");
        let e = err(spec(&[], vec![accelerator("cuda", &[("device_id", "1")])]));
        assert!(e.contains("instance_group's gpus"), "{e}");
        let e = err(spec(&[("cudnn_conv_algo_search", "fast")], vec![]));
        assert!(
            e.contains("'cudnn_conv_algo_search'") && e.contains("'fast'"),
            "{e}"
        );
        let e = err(spec(&[("gpu_mem_limit", "-1")], vec![]));
        assert!(e.contains("a number of bytes"), "{e}");
        let e = err(spec(&[("arena_extend_strategy", "2")], vec![]));
        assert!(e.contains("arena_extend_strategy"), "{e}");
        let e = err(spec(&[("do_copy_in_default_stream", "yes")], vec![]));
        assert!(e.contains("do_copy_in_default_stream"), "{e}");
    }
}
