//! What a TF Serving request addresses: a model, a version choice (latest, a number, a label)
//! and a signature, resolved against the engine with TF Serving's error messages.

use oxserve_core::{DataType, Error, ErrorKind, ModelMetadata, Result, TensorMeta};
use oxserve_engine::InferenceService;
use oxserve_frontend::ModelTarget;

/// The signature a request without `signature_name` runs.
pub const DEFAULT_SIGNATURE: &str = "serving_default";
pub const PREDICT_METHOD: &str = "tensorflow/serving/predict";
pub const CLASSIFY_METHOD: &str = "tensorflow/serving/classify";
pub const REGRESS_METHOD: &str = "tensorflow/serving/regress";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionChoice {
    Latest,
    Specific(u64),
    Label(String),
}

/// A model and a version choice, as `ModelSpec` and the REST paths carry them.
#[derive(Debug, Clone)]
pub struct ModelRef {
    pub name: String,
    pub version: VersionChoice,
}

impl ModelRef {
    /// TF Serving's name for the request in "not found" messages.
    fn describe(&self) -> String {
        match &self.version {
            VersionChoice::Specific(v) => format!("Specific({}, {v})", self.name),
            _ => format!("Latest({})", self.name),
        }
    }

    /// The version this request runs on, checked ready.
    pub fn resolve(&self, engine: &InferenceService) -> Result<ModelTarget> {
        // As TF Serving: a servable that is not available — unknown, still loading, failed,
        // unloaded — is not found.
        let not_found = |e: Error| {
            if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::Unavailable) {
                Error::not_found(format!("Servable not found for request: {}", self.describe()))
            } else {
                e
            }
        };
        match &self.version {
            VersionChoice::Latest => ModelTarget::resolve(engine, &self.name, None).map_err(not_found),
            VersionChoice::Specific(v) => {
                ModelTarget::resolve(engine, &self.name, Some(*v)).map_err(not_found)
            }
            VersionChoice::Label(label) => {
                // As TF Serving, the label is looked up first: an unknown label (of any model,
                // known or not) is the client's mistake.
                let version = engine
                    .label_version(&self.name, label)
                    .map_err(|_| Error::invalid(format!("Unrecognized servable version label: {label}")))?;
                ModelTarget::resolve(engine, &self.name, Some(version)).map_err(not_found)
            }
        }
    }
}

/// One tensor of a signature: key, type, the model's shape (`-1` variable) and its graph name.
#[derive(Debug, Clone)]
pub struct SigTensor {
    pub key: String,
    pub datatype: DataType,
    pub shape: Vec<i64>,
    pub tensor_name: String,
}

/// A signature as TF Serving's APIs see it. Every model has at least `serving_default`:
/// models without signatures of their own (ONNX) show their inputs and outputs as one.
#[derive(Debug, Clone)]
pub struct Signature {
    pub name: String,
    pub method_name: String,
    pub inputs: Vec<SigTensor>,
    pub outputs: Vec<SigTensor>,
    /// The model's default entry point (the engine needs no signature name for it).
    pub is_default: bool,
    /// The model has real signatures (a SavedModel): their shapes are the model's own, which
    /// the engine's configuration may have given a trailing 1 (Triton's batched `[-1]`).
    pub native: bool,
}

/// Every signature of a model version.
pub fn signatures(metadata: &ModelMetadata) -> Vec<Signature> {
    if metadata.signatures.is_empty() {
        let tensors = |ts: &[TensorMeta]| {
            ts.iter()
                .map(|t| SigTensor {
                    key: t.name.clone(),
                    datatype: t.datatype,
                    shape: t.shape.clone(),
                    tensor_name: t.name.clone(),
                })
                .collect()
        };
        return vec![Signature {
            name: DEFAULT_SIGNATURE.into(),
            method_name: PREDICT_METHOD.into(),
            inputs: tensors(&metadata.inputs),
            outputs: tensors(&metadata.outputs),
            is_default: true,
            native: false,
        }];
    }
    metadata
        .signatures
        .iter()
        .map(|s| {
            let tensors = |ts: &[oxserve_core::SignatureTensor]| {
                ts.iter()
                    .map(|t| SigTensor {
                        key: t.meta.name.clone(),
                        datatype: t.meta.datatype,
                        shape: t.meta.shape.clone(),
                        tensor_name: t.tensor_name.clone(),
                    })
                    .collect()
            };
            Signature {
                name: s.name.clone(),
                method_name: s.method_name.clone(),
                inputs: tensors(&s.inputs),
                outputs: tensors(&s.outputs),
                is_default: s.is_default,
                native: true,
            }
        })
        .collect()
}

/// The signature a request names (empty: `serving_default`), or TF Serving's error.
pub fn signature(metadata: &ModelMetadata, name: &str) -> Result<Signature> {
    let name = if name.is_empty() { DEFAULT_SIGNATURE } else { name };
    signatures(metadata)
        .into_iter()
        .find(|s| s.name == name)
        .ok_or_else(|| {
            Error::invalid(format!(
                "Serving signature name: \"{}\" not found in signature def",
                truncate(name)
            ))
        })
}

pub(crate) fn truncate(s: &str) -> String {
    if s.chars().count() <= 100 {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(100).collect::<String>())
    }
}
