//! `Backend::load`: check the configuration against the file, pin the input facts, and let
//! tract analyse, optimise and plan the model, so every problem shows up at load time.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::Arc;

use oxserve_backend::support::{check_declared_shape, check_declared_type, check_same_names};
use oxserve_backend::{BackendError, LoadSpec, LoadedModel, ModelInstance};
use oxserve_core::{DataType, TensorMeta};
use tract_onnx::pb;
use tract_onnx::prelude::{
    DatumType, InferenceFact, InferenceModel, InferenceModelExt, RunOptions, TDim, ToDim, TractResult,
    TypedRunnableModel, TypedSimplePlan, multithread::Executor,
};
use tract_onnx::tract_hir::infer::{DimFact, ShapeFactoid};

use crate::convert::{datum_type, output_compatible};
use crate::error::{file_label, invalid_model, panic_message, summarize, truncate, unsupported};
use crate::instance::TractInstance;
use crate::signature::{Declared, DeclaredDim, declared_inputs, declared_outputs, read_proto};

/// How one configured dimension becomes part of a tract input fact.
#[derive(Debug, Clone, PartialEq, Eq)]
enum DimPlan {
    Fixed(usize),
    /// The batch dimension, one symbol shared by every input; carries the model's own
    /// `dim_param` for it, if it names one.
    Batch(Option<String>),
    /// A variable dimension the model names with a `dim_param`: reuse that symbol, so inputs
    /// that share a dimension (a sequence length, say) stay equal for tract.
    Named(String),
    /// A variable dimension with nothing to tie it to: a fresh symbol.
    Fresh,
}

/// A configured input, in configuration order (the order `Batch::inputs` uses).
#[derive(Debug)]
pub(crate) struct InputSlot {
    pub name: String,
    pub dtype: DataType,
    pub datum: DatumType,
    /// Model-facing shape from the configuration, `-1` = variable.
    pub shape: Vec<i64>,
    dims: Vec<DimPlan>,
}

/// A configured output, in configuration order (the order of the plan's outputs).
#[derive(Debug)]
pub(crate) struct OutputSlot {
    pub name: String,
    pub dtype: DataType,
}

/// What every instance of a loaded model shares.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub model_name: String,
    pub plan: Arc<TypedRunnableModel>,
    pub inputs: Vec<InputSlot>,
    pub outputs: Vec<OutputSlot>,
    pub batched: bool,
}

pub(crate) struct TractModel {
    prepared: Arc<Prepared>,
}

impl LoadedModel for TractModel {
    fn new_instance(&self, _index: usize) -> Result<Box<dyn ModelInstance>, BackendError> {
        Ok(Box::new(TractInstance::new(Arc::clone(&self.prepared))?))
    }
}

pub(crate) fn load(spec: &LoadSpec) -> Result<TractModel, BackendError> {
    let label = file_label(&spec.model_path);
    let with_file = |e: BackendError| BackendError::new(e.kind(), format!("{label}: {e}"));
    let proto = read_proto(&spec.model_path)?;
    let graph = proto
        .graph
        .as_ref()
        .ok_or_else(|| invalid_model(format!("'{label}' holds no graph")))?;

    check_operators(graph).map_err(with_file)?;
    let batched = spec.max_batch_size > 0;
    let inputs = plan_inputs(spec, &declared_inputs(graph), batched).map_err(with_file)?;
    let outputs = plan_outputs(spec, &declared_outputs(graph)).map_err(with_file)?;

    let model_dir = spec.model_path.parent();
    // ONNX `value_info` entries are shape hints for intermediate tensors. Exporters sometimes
    // write ones that contradict the facts we pin on the inputs (a batch dim_param other than
    // ours, stale static shapes), which makes tract's analysis fail. They are only hints, so on
    // failure try again without them before giving up.
    let plan = match build_plan(&proto, model_dir, &inputs, &outputs, false) {
        Ok(plan) => plan,
        Err(first) if graph.value_info.is_empty() => {
            return Err(invalid_model(format!(
                "{label}: tract could not prepare the model: {first}"
            )));
        }
        Err(first) => match build_plan(&proto, model_dir, &inputs, &outputs, true) {
            Ok(plan) => {
                tracing::warn!(
                    model = %spec.model_name,
                    version = spec.version,
                    error = %first,
                    "tract rejected the model's value_info hints; loaded without them"
                );
                plan
            }
            Err(_) => {
                return Err(invalid_model(format!(
                    "{label}: tract could not prepare the model: {first}"
                )));
            }
        },
    };

    tracing::debug!(
        model = %spec.model_name,
        version = spec.version,
        nodes = plan.model().nodes().len(),
        "tract model ready"
    );
    Ok(TractModel {
        prepared: Arc::new(Prepared {
            model_name: spec.model_name.clone(),
            plan,
            inputs,
            outputs,
            batched,
        }),
    })
}

/// Fails with every operator tract has no implementation for, before tract tries and reports
/// only the first one deep inside an analysis error. Looks inside subgraphs (If, Loop, Scan).
fn check_operators(graph: &pb::GraphProto) -> Result<(), BackendError> {
    let registry = tract_onnx::onnx().op_register;
    let mut missing: Vec<String> = Vec::new();
    let mut stack = vec![graph];
    while let Some(g) = stack.pop() {
        for node in &g.node {
            if !registry.0.contains_key(&node.op_type) {
                let op = if node.domain.is_empty() || node.domain == "ai.onnx" {
                    node.op_type.clone()
                } else {
                    format!("{}:{}", node.domain, node.op_type)
                };
                let entry = if node.name.is_empty() {
                    op
                } else {
                    format!("{op} (node '{}')", node.name)
                };
                if !missing.contains(&entry) {
                    missing.push(entry);
                }
            }
            for attr in &node.attribute {
                stack.extend(attr.g.iter());
                stack.extend(attr.graphs.iter());
            }
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let shown: Vec<&str> = missing.iter().take(8).map(String::as_str).collect();
    let more = missing.len().saturating_sub(shown.len());
    Err(unsupported(format!(
        "tract does not implement the ONNX operator(s) {}{}",
        shown.join(", "),
        if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        }
    )))
}

/// Matches the configured inputs to the model's, by name, and decides each dimension.
fn plan_inputs(
    spec: &LoadSpec,
    declared: &[Declared],
    batched: bool,
) -> Result<Vec<InputSlot>, BackendError> {
    check_same_names("input", &spec.inputs, &names(declared), true)?;
    let mut slots = Vec::with_capacity(spec.inputs.len());
    for meta in &spec.inputs {
        let Some(model) = declared.iter().find(|d| d.name == meta.name) else {
            continue; // unreachable: check_same_names saw every name
        };
        let datum = check_type("input", meta, model)?;
        if batched && meta.shape.first() != Some(&-1) {
            return Err(invalid_model(format!(
                "input '{}': the model is batched (max_batch_size > 0) but its configured shape \
                 {:?} does not start with a variable batch dimension",
                meta.name, meta.shape
            )));
        }
        let declared_dims = check_shape("input", meta, model)?;
        let dims = meta
            .shape
            .iter()
            .enumerate()
            .map(|(axis, &d)| {
                if d >= 0 {
                    usize::try_from(d).map(DimPlan::Fixed).map_err(|_| {
                        invalid_model(format!("input '{}': dimension {d} is too large", meta.name))
                    })
                } else {
                    let param = match declared_dims.and_then(|dims| dims.get(axis)) {
                        Some(DeclaredDim::Param(p)) if is_plain_symbol(p) => Some(p.clone()),
                        _ => None,
                    };
                    Ok(match (batched && axis == 0, param) {
                        (true, param) => DimPlan::Batch(param),
                        (false, Some(p)) => DimPlan::Named(p),
                        (false, None) => DimPlan::Fresh,
                    })
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        slots.push(InputSlot {
            name: meta.name.clone(),
            dtype: meta.datatype,
            datum,
            shape: meta.shape.clone(),
            dims,
        });
    }
    Ok(slots)
}

/// Matches the configured outputs to the model's by name (the configuration may list them in
/// another order, or only some of them). No configured outputs means all of the model's.
fn plan_outputs(spec: &LoadSpec, declared: &[Declared]) -> Result<Vec<OutputSlot>, BackendError> {
    if spec.outputs.is_empty() {
        return declared
            .iter()
            .map(|d| {
                let dtype = d.datatype("output")?;
                datum_type(dtype).ok_or_else(|| no_tract_type("output", &d.name, dtype))?;
                Ok(OutputSlot {
                    name: d.name.clone(),
                    dtype,
                })
            })
            .collect();
    }
    check_same_names("output", &spec.outputs, &names(declared), false)?;
    let mut slots = Vec::with_capacity(spec.outputs.len());
    for meta in &spec.outputs {
        let Some(model) = declared.iter().find(|d| d.name == meta.name) else {
            continue; // unreachable: check_same_names saw every name
        };
        check_type("output", meta, model)?;
        check_shape("output", meta, model)?;
        slots.push(OutputSlot {
            name: meta.name.clone(),
            dtype: meta.datatype,
        });
    }
    Ok(slots)
}

fn names(declared: &[Declared]) -> Vec<&str> {
    declared.iter().map(|d| d.name.as_str()).collect()
}

fn check_type(role: &str, meta: &TensorMeta, model: &Declared) -> Result<DatumType, BackendError> {
    check_declared_type(role, meta, model.datatype(role)?)?;
    datum_type(meta.datatype).ok_or_else(|| no_tract_type(role, &meta.name, meta.datatype))
}

fn no_tract_type(role: &str, name: &str, dtype: DataType) -> BackendError {
    unsupported(format!(
        "{role} '{name}' is {dtype}, which tract cannot run (serve this model with another backend)"
    ))
}

/// Checks a configured shape against the declared one, if the model declares any, and returns
/// the declared dims. Ranks must match and a fixed configured dim must match a fixed declared
/// one. For inputs, a variable configured dim also needs a variable declared one: otherwise
/// requests the configuration allows would fail on every call. Declared output shapes are only
/// documentation to tract (it computes them), so a configuration may be vaguer there.
fn check_shape<'d>(
    role: &str,
    meta: &TensorMeta,
    model: &'d Declared,
) -> Result<Option<&'d [DeclaredDim]>, BackendError> {
    let Some(dims) = &model.dims else {
        return Ok(None);
    };
    let declared: Vec<i64> = dims
        .iter()
        .map(|d| match d {
            DeclaredDim::Fixed(v) if *v >= 0 => *v,
            _ => -1,
        })
        .collect();
    check_declared_shape(role, meta, &declared, role == "input")?;
    Ok(Some(dims))
}

/// A `dim_param` that names a single symbol, as opposed to an expression ("seq+1") or one of
/// the placeholders exporters write for unknown dims.
fn is_plain_symbol(p: &str) -> bool {
    let mut chars = p.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !p.starts_with("unk__")
}

/// Parses the graph into tract, pins the input facts and output selection, and optimises.
/// Returns a one-line summary of tract's error on failure. A panic inside tract's analysis
/// (some operators assert on odd models) becomes an error too: a bad model file must not take
/// down the thread that loads it.
fn build_plan(
    proto: &pb::ModelProto,
    model_dir: Option<&Path>,
    inputs: &[InputSlot],
    outputs: &[OutputSlot],
    ignore_value_info: bool,
) -> Result<Arc<TypedRunnableModel>, String> {
    let attempt = || build_plan_inner(proto, model_dir, inputs, outputs, ignore_value_info);
    match catch_unwind(AssertUnwindSafe(attempt)) {
        Ok(result) => result.map_err(|e| summarize(&e)),
        Err(panic) => Err(format!(
            "tract panicked: {}",
            truncate(&panic_message(panic.as_ref()), 200)
        )),
    }
}

fn build_plan_inner(
    proto: &pb::ModelProto,
    model_dir: Option<&Path>,
    inputs: &[InputSlot],
    outputs: &[OutputSlot],
    ignore_value_info: bool,
) -> TractResult<Arc<TypedRunnableModel>> {
    let onnx = tract_onnx::onnx().with_ignore_value_info(ignore_value_info);
    // tract resolves external tensor data relative to the model's directory.
    let dir = model_dir.and_then(Path::to_str);
    let parsed = onnx.parse(proto, dir)?;
    if !parsed.unresolved_inputs.is_empty() {
        tract_onnx::prelude::tract_data::internal::bail!(
            "graph uses undefined tensors {:?}",
            parsed.unresolved_inputs
        );
    }
    let mut model = parsed.model;
    model.set_input_names(inputs.iter().map(|i| i.name.as_str()))?;
    model.select_outputs_by_name(outputs.iter().map(|o| o.name.as_str()))?;

    let batch = batch_symbol(&model, inputs);
    for (ix, input) in inputs.iter().enumerate() {
        let dims: Vec<DimFact> = input
            .dims
            .iter()
            .map(|d| {
                let dim: TDim = match d {
                    DimPlan::Fixed(v) => v.to_dim(),
                    DimPlan::Batch(_) => batch.clone(),
                    DimPlan::Named(p) => model.sym(p).to_dim(),
                    DimPlan::Fresh => model.new_sym_with_prefix("d").to_dim(),
                };
                DimFact::from(dim)
            })
            .collect();
        let fact = InferenceFact::dt_shape(input.datum, ShapeFactoid::closed(dims.into()));
        model.set_input_fact(ix, fact)?;
    }

    let typed = model.into_optimized()?;
    for (ix, output) in outputs.iter().enumerate() {
        let fact = typed.output_fact(ix)?;
        let expected = datum_type(output.dtype);
        if !expected.is_some_and(|e| output_compatible(fact.datum_type, e)) {
            tract_onnx::prelude::tract_data::internal::bail!(
                "output '{}' is declared {} but tract computes {:?}",
                output.name,
                output.dtype,
                fact.datum_type
            );
        }
    }
    // Pin the single-threaded executor: `instances × threads ≤ cores` is the scheduler's job,
    // and a process-wide default set by someone else must not change that behind its back.
    let options = RunOptions {
        executor: Some(Executor::SingleThread),
        ..RunOptions::default()
    };
    let plan: Arc<TypedSimplePlan> = typed.into_runnable_with_options(&options)?;
    Ok(plan)
}

/// The batch symbol: the model's own `dim_param` when every input names axis 0 the same way
/// (so `value_info` hints that use it stay consistent), otherwise a fresh "N".
fn batch_symbol(model: &InferenceModel, inputs: &[InputSlot]) -> TDim {
    let mut params = inputs.iter().filter_map(|i| match i.dims.first() {
        Some(DimPlan::Batch(param)) => Some(param.as_deref()),
        _ => None,
    });
    let shared = match params.next() {
        Some(Some(first)) if params.all(|p| p == Some(first)) => Some(first),
        _ => None,
    };
    match shared {
        Some(name) => model.sym(name).to_dim(),
        None => model.new_sym_with_prefix("N").to_dim(),
    }
}
