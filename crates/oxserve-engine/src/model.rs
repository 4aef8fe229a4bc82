//! A model version that is ready to serve, and the client-facing view of its inputs and outputs.

use std::collections::BTreeMap;
use std::sync::Arc;

use oxserve_core::{DataType, Error, ModelMetadata};
use oxserve_repository::pb::ModelConfig;
use oxserve_scheduler::Scheduler;

use crate::stats::ModelStats;

#[derive(Debug, Clone)]
pub(crate) struct InputSpec {
    pub name: String,
    pub datatype: DataType,
    /// Client-facing dims without the batch dimension; -1 = any.
    pub dims: Vec<i64>,
    /// Model-facing dims (config `reshape`) when they differ from `dims`.
    pub reshape: Option<Vec<i64>>,
}

#[derive(Debug, Clone)]
pub(crate) struct OutputSpec {
    pub name: String,
    pub datatype: DataType,
    pub dims: Vec<i64>,
    pub reshape: Option<Vec<i64>>,
    /// Class labels from `label_filename`, for the classification extension.
    pub labels: Option<Arc<Vec<String>>>,
}

#[derive(Debug, Clone)]
pub(crate) struct ModelIo {
    /// 0 = the model has no batch dimension.
    pub max_batch_size: usize,
    pub inputs: Vec<InputSpec>,
    pub outputs: Vec<OutputSpec>,
}

impl ModelIo {
    pub fn output(&self, name: &str) -> Option<(usize, &OutputSpec)> {
        self.outputs.iter().enumerate().find(|(_, o)| o.name == name)
    }
}

/// A loaded, servable model version.
pub(crate) struct ServedVersion {
    pub model_name: String,
    pub version: u64,
    /// What it was loaded from: a reload with the same keys keeps this version serving; one
    /// that differs only in instance counts reuses `model`.
    pub keys: crate::lifecycle::VersionKeys,
    /// The engine's loaded model, shared by this version's instances.
    pub model: Arc<dyn oxserve_backend::LoadedModel>,
    pub config: Arc<ModelConfig>,
    pub io: ModelIo,
    pub metadata: ModelMetadata,
    pub scheduler: Scheduler,
    pub stats: Arc<ModelStats>,
    /// What mirrored requests found when this version was a shadow candidate.
    pub shadow: crate::shadow::ShadowRecord,
    /// The name of the default entry point when the model has several (a SavedModel's
    /// default signature); `io` and `scheduler` above are its.
    pub default_entry: Option<String>,
    /// The other entry points, by name.
    pub entries: BTreeMap<String, EntryView>,
}

/// A non-default entry point of a version (a SavedModel signature): its tensors and its own
/// scheduler over the version's engine model (the instances share the loaded model).
pub(crate) struct EntryView {
    pub io: ModelIo,
    pub scheduler: Scheduler,
}

/// The signature name TF Serving's clients send for a model's default entry point.
pub const DEFAULT_SIGNATURE: &str = "serving_default";

impl ServedVersion {
    /// The tensors and scheduler of the entry point a request names (`None`: the default).
    /// Any model answers to `serving_default` for its default entry point, so TF Serving's
    /// clients can call models that have no signatures of their own (ONNX).
    pub fn entry(&self, name: Option<&str>) -> Result<(&ModelIo, &Scheduler), Error> {
        let Some(name) = name else {
            return Ok((&self.io, &self.scheduler));
        };
        let is_default = match &self.default_entry {
            Some(default) => default == name,
            None => name == DEFAULT_SIGNATURE,
        };
        if is_default {
            return Ok((&self.io, &self.scheduler));
        }
        match self.entries.get(name) {
            Some(view) => Ok((&view.io, &view.scheduler)),
            None => Err(Error::invalid(format!(
                "Serving signature name: \"{}\" not found in signature def",
                oxserve_backend::support::truncate(name, 100)
            ))),
        }
    }
}
