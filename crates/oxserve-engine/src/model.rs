//! A model version that is ready to serve, and the client-facing view of its inputs and outputs.

use std::sync::Arc;

use oxserve_core::{DataType, ModelMetadata};
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
}
