//! `Backend::load`: build the first session (so a corrupt file, an unknown operator or a
//! configuration that disagrees with the model fails the load, not a request), check the
//! configuration against what the session declares, and keep what every instance needs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ort::ep::ArbitrarilyConfigurableExecutionProvider;
use ort::session::Session;
use ort::session::builder::SessionBuilder;
use oxserve_backend::support::{check_declared_shape, check_declared_type, check_same_names};
use oxserve_backend::{BackendError, Device, LoadSpec, LoadedModel, ModelInstance, ModelSignature};
use oxserve_core::{DataType, TensorMeta};

use crate::cuda::cuda_options;
use crate::error::{file_label, invalid_model, summarize, unsupported};
use crate::instance::OrtInstance;
use crate::library::Runtime;
use crate::options::{OptimizationLevel, SessionConfig, available_cores};
use crate::padding;
use crate::types::outlet_meta;

/// A configured input, in configuration order (the order `Batch::inputs` uses).
#[derive(Debug)]
pub(crate) struct InputSlot {
    pub name: String,
    pub dtype: DataType,
    /// Model-facing shape from the configuration, `-1` = variable.
    pub shape: Vec<i64>,
}

/// A configured output.
#[derive(Debug)]
pub(crate) struct OutputSlot {
    pub name: String,
    pub dtype: DataType,
}

/// What every instance of a loaded model shares.
pub(crate) struct Prepared {
    pub model_name: String,
    pub inputs: Vec<InputSlot>,
    pub outputs: Vec<OutputSlot>,
    pub batched: bool,
    runtime: Arc<Runtime>,
    model_path: PathBuf,
    config: SessionConfig,
    devices: Vec<Device>,
    /// How GPU instances pad their batches (see `crate::padding`).
    gpu_padding: Option<padding::Padding>,
}

impl Prepared {
    fn device(&self, index: usize) -> Device {
        self.devices.get(index).copied().unwrap_or_default()
    }
}

pub(crate) struct OrtModel {
    prepared: Arc<Prepared>,
    /// The session built at load time, handed to the first instance that runs on its device.
    first: Mutex<Option<(Device, Session)>>,
}

impl LoadedModel for OrtModel {
    fn new_instance(&self, index: usize) -> Result<Box<dyn ModelInstance>, BackendError> {
        let device = self.prepared.device(index);
        let reuse = {
            let mut first = self.first.lock().unwrap_or_else(|p| p.into_inner());
            match first.take() {
                Some((d, session)) if d == device => Some(session),
                other => {
                    *first = other;
                    None
                }
            }
        };
        let session = match reuse {
            Some(session) => session,
            None => build_session(
                &self.prepared.runtime,
                &self.prepared.model_path,
                &self.prepared.config,
                device,
            )?,
        };
        let padding = match device {
            Device::Gpu(_) => self.prepared.gpu_padding,
            Device::Cpu => None,
        };
        Ok(Box::new(OrtInstance::new(
            Arc::clone(&self.prepared),
            session,
            padding,
        )?))
    }
}

/// Creates one session with the model's options on `device`.
pub(crate) fn build_session(
    runtime: &Runtime,
    path: &Path,
    config: &SessionConfig,
    device: Device,
) -> Result<Session, BackendError> {
    let label = file_label(path);
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        invalid_model(format!(
            "ONNX Runtime cannot {what} for '{label}': {}",
            summarize(&e.to_string(), Some(path))
        ))
    };
    let mut builder = Session::builder(&runtime.env)
        .and_then(|b| b.with_optimization_level(config.level.ort()).map_err(Into::into))
        .and_then(|b| b.with_intra_threads(config.intra_threads).map_err(Into::into))
        .and_then(|b| b.with_inter_threads(config.inter_threads).map_err(Into::into))
        .and_then(|b| b.with_parallel_execution(config.parallel).map_err(Into::into))
        .map_err(|e: ort::Error| fail("set the session options", &e))?;
    if let Some(enable) = config.mem_pattern {
        builder = builder
            .with_memory_pattern(enable)
            .map_err(|e| fail("set enable_mem_pattern", &e))?;
    }
    for (key, value) in &config.entries {
        builder = builder
            .with_config_entry(key, value)
            .map_err(|e| fail(&format!("set session option '{key}'"), &e))?;
    }
    if let Device::Gpu(id) = device {
        builder = with_cuda(runtime, builder, id, &config.cuda)?;
    }
    let mut builder: SessionBuilder = builder;
    builder
        .commit_from_file(path)
        .map_err(|e| fail("load the model", &e))
}

/// KIND_GPU needs the CUDA execution provider in the loaded library.
fn ensure_cuda(runtime: &Runtime) -> Result<(), BackendError> {
    if runtime.cuda {
        return Ok(());
    }
    Err(unsupported(format!(
        "instance_group KIND_GPU: CUDA execution provider not available in the loaded onnxruntime \
         library ({}); install the onnxruntime-gpu build and point --onnxruntime-library at its \
         libonnxruntime.so, or use KIND_CPU",
        runtime.library.display()
    )))
}

fn with_cuda(
    runtime: &Runtime,
    builder: SessionBuilder,
    gpu: u32,
    options: &BTreeMap<String, String>,
) -> Result<SessionBuilder, BackendError> {
    ensure_cuda(runtime)?;
    let device_id = i32::try_from(gpu)
        .map_err(|_| invalid_model(format!("instance_group KIND_GPU: invalid gpu {gpu}")))?;
    let mut cuda = ort::ep::CUDA::default().with_device_id(device_id);
    for (key, value) in options {
        cuda = cuda.with_arbitrary_config(key, value);
    }
    let cuda = cuda.build().error_on_failure();
    builder.with_execution_providers([cuda]).map_err(|e| {
        unsupported(format!(
            "instance_group KIND_GPU: cannot use GPU {gpu} with the CUDA execution provider: {}",
            summarize(e.message(), None)
        ))
    })
}

/// What the session declares about its inputs and outputs.
pub(crate) fn session_signature(session: &Session, path: &Path) -> Result<ModelSignature, BackendError> {
    let label = file_label(path);
    let with_file = |e: BackendError| BackendError::new(e.kind(), format!("{label}: {e}"));
    let inputs = session
        .inputs()
        .iter()
        .map(|o| outlet_meta("input", o))
        .collect::<Result<_, _>>()
        .map_err(with_file)?;
    let outputs = session
        .outputs()
        .iter()
        .map(|o| outlet_meta("output", o))
        .collect::<Result<_, _>>()
        .map_err(with_file)?;
    Ok(ModelSignature { inputs, outputs })
}

/// `Backend::inspect`: a quick session (no graph optimizations, one thread) to read the
/// declared inputs and outputs.
pub(crate) fn inspect(runtime: &Runtime, path: &Path) -> Result<ModelSignature, BackendError> {
    let config = SessionConfig {
        intra_threads: 1,
        inter_threads: 1,
        parallel: false,
        level: OptimizationLevel::Disabled,
        mem_pattern: None,
        entries: Vec::new(),
        cuda: BTreeMap::new(),
    };
    check_file(path)?;
    let session = build_session(runtime, path, &config, Device::Cpu)?;
    session_signature(&session, path)
}

/// A missing or empty file gets a plain message rather than ONNX Runtime's.
fn check_file(path: &Path) -> Result<(), BackendError> {
    let label = file_label(path);
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() && m.len() > 0 => Ok(()),
        Ok(m) if m.is_file() => Err(invalid_model(format!(
            "'{label}' is not a valid ONNX model: the file is empty"
        ))),
        Ok(_) => Err(invalid_model(format!("'{label}' is not a file"))),
        Err(e) => Err(invalid_model(format!("cannot open ONNX model '{label}': {e}"))),
    }
}

pub(crate) fn load(runtime: Arc<Runtime>, spec: &LoadSpec) -> Result<OrtModel, BackendError> {
    let label = file_label(&spec.model_path);
    let with_file = |e: BackendError| BackendError::new(e.kind(), format!("{label}: {e}"));
    check_file(&spec.model_path)?;
    let mut config = SessionConfig::from_spec(spec, available_cores()).map_err(with_file)?;
    let devices: Vec<Device> = (0..spec.instance_count.max(1))
        .map(|i| spec.devices.get(i).copied().unwrap_or_default())
        .collect();
    // Every GPU group must fail the load when there is no CUDA, not the instance start. GPU
    // options apply to GPU instances only (as in Triton, a CPU-only model ignores them).
    let mut gpu_padding = None;
    if devices.iter().any(|d| matches!(d, Device::Gpu(_))) {
        config.cuda = cuda_options(spec).map_err(with_file)?;
        gpu_padding = padding::gpu_padding(spec).map_err(with_file)?;
        ensure_cuda(&runtime)?;
    }
    // The first instance's session doubles as the load check.
    let first_device = devices.first().copied().unwrap_or_default();
    let session = build_session(&runtime, &spec.model_path, &config, first_device)?;
    let declared = session_signature(&session, &spec.model_path)?;
    let batched = spec.max_batch_size > 0;
    let inputs = plan_inputs(spec, &declared.inputs, batched).map_err(with_file)?;
    let outputs = plan_outputs(spec, &declared.outputs).map_err(with_file)?;
    tracing::debug!(
        model = %spec.model_name,
        version = spec.version,
        intra_op_threads = config.intra_threads,
        inter_op_threads = config.inter_threads,
        parallel = config.parallel,
        level = ?config.level,
        "onnxruntime session ready"
    );
    Ok(OrtModel {
        prepared: Arc::new(Prepared {
            model_name: spec.model_name.clone(),
            inputs,
            outputs,
            batched,
            runtime,
            model_path: spec.model_path.clone(),
            config,
            devices,
            gpu_padding,
        }),
        first: Mutex::new(Some((first_device, session))),
    })
}

/// Matches the configured inputs to the session's, by name; every session input must be
/// configured (ONNX Runtime needs a value for each).
fn plan_inputs(
    spec: &LoadSpec,
    declared: &[TensorMeta],
    batched: bool,
) -> Result<Vec<InputSlot>, BackendError> {
    check_same_names("input", &spec.inputs, &names(declared), true)?;
    let mut slots = Vec::with_capacity(spec.inputs.len());
    for meta in &spec.inputs {
        let Some(model) = declared.iter().find(|d| d.name == meta.name) else {
            continue; // unreachable: check_same_names saw every name
        };
        check_type("input", meta, model)?;
        if batched && meta.shape.first() != Some(&-1) {
            return Err(invalid_model(format!(
                "input '{}': the model is batched (max_batch_size > 0) but its configured shape \
                 {:?} does not start with a variable batch dimension",
                meta.name, meta.shape
            )));
        }
        check_shape("input", meta, model, true)?;
        slots.push(InputSlot {
            name: meta.name.clone(),
            dtype: meta.datatype,
            shape: meta.shape.clone(),
        });
    }
    Ok(slots)
}

/// Matches the configured outputs to the session's; none configured means all of them.
fn plan_outputs(spec: &LoadSpec, declared: &[TensorMeta]) -> Result<Vec<OutputSlot>, BackendError> {
    if spec.outputs.is_empty() {
        return Ok(declared
            .iter()
            .map(|d| OutputSlot {
                name: d.name.clone(),
                dtype: d.datatype,
            })
            .collect());
    }
    check_same_names("output", &spec.outputs, &names(declared), false)?;
    let mut slots = Vec::with_capacity(spec.outputs.len());
    for meta in &spec.outputs {
        let Some(model) = declared.iter().find(|d| d.name == meta.name) else {
            continue; // unreachable: check_same_names saw every name
        };
        check_type("output", meta, model)?;
        check_shape("output", meta, model, false)?;
        slots.push(OutputSlot {
            name: meta.name.clone(),
            dtype: meta.datatype,
        });
    }
    Ok(slots)
}

fn names(declared: &[TensorMeta]) -> Vec<&str> {
    declared.iter().map(|d| d.name.as_str()).collect()
}

fn check_type(role: &str, meta: &TensorMeta, model: &TensorMeta) -> Result<(), BackendError> {
    check_declared_type(role, meta, model.datatype)
}

/// Declared output shapes are looser than input ones (see [`check_declared_shape`]).
fn check_shape(role: &str, meta: &TensorMeta, model: &TensorMeta, strict: bool) -> Result<(), BackendError> {
    check_declared_shape(role, meta, &model.shape, strict)
}
