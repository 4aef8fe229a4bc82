//! Model status (`GetModelStatus`, `GET /v1/models/M`) and metadata (`GetModelMetadata`,
//! `GET /v1/models/M/metadata`) from the engine's index and signatures.

use oxserve_core::{DataType, Error, Result};
use oxserve_engine::InferenceService;
use serde_json::{Value, json};

use crate::pb::tensorflow::serving::{ModelVersionStatus, StatusProto, model_version_status::State};
use crate::pb::tensorflow::{TensorInfo, TensorShapeProto, tensor_info, tensor_shape_proto};
use crate::spec::{Signature, VersionChoice};

pub fn dt_name(dt: DataType) -> &'static str {
    match dt {
        DataType::F32 => "DT_FLOAT",
        DataType::F64 => "DT_DOUBLE",
        DataType::I32 => "DT_INT32",
        DataType::U8 => "DT_UINT8",
        DataType::I16 => "DT_INT16",
        DataType::I8 => "DT_INT8",
        DataType::Bytes => "DT_STRING",
        DataType::I64 => "DT_INT64",
        DataType::Bool => "DT_BOOL",
        DataType::BF16 => "DT_BFLOAT16",
        DataType::U16 => "DT_UINT16",
        DataType::F16 => "DT_HALF",
        DataType::U32 => "DT_UINT32",
        DataType::U64 => "DT_UINT64",
    }
}

/// The status of a model's versions (every one, or the chosen one), as TF Serving reports
/// them: READY is AVAILABLE, a failed version is END with its error.
pub fn model_status(
    engine: &InferenceService,
    name: &str,
    version: &VersionChoice,
) -> Result<Vec<ModelVersionStatus>> {
    let wanted = match version {
        VersionChoice::Latest => None,
        VersionChoice::Specific(v) => Some(*v),
        VersionChoice::Label(label) => Some(
            engine
                .label_version(name, label)
                .map_err(|_| Error::invalid(format!("Unrecognized servable version label: {label}")))?,
        ),
    };
    let entries: Vec<_> = engine
        .repository_index(false)
        .into_iter()
        .filter(|e| e.name == name && !e.state.is_empty())
        .collect();
    if entries.is_empty() {
        return Err(Error::not_found(format!(
            "Could not find any versions of model {name}"
        )));
    }
    let statuses: Vec<ModelVersionStatus> = entries
        .into_iter()
        .filter(|e| wanted.is_none() || e.version == wanted)
        .map(|e| {
            let (state, ok) = match e.state.as_str() {
                "READY" => (State::Available, true),
                "LOADING" => (State::Loading, true),
                "UNLOADING" => (State::Unloading, true),
                // Unloaded on purpose (replaced or removed): ended, not failed.
                _ if e.reason == oxserve_engine::UNLOADED_REASON => (State::End, true),
                _ => (State::End, false),
            };
            ModelVersionStatus {
                version: e.version.map_or(0, |v| v as i64),
                state: state as i32,
                status: Some(StatusProto {
                    error_code: if ok { 0 } else { 2 },
                    error_message: if ok { String::new() } else { e.reason },
                }),
            }
        })
        .collect();
    // Newest first, as TF Serving lists them.
    let mut statuses = statuses;
    statuses.sort_by_key(|s| std::cmp::Reverse(s.version));
    if statuses.is_empty()
        && let Some(v) = wanted
    {
        return Err(Error::not_found(format!(
            "Could not find version {v} of model {name}"
        )));
    }
    Ok(statuses)
}

fn state_name(state: i32) -> &'static str {
    match State::try_from(state) {
        Ok(State::Start) => "START",
        Ok(State::Loading) => "LOADING",
        Ok(State::Available) => "AVAILABLE",
        Ok(State::Unloading) => "UNLOADING",
        Ok(State::End) => "END",
        _ => "UNKNOWN",
    }
}

/// `GetModelStatusResponse` as TF Serving's REST API prints it.
pub fn status_json(statuses: &[ModelVersionStatus]) -> Value {
    let entries: Vec<Value> = statuses
        .iter()
        .map(|s| {
            let status = s.status.clone().unwrap_or_default();
            json!({
                "version": s.version.to_string(),
                "state": state_name(s.state),
                "status": {
                    "error_code": if status.error_code == 0 { "OK" } else { "UNKNOWN" },
                    "error_message": status.error_message,
                }
            })
        })
        .collect();
    json!({ "model_version_status": entries })
}

fn shape_proto(shape: &[i64]) -> TensorShapeProto {
    TensorShapeProto {
        dim: shape
            .iter()
            .map(|&size| tensor_shape_proto::Dim {
                size,
                name: String::new(),
            })
            .collect(),
        unknown_rank: false,
    }
}

/// A signature as the `SignatureDef` proto GetModelMetadata returns.
pub fn signature_def(sig: &Signature) -> crate::pb::tensorflow::SignatureDef {
    let infos = |ts: &[crate::spec::SigTensor]| {
        ts.iter()
            .map(|t| {
                (
                    t.key.clone(),
                    TensorInfo {
                        dtype: t.datatype.tensorflow_code(),
                        tensor_shape: Some(shape_proto(&t.shape)),
                        encoding: Some(tensor_info::Encoding::Name(t.tensor_name.clone())),
                    },
                )
            })
            .collect()
    };
    crate::pb::tensorflow::SignatureDef {
        inputs: infos(&sig.inputs),
        outputs: infos(&sig.outputs),
        method_name: sig.method_name.clone(),
        defaults: Default::default(),
    }
}

/// The REST metadata body: `model_spec` and `metadata.signature_def.signature_def`.
pub fn metadata_json(name: &str, version: u64, signatures: &[Signature]) -> Value {
    let tensors = |ts: &[crate::spec::SigTensor]| -> Value {
        ts.iter()
            .map(|t| {
                (
                    t.key.clone(),
                    json!({
                        "dtype": dt_name(t.datatype),
                        "tensor_shape": {
                            "dim": t.shape.iter().map(|d| json!({"size": d.to_string(), "name": ""})).collect::<Vec<_>>(),
                            "unknown_rank": false
                        },
                        "name": t.tensor_name,
                    }),
                )
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    let defs: serde_json::Map<String, Value> = signatures
        .iter()
        .map(|s| {
            (
                s.name.clone(),
                json!({
                    "inputs": tensors(&s.inputs),
                    "outputs": tensors(&s.outputs),
                    "method_name": s.method_name,
                    "defaults": {}
                }),
            )
        })
        .collect();
    json!({
        "model_spec": {"name": name, "signature_name": "", "version": version.to_string()},
        "metadata": {"signature_def": {"signature_def": defs}}
    })
}
