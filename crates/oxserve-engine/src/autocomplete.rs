//! Completing a model configuration from the model file (as Triton's auto-complete does) and
//! checking that a configuration agrees with the file, so mismatches fail at load, not at
//! request time.

use oxserve_backend::ModelSignature;
use oxserve_core::{DataType, TensorMeta};
use oxserve_repository::pb::model_config::SchedulingChoice;
use oxserve_repository::pb::model_instance_group::Kind;
use oxserve_repository::pb::model_version_policy::{Latest, PolicyChoice};
use oxserve_repository::pb::{
    ModelConfig, ModelDynamicBatching, ModelInput, ModelInstanceGroup, ModelOutput, ModelTensorReshape,
    ModelVersionPolicy,
};
use oxserve_repository::{data_type_of, data_type_to_config};

/// Triton's `default-max-batch-size` for models whose configuration leaves batching unsaid.
pub(crate) const DEFAULT_MAX_BATCH_SIZE: i32 = 4;

/// The model parameter that, set to `"false"`, keeps a model whose configuration leaves
/// batching unsaid unbatched (`max_batch_size: 0`: requests of any batch size go to the
/// model as they are, as TF Serving runs them) instead of Triton's default batching.
pub const AUTO_BATCHING_PARAMETER: &str = "oxserve_auto_batching";

fn has_batch_dim(t: &TensorMeta) -> bool {
    t.shape.first() == Some(&-1)
}

/// Dims a client sees for a model tensor: without the batch dimension when batching.
fn client_dims(t: &TensorMeta, batched: bool) -> Vec<i64> {
    if batched {
        t.shape[1..].to_vec()
    } else {
        t.shape.clone()
    }
}

/// Fills what the configuration leaves out from the model's own signature.
pub(crate) fn complete(cfg: &mut ModelConfig, sig: &ModelSignature) -> Result<(), String> {
    let batchable = sig.inputs.iter().chain(&sig.outputs).all(has_batch_dim);
    let auto_batching = cfg
        .parameters
        .get(AUTO_BATCHING_PARAMETER)
        .is_none_or(|p| p.string_value != "false");
    if cfg.input.is_empty() && cfg.output.is_empty() && cfg.max_batch_size == 0 && batchable && auto_batching
    {
        cfg.max_batch_size = DEFAULT_MAX_BATCH_SIZE;
    }
    let batched = cfg.max_batch_size > 0;
    if batched && let Some(t) = sig.inputs.iter().chain(&sig.outputs).find(|t| !has_batch_dim(t)) {
        return Err(format!(
            "max_batch_size is {} but model tensor '{}' has shape {:?} without a variable first (batch) dimension",
            cfg.max_batch_size, t.name, t.shape
        ));
    }
    if cfg.input.is_empty() {
        cfg.input = sig
            .inputs
            .iter()
            .map(|t| ModelInput {
                name: t.name.clone(),
                ..Default::default()
            })
            .collect();
    }
    for input in &mut cfg.input {
        if let Some(t) = sig.inputs.iter().find(|t| t.name == input.name) {
            fill_from_file(
                &mut input.data_type,
                &mut input.dims,
                &mut input.reshape,
                t,
                batched,
            );
        }
    }
    if cfg.output.is_empty() {
        cfg.output = sig
            .outputs
            .iter()
            .map(|t| ModelOutput {
                name: t.name.clone(),
                ..Default::default()
            })
            .collect();
    }
    for output in &mut cfg.output {
        if let Some(t) = sig.outputs.iter().find(|t| t.name == output.name) {
            fill_from_file(
                &mut output.data_type,
                &mut output.dims,
                &mut output.reshape,
                t,
                batched,
            );
        }
    }
    Ok(())
}

/// Pipelines an ensemble runs at once.
const ENSEMBLE_PIPELINES: i32 = 16;

/// Makes the defaults explicit, as Triton's config endpoint shows them: version policy
/// latest 1, and one CPU instance.
pub(crate) fn fill_defaults(cfg: &mut ModelConfig) {
    if cfg.version_policy.is_none() {
        cfg.version_policy = Some(ModelVersionPolicy {
            policy_choice: Some(PolicyChoice::Latest(Latest { num_versions: 1 })),
        });
    }
    if cfg.instance_group.is_empty() {
        cfg.instance_group.push(ModelInstanceGroup {
            name: cfg.name.clone(),
            kind: Kind::Cpu as i32,
            // An ensemble's instances only wait on its steps (which run on their own models'
            // instances): enough of them that pipelines overlap and the steps' batchers see
            // several requests.
            count: if cfg.platform == "ensemble" {
                ENSEMBLE_PIPELINES
            } else {
                1
            },
            ..Default::default()
        });
    }
    // Triton turns the dynamic batcher on for batching models that name no scheduler.
    if cfg.max_batch_size > 1 && cfg.scheduling_choice.is_none() {
        cfg.scheduling_choice = Some(SchedulingChoice::DynamicBatching(ModelDynamicBatching::default()));
    }
    for group in &mut cfg.instance_group {
        if group.count == 0 {
            group.count = 1;
        }
        if group.name.is_empty() {
            group.name = cfg.name.clone();
        }
    }
}

/// Fills a configured tensor's unset data type and dims from the file's declaration.
fn fill_from_file(
    data_type: &mut i32,
    dims: &mut Vec<i64>,
    reshape: &mut Option<ModelTensorReshape>,
    declared: &TensorMeta,
    batched: bool,
) {
    if *data_type == 0 {
        *data_type = data_type_to_config(declared.datatype);
    }
    if dims.is_empty() && reshape.is_none() {
        (*dims, *reshape) = dims_or_scalar(client_dims(declared, batched));
    }
}

/// Triton forbids empty `dims`; a scalar is `dims: [1]` reshaped to `[]`.
fn dims_or_scalar(dims: Vec<i64>) -> (Vec<i64>, Option<ModelTensorReshape>) {
    if dims.is_empty() {
        (vec![1], Some(ModelTensorReshape { shape: vec![] }))
    } else {
        (dims, None)
    }
}

/// The shape the engine sees for a configured tensor: batch dim + (reshape or dims).
pub(crate) fn model_facing_shape(
    dims: &[i64],
    reshape: Option<&ModelTensorReshape>,
    batched: bool,
) -> Vec<i64> {
    let inner = reshape.map_or(dims, |r| r.shape.as_slice());
    let mut shape = Vec::with_capacity(inner.len() + 1);
    if batched {
        shape.push(-1);
    }
    shape.extend_from_slice(inner);
    shape
}

fn shapes_compatible(a: &[i64], b: &[i64]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(&x, &y)| x == y || x == -1 || y == -1)
}

fn check_tensor(
    kind: &str,
    name: &str,
    data_type: i32,
    shape: &[i64],
    declared: &[TensorMeta],
) -> Result<(), String> {
    let Some(t) = declared.iter().find(|t| t.name == name) else {
        let names: Vec<&str> = declared.iter().map(|t| t.name.as_str()).collect();
        return Err(format!(
            "configuration {kind} '{name}' is not an {kind} of the model (the model has: {})",
            names.join(", ")
        ));
    };
    let dtype: Option<DataType> = data_type_of(data_type);
    if dtype != Some(t.datatype) {
        return Err(format!(
            "{kind} '{name}': configuration data_type {} does not match the model's {}",
            dtype.map_or("TYPE_INVALID", DataType::config_name),
            t.datatype.config_name()
        ));
    }
    if !shapes_compatible(shape, &t.shape) {
        return Err(format!(
            "{kind} '{name}': configured shape {shape:?} (with batch dimension) does not match the model's {:?}",
            t.shape
        ));
    }
    Ok(())
}

/// Checks a completed configuration against the model file's signature.
pub(crate) fn check(cfg: &ModelConfig, sig: &ModelSignature) -> Result<(), String> {
    let batched = cfg.max_batch_size > 0;
    for input in &cfg.input {
        let shape = model_facing_shape(&input.dims, input.reshape.as_ref(), batched);
        check_tensor("input", &input.name, input.data_type, &shape, &sig.inputs)?;
    }
    for t in &sig.inputs {
        if !cfg.input.iter().any(|i| i.name == t.name) {
            return Err(format!(
                "model input '{}' is missing from the configuration",
                t.name
            ));
        }
    }
    for output in &cfg.output {
        let shape = model_facing_shape(&output.dims, output.reshape.as_ref(), batched);
        check_tensor("output", &output.name, output.data_type, &shape, &sig.outputs)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(name: &str, dt: DataType, shape: &[i64]) -> TensorMeta {
        TensorMeta {
            name: name.into(),
            datatype: dt,
            shape: shape.to_vec(),
        }
    }

    fn add_sub_sig() -> ModelSignature {
        ModelSignature {
            inputs: vec![
                meta("A", DataType::F32, &[-1, 16]),
                meta("B", DataType::F32, &[-1, 16]),
            ],
            outputs: vec![meta("S", DataType::F32, &[-1, 16])],
        }
    }

    #[test]
    fn empty_config_is_completed_as_triton_does() {
        let mut cfg = ModelConfig::default();
        complete(&mut cfg, &add_sub_sig()).unwrap();
        assert_eq!(cfg.max_batch_size, DEFAULT_MAX_BATCH_SIZE);
        assert_eq!(cfg.input.len(), 2);
        assert_eq!(cfg.input[0].dims, vec![16]);
        assert_eq!(data_type_of(cfg.input[0].data_type), Some(DataType::F32));
        assert_eq!(cfg.output[0].name, "S");
        check(&cfg, &add_sub_sig()).unwrap();
    }

    #[test]
    fn non_batchable_model_keeps_full_shape() {
        let sig = ModelSignature {
            inputs: vec![meta("A", DataType::I64, &[3])],
            outputs: vec![meta("B", DataType::Bool, &[3])],
        };
        let mut cfg = ModelConfig::default();
        complete(&mut cfg, &sig).unwrap();
        assert_eq!(cfg.max_batch_size, 0);
        assert_eq!(cfg.input[0].dims, vec![3]);
        check(&cfg, &sig).unwrap();
    }

    #[test]
    fn dtype_mismatch_is_a_load_error() {
        let mut cfg = ModelConfig {
            max_batch_size: 8,
            input: vec![ModelInput {
                name: "A".into(),
                data_type: data_type_to_config(DataType::I32),
                dims: vec![16],
                ..Default::default()
            }],
            ..Default::default()
        };
        complete(&mut cfg, &add_sub_sig()).unwrap();
        let err = check(&cfg, &add_sub_sig()).unwrap_err();
        assert!(err.contains("TYPE_INT32") && err.contains("TYPE_FP32"), "{err}");
    }

    #[test]
    fn missing_model_input_and_bad_dims_are_reported() {
        let mut cfg = ModelConfig {
            max_batch_size: 8,
            input: vec![ModelInput {
                name: "A".into(),
                data_type: data_type_to_config(DataType::F32),
                dims: vec![15],
                ..Default::default()
            }],
            ..Default::default()
        };
        complete(&mut cfg, &add_sub_sig()).unwrap();
        let err = check(&cfg, &add_sub_sig()).unwrap_err();
        assert!(err.contains("[-1, 15]"), "{err}");
        cfg.input[0].dims = vec![16];
        let err = check(&cfg, &add_sub_sig()).unwrap_err();
        assert!(err.contains("'B' is missing"), "{err}");
    }

    #[test]
    fn batching_requires_a_batch_dimension() {
        let sig = ModelSignature {
            inputs: vec![meta("A", DataType::F32, &[2, 16])],
            outputs: vec![meta("S", DataType::F32, &[2, 16])],
        };
        let mut cfg = ModelConfig {
            max_batch_size: 4,
            ..Default::default()
        };
        assert!(complete(&mut cfg, &sig).unwrap_err().contains("batch"));
    }
}
