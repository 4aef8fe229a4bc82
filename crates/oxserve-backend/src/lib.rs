//! The contract between oxserve and an inference engine, shaped like Triton's backend API:
//! a [`Backend`] (one per engine) loads a model version into a [`LoadedModel`], which makes one
//! [`ModelInstance`] per configured instance. An instance is owned by exactly one scheduler
//! thread and runs batches synchronously, so engines need no locks inside.

pub mod support;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use oxserve_core::{Tensor, TensorMeta};

#[cfg(feature = "testkit")]
pub mod testkit;

/// What went wrong inside an engine. Opaque apart from its kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendErrorKind {
    /// The model file is missing, corrupt or not understood.
    InvalidModel,
    /// The model uses something the engine cannot run (an operator, a data type).
    Unsupported,
    /// The inputs handed to `execute` were rejected by the engine.
    InvalidInput,
    /// Anything else.
    Internal,
}

#[derive(Debug, Clone)]
pub struct BackendError {
    kind: BackendErrorKind,
    message: String,
}

impl BackendError {
    pub fn new(kind: BackendErrorKind, message: impl Into<String>) -> Self {
        BackendError {
            kind,
            message: message.into(),
        }
    }
    pub fn kind(&self) -> BackendErrorKind {
        self.kind
    }
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for BackendError {}

/// Inputs and outputs a model file declares, with full shapes (`-1` = variable, including a
/// leading batch dimension when the model has one).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelSignature {
    pub inputs: Vec<TensorMeta>,
    pub outputs: Vec<TensorMeta>,
}

/// Where one model instance runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    /// A GPU, by index (Triton's `instance_group { kind: KIND_GPU gpus: [ ... ] }`).
    Gpu(u32),
}

/// One of Triton's `optimization { execution_accelerators { gpu_execution_accelerator [ ... ] } }`
/// entries: an engine-specific accelerator by name, with its options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Accelerator {
    pub name: String,
    pub parameters: BTreeMap<String, String>,
}

/// Everything a backend needs to load one model version.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub model_name: String,
    pub version: u64,
    /// The model definition file (or directory) inside the version directory.
    pub model_path: PathBuf,
    /// Model-facing inputs in the order the engine receives them: shapes after `reshape`, with
    /// a leading `-1` when the model is batched (`max_batch_size > 0`).
    pub inputs: Vec<TensorMeta>,
    /// Model-facing outputs, shaped like `inputs`.
    pub outputs: Vec<TensorMeta>,
    pub max_batch_size: u32,
    /// Instances that will run concurrently, so the engine can size its thread pools.
    pub instance_count: usize,
    /// Where each instance runs, by instance index. A missing entry means [`Device::Cpu`]. Only
    /// engines whose [`Backend::supports_gpu`] is true are handed [`Device::Gpu`].
    pub devices: Vec<Device>,
    /// Triton's `optimization { graph { level } }`: 0 is the engine's default; engines that
    /// have graph optimization levels map the other values (see their documentation).
    pub graph_optimization_level: i32,
    /// Free-form `parameters` from the model configuration.
    pub parameters: BTreeMap<String, String>,
    /// Accelerators for the instances on a GPU, in configuration order; engines that cannot
    /// apply one must fail the load rather than ignore it.
    pub gpu_accelerators: Vec<Accelerator>,
}

/// One batch to run: inputs in the order of [`LoadSpec::inputs`], all with the same first
/// dimension when the model is batched, and the names of the outputs to produce.
#[derive(Debug, Clone)]
pub struct Batch {
    pub inputs: Vec<Tensor>,
    pub outputs: Vec<String>,
}

pub trait Backend: Send + Sync {
    /// Short engine name, as in config.pbtxt's `backend` field.
    fn name(&self) -> &'static str;

    /// Reads the inputs and outputs the model file declares, for auto-completing and checking
    /// the model configuration.
    fn inspect(&self, model_path: &Path) -> Result<ModelSignature, BackendError>;

    /// Loads and prepares a model version; errors here keep the version from serving.
    fn load(&self, spec: &LoadSpec) -> Result<Box<dyn LoadedModel>, BackendError>;

    /// Whether the engine can load models in this process at all (an engine whose runtime
    /// library is loaded at run time may find none). The model manager asks before choosing
    /// the engine for a model; `Ok` carries a short description of the runtime for logs.
    fn availability(&self) -> Result<String, BackendError> {
        Ok(String::new())
    }

    /// Whether [`Backend::inspect`] describes the model's inputs and outputs. When it does
    /// not (TorchScript files do not declare them), the configuration must list them and is
    /// taken as it is.
    fn declares_signature(&self) -> bool {
        true
    }

    /// Whether instances may be placed on GPUs (`LoadSpec::devices`).
    fn supports_gpu(&self) -> bool {
        false
    }

    /// For Triton's `KIND_AUTO`: whether this engine's GPU runtime is present here, so that
    /// instances go to a GPU. `Ok` describes it, `Err` says why not (logged when the instances
    /// go to the CPU instead). Asked only when [`Backend::supports_gpu`] is true.
    fn gpu_runtime(&self) -> Result<String, String> {
        Err(format!("the {} engine has no GPU runtime", self.name()))
    }
}

/// A named entry point of a model besides its default one: a SavedModel signature. The
/// default entry point is the one [`Backend::inspect`] describes and
/// [`LoadedModel::new_instance`] runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntryPoint {
    /// The signature key (`serving_default`, `classify`, ...).
    pub name: String,
    /// What kind of computation it is (TensorFlow's `tensorflow/serving/predict`, `.../classify`,
    /// `.../regress`).
    pub method_name: String,
    /// Inputs and outputs by key, sorted by key, with full shapes (`-1` = variable); the order
    /// in which [`LoadedModel::new_entry_instance`] instances take their inputs.
    pub inputs: Vec<TensorMeta>,
    pub outputs: Vec<TensorMeta>,
    /// The engine's own tensor names (`serving_default_x:0`), in the order of `inputs` /
    /// `outputs`, for metadata.
    pub input_tensor_names: Vec<String>,
    pub output_tensor_names: Vec<String>,
    /// Whether this is the default entry point (its inputs and outputs are the model's).
    pub is_default: bool,
}

pub trait LoadedModel: Send + Sync {
    /// Creates the `index`-th instance. Called once per configured instance, on the thread
    /// that will own it.
    fn new_instance(&self, index: usize) -> Result<Box<dyn ModelInstance>, BackendError>;

    /// Every entry point of the model, the default one included, when the engine has more
    /// than one per model (SavedModel signatures); empty otherwise.
    fn entry_points(&self) -> Vec<EntryPoint> {
        Vec::new()
    }

    /// Creates an instance that runs the named non-default entry point, taking its inputs in
    /// the order [`LoadedModel::entry_points`] lists them.
    fn new_entry_instance(&self, entry: &str, _index: usize) -> Result<Box<dyn ModelInstance>, BackendError> {
        Err(BackendError::new(
            BackendErrorKind::Unsupported,
            format!("the model has no entry point '{entry}'"),
        ))
    }
}

pub trait ModelInstance: Send {
    /// Runs one batch and returns the requested outputs in the order of `batch.outputs`, with
    /// model-facing shapes.
    fn execute(&mut self, batch: Batch) -> Result<Vec<Tensor>, BackendError>;
}
